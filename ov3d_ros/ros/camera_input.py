"""One RGB-D camera of the mapping node: its subscriptions, input buffers, synchronisation and counters.

A camera lives in a namespace (``''`` = the node's own: ``color/image``, ``depth/image``, ``color/camera_info``,
``labels/image``; ``'front'`` = ``front/color/image``, ...). Colour and depth come as ``sensor_msgs/Image`` or, per
stream, as ``sensor_msgs/CompressedImage`` on image_transport's topics (``color/image/compressed``: JPEG or PNG;
``depth/image/compressedDepth``: compressed_depth_image_transport's 12-byte header then a PNG). Compressed images
are decoded (by ``ov3d_ros.datasets.ros_images``, through ``conversions``) only for keyframe candidates: the pose
decides first. Callbacks only store messages; the node's processing timer calls :meth:`take`.
"""
from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
from typing import Deque, List, Optional

from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.keyframes import KeyframeSelector
from ov3d_ros.ros import conversions as conv


def _topic(namespace: str, name: str) -> str:
    return f'{namespace.strip("/")}/{name}' if namespace.strip('/') else name


class Inbox(collections.deque):
    """One input stream's buffered messages, oldest first (at most ``maxlen``: the oldest falls out), each with
    its arrival number (``order``: one counter per camera, so streams can be compared) and arrival time
    (``arrival``, monotonic seconds), kept in step by :meth:`push`, :meth:`drop` and :meth:`clear`."""

    def __init__(self, maxlen: int):
        super().__init__(maxlen=maxlen)
        self.order: Deque[int] = collections.deque(maxlen=maxlen)
        self.arrival: Deque[float] = collections.deque(maxlen=maxlen)

    def push(self, msg, order: int) -> bool:
        """Append ``msg``; True when the queue was full and its oldest message fell out."""
        full = len(self) == self.maxlen
        self.append(msg)
        self.order.append(order)
        self.arrival.append(time.monotonic())
        return full

    def drop(self, n: int) -> None:
        """Remove the ``n`` oldest messages."""
        for _ in range(n):
            self.popleft()
            self.order.popleft()
            self.arrival.popleft()

    def clear(self) -> None:
        super().clear()
        self.order.clear()
        self.arrival.clear()


class PoseBuffer:
    """The pose or odometry messages of the last ``history_s`` seconds of stamps, in stamp order, at most
    ``max_len`` (the oldest fall out). Like tf2's buffer, which keeps 10 s of transforms, it is sized by time, not by
    count: 200 Hz odometry keeps 2 000 poses, so a depth image that arrives late (a depth pipeline with a few
    hundred ms of latency) or waits for its colour image (up to sync_timeout_s) still finds its pose; a buffer of 50
    messages covered 0.25 s at 200 Hz. A pose stamped more than ``history_s`` before the newest one means time
    jumped back (a looping bag, a restarted simulator): the buffer restarts from it."""

    HISTORY_S = 10.0
    MAX_LEN = 10_000            # 10 s of 1 kHz odometry

    def __init__(self, history_s: float = HISTORY_S, max_len: int = MAX_LEN):
        self.history_s, self.max_len = history_s, max_len
        self._stamps: List[float] = []
        self._msgs: List = []

    def __len__(self) -> int:
        return len(self._msgs)

    def __iter__(self):
        return iter(list(self._msgs))

    def clear(self) -> None:
        self._stamps.clear()
        self._msgs.clear()

    @property
    def newest(self) -> Optional[float]:
        """The latest stamp held (s), or None."""
        return self._stamps[-1] if self._stamps else None

    def append(self, msg) -> bool:
        """Add a message (in stamp order, wherever it arrives); True when time jumped back and the buffer
        restarted with it."""
        s = conv.stamp_to_sec(msg.header.stamp)
        jumped = bool(self._stamps) and s < self._stamps[-1] - self.history_s
        if jumped:
            self.clear()
        i = bisect.bisect_right(self._stamps, s)
        self._stamps.insert(i, s)
        self._msgs.insert(i, msg)
        drop = max(bisect.bisect_left(self._stamps, self._stamps[-1] - self.history_s),
                   len(self._stamps) - self.max_len)
        if drop > 0:
            del self._stamps[:drop], self._msgs[:drop]
        return jumped

    def extend(self, msgs) -> None:
        for m in msgs:
            self.append(m)

    def bracket(self, t: float, slop: float, max_gap: float):
        """The pose messages for stamp ``t``: ``(msg, None, 0.0)`` for one stamped exactly ``t``; ``(before,
        after, a)`` for the two bracketing ``t`` (in the same frame, at most ``max_gap`` s apart; ``a`` in (0, 1)
        the fraction of the way from ``before`` to ``after``), to be interpolated, as tf2 does between the stamps of
        a transform; else ``(nearest, None, 0.0)`` for the nearest within ``slop``; else None. A pose lost on the
        way (best-effort QoS) is then bridged by its neighbours."""
        i = bisect.bisect_left(self._stamps, t)
        n = len(self._stamps)
        if i < n and self._stamps[i] == t:
            return self._msgs[i], None, 0.0
        before, tb = (self._msgs[i - 1], self._stamps[i - 1]) if i > 0 else (None, 0.0)
        after, ta = (self._msgs[i], self._stamps[i]) if i < n else (None, 0.0)
        if (before is not None and after is not None and ta - tb <= max_gap
                and before.header.frame_id == after.header.frame_id):
            return before, after, (t - tb) / (ta - tb)
        near = [(d, m) for d, m in ((t - tb, before), (ta - t, after)) if m is not None and d <= slop]
        return (min(near, key=lambda x: x[0])[1], None, 0.0) if near else None


class CameraInput:
    """Buffers and counters of one camera; ``T_B_C`` (4, 4) is its mount in the pose topic's frame (pose and
    odometry sources without TF)."""

    def __init__(self, namespace: str, queue: int, color_transport: str = 'raw', depth_transport: str = 'raw'):
        self.namespace = namespace.strip('/')
        self.name = self.namespace or 'camera'
        self.color_transport, self.depth_transport = color_transport, depth_transport
        self.lock = threading.Lock()            # guards the buffers
        self.color, self.depth, self.labels = Inbox(queue), Inbox(queue), Inbox(queue)
        self._order = itertools.count()         # arrival numbers, one counter for all of this camera's streams
        self.camera_info: Optional[CameraInfo] = None
        self.camera: Optional[PinholeCamera] = None  # the latest valid camera info, converted once (set_camera_info)
        self.camera_error = ''                  # why the latest camera info was rejected ('' = it was valid)
        self.last_stamp: Optional[float] = None  # stamp of the last frame taken
        self.backwards = 0                      # frames in a row older than last_stamp (see the node's _check_stamp)
        self.last_error = ''
        self.stats = collections.Counter()
        self.keyframes: Optional[KeyframeSelector] = None
        self.pending: Deque = collections.deque()  # selected keyframes (core Frames) waiting to be integrated
        self._selector_of = None                # the mapper's selector when ours was made (a new one = new map)
        self.T_B_C = None
        self.mount_from_tf = False              # TF gave this camera's mount (the node's _mount)
        self._subs = []
        self.resolved = self.topics()            # the topics subscribed to (subscribe: remapped)
        self._startup_info = None               # the start-up camera-info subscription (subscribe)
        self._latched_info = None               # one for a transient-local camera-info publisher (watch_latched_info)
        self._latched_checked = 0.0             # when the graph was last looked at for one
        self._info_args = None
        self._generation = 0                    # of the subscriptions heard: older ones may still deliver (unsubscribe)

    # ------------------------------------------------------------------ topics
    @property
    def compressed(self) -> bool:
        return self.color_transport != 'raw' or self.depth_transport != 'raw'

    def topics(self, node=None) -> dict:
        """{stream: topic}. With ``node``, the names it resolves (namespace, remaps): a compressed stream's topic is
        its remapped base topic plus the transport's suffix, as image_transport names it, so ``-r
        color/image:=/camera/color/image_raw`` moves ``color/image/compressed`` too (a remap rule matches whole
        names: the suffixed topic was never remapped)."""
        names = {'color': 'color/image', 'depth': 'depth/image', 'camera_info': 'color/camera_info',
                 'labels': 'labels/image'}
        t = {k: _topic(self.namespace, v) for k, v in names.items()}
        if node is not None:
            t = {k: node.resolve_topic_name(v) for k, v in t.items()}
        t['color'] += '/compressed' if self.color_transport == 'compressed' else ''
        t['depth'] += '/compressedDepth' if self.depth_transport == 'compressedDepth' else ''
        return t

    def subscribe(self, node, qos, on_camera_info, labels: bool, startup_info_qos=None, callback_group=None) -> None:
        """Create this camera's subscriptions on ``node`` with ``qos`` (``labels``: the simulated source's label
        images) in ``callback_group``. ``startup_info_qos``: a second camera-info subscription with this QoS until
        the first valid camera info (:meth:`end_startup`). With a reliable ``qos`` the node passes a best-effort
        one: a reliable reader matched while the camera already publishes holds every sample back until the ones
        it missed are resolved (Fast DDS: on the writer's next heartbeat; the first camera info came 0.98 s late,
        and 30 Hz depth images filled the 1 s queue meanwhile), where a best-effort reader has it in milliseconds.
        Only until then: next to a best-effort camera-info reader, best-effort poses were lost more often (README:
        Robustness). One subscription is heard at a time (the start-up one until :meth:`end_startup`), so no
        camera info counts twice."""
        t = self.resolved = self.topics(node)
        with self.lock:
            self._generation += 1
            gen = self._generation
        sub = lambda kind, topic, cb, q=qos: node.create_subscription(  # noqa: E731
            kind, topic, cb, q, callback_group=callback_group)
        heard = lambda: gen == self._generation  # noqa: E731
        info = lambda m: heard() and self._startup_info is None and on_camera_info(self, m)  # noqa: E731
        self._info_args = (on_camera_info, callback_group, gen)     # for watch_latched_info
        if startup_info_qos is not None:         # first: until it goes, the other one is not heard
            self._startup_info = sub(CameraInfo, t['camera_info'],
                                     lambda m: heard() and self._startup_info is not None and on_camera_info(self, m),
                                     startup_info_qos)
        self._subs = [
            sub(CompressedImage if self.color_transport == 'compressed' else Image, t['color'],
                self._push(self.color, gen)),
            sub(CompressedImage if self.depth_transport == 'compressedDepth' else Image, t['depth'],
                self._push(self.depth, gen)),
            sub(CameraInfo, t['camera_info'], info)]
        if labels:
            self._subs.append(sub(Image, t['labels'], self._push(self.labels, gen)))

    def set_camera_info(self, msg: CameraInfo, camera: PinholeCamera) -> None:
        """Keep ``msg``, the latest valid camera info, and ``camera``, what it converts to: frames use ``camera``,
        so lens rays and checks are worked out once per camera info, not once per frame."""
        with self.lock:                          # take() reads camera_info under the lock: both change together
            self.camera, self.camera_info, self.camera_error = camera, msg, ''

    def end_startup(self, node) -> None:
        """End the start-up camera-info subscriptions once a valid camera info came (no-op otherwise): from now on
        only the other one is heard, and the node destroys them between two executor waits (``destroy_soon``)."""
        if self.camera_info is None:
            return
        if self._startup_info is not None:
            startup, self._startup_info = self._startup_info, None
            node.destroy_soon(startup)
        if self._latched_info is not None:
            latched, self._latched_info = self._latched_info, None
            node.destroy_soon(latched)

    LATCHED_CHECK_S = 1.0      # how often the camera-info topic's publishers are looked at, until a camera info came

    def watch_latched_info(self, node) -> None:
        """Until the first valid camera info: when the camera-info topic has a transient-local publisher (camera info
        published once and latched: a calibration publisher, a bag recorded from one), subscribe transient-local
        too, so that its one message comes (a volatile subscription never gets a message published before it
        matched: such a camera was never mapped). Only then: a transient-local subscription is incompatible with
        the usual volatile publishers. Called by the node's select timer; looks at the graph once a second."""
        if self.camera_info is not None or self._latched_info is not None or self._info_args is None:
            return
        now = time.monotonic()
        if now - self._latched_checked < self.LATCHED_CHECK_S:
            return
        self._latched_checked = now
        on_camera_info, group, gen = self._info_args
        if gen != self._generation:                  # unsubscribed
            return
        topic = self.resolved['camera_info']
        latched = [i.qos_profile for i in node.get_publishers_info_by_topic(topic)
                   if i.qos_profile.durability == DurabilityPolicy.TRANSIENT_LOCAL]
        if not latched:
            return
        reliable = all(q.reliability == ReliabilityPolicy.RELIABLE for q in latched)
        qos = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                         reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT)
        heard = lambda m: gen == self._generation and self.camera_info is None and on_camera_info(self, m)  # noqa
        self._latched_info = node.create_subscription(CameraInfo, topic, heard, qos, callback_group=group)

    def unsubscribe(self, node) -> None:
        """Stop hearing this camera and drop what it queued. The subscriptions go between two executor waits
        (``destroy_soon``: this runs in a lifecycle transition's callback); what they deliver until then is ignored."""
        for sub in self._subs + [s for s in (self._startup_info, self._latched_info) if s is not None]:
            node.destroy_soon(sub)
        self._subs, self._startup_info, self._latched_info = [], None, None
        with self.lock:
            self._generation += 1
            for buf in (self.color, self.depth, self.labels):
                buf.clear()
        self.pending.clear()

    def _push(self, buffer: Inbox, generation: int):
        def callback(msg):
            with self.lock:
                if generation != self._generation:       # a subscription unsubscribe doomed
                    return
                if buffer.push(msg, next(self._order)) and buffer is self.depth:
                    self.stats['superseded'] += 1        # a queued depth image pushed out by a newer one
        return callback

    # ------------------------------------------------------------------ synchronisation
    @staticmethod
    def nearest(buffer: Deque, t: float, slop: float):
        best = min(buffer, key=lambda m: abs(conv.stamp_to_sec(m.header.stamp) - t), default=None)
        if best is not None and abs(conv.stamp_to_sec(best.header.stamp) - t) <= slop:
            return best
        return None

    @classmethod
    def partner(cls, buffer: Deque, t: float, slop: float, settled: bool):
        """The message of ``buffer`` for a depth image stamped ``t`` (the nearest within ``slop``) once no nearer
        one can still come, else None: it is stamped ``t``, or one stamped ``t`` or later has arrived (a topic
        delivers in stamp order, so any later message is farther), or the depth image is ``settled`` (it waited
        ``timeout_s``, see :meth:`take`). Colour published a few ms after its depth image was paired with the frame
        before."""
        best = cls.nearest(buffer, t, slop)
        if best is None or settled or conv.stamp_to_sec(best.header.stamp) >= t:
            return best
        return best if any(conv.stamp_to_sec(m.header.stamp) >= t for m in buffer) else None

    def take(self, slop: float, timeout_s: float, simulated: bool, pose_ready, describe_missing_pose,
             prefer=None):
        """Pop the newest depth image whose partners arrived (each the nearest within ``slop`` that no nearer one
        can follow, :meth:`partner`): (depth, colour, labels or None, stamp), or None.
        Older depth images are superseded. ``prefer(depth, t)``: when given, the oldest complete depth image it
        accepts is taken instead (the next keyframe candidate, so that frames that pile up while a keyframe is
        integrated lose no keyframe); the newer ones stay queued, and the newest is taken when it accepts none.
        A depth image that cannot be paired any more is dropped with a ValueError naming what is missing: its
        colour (or label) image is lost when a newer-stamped one arrived after the depth image (each topic
        delivers in order); it waited longer than ``timeout_s`` while newer depth images came; or the queue is
        full. One still waiting for partners that may come (a reliable image re-sent after a lost fragment, a
        publisher behind on a loaded machine) is kept. ``pose_ready(depth, t, settled)`` says if its pose is there
        (``settled``: the depth image waited ``timeout_s``, as for :meth:`partner`). Until
        the camera's first valid camera info, every depth image waits like one with a missing partner (the
        camera info topic is often matched a little after the images at start-up)."""
        with self.lock:
            complete = []                                    # (index, depth, colour, labels, stamp), newest first
            now = time.monotonic()
            for i in range(len(self.depth) - 1, -1, -1) if self.camera_info is not None else ():
                depth = self.depth[i]
                t = conv.stamp_to_sec(depth.header.stamp)
                settled = now - self.depth.arrival[i] > timeout_s   # no nearer partner came meanwhile
                color = self.partner(self.color, t, slop, settled)
                labels = self.partner(self.labels, t, slop, settled) if simulated else None
                if color is not None and (labels is not None or not simulated) and pose_ready(depth, t, settled):
                    complete.append((i, depth, color, labels, t))
                    if prefer is None:
                        break
            if complete:
                pick = complete[0]
                if prefer is not None:
                    pick = next((c for c in reversed(complete) if prefer(c[1], c[4])), pick)
                i, depth, color, labels, t = pick
                self.stats['superseded'] += i
                self.depth.drop(i + 1)
                return depth, color, labels, t
            if not self.depth:
                return None
            oldest = self.depth[0]
            t = conv.stamp_to_sec(oldest.header.stamp)
            streams = [('colour image', self.color)] + ([('label image', self.labels)] if simulated else [])
            missing = [(name, buf) for name, buf in streams if self.nearest(buf, t, slop) is None]
            since = self.depth.order[0]
            lost = [name for name, buf in missing
                    if any(conv.stamp_to_sec(m.header.stamp) > t + slop and seq > since
                           for m, seq in zip(buf, buf.order))]
            waited = time.monotonic() - self.depth.arrival[0]
            if not lost and not (waited > timeout_s and len(self.depth) > 1) and len(self.depth) < self.depth.maxlen:
                return None
            names = [name for name, _ in missing]
            if not pose_ready(oldest, t, True):
                names.append(describe_missing_pose(oldest))
            self.depth.drop(1)
            where = f'{self.name}: ' if self.namespace else ''
            if lost:
                why = f'its {" and ".join(lost)} never came (a newer one did)'
            elif len(self.depth) + 1 == self.depth.maxlen and waited <= timeout_s:
                why = f'the queue ({self.depth.maxlen} depth images) was full'
            else:
                why = f'waited {timeout_s} s while newer depth images came'
            what = [f'no {" or ".join(names)} within sync_slop_s={slop} s'] if names else []
            if self.camera_info is None:
                what.append(f'no valid camera info received yet on {self.resolved["camera_info"]}' +
                            (f' (the last one was rejected: {self.camera_error})' if self.camera_error else ''))
            what = what or [f'no partner within sync_slop_s={slop} s']
            raise ValueError(f'{where}dropped a depth image: {"; ".join(what)}; {why}; check topics and stamps')

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
                'pending_keyframes': len(self.pending), 'keyframes_dropped': self.stats['keyframes_dropped'],
                'poses_interpolated': self.stats['poses_interpolated'],
                'last_error': self.last_error}
