"""Fuzzing (hypothesis) of every input the node takes: images, camera info, poses, frames and query requests.

Property: each conversion and Mapper.integrate / segment either succeeds with a sane result or raises ValueError
(ConversionError is one) with a message; nothing else escapes, and the map stays finite and answers queries.
Derandomized (a fixed seed per test, no example database), so CI runs are reproducible.
"""
import array
import math
import warnings

import numpy as np
import torch
from geometry_msgs.msg import PoseStamped
from hypothesis import HealthCheck, event, given, settings, strategies as st
from hypothesis.extra import numpy as hnp
from sensor_msgs.msg import CameraInfo, Image

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.mapper import Frame
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.conversions import ConversionError


def fuzz(n):
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True)
SPECIAL = st.sampled_from([0.0, -0.0, math.nan, math.inf, -math.inf, -1.0, 1e-300, 1e300, 5e-324])
NUMBER = st.one_of(st.floats(-2000, 2000), SPECIAL, ANY_FLOAT)


def sometimes_junk(draw, good, one_in=12):
    """A value of ``good``, or (one draw in ``one_in``) any NUMBER."""
    return draw(NUMBER) if draw(st.integers(1, one_in)) == 1 else draw(good)


def fails_cleanly(fn, *args, **kwargs):
    """(result, None) or (None, the ValueError) -- any other exception fails the test."""
    name = getattr(fn, '__name__', str(fn))
    try:
        result = fn(*args, **kwargs)
    except ValueError as e:
        assert str(e).strip(), f'{type(e).__name__} without a message'
        event(f'{name}: refused')                   # counts shown by pytest --hypothesis-show-statistics
        return None, e
    event(f'{name}: ok')
    return result, None


# ------------------------------------------------------------------------------------------------ images
@st.composite
def image_msgs(draw):
    """Image messages, from well-formed (any pixel bytes) to garbage encodings, sizes, steps and data lengths."""
    enc = draw(st.text(max_size=10)) if draw(st.integers(0, 7)) == 0 else draw(st.sampled_from(sorted(conv.ENCODINGS)))
    h, w = draw(st.integers(0, 9)), draw(st.integers(0, 9))
    dtype, ch = conv.ENCODINGS.get(enc, (np.uint8, 1))
    row = w * ch * np.dtype(dtype).itemsize
    if draw(st.integers(0, 3)):
        step = row + draw(st.integers(0, 5))
        data = draw(st.binary(min_size=step * h, max_size=step * h + 8))
    else:
        step = draw(st.integers(0, 80) | st.just(2 ** 32 - 1))
        data = draw(st.binary(max_size=600))
    msg = Image(height=h, width=w, encoding=enc, step=step, is_bigendian=draw(st.sampled_from([0, 1, 255])))
    msg.data = array.array('B', data)
    return msg


@fuzz(1500)
@given(image_msgs())
def test_fuzz_image_decoders(msg):
    raw, _ = fails_cleanly(conv.image_to_numpy, msg)
    if raw is not None:
        assert raw.shape[:2] == (msg.height, msg.width)
    rgb, _ = fails_cleanly(conv.color_to_rgb, msg)
    if rgb is not None:
        assert rgb.dtype == np.uint8 and rgb.shape == (msg.height, msg.width, 3)
    depth, _ = fails_cleanly(conv.depth_to_meters, msg)
    if depth is not None:
        assert depth.dtype == np.float32 and depth.shape == (msg.height, msg.width)
        assert np.all(np.isfinite(depth)) and np.all(depth >= 0)       # invalid readings are 0
    labels, _ = fails_cleanly(conv.labels_to_numpy, msg)
    if labels is not None:
        assert labels.shape == (msg.height, msg.width) and labels.dtype.kind in 'iu'


@fuzz(400)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, max_side=12),
                  elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_fuzz_depth_values(d):
    """32FC1 depth: positive finite readings pass unchanged, every other reading becomes 0."""
    m = conv.depth_to_meters(conv.numpy_to_image(d, '32FC1'))
    keep = np.isfinite(d) & (d > 0)
    np.testing.assert_array_equal(m, np.where(keep, d, 0).astype(np.float32))


# ------------------------------------------------------------------------------------------------ camera info
@st.composite
def intrinsics(draw):
    """(k, width, height) of a CameraInfo: mostly plausible, each field junk now and then."""
    width, height = (draw(st.integers(0, 5) if draw(st.integers(0, 15)) == 0 else st.integers(1, 2000))
                     for _ in range(2))
    fx, fy = (sometimes_junk(draw, st.floats(0.5, 2000)) for _ in range(2))
    cx, cy = (sometimes_junk(draw, st.floats(-0.1, 1.1).map(lambda f, n=n: f * n)) for n in (width, height))
    zero, one = (sometimes_junk(draw, st.just(0.0), 24) for _ in range(4)), sometimes_junk(draw, st.just(1.0), 24)
    k = [fx, next(zero), cx, next(zero), fy, cy, next(zero), next(zero), one]
    return k, width, height


@fuzz(1000)
@given(intrinsics())
def test_fuzz_camera_info(intr):
    k, width, height = intr
    cam, err = fails_cleanly(conv.camera_info_to_camera, CameraInfo(width=width, height=height, k=k))
    fx, cx, fy, cy = k[0], k[2], k[4], k[5]
    valid = (width > 0 and height > 0 and all(math.isfinite(v) for v in k) and fx > 0 and fy > 0
             and 0 < cx < width and 0 < cy < height)
    assert (cam is not None) == valid, (k, width, height, err)
    if cam is not None:
        assert (cam.fx, cam.fy, cam.cx, cam.cy, cam.width, cam.height) == (fx, fy, cx, cy, width, height)


@fuzz(300)
@given(st.sampled_from(['plumb_bob', 'rational_polynomial', 'equidistant', 'fisheye', '']),
       st.lists(st.one_of(st.floats(-1.0, 1.0), st.just(0.0), NUMBER), max_size=15), st.integers(0, 4),
       st.integers(0, 4), st.tuples(*(st.integers(0, 700) for _ in range(4))), st.booleans())
def test_fuzz_camera_info_lens_binning_roi(model, d, bx, by, roi, rectified):
    """Any lens model, coefficients, binning and ROI: a camera or a ConversionError; a camera's rays are finite
    where it has them and go back through the lens model onto their pixels."""
    from sensor_msgs.msg import RegionOfInterest
    info = CameraInfo(width=640, height=480, k=[500.0, 0, 320, 0, 500, 240, 0, 0, 1],
                      p=[500.0, 0, 320, 0, 0, 500, 240, 0, 0, 0, 1, 0], distortion_model=model, d=d,
                      binning_x=bx, binning_y=by, roi=RegionOfInterest(x_offset=roi[0], y_offset=roi[1],
                                                                       width=roi[2], height=roi[3]))
    cam, err = fails_cleanly(conv.camera_info_to_camera, info, rectified=rectified)
    if cam is None:
        return
    assert cam.width >= 1 and cam.height >= 1 and not (rectified and cam.distorted)
    u, v = np.meshgrid(np.linspace(0, cam.width - 1, 9), np.linspace(0, cam.height - 1, 9))
    with warnings.catch_warnings():
        warnings.simplefilter('error')      # junk coefficients overflow silently: those pixels get no ray
        x, y, ok = cam.rays(u, v)
        xd, yd = cam.distort(x[ok], y[ok])
    assert np.isfinite(x[ok]).all() and np.isfinite(y[ok]).all()
    assert np.abs(xd * cam.fx + cam.cx - u[ok]).max(initial=0) < 1e-3
    assert np.abs(yd * cam.fy + cam.cy - v[ok]).max(initial=0) < 1e-3


# ------------------------------------------------------------------------------------------------ poses
@st.composite
def poses(draw):
    """(position, quaternion): mostly finite positions and quaternions of norm 0.85..1.15, junk now and then."""
    position = [sometimes_junk(draw, st.floats(-1e3, 1e3)) for _ in range(3)]
    q = np.array(draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1)))
    q = q / np.linalg.norm(q) * draw(st.floats(0.85, 1.15) | st.floats(0, 2))
    return position, [sometimes_junk(draw, st.just(float(v))) for v in q]


@fuzz(1000)
@given(poses(), st.booleans())
def test_fuzz_poses(pose, as_message):
    """Accepted iff finite with a quaternion norm in [0.9, 1.1]; then a finite rigid transform."""
    position, quaternion = pose
    if as_message:
        msg = PoseStamped()
        msg.pose.position.x, msg.pose.position.y, msg.pose.position.z = position
        o = msg.pose.orientation
        o.x, o.y, o.z, o.w = quaternion
        T, err = fails_cleanly(conv.pose_msg_to_matrix, msg)
    else:
        T, err = fails_cleanly(conv.pose_to_matrix, position, quaternion)
    finite = all(math.isfinite(v) for v in position + quaternion)
    valid = finite and 0.9 <= math.hypot(*quaternion) <= 1.1
    assert (T is not None) == valid, (position, quaternion, err)
    if T is not None:
        R = T[:3, :3]
        assert np.all(np.isfinite(T)) and np.allclose(R @ R.T, np.eye(3), atol=1e-9)
        assert np.isclose(np.linalg.det(R), 1.0) and np.array_equal(T[3], [0, 0, 0, 1])
        np.testing.assert_array_equal(T[:3, 3], position)
    else:
        assert isinstance(err, ConversionError) and ('quaternion' in str(err) or 'position' in str(err))


# ------------------------------------------------------------------------------------------------ frames
FRAME_FAULTS = ['depth shape', 'depth dtype', 'camera size', 'intrinsics', 'pose matrix', 'far', 'no labels',
                'label ids', 'label dtype', 'stamp']


@st.composite
def frames(draw):
    """Frames for Mapper.integrate: depth with NaN / inf / negative / huge readings, plausible intrinsics and rigid
    poses, and in about 60 % of frames one fault (FRAME_FAULTS)."""
    fault = draw(st.sampled_from(FRAME_FAULTS + [None] * 15))
    h, w = draw(st.integers(1, 10)), draw(st.integers(1, 10))
    depth = draw(hnp.arrays(np.float32, (h, w), elements=st.floats(0.0625, 6.0, width=32)
                            | st.sampled_from([0.0, -1.0, np.nan, np.inf, -np.inf, 3e38])))
    if fault == 'depth shape':
        depth = draw(st.sampled_from([depth[:, :-1], depth[None], np.zeros((0, w), np.float32)]))
    elif fault == 'depth dtype':
        depth = np.nan_to_num(depth).clip(-1, 1e4).astype(draw(st.sampled_from([np.int32, np.uint16])))
    rgb = draw(hnp.arrays(np.uint8, (h, w, 3)))
    cw, ch = (draw(st.integers(-1, 11)), draw(st.integers(-1, 11))) if fault == 'camera size' else (w, h)
    good = [st.floats(0.5, 100), st.floats(0.5, 100), st.floats(-5, w + 5), st.floats(-5, h + 5)]
    intr = [draw(NUMBER if fault == 'intrinsics' else g) for g in good]
    camera, _ = fails_cleanly(PinholeCamera, *intr, cw, ch)
    if camera is None:
        camera = PinholeCamera(10.0, 10.0, w / 2, h / 2, w, h)
    q = draw(st.lists(st.floats(-1, 1), min_size=4, max_size=4).filter(lambda q: np.linalg.norm(q) > 0.1))
    T = conv.pose_to_matrix(draw(st.lists(st.floats(-3, 3), min_size=3, max_size=3)), np.asarray(q) / np.linalg.norm(q))
    if fault == 'pose matrix':
        T = draw(st.sampled_from([T * [[1.05], [1], [1], [1]], T @ np.diag([1, 1, -1, 1]),
                                  np.array(draw(st.lists(NUMBER, min_size=16, max_size=16))).reshape(4, 4)]))
    elif fault == 'far':
        T[draw(st.integers(0, 2)), 3] += draw(st.sampled_from([-1e3, 2e5, -1e6, 1e8]))
    labels = draw(hnp.arrays(st.sampled_from([np.uint16, np.int32, np.int64]), (h, w), elements=st.integers(0, 3)))
    if fault == 'no labels':
        labels = None
    elif fault == 'label ids':
        labels = labels.astype(np.int32) + draw(st.sampled_from([-3, 2, 4]))
    elif fault == 'label dtype':
        labels = labels.astype(np.float32)
    stamp = draw(SPECIAL if fault == 'stamp' else st.floats(0, 1e4))
    return Frame(rgb, depth, camera, T, stamp, labels)


def assert_map_sane(mapper):
    n = mapper.map.size
    assert torch.isfinite(mapper.map.features[:n].float()).all() and torch.isfinite(mapper.map.centers()).all()
    assert (mapper.map.weights[:n] > 0).all() and torch.isfinite(mapper.map.colors[:n]).all()


def test_fuzz_integrate_keeps_the_map_usable(new_sim_mapper, wall_frame):
    """400 fuzzed frames into one map; then the map is finite and still maps and answers a real frame."""
    mapper = new_sim_mapper()

    @fuzz(400)
    @given(frames(), st.booleans())
    def run(frame, force):
        before = mapper.map.size
        ok, err = fails_cleanly(mapper.integrate, frame, force)
        assert ok in (True, False) or err is not None
        if err is not None:
            assert mapper.map.size == before                          # a refused frame changes nothing
        assert_map_sane(mapper)

    run()
    assert mapper.map.size > 0                                        # some fuzzed frames were integrated
    assert mapper.integrate(wall_frame(1e5), force=True)
    seg = mapper.segment('chair', ['wall', 'plant'])
    assert len(seg.xyz) > 10 and np.all(np.isfinite(seg.xyz))
    assert_map_sane(mapper)


# ------------------------------------------------------------------------------------------------ queries
TEXT = st.one_of(st.text(min_size=1, max_size=40), st.sampled_from([
    'chair', ' chair\n', 'chaise longue rembourrée 🛋️', '椅子', 'sofa\x00\x07', '\t \r\n', '', '👩\u200d👩\u200d👧']))
LONG_TEXT = st.text(min_size=995, max_size=1010)
REQUEST_FAULTS = ['long text', 'long negative', 'many negatives', 'blank negatives', 'threshold']


@st.composite
def requests(draw):
    """(text, negatives, threshold) of /segment_by_text: any Unicode, and in about 40 % one fault."""
    fault = draw(st.sampled_from(REQUEST_FAULTS + [None] * 8))
    text = draw(LONG_TEXT if fault == 'long text' else TEXT)
    negatives = draw(st.lists(TEXT, max_size=4))
    if fault == 'long negative':
        negatives.append(draw(LONG_TEXT))
    elif fault in ('many negatives', 'blank negatives'):
        negatives = draw(st.lists(st.sampled_from(['', ' ', 'wall', 'x'] if fault == 'many negatives' else ['', ' \n']),
                                  min_size=1 if fault == 'blank negatives' else 30, max_size=40))
    return text, negatives, draw(NUMBER if fault == 'threshold' else st.floats(-1, 1))


def test_fuzz_segment_requests(new_sim_mapper, wall_frame):
    """Query requests as the service receives them: accepted iff the documented limits hold."""
    mapper, empty = new_sim_mapper(), new_sim_mapper()
    mapper.integrate(wall_frame(), force=True)

    @fuzz(250)
    @given(requests(), st.integers(0, 9))
    def run(request, which):
        text, negatives, threshold = request
        m = empty if which == 0 else mapper
        seg, err = fails_cleanly(m.segment, text, negatives, threshold)
        cleaned = ' '.join(''.join(' ' if ord(c) < 32 or 127 <= ord(c) < 160 else c for c in text).split())
        valid = (len(text) <= 1000 and cleaned != '' and math.isfinite(threshold) and threshold <= 1
                 and len(negatives) <= 32 and all(len(n) <= 1000 for n in negatives))
        assert (seg is not None) == valid, (text[:50], negatives[:5], threshold, err)
        if seg is not None:
            thr = threshold if threshold > 0 else m.cfg.query.default_threshold
            assert len(seg.xyz) == len(seg.rgb) == len(seg.scores) and np.all(np.isfinite(seg.xyz))
            assert np.all((seg.scores >= thr - 1e-6) & (seg.scores <= 1 + 1e-6))
            assert m is mapper or len(seg.xyz) == 0

    run()
    assert len(mapper.segment('chair', ['wall', 'plant']).xyz) > 10
