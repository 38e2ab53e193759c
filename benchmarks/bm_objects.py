"""Benchmark: splitting a query answer into object instances (prints figures, asserts nothing).

    python benchmarks/bm_objects.py --objects 2 10 50 --voxels-per-object 2000 --gap 1
    python benchmarks/bm_objects.py --device cuda

Each object is a solid box of about --voxels-per-object voxels at 5 cm with a random shape, the objects spread
over a 20 m square floor; the answer is all their voxels (what a query for a common class returns).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first


def answer(n_objects: int, per_object: int, voxel: float, seed: int = 0) -> torch.Tensor:
    """(N, 3) voxel centres of ``n_objects`` separated boxes of about ``per_object`` voxels each."""
    g = torch.Generator().manual_seed(seed)
    side = max(2, round(per_object ** (1 / 3)))
    grid = int(n_objects ** 0.5) + 1
    pts = []
    for i in range(n_objects):
        shape = (torch.rand(3, generator=g) * 0.6 + 0.7) * side
        idx = torch.stack(torch.meshgrid(*[torch.arange(int(s)) for s in shape], indexing='ij'), -1).reshape(-1, 3)
        origin = torch.tensor([(i % grid) * 3 * side, (i // grid) * 3 * side, 0])
        pts.append(idx + origin)
    return (torch.cat(pts).double() + 0.5) * voxel


def main(argv=None) -> int:
    from ov3d_ros.core.objects import extract_objects
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--objects', type=int, nargs='+', default=[2, 10, 50])
    p.add_argument('--voxels-per-object', type=int, default=2000)
    p.add_argument('--gap', type=int, default=1)
    p.add_argument('--device', default='cpu')
    p.add_argument('--repeats', type=int, default=3)
    args = p.parse_args(argv)
    for n in args.objects:
        xyz = answer(n, args.voxels_per_object, 0.05).to(args.device)
        scores = torch.rand(len(xyz), dtype=torch.float64, device=args.device)
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            objs = extract_objects(xyz, scores, 0.05, 'x', gap_vox=args.gap, min_voxels=5)
            if args.device.startswith('cuda'):
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        print(json.dumps({'objects': n, 'found': len(objs), 'voxels': len(xyz), 'gap_vox': args.gap,
                          'device': args.device, 'ms_median': round(1e3 * sorted(times)[len(times) // 2], 1),
                          'ms_min': round(1e3 * min(times), 1)}))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
