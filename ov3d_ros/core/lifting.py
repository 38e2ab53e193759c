"""Lift one RGB-D keyframe and its dense 2D features into world-frame points."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ov3d_ros.core.camera import PinholeCamera, transform_points
from ov3d_ros.core.depth import valid_depth_mask


@dataclass
class LiftedPoints:
    """Points of one keyframe. points (N, 3) world frame; features (N, D) unit norm; colors (N, 3) 0..255."""

    points: torch.Tensor
    features: torch.Tensor
    colors: torch.Tensor


def sample_features(feature_grid: torch.Tensor, u: torch.Tensor, v: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinearly sample a (h, w, D) feature grid covering a ``width`` x ``height`` image at pixels (u, v).

    Returns (N, D) float32 features, L2-normalised.
    """
    grid = feature_grid.permute(2, 0, 1)[None].float()                       # (1, D, h, w)
    gx = (u.float() + 0.5) / width * 2 - 1
    gy = (v.float() + 0.5) / height * 2 - 1
    xy = torch.stack([gx, gy], dim=-1)[None, None].to(grid.device)          # (1, 1, N, 2)
    out = F.grid_sample(grid, xy, mode='bilinear', padding_mode='border', align_corners=False)
    return F.normalize(out[0, :, 0].T, dim=-1)


def lift_keyframe(depth_m: torch.Tensor, rgb: torch.Tensor, feature_grid: torch.Tensor, camera: PinholeCamera,
                  T_W_C: torch.Tensor, min_depth_m: float, max_depth_m: float, pixel_stride: int = 1) -> LiftedPoints:
    """Back-project valid depth pixels, move them into the world frame and attach features and colour.

    Args:
        depth_m: (H, W) float32 metres, camera optical frame.
        rgb: (H, W, 3) uint8 colour registered to the depth image.
        feature_grid: (h, w, D) dense features covering the image.
        camera: intrinsics of the depth image.
        T_W_C: (4, 4) camera-to-world transform.
        pixel_stride: use every n-th pixel along u and v.
    """
    device = feature_grid.device
    depth_m = depth_m.to(device)
    H, W = depth_m.shape
    s = max(1, int(pixel_stride))
    sub = depth_m[::s, ::s]
    valid = valid_depth_mask(sub, min_depth_m, max_depth_m)
    vv, uu = torch.nonzero(valid, as_tuple=True)
    v, u = vv * s, uu * s
    z = sub[vv, uu]
    x = (u.float() - camera.cx) / camera.fx * z
    y = (v.float() - camera.cy) / camera.fy * z
    points = transform_points(T_W_C.to(device, torch.float32), torch.stack([x, y, z], dim=-1))
    feats = sample_features(feature_grid, u, v, W, H)
    colors = rgb.to(device)[v, u].float()
    return LiftedPoints(points, feats, colors)
