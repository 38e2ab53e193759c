"""Evaluate maps of labelled scenes: 3D mIoU, mAcc, boundary mIoU, fragmentation (JSON, Markdown, PNG).

    ov3d eval scenes/scene_* --out results/ --features simulated
    ov3d eval scenes/scene_* --out results/ --variant raw --variant fine map.voxel_size_m=0.03
    ov3d eval scenes/scene_* --out results/ --variant labels "labels.vocabulary=[gt]" --queries

Each input (dataset folder or bag with gt_points.npz) is mapped with the config (+ each variant's
overrides); every GT point is labelled from its nearest observed voxel with the GT class names as vocabulary
(unobserved points count as misses; 'unlabeled' points are ignored). Rows of the table are variants.
``labels.vocabulary=[gt]`` gives the map a label volume over the GT class names (then the labels come from
it). ``--queries`` also asks the synonym and paraphrase queries of ov3d_ros.eval.queries (recall, precision).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from ov3d_ros.cli.common import (CliError, add_config_arguments, add_input_arguments, build_config, make_mapper,
                                 map_input, open_input)
from ov3d_ros.core.config import parse_overrides, update_from_dict
from ov3d_ros.eval.metrics import aggregate, bar_chart_png, evaluate_scene, markdown_table, per_class_table
from ov3d_ros.eval.queries import SYNONYMS, query_scores, summarize

IGNORED_NAMES = ('unlabeled', 'unannotated')


def add_arguments(p) -> None:
    p.add_argument('inputs', nargs='+', help='dataset folders or bags, each with gt_points.npz')
    p.add_argument('--out', required=True, type=Path, help='output folder')
    p.add_argument('--variant', action='append', nargs='+', metavar=('NAME', 'SECTION.KEY=VALUE'),
                   help='a table row: a name and config overrides (repeatable; default one row "raw")')
    p.add_argument('--gt', help='ground-truth npz (default: gt_points.npz in the input)')
    p.add_argument('--save-maps', action='store_true', help='also write each map to OUT/maps/')
    p.add_argument('--queries', action='store_true',
                   help='also score the synonym / paraphrase queries (recall and precision per variant)')
    add_config_arguments(p)
    add_input_arguments(p)


def score_mapper(mapper, gt: dict) -> dict:
    """Label GT points from the map and compute all metrics."""
    names = [str(n) for n in gt['names']]
    vocab = [i for i, n in enumerate(names) if n not in IGNORED_NAMES]
    if not vocab:
        raise CliError('the ground truth has no class names to evaluate')
    pred_vocab = mapper.label_points(gt['xyz'], mapper.voxel_labels([names[i] for i in vocab]))
    pred = np.where(pred_vocab >= 0, np.asarray(vocab)[np.maximum(pred_vocab, 0)], -1)
    label = np.asarray(gt['label']).astype(np.int64)
    label = np.where(np.isin(label, vocab), label, -1)
    instance = gt.get('instance', np.full(len(label), -1))
    return evaluate_scene(gt['xyz'], label, instance, pred, names)


def run(args) -> int:
    variants = args.variant or [['raw']]
    args.out.mkdir(parents=True, exist_ok=True)
    rows, per_scene = {}, {}
    for name, *overrides in variants:
        per_scene[name] = []
        for path in args.inputs:
            cfg = build_config(args)
            update_from_dict(cfg, parse_overrides(overrides))
            source = open_input(path, args, args.gt)
            gt = source.gt_points()
            if cfg.labels.vocabulary == ['gt']:
                cfg.labels.vocabulary = [str(n) for n in gt['names'] if str(n) not in IGNORED_NAMES]
            mapper = make_mapper(cfg, source, [str(n) for n in gt['names']])
            stats = map_input(mapper, source, args.quiet)
            t0 = time.perf_counter()
            scene = score_mapper(mapper, gt)
            scene.update(scene=str(path), variant=name, mapping=stats, eval_s=time.perf_counter() - t0,
                         bytes_per_voxel=mapper.bytes_per_voxel())
            if args.queries:
                scene['queries'] = query_scores(mapper, gt, SYNONYMS, IGNORED_NAMES)
            per_scene[name].append(scene)
            if args.save_maps:
                mapper.save(args.out / 'maps' / f'{name}_{Path(path).name}.ov3dmap')
            print(f'[{name}] {Path(path).name}: mIoU {scene["miou"]:.1f}  boundary {scene["boundary_miou"] or 0:.1f}  '
                  f'frag {scene["fragmentation"] or 0:.2f}  ({stats["keyframes"]} keyframes, {stats["voxels"]} voxels)')
        rows[name] = aggregate(per_scene[name])
        rows[name]['bytes_per_voxel'] = per_scene[name][0]['bytes_per_voxel']
        if args.queries:
            rows[name]['queries'] = summarize([q for s in per_scene[name] for q in s['queries']])
    table = markdown_table(rows)
    first = next(iter(rows))
    (args.out / 'table.md').write_text(table + f'\nPer class ({first}):\n\n' + per_class_table(rows[first]))
    (args.out / 'results.json').write_text(json.dumps({'rows': rows, 'scenes': per_scene}, indent=1))
    bar_chart_png(str(args.out / 'chart.png'), rows)
    print(table, end='')
    print(f'wrote {args.out}/results.json, table.md, chart.png')
    return 0
