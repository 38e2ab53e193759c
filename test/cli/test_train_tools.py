"""ov3d train-teacher and train-affinity: what they write (--out), what they read (--frames) and what they cache
(--cache), on tiny generated scenes (simulated features; training runs of one or two steps)."""
import json
import shutil

import numpy as np
import pytest

from ov3d_ros.cli.main import main

from conftest import make_tiny_scenes

SIM = ['--features', 'simulated', '--device', 'cpu', '--quiet', '--set', 'keyframes.min_translation_m=0.0']
TEACHER = ['--steps', '1', '--pairs', '64', '--max-voxels', '2000', '--width', '4', '--out-dim', '4']
STUDENT = ['--teacher', 'labels', '--steps', '1', '--anchors', '64', '--width', '4', '--blocks', '1',
           '--embed-dim', '4']


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return make_tiny_scenes(tmp_path_factory.mktemp('scenes'), 1, 3, 6)


@pytest.fixture(scope='module')
def sim_map(scenes, tmp_path_factory):
    m = tmp_path_factory.mktemp('maps') / 's.ov3dmap'
    assert main(['map', str(scenes / 'scene_0003'), '--out', str(m), '--frames', '0:2'] + SIM) == 0
    return m


def test_training_outputs_never_replace_an_input_a_map_or_another_file(scenes, sim_map, tmp_path, capsys,
                                                                       monkeypatch):
    """--out of train-teacher / train-affinity is checked before any work, as ov3d map's: an input's file or a
    file inside an input folder, an ov3d map, a folder, a file that is not a checkpoint of the tool's kind (a
    teacher for the student too) and a path where nothing can be written are refused with exit 2, the files
    untouched (a 49 MB map and a scene's gt_points.npz were replaced by checkpoints; a folder or an unwritable
    --out failed with a SafetensorError traceback after all the training)."""
    pytest.importorskip('spconv')
    from ov3d_ros.cli import train_affinity, train_teacher
    from ov3d_ros.core.purification.teacher import TeacherConfig, TeacherNet, save_teacher
    def read(*args, **kwargs):                            # nothing is read or trained before the refusal
        pytest.fail(f'an input was read before --out was checked: {args[0]}')
    for module in (train_teacher, train_affinity):
        monkeypatch.setattr(module, 'cached_voxel_scene', read)
    monkeypatch.setattr(train_affinity, 'prepare', read)
    scene = scenes / 'scene_0003'
    m = shutil.copy(sim_map, tmp_path / 'm.ov3dmap')
    victim = tmp_path / 'notes.txt'
    victim.write_text('precious')
    teacher = tmp_path / 'teacher.safetensors'
    save_teacher(teacher, TeacherNet(TeacherConfig(width=4, out_dim=4)))
    (tmp_path / 'file.txt').write_text('x')
    before = {p: p.read_bytes() for p in [m, victim, teacher, scene / 'gt_points.npz']}
    cases = [(scene / 'gt_points.npz', 'lies inside the input folder'),
             (scene / 'new.safetensors', 'lies inside the input folder'),
             (m, 'is an ov3d map file; it is never replaced'),
             (victim, 'exists and is not a {kind} checkpoint; it is never replaced'),
             (tmp_path, 'is a folder'),
             (tmp_path / 'file.txt' / 'x.safetensors', 'file.txt is not a folder')]
    for command, kind, extra in (('train-teacher', 'teacher', TEACHER),
                                 ('train-affinity', 'student', STUDENT)):
        for out, why in cases + ([(teacher, 'exists and is not a student checkpoint')] if kind == 'student' else []):
            assert main([command, str(scene), '--out', str(out)] + extra + SIM) == 2, (command, out)
            err = capsys.readouterr().err
            assert f'error: {out}' in err and why.format(kind=kind) in err and 'Traceback' not in err, err
    # the teacher checkpoint a student is distilled from
    assert main(['train-affinity', str(scene), '--out', str(teacher), '--teacher', 'ssl', '--teacher-checkpoint',
                 str(teacher)] + STUDENT[2:] + SIM) == 2
    assert f'{teacher}: --out is also an input ({teacher})' in capsys.readouterr().err
    assert not (scene / 'new.safetensors').exists() and not list(tmp_path.glob('.*.tmp'))
    assert all(p.read_bytes() == blob for p, blob in before.items())


def test_training_replaces_a_checkpoint_of_its_own_kind(scenes, tmp_path, capsys):
    """A teacher checkpoint is replaced by train-teacher, a student checkpoint (also one written before checkpoints
    named their kind, as the shipped ones) by train-affinity; a new --out folder is made."""
    pytest.importorskip('spconv')
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from ov3d_ros.core.purification.student import StudentAffinityNet, StudentConfig, save_student, student_notes
    from ov3d_ros.core.purification.teacher import TeacherConfig, TeacherNet, checkpoint_notes, save_teacher
    scene = str(scenes / 'scene_0003')
    teacher, student = tmp_path / 'teacher.safetensors', tmp_path / 'new' / 'student.safetensors'
    save_teacher(teacher, TeacherNet(TeacherConfig(width=4, out_dim=4)), {'command': 'old'})
    assert main(['train-teacher', scene, '--out', str(teacher), '--frames', '0:3'] + TEACHER + SIM) == 0
    assert checkpoint_notes(teacher)['command'].startswith('ov3d train-teacher')
    student.parent.mkdir()
    save_student(student, StudentAffinityNet(StudentConfig(feature_dim=0, inputs=('color', 'normal'), width=4,
                                                            blocks=1, embed_dim=4)), {'command': 'old'})
    with safe_open(str(student), 'pt') as f:                       # as written before the kind metadata
        meta = {k: v for k, v in f.metadata().items() if k != 'kind'}
    save_file(load_file(str(student)), str(student), metadata=meta)
    assert main(['train-affinity', scene, '--out', str(student), '--frames', '0:3'] + STUDENT + SIM) == 0
    assert student_notes(student)['command'].startswith('ov3d train-affinity')
    assert not list(tmp_path.glob('**/.*.tmp'))


def last_json(capsys, key: str) -> list:
    """The JSON lines of stdout that hold ``key``."""
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{')]
    return [d for d in lines if key in d]


def test_training_tools_use_only_the_frame_range(scenes, tmp_path, capsys):
    """--frames of train-teacher and train-affinity (geometry-only and feature-reading students) selects the frames
    that are fused, as ov3d map's does: the same voxels as the map of that range (it was accepted and ignored:
    --frames 0:2 trained on all frames); the range is part of the cache key."""
    pytest.importorskip('spconv')
    scene, cache = str(scenes / 'scene_0003'), str(tmp_path / 'cache')
    assert main(['map', scene, '--out', str(tmp_path / 'm.ov3dmap'), '--frames', '0:2'] + SIM) == 0
    voxels = last_json(capsys, 'voxels')[-1]['voxels']
    assert main(['train-teacher', scene, '--out', str(tmp_path / 'all.safetensors'), '--cache', cache]
                + TEACHER + SIM) == 0
    everything = last_json(capsys, 'train_voxels')[-1]['train_voxels']
    assert main(['train-teacher', scene, '--out', str(tmp_path / 't.safetensors'), '--cache', cache,
                 '--frames', '0:2'] + TEACHER + SIM) == 0
    assert last_json(capsys, 'train_voxels')[-1]['train_voxels'] == voxels < everything
    for inputs in ('color,normal', 'features,color,normal'):
        assert main(['train-affinity', scene, '--out', str(tmp_path / 's.safetensors'), '--cache', cache,
                     '--frames', '0:2', '--net-inputs', inputs] + STUDENT + SIM) == 0
        assert last_json(capsys, 'tiles')[-1]['voxels'] == voxels, inputs
    assert main(['train-teacher', scene, '--out', str(tmp_path / 't.safetensors'), '--frames', '6:']
                + TEACHER + SIM) == 2
    assert 'the frame range selects none of its 6 frames' in capsys.readouterr().err


def test_the_voxel_cache_tells_inputs_of_one_name_and_regenerated_ones_apart(scenes, tmp_path, capsys):
    """The --cache file of an input is keyed on its resolved path and the size and mtime of its files, not its
    folder name: train-teacher scenes/scene_0003 other/scene_0003 trains on both (it counted the first twice),
    and a scene generated again in the same place is voxelised again (its old voxels were reused)."""
    pytest.importorskip('spconv')
    from ov3d_ros.cli.common import cached_voxel_scene, open_input, voxelise_input
    from ov3d_ros.core.config import MapperConfig
    cfg = MapperConfig()
    cfg.keyframes.min_translation_m = 0.0
    scene, other, cache = scenes / 'scene_0003', tmp_path / 'other' / 'scene_0003', tmp_path / 'cache'

    def generate(seed: int) -> None:              # another scene, named scene_0003, in other/
        out = tmp_path / f'gen{seed}'
        assert main(['make-scenes', '--out', str(out), '--count', '1', '--seed', str(seed), '--frames', '3',
                     '--width', '160', '--height', '120', '--quiet']) == 0
        shutil.rmtree(other, ignore_errors=True)
        other.parent.mkdir(exist_ok=True)
        shutil.move(str(out / f'scene_{seed:04d}'), str(other))

    def fresh(path) -> int:
        return len(voxelise_input(open_input(path), cfg, True))

    generate(4)
    first, second = fresh(scene), fresh(other)
    assert first != second
    assert main(['train-teacher', str(scene), str(other), '--out', str(tmp_path / 't.safetensors'), '--cache',
                 str(cache)] + TEACHER + SIM) == 0
    assert last_json(capsys, 'train_voxels')[-1]['train_voxels'] == first + second
    assert len(list(cache.glob('scene_0003_*.npz'))) == 2
    assert len(cached_voxel_scene(other, None, cfg, cache)) == second           # read from the cache
    assert len(list(cache.glob('scene_0003_*.npz'))) == 2
    generate(5)
    third = fresh(other)
    assert third != second and len(cached_voxel_scene(other, None, cfg, cache)) == third
    assert len(list(cache.glob('scene_0003_*.npz'))) == 3
