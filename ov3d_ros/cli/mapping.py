"""Map a dataset folder or rosbag2 recording into a map file.

    ov3d map scenes/scene_0000 --out scene_0000.ov3dmap --features simulated
    ov3d map robot.mcap --out robot.ov3dmap --config config/mapping.yaml --pose-source tf
"""
from __future__ import annotations

import json
from pathlib import Path

from ov3d_ros.cli.common import (add_config_arguments, add_input_arguments, build_config, make_mapper, map_input,
                                 open_input)


def add_arguments(p) -> None:
    p.add_argument('input', help='dataset folder (ScanNet layout) or rosbag2 (directory, .mcap, .db3)')
    p.add_argument('--out', required=True, type=Path, help='map file to write (.ov3dmap, safetensors)')
    add_config_arguments(p)
    add_input_arguments(p)


def run(args) -> int:
    cfg = build_config(args)
    source = open_input(args.input, args)
    mapper = make_mapper(cfg, source)
    stats = map_input(mapper, source, args.quiet)
    stats['bytes'] = mapper.save(args.out)
    print(json.dumps({'map': str(args.out), 'features': mapper.extractor.name, **stats}))
    return 0
