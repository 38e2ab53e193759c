"""Declare the core config dataclasses as ROS parameters (``<section>.<field>``), read them back, and say which
parameters can change while the node runs.

Every parameter is either *live* (``LIVE``: a ``ros2 param set`` is validated by :func:`check` and applied by the
node) or read-only (``ParameterDescriptor.read_only``, with the reason at the end of its description; a set is
refused). ``READ_ONLY_REASONS`` gives the reason per parameter or section; anything else the node declares is
read at start only (:data:`AT_START`).
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Dict, Optional

from rcl_interfaces.msg import ParameterDescriptor, ParameterType
from rclpy.exceptions import ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ov3d_ros.core import config
from ov3d_ros.core.config import Check, MapperConfig, at_least, constrained, field_docs, finite, one_of
from ov3d_ros.core.features.clip_dense import DENSE_MODES, DTYPES
from ov3d_ros.core.features.simulated import PRESETS

_TYPES = {bool: ParameterType.PARAMETER_BOOL, int: ParameterType.PARAMETER_INTEGER,
          float: ParameterType.PARAMETER_DOUBLE, str: ParameterType.PARAMETER_STRING,
          list: ParameterType.PARAMETER_STRING_ARRAY}

# ------------------------------------------------------------------------------------------ live / read-only
LIVE = frozenset({
    'map.min_depth_m', 'map.max_depth_m', 'map.pixel_stride', 'map.max_voxels', 'map.clear_radius_m',
    'map.compress_update',
    'keyframes.min_translation_m', 'keyframes.min_rotation_deg', 'keyframes.max_interval_s',
    'keyframes.min_interval_s',
    'query.templates', 'query.repetitions', 'query.default_negatives', 'query.temperature',
    'query.default_threshold', 'query.min_observations',
    'purify.enabled', 'purify.affinity', 'purify.checkpoint', 'purify.radius_vox', 'purify.iterations',
    'purify.scale', 'purify.sigma_color', 'purify.sigma_normal', 'purify.sigma_distance_vox', 'purify.mode',
    'purify.margin_vox', 'purify.pool_dim', 'purify.superpoint_k', 'purify.superpoint_blend',
    'purify.superpoint_min_vox', 'purify.superpoint_block_vox', 'purify.superpoint_weighted',
    'purify.superpoint_convex',
    'labels.vocabulary', 'labels.smoothing_radius_vox', 'labels.min_component_vox', 'labels.feature_prior',
    'sync_slop_s', 'sync_timeout_s', 'pose_max_gap_s', 'tick_rate_hz', 'map_publish_rate_hz', 'map_cloud_max_points',
    'max_pending_keyframes', 'pose_to_camera', 'use_sim_time',
    'features.dense_mode', 'features.image_short_side', 'features.window_px', 'features.window_stride_px',
    'web_view.enabled', 'web_view.host', 'web_view.port', 'web_view.refresh_s',
})
"""Parameters a ``ros2 param set`` changes while the node runs."""

AT_START = 'read at start; restart the node to change it'
READ_ONLY_REASONS: Dict[str, str] = {
    'map.voxel_size_m': 'the map is built on this voxel grid; a saved map keeps its own',
    'map.initial_capacity': 'allocated at start',
    'map.device': 'the model and the map live on this device',
    'map.compress_dim': 'stored features have this width; a new width needs a new map',
    'map.compress_basis': 'the map starts in this basis; ~/clear_map starts again from it',
    'features.compile': 'the compile would hold up the next keyframe (about 40 s per image size on a 2-core CPU); '
                        'set it at start',
    'features': 'the feature model is loaded at start',
    'labels.temperature': "weighs every keyframe's class evidence as it comes; set it at start",
    'map_frame': AT_START + ' (every output and saved map is in it)',
    'pose_source': AT_START + ' (it decides the subscriptions)',
    'pose_frame': AT_START,
    'rectified_images': AT_START + ' (the map is built with these rays)',
    'cameras': AT_START + ' (it decides the subscriptions)',
    'color_transport': AT_START + ' (it decides the subscriptions)',
    'depth_transport': AT_START + ' (it decides the subscriptions)',
    'input_qos': AT_START + ' (it decides the subscriptions)',
    'pose_qos': AT_START + ' (it decides the subscription)',
    'queue_size': AT_START,
}


def read_only_reason(name: str) -> Optional[str]:
    """Why ``name`` cannot change while the node runs (None for a live parameter)."""
    if name in LIVE:
        return None
    return READ_ONLY_REASONS.get(name) or READ_ONLY_REASONS.get(name.split('.')[0]) or AT_START


def _describe(name: str, description: str, **kw) -> ParameterDescriptor:
    """The descriptor of ``name``: its description (with the read-only reason) and the values it takes
    (``additional_constraints``, shown by ``ros2 param describe``)."""
    reason = read_only_reason(name)
    if reason:
        description = f'{description} [read-only: {reason}]'
    return ParameterDescriptor(description=description, read_only=bool(reason),
                               additional_constraints=getattr(CHECKS.get(name), 'constraint', ''), **kw)


# ------------------------------------------------------------------------------------------ validation
_port = constrained('a port number in [0, 65535] (0 = any free port)',
                    lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 65535)
_host = constrained("an address or host name, e.g. '127.0.0.1' or '0.0.0.0'", lambda v: v.strip() and v == v.strip())


def _pose_to_camera(v) -> Optional[str]:
    if len(v) == 0 or len(v) % 7 or not all(finite(x) for x in v):
        return 'must be 7 finite numbers (x y z qx qy qz qw) per camera, or 7 for all cameras'
    for i in range(0, len(v), 7):
        n = math.sqrt(sum(x * x for x in v[i + 3:i + 7]))
        if not 0.9 <= n <= 1.1:
            return f'quaternion {list(v[i + 3:i + 7])} has norm {n:.3g}; expected a unit quaternion'
    return None


_pose_to_camera.constraint = '7 finite numbers (x y z, unit quaternion qx qy qz qw) per camera, or 7 for all'


def _rate(off: bool) -> Check:
    """A timer's rate: at least one tick in 1000 s (rclpy's timers take periods up to about 292 years, but a
    rate of 1e-12 Hz makes a timer that never fires, and a smaller one none at all), at most 1 kHz."""
    return constrained(('0 (off) or ' if off else '') + 'a rate in [0.001, 1000] Hz',
                       lambda v: finite(v) and (off and v == 0 or 1e-3 <= v <= 1e3))


CHECKS: Dict[str, Check] = {
    **config.CHECKS,
    'features.source': one_of('clip', 'simulated'),
    'features.dense_mode': one_of(*DENSE_MODES), 'features.dtype': one_of('auto', *DTYPES),
    'features.sim_preset': one_of(*PRESETS, 'custom'),
    'sync_slop_s': at_least(0.0, True), 'sync_timeout_s': at_least(0.0, True), 'pose_max_gap_s': at_least(0.0),
    'tick_rate_hz': _rate(off=False), 'map_publish_rate_hz': _rate(off=True), 'label_publish_rate_hz': _rate(off=True),
    'autosave_period_s': constrained('0 (off) or a period in [0.001, 1e6] s',
                                     lambda v: finite(v) and (v == 0 or 1e-3 <= v <= 1e6)),
    'map_cloud_max_points': at_least(0), 'queue_size': at_least(1), 'max_pending_keyframes': at_least(1),
    'pose_source': one_of('tf', 'pose', 'odometry'), 'input_qos': one_of('sensor_data', 'reliable'),
    'pose_qos': one_of('best_effort', 'reliable'),
    'color_transport': one_of('raw', 'compressed'), 'depth_transport': one_of('raw', 'compressedDepth'),
    'pose_to_camera': _pose_to_camera,
    'web_view.host': _host, 'web_view.port': _port, 'web_view.refresh_s': at_least(0.0, True),
}
"""Per parameter: value -> None, or what is wrong with it."""


def check(name: str, value) -> Optional[str]:
    """What is wrong with ``value`` for parameter ``name`` ('map.max_depth_m must be ...'), or None: the core's
    checks of the config fields (:data:`ov3d_ros.core.config.CHECKS`), narrowed for the node, and the node's own."""
    return config.check(name, value, CHECKS)


def check_node(node: Node) -> None:
    """Raise ValueError naming every declared parameter of ``node`` whose current value is invalid."""
    problems = [p for p in (check(n, parameter_value(node, n)) for n in CHECKS if node.has_parameter(n)) if p]
    if problems:
        raise ValueError('; '.join(problems))


# ------------------------------------------------------------------------------------------ declare / read
def declare_config(node: Node, cfg: MapperConfig) -> None:
    """Declare one parameter per config field, with its docstring as the description (and the read-only
    reason where it cannot change live)."""
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        docs = field_docs(type(sub))
        for f in fields(sub):
            name = f'{section.name}.{f.name}'
            if node.has_parameter(name):
                continue
            default = getattr(sub, f.name)
            desc = _describe(name, docs.get(f.name, ''), type=_TYPES[type(default)])
            # rclpy cannot tell the type of an empty list: declare it typed and unset (read back as [])
            value = Parameter.Type.STRING_ARRAY if default == [] else default
            node.declare_parameter(name, value, desc)


def parameter_value(node: Node, name: str):
    """The current value of a declared parameter (a typed, unset list reads back as [])."""
    try:
        value = node.get_parameter(name).value
    except ParameterUninitializedException:
        return []
    return list(value) if isinstance(value, (list, tuple)) else value


def read_config(node: Node) -> MapperConfig:
    """Build a MapperConfig from the node's current parameter values."""
    cfg = MapperConfig()
    for section in fields(cfg):
        sub = getattr(cfg, section.name)
        for f in fields(sub):
            setattr(sub, f.name, parameter_value(node, f'{section.name}.{f.name}'))
    return cfg


def declare(node: Node, name: str, default, description: str):
    """Declare a node-level parameter with a description (read-only unless it is in LIVE) and return its value.
    A parameter declared already (a lifecycle node configured again) keeps its value."""
    if node.has_parameter(name):
        return parameter_value(node, name)
    value = node.declare_parameter(name, default, _describe(name, description)).value
    problem = check(name, value)
    if problem:                     # declared after check_node ran (the persistence and label-volume interfaces)
        raise ValueError(problem)
    return value


def mark_read_only(node: Node) -> None:
    """Make every declared parameter that is not live read-only, with the reason in its description (for
    parameters declared elsewhere, e.g. by the persistence and label-volume interfaces)."""
    for name in node.list_parameters([], 0).names:
        reason = read_only_reason(name)
        desc = node.describe_parameter(name)
        if reason and not desc.read_only and name != 'start_type_description_service':
            desc.read_only = True
            desc.description = f'{desc.description} [read-only: {reason}]'
            node.set_descriptor(name, desc)
