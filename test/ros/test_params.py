import subprocess
import sys

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
    assert 'web_view.refresh_s must be a finite number > 0' in check('web_view.refresh_s', 0.0)
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
