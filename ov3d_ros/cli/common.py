"""Shared pieces of the ``ov3d`` tools: config, inputs (dataset folder or rosbag2), mapping loop, progress."""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

import numpy as np

from ov3d_ros.core.config import MapperConfig, load_yaml_config, parse_overrides, update_from_dict, validate
from ov3d_ros.core.mapper import Mapper, resolve_device

FEATURE_CHOICES = ('clip', 'precomputed', 'simulated')


class CliError(Exception):
    """A user error with a message that says what to do."""


_SAID: set = set()
_CLIP = None          # the last CLIP ViT built: mappers of the same model, weights, precision and device use it


def say_once(kind: str, message: str) -> None:
    """Print ``kind: message`` on stderr the first time this process says it (tools that map scene after scene
    build a feature source per scene; its warnings are the same each time)."""
    if message and (kind, message) not in _SAID:
        _SAID.add((kind, message))
        print(f'{kind}: {message}', file=sys.stderr)


def progress(items: Iterable, total: Optional[int] = None, desc: str = '', quiet: bool = False):
    """A tqdm progress bar on stderr (plain iteration when quiet)."""
    if quiet:
        return items
    from tqdm import tqdm
    return tqdm(items, total=total, desc=desc, unit='frame', leave=False, dynamic_ncols=True)


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """--config/--set/--features/--device, shared by the tools that build a map."""
    p.add_argument('--config', action='append', default=[], metavar='YAML',
                   help='node parameter file(s), e.g. config/mapping.yaml; later files override earlier ones')
    p.add_argument('--set', action='append', default=[], metavar='SECTION.KEY=VALUE',
                   help='override one config value, e.g. --set map.voxel_size_m=0.04 (repeatable)')
    p.add_argument('--features', choices=FEATURE_CHOICES,
                   help='2D feature source (default: features.source of the config; precomputed = the '
                        "input's features/ + text_embeddings.npz)")
    p.add_argument('--device', default=None, help="torch device: auto, cpu, cuda, cuda:N (default: config)")
    p.add_argument('--quiet', action='store_true', help='no progress bars')
    p.add_argument('--frames', type=frame_range, default=None, metavar='START:STOP',
                   help='map (or train on) only frames START..STOP-1 of each input (Python slice, e.g. 0:30 or '
                        '30:)')


def add_input_arguments(p: argparse.ArgumentParser) -> None:
    """Topic options for rosbag2 inputs."""
    g = p.add_argument_group('rosbag2 inputs')
    g.add_argument('--color-topic', help='colour image topic (default: color/image)')
    g.add_argument('--depth-topic', help='depth image topic (default: depth/image)')
    g.add_argument('--camera-info-topic', help='camera info topic (default: color/camera_info)')
    g.add_argument('--labels-topic', help="semantic label image topic for simulated features ('' = none)")
    g.add_argument('--pose-topic', help='pose topic (PoseStamped or Odometry)')
    g.add_argument('--pose-source', choices=('pose', 'odometry', 'tf'), help='how bag poses are given')
    g.add_argument('--map-frame', help='fixed frame for tf poses (default: map)')
    g.add_argument('--sync-slop', type=float, default=0.05, help='max stamp difference of paired messages (s)')
    g.add_argument('--rectified-images', action='store_true',
                   help="the bag's images are rectified (image_rect): intrinsics from the camera info's p, its "
                        "distortion ignored (default: raw images, k and the lens distortion d)")


def int_at_least(lo: int):
    """An argparse type: an integer >= ``lo`` (argparse then names the option and exits with status 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be an integer, got {text!r}') from None
        if value < lo:
            raise argparse.ArgumentTypeError(f'must be >= {lo}, got {value}')
        return value
    parse.__name__ = f'integer >= {lo}'
    return parse


def number_in(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """An argparse type: a finite number in the interval from ``lo`` to ``hi`` (open ends as given)."""
    interval = f'{"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}'
    what = f'a finite number {">" if lo_open else ">="} {lo:g}' if hi == math.inf else f'a number in {interval}'

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'must be a number, got {text!r}') from None
        if not (math.isfinite(value) and (lo < value if lo_open else lo <= value)
                and (value < hi if hi_open else value <= hi)):
            raise argparse.ArgumentTypeError(f'must be {what}, got {text}')
        return value
    parse.__name__ = what
    return parse


positive_float = number_in(0.0, lo_open=True)
"""An argparse type: a finite number > 0."""


def frame_range(text: str) -> slice:
    """'START:STOP' (either may be empty) -> slice of frame indices."""
    try:
        start, stop = text.split(':')
        return slice(int(start) if start.strip() else None, int(stop) if stop.strip() else None)
    except ValueError:
        raise argparse.ArgumentTypeError(f'frame range must be START:STOP (e.g. 0:30), got {text!r}') from None


def build_config(args) -> MapperConfig:
    cfg = load_yaml_config(args.config) if args.config else MapperConfig()
    update_from_dict(cfg, parse_overrides(args.set))
    if getattr(args, 'features', None):
        cfg.features.source = args.features
    if getattr(args, 'device', None):
        cfg.map.device = args.device
    return cfg


def check_output(out: Path, inputs: Sequence[Optional[Path]] = (), kind: str = 'map', is_kind=None) -> Path:
    """``out``, when a tool may write its ``kind`` of file ('map', 'PLY', 'npz') there. CliError when it is one of
    the ``inputs`` (the answer would replace what it was made from), a folder, an existing file that is not an
    ov3d map for a map, or an existing map for another kind of file: files that are not ours are never replaced
    (as the node's saves), nor maps by something else; with ``is_kind`` (path -> bool), an existing file it does
    not take for one of this kind; and when no file can be written where it goes (see :func:`check_writable`)."""
    from ov3d_ros.core.map_io import check_replaceable, is_map_file
    out = Path(out)
    for path in inputs:
        if path is not None and out.exists() and Path(path).exists() and os.path.samefile(path, out):
            raise CliError(f'{out}: --out is also an input ({path}); choose another file')
    if out.is_dir():
        raise CliError(f'{out}: --out is a folder; give a file name')
    if kind == 'map':
        try:
            check_replaceable(out)
        except ValueError as e:
            raise CliError(str(e)) from None
    elif is_map_file(out):
        raise CliError(f'{out} is an ov3d map file; it is never replaced by a {kind} (choose another name)')
    if is_kind is not None and os.path.lexists(out) and not is_kind(out):
        raise CliError(f'{out} exists and is not a {kind}; it is never replaced (choose another name or remove it)')
    check_writable(out)
    return out


def check_checkpoint_output(out: Path, inputs: Sequence[Optional[Path]], kind: str, is_kind) -> Path:
    """``out``, when a training tool may write its ``kind`` of checkpoint there ('teacher checkpoint'), checked
    before any training (a refusal after it loses the run; a folder or an unwritable path failed with a
    SafetensorError at the end). CliError when it is one of the ``inputs`` or lies inside an input folder (a
    scene's own files: --out scenes/scene_0100/gt_points.npz replaced the ground truth), a folder, an ov3d map,
    an existing file that ``is_kind`` does not take for a checkpoint of this kind (files that are not ours are
    never replaced: a 49 MB map was), or where no file can be written (the rest of :func:`check_output`)."""
    out = Path(out)
    real = Path(os.path.realpath(out))          # a link's target is the file written
    for path in inputs:
        if path is None or not os.path.exists(path):
            continue
        if os.path.exists(out) and os.path.samefile(path, out):
            raise CliError(f'{out}: --out is also an input ({path}); choose another file')
        if os.path.isdir(path) and Path(os.path.realpath(path)) in real.parents:
            raise CliError(f'{out}: --out lies inside the input folder {path}; write the {kind} elsewhere')
    return check_output(out, (), kind, is_kind)


def check_writable(out: Path) -> None:
    """CliError naming ``out`` unless a file can be made in its folder, or, when the folder is not there yet, in
    the nearest folder above it that is (where write_atomic will make it): a trial temporary file, removed at once.
    A tool learns this before its work, not when it saves the result (after mapping every frame). A symlink's
    target's folder is the one written (write_atomic writes through links)."""
    folder = Path(os.path.realpath(out) if os.path.islink(out) else out).parent
    while not os.path.lexists(folder) and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CliError(f'{out}: cannot write there ({folder} is not a folder)')
    try:
        fd, trial = tempfile.mkstemp(prefix=f'.{Path(out).name}.', suffix='.tmp', dir=folder)
    except OSError as e:
        raise CliError(f'{out}: cannot write a file in {folder} ({e.strerror})') from None
    os.close(fd)
    os.unlink(trial)


def is_bag(path: Path) -> bool:
    return path.suffix in ('.mcap', '.db3') or (path / 'metadata.yaml').exists()


@dataclass
class Input:
    """An opened dataset folder or bag: frames, camera, optional ground truth and text embeddings."""

    path: Path
    reader: object
    gt_path: Optional[Path]

    def __len__(self) -> int:
        return len(self.reader)

    def __iter__(self):
        return iter(self.reader)

    def gt_points(self) -> dict:
        if self.gt_path is None or not self.gt_path.exists():
            raise CliError(f'{self.path}: no ground truth (gt_points.npz) found; pass --gt FILE')
        from ov3d_ros.core.io import read_npz
        try:
            gt = read_npz(self.gt_path, ('xyz', 'label', 'names'))
        except ValueError as e:
            raise CliError(str(e)) from None
        if len(gt['xyz']) != len(gt['label']):
            raise CliError(f'{self.gt_path}: {len(gt["xyz"])} points but {len(gt["label"])} labels')
        label, c = np.asarray(gt['label']), len(gt['names'])
        if label.size and not np.issubdtype(label.dtype, np.integer):
            raise CliError(f'{self.gt_path}: labels must be integers (indices into names), got {label.dtype}')
        # -1 = no label; anything else indexes names (a label past them would leave every score undefined)
        out = (label < -1) | (label >= c)
        if out.any():
            raise CliError(f'{self.gt_path}: labels {sorted(set(label[out].tolist()))[:5]} ({int(out.sum())} of '
                           f'{label.size} points) out of range of names (0..{c - 1}, -1 = no label)')
        return gt

    def text_embeddings(self):
        path = (self.path if self.path.is_dir() else self.path.parent) / 'text_embeddings.npz'
        if not path.exists():
            raise CliError(f'{path}: precomputed features need text_embeddings.npz (arrays names, vectors)')
        from ov3d_ros.datasets.scannet_folder import read_text_embeddings
        return read_text_embeddings(path)


def open_input(path: str | Path, args=None, gt: Optional[str] = None) -> Input:
    """Open a ScanNet-layout dataset folder or a rosbag2 recording (directory, .mcap or .db3)."""
    path = Path(path)
    if not path.exists():
        raise CliError(f'{path}: no such file or directory')
    if is_bag(path):
        from ov3d_ros.datasets.rosbag import BagReader, BagTopics
        names = {'color_topic': 'color', 'depth_topic': 'depth', 'camera_info_topic': 'camera_info',
                 'labels_topic': 'labels', 'pose_topic': 'pose', 'pose_source': 'pose_source',
                 'map_frame': 'map_frame'}
        overrides = {field: getattr(args, arg) for arg, field in names.items()
                     if args is not None and getattr(args, arg, None) is not None}
        reader = BagReader(path, BagTopics(**overrides), sync_slop_s=getattr(args, 'sync_slop', 0.05),
                           rectified=bool(getattr(args, 'rectified_images', False)))
        base = path if path.is_dir() else path.parent
    else:
        from ov3d_ros.datasets.scannet_folder import ScanNetFolder
        reader, base = ScanNetFolder(path), path
    return Input(path, reader, Path(gt) if gt else base / 'gt_points.npz')


def make_mapper(cfg: MapperConfig, source: Input, class_names: Optional[List[str]] = None) -> Mapper:
    """A Mapper with the feature source named in ``cfg.features.source`` for this input."""
    global _CLIP
    validate(cfg)                          # before a ViT is built for a config the mapper would refuse
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    device = resolve_device(cfg.map.device)
    if cfg.features.source == 'precomputed':
        names, vectors = source.text_embeddings()
        return Mapper(cfg, PrecomputedFeatures(names, vectors, device))
    if cfg.features.source == 'simulated' and class_names is None:
        try:
            class_names = [str(n) for n in source.gt_points()['names']]
        except CliError:
            from ov3d_ros.sim.classes import CLASS_NAMES
            class_names = list(CLASS_NAMES)
    if cfg.features.source == 'clip':
        # ov3d eval and train-affinity map scene after scene (eval twice per scene, once per variant): build the
        # ViT and read its weights once per process, not once per mapper; it keeps no state from one scene to the
        # next. Each mapper gets its own extractor on that ViT with its variant's dense mode and image sizes.
        if _CLIP is None or not _CLIP.holds(cfg.features, device):
            _CLIP = create_extractor(copy.deepcopy(cfg.features), device, class_names)
        extractor = _CLIP.with_settings(cfg.features)
    else:
        extractor = create_extractor(cfg.features, device, class_names)
    say_once('warning', extractor.precision_warning)
    say_once('note', extractor.precision_hint)
    return Mapper(cfg, extractor)


def select_frames(source: Input, frames: Optional[slice] = None):
    """(range of the frame indices, iterator over those frames) of ``source``'s ``frames`` range (all when None);
    CliError when it selects none."""
    import itertools
    indices = range(len(source))[frames or slice(None)]
    if not indices:
        raise CliError(f'{source.path}: the frame range selects none of its {len(source)} frames')
    return indices, itertools.islice(source, indices.start, indices.stop)


def map_input(mapper: Mapper, source: Input, quiet: bool = False, frames: Optional[slice] = None) -> dict:
    """Integrate every frame of ``source`` (or the ``frames`` range of them; keyframe rules apply); returns
    counts and timings."""
    t0, times, purify = time.perf_counter(), [], []
    if mapper.cfg.features.source == 'precomputed' and not getattr(source.reader, 'has_features', True):
        raise CliError(f'{source.path}: --features precomputed needs features/NNNNNN.npy for every frame')
    indices, selected = select_frames(source, frames)
    if indices.start and hasattr(mapper.extractor, 'reset'):
        # the simulated teacher's errors follow a per-keyframe counter: start it at the range's first frame, so
        # a range gets the errors these frames get in a run over the whole input (when every frame is a keyframe)
        mapper.extractor.reset(indices.start)
    count = 0
    for frame in progress(selected, len(indices), source.path.name, quiet):
        count += 1
        if mapper.integrate(frame):
            times.append(mapper.timings_s['total'])
            purify.append(mapper.timings_s.get('purify', 0.0))
    return {'frames': count, 'keyframes': len(times), 'voxels': mapper.map.size,
            'keyframe_ms_mean': 1e3 * float(np.mean(times)) if times else None,
            'purify_ms_mean': 1e3 * float(np.mean(purify)) if purify else None,
            'wall_s': time.perf_counter() - t0}



def voxelise_input(source: Input, cfg: MapperConfig, quiet: bool = False, frames: Optional[slice] = None):
    """Fuse ``source`` (or the ``frames`` range of it, as ``ov3d map --frames``) into occupancy, colour and normals
    only (no 2D features): a
    :class:`~ov3d_ros.core.purification.teacher.VoxelScene` with the voxels the mapper would make under ``cfg``
    (same keyframe rules, depth limits, pixel stride, voxel size), for the 3D teacher and the geometry-only
    student. Normals as purification computes them (``purify.radius_vox`` neighbourhoods)."""
    import torch
    from ov3d_ros.core.keyframes import KeyframeSelector
    from ov3d_ros.core.lifting import lift_keyframe
    from ov3d_ros.core.purification.graph import ball_offsets, estimate_normals, neighbour_rows
    from ov3d_ros.core.purification.teacher import MAX_KEYFRAME_BITS, VoxelScene
    from ov3d_ros.core.voxel_map import VoxelFeatureMap, unpack_keys
    m = cfg.map
    vmap = VoxelFeatureMap(m.voxel_size_m, 1, 'cpu', m.initial_capacity)
    selector, seen, k = KeyframeSelector(cfg.keyframes), torch.zeros(0, dtype=torch.int64), 0
    one = torch.ones(1, 1, 1)
    indices, selected = select_frames(source, frames)
    for frame in progress(selected, len(indices), source.path.name, quiet):
        if not selector.check(frame.T_W_C, frame.stamp_s):
            continue
        lifted = lift_keyframe(torch.from_numpy(np.array(frame.depth_m, dtype=np.float32, order='C')),
                               torch.from_numpy(np.array(frame.rgb, order='C')), one, frame.camera,
                               torch.from_numpy(np.asarray(frame.T_W_C, dtype=np.float64)),
                               m.min_depth_m, m.max_depth_m, m.pixel_stride)
        touched = vmap.integrate(lifted.points, lifted.features, lifted.colors)
        if len(seen) < vmap.size:
            seen = torch.cat([seen, torch.zeros(vmap.size - len(seen), dtype=torch.int64)])
        seen[touched] |= 1 << (k % MAX_KEYFRAME_BITS)
        selector.accept(frame.T_W_C, frame.stamp_s)
        k += 1
    rows = torch.arange(vmap.size)
    offsets = ball_offsets(cfg.purify.radius_vox)
    normals = estimate_normals(neighbour_rows(vmap, rows, offsets), offsets)
    return VoxelScene(source.path.name, unpack_keys(vmap.keys[:vmap.size]), vmap.colors[:vmap.size].clone(),
                      normals, seen, k)


INPUT_OPTIONS = ('color_topic', 'depth_topic', 'camera_info_topic', 'labels_topic', 'pose_topic', 'pose_source',
                 'map_frame', 'sync_slop', 'rectified_images')
"""The options of :func:`add_input_arguments`: which frames of a bag are read, and how."""


def input_fingerprint(path) -> list:
    """[relative name, size, mtime_ns] of every file of the input at ``path`` (each file under a folder, links
    followed; a bag file itself), sorted: a regenerated, edited or other input with the same name gets another
    one. [] for a path that is not there."""
    path = Path(path)
    if path.is_file():
        files = [(path.name, path)]
    else:
        files = [(os.path.relpath(os.path.join(d, f), path), os.path.join(d, f))
                 for d, _, names in os.walk(path, followlinks=True) for f in names]
    out = []
    for name, f in sorted(files):
        try:
            st = os.stat(f)
        except OSError:                    # a dangling link: not read
            continue
        out.append([name, st.st_size, st.st_mtime_ns])
    return out


def voxel_cache_name(path, args, cfg: MapperConfig) -> str:
    """The file name of :func:`voxelise_input`'s scene in a cache: the input's name, a digest of what the voxels are
    made from (its resolved path, the size and mtime of its files, the frame range, a bag's options) and the
    settings that change them. The name alone counted a second input of the same name as the first one again
    (scenes/scene_0100 and other/scene_0100), and a regenerated scene reused the old voxels."""
    m, k = cfg.map, cfg.keyframes
    frames = getattr(args, 'frames', None)
    what = {'input': os.path.realpath(path), 'files': input_fingerprint(path),
            'frames': None if frames is None else [frames.start, frames.stop],
            'options': {o: getattr(args, o, None) for o in INPUT_OPTIONS} if is_bag(Path(path)) else None}
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return (f'{Path(path).name}_{digest}_v{m.voxel_size_m:g}_s{m.pixel_stride}_d{m.min_depth_m:g}-{m.max_depth_m:g}'
            f'_k{k.min_translation_m:g}-{k.min_rotation_deg:g}-{k.max_interval_s:g}-{k.min_interval_s:g}'
            f'_r{cfg.purify.radius_vox}.npz')


def cached_voxel_scene(path, args, cfg: MapperConfig, cache_dir: Optional[Path]):
    """:func:`voxelise_input` of the input at ``path`` (the ``--frames`` range of ``args``), read from / written to
    ``cache_dir`` when given (under :func:`voxel_cache_name`)."""
    from ov3d_ros.core.purification.teacher import VoxelScene
    frames = getattr(args, 'frames', None)
    tag = voxel_cache_name(path, args, cfg) if cache_dir is not None else None
    if cache_dir is not None and (Path(cache_dir) / tag).exists():
        try:
            return VoxelScene.load(Path(cache_dir) / tag)
        except ValueError as e:            # e.g. a cache written by an older version or damaged: made again
            print(f'{e}; voxelising the input again', file=sys.stderr)
    scene = voxelise_input(open_input(path, args), cfg, getattr(args, 'quiet', False), frames)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        scene.save(Path(cache_dir) / tag)
    return scene
