import subprocess
import sys
import time

import pytest
import rclpy
from rclpy.parameter import Parameter

from ov3d_ros.core.config import MapperConfig
from ov3d_ros.ros.params import declare_config, read_config


def test_config_round_trips_through_ros_parameters():
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node('params_test', context=ctx, parameter_overrides=[
            Parameter('map.voxel_size_m', value=0.1), Parameter('features.source', value='simulated'),
            Parameter('query.default_negatives', value=['wall', 'door']),
            Parameter('labels.vocabulary', value=['chair', 'sofa'])])
        declare_config(node, MapperConfig())
        cfg = read_config(node)
        assert cfg.map.voxel_size_m == 0.1
        assert cfg.features.source == 'simulated'
        assert cfg.query.default_negatives == ['wall', 'door']
        assert cfg.labels.vocabulary == ['chair', 'sofa']
        assert cfg.map.max_depth_m == MapperConfig().map.max_depth_m
        unset = rclpy.create_node('params_test2', context=ctx)   # an empty list default reads back as []
        declare_config(unset, MapperConfig())
        assert read_config(unset).labels.vocabulary == []
        unset.destroy_node()
        desc = node.describe_parameter('map.voxel_size_m')
        assert 'voxel' in desc.description
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_core_never_imports_ros():
    code = ('import sys, ov3d_ros.core.mapper, ov3d_ros.core.features, ov3d_ros.core.io, ov3d_ros.sim; '
            'bad = [m for m in sys.modules if m.split(".")[0] in ("rclpy", "sensor_msgs", "rcl_interfaces")]; '
            'print(bad); sys.exit(1 if bad else 0)')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_live_and_read_only_parameters_are_declared_as_such():
    from dataclasses import fields
    from ov3d_ros.ros.params import CHECKS, LIVE, check
    cfg = MapperConfig()
    names = {f'{s.name}.{f.name}' for s in fields(cfg) for f in fields(getattr(cfg, s.name))}
    node_level = {'sync_slop_s', 'sync_timeout_s', 'pose_max_gap_s', 'tick_rate_hz', 'map_publish_rate_hz',
                  'map_cloud_max_points', 'max_pending_keyframes',
                  'pose_to_camera', 'use_sim_time', 'web_view.enabled', 'web_view.host', 'web_view.port',
                  'web_view.refresh_s'}
    assert LIVE - names == node_level                   # no misspelt live name
    # the live features.* parameters are those the clip source takes while mapping; the others take none
    from ov3d_ros.core.features.clip_dense import OpenClipDenseExtractor
    from ov3d_ros.core.features.simulated import SimulatedLabelFeatures
    assert {n for n in LIVE if n.startswith('features.')} == \
        {f'features.{k}' for k in OpenClipDenseExtractor.live_settings}
    assert not SimulatedLabelFeatures.live_settings
    assert {n for n in CHECKS if '.' in n} <= names | node_level
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node('params_live', context=ctx)
        declare_config(node, MapperConfig())
        voxel, threshold = node.describe_parameters(['map.voxel_size_m', 'query.default_threshold'])
        assert voxel.read_only and voxel.description.endswith('[read-only: the map is built on this voxel grid; '
                                                              'a saved map keeps its own]')
        assert not threshold.read_only
        # the values each takes, for `ros2 param describe` (Constraints:) and rqt
        assert (threshold.additional_constraints, voxel.additional_constraints) == ('a number in [0, 1]',
                                                                                   'a finite number > 0')
        assert node.describe_parameter('features.dense_mode').additional_constraints == \
            "one of 'naclip', 'sclip', 'clearclip', 'maskclip'"
        assert node.describe_parameter('map.device').additional_constraints == ''       # no check: none said
        result = node.set_parameters([Parameter('map.voxel_size_m', value=0.1)])[0]
        assert not result.successful and 'read-only' in result.reason
        # parameters declared one by one (after the start-up check of the rest) are checked as they are declared
        from ov3d_ros.ros.params import declare
        with pytest.raises(ValueError, match=r'autosave_period_s must be 0 \(off\) or a period in'):
            declare(node, 'autosave_period_s', 1e12, 'Save the map this often.')
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)
    assert check('query.default_threshold', 0.99) is None
    assert check('query.default_threshold', float('nan')) == \
        'query.default_threshold must be a number in [0, 1], got nan'
    assert check('pose_to_camera', [0.0] * 6 + [1.0]) is None
    assert 'unit quaternion' in check('pose_to_camera', [0.0] * 7)
    assert 'one of' in check('purify.mode', 'sometimes')
    assert check('query.default_negatives', ['wall', 'floor']) is None
    assert 'none blank' in check('query.default_negatives', ['wall', ' '])      # every query would fail on it
    assert '1 to 32 negatives' in check('query.default_negatives', [])         # so would every query without any
    # a template is filled with str.format: one {} and no other field (which would fail every query)
    assert check('query.templates', ['a photo of a {}.', '{{literal}} {}']) is None
    for bad in (['a {} in the {room}.'], ['{0}'], ['{}{}'], ['{:>9}'], ['a { {}'], ['none']):
        assert 'exactly one {} for the text' in check('query.templates', bad), bad
    assert check('purify.pool_dim', 32) is None and 'purify.pool_dim' in check('purify.pool_dim', -1)
    # a live radius of 20 made every query or re-pool allocate the (voxels, ~33 000) neighbour rows: out of memory
    assert check('purify.radius_vox', 3) is None and check('labels.smoothing_radius_vox', 0) is None
    assert check('purify.radius_vox', 20) == 'purify.radius_vox must be a number in [1, 3], got 20'
    assert check('labels.smoothing_radius_vox', 4) == 'labels.smoothing_radius_vox must be a number in [0, 3], got 4'
    assert check('web_view.port', 0) is None and 'port number' in check('web_view.port', 65536)
    assert 'port number' in check('web_view.port', True) and 'host name' in check('web_view.host', ' ')
    # map_frame names the frame of every output: '/map' is taken as tf2 takes it ('map'); '' or '/' names none
    assert check('map_frame', 'map') is None and check('map_frame', '/map') is None
    assert all('map_frame must be a frame id' in check('map_frame', bad) for bad in ('', '/', ' map'))
    # a redraw period of 1e-300 s spun a thread at full speed next to the mapping
    assert check('web_view.refresh_s', 0.05) is None and check('web_view.refresh_s', 3600.0) is None
    for bad in (0.0, 1e-300, 1e9):
        assert check('web_view.refresh_s', bad) == \
            f'web_view.refresh_s must be a period in [0.05, 3600] s, got {bad!r}'
    assert check('pose_max_gap_s', 0.0) is None and 'pose_max_gap_s' in check('pose_max_gap_s', -0.1)
    # timer rates: a timer of 1e-12 Hz never fires (and rclpy cannot make one of 1e-13 Hz)
    for name, value, ok in [('tick_rate_hz', 20.0, True), ('tick_rate_hz', 1e-3, True), ('tick_rate_hz', 0.0, False),
                            ('tick_rate_hz', 1e-12, False), ('tick_rate_hz', 1e4, False),
                            ('map_publish_rate_hz', 0.0, True), ('map_publish_rate_hz', 1e-12, False),
                            ('label_publish_rate_hz', -1.0, False), ('autosave_period_s', 0.0, True),
                            ('autosave_period_s', 60.0, True), ('autosave_period_s', -5.0, False)]:
        assert (check(name, value) is None) == ok, (name, value)
    assert 'one of' in check('pose_qos', 'sometimes') and check('pose_qos', 'reliable') is None
    # every simulated preset and dense mode of the core is accepted, and no other value
    for preset in ('clean', 'default', 'hard', 'clip', 'custom'):
        assert check('features.sim_preset', preset) is None
    assert 'one of' in check('features.sim_preset', 'easy')
    for mode in ('naclip', 'sclip', 'clearclip', 'maskclip'):
        assert check('features.dense_mode', mode) is None
    for dtype in ('auto', 'float32', 'float16', 'bfloat16'):
        assert check('features.dtype', dtype) is None
    assert 'one of' in check('features.dtype', 'fp16')


def test_bounded_checks_give_their_parameters_a_range():
    """A check with finite bounds (between, the timer rates, the port) gives its parameter's descriptor the range
    that ``ros2 param describe`` shows (Min value, Max value) and rqt draws as a slider: a floating_point_range for a
    DOUBLE, an integer_range for an INTEGER; a check with an open end (at_least) gives none."""
    from rcl_interfaces.msg import ParameterType
    from ov3d_ros.core.config import at_least, between
    from ov3d_ros.ros.params import CHECKS, check, check_node, declare
    types = {float: ParameterType.PARAMETER_DOUBLE, int: ParameterType.PARAMETER_INTEGER}
    assert between(0.0, 1.0).bounds == (0.0, 1.0) and between(1, 64).bounds == (1, 64)
    assert between(1e-3, 1e3, off=True).bounds == (0, 1e3) and at_least(0.0).bounds is None
    # the bounds are those of the values the check takes, and its text stays as it was
    for name in ('map.pixel_stride', 'query.default_threshold', 'purify.radius_vox', 'labels.smoothing_radius_vox',
                 'tick_rate_hz', 'map_publish_rate_hz', 'autosave_period_s', 'web_view.port'):
        lo, hi = CHECKS[name].bounds
        assert check(name, lo) is None and check(name, hi) is None, name
        assert check(name, lo - 1e-3 * (hi - lo)) and check(name, hi + 1e-3 * (hi - lo)), name
    assert CHECKS['autosave_period_s'].constraint == '0 (off) or a period in [0.001, 1e6] s'
    assert CHECKS['web_view.port'].constraint == 'a port number in [0, 65535] (0 = any free port)'
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = rclpy.create_node('params_ranges', context=ctx)
        declare_config(node, MapperConfig())
        for name, default in [('tick_rate_hz', 20.0), ('map_publish_rate_hz', 0.5), ('autosave_period_s', 0.0),
                              ('web_view.port', 8080), ('sync_slop_s', 0.05)]:
            declare(node, name, default, 'a node-level parameter')

        def span(name):
            desc = node.describe_parameter(name)
            assert len(desc.floating_point_range) + len(desc.integer_range) <= 1, name
            for kind, r in [(float, desc.floating_point_range), (int, desc.integer_range)]:
                if r:
                    assert type(r[0].from_value) is kind and desc.type == types[kind], name
                    return kind, r[0].from_value, r[0].to_value, r[0].step
            return None

        assert span('query.default_threshold') == (float, 0.0, 1.0, 0.0)
        assert span('purify.superpoint_blend') == span('purify.superpoint_convex') == (float, 0.0, 1.0, 0.0)
        assert span('features.sim_confusion') == span('features.sim_text_cosine') == (float, 0.0, 1.0, 0.0)
        assert span('map.pixel_stride') == (int, 1, 64, 1)
        assert span('purify.radius_vox') == (int, 1, 3, 1) and span('labels.smoothing_radius_vox') == (int, 0, 3, 1)
        assert span('tick_rate_hz') == (float, 0.001, 1000.0, 0.0)
        assert span('map_publish_rate_hz') == (float, 0.0, 1000.0, 0.0)        # 0 = off
        assert span('autosave_period_s') == (float, 0.0, 1e6, 0.0)
        assert span('web_view.port') == (int, 0, 65535, 1)
        for name in ('map.voxel_size_m', 'map.max_voxels', 'sync_slop_s', 'features.dense_mode', 'query.templates'):
            assert span(name) is None, name                                 # an open end, or no number
        # the range keeps the constraint text beside it; a read-only parameter has one too
        threshold = node.describe_parameter('query.default_threshold')
        assert threshold.additional_constraints == 'a number in [0, 1]' and not threshold.read_only
        assert node.describe_parameter('autosave_period_s').read_only
        # every bounded check's parameter has its bounds as range
        for name in [n for n in CHECKS if getattr(CHECKS[n], 'bounds', None) and node.has_parameter(n)]:
            assert span(name)[1:3] == CHECKS[name].bounds, name
        # rclpy enforces the range (with its own words; the node answers with the check's: test_node_interfaces)
        result = node.set_parameters([Parameter('query.default_threshold', value=1.5)])[0]
        assert not result.successful and node.get_parameter('query.default_threshold').value == 0.55
        assert node.set_parameters([Parameter('query.default_threshold', value=1.0)])[0].successful   # the edge
        node.destroy_node()

        # out-of-range values at start: rclpy would refuse the first in its own words; the check names them all
        bad = rclpy.create_node('params_bad', context=ctx, parameter_overrides=[
            Parameter('query.default_threshold', value=1.5), Parameter('map.pixel_stride', value=0),
            Parameter('web_view.port', value=70000)])
        declare_config(bad, MapperConfig())
        assert bad.get_parameter('map.pixel_stride').value == 0
        assert bad.describe_parameter('purify.radius_vox').integer_range          # the good ones keep their range
        with pytest.raises(ValueError) as e:
            check_node(bad)
        assert str(e.value) == ('map.pixel_stride must be a number in [1, 64], got 0; '
                                'query.default_threshold must be a number in [0, 1], got 1.5')
        with pytest.raises(ValueError) as e:
            declare(bad, 'web_view.port', 8080, 'Port of the browser view.')
        assert str(e.value) == 'web_view.port must be a port number in [0, 65535] (0 = any free port), got 70000'
        bad.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_overrides_of_the_started_node_reach_parameters_that_two_files_set(tmp_path):
    """start_mapping_node's overrides win over mapping.yaml + demo.yaml, also for a nested parameter that both files
    set (keyframes.*), where rcl ignored a ``-p`` (it kept demo.yaml's value); the same arguments, parsed by rcl."""
    from ov3d_ros.tools.ros_graph import CONFIG, override_file
    path = tmp_path / 'override.yaml'
    path.write_text(override_file(['keyframes.min_translation_m:=0.25', 'cameras:=[cam_a,cam_b]',
                                   'map_path:=/tmp/a map.ov3dmap', 'load_map_on_start:=true']))
    files = ['--params-file', str(CONFIG / 'mapping.yaml'), '--params-file', str(CONFIG / 'demo.yaml')]

    def read(args):
        ctx = rclpy.Context()
        rclpy.init(args=['node', '--ros-args', *files, *args], context=ctx)
        try:
            node = rclpy.create_node('ov3d_mapping', context=ctx,
                                     automatically_declare_parameters_from_overrides=True)
            values = {n: node.get_parameter(n).value for n in ('keyframes.min_translation_m', 'cameras', 'map_path',
                                                               'load_map_on_start')}
            node.destroy_node()
            return values
        finally:
            rclpy.shutdown(context=ctx)
    assert read(['-p', 'cameras:=[x]'])['keyframes.min_translation_m'] == 0.05   # demo.yaml's, without the override
    assert read(['--params-file', str(path)]) == {'keyframes.min_translation_m': 0.25, 'cameras': ['cam_a', 'cam_b'],
                                                  'map_path': '/tmp/a map.ov3dmap', 'load_map_on_start': True}


WHOLE = {'map.max_depth_m': 4, 'keyframes.min_rotation_deg': 15, 'tick_rate_hz': 10,
         'pose_to_camera': [0, 0, 0, 0, 0, 0, 1]}
"""Whole numbers for number parameters, as a params file gives them (``map: {max_depth_m: 4}``)."""


def test_a_whole_number_for_a_number_parameter_is_taken_at_start():
    """An integer override (a params file's ``4``) of a number parameter starts the node with the number, as a live
    set of it does (rclpy stopped the node: "Trying to set parameter 'map.max_depth_m' to '4' of type 'INTEGER',
    expecting type 'DOUBLE'"); the lifecycle node declares the same way."""
    from conftest import in_process_node
    from ov3d_ros.ros.lifecycle_mapping_node import LifecycleMappingNode
    with in_process_node(**WHOLE) as (node, client, pub):
        values = {n: node.get_parameter(n).value for n in WHOLE}
        assert values == {'map.max_depth_m': 4.0, 'keyframes.min_rotation_deg': 15.0, 'tick_rate_hz': 10.0,
                          'pose_to_camera': [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]}
        assert isinstance(values['map.max_depth_m'], float) and isinstance(values['pose_to_camera'][6], float)
        assert (node.mapper.cfg.map.max_depth_m, node.tick_rate_hz) == (4.0, 10.0)
        end = time.monotonic() + 30
        while time.monotonic() < end and not client.status:      # its timers run: ~/status comes once a second
            client.spin(0.3)
        assert client.status, 'no ~/status from the node'
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        node = LifecycleMappingNode(context=ctx, parameter_overrides=[Parameter(k, value=v) for k, v in WHOLE.items()])
        assert node.get_parameter('keyframes.min_rotation_deg').value == 15.0
        assert node.get_parameter('map.max_depth_m').type_ == Parameter.Type.DOUBLE
        node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


@pytest.mark.parametrize('name, value, reason', [
    ('map.max_depth_m', 'far', "map.max_depth_m takes a number, got 'far'"),
    ('web_view.port', 8080.5, 'web_view.port takes an integer, got 8080.5'),
    ('pose_to_camera', ['0'] * 7, "pose_to_camera takes a list of numbers, got ['0', '0', '0', '0', '0', '0', '0']"),
])
def test_an_override_of_another_type_stops_the_node_with_the_reason(name, value, reason):
    """A value of another type than its parameter's at start (not a whole number for a number) is refused in the
    words of a live set, naming the parameter, by both nodes."""
    from ov3d_ros.ros.lifecycle_mapping_node import LifecycleMappingNode
    from ov3d_ros.ros.mapping_node import MappingNode
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        for cls in (MappingNode, LifecycleMappingNode):
            with pytest.raises(ValueError) as e:
                cls(context=ctx, parameter_overrides=[Parameter('features.source', value='simulated'),
                                                      Parameter(name, value=value)])
            assert str(e.value) == reason, cls
    finally:
        rclpy.shutdown(context=ctx)
