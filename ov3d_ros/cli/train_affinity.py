"""Train the student affinity network (GeoPurify distillation) from a 3D teacher.

    ov3d train-teacher scenes/scene_00?? --out teacher.safetensors --config config/eval.yaml
    ov3d train-affinity scenes/scene_0000 --out affinity.safetensors --config config/eval.yaml \\
        --teacher ssl --teacher-checkpoint teacher.safetensors

Teachers (``--teacher``):
- ``ssl`` (default): the frozen self-supervised 3D teacher of ``ov3d train-teacher`` run on each scene's voxels
  (no labels anywhere);
- ``features``: per-point features exported from any 3D self-supervised model (e.g. Sonata / PTv3), as
  ``teacher_features.npz`` in each input: ``xyz`` (N, 3) float32 world-frame points, ``features`` (N, F) float;
  each voxel takes the feature of its nearest point;
- ``labels``: the ground-truth instances of gt_points.npz -- an ORACLE upper bound for ablations (3D
  annotation), never the shipped model; its checkpoint says so in its metadata (``oracle: true``).

The default student reads geometry only (``--net-inputs color,normal``): it never sees the 2D features, so one
checkpoint serves every feature source and dimension. With ``features`` among the inputs each scene is mapped
with the config's feature source and the student is tied to that feature space.
"""
from __future__ import annotations

import json
import shlex
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.cli.common import (CliError, add_config_arguments, add_input_arguments, build_config,
                                 cached_voxel_scene, check_checkpoint_output, int_at_least, make_mapper, map_input,
                                 open_input, positive_float)
from ov3d_ros.core.purification.distill import DistillConfig, SceneBatch, Teacher, train
from ov3d_ros.core.mapper import resolve_device
from ov3d_ros.core.purification.graph import ball_offsets, estimate_normals, neighbour_rows
from ov3d_ros.core.purification.student import (INPUTS, StudentAffinityNet, StudentConfig, is_student_checkpoint,
                                                save_student)
from ov3d_ros.core.voxel_map import unpack_keys


ORACLE_NOTE = ('ORACLE upper bound: distilled from ground-truth instance segments (3D annotation); '
               'not label-free, not for shipping')


def add_arguments(p) -> None:
    p.add_argument('inputs', nargs='+', help='training scenes (dataset folders or bags)')
    p.add_argument('--val', nargs='*', default=[], help='validation scenes (not trained on)')
    p.add_argument('--out', required=True, type=Path,
                   help='checkpoint to write (.safetensors, atomically); it replaces only a student checkpoint')
    p.add_argument('--teacher', choices=('ssl', 'features', 'labels'), default='ssl',
                   help='ssl: the self-supervised 3D teacher of --teacher-checkpoint (label-free, default); '
                        'features: teacher_features.npz exported from any 3D SSL model; labels: ground-truth '
                        'instances -- ORACLE upper bound for ablations only, never shipped')
    p.add_argument('--teacher-checkpoint', type=Path, help='teacher of --teacher ssl (from ov3d train-teacher)')
    p.add_argument('--teacher-train-voxels', type=int_at_least(0), default=0,
                   help='voxels the teacher was trained on, for the data fraction (default: from the teacher '
                        'checkpoint of --teacher ssl)')
    p.add_argument('--net-inputs', default='color,normal',
                   help=f'network inputs, subset of {",".join(INPUTS)} (default geometry only: serves any features)')
    p.add_argument('--cache', type=Path, help='folder for the fused voxel scenes (shared with ov3d train-teacher)')
    p.add_argument('--tile-voxels', type=int_at_least(0), default=15000,
                   help='split training scenes into spatial tiles of at most this many voxels (cheaper steps; the '
                        'teacher still sees the whole scene; 0 = whole scenes)')
    p.add_argument('--max-tiles', type=int_at_least(0), default=0,
                   help='train on only the first N tiles of each training scene (a smaller data fraction; 0 = all)')
    p.add_argument('--teacher-clusters', type=int_at_least(0), default=0,
                   help='ssl / features teachers: k-means the teacher features of each scene into this many '
                        'clusters and distil from the clusters as segments (0 = from the features)')
    p.add_argument('--width', type=int_at_least(1), default=16)
    p.add_argument('--blocks', type=int_at_least(0), default=2)
    p.add_argument('--embed-dim', type=int_at_least(2), default=32)      # a unit embedding of 1 is its sign
    p.add_argument('--steps', type=int_at_least(1), default=300)
    p.add_argument('--lr', type=positive_float, default=2e-3)
    p.add_argument('--anchors', type=int_at_least(1), default=2048)
    p.add_argument('--seed', type=int, default=0)
    add_config_arguments(p)
    add_input_arguments(p)


def voxel_teacher(centres: np.ndarray, voxel_size_m: float, source, args, coords=None, colors=None,
                  normals=None, teacher_net=None) -> Teacher:
    """Per-voxel teacher of voxel ``centres`` (N, 3): the SSL network's features, exported per-point features
    (nearest point) or ground-truth instances (nearest GT point within a voxel; oracle)."""
    from scipy.spatial import cKDTree
    kind = args.teacher
    if kind == 'ssl':
        return Teacher(features=teacher_net.features(coords, colors, normals))
    if kind == 'labels':
        gt = source.gt_points()
        if 'instance' not in gt:
            raise CliError(f'{source.gt_path}: the labels teacher needs an instance array')
        dist, idx = cKDTree(gt['xyz']).query(centres, distance_upper_bound=voxel_size_m)
        seg = np.where(np.isfinite(dist), np.asarray(gt['instance'])[np.minimum(idx, len(gt['xyz']) - 1)], -1)
        return Teacher(segments=torch.as_tensor(seg, dtype=torch.int64))
    base = source.path if source.path.is_dir() else source.path.parent
    path = base / 'teacher_features.npz'
    if not path.exists():
        raise CliError(f'{path}: the features teacher needs per-point features (xyz (N, 3), features (N, F))')
    from ov3d_ros.core.io import read_npz
    try:
        z = read_npz(path, ('xyz', 'features'))
    except ValueError as e:
        raise CliError(str(e)) from None
    xyz, feats = z['xyz'], z['features'].astype(np.float32)
    if not np.all(np.isfinite(xyz)) or not np.all(np.isfinite(feats)):
        raise CliError(f'{path}: xyz and features must be finite (NaN or inf in them)')
    if xyz.ndim != 2 or xyz.shape[1] != 3 or len(xyz) != len(feats) or len(xyz) == 0:
        raise CliError(f'{path}: xyz must be (N, 3) and features (N, F) with the same N > 0')
    dist, idx = cKDTree(xyz).query(centres)
    return Teacher(features=F.normalize(torch.from_numpy(feats[idx]), dim=-1))


def kmeans_segments(features: torch.Tensor, k: int, seed: int = 0, iterations: int = 15) -> torch.Tensor:
    """(N,) int64 cluster ids of unit ``features`` (N, F): spherical k-means (k-means++-like seeding)."""
    gen = torch.Generator().manual_seed(seed)
    x = F.normalize(features.float(), dim=1)
    centres = x[torch.randperm(len(x), generator=gen)[:1]]
    while len(centres) < min(k, len(x)):          # seed far from the chosen centres
        d = 1 - (x @ centres.T).max(1).values
        centres = torch.cat([centres, x[torch.multinomial(d.clamp_min(1e-9), 1, generator=gen)]])
    for _ in range(iterations):
        ids = (x @ centres.T).argmax(1)
        sums = torch.zeros_like(centres).index_add_(0, ids, x)
        centres = torch.where(sums.norm(dim=1, keepdim=True) > 0, F.normalize(sums, dim=1), centres)
    return (x @ centres.T).argmax(1)


def spatial_tiles(coords: torch.Tensor, max_voxels: int) -> list:
    """Index tensors splitting ``coords`` (N, 3) by recursive median cuts along x / y into tiles of at most
    ``max_voxels`` voxels."""
    if max_voxels <= 0 or len(coords) <= max_voxels:
        return [torch.arange(len(coords))]
    out, todo = [], [torch.arange(len(coords))]
    while todo:
        idx = todo.pop()
        if len(idx) <= max_voxels:
            out.append(idx)
            continue
        c = coords[idx].float()
        axis = int(torch.argmax(c[:, :2].max(0).values - c[:, :2].min(0).values))
        order = torch.argsort(c[:, axis], stable=True)
        half = len(idx) // 2
        todo += [idx[order[:half]], idx[order[half:]]]
    return out


def prepare(path, args, cfg, net: StudentAffinityNet, teacher_net=None) -> list:
    from scipy.spatial import cKDTree
    source = open_input(path, args)
    vs = cfg.map.voxel_size_m
    if net.reads_features:          # map with the feature source: the student reads the fused features
        mapper = make_mapper(cfg, source)
        map_input(mapper, source, args.quiet, getattr(args, 'frames', None))
        vmap, rows = mapper.map, torch.arange(mapper.map.size)
        offsets = ball_offsets(cfg.purify.radius_vox)
        normals = estimate_normals(neighbour_rows(vmap, rows, offsets), offsets)
        coords, colors = unpack_keys(vmap.keys[:vmap.size]).cpu(), vmap.colors[:vmap.size].cpu()
        inputs = net.voxel_inputs(vmap, rows, normals)
    else:                           # geometry only: occupancy, colour, normals (no 2D features needed)
        scene = cached_voxel_scene(path, args, cfg, args.cache)
        coords, colors, normals = scene.coords, scene.colors, scene.normals
        inputs = net.assemble_inputs(colors, normals)
    centres = ((coords.float() + 0.5) * vs).numpy()
    teacher = voxel_teacher(centres, vs, source, args, coords, colors, normals.cpu(), teacher_net)
    if args.teacher_clusters > 0 and teacher.features is not None:
        teacher = Teacher(segments=kmeans_segments(teacher.features, args.teacher_clusters, args.seed))
    tiles = spatial_tiles(coords, args.tile_voxels)
    if getattr(args, 'max_tiles', 0) > 0:
        tiles = tiles[:args.max_tiles]
    print(json.dumps({'scene': str(path), 'voxels': len(coords), 'tiles': len(tiles)}))
    batches = []
    for t, idx in enumerate(tiles):
        k = min(DistillConfig.k_spatial, len(idx) - 1)
        _, knn = cKDTree(centres[idx.numpy()]).query(centres[idx.numpy()], k=k + 1)
        sub = Teacher(features=teacher.features[idx] if teacher.features is not None else None,
                      segments=teacher.segments[idx] if teacher.segments is not None else None)
        batches.append(SceneBatch(f'{Path(path).name}#{t}', coords[idx], inputs[idx].cpu(),
                                  torch.as_tensor(knn[:, 1:], dtype=torch.int64), sub))
    return batches


def run(args) -> int:
    # before any work: never an input's file (the teacher's too), a map or another file; a folder or an unwritable
    # path is refused now, not after the training
    check_checkpoint_output(args.out, [Path(p) for p in args.inputs + args.val + args.config]
                            + [args.teacher_checkpoint], 'student checkpoint', is_student_checkpoint)
    cfg = build_config(args)
    cfg.purify.enabled = False
    inputs = tuple(s.strip() for s in args.net_inputs.split(',') if s.strip())
    teacher_net, teacher_notes = None, {}
    if args.teacher == 'ssl':
        if args.teacher_checkpoint is None:
            raise CliError('--teacher ssl needs --teacher-checkpoint (train one with ov3d train-teacher)')
        from ov3d_ros.core.purification.teacher import checkpoint_notes, load_teacher
        teacher_net = load_teacher(args.teacher_checkpoint)
        teacher_notes = checkpoint_notes(args.teacher_checkpoint)
        if abs(teacher_net.cfg.voxel_size_m - cfg.map.voxel_size_m) > 1e-9:
            raise CliError(f'the teacher was trained at {teacher_net.cfg.voxel_size_m} m voxels, the config has '
                           f'map.voxel_size_m {cfg.map.voxel_size_m}')
    elif args.teacher_checkpoint is not None:
        raise CliError('--teacher-checkpoint is only used with --teacher ssl')
    torch.manual_seed(args.seed)
    probe = make_mapper(cfg, open_input(args.inputs[0], args)) if 'features' in inputs else None
    student_cfg = StudentConfig(feature_dim=probe.map.dim if probe else 0, inputs=inputs, width=args.width,
                                blocks=args.blocks, embed_dim=args.embed_dim, voxel_size_m=cfg.map.voxel_size_m)
    net = StudentAffinityNet(student_cfg).to(resolve_device(cfg.map.device))   # CUDA when present
    scenes = [b for p in args.inputs for b in prepare(p, args, cfg, net, teacher_net)]
    val = [b for p in args.val for b in prepare(p, args, cfg, net, teacher_net)]
    dcfg = DistillConfig(steps=args.steps, lr=args.lr, anchors=args.anchors, seed=args.seed)
    history = train(net, scenes, val, dcfg)
    voxels = sum(len(s.coords) for s in scenes)
    teacher_voxels = args.teacher_train_voxels or int(teacher_notes.get('train_voxels', 0))
    notes = {'command': 'ov3d ' + shlex.join(getattr(args, 'argv', []) or []),
             'train': sorted({s.name.split('#')[0] for s in scenes}), 'val': sorted({s.name.split('#')[0] for s in val}),
             'teacher': args.teacher, 'teacher_clusters': args.teacher_clusters, 'tiles': len(scenes),
             'oracle': args.teacher == 'labels', 'distill': asdict(dcfg), 'features': cfg.features.source,
             'train_voxels': voxels, 'anchor_samples': dcfg.steps * dcfg.anchors,
             'teacher_train_voxels': teacher_voxels or None,
             'data_fraction': voxels / teacher_voxels if teacher_voxels else None,
             'history': history[-1:] if history else []}
    if args.teacher == 'labels':
        notes['note'] = ORACLE_NOTE
    if args.teacher == 'ssl':
        notes['teacher_checkpoint'] = str(args.teacher_checkpoint)
        notes['teacher_command'] = teacher_notes.get('command')
        notes['teacher_train'] = teacher_notes.get('train')
    save_student(args.out, net, notes)
    print(json.dumps({'checkpoint': str(args.out), 'bytes': args.out.stat().st_size, 'teacher': args.teacher,
                      'oracle': notes['oracle'], 'train_voxels': voxels, 'data_fraction': notes['data_fraction'],
                      **(history[-1] if history else {})}))
    return 0
