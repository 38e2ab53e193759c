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
    return vmap.lookup(keys.reshape(-1)).reshape(len(rows), len(offsets))


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


def cube_offsets(radius_vox: int, device: torch.device | str = 'cpu') -> torch.Tensor:
    """((2r+1)^3, 3) int64 offsets with Chebyshev length <= ``radius_vox`` (the zero offset first)."""
    r = int(radius_vox)
    ax = torch.arange(-r, r + 1, device=device)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing='ij'), dim=-1).reshape(-1, 3)
    return grid[torch.argsort(grid.abs().amax(1), stable=True)]


def ball_region(vmap: VoxelFeatureMap, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Sorted unique ``rows`` and every occupied voxel at one of ``offsets`` from them."""
    if len(rows) == 0:
        return torch.unique(rows)
    nbr = neighbour_rows(vmap, rows, offsets)
    return torch.unique(torch.cat([rows, nbr[nbr >= 0]]))


def connected_dilation(vmap: VoxelFeatureMap, rows: torch.Tensor, steps: int) -> tuple:
    """Occupied voxels within ``steps`` steps of ``rows`` through 26-connected occupied voxels.

    This is how far a chain of ``steps`` 3x3x3 submanifold convolutions carries information on the map. Returns
    (reached (S,) sorted unique rows, hops (S,) int64: the step count at which each was first reached). A
    breadth-first search over the newly reached voxels only: the cost follows the reached set, not the map.
    """
    reached = torch.unique(rows)
    hops = torch.zeros(len(reached), dtype=torch.int64, device=reached.device)
    frontier, offsets = reached, cube_offsets(1, vmap.device)
    for step in range(1, int(steps) + 1):
        if len(frontier) == 0:
            break
        nbr = neighbour_rows(vmap, frontier, offsets)
        cand = torch.unique(nbr[nbr >= 0])
        new = cand[~torch.isin(cand, reached)]
        reached, order = torch.sort(torch.cat([reached, new]))
        hops = torch.cat([hops, torch.full((len(new),), step, dtype=torch.int64, device=hops.device)])[order]
        frontier = new
    return reached, hops
