"""Train the student affinity network (GeoPurify distillation) on mapped scenes.

    ov3d train-affinity scenes/scene_00{00..19} --val scenes/scene_002{0..3} --out affinity.safetensors \\
        --features simulated --teacher labels

Each input is mapped (raw fusion, the config's feature source); the teacher is either the ground-truth
instances of gt_points.npz (``labels``: voxels of one instance are similar) or per-point features exported
from any 3D model (``features``: ``teacher_features.npz`` with xyz (N, 3), features (N, F) in each input).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.cli.common import (CliError, add_config_arguments, add_input_arguments, build_config, make_mapper,
                                 map_input, open_input)
from ov3d_ros.core.purification.distill import DistillConfig, SceneBatch, Teacher, train
from ov3d_ros.core.mapper import resolve_device
from ov3d_ros.core.purification.graph import ball_offsets, estimate_normals, neighbour_rows
from ov3d_ros.core.purification.student import INPUTS, StudentAffinityNet, StudentConfig, save_student
from ov3d_ros.core.voxel_map import unpack_keys


def add_arguments(p) -> None:
    p.add_argument('inputs', nargs='+', help='training scenes (dataset folders or bags)')
    p.add_argument('--val', nargs='*', default=[], help='validation scenes (not trained on)')
    p.add_argument('--out', required=True, type=Path, help='checkpoint to write (.safetensors)')
    p.add_argument('--teacher', choices=('labels', 'features'), default='labels', help='teacher source')
    p.add_argument('--net-inputs', default='features,color,normal', help=f'network inputs, subset of {",".join(INPUTS)}')
    p.add_argument('--width', type=int, default=32)
    p.add_argument('--blocks', type=int, default=4)
    p.add_argument('--embed-dim', type=int, default=64)
    p.add_argument('--steps', type=int, default=600)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--anchors', type=int, default=4096)
    p.add_argument('--seed', type=int, default=0)
    add_config_arguments(p)
    add_input_arguments(p)


def voxel_teacher(mapper, source, kind: str) -> Teacher:
    """Per-voxel teacher from the input's ground truth (nearest GT point within a voxel) or exported features."""
    from scipy.spatial import cKDTree
    centres = mapper.map.centers().cpu().numpy()
    if kind == 'labels':
        gt = source.gt_points()
        if 'instance' not in gt:
            raise CliError(f'{source.gt_path}: the labels teacher needs an instance array')
        dist, idx = cKDTree(gt['xyz']).query(centres, distance_upper_bound=mapper.map.voxel_size_m)
        seg = np.where(np.isfinite(dist), np.asarray(gt['instance'])[np.minimum(idx, len(gt['xyz']) - 1)], -1)
        return Teacher(segments=torch.as_tensor(seg, dtype=torch.int64))
    base = source.path if source.path.is_dir() else source.path.parent
    path = base / 'teacher_features.npz'
    if not path.exists():
        raise CliError(f'{path}: the features teacher needs per-point features (xyz (N, 3), features (N, F))')
    with np.load(path) as z:
        xyz, feats = z['xyz'], z['features'].astype(np.float32)
    dist, idx = cKDTree(xyz).query(centres)
    return Teacher(features=F.normalize(torch.from_numpy(feats[idx]), dim=-1))


def prepare(path, args, cfg, student_cfg: StudentConfig, net: StudentAffinityNet) -> SceneBatch:
    from scipy.spatial import cKDTree
    source = open_input(path, args)
    mapper = make_mapper(cfg, source)
    stats = map_input(mapper, source, args.quiet)
    vmap, rows = mapper.map, torch.arange(mapper.map.size)
    offsets = ball_offsets(cfg.purify.radius_vox)
    normals = estimate_normals(vmap, rows, neighbour_rows(vmap, rows, offsets), offsets)
    inputs = net.voxel_inputs(vmap, rows, normals)
    _, knn = cKDTree(vmap.centers().cpu().numpy()).query(vmap.centers().cpu().numpy(), k=DistillConfig.k_spatial + 1)
    print(json.dumps({'scene': str(path), 'voxels': vmap.size, 'keyframes': stats['keyframes']}))
    return SceneBatch(Path(path).name, unpack_keys(vmap.keys[:vmap.size]).cpu(), inputs.cpu(),
                      torch.as_tensor(knn[:, 1:], dtype=torch.int64), voxel_teacher(mapper, source, args.teacher))


def run(args) -> int:
    cfg = build_config(args)
    cfg.purify.enabled = False
    inputs = tuple(s.strip() for s in args.net_inputs.split(',') if s.strip())
    torch.manual_seed(args.seed)
    probe = make_mapper(cfg, open_input(args.inputs[0], args)) if 'features' in inputs else None
    student_cfg = StudentConfig(feature_dim=probe.map.dim if probe else 0, inputs=inputs, width=args.width,
                                blocks=args.blocks, embed_dim=args.embed_dim, voxel_size_m=cfg.map.voxel_size_m)
    net = StudentAffinityNet(student_cfg).to(resolve_device(cfg.map.device))   # CUDA when present
    scenes = [prepare(p, args, cfg, student_cfg, net) for p in args.inputs]
    val = [prepare(p, args, cfg, student_cfg, net) for p in args.val]
    dcfg = DistillConfig(steps=args.steps, lr=args.lr, anchors=args.anchors, seed=args.seed)
    history = train(net, scenes, val, dcfg)
    notes = {'train': [s.name for s in scenes], 'val': [s.name for s in val], 'teacher': args.teacher,
             'distill': asdict(dcfg), 'features': cfg.features.source, 'history': history[-1:] if history else []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_student(args.out, net, notes)
    print(json.dumps({'checkpoint': str(args.out), 'bytes': args.out.stat().st_size, **(history[-1] if history else {})}))
    return 0
