"""`ov3d merge`: two robots' halves of a trajectory merge into the map of the whole trajectory."""
import json

import numpy as np
import pytest
import torch

from ov3d_ros.cli.main import main
from ov3d_ros.core.map_io import load_map

SIM = ['--features', 'simulated', '--device', 'cpu', '--quiet', '--set', 'keyframes.min_translation_m=0.0']


@pytest.fixture(scope='module')
def halves(tmp_path_factory):
    out = tmp_path_factory.mktemp('merge')
    assert main(['make-scenes', '--out', str(out), '--count', '1', '--seed', '7', '--frames', '8',
                 '--width', '96', '--height', '72', '--quiet']) == 0
    scene = str(out / 'scene_0007')
    for name, frames in (('all', '0:8'), ('a', '0:4'), ('b', '4:')):
        assert main(['map', scene, '--out', str(out / f'{name}.ov3dmap'), '--frames', frames] + SIM) == 0
    return out


def test_two_halves_merge_into_the_whole_trajectory_map(halves, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / 'm.ov3dmap'
    assert main(['merge', str(halves / 'a.ov3dmap'), str(halves / 'b.ov3dmap'), '--out', str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    whole, info_w, _ = load_map(halves / 'all.ov3dmap')
    merged, info_m, _ = load_map(out)
    a, _, _ = load_map(halves / 'a.ov3dmap')
    assert summary['voxels'] == merged.size == whole.size and summary['inputs'][0] == a.size < whole.size
    assert info_m['keyframes'] == info_w['keyframes'] == 8
    wk = {int(k): i for i, k in enumerate(whole.keys[:whole.size])}
    rows = torch.tensor([wk[int(k)] for k in merged.keys[:merged.size]])      # same voxels
    assert torch.allclose(merged.weights[:merged.size], whole.weights[rows], rtol=1e-5)
    assert torch.equal(merged.counts[:merged.size], whole.counts[rows])
    assert torch.allclose(merged.colors[:merged.size], whole.colors[rows], atol=0.05)
    # robot B's simulated teacher starts at frame 4 (--frames 4:), so both saw the same features: the merged
    # features are the whole run's up to the fp16 rounding of its running means
    assert torch.allclose(merged.features[:merged.size].float(), whole.features[rows].float(), atol=5e-3)
    # the map answers a query like the whole-trajectory map
    assert main(['query', str(out), 'floor', '--out', str(tmp_path / 'f.ply')]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['points'] > 100


def test_merge_with_a_pose_and_refusals(halves, tmp_path, capsys):
    a = str(halves / 'a.ov3dmap')
    out = tmp_path / 'moved.ov3dmap'
    assert main(['merge', a, a, '--out', str(out), '--pose', '2', '20', '0', '0', '0', '0', '0', '1']) == 0
    m, _, _ = load_map(out)
    single, _, _ = load_map(a)
    assert m.size == 2 * single.size
    assert np.isclose(float(m.centers()[:, 0].max()), float(single.centers()[:, 0].max()) + 20, atol=1e-3)
    capsys.readouterr()
    assert main(['merge', a, a, '--out', str(out), '--pose', '3', '0', '0', '0', '0', '0', '0', '1']) == 2
    assert 'map number must be in 1..2' in capsys.readouterr().err
    (tmp_path / 'shear.txt').write_text('1 0.5 0 0\n0 1 0 0\n0 0 1 0\n0 0 0 1\n')
    assert main(['merge', a, a, '--out', str(out), '--transform', '2', str(tmp_path / 'shear.txt')]) == 2
    assert 'not a rigid transform' in capsys.readouterr().err
    before = out.read_bytes()
    assert main(['merge', a, str(tmp_path / 'missing.ov3dmap'), '--out', str(out)]) == 2
    assert 'cannot read' in capsys.readouterr().err and out.read_bytes() == before    # nothing half-written
