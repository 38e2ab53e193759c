"""Point cloud files: binary little-endian PLY with xyz, colour and an optional scalar per point."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np


def write_ply(path: str | Path, xyz: np.ndarray, rgb: Optional[np.ndarray] = None,
              scalar: Optional[np.ndarray] = None, scalar_name: str = 'score') -> None:
    """Write (N, 3) points with optional (N, 3) uint8 colours and an (N,) float scalar to a binary PLY."""
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
    with open(path, 'wb') as f:
        f.write(('\n'.join(header) + '\n').encode('ascii'))
        f.write(arr.tobytes())


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
