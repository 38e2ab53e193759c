"""Sparse voxel feature map: a growing table of voxels addressed by packed integer keys.

Each occupied voxel owns one row of the map's :class:`~ov3d_ros.core.layer_cake.LayerCake`. Fusion's layers per
row: integer coordinates (the packed key), a running weighted-mean feature (fp16,
averaged in fp32 with the old weight capped at ``max_weight`` so that it keeps following new observations),
the accumulated observation weight, the mean colour, the number of points fused and the feature's norm.
Rows are never reordered by integration; the cake's open-addressing hash table (linear probing, vectorised over all
keys at once, like Open3D's ``HashMap`` or nvblox's block hash) maps keys to rows, so adding voxels costs
O(new voxels) and the map grows without any fixed scene bound (±2^20 voxels per axis, i.e. ±52 km at 5 cm).
"""
from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ov3d_ros.core.layer_cake import KeyIndex, LayerCake, write_rows  # noqa: F401  (KeyIndex re-exported)
from ov3d_ros.core.lifting import CellFeatures
from ov3d_ros.core.query import row_norms

_BITS = 21
_OFFSET = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


def voxel_coords(points: torch.Tensor, voxel_size_m: float) -> torch.Tensor:
    """(N, 3) float points → (N, 3) int64 voxel coordinates (floor(p / voxel_size))."""
    return torch.floor(points / voxel_size_m).to(torch.int64)


def _pack_rows(c: torch.Tensor) -> torch.Tensor:
    """(3, N) int64 voxel coordinates plus ``_OFFSET`` (a temporary of the caller's: it is overwritten) → (N,)
    int64 keys, a view of its first row. The one range test and packing of ``pack_keys`` and ``voxel_keys``;
    raises ValueError if a coordinate is out of range."""
    x, y, z = c[0], c[1], c[2]
    # in range iff no coordinate has a bit above the lowest _BITS set (a negative one has its sign bits set);
    # one OR and one test, several times faster than a min and a max on CPU
    if c.shape[1] and bool(((x | y).bitwise_or_(z) >> _BITS).any()):
        raise ValueError('voxel coordinates out of range (points farther than 2^20 voxels from the origin)')
    return x.bitwise_left_shift_(2 * _BITS).bitwise_or_(y.bitwise_left_shift_(_BITS)).bitwise_or_(z)


def pack_keys(coords: torch.Tensor) -> torch.Tensor:
    """(N, 3) int64 voxel coordinates → (N,) int64 keys (21 bits per axis)."""
    return _pack_rows((coords + _OFFSET).T).contiguous()


def voxel_keys(points: torch.Tensor, voxel_size_m: float) -> torch.Tensor:
    """(N, 3) float points → (N,) int64 packed keys of their voxels: ``pack_keys(voxel_coords(points, ...))``, bit
    for bit, on one (3, N) int64 temporary (a lifted keyframe's points are a (3, N) tensor's transposed view, so
    its rows are contiguous); 76 800 points, one thread: 0.8 against 1.6 ms."""
    return _pack_rows(torch.floor_(points.T / voxel_size_m).to(torch.int64, memory_format=torch.contiguous_format)
                      .add_(_OFFSET))


_RADIX_MIN = 32768
"""Values from which torch's CPU sort of a 1-D integer tensor takes its radix path (``at::internal::GRAIN_SIZE``;
below it, a comparison sort)."""


def _stable_sort(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(values, stable=True)`` of (N,) integer values. On CPU an int32 tensor of ``_RADIX_MIN`` / 2 to
    ``_RADIX_MIN`` values is padded with its dtype's maximum to ``_RADIX_MIN`` (the padding sorts last, stably),
    so that it is radix-sorted: the (voxel, cell block) runs of a keyframe, 28 000-32 000 values, one thread,
    0.30 against 0.64-0.76 ms; int32 radix sorts take about half the time of int64 ones (0.38-0.48 against
    0.80-0.97 ms for 33 000-40 000 runs)."""
    n = values.shape[0]
    if values.device.type == 'cpu' and values.dtype == torch.int32 and _RADIX_MIN // 2 <= n < _RADIX_MIN:
        padded = torch.cat([values, values.new_full((_RADIX_MIN - n,), torch.iinfo(torch.int32).max)])
        ordered, order = torch.sort(padded, stable=True)
        return ordered[:n], order[:n]
    return torch.sort(values, stable=True)


def _unique_inverse(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(values, return_inverse=True)`` for (N,) integer values, through one stable sort: on the
    nearly ordered keys of a raster of points (runs of voxel keys, (voxel, block) pairs) 1.5-1.7x faster on CPU."""
    ordered, order = _stable_sort(values)
    unique, inverse = torch.unique_consecutive(ordered, return_inverse=True)
    return unique, torch.empty_like(inverse).scatter_(0, order, inverse)


def _unique_of_runs(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_unique_inverse` of (N,) integer values whose equal neighbours mostly come in runs (the points of a
    raster): the runs collapse first (no sort of the points), then one stable sort of the runs."""
    runs, run_of = torch.unique_consecutive(values, return_inverse=True)
    unique, of_run = _unique_inverse(runs)
    return unique, of_run.index_select(0, run_of)


def _centers(coords: torch.Tensor, voxel_size_m: float) -> torch.Tensor:
    """(N, 3) int64 voxel coordinates (any strides) → (N, 3) float32 contiguous voxel centres."""
    return coords.to(torch.float32, memory_format=torch.contiguous_format).add_(0.5).mul_(voxel_size_m)


class _Touched(NamedTuple):
    """The voxels that one fusion call touches (V of them, in the order of their keys) and their distinct (voxel,
    group) pairs (P, ordered by voxel, then group)."""

    rows: torch.Tensor                 # (V,) int64 map rows (old and new mixed)
    fresh: int                         # how many of them are new rows
    inv: torch.Tensor                  # (N,) int64 voxel of each point (index into rows)
    point_pair: torch.Tensor           # (N,) int64 pair of each point
    pair_voxel: Optional[torch.Tensor]  # (P,) int64 voxel of each pair, non-decreasing (None: one group, P = V)
    pair_group: Optional[torch.Tensor]  # (P,) int32 or int64 group of each pair (None: one group, P = V)
    coords: Optional[torch.Tensor]      # (3, V) int64 voxel coordinates, where the touch had them (else None)


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys → (N, 3) int64 voxel coordinates."""
    return torch.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK], dim=-1) - _OFFSET


class VoxelFeatureMap:
    """Sparse voxel map of fused D-dimensional features: the fusion integrator over a :class:`LayerCake`.

    Its layers (per row): ``features`` (V, D) float16 (a feature layer), ``weights`` (V,) float32, ``colors``
    (V, 3) float32 RGB, ``counts`` (V,) int32, ``views`` (V, 3) float32 (the weighted mean unit vector towards
    the cameras; zero where no camera centre was given), all persisted, and ``norms`` (V,) float32 (derived from
    the features, not persisted). The attributes of the same names are the layers' (capacity, ...) tensors (rows
    0..size-1 in use); other integrators add their own layers to :attr:`cake`.

    Args:
        voxel_size_m: voxel edge length.
        dim: feature dimension D.
        device: torch device of all tensors.
        capacity: rows allocated up front; doubled when full.
        max_weight: cap on the old weight in the running means of features and colours (0 = no cap, an exact
            mean of every observation); see ``MapConfig.max_weight``. ``weights`` still accumulates all weight.
    """

    FIELDS = ('keys', 'features', 'weights', 'colors', 'counts', 'views')
    """The persisted fusion layers (``norms`` is derived from ``features``)."""
    OPTIONAL = ('views',)
    """Fusion layers that map files written before them lack (:meth:`load_state` fills them with zeros)."""
    FUSE_VALUES = 1024 * 384
    """Float32 values per block of touched voxels whose D-wide means are computed, blended and stored together
    (cell features; FUSE_VALUES // D voxels, 1 024 at D = 384): the float32 means, their fp16 copy and the old rows
    stay near 1.5 MB instead of (v, D) buffers of 20-40 MB per keyframe, which glibc's allocator may map afresh each
    time (its mmap threshold moves with what was freed): page faults, about 3 us each on this host. 120 keyframes at
    640x480, D = 384, one thread: 206 instead of 424-3 217 faults and 20-22 instead of 23-32 ms per keyframe (three
    runs each); 512 / 2 048 / 4 096 rows 21.6 / 20.9 / 21.2 ms. At d = 64 the same bytes are 6 144 voxels, fewer
    blocks of small tensor operations: lifting + fusion of the 15 keyframes of ``bm_compare.py`` 22.2 against
    22.8 ms per keyframe with blocks of 1 024 (medians of six alternating runs in one process, one thread).
    Results bit for bit the same."""

    def __init__(self, voxel_size_m: float, dim: int, device: torch.device | str = 'cpu', capacity: int = 65536,
                 max_weight: float = 0.0):
        if voxel_size_m <= 0:
            raise ValueError(f'voxel_size_m must be > 0, got {voxel_size_m}')
        if not max_weight >= 0:
            raise ValueError(f'max_weight must be >= 0, got {max_weight}')
        self.voxel_size_m = float(voxel_size_m)
        self.device = torch.device(device)
        self.max_weight = float(max_weight)
        self.cake = LayerCake(self.device, capacity)
        self._add_layers(int(dim))

    def _add_layers(self, dim: int) -> None:
        """Declare the fusion layers on the cake (kept as they are when already there)."""
        c = self.cake
        c.add_layer('features', dim, torch.float16, feature=True)
        c.add_layer('weights', 0, torch.float32)
        c.add_layer('colors', 3, torch.float32)
        c.add_layer('counts', 0, torch.int32)
        c.add_layer('views', 3, torch.float32)
        c.add_layer('norms', 0, torch.float32, persist=False)

    keys = property(lambda self: self.cake.keys, doc='(capacity,) int64 packed voxel keys.')
    features = property(lambda self: self.cake['features'], doc='(capacity, D) float16 fused features.')
    weights = property(lambda self: self.cake['weights'], doc='(capacity,) float32 accumulated weights.')
    colors = property(lambda self: self.cake['colors'], doc='(capacity, 3) float32 mean RGB in [0, 255].')
    counts = property(lambda self: self.cake['counts'], doc='(capacity,) int32 points fused per voxel.')
    views = property(lambda self: self.cake['views'], doc='(capacity, 3) float32 mean unit vector to the cameras.')
    norms = property(lambda self: self.cake['norms'], doc='(capacity,) float32 L2 norms of the stored features.')

    @property
    def dim(self) -> int:
        """D, the width of the features layer."""
        return self.cake.specs['features'].width

    @property
    def size(self) -> int:
        return self.cake.size

    @property
    def capacity(self) -> int:
        return self.cake.capacity

    def __len__(self) -> int:
        return self.size

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """(N,) keys → (N,) int64 rows, -1 where the voxel is not in the map."""
        return self.cake.lookup(keys)

    def capped(self, weights: torch.Tensor) -> torch.Tensor:
        """Accumulated ``weights`` (e.g. ``self.weights[rows]``) as the running means count them: capped at
        ``max_weight`` (unchanged when it is 0)."""
        return weights.clamp(max=self.max_weight) if self.max_weight > 0 else weights

    def rows_of(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) int64 rows of the voxels containing (N, 3) points, -1 where the voxel is not in the map."""
        return self.lookup(voxel_keys(points.to(self.device), self.voxel_size_m))

    def feature_norms(self) -> torch.Tensor:
        """(V,) float32 L2 norms of the stored (fp16) features, kept up to date by every write (no recompute)."""
        return self.norms[:self.size]

    def project(self, matrix: torch.Tensor) -> None:
        """Rotate every feature layer of the cake by ``matrix`` (D, d) (f -> f @ matrix): the map's feature
        dimension becomes d; the norms follow."""
        if matrix.shape[0] != self.dim:
            raise ValueError(f'projection is for D={matrix.shape[0]} features, the map has D={self.dim}')
        self.cake.project(matrix)
        for start in range(0, self.size, self.cake.CHUNK):
            stop = min(start + self.cake.CHUNK, self.size)
            self.norms[start:stop] = row_norms(self.features[start:stop])

    def integrate(self, points: torch.Tensor, features: Union[torch.Tensor, CellFeatures],
                  colors: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None,
                  origin: Optional[torch.Tensor] = None, return_point_rows: bool = False
                  ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        """Fuse points into the map.

        Per touched voxel, new = (old * min(W, max_weight) + sum of w f) / (min(W, max_weight) + sum of w), in fp32
        (stored fp16); W, the voxel's accumulated weight, grows by the sum of w. Colours likewise.

        Args:
            points: (N, 3) float world-frame positions (neighbouring points consecutive, e.g. in raster order, make
                it faster but are not required).
            features: (N, D) float features, or ``CellFeatures`` (fused as a weighted running mean).
            colors: (N, 3) float RGB in [0, 255], optional.
            weights: (N,) float per-point weights, default 1.
            origin: (3,) the camera centre in the world frame, optional; the ``views`` layer then follows the
                mean unit vector from each touched voxel towards the cameras that saw it (the side its surface
                faces, which orients normals for the superpoints' convexity test).
            return_point_rows: also return (N,) int64 the row of each point's voxel (what :meth:`rows_of` gives
                after the call, without looking the points up again: 0.05 against 3.2 ms for a 640x480 keyframe at
                stride 2, one thread).
        Returns:
            (V,) int64 rows of the voxels this call touched (sorted, unique), and the point rows when asked.
        """
        n = points.shape[0]
        if n == 0:
            empty = torch.empty(0, dtype=torch.int64, device=self.device)
            return (empty, empty.clone()) if return_point_rows else empty
        dev = self.device
        points = points.to(dev)
        w = None if weights is None else weights.to(dev, torch.float32)
        by_block = isinstance(features, CellFeatures) and features.blocks is not None
        t = self._touch(points, features.blocks.to(dev) if by_block else None,
                        features.block_cells.shape[0] if by_block else 1)
        rows, inv = t.rows, t.inv                  # in the order of the voxels' keys, old and new rows mixed
        v = rows.shape[0]
        count = torch.bincount(inv, minlength=v)
        w_sum = count.float() if w is None else torch.zeros(v, device=dev).index_add_(0, inv, w)
        w_old = self.weights.index_select(0, rows)
        w_eff = self.capped(w_old)
        denom = w_eff + w_sum
        means = self._feature_means(t, features, w, denom)    # (a, b) -> sum of w f / denom of voxels a..b-1
        keep = w_eff / denom                                     # 0 for new rows (their weight is 0)
        # in blocks on CPU (see FUSE_VALUES); on CUDA the caching allocator reuses its buffers: all at once, no syncs
        step = max(1, self.FUSE_VALUES // self.dim) if isinstance(features, CellFeatures) and dev.type == 'cpu' \
            else max(v, 1)
        for a in range(0, v, step):
            b = min(a + step, v)
            mean = means(a, b)
            if t.fresh < v:          # the old features (fp16, read as fp32 by the multiply-add); new rows hold zeros
                mean.addcmul_(self.features.index_select(0, rows[a:b]), keep[a:b, None])
            # stored as fp16, norms of the stored values
            half = mean.to(torch.float16)
            write_rows(self.features, rows[a:b], half)
            self.norms.index_copy_(0, rows[a:b], torch.linalg.vector_norm(mean.copy_(half), dim=1))
        if colors is not None:
            c = colors.to(dev).float()
            c = (c if w is None else c * w[:, None]).T.contiguous()      # summed channel-major: (3, N) -> (3, v)
            self._blend(self.colors, rows, w_eff, torch.zeros(3, v, device=dev).index_add_(1, inv, c).T, denom)
        if origin is not None:        # once per voxel (its centre), weighted by its points like the colours
            u = self.centers(rows) if t.coords is None else _centers(t.coords.T, self.voxel_size_m)
            u = u.neg_().add_(origin.to(dev, torch.float32))
            u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True).clamp_min_(1e-12)
            self._blend(self.views, rows, w_eff, u.mul_(w_sum[:, None]), denom)
        self.weights.index_copy_(0, rows, w_old + w_sum)
        self.counts.index_add_(0, rows, count.to(torch.int32))
        touched = torch.sort(rows).values
        return (touched, rows.index_select(0, inv)) if return_point_rows else touched

    @staticmethod
    def _blend(layer: torch.Tensor, rows: torch.Tensor, w_eff: torch.Tensor, added: torch.Tensor,
               denom: torch.Tensor) -> None:
        """layer[rows] = (layer[rows] * w_eff + added) / denom, per row ((V, 3) layers), with one gather and one
        scatter."""
        layer.index_copy_(0, rows, layer.index_select(0, rows).mul_(w_eff[:, None]).add_(added).div_(denom[:, None]))

    def _touch(self, points: torch.Tensor, group: Optional[torch.Tensor], groups: int) -> _Touched:
        """The voxels of (N, 3) ``points`` and their (voxel, group) pairs (``group`` (N,) int64 in [0, groups),
        e.g. each point's feature cell block; None: one group), appending rows for voxels not yet in the map.

        Voxels are numbered by their offset in the points' bounding box (lexicographic in x, y, z like the packed
        keys, so the order is the same), small enough that a (voxel, group) pair is one integer, int32 where it
        fits: neighbouring points mostly share their pair, so runs of equal pairs collapse first (no sort of the
        points), then one stable sort of the runs orders the pairs by voxel, which gives the distinct voxels too;
        only their keys are packed and looked up. The box comes from the float coordinates (two reductions). The
        15 keyframes of ``bm_compare.py`` (640x480 at stride 2: 76 800 points, 28 000-40 000 runs, about 10 000
        voxels per keyframe), d = 64, one thread, five alternating runs: integration 6.9-7.1 against 8.5-8.9 ms per
        keyframe with a sort of the runs of voxel keys, one of the rows and one of the (row, block) pairs; the map
        bit for bit the same. A box too large for one int64 pair (about 2^62 / groups voxels in volume) numbers the
        voxels by a sort of their packed keys first.
        """
        f = torch.floor_(points.T / self.voxel_size_m)                  # (3, N) float voxel coordinates
        lo_f, hi_f = f.amin(1), f.amax(1)          # on the floats: 0.03 ms against 0.15 as an int64 aminmax
        lo, hi = lo_f.tolist(), hi_f.tolist()
        if not all(-_OFFSET <= a and b < _OFFSET for a, b in zip(lo, hi)):      # NaN and inf fail it too
            raise ValueError('voxel coordinates out of range (points farther than 2^20 voxels from the origin)')
        lo, hi = [int(a) for a in lo], [int(b) for b in hi]
        ey, ez = hi[1] - lo[1] + 1, hi[2] - lo[2] + 1
        box = (hi[0] - lo[0] + 1) * ey * ez
        boxed = box * groups < 1 << 62
        if boxed:           # offsets in the box (exact: integers below 2^21), in int32 where the box allows
            c = f.sub_(lo_f[:, None]).to(torch.int32 if box < 1 << 31 else torch.int64,
                                         memory_format=torch.contiguous_format)
            local = c[0].mul_(ey * ez).add_(c[1].mul_(ez)).add_(c[2])
        else:
            coords = f.to(torch.int64, memory_format=torch.contiguous_format)
            unique_keys, local = _unique_of_runs(_pack_rows(coords.add_(_OFFSET)))
            box = unique_keys.shape[0]
        # int32 pairs where they fit (the usual keyframe: a box of about 60^3 voxels x 1 200 cell blocks): half the
        # bytes, and a radix sort twice as fast as int64's (see _stable_sort)
        pair = local.to(torch.int32 if box * groups < 1 << 31 else torch.int64)
        if group is not None:
            pair = pair.mul_(groups).add_(group.to(pair.dtype))
        pairs, point_pair = _unique_of_runs(pair)
        if group is None:
            voxels, pair_voxel, pair_group = pairs, None, None
        else:
            voxels = torch.div(pairs, groups, rounding_mode='floor')
            pair_group = pairs - voxels * groups
            voxels, pair_voxel = torch.unique_consecutive(voxels, return_inverse=True)
        if boxed:                                 # the voxels' coordinates back from their local keys
            voxels = voxels.long()
            x = torch.div(voxels, ey * ez, rounding_mode='floor')
            yz = voxels - x * (ey * ez)
            y = torch.div(yz, ez, rounding_mode='floor')
            coords = torch.stack([x, y, yz.sub_(y * ez)]).add_(torch.tensor(lo, device=voxels.device)[:, None])
            keys = _pack_rows(coords + _OFFSET)
        else:
            coords, keys = None, unique_keys.index_select(0, voxels)
        before = self.cake.size
        rows = self.cake.insert(keys, unique=True)
        inv = point_pair if group is None else pair_voxel.index_select(0, point_pair)
        return _Touched(rows, self.cake.size - before, inv, point_pair, pair_voxel, pair_group, coords)

    def _feature_means(self, t: _Touched, features, w: Optional[torch.Tensor],
                       denom: torch.Tensor) -> Callable[[int, int], torch.Tensor]:
        """A function (a, b) -> (b - a, D) float32 weighted feature sums of touched voxels a..b-1 (in the order of
        ``t``) divided by their ``denom`` (v,); with ``CellFeatures`` D-wide work once per (voxel, feature cell) and
        only for the voxels asked for (dense features: all v at once, sliced)."""
        dev, v, inv = self.device, t.rows.shape[0], t.inv
        if not isinstance(features, CellFeatures):
            f = features.to(dev).float()
            f_sum = torch.zeros(v, self.dim, device=dev).index_add_(0, inv, f if w is None else f * w[:, None])
            f_sum.div_(denom[:, None])
            return lambda a, b: f_sum[a:b]
        cw = features.weights.to(dev)
        if w is not None:
            cw = cw * w[:, None]
        if features.blocks is not None:           # points of one block share their cells: the touch's pairs
            point_pair, pair_voxel = t.point_pair, t.pair_voxel
            group_cells, pair_group, gw = features.block_cells.to(dev), t.pair_group, cw
        else:                                     # one pair per cell, corner by corner (runs stay long)
            cells = features.cells.to(dev)
            m = features.grid.shape[0]
            group, voxel, gw = cells.T.reshape(-1), inv.repeat(cells.shape[1]), cw.T.reshape(-1, 1)
            group_cells = torch.arange(m, device=dev)[:, None]
            pairs, point_pair = _unique_of_runs(voxel * m + group)
            pair_voxel = torch.div(pairs, m, rounding_mode='floor')
            pair_group = pairs - pair_voxel * m
        # Weights summed per (voxel, group) pair, each voxel's pairs consecutive: the feature means are then one
        # weighted sum of grid rows per voxel (an embedding bag, i.e. a CSR matrix times the grid).
        k = gw.shape[1]                           # summed corner-major: (k, N) rows into (k, pairs)
        pw = torch.zeros(k, pair_voxel.shape[0], device=dev).index_add_(1, point_pair, gw.T.contiguous())
        pw = pw.div_(denom.index_select(0, pair_voxel)).T
        offsets = torch.zeros(v + 1, dtype=torch.int64, device=dev)
        offsets[1:] = torch.cumsum(torch.bincount(pair_voxel, minlength=v) * k, 0)
        cols = group_cells.index_select(0, pair_group).reshape(-1)
        grid, pw = features.grid.to(dev).float(), pw.reshape(-1)

        def means(a: int, b: int) -> torch.Tensor:
            lo, hi = (0, len(cols)) if (a, b) == (0, v) else (int(offsets[a]), int(offsets[b]))
            return F.embedding_bag(cols[lo:hi], grid, offsets[a:b + 1] - lo, mode='sum', per_sample_weights=pw[lo:hi],
                                   include_last_offset=True)
        return means

    def centers(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(V, 3) float32 voxel centres in the world frame (all voxels, or the given rows)."""
        keys = self.keys[:self.size] if rows is None else self.keys[rows]
        return _centers(unpack_keys(keys), self.voxel_size_m)

    def memory_report(self) -> Dict[str, float]:
        """Bytes per voxel row of every layer of the cake (those of other integrators too) and of the hash index."""
        return self.cake.memory_report()

    def bytes_per_voxel(self) -> int:
        """Storage per voxel row (all layers plus the hash index)."""
        return self.cake.bytes_per_voxel()

    def clear(self) -> None:
        """Remove every voxel (keeps the layers and the allocation)."""
        self.cake.clear()

    def state(self) -> Dict[str, torch.Tensor]:
        """The occupied rows of the fusion layers (tensor views, not copies): keys, features, weights, colors,
        counts and views."""
        return {name: self.cake.rows(name) for name in self.FIELDS}

    def load_state(self, state: Dict[str, torch.Tensor], feature: Sequence[str] = ()) -> None:
        """Replace the contents with ``state`` ({layer: (V, ...) tensor}: the fusion layers as returned by
        :meth:`state`, plus any other layers; those in :attr:`OPTIONAL` are zero when absent), ``feature`` naming
        those that are feature layers); validates shapes first. Layers of the cake that ``state`` does not hold are
        dropped."""
        n = int(state['keys'].shape[0]) if 'keys' in state else -1
        expect = {'keys': (n,), 'features': (n, self.dim), 'weights': (n,), 'colors': (n, 3), 'counts': (n,),
                  'views': (n, 3)}
        for name, shape in expect.items():
            if name not in state:
                if name in self.OPTIONAL:
                    continue
                raise ValueError(f'voxel field {name!r} is missing')
            if tuple(state[name].shape) != shape:
                raise ValueError(f'voxel field {name!r} has shape {tuple(state[name].shape)}, expected {shape}')
        dtypes = {'keys': torch.int64, 'features': torch.float16, 'weights': torch.float32, 'colors': torch.float32,
                  'counts': torch.int32, 'views': torch.float32}
        state = {k: v.to(dtypes[k]) if k in dtypes else v for k, v in state.items()}
        self.cake.load_state(state, feature=('features',) + tuple(feature))
        self._add_layers(self.dim)
        self.norms[:n] = row_norms(self.features[:n])

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (sorted unique int64), compacted to rows 0..len-1 in that order (evicts the rest),
        in every layer of the cake."""
        self.cake.keep(rows)

    def share_fusion(self) -> 'VoxelFeatureMap':
        """A map over the same fusion layers (same tensors, see :meth:`LayerCake.share`) with a cake of its own
        for other layers; neither map may integrate or evict afterwards."""
        out = VoxelFeatureMap.__new__(VoxelFeatureMap)
        out.voxel_size_m, out.device, out.max_weight = self.voxel_size_m, self.device, self.max_weight
        out.cake = self.cake.share(self.FIELDS + ('norms',))
        return out

    def copy(self, names: Sequence[str] = ()) -> 'VoxelFeatureMap':
        """A map of its own over copies of the rows in use of ``keys``, the named layers and the index
        (:meth:`LayerCake.copy`): a read-only picture for queries that later integration, eviction or compression
        of this map never changes. Layers not named are absent from it (their attributes raise KeyError)."""
        out = VoxelFeatureMap.__new__(VoxelFeatureMap)
        out.voxel_size_m, out.device, out.max_weight = self.voxel_size_m, self.device, self.max_weight
        out.cake = self.cake.copy(names)
        return out

