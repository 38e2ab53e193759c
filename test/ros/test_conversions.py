"""Message ↔ numpy conversions, on real ROS 2 message classes (and through CDR serialisation where it matters)."""
import array
import math
import time

import numpy as np
import pytest
from geometry_msgs.msg import Pose, PoseStamped, PoseWithCovarianceStamped, Transform, TransformStamped
from nav_msgs.msg import Odometry
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import CameraInfo, Image, PointCloud2, PointField
from visualization_msgs.msg import Marker

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.conversions import ConversionError

RNG = np.random.default_rng(0)


def wire(msg):
    """The message as a subscriber would receive it."""
    return deserialize_message(serialize_message(msg), type(msg))


def raw_image(encoding, h, w, step, data, bigendian=False):
    msg = Image(height=h, width=w, encoding=encoding, step=step, is_bigendian=int(bigendian))
    msg.data = array.array('B', bytes(data))
    return msg


# ------------------------------------------------------------------------------------------------ images
SAMPLES = {
    'rgb8': RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    'bgr8': RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    '8UC3': RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8),
    'rgba8': RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8),
    'bgra8': RNG.integers(0, 256, (5, 7, 4), dtype=np.uint8),
    'mono8': RNG.integers(0, 256, (5, 7), dtype=np.uint8),
    '8UC1': RNG.integers(0, 256, (5, 7), dtype=np.uint8),
    'mono16': RNG.integers(0, 65536, (5, 7), dtype=np.uint16),
    '16UC1': RNG.integers(0, 65536, (5, 7), dtype=np.uint16),
    '32FC1': RNG.normal(size=(5, 7)).astype(np.float32),
    '32SC1': RNG.integers(-2**31, 2**31 - 1, (5, 7), dtype=np.int32),
}


def test_every_encoding_is_covered():
    assert set(SAMPLES) == set(conv.ENCODINGS)


@pytest.mark.parametrize('encoding', sorted(SAMPLES))
def test_image_round_trip(encoding):
    arr = SAMPLES[encoding]
    msg = conv.numpy_to_image(arr, encoding, conv.make_header('cam', conv.sec_to_stamp(3.5)))
    assert isinstance(msg.data, array.array)
    assert (msg.height, msg.width, msg.encoding, msg.is_bigendian) == (5, 7, encoding, 0)
    assert msg.step == 7 * arr.itemsize * (arr.shape[2] if arr.ndim == 3 else 1)
    assert msg.header.frame_id == 'cam' and msg.header.stamp.sec == 3
    for m in (msg, wire(msg)):
        out = conv.image_to_numpy(m)
        assert out.dtype == arr.dtype and out.shape == arr.shape
        np.testing.assert_array_equal(out, arr)


@pytest.mark.parametrize('encoding', sorted(SAMPLES))
def test_padded_step_is_honoured(encoding):
    arr = SAMPLES[encoding]
    h, row = arr.shape[0], arr[0].nbytes
    step = row + 5                                            # odd padding, garbage in it
    buf = np.full((h, step), 0xAB, dtype=np.uint8)
    buf[:, :row] = np.ascontiguousarray(arr).view(np.uint8).reshape(h, row)
    msg = raw_image(encoding, h, arr.shape[1], step, buf.tobytes() + b'\x01\x02')   # extra trailing bytes ok
    np.testing.assert_array_equal(conv.image_to_numpy(msg), arr)


def test_big_endian_16uc1_built_by_hand():
    depth = np.array([[0, 1, 258], [1000, 65535, 4660]], dtype=np.uint16)
    data = b''.join(int(v).to_bytes(2, 'big') for v in depth.reshape(-1))
    msg = raw_image('16UC1', 2, 3, 6, data, bigendian=True)
    out = conv.image_to_numpy(msg)
    assert out.dtype == np.uint16 and out.dtype.isnative
    np.testing.assert_array_equal(out, depth)
    np.testing.assert_array_equal(conv.depth_to_meters(msg), (depth / 1000.0).astype(np.float32))


def test_big_endian_32fc1_with_padding():
    depth = np.array([[0.5, 1.25], [np.nan, 3.0]], dtype=np.float32)
    rows = np.zeros((2, 12), np.uint8)
    rows[:, :8] = depth.astype('>f4').view(np.uint8).reshape(2, 8)
    msg = raw_image('32FC1', 2, 2, 12, rows.tobytes(), bigendian=True)
    np.testing.assert_array_equal(conv.depth_to_meters(msg), [[0.5, 1.25], [0.0, 3.0]])


def test_image_is_a_view_when_no_conversion_is_needed():
    msg = conv.numpy_to_image(SAMPLES['16UC1'], '16UC1')
    out = conv.image_to_numpy(msg)
    assert np.shares_memory(out, np.frombuffer(msg.data, np.uint8))


def test_color_conversions_to_rgb():
    rgb = SAMPLES['rgb8']
    bgr = rgb[..., ::-1].copy()
    out = conv.color_to_rgb(conv.numpy_to_image(bgr, 'bgr8'))
    np.testing.assert_array_equal(out, rgb)
    assert out[0, 0, 0] == bgr[0, 0, 2] and out[0, 0, 2] == bgr[0, 0, 0]
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint8)
    for four, enc in ((np.concatenate([rgb, alpha], -1), 'rgba8'), (np.concatenate([bgr, alpha], -1), 'bgra8')):
        np.testing.assert_array_equal(conv.color_to_rgb(conv.numpy_to_image(four, enc)), rgb)
    mono = SAMPLES['mono8']
    out = conv.color_to_rgb(conv.numpy_to_image(mono, 'mono8'))
    assert out.shape == mono.shape + (3,)
    np.testing.assert_array_equal(out, np.stack([mono] * 3, -1))
    out = conv.color_to_rgb(conv.numpy_to_image(rgb, 'rgb8'))
    assert out.flags.writeable and out.flags.c_contiguous and out.dtype == np.uint8
    np.testing.assert_array_equal(out, rgb)


@pytest.mark.parametrize('encoding', ['16UC1', '32FC1', 'mono16'])
def test_color_rejects_depth_encodings(encoding):
    with pytest.raises(ConversionError, match=encoding):
        conv.color_to_rgb(conv.numpy_to_image(SAMPLES[encoding], encoding))


def test_depth_16uc1_millimetres_to_metres_exactly():
    mm = np.array([[0, 1, 999], [1000, 1500, 65535]], dtype=np.uint16)
    for enc in ('16UC1', 'mono16'):
        m = conv.depth_to_meters(conv.numpy_to_image(mm, enc))
        assert m.dtype == np.float32 and m.shape == (2, 3)
        np.testing.assert_array_equal(m, (mm / 1000.0).astype(np.float32))   # nearest float32 to mm/1000
        assert m[1, 0] == 1.0 and m[1, 1] == np.float32(1.5) and m[0, 0] == 0.0


def test_depth_32fc1_invalid_readings_become_zero():
    d = np.array([[1.5, np.nan, np.inf], [-np.inf, 0.0, 2.25]], dtype=np.float32)
    msg = conv.numpy_to_image(d, '32FC1')
    m = conv.depth_to_meters(msg)
    np.testing.assert_array_equal(m, [[1.5, 0, 0], [0, 0, 2.25]])
    assert np.isnan(conv.image_to_numpy(msg)[0, 1])              # the message itself is untouched


@pytest.mark.parametrize('encoding', ['rgb8', 'mono8', 'bgra8'])
def test_depth_rejects_colour_encodings(encoding):
    msg = conv.numpy_to_image(SAMPLES[encoding], encoding)
    with pytest.raises(ConversionError, match=rf"depth encoding '{encoding}' not supported; expected 16UC1"):
        conv.depth_to_meters(msg)


def test_unsupported_encoding_is_named():
    msg = raw_image('yuv422', 2, 2, 4, bytes(8))
    with pytest.raises(ConversionError, match="'yuv422' not supported"):
        conv.image_to_numpy(msg)
    with pytest.raises(ConversionError, match='yuv422'):
        conv.color_to_rgb(msg)
    with pytest.raises(ConversionError, match='bayer_rggb8'):
        conv.numpy_to_image(SAMPLES['mono8'], 'bayer_rggb8')


def test_short_data_is_rejected():
    msg = raw_image('rgb8', 4, 4, 12, bytes(12 * 4 - 1))
    with pytest.raises(ConversionError, match=r'rgb8 image 4x4 with step 12 needs 48 bytes of data, got 47'):
        conv.image_to_numpy(msg)
    with pytest.raises(ConversionError, match='16UC1'):
        conv.depth_to_meters(raw_image('16UC1', 3, 3, 6, bytes(10)))


def test_step_too_small_is_rejected():
    with pytest.raises(ConversionError, match=r'32FC1 image step 8 is smaller than width\*bytes_per_pixel'):
        conv.image_to_numpy(raw_image('32FC1', 2, 3, 8, bytes(64)))


@pytest.mark.parametrize('h, w', [(0, 4), (4, 0), (0, 0)])
def test_zero_size_is_rejected(h, w):
    with pytest.raises(ConversionError, match='16UC1 image has zero size'):
        conv.image_to_numpy(raw_image('16UC1', h, w, 2 * w, bytes(64)))
    with pytest.raises(ConversionError, match='zero size'):
        conv.numpy_to_image(np.zeros((h, w), np.uint16), '16UC1')


def test_numpy_to_image_checks_dtype_and_shape():
    with pytest.raises(ConversionError, match=r'16UC1 image needs \(H, W\) uint16 data, got \(2, 2\) float32'):
        conv.numpy_to_image(np.zeros((2, 2), np.float32), '16UC1')
    with pytest.raises(ConversionError, match='rgb8'):
        conv.numpy_to_image(np.zeros((2, 2, 4), np.uint8), 'rgb8')
    with pytest.raises(ConversionError, match='mono8'):
        conv.numpy_to_image(np.zeros(4, np.uint8), 'mono8')
    # non-native byte order and non-contiguous input are written out as little-endian, unpadded
    d = np.arange(12, dtype='>u2').reshape(3, 4)[:, ::2]
    msg = conv.numpy_to_image(d, '16UC1')
    assert msg.step == 4 and bytes(msg.data)[:2] == (0).to_bytes(2, 'little') and bytes(msg.data)[2:4] == b'\x02\x00'
    np.testing.assert_array_equal(conv.image_to_numpy(msg), d)
    # (H, W, 1) is accepted for one-channel encodings
    np.testing.assert_array_equal(conv.image_to_numpy(conv.numpy_to_image(SAMPLES['mono8'][..., None], 'mono8')),
                                  SAMPLES['mono8'])


def test_large_image_conversion_is_fast():
    rgb = RNG.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    msg = conv.numpy_to_image(rgb, 'bgr8')
    out = conv.color_to_rgb(msg)
    assert time.perf_counter() - t0 < 0.1
    np.testing.assert_array_equal(out, rgb[..., ::-1])


# ------------------------------------------------------------------------------------------------ camera
def test_camera_info_round_trip():
    cam = PinholeCamera(fx=525.0, fy=520.5, cx=319.5, cy=239.25, width=640, height=480)
    info = conv.camera_to_camera_info(cam, conv.make_header('camera_optical'))
    assert info.distortion_model == 'plumb_bob' and list(info.d) == [0.0] * 5
    np.testing.assert_array_equal(np.reshape(info.k, (3, 3)), cam.K)
    np.testing.assert_array_equal(np.reshape(info.r, (3, 3)), np.eye(3))
    np.testing.assert_array_equal(np.reshape(info.p, (3, 4)), np.hstack([cam.K, np.zeros((3, 1))]))
    assert info.header.frame_id == 'camera_optical'
    back = conv.camera_info_to_camera(wire(info))
    assert back == cam
    again = conv.camera_to_camera_info(back)
    assert list(again.k) == list(info.k) and list(again.p) == list(info.p)
    assert (again.width, again.height) == (640, 480)


def test_camera_info_reads_k_row_major():
    info = CameraInfo(width=100, height=50, k=[200.0, 0.0, 40.0, 0.0, 210.0, 20.0, 0.0, 0.0, 1.0])
    cam = conv.camera_info_to_camera(info)
    assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == (200.0, 210.0, 40.0, 20.0, 100, 50)


@pytest.mark.parametrize('k, size, match', [
    ([0.0] * 9, (640, 480), 'invalid intrinsics'),                                     # uncalibrated
    ([500.0, 0, 320, 0, float('nan'), 240, 0, 0, 1], (640, 480), 'invalid intrinsics'),
    ([500.0, 0, float('inf'), 0, 500, 240, 0, 0, 1], (640, 480), 'invalid intrinsics'),
    ([-500.0, 0, 320, 0, 500, 240, 0, 0, 1], (640, 480), 'invalid intrinsics'),
    ([500.0, 0, 320, 0, 500, 240, 0, 0, 1], (0, 480), 'zero image size'),
    ([500.0, 0, 320, 0, 500, 240, 0, 0, 1], (640, 0), 'zero image size'),
])
def test_bad_camera_info_is_rejected(k, size, match):
    with pytest.raises(ConversionError, match=match):
        conv.camera_info_to_camera(CameraInfo(width=size[0], height=size[1], k=k))


def _info(**kw):
    info = CameraInfo(width=1280, height=720, k=[605.0, 0, 638.0, 0, 604.5, 367.0, 0, 0, 1],
                      p=[590.0, 0, 641.0, 0, 0, 589.0, 360.0, 0, 0, 0, 1, 0])
    for name, value in kw.items():
        setattr(info, name, value)
    return info


def test_camera_info_lens_distortion_and_rectified_images():
    d = [0.55, -2.6, 0.0005, -0.0002, 1.5, 0.43, -2.4, 1.43]
    raw = conv.camera_info_to_camera(wire(_info(distortion_model='rational_polynomial', d=d)))
    assert (raw.fx, raw.cx, raw.distortion_model, raw.distortion) == (605.0, 638.0, 'rational_polynomial', tuple(d))
    assert raw.distorted
    back = conv.camera_info_to_camera(wire(conv.camera_to_camera_info(raw)))        # round trip keeps the lens
    assert back == raw
    rect = conv.camera_info_to_camera(wire(_info(distortion_model='rational_polynomial', d=d)), rectified=True)
    assert (rect.fx, rect.fy, rect.cx, rect.cy, rect.distorted) == (590.0, 589.0, 641.0, 360.0, False)
    with pytest.raises(ConversionError, match=r"lens distortion model 'kannala_brandt' is not supported"):
        conv.camera_info_to_camera(_info(distortion_model='kannala_brandt', d=[0.1, 0.01, 0.0, 0.0]))
    ok = conv.camera_info_to_camera(_info(distortion_model='kannala_brandt', d=[0.1, 0.01, 0.0, 0.0]), rectified=True)
    assert not ok.distorted                                         # rectified: d is not read
    assert not conv.camera_info_to_camera(_info(distortion_model='plumb_bob', d=[])).distorted
    with pytest.raises(ConversionError, match=r'invalid projection p=.*rectified'):
        conv.camera_info_to_camera(_info(p=[0.0] * 12), rectified=True)


def test_camera_info_binning_and_roi_as_image_geometry_applies_them():
    """image_geometry: K(0,2) = (cx - roi.x_offset) / binning_x, fx / binning_x; the images are roi / binning."""
    from sensor_msgs.msg import RegionOfInterest
    binned = conv.camera_info_to_camera(_info(binning_x=2, binning_y=2))
    assert (binned.fx, binned.fy, binned.cx, binned.cy, binned.width, binned.height) == (
        302.5, 302.25, 319.0, 183.5, 640, 360)
    roi = RegionOfInterest(x_offset=320, y_offset=180, width=640, height=360)
    cropped = conv.camera_info_to_camera(_info(roi=roi))
    assert (cropped.fx, cropped.cx, cropped.cy, cropped.width, cropped.height) == (605.0, 318.0, 187.0, 640, 360)
    both = conv.camera_info_to_camera(_info(roi=roi, binning_x=2, binning_y=4))
    assert (both.fx, both.fy, both.cx, both.cy, both.width, both.height) == (302.5, 151.125, 159.0, 46.75, 320, 90)
    corner = conv.camera_info_to_camera(_info(roi=RegionOfInterest(x_offset=800, y_offset=400, width=480, height=320)))
    assert corner.cx < 0 and corner.width == 480         # a crop away from the principal point is still valid
    with pytest.raises(ConversionError, match=r'region of interest 640x360 at \(700, 180\) is not inside'):
        conv.camera_info_to_camera(_info(roi=RegionOfInterest(x_offset=700, y_offset=180, width=640, height=360)))


# ------------------------------------------------------------------------------------------------ poses
def test_quaternion_90_degree_yaw_gives_the_analytic_matrix():
    s = math.sqrt(0.5)
    T = conv.pose_to_matrix([1.0, 2.0, 3.0], [0.0, 0.0, s, s])          # ROS order (x, y, z, w)
    expected = np.array([[0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]], dtype=np.float64)
    assert T.dtype == np.float64 and T.shape == (4, 4)
    np.testing.assert_allclose(T, expected, atol=1e-12)
    np.testing.assert_allclose(T[:3, :3] @ [1, 0, 0], [0, 1, 0], atol=1e-12)   # x axis turns into y


def test_quaternion_180_about_x():
    np.testing.assert_allclose(conv.pose_to_matrix([0, 0, 0], [1, 0, 0, 0])[:3, :3], np.diag([1, -1, -1]),
                               atol=1e-12)


def test_non_unit_quaternion_is_normalised():
    s = math.sqrt(0.5) * 1.05
    T = conv.pose_to_matrix([0, 0, 0], [0.0, 0.0, s, s])
    np.testing.assert_allclose(T[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3), atol=1e-12)


@pytest.mark.parametrize('q', [[0, 0, 0, 0], [float('nan'), 0, 0, 1], [0, 0, 0, float('inf')],
                               [0, 0, 0, 2.0], [0, 0, 0, 0.5], [0, 0, 1]])
def test_bad_quaternions_are_rejected(q):
    with pytest.raises(ConversionError, match='quaternion'):
        conv.pose_to_matrix([0, 0, 0], q)


def test_bad_position_is_rejected():
    with pytest.raises(ConversionError, match='position'):
        conv.pose_to_matrix([0, float('nan'), 0], [0, 0, 0, 1])


def test_matrix_pose_round_trip():
    for _ in range(20):
        q = RNG.normal(size=4)
        q /= np.linalg.norm(q)
        T = conv.pose_to_matrix(RNG.normal(size=3), q)
        pose = conv.matrix_to_pose(T)
        assert isinstance(pose, Pose) and pose.orientation.w >= 0
        qq = np.array([pose.orientation.x, pose.orientation.y, pose.orientation.z, pose.orientation.w])
        np.testing.assert_allclose(abs(qq @ q), 1.0, atol=1e-9)          # same rotation (q and -q)
        np.testing.assert_allclose(conv.pose_msg_to_matrix(pose), T, atol=1e-12)
    with pytest.raises(ConversionError, match='4, 4'):
        conv.matrix_to_pose(np.eye(3))


def test_pose_msg_to_matrix_accepts_every_pose_carrier():
    s = math.sqrt(0.5)
    expected = conv.pose_to_matrix([1, 2, 3], [0, 0, s, s])
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = 1.0, 2.0, 3.0
    pose.orientation.z, pose.orientation.w = s, s
    tf = Transform()
    tf.translation.x, tf.translation.y, tf.translation.z = 1.0, 2.0, 3.0
    tf.rotation.z, tf.rotation.w = s, s
    ps, odom, pwc, tfs = PoseStamped(), Odometry(), PoseWithCovarianceStamped(), TransformStamped()
    ps.pose = pose
    odom.pose.pose = pose
    pwc.pose.pose = pose
    tfs.transform = tf
    for msg in (pose, ps, odom, pwc, tf, tfs):
        np.testing.assert_allclose(conv.pose_msg_to_matrix(wire(msg)), expected, atol=1e-12)
    with pytest.raises(ConversionError, match='Image'):
        conv.pose_msg_to_matrix(Image())
    assert PoseStamped().pose.orientation.w == 1.0                 # ROS 2 default is identity, accepted
    np.testing.assert_array_equal(conv.pose_msg_to_matrix(PoseStamped()), np.eye(4))
    zero = PoseStamped()
    zero.pose.orientation.w = 0.0
    with pytest.raises(ConversionError, match='quaternion'):
        conv.pose_msg_to_matrix(zero)


# ------------------------------------------------------------------------------------------------ time
def test_stamps():
    st = conv.sec_to_stamp(12.25)
    assert (st.sec, st.nanosec) == (12, 250_000_000)
    assert conv.stamp_to_sec(st) == 12.25
    st = conv.sec_to_stamp(1.9999999999)                            # rounds up into the next second
    assert (st.sec, st.nanosec) == (2, 0)
    t = 1_700_000_000.123456
    assert abs(conv.stamp_to_sec(conv.sec_to_stamp(t)) - t) < 1e-6
    st = conv.sec_to_stamp(-0.5)
    assert (st.sec, st.nanosec) == (-1, 500_000_000)
    with pytest.raises(ConversionError):
        conv.sec_to_stamp(float('nan'))


# ------------------------------------------------------------------------------------------------ clouds
def test_pointcloud2_layout():
    xyz = RNG.normal(size=(10, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (10, 3), dtype=np.uint8)
    cloud = conv.make_pointcloud2(xyz, rgb, np.ones(10, np.float32), 'map', conv.sec_to_stamp(5.0))
    assert [(f.name, f.offset, f.datatype, f.count) for f in cloud.fields] == [
        ('x', 0, PointField.FLOAT32, 1), ('y', 4, PointField.FLOAT32, 1), ('z', 8, PointField.FLOAT32, 1),
        ('rgb', 12, PointField.FLOAT32, 1), ('score', 16, PointField.FLOAT32, 1)]
    assert (cloud.height, cloud.width, cloud.point_step, cloud.row_step) == (1, 10, 20, 200)
    assert cloud.is_dense and not cloud.is_bigendian and len(cloud.data) == 200
    assert cloud.header.frame_id == 'map' and cloud.header.stamp.sec == 5
    plain = conv.make_pointcloud2(xyz, None, None, 'map')
    assert [f.name for f in plain.fields] == ['x', 'y', 'z'] and plain.point_step == 12
    only_scores = conv.make_pointcloud2(xyz, None, np.zeros(10), 'map')
    assert [(f.name, f.offset) for f in only_scores.fields][-1] == ('score', 12) and only_scores.point_step == 16


def test_rgb_is_packed_as_rviz_expects():
    rgb = np.array([[0x12, 0x34, 0x56], [255, 0, 0], [0, 0, 255], [255, 255, 255]], dtype=np.uint8)
    cloud = conv.make_pointcloud2(np.zeros((4, 3), np.float32), rgb, None, 'map')
    raw = np.frombuffer(cloud.data, dtype='<u4').reshape(4, 4)
    np.testing.assert_array_equal(raw[:, 3], [0x00123456, 0x00FF0000, 0x000000FF, 0x00FFFFFF])
    np.testing.assert_array_equal(conv.unpack_rgb(raw[:, 3].view('<f4')), rgb)
    np.testing.assert_array_equal(conv.unpack_rgb(raw[:, 3].copy()), rgb)                  # uint32 too
    np.testing.assert_array_equal(conv.unpack_rgb(raw[:, 3].astype('>u4')), rgb)           # any byte order
    np.testing.assert_array_equal(conv.unpack_rgb(np.array([0xFF123456], np.uint32)), [[0x12, 0x34, 0x56]])
    with pytest.raises(ConversionError, match='4-byte'):
        conv.unpack_rgb(np.zeros(3, np.float64))


def test_pointcloud2_round_trip_is_exact():
    n = 1000
    xyz = RNG.normal(size=(n, 3)).astype(np.float32) * 10
    rgb = RNG.integers(0, 256, (n, 3), dtype=np.uint8)
    scores = RNG.random(n).astype(np.float32)
    cloud = wire(conv.make_pointcloud2(xyz, rgb, scores, 'map'))
    pts = conv.pointcloud2_to_numpy(cloud)
    assert pts.dtype.names == ('x', 'y', 'z', 'rgb', 'score') and len(pts) == n
    np.testing.assert_array_equal(np.stack([pts['x'], pts['y'], pts['z']], -1), xyz)
    np.testing.assert_array_equal(conv.unpack_rgb(pts['rgb']), rgb)
    np.testing.assert_array_equal(pts['score'], scores)
    pts['score'][0] = 7.0                                            # an owned, writable array
    empty = conv.pointcloud2_to_numpy(conv.make_pointcloud2(np.zeros((0, 3)), np.zeros((0, 3), np.uint8), None, 'm'))
    assert len(empty) == 0 and empty.dtype.names == ('x', 'y', 'z', 'rgb')


def test_pointcloud2_reads_foreign_layouts():
    """A hand-built organised cloud: big-endian, mixed types, point_step and row_step padding, count > 1."""
    h, w, ps, row_step = 2, 3, 24, 3 * 24 + 8
    layout = np.dtype({'names': ['x', 'y', 'z', 'intensity', 'ring', 'normal'],
                       'formats': ['>f4', '>f4', '>f4', '>u2', 'u1', ('>f2', 2)],
                       'offsets': [0, 4, 8, 12, 14, 16], 'itemsize': ps})
    pts = np.zeros(h * w, dtype=layout)
    pts['x'], pts['y'], pts['z'] = np.arange(6), np.arange(6) * 2, -np.arange(6) / 4
    pts['intensity'] = [1, 300, 65535, 0, 7, 1000]
    pts['ring'] = [0, 1, 2, 3, 4, 255]
    pts['normal'] = np.arange(12).reshape(6, 2) / 2
    buf = np.full((h, row_step), 0xEE, np.uint8)
    buf[:, :w * ps] = pts.view(np.uint8).reshape(h, w * ps)
    fields = [PointField(name='x', offset=0, datatype=PointField.FLOAT32, count=1),
              PointField(name='y', offset=4, datatype=PointField.FLOAT32, count=1),
              PointField(name='z', offset=8, datatype=PointField.FLOAT32, count=1),
              PointField(name='intensity', offset=12, datatype=PointField.UINT16, count=1),
              PointField(name='ring', offset=14, datatype=PointField.UINT8, count=1)]
    cloud = PointCloud2(height=h, width=w, fields=fields, is_bigendian=True, point_step=ps, row_step=row_step,
                        is_dense=False)
    cloud.data = array.array('B', buf.tobytes())
    out = conv.pointcloud2_to_numpy(wire(cloud))
    assert out.dtype.names == ('x', 'y', 'z', 'intensity', 'ring') and out.dtype['intensity'].isnative
    for name in out.dtype.names:
        np.testing.assert_array_equal(out[name], pts[name])
    # a count > 1 field comes back as a sub-array (FLOAT64 pairs here; no FLOAT16 PointField exists)
    pair = np.zeros(4, dtype=[('xy', '<f8', (2,)), ('pad', 'u1', (4,))])
    pair['xy'] = np.arange(8).reshape(4, 2) * 1.5
    cloud2 = PointCloud2(height=1, width=4, point_step=20, row_step=80,
                         fields=[PointField(name='xy', offset=0, datatype=PointField.FLOAT64, count=2)])
    cloud2.data = array.array('B', pair.tobytes())
    np.testing.assert_array_equal(conv.pointcloud2_to_numpy(cloud2)['xy'], pair['xy'])


def test_bad_pointclouds_are_rejected():
    cloud = conv.make_pointcloud2(np.zeros((4, 3), np.float32), None, None, 'map')
    cloud.data = array.array('B', bytes(47))
    with pytest.raises(ConversionError, match='needs 48 bytes of data, got 47'):
        conv.pointcloud2_to_numpy(cloud)
    cloud = PointCloud2(height=1, width=1, point_step=4, row_step=4,
                        fields=[PointField(name='x', offset=2, datatype=PointField.FLOAT32, count=1)])
    cloud.data = array.array('B', bytes(4))
    with pytest.raises(ConversionError, match="field 'x'.*does not fit point_step 4"):
        conv.pointcloud2_to_numpy(cloud)
    cloud.fields[0].offset, cloud.fields[0].datatype = 0, 42
    with pytest.raises(ConversionError, match='unknown datatype 42'):
        conv.pointcloud2_to_numpy(cloud)
    with pytest.raises(ConversionError, match=r'xyz must be \(N, 3\)'):
        conv.make_pointcloud2(np.zeros((4, 2)), None, None, 'map')
    with pytest.raises(ConversionError, match='rgb'):
        conv.make_pointcloud2(np.zeros((4, 3)), np.zeros((3, 3), np.uint8), None, 'map')
    with pytest.raises(ConversionError, match='scores'):
        conv.make_pointcloud2(np.zeros((4, 3)), None, np.zeros(5), 'map')
    with pytest.raises(ConversionError, match='uint8'):
        conv.make_pointcloud2(np.zeros((4, 3)), np.full((4, 3), 0.5), None, 'map')


def test_million_point_cloud_is_fast():
    n = 1_000_000
    xyz = RNG.normal(size=(n, 3)).astype(np.float32)
    rgb = RNG.integers(0, 256, (n, 3), dtype=np.uint8)
    scores = RNG.random(n).astype(np.float32)
    t0 = time.perf_counter()
    cloud = conv.make_pointcloud2(xyz, rgb, scores, 'map')
    t1 = time.perf_counter()
    pts = conv.pointcloud2_to_numpy(cloud)
    back_rgb = conv.unpack_rgb(pts['rgb'])
    t2 = time.perf_counter()
    print(f'\n1M points: make_pointcloud2 {1e3 * (t1 - t0):.1f} ms, '
          f'pointcloud2_to_numpy + unpack_rgb {1e3 * (t2 - t1):.1f} ms')
    assert t1 - t0 < 0.5 and t2 - t1 < 0.5
    assert len(cloud.data) == 20 * n
    np.testing.assert_array_equal(pts['z'], xyz[:, 2])
    np.testing.assert_array_equal(back_rgb, rgb)


# ------------------------------------------------------------------------------------------------ markers
def test_box_markers():
    lo = np.array([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    hi = np.array([[1.0, 2.0, 3.0], [2.0, 2.5, 3.5]])
    ma = wire(conv.make_box_markers(lo, hi, ['chair', 'lamp'], 'map', conv.sec_to_stamp(1.0),
                                    color=(0.0, 1.0, 0.0, 0.5)))
    assert len(ma.markers) == 1 + 2 * 2
    assert ma.markers[0].action == Marker.DELETEALL
    boxes, texts = ma.markers[1::2], ma.markers[2::2]
    assert [m.type for m in boxes] == [Marker.LINE_LIST] * 2
    assert [m.type for m in texts] == [Marker.TEXT_VIEW_FACING] * 2
    assert [t.text for t in texts] == ['chair', 'lamp']
    assert len({(m.ns, m.id) for m in ma.markers[1:]}) == 4                # unique ids
    for box, text, l, h in zip(boxes, texts, lo, hi):
        assert box.action == Marker.ADD and box.header.frame_id == 'map' and box.scale.x > 0
        assert (box.color.g, box.color.a) == (1.0, 0.5)
        pts = np.array([[p.x, p.y, p.z] for p in box.points])
        assert pts.shape == (24, 3)
        corners = {tuple(c) for c in pts}
        assert corners == {(x, y, z) for x in (l[0], h[0]) for y in (l[1], h[1]) for z in (l[2], h[2])}
        edges = pts.reshape(12, 2, 3)
        # every edge is axis-aligned and spans the box along that axis; each axis has 4 edges
        diffs = np.abs(edges[:, 1] - edges[:, 0])
        assert np.all((diffs > 0).sum(1) == 1)
        np.testing.assert_array_equal(np.sort(diffs.max(1)), np.sort(np.repeat(h - l, 4)))
        assert len({tuple(sorted(map(tuple, e))) for e in edges}) == 12
        assert text.pose.position.z > h[2]
        assert (text.pose.position.x, text.pose.position.y) == ((l[0] + h[0]) / 2, (l[1] + h[1]) / 2)
    empty = conv.make_box_markers(np.zeros((0, 3)), np.zeros((0, 3)), [], 'map')
    assert len(empty.markers) == 1 and empty.markers[0].action == Marker.DELETEALL
    with pytest.raises(ConversionError, match='labels'):
        conv.make_box_markers(lo, hi, ['only one'], 'map')


def test_compressed_colour_and_depth_round_trip_through_the_shared_decoder():
    """What the scene player publishes with color_transport/depth_transport, read back by the node's decoder."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    np.testing.assert_array_equal(conv.color_to_rgb(conv.rgb_to_compressed(rgb, 'png')), rgb)
    smooth = np.repeat(np.linspace(0, 255, 40, dtype=np.uint8)[None, :, None], 30, 0).repeat(3, 2)
    assert np.abs(conv.color_to_rgb(conv.rgb_to_compressed(smooth)).astype(int) - smooth).max() <= 8   # JPEG
    depth_mm = rng.integers(0, 10000, (30, 40), dtype=np.uint16)
    msg = conv.depth_to_compressed_depth(depth_mm)
    assert msg.format == '16UC1; compressedDepth png' and bytes(msg.data)[12:16] == b'\x89PNG'
    np.testing.assert_array_equal(conv.depth_to_meters(msg), depth_mm.astype(np.float32) / np.float32(1000.0))
    msg.data = msg.data[:40]                                         # truncated
    with pytest.raises(ConversionError, match='cannot decode compressedDepth'):
        conv.depth_to_meters(msg)
