"""The real pipeline over ROS 2: mapping node and scene player processes, a service client in this process."""
import numpy as np

from ov3d_ros.sim import builtin_scene, default_camera
from ov3d_ros.sim.classes import CLASS_NAMES
from ov3d_ros.tools.ros_graph import start_scene_player


def test_1_query_on_empty_map_fails_cleanly(graph):
    r = graph['client'].query('chair')
    assert not r['success'] and 'empty' in r['message']


def test_2_bad_input_is_reported_and_survived(graph, bad_input):
    client, node, pub = graph['client'], graph['node'], bad_input
    rgb = np.zeros((48, 64, 3), np.uint8)
    depth = np.full((48, 64), 1500, np.uint16)
    # no camera info yet
    for _ in range(3):
        pub.send(rgb, depth)
        client.spin(0.2)
    pub.wait_for_error('camera info')
    cam = default_camera(64, 48)
    # depth with a colour encoding
    for _ in range(3):
        pub.send(rgb, rgb, depth_encoding='rgb8', camera=cam)
        client.spin(0.2)
    pub.wait_for_error('rgb8')
    # colour and depth of different sizes
    for _ in range(3):
        pub.send(np.zeros((24, 32, 3), np.uint8), depth, camera=cam)
        client.spin(0.2)
    pub.wait_for_error('depth is 64x48')
    assert node.alive()
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
