"""Superpoints: a label-free over-segmentation of the voxel map from geometry and colour, and feature voting
within each superpoint.

Geometry-guided pooling (:mod:`.pooling`) averages over a 2-voxel neighbourhood; errors that cover a whole part
of an object (a 2D model that calls the back of a chair "table" in every view) are too large for it to outvote.
Superpoints are regions of similar normal and colour, the usual unit of 3D open-vocabulary methods (ScanNet's
mesh segmentation, SAI3D, Open3DIS): each voxel's purified feature is blended with the mean over its superpoint.

The segmentation is Felzenszwalb-Huttenlocher's graph criterion on the 26-connected voxel graph (edge weight =
normal disagreement 1 - |n_i . n_j|, scaled down where the surface is convex, + RGB distance / 255; objects meet
their supports in concave creases, while their own edges are convex): two regions merge over an edge when its
weight is at most both regions' internal difference + ``k`` / size. It runs in Borůvka rounds (every region takes its
cheapest outgoing edge at once), vectorised in torch, the same on CPU and CUDA, so the cost is a few passes
over the edges rather than a sequential union-find. Neither the features nor any label are read.
Superpoints may be kept inside fixed cubes of ``block_vox`` voxels a side (:func:`block_ids`): cubes are then
independent, so after a keyframe only the cubes it changed are segmented and voted again (:mod:`.pooling`).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ov3d_ros.core.layer_cake import write_rows
from ov3d_ros.core.purification.graph import cube_offsets, neighbour_rows, row_positions
from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys, unpack_keys


def block_ids(vmap: VoxelFeatureMap, rows: torch.Tensor, block_vox: int) -> torch.Tensor:
    """(R,) int64 key of the ``block_vox``-sided cube of voxels that holds each of ``rows`` (the superpoint blocks;
    stable under compaction and growth of the map, like the voxel keys)."""
    return pack_keys(torch.div(unpack_keys(vmap.keys.index_select(0, rows)), int(block_vox), rounding_mode='floor'))


def voxel_edges(vmap: VoxelFeatureMap, normals: torch.Tensor, rows: Optional[torch.Tensor] = None,
                block_vox: int = 0, convex: float = 1.0) -> tuple:
    """The 26-connected voxel graph over ``rows`` (default all ``vmap.size`` rows), each edge once.

    normals (capacity or V, 3) unit normals by row. ``rows``: sorted unique int64 rows; every edge from one of them
    is kept, so ``rows`` must hold every neighbour they have in the graph (the whole map, or whole blocks).
    ``block_vox`` > 0 keeps only edges inside one block (:func:`block_ids`). Edges come in the order (row, offset),
    so a subset of rows lists its edges in the same relative order as the whole map (ties break alike).
    ``convex`` scales the normal term of convex edges (:func:`convex_edges`; 1 = no distinction).
    Returns (i (E,), j (E,) int64 rows, w (E,) float32 weights: 1 - |n_i . n_j| (x ``convex`` where convex) +
    |rgb_i - rgb_j| / 255).
    """
    rows = torch.arange(vmap.size, device=vmap.device) if rows is None else rows
    offsets = cube_offsets(1, vmap.device)[1:]
    half = offsets[(offsets[:, 0] > 0) | ((offsets[:, 0] == 0) & (offsets[:, 1] > 0)) |
                   ((offsets[:, 0] == 0) & (offsets[:, 1] == 0) & (offsets[:, 2] > 0))]   # 13 of 26
    nbr = neighbour_rows(vmap, rows, half)
    if block_vox > 0:
        # a unit step leaves the block only from its first or last layer along an axis: one bit per (axis, side)
        # for each row and each offset, and the neighbour is in the row's block when they share none (no (R, 13, 3)
        # divisions: 41 276 rows about 2 against 14-37 ms on one thread)
        r = torch.remainder(unpack_keys(vmap.keys.index_select(0, rows)), block_vox)        # (R, 3)
        axis = torch.tensor([1, 2, 4], device=rows.device)
        edge = ((r == 0).long() * axis).sum(1) | ((r == block_vox - 1).long() * axis * 8).sum(1)
        leaves = ((half == -1).long() * axis).sum(1) | ((half == 1).long() * axis * 8).sum(1)    # (13,)
        nbr = torch.where((edge[:, None] & leaves[None, :]) == 0, nbr, -1)
    ok = nbr >= 0
    i, j = rows[:, None].expand_as(nbr)[ok], nbr[ok]
    nrm, col = normals.float(), vmap.colors
    n_i, n_j = nrm.index_select(0, i), nrm.index_select(0, j)      # (E, 3) gathers: index_select, not nrm[i]
    w = 1 - (n_i * n_j).sum(1).abs()
    if convex != 1.0 and 'views' in vmap.cake:
        step = half.float()[None].expand(len(rows), -1, -1)[ok]            # (E, 3) from voxel i to voxel j
        w = torch.where(convex_edges(n_i, n_j, vmap.views.index_select(0, i), vmap.views.index_select(0, j), step),
                        w * convex, w)
    return i, j, w + (col.index_select(0, i).float() - col.index_select(0, j).float()).norm(dim=1) / 255.0


def convex_edges(n_i: torch.Tensor, n_j: torch.Tensor, v_i: torch.Tensor, v_j: torch.Tensor,
                 step: torch.Tensor) -> torch.Tensor:
    """(E,) bool: whether the surface bends outwards (convex, a ridge) between voxels i and j.

    n_i, n_j (E, 3) unit normals of either orientation; v_i, v_j (E, 3) the voxels' directions towards the cameras
    that saw them (the map's ``views`` layer), which orient each normal to the side its surface was seen from;
    step (E, 3) from voxel i to voxel j. With outward normals the surface is convex where they diverge along the
    step, (n_j - n_i) . step > 0, the local convexity criterion of LCCP (Stein et al., CVPR 2014): the edges of
    a box or a table top are convex, the lines where an object meets the floor or a wall, and the corners of a room
    seen from inside, are concave. Voxels without a view direction (maps written before it) have no orientation
    and their edges count as not convex.
    """
    o_i = n_i * torch.sign((n_i * v_i).sum(1, keepdim=True))
    o_j = n_j * torch.sign((n_j * v_j).sum(1, keepdim=True))
    return ((o_j - o_i) * step).sum(1) > 0


def segment_rows(vmap: VoxelFeatureMap, normals: torch.Tensor, rows: Optional[torch.Tensor], k: float,
                 min_size: int, block_vox: int = 0, convex: float = 1.0) -> torch.Tensor:
    """(R,) int64 superpoint index (0..S-1) of each of ``rows`` (sorted unique; default all rows): the
    :func:`segment_graph` of their :func:`voxel_edges`. With ``block_vox`` > 0 superpoints never cross a block, so
    the superpoints of whole blocks come out the same whether segmented alone or with the whole map."""
    rows = torch.arange(vmap.size, device=vmap.device) if rows is None else rows
    i, j, w = voxel_edges(vmap, normals, rows, block_vox, convex)
    if len(rows) < vmap.size:       # edge ends as indices into rows (all rows: they already are), by a table over
        # map rows rather than a binary search (a keyframe's 166 552 edges into 41 276 rows: 0.5 against 11 ms)
        local = row_positions(rows, vmap.size)
        i, j = local.index_select(0, i), local.index_select(0, j)
    return segment_graph(len(rows), i, j, w, k, min_size)


def _relabel(parent: torch.Tensor) -> torch.Tensor:
    """Follow ``parent`` pointers to their roots (pointer jumping)."""
    while True:
        nxt = parent.index_select(0, parent)
        if torch.equal(nxt, parent):
            return parent
        parent = nxt


def _union(num: int, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(num,) root labels of the connected components of the graph with edges (a, b) over ``num`` nodes
    (label propagation to the smallest index, with pointer jumping)."""
    label = torch.arange(num, device=a.device)
    while True:
        m = torch.minimum(label.index_select(0, a), label.index_select(0, b))
        new = label.clone()
        new.scatter_reduce_(0, a, m, reduce='amin')
        new.scatter_reduce_(0, b, m, reduce='amin')
        new = _relabel(torch.minimum(new, new.index_select(0, new)))
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
    i, j, w = i.index_select(0, order), j.index_select(0, order), w.index_select(0, order).float()
    comp = torch.arange(num, device=device)           # node -> its region's root node
    size = torch.ones(num, dtype=torch.float32, device=device)       # valid at roots
    internal = torch.zeros(num, dtype=torch.float32, device=device)  # valid at roots: largest merged edge
    for small_pass in (False, True):
        if small_pass and min_size <= 1:
            break
        while True:       # (index_select and one nonzero per filter: boolean masks are several times slower)
            ci, cj = comp.index_select(0, i), comp.index_select(0, j)
            live = torch.nonzero(ci != cj).flatten()          # edges inside a region: done
            if len(live) == 0:
                break
            if len(live) < len(w):
                i, j, w, ci, cj = (t.index_select(0, live) for t in (i, j, w, ci, cj))
            rank = torch.arange(len(w), device=device)   # still in weight order
            best = _cheapest(ci, cj, rank, num)
            chosen = torch.nonzero((best.index_select(0, ci) == rank) | (best.index_select(0, cj) == rank)).flatten()
            a, b, we = ci.index_select(0, chosen), cj.index_select(0, chosen), w.index_select(0, chosen)
            sa, sb = size.index_select(0, a), size.index_select(0, b)
            if small_pass:
                accept = (sa < min_size) | (sb < min_size)
            else:
                accept = (we <= internal.index_select(0, a) + k / sa) & (we <= internal.index_select(0, b) + k / sb)
            accept = torch.nonzero(accept).flatten()
            if len(accept) == 0:
                break
            a, b, we = a.index_select(0, accept), b.index_select(0, accept), we.index_select(0, accept)
            root = _union(num, a, b)                  # old root -> new root (identity elsewhere)
            is_root = comp == torch.arange(num, device=device)
            olds = torch.nonzero(is_root).flatten()
            to = root.index_select(0, olds)
            size = torch.zeros(num, device=device).index_add_(0, to, size.index_select(0, olds))
            merged = torch.where(is_root, internal, 0.0)
            merged.scatter_reduce_(0, a, we, reduce='amax')
            internal = torch.zeros(num, device=device).scatter_reduce_(0, to, merged.index_select(0, olds),
                                                                       reduce='amax')
            comp = root.index_select(0, comp)
    return torch.unique(comp, return_inverse=True)[1]


def superpoint_vote(features: torch.Tensor, segments: torch.Tensor, blend: float, dtype: Optional[torch.dtype] = None,
                    chunk: int = 2048, weights: Optional[torch.Tensor] = None,
                    out: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
                    norms: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(V, D) features blended with their superpoint's mean direction: each voxel keeps its norm and takes the
    direction of (1 - blend) f_i / |f_i| + blend * m_s / |m_s|, m_s the mean feature of its superpoint s
    (weighted by ``weights`` (V,), e.g. the voxels' fusion weights; default: each voxel once).

    features (V, D) any float dtype; segments (V,) int64 superpoint ids (0..S-1), e.g. from :func:`segment_graph`.
    The result has ``dtype`` (default float32); it is computed ``chunk`` rows at a time in float32, so no (V, D)
    float32 temporary is made (at 1 M x 384 those cost more in page faults than the arithmetic). 2 048 rows (3 MB
    of float32 at D = 384) stay near the cache: 41 276 x 384 fp16 features on one thread 30 ms against 49 ms at
    8 192 rows (same values: each row's arithmetic does not depend on the chunk). ``out``: a (V, D) tensor (e.g. a
    slice of a layer) to write the result into, instead of a new one of ``dtype``; it must not overlap ``features``.
    ``rows``: (R,) int64 rows of ``features`` and ``out`` (both then whole layers, e.g. the map's purified and
    voted layers; ``out`` required) to vote, with segments and weights (R,): each chunk is gathered and written
    back in place, so no (R, D) copy is made. ``norms``: a float32 tensor laid out like ``out``'s rows ((V,), or a
    whole layer with ``rows``) that takes the results' L2 norms, free: the norm each result is given (its input's,
    in float32), which its conversion to ``out``'s dtype changes only by that dtype's rounding (fp16: relative
    1e-3 at most; :func:`~ov3d_ros.core.query.row_norms` of 41 000 stored rows costs about 6 ms). Returns
    ``out``.
    """
    d = features.shape[1]
    if rows is None:
        v = features.shape[0]
        if out is None:
            out = torch.empty(v, d, dtype=dtype or torch.float32, device=features.device)
        elif out.shape != features.shape:
            raise ValueError(f'superpoint_vote: out must be {tuple(features.shape)}, got {tuple(out.shape)}')
    else:
        v = rows.shape[0]
        if out is None or out.shape[1] != d:
            raise ValueError(f'superpoint_vote: rows need out, a layer of width {d}')

    def take(lo: int, copy: bool = False) -> torch.Tensor:          # (chunk, D) float32 features of a chunk
        if rows is None:
            return features[lo:lo + chunk].to(torch.float32, copy=copy)
        return features.index_select(0, rows[lo:lo + chunk]).float()    # a new tensor either way

    if v == 0:
        return out
    num = int(segments.max()) + 1
    sums = torch.zeros(num, d, device=features.device)
    for lo in range(0, v, chunk):
        f = take(lo, copy=weights is not None)                     # scaled in place, not the input
        if weights is not None:
            f.mul_(weights[lo:lo + chunk, None].float())
        sums.index_add_(0, segments[lo:lo + chunk], f)
    means = F.normalize(sums, dim=1).mul_(blend)                   # blend * m_s / |m_s|, once per superpoint
    for lo in range(0, v, chunk):
        f = take(lo)
        norm = f.norm(dim=1, keepdim=True)
        mixed = torch.addcmul(means.index_select(0, segments[lo:lo + chunk]), f, (1 - blend) / norm.clamp_min(1e-12))
        mixed.mul_(norm / mixed.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if rows is None:
            out[lo:lo + chunk] = mixed
        else:
            write_rows(out, rows[lo:lo + chunk], mixed.to(out.dtype))
        if norms is not None:           # the norm each result was given (no pass over the stored values)
            if rows is None:
                norms[lo:lo + chunk] = norm.squeeze(1)
            else:
                norms.index_copy_(0, rows[lo:lo + chunk], norm.squeeze(1))
    return out
