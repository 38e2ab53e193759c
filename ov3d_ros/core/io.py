"""Array files: binary little-endian PLY point clouds (xyz, colour and an optional scalar per point) and the
.npz archives the tools read (points, ground truth, text tables); text files given by users (read_text)."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

NPY_MAGIC = b'\x93NUMPY'
ZIP_MAGICS = (b'PK\x03\x04', b'PK\x05\x06')      # a zip with members, an empty zip


def read_text(path: str | Path, what: str, holds: str, error=ValueError) -> str:
    """The text of a user's file (a vocabulary, a config, a transform); ``error`` naming ``what`` it is when it
    cannot be read, or ``holds`` (what such a file holds) when it is not text."""
    try:
        return Path(path).read_text()
    except OSError as e:
        raise error(f'{path}: cannot read {what} ({e.strerror})') from None
    except UnicodeDecodeError:
        raise error(f'{path}: not a text file ({holds})') from None


def write_ply(path: str | Path, xyz: np.ndarray, rgb: Optional[np.ndarray] = None,
              scalar: Optional[np.ndarray] = None, scalar_name: str = 'score') -> None:
    """Write (N, 3) points with optional (N, 3) uint8 colours and an (N,) float scalar to a binary PLY
    (atomically: a crash leaves the previous file)."""
    n = len(xyz)
    fields = [('x', '<f4'), ('y', '<f4'), ('z', '<f4')]
    if rgb is not None:
        fields += [('red', 'u1'), ('green', 'u1'), ('blue', 'u1')]
    if scalar is not None:
        fields += [(scalar_name, '<f4')]
    arr = np.empty(n, dtype=fields)
    arr['x'], arr['y'], arr['z'] = np.asarray(xyz, dtype=np.float32).T if n else ([], [], [])
    if rgb is not None and n:
        arr['red'], arr['green'], arr['blue'] = np.asarray(rgb, dtype=np.uint8).T
    if scalar is not None:
        arr[scalar_name] = scalar
    ply_types = {'<f4': 'float', 'u1': 'uchar'}
    header = ['ply', 'format binary_little_endian 1.0', f'element vertex {n}']
    header += [f'property {ply_types[t]} {name}' for name, t in fields] + ['end_header']
    from ov3d_ros.core.map_io import write_atomic
    write_atomic(path, ('\n'.join(header) + '\n').encode('ascii') + arr.tobytes())


def read_ply(path: str | Path) -> Tuple[np.ndarray, np.ndarray]:
    """Read a PLY written by :func:`write_ply`; returns (structured array of the vertices, field names)."""
    data = Path(path).read_bytes()
    end = data.index(b'end_header\n') + len(b'end_header\n')
    lines = data[:end].decode('ascii').splitlines()
    if lines[0] != 'ply' or lines[1] != 'format binary_little_endian 1.0':
        raise ValueError(f'{path}: not a binary little-endian PLY')
    n = int(next(line.split()[2] for line in lines if line.startswith('element vertex')))
    types = {'float': '<f4', 'uchar': 'u1'}
    fields = [(line.split()[2], types[line.split()[1]]) for line in lines if line.startswith('property')]
    arr = np.frombuffer(data[end:], dtype=fields, count=n)
    return arr, np.array([f[0] for f in fields])


def read_npz(path: str | Path, required: Sequence[str] = ()) -> Dict[str, np.ndarray]:
    """{name: array} of every array in the .npz archive at ``path``. ValueError naming the file when it cannot be
    read, is not an .npz archive (an empty file, a plain .npy, other bytes), holds object arrays (never
    unpickled) or lacks one of the ``required`` arrays."""
    path = Path(path)
    needs = f'; needs arrays {", ".join(required)}' if required else ''
    try:
        with open(path, 'rb') as f:
            magic = f.read(len(NPY_MAGIC))
    except OSError as e:
        raise ValueError(f'{path}: cannot read ({e.strerror})') from None
    if not magic.startswith(ZIP_MAGICS):
        what = 'an empty file' if not magic else 'a plain .npy array' if magic == NPY_MAGIC else 'another kind of file'
        raise ValueError(f'{path}: not an .npz archive ({what}{needs})')
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, NotImplementedError) as e:
        raise ValueError(f'{path}: unreadable .npz archive ({e})') from None
    missing = [k for k in required if k not in arrays]
    if missing:
        raise ValueError(f'{path}: missing array {", ".join(missing)}{needs}')
    return arrays
