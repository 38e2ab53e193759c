"""Benchmark: ov3d_ros side by side with reference costs, figures and ratios from one run (prints, asserts nothing).

    make bench-deps                                   # open3d, for the fusion reference (benchmark only)
    python benchmarks/bm_compare.py                   # every section on the CPU
    python benchmarks/bm_compare.py --device cuda     # the same on a GPU
    python benchmarks/bm_compare.py --only fusion query --query-sizes 100000

Sections (one JSON line per row, each with device, torch version, threads and sizes; ratios = ours / reference):
  fusion   our lifting + fusion of the same rendered frames of the built-in scene (640x480, 5 cm voxels, depth
           0.1-5 m) against Open3D's VoxelBlockGrid TSDF + colour integrate, at D=384 simulated features and at
           map.compress_dim 64 (its PCA update per keyframe is shown apart, under compress_ms), and at 64 dims
           in a fixed basis taken from another scene's map (map.compress_basis, map.compress_update false: the
           compression is one projection); --reps passes, each side in a fresh process, medians (each pass's
           figures are listed too).
  query    Mapper.query on maps of 100 k and 1 M voxels against the floor: one matmul of the query and negatives'
           embeddings with pre-normalised features of the same size (fp16 as stored, and fp32; features x texts^T
           and texts x features^T; the fastest of the four is the floor); then the same
           map purified with the shipped defaults (whole map pooled and voted once, purify_whole_map_s): queries
           on the live map and on a snapshot (both divide by the norms the superpoint vote keeps), the snapshot
           itself, and the norms a map pooled without the vote computes per query (purified_norms).
  pooling  incremental geometry pooling per keyframe (fallback and learned affinity) against map size
           (benchmarks/bm_pooling.py's synthetic building).
  clip     CLIP ViT-B/16 dense features per 640x480 keyframe at 224/336/448 px short side, features.dtype fp32
           and bf16 on the CPU (fp16 on CUDA), random weights (pretrained=none: the same cost as trained weights); with
           --clip-compile also through torch.compile (features.compile), with its one-off compile time.
The features are SIMULATED (the built-in scene's label images through the simulated teacher) except in `clip`.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo's ov3d_ros first
sys.path.insert(0, str(Path(__file__).resolve().parent))

QUERIES = ('chair', 'table', 'sofa', 'bed', 'red chair')


def env(device: str) -> dict:
    return {'device': device if device == 'cpu' else torch.cuda.get_device_name(torch.device(device)),
            'torch': torch.__version__, 'threads': torch.get_num_threads()}


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    return row


def frames(n: int, width: int, height: int):
    from ov3d_ros.sim import builtin_scene, builtin_trajectory, default_camera, render
    scene, cam = builtin_scene(0), default_camera(width, height)
    return cam, [(T, render(scene, cam, T)) for T in builtin_trajectory(scene, n, 0)]


def ours_fusion(cam, rendered, device: str, compress_dim: int, voxel: float, min_d: float, max_d: float,
                basis: str = '') -> dict:
    """Per-keyframe lifting + fusion, Mapper.integrate's steps after feature extraction (features computed
    beforehand); the PCA update of map.compress_dim (or, with a ``basis`` map file, the projection into its fixed
    basis) timed apart. Wall and process CPU time."""
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.lifting import lift_keyframe
    from ov3d_ros.core.mapper import Mapper
    from ov3d_ros.sim import CLASS_NAMES
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device, cfg.map.compress_dim = 'simulated', device, compress_dim
    cfg.purify.enabled = False                        # fusion alone (pooling is measured in its own section)
    cfg.map.voxel_size_m, cfg.map.min_depth_m, cfg.map.max_depth_m = voxel, min_d, max_d
    cfg.map.compress_basis, cfg.map.compress_update = basis, not basis
    mapper = Mapper(cfg, create_extractor(cfg.features, device, CLASS_NAMES))
    grids = [mapper.extractor.extract(f.rgb, f.semantic) for _, f in rendered]
    fusion, compress = [], []
    for i, ((T, f), g) in enumerate(zip(rendered, grids)):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        if compress_dim:
            mapper._update_projection(g.reshape(-1, g.shape[-1]))
            g = mapper.projection.project(g)
        sync(device)
        t1, c1 = time.perf_counter(), time.process_time()
        lifted = lift_keyframe(torch.from_numpy(np.array(f.depth_m, dtype=np.float32)), torch.from_numpy(f.rgb), g,
                               cam, torch.from_numpy(T), min_d, max_d, cfg.map.pixel_stride)
        mapper.map.integrate(lifted.points, lifted.features, lifted.colors, origin=torch.from_numpy(T)[:3, 3])
        sync(device)
        t2, c2 = time.perf_counter(), time.process_time()
        if i:                                   # the first keyframe includes one-off warm-up
            fusion.append((t2 - t1, c2 - c1))
            compress.append((t1 - t0, c1 - c0))
    fusion, compress = np.mean(fusion, axis=0) * 1e3, np.mean(compress, axis=0) * 1e3
    return {'fusion_ms': fusion[0], 'fusion_cpu_ms': fusion[1], 'compress_ms': compress[0],
            'compress_cpu_ms': compress[1], 'voxels': mapper.map.size, 'dim': mapper.map.dim,
            'bytes_per_voxel': mapper.bytes_per_voxel()}


def open3d_fusion(cam, rendered, device: str, voxel: float, min_d: float, max_d: float) -> dict:
    """Per-frame Open3D VoxelBlockGrid TSDF + colour integrate (block hashing and integration) of the same frames."""
    import open3d as o3d
    import open3d.core as o3c
    dev = o3c.Device('CUDA:0' if device.startswith('cuda') else 'CPU:0')
    vbg = o3d.t.geometry.VoxelBlockGrid(attr_names=('tsdf', 'weight', 'color'),
                                        attr_dtypes=(o3c.float32, o3c.float32, o3c.float32),
                                        attr_channels=((1), (1), (3)), voxel_size=voxel, block_resolution=8,
                                        block_count=20000, device=dev)
    K = o3c.Tensor(np.array([[cam.fx, 0, cam.cx], [0, cam.fy, cam.cy], [0, 0, 1]], np.float64))
    times = []
    for i, (T, f) in enumerate(rendered):
        # uint16 millimetres + uint8 colour: Open3D's native sensor path (float depth would need float colour)
        ok = np.isfinite(f.depth_m) & (f.depth_m >= min_d) & (f.depth_m < 65.0)
        d = np.where(ok, np.round(f.depth_m * 1000.0), 0).astype(np.uint16)
        t0, c0 = time.perf_counter(), time.process_time()
        depth = o3d.t.geometry.Image(o3c.Tensor(d)).to(dev)
        color = o3d.t.geometry.Image(o3c.Tensor(np.ascontiguousarray(f.rgb))).to(dev)
        extrinsic = o3c.Tensor(np.linalg.inv(T))
        blocks = vbg.compute_unique_block_coordinates(depth, K, extrinsic, 1000.0, max_d)
        vbg.integrate(blocks, depth, color, K, extrinsic, 1000.0, max_d)
        if dev.get_type() == o3c.Device.DeviceType.CUDA:
            o3c.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0, time.process_time() - c0))
    wall, cpu = np.mean(times, axis=0) * 1e3
    return {'fusion_ms': wall, 'fusion_cpu_ms': cpu, 'blocks': int(vbg.hashmap().size()),
            'voxels_allocated': int(vbg.hashmap().size()) * 8 ** 3}


def _isolated(fn, *args, threads: int):
    """fn(*args) in a fresh process (spawned, ``threads`` torch threads): each side of the fusion comparison runs
    with an allocator and caches of its own. In one process, whichever runs second inherits the first's heap (glibc
    malloc's mmap and trim thresholds move with the sizes freed): after Open3D's integration our D=384 fusion
    measured about 20 % slower than alone, and the same with the thresholds pinned."""
    import concurrent.futures
    import multiprocessing
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn'),
                                                initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        return pool.submit(fn, *args).result()


def basis_file(device: str, voxel: float, folder: str) -> str:
    """A 64-d compressed map of another built-in scene (scene 1, 10 keyframes at 320x240), saved in ``folder``:
    the fixed basis of the third fusion row."""
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device, cfg.map.compress_dim, cfg.map.voxel_size_m = 'simulated', device, 64, voxel
    cfg.purify.enabled = False
    mapper = Mapper(cfg, create_extractor(cfg.features, device, CLASS_NAMES))
    scene, cam = builtin_scene(1), default_camera(320, 240)
    for i, T in enumerate(builtin_trajectory(scene, 10, 0)):
        f = render(scene, cam, T)
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
    path = str(Path(folder) / 'basis_scene1.ov3dmap')
    mapper.save(path)
    return path


def bench_fusion(args) -> None:
    """--reps passes over the frames, each: Open3D, then ours at D = 384, at 64-d and at 64-d in a fixed basis
    (fresh maps each pass, each in a process of its own); medians over the passes, so a pass that a busy host
    slowed down moves neither side alone."""
    import tempfile
    cam, rendered = frames(args.frames, 640, 480)
    common = dict(env(args.device), frames=args.frames, image='640x480', voxel_m=args.voxel, depth_m=[0.1, 5.0])
    threads = torch.get_num_threads()
    folder = tempfile.TemporaryDirectory(prefix='bm_compare_')
    basis = basis_file(args.device, args.voxel, folder.name)
    refs, ours = [], {(0, ''): [], (64, ''): [], (64, basis): []}
    for _ in range(max(1, args.reps)):
        if refs is not None:
            try:
                refs.append(_isolated(open3d_fusion, cam, rendered, args.device, args.voxel, 0.1, 5.0,
                                      threads=threads))
            except ImportError:
                refs = None
                print('open3d is not installed (make bench-deps): no reference for fusion', flush=True)
        for compress, fixed in ours:
            ours[compress, fixed].append(_isolated(ours_fusion, cam, rendered, args.device, compress, args.voxel,
                                                   0.1, 5.0, fixed, threads=threads))

    def med(rows, key):
        return float(np.median([r[key] for r in rows]))

    for (compress, fixed), passes in ours.items():
        row = dict(common, section='fusion', ours='lifting + fusion', features='simulated D=384',
                   compress_dim=compress, passes=len(passes), ours_ms=round(med(passes, 'fusion_ms'), 1),
                   compress_basis=('fixed: another scene\'s map (map.compress_update false)' if fixed else
                                   'PCA updated per keyframe (the default)' if compress else ''),
                   ours_cpu_ms=round(med(passes, 'fusion_cpu_ms'), 1), compress_ms=round(med(passes, 'compress_ms'), 1),
                   compress_cpu_ms=round(med(passes, 'compress_cpu_ms'), 1), voxels=passes[0]['voxels'],
                   bytes_per_voxel=passes[0]['bytes_per_voxel'], pixel_stride=2)
        if refs:
            ref_ms, ref_cpu = med(refs, 'fusion_ms'), med(refs, 'fusion_cpu_ms')
            row.update(reference='Open3D VoxelBlockGrid TSDF + colour integrate (all pixels, 8^3 blocks)',
                       reference_ms=round(ref_ms, 1), reference_cpu_ms=round(ref_cpu, 1),
                       reference_cpu_ms_passes=[round(r['fusion_cpu_ms'], 1) for r in refs],
                       ours_cpu_ms_passes=[round(o['fusion_cpu_ms'], 1) for o in passes],
                       reference_blocks=refs[0]['blocks'], ratio=round(med(passes, 'fusion_ms') / ref_ms, 2),
                       ratio_cpu=round(med(passes, 'fusion_cpu_ms') / ref_cpu, 2))
            if compress:                      # the compression counted in (median of the per-pass sums)
                row['ratio_cpu_with_compress'] = round(float(np.median(
                    [o['fusion_cpu_ms'] + o['compress_cpu_ms'] for o in passes])) / ref_cpu, 2)
        emit(row)


def synthetic_mapper(n_voxels: int, device: str, dim: int = 384):
    """A Mapper (simulated features) whose map is bm_pooling's building with features near the class texts."""
    from bm_pooling import building_exactly
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Mapper
    from ov3d_ros.core.voxel_map import VoxelFeatureMap
    from ov3d_ros.sim import CLASS_NAMES
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device = 'simulated', device
    cfg.purify.enabled = False                        # queries on the fused features, like the matmul floor
    mapper = Mapper(cfg, create_extractor(cfg.features, device, CLASS_NAMES))
    text = mapper.embed_texts(list(CLASS_NAMES)).cpu()
    g = torch.Generator().manual_seed(0)
    pts = building_exactly(n_voxels)
    vmap = VoxelFeatureMap(cfg.map.voxel_size_m, text.shape[1], device, capacity=len(pts),
                           max_weight=cfg.map.max_weight)
    for chunk in torch.split(torch.arange(len(pts)), 200_000):
        cls = torch.randint(0, len(text), (len(chunk),), generator=g)
        f = text[cls] + 0.6 * torch.randn(len(chunk), text.shape[1], generator=g) / text.shape[1] ** 0.5
        vmap.integrate(pts[chunk], torch.nn.functional.normalize(f, dim=1), torch.rand(len(chunk), 3, generator=g) * 255)
    mapper.map = vmap
    return mapper


def timed(fn, device: str, reps: int):
    """Median wall and process-CPU seconds of ``reps`` calls after one warm-up call (CPU time stays meaningful
    on a shared machine, where wall time mostly measures the wait for a core)."""
    fn()
    out = []
    for _ in range(reps):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        out.append((time.perf_counter() - t0, time.process_time() - c0))
    return tuple(float(x) for x in np.median(out, axis=0))


def bench_query(args) -> None:
    for n in args.query_sizes:
        mapper = synthetic_mapper(n, args.device)
        V, negs = mapper.map.size, list(mapper.cfg.query.default_negatives)
        texts = mapper.to_map_space(mapper.embed_texts([QUERIES[0]] + negs))
        unit = torch.nn.functional.normalize(mapper.map.features[:V].float(), dim=1)
        floors = {}
        for dt in (torch.float16, torch.float32):
            f, t = unit.to(dt), texts.T.to(dt).contiguous()
            name = str(dt).split('.')[-1]
            floors[name] = timed(lambda: f @ t, args.device, args.reps)
            # the same product as (K, D) x (D, V): one BLAS is faster one way, another the other way round
            floors[f'{name}_texts_first'] = timed(lambda: t.T @ f.T, args.device, args.reps)
            del f
        del unit
        floor_name = min(floors, key=lambda name: floors[name][1])      # the fastest, by CPU time
        floor = floors[floor_name]
        for q in QUERIES:
            mapper.embed_texts([q])                           # steady state: the text was asked before
        k = iter(range(10 ** 9))
        query = timed(lambda: mapper.query(QUERIES[next(k) % len(QUERIES)]), args.device, args.reps)
        segment = timed(lambda: mapper.segment(QUERIES[next(k) % len(QUERIES)]), args.device, args.reps)
        fresh = iter(f'object number {i}' for i in range(10 ** 9))
        new_text = timed(lambda: mapper.query(next(fresh)), args.device, args.reps)
        hits = len(mapper.query('chair').rows)
        # purified maps: purification switched on with the shipped defaults (the node's configuration: learned
        # student, superpoint vote), the whole map pooled and voted once. The vote keeps its rows' norms, so the
        # live map and its snapshots divide by those; a map pooled without the vote (superpoint_k 0) computes
        # them in every query and once per snapshot (purified_norms)
        from ov3d_ros.core.query import row_norms
        t0 = time.perf_counter()
        mapper.reconfigure_purification(dataclasses.replace(mapper.cfg.purify, enabled=True))
        mapper.query('chair')
        purify_s = time.perf_counter() - t0
        live_query = timed(lambda: mapper.query(QUERIES[next(k) % len(QUERIES)]), args.device, args.reps)
        snapshot = timed(mapper.snapshot, args.device, min(args.reps, 3))
        snap = mapper.snapshot()
        snap_query = timed(lambda: snap.query(QUERIES[next(k) % len(QUERIES)]), args.device, args.reps)
        norms = timed(lambda: row_norms(snap.features), args.device, args.reps)
        ms = lambda t: [round(1e3 * t[0], 1), round(1e3 * t[1], 1)]          # noqa: E731
        emit(dict(env(args.device), section='query', voxels=V, dim=mapper.map.dim, texts=1 + len(negs),
                  units='[wall ms, cpu ms]', query=ms(query), segment=ms(segment), query_new_text=ms(new_text),
                  chair_voxels=hits, floor_fp16=ms(floors['float16']), floor_fp32=ms(floors['float32']),
                  floor_fp16_texts_first=ms(floors['float16_texts_first']),
                  floor_fp32_texts_first=ms(floors['float32_texts_first']), floor=floor_name,
                  ratio=round(query[0] / floor[0], 2), ratio_cpu=round(query[1] / floor[1], 2),
                  purified_live_query=ms(live_query), purified_snapshot_query=ms(snap_query),
                  purified_ratio_cpu=round(live_query[1] / floor[1], 2), snapshot=ms(snapshot),
                  purified_norms=ms(norms), purify_whole_map_s=round(purify_s, 1)))
        del mapper


def bench_pooling(args) -> None:
    from bm_pooling import run
    embed = None
    for affinity in ('fallback', 'learned'):
        if affinity == 'learned':
            from ov3d_ros.core.purification.student import load_student
            embed = load_student('default', torch.device(args.device)).embed
        for n in args.pool_sizes:
            row = run(n, args.touched, 384, args.device, 18, 2, embed, False)
            emit(dict(env(args.device), section='pooling', **row))


def bench_clip(args) -> None:
    from ov3d_ros.core.config import FeatureConfig
    from ov3d_ros.core.features.clip_dense import OpenClipDenseExtractor
    rgb = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    low = 'float16' if args.device.startswith('cuda') else 'bfloat16'
    state = None
    for dtype in ('float32', low):                     # features.dtype; the same random weights in both
        ex = OpenClipDenseExtractor(FeatureConfig(pretrained='none', dtype=dtype), args.device)
        state = state or {k: v.float() for k, v in ex.model.state_dict().items()}
        ex.model.load_state_dict(state)
        for side in args.clip_sizes:
            ex.reconfigure(dataclasses.replace(ex.cfg, image_short_side=side, compile=False))
            row = dict(env(args.device), section='clip', model='ViT-B-16 (random weights)', dense=ex.dense_mode,
                       image='640x480', short_side_px=side, tokens=list(ex.grid_size(480, 640)),
                       dtype=dtype)
            with torch.no_grad():
                t, cpu = timed(lambda: ex.extract(rgb), args.device, args.clip_reps)
            row.update(per_keyframe_ms=round(1e3 * t, 1), per_keyframe_cpu_ms=round(1e3 * cpu, 1))
            if args.clip_compile:            # features.compile: the same forward through torch.compile
                ex.reconfigure(dataclasses.replace(ex.cfg, compile=True))     # a new graph: compiled below
                sync(args.device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    ex.extract(rgb)
                    sync(args.device)
                    compile_s = time.perf_counter() - t0
                    tc, cpuc = timed(lambda: ex.extract(rgb), args.device, args.clip_reps)
                row.update(compiled_ms=round(1e3 * tc, 1), compiled_cpu_ms=round(1e3 * cpuc, 1),
                           compile_s=round(compile_s, 1), compiled_speedup=round(t / tc, 2))
            emit(row)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--only', nargs='+', default=['fusion', 'query', 'pooling', 'clip'],
                   choices=['fusion', 'query', 'pooling', 'clip'])
    p.add_argument('--frames', type=int, default=15, help='rendered 640x480 frames of the built-in scene')
    p.add_argument('--voxel', type=float, default=0.05)
    p.add_argument('--query-sizes', type=int, nargs='+', default=[100_000, 1_000_000])
    p.add_argument('--reps', type=int, default=5)
    p.add_argument('--pool-sizes', type=int, nargs='+', default=[100_000, 1_000_000])
    p.add_argument('--touched', type=int, default=15_000)
    p.add_argument('--clip-sizes', type=int, nargs='+', default=[224, 336, 448])
    p.add_argument('--clip-reps', type=int, default=2)
    p.add_argument('--clip-compile', action='store_true',
                   help='also time the ViT through torch.compile (features.compile; compiles once per size)')
    args = p.parse_args()
    print(json.dumps(dict(env(args.device), cpu_count=__import__('os').cpu_count())), flush=True)
    for section in args.only:
        globals()[f'bench_{section}'](args)


if __name__ == '__main__':
    main()
