"""Object instances over real ROS 2: a node resumes a map with two separated chairs; one query answers two objects
in the SegmentByText response, on the latched ~/objects topic and as two boxes on ~/segmentation_markers."""
import time

import numpy as np
import pytest

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Frame, Mapper


@pytest.fixture()
def two_chairs_map(tmp_path):
    """(path, centres of the two chairs' image halves in the map frame): a wall 2 m ahead, two chair patches
    (left and right thirds, bottom) with wall between them, mapped with the demo's feature source."""
    from ov3d_ros.sim import CLASS_NAMES
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_preset, cfg.map.device = 'simulated', 'clean', 'cpu'
    mapper = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    w, h = 192, 128
    cam = PinholeCamera(100.0, 100.0, (w - 1) / 2, (h - 1) / 2, w, h)
    labels = np.full((h, w), CLASS_NAMES.index('wall'), np.uint16)
    labels[48:, :64] = CLASS_NAMES.index('chair')
    labels[48:, 128:] = CLASS_NAMES.index('chair')
    rgb = np.full((h, w, 3), 120, np.uint8)
    rgb[labels == CLASS_NAMES.index('chair')] = (200, 40, 40)
    depth = np.full((h, w), 2.0, np.float32)
    for i in range(3):
        mapper.integrate(Frame(rgb, depth, cam, np.eye(4), float(i), labels), force=True)
    path = tmp_path / 'maps' / 'two_chairs.ov3dmap'
    mapper.save(path)
    # camera optical frame = map frame (identity pose): x right, y down, z forward; 2 cm per pixel at 2 m
    left_x = (np.mean([0, 63]) - cam.cx) * 2.0 / cam.fx
    right_x = (np.mean([128, 191]) - cam.cx) * 2.0 / cam.fx
    return path, (left_x, right_x)


def test_two_chairs_are_two_objects_in_the_answer_and_on_the_topic(two_chairs_map, start_node):
    from visualization_msgs.msg import Marker, MarkerArray
    from ov3d_ros.msg import ObjectInstanceArray
    path, (left_x, right_x) = two_chairs_map
    node, client = start_node([f'map_path:={path}', 'load_map_on_start:=true'])
    got = {'objects': [], 'markers': [], 'detections': []}
    client.node.create_subscription(ObjectInstanceArray, '/ov3d_mapping/objects', got['objects'].append,
                                    _latched())
    try:        # optional: the node publishes vision_msgs/Detection3DArray only where vision_msgs is installed
        from vision_msgs.msg import Detection3DArray
        client.node.create_subscription(Detection3DArray, '/ov3d_mapping/detections', got['detections'].append,
                                        _latched())
    except ImportError:
        Detection3DArray = None
    client.node.create_subscription(MarkerArray, '/ov3d_mapping/segmentation_markers', got['markers'].append,
                                    _latched())
    answer = client.query('chair')
    assert answer['success'], answer['message']
    objects = answer['objects']
    assert len(objects) == 2, (answer['message'], [(o.voxels, o.centroid) for o in objects])
    assert '2 object(s)' in answer['message']
    xs = sorted(o.centroid.x for o in objects)
    assert xs[0] == pytest.approx(left_x, abs=0.1) and xs[1] == pytest.approx(right_x, abs=0.1)
    for o in objects:
        assert o.label == 'chair' and 0.0 < o.score <= 1.0
        assert o.centroid.z == pytest.approx(2.0, abs=0.1)
        assert o.box_pose.orientation.w == 1.0
        assert 1.0 < o.box_size.x < 1.6 and o.box_size.z < 0.3          # 64 px = 1.28 m wide, one wall deep
        assert o.box_pose.position.x - o.box_size.x / 2 <= o.centroid.x <= o.box_pose.position.x + o.box_size.x / 2
    assert sum(o.voxels for o in objects) <= len(answer['scores'])
    assert sum(o.voxels for o in objects) >= 0.9 * len(answer['scores'])     # the two chairs are the answer

    end = time.monotonic() + 10
    while time.monotonic() < end and not (got['objects'] and got['markers']):
        client.spin(0.2)
    topic = got['objects'][-1]
    assert topic.header.frame_id == 'map' and len(topic.objects) == 2
    assert [o.voxels for o in topic.objects] == [o.voxels for o in objects]
    boxes = [m for m in got['markers'][-1].markers if m.type == Marker.LINE_LIST]
    assert len(boxes) == 2 and got['markers'][-1].markers[0].action == Marker.DELETEALL
    if Detection3DArray is not None:
        while time.monotonic() < end and not got['detections']:
            client.spin(0.2)
        assert len(got['detections'][-1].detections) == 2

    # a query that matches nothing clears the objects
    none = client.query('chair', threshold=1.0)
    assert none['success'] and none['objects'] == [] and len(none['scores']) == 0
    assert node.alive()


def _latched():
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    return QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
