"""Map persistence of the real node: resume from a file at start, autosave after changes."""
import os
import time

import pytest

from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.map_io import load_map
from ov3d_ros.core.mapper import Frame, Mapper
from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
from ov3d_ros.tools.demo_client import DemoClient
from ov3d_ros.tools.ros_graph import private_ros_env, start_mapping_node


@pytest.fixture()
def saved_map(tmp_path):
    """A map of the built-in scene written by the core, with the demo's feature source."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_preset, cfg.map.device = 'simulated', 'clean', 'cpu'
    mapper = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES, cfg.query.templates))
    scene, cam = builtin_scene(0), default_camera(160, 120)
    for i, T in enumerate(builtin_trajectory(scene, 12, 0)):
        f = render(scene, cam, T)
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
    path = tmp_path / 'room.ov3dmap'
    mapper.save(path)
    return path, mapper.map.size


def test_node_resumes_from_file_and_autosaves(saved_map, tmp_path, monkeypatch):
    from std_srvs.srv import Trigger
    path, voxels = saved_map
    env = private_ros_env()
    for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE'):
        monkeypatch.setenv(k, env[k])
    node = start_mapping_node(env, tmp_path / 'node.log', params=[
        f'map_path:={path}', 'load_map_on_start:=true', 'autosave_period_s:=0.5'])
    client = DemoClient()
    try:
        assert client.wait_for_service(node, 120.0), node.log()
        end = time.monotonic() + 20
        while time.monotonic() < end and not (client.status and client.status['voxels'] == voxels):
            client.spin(0.3)
        assert client.status and client.status['voxels'] == voxels, (client.status, node.log()[-2000:])
        assert client.query('sofa')['success']
        from diagnostic_msgs.msg import DiagnosticArray
        diags = []
        client.node.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 10)
        end = time.monotonic() + 10
        while time.monotonic() < end and not diags:
            client.spin(0.3)
        values = {kv.key: kv.value for kv in diags[-1].status[0].values}
        assert 'ov3d_mapping' in diags[-1].status[0].name and values['voxels'] == str(voxels)
        assert 'input_rate_hz' in values and 'no input' in diags[-1].status[0].message   # nothing is publishing
        mtime = os.stat(path).st_mtime_ns
        client.spin(1.5)
        assert os.stat(path).st_mtime_ns == mtime            # unchanged map: no autosave
        assert client.call(Trigger, '/ov3d_mapping/clear_map', Trigger.Request()).success
        end = time.monotonic() + 10
        while time.monotonic() < end and os.stat(path).st_mtime_ns == mtime:
            client.spin(0.3)
        assert load_map(path)[0].size == 0, node.log()[-2000:]   # the cleared map was autosaved
        assert node.alive()
    finally:
        client.close()
        node.stop()


def test_node_refuses_to_start_from_a_corrupt_file(tmp_path, monkeypatch):
    bad = tmp_path / 'bad.ov3dmap'
    bad.write_bytes(b'junk' * 100)
    env = private_ros_env()
    node = start_mapping_node(env, tmp_path / 'node.log', params=[f'map_path:={bad}', 'load_map_on_start:=true'])
    try:
        end = time.monotonic() + 120
        while node.alive() and time.monotonic() < end:
            time.sleep(0.5)
        assert not node.alive()
        assert 'load_map_on_start' in node.log() and str(bad) in node.log()
    finally:
        node.stop()
