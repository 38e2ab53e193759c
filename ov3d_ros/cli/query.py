"""Segment a saved map by text and write the answer as a PLY point cloud.

    ov3d query scene_0000.ov3dmap "red chair" --out chair.ply --negatives wall floor
"""
from __future__ import annotations

import json
from pathlib import Path

from ov3d_ros.cli.common import check_output, say_once
from ov3d_ros.core.io import write_ply
from ov3d_ros.core.mapper import Mapper


def add_arguments(p) -> None:
    p.add_argument('map', type=Path, help='map file written by `ov3d map` or the node')
    p.add_argument('text', help='what to look for, e.g. "red chair"')
    p.add_argument('--out', required=True, type=Path, help='PLY file for the segmented points')
    p.add_argument('--negatives', nargs='*', default=None, help='negative texts (default: the config\'s)')
    p.add_argument('--threshold', type=float, default=0.0, help='score threshold (0 = config default)')
    p.add_argument('--device', default='auto', help='torch device')


def run(args) -> int:
    check_output(args.out, [args.map], 'PLY')
    mapper = Mapper.from_file(args.map, args.device)
    if not args.negatives and not mapper.extractor.uses_templates:
        # a fixed text table: the default negatives it lacks are left out (see MapSnapshot.negatives_for)
        negs = mapper.view(refresh=False).negatives_for(args.text, [])
        if len(negs) < len(mapper.cfg.query.default_negatives):
            say_once('note', f'negatives {negs}: the default negatives that the map\'s text table holds')
    seg = mapper.segment(args.text, args.negatives, args.threshold)
    write_ply(args.out, seg.xyz, seg.rgb, seg.scores)
    print(json.dumps({'text': args.text, 'points': len(seg.xyz), 'out': str(args.out),
                      'max_score': float(seg.scores.max()) if len(seg.scores) else None}))
    return 0
