"""sensor_msgs Image, CompressedImage and CameraInfo messages → numpy arrays and cameras (no ROS needed).

Works on message objects of any origin (rosbags or rclpy) by attribute access; honours ``step`` (row padding)
and ``is_bigendian``.
"""
from __future__ import annotations

import io
import struct
from typing import Tuple

import numpy as np

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.depth import depth_to_meters as _decode_depth
from ov3d_ros.datasets import DatasetError

# encoding → (numpy dtype, channels)
ENCODINGS = {'rgb8': (np.uint8, 3), 'bgr8': (np.uint8, 3), 'rgba8': (np.uint8, 4), 'bgra8': (np.uint8, 4),
             'mono8': (np.uint8, 1), '8UC1': (np.uint8, 1), '8UC3': (np.uint8, 3), 'mono16': (np.uint16, 1),
             '16UC1': (np.uint16, 1), '32FC1': (np.float32, 1), '32SC1': (np.int32, 1)}
COLOR_ENCODINGS = ('rgb8', 'bgr8', 'rgba8', 'bgra8', 'mono8', '8UC1', '8UC3')   # 8UC3 is taken as RGB
DEPTH_ENCODINGS = ('16UC1', 'mono16', '32FC1')
LABEL_ENCODINGS = ('mono16', '16UC1', 'mono8', '8UC1', '32SC1')


def image_to_numpy(msg, where: str = 'image') -> np.ndarray:
    """Pixels of a (rosbags) sensor_msgs/Image: (H, W, C), or (H, W) for one channel, in native byte order.

    Honours row padding (``step``) and ``is_bigendian``; raises DatasetError naming ``where`` for unsupported
    encodings and data of the wrong size.
    """
    enc = msg.encoding
    if enc not in ENCODINGS:
        raise DatasetError(f'{where}: image encoding {enc!r} not supported; expected one of {", ".join(ENCODINGS)}')
    dtype, ch = ENCODINGS[enc]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h == 0 or w == 0:
        raise DatasetError(f'{where}: {enc} image has zero size ({w}x{h})')
    bpp = ch * np.dtype(dtype).itemsize
    if step < w * bpp:
        raise DatasetError(f'{where}: {enc} image step {step} is smaller than width*bytes_per_pixel = '
                           f'{w}*{bpp} = {w * bpp}')
    data = np.frombuffer(msg.data, dtype=np.uint8) if not isinstance(msg.data, np.ndarray) else msg.data.view(np.uint8)
    if data.size < step * h:
        raise DatasetError(f'{where}: {enc} image {w}x{h} with step {step} needs {step * h} bytes of data, '
                           f'got {data.size} (corrupt or truncated message)')
    rows = data[:step * h].reshape(h, step)
    if step != w * bpp:
        rows = np.ascontiguousarray(rows[:, :w * bpp])          # drop row padding
    src = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
    out = rows.view(src).reshape(h, w, ch)
    if not src.isnative:
        out = out.astype(dtype)
    return out[..., 0] if ch == 1 else out


def color_to_rgb(msg, where: str = 'colour image') -> np.ndarray:
    """(H, W, 3) uint8 RGB (a new array) from an Image (see COLOR_ENCODINGS) or a jpeg/png CompressedImage."""
    if hasattr(msg, 'format'):                                  # CompressedImage
        return _decode_compressed_color(msg, where)
    if msg.encoding not in COLOR_ENCODINGS:
        hint = ' (that is a depth encoding: is the colour topic right?)' if msg.encoding in DEPTH_ENCODINGS else ''
        raise DatasetError(f'{where}: colour encoding {msg.encoding!r} not supported{hint}; expected one of '
                           f'{", ".join(COLOR_ENCODINGS)}')
    img = image_to_numpy(msg, where)
    if img.ndim == 2:
        return np.repeat(img[..., None], 3, axis=-1)
    if msg.encoding in ('bgr8', 'bgra8'):
        return np.ascontiguousarray(img[..., 2::-1])
    return np.array(img[..., :3], order='C', copy=True)


def depth_to_meters(msg, where: str = 'depth image') -> np.ndarray:
    """(H, W) float32 metres (a new array) from 16UC1 / mono16 (mm) or 32FC1 (m), raw or compressed.

    Invalid readings (0, NaN, +-inf, negative) all become 0, which the mapper ignores as "no reading"."""
    depth = _decode_depth_message(msg, where)
    depth[~((depth > 0) & (depth < np.inf))] = 0.0          # NaN compares False
    return depth


def _decode_depth_message(msg, where: str) -> np.ndarray:
    if hasattr(msg, 'format'):
        return _decode_compressed_depth(msg, where)
    if msg.encoding not in DEPTH_ENCODINGS:
        raise DatasetError(f'{where}: depth encoding {msg.encoding!r} not supported; expected 16UC1 or 32FC1 '
                           '(or mono16, millimetres)')
    raw = image_to_numpy(msg, where)
    if raw.dtype == np.uint16:          # divided, as the ROS conversions do: 1500 mm is exactly 1.5 m
        return raw.astype(np.float32) / np.float32(1000.0)
    return _decode_depth(raw, msg.encoding)


def labels_to_numpy(msg, where: str = 'label image') -> np.ndarray:
    """(H, W) semantic ids (a new array: uint16, uint8 or int32 as encoded) from a label Image."""
    if hasattr(msg, 'format') or msg.encoding not in LABEL_ENCODINGS:
        enc = f'compressed {msg.format!r}' if hasattr(msg, 'format') else msg.encoding
        raise DatasetError(f'{where}: label encoding {enc!r} not supported; expected one of '
                           f'{", ".join(LABEL_ENCODINGS)}')
    return np.array(image_to_numpy(msg, where), copy=True)


def _decode_compressed_color(msg, where: str) -> np.ndarray:
    from PIL import Image as PILImage
    try:
        with PILImage.open(io.BytesIO(bytes(msg.data))) as im:
            return np.array(im.convert('RGB'))
    except Exception as e:      # PIL raises many kinds for bad data
        raise DatasetError(f'{where}: cannot decode compressed image (format {msg.format!r}): {e}') from e


def _decode_compressed_depth(msg, where: str) -> np.ndarray:
    """image_transport's compressedDepth: a 12-byte header (format, depthQuantA, depthQuantB) then a PNG."""
    from PIL import Image as PILImage
    fmt = str(msg.format)
    if 'compresseddepth' not in fmt.lower().replace(' ', ''):
        raise DatasetError(f'{where}: compressed depth format {fmt!r} not supported; expected compressedDepth png')
    raw = bytes(msg.data)
    try:
        with PILImage.open(io.BytesIO(raw[12:])) as im:
            png = np.array(im)
        quant_a, quant_b = struct.unpack('<ff', raw[4:12])
    except Exception as e:
        raise DatasetError(f'{where}: cannot decode compressedDepth image: {e}') from e
    if fmt.startswith('16UC1') or fmt.startswith('mono16'):
        return png.astype(np.float32) / np.float32(1000.0)
    if fmt.startswith('32FC1'):                     # inverse depth quantisation
        v = png.astype(np.float32)
        with np.errstate(divide='ignore', invalid='ignore'):
            out = np.float32(quant_a) / (v - np.float32(quant_b))
        out[(png == 0) | ~np.isfinite(out)] = 0.0
        return out.astype(np.float32)
    raise DatasetError(f'{where}: compressed depth format {fmt!r} not supported')


def _compressed_size(msg, where: str) -> Tuple[int, int]:
    from PIL import Image as PILImage
    raw = bytes(msg.data)
    if 'compresseddepth' in str(msg.format).lower().replace(' ', ''):
        raw = raw[12:]
    try:
        with PILImage.open(io.BytesIO(raw)) as im:
            return im.size
    except Exception as e:
        raise DatasetError(f'{where}: cannot decode compressed image (format {msg.format!r}): {e}') from e


def image_size(msg, where: str) -> Tuple[int, int]:
    """(width, height) of an Image or CompressedImage."""
    if hasattr(msg, 'format'):
        return _compressed_size(msg, where)
    return int(msg.width), int(msg.height)


def camera_info_to_camera(msg, where: str = 'camera info', rectified: bool = False) -> PinholeCamera:
    """PinholeCamera of the images a (rosbags or rclpy) CameraInfo describes.

    Raw images (the default): the intrinsics ``k`` and the lens distortion (``distortion_model`` and ``d``:
    plumb_bob, rational_polynomial or equidistant; pixels are back-projected along their undistorted rays; an
    empty or all-zero ``d`` is a pinhole). ``rectified`` images (image_proc's ``image_rect``): the projection
    ``p`` (fx = p[0], fy = p[5], cx = p[2], cy = p[6]) and no distortion, as image_geometry and depth_image_proc
    read them. Binning and the region of interest are applied as image_geometry does: the images are the ROI
    (``roi.width`` x ``roi.height``, 0 = the whole ``width`` x ``height``) divided by ``binning_x`` and
    ``binning_y`` (0 or 1 = none), and so are the principal point (less the ROI offset) and the focal lengths.

    Rejected with the reason (DatasetError): a zero width or height, a k (or p) with a NaN / inf entry or with
    fx or fy <= 0 (an all-zero k is an uncalibrated camera), a principal point outside the open image rectangle
    (0, width) x (0, height) of the calibration, a ROI outside it, a distortion model that is not supported
    (with a non-zero ``d``) or the wrong number of coefficients for it."""
    if msg.width == 0 or msg.height == 0:
        raise DatasetError(f'{where}: zero image size ({msg.width}x{msg.height}); is the camera calibrated?')
    W, H = int(msg.width), int(msg.height)
    if rectified:
        p = np.asarray(msg.p, dtype=np.float64).reshape(-1)
        if p.size != 12 or not np.all(np.isfinite(p)) or p[0] <= 0 or p[5] <= 0:
            raise DatasetError(f'{where}: invalid projection p={p.tolist()}; with rectified images fx=p[0] and '
                               f'fy=p[5] must be finite and > 0 (for raw images, use k and d: rectified off)')
        K, model, d = p.reshape(3, 4)[:, :3], '', ()
    else:
        k = np.asarray(msg.k, dtype=np.float64).reshape(-1)
        if k.size != 9 or not np.all(np.isfinite(k)) or k[0] <= 0 or k[4] <= 0:
            raise DatasetError(f'{where}: invalid intrinsics k={k.tolist()}; fx=k[0] and fy=k[4] must be finite '
                               f'and > 0')
        K, model, d = k.reshape(3, 3), str(msg.distortion_model), tuple(float(x) for x in msg.d)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    if not (0.0 < cx < W and 0.0 < cy < H):
        entries = 'p[2], p[6]' if rectified else 'k[2], k[5]'
        raise DatasetError(f'{where}: principal point (cx, cy) = ({cx:g}, {cy:g}) = ({entries}) is not inside the '
                           f'{W}x{H} image; check the calibration')
    roi = getattr(msg, 'roi', None)
    x0, y0, w, h = (0, 0, 0, 0) if roi is None else (int(roi.x_offset), int(roi.y_offset), int(roi.width),
                                                        int(roi.height))
    if w == 0 or h == 0:
        x0, y0, w, h = 0, 0, W, H
    if x0 + w > W or y0 + h > H:
        raise DatasetError(f'{where}: region of interest {w}x{h} at ({x0}, {y0}) is not inside the {W}x{H} image')
    bx, by = max(1, int(getattr(msg, 'binning_x', 0))), max(1, int(getattr(msg, 'binning_y', 0)))
    try:
        return PinholeCamera(fx / bx, fy / by, (cx - x0) / bx, (cy - y0) / by, w // bx, h // by, model, d)
    except ValueError as e:
        raise DatasetError(f'{where}: {e}') from None
