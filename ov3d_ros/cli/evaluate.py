"""Evaluate maps of labelled scenes: 3D mIoU, mAcc, boundary mIoU, fragmentation (JSON, Markdown, PNG).

    ov3d eval scenes/scene_* --out results/ --features simulated
    ov3d eval scenes/scene_* --out results/ --variant raw --variant fine map.voxel_size_m=0.03
    ov3d eval scenes/scene_* --out results/ --variant labels "labels.vocabulary=[gt]" --queries
    ov3d eval 'scenes/scene_*' --out results/ --serial          # one after another (default: one Ray task each)

Each input (dataset folder or bag with gt_points.npz) is mapped with the config (+ each variant's
overrides); every GT point is labelled from its nearest observed voxel with the GT class names as vocabulary
(unobserved points count as misses; 'unlabeled' points are ignored). Rows of the table are variants.
``labels.vocabulary=[gt]`` gives the map a label volume over the GT class names (then the labels come from
it). ``--queries`` also asks the synonym and paraphrase queries of ov3d_ros.eval.queries (recall, precision).
Several (input, variant) pairs run as one Ray task each (``ov3d_ros.cli.batch``; ``--serial`` runs them in
this process) with the same numbers; a failing input is reported by name and left out of the table, and the
command then exits with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ov3d_ros.cli.batch import Job, Outcome, add_batch_arguments, expand_inputs, report_failures, run_jobs
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
    add_batch_arguments(p)


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


def eval_one(path: str, name: str, overrides: list, args: argparse.Namespace) -> dict:
    """Map one input with a variant's overrides and score it against its ground truth."""
    cfg = build_config(args)
    update_from_dict(cfg, parse_overrides(overrides))
    source = open_input(path, args, args.gt)
    gt = source.gt_points()
    if cfg.labels.vocabulary == ['gt']:
        cfg.labels.vocabulary = [str(n) for n in gt['names'] if str(n) not in IGNORED_NAMES]
    mapper = make_mapper(cfg, source, [str(n) for n in gt['names']])
    stats = map_input(mapper, source, args.quiet, getattr(args, 'frames', None))
    t0 = time.perf_counter()
    scene = score_mapper(mapper, gt)
    scene.update(scene=str(path), variant=name, mapping=stats, eval_s=time.perf_counter() - t0,
                 bytes_per_voxel=mapper.bytes_per_voxel())
    if args.queries:
        scene['queries'] = query_scores(mapper, gt, SYNONYMS, IGNORED_NAMES)
    if args.save_maps:
        mapper.save(args.out / 'maps' / f'{name}_{Path(path).name}.ov3dmap')
    return scene


def run(args) -> int:
    variants = args.variant or [['raw']]
    inputs = expand_inputs(args.inputs)
    args.out.mkdir(parents=True, exist_ok=True)
    worker_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != 'run'})
    batch = len(inputs) * len(variants) > 1
    worker_args.quiet = args.quiet or (batch and not args.serial)     # workers: one bar over inputs, none per frame
    jobs = [Job(f'[{name}] {path}', eval_one, (path, name, overrides, worker_args))
            for name, *overrides in variants for path in inputs]

    def done(o):
        if not o.ok:
            print(f'ov3d eval: {o.name}: {o.error}', file=sys.stderr, flush=True)
            return
        scene, stats = o.result, o.result['mapping']
        print(f'[{scene["variant"]}] {Path(scene["scene"]).name}: mIoU {scene["miou"]:.1f}  '
              f'boundary {scene["boundary_miou"] or 0:.1f}  frag {scene["fragmentation"] or 0:.2f}  '
              f'({stats["keyframes"]} keyframes, {stats["voxels"]} voxels)', flush=True)

    if not batch:     # one input, one variant: errors end the command as before
        outcomes = [Outcome(jobs[0].name, True, eval_one(*jobs[0].args))]
        done(outcomes[0])
    else:
        outcomes = run_jobs(jobs, args, build_config(args).map.device, done, 'scenes')
    rows, per_scene, failed = {}, {}, []
    for (name, *_), start in zip(variants, range(0, len(jobs), len(inputs))):
        mine = outcomes[start:start + len(inputs)]           # input order, whatever order tasks finished in
        per_scene[name] = [o.result for o in mine if o.ok]
        failed += [{'input': o.name, 'error': o.error} for o in mine if not o.ok]
        if not per_scene[name]:
            continue
        rows[name] = aggregate(per_scene[name])
        rows[name]['bytes_per_voxel'] = per_scene[name][0]['bytes_per_voxel']
        if args.queries:
            rows[name]['queries'] = summarize([q for s in per_scene[name] for q in s['queries']])
    if rows:
        table = markdown_table(rows)
        first = next(iter(rows))
        (args.out / 'table.md').write_text(table + f'\nPer class ({first}):\n\n' + per_class_table(rows[first]))
        (args.out / 'results.json').write_text(json.dumps({'rows': rows, 'scenes': per_scene, 'failed': failed},
                                                          indent=1))
        bar_chart_png(str(args.out / 'chart.png'), rows)
        print(table, end='')
        print(f'wrote {args.out}/results.json, table.md, chart.png')
    return report_failures(outcomes, 'eval')
