"""Evaluate maps of labelled scenes: 3D mIoU, mAcc, boundary mIoU, fragmentation (JSON, Markdown, PNG).

    ov3d eval scenes/scene_* --out results/ --features simulated
    ov3d eval scenes/scene_* --out results/ --variant raw purify.enabled=false --variant purified purify.enabled=true
    ov3d eval 'scenes/scene_*' --out results/ --serial          # one after another (default: one Ray task each)
    ov3d eval --merge results_a/ results_b/ --out results/      # tables of runs over other scenes, combined
    ov3d eval scenes/scene_* --out results/ --variant labels "labels.vocabulary=[gt]" --queries

Each input (dataset folder or bag with gt_points.npz) is mapped with the config (+ each variant's
overrides; purification is on by default, so a raw-fusion row says ``purify.enabled=false``; without --variant
the one row is ``raw``, purification off); every GT point is labelled from its nearest observed voxel with the
GT class names as vocabulary (unobserved points count as misses; 'unlabeled' points are ignored). Rows of the
table are variants.
``labels.vocabulary=[gt]`` gives the map a label volume over the GT class names (then the labels come from
it). ``--queries`` also asks the synonym and paraphrase queries of ov3d_ros.eval.queries (recall, precision).

Variants whose mapping is the same (purification off or ``purify.mode=whole``, no label volume, same map /
keyframe / feature settings) share one mapping pass per scene; whole-map pooling then runs on that map.
Variants named ``NAME@TAG`` (e.g. ``learned@s0 learned@s1 learned@s2``: one per training seed) also get a
combined row ``NAME (seeds)``: per-scene values averaged over the seeds, with the spread over seeds. table_ci.md
gives per-scene means with 95 % confidence intervals and paired differences to the first variant.

Each input runs as one Ray task with all its variants (``ov3d_ros.cli.batch``; ``--serial`` runs them in this
process) with the same numbers; a failing input is reported by name and left out of the table, and the command
then exits with status 2.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ov3d_ros.cli.batch import Job, Outcome, add_batch_arguments, expand_inputs, report_failures, run_jobs
from ov3d_ros.cli.common import (CliError, add_config_arguments, add_input_arguments, build_config, make_mapper,
                                 map_input, number_in, open_input)
from ov3d_ros.core.config import MapperConfig, parse_overrides, update_from_dict
from ov3d_ros.core.io import read_text
from ov3d_ros.core.map_io import write_atomic
from ov3d_ros.eval.metrics import (SCENE_METRICS, aggregate, bar_chart_png, ci_table, evaluate_scene, markdown_table,
                                   mean_ci95, paired_difference, per_class_table, scene_statistics, seed_average)
from ov3d_ros.eval.queries import SYNONYMS, query_scores, summarize, sweep_table

IGNORED_NAMES = ('unlabeled', 'unannotated')
DEFAULT_VARIANT = ['raw', 'purify.enabled=false']
"""The table's one row without --variant: raw fusion (purification is on in the default config)."""


def add_arguments(p) -> None:
    p.add_argument('inputs', nargs='*', help='dataset folders or bags, each with gt_points.npz')
    p.add_argument('--merge', nargs='+', type=Path, metavar='DIR',
                   help='instead of mapping: combine the per-scene results of earlier runs (their results.json; same '
                        'variants, other scenes) into one set of tables')
    p.add_argument('--out', required=True, type=Path, help='output folder')
    p.add_argument('--variant', action='append', nargs='+', metavar=('NAME', 'SECTION.KEY=VALUE'),
                   help='a table row: a name and config overrides (repeatable; purification is on unless a row '
                        'says purify.enabled=false; default one row "raw": raw fusion, purify.enabled=false)')
    p.add_argument('--gt', help='ground-truth npz (default: gt_points.npz in the input)')
    p.add_argument('--save-maps', action='store_true', help='also write each map to OUT/maps/')
    p.add_argument('--queries', action='store_true',
                   help='also score the synonym / paraphrase queries (recall and precision per variant)')
    p.add_argument('--query-thresholds', type=number_in(0.0, 1.0), nargs='+', default=[], metavar='T',
                   help='with --queries, also score every query at these score thresholds from one scoring pass '
                        '(queries_sweep.md: recall, precision and F1 per variant and threshold)')
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


def _mapping_key(cfg) -> str:
    """What decides the fused map (everything but purification and queries)."""
    d = asdict(cfg)
    d.pop('purify')
    d.pop('query')
    return json.dumps(d, sort_keys=True, default=str)


def _shares_mapping(cfg) -> bool:
    """Whether a variant's map is the raw fusion, pooled (if at all) only once before scoring."""
    return not cfg.labels.vocabulary and (not cfg.purify.enabled or cfg.purify.mode == 'whole')


def _map_variant(cfg, source, gt, args, cache: dict):
    """(mapper, mapping stats) for one variant on one input; reuses a cached raw-fusion pass when it can."""
    from ov3d_ros.core.mapper import Mapper
    names = [str(n) for n in gt['names']]
    if not _shares_mapping(cfg):
        mapper = make_mapper(cfg, source, names)
        stats = map_input(mapper, source, args.quiet, getattr(args, 'frames', None))
        return mapper, stats
    key = _mapping_key(cfg)
    if key not in cache:
        base_cfg = copy.deepcopy(cfg)
        base_cfg.purify.enabled = False
        base = make_mapper(base_cfg, source, names)
        cache[key] = (base, map_input(base, source, args.quiet, getattr(args, 'frames', None)))
    base, stats = cache[key]
    if not cfg.purify.enabled:
        base.cfg.query = copy.deepcopy(cfg.query)       # variants may differ in their query settings only
        base.texts.clear()
        return base, dict(stats)
    pooling = {k: v for k, v in asdict(cfg.purify).items() if not k.startswith('superpoint_')}
    pooled_key = key + json.dumps(pooling, sort_keys=True)
    if pooled_key in cache:           # same pooling, other query or superpoint settings (read-time stages)
        mapper, pooled_stats = cache[pooled_key]
        mapper.cfg.query = copy.deepcopy(cfg.query)
        mapper.cfg.purify = mapper.purifier.cfg = copy.deepcopy(cfg.purify)
        mapper.texts.clear()
        return mapper, dict(pooled_stats)
    mapper = Mapper(cfg, base.extractor)
    # the base map's fusion layers, shared; this variant's purification layers in a cake of its own
    mapper.map, mapper.projection, mapper.num_keyframes = base.map.share_fusion(), base.projection, base.num_keyframes
    mapper._reset_purifier()
    t0 = time.perf_counter()
    mapper.purify_all()
    cache[pooled_key] = (mapper, dict(stats, whole_purify_s=time.perf_counter() - t0))
    return mapper, dict(cache[pooled_key][1])


def _timing(scenes: list) -> dict:
    """Mean ms per keyframe (mapping, and of it purification) and whole-map pooling seconds over scenes."""
    def mean(key):
        vals = [s['mapping'].get(key) for s in scenes if s['mapping'].get(key) is not None]
        return float(np.mean(vals)) if vals else None
    return {'keyframe_ms': mean('keyframe_ms_mean'), 'purify_ms': mean('purify_ms_mean'),
            'whole_purify_s': mean('whole_purify_s'), 'superpoints_s': mean('superpoints_s')}


SCENE_KEYS = ('class_names', 'confusion', 'misses', 'boundary_confusion', 'boundary_misses', 'frag_components',
              'frag_instances', 'frag_missed_instances', 'bytes_per_voxel', 'mapping')
"""What :func:`write_tables` (and the aggregation it calls) reads of each per-scene result."""


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))


def _check_merge_dirs(dirs, out: Path) -> None:
    """CliError for a --merge folder given twice (its scenes would count twice) or that is also --out (its
    results.json would be replaced by the tables made from it)."""
    for i, d in enumerate(dirs):
        if _same_dir(Path(d), Path(out)):
            raise CliError(f'{out}: --out is also a --merge folder ({d}); its results would be replaced, choose '
                           'another folder')
        twice = [e for e in dirs[:i] if _same_dir(Path(d), Path(e))]
        if twice:
            raise CliError(f'{d}: given twice to --merge (as {twice[0]}); its scenes would count twice')


def _read_results(path: Path) -> dict:
    """{variant: [per-scene dict]} of an ov3d eval results.json; CliError naming the file when it is not one."""
    text = read_text(path, 'the results', 'results.json of ov3d eval', CliError)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CliError(f'{path}: not the results.json of ov3d eval (not JSON: {e})') from None
    scenes = data.get('scenes') if isinstance(data, dict) else None
    if not isinstance(scenes, dict) or not scenes:
        raise CliError(f'{path}: not the results.json of ov3d eval (no "scenes" object of {{variant: [scene]}})')
    for name, runs in scenes.items():
        if not isinstance(runs, list) or not runs or not all(isinstance(s, dict) for s in runs):
            raise CliError(f'{path}: scenes of variant {name!r} must be a non-empty list of objects')
        for s in runs:
            missing = [k for k in SCENE_KEYS if k not in s]
            if missing or not isinstance(s['mapping'], dict):
                raise CliError(f'{path}: a scene of variant {name!r} ({s.get("scene", "unnamed")}) lacks '
                               f'{", ".join(missing) or "a mapping object"}')
    return scenes


def _merge(dirs) -> tuple:
    """(variant names, {variant: per-scene dicts}) from earlier runs' results.json files (same variants, scenes
    over the same class names)."""
    names, classes, per_scene = None, None, {}
    for d in dirs:
        path = Path(d) / 'results.json'
        if not path.exists():
            raise CliError(f'{path}: no such file (run ov3d eval with --out {d} first)')
        scenes = _read_results(path)
        if names is None:
            names = list(scenes)
        elif list(scenes) != names:
            raise CliError(f'{path}: variants {list(scenes)} differ from {names}')
        for name in names:
            for s in scenes[name]:
                if classes is None:
                    classes = s['class_names']
                elif s['class_names'] != classes:     # their confusion matrices cannot be summed
                    raise CliError(f'{path}: scene {s.get("scene", "unnamed")} is scored over other class names '
                                   'than the first')
            per_scene.setdefault(name, []).extend(scenes[name])
    return names, per_scene


def eval_scene(path: str, variants: list, args: argparse.Namespace) -> list:
    """Map one input with every variant (sharing mapping passes where they can) and score each: one scene dict
    per variant, in order."""
    cache, out = {}, []
    for name, *overrides in variants:
        cfg = build_config(args)
        update_from_dict(cfg, parse_overrides(overrides))
        source = open_input(path, args, args.gt)
        gt = source.gt_points()
        names = [str(n) for n in gt['names']]
        evaluated = [i for i, n in enumerate(names) if n not in IGNORED_NAMES]
        if not np.isin(gt['label'], evaluated).any():       # every score would be undefined
            raise CliError(f'{source.gt_path}: no point has a class to evaluate (all {len(gt["label"])} are '
                           f'{" / ".join(IGNORED_NAMES)} or -1)')
        if cfg.labels.vocabulary == ['gt']:
            cfg.labels.vocabulary = [str(n) for n in gt['names'] if str(n) not in IGNORED_NAMES]
        mapper, stats = _map_variant(cfg, source, gt, args, cache)
        t0 = time.perf_counter()
        scene = score_mapper(mapper, gt)
        if mapper.purifier is not None and mapper.purifier.votes:    # paid by the first reader after keyframes
            stats['superpoints_s'] = mapper.purifier.timings_s.get('superpoints')
        scene.update(scene=str(path), variant=name, mapping=stats, eval_s=time.perf_counter() - t0,
                     bytes_per_voxel=mapper.bytes_per_voxel())
        if args.queries:
            scene['queries'] = query_scores(mapper, gt, SYNONYMS, IGNORED_NAMES, args.query_thresholds)
        if args.save_maps:
            mapper.save(args.out / 'maps' / f'{name}_{Path(path).name}.ov3dmap')
        out.append(scene)
    return out


def _check_variant(name: str, overrides: list, args) -> MapperConfig:
    """The config of a --variant (before any scene is mapped); CliError if its name cannot name a table row and a
    saved map file, or an override of it cannot be applied."""
    if not name.strip():
        raise CliError(f'--variant needs a name first (NAME SECTION.KEY=VALUE ...), got {name!r}')
    if '=' in name:      # the override would name the row and not be applied
        raise CliError(f'--variant {name!r}: the first word is the row name, not an override; '
                       f'e.g. --variant fine {name}')
    if '/' in name or '\\' in name or name.startswith('.'):     # names a file under --save-maps' OUT/maps/
        raise CliError(f"--variant {name!r}: a name must not contain '/' or '\\' or start with '.'")
    cfg = build_config(args)
    try:
        return update_from_dict(cfg, parse_overrides(overrides))
    except ValueError as e:
        raise CliError(f'--variant {name}: {e}') from None


def run(args) -> int:
    if args.query_thresholds and not args.queries:
        raise CliError('--query-thresholds scores the queries at those thresholds: it needs --queries')
    if args.merge:
        if args.inputs:
            raise CliError('give either inputs or --merge, not both')
        _check_merge_dirs(args.merge, args.out)
        names, per_scene = _merge(args.merge)
        args.out.mkdir(parents=True, exist_ok=True)          # only once there is something to write
        return write_tables(names, per_scene, args)
    if not args.inputs:
        raise CliError('no inputs given')
    # the default row is named raw: raw fusion, whatever the config's purification (on by default) says -- a bare
    # ['raw'] was purified (703 ms of purification per keyframe in its 'raw' row)
    variants = args.variant or [DEFAULT_VARIANT]
    configs = [_check_variant(name, overrides, args) for name, *overrides in variants]
    names = [v[0] for v in variants]
    if len(set(names)) != len(names):
        raise CliError(f'variant names must be unique, got {names}')
    for name, cfg in zip(names, configs) if args.queries else ():
        if cfg.features.source == 'precomputed':     # refused before mapping, not after it
            raise CliError(f'--queries: variant {name} uses precomputed features, whose text table embeds only its '
                           "own names, not the synonym and paraphrase queries (e.g. 'couch'); drop --queries")
    args.out.mkdir(parents=True, exist_ok=True)                # only for a run that goes ahead
    inputs = expand_inputs(args.inputs)
    worker_args = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != 'run'})
    batch = len(inputs) > 1
    worker_args.quiet = args.quiet or (batch and not args.serial)     # workers: one bar over inputs, none per frame
    jobs = [Job(str(path), eval_scene, (path, variants, worker_args)) for path in inputs]

    def done(o):
        if not o.ok:
            print(f'ov3d eval: {o.name}: {o.error}', file=sys.stderr, flush=True)
            return
        for scene in o.result:
            stats = scene['mapping']
            print(f'[{scene["variant"]}] {Path(scene["scene"]).name}: mIoU {_num(scene["miou"], 1)}  '
                  f'boundary {_num(scene["boundary_miou"], 1)}  frag {_num(scene["fragmentation"], 2)}  '
                  f'({stats["keyframes"]} keyframes, {stats["voxels"]} voxels)', flush=True)

    if not batch:     # one input: errors end the command as before
        outcomes = [Outcome(jobs[0].name, True, eval_scene(*jobs[0].args))]
        done(outcomes[0])
    else:
        outcomes = run_jobs(jobs, args, build_config(args).map.device, done, 'scenes')
    per_scene = {name: [o.result[k] for o in outcomes if o.ok] for k, name in enumerate(names)}
    failed = [{'input': o.name, 'error': o.error} for o in outcomes if not o.ok]
    if per_scene[names[0]]:
        write_tables(names, per_scene, args, failed)
    return report_failures(outcomes, 'eval')


def _num(value, digits: int) -> str:
    """A metric to ``digits`` decimals; 'n/a' where the scene leaves it undefined (None: no labelled GT point of
    an evaluated class, no boundary or no instance)."""
    return 'n/a' if value is None else f'{value:.{digits}f}'


def write_tables(names: list, per_scene: dict, args, failed: list = ()) -> int:
    """Aggregate per-scene results into results.json, table.md, table_ci.md and chart.png under ``args.out``."""
    rows = {}
    first = names[0]
    for name in names:
        rows[name] = aggregate(per_scene[name])
        rows[name]['bytes_per_voxel'] = per_scene[name][0]['bytes_per_voxel']
        rows[name]['timing'] = _timing(per_scene[name])
        if name != first:
            rows[name]['vs_baseline'] = {k: paired_difference(per_scene[name], per_scene[first], k)
                                         for k in ('miou', 'boundary_miou')}
        if all('queries' in s for s in per_scene[name]):
            rows[name]['queries'] = summarize([q for s in per_scene[name] for q in s['queries']])
    ci_rows = {name: rows[name] for name in names}
    groups = {}
    for name in names:
        if '@' in name:
            groups.setdefault(name.split('@')[0], []).append(name)
    for group, members in groups.items():
        if len(members) < 2:
            continue
        avg = seed_average([per_scene[m] for m in members])
        base = seed_average([per_scene[first]])
        ci_rows[f'{group} ({len(members)} seeds)'] = {
            'per_scene': scene_statistics(avg), 'num_scenes': len(avg), 'members': members,
            'vs_baseline': {k: paired_difference(avg, base, k) for k in ('miou', 'boundary_miou')},
            'seeds': mean_ci95([rows[m]['per_scene']['miou']['mean'] for m in members]),
            'timing': _timing([s for m in members for s in per_scene[m]])}
    table = markdown_table(rows)
    write_atomic(args.out / 'table.md', (table + f'\nPer class ({first}):\n\n' + per_class_table(rows[first])).encode())
    ci = ci_table(ci_rows, first)
    write_atomic(args.out / 'table_ci.md', (
        f'Per-scene means over {len(per_scene[first])} scenes with 95 % confidence intervals (Student t); Δ: paired '
        f'per-scene differences to {first}.\n\n' + ci).encode())
    write_atomic(args.out / 'results.json', json.dumps({'rows': rows, 'ci_rows': ci_rows, 'scenes': per_scene,
                                                        'metrics': list(SCENE_METRICS), 'failed': list(failed)},
                                                       indent=1).encode())
    sweep = sweep_table(per_scene)
    if sweep.count('\n') > 2:
        write_atomic(args.out / 'queries_sweep.md', (
            f'Synonym / paraphrase queries at each score threshold, means over {len(per_scene[first])} scenes with '
            '95 % confidence intervals (Student t).\n\n' + sweep).encode())
    bar_chart_png(str(args.out / 'chart.png'), rows)
    print(table, end='')
    print(ci, end='')
    print(f'wrote {args.out}/results.json, table.md, table_ci.md, chart.png')
    return 0
