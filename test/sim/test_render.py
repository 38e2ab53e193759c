"""Ray casting: analytic depths, labels, occlusion, determinism, noise, back-projection onto the hit surfaces,
the world-anchored texture."""
import importlib

import numpy as np
import pytest
import torch

from ov3d_ros.core.camera import PinholeCamera, transform_points
from ov3d_ros.sim import (Primitive, Scene, builtin_scene, builtin_trajectory, class_id, default_camera, look_at,
                          render)
from ov3d_ros.sim.gt import inside
from ov3d_ros.sim.render import world_texture

CAM = PinholeCamera(100.0, 100.0, 32.0, 24.0, 65, 49)   # pixel (32, 24) is exactly on the optical axis


def scene_of(*prims):
    return Scene('test', np.full(3, -10.0), np.full(3, 10.0), list(prims))


def centre(frame):
    return frame.depth_m[24, 32], frame.semantic[24, 32], frame.instance[24, 32]


def test_box_face_depth_and_labels():
    box = Primitive.box((0, 0, 1), (0.3, 0.5, 0.4), class_id('chair'), 7, (200, 30, 30))
    f = render(scene_of(box), CAM, look_at((3, 0, 1), (0, 0, 1)))       # 3 m from the centre, facing +x face
    d, s, i = centre(f)
    assert d == pytest.approx(3 - 0.3, abs=1e-4)
    assert (s, i) == (class_id('chair'), 7)
    # depth is z_C, not ray length: the whole flat face has the same depth; nothing outside is hit
    face = f.instance == 7
    assert np.allclose(f.depth_m[face], 2.7, atol=1e-4)
    assert f.depth_m[~face].max() == 0 and f.semantic[~face].max() == 0 and f.rgb[~face].max() == 0
    assert f.rgb[face].mean(0)[0] > 3 * f.rgb[face].mean(0)[1]            # red-ish, shaded
    assert len(np.unique(f.rgb[face].reshape(-1, 3), axis=0)) > 5         # textured, not flat
    # the face spans exactly its projected size: half width 0.5 m at 2.7 m → 100 * 0.5 / 2.7 ≈ 18.5 px
    assert face[24].sum() == 2 * 18 + 1


def test_yawed_box_hits_its_edge():
    box = Primitive.box((0, 0, 0), (0.5, 0.5, 0.5), 1, 1, (100, 100, 100), yaw_rad=np.pi / 4)
    d, _, _ = centre(render(scene_of(box), CAM, look_at((3, 0, 0), (0, 0, 0))))
    assert d == pytest.approx(3 - 0.5 * np.sqrt(2), abs=1e-4)


def test_cylinder_side_and_cap_and_sphere_depths():
    cyl = Primitive.cylinder((0, 0, 0.5), 0.25, 0.5, class_id('lamp'), 3, (240, 220, 140))
    d, s, i = centre(render(scene_of(cyl), CAM, look_at((2, 0, 0.6), (0, 0, 0.6))))
    assert (d, s, i) == (pytest.approx(1.75, abs=1e-4), class_id('lamp'), 3)
    d, _, _ = centre(render(scene_of(cyl), CAM, look_at((0, 0, 3), (0, 0, 0), up=(1, 0, 0))))   # from above
    assert d == pytest.approx(2.0, abs=1e-4)
    d, _, _ = centre(render(scene_of(cyl), CAM, look_at((0, 0, -2), (0, 0, 0), up=(1, 0, 0))))  # from below
    assert d == pytest.approx(2.0, abs=1e-4)
    sph = Primitive.sphere((1, 2, 1), 0.4, class_id('plant'), 9, (40, 150, 50))
    f = render(scene_of(sph), CAM, look_at((1, -1, 1), (1, 2, 1)))
    assert centre(f) == (pytest.approx(2.6, abs=1e-4), class_id('plant'), 9)
    # off-axis pixel on the sphere: depth matches the analytic ray/sphere intersection
    u, v = 40, 20
    ray = np.array([(u - CAM.cx) / CAM.fx, (v - CAM.cy) / CAM.fy, 1.0])   # camera frame, z = 1
    oc = np.array([0.0, 0.0, -3.0])                                         # origin − centre in the camera frame
    b, c = ray @ oc, oc @ oc - 0.16
    assert f.depth_m[v, u] == pytest.approx((-b - np.sqrt(b * b - (ray @ ray) * c)) / (ray @ ray), abs=1e-4)


def test_nearest_hit_wins():
    back = Primitive.box((0, 0, 0), (0.1, 1.0, 1.0), 1, 1, (200, 200, 200))
    front = Primitive.box((1, 0, 0), (0.1, 0.2, 0.2), 2, 2, (10, 10, 200))
    for prims in ((back, front), (front, back)):
        f = render(scene_of(*prims), CAM, look_at((3, 0, 0), (0, 0, 0)))
        assert centre(f) == (pytest.approx(1.9, abs=1e-4), 2, 2)
        assert f.depth_m[2, 32] == pytest.approx(2.9, abs=1e-4) and f.instance[2, 32] == 1


def test_camera_inside_nothing_and_behind():
    box = Primitive.box((0, 0, 0), (0.5, 0.5, 0.5), 1, 1, (100, 100, 100))
    f = render(scene_of(box), CAM, look_at((3, 0, 0), (6, 0, 0)))          # looking away
    assert f.depth_m.max() == 0 and f.instance.max() == 0
    f = render(scene_of(), CAM, np.eye(4))
    assert f.rgb.shape == (49, 65, 3) and f.depth_m.max() == 0


def test_builtin_frame_types_determinism_and_seeds():
    cam = default_camera(160, 120)
    scene, T = builtin_scene(0), builtin_trajectory(builtin_scene(0), 20)[3]
    a, b = render(scene, cam, T), render(scene, cam, T)
    assert a.rgb.dtype == np.uint8 and a.rgb.shape == (120, 160, 3)
    assert a.depth_m.dtype == np.float32 and a.semantic.dtype == np.uint16 and a.instance.dtype == np.uint16
    for x, y in zip((a.rgb, a.depth_m, a.semantic, a.instance), (b.rgb, b.depth_m, b.semantic, b.instance)):
        assert np.array_equal(x, y)
    assert (a.depth_m > 0).all()                                            # closed room: every pixel hits
    other = render(builtin_scene(1), cam, T)
    assert not np.array_equal(a.rgb, other.rgb)
    # depth noise and holes are seeded and off by default
    n1 = render(scene, cam, T, depth_noise=0.01, hole_fraction=0.1, seed=5)
    n2 = render(scene, cam, T, depth_noise=0.01, hole_fraction=0.1, seed=5)
    n3 = render(scene, cam, T, depth_noise=0.01, hole_fraction=0.1, seed=6)
    assert np.array_equal(n1.depth_m, n2.depth_m) and not np.array_equal(n1.depth_m, n3.depth_m)
    assert abs((n1.depth_m == 0).mean() - 0.1) < 0.02
    valid = n1.depth_m > 0
    rel = (n1.depth_m[valid] - a.depth_m[valid]) / a.depth_m[valid] ** 2
    assert 0.007 < rel.std() < 0.013 and np.array_equal(n1.rgb, a.rgb)


def test_backprojected_depth_lies_on_the_hit_primitive():
    scene = builtin_scene(0)
    cam = default_camera(160, 120)
    by_inst = {}
    for p in scene.primitives:
        by_inst.setdefault(p.instance_id, []).append(p)
    for T in builtin_trajectory(scene, 12)[::3]:
        f = render(scene, cam, T)
        pts = transform_points(torch.as_tensor(T), cam.backproject(torch.from_numpy(f.depth_m).double())).numpy()
        floor = f.semantic == class_id('floor')
        assert floor.sum() > 100 and np.abs(pts[floor][:, 2]).max() < 1e-3
        pts, inst = pts.reshape(-1, 3), f.instance.reshape(-1)
        for iid in np.unique(inst):
            q = pts[inst == iid]
            on = np.zeros(len(q), bool)
            for p in by_inst[iid]:
                on |= inside(p, q, pad=2e-3)
            assert on.all(), (iid, (~on).sum())
            for p in scene.primitives:                       # and not buried inside any primitive
                assert not inside(p, q, pad=-3e-3).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu():
    scene, cam = builtin_scene(0), default_camera(160, 120)
    T = builtin_trajectory(scene, 10)[4]
    a, b = render(scene, cam, T), render(scene, cam, T, device='cuda')
    assert np.array_equal(a.instance, b.instance) and np.allclose(a.depth_m, b.depth_m, atol=1e-4)


def test_pixel_windows_do_not_clip_primitives(monkeypatch):
    """Per-primitive pixel rectangles are only an optimisation: rendering every pixel gives the same frame."""
    r = importlib.import_module('ov3d_ros.sim.render')   # the package attribute 'render' is the function
    scene, cam = builtin_scene(2), default_camera(128, 96)
    poses = builtin_trajectory(scene, 8, seed=2)
    fast = [render(scene, cam, T) for T in poses]
    monkeypatch.setattr(r, '_window', lambda p, T, c: (0, c.height, 0, c.width))
    for T, a in zip(poses, fast):
        b = render(scene, cam, T)
        same = a.instance == b.instance            # float32 rounding differs with tensor shapes: a grazing ray
        assert same.sum() >= same.size - 2        # on a silhouette may flip, a clipped window would flip many
        assert np.allclose(a.depth_m[same], b.depth_m[same], rtol=0, atol=2e-4)


def test_texture_is_a_function_of_the_world_point():
    """Two views of one wall, the second moved 10 px worth sideways: every world point keeps its colour; the
    texture varies over the wall and runs on unchanged across two touching objects of one colour."""
    grey = (200, 200, 200)
    wall = Primitive.box((0, 0, 1), (0.3, 5, 5), class_id('wall'), 1, grey)
    Ta, k = look_at((3, 0, 1), (0, 0, 1)), 10
    shift = k * 2.7 / CAM.fx * Ta[:3, 0]                  # the face is 2.7 m away: 10 px to the left
    Tb = look_at(np.array((3, 0, 1)) + shift, np.array((0, 0, 1)) + shift)
    a, b = render(scene_of(wall), CAM, Ta), render(scene_of(wall), CAM, Tb)
    assert (b.rgb[:, :-k] == a.rgb[:, k:]).all(-1).mean() > 0.99
    assert not np.array_equal(a.rgb, b.rgb)
    brightness = a.rgb.astype(np.float64).mean(-1)
    assert np.percentile(brightness, 95) > 1.1 * np.percentile(brightness, 5)     # not one flat colour
    pw = torch.rand(1000, 3) * 4
    assert torch.equal(world_texture(pw), world_texture(pw.clone()))
    f = world_texture(pw)
    assert f.shape == (1000, 3) and 0.8 < float(f.min()) and float(f.max()) < 1.2
    # a cabinet of the wall's colour in front of it: only shading and the fine per-object texture tell them apart
    cabinet = Primitive.box((0.5, 0, 0.6), (0.2, 0.4, 0.6), class_id('cabinet'), 2, grey)
    f2 = render(scene_of(wall, cabinet), CAM, look_at((3, 0.3, 1.2), (0, 0, 0.9)))
    front = (f2.instance == 2) & (np.abs(f2.depth_m - f2.depth_m[f2.instance == 2].min()) < 1e-3)
    on_wall = f2.instance == 1
    col = f2.rgb.reshape(-1, 3).astype(np.float64)
    assert np.abs(col[front.ravel()].mean(0) - col[on_wall.ravel()].mean(0)).max() < 25
