"""Lift one RGB-D keyframe and its dense 2D features into world-frame points."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ov3d_ros.core.camera import PinholeCamera, transform_points
from ov3d_ros.core.depth import valid_depth_mask


@dataclass
class CellFeatures:
    """Per-point features as bilinear mixtures of a coarse feature grid's cells.

    Feature grids are coarse (a ViT gives one token per 14-16 px), so many points of one voxel share cells;
    fusing through cells instead of per-point D-dim vectors is an order of magnitude cheaper.
    grid (M, D); cells (N, 4) int64 rows of ``grid``; weights (N, 4) such that ``weights @ grid[cells]`` is the
    L2-normalised bilinear sample of each point.
    """

    grid: torch.Tensor
    cells: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.cells.shape[0]

    def dense(self) -> torch.Tensor:
        """(N, D) per-point features."""
        return torch.einsum('nk,nkd->nd', self.weights, self.grid[self.cells])


@dataclass
class LiftedPoints:
    """Points of one keyframe. points (N, 3) world frame; features (N, D) unit norm as cell mixtures;
    colors (N, 3) 0..255."""

    points: torch.Tensor
    features: CellFeatures
    colors: torch.Tensor


def bilinear_cells(feature_grid: torch.Tensor, u: torch.Tensor, v: torch.Tensor, width: int,
                   height: int) -> CellFeatures:
    """Bilinear sampling of a (h, w, D) grid covering a ``width`` x ``height`` image at pixels (u, v).

    Same sampling as ``grid_sample(align_corners=False, padding_mode='border')``, then L2 normalisation.
    """
    h, w, D = feature_grid.shape
    grid = feature_grid.reshape(h * w, D).float()
    x = ((u.float() + 0.5) / width * w - 0.5).clamp(0, w - 1)
    y = ((v.float() + 0.5) / height * h - 0.5).clamp(0, h - 1)
    x0 = x.floor().clamp(max=max(w - 2, 0)).long()
    y0 = y.floor().clamp(max=max(h - 2, 0)).long()
    fx, fy = (x - x0).clamp(0, 1), (y - y0).clamp(0, 1)
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    cells = torch.stack([y0 * w + x0, y0 * w + x1, y1 * w + x0, y1 * w + x1], dim=1)
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    # Norm of each mixture from the 4x4 Gram matrix of its 2x2 block of cells (one per block, shared).
    yy, xx = torch.meshgrid(torch.arange(h, device=grid.device), torch.arange(w, device=grid.device), indexing='ij')
    xn, yn = (xx + 1).clamp(max=w - 1), (yy + 1).clamp(max=h - 1)
    block_cells = torch.stack([yy * w + xx, yy * w + xn, yn * w + xx, yn * w + xn], dim=-1).reshape(h * w, 4)
    block_vecs = grid[block_cells]                                               # (M, 4, D)
    gram = torch.einsum('mkd,mld->mkl', block_vecs, block_vecs)[cells[:, 0]]    # (N, 4, 4)
    norm = torch.einsum('nk,nkl,nl->n', weights, gram, weights).clamp_min(1e-12).sqrt()
    return CellFeatures(grid, cells, weights / norm[:, None])


def sample_features(feature_grid: torch.Tensor, u: torch.Tensor, v: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Bilinearly sample a (h, w, D) feature grid covering a ``width`` x ``height`` image at pixels (u, v).

    Returns (N, D) float32 features, L2-normalised.
    """
    return bilinear_cells(feature_grid, u, v, width, height).dense()


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
    feats = bilinear_cells(feature_grid, u, v, W, H)
    colors = rgb.to(device)[v, u].float()
    return LiftedPoints(points, feats, colors)
