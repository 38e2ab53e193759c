"""Plays the built-in procedural scene on the standard RGB-D topics.

Publishes ``color/image`` (rgb8), ``depth/image`` (16UC1 mm or 32FC1 m), ``color/camera_info``,
``labels/image`` (mono16 semantic ids, for the simulated feature source) and the camera pose
(``pose``, geometry_msgs/PoseStamped of the optical frame in ``map_frame``), all with one stamp per frame.

With ``cameras`` (namespaces) it plays a rig: ``pose`` is the trajectory pose (the rig's body) and each camera,
mounted at its ``camera_mounts`` entry in that body, publishes ``<ns>/color/image``, ... rendered from there.
``color_transport: compressed`` publishes colour as CompressedImage (JPEG) on ``color/image/compressed``;
``depth_transport: compressedDepth`` publishes 16UC1 depth as image_transport's compressedDepth PNG on
``depth/image/compressedDepth``.
"""
from __future__ import annotations

import numpy as np
import rclpy
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CameraInfo, CompressedImage, Image

from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.params import declare
from ov3d_ros.sim import builtin_scene, builtin_trajectory, default_camera, render


class ScenePlayer(Node):
    """Renders frames of the built-in scene along its trajectory and publishes them at ``rate_hz``."""

    def __init__(self, **kwargs):
        super().__init__('ov3d_scene_player', **kwargs)
        seed = declare(self, 'seed', 0, 'Scene and trajectory seed.')
        n_frames = declare(self, 'n_frames', 60, 'Frames along the trajectory.')
        play_frames = declare(self, 'play_frames', 0, 'Play only the first play_frames frames of the trajectory '
                              '(e.g. 300 of 1800: the first 10 s of a 60 s loop at 30 Hz); 0 = all of them.')
        self.rate_hz = declare(self, 'rate_hz', 5.0, 'Publishing rate.')
        self.loop = declare(self, 'loop', False, 'Start over after the last frame (else stop publishing).')
        prerender = declare(self, 'prerender', False, 'Render every frame before publishing, so that rate_hz '
                            'holds whatever a frame costs to render (memory: about 2 MB per 640x480 frame).')
        width = declare(self, 'width', 640, 'Image width in pixels.')
        height = declare(self, 'height', 480, 'Image height in pixels.')
        self.depth_encoding = declare(self, 'depth_encoding', '16UC1', "'16UC1' (millimetres) or '32FC1' (metres).")
        self.map_frame = declare(self, 'map_frame', 'map', 'Frame of the published poses.')
        self.camera_frame = declare(self, 'camera_frame', 'camera_color_optical_frame', 'Frame of the images.')
        namespaces = declare(self, 'cameras', [''], "Camera namespaces ([''] = one camera on the plain topics).")
        mounts = declare(self, 'camera_mounts', [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                         'x y z qx qy qz qw of each camera in the published pose frame, 7 per camera (or 7 for all).')
        self.color_transport = declare(self, 'color_transport', 'raw', "'raw' (Image) or 'compressed' (JPEG).")
        self.depth_transport = declare(self, 'depth_transport', 'raw', "'raw' (Image) or 'compressedDepth' (PNG).")
        history = declare(self, 'history_depth', 30, 'Messages each image and camera-info publisher keeps for '
                          'subscribers (reliable ones that have not acknowledged them yet): 30 = 1 s at 30 Hz, as the '
                          "mapping node's queue_size. With 10, a busy 2-core host lost 25-276 of 1 800 frames in "
                          'transport (benchmarks/bm_node.py --only stream), with 30 none.')
        if play_frames < 0:
            raise ValueError(f'play_frames must be >= 0, got {play_frames}')
        if history < 1:
            raise ValueError(f'history_depth must be >= 1, got {history}')
        if self.depth_encoding not in ('16UC1', '32FC1'):
            raise ValueError(f"depth_encoding must be '16UC1' or '32FC1', got {self.depth_encoding!r}")
        if self.color_transport not in ('raw', 'compressed') or self.depth_transport not in ('raw', 'compressedDepth'):
            raise ValueError("color_transport must be 'raw' or 'compressed', depth_transport 'raw' or 'compressedDepth'")
        if self.depth_transport == 'compressedDepth' and self.depth_encoding != '16UC1':
            raise ValueError('depth_transport compressedDepth publishes 16UC1 depth; set depth_encoding 16UC1')
        if len(mounts) not in (7, 7 * len(namespaces)):
            raise ValueError(f'camera_mounts needs 7 or {7 * len(namespaces)} numbers, got {len(mounts)}')
        self.scene = builtin_scene(seed)
        self.poses = builtin_trajectory(self.scene, n_frames, seed)[:play_frames or None]
        self.camera = default_camera(width, height)
        self.index = 0
        self.published = 0
        self.rig = []
        for i, ns in enumerate(namespaces):
            ns = ns.strip('/')
            m = mounts[7 * i:7 * i + 7] if len(mounts) > 7 else mounts
            pre = f'{ns}/' if ns else ''
            compressed_color = self.color_transport == 'compressed'
            compressed_depth = self.depth_transport == 'compressedDepth'
            self.rig.append({
                'T_B_C': conv.pose_to_matrix(m[:3], m[3:]),
                'frame': f'{ns}_{self.camera_frame}' if ns else self.camera_frame,
                'color': self.create_publisher(CompressedImage if compressed_color else Image,
                                               pre + 'color/image' + ('/compressed' if compressed_color else ''), history),
                'depth': self.create_publisher(CompressedImage if compressed_depth else Image,
                                               pre + 'depth/image' + ('/compressedDepth' if compressed_depth else ''),
                                               history),
                'labels': self.create_publisher(Image, pre + 'labels/image', history),
                'info': self.create_publisher(CameraInfo, pre + 'color/camera_info', history)})
        self.pub_pose = self.create_publisher(PoseStamped, 'pose', 10)
        self.rendered = None
        if prerender:
            self.get_logger().info(f'rendering {len(self.poses)} frames before publishing')
            self.rendered = [self.render(T_W_B) for T_W_B in self.poses]
        self.timer = self.create_timer(1.0 / self.rate_hz, self.publish_next)
        self.get_logger().info(f'playing scene {self.scene.name!r}: {len(self.poses)} frames at {self.rate_hz} Hz')

    @property
    def done(self) -> bool:
        return self.index >= len(self.poses) and not self.loop

    def render(self, T_W_B):
        """The frames of every camera of the rig at body pose ``T_W_B`` (4, 4)."""
        return [render(self.scene, self.camera, T_W_B @ cam['T_B_C']) for cam in self.rig]

    def publish_next(self) -> None:
        if self.done:
            return
        T_W_B = self.poses[self.index % len(self.poses)]
        frames = self.render(T_W_B) if self.rendered is None else self.rendered[self.index % len(self.poses)]
        stamp = self.get_clock().now().to_msg()            # after rendering: published right after their stamp
        pose = PoseStamped()
        pose.header = conv.make_header(self.map_frame, stamp)
        pose.pose = conv.matrix_to_pose(T_W_B)
        self.pub_pose.publish(pose)
        for cam, frame in zip(self.rig, frames):
            header = conv.make_header(cam['frame'], stamp)
            if self.depth_encoding == '16UC1':
                depth = np.round(frame.depth_m * 1000.0).clip(0, 65535).astype(np.uint16)
            else:
                depth = frame.depth_m.astype(np.float32)
            cam['info'].publish(conv.camera_to_camera_info(self.camera, header))
            cam['color'].publish(conv.rgb_to_compressed(frame.rgb, 'jpeg', header) if self.color_transport != 'raw'
                                 else conv.numpy_to_image(frame.rgb, 'rgb8', header))
            cam['labels'].publish(conv.numpy_to_image(frame.semantic.astype(np.uint16), 'mono16', header))
            cam['depth'].publish(conv.depth_to_compressed_depth(depth, header) if self.depth_transport != 'raw'
                                 else conv.numpy_to_image(depth, self.depth_encoding, header))
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
