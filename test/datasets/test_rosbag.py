import io
import math
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image as PILImage

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.mapper import Frame
from ov3d_ros.datasets import DatasetError
from ov3d_ros.datasets.poses import matrix_to_quat
from ov3d_ros.datasets.rosbag import COMPRESSED_IMAGE, IMAGE, ODOMETRY, BagReader, BagTopics, BagWriter, write_bag

W, H = 40, 30
CAM = PinholeCamera(50.0, 52.0, 19.5, 14.25, W, H)


def rot(axis, angle):
    """Rodrigues rotation (independent of the module's quaternion code)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    K = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(angle) * K + (1 - math.cos(angle)) * K @ K


def pose(R, t):
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


def make_frames(n=5, seed=0):
    rng = np.random.default_rng(seed)
    frames = []
    for i in range(n):
        rgb = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        mm = rng.integers(300, 9000, (H, W)).astype(np.uint16)
        mm[rng.random((H, W)) < 0.1] = 0                                   # holes
        depth = mm.astype(np.float32) / np.float32(1000.0)                 # mm-exact metres
        labels = rng.integers(0, 70000, (H, W)) % 65536
        T = pose(rot(rng.normal(size=3), rng.uniform(0.1, 3.0)), rng.normal(size=3))
        frames.append(Frame(rgb, depth, CAM, T, 1.0 + 0.2 * i, labels.astype(np.int64)))
    return frames


def check_same(frames, got, check_labels=True):
    assert len(got) == len(frames)
    for f, g in zip(frames, got):
        assert np.array_equal(g.rgb, f.rgb) and g.rgb.dtype == np.uint8 and g.rgb.shape == (H, W, 3)
        assert g.depth_m.dtype == np.float32 and np.array_equal(g.depth_m, f.depth_m)
        assert np.allclose(g.T_W_C, f.T_W_C, atol=1e-9)
        assert g.stamp_s == pytest.approx(f.stamp_s, abs=1e-9)
        assert g.camera == CAM
        if check_labels:
            assert np.array_equal(g.labels, f.labels)


@pytest.fixture(scope='module')
def frames():
    return make_frames()


@pytest.fixture(scope='module', params=['mcap', 'sqlite3'])
def bag(request, tmp_path_factory, frames):
    path = tmp_path_factory.mktemp(request.param) / 'bag'
    assert write_bag(path, frames, CAM, storage=request.param) == len(frames)
    return path


def test_round_trip(bag, frames):
    reader = BagReader(bag)
    assert len(reader) == 5 and reader.skipped == {} and reader.camera == CAM and reader.path == bag
    assert reader.topics.color == '/color/image' and reader.topics.labels == '/labels/image' and reader.has_labels
    got = list(reader)
    check_same(frames, got)
    check_same(frames[2:3], [reader.read(2)])
    assert list(reader)[4].stamp_s == got[4].stamp_s                      # iterable more than once


def test_single_storage_file_and_topic_names(bag, frames):
    (storage_file,) = [p for p in bag.iterdir() if p.suffix in ('.mcap', '.db3')]
    topics = BagTopics(color='/color/image', depth='depth/image/', camera_info='color/camera_info',
                       labels='', pose='/pose')
    reader = BagReader(storage_file, topics)
    assert len(reader) == 5 and not reader.has_labels
    got = list(reader)
    check_same(frames, got, check_labels=False)
    assert all(g.labels is None for g in got)


def test_tf_pose_source_gives_the_same_poses(bag, frames):
    reader = BagReader(bag, BagTopics(pose_source='tf', pose=''))
    assert len(reader) == 5
    check_same(frames, list(reader))
    with pytest.raises(DatasetError, match="'world'.*camera_color_optical_frame"):
        BagReader(bag, BagTopics(pose_source='tf', map_frame='world'))


# ------------------------------------------------------------------------------------------------- sync
def write_synced(path, frames, color_offset_s=0.0, drop_color=(), storage='mcap', pose_stamps=None, poses=None):
    """Writes frames message by message; colour stamps shifted by ``color_offset_s``."""
    with BagWriter(path, storage) as b:
        for i, f in enumerate(frames):
            t = f.stamp_s
            b.write_camera_info('color/camera_info', CAM, t)
            if i not in drop_color:
                b.write_image('color/image', f.rgb, 'rgb8', t + color_offset_s)
            b.write_image('depth/image', np.round(f.depth_m * 1000).astype(np.uint16), '16UC1', t)
            if pose_stamps is None:
                b.write_pose('pose', f.T_W_C, t)
        for t, T in zip(pose_stamps or (), poses or ()):
            b.write_pose('pose', T, t)


def test_sync_pairs_within_slop_and_skips_the_rest(tmp_path, frames):
    frames = [replace(f, stamp_s=1.0 + 0.5 * i) for i, f in enumerate(frames)]   # 0.5 s apart
    write_synced(tmp_path / 'a', frames, color_offset_s=0.01)
    reader = BagReader(tmp_path / 'a', sync_slop_s=0.05)
    assert len(reader) == 5 and reader.skipped == {}
    check_same(frames, list(reader), check_labels=False)                  # stamps are the depth stamps

    write_synced(tmp_path / 'b', frames, color_offset_s=0.2, storage='sqlite3')
    with pytest.raises(DatasetError, match=r'no frame could be paired.*5 had no colour image on /color/image '
                                           r'within 0.05 s \(median offset to the nearest: 0.200 s\)'):
        BagReader(tmp_path / 'b', sync_slop_s=0.05)
    assert len(BagReader(tmp_path / 'b', sync_slop_s=0.25)) == 5

    write_synced(tmp_path / 'c', frames, drop_color=(1, 3))
    reader = BagReader(tmp_path / 'c', sync_slop_s=0.05)
    assert len(reader) == 3 and reader.skipped == {'no_color': 2}
    check_same([frames[i] for i in (0, 2, 4)], list(reader), check_labels=False)


def test_pose_interpolation_and_slop(tmp_path, frames):
    # frames at 1.0, 1.2, 1.4 s; poses at 0.95 s (identity) and 1.35 s (90 deg about z, x + 1)
    T0, T1 = np.eye(4), pose(rot([0, 0, 1], math.pi / 2), [1.0, 0, 0])
    write_synced(tmp_path / 'p', frames[:3], pose_stamps=[0.95, 1.35], poses=[T0, T1])
    reader = BagReader(tmp_path / 'p', sync_slop_s=0.04, pose_max_gap_s=0.5)
    assert len(reader) == 2 and reader.skipped == {'no_pose': 1}          # 1.4 s is past the last pose + slop
    for f, a in zip(reader, (0.125, 0.625)):                              # interpolated between T0 and T1
        assert np.allclose(f.T_W_C, pose(rot([0, 0, 1], a * math.pi / 2), [a, 0, 0]), atol=1e-9)
    # bracketing poses too far apart to interpolate: the nearest pose within the slop, if any
    reader = BagReader(tmp_path / 'p', sync_slop_s=0.06, pose_max_gap_s=0.3)
    assert len(reader) == 2 and reader.skipped == {'no_pose': 1}
    got = list(reader)
    assert np.allclose(got[0].T_W_C, T0) and np.allclose(got[1].T_W_C, T1)
    assert [f.stamp_s for f in got] == pytest.approx([1.0, 1.4])
    with pytest.raises(DatasetError, match='3 had no pose on /pose within 0.01 s'):
        BagReader(tmp_path / 'p', sync_slop_s=0.01, pose_max_gap_s=0.3)


def test_tf_chain_and_odometry(tmp_path, frames):
    T_base_cam = pose(rot([1, 1, 0], 1.1), [0.1, -0.2, 0.3])
    T_map_odom = pose(rot([0, 0, 1], 0.3), [5.0, 0, 0])
    T_odom_base = [pose(rot([0, 0, 1], 0.2 * i), [0.5 * i, 0.1, 0]) for i in range(3)]
    with BagWriter(tmp_path / 'tf') as b:
        b.write_tf([('base_link', 'cam_optical', T_base_cam)], 0.5, static=True)
        b.write_tf([('map', 'odom', T_map_odom)], 0.5, static=True)
        for i, f in enumerate(frames[:3]):
            t = f.stamp_s
            b.write_camera_info('color/camera_info', CAM, t, 'cam_optical')
            b.write_image('color/image', f.rgb, 'rgb8', t, 'cam_optical')
            b.write_image('depth/image', np.round(f.depth_m * 1000).astype(np.uint16), '16UC1', t, 'cam_optical')
            b.write_tf([('/odom', '/base_link', T_odom_base[i])], t)
            x, y, z, w = matrix_to_quat(T_odom_base[i][:3, :3])
            odom = b.types[ODOMETRY](header=b.header('odom', t), child_frame_id='base_link',
                                     pose=b.types['geometry_msgs/msg/PoseWithCovariance'](
                                         pose=b.types['geometry_msgs/msg/Pose'](
                                             position=b.types['geometry_msgs/msg/Point'](*T_odom_base[i][:3, 3]),
                                             orientation=b.types['geometry_msgs/msg/Quaternion'](x, y, z, w)),
                                         covariance=np.zeros(36)),
                                     twist=b.types['geometry_msgs/msg/TwistWithCovariance'](
                                         twist=b.types['geometry_msgs/msg/Twist'](
                                             linear=b.types['geometry_msgs/msg/Vector3'](0, 0, 0),
                                             angular=b.types['geometry_msgs/msg/Vector3'](0, 0, 0)),
                                         covariance=np.zeros(36)))
            b.write('odom', odom, t)
    tf = BagReader(tmp_path / 'tf', BagTopics(pose_source='tf'))
    for i, f in enumerate(tf):
        assert np.allclose(f.T_W_C, T_map_odom @ T_odom_base[i] @ T_base_cam, atol=1e-9)
    odom = BagReader(tmp_path / 'tf', BagTopics(pose_source='odometry', pose='odom'))
    for i, f in enumerate(odom):     # odometry of base_link, composed with the static base_link → camera
        assert np.allclose(f.T_W_C, T_odom_base[i] @ T_base_cam, atol=1e-9)
    assert len(odom) == len(tf) == 3


# ------------------------------------------------------------------------------------------------- encodings
def test_bgr8_32fc1_step_padding_and_big_endian(tmp_path, frames):
    f = frames[0]
    depth = f.depth_m.copy()
    depth[0, :3] = [np.nan, np.inf, 0.0]
    with BagWriter(tmp_path / 'enc', 'sqlite3') as b:
        b.write_camera_info('color/camera_info', CAM, 1.0)
        b.write_image('color/image', np.ascontiguousarray(f.rgb[..., ::-1]), 'bgr8', 1.0, step=W * 3 + 7)
        b.write_image('depth/image', depth, '32FC1', 1.0, step=W * 4 + 8, bigendian=True)
        b.write_image('labels/image', f.labels.astype(np.uint16), 'mono16', 1.0, step=W * 2 + 2, bigendian=True)
        b.write_pose('pose', f.T_W_C, 1.0)
    (g,) = list(BagReader(tmp_path / 'enc'))
    assert np.array_equal(g.rgb, f.rgb)
    expect = depth.copy()
    expect[0, :2] = 0.0                                                   # NaN / inf → invalid (0)
    assert g.depth_m.dtype == np.float32 and np.array_equal(g.depth_m, expect)
    assert g.labels.dtype == np.uint16 and np.array_equal(g.labels, f.labels)


def test_other_colour_encodings_and_compressed(tmp_path, frames):
    f = frames[1]
    rgba = np.concatenate([f.rgb, np.full((H, W, 1), 7, np.uint8)], axis=-1)
    cases = {'rgba8': (rgba, f.rgb), 'bgra8': (np.ascontiguousarray(rgba[..., [2, 1, 0, 3]]), f.rgb),
             'mono8': (f.rgb[..., 0].copy(), np.repeat(f.rgb[..., :1], 3, axis=-1))}
    for enc, (data, expect) in cases.items():
        with BagWriter(tmp_path / enc) as b:
            b.write_camera_info('color/camera_info', CAM, 1.0)
            b.write_image('color/image', data, enc, 1.0)
            b.write_image('depth/image', np.round(f.depth_m * 1000).astype(np.uint16), 'mono16', 1.0)
            b.write_pose('pose', f.T_W_C, 1.0)
        (g,) = list(BagReader(tmp_path / enc))
        assert np.array_equal(g.rgb, expect), enc
        assert np.array_equal(g.depth_m, f.depth_m)
    buf = io.BytesIO()
    PILImage.fromarray(f.rgb).save(buf, format='png')
    with BagWriter(tmp_path / 'png') as b:
        b.write_camera_info('color/camera_info', CAM, 1.0)
        b.write('color/image/compressed', b.types[COMPRESSED_IMAGE](header=b.header('cam', 1.0), format='png',
                                                                     data=np.frombuffer(buf.getvalue(), np.uint8)), 1.0)
        b.write_image('depth/image', np.round(f.depth_m * 1000).astype(np.uint16), '16UC1', 1.0)
        b.write_pose('pose', f.T_W_C, 1.0)
    reader = BagReader(tmp_path / 'png')                                   # found from the default color/image
    assert reader.topics.color == '/color/image/compressed'
    assert np.array_equal(next(iter(reader)).rgb, f.rgb)


# ------------------------------------------------------------------------------------------------- bad input
def raw_image(b, encoding, w, h, step, nbytes, t=1.0):
    return b.types[IMAGE](header=b.header('cam', t), height=h, width=w, encoding=encoding, is_bigendian=0,
                          step=step, data=np.zeros(nbytes, np.uint8))


def test_bad_paths_and_topics(tmp_path, bag):
    with pytest.raises(DatasetError, match='no such bag'):
        BagReader(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='no metadata.yaml'):
        BagReader(tmp_path / 'empty')
    (tmp_path / 'x.txt').write_text('hi')
    with pytest.raises(DatasetError, match='not a rosbag2 file'):
        BagReader(tmp_path / 'x.txt')
    (tmp_path / 'junk.mcap').write_bytes(b'not an mcap file at all' * 10)
    with pytest.raises(DatasetError, match='junk.mcap'):
        BagReader(tmp_path / 'junk.mcap')
    with pytest.raises(DatasetError, match=r"color topic '/rgb/image_raw' is not in the bag; available topics: "
                                           r".*/color/camera_info.*/depth/image.*/pose"):
        BagReader(bag, BagTopics(color='rgb/image_raw'))
    with pytest.raises(DatasetError, match="labels topic '/sem' is not in the bag"):
        BagReader(bag, BagTopics(labels='sem'))
    with pytest.raises(DatasetError, match='pose topic .* has type sensor_msgs/msg/Image'):
        BagReader(bag, BagTopics(pose='depth/image'))
    with pytest.raises(DatasetError, match='pose_source'):
        BagTopics(pose_source='gps')
    with pytest.raises(DatasetError, match='exists already'):
        write_bag(bag, make_frames(1), CAM)


def test_unsupported_encodings_and_corrupt_data(tmp_path, frames):
    f = frames[0]
    cases = {'yuv': ('yuv422', 'depth', "colour encoding 'yuv422' not supported"),
             'depthenc': ('rgb8', 'rgb8', "depth encoding 'rgb8' not supported"),
             'short': ('rgb8', 'short', 'needs 3600 bytes of data, got 100')}
    for name, (color_enc, depth_kind, msg) in cases.items():
        with BagWriter(tmp_path / name) as b:
            b.write_camera_info('color/camera_info', CAM, 1.0)
            b.write('color/image', raw_image(b, color_enc, W, H, W * 3, 100 if depth_kind == 'short' else W * H * 3),
                    1.0)
            if depth_kind == 'rgb8':
                b.write_image('depth/image', f.rgb, 'rgb8', 1.0)
            else:
                b.write_image('depth/image', np.ones((H, W), np.uint16), '16UC1', 1.0)
            b.write_pose('pose', f.T_W_C, 1.0)
        reader = BagReader(tmp_path / name)
        with pytest.raises(DatasetError, match=msg):
            list(reader)


def test_size_mismatches(tmp_path, frames):
    f = frames[0]
    with BagWriter(tmp_path / 'info') as b:
        b.write_camera_info('color/camera_info', PinholeCamera(50, 50, 20, 15, 64, 48), 1.0)
        b.write_image('color/image', f.rgb, 'rgb8', 1.0)
        b.write_image('depth/image', np.ones((H, W), np.uint16), '16UC1', 1.0)
        b.write_pose('pose', f.T_W_C, 1.0)
    with pytest.raises(DatasetError, match=r'camera info \(/color/camera_info\) is 64x48 but the images are 40x30'):
        BagReader(tmp_path / 'info')
    with BagWriter(tmp_path / 'rgbd') as b:
        b.write_camera_info('color/camera_info', CAM, 1.0)
        b.write_image('color/image', f.rgb[:20], 'rgb8', 1.0)
        b.write_image('depth/image', np.ones((H, W), np.uint16), '16UC1', 1.0)
        b.write_pose('pose', f.T_W_C, 1.0)
    with pytest.raises(DatasetError, match='depth images .* are 40x30 but colour images .* are 40x20'):
        BagReader(tmp_path / 'rgbd')


def test_write_bag_rejects_bad_frames_without_leaving_a_bag(tmp_path, frames):
    bad = Frame(frames[0].rgb[:10], frames[0].depth_m, CAM, np.eye(4), 1.0)
    with pytest.raises(DatasetError, match='colour must be'):
        write_bag(tmp_path / 'bad', [frames[0], bad], CAM, storage='sqlite3')
    assert not (tmp_path / 'bad').exists()
    with pytest.raises(DatasetError, match='no frames'):
        write_bag(tmp_path / 'none', [], CAM)
    assert not (tmp_path / 'none').exists()
    with pytest.raises(DatasetError, match='storage'):
        write_bag(tmp_path / 'x', frames, CAM, storage='ros1')


def test_lens_distortion_of_raw_images_and_rectified_images(tmp_path, frames):
    """The bag's camera info keeps its lens model (raw images, the default); --rectified-images reads p instead."""
    f = frames[0]
    lens = replace(CAM, distortion_model='plumb_bob', distortion=(-0.2, 0.05, 0.001, 0.0, 0.0))
    with BagWriter(tmp_path / 'lens') as b:
        b.write_camera_info('color/camera_info', lens, 1.0)
        b.write_image('color/image', f.rgb, 'rgb8', 1.0)
        b.write_image('depth/image', np.ones((H, W), np.uint16), '16UC1', 1.0)
        b.write_pose('pose', f.T_W_C, 1.0)
    assert BagReader(tmp_path / 'lens').camera == lens
    rect = BagReader(tmp_path / 'lens', rectified=True).camera       # the writer's p is [k | 0]
    assert rect == CAM and not rect.distorted
