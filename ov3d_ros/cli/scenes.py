"""Generate labelled evaluation scenes as dataset folders and/or rosbag2 recordings.

    ov3d make-scenes --out scenes/ --count 10 --seed 100 --format both

Per scene ``scene_SSSS/`` (ScanNet layout: color, depth (uint16 mm), pose, label, instance, intrinsic,
timestamps.txt, gt_points.npz) and/or ``scene_SSSS_bag/`` (rosbag2 with the scene player's topics, plus a
copy of gt_points.npz). Deterministic by seed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from ov3d_ros.cli.common import CliError, number_in, positive_float, progress


def add_arguments(p) -> None:
    p.add_argument('--out', required=True, type=Path, help='output folder')
    p.add_argument('--count', type=int, default=10, help='number of scenes')
    p.add_argument('--seed', type=int, default=0, help='seed of the first scene (scene k uses seed + k)')
    p.add_argument('--format', choices=('folder', 'bag', 'both'), default='folder', help='what to write')
    p.add_argument('--bag-storage', choices=('mcap', 'sqlite3'), default='mcap', help='rosbag2 storage plugin')
    p.add_argument('--frames', type=int, default=60, help='frames per scene')
    p.add_argument('--fps', type=positive_float, default=5.0, help='frame rate of the stamps')
    p.add_argument('--width', type=int, default=640)
    p.add_argument('--height', type=int, default=480)
    p.add_argument('--style', choices=('handheld', 'robot'), default='handheld', help='camera trajectory')
    p.add_argument('--depth-noise', type=number_in(0.0), default=0.0,
                   help='depth noise: sigma = k * z^2 metres (e.g. 0.0025, like a structured-light sensor)')
    # all pixels missing would leave no frame to map
    p.add_argument('--holes', type=number_in(0.0, 1.0, hi_open=True), default=0.0,
                   help='fraction of depth pixels set to 0 (missing), below 1')
    p.add_argument('--quiet', action='store_true', help='no progress bars')


def render_scene(seed: int, args):
    """(scene, camera, list of (T_W_C, RenderedFrame)) for one seed."""
    from ov3d_ros.sim import default_camera, render
    from ov3d_ros.sim.generator import generate_scene
    from ov3d_ros.sim.trajectory import scan_trajectory
    scene = generate_scene(seed)
    camera = default_camera(args.width, args.height)
    poses = scan_trajectory(scene, args.frames, seed, args.style)
    frames = [(T, render(scene, camera, T, depth_noise=args.depth_noise, hole_fraction=args.holes, seed=seed * 100003 + k))
              for k, T in enumerate(progress(poses, len(poses), f'scene {seed}', args.quiet))]
    return scene, camera, frames


def write_gt(path: Path, scene) -> None:
    from ov3d_ros.sim import CLASS_NAMES, sample_gt_points
    xyz, sem, inst = sample_gt_points(scene)
    np.savez_compressed(path, xyz=xyz, label=sem.astype(np.int64), instance=inst.astype(np.int64),
                        names=np.array(CLASS_NAMES))


def run(args) -> int:
    if args.count < 1 or args.frames < 1:
        raise CliError('--count and --frames must be >= 1')
    from ov3d_ros.core.mapper import Frame
    from ov3d_ros.datasets.scannet_folder import write_frame, write_intrinsics
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for k in range(args.count):
        seed = args.seed + k
        scene, camera, frames = render_scene(seed, args)
        stamps = np.arange(len(frames)) / args.fps
        folder = args.out / f'scene_{seed:04d}'
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_gt(folder / 'gt_points.npz', scene)
        if args.format in ('folder', 'both'):
            write_intrinsics(folder, camera)
            for i, (T, f) in enumerate(frames):
                write_frame(folder, i, f.rgb, f.depth_m, T, labels=f.semantic, instances=f.instance)
            np.savetxt(folder / 'timestamps.txt', stamps, fmt='%.6f')
        entry = {'seed': seed, 'scene': scene.name, 'primitives': len(scene.primitives), 'frames': len(frames)}
        if args.format in ('bag', 'both'):
            from ov3d_ros.datasets.rosbag import write_bag
            bag = args.out / f'scene_{seed:04d}_bag'
            if bag.exists():
                shutil.rmtree(bag)
            depth_mm = lambda d: np.round(d * 1000.0).clip(0, 65535) / 1000.0  # noqa: E731  (same as the folder)
            write_bag(bag, [Frame(f.rgb, depth_mm(f.depth_m).astype(np.float32), camera, T, 1.0 + t, f.semantic)
                            for (T, f), t in zip(frames, stamps)], camera, storage=args.bag_storage)
            shutil.copy(folder / 'gt_points.npz', bag / 'gt_points.npz')
            entry['bag'] = str(bag)
        if args.format == 'bag':
            shutil.rmtree(folder)
        else:
            entry['folder'] = str(folder)
        written.append(entry)
        print(json.dumps(entry))
    (args.out / 'scenes.json').write_text(json.dumps(written, indent=1))
    return 0
