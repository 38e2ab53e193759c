"""Geometry-guided pooling (GeoPurify inference), online on a growing voxel map.

Every voxel i averages the features of its neighbourhood N(i) (occupied voxels within ``radius_vox``) with
affinity weights A_ij = softmax_j(logit_ij) (rows sum to 1), T times: F <- A F. Logits come from a learned
student embedding (scale * cosine) or, without a checkpoint, from colour, normal and distance differences.

Online (``mode='incremental'``), a keyframe that touched voxels T refreshes exactly what whole-map pooling would
compute differently:
  * normals of every voxel within ``radius_vox`` of a voxel added since (their neighbourhood gained it), and
    within ``radius_vox`` of T after voxels were dropped;
  * learned affinity: embeddings of every voxel within the student's receptive field (``context_vox``, e.g. 9
    voxels for a stem and 4 residual blocks of 3x3x3 convs) of a changed input, computed by running the student
    on those voxels plus a context ring of the same width and keeping only the inner outputs;
  * affinities of every voxel within ``radius_vox`` of a changed normal, colour or embedding;
and re-pools those voxels plus ``margin_vox`` more, starting from their raw fused features; neighbours outside
that set contribute their current purified features (the one remaining approximation). The cost per keyframe
follows the touched region dilated by these radii, not the map size. ``mode='whole'`` re-pools everything at
once (the offline reference). Pooling is a sparse CSR product (:class:`PoolMatrix`, the same on CPU and CUDA),
by default on the features' component in the map's top ``pool_dim`` principal directions only (the rest of each
feature is kept as fused; pooling is linear, so that is exact for features inside that subspace).
"""
from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ov3d_ros.core.compression import FeatureProjection
from ov3d_ros.core.config import PurifyConfig
from ov3d_ros.core.layer_cake import LayerCake, write_rows
from ov3d_ros.core.purification.graph import (NeighbourTable, ball_offsets, ball_region, connected_dilation,
                                              estimate_normals, neighbour_rows, offset_deltas, union_rows,
                                              with_room)
from ov3d_ros.core.purification.superpoints import block_ids, segment_rows, superpoint_vote
from ov3d_ros.core.query import row_norms
from ov3d_ros.core.voxel_map import VoxelFeatureMap

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')

EmbedFn = Callable[[VoxelFeatureMap, torch.Tensor, torch.Tensor], torch.Tensor]
"""(map, rows (R,), normals (R, 3)) -> (R, E) unit embeddings of those voxels (the learned affinity)."""


def _layout(vmap: VoxelFeatureMap) -> tuple:
    """Which cake the map's rows are in and how often they were moved or dropped since it was made (its epoch):
    state kept per row holds while this stays the same and only rows are added. A projection of the features
    (compression) moves no row: normals, neighbour tables and superpoints survive it."""
    return id(vmap.cake), vmap.cake.epoch


def _coordinates(vmap: VoxelFeatureMap) -> tuple:
    """:func:`_layout` and how often the feature coordinates turned (the cake's basis epoch): what was fitted to
    the fused features holds while this stays the same."""
    return _layout(vmap) + (vmap.cake.basis_epoch,)


class _BasisFit(NamedTuple):
    """The pooling subspace of :meth:`GeometryPooling._pool_basis` and when it was fitted."""
    projection: FeatureProjection
    size: int          # map rows at the fit
    updates: int       # updates that used it
    layout: tuple      # :func:`_coordinates` at the fit


def fallback_logits(colors: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, nbr: torch.Tensor,
                    cfg: PurifyConfig) -> torch.Tensor:
    """(R, M) affinity logits from colour (RGB), normal and distance differences; -inf for missing neighbours.

    colors (V, 3) and normals (V, 3) are indexed by map rows; nbr (R, M) holds rows (column 0 = the voxel).
    """
    valid = nbr >= 0                                   # computed on present neighbours only
    j, i = nbr[valid], nbr[:, :1].expand_as(nbr)[valid]
    dc = (colors[j] - colors[i]).square().sum(-1) / (2 * cfg.sigma_color ** 2)
    dn = (1 - (normals[j] * normals[i]).sum(-1).abs()) / cfg.sigma_normal
    dd = offsets.to(nbr.device).float().square().sum(-1).expand(nbr.shape)[valid] / (2 * cfg.sigma_distance_vox ** 2)
    out = torch.full(nbr.shape, -torch.inf, dtype=torch.float32, device=nbr.device)
    out[valid] = -(dc + dn + dd)
    return out


def embedding_logits(emb: torch.Tensor, nbr: torch.Tensor, scale: float,
                     matrix: Optional['PoolMatrix'] = None) -> torch.Tensor:
    """(R, M) logits scale * cos(e_i, e_j) from unit embeddings emb (V, E) indexed by rows; -inf if missing.

    nbr (R, M): neighbour rows, column 0 the voxels themselves (unique). ``matrix``: the :class:`PoolMatrix` of
    these rows and ``nbr``, whose local indexing the dot products reuse (built here when None).
    """
    cos = (PoolMatrix(nbr[:, 0], nbr) if matrix is None else matrix).edge_dots(emb)
    return torch.where(nbr >= 0, scale * cos, torch.full_like(cos, -torch.inf))


@functools.lru_cache(maxsize=1)
def _l2_cache_bytes() -> int:
    """Per-core L2 cache of CPU 0 in bytes, from Linux sysfs; 0 where it cannot be read."""
    for index in sorted(Path('/sys/devices/system/cpu/cpu0/cache').glob('index*')):
        try:
            if (index / 'level').read_text().strip() == '2' and \
                    (index / 'type').read_text().strip() in ('Unified', 'Data'):
                size = (index / 'size').read_text().strip().upper()
                scale = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}.get(size[-1:], 1)
                return int(size.rstrip('KMG')) * scale
        except (OSError, ValueError):
            return 0
    return 0


class PoolMatrix:
    """The pooling step F_rows <- W F_nbr as a CSR matrix over a local universe: ``rows`` first (local index i is
    rows[i]), then the other neighbours (held fixed). Its pattern is built once per neighbour table; it serves the
    edge dot products of the learned affinity (:meth:`edge_dots`), takes the weights (:meth:`set_weights`) and
    is applied to any number of channels (:meth:`apply`).

    Args:
        rows: (R,) unique map rows to pool.
        nbr: (R, M) neighbour rows (-1 missing), column 0 the voxel itself.
        weights: (R, M) weights (rows sum to 1), or None to give them later with :meth:`set_weights`.
        check: verify the CSR invariants (for tests).
        scratch: optional int32 tensor of -1 with a slot per map row (at least 1 + the largest row in ``rows`` and
            ``nbr``), used for the local numbering and left all -1 again: a caller that keeps one from keyframe to
            keyframe saves filling a map-sized table per matrix (3.9 MB at 968 000 rows).

    Attributes:
        universe: (U,) int64 map rows, ``rows`` first.
        matrix: (R, U) float32 sparse CSR W (None before the weights are set), column indices sorted and unique
            within each row. CUDA pools with its sparse-dense product; CPU runs the same pattern and values as an
            embedding bag (see :meth:`_iterate`).
    """

    CHUNK_BY_L2 = ((1 << 20, 64), (0, 32))
    """Feature columns pooled together on CPU, by the per-core L2 cache (bytes at least, columns): the pooling is
    column-wise, and all T iterations run over one slice of columns with two (U, columns) float32 buffers. Which
    width wins depends on the cache: on an AMD EPYC with 512 KB of L2 per core 32 columns did (medians of 5
    interleaved runs on a 17 476-row keyframe at D = 384: 301 vs 332 ms for 64 on one thread, 151 vs 208 ms on
    two; 16 and 24 columns 351 / 314 and 198 / 162 ms); on an Intel Xeon with 2 MB, 64 columns do (the T = 18
    products of an 18 900-row keyframe, medians of 3-5 runs in three processes: 24-30 vs 29-35 ms at the default
    64-d subspace on one thread, 16.1 vs 16.5 ms on two; 155-161 vs 188-201 ms at D = 384, 83 vs 99 ms on two; 16
    columns slower at 64-d, 96, 128 and all 384 at D = 384). At most :attr:`ONE_SLICE` columns (the default 64-d
    pooling subspace) are pooled in one slice whatever the cache: on the AMD EPYC (512 KB; a later session, 16 482
    pooled rows of 16 977, T = 18) 64 columns at once took 17.3-17.8 against 19.8-20.4 ms for two
    slices of 32 on one thread, 12.0-12.3 against 16.6-17.8 ms on two (at D = 384 the same day: 32 columns
    101-108 against 110-144 ms for 64 on one thread, 57-82 against 50-73 on two). The slicing does not change the
    arithmetic of any column (bit-identical results)."""

    ONE_SLICE = 64
    """Feature columns up to which CPU pooling takes them all in one slice, whatever :attr:`CHUNK_BY_L2` says."""

    @staticmethod
    def cpu_chunk() -> int:
        """Feature columns per slice on CPU for this machine's L2 cache (:attr:`CHUNK_BY_L2`)."""
        l2 = _l2_cache_bytes()
        return next(columns for least, columns in PoolMatrix.CHUNK_BY_L2 if l2 >= least)

    def __init__(self, rows: torch.Tensor, nbr: torch.Tensor, weights: Optional[torch.Tensor] = None,
                 check: bool = False, scratch: Optional[torch.Tensor] = None):
        R, M = nbr.shape
        dev = nbr.device
        valid = nbr >= 0
        # local numbering: rows first (pooled rows are then a leading slice), then the other neighbours, sorted;
        # a lookup table over map rows instead of a unique over every (row, neighbour) pair
        V = 1 + int(max(rows.max(), nbr.max())) if R else 0
        # int32 while it fits: the table spans the map's rows (at 968 k rows, 3.9 instead of 7.7 MB to fill)
        if scratch is not None and V <= len(scratch) < 2 ** 31 and scratch.dtype == torch.int32:
            lut = scratch
        else:
            lut = torch.full((V,), -1, dtype=torch.int32 if V < 2 ** 31 else torch.int64, device=dev)
        lut.index_copy_(0, rows, torch.arange(R, dtype=lut.dtype, device=dev))
        if not torch.equal(lut.index_select(0, rows), torch.arange(R, dtype=lut.dtype, device=dev)):
            lut.index_fill_(0, rows, -1)
            raise ValueError('PoolMatrix: rows must be unique')
        local_nbr = lut.index_select(0, nbr.clamp_min(0).reshape(-1)).view(R, M)
        outside = valid & (local_nbr < 0)
        out_rows = nbr.masked_select(outside)
        ext = union_rows(V, out_rows)
        lut.index_copy_(0, ext, R + torch.arange(len(ext), dtype=lut.dtype, device=dev))
        local_nbr.masked_scatter_(outside, lut.index_select(0, out_rows))
        self.universe = torch.cat([rows, ext])
        U = len(self.universe)
        if lut is scratch:
            lut.index_fill_(0, self.universe, -1)
        local_nbr.masked_fill_(~valid, U)                        # missing neighbours sort last
        # int32 indices (half the index traffic of every product: about 15 % faster on CPU) while they fit; the
        # row-wise sort too (9.4 against 12.8 ms for 18 900 x 33)
        index = torch.int32 if max(U, R * M) < 2 ** 31 else torch.int64
        local_nbr, self._order = torch.sort(local_nbr.to(index), dim=1)
        keep = local_nbr < U
        self._kept = torch.nonzero(keep.view(-1)).squeeze(1)     # flat (row, slot) positions of the entries
        self._crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), keep.sum(1).cumsum(0)]).to(index)
        self._col = local_nbr.view(-1).index_select(0, self._kept)
        self._check, self.rows, self.matrix = check, rows, None
        if weights is not None:
            self.set_weights(weights)

    def _csr(self, values: torch.Tensor) -> torch.Tensor:
        R, U = len(self.rows), len(self.universe)
        return torch.sparse_csr_tensor(self._crow, self._col, values, size=(R, U), check_invariants=self._check)

    def set_weights(self, weights: torch.Tensor) -> None:
        """Take (R, M) weights laid out like ``nbr`` (rows sum to 1) as the values of :attr:`matrix`."""
        self.matrix = self._csr(weights.float().gather(1, self._order).view(-1).index_select(0, self._kept))

    def edge_dots(self, emb: torch.Tensor) -> torch.Tensor:
        """(R, M) float32 dot products e_i . e_j of each row's embedding with each neighbour's, laid out like
        ``nbr`` (0 where missing), from emb (V, E) indexed by map rows: one sampled dense product over the
        pattern, without an (R, M, E) gather."""
        e = emb.index_select(0, self.universe).float()
        zero = torch.zeros(len(self._col), dtype=torch.float32, device=e.device)
        dots = torch.sparse.sampled_addmm(self._csr(zero), e[:len(self.rows)], e.T.contiguous(), beta=0.0).values()
        by_column = torch.zeros(self._order.shape, dtype=torch.float32, device=e.device)
        by_column.view(-1).index_copy_(0, self._kept, dots)
        return torch.empty_like(by_column).scatter_(1, self._order, by_column)

    def apply(self, features: torch.Tensor, outside: torch.Tensor, iterations: int,
              basis: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Run ``iterations`` steps from ``features`` (R, K) (start values of ``rows``); ``outside`` (>= V, K): the
        values of the other neighbours. Returns (R, K) of ``dtype`` (computed in float32).

        ``basis`` (K, k) orthonormal columns: pool only the features' component in their span, f Q, and keep the
        rest: f + (pool(f Q) - f Q) Q^T (pooling is linear, so this equals full pooling for features inside the
        span; k / K of its products)."""
        R, K = features.shape
        if int(iterations) <= 0:
            return features.to(dtype, copy=True)
        start = outside.index_select(0, self.universe[R:])
        if basis is None:
            return self._iterate(features, start, iterations).to(dtype)
        out = torch.empty(R, K, dtype=dtype, device=features.device)

        def write(r: int, values: torch.Tensor) -> None:
            out[r:r + len(values)] = values

        self._subspace(lambda r, buf: buf.copy_(features[r:r + len(buf)]), write, R, K, start, iterations, basis)
        return out

    def pool_rows(self, source: torch.Tensor, layer: torch.Tensor, iterations: int,
                  basis: Optional[torch.Tensor] = None) -> None:
        """``layer[rows]`` <- :meth:`apply` from ``source[rows]``, with the other neighbours' values read from
        ``layer`` (before any write). source (V, K) and layer (>= V, K) are indexed by map rows; results are stored
        in ``layer``'s dtype. With ``basis`` the source rows are gathered, and the results written, a block of
        :attr:`PROJECT_ROWS` rows at a time: no (R, K) copy of either (at R = 18 900, D = 384, 14.5 MB each, which
        a fresh allocation page-faults in)."""
        R, K = len(self.rows), source.shape[1]
        if basis is None or int(iterations) <= 0:
            write_rows(layer, self.rows, self.apply(source.index_select(0, self.rows), layer, iterations,
                                                    dtype=layer.dtype))
            return
        start = layer.index_select(0, self.universe[R:])
        step = min(R, self.PROJECT_ROWS)
        gathered = torch.empty(step, K, dtype=source.dtype, device=source.device)
        half = torch.empty(step, K, dtype=layer.dtype, device=source.device)

        def read(r: int, buf: torch.Tensor) -> torch.Tensor:
            n = len(buf)
            return buf.copy_(torch.index_select(source, 0, self.rows[r:r + n], out=gathered[:n]))

        def write(r: int, values: torch.Tensor) -> None:
            write_rows(layer, self.rows[r:r + len(values)], half[:len(values)].copy_(values))

        self._subspace(read, write, R, K, start, iterations, basis)

    def _subspace(self, read: Callable[[int, torch.Tensor], torch.Tensor], write: Callable[[int, torch.Tensor], None],
                  R: int, K: int, start: torch.Tensor, iterations: int, basis: torch.Tensor) -> None:
        """Pooling in the span of ``basis`` (see :meth:`apply`): ``read(r, buf)`` fills the float32 (n, K) ``buf``
        with rows r..r+n-1's features and returns it; ``write(r, values)`` takes their (n, K) float32 results."""
        # the two (R, K) x (K, k) products a block of rows at a time through one float32 buffer: no (R, K)
        # float32 copies (at R = 18 900, D = 384 they cost as much as the products, mostly in page faults)
        step = self.PROJECT_ROWS
        buf = torch.empty(min(R, step), K, dtype=torch.float32, device=start.device)
        inside = torch.empty(R, basis.shape[1], dtype=torch.float32, device=start.device)
        for r in range(0, R, step):
            torch.mm(read(r, buf[:min(R - r, step)]), basis, out=inside[r:r + step])
        delta = self._iterate(inside, start.float() @ basis, iterations).sub_(inside)
        for r in range(0, R, step):
            write(r, read(r, buf[:min(R - r, step)]).addmm_(delta[r:r + step], basis.T))

    PROJECT_ROWS = 1024
    """Rows per block of the subspace projections (:meth:`apply`, :meth:`pool_rows`): 1 024 x 384 float32 stay near
    the cache (18 900 x 384 fp16 features, one thread: 32 ms against 52 ms for whole-matrix products; 512-4 096
    within 2 ms)."""

    def _iterate(self, features: torch.Tensor, start: torch.Tensor, iterations: int) -> torch.Tensor:
        """``iterations`` products from features (R, K), with the other neighbours' values ``start`` (U - R, K)."""
        R, K = features.shape
        cpu = features.device.type == 'cpu'
        step = (K if K <= self.ONE_SLICE else self.cpu_chunk()) if cpu else max(K, 1)
        out = torch.empty(R, K, dtype=torch.float32, device=features.device)
        if cpu:
            # The CSR product as a weighted embedding bag over the same pattern, each row's entries summed in
            # column order as the sparse product does (bit for bit the same on bm_pooling.py's keyframe), plus one
            # entry of weight 1 for each held-fixed neighbour (U - R rows that copy themselves): each step makes
            # the whole next (U, columns) table, with neither the product's zero fill of its output nor a copy
            # into a double buffer. T = 18 products of that 18 900-row keyframe at 64 columns, one thread: 15 ms
            # against 25-27 ms for the sparse product.
            U = len(self.universe)
            col = torch.cat([self._col, torch.arange(R, U, dtype=self._col.dtype, device=self._col.device)])
            crow = torch.cat([self._crow, self._crow[-1] + torch.arange(1, U - R + 1, dtype=self._crow.dtype,
                                                                       device=self._crow.device)])
            weights = torch.cat([self.matrix.values(), torch.ones(U - R, device=features.device)])
        for c in range(0, K, step):
            x = torch.cat([features[:, c:c + step].float(), start[:, c:c + step].float()])
            if cpu:
                for _ in range(int(iterations)):
                    x = F.embedding_bag(col, x, crow, mode='sum', per_sample_weights=weights, include_last_offset=True)
            else:
                y = x.clone()                                      # double buffer: rows R.. stay fixed in both
                for _ in range(int(iterations)):
                    y[:R] = self.matrix @ x
                    x, y = y, x
            out[:, c:c + step] = x[:R]
        return out


def pool(features: torch.Tensor, rows: torch.Tensor, nbr: torch.Tensor, weights: torch.Tensor,
         outside: torch.Tensor, iterations: int, check: bool = False) -> torch.Tensor:
    """Run ``iterations`` steps of F_rows <- W F_nbr; returns (R, D) float32 pooled features of ``rows``.

    features (R, D): start values of ``rows`` (unique); nbr (R, M) neighbour rows (-1 missing) and weights (R, M)
    (rows sum to 1); outside (V, D): values used for neighbours that are not in ``rows`` (held fixed).
    One :class:`PoolMatrix` (``check``: verify its CSR invariants, for tests).
    """
    return PoolMatrix(rows, nbr, weights, check).apply(features, outside, iterations)


def receptive_field_vox(net: Optional[torch.nn.Module]) -> int:
    """How far (in 26-connected voxel steps) a sparse 3D conv network's outputs depend on its inputs: the sum of
    (kernel - 1) / 2 * dilation over its 3D convolutions (exact for a chain of submanifold convs with residual
    connections, an upper bound otherwise); 0 for None."""
    if net is None:
        return 0
    r = 0
    for mod in net.modules():
        k = getattr(mod, 'kernel_size', None)
        if k is None or not type(mod).__name__.endswith('Conv3d'):
            continue
        k = list(k) if isinstance(k, (list, tuple)) else [k] * 3
        d = getattr(mod, 'dilation', 1)
        d = list(d) if isinstance(d, (list, tuple)) else [d] * 3
        r += max((kk - 1) // 2 * dd for kk, dd in zip(k, d))
    return r


LAYERS = ('purified', 'normals', 'embeddings', 'voted', 'voted_norms', 'superpoint_block')
"""The layers purification keeps on the map's cake: purified (V, D) float16 (a feature layer, so compression
rotates it: pooling is linear), normals (V, 3) float32, embeddings (V, E) float16 (learned affinity only);
with the superpoint vote voted (V, D) float16, its rows' L2 norms voted_norms (V,) float32 (what queries divide
by, written with the rows) and superpoint_block (V,) int64 (none saved: re-voted)."""


class GeometryPooling:
    """Purified features for every map row, kept up to date keyframe by keyframe, in layers of the map's cake
    (:data:`LAYERS`; eviction and compression reach them through the cake).

    Args:
        cfg: purification config.
        embed: the learned affinity's embedding function, or None for the fallback affinity.
        context_vox: receptive field of ``embed`` in 26-connected voxel steps; by default read from the network
            when ``embed`` is a bound method of a torch module (:func:`receptive_field_vox`).
    """

    def __init__(self, cfg: PurifyConfig, embed: Optional[EmbedFn] = None, context_vox: Optional[int] = None):
        if cfg.affinity not in ('learned', 'fallback'):
            raise ValueError(f"purify.affinity must be 'learned' or 'fallback', got {cfg.affinity!r}")
        if cfg.affinity == 'learned' and embed is None:
            raise ValueError('purify.affinity learned needs a student network (purify.checkpoint)')
        if cfg.pool_dim < 0:
            raise ValueError(f'purify.pool_dim must be >= 0 (0 = every feature dimension), got {cfg.pool_dim}')
        if cfg.mode not in ('incremental', 'whole'):
            raise ValueError(f"purify.mode must be 'incremental' or 'whole', got {cfg.mode!r}")
        if not (cfg.superpoint_k >= 0 and 0 <= cfg.superpoint_blend <= 1 and cfg.superpoint_min_vox >= 0
                and cfg.superpoint_block_vox >= 0 and 0 <= cfg.superpoint_convex <= 1):
            raise ValueError('purify.superpoint_k must be >= 0, superpoint_blend and superpoint_convex in [0, 1], '
                             'superpoint_min_vox and superpoint_block_vox >= 0, got '
                             f'{cfg.superpoint_k}, {cfg.superpoint_blend}, {cfg.superpoint_convex}, '
                             f'{cfg.superpoint_min_vox}, {cfg.superpoint_block_vox}')
        self.cfg, self.embed = cfg, embed if cfg.affinity == 'learned' else None
        if context_vox is None:
            owner = getattr(self.embed, '__self__', None)
            context_vox = receptive_field_vox(owner if isinstance(owner, torch.nn.Module) else None)
        self.context_vox = int(context_vox) if self.embed is not None else 0
        self.offsets: Optional[torch.Tensor] = None
        self.cake: Optional[LayerCake] = None          # the map's layers this purifier writes (set by update)
        self.timings_s = {}
        # the superpoint vote's 'voted' layer: what it was made for, rows it covers, blocks re-pooled since
        self._vote_state: Optional[tuple] = None
        self._normals_state: Optional[tuple] = None     # (_layout of the map, rows with current normals)
        self._table: Optional[tuple] = None             # (_layout of the map, NeighbourTable of incremental updates)
        self._basis: Optional[_BasisFit] = None
        self._scratch: Optional[torch.Tensor] = None    # PoolMatrix's row numbering, kept between updates (all -1)
        self._voted_size = 0
        self._norms_basis: Optional[int] = None          # the cake's basis epoch its voted_norms were computed at
        self._vote_pending: list = []
        self._vote_all = True

    def _layer(self, name: str) -> Optional[torch.Tensor]:
        return None if self.cake is None else self.cake.get(name)

    purified = property(lambda self: self._layer('purified'),
                        doc='(capacity, D) float16 purified features of every map row, or None before an update.')
    normals = property(lambda self: self._layer('normals'), doc='(capacity, 3) float32 voxel normals, or None.')
    embeddings = property(lambda self: self._layer('embeddings'),
                          doc='(capacity, E) float16 student embeddings (learned affinity only), or None.')

    def _bind(self, vmap: VoxelFeatureMap) -> None:
        """Declare this purifier's layers on the map's cake (kept when already there, e.g. loaded from a file)."""
        self.cake = vmap.cake
        if self.offsets is None:
            self.offsets = ball_offsets(self.cfg.radius_vox, vmap.device)
        self.cake.add_layer('purified', vmap.dim, torch.float16, feature=True)
        self.cake.add_layer('normals', 3, torch.float32)

    def update(self, vmap: VoxelFeatureMap, touched: Optional[torch.Tensor] = None,
               channels: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()) -> int:
        """Re-pool after fusion touched ``touched`` rows (or the whole map in 'whole' mode / when None).

        ``channels``: more per-voxel values pooled with the same affinities, as (raw (V, K), pooled (>= V, K))
        pairs aligned with map rows; ``pooled`` is written in place. Returns the number of re-pooled voxels.
        """
        t0 = time.perf_counter()
        n = vmap.size
        if n == 0:
            return 0
        self._bind(vmap)
        whole = touched is None or self.cfg.mode == 'whole'
        if not whole and len(touched) == 0:             # a keyframe that added no point changes nothing
            return 0
        if whole:
            rows = torch.arange(n, device=vmap.device)
            nbr = neighbour_rows(vmap, rows, self.offsets)
            self.normals.index_copy_(0, rows, estimate_normals(nbr, self.offsets))
            embedded = rows
            if self.embed is not None:
                self._store_embeddings(self.embed(vmap, rows, self.normals.index_select(0, rows)), rows)
        else:
            rows, nbr, embedded = self._refresh(vmap, touched)
        # PoolMatrix numbers rows in a kept all -1 table with a slot per map row, grown by doubling like the
        # neighbour table's column; taken while in use, so an error on the way leaves none half-filled behind
        scratch, self._scratch = self._scratch, None
        if scratch is None or scratch.device != vmap.device:
            scratch = torch.empty(0, dtype=torch.int32, device=vmap.device)
        old = len(scratch)
        scratch = with_room(scratch, old, n)
        scratch[old:] = -1
        op = PoolMatrix(rows, nbr, scratch=scratch)
        self._scratch = scratch
        if self.embed is not None:
            logits = embedding_logits(self.embeddings, nbr, self.cfg.scale, op)
        else:
            logits = fallback_logits(vmap.colors, self.normals, self.offsets, nbr, self.cfg)
        op.set_weights(torch.softmax(logits, dim=1))
        t1 = time.perf_counter()
        basis = self._pool_basis(vmap, whole)
        op.pool_rows(vmap.features, self.purified, self.cfg.iterations, basis)
        for raw, out in channels:
            op.pool_rows(raw, out, self.cfg.iterations)
        if whole:
            self._normals_state = (_layout(vmap), torch.ones(n, dtype=torch.bool, device=vmap.device))
        self.timings_s = {'affinity': t1 - t0, 'pooling': time.perf_counter() - t1, 'voxels': len(rows),
                          'embedded': len(embedded) if self.embed is not None else 0}
        if whole or not self.votes or self.reads_whole_map:
            self._vote_all = True
        else:       # re-pooled rows cover every voxel whose colour, normal or purified feature changed
            self._vote_pending.append(torch.unique(block_ids(vmap, rows, self.cfg.superpoint_block_vox)))
        return len(rows)

    BASIS_SAMPLES = 2048
    """Map rows (evenly spaced) whose fused features fit the pooling subspace."""
    BASIS_GROWTH, BASIS_EVERY = 1.25, 32
    """Incremental mode refits the subspace once the map has grown by this factor since the last fit, after this
    many updates, and when the map's rows or feature coordinates changed (compression, load, eviction past
    :meth:`keep`: the cake's epochs); whole-map pooling refits it every time."""

    def _pool_basis(self, vmap: VoxelFeatureMap, whole: bool) -> Optional[torch.Tensor]:
        """(D, pool_dim) orthonormal basis of the pooling subspace (``cfg.pool_dim``): the top uncentred principal
        directions of the map's fused features, from :attr:`BASIS_SAMPLES` rows; None to pool every dimension."""
        k, n = self.cfg.pool_dim, vmap.size
        if k <= 0 or k >= vmap.dim:
            self._basis = None
            return None
        fit, layout = self._basis, _coordinates(vmap)
        if (whole or fit is None or fit.layout != layout or fit.projection.in_dim != vmap.dim
                or fit.projection.out_dim != k or n >= self.BASIS_GROWTH * fit.size or fit.updates >= self.BASIS_EVERY):
            sample = torch.linspace(0, n - 1, min(n, self.BASIS_SAMPLES), device=vmap.device).round().long()
            fit = _BasisFit(FeatureProjection.fit(vmap.features[sample], min(k, len(sample))), n, 0, layout)
        self._basis = fit._replace(updates=fit.updates + 1)
        return fit.projection.matrix

    def _current_normals(self, vmap: VoxelFeatureMap, table: NeighbourTable) -> torch.Tensor:
        """(V,) bool: map rows whose stored normal is that of their present neighbourhood; kept from update to
        update while the cake's rows are only appended to (rows added since lose it, and so does every voxel in
        their ball), and none after its rows moved or were dropped (the cake's epoch counts that)."""
        n, state = vmap.size, self._normals_state
        current = torch.zeros(n, dtype=torch.bool, device=vmap.device)
        if state is not None and state[0] == _layout(vmap) and len(state[1]) <= n:
            old = len(state[1])
            current[:old] = state[1]
            if old < n:
                added = torch.arange(old, n, device=vmap.device)
                current.index_fill_(0, ball_region(vmap, added, self.offsets, table), False)
        self._normals_state = (_layout(vmap), current)
        return current

    def _store_embeddings(self, emb: torch.Tensor, rows: torch.Tensor) -> None:
        """Write (R, E) embeddings of ``rows`` into the embeddings layer (declared on first use)."""
        write_rows(self.cake.add_layer('embeddings', emb.shape[1], torch.float16), rows, emb.to(torch.float16))

    TABLE_ROWS = 1 << 17
    """Rows whose neighbours incremental updates keep looked up from one keyframe to the next (consecutive
    keyframes revisit most of a region of about 30 000 voxels); the table starts over beyond this many (2^17 rows
    of a radius-2 ball: 35 MB)."""

    def _neighbour_table(self, vmap: VoxelFeatureMap) -> NeighbourTable:
        """The neighbour table of the last update, extended by the rows appended since, or a new one when the
        map's rows moved or were dropped (its :func:`_layout` changed) or it holds :attr:`TABLE_ROWS` rows."""
        kept, layout = self._table, _layout(vmap)
        if (kept is not None and kept[0] == layout and kept[1].vmap is vmap and kept[1].size <= vmap.size
                and kept[1].used <= self.TABLE_ROWS):
            table = kept[1]
            table.extend()
        else:
            table = NeighbourTable(vmap, self.offsets)
        self._table = (layout, table)
        return table

    def _refresh(self, vmap: VoxelFeatureMap, touched: torch.Tensor):
        """Incremental mode: bring normals and embeddings up to date around ``touched`` and pick the voxels to
        re-pool. Returns (rows to re-pool (R,), their neighbour table (R, M), rows whose embedding was refreshed)."""
        touched = torch.unique(touched)
        table = self._neighbour_table(vmap)           # each voxel's neighbours looked up once
        # the voxels within radius_vox of a touched voxel: their affinity inputs (colour, feature, normal) may
        # have changed
        changed = embedded = ball_region(vmap, touched, self.offsets, table)
        # a normal depends only on which voxels of its ball are occupied: only voxels in the ball of a voxel added
        # since they last got one, and those whose neighbours may have been dropped since, need a new one
        current = self._current_normals(vmap, table)
        renormal = changed[~current[changed]]
        if len(renormal):
            self.normals.index_copy_(0, renormal, estimate_normals(table(renormal), self.offsets))
            current.index_fill_(0, renormal, True)
        if self.embed is not None:
            # the student's inputs (occupancy, colour, normal; the fused feature for a student that reads it)
            # changed only at the touched voxels and the new normals; outputs within the receptive field (rf) of a
            # changed input change, and computing them exactly needs their own rf as context: run on those
            # + 2 rf, keep those + rf
            inputs = union_rows(vmap.size, touched, renormal)
            ctx, hops = connected_dilation(vmap, inputs, 2 * self.context_vox, table)
            emb = self.embed(vmap, ctx, self.normals.index_select(0, ctx))
            inner = hops <= self.context_vox
            embedded = ctx[inner]
            self._store_embeddings(emb[inner], embedded)
            changed = embedded
        # affinities change for every voxel whose neighbourhood holds a changed voxel; pool them plus a margin
        rows = ball_region(vmap, changed, self.offsets, table)
        if self.cfg.margin_vox > 0:
            rows = connected_dilation(vmap, rows, self.cfg.margin_vox, table)[0]
        return rows, table(rows), embedded

    @property
    def votes(self) -> bool:
        """Whether superpoint voting is on (``superpoint_k`` > 0 and ``superpoint_blend`` > 0)."""
        return self.cfg.superpoint_k > 0 and self.cfg.superpoint_blend > 0

    @property
    def reads_whole_map(self) -> bool:
        """Whether the first read after a keyframe works over the whole map: whole-map pooling (``mode: whole``) or
        a superpoint vote over the whole map (``superpoint_block_vox: 0``). Readers then best read lazily, once
        after any number of keyframes; otherwise a read costs what the keyframe changed."""
        return self.cfg.mode == 'whole' or (self.votes and self.cfg.superpoint_block_vox <= 0)

    def superpoints(self, vmap: VoxelFeatureMap) -> torch.Tensor:
        """(V,) int64 superpoint index of every map row (reads the map's normals layer: after an update, or restored
        with a loaded map)."""
        c = self.cfg
        return segment_rows(vmap, vmap.cake.get('normals'), None, c.superpoint_k, c.superpoint_min_vox,
                            c.superpoint_block_vox, c.superpoint_convex)

    def keep(self, vmap: VoxelFeatureMap, rows: torch.Tensor) -> None:
        """Compact ``vmap`` to ``rows`` (sorted, unique), as :meth:`VoxelFeatureMap.keep` does (eviction), carrying
        what incremental updates keep over to the kept rows instead of starting over:

        - the superpoint vote: superpoints stay inside cubes, so only the cubes that lose voxels are segmented and
          voted again at the next read, and the result still equals a vote over the whole map;
        - the normals: a kept voxel's normal stays current unless a dropped voxel was in its ball;
        - the neighbour table: renumbered to the kept rows, dropped neighbours marked unoccupied;
        - the pooling subspace, refitted on its own schedule (:attr:`BASIS_EVERY` updates, :attr:`BASIS_GROWTH`).

        Without this (or with that state out of date) the next update and read start over, as after a load."""
        c, cake, layout = self.cfg, vmap.cake, _layout(vmap)
        rows = rows.to(vmap.device)
        n = vmap.size
        dropped = torch.nonzero(torch.ones(n, dtype=torch.bool, device=vmap.device).index_fill_(0, rows, False))
        dropped = dropped.flatten()
        vote = (self.votes and c.superpoint_block_vox > 0 and not self._vote_all and self._vote_state is not None
                and self._vote_state[0] == layout and 'voted' in cake and 'superpoint_block' in cake)
        if vote:
            if len(dropped):
                self._vote_pending.append(torch.unique(block_ids(vmap, dropped, c.superpoint_block_vox)))
            voted = int((rows < self._voted_size).sum())       # kept rows stay in order: the voted ones first
        table = self._table[1] if self._table is not None and self._table[0] == layout and \
            self._table[1].vmap is vmap and self._table[1].size == n else None
        current = None                          # rows whose normal is current, in the old numbering
        if self._normals_state is not None and self._normals_state[0] == layout and self.offsets is not None:
            # takes in rows added since the last update
            current = self._current_normals(vmap, table if table is not None else NeighbourTable(vmap, self.offsets))
            dropped_keys = vmap.keys.index_select(0, dropped)
        basis = self._basis is not None and self._basis.layout == _coordinates(vmap)
        vmap.keep(rows)
        layout = _layout(vmap)
        if basis:                               # a statistic of the features: refitted on its own schedule
            self._basis = self._basis._replace(layout=_coordinates(vmap))
        if vote:
            self._vote_state = (layout,) + self._vote_state[1:]
            self._voted_size = voted
        if current is not None:
            current = current.index_select(0, rows)
            if len(dropped):                    # the kept voxels that had a dropped one in their ball
                near = vmap.lookup((dropped_keys[:, None] + offset_deltas(self.offsets)[None, :]).reshape(-1))
                current.index_fill_(0, near[near >= 0], False)
            self._normals_state = (layout, current)
        else:
            self._normals_state = None
        if table is not None:
            table.keep(rows)
            self._table = (layout, table)
        else:
            self._table = None

    def features(self, vmap: VoxelFeatureMap) -> torch.Tensor:
        """(V, D) purified features of all map rows (the raw ones before the first update): the pooled features,
        with superpoint voting (:attr:`votes`) their blend with their superpoint's mean (the ``voted`` layer,
        brought up to date here: the blocks re-pooled since the last call, or the whole map)."""
        purified = vmap.cake.get('purified')
        if purified is None:
            return vmap.features[:vmap.size]
        if not self.votes or vmap.size == 0:
            return purified[:vmap.size]
        self._vote(vmap)
        return vmap.cake['voted'][:vmap.size]

    def feature_norms(self, vmap: VoxelFeatureMap) -> Optional[torch.Tensor]:
        """(V,) float32 L2 norms of :meth:`features`, kept with them rather than computed per query: the fused
        features' norms before the first update; with the superpoint vote the ``voted_norms`` layer, the norm the
        vote gave each row (within fp16 rounding of :func:`~ov3d_ros.core.query.row_norms` of the stored row),
        written with the voted rows and recomputed after a rotation of the feature coordinates; None without the
        vote (pooled features only: callers compute them)."""
        if vmap.cake.get('purified') is None:
            return vmap.feature_norms()
        if not self.votes:
            return None
        if vmap.size == 0:
            return torch.empty(0, dtype=torch.float32, device=vmap.device)
        self._vote(vmap)
        return vmap.cake['voted_norms'][:vmap.size]

    def _vote(self, vmap: VoxelFeatureMap) -> None:
        """Bring the ``voted`` layer up to date. Superpoints stay inside blocks of ``superpoint_block_vox`` voxels,
        so only the blocks holding a re-pooled voxel are segmented and voted again, and the result equals a vote
        over the whole map; a changed map layout (eviction, projection, load), changed settings, whole-map pooling
        or ``superpoint_block_vox: 0`` (superpoints over the whole map) vote over the whole map."""
        c, n, cake = self.cfg, vmap.size, vmap.cake
        block = c.superpoint_block_vox
        state = (_layout(vmap), vmap.dim, c.superpoint_k, c.superpoint_blend, c.superpoint_min_vox, block,
                 c.superpoint_weighted, c.superpoint_convex)
        voted = cake.get('voted')
        new_layer = voted is None or cake.specs['voted'].width != vmap.dim
        if state != self._vote_state or new_layer or 'voted_norms' not in cake:
            self._vote_all = True
        if not self._vote_all and not self._vote_pending and self._voted_size == n:
            self._renorm(cake, n)
            return
        self._vote_all = self._vote_all or block <= 0
        t0 = time.perf_counter()
        if new_layer:
            cake.remove_layer('voted')
            cake.remove_layer('voted_norms')
            voted = cake.add_layer('voted', vmap.dim, torch.float16, persist=False, feature=True)
        norms = cake.add_layer('voted_norms', 0, torch.float32, persist=False)
        if block > 0:           # each row's block key, kept as a layer (computed once per row)
            have = 0 if self._vote_all or 'superpoint_block' not in cake else self._voted_size
            keys = cake.add_layer('superpoint_block', 0, torch.int64, persist=False)
            keys[have:n] = block_ids(vmap, torch.arange(have, n, device=vmap.device), block)
        if self._vote_all:
            rows = torch.arange(n, device=vmap.device)
        else:
            fresh = keys[self._voted_size:n]                  # rows added without an update
            blocks = torch.unique(torch.cat(self._vote_pending + [fresh]))
            at = torch.searchsorted(blocks, keys[:n]).clamp_max(len(blocks) - 1)
            rows = torch.nonzero(blocks[at] == keys[:n]).flatten()
        segments = segment_rows(vmap, cake['normals'], rows, c.superpoint_k, c.superpoint_min_vox, block,
                                c.superpoint_convex)
        # capped as fusion counts them (a voxel a parked camera keeps seeing cannot take over its superpoint)
        weights = vmap.capped(vmap.weights.index_select(0, rows)) if c.superpoint_weighted else None
        # read the purified layer and write the voted one in place, chunk by chunk (no (R, D) copies)
        if self._vote_all:
            superpoint_vote(cake['purified'][:n], segments, c.superpoint_blend, weights=weights, out=voted[:n],
                            norms=norms[:n])
            self._norms_basis = cake.basis_epoch
        else:
            superpoint_vote(cake['purified'], segments, c.superpoint_blend, weights=weights, out=voted, rows=rows,
                            norms=norms)
        self._vote_state, self._voted_size, self._vote_pending, self._vote_all = state, n, [], False
        self._renorm(cake, n)
        self.timings_s['superpoints'] = time.perf_counter() - t0
        self.timings_s['superpoint_voxels'] = len(rows)

    def _renorm(self, cake: LayerCake, n: int) -> None:
        """Recompute the ``voted_norms`` of every voted row after the feature coordinates turned (compression
        rotates the voted layer in place, which changes its rows' norms; the cake's basis epoch counts it)."""
        if self._norms_basis != cake.basis_epoch:
            cake['voted_norms'][:n] = row_norms(cake['voted'][:n])
            self._norms_basis = cake.basis_epoch
