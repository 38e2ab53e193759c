"""Map files: the voxel map and what is needed to query it, in one safetensors file.

Format ``ov3d_ros.map`` version 1 (safetensors; loading never executes code):
    tensors   the persisted layers of the map's :class:`~ov3d_ros.core.layer_cake.LayerCake`, one tensor each,
              row-aligned: keys (V,) int64 packed voxel coordinates, features (V, D) float16, weights (V,) float32,
              colors (V, 3) float32 RGB, counts (V,) int32, and those other integrators declared: label_evidence
              (V, K) of the label volume (its vocabulary is info['vocabulary']); purified (V, D) float16, normals
              (V, 3) float32, embeddings (V, E) float16 and label_pooled (V, K) of purification (with
              info['purification'] saying which settings made them). Extra tensors that are not rows:
              text_vectors (K, D) of a precomputed text table, projection (D, d), projection_energy (d,) and
              projection_basis (D, d) when features are compressed to d dims (the stored basis, and the
              eigenvalues and eigenvectors of the second moment it follows; files without projection_basis
              hold the eigenvectors in projection).
    metadata  format, format_version, voxel_size_m, dim, layers (JSON {name: {width, dtype, feature}} of the
              layer tensors; files without it hold the fusion layers and, optionally, label_evidence),
              payload_sha256 (of the tensor data), tensors_sha256 (of the header's tensor table: names, dtypes,
              shapes and offsets; files written before it lack it), info (JSON: feature source and feature space,
              config, keyframe count, ... written by the caller). Every metadata value is a string (safetensors).
Files are written atomically: a temporary file in the same folder, fsync, rename, fsync of the folder. A crash
while saving leaves the previous file intact.

Loading checks what the checksums leave open (the metadata is not covered by them, nor the tensor table of older
files): the header's types and values, each layer's dtype and width against its ``layers`` entry and its rows
against the keys', and that no float tensor holds NaN or inf (a merge would spread one over the whole map).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ov3d_ros.core.layer_cake import dtype_from_name
from ov3d_ros.core.voxel_map import VoxelFeatureMap

MAP_FORMAT = 'ov3d_ros.map'
MAP_FORMAT_VERSION = 1
LEGACY_EVIDENCE = 'label_evidence'
"""The one layer besides the fusion layers that files written before the ``layers`` metadata may hold."""


MAX_HEADER_BYTES = 100_000_000
"""The longest safetensors header a map file may have (a longer length field means another kind of file)."""


class MapFileError(ValueError):
    """A map file is missing, corrupt, or of another format or version."""


def _payload_sha256(blob: bytes) -> str:
    (header_len,) = struct.unpack('<Q', blob[:8])
    return hashlib.sha256(blob[8 + header_len:]).hexdigest()


def _tensors_sha256(header: dict) -> str:
    """SHA-256 of a parsed safetensors header's tensor table ({name: {dtype, shape, data_offsets}}, the metadata
    left out), in one canonical JSON form."""
    table = {k: v for k, v in header.items() if k != '__metadata__'}
    return hashlib.sha256(json.dumps(table, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def _parse_header(blob: bytes) -> dict:
    """The JSON header of a safetensors file's bytes (length field checked by the caller)."""
    (header_len,) = struct.unpack('<Q', blob[:8])
    return json.loads(blob[8:8 + header_len])


def encode_map(voxel_map: VoxelFeatureMap, info: dict, extra: Optional[Dict[str, torch.Tensor]] = None,
               skip_layers: Sequence[str] = ()) -> bytes:
    """The bytes of a map file for ``voxel_map`` (its persisted layers but ``skip_layers``) with caller ``info``
    (JSON-serialisable) and extra tensors (not row-aligned)."""
    cake = voxel_map.cake
    tensors = {k: v.detach().cpu().contiguous() for k, v in cake.state(skip_layers).items()}
    layers = {name: spec.to_json() for name, spec in cake.persisted(skip_layers).items()}
    for k, v in (extra or {}).items():
        if k in tensors:
            raise ValueError(f'extra tensor name {k!r} is reserved')
        tensors[k] = v.detach().cpu().contiguous()
    meta = {'format': MAP_FORMAT, 'format_version': str(MAP_FORMAT_VERSION),
            'voxel_size_m': repr(voxel_map.voxel_size_m), 'dim': str(voxel_map.dim), 'layers': json.dumps(layers),
            'info': json.dumps(info)}
    draft = st_save(tensors, metadata=meta)        # the tensor table and data do not depend on the metadata
    meta['payload_sha256'], meta['tensors_sha256'] = _payload_sha256(draft), _tensors_sha256(_parse_header(draft))
    return st_save(tensors, metadata=meta)


def _umask() -> int:
    """The process umask, read without changing it where /proc tells it (setting it is process-wide)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _file_mode(path: Path) -> int:
    """The permissions a plain ``open(path, 'wb')`` leaves: an existing file's own, else 0666 less the umask
    (mkstemp's 0600 would hide the file from a reader under another account)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_umask()


def write_atomic(path: str | Path, blob: bytes) -> None:
    """Write ``blob`` to ``path`` via a temporary file, fsync and rename (never a half-written ``path``), with the
    permissions a plain open() would give it (see :func:`_file_mode`). A symlink is written through, as open()
    does: its target is replaced, the link stays (``latest.ov3dmap`` -> a dated file)."""
    path = Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, 'wb') as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_map(path: str | Path, voxel_map: VoxelFeatureMap, info: dict,
             extra: Optional[Dict[str, torch.Tensor]] = None, skip_layers: Sequence[str] = ()) -> int:
    """Atomically write a map file (see :func:`encode_map`); returns its size in bytes."""
    blob = encode_map(voxel_map, info, extra, skip_layers)
    write_atomic(path, blob)
    return len(blob)


def read_header(blob: bytes, name: str = 'map file', payload_sha256: Optional[str] = None) -> dict:
    """Metadata of a map file's bytes, validated (format, version, checksum). ``blob`` may end after the header
    when ``payload_sha256`` (the SHA-256 of the rest of the file) is given."""
    header, meta = _format_header(blob, name)
    if meta.get('payload_sha256') != (payload_sha256 or _payload_sha256(blob)):
        raise MapFileError(f'{name}: checksum mismatch, the file is corrupt or truncated')
    if 'tensors_sha256' in meta and meta['tensors_sha256'] != _tensors_sha256(header):
        raise MapFileError(f'{name}: checksum mismatch of the tensor table (names, dtypes, shapes, offsets), the '
                           'header is corrupt or was edited')
    # the checksums cover neither the metadata nor an older file's tensor table: an edited header gets past them
    problem = _header_problem(meta, [k for k in header if k != '__metadata__'])
    if problem:
        raise MapFileError(f'{name}: invalid map header ({problem})')
    return meta


def _format_header(blob: bytes, name: str) -> Tuple[dict, dict]:
    """(safetensors header, its metadata) of bytes that start a file of this map format and version (they may end
    after the header); MapFileError naming what they are not."""
    if len(blob) < 8:
        raise MapFileError(f'{name}: too short to be a map file ({len(blob)} bytes)')
    (header_len,) = struct.unpack('<Q', blob[:8])
    if header_len > len(blob) - 8 or header_len > MAX_HEADER_BYTES:
        raise MapFileError(f'{name}: not a safetensors map file (bad header length)')
    try:
        header = _parse_header(blob)
        meta = header.get('__metadata__') or {}
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise MapFileError(f'{name}: not a safetensors map file ({e})') from e
    if not isinstance(meta, dict):
        raise MapFileError(f'{name}: not a safetensors map file (metadata is not an object)')
    if meta.get('format') != MAP_FORMAT:
        raise MapFileError(f'{name}: not an {MAP_FORMAT} file (format {meta.get("format")!r})')
    try:
        version = int(meta.get('format_version', -1))
    except (TypeError, ValueError):
        raise MapFileError(f'{name}: invalid map header (format_version {meta.get("format_version")!r} is not an '
                           'integer)') from None
    if version != MAP_FORMAT_VERSION:
        relation = 'newer' if version > MAP_FORMAT_VERSION else 'older'
        raise MapFileError(f'{name}: map format version {version} is {relation} than this ov3d_ros reads '
                           f'({MAP_FORMAT_VERSION})')
    return header, meta


def _header_problem(meta: dict, tensors: Sequence[str] = ()) -> Optional[str]:
    """What is wrong with the types and values of a map file's metadata (None: usable), so every reader gets a
    MapFileError rather than a TypeError, a KeyError or safetensors' own exception, or a NaN voxel size that
    places every voxel at NaN. ``tensors``: the names of the file's tensors."""
    odd = [k for k, v in meta.items() if not isinstance(v, str)]
    if odd:                 # safetensors refuses the whole header then
        return f'metadata values must be strings, got {odd[0]} = {meta[odd[0]]!r}'
    try:
        voxel_size = float(meta.get('voxel_size_m'))
        dim = int(meta.get('dim'))
    except (TypeError, ValueError):
        return f'voxel_size_m {meta.get("voxel_size_m")!r} or dim {meta.get("dim")!r} is not a number'
    if not math.isfinite(voxel_size) or voxel_size <= 0:
        return f'voxel_size_m must be a finite number > 0, got {voxel_size}'
    if dim < 1:
        return f'dim must be >= 1, got {dim}'
    try:
        layers = json.loads(meta['layers']) if 'layers' in meta else {}
        info = json.loads(meta.get('info', '{}'))
    except (TypeError, ValueError) as e:
        return f'layers or info is not JSON ({e})'
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        return 'layers must be an object of {name: {width, dtype, feature}}'
    for name, spec in layers.items():
        if not (_is_count(spec.get('width')) and isinstance(spec.get('dtype'), str)
                and isinstance(spec.get('feature', False), bool)):
            return (f'layers.{name} must be {{"width": integer >= 0, "dtype": name, "feature": true or false}}, got '
                    f'{json.dumps(spec)}')
        try:
            dtype_from_name(spec['dtype'])
        except ValueError as e:
            return f'layers.{name}: {e}'
    if not isinstance(info, dict):
        return f'info must be an object, got {type(info).__name__}'
    if 'keyframes' in info and not _is_count(info['keyframes']):
        return f'info.keyframes must be an integer >= 0, got {info["keyframes"]!r}'
    config = info.get('config', {})
    if not isinstance(config, dict) or not all(isinstance(v, dict) for v in config.values()):
        return 'info.config must be an object of {section: {key: value}}'
    for key in ('class_names', 'text_names', 'vocabulary'):
        names = info.get(key)
        if names is not None and not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            return f'info.{key} must be a list of strings'
    if 'text_names' in info and 'text_vectors' not in tensors:
        return 'info.text_names without a text_vectors tensor (the precomputed text table)'
    return None


def _is_count(value) -> bool:
    """Whether a JSON value is an integer >= 0 (not a bool, a float or a string)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def safetensors_metadata(path: str | Path) -> Optional[dict]:
    """The ``__metadata__`` of the safetensors header of the regular file ``path`` ({} when it has none); None
    when ``path`` is not a regular file or its first bytes are not a safetensors header. Only the header is read
    (a FIFO is not opened)."""
    if not os.path.isfile(path):       # also keeps a FIFO from blocking the open below
        return None
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            if len(head) < 8:
                return None
            (header_len,) = struct.unpack('<Q', head)
            if header_len > MAX_HEADER_BYTES:
                return None
            meta = json.loads(f.read(header_len)).get('__metadata__') or {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None


def is_map_file(path: str | Path) -> bool:
    """Whether ``path`` is a regular file whose safetensors header names the ov3d map format (any version; the
    payload is not read or checked, so a truncated or corrupt map still counts)."""
    meta = safetensors_metadata(path)
    return meta is not None and meta.get('format') == MAP_FORMAT


def check_replaceable(path: str | Path) -> None:
    """ValueError when ``path`` exists and is not an ov3d map: a map written there (a save, a merge, a tool's
    output) never replaces a file that is not one."""
    if os.path.lexists(path) and not is_map_file(path):
        raise ValueError(f'{path} exists and is not an ov3d map file; it is never replaced (choose another name or '
                         'remove it)')


def _read(path: Path) -> Tuple[bytes, dict]:
    """(the file's bytes, its validated metadata). A file that is not a map of this format and version is refused
    from its first bytes, before the rest is read (a multi-GB bag given by mistake is not read whole), as is
    anything but a regular file (a FIFO blocked the reader)."""
    if os.path.exists(path) and not os.path.isfile(path):
        raise MapFileError(f'{path}: not a regular file')
    try:
        with open(path, 'rb', buffering=0) as f:  # unbuffered: the whole-file read is one read (twice as fast)
            head = f.read(8)
            header_len = struct.unpack('<Q', head)[0] if len(head) == 8 else 0
            if header_len <= MAX_HEADER_BYTES:    # _format_header refuses a longer one
                head += f.read(header_len)
            _format_header(head, str(path))
            f.seek(0)
            blob = f.read()
    except OSError as e:
        raise MapFileError(f'{path}: cannot read ({e.strerror})') from e
    return blob, read_header(blob, str(path))


def _layer_names(meta: dict, names) -> Dict[str, dict]:
    """{layer: spec} of a file's row-aligned tensors; ``names``: the tensors it holds. Files written before the
    layer list: the fusion layers with the specs they have always been written with, and label_evidence (float,
    any width)."""
    if 'layers' in meta:
        return json.loads(meta['layers'])
    specs = VoxelFeatureMap(1.0, int(meta['dim']), capacity=16).cake.specs
    return {k: specs[k].to_json() if k in specs else {} for k in VoxelFeatureMap.FIELDS + (LEGACY_EVIDENCE,)
            if k in names}


def _read_head(path: Path) -> Tuple[bytes, dict]:
    """(the first bytes of a map file up to the end of its header, its validated metadata): the payload is
    checksummed 16 MB at a time, never held whole."""
    digest = hashlib.sha256()
    try:
        with open(path, 'rb') as f:
            head = f.read(8)
            header_len = struct.unpack('<Q', head)[0] if len(head) == 8 else 0
            if header_len <= MAX_HEADER_BYTES:    # read_header refuses a longer one
                head += f.read(header_len)
            _format_header(head, str(path))       # not a map: refused before the rest is read
            for chunk in iter(lambda: f.read(1 << 24), b''):
                digest.update(chunk)
    except OSError as e:
        raise MapFileError(f'{path}: cannot read ({e.strerror})') from e
    return head, read_header(head, str(path), digest.hexdigest())


FINITE_CHECK_ROWS = 1 << 16
"""Rows of a tensor checked for NaN and inf at a time (bounds the temporaries: 50 MB at 384 fp16 values a row)."""

_EXPONENT_BITS = {torch.float16: (torch.int16, 0x7C00), torch.bfloat16: (torch.int16, 0x7F80),
                  torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}
"""{float dtype: (integer dtype of its width, mask of its exponent bits)}: a value is NaN or inf exactly when all
its exponent bits are set."""


def _nonfinite_rows(t: torch.Tensor) -> int:
    """How many rows (entries along the first dimension) of a float tensor hold NaN or inf; 0 for other dtypes.
    Read as integers: the row's largest exponent field is all ones. 100 000 rows of 384 fp16 values on a CPU:
    84 against 240 ms with isfinite (which added a third to load_map's time)."""
    if not t.is_floating_point():
        return 0
    t = t.reshape(1) if t.dim() == 0 else t
    bits = _EXPONENT_BITS.get(t.dtype)
    bad = 0
    for start in range(0, t.shape[0], FINITE_CHECK_ROWS):
        part = t[start:start + FINITE_CHECK_ROWS].reshape(min(FINITE_CHECK_ROWS, t.shape[0] - start), -1)
        if part.numel() == 0:
            continue
        if bits is None:
            bad += int(torch.isfinite(part).logical_not_().any(1).sum())
        else:
            bad += int(part.contiguous().view(bits[0]).bitwise_and(bits[1]).amax(1).eq(bits[1]).sum())
    return bad


def _layers_problem(meta: dict, layers: Dict[str, dict], tensors: Dict[str, torch.Tensor]) -> Optional[str]:
    """What is wrong with a map file's layer tensors (None: usable): a layer listed but not stored, stored with
    another dtype or width than its ``layers`` entry says (an edited tensor table reads the same bytes as other
    values), with other rows than the keys, a feature layer not D wide, or NaN or inf in a float layer (no layer
    holds them by design: pooling would spread them over the map, and a merge over the merged one)."""
    missing = [k for k in layers if k not in tensors]
    if missing:
        return f'layers {missing} listed but not stored'
    rows, dim = (int(tensors['keys'].shape[0]) if 'keys' in tensors else None), int(meta['dim'])
    for name, spec in layers.items():
        t = tensors[name]
        dtype = str(t.dtype).replace('torch.', '')
        if 'dtype' in spec and dtype != spec['dtype']:
            return f'layer {name!r} is stored as {dtype}, its layers entry says {spec["dtype"]}'
        if t.dim() not in (1, 2) or (rows is not None and t.shape[0] != rows):
            return f'layer {name!r} has shape {tuple(t.shape)}, expected ({rows},) or ({rows}, width) like the keys'
        width = 0 if t.dim() == 1 else int(t.shape[1])
        if 'width' in spec and width != spec['width']:
            return f'layer {name!r} has shape {tuple(t.shape)}, its layers entry says width {spec["width"]}'
        if spec.get('feature') and width != dim:
            return f'feature layer {name!r} has shape {tuple(t.shape)}, expected width dim = {dim}'
        bad = _nonfinite_rows(t)
        if bad:
            return f'layer {name!r} holds NaN or inf in {bad} of {t.shape[0]} rows'
    return None


def _extra_problem(info: dict, extra: Dict[str, torch.Tensor]) -> Optional[str]:
    """What is wrong with a map file's extra tensors (None: usable): NaN or inf in one (a projection or text table
    that carries them into every feature or score), a precomputed text table that does not match its names."""
    for name, t in extra.items():
        bad = _nonfinite_rows(t)
        if bad:
            return f'tensor {name!r} holds NaN or inf in {bad} of {t.shape[0] if t.dim() else 1} rows'
    if 'text_names' in info:
        from ov3d_ros.core.features.precomputed import check_text_table
        t = extra['text_vectors']          # read_header made sure the file holds it
        try:
            check_text_table(info['text_names'], t.float().numpy(), 'text table (info.text_names, text_vectors)')
        except ValueError as e:
            return str(e)
    return None


def load_extra(path: str | Path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """A map file's info dict and extra tensors (those that are not rows: the projection, a text table), on the
    CPU, without building its voxel map or holding the file in memory; the whole file is still checked (format,
    version, checksum, the extra tensors' values). Raises MapFileError."""
    path = Path(path)
    head, meta = _read_head(path)
    try:
        names = [k for k in json.loads(head[8:]) if k != '__metadata__']
        layers = _layer_names(meta, names)
        with safe_open(str(path), framework='pt') as f:
            extra = {k: f.get_tensor(k) for k in names if k not in layers}
        info = json.loads(meta['info'])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, OSError, SafetensorError) as e:
        raise MapFileError(f'{path}: invalid map contents ({e})') from e
    problem = _extra_problem(info, extra)
    if problem:
        raise MapFileError(f'{path}: invalid map contents ({problem})')
    return info, extra


def load_map(path: str | Path, device: torch.device | str = 'cpu') -> Tuple[VoxelFeatureMap, dict, Dict[str, torch.Tensor]]:
    """Read a map file: (voxel map on ``device`` with every layer of the file in its cake, info dict, extra
    tensors). Every layer is checked against its ``layers`` entry and for NaN and inf (see :func:`_layers_problem`)
    before it is used. Raises MapFileError."""
    path = Path(path)
    blob, meta = _read(path)
    try:
        tensors = st_load(blob)     # SafetensorError for a tensor table that does not fit the data
        layers = _layer_names(meta, tensors)
        info = json.loads(meta['info'])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError, SafetensorError) as e:
        raise MapFileError(f'{path}: invalid map contents ({e})') from e
    extra = {k: v for k, v in tensors.items() if k not in layers}
    problem = _layers_problem(meta, layers, tensors) or _extra_problem(info, extra)
    if problem:
        raise MapFileError(f'{path}: invalid map contents ({problem})')
    try:
        vmap = VoxelFeatureMap(float(meta['voxel_size_m']), int(meta['dim']), device, capacity=16)
        vmap.load_state({k: tensors[k] for k in layers},
                        feature=[k for k, spec in layers.items() if spec.get('feature') and k != 'features'])
    except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        raise MapFileError(f'{path}: invalid map contents ({e})') from e
    return vmap, info, extra
