"""The ov3d mapping node: RGB-D + camera info + pose in, open-vocabulary voxel map and /segment_by_text out.

Callbacks only store messages. One timer (``tick``) pairs depth with colour (and labels for the simulated
source) and a pose, converts, and integrates keyframes; it is the only writer of the map besides the load and
clear services (``map_persistence``). Services and publishers use the map under the same lock.
"""
from __future__ import annotations

import collections
import json
import resource
import threading
import time
from typing import Deque, Optional

import numpy as np
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import CameraInfo, Image, PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Frame, Mapper, resolve_device
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.label_volume import LabelVolumeInterface
from ov3d_ros.ros.map_persistence import MapPersistence
from ov3d_ros.ros.objects import ObjectsOutput
from ov3d_ros.ros.params import declare, declare_config, read_config
from ov3d_ros.srv import SegmentByText

POSE_SOURCES = ('tf', 'pose', 'odometry')


class MappingNode(Node):
    """Builds the open-vocabulary map and answers ``segment_by_text``."""

    def __init__(self, **kwargs):
        super().__init__('ov3d_mapping', **kwargs)
        from ov3d_ros.core.config import MapperConfig
        declare_config(self, MapperConfig())
        self.map_frame = declare(self, 'map_frame', 'map', 'Fixed frame of the map and of every output.')
        self.pose_source = declare(self, 'pose_source', 'tf', "Camera pose from 'tf' (map_frame → image frame), "
                                   "'pose' (geometry_msgs/PoseStamped) or 'odometry' (nav_msgs/Odometry).")
        extrinsic = declare(self, 'pose_to_camera', [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                            'For pose/odometry sources: x y z qx qy qz qw of the camera optical frame in the '
                            'frame the pose topic describes (identity = the pose is the optical frame).')
        self.sync_slop_s = declare(self, 'sync_slop_s', 0.05, 'Max time difference between paired messages.')
        self.sync_timeout_s = declare(self, 'sync_timeout_s', 2.0, 'Depth images still without colour/pose '
                                      'partners this long after arrival are dropped (counted, logged).')
        self.tick_rate_hz = declare(self, 'tick_rate_hz', 20.0, 'Rate of the processing timer.')
        self.map_publish_rate_hz = declare(self, 'map_publish_rate_hz', 0.5, 'Rate of ~/map_cloud (0 = off).')
        self.map_cloud_max_points = declare(self, 'map_cloud_max_points', 200000, 'Points in ~/map_cloud at most.')
        self.input_qos = declare(self, 'input_qos', 'sensor_data', "QoS of image inputs: 'sensor_data' or 'reliable'.")
        queue = declare(self, 'queue_size', 10, 'Messages kept per input topic while waiting for a partner.')
        if self.pose_source not in POSE_SOURCES:
            raise ValueError(f"pose_source must be one of {POSE_SOURCES}, got {self.pose_source!r}")

        cfg = read_config(self)
        device = resolve_device(cfg.map.device)
        class_names = None
        if cfg.features.source == 'simulated':
            from ov3d_ros.sim.classes import CLASS_NAMES
            class_names = CLASS_NAMES
            self.get_logger().warning('features.source=simulated: features come from ground-truth label images '
                                   '(labels/image), not from the camera. Use it for tests and demos only.')
        extractor = create_extractor(cfg.features, device, class_names)
        self.mapper = Mapper(cfg, extractor)
        self.get_logger().info(f'feature source {extractor.name} (D={extractor.dim}, '
                               f'weights: {getattr(extractor, "weights", "n/a")}) on {device}')
        self.T_P_C = conv.pose_to_matrix(extrinsic[:3], extrinsic[3:])

        self._lock = threading.Lock()            # guards the mapper
        self._in_lock = threading.Lock()         # guards the input buffers
        self._color: Deque[Image] = collections.deque(maxlen=queue)
        self._depth: Deque[Image] = collections.deque(maxlen=queue)
        self._depth_arrival: Deque[float] = collections.deque(maxlen=queue)
        self._labels: Deque[Image] = collections.deque(maxlen=queue)
        self._poses: Deque = collections.deque(maxlen=max(queue, 50))
        self._camera_info: Optional[CameraInfo] = None
        self.stats = collections.Counter()
        self.last_error = ''
        self._kf_times = []

        qos = qos_profile_sensor_data if self.input_qos == 'sensor_data' else QoSProfile(depth=queue)
        self.create_subscription(Image, 'color/image', self._push(self._color), qos)
        self.create_subscription(Image, 'depth/image', self._push_depth, qos)
        self.create_subscription(CameraInfo, 'color/camera_info', self._on_camera_info, qos)
        if extractor.simulated:
            self.create_subscription(Image, 'labels/image', self._push(self._labels), qos)
        self._tf_buffer = None
        if self.pose_source == 'tf':
            try:
                import tf2_ros
            except ImportError as e:
                raise RuntimeError("pose_source 'tf' needs tf2_ros, which is not installed; install it or "
                                   "set pose_source to 'pose' or 'odometry'") from e
            self._tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self._tf_buffer, self)
        elif self.pose_source == 'pose':
            self.create_subscription(PoseStamped, 'pose', self._push(self._poses), 50)
        else:
            self.create_subscription(Odometry, 'odom', self._push(self._poses), 50)

        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.map_pub = self.create_publisher(PointCloud2, '~/map_cloud', latched)
        self.seg_pub = self.create_publisher(PointCloud2, '~/segmentation', latched)
        self.marker_pub = self.create_publisher(MarkerArray, '~/segmentation_markers', latched)
        self.objects = ObjectsOutput(self, self.map_frame, self.marker_pub)
        self.status_pub = self.create_publisher(String, '~/status', 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._last_counts = (0, 0, 0, time.monotonic())

        self.create_timer(1.0 / self.tick_rate_hz, self.tick, MutuallyExclusiveCallbackGroup())
        self.create_timer(1.0, self.publish_status, MutuallyExclusiveCallbackGroup())
        if self.map_publish_rate_hz > 0:
            self.create_timer(1.0 / self.map_publish_rate_hz, self.publish_map, MutuallyExclusiveCallbackGroup())
        # queue depth 100: concurrent callers beyond the default 10 pending requests would be dropped silently
        self.create_service(SegmentByText, 'segment_by_text', self.on_segment, qos_profile=QoSProfile(depth=100),
                            callback_group=MutuallyExclusiveCallbackGroup())
        self.persistence = MapPersistence(self, self.mapper, self._lock)
        self.label_volume = LabelVolumeInterface(self, self.mapper, self._lock, self.map_frame,
                                                 self.map_cloud_max_points)
        self.get_logger().info(f'mapping in frame {self.map_frame!r}, pose from {self.pose_source}; '
                               'service segment_by_text ready')

    # ------------------------------------------------------------------ inputs
    def _push(self, buffer: Deque):
        def callback(msg):
            with self._in_lock:
                buffer.append(msg)
        return callback

    def _push_depth(self, msg: Image) -> None:
        with self._in_lock:
            self._depth.append(msg)
            self._depth_arrival.append(time.monotonic())

    # Time stamp policy for depth frames, applied when a frame is taken for processing (README: Robustness).
    STAMP_FUTURE_S = 60.0   # stamped more than this ahead of the node's clock (when the clock is set): dropped
    STAMP_JUMP_S = 5.0      # older than the last processed frame by more: time jumped back (bag loop), accepted
    _last_stamp: Optional[float] = None     # stamp of the last frame handed to the mapper
    _camera_error = ''                      # why the latest camera info was rejected ('' = it was valid)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        """Keep the latest valid camera info; an invalid one is dropped (counted, logged) and the previous kept."""
        try:
            conv.camera_info_to_camera(msg)
        except ValueError as e:
            self._camera_error = str(e)
            self._error(f'{e}; camera info dropped' + (', the previous one is kept' if self._camera_info else ''))
            return
        self._camera_error = ''
        self._camera_info = msg

    def _check_stamp(self, t: float) -> None:
        """Raise ValueError if a depth frame at ``t`` breaks the stamp policy; restart keyframe timing when time
        jumped back (a looping bag, a restarted simulator)."""
        if t <= 0.0:
            raise ValueError('depth image has stamp 0 (header.stamp not set by its publisher); frame dropped')
        now = self.get_clock().now().nanoseconds * 1e-9
        if now > 0.0 and t - now > self.STAMP_FUTURE_S:
            raise ValueError(f'depth image stamped {t - now:.1f} s ahead of this node\'s clock (limit '
                             f'{self.STAMP_FUTURE_S:g} s); check the publisher\'s clock and use_sim_time; '
                             'frame dropped')
        last = self._last_stamp
        if last is not None and t <= last:
            if last - t <= self.STAMP_JUMP_S:
                raise ValueError(f'depth image at {t:.3f} s is not newer than the last processed frame at '
                                 f'{last:.3f} s: out-of-order or repeated frame dropped')
            self.get_logger().warning(f'time jumped back {last - t:.1f} s (bag loop or clock reset): '
                                      'keyframe timing restarts')
            with self._lock:
                self.mapper.keyframes.reset()

    def _error(self, reason: str) -> None:
        self.last_error = reason
        self.stats['dropped'] += 1
        self.get_logger().warning(reason, throttle_duration_sec=2.0)

    @staticmethod
    def _nearest(buffer: Deque, t: float, slop: float):
        best = min(buffer, key=lambda m: abs(conv.stamp_to_sec(m.header.stamp) - t), default=None)
        if best is not None and abs(conv.stamp_to_sec(best.header.stamp) - t) <= slop:
            return best
        return None

    def _pop_depth(self, n: int) -> None:
        for _ in range(n):
            self._depth.popleft()
            self._depth_arrival.popleft()

    def _missing_partners(self, depth: Image, t: float, simulated: bool) -> list:
        missing = [name for name, buf in (('colour image', self._color), ('label image', self._labels))
                   if (name == 'colour image' or simulated) and self._nearest(buf, t, self.sync_slop_s) is None]
        if not self._pose_ready(depth, t):
            missing.append(f'transform {self.map_frame} -> {depth.header.frame_id}' if self._tf_buffer is not None
                           else 'pose')
        return missing or ['partner']

    def _pose_ready(self, depth: Image, t: float) -> bool:
        """Whether the pose for a depth image can be looked up yet (caller holds the input lock)."""
        if self._tf_buffer is not None:
            import rclpy.time
            return self._tf_buffer.can_transform(self.map_frame, depth.header.frame_id,
                                                 rclpy.time.Time.from_msg(depth.header.stamp))
        return self._nearest(self._poses, t, self.sync_slop_s) is not None

    def _pose_at(self, depth: Image, t: float) -> np.ndarray:
        """T_W_C of a depth image; ValueError naming the problem (no pose, NaN or zero quaternion, ...)."""
        if self._tf_buffer is not None:
            import rclpy.time
            try:
                msg = self._tf_buffer.lookup_transform(self.map_frame, depth.header.frame_id,
                                                       rclpy.time.Time.from_msg(depth.header.stamp))
            except Exception as e:  # tf2 raises several exception types
                raise ValueError(f'no transform {self.map_frame} → {depth.header.frame_id} at {t:.3f}: {e}')
            T_P_C = np.eye(4)
        else:
            with self._in_lock:
                msg = self._nearest(self._poses, t, self.sync_slop_s)
            if msg is None:
                raise ValueError(f'no pose within {self.sync_slop_s} s of the depth image at {t:.3f}')
            T_P_C = self.T_P_C
        try:
            return conv.pose_msg_to_matrix(msg) @ T_P_C
        except ValueError as e:
            raise ValueError(f'camera pose at {t:.3f} s rejected: {e}; frame dropped') from None

    def _next_frame(self) -> Optional[Frame]:
        """Pop the newest depth image whose partners arrived; older depth images are superseded."""
        simulated = self.mapper.extractor.simulated
        with self._in_lock:
            for i in range(len(self._depth) - 1, -1, -1):
                depth = self._depth[i]
                t = conv.stamp_to_sec(depth.header.stamp)
                color = self._nearest(self._color, t, self.sync_slop_s)
                labels = self._nearest(self._labels, t, self.sync_slop_s) if simulated else None
                if color is not None and (labels is not None or not simulated) and self._pose_ready(depth, t):
                    self.stats['superseded'] += i
                    self._pop_depth(i + 1)
                    break
            else:
                now = time.monotonic()
                expired = sum(1 for a in self._depth_arrival if now - a > self.sync_timeout_s)
                if expired or len(self._depth) == self._depth.maxlen:
                    oldest = self._depth[0]
                    missing = self._missing_partners(oldest, conv.stamp_to_sec(oldest.header.stamp), simulated)
                    self._pop_depth(max(expired, 1))
                    raise ValueError(f'dropped {max(expired, 1)} depth image(s): no {" or ".join(missing)} within '
                                     f'sync_slop_s={self.sync_slop_s} s after waiting {self.sync_timeout_s} s; '
                                     'check topics and stamps')
                return None
        if self._camera_info is None:
            raise ValueError('no valid camera info received yet on color/camera_info; frame skipped'
                             + (f' (the last one was rejected: {self._camera_error})' if self._camera_error else ''))
        self._check_stamp(t)
        camera = conv.camera_info_to_camera(self._camera_info)
        T_W_C = self._pose_at(depth, t)
        depth_m = conv.depth_to_meters(depth)
        m = self.mapper.cfg.map
        if not np.any((depth_m >= m.min_depth_m) & (depth_m <= m.max_depth_m)):
            raise ValueError(f'depth image at {t:.3f} s has no valid pixel (all 0, NaN, inf, negative or outside '
                             f'[{m.min_depth_m:g}, {m.max_depth_m:g}] m); frame dropped')
        lab = conv.labels_to_numpy(labels) if labels is not None else None
        return Frame(conv.color_to_rgb(color), depth_m, camera, T_W_C, t, lab)

    # ------------------------------------------------------------------ processing
    def tick(self) -> None:
        """Integrate the newest complete frame if it is a keyframe."""
        try:
            frame = self._next_frame()
            if frame is None:
                return
            self.stats['frames'] += 1
            with self._lock:
                integrated = self.mapper.integrate(frame)
            self._last_stamp = frame.stamp_s
            if integrated:
                self.stats['keyframes'] += 1
                self._kf_times.append(self.mapper.timings_s['total'])
        except (ValueError, RuntimeError) as e:
            self._error(str(e))
        except Exception as e:  # never let one bad frame take the node down
            self._error(f'frame failed: {type(e).__name__}: {e}')

    def on_segment(self, request, response):
        """Answer a text query with the matching voxels as a PointCloud2 and split into object instances."""
        t0 = time.perf_counter()
        try:
            with self._lock:
                if self.mapper.map.size == 0:
                    raise ValueError('the map is empty: no keyframe integrated yet')
                seg = self.mapper.segment(request.text, list(request.negatives), float(request.threshold))
            objects = self.objects.extract(seg.xyz, seg.scores, self._short(request.text), self.mapper.cfg)
            stamp = self.get_clock().now().to_msg()
            response.cloud = conv.make_pointcloud2(seg.xyz, seg.rgb, seg.scores, self.map_frame, stamp)
            response.scores = seg.scores.astype(np.float32).tolist()
            response.success = True
            response.objects = self.objects.publish(objects, stamp).objects
            response.message = (f'{len(seg.scores)} voxels in {len(objects)} object(s) match '
                                f'{self._short(request.text)!r} from the {seg.source} '
                                f'({1e3 * (time.perf_counter() - t0):.0f} ms)')
            self.seg_pub.publish(response.cloud)
        except Exception as e:
            response.success = False
            response.message = str(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'
            self.get_logger().warning(f'segment_by_text({self._short(request.text)!r}) failed: {response.message}')
        return response

    @staticmethod
    def _short(text: str, n: int = 60) -> str:
        """``text`` on one line (control characters and whitespace runs as one space), cut to ``n`` characters."""
        text = ' '.join(''.join(c if c.isprintable() else ' ' for c in text[:4 * n]).split())
        return text if len(text) <= n else text[:n - 3] + '...'

    def publish_map(self) -> None:
        with self._lock:
            if self.mapper.map.size == 0:
                return
            cloud = self.mapper.map_cloud(self.map_cloud_max_points)
        self.map_pub.publish(conv.make_pointcloud2(cloud.xyz, cloud.rgb, None, self.map_frame,
                                                   self.get_clock().now().to_msg()))

    def status(self) -> dict:
        """Counters and timings, also published on ~/status as JSON."""
        times = np.array(self._kf_times or [0.0])
        return {'frames': self.stats['frames'], 'keyframes': self.stats['keyframes'],
                'dropped': self.stats['dropped'], 'superseded': self.stats['superseded'],
                'voxels': self.mapper.map.size, 'evicted_voxels': self.mapper.evicted_voxels,
                'pending_depth': len(self._depth),
                'keyframe_time_mean_s': float(times.mean()), 'keyframe_time_max_s': float(times.max()),
                'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                'last_error': self.last_error}

    def publish_status(self) -> None:
        """~/status (JSON) and /diagnostics (input and keyframe rates, voxels, memory, drops, last error), 1 Hz."""
        status = self.status()
        self.status_pub.publish(String(data=json.dumps(status)))
        frames, keyframes, dropped, t = self._last_counts
        now = time.monotonic()
        dt = max(now - t, 1e-3)
        rates = {'input_rate_hz': round((status['frames'] - frames) / dt, 2),
                 'keyframe_rate_hz': round((status['keyframes'] - keyframes) / dt, 2)}
        new_drops = status['dropped'] - dropped
        self._last_counts = (status['frames'], status['keyframes'], status['dropped'], now)
        if new_drops:
            level, message = 'warn', f'{new_drops} frame(s) dropped in the last {dt:.1f} s: {status["last_error"]}'
        elif status['frames'] == frames:
            level, message = 'warn', 'no input frames (check topics, QoS and the pose source)'
        else:
            level, message = 'ok', f'mapping: {status["voxels"]} voxels'
        self.diag_pub.publish(conv.make_diagnostics(f'{self.get_name()}: mapping', level, message,
                                                    {**rates, **status}, self.get_clock().now().to_msg()))


def main(args=None) -> int:
    node = None
    try:
        rclpy.init(args=args)
        node = MappingNode()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as e:  # a configuration error: say why and exit non-zero
        msg = f'ov3d_mapping cannot start: {e}'
        (node.get_logger().fatal(msg) if node else rclpy.logging.get_logger('ov3d_mapping').fatal(msg))
        return 1
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
