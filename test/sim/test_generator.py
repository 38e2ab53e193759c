"""Generated rooms (generate_scene) and camera scans through them (scan_trajectory)."""
from collections import Counter

import numpy as np
import pytest

from ov3d_ros.sim import CLASS_NAMES, builtin_scene, class_id, default_camera, render, sample_gt_points
from ov3d_ros.sim.generator import ROOM_TYPES, generate_scene
from ov3d_ros.sim.trajectory import scan_trajectory

SEEDS = range(10)
SHELL = {class_id(n) for n in ('floor', 'ceiling')}
SMALL = {class_id(n) for n in ('plant', 'lamp', 'sink')}


@pytest.fixture(scope='module')
def scenes():
    return {seed: generate_scene(seed) for seed in SEEDS}


def boxes(scene):
    b = np.array([np.concatenate(p.bounds()) for p in scene.primitives])
    return b[:, :3], b[:, 3:]


def box_distance(points, lo, hi):
    gap = np.maximum(np.maximum(lo[None] - points[:, None], points[:, None] - hi[None]), 0.0)
    return np.linalg.norm(gap, axis=2).min(axis=1)


def inside_room(p, scene):
    lo, hi = p.bounds()
    return bool(np.all(lo >= scene.room_min - 1e-9) and np.all(hi <= scene.room_max + 1e-9))


def is_shell(p, scene):
    """Floor, ceiling and the outer walls lie outside the interior; an L-room's corner block is inside."""
    return p.class_id in SHELL or (p.class_id == class_id('wall') and not inside_room(p, scene))


def check_poses(scene, poses, n):
    assert len(poses) == n and all(T.shape == (4, 4) and T.dtype == np.float64 for T in poses)
    R = np.array([T[:3, :3] for T in poses])
    assert np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-9) and np.allclose(np.linalg.det(R), 1.0)
    assert np.allclose(np.array([T[3] for T in poses]), (0, 0, 0, 1))
    eye = np.array([T[:3, 3] for T in poses])
    assert np.all(eye > scene.room_min) and np.all(eye < scene.room_max)
    assert box_distance(eye, *boxes(scene)).min() >= 0.25
    return eye, np.array([T[:3, 2] for T in poses])


def test_same_seed_same_room_other_seed_other_room(scenes):
    a, again = scenes[3], generate_scene(3)
    assert again.name == 'generated_0003' and len(again.primitives) == len(a.primitives)
    for p, q in zip(a.primitives, again.primitives):
        assert (p.kind, p.class_id, p.instance_id, p.yaw_rad) == (q.kind, q.class_id, q.instance_id, q.yaw_rad)
        assert np.array_equal(p.center, q.center) and np.array_equal(p.size, q.size)
        assert np.array_equal(p.color, q.color)
    for style in ('handheld', 'robot'):
        poses = np.array(scan_trajectory(a, 20, 3, style))
        assert np.array_equal(poses, np.array(scan_trajectory(again, 20, 3, style)))
        assert not np.allclose(poses, np.array(scan_trajectory(a, 20, 4, style)))
    assert len({tuple(s.room_max) for s in scenes.values()}) == len(scenes)
    assert len({s.name for s in scenes.values()}) == len(scenes)


def test_rooms_are_varied_and_rich_in_classes(scenes):
    union, l_shaped = set(), 0
    for seed, s in scenes.items():
        size = s.room_max - s.room_min
        assert np.all(s.room_min == 0) and 4.0 <= size[0] <= 8.0 and 3.5 <= size[1] <= 7.0 and 2.4 <= size[2] <= 3.0
        assert len(s.primitives) <= 250
        classes = {p.class_id for p in s.primitives}
        assert len(classes) >= 12, (seed, sorted(CLASS_NAMES[c] for c in classes))
        union |= classes
        instances = s.instance_classes()
        assert all(instances[p.instance_id] == p.class_id for p in s.primitives)
        counts = Counter(c for c in instances.values() if c != class_id('wall'))
        assert max(counts.values()) >= 2, seed                         # several chairs / pictures / plants
        blocks = [p for p in s.primitives if p.class_id == class_id('wall') and inside_room(p, s)]
        if blocks:                                                     # L-shaped: a full-height corner block
            (lo, hi), = [b.bounds() for b in blocks]
            assert lo[2] == pytest.approx(0) and hi[2] == pytest.approx(size[2])
            assert sum(np.isclose(lo[:2], 0) | np.isclose(hi[:2], size[:2])) == 2
            l_shaped += 1
    assert union == set(range(1, len(CLASS_NAMES))), sorted(CLASS_NAMES[c] for c in set(range(1, 22)) - union)
    assert 0 < l_shaped < len(scenes)
    for s in scenes.values():                                          # what objects are made of
        kinds = {}
        for p in s.primitives:
            kinds.setdefault(CLASS_NAMES[p.class_id], Counter())[p.kind] += 1
        assert kinds['plant']['cylinder'] >= 1 and kinds['plant']['sphere'] >= 1
        if 'bookshelf' in kinds:
            n = sum(kinds['bookshelf'].values()) / Counter(s.instance_classes().values())[class_id('bookshelf')]
            assert n >= 8                                              # carcass, shelves and rows of books
    assert len(ROOM_TYPES) == 6


def test_objects_touch_but_never_interpenetrate(scenes):
    for seed, s in scenes.items():
        lo, hi = boxes(s)
        iid = np.array([p.instance_id for p in s.primitives])
        overlap = np.minimum(hi[:, None], hi[None]) - np.maximum(lo[:, None], lo[None])
        clash = np.all(overlap > 1e-6, axis=2) & (iid[:, None] != iid[None])
        pairs = [(CLASS_NAMES[s.primitives[i].class_id], CLASS_NAMES[s.primitives[j].class_id])
                 for i, j in np.argwhere(clash)]
        assert not pairs, (seed, pairs[:5])
        for p in s.primitives:
            if not is_shell(p, s):
                assert inside_room(p, s), (seed, CLASS_NAMES[p.class_id])
        # clutter: something small rests exactly on top of another object, off the floor
        resting = False
        for i, p in enumerate(s.primitives):
            if p.class_id in SMALL and lo[i, 2] > 0.3:
                under = ((np.abs(hi[:, 2] - lo[i, 2]) < 1e-6) & (iid != p.instance_id)
                         & np.all(lo[:, :2] < lo[i, :2], axis=1) & np.all(hi[:, :2] > hi[i, :2], axis=1))
                resting |= bool(under.any())
        assert resting, seed
        # wall decorations touch a wall
        walls = [(l, h) for p, l, h in zip(s.primitives, lo, hi) if p.class_id == class_id('wall')]
        wl, wh = np.array([w[0] for w in walls]), np.array([w[1] for w in walls])
        for i, p in enumerate(s.primitives):
            if p.class_id in (class_id('picture'), class_id('door'), class_id('window')):
                assert box_distance(((lo[i] + hi[i]) / 2)[None], wl, wh)[0] <= 0.05 + (hi[i] - lo[i]).min() / 2


def test_ground_truth_points(scenes):
    s = scenes[0]
    xyz, sem, inst = sample_gt_points(s, spacing_m=0.05)
    assert len(xyz) > 10000 and len(set(sem.tolist())) >= 12
    classes = s.instance_classes()
    assert np.array_equal(sem, np.array([classes[i] for i in inst]))
    assert len(set(inst.tolist())) >= 0.9 * len(classes)


@pytest.mark.parametrize('style', ['handheld', 'robot'])
def test_scans_stay_in_the_free_space_of_every_room(scenes, style):
    for seed, s in scenes.items():
        eye, fwd = check_poses(s, scan_trajectory(s, 60, seed, style), 60)
        steps = np.linalg.norm(np.diff(eye, axis=0), axis=1)
        turns = np.degrees(np.arccos(np.clip((fwd[1:] * fwd[:-1]).sum(1), -1, 1)))
        pitch = np.degrees(np.arcsin(fwd[:, 2]))
        assert 0.05 <= np.median(steps) <= 0.16 and steps.max() < 0.25, (seed, np.median(steps))
        assert np.median(turns) < 10 and turns.max() < 25, seed
        if style == 'handheld':
            assert np.all((eye[:, 2] >= 1.2) & (eye[:, 2] <= 1.6))
            assert pitch.min() < -15 and pitch.max() > -8                   # looks down at the floor and up
            assert np.linalg.norm(eye[0] - eye[-1]) < 0.25                  # one loop
        else:
            assert np.ptp(eye[:, 2]) < 1e-9 and 0.8 <= eye[0, 2] <= 1.0
            assert np.all((pitch >= -10 - 1e-6) & (pitch <= 1e-6))
            paused = steps < 0.005
            assert paused.sum() >= 2 and turns[paused].max() > 1.0          # stops and turns in place
    builtin = builtin_scene(0)                                          # works in any room with free floor
    check_poses(builtin, scan_trajectory(builtin, 30, 1, style), 30)


@pytest.mark.parametrize('style,seed', [('handheld', 0), ('robot', 3)])
def test_rendered_scan_sees_the_room(scenes, style, seed):
    s = scenes[seed]
    cam = default_camera(160, 120)
    classes, seen = s.instance_classes(), set()
    for T in scan_trajectory(s, 20, seed, style):
        f = render(s, cam, T)
        assert (f.depth_m > 0).mean() >= 0.9
        assert np.array_equal(f.semantic, np.vectorize(lambda i: classes.get(i, 0))(f.instance).astype(np.uint16))
        seen |= set(np.unique(f.semantic).tolist()) - {0}
    assert len(seen) >= 10, sorted(CLASS_NAMES[c] for c in seen)


def test_bad_arguments(scenes):
    with pytest.raises(ValueError):
        scan_trajectory(scenes[0], 0)
    with pytest.raises(ValueError):
        scan_trajectory(scenes[0], 10, 0, 'drone')
    assert len(scan_trajectory(scenes[0], 1, 0, 'robot')) == 1


def main_colours(scene):
    """{instance id: (class id, colour (3,) int of its largest primitive)}."""
    best = {}
    for p in scene.primitives:
        v = float(np.prod(p.size))
        if p.instance_id not in best or v > best[p.instance_id][0]:
            best[p.instance_id] = (v, p.class_id, p.color.astype(int))
    return {k: (c, col) for k, (_, c, col) in best.items()}


def test_objects_share_household_colours(scenes):
    """White cabinets on a white wall, chairs of the table's wood: colour alone does not separate objects."""
    wall, floor = class_id('wall'), class_id('floor')
    like_room, chair_like_table = 0, 0
    for seed, s in scenes.items():
        objects = main_colours(s)
        room = [col for c, col in objects.values() if c in (wall, floor)]
        others = [(c, col) for c, col in objects.values() if c not in (wall, floor, class_id('ceiling'))]
        like_room += any(np.abs(col - r).max() <= 15 for _, col in others for r in room)
        tables = [col for c, col in others if c in (class_id('table'), class_id('desk'))]
        chair_like_table += any(np.abs(col - t).max() <= 15 for c, col in others if c == class_id('chair')
                                for t in tables)
    assert like_room >= 5 and chair_like_table >= 3, (like_room, chair_like_table)
