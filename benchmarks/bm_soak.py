"""Soak: many frames of the built-in scene on a loop with a low voxel budget (prints figures, asserts nothing).

    python benchmarks/bm_soak.py --frames 20000 --max-voxels 20000

Every frame is integrated as a keyframe (a new pose each time: the loop's poses get a slow drift so the map keeps
meeting new space and the budget keeps evicting). Prints the voxel count, evicted total and RSS every
--every frames, then the peak RSS after warm-up against the RSS at the end of warm-up.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first


def rss_mb() -> float:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20


def main() -> None:
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--frames', type=int, default=20000)
    p.add_argument('--max-voxels', type=int, default=20000)
    p.add_argument('--purify', action='store_true', help='with geometry-guided pooling (fallback affinity)')
    p.add_argument('--every', type=int, default=1000)
    p.add_argument('--warmup', type=int, default=500)
    args = p.parse_args()
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device, cfg.map.max_voxels = 'simulated', 'cpu', args.max_voxels
    cfg.purify.enabled, cfg.purify.affinity = args.purify, 'fallback'
    mapper = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(160, 120)
    loop = [(T, render(scene, cam, T)) for T in builtin_trajectory(scene, 60, 0)]
    t0, warm_rss, peak, over = time.perf_counter(), None, 0.0, 0
    for i in range(args.frames):
        T, f = loop[i % len(loop)]
        T = T.copy()
        T[:3, 3] += np.array([0.7, 0.5, 0.0]) * np.sin(i / 97.0)      # drift: new space every lap
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
        over += mapper.map.size > args.max_voxels
        if i + 1 == args.warmup:
            warm_rss = rss_mb()
        if i + 1 > args.warmup:
            peak = max(peak, rss_mb())
        if (i + 1) % args.every == 0:
            print(json.dumps({'frame': i + 1, 'voxels': mapper.map.size, 'evicted': mapper.evicted_voxels,
                              'rss_mb': round(rss_mb(), 1), 's': round(time.perf_counter() - t0, 1)}), flush=True)
    print(json.dumps({'frames': args.frames, 'max_voxels': args.max_voxels, 'frames_over_budget': over,
                      'rss_after_warmup_mb': round(warm_rss or 0, 1), 'peak_rss_after_warmup_mb': round(peak, 1),
                      'growth_pct': round(100 * (peak / warm_rss - 1), 1) if warm_rss else None,
                      'torch_threads': torch.get_num_threads()}))


if __name__ == '__main__':
    main()
