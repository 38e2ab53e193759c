"""rosbag2 recordings (MCAP or sqlite3 storage) of RGB-D frames, read and written without ROS.

Uses the pure-Python ``rosbags`` library (its typestore for the message definitions, ``rosbags.rosbag2`` for the
storage), so offline tools work on machines without a ROS installation. The topics and conventions are the live
system's (see ``ov3d_ros.ros.scene_player``):

    color/image         sensor_msgs/Image rgb8 (also bgr8, rgba8, bgra8, mono8, 8UC1, 8UC3) or CompressedImage
    depth/image         sensor_msgs/Image 16UC1 / mono16 (millimetres) or 32FC1 (metres), registered to colour
    color/camera_info   sensor_msgs/CameraInfo (k and the lens distortion d of raw images, or p of rectified
                        ones; binning and ROI applied: ``ros_images.camera_info_to_camera``)
    labels/image        optional sensor_msgs/Image mono16 / 16UC1 / mono8 / 8UC1 / 32SC1 semantic ids
    pose                geometry_msgs/PoseStamped of the optical frame in the map frame (or nav_msgs/Odometry),
    /tf, /tf_static     or tf2_msgs/TFMessage, composed from the map frame to the images' header frame_id

Pairing (approximate time sync on header stamps, see :class:`BagReader`): every depth image is one candidate frame;
it takes the colour (and label) image of nearest stamp within ``sync_slop_s`` and the pose at its stamp. Images are
decoded lazily while iterating, in one sequential pass over the bag.
"""
from __future__ import annotations

import math
import shutil
import sqlite3
import struct
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Tuple

import numpy as np

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.mapper import Frame
from ov3d_ros.datasets import DatasetError
from ov3d_ros.datasets.poses import PoseTrack, TfTree, matrix_to_quat, ns_to_s, read_tq, split_stamp, stamp_ns
from ov3d_ros.datasets.ros_images import (ENCODINGS, camera_info_to_camera, color_to_rgb, depth_to_meters,
                                          image_size, labels_to_numpy)

try:
    from rosbags.rosbag2 import Reader as _Rosbag2Reader, ReaderError, StoragePlugin, Writer as _Rosbag2Writer, \
        WriterError
    from rosbags.typesys import Stores, get_typestore
except ImportError as _e:      # pragma: no cover - rosbags is in requirements.txt
    raise ImportError('ov3d_ros.datasets.rosbag needs the pure-Python `rosbags` package (pip install rosbags)') \
        from _e

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED_IMAGE = 'sensor_msgs/msg/CompressedImage'
CAMERA_INFO = 'sensor_msgs/msg/CameraInfo'
POSE_STAMPED = 'geometry_msgs/msg/PoseStamped'
POSE_COV_STAMPED = 'geometry_msgs/msg/PoseWithCovarianceStamped'
TRANSFORM_STAMPED = 'geometry_msgs/msg/TransformStamped'
ODOMETRY = 'nav_msgs/msg/Odometry'
TF_MESSAGE = 'tf2_msgs/msg/TFMessage'
POSE_TYPES = (POSE_STAMPED, POSE_COV_STAMPED, TRANSFORM_STAMPED, ODOMETRY)


STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}
DEFAULT_CAMERA_FRAME = 'camera_color_optical_frame'
POSE_SOURCES = ('pose', 'odometry', 'tf')

_TYPESTORE = None


def typestore():
    """The rosbags typestore used for (de)serialisation: the newest ROS 2 store this rosbags version has."""
    global _TYPESTORE
    if _TYPESTORE is None:
        _TYPESTORE = get_typestore(getattr(Stores, 'LATEST', None) or Stores.ROS2_HUMBLE)
    return _TYPESTORE


def bag_topic(name: str) -> str:
    """A topic name as written to bags: with one leading '/'."""
    return '/' + name.strip().strip('/')


def _same_topic(a: str, b: str) -> bool:
    return a.strip().strip('/') == b.strip().strip('/')


@dataclass
class BagTopics:
    """Topic names of a bag ('' labels = no label images) and how its camera poses are given.

    pose_source: 'pose' (``pose`` is a PoseStamped of the optical frame in ``map_frame``; PoseWithCovarianceStamped
    and TransformStamped are read too), 'odometry' (``pose`` is a nav_msgs/Odometry; its ``pose.pose`` is the
    camera pose, composed with the /tf_static chain from ``child_frame_id`` to the image frame when the bag has
    one) or 'tf' (/tf + /tf_static from ``map_frame`` to the depth image's header frame_id).
    """

    color: str = 'color/image'
    depth: str = 'depth/image'
    camera_info: str = 'color/camera_info'
    labels: str = 'labels/image'
    pose: str = 'pose'
    pose_source: str = 'pose'
    map_frame: str = 'map'

    def __post_init__(self):
        if self.pose_source not in POSE_SOURCES:
            raise DatasetError(f'pose_source must be one of {", ".join(POSE_SOURCES)}, got {self.pose_source!r}')
        for name in ('color', 'depth', 'camera_info'):
            if not str(getattr(self, name)).strip('/ '):
                raise DatasetError(f'the {name} topic name is empty')
        if self.pose_source != 'tf' and not self.pose.strip('/ '):
            raise DatasetError(f"pose_source {self.pose_source!r} needs a pose topic name")
        if not self.map_frame.strip('/ '):
            raise DatasetError('map_frame is empty')




# ---------------------------------------------------------------------------------------------------- reading
def _resolve_bag_path(path: Path) -> Path:
    if not path.exists():
        raise DatasetError(f'{path}: no such bag (expected a rosbag2 directory with metadata.yaml, '
                           'or a .mcap / .db3 file)')
    if path.is_dir():
        if (path / 'metadata.yaml').exists():
            return path
        files = [p for p in path.iterdir() if p.suffix in ('.mcap', '.db3')]
        if len(files) == 1:
            return files[0]
        raise DatasetError(f'{path}: not a rosbag2 directory (no metadata.yaml'
                           + (f'; {len(files)} storage files, cannot choose)' if files else ')'))
    if path.suffix not in ('.mcap', '.db3'):
        raise DatasetError(f'{path}: not a rosbag2 file (expected .mcap or .db3, or a bag directory)')
    return path


@contextmanager
def _bag_errors(path: Path, what: str):
    """Re-raise the storage layer's errors (rosbags, sqlite, corrupt files) as DatasetError naming the bag."""
    try:
        yield
    except DatasetError:
        raise
    except (ReaderError, OSError, sqlite3.Error, EOFError, struct.error, ValueError, KeyError, IndexError,
            AssertionError, TypeError) as e:
        raise DatasetError(f'{path}: {what}: {type(e).__name__}: {e}') from e


@dataclass
class _ImageIndex:
    """Stamps of one image topic's messages, in the bag's stream order."""

    topic: str
    msgtype: str
    stamps: List[int] = field(default_factory=list)       # header stamps (ns)
    log: List[int] = field(default_factory=list)          # bag receive times (ns)
    seq: List[int] = field(default_factory=list)          # position in the filtered message stream
    first: object = None                                  # the first message (for sizes and frame_id)


@dataclass
class _Planned:
    stamp_ns: int
    parts: Dict[str, Tuple[int, int, int]]                # role → (stream position, log time, header stamp)
    T_W_C: np.ndarray


class BagReader:
    """Paired RGB-D frames of a rosbag2 recording (directory with metadata.yaml, or one .mcap / .db3 file).

    Every depth image is a candidate frame at its header stamp. It is paired with the colour image (and label
    image, when the labels topic is in the bag) of nearest header stamp within ``sync_slop_s`` (a partner may
    serve several depth images), and with the camera pose at that stamp:

    * 'pose' / 'odometry': the pose messages' own stamps; the exact pose, or linear interpolation of translation
      plus slerp of rotation between the two poses bracketing the stamp when they are at most ``pose_max_gap_s``
      apart, or else the nearest pose within ``sync_slop_s`` (never extrapolated further).
    * 'tf': the chain ``map_frame`` → … → the depth image's frame_id from /tf_static and /tf, each dynamic edge
      looked up by the same rule.

    Depth images without a partner are skipped and counted in ``skipped`` (reason → count, the first missing
    partner of each frame); if none can be paired a DatasetError says which topic had no partner. When any synced
    topic has all-zero header stamps, the bag's receive times are used for every topic instead.

    ``len()`` is the number of paired frames (from an index pass over the stamps at construction); iterating
    decodes the images lazily in one sequential pass, so large bags are not held in memory.

    Attributes: ``path`` (the bag directory or storage file), ``topics`` (a BagTopics with the bag's own topic
    names; labels '' when the bag has none), ``camera`` (from the first camera info), ``stamps`` (seconds of the
    paired frames), ``skipped``, ``has_labels`` and ``stamp_source`` ('header' or 'receive').
    """

    def __init__(self, path: str | Path, topics: Optional[BagTopics] = None, sync_slop_s: float = 0.05,
                 pose_max_gap_s: float = 0.5, rectified: bool = False):
        self.path = _resolve_bag_path(Path(path))
        self.rectified = bool(rectified)            # images are rectified: the camera info's p, no distortion
        requested = topics if topics is not None else BagTopics()
        if not (math.isfinite(sync_slop_s) and sync_slop_s >= 0):
            raise DatasetError(f'sync_slop_s must be a finite number >= 0, got {sync_slop_s}')
        if not (math.isfinite(pose_max_gap_s) and pose_max_gap_s >= 0):
            raise DatasetError(f'pose_max_gap_s must be a finite number >= 0, got {pose_max_gap_s}')
        self.sync_slop_s, self.pose_max_gap_s = float(sync_slop_s), float(pose_max_gap_s)
        self._slop_ns = int(round(self.sync_slop_s * 1e9))
        self._gap_ns = int(round(self.pose_max_gap_s * 1e9))
        self.skipped: Dict[str, int] = {}
        with _bag_errors(self.path, 'cannot open the bag'), _Rosbag2Reader(self.path) as bag:
            available = {c.topic: c.msgtype for c in bag.connections}
            self.topics = self._resolve_topics(requested, available)
            self._roles = self._role_map()
            self._index_pass(bag)
        self._plan = self._pair()
        self.stamps = np.array([ns_to_s(p.stamp_ns) for p in self._plan], dtype=np.float64)

    # ------------------------------------------------------------------------------------------ set-up
    def _topic_list(self, available: Dict[str, str]) -> str:
        return ', '.join(f'{t} ({m})' for t, m in sorted(available.items())) or 'none'

    def _find(self, name: str, role: str, available: Dict[str, str], types: Tuple[str, ...]) -> str:
        found = next((t for t in available if _same_topic(t, name)), None)
        if found is None and role == 'color':           # image_transport's compressed republisher
            found = next((t for t in available if _same_topic(t, name.rstrip('/') + '/compressed')), None)
        if found is None:
            raise DatasetError(f'{self.path}: {role} topic {bag_topic(name)!r} is not in the bag; available topics: '
                               f'{self._topic_list(available)}')
        if available[found] not in types:
            raise DatasetError(f'{self.path}: {role} topic {found!r} has type {available[found]}; expected '
                               f'{" or ".join(types)}')
        return found

    def _resolve_topics(self, req: BagTopics, available: Dict[str, str]) -> BagTopics:
        color = self._find(req.color, 'color', available, (IMAGE, COMPRESSED_IMAGE))
        depth = self._find(req.depth, 'depth', available, (IMAGE, COMPRESSED_IMAGE))
        info = self._find(req.camera_info, 'camera_info', available, (CAMERA_INFO,))
        labels = ''
        if req.labels.strip('/ '):
            labels = next((t for t in available if _same_topic(t, req.labels)), '')
            if not labels and not _same_topic(req.labels, BagTopics.labels):
                self._find(req.labels, 'labels', available, (IMAGE,))    # a named, missing topic: raise
            if labels and available[labels] != IMAGE:
                raise DatasetError(f'{self.path}: labels topic {labels!r} has type {available[labels]}; expected '
                                   f'{IMAGE}')
        pose = ''
        if req.pose_source == 'tf':
            if not any(_same_topic(t, 'tf') or _same_topic(t, 'tf_static') for t in available):
                raise DatasetError(f"{self.path}: pose_source 'tf' needs /tf or /tf_static in the bag; available "
                                   f'topics: {self._topic_list(available)}')
        else:
            pose = self._find(req.pose, 'pose', available, POSE_TYPES)
        return replace(req, color=color, depth=depth, camera_info=info, labels=labels, pose=pose)

    def _role_map(self) -> Dict[str, str]:
        t = self.topics
        roles = {t.depth: 'depth', t.color: 'color', t.camera_info: 'camera_info'}
        if t.labels:
            roles[t.labels] = 'labels'
        if t.pose_source == 'tf' or t.pose_source == 'odometry':
            roles.update({'/tf': 'tf', 'tf': 'tf', '/tf_static': 'tf_static', 'tf_static': 'tf_static'})
        if t.pose:
            roles[t.pose] = 'pose'
        return roles

    def _connections(self, bag):
        return [c for c in bag.connections if c.topic in self._roles]

    # ------------------------------------------------------------------------------------------ index pass
    def _index_pass(self, bag) -> None:
        ts = typestore()
        self._images = {r: _ImageIndex(t, '') for r, t in (('depth', self.topics.depth), ('color', self.topics.color),
                                                          ('labels', self.topics.labels)) if t}
        pose_rows, pose_log, self.tf = [], [], TfTree()
        self.camera, self._odom_child = None, ''
        info_where = f'{self.path} {self.topics.camera_info}'
        with _bag_errors(self.path, 'cannot read the bag messages'):
            for pos, (conn, log_ns, raw) in enumerate(bag.messages(self._connections(bag))):
                role = self._roles[conn.topic]
                if role in self._images:
                    idx = self._images[role]
                    msg = ts.deserialize_cdr(raw, conn.msgtype)        # zero-copy: pixels are not decoded here
                    idx.msgtype = idx.msgtype or conn.msgtype
                    idx.stamps.append(stamp_ns(msg.header.stamp))
                    idx.log.append(log_ns)
                    idx.seq.append(pos)
                    if idx.first is None:
                        idx.first = msg
                elif role == 'camera_info':
                    if self.camera is None:
                        self.camera = camera_info_to_camera(ts.deserialize_cdr(raw, conn.msgtype), info_where,
                                                            self.rectified)
                elif role == 'pose':
                    msg = ts.deserialize_cdr(raw, conn.msgtype)
                    where = f'{self.path} {conn.topic} @ {ns_to_s(stamp_ns(msg.header.stamp)):.6f} s'
                    if conn.msgtype == TRANSFORM_STAMPED:
                        t, q = read_tq(where, msg.transform.translation, msg.transform.rotation)
                    else:
                        p = msg.pose.pose if conn.msgtype in (ODOMETRY, POSE_COV_STAMPED) else msg.pose
                        t, q = read_tq(where, p.position, p.orientation)
                    if conn.msgtype == ODOMETRY and not self._odom_child:
                        self._odom_child = msg.child_frame_id.strip('/')
                    pose_rows.append((stamp_ns(msg.header.stamp), t, q))
                    pose_log.append(log_ns)
                elif role in ('tf', 'tf_static'):
                    if conn.msgtype != TF_MESSAGE:
                        continue
                    for tr in ts.deserialize_cdr(raw, conn.msgtype).transforms:
                        where = f'{self.path} {conn.topic} {tr.header.frame_id} -> {tr.child_frame_id}'
                        t, q = read_tq(where, tr.transform.translation, tr.transform.rotation)
                        self.tf.add(tr.header.frame_id, tr.child_frame_id, stamp_ns(tr.header.stamp), t, q,
                                    role == 'tf_static')
        self.tf.finish()
        if self.camera is None:
            raise DatasetError(f'{self.path}: camera info topic {self.topics.camera_info!r} has no messages')
        for role in ('depth', 'color'):
            if not self._images[role].stamps:
                raise DatasetError(f'{self.path}: {role} topic {self._images[role].topic!r} has no messages')
        if 'labels' in self._images and not self._images['labels'].stamps:
            del self._images['labels']                    # an empty label topic: frames without labels
            self.topics = replace(self.topics, labels='')
        # header stamps, unless a synced topic never sets them: then the bag's receive times for all
        synced = [i.stamps for i in self._images.values()] + ([[r[0] for r in pose_rows]] if pose_rows else [])
        self.stamp_source = 'header' if all(any(s) for s in synced) else 'receive'
        if self.stamp_source == 'receive':
            for i in self._images.values():
                i.stamps = list(i.log)
            pose_rows = [(lg, t, q) for lg, (_, t, q) in zip(pose_log, pose_rows)]
        self._pose_track = PoseTrack([r[0] for r in pose_rows], [r[1] for r in pose_rows],
                                     [r[2] for r in pose_rows]) if pose_rows else None
        if self.topics.pose_source != 'tf' and not pose_rows:
            raise DatasetError(f'{self.path}: pose topic {self.topics.pose!r} has no messages')
        self._check_sizes()

    def _check_sizes(self) -> None:
        cam, sizes = self.camera, {}
        for role, idx in self._images.items():
            sizes[role] = image_size(idx.first, f'{self.path} {idx.topic}')
        (dw, dh), (cw, ch) = sizes['depth'], sizes['color']
        if (dw, dh) != (cw, ch):
            raise DatasetError(f'{self.path}: depth images ({self.topics.depth}) are {dw}x{dh} but colour images '
                               f'({self.topics.color}) are {cw}x{ch}; record depth registered to the colour image')
        if (cam.width, cam.height) != (dw, dh):
            raise DatasetError(f'{self.path}: camera info ({self.topics.camera_info}) is {cam.width}x{cam.height} '
                               f'but the images are {dw}x{dh}')
        if 'labels' in sizes and sizes['labels'] != (dw, dh):
            lw, lh = sizes['labels']
            raise DatasetError(f'{self.path}: label images ({self.topics.labels}) are {lw}x{lh} but depth images '
                               f'are {dw}x{dh}')

    # ------------------------------------------------------------------------------------------ pairing
    def _pose_lookup(self):
        """A function stamp_ns → T_W_C or None, for the configured pose source."""
        slop, gap = self._slop_ns, self._gap_ns
        if self.topics.pose_source == 'tf':
            frame = self._images['depth'].first.header.frame_id.strip('/')
            if not frame:
                raise DatasetError(f"{self.path}: depth images ({self.topics.depth}) have an empty frame_id, so "
                                   "pose_source 'tf' cannot look their pose up")
            chain = self.tf.chain(self.topics.map_frame, frame)
            if chain is None:
                raise DatasetError(f'{self.path}: /tf and /tf_static do not connect {self.topics.map_frame!r} to the '
                                   f'image frame {frame!r}; frames in the bag: {", ".join(self.tf.frames) or "none"}')
            return lambda t: self.tf.lookup(chain, t, slop, gap)
        track, T_child_cam = self._pose_track, None
        image_frame = self._images['depth'].first.header.frame_id.strip('/')
        if self._odom_child and image_frame and self._odom_child != image_frame:
            chain = self.tf.chain(self._odom_child, image_frame, static_only=True)
            if chain is not None:
                T_child_cam = self.tf.lookup(chain, 0, slop, gap)
        if T_child_cam is None:
            return lambda t: track.at(t, slop, gap)
        return lambda t: (lambda T: None if T is None else T @ T_child_cam)(track.at(t, slop, gap))

    @staticmethod
    def _nearest(idx: _ImageIndex, queries: np.ndarray):
        stamps = np.asarray(idx.stamps, dtype=np.int64)
        order = np.argsort(stamps, kind='stable')
        s = stamps[order]
        i = np.searchsorted(s, queries)
        lo, hi = np.clip(i - 1, 0, len(s) - 1), np.clip(i, 0, len(s) - 1)
        dlo, dhi = np.abs(queries - s[lo]), np.abs(s[hi] - queries)
        best = np.where(dhi < dlo, hi, lo)
        return order[best], np.minimum(dlo, dhi)

    def _pair(self) -> List[_Planned]:
        depth = self._images['depth']
        q = np.asarray(depth.stamps, dtype=np.int64)
        match = {role: self._nearest(idx, q) for role, idx in self._images.items() if role != 'depth'}
        pose_at = self._pose_lookup()
        plan, gaps = [], {'color': [], 'labels': []}
        reasons = {'no_color': 0, 'no_labels': 0, 'no_pose': 0}
        for k in np.argsort(q, kind='stable'):
            t = int(q[k])
            parts = {'depth': (depth.seq[k], depth.log[k], t)}
            missing = None
            for role in ('color', 'labels'):
                if role in match:
                    j, d = int(match[role][0][k]), int(match[role][1][k])
                    if d > self._slop_ns:
                        gaps[role].append(d)
                        missing = missing or f'no_{role}'
                    idx = self._images[role]
                    parts[role] = (idx.seq[j], idx.log[j], idx.stamps[j])
            T = pose_at(t) if missing is None else None
            if missing is None and T is None:
                missing = 'no_pose'
            if missing:
                reasons[missing] += 1
                continue
            plan.append(_Planned(t, parts, T))
        self.skipped = {r: n for r, n in reasons.items() if n}
        if not plan:
            n = len(q)
            src = (self.topics.pose if self.topics.pose_source != 'tf'
                   else f'/tf ({self.topics.map_frame} -> image frame)')
            why = []
            if reasons['no_color']:
                why.append(f'{reasons["no_color"]} had no colour image on {self.topics.color} within '
                           f'{self.sync_slop_s:g} s (median offset to the nearest: '
                           f'{np.median(gaps["color"]) * 1e-9:.3f} s)')
            if reasons['no_labels']:
                why.append(f'{reasons["no_labels"]} had no label image on {self.topics.labels} within '
                           f'{self.sync_slop_s:g} s')
            if reasons['no_pose']:
                why.append(f'{reasons["no_pose"]} had no pose on {src} within {self.sync_slop_s:g} s '
                           f'(or between two poses at most {self.pose_max_gap_s:g} s apart)')
            raise DatasetError(f'{self.path}: no frame could be paired: of {n} depth images on {self.topics.depth}, '
                               + '; '.join(why) + f' (stamps from the {self.stamp_source} times)')
        return plan

    # ------------------------------------------------------------------------------------------ frames
    def __len__(self) -> int:
        return len(self._plan)

    @property
    def has_labels(self) -> bool:
        return 'labels' in self._images

    def _decode(self, p: _Planned, msgs: Dict[str, object]) -> Frame:
        where = {r: f'{self.path} {self._images[r].topic} @ {ns_to_s(p.parts[r][2]):.6f} s' for r in p.parts}
        depth = depth_to_meters(msgs['depth'], where['depth'])
        rgb = color_to_rgb(msgs['color'], where['color'])
        h, w = depth.shape
        if rgb.shape[:2] != (h, w):
            raise DatasetError(f'{where["color"]}: colour image is {rgb.shape[1]}x{rgb.shape[0]} but the depth image '
                               f'is {w}x{h}')
        if (self.camera.width, self.camera.height) != (w, h):
            raise DatasetError(f'{where["depth"]}: image is {w}x{h} but camera info is '
                               f'{self.camera.width}x{self.camera.height}')
        labels = None
        if 'labels' in msgs:
            labels = labels_to_numpy(msgs['labels'], where['labels'])
            if labels.shape != (h, w):
                raise DatasetError(f'{where["labels"]}: label image is {labels.shape[1]}x{labels.shape[0]} but the '
                                   f'depth image is {w}x{h}')
        return Frame(rgb, depth, self.camera, p.T_W_C.copy(), ns_to_s(p.stamp_ns), labels, None)

    def __iter__(self) -> Iterator[Frame]:
        """Frames in depth-stamp order, decoded while streaming through the bag once."""
        ts = typestore()
        want: Dict[int, int] = {}                           # stream position → frames still needing it
        for p in self._plan:
            for pos, _, _ in p.parts.values():
                want[pos] = want.get(pos, 0) + 1
        buffered: Dict[int, object] = {}
        nxt = 0
        with _bag_errors(self.path, 'cannot open the bag'), _Rosbag2Reader(self.path) as bag:
            stream = enumerate(bag.messages(self._connections(bag)))
            while nxt < len(self._plan):
                with _bag_errors(self.path, 'cannot read the bag messages'):
                    item = next(stream, None)
                    if item is None:
                        break
                    pos, (conn, _, raw) = item
                    if pos not in want:
                        continue
                    buffered[pos] = ts.deserialize_cdr(raw, conn.msgtype)
                while nxt < len(self._plan) and all(v[0] in buffered for v in self._plan[nxt].parts.values()):
                    p = self._plan[nxt]
                    frame = self._decode(p, {r: buffered[v[0]] for r, v in p.parts.items()})
                    for pos_r, _, _ in p.parts.values():
                        want[pos_r] -= 1
                        if want[pos_r] == 0:
                            del buffered[pos_r], want[pos_r]
                    nxt += 1
                    yield frame
        if nxt < len(self._plan):
            raise DatasetError(f'{self.path}: the bag ended after {nxt} of {len(self._plan)} frames '
                               '(was it modified while reading?)')

    def read(self, index: int) -> Frame:
        """The paired frame at ``index`` (random access: looks its messages up by receive time)."""
        p = self._plan[index]
        ts, msgs = typestore(), {}
        with _bag_errors(self.path, 'cannot read the bag'), _Rosbag2Reader(self.path) as bag:
            for role, (_, log_ns, stamp) in p.parts.items():
                conns = [c for c in bag.connections if c.topic == self._images[role].topic]
                for conn, _, raw in bag.messages(conns, start=log_ns, stop=log_ns + 1):
                    msg = ts.deserialize_cdr(raw, conn.msgtype)
                    key = stamp_ns(msg.header.stamp) if self.stamp_source == 'header' else log_ns
                    if key == stamp:
                        msgs[role] = msg
                        break
                if role not in msgs:
                    raise DatasetError(f'{self.path}: message of {self._images[role].topic} at '
                                       f'{ns_to_s(stamp):.6f} s not found again')
        return self._decode(p, msgs)


# ---------------------------------------------------------------------------------------------------- writing
class BagWriter:
    """Writes ROS 2 messages to a new rosbag2 (use as a context manager). Topic names get a leading '/'.

    The ``write_*`` helpers take numpy data and times in seconds (used for the header stamps and, unless
    ``log_s`` is given, the bag receive times).
    """

    def __init__(self, path: str | Path, storage: str = 'mcap'):
        self.path = Path(path)
        if storage not in STORAGES:
            raise DatasetError(f'bag storage must be one of {", ".join(STORAGES)}, got {storage!r}')
        if self.path.exists():
            raise DatasetError(f'{self.path}: exists already; a bag is written to a new directory')
        self.storage = storage
        self._writer = _Rosbag2Writer(self.path, version=_Rosbag2Writer.VERSION_LATEST,
                                      storage_plugin=STORAGES[storage])
        self._conns: Dict[Tuple[str, str], object] = {}
        self.ts = typestore()
        self.types = self.ts.types

    def __enter__(self) -> 'BagWriter':
        try:
            self._writer.open()
        except (WriterError, OSError) as e:
            raise DatasetError(f'{self.path}: cannot create the bag: {e}') from e
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self._writer.close()
        else:                                   # leave no half-written bag behind
            try:
                self._writer.abort()
            finally:
                shutil.rmtree(self.path, ignore_errors=True)
        return False

    def write(self, topic: str, msg, log_s: float) -> None:
        """Serialise ``msg`` (a typestore message object) to ``topic`` at receive time ``log_s``."""
        topic, msgtype = bag_topic(topic), msg.__msgtype__
        conn = self._conns.get((topic, msgtype))
        if conn is None:
            conn = self._conns[(topic, msgtype)] = self._writer.add_connection(topic, msgtype, typestore=self.ts)
        sec, nsec = split_stamp(log_s)
        self._writer.write(conn, sec * 1_000_000_000 + nsec, self.ts.serialize_cdr(msg, msgtype))

    def header(self, frame_id: str, stamp_s: float):
        sec, nsec = split_stamp(stamp_s)
        return self.types['std_msgs/msg/Header'](stamp=self.types['builtin_interfaces/msg/Time'](sec=sec,
                                                                                               nanosec=nsec),
                                                 frame_id=frame_id)

    def image_msg(self, arr: np.ndarray, encoding: str, stamp_s: float, frame_id: str,
                  step: Optional[int] = None, bigendian: bool = False):
        """A sensor_msgs/Image of ``arr`` ((H, W) or (H, W, C) of the encoding's dtype); ``step`` > the row size
        pads each row with zero bytes, ``bigendian`` stores multi-byte pixels big-endian."""
        if encoding not in ENCODINGS:
            raise DatasetError(f'image encoding {encoding!r} not supported; expected one of {", ".join(ENCODINGS)}')
        dtype, ch = ENCODINGS[encoding]
        arr = np.asarray(arr)
        ok_shape = (arr.ndim == 2 and ch == 1) or (arr.ndim == 3 and arr.shape[2] == ch)
        if not ok_shape or arr.dtype != np.dtype(dtype) or arr.shape[0] == 0 or arr.shape[1] == 0:
            want = '(H, W)' if ch == 1 else f'(H, W, {ch})'
            raise DatasetError(f'{encoding} image needs non-empty {want} {np.dtype(dtype).name} data, '
                               f'got {arr.shape} {arr.dtype}')
        h, w = arr.shape[:2]
        body = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder('>' if bigendian else '<'))
        row = w * ch * body.itemsize
        step = row if step is None else int(step)
        if step < row:
            raise DatasetError(f'image step {step} is smaller than the row size {row}')
        data = np.zeros((h, step), dtype=np.uint8)
        data[:, :row] = body.view(np.uint8).reshape(h, row)
        return self.types[IMAGE](header=self.header(frame_id, stamp_s), height=h, width=w, encoding=encoding,
                                 is_bigendian=int(bool(bigendian)), step=step, data=data.reshape(-1))

    def write_image(self, topic: str, arr: np.ndarray, encoding: str, stamp_s: float,
                    frame_id: str = DEFAULT_CAMERA_FRAME, log_s: Optional[float] = None, **kw) -> None:
        self.write(topic, self.image_msg(arr, encoding, stamp_s, frame_id, **kw), stamp_s if log_s is None else log_s)

    def write_camera_info(self, topic: str, camera: PinholeCamera, stamp_s: float,
                          frame_id: str = DEFAULT_CAMERA_FRAME, log_s: Optional[float] = None) -> None:
        P = np.zeros((3, 4))
        P[:, :3] = camera.K
        roi = self.types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0, width=0,
                                                             do_rectify=False)
        msg = self.types[CAMERA_INFO](header=self.header(frame_id, stamp_s), height=int(camera.height),
                                      width=int(camera.width), distortion_model=camera.distortion_model or 'plumb_bob',
                                      d=np.array(camera.distortion if camera.distorted else [0.0] * 5),
                                      k=camera.K.reshape(-1), r=np.eye(3).reshape(-1), p=P.reshape(-1),
                                      binning_x=0, binning_y=0, roi=roi)
        self.write(topic, msg, stamp_s if log_s is None else log_s)

    def _pose_parts(self, T: np.ndarray):
        T = np.asarray(T, dtype=np.float64)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise DatasetError(f'a pose must be a finite (4, 4) matrix, got shape {T.shape}')
        x, y, z, w = (float(v) for v in matrix_to_quat(T[:3, :3]))
        return [float(v) for v in T[:3, 3]], self.types['geometry_msgs/msg/Quaternion'](x=x, y=y, z=z, w=w)

    def write_pose(self, topic: str, T_W_C: np.ndarray, stamp_s: float, frame_id: str = 'map',
                   log_s: Optional[float] = None) -> None:
        """geometry_msgs/PoseStamped of the (4, 4) camera-to-map transform."""
        (px, py, pz), q = self._pose_parts(T_W_C)
        pose = self.types['geometry_msgs/msg/Pose'](position=self.types['geometry_msgs/msg/Point'](x=px, y=py, z=pz),
                                                    orientation=q)
        self.write(topic, self.types[POSE_STAMPED](header=self.header(frame_id, stamp_s), pose=pose),
                   stamp_s if log_s is None else log_s)

    def write_tf(self, transforms: Iterable[Tuple[str, str, np.ndarray]], stamp_s: float, static: bool = False,
                 log_s: Optional[float] = None) -> None:
        """tf2_msgs/TFMessage on /tf (or /tf_static) of (parent, child, T_parent_child) triples."""
        out = []
        for parent, child, T in transforms:
            (px, py, pz), q = self._pose_parts(T)
            tr = self.types['geometry_msgs/msg/Transform'](
                translation=self.types['geometry_msgs/msg/Vector3'](x=px, y=py, z=pz), rotation=q)
            out.append(self.types[TRANSFORM_STAMPED](header=self.header(parent, stamp_s), child_frame_id=child,
                                                     transform=tr))
        self.write('/tf_static' if static else '/tf', self.types[TF_MESSAGE](transforms=out),
                   stamp_s if log_s is None else log_s)


def depth_to_mm(depth_m: np.ndarray) -> np.ndarray:
    """(H, W) metres → uint16 millimetres (rounded; NaN, inf and negative → 0, beyond 65.535 m clipped)."""
    d = np.nan_to_num(np.asarray(depth_m, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    return np.round(d * 1000.0).clip(0, 65535).astype(np.uint16)


def write_bag(path: str | Path, frames: Iterable[Frame], camera: PinholeCamera, storage: str = 'mcap', *,
              topics: Optional[BagTopics] = None, camera_frame: str = DEFAULT_CAMERA_FRAME,
              depth_encoding: str = '16UC1', write_tf: bool = True) -> int:
    """Write frames as a new rosbag2 with the live system's topics; returns the number of frames written.

    Per frame, all at ``frame.stamp_s`` (header stamps and bag receive time): camera info, colour (rgb8), depth
    (16UC1 millimetres, rounded from metres; or 32FC1 metres), labels (mono16, when ``frame.labels`` is set and
    the labels topic is not ''), the pose (PoseStamped in ``topics.map_frame``) and, with ``write_tf``, /tf
    ``map_frame`` → ``camera_frame`` so that pose_source 'tf' reads the same poses. ``storage``: 'mcap' or
    'sqlite3'. The directory ``path`` must not exist yet; on error no partial bag is left behind.
    """
    topics = topics if topics is not None else BagTopics()
    if depth_encoding not in ('16UC1', '32FC1'):
        raise DatasetError(f"depth_encoding must be '16UC1' or '32FC1', got {depth_encoding!r}")
    count = 0
    with BagWriter(path, storage) as bag:
        for frame in frames:
            where = f'{bag.path}: frame {count} (stamp {frame.stamp_s} s)'
            depth = np.asarray(frame.depth_m)
            if depth.ndim != 2 or depth.shape != (camera.height, camera.width):
                raise DatasetError(f'{where}: depth is {depth.shape} but the camera is {camera.width}x{camera.height}')
            if frame.rgb.shape != (camera.height, camera.width, 3) or frame.rgb.dtype != np.uint8:
                raise DatasetError(f'{where}: colour must be ({camera.height}, {camera.width}, 3) uint8, got '
                                   f'{frame.rgb.shape} {frame.rgb.dtype}')
            t = float(frame.stamp_s)
            bag.write_camera_info(topics.camera_info, camera, t, camera_frame)
            bag.write_image(topics.color, frame.rgb, 'rgb8', t, camera_frame)
            d = depth_to_mm(depth) if depth_encoding == '16UC1' else depth.astype(np.float32)
            bag.write_image(topics.depth, d, depth_encoding, t, camera_frame)
            if frame.labels is not None and topics.labels.strip('/ '):
                lab = np.asarray(frame.labels)
                if lab.shape != depth.shape or lab.dtype.kind not in 'iub' or (
                        lab.size and (lab.min() < 0 or lab.max() > 65535)):
                    raise DatasetError(f'{where}: labels must be {depth.shape} integers in 0..65535 (mono16), got '
                                       f'{lab.shape} {lab.dtype}')
                bag.write_image(topics.labels, lab.astype(np.uint16), 'mono16', t, camera_frame)
            if topics.pose.strip('/ '):
                bag.write_pose(topics.pose, frame.T_W_C, t, topics.map_frame)
            if write_tf:
                bag.write_tf([(topics.map_frame, camera_frame, frame.T_W_C)], t)
            count += 1
        if count == 0:
            raise DatasetError(f'{bag.path}: no frames to write')
    return count
