"""``ov3d`` entry point: one parser with a subcommand per tool.

    ov3d make-scenes --out scenes/ --count 10 --seed 0
    ov3d map scenes/scene_0000 --out scene_0000.ov3dmap --features simulated
    ov3d query scene_0000.ov3dmap "red chair" --out chair.ply
    ov3d label scene_0000.ov3dmap --vocab names.txt --points points.npz --out pred.npz
    ov3d eval scenes/scene_* --out results/ --features simulated
    ov3d train-teacher scenes/scene_00?? --out teacher.safetensors --config config/eval.yaml
    ov3d train-affinity scenes/scene_000? --out affinity.safetensors --teacher ssl --teacher-checkpoint teacher.safetensors
    ov3d merge robot_a.ov3dmap robot_b.ov3dmap --out building.ov3dmap --transform 2 b_to_a.txt
    ov3d view building.ov3dmap                                   # browser view on http://localhost:8080
"""
from __future__ import annotations

import argparse
import sys

from ov3d_ros.cli import evaluate, label, mapping, merge, query, scenes, train_affinity, train_teacher, view
from ov3d_ros.cli.common import CliError

COMMANDS = {'make-scenes': scenes, 'map': mapping, 'query': query, 'label': label, 'eval': evaluate,
            'train-teacher': train_teacher, 'train-affinity': train_affinity, 'merge': merge,
            'view': view}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='ov3d', description=__doc__.split('\n\n')[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split('\n\n', 1)[1])
    sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name, module in COMMANDS.items():
        p = sub.add_parser(name, help=module.__doc__.split('\n')[0], description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)     # recorded in checkpoints
    try:
        return int(args.run(args) or 0)
    except (CliError, ValueError, RuntimeError, OSError) as e:
        print(f'ov3d {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'ov3d {args.command}: interrupted', file=sys.stderr)
        return 130
