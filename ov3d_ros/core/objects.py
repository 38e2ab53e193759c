"""Object instances from a query answer: connected components of the answering voxels.

A query answers with voxels (:meth:`Mapper.segment`); two chairs are one answer. :func:`extract_objects` splits
the answer into instances: voxels are linked when their grid coordinates differ by at most ``gap_vox + 1`` on
every axis (so up to ``gap_vox`` empty voxels may lie between parts of one object), components smaller than
``min_voxels`` are dropped, and each instance gets a centroid, an axis-aligned box and its mean score.
Everything is vectorised torch on the answer's device; no ROS here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np
import torch

from ov3d_ros.core.voxel_map import pack_keys


@dataclass
class ObjectInstance:
    """One connected group of answering voxels, in the map frame.

    centroid (3,) float64 metres: mean of the voxel centres; box_min / box_max (3,) float64 metres: the outer
    faces of the extreme voxels (an axis-aligned box); score: mean relevancy of its voxels; voxels: how many.
    rows (voxels,) int64: indices into the answer's points.
    """
    label: str
    score: float
    centroid: np.ndarray
    box_min: np.ndarray
    box_max: np.ndarray
    voxels: int
    rows: np.ndarray

    @property
    def box_center(self) -> np.ndarray:
        return (self.box_min + self.box_max) / 2.0

    @property
    def box_size(self) -> np.ndarray:
        return self.box_max - self.box_min


def _neighbour_offsets(reach: int, device) -> torch.Tensor:
    """(M, 3) int64 offsets of the cube [-reach, reach]^3 that are lexicographically positive: one of each pair
    (o, -o), M = ((2 reach + 1)^3 - 1) / 2."""
    r = torch.arange(-reach, reach + 1, device=device)
    off = torch.cartesian_prod(r, r, r)
    key = (off[:, 0] * (2 * reach + 1) + off[:, 1]) * (2 * reach + 1) + off[:, 2]
    return off[key > 0]


def connected_components(coords: torch.Tensor, gap_vox: int = 1) -> torch.Tensor:
    """Component id of each voxel: voxels whose coordinates differ by at most ``gap_vox + 1`` on every axis are
    linked (``gap_vox`` = 0: the 26-neighbourhood).

    coords (N, 3) int64 voxel coordinates, unique. Returns (N,) int64 ids in [0, C), numbered in order of each
    component's first voxel.
    """
    if gap_vox < 0:
        raise ValueError(f'gap_vox must be >= 0, got {gap_vox}')
    n = coords.shape[0]
    device = coords.device
    if n == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    keys = pack_keys(coords)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    offsets = _neighbour_offsets(gap_vox + 1, device)     # (M, 3), M = ((2g+3)^3 - 1) / 2
    chunk = max(1, (1 << 22) // n)                        # offsets per batched lookup (~4 M candidates)
    src, dst = [], []
    for off in offsets.split(chunk):
        k = pack_keys((coords[None, :, :] + off[:, None, :]).reshape(-1, 3))      # (m * N,)
        pos = torch.searchsorted(sorted_keys, k).clamp(max=n - 1)
        hit = torch.nonzero(sorted_keys[pos] == k).squeeze(1)
        src.append(hit % n)
        dst.append(order[pos[hit]])
    src, dst = torch.cat(src + dst), torch.cat(dst + src)     # each link both ways
    # min-label propagation with pointer jumping: labels only decrease, so this ends
    labels = torch.arange(n, device=device)
    while True:
        new = labels.scatter_reduce(0, src, labels[dst], reduce='amin')
        new = new[new]
        while True:
            jumped = new[new]
            if torch.equal(jumped, new):
                break
            new = jumped
        if torch.equal(new, labels):
            break
        labels = new
    return torch.unique(labels, return_inverse=True)[1]


def extract_objects(xyz: np.ndarray | torch.Tensor, scores: np.ndarray | torch.Tensor, voxel_size_m: float,
                    label: str = '', gap_vox: int = 1, min_voxels: int = 5) -> List[ObjectInstance]:
    """Split a query answer into object instances, best mean score first.

    xyz (N, 3) voxel centres in metres (:class:`Segment`.xyz); scores (N,) their relevancy; voxel_size_m the map's
    voxel edge. Components with fewer than ``min_voxels`` voxels are left out.
    """
    if voxel_size_m <= 0:
        raise ValueError(f'voxel_size_m must be > 0, got {voxel_size_m}')
    if min_voxels < 1:
        raise ValueError(f'min_voxels must be >= 1, got {min_voxels}')
    pts = torch.as_tensor(np.asarray(xyz) if not torch.is_tensor(xyz) else xyz, dtype=torch.float64).reshape(-1, 3)
    sc = torch.as_tensor(np.asarray(scores) if not torch.is_tensor(scores) else scores,
                         dtype=torch.float64, device=pts.device).reshape(-1)
    if sc.shape[0] != pts.shape[0]:
        raise ValueError(f'{pts.shape[0]} points but {sc.shape[0]} scores')
    if pts.shape[0] == 0:
        return []
    coords = torch.floor(pts / voxel_size_m).to(torch.int64)
    comp = connected_components(coords, gap_vox)
    c = int(comp.max()) + 1
    count = torch.bincount(comp, minlength=c)
    centroid = torch.zeros(c, 3, dtype=torch.float64, device=pts.device).index_add_(0, comp, pts) / count[:, None]
    score = torch.zeros(c, dtype=torch.float64, device=pts.device).index_add_(0, comp, sc) / count
    idx = comp[:, None].expand(-1, 3)
    lo = torch.full((c, 3), float('inf'), dtype=torch.float64, device=pts.device).scatter_reduce(
        0, idx, pts, reduce='amin') - voxel_size_m / 2
    hi = torch.full((c, 3), float('-inf'), dtype=torch.float64, device=pts.device).scatter_reduce(
        0, idx, pts, reduce='amax') + voxel_size_m / 2
    keep = torch.nonzero(count >= min_voxels).squeeze(1)
    keep = keep[torch.argsort(score[keep], descending=True, stable=True)]
    order = torch.argsort(comp, stable=True).cpu().numpy()
    starts = np.concatenate([[0], np.cumsum(count.cpu().numpy())])
    centroid, score, lo, hi, count = (t.cpu().numpy() for t in (centroid, score, lo, hi, count))
    return [ObjectInstance(label, float(score[k]), centroid[k], lo[k], hi[k], int(count[k]),
                           order[starts[k]:starts[k + 1]]) for k in keep.tolist()]
