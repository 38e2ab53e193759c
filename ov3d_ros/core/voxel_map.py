"""Sparse voxel feature map: a growing table of voxels addressed by packed integer keys.

Each occupied voxel owns one row. Per row: integer coordinates, a running weighted-mean feature (fp16,
averaged in fp32 with the old weight capped at ``max_weight`` so that it keeps following new observations),
the accumulated observation weight, the mean colour, the number of points fused and the feature's norm.
Rows are never reordered by integration; an open-addressing hash table (linear probing, vectorised over all
keys at once, like Open3D's ``HashMap`` or nvblox's block hash) maps keys to rows, so adding voxels costs
O(new voxels) and the map grows without any fixed scene bound (±2^20 voxels per axis, i.e. ±52 km at 5 cm).
"""
from __future__ import annotations

import warnings
from typing import Dict, Optional, Tuple, Union

import torch

from ov3d_ros.core.lifting import CellFeatures

_BITS = 21
_OFFSET = 1 << (_BITS - 1)
_MASK = (1 << _BITS) - 1


def voxel_coords(points: torch.Tensor, voxel_size_m: float) -> torch.Tensor:
    """(N, 3) float points → (N, 3) int64 voxel coordinates (floor(p / voxel_size))."""
    return torch.floor(points / voxel_size_m).to(torch.int64)


def pack_keys(coords: torch.Tensor) -> torch.Tensor:
    """(N, 3) int64 voxel coordinates → (N,) int64 keys (21 bits per axis)."""
    c = coords + _OFFSET
    if bool(((c < 0) | (c > _MASK)).any()):
        raise ValueError('voxel coordinates out of range (points farther than 2^20 voxels from the origin)')
    return (c[:, 0] << (2 * _BITS)) | (c[:, 1] << _BITS) | c[:, 2]


def unpack_keys(keys: torch.Tensor) -> torch.Tensor:
    """(N,) int64 keys → (N, 3) int64 voxel coordinates."""
    return torch.stack([(keys >> (2 * _BITS)) & _MASK, (keys >> _BITS) & _MASK, keys & _MASK], dim=-1) - _OFFSET


_HASH_MUL = -7046029254386353131      # 0x9E3779B97F4A7C15 as a signed int64 (Fibonacci hashing)


class KeyIndex:
    """Open-addressing hash table from packed voxel keys to map rows: linear probing, every operation vectorised
    over all its keys at once (works the same on CPU and CUDA; no sort, O(keys) per call).

    The table stores int32 rows (-1 = empty slot); the key of an occupied slot is read from the map's key column,
    so the index costs 4 bytes per slot. Slots are a power of two; keep at most half of them occupied.

    Args:
        slots: minimum number of slots (rounded up to a power of two).
        device: torch device of the table.
    """

    def __init__(self, slots: int, device: torch.device):
        self.bits = max(4, (int(slots) - 1).bit_length())
        self.table = torch.full((1 << self.bits,), -1, dtype=torch.int32, device=device)

    @property
    def slots(self) -> int:
        return self.table.numel()

    def _home(self, keys: torch.Tensor) -> torch.Tensor:
        return ((keys * _HASH_MUL) >> (64 - self.bits)) & (self.slots - 1)

    def find(self, keys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
        """(N,) int64 keys → (N,) int64 rows, -1 where absent. ``row_keys``: (capacity,) the map's key column."""
        out = torch.full_like(keys, -1)
        idx, slot, k = None, self._home(keys), keys
        while k.numel():
            r = self.table[slot].long()
            occupied = r >= 0
            hit = occupied & (row_keys[r.clamp_min(0)] == k)
            if idx is None:                       # first probe: most keys resolve here, no compaction needed
                out = torch.where(hit, r, out)
                idx = torch.arange(len(keys), device=keys.device)
            else:
                out[idx[hit]] = r[hit]
            go = occupied & ~hit                  # occupied by another key: probe the next slot
            idx, slot, k = idx[go], (slot[go] + 1) & (self.slots - 1), k[go]
        return out

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Add (N,) unique int64 ``keys`` that are not in the table yet, mapping to (N,) distinct ``rows``."""
        slot, r = self._home(keys), rows.to(torch.int32)
        while r.numel():
            free = self.table[slot] < 0
            self.table[slot[free]] = r[free]      # keys racing for one slot: one of them wins it
            lost = self.table[slot] != r
            slot, r = (slot[lost] + 1) & (self.slots - 1), r[lost]

    def clear(self) -> None:
        self.table.fill_(-1)


class VoxelFeatureMap:
    """Sparse voxel map of fused D-dimensional features.

    Args:
        voxel_size_m: voxel edge length.
        dim: feature dimension D.
        device: torch device of all tensors.
        capacity: rows allocated up front; doubled when full.
        max_weight: cap on the old weight in the running means of features and colours (0 = no cap, an exact
            mean of every observation); see ``MapConfig.max_weight``. ``weights`` still accumulates all weight.
    """

    FIELDS = ('keys', 'features', 'weights', 'colors', 'counts')
    """The persisted per-row fields (``norms`` is derived from ``features``)."""

    def __init__(self, voxel_size_m: float, dim: int, device: torch.device | str = 'cpu', capacity: int = 65536,
                 max_weight: float = 0.0):
        if voxel_size_m <= 0:
            raise ValueError(f'voxel_size_m must be > 0, got {voxel_size_m}')
        if not max_weight >= 0:
            raise ValueError(f'max_weight must be >= 0, got {max_weight}')
        self.voxel_size_m = float(voxel_size_m)
        self.dim = int(dim)
        self.device = torch.device(device)
        self.max_weight = float(max_weight)
        self.size = 0
        self._alloc(max(16, int(capacity)))

    def _alloc(self, capacity: int) -> None:
        """(Re)allocate every row field for ``capacity`` rows, keeping rows 0..size-1, and rebuild the index."""
        dev, old = self.device, getattr(self, 'keys', None)
        new = dict(keys=torch.zeros(capacity, dtype=torch.int64, device=dev),
                   features=torch.zeros(capacity, self.dim, dtype=torch.float16, device=dev),
                   weights=torch.zeros(capacity, dtype=torch.float32, device=dev),
                   colors=torch.zeros(capacity, 3, dtype=torch.float32, device=dev),
                   counts=torch.zeros(capacity, dtype=torch.int32, device=dev),
                   norms=torch.zeros(capacity, dtype=torch.float32, device=dev))
        for name, tensor in new.items():
            if old is not None:
                tensor[:self.size] = getattr(self, name)[:self.size]
            setattr(self, name, tensor)
        self._index = KeyIndex(2 * capacity, dev)
        self._reindex()

    def _reindex(self) -> None:
        """Rebuild the hash index of rows 0..size-1."""
        self._index.clear()
        self._index.insert(self.keys[:self.size], torch.arange(self.size, device=self.device))

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def __len__(self) -> int:
        return self.size

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """(N,) keys → (N,) int64 rows, -1 where the voxel is not in the map."""
        if self.size == 0:
            return torch.full_like(keys, -1)
        return self._index.find(keys.to(self.device), self.keys)

    def rows_of(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) int64 rows of the voxels containing (N, 3) points, -1 where the voxel is not in the map."""
        return self.lookup(pack_keys(voxel_coords(points.to(self.device), self.voxel_size_m)))

    def feature_norms(self) -> torch.Tensor:
        """(V,) float32 L2 norms of the stored (fp16) features, kept up to date by every write (no recompute)."""
        return self.norms[:self.size]

    def _set_features(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        """Store (M, D) float ``values`` as fp16 at ``rows`` and update their norms."""
        half = values.to(torch.float16)
        self.features[rows] = half
        self.norms[rows] = half.float().norm(dim=1)         # of the stored values: the same after a reload

    def project(self, matrix: torch.Tensor) -> None:
        """Replace every feature f by f @ matrix (D, d): the map's feature dimension becomes d."""
        if matrix.shape[0] != self.dim:
            raise ValueError(f'projection is for D={matrix.shape[0]} features, the map has D={self.dim}')
        out = torch.zeros(self.capacity, matrix.shape[1], dtype=torch.float16, device=self.device)
        out[:self.size] = (self.features[:self.size].float() @ matrix.to(self.device).float()).to(torch.float16)
        self.features, self.dim = out, int(matrix.shape[1])
        self.norms[:self.size] = out[:self.size].float().norm(dim=1)

    def integrate(self, points: torch.Tensor, features: Union[torch.Tensor, CellFeatures],
                  colors: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fuse points into the map.

        Per touched voxel, new = (old * min(W, max_weight) + sum of w f) / (min(W, max_weight) + sum of w), in fp32
        (stored fp16); W, the voxel's accumulated weight, grows by the sum of w. Colours likewise.

        Args:
            points: (N, 3) float world-frame positions (neighbouring points consecutive, e.g. in raster order, make
                it faster but are not required).
            features: (N, D) float features, or ``CellFeatures`` (fused as a weighted running mean).
            colors: (N, 3) float RGB in [0, 255], optional.
            weights: (N,) float per-point weights, default 1.
        Returns:
            (V,) int64 rows of the voxels this call touched (sorted, unique).
        """
        n = points.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        dev = self.device
        points = points.to(dev)
        w = None if weights is None else weights.to(dev, torch.float32)
        keys = pack_keys(voxel_coords(points, self.voxel_size_m))
        # Neighbouring points mostly share a voxel: look each run of equal keys up once (no sort of the points).
        run_keys, run_of = torch.unique_consecutive(keys, return_inverse=True)
        rows, voxel_of_run = torch.unique(self._rows_for(run_keys), return_inverse=True)    # touched voxels
        inv = voxel_of_run[run_of]                                                         # (N,) into rows
        v = rows.shape[0]
        ones = torch.ones(n, device=dev)
        w_sum = torch.zeros(v, device=dev).index_add_(0, inv, ones if w is None else w)
        f_sum = self._feature_sums(v, inv, features, w)
        w_old = self.weights[rows]
        w_eff = w_old.clamp(max=self.max_weight) if self.max_weight > 0 else w_old
        denom = (w_eff + w_sum)[:, None]
        self._set_features(rows, self.features[rows].float().mul_(w_eff[:, None]).add_(f_sum).div_(denom))
        if colors is not None:
            c = colors.to(dev).float()
            c_sum = torch.zeros(v, 3, device=dev).index_add_(0, inv, c if w is None else c * w[:, None])
            self.colors[rows] = (self.colors[rows] * w_eff[:, None] + c_sum) / denom
        self.weights[rows] = w_old + w_sum
        self.counts[rows] += torch.bincount(inv, minlength=v).to(torch.int32)
        return rows

    def _feature_sums(self, v: int, inv: torch.Tensor, features, w: Optional[torch.Tensor]) -> torch.Tensor:
        """(v, D) float32 weighted feature sums per touched voxel; D-wide work once per (voxel, feature cell)."""
        if not isinstance(features, CellFeatures):
            f = features.to(self.device).float()
            return torch.zeros(v, self.dim, device=self.device).index_add_(0, inv, f if w is None else f * w[:, None])
        # Weights summed per (voxel, cell) pair: corner by corner, runs of neighbouring points sharing the pair are
        # collapsed first (no sort), then the remaining pairs sorted once; the sorted pairs are a valid CSR matrix
        # S (v, M) (columns sorted and unique within each row) and the sums are S @ grid.
        m, dev = features.grid.shape[0], self.device
        cw = features.weights.to(dev)
        if w is not None:
            cw = cw * w[:, None]
        pair = (inv[None, :] * m + features.cells.to(dev).T).reshape(-1)          # (4N,) corner-major
        run_pair, run_of = torch.unique_consecutive(pair, return_inverse=True)
        run_w = torch.zeros(run_pair.shape[0], device=dev).index_add_(0, run_of, cw.T.reshape(-1))
        upair, pinv = torch.unique(run_pair, return_inverse=True)
        pw = torch.zeros(upair.shape[0], device=dev).index_add_(0, pinv, run_w)
        crow = torch.zeros(v + 1, dtype=torch.int64, device=dev)
        crow[1:] = torch.cumsum(torch.bincount(upair // m, minlength=v), 0)
        with torch.sparse.check_sparse_tensor_invariants(False), warnings.catch_warnings():
            warnings.simplefilter('ignore', UserWarning)                          # "CSR support is in beta"
            S = torch.sparse_csr_tensor(crow, upair % m, pw, (v, m))
        return S @ features.grid.to(dev).float()

    def _rows_for(self, keys: torch.Tensor) -> torch.Tensor:
        """(N,) rows of ``keys`` (repeats allowed), appending rows for keys not yet in the map."""
        rows = self.lookup(keys)
        missing = rows < 0
        if bool(missing.any()):
            new_keys, of_new = torch.unique(keys[missing], return_inverse=True)
            n_new = new_keys.shape[0]
            if self.size + n_new > self.capacity:
                cap = self.capacity
                while cap < self.size + n_new:
                    cap *= 2
                self._alloc(cap)
            new_rows = torch.arange(self.size, self.size + n_new, device=self.device)
            self.keys[new_rows] = new_keys
            self._index.insert(new_keys, new_rows)
            self.size += n_new
            rows[missing] = new_rows[of_new]
        return rows

    def centers(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(V, 3) float32 voxel centres in the world frame (all voxels, or the given rows)."""
        keys = self.keys[:self.size] if rows is None else self.keys[rows]
        return (unpack_keys(keys).float() + 0.5) * self.voxel_size_m

    def memory_report(self) -> Dict[str, float]:
        """Bytes per voxel row of each field, the hash index included (its slots over the allocated rows)."""
        return {'keys': 8, 'features': 2 * self.dim, 'weights': 4, 'colors': 12, 'counts': 4, 'norms': 4,
                'index': 4 * self._index.slots / self.capacity}

    def bytes_per_voxel(self) -> int:
        """Storage per voxel row (all fields plus the hash index)."""
        return int(round(sum(self.memory_report().values())))

    def clear(self) -> None:
        """Remove every voxel (keeps the allocation)."""
        self.size = 0
        for t in (self.keys, self.features, self.weights, self.colors, self.counts, self.norms):
            t.zero_()
        self._index.clear()

    def state(self) -> Dict[str, torch.Tensor]:
        """The occupied rows of every field (views, not copies): keys, features, weights, colors, counts."""
        return {name: getattr(self, name)[:self.size] for name in self.FIELDS}

    def load_state(self, state: Dict[str, torch.Tensor]) -> None:
        """Replace the contents with ``state`` (as returned by :meth:`state`); validates shapes first."""
        n = int(state['keys'].shape[0])
        expect = {'keys': (n,), 'features': (n, self.dim), 'weights': (n,), 'colors': (n, 3), 'counts': (n,)}
        for name, shape in expect.items():
            if tuple(state[name].shape) != shape:
                raise ValueError(f'voxel field {name!r} has shape {tuple(state[name].shape)}, expected {shape}')
        if torch.unique(state['keys']).numel() != n:
            raise ValueError('voxel keys are not unique')
        self.size = 0
        if n > self.capacity:
            self._alloc(max(n, 16))
        for name in self.FIELDS:
            t = getattr(self, name)
            t.zero_()
            t[:n] = state[name].to(self.device, t.dtype)
        self.size = n
        self.norms.zero_()
        self.norms[:n] = self.features[:n].float().norm(dim=1)
        self._reindex()

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (sorted unique int64), compacted to rows 0..len-1 in that order (evicts the rest)."""
        n = len(rows)
        for name in self.FIELDS + ('norms',):
            t = getattr(self, name)
            t[:n] = t[rows]                       # the gather copies before the write
            t[n:self.size] = 0
        self.size = n
        self._reindex()

    def snapshot(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of (centres (V,3), features (V,D) fp16, weights (V,), colors (V,3)) for readers."""
        n = self.size
        return self.centers(), self.features[:n].clone(), self.weights[:n].clone(), self.colors[:n].clone()
