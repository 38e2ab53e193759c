"""Voxel neighbourhoods on the sparse map: neighbour rows by key arithmetic, per-voxel normals.

Neighbours are the occupied voxels within a ball of ``radius_vox`` voxels. Because keys pack biased
coordinates in fixed bit fields, the key of a voxel shifted by an offset is the key plus a constant, so a
neighbourhood lookup is one probe of the hash index per (voxel, offset): no KD-tree, same code on CPU and GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from ov3d_ros.core.voxel_map import _BITS, _OFFSET, VoxelFeatureMap, pack_keys, unpack_keys


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


def row_positions(rows: torch.Tensor, size: int) -> torch.Tensor:
    """(size,) int64 position of each map row in ``rows`` (R,) (unique), -1 for rows not in it: a table to turn
    map rows into indices into ``rows`` (or into the rows a compaction to ``rows`` gives them) by a gather."""
    out = torch.full((size,), -1, dtype=torch.int64, device=rows.device)
    return out.index_copy_(0, rows, torch.arange(len(rows), device=rows.device))


def neighbour_rows(vmap: VoxelFeatureMap, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(R, M) int64 map rows of the neighbours of ``rows`` at each offset; -1 where unoccupied."""
    offsets = offsets.to(vmap.device)
    keys = vmap.keys.index_select(0, rows)
    if keys.device.type == 'cpu' and len(rows) * len(offsets) >= BOXED_PAIRS:
        found = _boxed_neighbour_rows(vmap, keys, offsets)
        if found is not None:
            return found
    keys = keys[:, None] + offset_deltas(offsets)[None, :]
    return vmap.lookup(keys.reshape(-1)).reshape(len(rows), len(offsets))


BOXED_PAIRS = 65536
"""(row, offset) pairs from which :func:`neighbour_rows` looks up each distinct neighbour cell once on CPU (there,
the hash index resolves one probe per key at a time, and misses the caches once the map is large)."""

BOXED_VOLUME = 8
"""Cells of the bounding box per (row, offset) pair up to which :func:`neighbour_rows` dedups through the box."""

BOXED_CELLS = 1 << 24
"""Cells of the bounding box beyond which :func:`neighbour_rows` looks up every pair: a box costs 5 bytes a cell
(a mark and an int32 row), 80 MB at most; a keyframe's region fits (256 voxels a side: 12.8 m at 5 cm), a whole
large map need not."""


def _boxed_neighbour_rows(vmap: VoxelFeatureMap, keys: torch.Tensor, offsets: torch.Tensor) -> Optional[torch.Tensor]:
    """:func:`neighbour_rows` of the voxels of (R,) ``keys``, each distinct neighbour cell looked up once: a
    keyframe's ball neighbourhoods overlap (15 000 rows x 33 offsets are 76 000 distinct cells), so the cells are
    marked in a dense box around the rows (power-of-two sides: a cell's box index and its key are shifts of each
    other), found in the index, and gathered back. The same rows as one lookup per pair. One thread, the 15 000-voxel
    patch of ``bm_pooling.py``: 8.1 against 11.6 ms at 79 k voxels, 12.0 against 22.8 ms at 968 k (medians of 21
    interleaved calls). None where the box would exceed ``BOXED_VOLUME`` cells per pair or ``BOXED_CELLS``, or the
    key range (the caller then looks up every pair)."""
    r = int(offsets.abs().max()) if len(offsets) else 0
    c = unpack_keys(keys)
    lo, hi = (c.min(0).values - r).tolist(), (c.max(0).values + r).tolist()
    if min(lo) < -_OFFSET or max(hi) >= _OFFSET:
        return None
    bits = [(h - l).bit_length() for l, h in zip(lo, hi)]           # 2^bits > the side's last index
    if 1 << sum(bits) > min(BOXED_VOLUME * len(keys) * len(offsets), BOXED_CELLS):
        return None
    yz, z = bits[1] + bits[2], bits[2]
    flat = lambda v: (v[:, 0] << yz) + (v[:, 1] << z) + v[:, 2]  # noqa: E731  (N, 3) box coordinates -> (N,) index
    cell = (flat(c - torch.tensor(lo, device=c.device))[:, None] + flat(offsets)[None, :]).reshape(-1)
    mark = torch.zeros(max(1 << sum(bits), _WORD), dtype=torch.bool, device=keys.device)
    mark.index_fill_(0, cell, True)
    cells = marked_rows(mark)
    cell_keys = ((cells >> yz) << 2 * _BITS).add_(((cells >> z) & ((1 << bits[1]) - 1)) << _BITS) \
        .add_(cells & ((1 << z) - 1)).add_(int(pack_keys(torch.tensor([lo]))[0]))   # the key of the box's corner
    found = torch.empty(len(mark), dtype=torch.int32, device=keys.device)   # rows as int32: half the bytes
    found.index_copy_(0, cells, vmap.lookup(cell_keys).to(torch.int32))
    return found.index_select(0, cell).view(len(keys), len(offsets)).to(torch.int64)


def estimate_normals(nbr: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(R, 3) unit normals of R voxels: the least-variance direction of their occupied neighbours' centres.

    ``nbr`` (R, M) from :func:`neighbour_rows` with the same ``offsets``. Voxels with fewer than 3 neighbours
    get the zero vector. Orientation is arbitrary (use ``abs`` of dot products).
    """
    occupied = nbr >= 0
    if 0 < occupied.shape[1] <= 63 and len(occupied) > 1:
        # A normal depends only on which neighbours are occupied: solve each distinct pattern once. Surfaces
        # repeat few patterns (15 000 voxels of a keyframe of the built-in scene hold 2 400-4 800 of radius 2's
        # 33-bit ones; a flat floor one), and the batched 3x3 eigh is most of the cost (on an AMD EPYC, one
        # thread: 11-19 against 34-42 ms for those voxels). The same values: each pattern's moments (exact in
        # float64: sums of small integers), eigh and all, are those of any row holding it.
        bits = torch.bitwise_left_shift(occupied.long(), torch.arange(occupied.shape[1], device=nbr.device)).sum(1)
        patterns, which = torch.unique(bits, return_inverse=True)
        if len(patterns) < len(bits):
            first = torch.empty(len(patterns), dtype=torch.int64, device=nbr.device).scatter_(
                0, which, torch.arange(len(bits), device=nbr.device))
            return _normals(occupied.index_select(0, first), offsets).index_select(0, which)
    return _normals(occupied, offsets)


def _normals(occupied: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(R, 3) :func:`estimate_normals` of (R, M) bool neighbour occupancies at (M, 3) ``offsets``."""
    # offsets are positions relative to the voxel: the moments of the occupied ones are products of the (R, M)
    # occupancy with (M, 3) offsets and their (M, 9) outer products (no (R, M, 3) tensors); in float64
    present = occupied.double()                                     # (R, M)
    o = offsets.to(occupied.device).double()
    count = present.sum(1)
    n = count.clamp_min(1.0)[:, None]
    mean = present @ o / n                                          # (R, 3)
    cov = (present @ (o[:, :, None] * o[:, None, :]).reshape(-1, 9) / n).view(-1, 3, 3)
    cov -= mean[:, :, None] * mean[:, None, :]
    _, vecs = torch.linalg.eigh(cov)
    normals = vecs[:, :, 0].float()
    return torch.where((count >= 3)[:, None], normals, torch.zeros_like(normals))


def cube_offsets(radius_vox: int, device: torch.device | str = 'cpu') -> torch.Tensor:
    """((2r+1)^3, 3) int64 offsets with Chebyshev length <= ``radius_vox`` (the zero offset first)."""
    r = int(radius_vox)
    ax = torch.arange(-r, r + 1, device=device)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing='ij'), dim=-1).reshape(-1, 3)
    return grid[torch.argsort(grid.abs().amax(1), stable=True)]


def with_room(t: torch.Tensor, keep: int, rows: int) -> torch.Tensor:
    """``t`` itself if it has ``rows`` rows, else a tensor of at least twice its rows (the rest uninitialised)
    holding its first ``keep`` rows."""
    if rows <= len(t):
        return t
    grown = torch.empty((max(rows, 2 * len(t)),) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device)
    grown[:keep] = t[:keep]
    return grown


class NeighbourTable:
    """Neighbour rows of map rows at fixed ``offsets``, looked up in the map's index once per row and reused:
    one keyframe's refresh asks for the neighbourhoods of mostly the same voxels several times (ball regions,
    connected dilation, normals, pooling). Valid while the map's rows do not change; :meth:`extend` takes in rows
    appended since, so incremental updates keep one from keyframe to keyframe.

    Args:
        vmap: the map.
        offsets: (M, 3) int64 offsets, e.g. :func:`ball_offsets`; column j of a table holds the neighbour at
            offsets[j]. The 26-connected neighbours (:meth:`cube`) come from the columns of the offsets with
            Chebyshev length <= 1, which must all be there (as in a ball of radius >= 2); otherwise
            :meth:`cube` looks them up directly.
    """

    def __init__(self, vmap: VoxelFeatureMap, offsets: torch.Tensor):
        self.vmap, self.offsets = vmap, offsets.to(vmap.device)
        self._slot = torch.full((vmap.size,), -1, dtype=torch.int64, device=vmap.device)   # row -> table row
        self._size = vmap.size               # rows of _slot in use (it grows by doubling, as _data does)
        self._data = torch.empty(0, len(offsets), dtype=torch.int64, device=vmap.device)
        self._used = 0
        unit = self.offsets.abs().amax(1) <= 1
        self._cube = torch.nonzero(unit).flatten() if int(unit.sum()) == 27 else None
        # a ball's offsets come nearest first, so its 27 unit offsets are its first columns: a slice, not a gather
        self._cube_first = self._cube is not None and torch.equal(self._cube.cpu(), torch.arange(27))
        self.looked_up = 0
        """Rows whose neighbours were looked up in the index so far (each once)."""

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, M) int64 neighbour rows of (R,) map ``rows`` (repeats allowed); -1 where unoccupied."""
        slot = self._slots(rows)              # first: it may grow the table
        return self._data.index_select(0, slot)

    def _slots(self, rows: torch.Tensor) -> torch.Tensor:
        """(R,) table rows holding the neighbours of map ``rows``, looking up those not held yet."""
        slot = self._slot.index_select(0, rows)
        miss = rows.masked_select(slot < 0)
        if len(miss):
            # one winner per distinct row: every copy writes its index, the copies that read their own back win
            idx = torch.arange(len(miss), device=rows.device)
            self._slot.index_copy_(0, miss, idx)
            new = miss.masked_select(self._slot.index_select(0, miss) == idx)
            need = self._used + len(new)
            self._data = with_room(self._data, self._used, need)
            self._data[self._used:need] = neighbour_rows(self.vmap, new, self.offsets)
            self._slot.index_copy_(0, new, torch.arange(self._used, need, device=rows.device))
            self._used = need
            self.looked_up = need
            slot = self._slot.index_select(0, rows)
        return slot

    @property
    def size(self) -> int:
        """Map rows the table knows of (the map's size when built or last extended)."""
        return self._size

    @property
    def used(self) -> int:
        """Rows of neighbours held (looked up since the table was built, including forgotten ones)."""
        return self._used

    def keep(self, rows: torch.Tensor) -> None:
        """Follow the map's compaction to ``rows`` (sorted, unique; call right after the map kept them): the
        neighbours held become the rows they moved to, the dropped ones -1 (no longer occupied), and the lists of
        dropped rows are forgotten. O(rows held), no lookup."""
        rows = rows.to(self._slot.device)
        lut = row_positions(rows, self._size)
        held = self._data[:self._used]
        held.copy_(torch.where(held >= 0, lut.index_select(0, held.clamp_min(0).reshape(-1)).reshape(held.shape), -1))
        self._slot = self._slot.index_select(0, rows)
        self._size = len(rows)

    def extend(self) -> torch.Tensor:
        """Take in the rows appended to the map since the table was built or last extended, so that it can serve
        later updates: looks up their neighbours and forgets those of every older voxel that has one of them as a
        neighbour (the offsets must be symmetric, as a ball or a cube is: b is a's neighbour at o iff a is b's at
        -o). Rows moved or dropped (eviction, compaction) are followed by :meth:`keep` only. Returns the appended
        rows."""
        old, n = self.size, self.vmap.size
        added = torch.arange(old, n, device=self._slot.device)
        if len(added):
            self._slot = with_room(self._slot, old, n)      # no copy of the whole column per keyframe
            self._slot[old:n] = -1
            self._size = n
            nbr = self(added)
            self._slot.index_fill_(0, nbr.masked_select((nbr >= 0) & (nbr < old)), -1)
        return added

    def cube(self, rows: torch.Tensor) -> torch.Tensor:
        """(R, 27) int64 rows of the 26-connected neighbours of ``rows`` and of the voxels themselves; -1 where
        unoccupied."""
        if self._cube is None:
            return neighbour_rows(self.vmap, rows, cube_offsets(1, self.vmap.device))
        slot = self._slots(rows)
        if self._cube_first:     # whole rows, then the leading columns: a 10-step dilation 6.7 against 8.6 ms
            return self._data.index_select(0, slot)[:, :27]
        return self._data[slot[:, None], self._cube]                       # one gather of the 27 columns


def ball_region(vmap: VoxelFeatureMap, rows: torch.Tensor, offsets: torch.Tensor,
                table: Optional[NeighbourTable] = None) -> torch.Tensor:
    """Sorted unique ``rows`` and every occupied voxel at one of ``offsets`` from them (``table``: a
    :class:`NeighbourTable` of the same offsets to take the neighbours from)."""
    if len(rows) == 0:
        return torch.unique(rows)
    nbr = neighbour_rows(vmap, rows, offsets) if table is None else table(rows)
    return union_rows(vmap.size, rows, nbr.reshape(-1))


def union_rows(size: int, *parts: torch.Tensor) -> torch.Tensor:
    """Sorted unique rows (int64) of ``parts`` (int64 tensors of rows in [0, size), or -1 for none, e.g. a
    neighbour table as is): a mark per row instead of a unique (a sort) over every entry, about 10x faster for a
    keyframe's (row, neighbour) pairs. The marks are read back eight at a time (see :func:`marked_rows`)."""
    mark = torch.zeros(_WORD * (size // _WORD + 1), dtype=torch.bool, device=parts[0].device)
    for part in parts:                                  # -1 marks the last slot, a spare one (>= size)
        mark.index_fill_(0, part.reshape(-1), True)     # 1.9 against 3.0 ms as mark[part] = True, 528 000 rows
    mark[size:] = False
    return marked_rows(mark)


_WORD = 8
"""Marks (bools) per int64 word in :func:`marked_rows`."""


def marked_rows(mark: torch.Tensor) -> torch.Tensor:
    """(n,) int64 sorted indices of the True entries of a (N,) bool tensor, N a multiple of 8 (contiguous): a
    nonzero over its int64 words, then over the words that hold a mark. Its cost follows N / 8 plus the marks, so
    incremental updates stay nearly flat in map size: one thread, 19 000 marks, 0.32 against 1.08 ms at
    968 000 rows, 1.6 against 9.5 ms at 10 M (0.16 against 0.13 ms at 79 000)."""
    words = mark.view(torch.int64)
    held = torch.nonzero(words).flatten()
    bits = torch.nonzero(words.index_select(0, held).view(torch.bool)).flatten()
    return held.index_select(0, bits // _WORD).mul_(_WORD).add_(bits.bitwise_and_(_WORD - 1))


def connected_dilation(vmap: VoxelFeatureMap, rows: torch.Tensor, steps: int,
                       table: Optional[NeighbourTable] = None) -> tuple:
    """Occupied voxels within ``steps`` steps of ``rows`` through 26-connected occupied voxels.

    This is how far a chain of ``steps`` 3x3x3 submanifold convolutions carries information on the map. Returns
    (reached (S,) sorted unique rows, hops (S,) int64: the step count at which each was first reached). A
    breadth-first search over the newly reached voxels only: the cost follows the reached set, not the map
    (``table``: a :class:`NeighbourTable` to take the neighbours from).
    """
    table = NeighbourTable(vmap, cube_offsets(1, vmap.device)) if table is None else table
    frontier = torch.unique(rows)
    # row r's mark at r + 1, and slot 0 (what a missing neighbour, -1, reads) marked: never a candidate. Gathers
    # and selects by index_select / masked_select / index_copy_ rather than indexing with tensors (a keyframe's
    # 3- and 10-step dilations on one thread: 6.1-6.6 and 8.3-8.5 against 8.5-9.0 and 11.5-11.6 ms)
    seen = torch.zeros(vmap.size + 1, dtype=torch.bool, device=frontier.device)
    seen.index_fill_(0, frontier + 1, True)
    seen[0] = True
    claim = torch.empty(vmap.size, dtype=torch.int64, device=frontier.device)
    parts, hops = [frontier], [torch.zeros(len(frontier), dtype=torch.int64, device=frontier.device)]
    for step in range(1, int(steps) + 1):
        if len(frontier) == 0:
            break
        cand = table.cube(frontier).flatten()
        cand = cand.masked_select(seen.index_select(0, cand + 1).logical_not_())
        idx = torch.arange(len(cand), device=cand.device)   # one winner per distinct voxel (see NeighbourTable)
        claim.index_copy_(0, cand, idx)
        frontier = cand.masked_select(claim.index_select(0, cand) == idx)
        seen.index_fill_(0, frontier + 1, True)
        parts.append(frontier)
        hops.append(torch.full((len(frontier),), step, dtype=torch.int64, device=frontier.device))
    reached, order = torch.sort(torch.cat(parts))
    return reached, torch.cat(hops)[order]
