"""The label volume on the mapping node: ``~/set_vocabulary`` and the class-coloured ``~/label_cloud``.

The vocabulary starts from the ``labels.vocabulary`` parameter. ``~/label_cloud`` (latched, PointCloud2 with
x, y, z, rgb = the class colour, score = the class's share of the voxel's evidence) is published at
``label_publish_rate_hz`` while a vocabulary is set; ``~/label_legend`` (latched std_msgs/String, JSON) lists
each class with its colour. ``~/set_vocabulary`` changes the map under the mapper lock and publishes a new
snapshot; the cloud and legend are read from the node's latest snapshot, without the lock.
"""
from __future__ import annotations

import json
import threading
from typing import Callable, Optional

import numpy as np

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String

from ov3d_ros.core.label_volume import class_colors
from ov3d_ros.core.mapper import Mapper
from ov3d_ros.core.snapshot import MapSnapshot
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.params import declare
from ov3d_ros.ros.services import create_service
from ov3d_ros.srv import SetVocabulary


def declare_label_volume(node: Node) -> float:
    """Declare the label volume's parameter on ``node`` and return its value: ``label_publish_rate_hz``, read
    when the node is configured."""
    return declare(node, 'label_publish_rate_hz', 0.5, 'Rate of ~/label_cloud while a vocabulary is set (0 = off).')


class LabelVolumeInterface:
    """The label volume's service and topics on ``node`` (map guarded by ``lock``), the cloud published at
    ``rate`` Hz (0: off; :func:`declare_label_volume`).

    ``snapshot`` returns the node's latest :class:`MapSnapshot` (what the cloud and legend show); ``changed`` is
    called under the lock after the vocabulary changed (the node publishes a new snapshot)."""

    def __init__(self, node: Node, mapper: Mapper, lock: threading.Lock, frame_id: str, max_points: int,
                 rate: float, snapshot: Callable[[], Optional[MapSnapshot]], changed: Callable[[], None]):
        self.node, self.mapper, self.lock, self.frame_id, self.max_points = node, mapper, lock, frame_id, max_points
        self.snapshot, self.changed = snapshot, changed
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.cloud_pub = node.create_publisher(PointCloud2, '~/label_cloud', latched)
        self.legend_pub = node.create_publisher(String, '~/label_legend', latched)
        group = MutuallyExclusiveCallbackGroup()
        create_service(node, SetVocabulary, '~/set_vocabulary', self.on_set_vocabulary, callback_group=group)
        if rate > 0:
            node.create_steady_timer(1.0 / rate, self.publish, group)
        self._legend = None
        self._shown = False                     # the last ~/label_cloud had points
        self._publish_legend(self.snapshot())

    def on_set_vocabulary(self, request, response):
        """Replace the vocabulary; a refused one keeps the current vocabulary."""
        try:
            self.mapper.prepare_vocabulary(list(request.classes))     # the names' embeddings, mapping meanwhile
            with self.lock:
                self.mapper.set_vocabulary(list(request.classes))
                self.changed()
            response.success = True
            response.message = (f'label volume over {len(request.classes)} classes' if request.classes
                                else 'label volume off')
            self.node.get_logger().info(f'set_vocabulary: {response.message}')
            self.publish()
        except Exception as e:          # noqa: BLE001 - refused with the reason; the current vocabulary stays
            response.success = False
            response.message = str(e) if isinstance(e, ValueError) else f'{type(e).__name__}: {e}'
            self.node.get_logger().warning(f'set_vocabulary refused: {response.message}')
        response.classes = list(self.mapper.cfg.labels.vocabulary) if self.mapper.labels is not None else []
        return response

    def publish(self) -> None:
        """~/label_cloud from the latest snapshot's evidence, and ~/label_legend when the vocabulary changed (a
        service call or a loaded map). Without a vocabulary or voxels, once an empty cloud (the vocabulary switched
        off, the map cleared): late subscribers of the latched topic do not get the labels before."""
        snap = self.snapshot()
        self._publish_legend(snap)
        if snap is None:
            return
        stamp = self.node.get_clock().now().to_msg()
        if snap.labels is None or snap.size == 0:
            if self._shown:
                self.cloud_pub.publish(conv.make_pointcloud2(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8),
                                                             np.zeros(0, np.float32), self.frame_id, stamp))
                self._shown = False
            return
        seg, _ = snap.label_cloud(self.max_points)
        self.cloud_pub.publish(conv.make_pointcloud2(seg.xyz, seg.rgb, seg.scores, self.frame_id, stamp))
        self._shown = True

    def _publish_legend(self, snap: Optional[MapSnapshot] = None) -> None:
        names = snap.vocabulary if snap is not None else []
        if names == self._legend:
            return
        self._legend = names
        colors = class_colors(len(names)).tolist()
        self.legend_pub.publish(String(data=json.dumps([{'class': n, 'rgb': c} for n, c in zip(names, colors)])))
