"""Benchmark: two robots map disjoint halves of a trajectory; their merged map against one map of all frames.

    python benchmarks/bm_merge.py /tmp/ev/scene_0100 --config config/eval.yaml
    python benchmarks/bm_merge.py eval_output/scenes/scene_010? --config config/eval.yaml --split 30

Per scene (a dataset folder from ``ov3d make-scenes`` with gt_points.npz): map frames [0, split) as robot A and
[split, end) as robot B (each its own mapper, as two robots would), and all frames as one map. Robot B's map is
also moved into a frame of its own (a 90 degree turn and a shift, as if B started elsewhere) and merged back with
the inverse transform, which must give the same merged map. Scores like ``ov3d eval``: 3D mIoU over the ground
truth points, and the synonym / paraphrase queries (recall, precision); query answers are also compared voxel by
voxel (Jaccard of the answered voxels, per class-name query). Prints JSON lines, then a Markdown table.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the repo's ov3d_ros first

from ov3d_ros.cli.common import build_config, make_mapper, map_input, open_input  # noqa: E402
from ov3d_ros.cli.evaluate import IGNORED_NAMES, score_mapper  # noqa: E402
from ov3d_ros.core.map_io import save_map  # noqa: E402
from ov3d_ros.core.mapper import Mapper  # noqa: E402
from ov3d_ros.core.merge import MapPart, merge_files, merge_parts, transform_from_pose  # noqa: E402
from ov3d_ros.eval.metrics import aggregate  # noqa: E402
from ov3d_ros.eval.queries import SYNONYMS, query_scores, summarize  # noqa: E402


def answer_keys(mapper: Mapper, text: str) -> set:
    return set(mapper.map.keys[mapper.query(text).rows].tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('scenes', nargs='+')
    p.add_argument('--config', action='append', default=[])
    p.add_argument('--set', action='append', default=[])
    p.add_argument('--split', type=int, default=0, help='first frame of robot B (default: half the frames)')
    args = p.parse_args()
    args.features = args.device = None
    rows = {'one map': [], 'merged': [], 'merged (B moved)': []}
    queries = {k: [] for k in rows}
    jaccards = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for scene in args.scenes:
            source = open_input(scene)
            gt = source.gt_points()
            names = [str(n) for n in gt['names']]
            split = args.split or len(source) // 2
            paths, t0 = {}, time.perf_counter()
            for name, frames in (('all', slice(None)), ('a', slice(0, split)), ('b', slice(split, None))):
                mapper = make_mapper(build_config(args), open_input(scene), names)
                map_input(mapper, open_input(scene), True, frames)
                paths[name] = tmp / f'{name}.ov3dmap'
                mapper.save(paths[name])
            merge_files([paths['a'], paths['b']], tmp / 'merged.ov3dmap')
            # B in a frame of its own: T0 maps the shared frame to B's; merging applies T0^-1
            T0 = transform_from_pose(1.0, -2.0, 0.0, 0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4))
            vmap, info, extra = merge_parts([MapPart.from_file(paths['b'], T0)])
            save_map(tmp / 'b_own.ov3dmap', vmap, info, extra)
            merge_files([paths['a'], tmp / 'b_own.ov3dmap'], tmp / 'merged_moved.ov3dmap', [None, np.linalg.inv(T0)])
            maps = {'one map': paths['all'], 'merged': tmp / 'merged.ov3dmap',
                    'merged (B moved)': tmp / 'merged_moved.ov3dmap'}
            loaded = {k: Mapper.from_file(v, 'cpu') for k, v in maps.items()}
            for k, m in loaded.items():
                s = score_mapper(m, gt)
                s['voxels'] = m.map.size
                rows[k].append(s)
                queries[k] += query_scores(m, gt, SYNONYMS, IGNORED_NAMES)
            vocab = [n for n in names if n not in IGNORED_NAMES and np.any(gt['label'] == names.index(n))]
            for text in vocab:
                a, b = answer_keys(loaded['one map'], text), answer_keys(loaded['merged'], text)
                if a or b:
                    jaccards.append(len(a & b) / len(a | b))
            print(json.dumps({'scene': scene, 'split': split, 'mapping_s': round(time.perf_counter() - t0, 1),
                              **{k: {'miou': round(v[-1]['miou'], 2), 'voxels': v[-1]['voxels']}
                                 for k, v in rows.items()}}), flush=True)
    print('\n| map | mIoU | mAcc | voxels | query recall % | query precision % |\n|---|---:|---:|---:|---:|---:|')
    for k, v in rows.items():
        agg, q = aggregate(v), summarize(queries[k])
        print(f'| {k} | {agg["miou"]:.2f} | {agg["macc"]:.2f} | {sum(s["voxels"] for s in v)} | '
              f'{q["recall"]:.1f} | {q["precision"]:.1f} |')
    print(f'\nclass-name queries, answered voxels one map vs merged: mean Jaccard {np.mean(jaccards):.3f} '
          f'(min {np.min(jaccards):.3f}, {len(jaccards)} queries)')


if __name__ == '__main__':
    main()
