import subprocess
import sys

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
