"""The ov3d command line end to end on a tiny generated scene (simulated features)."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from ov3d_ros.cli.main import main

from conftest import make_tiny_scenes

SIM = ['--features', 'simulated', '--device', 'cpu', '--quiet']


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return make_tiny_scenes(tmp_path_factory.mktemp('scenes'), 1, 3, 8, 160, 120, '--format', 'both')


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, '-m', 'ov3d_ros.cli', '--help'], capture_output=True, text=True, check=True)
    for cmd in ('make-scenes', 'map', 'query', 'label', 'eval'):
        assert cmd in out.stdout


def test_make_scenes_writes_folder_bag_and_ground_truth(scenes):
    folder, bag = scenes / 'scene_0003', scenes / 'scene_0003_bag'
    assert len(list((folder / 'color').glob('*.png'))) == 8
    assert len(list((folder / 'instance').glob('*.png'))) == 8
    assert (bag / 'metadata.yaml').exists() and (bag / 'gt_points.npz').exists()
    with np.load(folder / 'gt_points.npz') as gt:
        assert gt['xyz'].shape[0] == gt['label'].shape[0] > 1000
        assert len(set(gt['label'].tolist())) >= 10


def test_map_query_label_round_trip(scenes, tmp_path, capsys):
    folder = scenes / 'scene_0003'
    m = tmp_path / 's.ov3dmap'
    assert main(['map', str(folder), '--out', str(m), '--set', 'keyframes.min_translation_m=0.0'] + SIM) == 0
    stats = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert stats['frames'] == 8 and stats['voxels'] > 500
    assert main(['query', str(m), 'floor', '--out', str(tmp_path / 'floor.ply')]) == 0
    q = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert q['points'] > 50
    (tmp_path / 'vocab.txt').write_text('wall\nfloor\nceiling\n')
    assert main(['label', str(m), '--vocab', str(tmp_path / 'vocab.txt'), '--points', str(folder / 'gt_points.npz'),
                 '--out', str(tmp_path / 'pred.npz')]) == 0
    with np.load(tmp_path / 'pred.npz') as p, np.load(folder / 'gt_points.npz') as gt:
        floor = gt['label'] == list(gt['names']).index('floor')
        seen = p['label'] >= 0
        assert seen.any() and (~seen).any()
        assert np.mean(p['label'][floor & seen] == 1) > 0.8


def test_eval_gives_the_same_numbers_from_folder_and_bag(scenes, tmp_path):
    args = ['--set', 'keyframes.min_translation_m=0.0'] + SIM
    assert main(['eval', str(scenes / 'scene_0003'), '--out', str(tmp_path / 'f')] + args) == 0
    assert main(['eval', str(scenes / 'scene_0003_bag'), '--out', str(tmp_path / 'b')] + args) == 0
    f = json.loads((tmp_path / 'f' / 'results.json').read_text())['rows']['raw']
    b = json.loads((tmp_path / 'b' / 'results.json').read_text())['rows']['raw']
    assert 0 < f['miou'] <= 100 and abs(f['miou'] - b['miou']) <= 0.5
    assert (tmp_path / 'f' / 'chart.png').stat().st_size > 1000
    assert '| raw |' in (tmp_path / 'f' / 'table.md').read_text()


def test_eval_default_row_raw_is_raw_fusion(scenes, tmp_path):
    """Purification is on by default (MapperConfig): the one row eval makes without --variant, named raw, maps with
    it off, as the Makefile's raw rows say (a bare ['raw'] was purified: 703 ms of purification per keyframe in
    the 'raw' row, the same mIoU as the README example's 'purified' row)."""
    from ov3d_ros.core.map_io import load_map
    out = tmp_path / 'e'
    assert main(['eval', str(scenes / 'scene_0003'), '--out', str(out), '--frames', '0:3', '--save-maps'] + SIM) == 0
    row = json.loads((out / 'results.json').read_text())['rows']['raw']
    assert row['timing']['superpoints_s'] is None and row['timing']['whole_purify_s'] is None
    voxels, info, _ = load_map(out / 'maps' / 'raw_scene_0003.ov3dmap')
    assert info['config']['purify']['enabled'] is False and 'purification' not in info
    assert 'purified' not in voxels.cake.specs


@pytest.mark.parametrize('variant, problem', [
    (['map.voxel_size_m=0.1'], "the first word is the row name, not an override"),   # was a row of that name
    ([''], "--variant needs a name first"),
    (['../x'], "a name must not contain '/'"), (['..'], "or start with '.'"),        # a path under --save-maps
    (['fine', 'map.voxel=0.1'], '--variant fine: unknown config key map.voxel'),
])
def test_eval_refuses_a_variant_it_cannot_name_or_apply(scenes, tmp_path, capsys, variant, problem):
    out = tmp_path / 'out'
    assert main(['eval', str(scenes / 'scene_0003'), '--out', str(out), '--save-maps', '--variant', *variant]
                + SIM) == 2
    assert problem in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / 'x_scene_0003.ov3dmap').exists()   # no output folder either


@pytest.mark.parametrize('extra, problem', [
    (['--query-thresholds', 'nan'], 'argument --query-thresholds: must be a number in [0, 1]'),  # once a nan row
    (['--queries', '--query-thresholds', '1.5'], 'argument --query-thresholds: must be a number in [0, 1]'),
    (['--query-thresholds', '0.5'], 'it needs --queries'),                  # once ignored without a word
])
def test_eval_refuses_query_thresholds_it_cannot_use(scenes, tmp_path, capsys, extra, problem):
    out = tmp_path / 'out'
    try:
        rc = main(['eval', str(scenes / 'scene_0003'), '--out', str(out)] + extra + SIM)
    except SystemExit as e:                  # argparse refuses a bad value itself
        rc = e.code
    assert rc == 2 and problem in capsys.readouterr().err
    assert not out.exists()                                                # nothing made for a refused run


def test_eval_merge_of_missing_results_makes_no_output_folder(tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['eval', '--merge', str(tmp_path / 'missing'), '--out', str(out)]) == 2
    assert 'results.json: no such file' in capsys.readouterr().err and not out.exists()


def eval_results(folder, scene: str) -> None:
    """``folder``/results.json of an ov3d eval run over one made-up scene (no mapping: metrics of a labelling)."""
    from ov3d_ros.eval.metrics import evaluate_scene
    rng = np.random.default_rng(len(scene))
    label = rng.integers(0, 3, 40)
    result = evaluate_scene(rng.random((40, 3)), label, label, np.where(rng.random(40) < 0.8, label, 0),
                            ['wall', 'floor', 'chair'])
    result.update(scene=scene, variant='raw', mapping={'keyframes': 1, 'voxels': 40}, bytes_per_voxel=800)
    folder.mkdir()
    (folder / 'results.json').write_text(json.dumps({'scenes': {'raw': [result]}}))


@pytest.mark.parametrize('content, problem', [
    ('{}', 'not the results.json of ov3d eval (no "scenes" object'),
    ('[1]', 'not the results.json of ov3d eval (no "scenes" object'),
    ('{"scenes": {"raw": [1]}}', "scenes of variant 'raw' must be a non-empty list of objects"),
    ('{"scenes": {"raw": []}}', "scenes of variant 'raw' must be a non-empty list of objects"),
    ('{"scenes": {"raw": [{"scene": "s1", "confusion": [[1]]}]}}', "a scene of variant 'raw' (s1) lacks class_names"),
    ('{"scenes": {', 'not the results.json of ov3d eval (not JSON'),
], ids=['empty', 'list', 'scene', 'no_scenes', 'keys', 'not_json'])
def test_eval_merge_refuses_results_it_cannot_read_naming_the_file(tmp_path, capsys, content, problem):
    eval_results(tmp_path / 'r_a', 'a')
    (tmp_path / 'r_b').mkdir()
    (tmp_path / 'r_b' / 'results.json').write_text(content)
    out = tmp_path / 'out'
    assert main(['eval', '--merge', str(tmp_path / 'r_a'), str(tmp_path / 'r_b'), '--out', str(out)]) == 2
    err = capsys.readouterr().err
    assert f'{tmp_path / "r_b" / "results.json"}: {problem}' in err and 'Traceback' not in err, err
    assert not out.exists()


def test_eval_merge_never_replaces_its_inputs_nor_counts_a_run_twice(tmp_path, capsys):
    eval_results(tmp_path / 'r_a', 'a')
    eval_results(tmp_path / 'r_b', 'b')
    before = (tmp_path / 'r_a' / 'results.json').read_bytes()
    r_a, r_b = str(tmp_path / 'r_a'), str(tmp_path / 'r_b')
    assert main(['eval', '--merge', r_a, r_b, '--out', r_a]) == 2                  # replaced its own input
    assert '--out is also a --merge folder' in capsys.readouterr().err
    assert main(['eval', '--merge', r_a, r_b, '--out', str(tmp_path / 'r_b' / '..' / 'r_b')]) == 2
    assert '--out is also a --merge folder' in capsys.readouterr().err
    assert main(['eval', '--merge', r_a, r_b, str(tmp_path / 'r_a') + '/', '--out', str(tmp_path / 'c')]) == 2
    assert 'given twice to --merge' in capsys.readouterr().err                      # counted r_a twice
    assert (tmp_path / 'r_a' / 'results.json').read_bytes() == before and not (tmp_path / 'c').exists()
    assert main(['eval', '--merge', r_a, r_b, '--out', str(tmp_path / 'c')]) == 0
    merged = json.loads((tmp_path / 'c' / 'results.json').read_text())
    assert [s['scene'] for s in merged['scenes']['raw']] == ['a', 'b'] and merged['rows']['raw']['num_scenes'] == 2
    assert not list((tmp_path / 'c').glob('.*.tmp'))


@pytest.mark.parametrize('labels, problem', [
    (lambda label: label + 101, 'out of range of names (0..'),     # once a TypeError: mIoU None in the summary
    (lambda label: np.zeros_like(label), 'no point has a class to evaluate'),   # once exit 0 with an empty table
])
def test_eval_refuses_ground_truth_it_cannot_score(scenes, tmp_path, capsys, labels, problem):
    import shutil
    scene = tmp_path / 'scene'
    shutil.copytree(scenes / 'scene_0003', scene)
    with np.load(scene / 'gt_points.npz') as z:
        gt = dict(z)
    gt['label'] = labels(gt['label'])
    np.savez(scene / 'gt_points.npz', **gt)
    assert main(['eval', str(scene), '--out', str(tmp_path / 'out'), '--frames', '0:1'] + SIM) == 2
    err = capsys.readouterr().err
    assert 'gt_points.npz: ' in err and problem in err and 'Traceback' not in err


@pytest.mark.parametrize('command, option, value, problem', [
    ('train-teacher', '--width', '0', 'must be >= 1, got 0'),            # was a ZeroDivisionError
    ('train-teacher', '--pairs', '0', 'must be >= 1, got 0'),            # an IndexError
    ('train-teacher', '--max-voxels', '0', 'must be >= 1, got 0'),       # a kthvalue error
    ('train-teacher', '--out-dim', '0', 'must be >= 2, got 0'),          # exit 0 with a useless teacher
    ('train-teacher', '--lr', 'nan', 'must be a finite number > 0, got nan'),
    ('train-affinity', '--steps', '0', 'must be >= 1, got 0'),           # an untrained checkpoint, exit 0
    ('train-affinity', '--anchors', '0', 'must be >= 1, got 0'),         # a NaN loss, exit 0
    ('train-affinity', '--tile-voxels', '-5', 'must be >= 0, got -5'),
    ('make-scenes', '--fps', '0', 'must be a finite number > 0, got 0'),          # NaN / negative stamps
    ('make-scenes', '--fps', 'nan', 'must be a finite number > 0, got nan'),
    ('make-scenes', '--holes', '2', 'must be a number in [0, 1), got 2'),
    ('make-scenes', '--holes', '-1', 'must be a number in [0, 1), got -1'),
    ('make-scenes', '--depth-noise', '-1', 'must be a finite number >= 0, got -1'),
    ('make-scenes', '--depth-noise', 'nan', 'must be a finite number >= 0, got nan'),
    ('label', '--max-distance', 'nan', 'must be a finite number >= 0, got nan'),    # labelled nothing, exit 0
    ('label', '--max-distance', '-1', 'must be a finite number >= 0, got -1'),
])
def test_tools_refuse_bad_arguments_before_anything_runs(tmp_path, capsys, command, option, value, problem):
    out = tmp_path / 'x.safetensors'
    with pytest.raises(SystemExit) as e:
        small = ['--count', '1', '--frames', '2', '--width', '32', '--height', '24', '--quiet']
        main([command] + (small if command == 'make-scenes' else [str(tmp_path)]) + ['--out', str(out), option, value])
    assert e.value.code == 2 and f'argument {option}: {problem}' in capsys.readouterr().err
    assert not out.exists()


def test_query_threshold_sweep_scores_every_threshold_from_one_pass(scenes, tmp_path):
    """--query-thresholds: answers are nested (recall never rises with the threshold), the default threshold's
    numbers equal the sweep's at that threshold, and the sweep table is written."""
    out = tmp_path / 'q'
    args = ['--set', 'keyframes.min_translation_m=0.0', '--set', 'query.default_threshold=0.5'] + SIM
    assert main(['eval', str(scenes / 'scene_0003'), '--out', str(out), '--queries',
                 '--query-thresholds', '0.2', '0.5', '0.9'] + args) == 0
    queries = json.loads((out / 'results.json').read_text())['scenes']['raw'][0]['queries']
    assert queries, 'no synonym query has a target in the scene'
    for q in queries:
        sweep = q['sweep']
        assert [s['threshold'] for s in sweep] == [0.2, 0.5, 0.9]
        assert sweep[0]['recall'] >= sweep[1]['recall'] >= sweep[2]['recall'], q
        assert sweep[0]['returned'] >= sweep[1]['returned'] >= sweep[2]['returned'], q
        assert (q['recall'], q['precision'], q['returned']) == \
            (sweep[1]['recall'], sweep[1]['precision'], sweep[1]['returned']), q
    assert any(q['sweep'][0]['returned'] > q['sweep'][2]['returned'] for q in queries)
    table = (out / 'queries_sweep.md').read_text()
    assert '| raw | 0.2 |' in table and '| raw | 0.9 |' in table


def test_bad_input_gives_clear_errors(scenes, tmp_path, capsys):
    assert main(['map', str(tmp_path / 'nope'), '--out', str(tmp_path / 'x.ov3dmap')] + SIM) == 2
    assert 'no such file or directory' in capsys.readouterr().err
    (tmp_path / 'junk.ov3dmap').write_bytes(b'not a map at all, sorry')
    assert main(['query', str(tmp_path / 'junk.ov3dmap'), 'chair', '--out', str(tmp_path / 'c.ply')]) == 2
    assert 'not a safetensors map file' in capsys.readouterr().err
    assert main(['map', str(tmp_path), '--out', str(tmp_path / 'x.ov3dmap'), '--set', 'map.voxel_size=1'] + SIM) == 2
    assert 'unknown config key map.voxel_size' in capsys.readouterr().err
    scene = scenes / 'scene_0003'
    for value, problem in (('map.max_depth_m=0.05', 'map.min_depth_m (0.1) must be below map.max_depth_m (0.05)'),
                           ('map.pixel_stride=0', 'map.pixel_stride must be a number in [1, 64], got 0'),
                           ('labels.vocabulary=5', 'labels.vocabulary must be a list of strings'),
                           ('labels.vocabulary=', 'labels.vocabulary must be a list of strings'),
                           ('map.pixel_stride=100000000000000000000', 'map.pixel_stride must be a number in [1, 64]'),
                           ('map.compress_dim=100000', 'map.compress_dim 100000 is more than the 384 dimensions')):
        # once an empty map (rc 0) or a stride the lifting took as 1: refused before anything is mapped
        assert main(['map', str(scene), '--out', str(tmp_path / 'y.ov3dmap'), '--set', value] + SIM) == 2
        assert problem in capsys.readouterr().err
        assert not (tmp_path / 'y.ov3dmap').exists()


def test_precomputed_features_from_any_2d_model(scenes, tmp_path, capsys):
    """features/NNNNNN.npy + text_embeddings.npz: a made-up 2D 'model' (a random vector per class at quarter
    resolution) maps and labels without code changes."""
    import shutil
    from PIL import Image
    folder = tmp_path / 'scene'
    shutil.copytree(scenes / 'scene_0003', folder)
    with np.load(folder / 'gt_points.npz') as gt:
        names = [str(n) for n in gt['names']]
    vectors = np.random.default_rng(0).normal(size=(len(names), 16)).astype(np.float32)
    (folder / 'features').mkdir()
    for png in sorted((folder / 'label').glob('*.png')):
        labels = np.array(Image.open(png))[::4, ::4]
        np.save(folder / 'features' / f'{png.stem}.npy', vectors[labels])
    np.savez(folder / 'text_embeddings.npz', names=np.array(names), vectors=vectors)
    m = tmp_path / 'p.ov3dmap'
    assert main(['map', str(folder), '--out', str(m), '--features', 'precomputed', '--device', 'cpu', '--quiet',
                 '--set', 'keyframes.min_translation_m=0.0']) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['features'] == 'precomputed'
    assert main(['label', str(m), '--text-embeddings', str(folder / 'text_embeddings.npz'),
                 '--points', str(folder / 'gt_points.npz'), '--out', str(tmp_path / 'pred.npz')]) == 0
    with np.load(tmp_path / 'pred.npz') as p, np.load(folder / 'gt_points.npz') as gt:
        seen = p['label'] >= 0
        assert seen.mean() > 0.3 and np.mean(p['label'][seen] == gt['label'][seen]) > 0.8
    capsys.readouterr()
    # the table lacks the default negative 'object': the defaults it holds are used, and the note says which
    assert main(['query', str(m), 'chair', '--out', str(tmp_path / 'chair.ply')]) == 0
    assert "negatives ['wall', 'floor', 'ceiling']" in capsys.readouterr().err
    assert main(['query', str(m), 'chair', '--negatives', 'object', '--out', str(tmp_path / 'chair.ply')]) == 2
    assert "no text embedding for ['object']" in capsys.readouterr().err
    # synonym queries cannot be embedded by a fixed table: refused before mapping
    assert main(['eval', str(folder), '--out', str(tmp_path / 'ev'), '--features', 'precomputed', '--queries',
                 '--quiet']) == 2
    assert '--queries: variant raw uses precomputed features' in capsys.readouterr().err
    (folder / 'features' / '000002.npy').unlink()
    assert main(['map', str(folder), '--out', str(m), '--features', 'precomputed', '--quiet']) == 2
    assert 'features' in capsys.readouterr().err


def test_teacher_then_student_then_mapping_end_to_end(scenes, tmp_path, capsys):
    """ov3d train-teacher (no labels) -> train-affinity --teacher ssl -> eval with the geometry-only student,
    on simulated and on precomputed features of another dimension, with the same checkpoint."""
    pytest.importorskip('spconv')
    from ov3d_ros.core.purification.student import load_student, student_notes
    teacher, student = tmp_path / 'teacher.safetensors', tmp_path / 'student.safetensors'
    common = ['--set', 'keyframes.min_translation_m=0.0'] + SIM
    assert main(['train-teacher', str(scenes / 'scene_0003'), '--val', str(scenes / 'scene_0003'), '--out', str(teacher),
                 '--cache', str(tmp_path / 'cache'), '--steps', '2', '--width', '8', '--out-dim', '8', '--pairs', '64',
                 '--max-voxels', '3000'] + common) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out['step'] == 2 and out['train_voxels'] > 500 and 0 <= out['val_match_acc'] <= 1
    assert list((tmp_path / 'cache').glob('scene_0003_*.npz'))            # fused once, reused below
    assert main(['train-affinity', str(scenes / 'scene_0003'), '--out', str(student), '--cache', str(tmp_path / 'cache'),
                 '--teacher', 'ssl', '--teacher-checkpoint', str(teacher), '--steps', '2', '--anchors', '256',
                 '--width', '8', '--blocks', '1', '--embed-dim', '8'] + common) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out['teacher'] == 'ssl' and not out['oracle'] and out['data_fraction'] == pytest.approx(1.0)
    notes = student_notes(student)
    assert notes['command'].startswith('ov3d train-affinity') and notes['teacher_command'].startswith('ov3d train-teacher')
    assert not load_student(student).reads_features
    assert main(['eval', str(scenes / 'scene_0003'), '--out', str(tmp_path / 'e'), '--variant', 'raw',
                 '--variant', 'learned', 'purify.enabled=true', 'purify.affinity=learned', f'purify.checkpoint={student}',
                 '--variant', 'whole', 'purify.enabled=true', 'purify.affinity=learned', 'purify.mode=whole',
                 f'purify.checkpoint={student}'] + common) == 0
    res = json.loads((tmp_path / 'e' / 'results.json').read_text())
    assert res['rows']['learned']['miou'] > 0 and res['rows']['whole']['miou'] > 0
    assert res['rows']['learned']['vs_baseline']['miou']['n'] == 1
    assert '| whole |' in (tmp_path / 'e' / 'table_ci.md').read_text()
    # tables of runs over other scenes combine without mapping again (a copy of the run stands for another one:
    # one folder given twice is refused)
    import shutil
    shutil.copytree(tmp_path / 'e', tmp_path / 'e2')
    assert main(['eval', '--merge', str(tmp_path / 'e'), str(tmp_path / 'e2'), '--out', str(tmp_path / 'm')]) == 0
    merged = json.loads((tmp_path / 'm' / 'results.json').read_text())['rows']
    assert merged['whole']['per_scene']['miou']['n'] == 2
    assert merged['whole']['per_scene']['miou']['mean'] == pytest.approx(res['rows']['whole']['per_scene']['miou']['mean'])
    # the same checkpoint on 64-d precomputed features of "another model" (simulated, randomly projected)
    from ov3d_ros.eval.project_features import main as project
    assert project([str(scenes / 'scene_0003'), '--out', str(tmp_path / 'd64'), '--dim', '64'] + SIM[:2]) == 0
    assert main(['eval', str(tmp_path / 'd64' / 'scene_0003'), '--out', str(tmp_path / 'p'), '--features', 'precomputed',
                 '--device', 'cpu', '--quiet', '--set', 'keyframes.min_translation_m=0.0', '--variant', 'raw',
                 '--variant', 'learned', 'purify.enabled=true', 'purify.affinity=learned',
                 f'purify.checkpoint={student}']) == 0
    assert json.loads((tmp_path / 'p' / 'results.json').read_text())['rows']['learned']['miou'] > 0


def test_labels_teacher_is_marked_as_an_oracle(scenes, tmp_path, capsys):
    pytest.importorskip('spconv')
    from ov3d_ros.core.purification.student import student_notes
    ckpt = tmp_path / 'oracle.safetensors'
    assert main(['train-affinity', str(scenes / 'scene_0003'), '--out', str(ckpt), '--teacher', 'labels',
                 '--steps', '1', '--anchors', '128', '--width', '8', '--blocks', '1', '--embed-dim', '8',
                 '--set', 'keyframes.min_translation_m=0.0'] + SIM) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    notes = student_notes(ckpt)
    assert out['oracle'] and notes['oracle'] is True and notes['teacher'] == 'labels'
    assert 'ORACLE' in notes['note'] and 'not label-free' in notes['note']
    # the label-free default needs a teacher checkpoint, and says so
    assert main(['train-affinity', str(scenes / 'scene_0003'), '--out', str(ckpt)] + SIM) == 2
    assert '--teacher-checkpoint' in capsys.readouterr().err


def test_the_tools_build_the_clip_vit_once_for_mappers_of_the_same_model(monkeypatch):
    """ov3d eval maps scene after scene and variant after variant: mappers of the same model, weights, precision
    and device share one ViT, each with its own dense mode and image sizes; another precision builds a new one."""
    from ov3d_ros.cli import common
    from ov3d_ros.core.config import MapperConfig
    monkeypatch.setattr(common, '_CLIP', None)
    cfg = MapperConfig()
    cfg.features.source, cfg.features.pretrained, cfg.features.image_short_side = 'clip', 'none', 64
    cfg.map.device, cfg.purify.enabled = 'cpu', False
    first, second = common.make_mapper(cfg, None), common.make_mapper(cfg, None)
    assert first.extractor is not second.extractor and first.extractor.model is second.extractor.model
    cfg.features.image_short_side, cfg.features.dense_mode = 96, 'sclip'
    third = common.make_mapper(cfg, None)
    assert third.extractor.model is first.extractor.model
    assert (third.extractor.cfg.image_short_side, third.extractor.name) == (96, 'clip:ViT-B-16:sclip')
    assert (first.extractor.cfg.image_short_side, first.extractor.name) == (64, 'clip:ViT-B-16:naclip')
    assert third.extractor.cfg is not cfg.features                           # a copy, not the caller's config
    third.extractor.reconfigure(replace(third.extractor.cfg, image_short_side=128))   # through the Python API
    assert common.make_mapper(cfg, None).extractor.cfg.image_short_side == 96   # the next mapper: what cfg asks
    cfg.features.dtype = 'bfloat16'
    fourth = common.make_mapper(cfg, None)
    assert fourth.extractor.model is not first.extractor.model and str(fourth.extractor.dtype) == 'torch.bfloat16'


def test_the_tools_print_the_vit_precision_warning_and_hint(capsys, monkeypatch):
    """make_mapper prints the CLIP source's precision warning (a half precision the CPU emulates) and its hint
    (float32 where the CPU has native bf16 kernels) on stderr, each once per process (``ov3d eval`` builds a
    mapper per scene), and nothing for a plain float32 CPU."""
    from ov3d_ros.cli import common
    from ov3d_ros.core import threads
    from ov3d_ros.core.config import MapperConfig
    monkeypatch.setattr(common, '_SAID', set())
    monkeypatch.setattr(common, '_CLIP', None)
    cfg = MapperConfig()
    cfg.features.source, cfg.features.pretrained, cfg.features.image_short_side = 'clip', 'none', 64
    cfg.map.device, cfg.purify.enabled = 'cpu', False
    cases = ((False, 'bfloat16', 'warning: '), (True, 'auto', 'note: '), (False, 'auto', ''),
             (False, 'bfloat16', ''), (True, 'auto', ''))  # the last two: said already
    for native, dtype, expect in cases:
        monkeypatch.setattr(threads, 'native_half', lambda d, native=native: native)
        cfg.features.dtype = dtype
        monkeypatch.setattr(common, '_CLIP', None)               # a new ViT, on what this CPU now reports
        common.make_mapper(cfg, None)
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith(('warning: ', 'note: '))]
        assert [line[:len(expect)] for line in lines] == ([expect] if expect else []), err
        assert not expect or f'features.dtype {dtype!r}' in lines[0]


@pytest.fixture(scope='module')
def sim_map(scenes, tmp_path_factory):
    m = tmp_path_factory.mktemp('maps') / 's.ov3dmap'
    assert main(['map', str(scenes / 'scene_0003'), '--out', str(m), '--set', 'keyframes.min_translation_m=0.0']
                + SIM) == 0
    return m


def test_label_refuses_unusable_inputs_with_the_file_name(scenes, sim_map, tmp_path, capsys):
    """Files that are not .npz archives, text tables with NaN or zero vectors or no names, and a vocabulary
    naming a class twice: exit 2 with a reason naming the file, never a traceback, a crash or an all-class-0
    answer; nothing is written."""
    points, out = scenes / 'scene_0003' / 'gt_points.npz', tmp_path / 'pred.npz'
    vocab = tmp_path / 'vocab.txt'
    vocab.write_text('wall\nfloor\n')
    (tmp_path / 'zero.npz').write_bytes(b'')
    (tmp_path / 'random.npz').write_bytes(np.random.default_rng(0).bytes(300))
    np.save(tmp_path / 'plain.npy', np.zeros((5, 3)))
    d = 16                                                  # the simulated features' dimension does not matter:
    np.savez(tmp_path / 'nan.npz', names=np.array(['wall', 'floor']), vectors=np.full((2, d), np.nan))
    np.savez(tmp_path / 'zeros.npz', names=np.array(['wall', 'floor']), vectors=np.zeros((2, d)))
    np.savez(tmp_path / 'empty.npz', names=np.array([], dtype=str), vectors=np.zeros((0, d)))
    (tmp_path / 'dup.txt').write_text('wall\nWall\nfloor\n')
    cases = [(['--vocab', str(vocab), '--points', str(tmp_path / n)], n, why)
             for n, why in (('zero.npz', 'an empty file'), ('random.npz', 'another kind of file'),
                            ('plain.npy', 'a plain .npy array'))]
    cases += [(['--text-embeddings', str(tmp_path / n), '--points', str(points)], n, why)
              for n, why in (('nan.npz', 'not finite'), ('zeros.npz', 'all zero'), ('empty.npz', 'no names'),
                             ('plain.npy', 'a plain .npy array'))]
    cases += [(['--vocab', str(tmp_path / 'dup.txt'), '--points', str(points)], 'dup.txt', "'Wall' appears twice")]
    for extra, name, why in cases:
        assert main(['label', str(sim_map), '--out', str(out)] + extra) == 2, name
        err = capsys.readouterr().err
        assert f'{tmp_path / name}: ' in err and why in err, err
        assert not out.exists()


def test_outputs_never_replace_inputs_or_files_that_are_not_maps(scenes, sim_map, tmp_path, capsys):
    """A query or label --out naming its map, a map or merge --out over a file that is not an ov3d map: exit 2,
    both files untouched. Outputs into a missing folder create it; label prints the file it really wrote."""
    import shutil
    m = tmp_path / 'a.ov3dmap'
    shutil.copy(sim_map, m)
    before = m.read_bytes()
    victim = tmp_path / 'victim.txt'
    victim.write_text('precious')
    points = shutil.copy(scenes / 'scene_0003' / 'gt_points.npz', tmp_path / 'points.npz')
    (tmp_path / 'vocab.txt').write_text('wall\nfloor\n')
    for argv, why in (
            (['query', str(m), 'wall', '--out', str(m)], 'is also an input'),
            (['label', str(m), '--vocab', str(tmp_path / 'vocab.txt'), '--points', str(points), '--out',
              str(tmp_path / 'points')], 'is also an input'),
            (['query', str(sim_map), 'wall', '--out', str(m)], 'is an ov3d map file'),
            (['map', str(scenes / 'scene_0003'), '--out', str(victim)] + SIM, 'is not an ov3d map file'),
            (['merge', str(m), str(sim_map), '--out', str(victim)], 'is not an ov3d map file'),
            (['merge', str(m), str(sim_map), '--out', str(m)], 'is also an input')):
        assert main(argv) == 2, argv
        assert why in capsys.readouterr().err, argv
    assert m.read_bytes() == before and victim.read_text() == 'precious' and len(np.load(points)['xyz']) > 0
    assert main(['query', str(m), 'wall', '--out', str(tmp_path / 'new' / 'wall.ply')]) == 0
    assert (tmp_path / 'new' / 'wall.ply').stat().st_size > 0
    capsys.readouterr()
    assert main(['label', str(m), '--vocab', str(tmp_path / 'vocab.txt'), '--points', str(points),
                 '--out', str(tmp_path / 'pred')]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['out'] == str(tmp_path / 'pred.npz')
    assert (tmp_path / 'pred.npz').exists() and not list(tmp_path.glob('.*.tmp'))


def test_the_features_teacher_file_is_checked(tmp_path):
    """train-affinity --teacher features reads teacher_features.npz (per-point features of any 3D model) through
    the one .npz reader: an unreadable file, a missing array or NaN features are refused naming the file."""
    from types import SimpleNamespace

    import torch
    from ov3d_ros.cli.common import CliError
    from ov3d_ros.cli.train_affinity import voxel_teacher
    path = tmp_path / 'teacher_features.npz'
    centres = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])

    def teacher():
        return voxel_teacher(centres, 0.05, SimpleNamespace(path=tmp_path), SimpleNamespace(teacher='features'))
    path.write_bytes(b'')
    with pytest.raises(CliError, match='teacher_features.npz: not an .npz archive'):
        teacher()
    np.savez(path, xyz=centres)
    with pytest.raises(CliError, match='missing array features'):
        teacher()
    np.savez(path, xyz=centres, features=np.full((2, 4), np.nan))
    with pytest.raises(CliError, match='must be finite'):
        teacher()
    np.savez(path, xyz=centres[::-1], features=np.eye(2, 4))
    assert torch.equal(teacher().features, torch.eye(2, 4)[[1, 0]])       # each voxel takes its nearest point's


def test_a_binary_file_given_as_a_text_file_is_named(scenes, sim_map, tmp_path, capsys):
    """--config, --vocab and --transform name the file that is not text (they said "'utf-8' codec can't decode
    byte 0x89" and nothing else)."""
    binary = tmp_path / 'picture.png'
    binary.write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)))
    for argv, why in [(['map', str(scenes / 'scene_0003'), '--out', str(tmp_path / 'm.ov3dmap'), '--config',
                        str(binary)] + SIM, 'not a text file (a ROS parameter file or YAML)'),
                      (['label', str(sim_map), '--vocab', str(binary), '--points',
                        str(scenes / 'scene_0003' / 'gt_points.npz'), '--out', str(tmp_path / 'p.npz')],
                       'not a text file (class names, one per line)'),
                      (['merge', str(sim_map), str(sim_map), '--out', str(tmp_path / 'mm.ov3dmap'), '--transform', '2',
                        str(binary)], 'not a text file (a transform is a 4x4 matrix')]:
        assert main(argv) == 2, argv[0]
        err = capsys.readouterr().err
        assert f'{binary}: {why}' in err and 'Traceback' not in err, err


def test_rectified_images_option_reaches_the_bag_reader(scenes, tmp_path):
    from ov3d_ros.cli.common import open_input
    from ov3d_ros.cli.main import build_parser
    bag = str(scenes / 'scene_0003_bag')
    for extra, rectified in (([], False), (['--rectified-images'], True)):
        args = build_parser().parse_args(['map', bag, '--out', str(tmp_path / 'm.ov3dmap')] + extra)
        assert open_input(bag, args).reader.rectified is rectified


def test_map_learns_that_it_cannot_write_its_output_before_mapping(scenes, tmp_path, capsys, monkeypatch):
    """An --out it cannot write (a folder that refuses files, a path under a file): exit 2 naming the --out, before
    any frame is mapped (it mapped every frame, then named its temporary file). A folder not there yet is fine."""
    import os
    from ov3d_ros.cli import mapping
    mapped = []
    monkeypatch.setattr(mapping, 'map_input', lambda *a, **k: mapped.append(a) or {})
    (tmp_path / 'file.txt').write_text('x')
    scene, bag = str(scenes / 'scene_0003'), str(scenes / 'scene_0003_bag')
    cases = [([scene], tmp_path / 'file.txt' / 'a.ov3dmap', 'file.txt is not a folder'),
             ([scene, bag], tmp_path / 'file.txt' / 'maps', 'file.txt is not a folder')]
    if os.path.isdir('/proc/self'):                # a folder in which no file can be made, even by root
        cases += [([scene], Path('/proc/a.ov3dmap'), 'cannot write a file in /proc'),
                  ([scene, bag], Path('/proc/maps'), 'cannot write a file in /proc')]
    for inputs, out, why in cases:
        assert main(['map', *inputs, '--out', str(out), '--serial'] + SIM) == 2, out
        err = capsys.readouterr().err
        assert f'error: {out}' in err and why in err and 'Traceback' not in err, err
    assert not mapped
    new = tmp_path / 'new' / 'deeper' / 'a.ov3dmap'
    from ov3d_ros.cli.common import check_output
    assert check_output(new) == new and not (tmp_path / 'new').exists()       # made by the save, not the check
    assert not list(tmp_path.glob('.*.tmp'))


def test_map_never_replaces_the_compress_basis_it_reads(scenes, tmp_path, capsys):
    """--out naming the map.compress_basis file: refused like an input (the basis was replaced by the new map)."""
    scene, bag = str(scenes / 'scene_0003'), str(scenes / 'scene_0003_bag')
    basis = tmp_path / 'maps' / 'scene_0003.ov3dmap'
    compress = ['--frames', '0:2', '--set', 'map.compress_dim=8'] + SIM
    assert main(['map', scene, '--out', str(basis)] + compress) == 0
    before = basis.read_bytes()
    for inputs, out in (([scene], basis), ([scene, bag], basis.parent)):
        capsys.readouterr()
        assert main(['map', *inputs, '--out', str(out), '--serial', '--set', f'map.compress_basis={basis}']
                    + compress) == 2
        assert f'{basis}: --out is also an input ({basis})' in capsys.readouterr().err
        assert basis.read_bytes() == before and not (basis.parent / 'scene_0003_bag.ov3dmap').exists()
