"""Benchmark: per-keyframe mapping cost and query time on the built-in scene (prints figures, asserts nothing).

    python benchmarks/bm_mapping.py --device cpu --frames 20
    python benchmarks/bm_mapping.py --device cuda --features clip simulated
    python benchmarks/bm_mapping.py --features clip --set map.compress_dim=64     # any config override

Stages per keyframe: features (2D extractor), fusion (lifting + voxel fusion). The CLIP rows use the real
ViT-B-16 architecture with random weights (pretrained=none): the cost is the same as with trained weights.
Also prints the query time at the final map size and the bytes per voxel of everything the mapper keeps.
"""
from __future__ import annotations

import argparse
import json
import sys
import resource
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first


def run(source: str, device: str, frames: int, width: int, height: int, queries: int, overrides=()) -> dict:
    from ov3d_ros.core.config import MapperConfig, parse_overrides, update_from_dict
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device = source, device
    if source == 'clip':
        cfg.features.pretrained = 'none'
    update_from_dict(cfg, parse_overrides(overrides))
    mapper = Mapper(cfg, create_extractor(cfg.features, device, CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(width, height)
    rendered = [(T, render(scene, cam, T)) for T in builtin_trajectory(scene, frames, 0)]
    stages = {'features': [], 'fusion': [], 'total': []}
    for i, (T, f) in enumerate(rendered):
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
        if i > 0:   # first keyframe includes one-off warm-up
            for k in stages:
                stages[k].append(mapper.timings_s[k] * 1e3)
    texts = ['chair', 'sofa', 'bed', 'red chair', 'plant'] * queries
    mapper.segment('warm-up')
    t0 = time.perf_counter()
    for t in texts:
        mapper.segment(t)
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    query_ms = (time.perf_counter() - t0) * 1e3 / len(texts)
    row = {'source': mapper.extractor.name, 'device': device, 'image': f'{width}x{height}', 'keyframes': frames,
           'voxels': mapper.map.size, 'bytes_per_voxel': mapper.bytes_per_voxel(), 'query_ms': round(query_ms, 1),
           'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0)}
    for k, v in stages.items():
        row[f'{k}_ms_mean'] = round(float(np.mean(v)), 1)
        row[f'{k}_ms_p95'] = round(float(np.percentile(v, 95)), 1)
    if device.startswith('cuda'):
        row['cuda_peak_mb'] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 0)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--features', nargs='+', default=['simulated', 'clip'], choices=['simulated', 'clip'])
    p.add_argument('--frames', type=int, default=20)
    p.add_argument('--width', type=int, default=640)
    p.add_argument('--height', type=int, default=480)
    p.add_argument('--queries', type=int, default=4, help='repetitions of the 5 timed queries')
    p.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE', help='config override')
    args = p.parse_args()
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}')
    for source in args.features:
        print(json.dumps(run(source, args.device, args.frames, args.width, args.height, args.queries, args.set)))


if __name__ == '__main__':
    main()
