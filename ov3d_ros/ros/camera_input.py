"""One RGB-D camera of the mapping node: its subscriptions, input buffers, synchronisation and counters.

A camera lives in a namespace (``''`` = the node's own: ``color/image``, ``depth/image``, ``color/camera_info``,
``labels/image``; ``'front'`` = ``front/color/image``, ...). Colour and depth come as ``sensor_msgs/Image`` or, per
stream, as ``sensor_msgs/CompressedImage`` on image_transport's topics (``color/image/compressed``: JPEG or PNG;
``depth/image/compressedDepth``: compressed_depth_image_transport's 12-byte header then a PNG). Compressed images
are decoded (by ``ov3d_ros.datasets.ros_images``, through ``conversions``) only for keyframe candidates: the pose
decides first. Callbacks only store messages; the node's processing timer calls :meth:`take`.
"""
from __future__ import annotations

import collections
import threading
import time
from typing import Deque, Optional

from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ov3d_ros.core.keyframes import KeyframeSelector
from ov3d_ros.ros import conversions as conv


def _topic(namespace: str, name: str) -> str:
    return f'{namespace.strip("/")}/{name}' if namespace.strip('/') else name


class CameraInput:
    """Buffers and counters of one camera; ``T_B_C`` (4, 4) is its mount in the pose topic's frame (pose and
    odometry sources without TF)."""

    def __init__(self, namespace: str, queue: int, color_transport: str = 'raw', depth_transport: str = 'raw'):
        self.namespace = namespace.strip('/')
        self.name = self.namespace or 'camera'
        self.color_transport, self.depth_transport = color_transport, depth_transport
        self.lock = threading.Lock()            # guards the buffers
        self.color: Deque = collections.deque(maxlen=queue)
        self.depth: Deque = collections.deque(maxlen=queue)
        self.depth_arrival: Deque[float] = collections.deque(maxlen=queue)
        self.labels: Deque[Image] = collections.deque(maxlen=queue)
        self.camera_info: Optional[CameraInfo] = None
        self.camera_error = ''                  # why the latest camera info was rejected ('' = it was valid)
        self.last_stamp: Optional[float] = None  # stamp of the last frame taken
        self.last_error = ''
        self.stats = collections.Counter()
        self.keyframes: Optional[KeyframeSelector] = None
        self._selector_of = None                # the mapper's selector when ours was made (a new one = new map)
        self.T_B_C = None
        self._subs = []

    # ------------------------------------------------------------------ topics
    @property
    def compressed(self) -> bool:
        return self.color_transport != 'raw' or self.depth_transport != 'raw'

    def topics(self) -> dict:
        color, depth = _topic(self.namespace, 'color/image'), _topic(self.namespace, 'depth/image')
        return {'color': color + ('/compressed' if self.color_transport == 'compressed' else ''),
                'depth': depth + ('/compressedDepth' if self.depth_transport == 'compressedDepth' else ''),
                'camera_info': _topic(self.namespace, 'color/camera_info'),
                'labels': _topic(self.namespace, 'labels/image')}

    def subscribe(self, node, qos, on_camera_info, labels: bool) -> None:
        """Create this camera's subscriptions on ``node`` (``labels``: the simulated source's label images)."""
        t = self.topics()
        self._subs = [
            node.create_subscription(CompressedImage if self.color_transport == 'compressed' else Image,
                                     t['color'], self._push(self.color), qos),
            node.create_subscription(CompressedImage if self.depth_transport == 'compressedDepth' else Image,
                                     t['depth'], self._push_depth, qos),
            node.create_subscription(CameraInfo, t['camera_info'], lambda m: on_camera_info(self, m), qos)]
        if labels:
            self._subs.append(node.create_subscription(Image, t['labels'], self._push(self.labels), qos))

    def unsubscribe(self, node) -> None:
        for sub in self._subs:
            node.destroy_subscription(sub)
        self._subs = []
        with self.lock:
            for buf in (self.color, self.depth, self.depth_arrival, self.labels):
                buf.clear()

    def _push(self, buffer: Deque):
        def callback(msg):
            with self.lock:
                buffer.append(msg)
        return callback

    def _push_depth(self, msg) -> None:
        with self.lock:
            self.depth.append(msg)
            self.depth_arrival.append(time.monotonic())

    # ------------------------------------------------------------------ synchronisation
    @staticmethod
    def nearest(buffer: Deque, t: float, slop: float):
        best = min(buffer, key=lambda m: abs(conv.stamp_to_sec(m.header.stamp) - t), default=None)
        if best is not None and abs(conv.stamp_to_sec(best.header.stamp) - t) <= slop:
            return best
        return None

    def _pop_depth(self, n: int) -> None:
        for _ in range(n):
            self.depth.popleft()
            self.depth_arrival.popleft()

    def take(self, slop: float, timeout_s: float, simulated: bool, pose_ready, describe_missing_pose):
        """Pop the newest depth image whose partners arrived: (depth, colour, labels or None, stamp), or None.
        Older depth images are superseded. Depth images waiting longer than ``timeout_s`` (or a full queue) are
        dropped with a ValueError naming what is missing. ``pose_ready(depth, t)`` says if its pose is there."""
        with self.lock:
            for i in range(len(self.depth) - 1, -1, -1):
                depth = self.depth[i]
                t = conv.stamp_to_sec(depth.header.stamp)
                color = self.nearest(self.color, t, slop)
                labels = self.nearest(self.labels, t, slop) if simulated else None
                if color is not None and (labels is not None or not simulated) and pose_ready(depth, t):
                    self.stats['superseded'] += i
                    self._pop_depth(i + 1)
                    return depth, color, labels, t
            now = time.monotonic()
            expired = sum(1 for a in self.depth_arrival if now - a > timeout_s)
            if expired or len(self.depth) == self.depth.maxlen:
                oldest = self.depth[0]
                t = conv.stamp_to_sec(oldest.header.stamp)
                missing = [name for name, buf in (('colour image', self.color), ('label image', self.labels))
                           if (name == 'colour image' or simulated) and self.nearest(buf, t, slop) is None]
                if not pose_ready(oldest, t):
                    missing.append(describe_missing_pose(oldest))
                self._pop_depth(max(expired, 1))
                where = f'{self.name}: ' if self.namespace else ''
                raise ValueError(f'{where}dropped {max(expired, 1)} depth image(s): no '
                                 f'{" or ".join(missing or ["partner"])} within sync_slop_s={slop} s after waiting '
                                 f'{timeout_s} s; check topics and stamps')
        return None

    def is_keyframe_candidate(self, mapper, T_W_C, t: float) -> bool:
        """Whether this camera's keyframe rule (the map's keyframe settings, this camera's last keyframe) takes
        a frame at ``T_W_C``, ``t``. A cleared or loaded map restarts it."""
        if self.keyframes is None or self._selector_of is not mapper.keyframes:
            self.keyframes, self._selector_of = KeyframeSelector(mapper.cfg.keyframes), mapper.keyframes
        return self.keyframes.check(T_W_C, t)

    def status(self) -> dict:
        return {'frames': self.stats['frames'], 'keyframes': self.stats['keyframes'],
                'dropped': self.stats['dropped'], 'superseded': self.stats['superseded'],
                'not_decoded': self.stats['not_decoded'], 'pending_depth': len(self.depth),
                'last_error': self.last_error}
