"""Sparse voxel feature map: a growing table of voxels addressed by packed integer keys.

Each occupied voxel owns one row. Per row: integer coordinates, a running weighted-mean feature (fp16),
the accumulated observation weight, the mean colour and the number of points fused. Rows are never
reordered; a sorted copy of the keys (``searchsorted``) maps keys to rows, so the map grows without any
fixed scene bound (±2^20 voxels per axis, i.e. ±52 km at 5 cm).
"""
from __future__ import annotations

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


class VoxelFeatureMap:
    """Sparse voxel map of fused D-dimensional features.

    Args:
        voxel_size_m: voxel edge length.
        dim: feature dimension D.
        device: torch device of all tensors.
        capacity: rows allocated up front; doubled when full.
    """

    def __init__(self, voxel_size_m: float, dim: int, device: torch.device | str = 'cpu', capacity: int = 65536):
        if voxel_size_m <= 0:
            raise ValueError(f'voxel_size_m must be > 0, got {voxel_size_m}')
        self.voxel_size_m = float(voxel_size_m)
        self.dim = int(dim)
        self.device = torch.device(device)
        self.size = 0
        self._alloc(max(16, int(capacity)))
        self._sorted_keys = torch.empty(0, dtype=torch.int64, device=self.device)
        self._sorted_rows = torch.empty(0, dtype=torch.int64, device=self.device)

    def _alloc(self, capacity: int) -> None:
        dev, old = self.device, getattr(self, 'keys', None)
        new = dict(keys=torch.zeros(capacity, dtype=torch.int64, device=dev),
                   features=torch.zeros(capacity, self.dim, dtype=torch.float16, device=dev),
                   weights=torch.zeros(capacity, dtype=torch.float32, device=dev),
                   colors=torch.zeros(capacity, 3, dtype=torch.float32, device=dev),
                   counts=torch.zeros(capacity, dtype=torch.int32, device=dev))
        for name, tensor in new.items():
            if old is not None:
                tensor[:self.size] = getattr(self, name)[:self.size]
            setattr(self, name, tensor)

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]

    def __len__(self) -> int:
        return self.size

    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """(N,) keys → (N,) int64 rows, -1 where the voxel is not in the map."""
        if self._sorted_keys.numel() == 0:
            return torch.full_like(keys, -1)
        pos = torch.searchsorted(self._sorted_keys, keys).clamp(max=self._sorted_keys.numel() - 1)
        found = self._sorted_keys[pos] == keys
        return torch.where(found, self._sorted_rows[pos], torch.full_like(keys, -1))

    def rows_of(self, points: torch.Tensor) -> torch.Tensor:
        """(N,) int64 rows of the voxels containing (N, 3) points, -1 where the voxel is not in the map."""
        return self.lookup(pack_keys(voxel_coords(points.to(self.device), self.voxel_size_m)))

    def project(self, matrix: torch.Tensor) -> None:
        """Replace every feature f by f @ matrix (D, d): the map's feature dimension becomes d."""
        if matrix.shape[0] != self.dim:
            raise ValueError(f'projection is for D={matrix.shape[0]} features, the map has D={self.dim}')
        out = torch.zeros(self.capacity, matrix.shape[1], dtype=torch.float16, device=self.device)
        out[:self.size] = (self.features[:self.size].float() @ matrix.to(self.device).float()).to(torch.float16)
        self.features, self.dim = out, int(matrix.shape[1])

    def integrate(self, points: torch.Tensor, features: Union[torch.Tensor, CellFeatures],
                  colors: Optional[torch.Tensor] = None, weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fuse points into the map.

        Args:
            points: (N, 3) float world-frame positions.
            features: (N, D) float features, or ``CellFeatures`` (fused as a weighted running mean).
            colors: (N, 3) float RGB in [0, 255], optional.
            weights: (N,) float per-point weights, default 1.
        Returns:
            (V,) int64 rows of the voxels this call touched.
        """
        n = points.shape[0]
        if n == 0:
            return torch.empty(0, dtype=torch.int64, device=self.device)
        points = points.to(self.device)
        w = torch.ones(n, device=self.device) if weights is None else weights.to(self.device, torch.float32)
        keys = pack_keys(voxel_coords(points, self.voxel_size_m))
        ukeys, inv = torch.unique(keys, return_inverse=True)
        v = ukeys.shape[0]
        w_sum = torch.zeros(v, device=self.device).index_add_(0, inv, w)
        f_sum = self._feature_sums(v, inv, features, None if weights is None else w)
        cnt = torch.zeros(v, dtype=torch.int32, device=self.device).index_add_(0, inv, torch.ones_like(inv, dtype=torch.int32))
        rows = self._rows_for(ukeys)
        w_old = self.weights[rows]
        w_new = w_old + w_sum
        f_old = self.features[rows].float()
        self.features[rows] = ((f_old * w_old[:, None] + f_sum) / w_new[:, None]).to(torch.float16)
        if colors is not None:
            c = colors.to(self.device).float()
            c_sum = torch.zeros(v, 3, device=self.device).index_add_(0, inv, c if weights is None else c * w[:, None])
            self.colors[rows] = (self.colors[rows] * w_old[:, None] + c_sum) / w_new[:, None]
        self.weights[rows] = w_new
        self.counts[rows] += cnt
        return rows

    def _feature_sums(self, v: int, inv: torch.Tensor, features, w: Optional[torch.Tensor]) -> torch.Tensor:
        """(v, D) weighted feature sums per touched voxel."""
        out = torch.zeros(v, self.dim, device=self.device)
        if not isinstance(features, CellFeatures):
            f = features.to(self.device).float()
            return out.index_add_(0, inv, f if w is None else f * w[:, None])
        # Sum the cell weights per (voxel, cell) pair first: points of a voxel share few cells.
        m = features.grid.shape[0]
        cw = features.weights.to(self.device) if w is None else features.weights.to(self.device) * w[:, None]
        pair = (inv[:, None] * m + features.cells.to(self.device)).reshape(-1)
        upair, pinv = torch.unique(pair, return_inverse=True)
        pw = torch.zeros(upair.shape[0], device=self.device).index_add_(0, pinv, cw.reshape(-1))
        grid = features.grid.to(self.device).float()
        return out.index_add_(0, upair // m, pw[:, None] * grid[upair % m])

    def _rows_for(self, ukeys: torch.Tensor) -> torch.Tensor:
        """Rows of sorted unique keys, appending rows for keys not yet in the map."""
        rows = self.lookup(ukeys)
        missing = rows < 0
        n_new = int(missing.sum())
        if n_new:
            if self.size + n_new > self.capacity:
                cap = self.capacity
                while cap < self.size + n_new:
                    cap *= 2
                self._alloc(cap)
            new_rows = torch.arange(self.size, self.size + n_new, device=self.device)
            rows[missing] = new_rows
            self.keys[new_rows] = ukeys[missing]
            self.size += n_new
            all_keys = torch.cat([self._sorted_keys, ukeys[missing]])
            all_rows = torch.cat([self._sorted_rows, new_rows])
            self._sorted_keys, order = torch.sort(all_keys)
            self._sorted_rows = all_rows[order]
        return rows

    def centers(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(V, 3) float32 voxel centres in the world frame (all voxels, or the given rows)."""
        keys = self.keys[:self.size] if rows is None else self.keys[rows]
        return (unpack_keys(keys).float() + 0.5) * self.voxel_size_m

    def bytes_per_voxel(self) -> int:
        """Storage per voxel row (all fields plus the sorted index)."""
        return 8 + 2 * self.dim + 4 + 12 + 4 + 16

    def clear(self) -> None:
        """Remove every voxel (keeps the allocation)."""
        self.size = 0
        for t in (self.keys, self.features, self.weights, self.colors, self.counts):
            t.zero_()
        self._sorted_keys = self._sorted_keys[:0]
        self._sorted_rows = self._sorted_rows[:0]

    FIELDS = ('keys', 'features', 'weights', 'colors', 'counts')

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
        self._index_rows()

    def _index_rows(self) -> None:
        """Rebuild the sorted key index of rows 0..size-1."""
        self._sorted_keys, order = torch.sort(self.keys[:self.size])
        self._sorted_rows = torch.arange(self.size, device=self.device)[order]

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (sorted unique int64), compacted to rows 0..len-1 in that order (evicts the rest)."""
        n = len(rows)
        for name in self.FIELDS:
            t = getattr(self, name)
            t[:n] = t[rows]                       # the gather copies before the write
            t[n:self.size] = 0
        self.size = n
        self._index_rows()

    def snapshot(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of (centres (V,3), features (V,D) fp16, weights (V,), colors (V,3)) for readers."""
        n = self.size
        return self.centers(), self.features[:n].clone(), self.weights[:n].clone(), self.colors[:n].clone()
