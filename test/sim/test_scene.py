"""Classes, the built-in scene, its trajectory and ground-truth points."""
import numpy as np
import pytest

from ov3d_ros.sim import (CLASS_NAMES, builtin_scene, builtin_trajectory, class_id, default_camera, look_at, render,
                          sample_gt_points)
from ov3d_ros.sim.gt import inside

ROOM_CLASSES = {class_id(n) for n in ('wall', 'floor', 'ceiling')}
ON_WALL = {class_id(n) for n in ('picture', 'door', 'window')}


@pytest.fixture(scope='module')
def scene():
    return builtin_scene(0)


def test_classes():
    assert CLASS_NAMES[0] == 'unlabeled' and len(CLASS_NAMES) >= 21 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    for name in ('wall', 'floor', 'ceiling', 'chair', 'table', 'sofa', 'bed', 'cabinet', 'plant', 'lamp',
                 'bookshelf', 'door', 'window', 'picture', 'desk', 'counter', 'curtain', 'refrigerator', 'toilet',
                 'sink', 'bathtub'):
        assert CLASS_NAMES[class_id(name)] == name
    with pytest.raises(ValueError):
        class_id('spaceship')


def test_builtin_scene_contents(scene):
    assert np.allclose(scene.room_max - scene.room_min, (6.0, 5.0, 2.7))
    classes = list(scene.instance_classes().values())
    assert classes.count(class_id('chair')) == 2 and classes.count(class_id('wall')) == 4
    for name in ('floor', 'ceiling', 'table', 'sofa', 'bed', 'cabinet', 'plant', 'lamp', 'bookshelf', 'picture',
                 'door', 'window'):
        assert classes.count(class_id(name)) == 1, name
    kinds = {p.kind for p in scene.primitives if p.class_id == class_id('plant')}
    assert kinds == {'cylinder', 'sphere'}
    assert sum(p.class_id == class_id('chair') for p in scene.primitives) == 12        # 2 × (seat + back + 4 legs)
    for p in scene.primitives:                       # one class per instance, valid types
        assert scene.instance_classes()[p.instance_id] == p.class_id and 0 < p.class_id < len(CLASS_NAMES)
        assert p.color.dtype == np.uint8 and p.center.shape == p.size.shape == (3,)
    boxes = scene.instance_boxes()
    assert len(boxes) == len(scene.instance_classes())
    for lo, hi, c in boxes:
        assert np.all(lo >= scene.room_min) and np.all(hi <= scene.room_max) and np.all(lo <= hi)
        if c not in ROOM_CLASSES | ON_WALL:
            assert lo[2] == pytest.approx(0.0, abs=1e-9) and np.all(hi - lo > 0.2)      # standing on the floor


def test_objects_do_not_interpenetrate():
    for seed in range(5):
        prims = builtin_scene(seed).primitives
        for a, p in enumerate(prims):
            for q in prims[a + 1:]:
                if p.instance_id != q.instance_id:
                    (l1, h1), (l2, h2) = p.bounds(), q.bounds()
                    overlap = np.clip(np.minimum(h1, h2) - np.maximum(l1, l2), 0, None)
                    assert overlap.prod() < 1e-9, (seed, CLASS_NAMES[p.class_id], CLASS_NAMES[q.class_id])


def test_seed_determinism(scene):
    again, other = builtin_scene(0), builtin_scene(1)
    assert all(np.array_equal(p.center, q.center) and np.array_equal(p.color, q.color)
               for p, q in zip(scene.primitives, again.primitives))
    shift = max(np.abs(p.center - q.center).max() for p, q in zip(scene.primitives, other.primitives))
    assert 0 < shift < 0.15
    assert any(not np.array_equal(p.color, q.color) for p, q in zip(scene.primitives, other.primitives))


def test_look_at_convention():
    T = look_at((1, 2, 1.5), (4, 2, 1.5))
    R = T[:3, :3]
    assert np.allclose(R.T @ R, np.eye(3)) and np.linalg.det(R) == pytest.approx(1.0)
    assert np.allclose(R[:, 2], (1, 0, 0)) and np.allclose(R[:, 0], (0, -1, 0)) and np.allclose(R[:, 1], (0, 0, -1))
    assert np.allclose(T[:3, 3], (1, 2, 1.5)) and np.allclose(T[3], (0, 0, 0, 1))
    cam = default_camera()
    assert (cam.width, cam.height) == (640, 480)
    assert 2 * np.degrees(np.arctan(cam.width / 2 / cam.fx)) == pytest.approx(60.0, abs=0.5)


def test_trajectory_is_smooth_inside_the_room_and_clear_of_objects(scene):
    poses = builtin_trajectory(scene, 60)
    assert len(poses) == 60 and all(T.shape == (4, 4) and T.dtype == np.float64 for T in poses)
    eye = np.array([T[:3, 3] for T in poses])
    fwd = np.array([T[:3, 2] for T in poses])
    assert np.all(eye[:, :2] >= scene.room_min[:2] + 0.5) and np.all(eye[:, :2] <= scene.room_max[:2] - 0.5)
    assert np.all((eye[:, 2] >= 1.2) & (eye[:, 2] <= 1.6))
    for lo, hi, c in scene.instance_boxes():
        if c not in ROOM_CLASSES:
            gap = np.maximum(np.maximum(lo[:2] - eye[:, :2], eye[:, :2] - hi[:2]), 0)
            assert np.linalg.norm(gap, axis=1).min() > 0.15, CLASS_NAMES[c]
    steps = np.linalg.norm(np.diff(eye, axis=0), axis=1)
    turns = np.degrees(np.arccos(np.clip((fwd[1:] * fwd[:-1]).sum(1), -1, 1)))
    assert steps.min() > 0.05 and steps.max() < 0.15 and turns.max() < 12
    assert np.linalg.norm(eye[0] - eye[-1]) < 0.15                                  # a closed loop
    assert np.array_equal(np.array(poses), np.array(builtin_trajectory(scene, 60)))
    assert not np.allclose(np.array(poses), np.array(builtin_trajectory(scene, 60, seed=1)))


def test_every_instance_is_seen_in_several_frames(scene):
    cam = default_camera(160, 120)
    seen = {}
    for T in builtin_trajectory(scene, 60):
        ids, counts = np.unique(render(scene, cam, T).instance, return_counts=True)
        for i in ids[(counts >= 10) & (ids > 0)]:
            seen[i] = seen.get(i, 0) + 1
    low = {CLASS_NAMES[c] + str(i): seen.get(i, 0) for i, c in scene.instance_classes().items() if seen.get(i, 0) < 3}
    assert not low


def test_gt_points(scene):
    xyz, sem, inst = sample_gt_points(scene, spacing_m=0.05)
    assert xyz.dtype == np.float32 and sem.dtype == np.int32 and inst.dtype == np.int32
    assert xyz.shape == (len(sem), 3) and len(inst) == len(sem) > 10000
    classes = scene.instance_classes()
    assert np.array_equal(sem, np.array([classes[i] for i in inst]))
    assert set(np.unique(inst)) == set(classes)                              # every instance has points
    assert np.all(xyz >= scene.room_min - 2e-3) and np.all(xyz <= scene.room_max + 2e-3)
    for iid, (lo, hi, _) in zip(sorted(classes), scene.instance_boxes()):
        pts = xyz[inst == iid]
        assert np.all((pts >= lo - 2e-3) & (pts <= hi + 2e-3)), iid
    for p in scene.primitives:                                               # nothing inside any solid
        assert not inside(p, xyz.astype(np.float64), pad=-3e-3).any()
    floor = xyz[sem == class_id('floor')]
    assert np.abs(floor[:, 2]).max() < 1e-6
    bed = next(b for b in scene.instance_boxes() if b[2] == class_id('bed'))
    under_bed = np.all((floor[:, :2] > bed[0][:2] + 0.05) & (floor[:, :2] < bed[1][:2] - 0.05), axis=1)
    assert not under_bed.any()                                               # hidden contact faces are dropped
    again = sample_gt_points(scene, spacing_m=0.05)
    assert all(np.array_equal(a, b) for a, b in zip((xyz, sem, inst), again))
