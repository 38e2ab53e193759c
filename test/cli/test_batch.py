"""Batches of inputs on a local Ray instance give exactly the serial results; failing inputs are named."""
import json

import pytest
import torch

from ov3d_ros.cli.main import main

from conftest import make_tiny_scenes
from ov3d_ros.core.map_io import load_map

SIM = ['--features', 'simulated', '--device', 'cpu', '--quiet', '--set', 'keyframes.min_translation_m=0.0']
TIMINGS = ('timing', 'purify_ms_mean', 'wall_s', 'keyframe_ms_mean', 'eval_s', 'superpoints_s')


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return make_tiny_scenes(tmp_path_factory.mktemp('batch_scenes'), 2, 5, 8, 96, 72)


def _untimed(x):
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def test_eval_on_ray_equals_serial_and_names_a_failing_input(scenes, tmp_path, capsys):
    inputs = [str(scenes / 'scene_0005'), str(scenes / 'scene_0006')]
    missing = str(tmp_path / 'no_such_scene')
    assert main(['eval', *inputs, '--out', str(tmp_path / 'serial'), '--serial'] + SIM) == 0
    capsys.readouterr()
    # the missing input fails by name; the two scenes finish on Ray; the exit status says something failed
    assert main(['eval', inputs[0], missing, inputs[1], '--out', str(tmp_path / 'ray'), '--num-cpus', '2'] + SIM) == 2
    err = capsys.readouterr().err
    assert '1 of 3 inputs failed' in err and f'{missing}: no such file or directory' in err
    serial = json.loads((tmp_path / 'serial' / 'results.json').read_text())
    ray = json.loads((tmp_path / 'ray' / 'results.json').read_text())
    assert [s['scene'] for s in ray['scenes']['raw']] == inputs
    assert ray['failed'] == [{'input': missing, 'error': f'{missing}: no such file or directory'}]
    assert _untimed(ray['rows']) == _untimed(serial['rows'])          # every metric, confusion matrices included
    assert _untimed(ray['scenes']) == _untimed(serial['scenes'])
    assert 0 < ray['rows']['raw']['miou'] <= 100


def test_map_batch_on_ray_writes_the_serial_maps(scenes, tmp_path, capsys):
    pattern = str(scenes / 'scene_000*')
    assert main(['map', pattern, '--out', str(tmp_path / 'ray'), '--num-cpus', '2'] + SIM) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert sorted(r['map'] for r in lines) == [str(tmp_path / 'ray' / f'scene_000{i}.ov3dmap') for i in (5, 6)]
    assert main(['map', pattern, '--out', str(tmp_path / 'serial'), '--serial'] + SIM) == 0
    for name in ('scene_0005', 'scene_0006'):
        a, _, _ = load_map(tmp_path / 'ray' / f'{name}.ov3dmap')
        b, _, _ = load_map(tmp_path / 'serial' / f'{name}.ov3dmap')
        assert a.size == b.size > 1000
        for field, t in a.state().items():
            assert torch.equal(t, b.state()[field]), field


def test_batch_arguments_are_checked(scenes, tmp_path, capsys):
    inputs = [str(scenes / 'scene_0005'), str(scenes / 'scene_0006')]
    assert main(['map', *inputs, '--out', str(tmp_path / 'x.ov3dmap'), '--serial'] + SIM) == 2
    assert 'need a folder for --out' in capsys.readouterr().err
    assert main(['map', inputs[0], inputs[0], '--out', str(tmp_path / 'd'), '--serial'] + SIM) == 2
    assert 'several inputs are called scene_0005' in capsys.readouterr().err
