"""The label volume on the real node: ~/set_vocabulary, ~/label_cloud, ~/label_legend, vocabulary queries."""
import json
import time

import numpy as np
from sensor_msgs.msg import PointCloud2
from std_msgs.msg import String

from ov3d_ros.core.label_volume import class_colors
from ov3d_ros.ros import conversions as conv
from ov3d_ros.srv import SetVocabulary

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
