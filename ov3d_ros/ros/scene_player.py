"""Plays the built-in procedural scene on the standard RGB-D topics.

Publishes ``color/image`` (rgb8), ``depth/image`` (16UC1 mm or 32FC1 m), ``color/camera_info``,
``labels/image`` (mono16 semantic ids, for the simulated feature source) and the camera pose
(``pose``, geometry_msgs/PoseStamped of the optical frame in ``map_frame``), all with one stamp per frame.
"""
from __future__ import annotations

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CameraInfo, Image

from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.params import declare
from ov3d_ros.sim import builtin_scene, builtin_trajectory, default_camera, render


class ScenePlayer(Node):
    """Renders frames of the built-in scene along its trajectory and publishes them at ``rate_hz``."""

    def __init__(self, **kwargs):
        super().__init__('ov3d_scene_player', **kwargs)
        seed = declare(self, 'seed', 0, 'Scene and trajectory seed.')
        n_frames = declare(self, 'n_frames', 60, 'Frames along the trajectory.')
        self.rate_hz = declare(self, 'rate_hz', 5.0, 'Publishing rate.')
        self.loop = declare(self, 'loop', False, 'Start over after the last frame (else stop publishing).')
        width = declare(self, 'width', 640, 'Image width in pixels.')
        height = declare(self, 'height', 480, 'Image height in pixels.')
        self.depth_encoding = declare(self, 'depth_encoding', '16UC1', "'16UC1' (millimetres) or '32FC1' (metres).")
        self.map_frame = declare(self, 'map_frame', 'map', 'Frame of the published poses.')
        self.camera_frame = declare(self, 'camera_frame', 'camera_color_optical_frame', 'Frame of the images.')
        if self.depth_encoding not in ('16UC1', '32FC1'):
            raise ValueError(f"depth_encoding must be '16UC1' or '32FC1', got {self.depth_encoding!r}")
        self.scene = builtin_scene(seed)
        self.poses = builtin_trajectory(self.scene, n_frames, seed)
        self.camera = default_camera(width, height)
        self.index = 0
        self.published = 0
        self.pub_color = self.create_publisher(Image, 'color/image', 10)
        self.pub_depth = self.create_publisher(Image, 'depth/image', 10)
        self.pub_labels = self.create_publisher(Image, 'labels/image', 10)
        self.pub_info = self.create_publisher(CameraInfo, 'color/camera_info', 10)
        self.pub_pose = self.create_publisher(PoseStamped, 'pose', 10)
        self.timer = self.create_timer(1.0 / self.rate_hz, self.publish_next)
        self.get_logger().info(f'playing scene {self.scene.name!r}: {len(self.poses)} frames at {self.rate_hz} Hz')

    @property
    def done(self) -> bool:
        return self.index >= len(self.poses) and not self.loop

    def publish_next(self) -> None:
        if self.done:
            return
        T_W_C = self.poses[self.index % len(self.poses)]
        frame = render(self.scene, self.camera, T_W_C)
        stamp = self.get_clock().now().to_msg()
        header = conv.make_header(self.camera_frame, stamp)
        if self.depth_encoding == '16UC1':
            depth = np.round(frame.depth_m * 1000.0).clip(0, 65535).astype(np.uint16)
        else:
            depth = frame.depth_m.astype(np.float32)
        self.pub_info.publish(conv.camera_to_camera_info(self.camera, header))
        self.pub_color.publish(conv.numpy_to_image(frame.rgb, 'rgb8', header))
        self.pub_labels.publish(conv.numpy_to_image(frame.semantic.astype(np.uint16), 'mono16', header))
        pose = PoseStamped()
        pose.header = conv.make_header(self.map_frame, stamp)
        pose.pose = conv.matrix_to_pose(T_W_C)
        self.pub_pose.publish(pose)
        self.pub_depth.publish(conv.numpy_to_image(depth, self.depth_encoding, header))
        self.index += 1
        self.published += 1
        if self.done:
            self.get_logger().info(f'published all {self.published} frames')


def main(args=None) -> int:
    rclpy.init(args=args)
    node = None
    try:
        node = ScenePlayer()
        while rclpy.ok() and not node.done:
            rclpy.spin_once(node, timeout_sec=0.1)
        # keep the last messages available to late subscribers for a moment
        end = node.get_clock().now().nanoseconds + int(1e9)
        while rclpy.ok() and node.get_clock().now().nanoseconds < end:
            rclpy.spin_once(node, timeout_sec=0.1)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
