"""The map's storage: one voxel index and named row-aligned layers (nvblox's LayerCake, flattened to voxels).

    index  --(packed voxel key)-->  row  --(layer name)-->  value

Every occupied voxel owns one row. The index (:class:`KeyIndex`, a hash table over the
``keys`` layer) maps a voxel's packed key to its row; every layer holds one value per row, so row ``r`` of every
layer belongs to the same voxel. Rows are appended by :meth:`LayerCake.insert` and only move when
:meth:`LayerCake.keep` compacts them (eviction). This class is the one place where layers grow (capacity
doubling), are compacted, rotated into a new feature basis (:meth:`LayerCake.project`, for compression),
copied for readers (:meth:`LayerCake.copy`), measured (:meth:`LayerCake.memory_report`) and saved or loaded
(:meth:`LayerCake.state` / :meth:`LayerCake.load_state`, used by ``map_io``). The integrators that own the layers
(fusion in ``voxel_map``, purification in ``purification/pooling``, the label volume in ``label_volume``) declare
them with :meth:`LayerCake.add_layer` and read and write their rows in place.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence

import torch

_DTYPES = {'float16': torch.float16, 'float32': torch.float32, 'float64': torch.float64, 'int32': torch.int32,
           'int64': torch.int64, 'uint8': torch.uint8, 'bool': torch.bool}


_HASH_MUL = -7046029254386353131      # 0x9E3779B97F4A7C15 as a signed int64 (Fibonacci hashing)

_WORDS = (torch.complex128, torch.int64, torch.int32)


def write_rows(layer: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``layer.index_copy_(0, rows, values)``, bit for bit: (N,) int64 ``rows`` of a (capacity, W) ``layer`` set
    to (N, W) ``values`` of its dtype. On CPU index_copy_ moves one element at a time; rows whose bytes split into
    16-, 8- or 4-byte words wider than the elements are copied as those words instead (a reinterpreting view, no
    arithmetic). 1 024 fp16 rows, one thread: 166 against 43 us at W = 384, 40 against 11 us at W = 64. Returns
    ``layer``."""
    if layer.device.type == 'cpu' and layer.dim() == 2 and values.dim() == 2 and layer.dtype == values.dtype \
            and layer.stride(1) == 1 and layer.stride(0) == layer.shape[1] and values.is_contiguous():
        size, row = layer.element_size(), layer.shape[1] * layer.element_size()
        for word in _WORDS:
            w = word.itemsize
            if w > size and row % w == 0 and (layer.storage_offset() * size) % w == 0 \
                    and (values.storage_offset() * size) % w == 0:
                layer.view(word).index_copy_(0, rows, values.view(word))
                return layer
    return layer.index_copy_(0, rows, values)


class KeyIndex:
    """Open-addressing hash table from packed voxel keys to map rows: linear probing, every operation vectorised
    over all its keys at once (works the same on CPU and CUDA; no sort, O(keys) per call).

    The table stores int32 rows (-1 = empty slot); the key of an occupied slot is read from the map's key column,
    so the index costs 4 bytes per slot. Slots are a power of two; keep at most half of them occupied (a
    :class:`LayerCake` keeps at most a quarter).

    Args:
        slots: minimum number of slots (rounded up to a power of two).
        device: torch device of the table.
    """

    WINDOW = 8
    """Slots probed per vectorised step of an insert, and at most per step of a find."""
    FIRST_WINDOW = 2
    """On CUDA, slots a find probes in its first step after the home slot (then twice as many per step, up to
    WINDOW): few steps, each a few kernels and a synchronising ``nonzero``. At the table's load (at most a quarter
    full in a cake) a key that misses its home slot mostly ends one or two slots on, so a narrow first window
    wastes the fewest gathers on a large batch. 825 000 ball-neighbour lookups into the 79 k-voxel map of
    ``bm_pooling.py``, one thread, half full: 33-52 ms with a first window of 2 against 55-95 ms with windows of 8
    (the CPU then probed this way too; see :meth:`_find`)."""

    def __init__(self, slots: int, device: torch.device):
        self.bits = max(4, (int(slots) - 1).bit_length())
        self.table = torch.full((1 << self.bits,), -1, dtype=torch.int32, device=device)

    @property
    def slots(self) -> int:
        return self.table.numel()

    def _home(self, keys: torch.Tensor) -> torch.Tensor:
        return (keys * _HASH_MUL).bitwise_right_shift_(64 - self.bits).bitwise_and_(self.slots - 1)

    def _window(self, slot: torch.Tensor, width: int = 0) -> torch.Tensor:
        """(n,) slots → (n * width,) the ``width`` (default WINDOW) slots probed from each, in probing order."""
        width = width or self.WINDOW
        return ((slot[:, None] + torch.arange(width, device=slot.device)) & (self.slots - 1)).reshape(-1)

    FIND_KEYS = 1 << 18
    """Keys a find on CPU probes per batch. Each step of a find makes a few temporaries of the batch's size; one
    batch of a keyframe's 1 M ball-neighbour keys makes 8 MB ones, which glibc's allocator hands back to the
    system when freed and page-faults in again on the next find. 990 000 keys into the 79 k-voxel map of
    ``bm_pooling.py``, one thread: 29-30 ms in batches of 2^18 against 63-72 ms in one (with the allocator told to
    keep its memory, 30-33 ms in one; batches of 2^16 and 2^14 lose to per-step overhead). On CUDA one batch (its
    caching allocator keeps the memory)."""

    def find(self, keys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
        """(N,) int64 keys → (N,) int64 rows, -1 where absent. ``row_keys``: (capacity,) the map's key column.
        Probes the home slot, then the slots after it for the keys left (one per step on CPU, windows of up to
        ``WINDOW`` on CUDA); a key is absent at the first empty slot."""
        step = self.FIND_KEYS
        if keys.device.type != 'cpu' or len(keys) <= step:
            return self._find(keys, row_keys)
        out = torch.empty(len(keys), dtype=torch.int64, device=keys.device)
        for start in range(0, len(keys), step):
            out[start:start + step] = self._find(keys[start:start + step], row_keys)
        return out

    def _find(self, keys: torch.Tensor, row_keys: torch.Tensor) -> torch.Tensor:
        # rows stay int32 (the table's type; index_select takes them as indices) until the result: half the bytes
        # of every pass. 627 000 ball-neighbour keys into the 79 k-voxel map of bm_pooling.py, one thread, four
        # interleaved runs: 14-15 against 16-21 ms with int64 rows
        slot = self._home(keys)
        r, occupied, hit = self._probe(slot, keys, row_keys)
        out = torch.where(hit, r, -1)                              # most keys resolve at their home slot
        idx = occupied.logical_xor_(hit).nonzero().squeeze(1)      # occupied by another key: probe on
        probe = self._probe_slots if keys.device.type == 'cpu' else self._probe_windows
        return probe(out, idx, slot.index_select(0, idx), keys.index_select(0, idx), row_keys)

    def _probe(self, slot: torch.Tensor, keys: torch.Tensor, row_keys: torch.Tensor) -> tuple:
        """One slot per key: its (n,) int32 row (-1: empty), whether it is occupied, and whether it holds the key."""
        r = self.table.index_select(0, slot)
        occupied = r >= 0
        return r, occupied, (row_keys.index_select(0, r.clamp_min(0)) == keys).logical_and_(occupied)

    def _probe_windows(self, out: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor, k: torch.Tensor,
                       row_keys: torch.Tensor) -> torch.Tensor:
        """CUDA: resolve keys ``k`` at ``out[idx]`` (int32, -1 there), which missed their home ``slot``, a window of
        slots per step (:attr:`FIRST_WINDOW`, then doubling up to :attr:`WINDOW`). Returns ``out`` as int64."""
        slot = slot + 1
        width = min(self.FIRST_WINDOW, self.WINDOW)
        while idx.numel():
            n = idx.numel()
            r = self.table.index_select(0, self._window(slot, width)).view(n, width)
            empty = r < 0
            hit = ~empty & (row_keys.index_select(0, r.clamp_min(0).reshape(-1)).view(n, width) == k[:, None])
            stop = empty | hit
            first = stop.to(torch.uint8).argmax(1, keepdim=True)      # the first hit or empty slot
            found = hit.gather(1, first).squeeze(1)
            out[idx[found]] = r.gather(1, first).squeeze(1)[found]
            go = (~stop.any(1)).nonzero().squeeze(1)                  # all occupied by other keys: next window
            idx, slot, k = idx.index_select(0, go), slot.index_select(0, go) + width, k.index_select(0, go)
            width = min(2 * width, self.WINDOW)
        return out.long()

    def _probe_slots(self, out: torch.Tensor, idx: torch.Tensor, slot: torch.Tensor, k: torch.Tensor,
                     row_keys: torch.Tensor) -> torch.Tensor:
        """CPU: resolve keys ``k`` at ``out[idx]`` (int32, -1 there), which missed their home ``slot``, one slot per
        step: each step gathers one slot for each key left (on a CPU a step's fixed cost is small, so probing no
        slot past a key's end pays). 2^18 ball-neighbour keys into the 968 k-voxel map of ``bm_pooling.py`` (a
        fifth of them probe past their home slot, for up to 7 steps), one thread: 5.6-6.2 against 7.8-8.6 ms for
        the whole find with CUDA's windows (4.0-4.2 against 5.3-5.6 ms into the 79 k-voxel map). Returns ``out``
        as int64."""
        mask = self.slots - 1
        while idx.numel():
            slot = slot.add_(1).bitwise_and_(mask)
            r, occupied, hit = self._probe(slot, k, row_keys)
            out.index_copy_(0, idx, torch.where(hit, r, -1))       # found, or absent at an empty slot (-1)
            go = occupied.logical_xor_(hit).nonzero().squeeze(1)
            idx, slot, k = idx.index_select(0, go), slot.index_select(0, go), k.index_select(0, go)
        return out.long()

    def insert(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Add (N,) unique int64 ``keys`` that are not in the table yet, mapping to (N,) distinct ``rows``."""
        slot, r = self._home(keys), rows.to(torch.int32)
        while r.numel():
            n = r.numel()
            window = self._window(slot).view(n, self.WINDOW)
            free = self.table.index_select(0, window.reshape(-1)).view(n, self.WINDOW) < 0
            first = free.to(torch.uint8).argmax(1, keepdim=True)
            target = window.gather(1, first).squeeze(1)
            has = free.any(1)
            self.table[target[has]] = r[has]                          # keys racing for one slot: one of them wins
            lost = (self.table.index_select(0, target) != r).nonzero().squeeze(1)
            # a lost race resumes after the slot it lost; a window without free slots, after the window
            slot = torch.where(has, target + 1, slot + self.WINDOW).index_select(0, lost)
            r = r.index_select(0, lost)

    def clear(self) -> None:
        self.table.fill_(-1)


@dataclass(frozen=True)
class LayerSpec:
    """What one layer holds per row.

    name: the layer's name (also its tensor name in map files).
    width: values per row: 0 for a scalar column, stored (capacity,); else (capacity, width).
    dtype: torch dtype of the values.
    persist: written to map files.
    feature: lives in the map's feature space, so :meth:`LayerCake.project` rotates it (its width is D).
    """

    name: str
    width: int
    dtype: torch.dtype
    persist: bool = True
    feature: bool = False

    def shape(self, rows: int) -> tuple:
        return (rows,) if self.width == 0 else (rows, self.width)

    def bytes_per_row(self) -> int:
        return max(1, self.width) * torch.empty(0, dtype=self.dtype).element_size()

    def to_json(self) -> dict:
        return {'width': self.width, 'dtype': str(self.dtype).replace('torch.', ''), 'feature': self.feature}


class LayerCake:
    """A voxel index and named row-aligned layers.

    Args:
        device: torch device of every layer.
        capacity: rows allocated up front (at least 16); doubled whenever an insert needs more.

    Attributes:
        size: rows in use (0..size-1); rows size..capacity-1 of every layer are zero.
        layers: {name: (capacity,) or (capacity, width) tensor}, the ``keys`` layer (int64 packed voxel keys)
            first.
        specs: {name: :class:`LayerSpec`}.
        epoch: counts the operations that move or drop rows (:meth:`keep`, :meth:`clear`, :meth:`load_state`);
            inserts do not change it. State kept per row (normals, neighbour tables, superpoints) is rebuilt when
            it changes.
        basis_epoch: counts :meth:`project` calls, which change the feature layers' coordinates but no row:
            what was fitted to the feature coordinates (a pooling subspace) is refitted when it changes, while
            layers derived linearly from the features (purified, voted) are feature layers and turn with them.
    """

    KEYS = 'keys'
    INDEX_SLOTS = 4
    """Hash slots per allocated row (the index is at most a quarter full): 4 bytes per slot, so 16-32 bytes per
    voxel, against 8-16 at half full, for fewer probes past the home slot (825 000 ball-neighbour lookups into a
    968 k-voxel map, one thread: 49-56 ms against 71-83 ms at half full)."""
    CHUNK = 4096
    """Rows per step of whole-layer operations that go through fp32 (:meth:`project`)."""

    def __init__(self, device: torch.device | str = 'cpu', capacity: int = 16):
        self.device = torch.device(device)
        self.size = 0
        self.epoch = self.basis_epoch = 0
        self._capacity = max(16, int(capacity))
        self.specs: Dict[str, LayerSpec] = {}
        self.layers: Dict[str, torch.Tensor] = {}
        self.add_layer(self.KEYS, 0, torch.int64)
        self.index = KeyIndex(self.INDEX_SLOTS * self._capacity, self.device)

    # ---- layers ------------------------------------------------------------------------------------------------
    def add_layer(self, name: str, width: int, dtype: torch.dtype, persist: bool = True,
                  feature: bool = False) -> torch.Tensor:
        """Declare a layer and return its (capacity, ...) tensor, zero-filled when new. A layer of that name with
        the same width and dtype is kept as it is (e.g. one read from a map file), taking the given flags; one
        with another width or dtype raises ValueError (use :meth:`remove_layer` first)."""
        if width < 0:
            raise ValueError(f'layer {name!r}: width must be >= 0, got {width}')
        spec = LayerSpec(name, int(width), dtype, bool(persist), bool(feature))
        old = self.specs.get(name)
        if old is not None:
            if (old.width, old.dtype) != (spec.width, spec.dtype):
                raise ValueError(f'layer {name!r} exists with width {old.width} {old.dtype}, '
                                 f'not {spec.width} {spec.dtype}')
            self.specs[name] = spec
            return self.layers[name]
        self.specs[name] = spec
        self.layers[name] = torch.zeros(spec.shape(self._capacity), dtype=dtype, device=self.device)
        return self.layers[name]

    def remove_layer(self, name: str) -> None:
        """Drop a layer (no-op if absent); the keys layer cannot be removed."""
        if name == self.KEYS:
            raise ValueError('the keys layer cannot be removed')
        self.specs.pop(name, None)
        self.layers.pop(name, None)

    def __contains__(self, name: str) -> bool:
        return name in self.layers

    def __getitem__(self, name: str) -> torch.Tensor:
        """The (capacity, ...) tensor of a layer (rows 0..size-1 in use)."""
        return self.layers[name]

    def get(self, name: str) -> Optional[torch.Tensor]:
        return self.layers.get(name)

    def rows(self, name: str) -> torch.Tensor:
        """(size, ...) view of the rows in use of a layer."""
        return self.layers[name][:self.size]

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def keys(self) -> torch.Tensor:
        """(capacity,) int64 packed voxel keys of every row."""
        return self.layers[self.KEYS]

    def __len__(self) -> int:
        return self.size

    # ---- index -------------------------------------------------------------------------------------------------
    def lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """(N,) int64 keys → (N,) int64 rows, -1 where the voxel has no row."""
        if self.size == 0:
            return torch.full_like(keys, -1, device=self.device)
        return self.index.find(keys.to(self.device), self.keys)

    def insert(self, keys: torch.Tensor, unique: bool = False) -> torch.Tensor:
        """(N,) int64 rows of ``keys`` (repeats allowed), appending zero rows for keys not in the index yet (in
        the order of their keys when ``keys`` are sorted). ``unique``: the caller guarantees no repeats (skips
        deduplication)."""
        rows = self.lookup(keys)
        missing = rows < 0
        if bool(missing.any()):
            if unique:
                new_keys = keys[missing]
            else:
                new_keys, of_new = torch.unique(keys[missing], return_inverse=True)
            n_new = new_keys.shape[0]
            self.reserve(self.size + n_new)
            new_rows = torch.arange(self.size, self.size + n_new, device=self.device)
            self.keys[self.size:self.size + n_new] = new_keys
            self.index.insert(new_keys, new_rows)
            self.size += n_new
            rows[missing] = new_rows if unique else new_rows[of_new]
        return rows

    def reserve(self, rows: int) -> None:
        """Make room for ``rows`` rows: the capacity doubles until it fits; every layer keeps its rows in use
        (the new rows are zero) and the index is rebuilt at INDEX_SLOTS slots per row."""
        if rows <= self._capacity:
            return
        cap = self._capacity
        while cap < rows:
            cap *= 2
        for name, spec in self.specs.items():
            new = torch.zeros(spec.shape(cap), dtype=spec.dtype, device=self.device)
            new[:self.size] = self.layers[name][:self.size]
            self.layers[name] = new
        self._capacity = cap
        self.index = KeyIndex(self.INDEX_SLOTS * cap, self.device)
        self._reindex()

    def _reindex(self) -> None:
        self.index.clear()
        self.index.insert(self.keys[:self.size], torch.arange(self.size, device=self.device))

    # ---- whole-cake operations ---------------------------------------------------------------------------------
    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (sorted unique int64), compacted to rows 0..len-1 in that order, in every layer."""
        n = len(rows)
        rows = rows.to(self.device)
        for t in self.layers.values():
            t[:n] = t[rows]                       # the gather copies before the write
            t[n:self.size] = 0
        self.size = n
        self.epoch += 1
        self._reindex()

    def project(self, matrix: torch.Tensor) -> None:
        """Rotate every feature layer into a new basis: each row f becomes f @ matrix (D, d); their width becomes d.
        Other layers are untouched (derived values such as norms are the owner's to refresh)."""
        m = matrix.to(self.device).float()
        self.basis_epoch += 1
        for name, spec in list(self.specs.items()):
            if not spec.feature:
                continue
            if spec.width != m.shape[0]:
                raise ValueError(f'projection is for D={m.shape[0]} features, layer {name!r} has D={spec.width}')
            layer = self.layers[name]
            # Square: rotated in place; else into a new layer. In chunks of rows, so the fp32 copies stay small.
            out = layer if m.shape[0] == m.shape[1] else \
                torch.zeros(self._capacity, m.shape[1], dtype=spec.dtype, device=self.device)
            for start in range(0, self.size, self.CHUNK):
                stop = min(start + self.CHUNK, self.size)
                out[start:stop] = layer[start:stop].float() @ m
            self.layers[name] = out
            self.specs[name] = LayerSpec(name, int(m.shape[1]), spec.dtype, spec.persist, spec.feature)

    def copy(self, names: Optional[Iterable[str]] = None) -> 'LayerCake':
        """A cake of its own holding copies of the rows in use of the named layers (default: all; keys always) and
        of the index: a consistent picture of the map for readers, which later inserts, compaction
        (:meth:`keep`), projection or clearing of this cake never change. Its capacity is its size (at least 16)."""
        out = LayerCake.__new__(LayerCake)
        out.device, out.size, out._capacity, out.epoch = self.device, self.size, max(16, self.size), 0
        out.basis_epoch = 0
        names = [self.KEYS] + [n for n in (self.layers if names is None else names) if n != self.KEYS]
        out.specs = {n: self.specs[n] for n in names}
        out.layers = {}
        for n in names:
            if self.size >= 16:                   # one contiguous copy of the rows in use
                out.layers[n] = self.layers[n][:self.size].clone(memory_format=torch.contiguous_format)
            else:
                out.layers[n] = torch.zeros(out.specs[n].shape(16), dtype=out.specs[n].dtype, device=self.device)
                out.layers[n][:self.size] = self.layers[n][:self.size]
        out.index = KeyIndex.__new__(KeyIndex)
        out.index.bits, out.index.table = self.index.bits, self.index.table.clone()
        return out

    def share(self, names: Optional[Iterable[str]] = None) -> 'LayerCake':
        """A cake over the same index and the same tensors of the named layers (default: all; keys always), not
        copies, whose own new layers stay its own: for readers that derive different layers from one map (e.g.
        evaluation variants pooling one fused map with different settings). Neither may insert or keep rows
        afterwards (the other would not follow)."""
        out = LayerCake.__new__(LayerCake)
        out.device, out.size, out._capacity, out.index = self.device, self.size, self._capacity, self.index
        out.epoch, out.basis_epoch = self.epoch, self.basis_epoch
        names = [self.KEYS] + [n for n in (self.layers if names is None else names) if n != self.KEYS]
        out.specs = {n: self.specs[n] for n in names}
        out.layers = {n: self.layers[n] for n in names}
        return out

    def clear(self) -> None:
        """Remove every row (layers and allocation stay)."""
        self.size = 0
        self.epoch += 1
        for t in self.layers.values():
            t.zero_()
        self.index.clear()

    # ---- memory ------------------------------------------------------------------------------------------------
    def memory_report(self) -> Dict[str, float]:
        """Bytes per row of every layer (keys included) and of the hash index ('index': its slots over the
        allocated rows)."""
        out: Dict[str, float] = {name: spec.bytes_per_row() for name, spec in self.specs.items()}
        out['index'] = 4 * self.index.slots / self._capacity
        return out

    def bytes_per_voxel(self) -> int:
        """Storage per row: every layer plus the hash index."""
        return int(round(sum(self.memory_report().values())))

    # ---- persistence -------------------------------------------------------------------------------------------
    def persisted(self, skip: Sequence[str] = ()) -> Dict[str, LayerSpec]:
        """Specs of the layers written to map files (keys first), less ``skip``."""
        return {n: s for n, s in self.specs.items() if s.persist and n not in skip}

    def state(self, skip: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
        """{name: (size, ...) view} of every persisted layer but ``skip`` (keys first)."""
        return {name: self.layers[name][:self.size] for name in self.persisted(skip)}

    def load_state(self, state: Dict[str, torch.Tensor], feature: Sequence[str] = ()) -> None:
        """Replace all rows and layers with ``state`` ({name: (V,) or (V, width) tensor}, ``keys`` required,
        unique); layers named in ``feature`` are feature layers. Validates first; raises ValueError."""
        if self.KEYS not in state:
            raise ValueError('voxel layer state has no keys')
        keys = state[self.KEYS]
        n = int(keys.shape[0])
        if keys.ndim != 1 or keys.dtype != torch.int64:
            raise ValueError(f'voxel keys must be (V,) int64, got {tuple(keys.shape)} {keys.dtype}')
        for name, t in state.items():
            if t.ndim not in (1, 2) or t.shape[0] != n:
                raise ValueError(f'voxel layer {name!r} has shape {tuple(t.shape)}, expected ({n},) or ({n}, width)')
        if torch.unique(keys).numel() != n:
            raise ValueError('voxel keys are not unique')
        self.specs, self.layers, self.size = {}, {}, 0
        self.epoch += 1
        self._capacity = max(16, n, self._capacity)
        for name, t in state.items():
            width = 0 if t.ndim == 1 else int(t.shape[1])
            self.add_layer(name, width, t.dtype, feature=name in feature)[:n] = t.to(self.device)
        self.size = n
        self.index = KeyIndex(self.INDEX_SLOTS * self._capacity, self.device)
        self._reindex()


def dtype_from_name(name: str) -> torch.dtype:
    """'float16' → torch.float16 (the dtypes layers may have); ValueError otherwise."""
    if name not in _DTYPES:
        raise ValueError(f'unknown layer dtype {name!r}')
    return _DTYPES[name]
