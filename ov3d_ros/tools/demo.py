"""End-to-end demo on the built-in scene over real ROS 2.

Starts the mapping node and the scene player as two processes on a private ROS_DOMAIN_ID, waits until the
scene is mapped, calls /segment_by_text for a few objects, and writes one PLY per query, a top-down PNG and
summary.json (text, points, precision, recall, PLY path) to the output folder.

    python -m ov3d_ros.tools.demo --out demo_output
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

QUERIES = ('chair', 'table', 'sofa', 'bed', 'cabinet', 'plant')


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', type=Path, default=Path('demo_output'), help='output folder')
    parser.add_argument('--queries', nargs='+', default=list(QUERIES), help='object names to query')
    parser.add_argument('--frames', type=int, default=60, help='frames along the scene trajectory')
    parser.add_argument('--rate', type=float, default=4.0, help='player rate in Hz')
    parser.add_argument('--seed', type=int, default=0, help='scene seed')
    parser.add_argument('--threshold', type=float, default=0.0, help='score threshold (0 = node default)')
    parser.add_argument('--timeout', type=float, default=300.0, help='give up after this many seconds')
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    from ov3d_ros.tools.ros_graph import private_ros_env, start_mapping_node, start_scene_player
    env = private_ros_env()
    os.environ.update({k: env[k] for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE', 'RMW_IMPLEMENTATION')})
    print(f'[demo] ROS_DOMAIN_ID={env["ROS_DOMAIN_ID"]}; logs in {args.out}/')
    node = start_mapping_node(env, args.out / 'mapping_node.log')
    player = None
    try:
        from ov3d_ros.tools.demo_client import DemoClient
        client = DemoClient()
        try:
            if not client.wait_for_service(node, timeout_s=120.0):
                print(node.log()[-3000:], file=sys.stderr)
                raise SystemExit('[demo] the mapping node did not come up (log above)')
            player = start_scene_player(env, args.out / 'scene_player.log',
                                        [f'seed:={args.seed}', f'n_frames:={args.frames}', f'rate_hz:={args.rate}'])
            status = client.wait_until_mapped(player, node, timeout_s=args.timeout)
            print(f'[demo] mapped: {status["keyframes"]} keyframes of {status["frames"]} frames, '
                  f'{status["voxels"]} voxels, {status["keyframe_time_mean_s"] * 1e3:.0f} ms/keyframe')
            results = [client.query(q, threshold=args.threshold) for q in args.queries]
            map_cloud = client.map_cloud()
        finally:
            client.close()
        summary = write_outputs(args.out, args.seed, results, map_cloud, status)
    finally:
        if player is not None:
            player.stop()
        node.stop()
    ok = sum(1 for q in summary['queries'] if q['precision'] >= 0.8 and q['recall'] >= 0.6)
    print(f'[demo] {ok}/{len(summary["queries"])} queries with precision >= 0.8 and recall >= 0.6; '
          f'outputs in {args.out}/')
    return 0 if ok >= 3 else 1


def voxel_size_m(xyz: np.ndarray) -> float:
    """The map's voxel size, read off the spacing of its voxel centres."""
    steps = np.diff(np.unique(np.round(xyz[:, 0], 4)))
    return float(steps.min()) if len(steps) else 0.05


def write_outputs(out: Path, seed: int, results, map_cloud, status) -> dict:
    """PLY per query, top-down PNG, summary.json; prints the table."""
    from ov3d_ros.core.io import write_ply
    from ov3d_ros.eval.segmentation import score_segmentation
    from ov3d_ros.sim import builtin_scene, sample_gt_points
    from ov3d_ros.sim.classes import CLASS_NAMES
    from ov3d_ros.tools.render import render_topdown

    gt_xyz, gt_sem, _ = sample_gt_points(builtin_scene(seed))
    rows = []
    print(f'{"query":<10} {"points":>7} {"precision":>9} {"recall":>7} {"ms":>6}')
    for r in results:
        ply = out / f'segment_{r["text"].replace(" ", "_")}.ply'
        write_ply(ply, r['xyz'], r['rgb'], r['scores'])
        cls = CLASS_NAMES.index(r['text']) if r['text'] in CLASS_NAMES else -1
        s = score_segmentation(r['xyz'], gt_xyz, gt_sem, cls, radius_m=0.06, observed_xyz=map_cloud[0])
        rows.append({'text': r['text'], 'points': s.points, 'precision': round(s.precision, 4),
                     'recall': round(s.recall, 4), 'query_ms': round(r['ms'], 1), 'ply': str(ply),
                     'success': r['success'], 'message': r['message']})
        print(f'{r["text"]:<10} {s.points:>7} {s.precision:>9.3f} {s.recall:>7.3f} {r["ms"]:>6.0f}')
    png = out / 'segmentation_topdown.png'
    render_topdown(map_cloud[0], map_cloud[1], [(r['text'], r['xyz']) for r in results],
                   point_size_m=voxel_size_m(map_cloud[0])).save(png)
    write_ply(out / 'map.ply', map_cloud[0], map_cloud[1])
    summary = {'scene_seed': seed, 'node_status': status, 'picture': str(png), 'queries': rows}
    (out / 'summary.json').write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == '__main__':
    raise SystemExit(main())
