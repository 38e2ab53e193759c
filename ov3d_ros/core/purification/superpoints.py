"""Superpoints: a label-free over-segmentation of the voxel map from geometry and colour, and feature voting
within each superpoint.

Geometry-guided pooling (:mod:`.pooling`) averages over a 2-voxel neighbourhood; errors that cover a whole part
of an object (a 2D model that calls the back of a chair "table" in every view) are too large for it to outvote.
Superpoints are regions of similar normal and colour, the usual unit of 3D open-vocabulary methods (ScanNet's
mesh segmentation, SAI3D, Open3DIS): each voxel's purified feature is blended with the mean over its superpoint.

The segmentation is Felzenszwalb-Huttenlocher's graph criterion on the 26-connected voxel graph (edge weight =
normal disagreement 1 - |n_i . n_j| + RGB distance / 255): two regions merge over an edge when its weight is
at most both regions' internal difference + ``k`` / size. It runs in Borůvka rounds (every region takes its
cheapest outgoing edge at once), vectorised in torch, the same on CPU and CUDA, so the cost is a few passes
over the edges rather than a sequential union-find. Neither the features nor any label are read.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ov3d_ros.core.purification.graph import cube_offsets, neighbour_rows
from ov3d_ros.core.voxel_map import VoxelFeatureMap


def voxel_edges(vmap: VoxelFeatureMap, normals: torch.Tensor) -> tuple:
    """The 26-connected voxel graph of the map's first ``vmap.size`` rows, each edge once.

    normals (V, 3) unit normals by row. Returns (i (E,), j (E,) int64 rows, w (E,) float32 weights:
    1 - |n_i . n_j| + |rgb_i - rgb_j| / 255).
    """
    n = vmap.size
    offsets = cube_offsets(1, vmap.device)[1:]
    half = offsets[(offsets[:, 0] > 0) | ((offsets[:, 0] == 0) & (offsets[:, 1] > 0)) |
                   ((offsets[:, 0] == 0) & (offsets[:, 1] == 0) & (offsets[:, 2] > 0))]   # 13 of 26
    rows = torch.arange(n, device=vmap.device)
    nbr = neighbour_rows(vmap, rows, half)
    ok = nbr >= 0
    i, j = rows[:, None].expand_as(nbr)[ok], nbr[ok]
    nrm, col = normals[:n].float(), vmap.colors[:n].float()
    w = 1 - (nrm[i] * nrm[j]).sum(1).abs() + (col[i] - col[j]).norm(dim=1) / 255.0
    return i, j, w


def _relabel(parent: torch.Tensor) -> torch.Tensor:
    """Follow ``parent`` pointers to their roots (pointer jumping)."""
    while True:
        nxt = parent[parent]
        if torch.equal(nxt, parent):
            return parent
        parent = nxt


def _union(num: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(num,) root labels of the connected components of the graph with edges (a, b) over ``num`` nodes
    (label propagation to the smallest index, with pointer jumping)."""
    label = torch.arange(num, device=a.device)
    while True:
        m = torch.minimum(label[a], label[b])
        new = label.clone()
        new.scatter_reduce_(0, a, m, reduce='amin')
        new.scatter_reduce_(0, b, m, reduce='amin')
        new = _relabel(torch.minimum(new, new[new]))
        if torch.equal(new, label):
            return label
        label = new


def _cheapest(comp_i: torch.Tensor, comp_j: torch.Tensor, rank: torch.Tensor, num: int) -> torch.Tensor:
    """(num,) per region, the rank of its cheapest outgoing edge (edges given by their region ends and their
    rank in the global weight order; regions with none get a rank past the end)."""
    best = torch.full((num,), len(rank), dtype=torch.int64, device=rank.device)
    best.scatter_reduce_(0, comp_i, rank, reduce='amin')
    best.scatter_reduce_(0, comp_j, rank, reduce='amin')
    return best


def segment_graph(num: int, i: torch.Tensor, j: torch.Tensor, w: torch.Tensor, k: float,
                  min_size: int = 0) -> torch.Tensor:
    """(num,) int64 region index (0..S-1) of every node of the graph (i, j, w) (E,) by the Felzenszwalb-
    Huttenlocher criterion with constant ``k`` (larger: larger regions), in Borůvka rounds; regions smaller than
    ``min_size`` nodes are then merged over their cheapest edge."""
    device = i.device
    if num == 0:
        return torch.zeros(0, dtype=torch.int64, device=device)
    order = torch.argsort(w, stable=True)
    i, j, w = i[order], j[order], w[order].float()
    comp = torch.arange(num, device=device)           # node -> its region's root node
    size = torch.ones(num, dtype=torch.float32, device=device)       # valid at roots
    internal = torch.zeros(num, dtype=torch.float32, device=device)  # valid at roots: largest merged edge
    for small_pass in (False, True):
        if small_pass and min_size <= 1:
            break
        while True:
            ci, cj = comp[i], comp[j]
            live = ci != cj
            i, j, w, ci, cj = i[live], j[live], w[live], ci[live], cj[live]   # edges inside a region: done
            if len(w) == 0:
                break
            rank = torch.arange(len(w), device=device)   # still in weight order
            best = _cheapest(ci, cj, rank, num)
            chosen = (best[ci] == rank) | (best[cj] == rank)
            a, b, we = ci[chosen], cj[chosen], w[chosen]
            if small_pass:
                accept = (size[a] < min_size) | (size[b] < min_size)
            else:
                accept = (we <= internal[a] + k / size[a]) & (we <= internal[b] + k / size[b])
            if not bool(accept.any()):
                break
            a, b, we = a[accept], b[accept], we[accept]
            root = _union(num, a, b)                  # old root -> new root (identity elsewhere)
            is_root = comp == torch.arange(num, device=device)
            olds = torch.nonzero(is_root).flatten()
            size = torch.zeros(num, device=device).index_add_(0, root[olds], size[olds])
            merged = internal.clone()
            merged[~is_root] = 0
            merged.scatter_reduce_(0, a, we, reduce='amax')
            internal = torch.zeros(num, device=device).scatter_reduce_(0, root[olds], merged[olds], reduce='amax')
            comp = root[comp]
    return torch.unique(comp, return_inverse=True)[1]


def superpoint_vote(features: torch.Tensor, segments: torch.Tensor, blend: float) -> torch.Tensor:
    """(V, D) float32 features blended with their superpoint's mean direction: each voxel keeps its norm and takes
    the direction of (1 - blend) f_i / |f_i| + blend * m_s / |m_s|, m_s the mean feature of its superpoint s.

    features (V, D); segments (V,) int64 superpoint ids (0..S-1), e.g. from :func:`segment_graph`.
    """
    f = features.float()
    num = int(segments.max()) + 1 if len(segments) else 0
    sums = torch.zeros(num, f.shape[1], device=f.device).index_add_(0, segments, f)
    norm = f.norm(dim=1, keepdim=True)
    mixed = (1 - blend) * f / norm.clamp_min(1e-12) + blend * F.normalize(sums, dim=1)[segments]
    return F.normalize(mixed, dim=1) * norm
