"""Dataset folders in the ScanNet export layout.

    color/NNNNNN.png|jpg            RGB (frames in the order of their numbers: 000000, 000001, ... or 0, 1, ..., 10)
    depth/NNNNNN.png                uint16 millimetres, registered to colour (colour is resized to it)
    pose/NNNNNN.txt                 4x4 camera-to-world
    intrinsic/intrinsic_depth.txt   4x4 (or 3x3) intrinsics of the depth image
    label/NNNNNN.png                optional uint16 semantic ids (for the simulated feature source)
    instance/NNNNNN.png             optional uint16 instance ids (ground truth, for evaluation)
    timestamps.txt                  optional: one time in seconds per frame (else index / fps)
    features/NNNNNN.npy             optional precomputed dense 2D features (h, w, C), any h, w
    text_embeddings.npz             optional: names (K,), vectors (K, C) in the features' space
    gt_points.npz                   optional: xyz (N, 3) float32, label (N,) int, names (C,), instance (N,) int

A frame whose pose has non-finite values (ScanNet writes -inf where its tracking was lost) is skipped, as the node
drops such a frame: counted in ``ScanNetFolder.skipped`` and logged once as the folder is opened.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.io import read_npz
from ov3d_ros.core.mapper import Frame
from ov3d_ros.datasets import DatasetError

log = logging.getLogger(__name__)


def _stems(folder: Path, suffixes) -> List[str]:
    return sorted(p.stem for p in folder.iterdir() if p.suffix.lower() in suffixes) if folder.is_dir() else []


def frame_order(stems: List[str], root: Path) -> List[str]:
    """``stems`` in frame order: by number when every name is a whole number (ScanNet's Python SensReader export
    writes 0.png ... 23.png, which text order takes as 0, 1, 10, 11, ..., 19, 2, 20), else as text (zero-padded
    names such as 000010). DatasetError, naming examples, for numbers mixed with other names or two names of one
    number (0 and 000): no order of those is the recording's."""
    numbers = [s for s in stems if s.isascii() and s.isdigit()]
    if not numbers:
        return sorted(stems)
    if len(numbers) < len(stems):
        others = sorted(set(stems) - set(numbers))
        raise DatasetError(f'{root}: frame names mix numbers ({", ".join(sorted(numbers, key=int)[:3])}) with other '
                           f'names ({", ".join(others[:3])}{", ..." if len(others) > 3 else ""}), so their order is '
                           'unclear; name every frame by its number')
    ordered = sorted(stems, key=lambda s: (int(s), s))
    same = [(a, b) for a, b in zip(ordered, ordered[1:]) if int(a) == int(b)]
    if same:
        raise DatasetError(f'{root}: frame names {same[0][0]} and {same[0][1]} are the same number '
                           f'({len(same)} such pair(s)); name every frame by a number of its own')
    return ordered


class ScanNetFolder:
    """Reads a dataset folder; frames are the stems present in color/, depth/ and pose/, less those whose pose has
    non-finite values (skipped, counted in ``skipped``: reason -> count, as BagReader's; ``skipped_frames`` names
    them). Indices (``read``, ``--frames`` ranges) count the frames kept."""

    def __init__(self, root: str | Path, fps: float = 30.0):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f'{self.root}: not a directory')
        color = _stems(self.root / 'color', ('.png', '.jpg', '.jpeg'))
        depth = _stems(self.root / 'depth', ('.png',))
        pose = _stems(self.root / 'pose', ('.txt',))
        if not color or not depth or not pose:
            raise DatasetError(f'{self.root}: needs non-empty color/, depth/ and pose/ folders '
                               f'(found {len(color)} colour, {len(depth)} depth, {len(pose)} pose files)')
        if not (set(color) == set(depth) == set(pose)):
            missing = sorted((set(color) | set(depth) | set(pose)) - (set(color) & set(depth) & set(pose)))
            raise DatasetError(f'{self.root}: colour/depth/pose counts differ ({len(color)}/{len(depth)}/'
                               f'{len(pose)}); frames missing a file: {", ".join(missing[:10])}')
        self.stems = frame_order(color, self.root)
        K = self._read_matrix(self.root / 'intrinsic' / 'intrinsic_depth.txt')
        w, h = self._image_size(self.root / 'depth' / f'{self.stems[0]}.png')
        self.camera = PinholeCamera.from_matrix(K, w, h)
        self.has_labels = (self.root / 'label').is_dir()
        self.has_features = (self.root / 'features').is_dir()
        self.stamps = np.arange(len(self.stems), dtype=np.float64) / float(fps)
        if (self.root / 'timestamps.txt').exists():
            stamps = np.atleast_1d(self._read_array(self.root / 'timestamps.txt'))
            if stamps.shape != (len(self.stems),):
                raise DatasetError(f'{self.root}/timestamps.txt: {stamps.size} times for {len(self.stems)} frames')
            back = np.flatnonzero(np.diff(stamps) <= 0)
            if len(back):                  # the keyframe rule and pose lookups take frames in time order
                i = int(back[0]) + 1
                raise DatasetError(f'{self.root}/timestamps.txt: times must increase frame by frame; frame '
                                   f'{self.stems[i]} at {stamps[i]:g} s is not after frame {self.stems[i - 1]} at '
                                   f'{stamps[i - 1]:g} s')
            self.stamps = stamps
        self.skipped, self.skipped_frames = {}, []
        finite = np.array([self._pose_is_finite(self.root / 'pose' / f'{stem}.txt') for stem in self.stems])
        if not finite.all():
            self.skipped_frames = [st for st, ok in zip(self.stems, finite) if not ok]
            bad, more = self.skipped_frames, len(self.skipped_frames) - 10
            named = ', '.join(bad[:10]) + (f' and {more} more' if more > 0 else '')
            if not finite.any():
                raise DatasetError(f'{self.root}/pose: every one of the {len(bad)} poses has non-finite values (NaN '
                                   'or inf: tracking lost?); no frame to map')
            self.stems = [st for st, ok in zip(self.stems, finite) if ok]
            self.stamps = self.stamps[finite]
            self.skipped = {'non_finite_pose': len(bad)}
            log.warning('%s: skipping %d of %d frames whose pose has non-finite values (NaN or inf, as ScanNet writes '
                        'where tracking was lost): %s', self.root, len(bad), len(finite), named)

    def __len__(self) -> int:
        return len(self.stems)

    @staticmethod
    def _read_array(path: Path) -> np.ndarray:
        try:
            return np.loadtxt(path, dtype=np.float64)
        except (OSError, ValueError) as e:
            raise DatasetError(f'{path}: cannot read numbers ({e})') from e

    @classmethod
    def _read_matrix(cls, path: Path) -> np.ndarray:
        m = cls._read_array(path)
        if m.shape not in ((4, 4), (3, 3)):
            raise DatasetError(f'{path}: expected a finite 3x3 or 4x4 matrix, got shape {m.shape}')
        if not np.all(np.isfinite(m)):
            raise DatasetError(f'{path}: expected a finite 3x3 or 4x4 matrix, got non-finite values '
                               f'({int(np.sum(~np.isfinite(m)))} of {m.size} are NaN or inf)')
        return m

    @staticmethod
    def _pose_is_finite(path: Path) -> bool:
        """False when the pose file's numbers include NaN or inf; True otherwise, an unreadable or malformed file
        included (:meth:`read` refuses that one, naming the problem). A quick parse: one folder has thousands."""
        try:
            return bool(np.all(np.isfinite(np.array(path.read_text().split(), dtype=np.float64))))
        except (OSError, UnicodeDecodeError, ValueError):
            return True

    @staticmethod
    def _image_size(path: Path):
        try:
            with Image.open(path) as im:
                return im.size
        except OSError as e:
            raise DatasetError(f'{path}: unreadable image ({e})') from e

    @staticmethod
    def _read_image(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as im:
                im.load()
                return np.asarray(im)
        except OSError as e:
            raise DatasetError(f'{path}: unreadable or corrupt image ({e})') from e

    def _color_path(self, stem: str) -> Path:
        for ext in ('.png', '.jpg', '.jpeg'):
            if (self.root / 'color' / f'{stem}{ext}').exists():
                return self.root / 'color' / f'{stem}{ext}'
        raise DatasetError(f'{self.root}/color: no image for frame {stem}')

    def read(self, index: int) -> Frame:
        """The frame at ``index`` (colour resized to the depth size when they differ)."""
        stem = self.stems[index]
        depth_raw = self._read_image(self.root / 'depth' / f'{stem}.png')
        if depth_raw.dtype != np.uint16 or depth_raw.ndim != 2:
            raise DatasetError(f'{self.root}/depth/{stem}.png: expected a 16-bit single-channel PNG (mm), '
                               f'got {depth_raw.dtype} {depth_raw.shape}')
        h, w = depth_raw.shape
        if (w, h) != (self.camera.width, self.camera.height):
            raise DatasetError(f'{self.root}/depth/{stem}.png is {w}x{h}, but the intrinsics are those of a '
                               f'{self.camera.width}x{self.camera.height} depth image (the size of the first one)')
        path = self._color_path(stem)
        try:
            with Image.open(path) as im:
                rgb = im.convert('RGB')
                rgb = np.asarray(rgb.resize((w, h), Image.BILINEAR) if rgb.size != (w, h) else rgb)
        except OSError as e:                 # truncated, not an image: name the file
            raise DatasetError(f'{path}: unreadable or corrupt image ({e})') from e
        T = self._read_matrix(self.root / 'pose' / f'{stem}.txt')
        if T.shape != (4, 4):
            raise DatasetError(f'{self.root}/pose/{stem}.txt: expected a 4x4 camera-to-world matrix')
        labels = None
        if self.has_labels:
            labels = self._read_image(self.root / 'label' / f'{stem}.png')
            if labels.shape != (h, w):
                labels = np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))
        feats = None
        if self.has_features:
            try:
                feats = np.load(self.root / 'features' / f'{stem}.npy').astype(np.float32)
            except (OSError, ValueError) as e:
                raise DatasetError(f'{self.root}/features/{stem}.npy: {e}') from e
        return Frame(rgb, depth_raw.astype(np.float32) * np.float32(1e-3), self.camera, T,
                     float(self.stamps[index]), labels, feats)

    def read_instances(self, index: int) -> np.ndarray:
        """(H, W) uint16 ground-truth instance ids of frame ``index`` (instance/ folder)."""
        return self._read_image(self.root / 'instance' / f'{self.stems[index]}.png')

    def __iter__(self) -> Iterator[Frame]:
        for i in range(len(self)):
            yield self.read(i)


def read_text_embeddings(path: str | Path) -> Tuple[List[str], np.ndarray]:
    """(names, (K, C) float32 vectors) from a text_embeddings.npz (arrays ``names`` (K,), ``vectors`` (K, C));
    DatasetError naming the file for an unreadable file or a table no query could use (see
    :func:`~ov3d_ros.core.features.precomputed.check_text_table`)."""
    from ov3d_ros.core.features.precomputed import check_text_table
    try:
        z = read_npz(path, ('names', 'vectors'))
        names, vectors = [str(n) for n in np.atleast_1d(z['names'])], z['vectors']
        if not np.issubdtype(vectors.dtype, np.number):
            raise ValueError(f'{path}: vectors are {vectors.dtype}, not numbers')
        vectors = vectors.astype(np.float32)
        check_text_table(names, vectors, str(path))
    except ValueError as e:
        raise DatasetError(str(e)) from None
    return names, vectors


def write_frame(root: str | Path, index: int, rgb: np.ndarray, depth_m: np.ndarray, T_W_C: np.ndarray,
                labels: Optional[np.ndarray] = None, features: Optional[np.ndarray] = None,
                instances: Optional[np.ndarray] = None) -> None:
    """Write one frame in the ScanNet export layout (depth as uint16 millimetres)."""
    root, stem = Path(root), f'{index:06d}'
    optional = {'label': labels, 'features': features, 'instance': instances}
    for sub in ('color', 'depth', 'pose') + tuple(k for k, v in optional.items() if v is not None):
        (root / sub).mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(root / 'color' / f'{stem}.png')
    mm = np.round(np.nan_to_num(depth_m, nan=0.0, posinf=0.0) * 1000.0).clip(0, 65535).astype(np.uint16)
    Image.fromarray(mm).save(root / 'depth' / f'{stem}.png')
    np.savetxt(root / 'pose' / f'{stem}.txt', T_W_C, fmt='%.9f')
    if labels is not None:
        Image.fromarray(labels.astype(np.uint16)).save(root / 'label' / f'{stem}.png')
    if instances is not None:
        Image.fromarray(instances.astype(np.uint16)).save(root / 'instance' / f'{stem}.png')
    if features is not None:
        np.save(root / 'features' / f'{stem}.npy', features.astype(np.float16))


def write_intrinsics(root: str | Path, camera: PinholeCamera) -> None:
    """intrinsic/intrinsic_depth.txt as a 4x4 matrix (the layout has no lens distortion: undistort first)."""
    if camera.distorted:
        raise DatasetError(f'{root}: the folder layout keeps no lens distortion ({camera.distortion_model}); '
                           'write undistorted images and a pinhole camera')
    (Path(root) / 'intrinsic').mkdir(parents=True, exist_ok=True)
    K = np.eye(4)
    K[:3, :3] = camera.K
    np.savetxt(Path(root) / 'intrinsic' / 'intrinsic_depth.txt', K, fmt='%.9f')
