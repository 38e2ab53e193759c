"""Generate labelled evaluation scenes as dataset folders and/or rosbag2 recordings.

    ov3d make-scenes --out scenes/ --count 10 --seed 100 --format both

Per scene ``scene_SSSS/`` (ScanNet layout: color, depth (uint16 mm), pose, label, instance, intrinsic,
timestamps.txt, gt_points.npz) and/or ``scene_SSSS_bag/`` (rosbag2 with the scene player's topics, plus a
copy of gt_points.npz). Deterministic by seed. ``scenes.json`` in ``--out`` lists the scenes there, one entry per
folder or bag (those of earlier runs that are still there, plus this run's).

Only the scenes being written are touched: ``--format bag`` leaves a ``scene_SSSS/`` folder alone. A scene of the
same name is replaced only when it is one this tool writes (nothing in it but the files and folders it writes);
anything else there (a folder with a user's own files, a file) is refused, before any scene is rendered.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import List, Optional, Tuple

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


# what a scene folder holds when this tool wrote it: item -> pattern of the names inside (None: a file)
FOLDER_ITEMS = {'color': r'\d{6}\.png', 'depth': r'\d{6}\.png', 'pose': r'\d{6}\.txt', 'label': r'\d{6}\.png',
                'instance': r'\d{6}\.png', 'intrinsic': r'intrinsic_depth\.txt', 'timestamps.txt': None,
                'gt_points.npz': None}


def foreign_items(path: Path, kind: str) -> List[str]:
    """What in ``path`` this tool would not have written as a scene of ``kind`` ('folder' or 'bag'); [] when it
    holds nothing else (an empty folder included). A file or link in its place is foreign as a whole."""
    if path.is_symlink() or not path.is_dir():
        return [f'{path.name} is {"a link" if path.is_symlink() else "not a folder"}']
    foreign = []
    for item in sorted(path.iterdir(), key=lambda q: q.name):
        if kind == 'bag':
            name = item.name
            ok = item.is_file() and (name in ('metadata.yaml', 'gt_points.npz')
                                     or re.fullmatch(re.escape(path.name) + r'\.(mcap|db3)(-\w+)?', name))
            if not ok:
                foreign.append(name)
            continue
        pattern = FOLDER_ITEMS.get(item.name, '')
        if pattern == '' or item.is_symlink() or item.is_dir() != (pattern is not None):
            foreign.append(item.name)
        elif pattern is not None:
            foreign += [f'{item.name}/{q.name}' for q in sorted(item.iterdir(), key=lambda q: q.name)
                        if not (q.is_file() and re.fullmatch(pattern, q.name))]
    return foreign


def check_replaceable(paths: List[Tuple[Path, str]]) -> None:
    """CliError, before any work, naming every one of ``paths`` ((path, 'folder' | 'bag')) that exists and is not
    a scene of that kind this tool wrote (see :func:`foreign_items`): the tool replaces its own scenes of the same
    name and format, nothing else (it once removed a user's scene_0005/ with their notes in it)."""
    problems = []
    for path, kind in paths:
        if not path.exists() and not path.is_symlink():
            continue
        foreign = foreign_items(path, kind)
        if foreign:
            more = f' and {len(foreign) - 5} more' if len(foreign) > 5 else ''
            problems.append(f'{path} is not a scene {kind} that make-scenes wrote ({", ".join(foreign[:5])}{more})')
    if problems:
        raise CliError('; '.join(problems) + '; it is never replaced: move it away or choose another --out')


def read_index(path: Path) -> list:
    """The entries of an existing scenes.json ([] when there is none); CliError for a file that is not one."""
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CliError(f'{path}: not a scene list this tool wrote ({e}); move it away or choose another '
                       '--out') from None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise CliError(f'{path}: not a scene list this tool wrote (a JSON list of objects); move it away or choose '
                       'another --out')
    return entries


def kept_entries(entries: list, out: Path, rewritten: set) -> list:
    """``entries`` of earlier runs, each keeping only its folder / bag that is still in ``out`` and not among the
    names ``rewritten`` now; entries left with neither are dropped."""
    kept = []
    for e in entries:
        e = dict(e)
        for key in ('folder', 'bag'):
            name = Path(str(e.get(key, ''))).name
            if key in e and (not name or name in rewritten or not (out / name).exists()):
                del e[key]
        if 'folder' in e or 'bag' in e:
            kept.append(e)
    return kept


def run(args) -> int:
    if args.count < 1 or args.frames < 1:
        raise CliError('--count and --frames must be >= 1')
    from ov3d_ros.core.map_io import write_atomic
    from ov3d_ros.core.mapper import Frame
    from ov3d_ros.datasets.scannet_folder import write_frame, write_intrinsics
    if args.out.exists() and not args.out.is_dir():
        raise CliError(f'{args.out}: not a folder')
    seeds = [args.seed + k for k in range(args.count)]
    targets = ([(args.out / f'scene_{s:04d}', 'folder') for s in seeds] if args.format in ('folder', 'both') else []) \
        + ([(args.out / f'scene_{s:04d}_bag', 'bag') for s in seeds] if args.format in ('bag', 'both') else [])
    check_replaceable(targets)
    index = args.out / 'scenes.json'
    earlier = kept_entries(read_index(index), args.out, {p.name for p, _ in targets})
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in seeds:
        scene, camera, frames = render_scene(seed, args)
        stamps = np.arange(len(frames)) / args.fps
        folder: Optional[Path] = None
        entry = {'seed': seed, 'scene': scene.name, 'primitives': len(scene.primitives), 'frames': len(frames)}
        if args.format in ('folder', 'both'):
            folder = args.out / f'scene_{seed:04d}'
            if folder.exists():                      # one this tool wrote (check_replaceable)
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
            write_gt(folder / 'gt_points.npz', scene)
            write_intrinsics(folder, camera)
            for i, (T, f) in enumerate(frames):
                write_frame(folder, i, f.rgb, f.depth_m, T, labels=f.semantic, instances=f.instance)
            np.savetxt(folder / 'timestamps.txt', stamps, fmt='%.6f')
            entry['folder'] = str(folder)
        if args.format in ('bag', 'both'):
            from ov3d_ros.datasets.rosbag import write_bag
            bag = args.out / f'scene_{seed:04d}_bag'
            if bag.exists():
                shutil.rmtree(bag)
            depth_mm = lambda d: np.round(d * 1000.0).clip(0, 65535) / 1000.0  # noqa: E731  (same as the folder)
            write_bag(bag, [Frame(f.rgb, depth_mm(f.depth_m).astype(np.float32), camera, T, 1.0 + t, f.semantic)
                            for (T, f), t in zip(frames, stamps)], camera, storage=args.bag_storage)
            if folder is not None:
                shutil.copy(folder / 'gt_points.npz', bag / 'gt_points.npz')
            else:
                write_gt(bag / 'gt_points.npz', scene)
            entry['bag'] = str(bag)
        written.append(entry)
        print(json.dumps(entry))
        # after every scene, so that an interrupted run still lists what it wrote
        write_atomic(index, json.dumps(sorted(earlier + written, key=lambda e: e.get('seed', 0)),
                                       indent=1).encode())
    return 0
