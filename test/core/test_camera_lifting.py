import math

import numpy as np
import pytest
import torch

from ov3d_ros.core.camera import PinholeCamera, transform_points
from ov3d_ros.core.depth import depth_to_meters, valid_depth_mask
from ov3d_ros.core.lifting import bilinear_cells, lift_keyframe, sample_features


def test_backproject_matches_pinhole_equations():
    cam = PinholeCamera(fx=100.0, fy=200.0, cx=2.0, cy=1.0, width=4, height=3)
    depth = torch.full((3, 4), 2.0)
    pts = cam.backproject(depth)
    # pixel (u=3, v=0): x = (3 - 2) / 100 * 2, y = (0 - 1) / 200 * 2
    assert pts[0, 3].tolist() == pytest.approx([0.02, -0.01, 2.0])
    uv = cam.project(pts.reshape(-1, 3))
    assert uv[3].tolist() == pytest.approx([3.0, 0.0])


def test_camera_rejects_bad_intrinsics():
    with pytest.raises(ValueError):
        PinholeCamera(0.0, 1.0, 0.0, 0.0, 4, 3)
    with pytest.raises(ValueError):
        PinholeCamera(float('nan'), 1.0, 0.0, 0.0, 4, 3)
    with pytest.raises(ValueError):
        PinholeCamera(1.0, 1.0, 0.0, 0.0, 0, 3)


def test_scaled_camera_keeps_rays():
    cam = PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480)
    half = cam.scaled(320, 240)
    assert (half.fx, half.cx, half.cy) == pytest.approx((250.0, 159.5, 119.5))


def test_transform_points_rotation_and_translation():
    c, s = math.cos(math.pi / 2), math.sin(math.pi / 2)
    T = torch.tensor([[c, -s, 0, 1.0], [s, c, 0, 2.0], [0, 0, 1, 3.0], [0, 0, 0, 1]], dtype=torch.float64)
    out = transform_points(T, torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64))
    assert out[0].tolist() == pytest.approx([1.0, 3.0, 3.0])


def test_depth_decoding_and_validity():
    mm = np.array([[0, 1000], [2500, 65535]], dtype=np.uint16)
    np.testing.assert_allclose(depth_to_meters(mm, '16UC1'), [[0.0, 1.0], [2.5, 65.535]], rtol=1e-6)
    f = np.array([[np.nan, 1.5], [np.inf, -1.0]], dtype=np.float32)
    m = depth_to_meters(f, '32FC1')
    np.testing.assert_array_equal(m, [[0.0, 1.5], [0.0, -1.0]])
    valid = valid_depth_mask(torch.from_numpy(m), 0.1, 5.0)
    assert valid.tolist() == [[False, True], [False, False]]
    raw = torch.tensor([[np.nan, 1.5, np.inf, -np.inf, 0.1, 5.0, 5.01]])   # NaN and inf as they come, not decoded
    for lo, hi in ((0.1, 5.0), (0.1, float('inf')), (-float('inf'), 5.0)):
        expect = [bool(np.isfinite(d) and lo <= d <= hi) for d in raw[0].tolist()]
        assert valid_depth_mask(raw, lo, hi)[0].tolist() == expect, (lo, hi)
    with pytest.raises(ValueError, match='rgb8'):
        depth_to_meters(mm, 'rgb8')


def test_sample_features_bilinear_and_normalised():
    grid = torch.zeros(1, 2, 2)
    grid[0, 0, 0] = 1.0
    grid[0, 1, 1] = 1.0
    # 4x2 image over a 1x2 grid: pixel 0 is the centre of cell 0, pixel 3 of cell 1; pixels between blend
    f = sample_features(grid, torch.tensor([0, 1, 2, 3]), torch.tensor([0, 0, 0, 0]), width=4, height=2)
    assert f[0].tolist() == pytest.approx([1.0, 0.0], abs=1e-6)
    assert f[3].tolist() == pytest.approx([0.0, 1.0], abs=1e-6)
    assert f[1, 0] > f[1, 1] > 0
    assert torch.linalg.norm(f, dim=-1).tolist() == pytest.approx([1.0] * 4)


def test_cell_features_match_grid_sample():
    torch.manual_seed(0)
    grid = torch.nn.functional.normalize(torch.randn(5, 7, 16), dim=-1)
    u, v = torch.randint(0, 112, (500,)), torch.randint(0, 80, (500,))
    ref = torch.nn.functional.grid_sample(
        grid.permute(2, 0, 1)[None], torch.stack([(u + 0.5) / 112 * 2 - 1, (v + 0.5) / 80 * 2 - 1], -1)[None, None],
        mode='bilinear', padding_mode='border', align_corners=False)[0, :, 0].T
    ref = torch.nn.functional.normalize(ref, dim=-1)
    cells = bilinear_cells(grid, u, v, 112, 80)
    assert torch.allclose(cells.dense(), ref, atol=1e-5)
    single_row = bilinear_cells(grid[:1, :1], u, v, 112, 80).dense()   # 1x1 grid: every point is that cell
    assert torch.allclose(single_row, grid[0, 0].expand(500, -1), atol=1e-6)


def test_lift_keyframe_world_points_and_invalid_depth():
    cam = PinholeCamera(2.0, 2.0, 1.5, 1.5, 4, 4)
    depth = torch.full((4, 4), 1.0)
    depth[0, 0] = 0.0           # missing
    depth[0, 1] = float('nan')  # invalid
    depth[0, 2] = 9.0           # beyond max range
    rgb = torch.zeros(4, 4, 3, dtype=torch.uint8)
    rgb[3, 3] = torch.tensor([10, 20, 30])
    feats = torch.nn.functional.normalize(torch.ones(1, 1, 8), dim=-1)
    T = torch.eye(4, dtype=torch.float64)
    T[:3, 3] = torch.tensor([0.0, 0.0, 5.0])
    lifted = lift_keyframe(depth, rgb, feats, cam, T, min_depth_m=0.1, max_depth_m=5.0)
    assert lifted.points.shape == (13, 3)
    # pixel (u=3, v=3) at depth 1 → camera (0.75, 0.75, 1) → world (0.75, 0.75, 6)
    last = lifted.points[-1].tolist()
    assert last == pytest.approx([0.75, 0.75, 6.0])
    assert lifted.colors[-1].tolist() == [10.0, 20.0, 30.0]
    assert lifted.features.dense().shape == (13, 8)
    strided = lift_keyframe(depth, rgb, feats, cam, T, 0.1, 5.0, pixel_stride=2)
    assert strided.points.shape[0] == 2  # (0,0) missing, (0,2) beyond range; (2,0), (2,2) remain


def test_lifting_refuses_a_camera_of_another_image_size():
    """Its rays are those of the camera's image: a depth image of another size would be lifted along wrong rays."""
    cam = PinholeCamera(40.0, 40.0, 31.5, 23.5, 64, 48)
    with pytest.raises(ValueError, match='depth is 32x24, camera is 64x48'):
        lift_keyframe(torch.full((24, 32), 2.0), torch.zeros(24, 32, 3, dtype=torch.uint8), torch.ones(3, 4, 8), cam,
                      torch.eye(4), 0.1, 5.0)


def test_lifted_features_are_the_bilinear_samples_of_their_pixels():
    g = torch.Generator().manual_seed(4)
    cam = PinholeCamera(60.0, 60.0, 47.5, 31.5, 96, 64)
    depth = torch.rand(64, 96, generator=g) * 3 + 0.5
    depth[10:20, 30:50] = 0.0                                     # a hole: raster order skips it
    grid = torch.randn(5, 7, 16, generator=g)                     # not unit norm: the norms matter
    rgb = torch.randint(0, 256, (64, 96, 3), dtype=torch.uint8, generator=g)
    for stride in (1, 2, 3):
        lifted = lift_keyframe(depth, rgb, grid, cam, torch.eye(4, dtype=torch.float64), 0.1, 5.0, stride)
        vv, uu = torch.nonzero(depth[::stride, ::stride] > 0, as_tuple=True)
        v, u = vv * stride, uu * stride
        assert torch.allclose(lifted.features.dense(), sample_features(grid, u, v, 96, 64), atol=1e-5)
        assert torch.equal(lifted.features.cells, bilinear_cells(grid, u, v, 96, 64).cells)
        assert torch.equal(lifted.colors, rgb[v, u].float())
        assert torch.allclose(lifted.points[:, 2], depth[v, u])


# ---------------------------------------------------------------------------------------------- lens distortion
def _opencv_distort(model, d, x, y):
    """The distortion models as ROS's CameraInfo and OpenCV define them, written out here (not the product's
    code): normalised undistorted (x, y) -> normalised distorted."""
    if model == 'equidistant':
        r = np.hypot(x, y)
        th = np.arctan(r)
        th_d = th * (1 + d[0] * th ** 2 + d[1] * th ** 4 + d[2] * th ** 6 + d[3] * th ** 8)
        return x * th_d / r, y * th_d / r
    k = list(d) + [0.0] * (12 - len(d))
    r2 = x * x + y * y
    radial = (1 + k[0] * r2 + k[1] * r2 ** 2 + k[4] * r2 ** 3) / (1 + k[5] * r2 + k[6] * r2 ** 2 + k[7] * r2 ** 3)
    xd = x * radial + 2 * k[2] * x * y + k[3] * (r2 + 2 * x * x) + k[8] * r2 + k[9] * r2 ** 2
    yd = y * radial + k[2] * (r2 + 2 * y * y) + 2 * k[3] * x * y + k[10] * r2 + k[11] * r2 ** 2
    return xd, yd


LENSES = {   # (fx, fy, cx, cy, W, H, model, d): calibrations shaped like real cameras'
    'plumb_bob': (380.0, 381.0, 318.2, 241.7, 640, 480, 'plumb_bob', (-0.28, 0.07, 0.0008, -0.0004, 0.0)),
    'rational_polynomial': (605.0, 604.6, 638.1, 366.9, 1280, 720, 'rational_polynomial',
                            (0.55, -2.6, 0.0005, -0.0002, 1.5, 0.43, -2.4, 1.43)),    # Azure Kinect-like colour
    'thin_prism': (860.0, 860.0, 640.0, 360.0, 1280, 720, 'rational_polynomial',
                   (-4.2, 14.0, 0.0002, 0.0001, -10.0, -4.1, 13.8, -9.6, 0.001, -0.0005, 0.0007, -0.0003, 0.0, 0.0)),
    'equidistant': (285.7, 285.9, 418.9, 402.3, 848, 800, 'equidistant', (-0.0074, 0.0435, -0.0411, 0.0077)),
}


@pytest.mark.parametrize('lens', sorted(LENSES))
def test_rays_invert_the_lens_model(lens):
    """Each pixel's undistorted ray, put through the lens model as ROS/OpenCV define it, lands on the pixel."""
    cam = PinholeCamera(*LENSES[lens])
    v, u = np.meshgrid(np.arange(0, cam.height, 7), np.arange(0, cam.width, 7), indexing='ij')
    x, y, ok = cam.rays(u, v)
    assert ok.mean() > (0.6 if lens == 'equidistant' else 0.99), ok.mean()    # a fisheye's rim has no ray
    xd, yd = _opencv_distort(cam.distortion_model, cam.distortion, x[ok], y[ok])
    err = np.hypot(xd * cam.fx + cam.cx - u[ok], yd * cam.fy + cam.cy - v[ok])
    assert err.max() < 1e-3, err.max()
    shift = np.hypot((x[ok] - (u[ok] - cam.cx) / cam.fx) * cam.fx, (y[ok] - (v[ok] - cam.cy) / cam.fy) * cam.fy)
    assert shift.max() > 20.0        # the lens matters: a pinhole reading of k would be this many pixels off
    uv = cam.project(torch.from_numpy(np.stack([x[ok], y[ok], np.ones(ok.sum())], -1)))      # the forward model
    assert np.abs(uv.numpy() - np.stack([u[ok], v[ok]], -1)).max() < 1e-3


def test_rays_beyond_the_fold_of_the_lens_model_are_not_used():
    """Strong barrel distortion folds back at the image corners (two rays would land on one pixel): those pixels
    get no ray; the rest still invert exactly."""
    cam = PinholeCamera(300.0, 300.0, 319.5, 239.5, 640, 480, 'plumb_bob', (-0.45, 0.05, 0.0, 0.0, 0.0))
    v, u = np.meshgrid(np.arange(0, 480, 4), np.arange(0, 640, 4), indexing='ij')
    x, y, ok = cam.rays(u, v)
    r = np.hypot((u - cam.cx) / cam.fx, (v - cam.cy) / cam.fy)
    # r (1 - 0.45 r^2 + 0.05 r^4) grows up to r = 0.941, where it reaches 0.6026: no ray reaches further out
    assert not ok[r > 0.605].any() and ok[r < 0.6].all() and ok.mean() > 0.3
    xd, yd = _opencv_distort('plumb_bob', cam.distortion, x[ok], y[ok])
    assert np.hypot(xd * cam.fx + cam.cx - u[ok], yd * cam.fy + cam.cy - v[ok]).max() < 1e-3
    depth = torch.full((480, 640), 2.0)
    pts = cam.backproject(depth)[::4, ::4]
    assert torch.isnan(pts[..., 0][torch.from_numpy(~ok)]).all() and torch.isfinite(pts[torch.from_numpy(ok)]).all()


@pytest.mark.parametrize('model, d', [('plumb_bob', (0.3838, -0.1916, -0.0008, -0.0023, -0.1129)),
                                      ('equidistant', (0.4, -0.2, -0.1, 0.02))])
def test_rays_inside_the_fold_of_a_lens_that_stretches_there_are_found(model, d):
    """A lens that still stretches the image near its fold (k1 > 0, negative higher terms) maps a second, outer ray
    (beyond the fold) onto the pixels of rays just inside it: each of those pixels gets the inner ray, not none."""
    cam = PinholeCamera(300.0, 300.0, 639.5, 479.5, 1280, 960, model, d)
    rng = np.random.default_rng(0)
    # the model's radial part, written out here, grows up to its fold radius
    r = np.linspace(0.0, 20.0, 400001)
    grow = np.hypot(*_opencv_distort(model, d, r + 1e-9, np.zeros_like(r)))
    fold = r[np.argmax(~(np.diff(grow) > 0))]
    radius, angle = rng.uniform(0.0, 0.97 * fold, 20000), rng.uniform(0.0, 2 * np.pi, 20000)
    x, y = radius * np.cos(angle), radius * np.sin(angle)
    xd, yd = _opencv_distort(model, d, x + 1e-12, y)
    u, v = xd * cam.fx + cam.cx, yd * cam.fy + cam.cy
    seen = (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height) & (radius < np.tan(np.radians(85.0)))
    outer = _opencv_distort(model, d, np.full(1, fold), np.zeros(1))[0][0] > \
        _opencv_distort(model, d, np.full(1, fold * 0.97), np.zeros(1))[0][0]
    assert outer and seen.sum() > 5000              # the lens stretches near its fold; many such pixels in view
    rx, ry, ok = cam.rays(u[seen], v[seen])
    assert ok.all(), (~ok).sum()
    assert np.hypot(rx - x[seen], ry - y[seen]).max() < 1e-6


def test_lens_distortion_is_checked_and_zero_distortion_is_a_pinhole():
    pin = PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480)
    assert PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480, 'plumb_bob', (0.0,) * 5) == pin
    assert PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480, 'unknown', ()) == pin      # no coefficients
    assert not pin.distorted and PinholeCamera(*LENSES['plumb_bob']).distorted
    with pytest.raises(ValueError, match="lens distortion model 'fov' is not supported"):
        PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480, 'fov', (0.9,))
    with pytest.raises(ValueError, match='equidistant distortion needs 4 coefficients'):
        PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480, 'equidistant', (0.1, 0.0, 0.0, 0.0, 0.0))
    for model in ('plumb_bob', ''):                  # a non-finite coefficient is named as such, model or not
        with pytest.raises(ValueError, match='coefficients must be finite'):
            PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480, model, (0.1, float('nan'), 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match='tilted-sensor'):
        PinholeCamera(500.0, 500.0, 319.5, 239.5, 640, 480, 'rational_polynomial', (0.1,) + (0.0,) * 12 + (0.01,))
    scaled = PinholeCamera(*LENSES['plumb_bob']).scaled(320, 240)
    assert scaled.distortion == LENSES['plumb_bob'][7]       # distortion acts on normalised coordinates


def test_lifting_follows_the_undistorted_rays():
    """A wall at z = 2 m seen through an Azure Kinect-like lens: every lifted point lies on its pixel's true ray
    (projecting it through the lens model gives back the pixel), not on the pinhole ray of k."""
    cam = PinholeCamera(*LENSES['rational_polynomial']).scaled(320, 180)
    depth = torch.full((180, 320), 2.0)
    rgb = torch.zeros(180, 320, 3, dtype=torch.uint8)
    grid = torch.nn.functional.normalize(torch.randn(12, 20, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    T = torch.eye(4, dtype=torch.float64)
    for stride in (1, 3):
        lifted = lift_keyframe(depth, rgb, grid, cam, T, 0.1, 5.0, stride)
        v, u = (a.reshape(-1).numpy() for a in torch.meshgrid(torch.arange(0, 180, stride),
                                                               torch.arange(0, 320, stride), indexing='ij'))
        p = lifted.points.numpy().astype(np.float64)
        assert p.shape == (len(u), 3) and np.allclose(p[:, 2], 2.0)
        xd, yd = _opencv_distort(cam.distortion_model, cam.distortion, p[:, 0] / 2.0, p[:, 1] / 2.0)
        assert np.abs(xd * cam.fx + cam.cx - u).max() < 0.01 and np.abs(yd * cam.fy + cam.cy - v).max() < 0.01
        pinhole_x = (u - cam.cx) / cam.fx * 2.0
        assert np.abs(p[:, 0] - pinhole_x).max() > 0.05     # a voxel or more off at the image edge without it
    pinhole = PinholeCamera(cam.fx, cam.fy, cam.cx, cam.cy, 320, 180)
    assert np.allclose(lift_keyframe(depth, rgb, grid, pinhole, T, 0.1, 5.0).points.numpy()[:, 0],
                       ((np.arange(320) - cam.cx) / cam.fx * 2.0)[None].repeat(180, 0).reshape(-1), atol=1e-5)


def test_points_of_a_distorted_rendering_lie_on_the_surfaces():
    """The built-in scene rendered through an Azure Kinect-like lens (raw, distorted images): lifted with the lens,
    every point lies on a surface of the scene; lifted with a pinhole reading of k, points near the image edges
    are centimetres off."""
    from scipy.spatial import cKDTree
    from ov3d_ros.sim import builtin_scene, builtin_trajectory, render
    from ov3d_ros.sim.gt import sample_gt_points
    scene = builtin_scene(0)
    surfaces = cKDTree(sample_gt_points(scene, 0.02)[0])
    lens = PinholeCamera(*LENSES['rational_polynomial']).scaled(160, 90)
    T = builtin_trajectory(scene, 4, 0)[1]
    f = render(scene, lens, T)
    grid = torch.ones(6, 10, 4)
    far = {}
    for name, cam in (('lens', lens), ('pinhole', PinholeCamera(lens.fx, lens.fy, lens.cx, lens.cy, 160, 90))):
        points = lift_keyframe(torch.from_numpy(f.depth_m), torch.from_numpy(f.rgb), grid, cam, torch.from_numpy(T),
                               0.1, 10.0).points.numpy()
        d, _ = surfaces.query(points)
        far[name] = float(np.mean(d > 0.05))
        if name == 'lens':
            assert len(points) == 160 * 90 and np.percentile(d, 99) < 0.015     # the 2 cm sampling's own spacing
    assert far['lens'] == 0.0 and far['pinhole'] > 0.03, far
