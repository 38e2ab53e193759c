"""Conversions between ROS messages and numpy / core types (no cv_bridge or sensor_msgs_py needed).

Conventions: camera points are in the optical frame; ``T_W_C`` (4, 4) float64 maps camera points into the map
frame; quaternions are in ROS order (x, y, z, w). Bad input raises :class:`ConversionError` (a ValueError) with
a message that names the problem. Large buffers are assigned as ``array.array('B', ...)`` (fast path in rclpy).
"""
from __future__ import annotations

import array
import math
import sys
from typing import Optional, Sequence

import numpy as np
import transforms3d
from builtin_interfaces.msg import Time
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point, Pose
from sensor_msgs.msg import CameraInfo, CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import ColorRGBA, Header
from visualization_msgs.msg import Marker, MarkerArray

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.datasets import DatasetError, ros_images
from ov3d_ros.datasets.ros_images import ENCODINGS


class ConversionError(ValueError):
    """A message or array that cannot be converted."""




def frame_id(name: str) -> str:
    """A tf2 frame id: ``name`` without ROS 1's leading '/' (bags converted from ROS 1, some bridged drivers). tf2
    stores a transform's frames stripped and refuses a slashed one in a lookup ("frame_ids cannot start with a
    '/'")."""
    return name.lstrip('/')


def make_header(frame_id: str, stamp: Optional[Time] = None) -> Header:
    """A std_msgs/Header (stamp 0 when not given)."""
    return Header(frame_id=frame_id, stamp=stamp if stamp is not None else Time())


# ---------------------------------------------------------------------------------------------------- time
def stamp_to_sec(stamp) -> float:
    """Seconds (float) of a builtin_interfaces Time (or anything with ``sec`` and ``nanosec``)."""
    return stamp.sec + stamp.nanosec * 1e-9


def sec_to_stamp(t: float) -> Time:
    """builtin_interfaces/Time of ``t`` seconds, rounded to the nearest nanosecond."""
    t = float(t)
    if not math.isfinite(t):
        raise ConversionError(f'cannot make a time stamp from {t} seconds')
    sec = math.floor(t)
    nanosec = int(round((t - sec) * 1e9))
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    if not -2**31 <= sec < 2**31:
        raise ConversionError(f'time {t} s does not fit a builtin_interfaces/Time (int32 seconds)')
    return Time(sec=int(sec), nanosec=nanosec)


# ---------------------------------------------------------------------------------------------------- images
def _decoded(fn, where: str):
    """A decoder of ov3d_ros.datasets.ros_images that raises ConversionError (the ROS layer's error)."""
    def decode(msg, **kw):
        try:
            return fn(msg, where, **kw)
        except DatasetError as e:
            raise ConversionError(str(e)) from None
    decode.__name__, decode.__doc__ = fn.__name__, fn.__doc__
    return decode


camera_info_to_camera = _decoded(ros_images.camera_info_to_camera, 'camera info')
"""PinholeCamera of the images a CameraInfo describes: raw images (``k`` and the lens distortion ``d``) or, with
``rectified=True``, rectified ones (``p``, no distortion); binning and ROI applied. Bad intrinsics, a zero size, a
principal point outside the image or an unsupported distortion model raise ConversionError with the reason (see
:func:`ov3d_ros.datasets.ros_images.camera_info_to_camera`)."""
image_to_numpy = _decoded(ros_images.image_to_numpy, 'image')
"""Pixel array of an Image (step and endianness honoured): (H, W, C), or (H, W) for one channel."""
color_to_rgb = _decoded(ros_images.color_to_rgb, 'colour image')
"""(H, W, 3) uint8 RGB (a new array) from rgb8, bgr8, rgba8, bgra8, mono8 / 8UC1 or 8UC3 (as RGB)."""
labels_to_numpy = _decoded(ros_images.labels_to_numpy, 'label image')
"""(H, W) semantic ids (a new array) from mono16 / 16UC1, mono8 / 8UC1 or 32SC1."""
depth_to_meters = _decoded(ros_images.depth_to_meters, 'depth image')
"""(H, W) float32 metres (a new array) from 16UC1 / mono16 (mm) or 32FC1 (m); invalid readings (0, NaN, +-inf,
negative) become 0."""


def numpy_to_image(arr: np.ndarray, encoding: str, header: Optional[Header] = None) -> Image:
    """A little-endian, unpadded Image from (H, W, C) or (H, W) data of the encoding's dtype.

    rgb8/bgr8/8UC3: (H, W, 3) uint8; rgba8/bgra8: (H, W, 4) uint8; mono8/8UC1: (H, W) uint8;
    mono16/16UC1: (H, W) uint16; 32FC1: (H, W) float32. (H, W, 1) is accepted for one channel.
    """
    if encoding not in ENCODINGS:
        raise ConversionError(f'image encoding {encoding!r} not supported; expected one of {", ".join(ENCODINGS)}')
    dtype, ch = ENCODINGS[encoding]
    arr = np.asarray(arr)
    ok_shape = (arr.ndim == 2 and ch == 1) or (arr.ndim == 3 and arr.shape[2] == ch)
    ok_dtype = arr.dtype.kind == np.dtype(dtype).kind and arr.dtype.itemsize == np.dtype(dtype).itemsize
    if not (ok_shape and ok_dtype):
        want = '(H, W)' if ch == 1 else f'(H, W, {ch})'
        raise ConversionError(f'{encoding} image needs {want} {np.dtype(dtype).name} data, got {arr.shape} {arr.dtype}')
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConversionError(f'{encoding} image has zero size ({arr.shape[1]}x{arr.shape[0]})')
    arr = np.ascontiguousarray(arr, dtype=np.dtype(dtype).newbyteorder('<'))
    h, w = arr.shape[:2]
    msg = Image(header=header if header is not None else Header(), height=h, width=w, encoding=encoding,
                is_bigendian=0, step=w * ch * arr.itemsize)
    msg.data = array.array('B', arr.tobytes())
    return msg


def rgb_to_compressed(rgb: np.ndarray, fmt: str = 'jpeg', header: Optional[Header] = None,
                      quality: int = 95) -> CompressedImage:
    """A CompressedImage of (H, W, 3) uint8 RGB as image_transport's ``compressed`` plugin writes it
    (``fmt`` 'jpeg' or 'png'; format string 'rgb8; jpeg compressed bgr8')."""
    import io
    from PIL import Image as PILImage
    if fmt not in ('jpeg', 'png'):
        raise ConversionError(f"compressed colour format must be 'jpeg' or 'png', got {fmt!r}")
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ConversionError(f'compressed colour needs (H, W, 3) uint8 RGB, got {rgb.shape} {rgb.dtype}')
    buf = io.BytesIO()
    PILImage.fromarray(rgb).save(buf, format=fmt.upper(), **({'quality': quality} if fmt == 'jpeg' else {}))
    msg = CompressedImage(header=header if header is not None else Header(), format=f'rgb8; {fmt} compressed bgr8')
    msg.data = array.array('B', buf.getvalue())
    return msg


def depth_to_compressed_depth(depth_mm: np.ndarray, header: Optional[Header] = None) -> CompressedImage:
    """A CompressedImage of (H, W) uint16 millimetres as compressed_depth_image_transport writes 16UC1 depth:
    a 12-byte config header (int32 format = 1 (PNG), two float32 quantisation parameters, unused for 16UC1)
    and a 16-bit PNG; format '16UC1; compressedDepth png'."""
    import io
    import struct
    from PIL import Image as PILImage
    depth_mm = np.asarray(depth_mm)
    if depth_mm.ndim != 2 or depth_mm.dtype != np.uint16:
        raise ConversionError(f'compressedDepth needs (H, W) uint16 millimetres, got {depth_mm.shape} {depth_mm.dtype}')
    buf = io.BytesIO()
    PILImage.fromarray(depth_mm).save(buf, format='PNG')
    msg = CompressedImage(header=header if header is not None else Header(), format='16UC1; compressedDepth png')
    msg.data = array.array('B', struct.pack('<iff', 1, 0.0, 0.0) + buf.getvalue())
    return msg


# ---------------------------------------------------------------------------------------------------- camera
def camera_to_camera_info(cam: PinholeCamera, header: Optional[Header] = None) -> CameraInfo:
    """CameraInfo for a camera: k, its lens distortion (plumb_bob with zero ``d`` for none), p = [k | 0],
    r = identity."""
    K = cam.K
    P = np.zeros((3, 4))
    P[:, :3] = K
    return CameraInfo(header=header if header is not None else Header(), width=int(cam.width),
                      height=int(cam.height), distortion_model=cam.distortion_model or 'plumb_bob',
                      d=list(cam.distortion) if cam.distorted else [0.0] * 5, k=K.reshape(-1).tolist(),
                      r=np.eye(3).reshape(-1).tolist(), p=P.reshape(-1).tolist())


# ---------------------------------------------------------------------------------------------------- poses
def pose_to_matrix(position: Sequence[float], orientation_xyzw: Sequence[float]) -> np.ndarray:
    """(4, 4) float64 rigid transform from a position and a ROS-order (x, y, z, w) quaternion.

    Quaternions with norm in [0.9, 1.1] are normalised; zero, NaN or far-from-unit ones raise ConversionError.
    """
    p = np.asarray(position, dtype=np.float64).reshape(-1)
    q = np.asarray(orientation_xyzw, dtype=np.float64).reshape(-1)
    if p.shape != (3,) or not np.all(np.isfinite(p)):
        raise ConversionError(f'pose position must be 3 finite numbers, got {p.tolist()}')
    if q.shape != (4,) or not np.all(np.isfinite(q)):
        raise ConversionError(f'pose orientation must be a quaternion of 4 finite numbers (x, y, z, w), '
                              f'got {q.tolist()}')
    n = math.hypot(*q)                          # no overflow warning for huge entries
    if not 0.9 <= n <= 1.1:
        raise ConversionError(f'pose quaternion (x, y, z, w) = {q.tolist()} has norm {n:.4g}; expected a unit '
                              f'quaternion (norms in [0.9, 1.1] are normalised)')
    x, y, z, w = q / n
    T = np.eye(4)
    T[:3, :3] = transforms3d.quaternions.quat2mat([w, x, y, z])
    T[:3, 3] = p
    return T


def matrix_to_pose(T: np.ndarray) -> Pose:
    """geometry_msgs/Pose of a (4, 4) rigid transform (quaternion with w >= 0)."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4) or not np.all(np.isfinite(T)):
        raise ConversionError(f'pose matrix must be a finite (4, 4) array, got shape {T.shape}')
    w, x, y, z = transforms3d.quaternions.mat2quat(T[:3, :3])
    if w < 0:
        w, x, y, z = -w, -x, -y, -z
    pose = Pose()
    pose.position.x, pose.position.y, pose.position.z = (float(v) for v in T[:3, 3])
    pose.orientation.x, pose.orientation.y = float(x), float(y)
    pose.orientation.z, pose.orientation.w = float(z), float(w)
    return pose


def pose_msg_to_matrix(msg) -> np.ndarray:
    """(4, 4) from a Pose, PoseStamped, PoseWithCovariance(Stamped), Odometry, Transform or TransformStamped."""
    m = getattr(msg, 'transform', msg)          # TransformStamped → Transform
    for _ in range(3):                          # PoseStamped / Odometry / PoseWithCovariance… → Pose
        if not hasattr(m, 'pose'):
            break
        m = m.pose
    if hasattr(m, 'translation') and hasattr(m, 'rotation'):
        t, r = m.translation, m.rotation
    elif hasattr(m, 'position') and hasattr(m, 'orientation'):
        t, r = m.position, m.orientation
    else:
        raise ConversionError(f'cannot read a pose from a {type(msg).__name__}; expected Pose, PoseStamped, '
                              f'Odometry, Transform or TransformStamped')
    return pose_to_matrix([t.x, t.y, t.z], [r.x, r.y, r.z, r.w])


# ---------------------------------------------------------------------------------------------------- clouds
_PF_TYPES = {PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2', PointField.UINT16: 'u2',
             PointField.INT32: 'i4', PointField.UINT32: 'u4', PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}


def _check_rgb(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 2 or rgb.shape[1] != 3:
        raise ConversionError(f'rgb must be (N, 3), got {rgb.shape}')
    if rgb.dtype != np.uint8:
        if rgb.dtype.kind not in 'iu' or (rgb.size and (rgb.min() < 0 or rgb.max() > 255)):
            raise ConversionError(f'rgb must be uint8 (0..255), got {rgb.dtype}')
        rgb = rgb.astype(np.uint8)
    return rgb


def pack_rgb(rgb: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 → (N,) float32 holding 0x00RRGGBB bits (the RViz ``rgb`` field convention)."""
    rgb = _check_rgb(rgb)
    packed = np.zeros((len(rgb), 4), dtype=np.uint8)           # little-endian uint32 bytes: B, G, R, 0
    packed[:, :3] = rgb[:, ::-1]
    return packed.view('<f4').reshape(-1).astype(np.float32, copy=False)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    """(N,) packed 0x00RRGGBB values (float32 as RViz uses, or uint32 / int32) → (N, 3) uint8 RGB."""
    packed = np.asarray(packed)
    if packed.dtype.itemsize != 4 or packed.dtype.kind not in 'fiu':
        raise ConversionError(f'packed rgb must be 4-byte values (float32 / uint32), got {packed.dtype}')
    big = packed.dtype.byteorder == '>' or (packed.dtype.byteorder == '=' and sys.byteorder == 'big')
    u = np.ascontiguousarray(packed.reshape(-1)).view('>u4' if big else '<u4')   # reinterpret the bits
    b = u.astype('<u4', copy=False).view(np.uint8).reshape(-1, 4)               # bytes B, G, R, (A)
    return np.ascontiguousarray(b[:, 2::-1])


def make_pointcloud2(xyz: np.ndarray, rgb: Optional[np.ndarray], scores: Optional[np.ndarray], frame_id: str,
                     stamp: Optional[Time] = None) -> PointCloud2:
    """Unordered (height 1), dense, little-endian PointCloud2 with FLOAT32 fields x, y, z, then ``rgb``
    (packed 0x00RRGGBB, when ``rgb`` (N, 3) uint8 is given) and ``score`` (when ``scores`` (N,) is given)."""
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ConversionError(f'point cloud xyz must be (N, 3), got {xyz.shape}')
    n = len(xyz)
    names = ['x', 'y', 'z']
    if rgb is not None:
        if np.shape(rgb) != (n, 3):
            raise ConversionError(f'point cloud rgb must be ({n}, 3) to match xyz, got {np.shape(rgb)}')
        names.append('rgb')
    if scores is not None:
        scores = np.asarray(scores)
        if scores.shape != (n,):
            raise ConversionError(f'point cloud scores must be ({n},) to match xyz, got {np.shape(scores)}')
        names.append('score')
    step = 4 * len(names)
    buf = array.array('B', bytes(step * n))                    # the message buffer, filled in place below
    flat = np.frombuffer(buf, dtype='<f4').reshape(n, len(names)) if n else np.zeros((0, len(names)), '<f4')
    flat[:, :3] = xyz
    col = 3
    if rgb is not None:                                         # little-endian 0x00RRGGBB: bytes B, G, R, 0
        flat.view(np.uint8).reshape(n, step)[:, 4 * col:4 * col + 3] = _check_rgb(rgb)[:, ::-1]
        col += 1
    if scores is not None:
        flat[:, col] = scores
    msg = PointCloud2(header=make_header(frame_id, stamp), height=1, width=n, is_bigendian=False,
                      point_step=step, row_step=step * n, is_dense=True,
                      fields=[PointField(name=name, offset=4 * i, datatype=PointField.FLOAT32, count=1)
                              for i, name in enumerate(names)])
    msg.data = buf
    return msg


def pointcloud2_to_numpy(msg: PointCloud2) -> np.ndarray:
    """(height*width,) structured array, one named field per PointField, in native byte order (a new array).

    Reads any layout: INT8..FLOAT64 fields at any offset, ``count`` > 1 (sub-array fields), ``point_step``
    padding and ``row_step`` padding.
    """
    if not msg.fields:
        raise ConversionError('PointCloud2 has no fields')
    order = '>' if msg.is_bigendian else '<'
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _PF_TYPES:
            raise ConversionError(f'PointCloud2 field {f.name!r} has unknown datatype {f.datatype}')
        fmt = order + _PF_TYPES[f.datatype]
        size = np.dtype(fmt).itemsize * max(1, f.count)
        if f.offset + size > msg.point_step:
            raise ConversionError(f'PointCloud2 field {f.name!r} (offset {f.offset}, {size} bytes) does not fit '
                                  f'point_step {msg.point_step}')
        names.append(f.name)
        formats.append(fmt if f.count <= 1 else (fmt, int(f.count)))
        offsets.append(int(f.offset))
    try:
        dtype = np.dtype({'names': names, 'formats': formats, 'offsets': offsets, 'itemsize': int(msg.point_step)})
    except (ValueError, TypeError) as e:
        raise ConversionError(f'PointCloud2 fields {names} do not form a valid layout: {e}') from None
    h, w, ps = int(msg.height), int(msg.width), int(msg.point_step)
    n = h * w
    if n == 0:
        return np.zeros(0, dtype=dtype)
    row = ps * w
    row_step = int(msg.row_step) or row
    if row_step < row:
        raise ConversionError(f'PointCloud2 row_step {row_step} is smaller than width*point_step = {row}')
    raw = np.frombuffer(msg.data, dtype=np.uint8)
    need = row_step * (h - 1) + row
    if raw.size < need:
        raise ConversionError(f'PointCloud2 of {w}x{h} points (point_step {ps}, row_step {row_step}) needs '
                              f'{need} bytes of data, got {raw.size}')
    if row_step != row:
        rows = np.lib.stride_tricks.as_strided(raw, shape=(h, row), strides=(row_step, 1))
        buf = np.ascontiguousarray(rows).reshape(-1)
    else:
        buf = raw[:n * ps].copy()
    out = buf.view(dtype)
    if msg.is_bigendian:
        out = out.astype(dtype.newbyteorder('='))
    return out


# ---------------------------------------------------------------------------------------------------- markers
# corner c takes x from hi if c & 4 else lo, y from hi if c & 2, z from hi if c & 1
_EDGES = [(0, 1), (1, 3), (3, 2), (2, 0), (4, 5), (5, 7), (7, 6), (6, 4), (0, 4), (1, 5), (2, 6), (3, 7)]


def make_box_markers(boxes_min: np.ndarray, boxes_max: np.ndarray, labels: Sequence[str], frame_id: str,
                     stamp: Optional[Time] = None, ns: str = 'segmentation',
                     color=(1.0, 0.2, 0.2, 1.0)) -> MarkerArray:
    """MarkerArray: a DELETEALL first, then per box a LINE_LIST wire box (ids 2k, 12 edges = 24 points) and a
    TEXT_VIEW_FACING label above it (ids 2k+1). ``color`` is (r, g, b, a) in [0, 1]."""
    lo_all = np.asarray(boxes_min, dtype=np.float64).reshape(-1, 3)
    hi_all = np.asarray(boxes_max, dtype=np.float64).reshape(-1, 3)
    labels = list(labels)
    if not (len(lo_all) == len(hi_all) == len(labels)):
        raise ConversionError(f'box markers need as many boxes_min ({len(lo_all)}), boxes_max ({len(hi_all)}) '
                              f'and labels ({len(labels)})')
    if not (np.all(np.isfinite(lo_all)) and np.all(np.isfinite(hi_all))):
        raise ConversionError('box corners must be finite')
    if len(color) != 4:
        raise ConversionError(f'marker color must be (r, g, b, a), got {color}')
    lo_all, hi_all = np.minimum(lo_all, hi_all), np.maximum(lo_all, hi_all)
    rgba = ColorRGBA(r=float(color[0]), g=float(color[1]), b=float(color[2]), a=float(color[3]))
    markers = [Marker(header=make_header(frame_id, stamp), ns=ns, id=0, action=Marker.DELETEALL)]
    for i, (lo, hi, label) in enumerate(zip(lo_all, hi_all, labels)):
        corners = [tuple(float(hi[k] if c & (4 >> k) else lo[k]) for k in range(3)) for c in range(8)]
        box = Marker(header=make_header(frame_id, stamp), ns=ns, id=2 * i, type=Marker.LINE_LIST,
                     action=Marker.ADD, color=rgba)
        box.pose.orientation.w = 1.0
        box.scale.x = 0.02
        box.points = [Point(x=corners[j][0], y=corners[j][1], z=corners[j][2]) for e in _EDGES for j in e]
        text = Marker(header=make_header(frame_id, stamp), ns=ns, id=2 * i + 1, type=Marker.TEXT_VIEW_FACING,
                      action=Marker.ADD, color=rgba, text=str(label))
        text.pose.position.x = float(lo[0] + hi[0]) / 2
        text.pose.position.y = float(lo[1] + hi[1]) / 2
        text.pose.position.z = float(hi[2]) + 0.15
        text.pose.orientation.w = 1.0
        text.scale.z = 0.15
        markers += [box, text]
    return MarkerArray(markers=markers)


def make_diagnostics(name: str, level: str, message: str, values: dict, stamp: Optional[Time] = None,
                     hardware_id: str = 'ov3d_ros') -> DiagnosticArray:
    """A one-status DiagnosticArray; level 'ok' | 'warn' | 'error'; values become key/value strings."""
    levels = {'ok': DiagnosticStatus.OK, 'warn': DiagnosticStatus.WARN, 'error': DiagnosticStatus.ERROR}
    status = DiagnosticStatus(level=levels[level], name=name, message=message, hardware_id=hardware_id,
                              values=[KeyValue(key=str(k), value=str(v)) for k, v in values.items()])
    return DiagnosticArray(header=make_header('', stamp), status=[status])
