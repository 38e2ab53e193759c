"""The mapping node end to end: a 640x480 30 Hz stream, queries meanwhile, and queries on a 100 k-voxel map (prints
figures, asserts nothing).

    python benchmarks/bm_node.py                                  # both sections, 60 s of stream
    python benchmarks/bm_node.py --only stream --seconds 10       # a short run
    python benchmarks/bm_node.py --only map --voxels 100000 --calls 30
    python benchmarks/bm_node.py --param map.device:=cuda         # any node parameter (-p name:=value)

Runs the real processes on a private ROS domain (``ov3d_ros.tools.ros_graph``, as ``make demo`` does): the mapping
node with config/mapping.yaml + config/demo.yaml (simulated features from the player's label images, poses on the
pose topic) and, for `stream`, the built-in scene player. One JSON line per figure, each with device, torch
version, threads and sizes:

  stream  the player plays a --seconds long trajectory at --rate-hz (--width x --height, depth 16UC1, labels) and is
          stopped after --seconds (right after a frame); from the first keyframe on /segment_by_text('chair') goes
          out every --query-period s without waiting for the answers. Frames published (depth images counted
          here: the last message of a frame; the player renders every frame, so its rate is bounded by its CPU),
          received by the node (processed + superseded + dropped + still pending, from ~/status), keyframes
          integrated, frames dropped, keyframes selected but dropped while waiting to be integrated
          (max_pending_keyframes), the keyframes the node's rule selects when it sees every published frame (the
          same KeyframeSelector and settings replayed here on the published poses), per-keyframe integration time
          (~/status: a batch's time shared by its keyframes; mean, p95, max) and the query round trips (client
          side), with the node's own time in its handler (query_in_node, from the "(N ms)" of each answer).
  map     a --voxels map (bm_pooling's synthetic building, one scene class per 0.5 m cell, features near the class
          texts, written by the core's Mapper.save) loaded by the node at start (map_path + load_map_on_start),
          then --calls /segment_by_text round trips (client side: request sent -> response in hand; after one
          warm-up call per text), the node's own time of each (in_node) and the answer size.
The summary line holds the targets: 0 dropped frames, every selected keyframe integrated, and the round trip
at 100 k voxels.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUERIES = ('chair', 'table', 'sofa', 'bed', 'red chair')


def env(device: str) -> dict:
    return {'device': device, 'torch': torch.__version__, 'threads': torch.get_num_threads(),
            'load_avg': [round(x, 1) for x in os.getloadavg()]}


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def stats_ms(seconds) -> dict:
    """n, mean, p50, p95, max of a list of seconds, in ms (only n when empty)."""
    if not len(seconds):
        return {'n': 0}
    a = 1e3 * np.asarray(seconds, dtype=np.float64)
    return {'n': len(a), 'mean_ms': round(float(a.mean()), 1), 'p50_ms': round(float(np.percentile(a, 50)), 1),
            'p95_ms': round(float(np.percentile(a, 95)), 1), 'max_ms': round(float(a.max()), 1)}


def handler_seconds(responses) -> list:
    """The node's own time for each answered request, from the "(N ms)" its answer message ends with: the rest
    of a round trip is transport and waiting for an executor thread and the CPU."""
    out = []
    for r in responses:
        m = re.search(r'\((\d+) ms\)$', r.message) if r is not None and r.success else None
        if m:
            out.append(float(m.group(1)) / 1e3)
    return out


def segment(client, text: str, timeout_s: float):
    """One /segment_by_text round trip: (seconds or None when unanswered, response or None)."""
    from ov3d_ros.srv import SegmentByText
    t0 = time.perf_counter()
    future = client.client.call_async(SegmentByText.Request(text=text))
    client.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
    if not future.done():
        client.client.remove_pending_request(future)
        return None, None
    return time.perf_counter() - t0, future.result()


def send(client, text: str) -> dict:
    """Send a /segment_by_text request: {'future'}, and 's' (round trip, seconds) once answered (the done callback
    runs in the client's next spin)."""
    from ov3d_ros.srv import SegmentByText
    q = {'t0': time.perf_counter()}
    q['future'] = client.client.call_async(SegmentByText.Request(text=text))
    q['future'].add_done_callback(lambda f: q.__setitem__('s', time.perf_counter() - q['t0']))
    return q


def node_device(log: str) -> str:
    """The map's device as the node logs it ('feature source ... on cpu')."""
    for line in log.splitlines():
        if 'feature source' in line and ' on ' in line:
            return line.rsplit(' on ', 1)[1].strip()
    return 'unknown'


def private_domain_env() -> dict:
    """Environment of a private ROS domain for the processes started here, also applied to this process (its
    DemoClient joins the same domain)."""
    from ov3d_ros.tools.ros_graph import private_ros_env
    env_vars = private_ros_env()
    os.environ.update({k: env_vars[k] for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE',
                                                 'RMW_IMPLEMENTATION')})
    return env_vars


def start(env_vars, out: Path, params, timeout_s: float = 300.0):
    """The mapping node (mapping.yaml + demo.yaml + ``params``) and a DemoClient once its service is up."""
    from ov3d_ros.tools.demo_client import DemoClient
    from ov3d_ros.tools.ros_graph import start_mapping_node
    node = start_mapping_node(env_vars, out / 'node.log', params=list(params))
    client = DemoClient()
    if not client.wait_for_service(node, timeout_s):
        client.close()
        node.stop()
        raise SystemExit('the mapping node did not come up:\n' + node.log()[-3000:])
    return node, client


def selected_keyframes(poses, params=()) -> int:
    """Keyframes the node's rule (config/mapping.yaml + demo.yaml, then the ``keyframes.*`` entries of ``params``,
    ``name:=value``) selects among [(stamp s, T_W_C (4, 4))]."""
    from ov3d_ros.core.config import load_yaml_config
    from ov3d_ros.core.keyframes import KeyframeSelector
    from ov3d_ros.tools.ros_graph import CONFIG
    cfg = load_yaml_config([CONFIG / 'mapping.yaml', CONFIG / 'demo.yaml']).keyframes
    for name, value in (p.split(':=', 1) for p in params):
        if name.startswith('keyframes.'):
            setattr(cfg, name.split('.', 1)[1], float(value))
    selector, n = KeyframeSelector(cfg), 0
    for t, T in poses:
        if selector.check(T, t):
            selector.accept(T, t)
            n += 1
    return n


def bench_stream(args, env_vars, out: Path) -> dict:
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import Image
    from ov3d_ros.ros import conversions as conv
    from ov3d_ros.tools.ros_graph import start_scene_player
    node, client = start(env_vars, out, args.param)
    player, poses, depth_stamps, queries = None, {}, [], []
    try:
        device = node_device(node.log())
        qos = QoSProfile(depth=100)
        client.node.create_subscription(PoseStamped, '/pose', lambda m: poses.__setitem__(
            conv.stamp_to_sec(m.header.stamp), conv.pose_msg_to_matrix(m)), qos)
        # depth is the last message of a frame: frames published = depth images seen here
        client.node.create_subscription(Image, '/depth/image',
                                        lambda m: depth_stamps.append(conv.stamp_to_sec(m.header.stamp)), qos)
        # the trajectory spans the stream, or --prerender frames rendered first and looped (the first
        # --prerender frames of a --trajectory-frames long trajectory, when given)
        n_frames = args.trajectory_frames or args.prerender or max(2, round(args.seconds * args.rate_hz))
        player = start_scene_player(env_vars, out / 'player.log', [
            f'n_frames:={n_frames}', f'play_frames:={args.prerender if args.trajectory_frames else 0}',
            f'rate_hz:={float(args.rate_hz)}', f'width:={args.width}',
            f'height:={args.height}', 'loop:=true', f'prerender:={str(bool(args.prerender)).lower()}'])
        end = time.monotonic() + 120.0 + (10.0 * args.prerender)   # a frame renders in ~1-3 s here
        while not depth_stamps and time.monotonic() < end and player.alive():
            client.spin(0.1)
        if not depth_stamps:
            raise SystemExit('the scene player published nothing:\n' + player.log()[-3000:])
        t_start = time.monotonic()
        next_query = t_start
        while time.monotonic() - t_start < args.seconds:
            if not node.alive():
                raise SystemExit('the mapping node exited:\n' + node.log()[-3000:])
            if time.monotonic() >= next_query and client.status and client.status['keyframes'] > 0:
                next_query = time.monotonic() + args.query_period      # sent on time, answered or not
                queries.append(send(client, 'chair'))
            client.spin(0.05)
        # stop the player right after a frame's last message, not in the middle of one
        seen, end = len(depth_stamps), time.monotonic() + 30.0
        while len(depth_stamps) == seen and time.monotonic() < end:
            client.executor.spin_once(timeout_sec=0.01)
        client.spin(0.3)                                          # the node gets that frame too
        player.stop()
        end = time.monotonic() + args.query_timeout
        while time.monotonic() < end and not all('s' in q for q in queries):
            client.spin(0.1)
        streamed = depth_stamps[-1] - depth_stamps[0]
        published = len(depth_stamps)
        # the node works off what it holds: wait until ~/status stops changing (nothing pending)
        end, last, since = time.monotonic() + args.settle_timeout, None, time.monotonic()
        while time.monotonic() < end:
            client.spin(0.5)
            s = client.status
            key = s and (s['frames'], s['superseded'], s['dropped'], s['keyframes'], s['pending_depth'],
                         s['pending_keyframes'])
            if key != last:
                last, since = key, time.monotonic()
            elif s['pending_depth'] == 0 and s['pending_keyframes'] == 0 and time.monotonic() - since > 2.5:
                break
        final = dict(client.status)
        alive = node.alive()
    finally:
        if player is not None:
            player.stop()
        client.close()
        code = node.stop(60.0)
    lat = [q['s'] for q in queries if 's' in q]
    failures = [q['future'].result().message if q['future'].done() else 'no answer' for q in queries
                if not (q['future'].done() and q['future'].result().success)]
    received = final['frames'] + final['superseded'] + final['dropped'] + final['pending_depth']
    selected = selected_keyframes([(t, poses[t]) for t in depth_stamps if t in poses], args.param)
    row = dict(env(device), section='stream', image=f'{args.width}x{args.height}', rate_hz=args.rate_hz,
               seconds=round(streamed, 1), trajectory_frames=n_frames, frames_published=published,
               published_hz=round((published - 1) / max(streamed, 1e-9), 1), frames_received=received,
               frames_lost_in_transport=published - received, frames_processed=final['frames'],
               frames_superseded=final['superseded'], frames_dropped=final['dropped'],
               keyframes_selected_at_full_rate=selected, keyframes_integrated=final['keyframes'],
               keyframes_dropped_waiting=final['keyframes_dropped'],
               poses_interpolated=sum(c.get('poses_interpolated', 0) for c in final.get('cameras', {}).values()),
               keyframe_ms={'mean': round(1e3 * final['keyframe_time_mean_s'], 1),
                            'p95': round(1e3 * final.get('keyframe_time_p95_s', float('nan')), 1),
                            'max': round(1e3 * final['keyframe_time_max_s'], 1)},
               voxels=final['voxels'], queries_sent=len(queries), queries_answered=len(lat),
               queries_failed=len(failures), query_failures=sorted(set(failures))[:3],
               query_round_trip=stats_ms(lat),
               query_in_node=stats_ms(handler_seconds([q['future'].result() for q in queries if q['future'].done()])),
               peak_rss_mb=round(final['peak_rss_mb']),
               last_error=final['last_error'], node_alive_at_end=alive, node_exit_code=code)
    return emit(row)


def synthetic_map(n_voxels: int, path: Path, cell_m: float = 0.5):
    """Write a map of ``n_voxels`` (bm_pooling's building: floors and walls at 5 cm) with the demo's feature source
    to ``path``: each ``cell_m`` cell is one class of the scene, its features that class's text embedding plus
    noise, its colour the class's plus noise (objects with extent, so geometry pooling keeps them, unlike one
    random class per voxel). Returns (voxels, file bytes)."""
    from bm_pooling import building_exactly
    from ov3d_ros.core.config import load_yaml_config
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Mapper
    from ov3d_ros.core.voxel_map import VoxelFeatureMap
    from ov3d_ros.sim import CLASS_NAMES
    from ov3d_ros.tools.ros_graph import CONFIG
    cfg = load_yaml_config([CONFIG / 'mapping.yaml', CONFIG / 'demo.yaml'])
    cfg.map.device = 'cpu'
    mapper = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    text = mapper.embed_texts(list(CLASS_NAMES)).cpu()
    g = torch.Generator().manual_seed(0)
    pts = building_exactly(n_voxels)
    cell = torch.floor(pts / cell_m).long()
    cls = (cell[:, 0] * 73856093 ^ cell[:, 1] * 19349663 ^ cell[:, 2] * 83492791) % len(CLASS_NAMES)
    palette = torch.rand(len(CLASS_NAMES), 3, generator=g) * 200
    vmap = VoxelFeatureMap(cfg.map.voxel_size_m, text.shape[1], 'cpu', capacity=len(pts), max_weight=cfg.map.max_weight)
    for chunk in torch.split(torch.arange(len(pts)), 200_000):
        c = cls[chunk]
        f = text[c] + 0.6 * torch.randn(len(chunk), text.shape[1], generator=g) / text.shape[1] ** 0.5
        rgb = (palette[c] + 30 * torch.rand(len(chunk), 3, generator=g)).clamp(0, 255)
        vmap.integrate(pts[chunk], torch.nn.functional.normalize(f, dim=1), rgb)
    mapper.map = vmap
    return vmap.size, mapper.save(path)


def bench_map(args, env_vars, out: Path) -> dict:
    path = out / 'synthetic.ov3dmap'
    voxels, size = synthetic_map(args.voxels, path)
    t0 = time.monotonic()
    node, client = start(env_vars, out, [f'map_path:={path}', 'load_map_on_start:=true'] + list(args.param))
    lat, sizes, failures, answers = [], [], [], []
    try:
        device = node_device(node.log())
        up_s = time.monotonic() - t0
        for text in QUERIES:                                      # warm-up: each text embedded once
            dt, resp = segment(client, text, args.query_timeout)
            if resp is None or not resp.success:
                raise SystemExit(f'{text!r}: {resp.message if resp else "no answer"}\n' + node.log()[-3000:])
        for i in range(args.calls):
            dt, resp = segment(client, QUERIES[i % len(QUERIES)], args.query_timeout)
            if resp is None or not resp.success:
                failures.append(resp.message if resp else 'no answer')
                continue
            lat.append(dt)
            answers.append(resp)
            sizes.append((resp.cloud.width, len(resp.cloud.data) + 4 * len(resp.scores)))
        client.spin(1.5)
        loaded = client.status['voxels'] if client.status else None
    finally:
        client.close()
        code = node.stop(60.0)
    answer = np.asarray(sizes) if sizes else np.zeros((1, 2))
    return emit(dict(env(device), section='map', voxels_requested=args.voxels, voxels_in_file=voxels,
                     voxels_in_node=loaded, file_mb=round(size / 2 ** 20, 1), node_up_and_loaded_s=round(up_s, 1),
                     texts=list(QUERIES), calls=args.calls, answered=len(lat), failed=len(failures),
                     round_trip=stats_ms(lat), in_node=stats_ms(handler_seconds(answers)),
                     answer_voxels_mean=int(answer[:, 0].mean()),
                     answer_kb_mean=round(float(answer[:, 1].mean()) / 1024, 1), node_exit_code=code))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--only', nargs='+', default=['stream', 'map'], choices=['stream', 'map'])
    p.add_argument('--seconds', type=float, default=60.0, help='length of the stream')
    p.add_argument('--rate-hz', type=float, default=30.0)
    p.add_argument('--width', type=int, default=640)
    p.add_argument('--height', type=int, default=480)
    p.add_argument('--prerender', type=int, default=0, metavar='N',
                   help='the player renders N frames along the trajectory first and loops them at --rate-hz '
                        '(the stream rate then holds on a CPU that renders slower; 0: render each frame on the fly)')
    p.add_argument('--trajectory-frames', type=int, default=0, metavar='M',
                   help='with --prerender N: the trajectory has M frames and the player plays its first N (e.g. '
                        'M 1800, N 300: the first 10 s of the 60 s loop at its own 30 Hz pace)')
    p.add_argument('--query-period', type=float, default=2.0, help='seconds between queries during the stream')
    p.add_argument('--query-timeout', type=float, default=60.0, help='a call unanswered this long is a failure')
    p.add_argument('--settle-timeout', type=float, default=60.0,
                   help='seconds to wait after the stream for the node to work off what it holds')
    p.add_argument('--voxels', type=int, default=100_000, help='map size of the `map` section')
    p.add_argument('--calls', type=int, default=30, help='timed /segment_by_text calls of the `map` section')
    p.add_argument('--param', action='append', default=[], help='node parameter name:=value (repeatable)')
    p.add_argument('--out', type=Path, default=None, help='folder for the node and player logs (default: a temp dir)')
    args = p.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix='bm_node_'))
    out.mkdir(parents=True, exist_ok=True)
    env_vars = private_domain_env()
    print(json.dumps(dict(env('host'), cpu_count=os.cpu_count(), logs=str(out), params=args.param)), flush=True)
    rows = {}
    for section in args.only:
        (out / section).mkdir(exist_ok=True)
        rows[section] = globals()[f'bench_{section}'](args, env_vars, out / section)
    summary = {'summary': True, 'load_avg_end': [round(x, 1) for x in os.getloadavg()]}
    if 'stream' in rows:
        s = rows['stream']
        summary.update(frames_dropped=s['frames_dropped'], target_frames_dropped=0,
                       frames_lost_in_transport=s['frames_lost_in_transport'],
                       keyframes_integrated=s['keyframes_integrated'],
                       keyframes_dropped_waiting=s['keyframes_dropped_waiting'],
                       keyframes_selected_at_full_rate=s['keyframes_selected_at_full_rate'],
                       keyframes_integrated_ratio=round(s['keyframes_integrated'] /
                                                        max(1, s['keyframes_selected_at_full_rate']), 2),
                       queries_during_stream=f"{s['queries_answered']}/{s['queries_sent']} answered, "
                                             f"{s['queries_failed']} failed",
                       query_round_trip_during_stream_p95_ms=s['query_round_trip'].get('p95_ms'))
    if 'map' in rows:
        m = rows['map']
        summary.update(map_voxels=m['voxels_in_node'], round_trip_mean_ms=m['round_trip'].get('mean_ms'),
                       round_trip_p95_ms=m['round_trip'].get('p95_ms'))
    emit(summary)


if __name__ == '__main__':
    main()
