"""features.allow_download: a missing open_clip tag may be downloaded; a file path never is; offline it fails
with the download error and the places searched."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ov3d_ros.core.config import FeatureConfig
from ov3d_ros.core.features.weights import WeightsNotFoundError, fetch_weights

REPO = Path(__file__).resolve().parents[2]


def test_download_is_off_by_default():
    assert FeatureConfig().allow_download is False


def test_a_missing_file_is_never_downloaded(tmp_path):
    with pytest.raises(WeightsNotFoundError, match='does not exist') as e:
        fetch_weights('ViT-B-16', str(tmp_path / 'ViT-B-16.pt'))
    assert 'allow_download' not in str(e.value)
    with pytest.raises(WeightsNotFoundError, match='neither an existing file nor a known'):
        fetch_weights('ViT-B-16', 'no_such_tag')


def test_a_local_file_is_used_as_is(tmp_path):
    f = tmp_path / 'weights.pt'
    f.write_bytes(b'x')
    assert fetch_weights('ViT-B-16', str(f)) == str(f)


def test_offline_download_fails_with_both_reasons(tmp_path):
    """In a process with HF_HUB_OFFLINE=1 (no network is reached) the download of 'openai' fails; the error names
    the download failure and every local place searched."""
    code = ('import sys\nfrom ov3d_ros.core.features.weights import fetch_weights, WeightsNotFoundError\n'
            'try:\n    fetch_weights("ViT-B-16", "openai", sys.argv[1])\n'
            'except WeightsNotFoundError as e:\n    print(e)\n    sys.exit(3)\n')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HOME=str(tmp_path / 'hf'), HF_HUB_CACHE=str(tmp_path / 'hf'))
    p = subprocess.run([sys.executable, '-c', code, str(tmp_path / 'cache')], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 3, p.stdout + p.stderr
    assert 'allow_download: downloading' in p.stdout and 'vit_base_patch16_clip_224.openai' in p.stdout
    assert 'No local weights' in p.stdout and str(tmp_path / 'cache') in p.stdout
