"""Train the self-supervised 3D teacher (no labels, no 2D features) on scenes.

    ov3d train-teacher scenes/scene_00?? --out teacher.safetensors --config config/eval.yaml --steps 400

Each input (dataset folder or bag) is fused into occupancy, colour and normals only (cached with --cache); the
teacher learns features that agree on the same world voxel across two augmented partial scans
(ov3d_ros/core/purification/teacher.py). The checkpoint's metadata records its config, the training data, the
history and this command; `ov3d train-affinity --teacher ssl --teacher-checkpoint FILE` distils the student
from it.
"""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ov3d_ros.cli.common import (CliError, add_config_arguments, add_input_arguments, build_config, cached_voxel_scene,
                                 check_checkpoint_output, int_at_least, positive_float)
from ov3d_ros.core.mapper import resolve_device
from ov3d_ros.core.purification.teacher import (SSLConfig, TeacherConfig, TeacherNet, is_teacher_checkpoint,
                                                matching_accuracy, save_teacher, train_teacher)


def add_arguments(p) -> None:
    p.add_argument('inputs', nargs='+', help='training scenes (dataset folders or bags); no labels are read')
    p.add_argument('--val', nargs='*', default=[], help='scenes for the matching accuracy (not trained on)')
    p.add_argument('--out', required=True, type=Path,
                   help='checkpoint to write (.safetensors, atomically); it replaces only a teacher checkpoint')
    p.add_argument('--cache', type=Path, help='folder for the fused voxel scenes (reused by later runs)')
    p.add_argument('--width', type=int_at_least(1), default=TeacherConfig.width)
    # a unit embedding of one dimension is only its sign
    p.add_argument('--out-dim', type=int_at_least(2), default=TeacherConfig.out_dim)
    p.add_argument('--steps', type=int_at_least(1), default=SSLConfig.steps)
    p.add_argument('--lr', type=positive_float, default=SSLConfig.lr)
    p.add_argument('--pairs', type=int_at_least(1), default=SSLConfig.pairs, help='corresponding voxels per step')
    p.add_argument('--max-voxels', type=int_at_least(1), default=SSLConfig.max_voxels,
                   help='crop views to this many voxels')
    p.add_argument('--seed', type=int, default=0)
    add_config_arguments(p)
    add_input_arguments(p)


def run(args) -> int:
    # before any work: never an input's file, a map or another file; a folder or an unwritable path is refused now
    check_checkpoint_output(args.out, [Path(p) for p in args.inputs + args.val + args.config], 'teacher checkpoint',
                            is_teacher_checkpoint)
    cfg = build_config(args)
    t0 = time.perf_counter()
    scenes = [cached_voxel_scene(p, args, cfg, args.cache) for p in args.inputs]
    val = [cached_voxel_scene(p, args, cfg, args.cache) for p in args.val]
    prep_s = time.perf_counter() - t0
    empty = [s.name for s in scenes if len(s) == 0 or s.num_keyframes < 2]
    if empty:
        raise CliError(f'scenes without voxels or with fewer than 2 keyframes: {", ".join(empty[:5])}')
    torch.manual_seed(args.seed)
    net = TeacherNet(TeacherConfig(width=args.width, out_dim=args.out_dim, voxel_size_m=cfg.map.voxel_size_m))
    net = net.to(resolve_device(cfg.map.device))
    scfg = SSLConfig(steps=args.steps, lr=args.lr, pairs=args.pairs, max_voxels=args.max_voxels, seed=args.seed)
    before = matching_accuracy(net, val, scfg) if val else None
    history = train_teacher(net, scenes, scfg, val)
    voxels = sum(len(s) for s in scenes)
    notes = {'command': 'ov3d ' + shlex.join(getattr(args, 'argv', []) or []), 'labels_used': 'none',
             'train': [s.name for s in scenes], 'train_voxels': voxels, 'val': [s.name for s in val],
             'ssl': asdict(scfg), 'val_match_acc_at_init': before, 'history': history,
             'prepare_s': round(prep_s, 1)}
    save_teacher(args.out, net, notes)
    print(json.dumps({'checkpoint': str(args.out), 'train_scenes': len(scenes), 'train_voxels': voxels,
                      'val_match_acc_at_init': before, **history[-1]}))
    return 0
