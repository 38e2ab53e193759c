"""Map dataset folders or rosbag2 recordings into map files (several inputs: one task each, on Ray).

    ov3d map scenes/scene_0000 --out scene_0000.ov3dmap --features simulated
    ov3d map robot.mcap --out robot.ov3dmap --config config/mapping.yaml --pose-source tf
    ov3d map 'scenes/scene_*' --out maps/ --features simulated          # one map per input: maps/NAME.ov3dmap
    ov3d map 'scenes/scene_*' --out maps/ --address auto                # on an existing Ray cluster
    ov3d map scenes/scene_0000 --out first_half.ov3dmap --frames 0:30   # a frame range
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Optional

from ov3d_ros.cli.batch import Job, add_batch_arguments, expand_inputs, report_failures, run_jobs
from ov3d_ros.cli.common import (CliError, add_config_arguments, add_input_arguments, build_config, check_output,
                                 make_mapper, map_input, open_input)


def add_arguments(p) -> None:
    p.add_argument('inputs', nargs='+', metavar='input',
                   help='dataset folder (ScanNet layout) or rosbag2 (directory, .mcap, .db3); several, or glob '
                        'patterns, for a batch')
    p.add_argument('--out', required=True, type=Path,
                   help='map file to write (.ov3dmap, safetensors); with several inputs a folder that gets '
                        'one NAME.ov3dmap per input')
    add_config_arguments(p)
    add_input_arguments(p)
    add_batch_arguments(p)


def map_one(path: str, out: Path, args: argparse.Namespace) -> dict:
    """Map one input into ``out``; returns the summary printed for it."""
    cfg = build_config(args)
    source = open_input(path, args)
    mapper = make_mapper(cfg, source)
    stats = map_input(mapper, source, args.quiet, getattr(args, 'frames', None))
    stats['bytes'] = mapper.save(out)
    skipped = getattr(source.reader, 'skipped', None)     # frames the reader left out: reason -> count
    return {'map': str(out), 'features': mapper.extractor.name, **stats, **({'skipped': skipped} if skipped else {})}


def output_paths(inputs, out: Path, basis: Optional[Path] = None):
    """Map file per input: ``out`` itself for one input, else ``out/NAME.ov3dmap`` (names must differ); each may
    be new or an ov3d map, never another file, nor an input or the map.compress_basis file ``basis`` that the
    mapping reads (see :func:`check_output`)."""
    if len(inputs) == 1 and not out.is_dir():
        return [check_output(out, [Path(inputs[0]), basis])]
    if out.suffix == '.ov3dmap':
        raise CliError(f'{len(inputs)} inputs need a folder for --out, got the file name {out}')
    names = [Path(p.rstrip('/')).stem if Path(p).suffix in ('.mcap', '.db3') else Path(p.rstrip('/')).name
             for p in inputs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise CliError(f'several inputs are called {", ".join(dupes)}; map them into different folders')
    return [check_output(out / f'{n}.ov3dmap', [basis]) for n in names]


def run(args) -> int:
    inputs = expand_inputs(args.inputs)
    basis = build_config(args).map.compress_basis           # read by every mapping: no output may replace it
    outs = output_paths(inputs, args.out, Path(os.path.expanduser(basis)) if basis else None)
    if len(inputs) == 1:
        print(json.dumps(map_one(inputs[0], outs[0], args)))
        return 0
    worker_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != 'run'})
    worker_args.quiet = True                          # one progress bar over inputs, none per frame
    jobs = [Job(p, map_one, (p, o, worker_args)) for p, o in zip(inputs, outs)]

    def done(o):
        if o.ok:
            print(json.dumps(o.result), flush=True)
        else:
            print(f'ov3d map: {o.name}: {o.error}', file=sys.stderr, flush=True)

    outcomes = run_jobs(jobs, args, build_config(args).map.device, done, 'maps')
    return report_failures(outcomes, 'map')
