"""Declare the core config dataclasses as ROS parameters (``<section>.<field>``), read them back, and say which
parameters can change while the node runs.

Every parameter is either *live* (``LIVE``: a ``ros2 param set`` is validated by :func:`check` and applied by the
node) or read-only (``ParameterDescriptor.read_only``, with the reason at the end of its description; a set is
refused; on a lifecycle node from configure to cleanup: :func:`mark_read_only`, :func:`mark_writable`).
``READ_ONLY_REASONS`` gives the reason per parameter or section; anything else the node declares is read at start
only (:data:`AT_START`).

A parameter whose check takes values in a finite interval (its ``bounds``: ``between``, the timer rates, the port)
carries it as the descriptor's range (``floating_point_range`` or ``integer_range``), which ``ros2 param describe``
shows (Min value, Max value) and rqt_reconfigure draws as a slider; the check stays the authority and gives the
reason of a refusal (:func:`range_refusal`, :func:`_declare`).
"""
from __future__ import annotations

import copy
import math
from dataclasses import fields
from typing import Dict, Optional

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.exceptions import InvalidParameterValueException, ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from ov3d_ros.core import config
from ov3d_ros.core.config import Check, MapperConfig, at_least, between, constrained, field_docs, finite, one_of
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


def _describe(name: str, description: str, type_: int) -> ParameterDescriptor:
    """The descriptor of ``name`` (of ParameterType ``type_``): its description (with the read-only reason) and
    the values it takes (``additional_constraints`` and the range, shown by ``ros2 param describe``)."""
    reason = read_only_reason(name)
    if reason:
        description = f'{description} [read-only: {reason}]'
    return ParameterDescriptor(description=description, read_only=bool(reason), type=type_,
                               additional_constraints=getattr(CHECKS.get(name), 'constraint', ''),
                               **_range(name, type_))


def _range(name: str, type_: int) -> dict:
    """The descriptor's range of ``name`` from the ``bounds`` of its check: a ``floating_point_range`` for a DOUBLE
    parameter, an ``integer_range`` (the whole numbers in the bounds, step 1) for an INTEGER one; none for a check
    without finite bounds (``at_least``: a slider cannot reach infinity)."""
    bounds = getattr(CHECKS.get(name), 'bounds', None)
    if bounds is None:
        return {}
    lo, hi = bounds
    if type_ == ParameterType.PARAMETER_DOUBLE:
        return {'floating_point_range': [FloatingPointRange(from_value=float(lo), to_value=float(hi), step=0.0)]}
    if type_ == ParameterType.PARAMETER_INTEGER:
        return {'integer_range': [IntegerRange(from_value=math.ceil(lo), to_value=math.floor(hi), step=1)]}
    return {}


def _declare(node: Node, name: str, value, desc: ParameterDescriptor) -> Parameter:
    """``node.declare_parameter``. The parameter's override (a params file, ``-p``) is taken as a live set of it
    is: an integer for a number (``map: {max_depth_m: 4}``) as the number (:func:`as_type`;
    rclpy stopped the node: "Trying to set parameter 'map.max_depth_m' to '4' of type 'INTEGER', expecting type
    'DOUBLE'"), a value of another type refused in words (ValueError: "map.max_depth_m takes a number, got
    'far'", :func:`type_refusal`). rclpy refuses a value (an override) outside the descriptor's range with its own
    words, for this parameter alone ('Invalid parameter value (1.5) for parameter. Reason: Parameter
    query.default_threshold out of range Min: 0.0, Max: 1.0, value: 1.5: query.default_threshold'): such a value
    is declared without the range, and the check names it with every other bad value (:func:`check_node`,
    :func:`declare`)."""
    override = node._parameter_overrides.get(name)     # rclpy keeps the overrides there (no public accessor)
    if override is not None and override.type_ != _T.NOT_SET:
        override = as_type(override, desc.type)
        problem = type_refusal(override, desc)
        if problem:
            raise ValueError(problem)
        value = override.value
    try:
        return node.declare_parameter(name, value, desc, ignore_override=True)
    except InvalidParameterValueException:
        if not (desc.floating_point_range or desc.integer_range):
            raise
        desc.floating_point_range, desc.integer_range = [], []
        return node.declare_parameter(name, value, desc, ignore_override=True)


# ------------------------------------------------------------------------------------------ validation
_port = between(0, 65535, 'a port number', '(0 = any free port)')
_frame = constrained("a frame id, e.g. 'map' (a leading '/' is dropped, as tf2 does)",
                     lambda v: v.lstrip('/') and v == v.strip())
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
    return between(1e-3, 1e3, 'a rate', 'Hz', off=off)


CHECKS: Dict[str, Check] = {
    **config.CHECKS,
    'features.source': one_of('clip', 'simulated'),
    'features.dense_mode': one_of(*DENSE_MODES), 'features.dtype': one_of('auto', *DTYPES),
    'features.sim_preset': one_of(*PRESETS, 'custom'),
    'sync_slop_s': at_least(0.0, True), 'sync_timeout_s': at_least(0.0, True), 'pose_max_gap_s': at_least(0.0),
    'tick_rate_hz': _rate(off=False), 'map_publish_rate_hz': _rate(off=True), 'label_publish_rate_hz': _rate(off=True),
    'autosave_period_s': between(1e-3, 1e6, 'a period', 's', off=True),
    'map_cloud_max_points': at_least(0), 'queue_size': at_least(1), 'max_pending_keyframes': at_least(1),
    'pose_source': one_of('tf', 'pose', 'odometry'), 'input_qos': one_of('sensor_data', 'reliable'),
    'pose_qos': one_of('best_effort', 'reliable'),
    'color_transport': one_of('raw', 'compressed'), 'depth_transport': one_of('raw', 'compressedDepth'),
    'pose_to_camera': _pose_to_camera, 'map_frame': _frame,
    'web_view.host': _host, 'web_view.port': _port, 'web_view.refresh_s': between(0.05, 3600.0, 'a period', 's'),
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


_T = Parameter.Type
_TYPE_WORDS = {_T.BOOL: 'true or false', _T.INTEGER: 'an integer', _T.DOUBLE: 'a number', _T.STRING: 'a string',
               _T.BYTE_ARRAY: 'a list of bytes', _T.BOOL_ARRAY: 'a list of true/false',
               _T.INTEGER_ARRAY: 'a list of integers', _T.DOUBLE_ARRAY: 'a list of numbers',
               _T.STRING_ARRAY: 'a list of strings'}
_ARRAYS = (_T.BYTE_ARRAY, _T.BOOL_ARRAY, _T.INTEGER_ARRAY, _T.DOUBLE_ARRAY, _T.STRING_ARRAY)


def as_type(p: Parameter, declared: int) -> Parameter:
    """``p`` converted to the ParameterType ``declared`` where that is what a user means: an integer for a number
    (``ros2 param set /ov3d_mapping map.max_depth_m 4``, ``map: {max_depth_m: 4}`` in a params file), integers for
    a list of numbers, and an empty list of any type (``ros2 param set ... labels.vocabulary "[]"`` sends a list of
    booleans). Else ``p`` as it is (:func:`type_refusal` says why it does not fit)."""
    if declared == _T.DOUBLE and p.type_ == _T.INTEGER:
        return Parameter(p.name, _T.DOUBLE, float(p.value))
    if declared == _T.DOUBLE_ARRAY and p.type_ == _T.INTEGER_ARRAY:
        return Parameter(p.name, _T.DOUBLE_ARRAY, [float(v) for v in p.value])
    if declared in _ARRAYS and p.type_ in _ARRAYS and declared != p.type_ and len(p.value) == 0:
        return Parameter(p.name, _T(declared), [])
    return p


def as_declared(node: Node, params) -> list:
    """``params`` with each value converted to its parameter's declared type where that is what is meant
    (:func:`as_type`; an undeclared one as it is). Others are left as they are (rclpy refuses them,
    :func:`range_refusal` in words)."""
    return [as_type(p, node.describe_parameter(p.name).type) if node.has_parameter(p.name) else p for p in params]


def type_refusal(p: Parameter, desc: ParameterDescriptor) -> Optional[str]:
    """Why ``p`` does not fit the type of the parameter described by ``desc`` ('web_view.port takes an integer,
    got 8080.5': rclpy names the types by number), or None."""
    if p.type_.value != desc.type and not desc.dynamic_typing and desc.type in _TYPE_WORDS:
        return f'{p.name} takes {_TYPE_WORDS[_T(desc.type)]}, got {p.value!r}'
    return None


def range_refusal(node: Node, params) -> Optional[SetParametersResult]:
    """The refusal of a set of ``params`` in the check's words ('query.default_threshold must be a number in [0, 1],
    got 1.5') when one with a range in its descriptor has a value its check refuses; else None (the set goes on to
    rclpy and the on-set callback). rclpy checks a set against the descriptors' ranges before any on-set callback
    and refuses a value outside them in its own words ('Parameter query.default_threshold out of range Min: 0.0,
    Max: 1.0, value: 1.5'): a node answers with this first. A value of another type than its parameter's is
    refused in words too ('web_view.port takes an integer, got 8080.0': rclpy names the types by number). A
    parameter that rclpy refuses first for another reason (undeclared, read-only) is left to rclpy."""
    for p in params:
        if not node.has_parameter(p.name):
            return None
        desc = node.describe_parameter(p.name)
        if desc.read_only:
            return None
        problem = type_refusal(p, desc)
        if not problem and (desc.floating_point_range or desc.integer_range):
            problem = check(p.name, p.value)
        if problem:
            return SetParametersResult(successful=False, reason=problem)
    return None


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
            desc = _describe(name, docs.get(f.name, ''), _TYPES[type(default)])
            # rclpy cannot tell the type of an empty list: declare it typed and unset (read back as [])
            value = Parameter.Type.STRING_ARRAY if default == [] else default
            _declare(node, name, value, desc)


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
    """Declare a node-level parameter with a description (read-only unless it is in LIVE) and return its value;
    ValueError for a value its check refuses. A parameter declared already (a lifecycle node configured again)
    keeps its value, checked again."""
    if node.has_parameter(name):
        value = parameter_value(node, name)
    else:
        desc = _describe(name, description, Parameter.Type.from_parameter_value(default).value)
        value = _declare(node, name, default, desc).value
    problem = check(name, value)    # also when declared already: the value is checked again where it is read
    if problem:
        raise ValueError(problem)
    return value


def mark_read_only(node: Node) -> None:
    """Make every declared parameter that is not live read-only, with the reason in its description (a lifecycle
    node's, which :func:`mark_writable` made writable while it was unconfigured, as it configures)."""
    for name in node.list_parameters([], 0).names:
        reason = read_only_reason(name)
        desc = copy.copy(node.describe_parameter(name))    # rclpy's own: set_descriptor checks it is not read-only
        if reason and not desc.read_only and name != 'start_type_description_service':
            desc.read_only = True
            desc.description = f'{desc.description} [read-only: {reason}]'
            node.set_descriptor(name, desc)


def mark_writable(node: Node) -> None:
    """Undo :func:`mark_read_only` (and the read-only declaration, :func:`_describe`): every parameter that is
    read-only for its reason here takes a set again. A lifecycle node, unconfigured (constructed, cleaned up),
    takes every parameter; its next configure reads them. rclpy's ``set_descriptor`` refuses a read-only
    parameter: the descriptor is replaced where rclpy keeps it (``_descriptors``, no public way)."""
    for name in node.list_parameters([], 0).names:
        reason = read_only_reason(name)
        desc = copy.copy(node.describe_parameter(name))
        suffix = f' [read-only: {reason}]'
        if reason and desc.read_only and desc.description.endswith(suffix):
            desc.read_only = False
            desc.description = desc.description[:-len(suffix)]
            node._descriptors[name] = desc
