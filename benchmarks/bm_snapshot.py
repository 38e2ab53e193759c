"""Cost of ``Mapper.snapshot()`` (the copy the mapping node publishes for its readers after every keyframe): time
and memory at a given number of voxels (prints one JSON line per case, asserts nothing).

    OMP_NUM_THREADS=1 python benchmarks/bm_snapshot.py --voxels 50000 100000
    THP_MEM_ALLOC_ENABLE=0 OMP_NUM_THREADS=1 python benchmarks/bm_snapshot.py    # on 4 kB pages

It runs as the nodes do (it imports ``ov3d_ros.ros`` before torch): torch's large CPU allocations go on transparent
huge pages unless ``THP_MEM_ALLOC_ENABLE`` says otherwise (``thp`` in each line).

The maps are synthetic (random voxels at 5 cm, random D-dimensional features, a 21-class label volume), since the
copy's cost depends only on the layers' sizes: ``raw`` copies keys, weights, colours, features and norms (and the
label evidence); ``purified`` copies the purified (voted) features instead of the raw ones, plus the pooled label
layer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first
import ov3d_ros.ros  # noqa: E402,F401  (before torch: the nodes' process settings, i.e. huge pages)
import torch  # noqa: E402


def synthetic_mapper(voxels: int, dim: int, classes: int, purified: bool):
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.label_volume import LabelVolume
    from ov3d_ros.core.mapper import Mapper
    from ov3d_ros.core.voxel_map import VoxelFeatureMap
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device = 'simulated', 'cpu'
    cfg.purify.enabled, cfg.purify.affinity = purified, 'fallback'
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', ['unlabeled', 'wall']))
    g = torch.Generator().manual_seed(0)
    side = int(round(voxels ** (1 / 3))) + 2
    cells = torch.randperm(side ** 3, generator=g)[:voxels]
    xyz = torch.stack([cells // side ** 2, cells // side % side, cells % side], 1).float() * 0.05 + 0.025
    vmap = VoxelFeatureMap(0.05, dim, 'cpu', 1024)
    vmap.integrate(xyz, torch.randn(voxels, dim, generator=g), torch.rand(voxels, 3, generator=g) * 255)
    m.map = vmap
    m.labels = LabelVolume([f'class {k}' for k in range(classes)], torch.randn(classes, dim, generator=g), 0.05,
                           vmap.cake)
    m.labels.evidence[:voxels] = torch.rand(voxels, classes, generator=g)
    if purified:                   # pooled and voted once over the whole map (fallback affinity), as a reader finds it
        m.purifier.update(vmap)
        m.purifier.features(vmap)
        m.labels.enable_pooling()
        m._purified_stale = False
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--voxels', type=int, nargs='+', default=[50_000, 100_000])
    p.add_argument('--dim', type=int, default=512, help='feature dimension (512: CLIP ViT-B/16)')
    p.add_argument('--classes', type=int, default=21)
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args()
    for voxels in args.voxels:
        for purified in (False, True):
            m = synthetic_mapper(voxels, args.dim, args.classes, purified)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                snap = m.snapshot()
                times.append(time.perf_counter() - t0)
            print(json.dumps({'voxels': snap.size, 'dim': args.dim, 'classes': args.classes,
                              'thp': os.environ['THP_MEM_ALLOC_ENABLE'], 'threads': torch.get_num_threads(),
                              'features': 'purified' if purified else 'raw',
                              'snapshot_ms_median': round(1e3 * sorted(times)[len(times) // 2], 1),
                              'snapshot_ms_max': round(1e3 * max(times), 1),
                              'snapshot_mb': round(snap.nbytes() / 2 ** 20, 1),
                              'map_mb': round(m.bytes_per_voxel() * voxels / 2 ** 20, 1)}), flush=True)


if __name__ == '__main__':
    main()
