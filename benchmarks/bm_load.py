"""Load: the mapping node under a looping 30 Hz RGB-D + pose stream while a client fires rounds of concurrent
/segment_by_text calls (prints figures, asserts nothing).

    python benchmarks/bm_load.py --rounds 5 --concurrency 50

Starts the mapping node (config/demo.yaml: simulated features, poses on the pose topic) and the built-in scene
player (``rate_hz``, ``loop``) as two ROS 2 processes on a private domain, as ``make demo`` does; waits for the first
keyframes; then per round sends --concurrency asynchronous calls at once (all in flight together) and waits for
every answer or --round-timeout (a call still unanswered then is lost). Prints one JSON line per round, then a
summary: calls sent / answered / succeeded, latency p50 / p95 / max, the depth images the player published (counted
here), the node's frames received / integrated / dropped / superseded (~/status) and whether it was alive to the end
(its exit code after SIGINT).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUERIES = ('chair', 'table', 'sofa', 'bed', 'cabinet', 'plant', 'lamp', 'door', 'red chair', 'something to sit on')


def fire(client, service, n: int, timeout_s: float) -> list:
    """``n`` concurrent calls; returns (latency s or None, success) per call."""
    from ov3d_ros.srv import SegmentByText
    sent, done = [], {}
    t0 = time.perf_counter()
    for i in range(n):
        future = service.call_async(SegmentByText.Request(text=QUERIES[i % len(QUERIES)]))
        future.add_done_callback(lambda f, i=i: done.setdefault(i, (time.perf_counter() - t0, f.result().success)))
        sent.append(future)
    end = time.monotonic() + timeout_s
    while len(done) < n and time.monotonic() < end:
        client.executor.spin_once(timeout_sec=0.05)
    for f in sent:
        if not f.done():
            service.remove_pending_request(f)
    return [done.get(i, (None, False)) for i in range(n)]


def main() -> None:
    from rclpy.qos import QoSProfile
    from sensor_msgs.msg import Image
    from bm_node import private_domain_env, start
    from ov3d_ros.srv import SegmentByText
    from ov3d_ros.tools.ros_graph import start_scene_player
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--concurrency', type=int, default=50)
    p.add_argument('--rate', type=float, default=30.0, help='scene player rate, Hz')
    p.add_argument('--width', type=int, default=160, help='image width (the player renders every frame)')
    p.add_argument('--height', type=int, default=120)
    p.add_argument('--round-timeout', type=float, default=60.0, help='seconds to wait for the answers of a round')
    p.add_argument('--warmup-keyframes', type=int, default=3)
    args = p.parse_args()

    out = Path(tempfile.mkdtemp(prefix='bm_load_'))
    env = private_domain_env()
    node, client = start(env, out, [], 180.0)
    player = None
    try:
        depth_count = [0]
        client.node.create_subscription(Image, '/depth/image', lambda m: depth_count.__setitem__(0, depth_count[0] + 1),
                                        QoSProfile(depth=10))
        service = client.node.create_client(SegmentByText, '/segment_by_text', qos_profile=QoSProfile(depth=1000))
        service.wait_for_service(timeout_sec=30.0)
        player = start_scene_player(env, out / 'player.log', [f'rate_hz:={args.rate}', 'loop:=true', 'n_frames:=120',
                                                              f'width:={args.width}', f'height:={args.height}'])
        end = time.monotonic() + 180.0
        while time.monotonic() < end and not (client.status and client.status['keyframes'] >= args.warmup_keyframes):
            client.spin(0.5)
        if not (client.status and client.status['keyframes'] >= args.warmup_keyframes):
            raise SystemExit(f'no keyframes after 180 s (status {client.status}):\n' + node.log()[-3000:])
        start, start_depth, t_start = dict(client.status), depth_count[0], time.monotonic()
        results = []
        for r in range(args.rounds):
            res = fire(client, service, args.concurrency, args.round_timeout)
            lat = [t for t, _ in res if t is not None]
            print(json.dumps({'round': r + 1, 'sent': len(res), 'answered': len(lat), 'success': sum(s for _, s in res),
                              'max_s': round(max(lat), 3) if lat else None, 'voxels': client.status['voxels']}),
                  flush=True)
            results += res
            client.spin(1.0)
        client.spin(2.0)                                         # one more ~/status
        wall = time.monotonic() - t_start
        final = dict(client.status)
        alive = node.alive()
    finally:
        if player is not None:
            player.stop()
        client.close()
        code = node.stop()
    lat = np.array([t for t, _ in results if t is not None])
    diff = {k: final[k] - start[k] for k in ('frames', 'keyframes', 'dropped', 'superseded')}
    print(json.dumps({
        'image': f'{args.width}x{args.height}', 'player_rate_hz': args.rate, 'rounds': args.rounds,
        'concurrency': args.concurrency, 'calls_sent': len(results), 'calls_answered': int(len(lat)),
        'calls_success': int(sum(s for _, s in results)), 'calls_unanswered': len(results) - int(len(lat)),
        'latency_s': {'p50': round(float(np.percentile(lat, 50)), 3), 'p95': round(float(np.percentile(lat, 95)), 3),
                      'max': round(float(lat.max()), 3)} if len(lat) else None,
        'during_load': {'seconds': round(wall, 1), 'depth_published': depth_count[0] - start_depth,
                        'published_hz': round((depth_count[0] - start_depth) / wall, 1),
                        'received': diff['frames'] + diff['dropped'] + diff['superseded'],
                        'integrated': diff['keyframes'], 'processed': diff['frames'], 'dropped': diff['dropped'],
                        'superseded': diff['superseded']},
        'node_final': {k: final[k] for k in ('frames', 'keyframes', 'dropped', 'superseded', 'voxels',
                                             'keyframe_time_mean_s', 'peak_rss_mb', 'last_error')},
        'node_alive_at_end': alive, 'node_exit_code': code, 'logs': str(out)}, indent=1))


if __name__ == '__main__':
    main()
