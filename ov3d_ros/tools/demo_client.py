"""An rclpy client of the mapping node: status, /segment_by_text and ~/map_cloud."""
from __future__ import annotations

import json
import time

import numpy as np
import rclpy
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String

from ov3d_ros.ros import conversions as conv
from ov3d_ros.srv import SegmentByText


class DemoClient:
    """Talks to a running ``ov3d_mapping`` node (own rclpy context)."""

    def __init__(self, node_name: str = 'ov3d_mapping'):
        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node('ov3d_demo_client', context=self.context)
        self.executor = rclpy.executors.SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.status = None
        self._map = None
        self.node.create_subscription(String, f'/{node_name}/status', self._on_status, 10)
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(PointCloud2, f'/{node_name}/map_cloud', self._on_map, latched)
        self.client = self.node.create_client(SegmentByText, '/segment_by_text')

    def _on_status(self, msg):
        self.status = json.loads(msg.data)

    def _on_map(self, msg):
        self._map = msg

    def spin(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.executor.spin_once(timeout_sec=min(0.1, max(0.0, end - time.monotonic())))

    def next_status(self, timeout_s: float = 30.0) -> dict:
        """The next ~/status the node publishes after this call (TimeoutError if none comes in ``timeout_s``)."""
        self.status = None
        end = time.monotonic() + timeout_s
        while self.status is None and time.monotonic() < end:
            self.spin(0.2)
        if self.status is None:
            raise TimeoutError(f'no ~/status received in {timeout_s} s')
        return self.status

    def wait_for_service(self, node_proc, timeout_s: float) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and node_proc.alive():
            if self.client.wait_for_service(timeout_sec=0.5):
                return True
        return False

    def wait_until_mapped(self, player_proc, node_proc, timeout_s: float) -> dict:
        """Wait for the player to finish and the node to have processed its last frame."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end and player_proc.alive():
            self.spin(0.5)
            if not node_proc.alive():
                raise RuntimeError('the mapping node exited:\n' + node_proc.log()[-3000:])
        stable_since, last = time.monotonic(), None
        while time.monotonic() < end:
            self.spin(0.5)
            key = self.status and (self.status['frames'], self.status['voxels'], self.status['pending_depth'],
                                   self.status['pending_keyframes'])
            if key != last:
                stable_since, last = time.monotonic(), key
            elif self.status and time.monotonic() - stable_since > 2.5:
                return self.status
        raise TimeoutError(f'mapping did not finish within {timeout_s} s (last status {self.status})')

    def query(self, text: str, negatives=(), threshold: float = 0.0, timeout_s: float = 60.0) -> dict:
        """Call /segment_by_text; returns text, success, message, xyz, rgb, scores, objects (ov3d_ros/ObjectInstance
        messages), ms."""
        t0 = time.perf_counter()
        resp = self._answer(self.client, SegmentByText.Request(text=text, negatives=list(negatives),
                                                               threshold=float(threshold)),
                            f'/segment_by_text({text!r})', timeout_s)
        ms = 1e3 * (time.perf_counter() - t0)
        xyz, rgb, scores = np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), np.zeros(0, np.float32)
        if resp.success and resp.cloud.width:
            pts = conv.pointcloud2_to_numpy(resp.cloud)
            xyz = np.stack([pts['x'], pts['y'], pts['z']], axis=-1)
            rgb, scores = conv.unpack_rgb(pts['rgb']), pts['score'].copy()
        return {'text': text, 'success': resp.success, 'message': resp.message, 'xyz': xyz, 'rgb': rgb,
                'scores': scores, 'objects': list(resp.objects), 'ms': ms}

    def call(self, srv_type, name: str, request, timeout_s: float = 60.0):
        """Call any service of the node, e.g. ``call(SaveMap, '/ov3d_mapping/save_map', SaveMap.Request())``."""
        client = self.node.create_client(srv_type, name)
        try:
            if not client.wait_for_service(timeout_sec=timeout_s):
                raise TimeoutError(f'service {name} not available')
            return self._answer(client, request, name, timeout_s)
        finally:
            self.node.destroy_client(client)

    def _answer(self, client, request, what: str, timeout_s: float):
        """Send ``request`` on ``client`` and spin until its response arrives (TimeoutError naming ``what``)."""
        future = client.call_async(request)
        self.executor.spin_until_future_complete(future, timeout_sec=timeout_s)
        if future.result() is None:
            raise TimeoutError(f'{what} got no answer in {timeout_s} s')
        return future.result()

    def map_cloud(self, timeout_s: float = 10.0):
        """(xyz (N, 3), rgb (N, 3)) of the latest ~/map_cloud."""
        end = time.monotonic() + timeout_s
        while self._map is None and time.monotonic() < end:
            self.spin(0.2)
        if self._map is None:
            raise TimeoutError('no ~/map_cloud received')
        pts = conv.pointcloud2_to_numpy(self._map)
        return np.stack([pts['x'], pts['y'], pts['z']], axis=-1), conv.unpack_rgb(pts['rgb'])

    def close(self) -> None:
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
