"""The real pipeline over ROS 2: mapping node and scene player processes, a service client in this process."""
import time

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CameraInfo, Image

from ov3d_ros.ros import conversions as conv
from ov3d_ros.sim import builtin_scene, default_camera
from ov3d_ros.sim.classes import CLASS_NAMES
from ov3d_ros.tools.demo_client import DemoClient
from ov3d_ros.tools.ros_graph import private_ros_env, start_mapping_node, start_scene_player


class BadInputPublisher:
    """Publishes hand-made frames on the node's input topics."""

    def __init__(self, context):
        self.node = rclpy.create_node('bad_input', context=context)
        self.pubs = {t: self.node.create_publisher(m, t, 10) for t, m in [
            ('color/image', Image), ('depth/image', Image), ('labels/image', Image),
            ('color/camera_info', CameraInfo), ('pose', PoseStamped)]}

    def send(self, rgb, depth, depth_encoding='16UC1', camera=None, labels=None):
        stamp = self.node.get_clock().now().to_msg()
        header = conv.make_header('camera', stamp)
        if camera is not None:
            self.pubs['color/camera_info'].publish(conv.camera_to_camera_info(camera, header))
        pose = PoseStamped()
        pose.header = conv.make_header('map', stamp)
        pose.pose.orientation.w = 1.0
        self.pubs['pose'].publish(pose)
        self.pubs['color/image'].publish(conv.numpy_to_image(rgb, 'rgb8', header))
        lab = labels if labels is not None else np.zeros(depth.shape[:2], np.uint16)
        self.pubs['labels/image'].publish(conv.numpy_to_image(lab, 'mono16', header))
        self.pubs['depth/image'].publish(conv.numpy_to_image(depth, depth_encoding, header))


@pytest.fixture(scope='module')
def graph(tmp_path_factory):
    out = tmp_path_factory.mktemp('pipeline')
    env = private_ros_env()
    import os
    old = {k: os.environ.get(k) for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')}
    os.environ.update({k: env[k] for k in old})
    node = start_mapping_node(env, out / 'node.log')
    client = DemoClient()
    try:
        assert client.wait_for_service(node, 120.0), node.log()
        yield {'env': env, 'node': node, 'client': client, 'out': out}
    finally:
        client.close()
        node.stop()
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def wait_for_error(client, text, timeout_s=15.0):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        client.spin(0.3)
        if client.status and text in client.status['last_error']:
            return client.status
    raise AssertionError(f'no error containing {text!r}; last status {client.status}')


def test_1_query_on_empty_map_fails_cleanly(graph):
    r = graph['client'].query('chair')
    assert not r['success'] and 'empty' in r['message']


def test_2_bad_input_is_reported_and_survived(graph):
    client, node = graph['client'], graph['node']
    pub = BadInputPublisher(client.context)
    client.executor.add_node(pub.node)
    rgb = np.zeros((48, 64, 3), np.uint8)
    depth = np.full((48, 64), 1500, np.uint16)
    # no camera info yet
    for _ in range(3):
        pub.send(rgb, depth)
        client.spin(0.2)
    wait_for_error(client, 'camera info')
    cam = default_camera(64, 48)
    # depth with a colour encoding
    for _ in range(3):
        pub.send(rgb, rgb, depth_encoding='rgb8', camera=cam)
        client.spin(0.2)
    wait_for_error(client, 'rgb8')
    # colour and depth of different sizes
    for _ in range(3):
        pub.send(np.zeros((24, 32, 3), np.uint8), depth, camera=cam)
        client.spin(0.2)
    wait_for_error(client, 'depth is 64x48')
    assert node.alive()
    client.executor.remove_node(pub.node)
    pub.node.destroy_node()
    r = client.query('   ')
    assert not r['success'] and 'empty' in r['message']


def test_3_maps_scene_and_finds_objects_in_their_boxes(graph):
    client, node = graph['client'], graph['node']
    player = start_scene_player(graph['env'], graph['out'] / 'player.log',
                                ['n_frames:=36', 'rate_hz:=6.0', 'seed:=0'])
    try:
        status = client.wait_until_mapped(player, node, timeout_s=240.0)
    finally:
        player.stop()
    assert status['keyframes'] >= 10 and status['voxels'] > 1000, status
    scene = builtin_scene(0)
    boxes = scene.instance_boxes()
    for name in ('chair', 'table', 'sofa'):
        r = client.query(name)
        assert r['success'], r['message']
        assert len(r['xyz']) > 20, (name, r['message'])
        cls = CLASS_NAMES.index(name)
        inside = np.zeros(len(r['xyz']), bool)
        for lo, hi, c in boxes:
            if c == cls:
                inside |= np.all((r['xyz'] >= np.asarray(lo) - 0.05) & (r['xyz'] <= np.asarray(hi) + 0.05), axis=1)
        assert inside.mean() >= 0.85, (name, inside.mean(), status, r['xyz'][~inside][:20])
        assert np.all((r['scores'] > 0) & (r['scores'] <= 1))
    assert node.alive()


def test_4_save_clear_load_keep_the_map(graph):
    from std_srvs.srv import Trigger
    from ov3d_ros.srv import LoadMap, SaveMap
    client, node, out = graph['client'], graph['node'], graph['out']
    before = client.query('sofa')
    saved = client.call(SaveMap, '/ov3d_mapping/save_map', SaveMap.Request(path=str(out / 'maps' / 'room.ov3dmap')))
    assert saved.success and saved.voxels > 1000 and (out / 'maps' / 'room.ov3dmap').exists(), saved.message
    cleared = client.call(Trigger, '/ov3d_mapping/clear_map', Trigger.Request())
    assert cleared.success and f'cleared {saved.voxels} voxels' == cleared.message
    assert 'empty' in client.query('sofa')['message']
    (out / 'junk.ov3dmap').write_bytes(b'\x00' * 64)
    for bad in (out / 'junk.ov3dmap', out / 'missing.ov3dmap'):
        r = client.call(LoadMap, '/ov3d_mapping/load_map', LoadMap.Request(path=str(bad)))
        assert not r.success and r.message.startswith('kept the current map') and r.voxels == 0, r.message
    r = client.call(LoadMap, '/ov3d_mapping/load_map', LoadMap.Request(path=saved.path))
    assert r.success and r.voxels == saved.voxels, r.message
    after = client.query('sofa')
    assert after['success'] and np.array_equal(np.sort(after['xyz'], axis=0), np.sort(before['xyz'], axis=0))
    assert node.alive()
