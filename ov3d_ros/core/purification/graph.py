"""Voxel neighbourhoods on the sparse map: neighbour rows by key arithmetic, per-voxel normals.

Neighbours are the occupied voxels within a ball of ``radius_vox`` voxels. Because keys pack biased
coordinates in fixed bit fields, the key of a voxel shifted by an offset is the key plus a constant, so a
neighbourhood lookup is one ``searchsorted`` per (voxel, offset): no KD-tree, same code on CPU and GPU.
"""
from __future__ import annotations

import torch

from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys


def ball_offsets(radius_vox: int, device: torch.device | str = 'cpu') -> torch.Tensor:
    """(M, 3) int64 integer offsets with Euclidean length <= ``radius_vox``, the zero offset first."""
    r = int(radius_vox)
    if r < 1:
        raise ValueError(f'radius_vox must be >= 1, got {radius_vox}')
    ax = torch.arange(-r, r + 1, device=device)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing='ij'), dim=-1).reshape(-1, 3)
    grid = grid[(grid.float().norm(dim=1) <= r + 1e-6)]
    return grid[torch.argsort(grid.float().norm(dim=1), stable=True)]


def offset_deltas(offsets: torch.Tensor) -> torch.Tensor:
    """(M,) int64 key differences of the offsets (key(c + o) = key(c) + delta(o) inside the key range)."""
    return pack_keys(offsets) - pack_keys(torch.zeros_like(offsets))


def neighbour_rows(vmap: VoxelFeatureMap, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(R, M) int64 map rows of the neighbours of ``rows`` at each offset; -1 where unoccupied."""
    keys = vmap.keys[rows][:, None] + offset_deltas(offsets.to(vmap.device))[None, :]
    return vmap.lookup(keys.reshape(-1)).reshape(len(rows), -1)


def estimate_normals(vmap: VoxelFeatureMap, rows: torch.Tensor, nbr: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(R, 3) unit normals of ``rows``: the least-variance direction of their occupied neighbours' centres.

    ``nbr`` (R, M) from :func:`neighbour_rows` with the same ``offsets``. Voxels with fewer than 3 neighbours
    get the zero vector. Orientation is arbitrary (use ``abs`` of dot products).
    """
    present = (nbr >= 0).float()                                    # (R, M)
    pts = offsets.to(vmap.device).float()[None] * present[..., None]  # offsets are positions relative to the voxel
    n = present.sum(1).clamp_min(1.0)
    mean = pts.sum(1) / n[:, None]
    centred = (pts - mean[:, None]) * present[..., None]
    cov = centred.transpose(1, 2) @ centred / n[:, None, None]
    _, vecs = torch.linalg.eigh(cov.double())
    normals = vecs[:, :, 0].float()
    return torch.where((present.sum(1) >= 3)[:, None], normals, torch.zeros_like(normals))
