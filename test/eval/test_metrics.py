import json

import numpy as np
import pytest
from PIL import Image

from ov3d_ros.eval.metrics import (aggregate, bar_chart_png, boundary_mask, confusion_matrix, evaluate_scene,
                                   evaluate_semantic, fragment_counts, fragmentation, markdown_table,
                                   miss_counts, per_class_table)

NAMES = ["floor", "wall", "chair"]
STEP = 0.02


def floor_wall():
    """Floor (z=0, class 0, instance 0) and wall (x=0, z>0, class 1, instance 1) on a 2 cm grid meeting at the
    seam x=z=0."""
    a = np.arange(25) * STEP
    fx, fy = np.meshgrid(a, a, indexing="ij")
    floor = np.stack([fx.ravel(), fy.ravel(), np.zeros(fx.size)], 1)
    wy, wz = np.meshgrid(a, a[1:], indexing="ij")
    wall = np.stack([np.zeros(wy.size), wy.ravel(), wz.ravel()], 1)
    xyz = np.concatenate([floor, wall])
    sem = np.r_[np.zeros(len(floor), int), np.ones(len(wall), int)]
    return xyz, sem, sem.copy()


def test_perfect_prediction():
    xyz, sem, inst = floor_wall()
    r = evaluate_scene(xyz, sem, inst, sem, NAMES, boundary_radius_m=0.05)
    assert r["miou"] == r["macc"] == r["overall_acc"] == r["boundary_miou"] == 100.0
    assert r["fragmentation"] == 1.0 and r["frag_instances"] == 2 and r["frag_missed_instances"] == 0
    assert r["num_unobserved"] == 0 and r["num_points"] == len(xyz)
    assert set(r["iou"]) == {"floor", "wall"}  # chair absent from GT: not in the mean
    json.dumps(r, allow_nan=False)


def test_known_confusion():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(confusion_matrix(gt, pred, 3), [[4, 0, 0], [1, 3, 0], [0, 0, 0]])
    m = evaluate_semantic(gt, pred, NAMES)
    assert m.iou == pytest.approx({"floor": 80.0, "wall": 75.0})
    assert m.acc == pytest.approx({"floor": 100.0, "wall": 75.0})
    assert m.miou == pytest.approx(77.5) and m.macc == pytest.approx(87.5)
    assert m.overall_acc == pytest.approx(87.5) and m.num_points == 8


def test_unobserved_points_are_misses():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, -1, 1, 1, 1, 1])
    np.testing.assert_array_equal(miss_counts(gt, pred, 3), [1, 0, 0])
    assert confusion_matrix(gt, pred, 3).sum() == 7
    m = evaluate_semantic(gt, pred, NAMES)
    assert m.iou == pytest.approx({"floor": 75.0, "wall": 100.0})
    assert m.acc["floor"] == pytest.approx(75.0) and m.miou == pytest.approx(87.5)
    assert m.num_unobserved == 1 and m.num_points == 8


def test_ignore_labels_skipped():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    base = evaluate_semantic(gt, pred, NAMES)
    m = evaluate_semantic(np.r_[gt, -1, 255, -1], np.r_[pred, 1, 2, -1], NAMES)
    assert m.miou == pytest.approx(base.miou) and m.iou == pytest.approx(base.iou)
    assert m.num_points == 4 and m.num_unobserved == 0
    # an in-range ignore_index is skipped too
    m0 = evaluate_semantic(np.r_[gt, 2, 2], np.r_[pred, 0, 1], NAMES, ignore_index=2)
    assert m0.miou == pytest.approx(base.miou) and "chair" not in m0.iou


def test_boundary_mask_touching_planes():
    xyz, sem, _ = floor_wall()
    on_floor = sem == 0
    for radius, n_cols in ((0.05, 3 + 2), (0.065, 4 + 3)):
        mask = boundary_mask(xyz, sem, radius_m=radius)
        # floor point (x, y, 0) to nearest wall point (0, y, 0.02): sqrt(x^2 + 0.02^2); wall point to floor: z
        expected = np.where(on_floor, np.hypot(xyz[:, 0], STEP) <= radius, xyz[:, 2] <= radius)
        np.testing.assert_array_equal(mask, expected)
        assert mask.sum() == 25 * n_cols
    # ignored labels are neither boundary points nor neighbours
    sem_ign = np.where(on_floor, -1, sem)
    assert not boundary_mask(xyz, sem_ign, radius_m=0.05).any()


def test_boundary_miou_only_sees_seam_errors():
    xyz, sem, inst = floor_wall()
    pred = sem.copy()
    far = np.flatnonzero((sem == 0) & (xyz[:, 0] > 0.3))[:5]
    pred[far] = 1
    r = evaluate_scene(xyz, sem, inst, pred, NAMES, boundary_radius_m=0.05)
    assert r["boundary_miou"] == 100.0 and r["miou"] < 100.0
    seam = np.flatnonzero((sem == 0) & (xyz[:, 0] == 0))[:5]
    pred[seam] = 1
    assert evaluate_scene(xyz, sem, inst, pred, NAMES, boundary_radius_m=0.05)["boundary_miou"] < 100.0


def test_fragmentation_split_instance():
    x = np.arange(100) * STEP
    xyz = np.stack([x, np.zeros(100), np.zeros(100)], 1)
    sem, inst = np.full(100, 2), np.zeros(100, int)
    pred = np.full(100, 0)
    pred[:10] = 2
    pred[-10:] = 2  # two blobs 1.6 m apart
    assert fragmentation(xyz, inst, pred, sem, link_radius_m=0.05) == 2.0
    assert fragmentation(xyz, inst, pred, sem, link_radius_m=2.0) == 1.0
    assert fragmentation(xyz, inst, sem, sem, link_radius_m=0.05) == 1.0
    # a second instance with no correct point counts 0 components and stays out of the mean
    xyz2 = np.concatenate([xyz, xyz + [0, 5, 0]])
    inst2, sem2 = np.r_[inst, np.ones(100, int)], np.r_[sem, np.ones(100, int)]
    pred2 = np.r_[pred, np.full(100, -1)]
    np.testing.assert_array_equal(fragment_counts(xyz2, inst2, pred2, sem2, 0.05), [2, 0])
    r = evaluate_scene(xyz2, sem2, inst2, pred2, NAMES, link_radius_m=0.05)
    assert r["fragmentation"] == 2.0 and r["frag_instances"] == 1 and r["frag_missed_instances"] == 1


def _scene(seed):
    rng = np.random.default_rng(seed)
    xyz, sem, inst = floor_wall()
    pred = sem.copy()
    flip = rng.random(len(sem)) < (0.1 if seed else 0.4)
    pred[flip] = rng.integers(-1, 3, flip.sum())
    return xyz, sem, inst, pred


def test_aggregate_equals_concatenation():
    s1, s2 = _scene(0), _scene(1)
    s2 = (s2[0] + [100.0, 0, 0], s2[1], s2[2] + 10, s2[3])  # far apart, distinct instance ids
    r1, r2 = (evaluate_scene(*s, NAMES, link_radius_m=0.03) for s in (s1, s2))
    cat = evaluate_scene(*(np.concatenate([a, b]) for a, b in zip(s1, s2)), NAMES, link_radius_m=0.03)
    agg = aggregate([r1, r2])
    for key in ("miou", "macc", "overall_acc", "boundary_miou", "fragmentation"):
        assert agg[key] == pytest.approx(cat[key]), key
    assert agg["iou"] == pytest.approx(cat["iou"]) and agg["num_scenes"] == 2
    assert agg["num_points"] == cat["num_points"] and agg["num_unobserved"] == cat["num_unobserved"]
    assert agg["frag_instances"] == 4
    json.dumps(agg, allow_nan=False)


def test_markdown_tables_contain_numbers():
    gt = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    pred = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    xyz = np.stack([np.arange(8.0), np.zeros(8), np.zeros(8)], 1)
    agg = aggregate([evaluate_scene(xyz, gt, gt, pred, NAMES, boundary_radius_m=0.5, link_radius_m=1.5)])
    table = markdown_table({"ours": agg, "baseline": dict(agg, fragmentation=None)})
    assert "| ours | 77.5 | 87.5 |" in table and "| 1.00 |" in table and "n/a" in table
    assert len(table.strip().splitlines()) == 4
    pc = per_class_table(agg)
    assert "| floor | 80.0 | 100.0 |" in pc and "| wall | 75.0 | 75.0 |" in pc and "chair" not in pc


def test_bar_chart_png(tmp_path):
    xyz, sem, inst, pred = _scene(1)
    rows = {"ours": evaluate_scene(xyz, sem, inst, pred, NAMES),
            "perfect": evaluate_scene(xyz, sem, inst, sem, NAMES)}
    path = tmp_path / "chart.png"
    bar_chart_png(str(path), rows)
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == (800, 420)
        colors = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
    assert (66, 133, 244) in colors and (244, 160, 0) in colors


def test_mean_ci95_known_values():
    from ov3d_ros.eval.metrics import mean_ci95
    s = mean_ci95([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(2.5), t(0.975, 4) = 2.7764
    assert s['mean'] == pytest.approx(3.0) and s['n'] == 5
    assert s['ci95'] == pytest.approx(2.7764 * np.sqrt(2.5) / np.sqrt(5), rel=1e-3)
    assert mean_ci95([2.0])['ci95'] is None and mean_ci95([])['mean'] is None
    assert mean_ci95([1.0, None, float('nan'), 3.0])['n'] == 2


def test_paired_difference_and_seed_average():
    from ov3d_ros.eval.metrics import ci_table, paired_difference, scene_statistics, seed_average
    base = [{'scene': 'a', 'miou': 50.0}, {'scene': 'b', 'miou': 60.0}, {'scene': 'c', 'miou': 40.0}]
    better = [{'scene': 'b', 'miou': 62.0}, {'scene': 'a', 'miou': 52.0}, {'scene': 'c', 'miou': 42.0}]
    d = paired_difference(better, base)
    assert d['mean'] == pytest.approx(2.0) and d['ci95'] == pytest.approx(0.0)   # matched by scene, not order
    runs = [[{'scene': 'a', 'miou': 1.0}, {'scene': 'b', 'miou': 3.0}],
            [{'scene': 'a', 'miou': 3.0}, {'scene': 'b', 'miou': 5.0}]]
    avg = seed_average(runs, keys=('miou',))
    assert [r['miou'] for r in avg] == [2.0, 4.0] and avg[1]['scene'] == 'b'
    rows = {'raw': {'per_scene': scene_statistics(base, ('miou',))},
            'better': {'per_scene': scene_statistics(better, ('miou',)), 'vs_baseline': {'miou': d}}}
    table = ci_table(rows, 'raw')
    assert '| raw | 3 | 50.0 ± 24.8 |' in table and '+2.0 ± 0.0' in table


def test_aggregate_has_per_scene_confidence_intervals():
    names = ['a', 'b']
    xyz = np.random.default_rng(0).random((40, 3))
    gt = np.array([0] * 20 + [1] * 20)
    s1 = evaluate_scene(xyz, gt, np.zeros(40), gt, names)
    s2 = evaluate_scene(xyz, gt, np.zeros(40), np.zeros(40, dtype=np.int64), names)
    agg = aggregate([s1, s2])
    assert agg['per_scene']['miou']['mean'] == pytest.approx((s1['miou'] + s2['miou']) / 2)
    assert agg['per_scene']['miou']['n'] == 2 and agg['per_scene']['miou']['ci95'] > 0
