"""The built-in scene player in this process: pre-rendered frames are the frames it renders on the fly."""
import time

import numpy as np
import pytest
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image

from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.scene_player import ScenePlayer
from ov3d_ros.sim import render
from ov3d_ros.tools.demo_client import DemoClient

from conftest import private_domain


def test_prerendered_frames_are_published_at_the_rate_and_match_the_scene():
    overrides = {'n_frames': 3, 'width': 32, 'height': 24, 'rate_hz': 20.0, 'prerender': True, 'loop': True}
    with private_domain():
        client = DemoClient()
        player = ScenePlayer(context=client.context,
                             parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        try:
            assert player.rendered is not None and len(player.rendered) == 3
            # image publishers keep 1 s at 30 Hz for reliable subscribers (history_depth), poses the default 10
            depths = {pub.topic_name: pub.qos_profile.depth for pub in player.publishers}
            assert {depths[t] for t in ('/color/image', '/depth/image', '/labels/image', '/color/camera_info')} == {30}
            assert depths['/pose'] == 10
            depth, color = [], []
            client.node.create_subscription(Image, 'depth/image', depth.append, 50)
            client.node.create_subscription(Image, 'color/image', color.append, 50)
            client.executor.add_node(player)
            end = time.monotonic() + 60
            # two passes of the loop, on both topics (their messages need not arrive in step)
            while min(len(depth), len(color)) < 6 and time.monotonic() < end:
                client.spin(0.05)
            assert len(depth) >= 6 and len(color) >= 6 and player.published >= 6
            for i in range(6):
                frame = render(player.scene, player.camera, player.poses[i % 3] @ player.rig[0]['T_B_C'])
                got = conv.depth_to_meters(depth[i])
                assert np.allclose(got, np.where(np.isfinite(frame.depth_m), np.round(frame.depth_m * 1000) / 1000, 0),
                                   atol=1e-3, equal_nan=True)
                assert np.array_equal(conv.color_to_rgb(color[i]), frame.rgb)
            assert not np.array_equal(conv.color_to_rgb(color[0]), conv.color_to_rgb(color[1]))   # they move
        finally:
            client.executor.remove_node(player)
            player.destroy_node()
            client.close()


def test_play_frames_plays_the_start_of_a_longer_trajectory():
    from ov3d_ros.sim import builtin_scene, builtin_trajectory
    overrides = {'n_frames': 90, 'play_frames': 4, 'width': 16, 'height': 12}
    with private_domain():
        client = DemoClient()
        player = ScenePlayer(context=client.context,
                             parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        try:
            full = builtin_trajectory(builtin_scene(0), 90, 0)
            assert len(player.poses) == 4 and all(np.allclose(a, b) for a, b in zip(player.poses, full[:4]))
        finally:
            player.destroy_node()
            client.close()


def test_a_history_shorter_than_one_message_is_refused():
    with private_domain():
        client = DemoClient()
        try:
            with pytest.raises(ValueError, match='history_depth'):
                ScenePlayer(context=client.context, parameter_overrides=[Parameter('history_depth', value=0)])
        finally:
            client.close()
