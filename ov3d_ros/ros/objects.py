"""Object instances of query answers on ROS: ``~/objects`` (ov3d_ros/ObjectInstanceArray, latched), one wire box
per object on ``~/segmentation_markers`` and, where ``vision_msgs`` is installed, ``~/detections``
(vision_msgs/Detection3DArray, latched). The split itself is the core's :func:`ov3d_ros.core.objects.extract_objects`.
"""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
from geometry_msgs.msg import Point, Pose, Vector3
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.objects import ObjectInstance, extract_objects
from ov3d_ros.ros import conversions as conv
from ov3d_ros.msg import ObjectInstance as ObjectInstanceMsg
from ov3d_ros.msg import ObjectInstanceArray

try:  # optional: vision_msgs is not a dependency; publish Detection3DArray only where it is installed
    from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose
except ImportError:
    Detection3DArray = None


def _pose(center: np.ndarray) -> Pose:
    pose = Pose()
    pose.position = Point(x=float(center[0]), y=float(center[1]), z=float(center[2]))
    pose.orientation.w = 1.0
    return pose


def to_msg(obj: ObjectInstance) -> ObjectInstanceMsg:
    """One core object instance as an ov3d_ros/ObjectInstance (axis-aligned box: identity orientation)."""
    c, s = obj.centroid, obj.box_size
    return ObjectInstanceMsg(label=obj.label, score=float(obj.score),
                             centroid=Point(x=float(c[0]), y=float(c[1]), z=float(c[2])),
                             box_pose=_pose(obj.box_center),
                             box_size=Vector3(x=float(s[0]), y=float(s[1]), z=float(s[2])),
                             voxels=int(obj.voxels))


def to_array(objects: Sequence[ObjectInstance], frame_id: str, stamp) -> ObjectInstanceArray:
    return ObjectInstanceArray(header=conv.make_header(frame_id, stamp), objects=[to_msg(o) for o in objects])


def to_detections(array: ObjectInstanceArray):
    """vision_msgs/Detection3DArray of an ObjectInstanceArray (class_id = label, id = index); None without
    vision_msgs."""
    if Detection3DArray is None:
        return None
    out = Detection3DArray(header=array.header)
    for i, o in enumerate(array.objects):
        det = Detection3D(header=array.header, id=str(i))
        det.bbox.center = o.box_pose
        det.bbox.size = o.box_size
        hyp = ObjectHypothesisWithPose()
        hyp.hypothesis.class_id = o.label
        hyp.hypothesis.score = float(o.score)
        hyp.pose.pose = o.box_pose
        det.results = [hyp]
        out.detections.append(det)
    return out


class ObjectsOutput:
    """Splits answers into object instances and publishes them; ``marker_pub`` is the node's
    ``~/segmentation_markers`` publisher (one box per object)."""

    def __init__(self, node: Node, map_frame: str, marker_pub):
        self.node, self.map_frame, self.marker_pub = node, map_frame, marker_pub
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        self.objects_pub = node.create_publisher(ObjectInstanceArray, '~/objects', latched)
        self.detections_pub = (node.create_publisher(Detection3DArray, '~/detections', latched)
                               if Detection3DArray is not None else None)

    @staticmethod
    def extract(xyz: np.ndarray, scores: np.ndarray, label: str, cfg: MapperConfig) -> List[ObjectInstance]:
        """The answer's voxels (centres (N, 3), scores (N,)) split with the config's ``objects`` section."""
        return extract_objects(xyz, scores, cfg.map.voxel_size_m, label, cfg.objects.gap_vox,
                               cfg.objects.min_voxels)

    def publish(self, objects: Sequence[ObjectInstance], stamp) -> ObjectInstanceArray:
        """Publish ``objects`` (array, markers, detections); returns the array message."""
        array = to_array(objects, self.map_frame, stamp)
        self.objects_pub.publish(array)
        self.marker_pub.publish(conv.make_box_markers(
            np.array([o.box_min for o in objects]).reshape(-1, 3), np.array([o.box_max for o in objects]).reshape(-1, 3),
            [f'{o.label} {o.score:.2f}' for o in objects], self.map_frame, stamp))
        if self.detections_pub is not None:
            self.detections_pub.publish(to_detections(array))
        return array
