"""Object instances as messages: ov3d_ros/ObjectInstanceArray and, where vision_msgs is installed,
vision_msgs/Detection3DArray."""
import numpy as np
import pytest

from ov3d_ros.core.objects import extract_objects
from ov3d_ros.ros import objects as ros_objects


def two_objects():
    a = (np.stack(np.meshgrid(np.arange(4), np.arange(4), np.arange(4), indexing='ij'), -1).reshape(-1, 3) + 0.5) * 0.1
    b = a + [2.0, 0.0, 0.0]
    return extract_objects(np.concatenate([a, b]), np.r_[np.full(64, 0.6), np.full(64, 0.8)], 0.1, 'chair')


def test_object_array_message():
    from ov3d_ros.ros.conversions import sec_to_stamp
    arr = ros_objects.to_array(two_objects(), 'map', sec_to_stamp(12.5))
    assert arr.header.frame_id == 'map' and arr.header.stamp.sec == 12 and len(arr.objects) == 2
    best = arr.objects[0]
    assert best.label == 'chair' and best.score == pytest.approx(0.8) and best.voxels == 64
    assert (best.centroid.x, best.centroid.y, best.centroid.z) == pytest.approx((2.2, 0.2, 0.2))
    assert (best.box_pose.position.x, best.box_pose.position.y) == pytest.approx((2.2, 0.2))
    assert best.box_pose.orientation.w == 1.0
    assert (best.box_size.x, best.box_size.y, best.box_size.z) == pytest.approx((0.4, 0.4, 0.4))


def test_detection3d_array_where_vision_msgs_is_installed():
    pytest.importorskip('vision_msgs.msg', reason='vision_msgs is optional and not installed')
    arr = ros_objects.to_array(two_objects(), 'map', None)
    det = ros_objects.to_detections(arr)
    assert det.header.frame_id == 'map' and len(det.detections) == 2
    d = det.detections[1]
    assert d.id == '1' and d.results[0].hypothesis.class_id == 'chair'
    assert d.results[0].hypothesis.score == pytest.approx(0.6)
    assert d.bbox.center.position.x == pytest.approx(0.2) and d.bbox.size.z == pytest.approx(0.4)
