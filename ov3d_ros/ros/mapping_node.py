"""The ov3d mapping node: RGB-D cameras + camera info + pose in, open-vocabulary voxel map and /segment_by_text out.

Callbacks only store messages. A timer (``select``) pairs each camera's depth with its colour (and labels for the
simulated source) and a pose, converts, and selects keyframes into the camera's pending keyframes; another
(``tick``) integrates all pending keyframes as one batch. It is the only writer of the map besides the load,
clear, merge and vocabulary services (``map_persistence``, ``label_volume``) and live parameter changes, all under
one lock. Whoever changes the map publishes a :class:`~ov3d_ros.core.snapshot.MapSnapshot` of it under
that lock (a copy of what queries read, taken after every integrated batch of keyframes); ``segment_by_text``,
the map and label clouds, the objects and the optional browser view (``web_view``) answer from the latest snapshot
without taking the lock, so a query never waits behind a keyframe being integrated.

Two node classes share this behaviour (:class:`MappingInterface`): :class:`MappingNode` (plain; configured and
active as soon as it is constructed) and ``lifecycle_mapping_node.LifecycleMappingNode`` (managed: the model loads
in ``on_configure``, inputs and timers start in ``on_activate``).
"""
from __future__ import annotations

import collections
import json
import resource
import signal
import sys
import threading
import time
from dataclasses import replace
from typing import Deque, List, Optional

import numpy as np
import rclpy
import rclpy.time
from rcl_interfaces.msg import SetParametersResult
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.client import Client
from rclpy.clock import Clock, ClockChange, ClockType, JumpThreshold
from rclpy.duration import Duration
from rclpy.executors import ExternalShutdownException, MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.publisher import Publisher
from rclpy.service import Service
from rclpy.signals import SignalHandlerOptions
from rclpy.subscription import Subscription
from rclpy.timer import Timer
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from nav_msgs.msg import Odometry
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String
from visualization_msgs.msg import MarkerArray

from ov3d_ros.core.config import MapperConfig, depth_range_problem
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.keyframes import thin_out
from ov3d_ros.core.mapper import Frame, Mapper, resolve_device
from ov3d_ros.core.snapshot import MapSnapshot
from ov3d_ros.datasets.poses import interpolate_pose
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.camera_input import CameraInput, PoseBuffer
from ov3d_ros.ros.label_volume import LabelVolumeInterface, declare_label_volume
from ov3d_ros.ros.map_persistence import MapPersistence, declare_map_persistence
from ov3d_ros.ros.objects import ObjectsOutput
from ov3d_ros.ros.params import (LIVE, as_declared, check, check_node, declare, declare_config, mark_read_only,
                                 mark_writable, parameter_value, range_refusal, read_config, read_only_reason)
from ov3d_ros.ros.services import create_service
from ov3d_ros.ros.web_view import WebViewInterface, declare_web_view
from ov3d_ros.srv import SegmentByText

POSE_SOURCES = ('tf', 'pose', 'odometry')

try:                                    # optional: no tf2_ros in some installs (pose/odometry sources work without)
    import tf2_ros
except ImportError:                     # pragma: no cover - depends on the install
    tf2_ros = None


NODE_LIVE = ('sync_slop_s', 'sync_timeout_s', 'pose_max_gap_s', 'tick_rate_hz', 'map_publish_rate_hz',
             'map_cloud_max_points', 'max_pending_keyframes')
"""Live parameters the node keeps as attributes of its own (the mapper's live ones are its config's fields)."""


class MappingInterface:
    """Parameters, inputs, processing, services and outputs of the mapping node, for a ``Node`` subclass.

    ``_declare_parameters`` runs in the constructor; ``_configure`` (model, map, services, publishers),
    ``_activate`` (subscriptions, timers), ``_deactivate`` and ``_cleanup`` are the lifecycle steps.
    """

    mapper: Optional[Mapper] = None
    web_view: Optional[WebViewInterface] = None
    _map_cloud_shown = False                   # the last ~/map_cloud had points
    tf_buffer = None
    _mapping_active = False
    _setting_descriptors = False

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        """Declare every parameter (config sections, node level, persistence, label volume, web view), check the
        values, watch changes. Configure reads them (:meth:`_read_parameters`): a lifecycle node takes a set of any
        of them while it is unconfigured."""
        declare_config(self, MapperConfig())
        declare(self, 'map_frame', 'map', "Fixed frame of the map and of every output ('/map' is taken as 'map').")
        declare(self, 'pose_source', 'tf', "Camera pose from 'tf' (map_frame → image frame), 'pose' "
                "(geometry_msgs/PoseStamped) or 'odometry' (nav_msgs/Odometry).")
        declare(self, 'pose_frame', '', "For pose/odometry sources: the frame the pose describes (the robot body); "
                "with TF the camera mount is looked up from it to each image's frame_id. '' = Odometry's "
                "child_frame_id (none for PoseStamped: pose_to_camera).")
        declare(self, 'pose_to_camera', [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                'For pose/odometry sources when TF gives no mount: x y z qx qy qz qw of each camera optical frame '
                'in the frame the pose describes, 7 numbers per camera in the order of `cameras` (or 7 for all; '
                'identity = the pose is the optical frame).')
        declare(self, 'cameras', [''], "Camera namespaces, each with color/image, depth/image, color/camera_info "
                "(and labels/image), e.g. ['front', 'rear']; [''] = one camera on the node's own topics.")
        declare(self, 'color_transport', 'raw', "Colour input: 'raw' (sensor_msgs/Image on color/image) or "
                "'compressed' (CompressedImage JPEG/PNG on color/image/compressed).")
        declare(self, 'depth_transport', 'raw', "Depth input: 'raw' (sensor_msgs/Image on depth/image) or "
                "'compressedDepth' (image_transport's PNG depth on depth/image/compressedDepth).")
        declare(self, 'rectified_images', False, "false: colour and depth are raw images (image_raw): the camera "
                "info's k and lens distortion d (plumb_bob, rational_polynomial, equidistant) are used, each pixel "
                "back-projected along its undistorted ray. true: they are rectified (image_rect, image_proc): its p "
                "is used and d ignored, as depth_image_proc does.")
        declare(self, 'sync_slop_s', 0.05, 'Max time difference between paired messages.')
        declare(self, 'pose_max_gap_s', 0.5, "pose_source 'pose'/'odometry': a depth image between two poses at "
                'most this far apart takes their interpolation (translation linear, rotation slerp), else the '
                'nearest pose within sync_slop_s (0: nearest only).')
        declare(self, 'sync_timeout_s', 5.0, 'Depth images still without colour/pose partners this long after '
                "arrival are dropped (counted, logged). Above Fast DDS's 3 s heartbeat period: a reliable image "
                'that lost a fragment comes then.')
        declare(self, 'tick_rate_hz', 20.0, 'Rate of the processing timer.')
        declare(self, 'map_publish_rate_hz', 0.5, 'Rate of ~/map_cloud (0 = off).')
        declare(self, 'map_cloud_max_points', 200000, 'Points in ~/map_cloud at most.')
        declare(self, 'input_qos', 'sensor_data', "QoS of image inputs: 'sensor_data' or 'reliable'.")
        declare(self, 'pose_qos', 'best_effort', "Reliability of the pose/odometry subscription (keep last 50): "
                "'best_effort' (matches reliable and best-effort publishers; a lost pose is skipped and bridged "
                "by interpolation, never waited for) or 'reliable'.")
        declare(self, 'queue_size', 30, 'Messages kept per input topic while waiting for a partner (30: 1 s of a '
                '30 Hz camera, for a reliable partner held back behind a lost one).')
        declare(self, 'max_pending_keyframes', 30, 'Selected keyframes per camera waiting to be integrated (they '
                'are integrated together, as one batch); beyond this one is dropped (counted, logged): the one '
                'whose neighbours in the backlog are closest along the path.')
        declare_map_persistence(self)
        declare_label_volume(self)
        declare_web_view(self)
        self._read_parameters()
        self._lock = threading.Lock()            # guards the mapper
        self._select_lock = threading.Lock()     # one select() at a time (its timer and tick)
        self._pending_lock = threading.Lock()    # guards the cameras' pending keyframes and the map epoch
        self._map_epoch = 0                      # advanced when the map is cleared or loaded (map_replaced)
        self._pose_lock = threading.Lock()       # guards the pose buffer
        self._poses = PoseBuffer()               # pose or odometry messages (pose_source pose / odometry)
        self._snapshot: Optional[MapSnapshot] = None   # what readers answer from (see publish_snapshot)
        self._snapshot_stale = False
        self._mapping_timers = {}
        self._created = {}
        self._doomed, self._doomed_lock = [], threading.Lock()   # see destroy_soon
        self._configuring = False
        self._echo = threading.local()   # on: this thread sets a parameter to what the node already runs
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self._steady_clock = Clock(clock_type=ClockType.STEADY_TIME)
        # the clock going back (use_sim_time: a bag played with --clock --loop, a restarted simulator): tf2_ros's
        # Buffer clears itself on such a jump only when given the node, whose clock it then watches
        self._jump_handle = self.get_clock().create_jump_callback(
            JumpThreshold(min_forward=None, min_backward=Duration(seconds=-1), on_clock_change=True),
            post_callback=self._on_time_jump)

    NODE_PARAMETERS = ('pose_source', 'pose_frame', 'color_transport', 'depth_transport', 'rectified_images',
                       'input_qos', 'pose_qos', 'queue_size') + NODE_LIVE
    """Node-level parameters the node keeps as attributes of the same name (besides map_frame and cameras)."""

    def _read_parameters(self) -> None:
        """Check every parameter (each, and cameras with pose_to_camera) and keep the node-level ones as attributes:
        what the node runs with. ValueError with the reasons. At start and at every configure (a lifecycle node
        takes sets while it is unconfigured; the config sections are read there too, :func:`read_config`)."""
        check_node(self)
        problem = self._cameras_problem({})
        if problem:
            raise ValueError(problem)
        self.map_frame = conv.frame_id(parameter_value(self, 'map_frame'))
        self.cameras_ns = parameter_value(self, 'cameras')
        for name in self.NODE_PARAMETERS:
            setattr(self, name, parameter_value(self, name))

    def _cameras_problem(self, new: dict) -> Optional[str]:
        """What is wrong with ``cameras`` and ``pose_to_camera`` taken together (the values in ``new`` in place of
        the node's), or None."""
        cameras = new['cameras'] if 'cameras' in new else parameter_value(self, 'cameras')
        mounts = new['pose_to_camera'] if 'pose_to_camera' in new else parameter_value(self, 'pose_to_camera')
        if not cameras or len(set(cameras)) != len(cameras):
            return f'cameras must be a list of distinct namespaces, got {cameras}'
        if len(mounts) not in (7, 7 * len(cameras)):
            return f'pose_to_camera has {len(mounts)} numbers; expected 7 or 7 per camera ({7 * len(cameras)})'
        return None

    def create_steady_timer(self, period_s: float, callback, callback_group=None) -> Timer:
        """A timer on the steady clock. The node's work (integration, status, map output, autosave) runs on the
        time that passes, not on ROS time: with use_sim_time and no /clock (a bag played without --clock, a
        simulator that does not bridge it) timers on ROS time never fired, and the node took in images without a
        word, no status, no diagnostics; a paused bag paused them too."""
        return self.create_timer(period_s, callback, callback_group, clock=self._steady_clock)

    def _on_time_jump(self, jump) -> None:
        """The node's clock jumped back (or switched to or from sim time): TF's transforms (not the static ones)
        and the buffered poses are of the other time line; they go (keyframe timing restarts with the next
        frame's stamp, :meth:`_check_stamp`)."""
        if jump.clock_change in (ClockChange.ROS_TIME_ACTIVATED, ClockChange.ROS_TIME_DEACTIVATED):
            what = 'clock switched ' + ('to' if jump.clock_change == ClockChange.ROS_TIME_ACTIVATED else 'from')
            self.get_logger().info(f'{what} sim time (use_sim_time): TF and pose buffers cleared')
        else:
            self.get_logger().warning(f'clock jumped back {-jump.delta.nanoseconds * 1e-9:.1f} s (bag loop or '
                                      'simulator restart): TF and pose buffers cleared')
        tf_buffer = self.tf_buffer
        if tf_buffer is not None:
            tf_buffer.clear()
        with self._pose_lock:
            self._poses.clear()

    def set_parameters(self, parameter_list):
        """rclpy's, with values converted to their declared type where that is what is meant (:func:`as_declared`)
        and the check's reason for a value outside its parameter's range or of another type
        (:func:`range_refusal`)."""
        results = []
        for p in parameter_list:      # one by one, as rclpy does (an undeclared one raises, the ones before stay set)
            p = as_declared(self, [p])
            results.append(range_refusal(self, p) or super().set_parameters(p)[0])
        return results

    def set_parameters_atomically(self, parameter_list):
        """rclpy's (the parameter services call it), as :meth:`set_parameters` converts and refuses."""
        parameter_list = as_declared(self, parameter_list)
        return range_refusal(self, parameter_list) or super().set_parameters_atomically(parameter_list)

    def _on_set_parameters(self, params) -> SetParametersResult:
        """Validate a ``ros2 param set`` and apply it. Configured, live parameters only (the others are read-only
        from the end of configure, :func:`mark_read_only`); a lifecycle node unconfigured takes any parameter,
        checked here, and reads it at configure."""
        if self._setting_descriptors or getattr(self._echo, 'on', False):
            return SetParametersResult(successful=True)
        # a parameter being declared is not a change
        new = {p.name: (list(p.value) if isinstance(p.value, (list, tuple)) else p.value) for p in params
               if self.has_parameter(p.name)}
        configuring = SetParametersResult(successful=False, reason='the node is being configured (the feature model '
                                          'is loading); set it again once configure has finished')
        for name, value in new.items():
            if name not in LIVE and self._configuring:
                return configuring
            if name not in LIVE and self.mapper is not None:
                return SetParametersResult(successful=False, reason=f'{name} cannot change: {read_only_reason(name)}')
            problem = check(name, value)
            if problem:
                return SetParametersResult(successful=False, reason=problem)
        if not new:
            return SetParametersResult(successful=True)
        problem = depth_range_problem(new.get('map.min_depth_m', self.get_parameter('map.min_depth_m').value),
                                      new.get('map.max_depth_m', self.get_parameter('map.max_depth_m').value))
        problem = problem or self._cameras_problem(new)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
        if self.mapper is None and self._configuring:    # its values were read; the mapper is not made yet
            return configuring
        if self.mapper is None:          # not configured: the values are read when it is
            return SetParametersResult(successful=True)
        try:
            self._echo.on = True        # what _apply changes, the parameters take when this callback returns
            self._apply(new)
        except Exception as e:  # refused, never a node taken down by a parameter change
            if self.mapper is None and not self._configuring:   # a cleanup took the map meanwhile: as unconfigured
                return SetParametersResult(successful=True)
            return SetParametersResult(successful=False,
                                       reason=str(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {e}')
        finally:
            self._echo.on = False
        self.get_logger().info('parameters changed: ' + ', '.join(f'{k}={v!r}' for k, v in new.items()))
        return SetParametersResult(successful=True)

    def _apply(self, new: dict) -> None:
        """Apply validated live values; ValueError (nothing changed) if the mapper cannot take them."""
        web = {k.split('.', 1)[1]: v for k, v in new.items() if k.startswith('web_view.')}
        view = self.web_view                   # a cleanup may take it meanwhile (its close waits for apply)
        if web and view is None:               # configure is making it: it reads the new values
            web = {}
        if web:                                # may refuse: first (and undone if what follows refuses)
            before = dict(view.settings)
            view.apply(web)
        try:
            self._apply_map(new)
        except Exception:                      # refused, or failed (out of memory): the web view's part undone
            if web:
                try:
                    view.apply(before)
                except ValueError as e:
                    self.get_logger().error(f'web view settings not restored: {e}')
            raise

    def _apply_map(self, new: dict) -> None:
        """The mapper and node parts of :meth:`_apply`."""
        cfg = self.mapper.cfg
        features = {k.split('.', 1)[1]: v for k, v in new.items() if k.startswith('features.')}
        fixed = [k for k in features if k not in self.mapper.extractor.live_settings]
        if fixed:
            raise ValueError(f'{", ".join("features." + k for k in fixed)}: the dense mode and image sizes are '
                             f"settings of the clip feature source; this node runs {cfg.features.source!r}")
        # purification and vocabulary as they are now are not applied again (ros2 param load sends every
        # parameter): no whole-map re-pool, no label evidence recomputed from the stored features
        vocabulary = new.get('labels.vocabulary')
        if vocabulary is not None and self.mapper.vocabulary_names(vocabulary) == list(cfg.labels.vocabulary):
            vocabulary = None
        if vocabulary is not None:             # its names' embeddings (may refuse), while mapping goes on
            self.mapper.prepare_vocabulary(vocabulary)
        # the mapper's settings, under the map lock, then a new snapshot; not for the node's own parameters
        # alone (sync_slop_s, ...), which need not wait for a keyframe being integrated
        if any('.' in k and not k.startswith('web_view.') for k in new):
            with self._lock:
                # the parts that may refuse, each undone when a later one refuses (a set is all or nothing): the
                # ViT's settings (for its next keyframe, not one under way: same lock), purification, vocabulary
                old_features, old_purify = cfg.features, cfg.purify
                if features:
                    self.mapper.extractor.reconfigure(replace(cfg.features, **features))
                purify = {k.split('.', 1)[1]: v for k, v in new.items() if k.startswith('purify.')}
                if purify and replace(cfg.purify, **purify) == cfg.purify:
                    purify = {}
                # text embeddings depend on the templates: the label volume's classes are embedded again with them
                texts = {key: new[f'query.{key}'] for key in ('templates', 'repetitions')
                         if f'query.{key}' in new and new[f'query.{key}'] != getattr(cfg.query, key)}
                old_texts = {key: getattr(cfg.query, key) for key in texts}
                try:
                    if purify:
                        self.mapper.reconfigure_purification(replace(cfg.purify, **purify))
                    if texts:
                        for key, value in texts.items():
                            setattr(cfg.query, key, value)
                        self.mapper.texts.clear()
                        if vocabulary is None and self.mapper.labels is not None:
                            vocabulary = list(cfg.labels.vocabulary)
                    if vocabulary is not None:
                        try:
                            self.mapper.set_vocabulary(vocabulary)
                        except Exception:
                            if texts:
                                for key, value in old_texts.items():
                                    setattr(cfg.query, key, value)
                                self.mapper.texts.clear()
                            if purify:
                                self.mapper.reconfigure_purification(old_purify)
                            raise
                except Exception:
                    if features:                   # a copy: the config's own section is changed in place below
                        self.mapper.extractor.reconfigure(replace(old_features))
                    raise
                changed = False
                for name, value in new.items():
                    section, _, key = name.partition('.')
                    if key and section not in ('purify', 'labels', 'web_view') or name in (
                            'labels.smoothing_radius_vox', 'labels.min_component_vox', 'labels.feature_prior'):
                        changed |= getattr(getattr(cfg, section), key) != value
                        setattr(getattr(cfg, section), key, value)
                if changed:   # a saved map carries these settings (ov3d query uses its query.*): autosave saves
                    self.mapper.generation += 1
                self.publish_snapshot()
        for name in ('sync_slop_s', 'sync_timeout_s', 'pose_max_gap_s', 'map_cloud_max_points'):
            if name in new:
                setattr(self, name, new[name])
        if 'pose_to_camera' in new:
            self._set_mounts(new['pose_to_camera'])
        if 'tick_rate_hz' in new:
            self.tick_rate_hz = new['tick_rate_hz']
            self._restart_timer('tick')
            self._restart_timer('select')
        if 'max_pending_keyframes' in new:
            self.max_pending_keyframes = new['max_pending_keyframes']
        if 'map_publish_rate_hz' in new:
            self.map_publish_rate_hz = new['map_publish_rate_hz']
            self._restart_timer('map')
        if 'map_cloud_max_points' in new and getattr(self, 'label_volume', None) is not None:
            self.label_volume.max_points = new['map_cloud_max_points']
        if 'map_cloud_max_points' in new and self.web_view is not None:
            self.web_view.set_max_points(new['map_cloud_max_points'])

    def _set_mounts(self, values) -> None:
        for i, cam in enumerate(self.cameras):
            v = values[7 * i:7 * i + 7] if len(values) > 7 else values
            cam.T_B_C = conv.pose_to_matrix(v[:3], v[3:])

    # ------------------------------------------------------------------ lifecycle steps
    def _track(self) -> dict:
        return {kind: set(getattr(self, kind)) for kind in ('publishers', 'subscriptions', 'services', 'timers',
                                                             'clients')}

    def _destroy_since(self, before: dict) -> None:
        """Destroy the entities created since ``before`` (a :meth:`_track` snapshot), between two executor waits
        (:meth:`destroy_soon`): lifecycle transitions run in a callback while the executor may wait on them."""
        for kind, entities in self._track().items():
            for e in entities - before[kind]:
                self.destroy_soon(e)

    def destroy_soon(self, entity) -> None:
        """Destroy a publisher, subscription, service, client or timer (cancelled now) between two waits of the
        executor, from the thread that spins it (:meth:`destroy_doomed`, called by :func:`spin`). Destroyed from a
        callback while that thread waits on it, the executor fails on its next use of it ("cannot use Destroyable
        because destruction was requested"), as it did once when the start-up camera-info subscription went while
        a player streamed, and in 2 of 24 deactivations of the lifecycle node under a 30 Hz stream. Under another
        executor the entity stays until :meth:`destroy_doomed` or the node's end (a cancelled timer never fires;
        callers ignore what a doomed subscription still takes)."""
        if isinstance(entity, Timer):
            entity.cancel()
        with self._doomed_lock:
            if not any(e is entity for e in self._doomed):
                self._doomed.append(entity)

    def destroy_doomed(self, busy: bool = False) -> None:
        """Destroy what :meth:`destroy_soon` was given. Call it where no executor waits on this node. ``busy``:
        callbacks are running on other threads (a multi-threaded executor), which may still publish or answer a
        request: publishers, services and clients then wait for a call when none runs (a service destroyed under
        its running callback answered 'cannot use Destroyable', or not at all, in a cleanup during queries)."""
        with self._doomed_lock:
            doomed, self._doomed = self._doomed, []
            if busy:
                self._doomed = [e for e in doomed if isinstance(e, (Publisher, Service, Client))]
                doomed = [e for e in doomed if not isinstance(e, (Publisher, Service, Client))]
        if not doomed:                         # the usual case: spin() calls this after every executor wait
            return
        destroy = ((Timer, self.destroy_timer), (Subscription, self.destroy_subscription),
                   (Publisher, self.destroy_publisher), (Service, self.destroy_service), (Client, self.destroy_client))
        for e in doomed:
            next(fn for kind, fn in destroy if isinstance(e, kind))(e)

    def _configure(self) -> None:
        """Load the feature model, make the map, the services, publishers and TF; validate the frames setup."""
        before = self._track()
        self._configuring = True
        try:
            self._configure_entities()
        except BaseException:
            self._destroy_since(before)
            self.mapper = None
            raise
        finally:
            self._configuring = False
        self._created['configure'] = before
        self._setting_descriptors = True
        try:
            mark_read_only(self)
        finally:
            self._setting_descriptors = False

    def _configure_entities(self) -> None:
        self._read_parameters()          # set while unconfigured (a lifecycle node): what the node runs with
        cfg = read_config(self)
        device = resolve_device(cfg.map.device)
        class_names = None
        if cfg.features.source == 'simulated':
            from ov3d_ros.sim.classes import CLASS_NAMES
            class_names = CLASS_NAMES
            self.get_logger().warning('features.source=simulated: features come from ground-truth label images '
                                      '(labels/image), not from the camera. Use it for tests and demos only.')
        extractor = create_extractor(cfg.features, device, class_names)
        mapper = Mapper(cfg, extractor)
        precision = getattr(extractor, 'dtype', None)        # the ViT's (features.dtype); none for simulated
        self.get_logger().info(f'feature source {extractor.name} (D={extractor.dim}, '
                               f'weights: {getattr(extractor, "weights", "n/a")}, space {extractor.space}) on {device}'
                               + (f' in {str(precision).removeprefix("torch.")}' if precision is not None else ''))
        if extractor.precision_warning:
            self.get_logger().warning(extractor.precision_warning)
        if extractor.precision_hint:
            self.get_logger().info(extractor.precision_hint)
        if cfg.map.compress_basis:
            self.get_logger().info(f'features stored in {cfg.map.compress_dim} dims, starting from the basis of '
                                   f'{cfg.map.compress_basis} ('
                                   + ('folding keyframes in' if cfg.map.compress_update else 'fixed') + ')')
        self.cameras: List[CameraInput] = [CameraInput(ns, self.queue_size, self.color_transport,
                                                       self.depth_transport) for ns in self.cameras_ns]
        self._set_mounts(self.get_parameter('pose_to_camera').value)
        self.stats_start = time.monotonic()
        self.last_error = ''
        self._kf_times: Deque[float] = collections.deque(maxlen=1000)
        self._warned = set()
        if self.pose_source == 'tf' and tf2_ros is None:
            raise RuntimeError("pose_source 'tf' needs tf2_ros, which is not installed; install it or set "
                               "pose_source to 'pose' or 'odometry'")
        if tf2_ros is not None:
            self.tf_buffer = tf2_ros.Buffer()
            self._tf_listener = tf2_ros.TransformListener(self.tf_buffer, self)

        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.map_pub = self.create_publisher(PointCloud2, '~/map_cloud', latched)
        self.seg_pub = self.create_publisher(PointCloud2, '~/segmentation', latched)
        self.marker_pub = self.create_publisher(MarkerArray, '~/segmentation_markers', latched)
        self.objects = ObjectsOutput(self, self.map_frame, self.marker_pub)
        self.status_pub = self.create_publisher(String, '~/status', 10)
        self.diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        self._last_counts = (0, 0, (0, 0), time.monotonic(), {})
        # queue depth 100: concurrent callers beyond the default 10 pending requests would be dropped silently
        create_service(self, SegmentByText, 'segment_by_text', self.on_segment, qos_profile=QoSProfile(depth=100),
                       callback_group=MutuallyExclusiveCallbackGroup())
        self.mapper = mapper
        with self._lock:
            self.publish_snapshot()
        self.persistence = MapPersistence(self, self.mapper, self._lock, declare_map_persistence(self),
                                          self.publish_snapshot)
        self.label_volume = LabelVolumeInterface(self, self.mapper, self._lock, self.map_frame,
                                                 self.map_cloud_max_points, declare_label_volume(self),
                                                 self.snapshot, self.publish_snapshot)
        # last: nothing after it can fail, so a failed configure never leaves a page serving; a page that cannot
        # be served is logged and reported, and the node maps on
        self.web_view = WebViewInterface(self, self.snapshot, declare_web_view(self), self.map_cloud_max_points)

    def _activate(self) -> None:
        """Subscribe to the inputs and start the processing, status and map timers."""
        before = self._track()
        qos = qos_profile_sensor_data if self.input_qos == 'sensor_data' else QoSProfile(depth=self.queue_size)
        # reliable inputs: the first camera info comes best effort too (CameraInput.subscribe)
        startup = qos_profile_sensor_data if qos.reliability == ReliabilityPolicy.RELIABLE else None
        # images in a group of their own: rclpy's parameter services run in the default group, and a map parameter
        # set waits there for the map lock (a keyframe batch being integrated); no image callback ran meanwhile
        inputs = MutuallyExclusiveCallbackGroup()
        for cam in self.cameras:
            cam.subscribe(self, qos, self._on_camera_info, self.mapper.extractor.simulated, startup, inputs)
        # poses in a group of their own: the callback only appends under a lock, and in the default group it can
        # wait behind every ready image callback (created earlier, taken first; poses came up to 1.2 s late at 6 Hz)
        poses = MutuallyExclusiveCallbackGroup()
        # best effort by default: over a reliable subscription one lost sample holds back every later pose until
        # it is re-sent (Fast DDS: on its heartbeat, up to 3 s), while depth images fill the queue; a skipped pose
        # is bridged by its neighbours (interpolated, pose_max_gap_s)
        pose_qos = QoSProfile(depth=50, reliability=ReliabilityPolicy.BEST_EFFORT
                              if self.pose_qos == 'best_effort' else ReliabilityPolicy.RELIABLE)
        if self.pose_source == 'pose':
            self.create_subscription(PoseStamped, 'pose', self._push_pose, pose_qos, callback_group=poses)
        elif self.pose_source == 'odometry':
            self.create_subscription(Odometry, 'odom', self._push_pose, pose_qos, callback_group=poses)
        self._mapping_timers, self._mapping_active = {}, True
        for name in ('tick', 'select', 'status', 'map'):
            self._restart_timer(name)
        self._created['activate'] = before
        topics = '; '.join(', '.join(c.topics(self)[k] for k in ('color', 'depth', 'camera_info'))
                           for c in self.cameras)
        self.get_logger().info(f'mapping in frame {self.map_frame!r}, pose from {self.pose_source}, '
                               f'{len(self.cameras)} camera(s): {topics}; service segment_by_text ready')

    def _restart_timer(self, name: str) -> None:
        if not self._mapping_active:
            return
        period = {'tick': 1.0 / self.tick_rate_hz, 'select': 1.0 / self.tick_rate_hz, 'status': 1.0,
                  'map': 1.0 / self.map_publish_rate_hz if self.map_publish_rate_hz > 0 else 0.0}[name]
        callback = {'tick': self.tick, 'select': self.select, 'status': self.publish_status,
                    'map': self.publish_map}[name]
        # the new timer first: should it fail, the old one keeps running
        timer = self.create_steady_timer(period, callback, MutuallyExclusiveCallbackGroup()) if period > 0 else None
        old = self._mapping_timers.pop(name, None)
        if old is not None:                   # from a parameter callback: not under the executor's wait
            self.destroy_soon(old)
        if timer is not None:
            self._mapping_timers[name] = timer

    def _deactivate(self) -> None:
        """Stop the inputs and timers (the map, services and parameters stay)."""
        for cam in self.cameras:
            cam.unsubscribe(self)
        self._mapping_active = False
        self._destroy_since(self._created.pop('activate'))
        self._mapping_timers = {}
        with self._pose_lock:
            self._poses.clear()

    def _cleanup(self, when: str = 'cleanup') -> None:
        """Release the map, the model, services and publishers; with autosave on, the map's unsaved changes are
        saved first (:meth:`save_unsaved`). The read-only parameters take a set again (:func:`mark_writable`):
        the next configure reads them."""
        self.save_unsaved(when)
        self._close_web_view()
        self._destroy_since(self._created.pop('configure'))
        with self._lock:
            self.mapper = None
            self._snapshot, self._snapshot_stale = None, False
        self.persistence = self.label_volume = None
        self.tf_buffer = None
        mark_writable(self)
        try:
            import torch
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:  # pragma: no cover
            pass

    def save_unsaved(self, when: str) -> None:
        """As the node stops (``when``: 'shutdown', 'cleanup'): with autosave on, save the map to map_path if it
        changed since it was last saved there (:meth:`MapPersistence.save_unsaved`); nothing before configure or
        after cleanup."""
        persistence = getattr(self, 'persistence', None)
        if persistence is not None and self.mapper is not None:
            persistence.save_unsaved(when)

    def _close_web_view(self) -> None:
        if self.web_view is not None:
            self.web_view.close()
            self.web_view = None

    def destroy_node(self) -> None:
        """Stop the browser view (its server and refresh threads), then destroy the node."""
        self._close_web_view()
        if hasattr(self, '_doomed_lock'):      # not when a bad parameter stopped the node while declaring
            self.destroy_doomed()
        super().destroy_node()

    # ------------------------------------------------------------------ inputs
    def _push_pose(self, msg) -> None:
        with self._pose_lock:
            if self._mapping_active:           # not from a subscription that deactivate doomed (destroy_soon)
                if self._poses.append(msg):
                    self.get_logger().warning(f'pose stamps jumped back to {conv.stamp_to_sec(msg.header.stamp):.3f} '
                                              's (bag loop or clock reset): earlier poses dropped')

    # Time stamp policy for depth frames, applied when a frame is taken for processing (README: Robustness).
    STAMP_FUTURE_S = 60.0   # stamped more than this ahead of the node's clock (when the clock is set): dropped
    STAMP_JUMP_S = 5.0      # older than the last processed frame by more: time jumped back (bag loop), accepted
    STAMP_JUMP_FRAMES = 3   # or this many older frames in a row (a loop shorter than STAMP_JUMP_S): accepted

    def _on_camera_info(self, cam: CameraInput, msg) -> None:
        """Keep the latest valid camera info; an invalid one is dropped (counted, logged) and the previous kept."""
        try:
            camera = conv.camera_info_to_camera(msg, rectified=self.rectified_images)
        except ValueError as e:
            reason = str(e)
            if not self.rectified_images and self._readable_as_rectified(msg):
                reason += ' (or, if the images are rectified, set rectified_images: true)'
            cam.camera_error = reason
            self._error(f'{reason}; camera info dropped' + (', the previous one is kept' if cam.camera_info else ''),
                        cam)
            return
        if camera.distorted:
            self._note_once(f'distortion:{cam.name}', f'{cam.name}: raw images with {camera.distortion_model} lens '
                            'distortion: each pixel is back-projected along its undistorted ray (set '
                            'rectified_images: true if these images are rectified)', info=True)
        cam.set_camera_info(msg, camera)

    @staticmethod
    def _readable_as_rectified(msg) -> bool:
        """Whether a camera info the node refused for raw images would do for rectified ones (``p``, the lens
        ignored): then rectified_images is worth naming."""
        try:
            conv.camera_info_to_camera(msg, rectified=True)
        except ValueError:
            return False
        return True

    def _check_stamp(self, cam: CameraInput, t: float) -> None:
        """Raise ValueError if a depth frame at ``t`` breaks the stamp policy; restart keyframe timing when time
        jumped back (a looping bag, a restarted simulator): a frame more than STAMP_JUMP_S older than the last one,
        or the STAMP_JUMP_FRAMES-th older one in a row (a loop shorter than that; the ones before are dropped as
        out of order)."""
        if t <= 0.0:
            raise ValueError('depth image has stamp 0 (header.stamp not set by its publisher); frame dropped')
        now = self.get_clock().now().nanoseconds * 1e-9
        if now > 0.0 and t - now > self.STAMP_FUTURE_S:
            raise ValueError(f'depth image stamped {t - now:.1f} s ahead of this node\'s clock (limit '
                             f'{self.STAMP_FUTURE_S:g} s); check the publisher\'s clock and use_sim_time; '
                             'frame dropped')
        last = cam.last_stamp
        if last is None or t > last:
            cam.backwards = 0
            return
        cam.backwards = cam.backwards + 1 if t < last else 0
        if last - t <= self.STAMP_JUMP_S and cam.backwards < self.STAMP_JUMP_FRAMES:
            raise ValueError(f'depth image at {t:.3f} s is not newer than the last processed frame at '
                             f'{last:.3f} s: out-of-order or repeated frame dropped')
        cam.backwards = 0
        self.get_logger().warning(f'time jumped back {last - t:.1f} s (bag loop or clock reset): '
                                  'keyframe timing restarts')
        if cam.keyframes is not None:
            cam.keyframes.reset()

    def _error(self, reason: str, cam: Optional[CameraInput] = None, counter: str = 'dropped') -> None:
        """Log ``reason`` (throttled) as the last error and count it in ``cam``'s ``counter``."""
        self.last_error = reason
        if cam is not None:
            cam.last_error = reason
            cam.stats[counter] += 1
        self.get_logger().warning(reason, throttle_duration_sec=2.0)

    # ------------------------------------------------------------------ poses and frames
    def _stamp(self, msg):
        return rclpy.time.Time.from_msg(msg.header.stamp)

    def _pose_ready(self, depth, t: float, settled: bool = True) -> bool:
        """Whether the pose for a depth image can be looked up yet (caller holds the camera's lock). A pose or
        odometry message stamped at the image, or two around it, are; the nearest one within sync_slop_s only once
        no pose that brackets the image can come (one stamped after it arrived: topics deliver in order) or the
        image is ``settled`` (it waited sync_timeout_s): odometry that arrives a few ms after the image took the
        pose of the stamp before."""
        if self.pose_source == 'tf':
            return self.tf_buffer.can_transform(self.map_frame, conv.frame_id(depth.header.frame_id),
                                                self._stamp(depth))
        with self._pose_lock:
            found = self._poses.bracket(t, self.sync_slop_s, self.pose_max_gap_s)
            if found is None or found[1] is not None or settled or conv.stamp_to_sec(found[0].header.stamp) == t:
                return found is not None
            return self._poses.newest > t

    def _missing_pose(self, depth) -> str:
        return (f'transform {self.map_frame} -> {depth.header.frame_id}' if self.pose_source == 'tf'
                else f'{"pose" if self.pose_source == "pose" else "odometry"} message')

    def _lookup(self, target: str, source: str, msg):
        """(4, 4) T_target_source from TF at the stamp of ``msg``, or a ValueError that says why not."""
        target, source = conv.frame_id(target), conv.frame_id(source)
        if self.tf_buffer is None:
            raise ValueError(f'no TF connects them (tf2_ros is not installed)')
        try:
            return conv.pose_msg_to_matrix(self.tf_buffer.lookup_transform(target, source, self._stamp(msg)))
        except ValueError:
            raise
        except Exception as e:  # tf2 raises several exception types
            raise ValueError(f'no TF connects them at {conv.stamp_to_sec(msg.header.stamp):.3f} s ({e})') from None

    def _pose_at(self, cam: CameraInput, depth, t: float) -> np.ndarray:
        """T_W_C (4, 4) of a depth image; ValueError naming the problem (no pose, a pose in another frame that TF
        does not connect, NaN or zero quaternion, ...)."""
        if self.pose_source == 'tf':
            try:
                return self._lookup(self.map_frame, depth.header.frame_id, depth)
            except ValueError as e:
                raise ValueError(f'no transform {self.map_frame} → {depth.header.frame_id} at {t:.3f}: {e}') from None
        with self._pose_lock:
            found = self._poses.bracket(t, self.sync_slop_s, self.pose_max_gap_s)
        if found is None:
            raise ValueError(f'no pose within {self.sync_slop_s} s of the depth image at {t:.3f} (nor two within '
                             f'pose_max_gap_s={self.pose_max_gap_s} s around it)')
        msg, after, a = found
        try:
            T_F_B = conv.pose_msg_to_matrix(msg)
            if after is not None:
                T_F_B = interpolate_pose(T_F_B, conv.pose_msg_to_matrix(after), a)
                cam.stats['poses_interpolated'] += 1
        except ValueError as e:
            raise ValueError(f'camera pose at {t:.3f} s rejected: {e}; frame dropped') from None
        frame = conv.frame_id(msg.header.frame_id)
        T_W_F = np.eye(4)
        if frame != self.map_frame:
            try:
                if not frame:
                    raise ValueError('set header.frame_id')
                T_W_F = self._lookup(self.map_frame, frame, msg)
            except ValueError as e:
                raise ValueError(f'pose frame {frame!r} is not map_frame {self.map_frame!r} and {e}; frame '
                                 'dropped') from None
        return T_W_F @ T_F_B @ self._mount(cam, msg, depth)

    def _mount(self, cam: CameraInput, pose_msg, depth) -> np.ndarray:
        """T_B_C: the camera's mount in the pose's body frame, from TF (body → image frame_id) when TF has it,
        else the ``pose_to_camera`` parameter. Once TF gave a camera's mount, a frame whose mount TF cannot give
        (a moving head's transform not there yet) is dropped with the reason: the parameter's mount, the identity
        by default, would put that frame elsewhere."""
        body = conv.frame_id(self.pose_frame or getattr(pose_msg, 'child_frame_id', ''))
        if self.tf_buffer is not None and body and depth.header.frame_id:
            try:
                T_B_C = self._lookup(body, depth.header.frame_id, depth)
                cam.mount_from_tf = True
                return T_B_C
            except ValueError as e:
                if cam.mount_from_tf:
                    raise ValueError(f'no TF mount {body} -> {depth.header.frame_id} for this frame ({e}), though TF '
                                     'gave it before; frame dropped') from None
                self._note_once(f'mount:{cam.name}', f'{cam.name}: no TF mount {body} -> {depth.header.frame_id} '
                                f'({e}); using pose_to_camera')
        return cam.T_B_C

    def _note_once(self, key: str, text: str, info: bool = False) -> None:
        if key not in self._warned:
            self._warned.add(key)
            (self.get_logger().info if info else self.get_logger().warning)(text)

    # ------------------------------------------------------------------ processing
    def tick(self) -> None:
        """Select keyframes from every camera's queue (:meth:`select`), then integrate all that wait
        (:meth:`integrate_pending`)."""
        self.select()
        self.integrate_pending()

    def select(self) -> None:
        """Take every camera's queued frames, oldest keyframe candidate first: a candidate (the camera's keyframe
        rule, judged and accepted now, not when it is integrated) is validated, decoded and joins the camera's
        pending keyframes; otherwise the newest complete frame is validated and counted and older ones are
        superseded. Cheap (no feature extraction, no map lock): it also runs on a timer of its own while a batch
        of keyframes is integrated, so keyframes that arrive meanwhile wait as frames, not in the input queues
        that newer images push them out of. At most ``max_pending_keyframes`` wait per camera; beyond that one is
        dropped (:func:`thin_out`; counted in ``keyframes_dropped``, logged)."""
        if not self._select_lock.acquire(blocking=False):
            return                                      # the other timer is selecting
        try:
            for cam in self.cameras:
                cam.watch_latched_info(self)
                cam.end_startup(self)
                while True:
                    taken = self._take(cam)
                    if taken is None:
                        break
                    self._select(*taken)
        finally:
            self._select_lock.release()

    def _select(self, cam: CameraInput, frame: Frame, candidate: bool) -> None:
        try:
            mapper = self.mapper
            if mapper is None:
                return
            mapper.validate(frame)                      # reads the config only: no map lock
            cam.last_stamp = frame.stamp_s
            if not candidate:
                return
            cam.keyframes.accept(frame.T_W_C, frame.stamp_s)
            with self._pending_lock:
                cam.pending.append(frame)
                late = []
                while len(cam.pending) > self.max_pending_keyframes:
                    late.append(thin_out(cam.pending, mapper.cfg.keyframes))
            vit = ', lower features.image_short_side' if 'image_short_side' in mapper.extractor.live_settings else ''
            for old in late:
                self._error(f'{cam.name}: {self.max_pending_keyframes} keyframes were waiting to be integrated '
                            f'(max_pending_keyframes): the one at {old.stamp_s:.3f} s was dropped; integration is '
                            f'slower than keyframes come (raise keyframes.min_translation_m{vit} or use a GPU)', cam,
                            'keyframes_dropped')
        except Exception as e:
            self._frame_failed(e, cam)

    def map_replaced(self, how: str) -> None:
        """The map was ``how`` ('cleared', 'loaded'; the caller holds the map lock): keyframes selected before are
        not integrated into it (the next tick fused up to max_pending_keyframes of them into the cleared map), nor
        a batch already taken for integration (:meth:`_integrate`); the last answer's segmentation and objects,
        which were of the map before, are withdrawn (latched: RViz and late subscribers kept them)."""
        with self._pending_lock:
            self._map_epoch += 1
            dropped = [(cam, len(cam.pending)) for cam in self.cameras]
            for cam in self.cameras:
                cam.pending.clear()
        for cam, n in dropped:
            cam.stats['keyframes_dropped'] += n
        if any(n for _, n in dropped):
            self.get_logger().info(f'{sum(n for _, n in dropped)} keyframe(s) selected before the map was {how} '
                                   'were dropped')
        objects = getattr(self, 'objects', None)
        if objects is not None:
            stamp = self.get_clock().now().to_msg()
            self.seg_pub.publish(conv.make_pointcloud2(np.zeros((0, 3), np.float32), None, None, self.map_frame,
                                                       stamp))
            objects.publish([], stamp)

    def integrate_pending(self) -> None:
        """Integrate every camera's pending keyframes, oldest first, as one batch (``Mapper.integrate_keyframes``:
        features in one batch where the source takes batches, each keyframe fused, one purification over all
        they touched) and publish one snapshot: when keyframes come faster than one is integrated, they wait and
        are integrated together, each for less. A batch that fails is retried keyframe by keyframe, so one bad
        keyframe is dropped alone (counted, the reason logged)."""
        with self._pending_lock:
            batch = [(cam, cam.pending.popleft()) for cam in self.cameras for _ in range(len(cam.pending))]
            epoch = self._map_epoch
        batch.sort(key=lambda p: p[1].stamp_s)
        if batch:
            self._integrate(batch, epoch)

    def _integrate(self, batch, epoch: Optional[int] = None) -> None:
        """Integrate ``batch`` ([(camera, Frame)]) taken at map ``epoch`` (None: the current one)."""
        fused = 0
        try:
            with self._lock:
                if self.mapper is None:
                    return
                if epoch not in (None, self._map_epoch):     # selected for the map before it was cleared or loaded
                    for cam, _ in batch:
                        cam.stats['keyframes_dropped'] += 1
                    self.get_logger().info(f'{len(batch)} keyframe(s) selected before the map was replaced were '
                                           'dropped')
                    return
                t0, before = time.perf_counter(), self.mapper.num_keyframes
                try:
                    self.mapper.integrate_keyframes([frame for _, frame in batch])
                finally:
                    fused = self.mapper.num_keyframes - before
                self.publish_snapshot()            # the superpoint vote of the batch's blocks, the copy
                each = (time.perf_counter() - t0) / len(batch)
        except Exception as e:
            if fused == 0 and len(batch) > 1:      # refused before any was fused: find the bad one(s)
                for one in batch:
                    self._integrate([one], epoch)
                return
            for cam, _ in batch[:fused]:           # in the map, though the step after fusion failed
                cam.stats['keyframes'] += 1
            for cam, _ in batch[fused:]:
                self._frame_failed(e, cam)
            return
        for cam, _ in batch:
            cam.stats['keyframes'] += 1
            self._kf_times.append(each)

    def _take(self, cam: CameraInput):
        """(cam, Frame, keyframe candidate) of the camera's oldest queued keyframe candidate, else of its newest
        complete frame; None when there is none or it was dropped (counted, the reason logged)."""
        poses = {}           # id(depth) -> T_W_C of the queued frames the keyframe rule was asked about

        def prefer(depth, t: float) -> bool:
            """A complete queued frame is preferred when it is a keyframe candidate (not when its pose cannot be
            had: it is then judged, and dropped with the reason, only if it is taken as the newest)."""
            try:
                poses[id(depth)] = T_W_C = self._pose_at(cam, depth, t)
            except ValueError:
                return False
            return cam.is_keyframe_candidate(self.mapper, T_W_C, t)

        try:
            simulated = self.mapper.extractor.simulated
            taken = cam.take(self.sync_slop_s, self.sync_timeout_s, simulated, self._pose_ready, self._missing_pose,
                             prefer)
            if taken is None:
                return None
            depth, color, labels, t = taken              # only taken once a valid camera info came
            self._check_stamp(cam, t)
            self._check_registered(cam, depth, color)
            camera = cam.camera                          # converted when its camera info came
            T_W_C = poses.get(id(depth))                 # the pose is looked up once per frame
            if T_W_C is None:
                T_W_C = self._pose_at(cam, depth, t)
            candidate = cam.is_keyframe_candidate(self.mapper, T_W_C, t)  # after _check_stamp, which may restart it
            if cam.compressed and not candidate:         # not a keyframe: never decoded
                cam.stats['frames'] += 1
                cam.stats['not_decoded'] += 1
                cam.last_stamp = t
                return None
            depth_m = conv.depth_to_meters(depth)
            m = self.mapper.cfg.map
            if not np.any((depth_m >= m.min_depth_m) & (depth_m <= m.max_depth_m)):
                raise ValueError(f'depth image at {t:.3f} s has no valid pixel (all 0, NaN, inf, negative or '
                                 f'outside [{m.min_depth_m:g}, {m.max_depth_m:g}] m); frame dropped')
            lab = conv.labels_to_numpy(labels) if labels is not None else None
            frame = Frame(conv.color_to_rgb(color), depth_m, camera, T_W_C, t, lab)
            cam.stats['frames'] += 1
            return cam, frame, candidate
        except Exception as e:
            self._frame_failed(e, cam)
            return None

    def _check_registered(self, cam: CameraInput, depth, color) -> None:
        """Warn once per camera when depth and colour come in different frames: depth must be registered to the
        colour image (one pixel, one point), which a depth image in its own sensor frame is not."""
        if color is None:
            return
        d, c = conv.frame_id(depth.header.frame_id), conv.frame_id(color.header.frame_id)
        if d and c and d != c:
            self._note_once(f'registered:{cam.name}', f"{cam.name}: depth is in frame '{d}' but colour in '{c}': "
                            'depth must be registered to the colour image (RealSense: align_depth.enable:=true and '
                            'its aligned_depth_to_color topic; otherwise depth_image_proc register), or colours and '
                            f"features land on the wrong points; poses are taken for '{d}'")

    def _frame_failed(self, e: Exception, cam: CameraInput) -> None:
        if isinstance(e, (ValueError, RuntimeError)):
            self._error(str(e), cam)
        else:  # never let one bad frame take the node down
            self._error(f'frame failed: {type(e).__name__}: {e}', cam)

    # ------------------------------------------------------------------ snapshots and readers
    def publish_snapshot(self) -> None:
        """Make a snapshot of the map the one readers answer from (caller holds the map lock; called after every
        change of the map or of its query settings). In ``purify.mode: whole``, or with a superpoint vote over the
        whole map (``superpoint_block_vox: 0``), the snapshot is only marked stale: the whole map is re-pooled or
        voted when a reader next needs it (:meth:`snapshot`), not after every keyframe. Otherwise the keyframe's
        blocks are voted here, so readers never wait."""
        m = self.mapper
        if m is not None and not getattr(self._echo, 'on', False):
            self._reflect_vocabulary(m)
        lazy = m is not None and m.purifier is not None and m.purifier.reads_whole_map
        if lazy and self._snapshot is not None:
            self._snapshot_stale = True
            return
        self._snapshot = m.snapshot() if m is not None else None
        self._snapshot_stale = False

    def _reflect_vocabulary(self, m: Mapper) -> None:
        """Keep the ``labels.vocabulary`` parameter on the vocabulary in use, which ``~/set_vocabulary`` and a loaded
        or merged map's label volume change, without applying it again."""
        vocabulary = list(m.cfg.labels.vocabulary) if m.labels is not None else []
        if parameter_value(self, 'labels.vocabulary') == vocabulary:
            return
        self._echo.on = True
        try:
            self.set_parameters([Parameter('labels.vocabulary', Parameter.Type.STRING_ARRAY, vocabulary)])
        finally:
            self._echo.on = False

    def snapshot(self) -> Optional[MapSnapshot]:
        """The latest snapshot of the map (None before configure and after cleanup); no lock needed, except once
        after keyframes in ``purify.mode: whole`` or with a whole-map superpoint vote, where the reader re-pools or
        votes over the map under the lock."""
        if self._snapshot_stale:
            with self._lock:
                if self._snapshot_stale and self.mapper is not None:
                    self._snapshot, self._snapshot_stale = self.mapper.snapshot(), False
        return self._snapshot

    def on_segment(self, request, response):
        """Answer a text query with the matching voxels as a PointCloud2 and split into object instances, from the
        latest snapshot of the map (never waits for a keyframe being integrated)."""
        t0 = time.perf_counter()
        try:
            snap = self.snapshot()
            if snap is None:
                raise ValueError('the node is not configured')
            if snap.size == 0:
                raise ValueError(f'the map is empty: {self._why_empty(snap)}')
            seg = snap.segment(request.text, list(request.negatives), float(request.threshold))
            self.get_logger().debug(f'segment_by_text({self._short(request.text)!r}) answered from map generation '
                                    f'{snap.generation} ({snap.keyframes} keyframes, {snap.size} voxels)')
            objects = self.objects.extract(seg.xyz, seg.scores, self._short(request.text), snap.cfg)
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

    def _why_empty(self, snap) -> str:
        """Why a query finds no voxel in the map of snapshot ``snap``."""
        m = self.mapper
        if m is not None and m.map.size > 0:
            return 'the first keyframe is still being integrated'
        if snap.keyframes == 0:
            return 'no keyframe integrated yet'
        return (f'{snap.keyframes} keyframe(s) integrated, but no voxel is kept: every one was evicted '
                f'(map.max_voxels {snap.cfg.map.max_voxels}, map.clear_radius_m {snap.cfg.map.clear_radius_m:g})')

    @staticmethod
    def _short(text: str, n: int = 60) -> str:
        """``text`` on one line (control characters and whitespace runs as one space), cut to ``n`` characters."""
        text = ' '.join(''.join(c if c.isprintable() else ' ' for c in text[:4 * n]).split())
        return text if len(text) <= n else text[:n - 3] + '...'

    def publish_map(self) -> None:
        """~/map_cloud from the latest snapshot; an empty map (cleared, or an empty map loaded) once as an empty
        cloud, so that RViz and late subscribers of the latched topic do not keep the map before."""
        snap = self.snapshot()
        if snap is None or (snap.size == 0 and not self._map_cloud_shown):
            return
        cloud = snap.map_cloud(self.map_cloud_max_points)
        self.map_pub.publish(conv.make_pointcloud2(cloud.xyz, cloud.rgb, None, self.map_frame,
                                                   self.get_clock().now().to_msg()))
        self._map_cloud_shown = snap.size > 0

    def status(self) -> dict:
        """Counters (totals and per camera) and timings, also published on ~/status as JSON."""
        times = np.array(self._kf_times or [0.0])
        cams = {c.name: c.status() for c in self.cameras}
        total = {k: sum(c[k] for c in cams.values()) for k in ('frames', 'keyframes', 'dropped', 'superseded',
                                                                 'not_decoded', 'pending_depth', 'pending_keyframes',
                                                                 'keyframes_dropped')}
        return {**total, 'voxels': self.mapper.map.size, 'evicted_voxels': self.mapper.evicted_voxels,
                'feature_source': self.mapper.extractor.name, 'feature_space': self.mapper.extractor.space,
                'keyframe_time_mean_s': float(times.mean()), 'keyframe_time_p95_s': float(np.percentile(times, 95)),
                'keyframe_time_max_s': float(times.max()),
                'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
                'last_error': self.last_error, 'cameras': cams,
                'web_view': self.web_view.status() if self.web_view is not None else None}

    def publish_status(self) -> None:
        """~/status (JSON) and /diagnostics (one status for the node: input and keyframe rates, voxels, memory,
        drops, last error; one per camera: its frames, keyframes, drops and last error), 1 Hz."""
        status = self.status()
        self.status_pub.publish(String(data=json.dumps(status)))
        frames, keyframes, dropped, t, per_cam = self._last_counts
        now = time.monotonic()
        dt = max(now - t, 1e-3)
        rates = {'input_rate_hz': round((status['frames'] - frames) / dt, 2),
                 'keyframe_rate_hz': round((status['keyframes'] - keyframes) / dt, 2)}
        lost = (status['dropped'], status['keyframes_dropped'])        # frames refused, keyframes not integrated
        new_drops = [a - b for a, b in zip(lost, dropped)]
        self._last_counts = (status['frames'], status['keyframes'], lost, now,
                             {n: (c['frames'], (c['dropped'], c['keyframes_dropped']))
                              for n, c in status['cameras'].items()})
        if any(new_drops):
            level, message = 'warn', f'{_drops(*new_drops)} in the last {dt:.1f} s: {status["last_error"]}'
        elif status['frames'] == frames:
            level, message = 'warn', 'no input frames (check topics, QoS and the pose source)'
        else:
            level, message = 'ok', f'mapping: {status["voxels"]} voxels'
        stamp = self.get_clock().now().to_msg()
        flat = {k: v for k, v in status.items() if k not in ('cameras', 'web_view')}
        web = status['web_view']
        if web and web['enabled']:
            flat['web_view'] = web['url'] or f'not serving: {web["error"]}'
        node_name = self.get_fully_qualified_name().lstrip('/')  # robot1/ov3d_mapping: one entry per node
        diag = conv.make_diagnostics(f'{node_name}: mapping', level, message, {**rates, **flat}, stamp, node_name)
        for name, c in status['cameras'].items():
            f0, d0 = per_cam.get(name, (0, (0, 0)))
            if (c['dropped'], c['keyframes_dropped']) != d0:
                lv, msg = 'warn', f'{_drops(c["dropped"] - d0[0], c["keyframes_dropped"] - d0[1])}: {c["last_error"]}'
            elif c['frames'] == f0:
                lv, msg = 'warn', 'no input frames'
            else:
                lv, msg = 'ok', f'{c["frames"] - f0} frame(s), {c["keyframes"]} keyframes in all'
            diag.status += conv.make_diagnostics(f'{node_name}: camera {name}', lv, msg, c, stamp, node_name).status
        self.diag_pub.publish(diag)


def _drops(frames: int, keyframes: int) -> str:
    """'2 frame(s) dropped', '3 keyframe(s) dropped (integration is behind)', or both."""
    return ', '.join([f'{frames} frame(s) dropped'] * bool(frames)
                     + [f'{keyframes} keyframe(s) dropped (integration is behind)'] * bool(keyframes))


class MappingNode(MappingInterface, Node):
    """Builds the open-vocabulary map and answers ``segment_by_text`` (configured and active at once)."""

    def __init__(self, **kwargs):
        super().__init__('ov3d_mapping', **kwargs)
        self._declare_parameters()
        self._configure()
        self._activate()


def _drain(executor: MultiThreadedExecutor, node, timeout_s: float) -> None:
    """Wait for the callbacks already handed to the executor's thread pool, while the executor is still whole.

    ``MultiThreadedExecutor.shutdown`` (rclpy 9) destroys the executor's guard condition before it waits for its
    threads, so a callback still queued in the pool fails when it signals that guard ("cannot use Destroyable
    because destruction was requested") and the failure is printed as an exception never retrieved. Waiting
    here first lets every queued callback run to its end; a callback that did fail is logged with its reason.
    """
    pending = list(getattr(executor, '_futures', ()))    # rclpy keeps the handlers it submitted there
    end = time.monotonic() + timeout_s
    for future in pending:
        while not future.done() and time.monotonic() < end:
            time.sleep(0.01)
        if future.done() and not future.cancelled() and future.exception() is not None and node is not None:
            node.get_logger().error(f'a callback failed during shutdown: {future.exception()}')


GIL_SWITCH_S = 0.0005
"""The node process's interpreter switch interval (``sys.setswitchinterval``; Python's default is 5 ms). The
integration thread runs long chains of small torch operations: each releases the GIL while it computes, then
takes it back for the Python between them. A service call, a subscription or the frame selector waiting for
the GIL meanwhile got it only at the next forced switch, up to 5 ms later, many times per callback. The 30 Hz
stream of ``benchmarks/bm_node.py`` (one thread, 60 s, three runs each way on this 2-core host):
``/segment_by_text`` took 118-141 ms in the node's handler (p50) against 221 and 376 ms (and 330 ms round trip
in a run that did not record the handler's time), 1 219-1 246 frames were paired and judged against 915-1 036,
and keyframes were integrated as fast (0.75-0.79 against 0.77-0.83 s per keyframe)."""


def spin(node_factory, args=None) -> int:
    """Init, build the node, spin a multi-threaded executor until Ctrl-C or shutdown; 1 (and a FATAL line with
    the reason) if the node cannot start. Sets the process's GIL switch interval (:data:`GIL_SWITCH_S`)."""
    node = executor = None
    stop = threading.Event()
    sys.setswitchinterval(GIL_SWITCH_S)

    def request_stop(signum, frame) -> None:
        # The first SIGINT / SIGTERM only asks the loop below to end between two spins. Raised at whatever line
        # the main thread is on, a KeyboardInterrupt can land inside rclpy building a task for a callback and
        # leave a half-made Task, whose finaliser then prints a traceback at exit. A second signal does raise
        # (a start-up that hangs can still be interrupted).
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    try:
        # SIGINT/SIGTERM do not shut the context down under running callbacks (which then fail with "cannot use
        # Destroyable because destruction was requested"): the executor below lets them finish with a live
        # context, then the node and the context go.
        rclpy.init(args=args, signal_handler_options=SignalHandlerOptions.NO)
        signal.signal(signal.SIGINT, request_stop)
        signal.signal(signal.SIGTERM, request_stop)
        node = node_factory()
        executor = MultiThreadedExecutor(num_threads=4)
        executor.add_node(node)
        while rclpy.ok() and not stop.is_set():
            try:
                executor.spin_once(timeout_sec=0.1)     # returns often, so a stop request ends it promptly
                # between two waits (see MappingInterface.destroy_soon), and what callbacks use once none runs
                node.destroy_doomed(busy=any(not f.done() for f in getattr(executor, '_futures', ())))
            except ExternalShutdownException:
                raise
            except Exception as e:  # a callback that raised: say so, keep the node and its map
                node.get_logger().error(f'a callback failed: {e!r}; the node keeps running')
    except (KeyboardInterrupt, SystemExit, ExternalShutdownException):
        pass
    except Exception as e:  # a configuration error: say why and exit non-zero
        msg = f'ov3d_mapping cannot start: {e}'
        (node.get_logger().fatal(msg) if node else rclpy.logging.get_logger('ov3d_mapping').fatal(msg))
        return 1
    finally:
        # Let running and queued callbacks finish before their node goes: destroying publishers under a running
        # timer or service callback fails it with "cannot use Destroyable because destruction was requested".
        if executor is not None:
            _drain(executor, node, timeout_s=30.0)
            executor.shutdown()
        if node is not None:
            # no callback runs any more: with autosave on, the changes since the last autosave are saved now, not
            # lost with the process (they were, on Ctrl-C and SIGTERM)
            node.save_unsaved('shutdown')
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


def main(args=None) -> int:
    return spin(MappingNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
