"""The node lifts raw images along their lens's undistorted rays (camera info k and d), or rectified images with the
camera info's p (``rectified_images: true``), and refuses a lens model it cannot invert with the reason."""
import time

import numpy as np
from sensor_msgs.msg import CameraInfo

from ov3d_ros.core.camera import PinholeCamera

from conftest import in_process_node

K = [60.0, 0.0, 47.5, 0.0, 60.0, 35.5, 0.0, 0.0, 1.0]
P = [80.0, 0.0, 47.5, 0.0, 0.0, 80.0, 35.5, 0.0, 0.0, 0.0, 1.0, 0.0]      # what image_proc would rectify to
D = [-0.3, 0.08, 0.0, 0.0, 0.0]                                           # barrel, like a wide-angle lens


def wall_extent(node, client, pub, info) -> float:
    """Half-width (m) of the map of a flat wall 2 m in front of the camera, seen once through ``info``."""
    end = time.monotonic() + 60
    while time.monotonic() < end and node.mapper.num_keyframes == 0:
        pub.send(np.full((72, 96, 3), 120, np.uint8), np.full((72, 96), 2000, np.uint16), camera=info)
        client.spin(0.5)
    assert node.mapper.num_keyframes >= 1, client.status
    xyz = node.mapper.map_cloud().xyz
    assert np.allclose(xyz[:, 2], 2.0, atol=0.05)
    return float(np.abs(xyz[:, 0]).max())


def test_raw_images_are_lifted_along_the_lens_rays_and_rectified_ones_with_p():
    info = CameraInfo(width=96, height=72, k=K, p=P, distortion_model='plumb_bob', d=D)
    lens = PinholeCamera(60.0, 60.0, 47.5, 35.5, 96, 72, 'plumb_bob', tuple(D))
    v, u = np.meshgrid(np.arange(0, 72, 2), np.arange(0, 96, 2), indexing='ij')      # map.pixel_stride 2
    x, _, ok = lens.rays(u, v)
    with in_process_node() as (node, client, pub):
        half = wall_extent(node, client, pub, info)
        assert abs(half - 2.0 * np.abs(x[ok]).max()) < 0.05, half     # within a voxel of the widest true ray
        assert half > 2.0 * 48 / 60 + 0.2                   # the pinhole rays of k would end 4+ voxels short
        pub.send(np.full((72, 96, 3), 120, np.uint8), np.full((72, 96), 2000, np.uint16),
                 camera=CameraInfo(width=96, height=72, k=K, p=P, distortion_model='kannala_brandt', d=[0.1] * 4))
        status = pub.wait_for_error("lens distortion model 'kannala_brandt' is not supported")
        assert 'set rectified_images: true' in status['last_error'] and node.mapper.map.size > 0
    with in_process_node(rectified_images=True) as (node, client, pub):
        half = wall_extent(node, client, pub, info)
        assert abs(half - 2.0 * 47.5 / 80) < 0.05, half     # p's focal length, d not applied


def test_depth_in_another_frame_than_colour_is_reported_once():
    """Depth in its own sensor frame is not registered to the colour image: the node says so (once, on /rosout)
    and names the fix."""
    from geometry_msgs.msg import PoseStamped
    from rcl_interfaces.msg import Log
    from ov3d_ros.ros import conversions as conv
    with in_process_node() as (node, client, pub):
        logs = []
        client.node.create_subscription(Log, '/rosout', logs.append, 50)
        end = time.monotonic() + 30
        while time.monotonic() < end and node.mapper.num_keyframes < 2:
            stamp = conv.sec_to_stamp(pub.now())
            color, depth = (conv.make_header(f, stamp) for f in ('camera_color_optical_frame', 'camera_depth'))
            pub.pubs['color/camera_info'].publish(CameraInfo(header=color, width=96, height=72, k=K, p=P))
            pose = PoseStamped(header=conv.make_header('map', stamp))
            pose.pose.orientation.w = 1.0
            pub.pubs['pose'].publish(pose)
            pub.pubs['color/image'].publish(conv.numpy_to_image(np.full((72, 96, 3), 120, np.uint8), 'rgb8', color))
            pub.pubs['labels/image'].publish(conv.numpy_to_image(np.ones((72, 96), np.uint16), 'mono16', color))
            pub.pubs['depth/image'].publish(conv.numpy_to_image(np.full((72, 96), 2000, np.uint16), '16UC1', depth))
            client.spin(0.5)
        client.spin(0.5)
        said = [m.msg for m in logs if 'must be registered' in m.msg]
        assert len(said) == 1, (said, client.status)
        assert "depth is in frame 'camera_depth' but colour in 'camera_color_optical_frame'" in said[0]
        assert 'align_depth.enable:=true' in said[0]
