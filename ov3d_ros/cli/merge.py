"""Merge map files (several robots or sessions) into one map file.

    ov3d merge a.ov3dmap b.ov3dmap --out merged.ov3dmap                       # maps in one frame
    ov3d merge a.ov3dmap b.ov3dmap --out m.ov3dmap --transform 2 b_to_a.txt   # map 2 by a 4x4 (text or JSON)
    ov3d merge a.ov3dmap b.ov3dmap --out m.ov3dmap --pose 2 1.5 0 0 0 0 0.7071 0.7071   # x y z qx qy qz qw

Voxels are fused like observations (weighted means of features and colours, summed weights, counts and label
evidence); a transformed map is re-voxelised into the merged grid. Maps with different compression bases are
brought into one. Maps of other feature sources, dimensions, voxel sizes or vocabularies are refused.
"""
from __future__ import annotations

import json
from pathlib import Path

from ov3d_ros.cli.common import CliError, check_output
from ov3d_ros.core.merge import MergeError, merge_files, read_transform, transform_from_pose


def add_arguments(p) -> None:
    p.add_argument('maps', nargs='+', type=Path, help='map files written by `ov3d map` or the node')
    p.add_argument('--out', required=True, type=Path, help='merged map file to write (atomic)')
    p.add_argument('--transform', action='append', nargs=2, default=[], metavar=('N', 'FILE'),
                   help='transform of the N-th map (1-based) into the merged frame: a 4x4 matrix as text or JSON '
                        '(or JSON {"translation": [x,y,z], "rotation": [qx,qy,qz,qw]}); default identity')
    p.add_argument('--pose', action='append', nargs=8, default=[], metavar=('N', 'X', 'Y', 'Z', 'QX', 'QY', 'QZ', 'QW'),
                   help='transform of the N-th map as a translation and a quaternion')


def _index(n: str, count: int) -> int:
    try:
        i = int(n)
    except ValueError:
        raise CliError(f'map number must be an integer 1..{count}, got {n!r}') from None
    if not 1 <= i <= count:
        raise CliError(f'map number must be in 1..{count}, got {i}')
    return i - 1


def run(args) -> int:
    check_output(args.out, args.maps)
    transforms = [None] * len(args.maps)
    try:
        for n, path in args.transform:
            i = _index(n, len(args.maps))
            if transforms[i] is not None:
                raise CliError(f'map {i + 1} has two transforms')
            transforms[i] = read_transform(path)
        for n, *values in args.pose:
            i = _index(n, len(args.maps))
            if transforms[i] is not None:
                raise CliError(f'map {i + 1} has two transforms')
            try:
                transforms[i] = transform_from_pose(*[float(v) for v in values])
            except ValueError as e:
                raise CliError(f'--pose {n}: {e}') from e
        summary = merge_files(args.maps, args.out, transforms)
    except MergeError as e:
        raise CliError(str(e)) from e
    print(json.dumps(summary))
    return 0
