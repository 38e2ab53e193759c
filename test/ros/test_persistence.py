"""Map persistence of the real node: resume from a file at start, autosave after changes."""
import os
import time

from ov3d_ros.core.map_io import load_map
from ov3d_ros.tools.ros_graph import private_ros_env, start_mapping_node


def test_node_resumes_from_file_and_autosaves(saved_map, start_node):
    from std_srvs.srv import Trigger
    path, voxels = saved_map
    node, client = start_node([f'map_path:={path}', 'load_map_on_start:=true', 'autosave_period_s:=0.5'])
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
