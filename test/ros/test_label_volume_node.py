"""The label volume on the real node: ~/set_vocabulary, ~/label_cloud, ~/label_legend, vocabulary queries."""
import json
import time

import numpy as np
from sensor_msgs.msg import PointCloud2
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import String
from std_srvs.srv import Trigger

from ov3d_ros.core.label_volume import class_colors
from ov3d_ros.ros import conversions as conv
from ov3d_ros.srv import SetVocabulary

LATCHED = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
VOCAB = ['wall', 'floor', 'sofa', 'bed', 'table', 'chair']


def set_vocabulary(client, classes):
    return client.call(SetVocabulary, '/ov3d_mapping/set_vocabulary', SetVocabulary.Request(classes=classes))


def test_set_vocabulary_publishes_class_cloud_and_answers_from_it(saved_map, start_node):
    path, voxels = saved_map
    node, client = start_node([f'map_path:={path}', 'load_map_on_start:=true', 'label_publish_rate_hz:=2.0'])
    clouds, legends = [], []
    client.node.create_subscription(PointCloud2, '/ov3d_mapping/label_cloud', clouds.append, 10)
    client.node.create_subscription(String, '/ov3d_mapping/label_legend', legends.append, 10)
    before = client.query('sofa')
    assert before['success'] and 'from the features' in before['message']
    answer = set_vocabulary(client, VOCAB)
    assert answer.success and list(answer.classes) == VOCAB, answer.message
    end = time.monotonic() + 15
    while time.monotonic() < end and not (clouds and legends and json.loads(legends[-1].data)):
        client.spin(0.3)
    assert clouds, node.log()[-2000:]
    legend = json.loads(legends[-1].data)
    assert [e['class'] for e in legend] == VOCAB and legend[2]['rgb'] == class_colors(6)[2].tolist()
    cloud = conv.pointcloud2_to_numpy(clouds[-1])
    assert 0.5 * voxels < len(cloud) <= voxels
    colours = {tuple(c) for c in conv.unpack_rgb(cloud['rgb'])}
    assert colours <= {tuple(c) for c in class_colors(6)} and len(colours) >= 4
    assert np.all((cloud['score'] > 0) & (cloud['score'] <= 1))
    sofa = client.query('Sofa')
    assert sofa['success'] and len(sofa['xyz']) > 50 and 'label volume' in sofa['message'], sofa['message']
    refused = set_vocabulary(client, ['chair', 'Chair'])
    assert not refused.success and 'unique' in refused.message and list(refused.classes) == VOCAB
    off = set_vocabulary(client, [])
    assert off.success and list(off.classes) == []
    assert client.query('sofa')['success'] and node.alive()
    # latched outputs follow: a late subscriber gets an empty label cloud once the vocabulary is off, and an empty
    # map cloud once the map is cleared (they kept the classes and the map before)
    assert len(latest(client, '/ov3d_mapping/map_cloud', lambda n: n > 0)) > 0.5 * voxels
    assert len(latest(client, '/ov3d_mapping/label_cloud', lambda n: n == 0)) == 0
    assert client.call(Trigger, '/ov3d_mapping/clear_map', Trigger.Request()).success
    assert len(latest(client, '/ov3d_mapping/map_cloud', lambda n: n == 0)) == 0, node.log()[-2000:]


def latest(client, topic: str, wanted, timeout_s: float = 20.0):
    """The points of the cloud a new latched subscriber of ``topic`` gets (subscribed again until ``wanted(number
    of points)`` or ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    while True:
        got = []
        sub = client.node.create_subscription(PointCloud2, topic, got.append, LATCHED)
        try:
            for _ in range(10):
                client.spin(0.2)
                if got:
                    break
        finally:
            client.node.destroy_subscription(sub)
        cloud = conv.pointcloud2_to_numpy(got[-1]) if got else None
        if (cloud is not None and wanted(len(cloud))) or time.monotonic() > end:
            assert cloud is not None, f'nothing latched on {topic}'
            return cloud
