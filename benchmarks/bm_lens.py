"""Benchmark: maps of raw (distorted) images, lifted along the lens's rays or along a pinhole reading of k.

    python benchmarks/bm_lens.py                       # 320x180, 20 keyframes of the built-in scene
    python benchmarks/bm_lens.py --size 640 360 --frames 40

The built-in scene is rendered through lenses shaped like real cameras' (the renderer casts each pixel's
undistorted ray, so the images are distorted as a raw camera image is) and mapped twice with simulated features:
with the camera info's k and d (what the node does with ``rectified_images: false``) and with k alone (what it did
before it read d). Prints per lens the time to invert the lens once per camera, the time per keyframe of lifting +
fusion, and how far the map's voxel centres are from the scene's surfaces (ground-truth points, 2 cm spacing; with
5 cm voxels a centre on a flat surface is up to 2.5 cm from it).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first

LENSES = {   # (fx, fy, cx, cy) at 1280x720, model, coefficients
    'rational_polynomial (Azure Kinect-like)': ((605.0, 604.6, 638.1, 366.9), 'rational_polynomial',
                                                (0.55, -2.6, 0.0005, -0.0002, 1.5, 0.43, -2.4, 1.43)),
    'plumb_bob (wide-angle)': ((640.0, 640.0, 639.5, 359.5), 'plumb_bob', (-0.28, 0.07, 0.0008, -0.0004, 0.0)),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--size', type=int, nargs=2, default=(320, 180), metavar=('W', 'H'))
    p.add_argument('--frames', type=int, default=20)
    args = p.parse_args()
    from scipy.spatial import cKDTree
    from ov3d_ros.core.camera import PinholeCamera
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, render
    from ov3d_ros.sim.gt import sample_gt_points
    W, H = args.size
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, cpu, {W}x{H}, {args.frames} keyframes')
    scene = builtin_scene(0)
    surfaces = cKDTree(sample_gt_points(scene, 0.02)[0])
    poses = builtin_trajectory(scene, args.frames, 0)
    cfg = MapperConfig()
    cfg.features.source, cfg.purify.enabled = 'simulated', False
    extractor = create_extractor(cfg.features, 'cpu', CLASS_NAMES)
    for lens_name, (k, model, d) in LENSES.items():
        lens = PinholeCamera(*k, 1280, 720, model, d).scaled(W, H)
        t0 = time.perf_counter()
        lens.pixel_rays()
        invert_ms = (time.perf_counter() - t0) * 1e3
        frames = [render(scene, lens, T) for T in poses]
        for reading, cam in (('k and d', lens), ('k alone', PinholeCamera(lens.fx, lens.fy, lens.cx, lens.cy, W, H))):
            mapper = Mapper(cfg, extractor)
            fusion = []
            for i, (T, f) in enumerate(zip(poses, frames)):
                mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
                if i:
                    fusion.append(mapper.timings_s['fusion'] * 1e3)
            dist, _ = surfaces.query(mapper.map_cloud().xyz)
            print(json.dumps({'lens': lens_name, 'read with': reading, 'invert_ms_once': round(invert_ms, 1),
                              'fusion_ms_mean': round(float(np.mean(fusion)), 1), 'voxels': mapper.map.size,
                              'surface_distance_cm_mean': round(float(dist.mean()) * 100, 2),
                              'surface_distance_cm_p95': round(float(np.percentile(dist, 95)) * 100, 2),
                              'voxels_beyond_5cm_pct': round(float(np.mean(dist > 0.05)) * 100, 1)}))


if __name__ == '__main__':
    main()
