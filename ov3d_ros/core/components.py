"""Connected components of a set of voxels (e.g. a query answer): one per object, with its bounding box."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys, unpack_keys


@dataclass
class Component:
    """One connected group of voxels: rows (M,) int64 map rows; lo, hi (3,) float32 corners of its axis-aligned
    bounding box in the map frame (metres, voxel faces included)."""

    rows: np.ndarray
    lo: np.ndarray
    hi: np.ndarray


def voxel_components(vmap: VoxelFeatureMap, rows: torch.Tensor, min_voxels: int = 1) -> List[Component]:
    """Split ``rows`` (N,) of ``vmap`` into 26-connected components of at least ``min_voxels`` voxels, largest
    first. Vectorised: the 13 forward neighbour offsets are looked up in the sorted keys of the set."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    rows = rows.to(vmap.device).long()
    n = rows.numel()
    if n == 0:
        return []
    coords = unpack_keys(vmap.keys[rows])
    keys, order = torch.sort(pack_keys(coords))
    offsets = torch.tensor([(x, y, z) for x in (-1, 0, 1) for y in (-1, 0, 1) for z in (-1, 0, 1)
                            if (x, y, z) > (0, 0, 0)], dtype=torch.int64, device=coords.device)   # (13, 3)
    nb = pack_keys((coords[:, None, :] + offsets[None]).reshape(-1, 3))                          # (N * 13,)
    pos = torch.searchsorted(keys, nb).clamp(max=n - 1)
    hit = keys[pos] == nb
    i = torch.arange(n, device=coords.device).repeat_interleave(offsets.shape[0])[hit]
    j = order[pos[hit]]
    graph = coo_matrix((np.ones(int(hit.sum()), np.int8), (i.cpu().numpy(), j.cpu().numpy())), shape=(n, n))
    count, label = connected_components(graph, directed=False)
    sizes = np.bincount(label, minlength=count)
    lo_all = coords.cpu().numpy().astype(np.float64) * vmap.voxel_size_m
    rows_np = rows.cpu().numpy()
    out = []
    for c in np.argsort(-sizes, kind='stable'):
        if sizes[c] < min_voxels:
            break
        member = label == c
        out.append(Component(rows_np[member], lo_all[member].min(0).astype(np.float32),
                             (lo_all[member].max(0) + vmap.voxel_size_m).astype(np.float32)))
    return out
