"""Shared fixtures of the ROS tests: a mapping node process on a private domain, a publisher of hand-made input,
and a cheap Mapper with the simulated feature source."""
import contextlib
import os
import time

import numpy as np
import pytest
import rclpy
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CameraInfo, Image

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Frame, Mapper
from ov3d_ros.ros import conversions as conv
from ov3d_ros.tools.demo_client import DemoClient
from ov3d_ros.tools.ros_graph import private_ros_env, start_mapping_node

SIM_NAMES = ['unlabeled', 'wall', 'chair', 'plant']


class BadInputPublisher:
    """Publishes hand-made frames on the node's input topics through the graph's client and waits for the errors
    the node reports on ~/status."""

    def __init__(self, client):
        self.client = client
        self.node = rclpy.create_node('bad_input', context=client.context)
        self.pubs = {t: self.node.create_publisher(m, t, 10) for t, m in [
            ('color/image', Image), ('depth/image', Image), ('labels/image', Image),
            ('color/camera_info', CameraInfo), ('pose', PoseStamped)]}
        client.executor.add_node(self.node)

    def now(self) -> float:
        """This publisher's clock (the node's clock too), seconds."""
        return self.node.get_clock().now().nanoseconds * 1e-9

    def send(self, rgb, depth, depth_encoding='16UC1', camera=None, labels=None, stamp=None,
             quaternion=(0, 0, 0, 1), position=(0, 0, 0), pose_frame='map', poses=None):
        """One frame with one stamp (seconds, default now): camera info (when ``camera`` is given), pose, colour,
        labels, depth. ``camera`` is a PinholeCamera or a CameraInfo message; ``quaternion`` is (x, y, z, w);
        ``pose_frame`` is the pose's header.frame_id; ``poses``: (seconds after the stamp, position) pairs
        published instead of the one pose at the stamp."""
        t = self.now() if stamp is None else stamp
        header = conv.make_header('camera', conv.sec_to_stamp(t))
        if camera is not None:
            info = camera if isinstance(camera, CameraInfo) else conv.camera_to_camera_info(camera)
            info.header = header
            self.pubs['color/camera_info'].publish(info)
        for dt, xyz in ((0.0, position),) if poses is None else poses:
            pose = PoseStamped()
            pose.header = conv.make_header(pose_frame, conv.sec_to_stamp(t + dt))
            q, p = pose.pose.orientation, pose.pose.position
            q.x, q.y, q.z, q.w = (float(v) for v in quaternion)
            p.x, p.y, p.z = (float(v) for v in xyz)
            self.pubs['pose'].publish(pose)
        self.pubs['color/image'].publish(conv.numpy_to_image(rgb, 'rgb8', header))
        lab = labels if labels is not None else np.zeros(depth.shape[:2], np.uint16)
        self.pubs['labels/image'].publish(conv.numpy_to_image(lab, 'mono16', header))
        self.pubs['depth/image'].publish(conv.numpy_to_image(depth, depth_encoding, header))

    def wait_for_error(self, text, timeout_s=15.0):
        """The node's status once its last_error contains ``text`` (AssertionError after ``timeout_s``)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            self.client.spin(0.3)
            if self.client.status and text in self.client.status['last_error']:
                return self.client.status
        raise AssertionError(f'no error containing {text!r}; last status {self.client.status}')

    def close(self):
        self.client.executor.remove_node(self.node)
        self.node.destroy_node()


@contextlib.contextmanager
def private_domain():
    """This process on a private ROS_DOMAIN_ID with localhost discovery; the environment is restored after."""
    env = private_ros_env()
    old = {k: os.environ.get(k) for k in ('ROS_DOMAIN_ID', 'ROS_AUTOMATIC_DISCOVERY_RANGE')}
    os.environ.update({k: env[k] for k in old})
    try:
        yield env
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


@pytest.fixture()
def start_node(tmp_path):
    """``start_node(params) -> (node process, DemoClient)``: a mapping node (config/demo.yaml + ``params``) on a
    private domain, its service up; stopped after the test."""
    started = []
    with private_domain() as env:
        def start(params=()):
            node = start_mapping_node(env, tmp_path / 'node.log', params=list(params))
            client = DemoClient()
            started.append((node, client))
            assert client.wait_for_service(node, 120.0), node.log()
            return node, client
        try:
            yield start
        finally:
            for node, client in started:
                client.close()
                node.stop()


@pytest.fixture()
def saved_map(tmp_path, room_mapper_factory):
    """(path, voxels) of a map of the built-in scene written by the core, with the demo's feature source."""
    mapper = room_mapper_factory()
    path = tmp_path / 'room.ov3dmap'
    mapper.save(path)
    return path, mapper.map.size


@pytest.fixture(scope='module')
def graph(tmp_path_factory):
    """A mapping node process (config/demo.yaml: simulated features, pose topic; maps saved and loaded inside
    its output folder) and a DemoClient, per module: {'env', 'node', 'client', 'out'}."""
    out = tmp_path_factory.mktemp('pipeline')
    with private_domain() as env:
        node = start_mapping_node(env, out / 'node.log', params=[f'map_path:={out / "map.ov3dmap"}'])  # map_dir: out
        client = DemoClient()
        try:
            assert client.wait_for_service(node, 120.0), node.log()
            yield {'env': env, 'node': node, 'client': client, 'out': out}
        finally:
            client.close()
            node.stop()


@contextlib.contextmanager
def in_process_node(ros_args=(), **params):
    """(node, client, pub): a MappingNode in this process with the demo's settings (simulated features, clean preset,
    poses on 'pose', reliable inputs), ``params`` and ``ros_args`` (command-line ROS arguments: remaps), spun by a
    DemoClient's executor (timers, callbacks and services run inside ``client.spin``), and a BadInputPublisher; on
    a private domain, all closed after."""
    from rclpy.parameter import Parameter
    from ov3d_ros.ros.mapping_node import MappingNode
    overrides = {'features.source': 'simulated', 'features.sim_preset': 'clean', 'pose_source': 'pose',
                 'input_qos': 'reliable', **params}
    with private_domain():
        client = DemoClient()
        node = MappingNode(context=client.context, cli_args=['--ros-args', *ros_args] if ros_args else None,
                           parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        client.executor.add_node(node)
        pub = BadInputPublisher(client)
        try:
            yield node, client, pub
        finally:
            pub.close()
            client.executor.remove_node(node)
            node.destroy_node()
            client.close()


@pytest.fixture(scope='module')
def local_node():
    """:func:`in_process_node` for a module: {'node', 'client', 'pub'}."""
    with in_process_node() as (node, client, pub):
        yield {'node': node, 'client': client, 'pub': pub}


@pytest.fixture()
def bad_input(graph):
    """A BadInputPublisher on the graph's client, removed after the test."""
    pub = BadInputPublisher(graph['client'])
    yield pub
    pub.close()


@pytest.fixture(scope='session')
def sim_extractor():
    """The simulated feature source over SIM_NAMES (loads the sentence model once per session)."""
    from ov3d_ros.core.features import create_extractor
    return create_extractor(sim_config().features, 'cpu', SIM_NAMES)


def sim_config() -> MapperConfig:
    """A small, fast config: simulated features at 4 px patches, 10 cm voxels, bare query texts."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.pixel_stride, cfg.map.device, cfg.map.initial_capacity = 0.1, 1, 'cpu', 1024
    cfg.query.templates = []
    return cfg


@pytest.fixture()
def new_sim_mapper(sim_extractor):
    """A factory of fresh empty Mappers on the shared simulated feature source, its frame counter restarted: the
    simulated errors of a test's frames are the same whatever ran before it in the session (the source is shared
    only to load the sentence model once)."""
    def make():
        sim_extractor.reset()
        return Mapper(sim_config(), sim_extractor)
    return make


def _wall_frame(stamp_s: float = 0.0) -> Frame:
    """A wall 2 m in front of the camera (64x48): left half labelled chair, right half plant, top rows wall, each
    region in a colour of its own (different objects)."""
    cam = PinholeCamera(40.0, 40.0, 31.5, 23.5, 64, 48)
    labels = np.full((48, 64), 1, np.uint16)
    labels[16:, :32] = 2
    labels[16:, 32:] = 3
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[16:, :32] = (60, 60, 200)
    rgb[16:, 32:] = (40, 160, 40)
    return Frame(rgb, np.full((48, 64), 2.0, np.float32), cam, np.eye(4), stamp_s, labels)


@pytest.fixture()
def wall_frame():
    """A builder of fresh wall frames for SIM_NAMES: ``wall_frame(stamp_s=0.0)``."""
    return _wall_frame
