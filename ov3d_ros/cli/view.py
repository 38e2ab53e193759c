"""Serve a map in the browser (viser): coloured voxels, a query box that highlights the answer and boxes its
objects, the label volume's colours with their legend.

    ov3d view scene_0100.ov3dmap                 # then open http://localhost:8080
    ov3d view room.ov3dmap --port 8090 --host 0.0.0.0 --vocab names.txt
"""
from __future__ import annotations

import time
from pathlib import Path

from ov3d_ros.cli.common import int_at_least
from ov3d_ros.core.mapper import Mapper


def add_arguments(p) -> None:
    p.add_argument('map', type=Path, help='map file written by `ov3d map`, `ov3d merge` or the node')
    p.add_argument('--host', default='127.0.0.1', help='address to serve on (0.0.0.0: reachable from the network)')
    p.add_argument('--port', type=int, default=8080, help='port (default 8080; the next free one if taken)')
    p.add_argument('--vocab', type=Path, help='class names (one a line) for the label colours, when the map has none')
    p.add_argument('--max-points', type=int_at_least(1), default=400_000, help='voxels drawn at most (>= 1)')
    p.add_argument('--device', default='auto', help='torch device for queries')


def run(args) -> int:
    from ov3d_ros.tools.web_view import MapWebView, check_address
    check_address(args.host, args.port)           # before the map is read: a bad port or host fails at once
    mapper = Mapper.from_file(args.map, args.device)
    if args.vocab:
        from ov3d_ros.cli.label import read_vocab
        mapper.set_vocabulary(read_vocab(args.vocab))
    view = MapWebView(mapper, args.host, args.port, args.max_points)
    print(f'{args.map}: {mapper.map.size} voxels at {view.url} (Ctrl-C to stop)', flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        view.close()
