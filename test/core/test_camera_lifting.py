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
