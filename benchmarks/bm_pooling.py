"""Benchmark: per-keyframe geometry-guided pooling cost against map size (prints figures, asserts nothing).

    python benchmarks/bm_pooling.py --sizes 100000 1000000 --touched 15000
    python benchmarks/bm_pooling.py --device cuda --checkpoint models/affinity_default.safetensors

The map is a synthetic building at 5 cm: a floor with a grid of 2.5 m high walls, grown until it holds the
requested number of voxels, with random features (D = --dim) and colours, pooled once. A "keyframe" fuses a
compact patch of about --touched voxels (what one 640x480 keyframe touches at 5 cm) in a corner: with
``--keyframe seen`` a patch already in the map (new features, its colours again with sensor noise), with
``new`` a patch the map lacked; incremental pooling then re-pools around it. The time must not grow with the
map; whole-map pooling is shown beside.
``superpoint_vote_ms``: the superpoint vote (``purify.superpoint_k`` > 0) that the first reader after a keyframe
pays (segmentation + vote of the blocks the keyframe changed; ``superpoint_voxels`` of them), beside
``superpoint_vote_whole_ms`` over the whole map (the first read, or ``--superpoint-block 0``); ``--superpoint-k 0``
leaves it out.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first


def building(n_voxels: int, voxel: float = 0.05, room_m: float = 5.0, height_m: float = 2.5) -> torch.Tensor:
    """(N, 3) voxel-centre points of a square floor plus a wall every ``room_m`` metres, N ≈ ``n_voxels``."""
    cells = int(room_m / voxel)
    per_room = cells * cells + 2 * cells * int(height_m / voxel)       # floor + two walls of a room
    rooms = max(1, round((n_voxels / per_room) ** 0.5))
    side = rooms * cells
    ij = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing='ij'), -1).reshape(-1, 2)
    floor = torch.cat([ij, torch.zeros(len(ij), 1, dtype=torch.long)], 1)
    walls = ij[(ij[:, 0] % cells == 0) | (ij[:, 1] % cells == 0)]
    k = torch.arange(1, int(height_m / voxel))
    walls = torch.cat([walls.repeat_interleave(len(k), 0), k.repeat(len(walls))[:, None]], 1)
    return (torch.cat([floor, walls]).float() + 0.5) * voxel


def building_exactly(n_voxels: int) -> torch.Tensor:
    """(n_voxels, 3) points of :func:`building` (rooms come whole: grown, then cut to the size)."""
    pts = building(n_voxels)
    if len(pts) < n_voxels:
        pts = building(int(1.5 * n_voxels ** 2 / len(pts)))
    return pts[:n_voxels]


def run(n_voxels: int, touched: int, dim: int, device: str, iterations: int, radius: int, embed, whole: bool,
        margin: int = 3, superpoint_k=None, superpoint_block=None, keyframe: str = 'seen',
        superpoint_convex=None, pool_dim=None) -> dict:
    """Time one keyframe's update (median of 3 after a warm-up). ``keyframe``: 'seen' re-fuses a patch already
    in the map (new features, its colours with sensor noise: a robot looking at what it mapped before); 'new'
    fuses a patch the map did not have (every voxel new: a robot entering unseen space)."""
    from ov3d_ros.core.config import PurifyConfig
    from ov3d_ros.core.purification.pooling import GeometryPooling
    from ov3d_ros.core.voxel_map import VoxelFeatureMap
    pts = building(n_voxels)
    # a keyframe's patch: the voxels nearest to a corner of the building, about ``touched`` of them
    corner = pts.min(0).values + torch.tensor([1.0, 1.0, 0.0])
    nearest = torch.argsort((pts - corner).norm(dim=1))[:touched]
    cfg = PurifyConfig(enabled=True, affinity='learned' if embed else 'fallback', iterations=iterations,
                       radius_vox=radius, margin_vox=margin)
    if superpoint_k is not None:
        cfg.superpoint_k = superpoint_k
    if superpoint_block is not None:
        cfg.superpoint_block_vox = superpoint_block
    if superpoint_convex is not None:
        cfg.superpoint_convex = superpoint_convex
    if pool_dim is not None:
        cfg.pool_dim = pool_dim
    camera = pts.mean(0)          # seen from inside the building (orients normals for the vote's convexity test)
    g = torch.Generator().manual_seed(0)

    def fuse(vmap, rows):
        for chunk in torch.split(rows, 200_000):
            feats = torch.nn.functional.normalize(torch.randn(len(chunk), dim, generator=g), dim=1)
            vmap.integrate(pts[chunk], feats, torch.rand(len(chunk), 3, generator=g) * 255, origin=camera)

    def build():
        """(map, its pooling after one whole-map update); the map lacks the patch for a 'new' keyframe."""
        vmap = VoxelFeatureMap(0.05, dim, device, capacity=len(pts))
        keep = torch.ones(len(pts), dtype=torch.bool)
        if keyframe == 'new':
            keep[nearest] = False
        fuse(vmap, torch.nonzero(keep).flatten())
        pooling = GeometryPooling(cfg, embed)
        pooling.update(vmap)
        return vmap, pooling

    vmap, pooling = build()
    times, region, embedded = [], 0, 0
    for rep in range(4):
        if keyframe == 'new' and rep:
            vmap, pooling = build()
        if keyframe == 'seen':     # new features; the patch's colours as seen again, with sensor noise
            rows = vmap.rows_of(pts[nearest])
            noisy = (vmap.colors[rows] + 4.0 * torch.randn(len(rows), 3, generator=g)).clamp(0, 255)
            feats = torch.nn.functional.normalize(torch.randn(len(rows), dim, generator=g), dim=1)
            patch = vmap.integrate(pts[nearest], feats, noisy, origin=camera)
        else:
            patch = vmap.integrate(pts[nearest], torch.nn.functional.normalize(
                torch.randn(len(nearest), dim, generator=g), dim=1), torch.rand(len(nearest), 3, generator=g) * 255,
                origin=camera)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        region = pooling.update(vmap, patch)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        if rep:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
            embedded = pooling.timings_s['embedded']
    row = {'map_voxels': vmap.size, 'touched': touched, 'keyframe': keyframe, 'repooled': region,
           'embedded': embedded, 'affinity': cfg.affinity,
           'T': iterations, 'radius_vox': radius, 'margin_vox': margin, 'pool_dim': cfg.pool_dim, 'device': device,
           'per_keyframe_ms': round(1e3 * sorted(times)[len(times) // 2][0], 1),
           'per_keyframe_cpu_ms': round(1e3 * sorted(times, key=lambda t: t[1])[len(times) // 2][1], 1),
           'of_which_affinity_ms': round(1e3 * pooling.timings_s['affinity'], 1)}
    if pooling.votes:      # the superpoint vote a reader pays once after each keyframe
        for name in ('superpoint_vote_whole_ms', 'superpoint_vote_ms'):   # the first read votes the whole map
            if name == 'superpoint_vote_ms':
                pooling.update(vmap, patch)
            t0 = time.perf_counter()
            pooling.features(vmap)
            if device.startswith('cuda'):
                torch.cuda.synchronize()
            row[name] = round(1e3 * (time.perf_counter() - t0), 1)
        row['superpoint_voxels'] = pooling.timings_s['superpoint_voxels']
        row['superpoints'] = int(pooling.superpoints(vmap).max()) + 1
    if whole:
        t0 = time.perf_counter()
        pooling.update(vmap)
        if device.startswith('cuda'):
            torch.cuda.synchronize()
        row['whole_map_ms'] = round(1e3 * (time.perf_counter() - t0), 1)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--sizes', type=int, nargs='+', default=[100_000, 1_000_000], help='map sizes in voxels')
    p.add_argument('--touched', type=int, default=15_000, help='voxels one keyframe touches')
    p.add_argument('--dim', type=int, default=384, help='feature dimension (384 simulated, 512 CLIP ViT-B-16)')
    p.add_argument('--iterations', type=int, default=18)
    p.add_argument('--radius', type=int, default=2)
    p.add_argument('--margin', type=int, default=3, help='purify.margin_vox: voxel steps re-pooled beyond the changed ones')
    p.add_argument('--checkpoint', help='student checkpoint: time the learned affinity instead of the fallback')
    p.add_argument('--keyframe', choices=('seen', 'new'), nargs='+', default=['seen'],
                   help="'seen': the keyframe re-fuses a patch already mapped; 'new': a patch the map lacked")
    p.add_argument('--whole', action='store_true', help='also time one whole-map pooling')
    p.add_argument('--superpoint-k', type=float, default=None,
                   help='purify.superpoint_k for the superpoint vote (default: the config default; 0 = off)')
    p.add_argument('--superpoint-block', type=int, default=None,
                   help='purify.superpoint_block_vox (default: the config default; 0 = superpoints over the whole map)')
    p.add_argument('--superpoint-convex', type=float, default=None,
                   help='purify.superpoint_convex (default: the config default; 1 = no convexity term)')
    p.add_argument('--pool-dim', type=int, default=None,
                   help='purify.pool_dim, the pooling subspace (default: the config default; 0 = every dimension)')
    args = p.parse_args()
    embed = None
    if args.checkpoint:
        from ov3d_ros.core.purification.student import load_student
        embed = load_student(args.checkpoint, torch.device(args.device)).embed
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}')
    for n in args.sizes:
        for keyframe in args.keyframe:
            print(json.dumps(run(n, args.touched, args.dim, args.device, args.iterations, args.radius, embed,
                                 args.whole, args.margin, args.superpoint_k, args.superpoint_block, keyframe,
                                 args.superpoint_convex, args.pool_dim)),
                  flush=True)


if __name__ == '__main__':
    main()
