"""Bad input, case by case: each is refused with a reason that names the problem, counted, and survived.

Conversions and the Mapper directly; the node's policies (camera info, stamps, poses, depth, requests) on a
MappingNode in this process over real rclpy; and a burst of garbage at a mapping node process.
"""
import math
import re
import time
from dataclasses import replace

import numpy as np
import pytest
from sensor_msgs.msg import CameraInfo

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.features.precomputed import PrecomputedFeatures
from ov3d_ros.core.mapper import Mapper
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.conversions import ConversionError
from ov3d_ros.sim import default_camera
from ov3d_ros.sim.classes import CLASS_NAMES


# ------------------------------------------------------------------------------------------------ conversions
@pytest.mark.parametrize('cx, cy', [(0.0, 240.0), (-3.0, 240.0), (640.0, 240.0), (320.0, 0.0), (320.0, 481.0)])
def test_principal_point_outside_the_image_is_rejected(cx, cy):
    with pytest.raises(ConversionError, match=r'principal point .* is not inside the 640x480 image'):
        conv.camera_info_to_camera(CameraInfo(width=640, height=480, k=[500.0, 0, cx, 0, 500.0, cy, 0, 0, 1]))


@pytest.mark.parametrize('i', [0, 2, 4, 5])
def test_nan_intrinsics_are_rejected(i):
    k = [500.0, 0, 320, 0, 500.0, 240, 0, 0, 1]
    k[i] = math.nan
    with pytest.raises(ConversionError, match='invalid intrinsics'):
        conv.camera_info_to_camera(CameraInfo(width=640, height=480, k=k))


def test_invalid_depth_readings_become_zero():
    d = np.array([[np.nan, np.inf, -np.inf, -1.5, 0.0, 2.0]], np.float32)
    np.testing.assert_array_equal(conv.depth_to_meters(conv.numpy_to_image(d, '32FC1')), [[0, 0, 0, 0, 0, 2.0]])


@pytest.mark.parametrize('encoding, match', [('rgb8', "label encoding 'rgb8' not supported"),
                                             ('32FC1', "label encoding '32FC1'"), ('', "label encoding '' not supported")])
def test_label_images_need_an_id_encoding(encoding, match):
    arr = np.zeros((2, 2, 3) if encoding == 'rgb8' else (2, 2), np.uint8 if encoding == 'rgb8' else np.float32)
    msg = conv.numpy_to_image(arr, encoding or '32FC1')
    msg.encoding = encoding
    with pytest.raises(ConversionError, match=match):
        conv.labels_to_numpy(msg)


@pytest.mark.parametrize('norm, ok', [(0.9, True), (1.1, True), (0.899, False), (1.101, False), (1e3, False)])
def test_quaternion_norm_policy(norm, ok):
    """Quaternions of norm 0.9..1.1 are normalised, others refused (tf2 itself refuses |norm^2 - 1| >= 0.01)."""
    q = np.array([0.0, 0.0, math.sqrt(0.5), math.sqrt(0.5)]) * norm
    if ok:
        np.testing.assert_allclose(conv.pose_to_matrix([0, 0, 0], q)[:3, :3], [[0, -1, 0], [1, 0, 0], [0, 0, 1]],
                                   atol=1e-12)
    else:
        with pytest.raises(ConversionError, match=r'quaternion .* has norm'):
            conv.pose_to_matrix([0, 0, 0], q)


# ------------------------------------------------------------------------------------------------ Mapper frames
def test_nan_inf_negative_depth_pixels_are_ignored(new_sim_mapper, wall_frame):
    clean, dirty = wall_frame(), wall_frame()
    dirty.depth_m[:, :20] = np.array([np.nan, np.inf, -np.inf, -2.0, 0.0])[np.arange(20) % 5]
    dirty.depth_m[0, 30] = 1e30
    clean.depth_m[:, :20] = 0.0
    clean.depth_m[0, 30] = 0.0
    maps = []
    for frame in (clean, dirty):
        m = new_sim_mapper()
        assert m.integrate(frame, force=True)
        assert np.isfinite(m.map.centers().numpy()).all() and np.isfinite(m.map.features[:m.map.size].float()).all()
        maps.append(np.sort(m.map.keys[:m.map.size].numpy()))
    np.testing.assert_array_equal(maps[0], maps[1])                # exactly the voxels of the valid pixels
    empty = new_sim_mapper()
    assert empty.integrate(replace(dirty, depth_m=np.full((48, 64), np.nan, np.float32)), force=True)
    assert empty.map.size == 0                                     # an all-invalid frame adds nothing


@pytest.mark.parametrize('T, match', [
    (np.diag([1.1, 1.0, 1.0, 1.0]), 'rigid'),                       # scaled
    (np.diag([1.0, 1.0, -1.0, 1.0]), 'rigid'),                      # a reflection
    (np.array([[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), 'rigid'),   # sheared
    (np.vstack([np.eye(4)[:3], [0, 0, 1, 1]]), 'last row'),
    (np.where(np.eye(4) > 0, np.nan, 0.0), 'finite'),
    (np.eye(4) + np.pad([[2e5]], ((0, 3), (3, 0))), 'map range'),  # 200 km away at 10 cm voxels
])
def test_poses_must_be_rigid_and_in_range(new_sim_mapper, wall_frame, T, match):
    with pytest.raises(ValueError, match=match):
        new_sim_mapper().integrate(replace(wall_frame(), T_W_C=T), force=True)


def test_other_bad_frames_are_named(new_sim_mapper, wall_frame):
    m, f = new_sim_mapper(), wall_frame()
    cases = [(replace(f, stamp_s=math.nan), 'time stamp must be finite'),
             (replace(f, depth_m=(f.depth_m * 1000).astype(np.uint16)), 'float array in metres'),
             (replace(f, labels=f.labels.astype(np.float32)), 'integer ids'),
             (replace(f, labels=f.labels + 7), r'label values must be in \[0, 4\)'),
             (replace(f, camera=PinholeCamera(1e-12, 1e-12, 31.5, 23.5, 64, 48)), 'map range'),
             (replace(f, labels=None), 'needs a label image')]
    for frame, match in cases:
        with pytest.raises(ValueError, match=match):
            m.integrate(frame, force=True)
    assert m.map.size == 0 and m.integrate(f)                      # nothing was half-integrated


def test_nan_precomputed_features_are_refused(wall_frame):
    from ov3d_ros.core.config import MapperConfig
    m = Mapper(MapperConfig(), PrecomputedFeatures(['chair', 'wall'], np.eye(2, 16, dtype=np.float32)))
    feats = np.ones((3, 4, 16), np.float32)
    feats[1, 1, 3] = np.nan
    with pytest.raises(ValueError, match='NaN or inf'):
        m.integrate(replace(wall_frame(), labels=None, features=feats), force=True)


# ------------------------------------------------------------------------------------------------ Mapper queries
@pytest.fixture()
def wall_map(new_sim_mapper, wall_frame):
    m = new_sim_mapper()
    m.integrate(wall_frame(), force=True)
    return m


@pytest.mark.parametrize('text, negatives, threshold, match', [
    ('', (), 0.0, 'query text is empty'),
    (' \t\n\x1b\x00 ', (), 0.0, 'query text is empty'),          # only whitespace and control characters
    ('c' * 1001, (), 0.0, 'query text has 1001 characters; at most 1000'),
    ('chair', ['wall', 'n' * 1001], 0.0, 'a negative has 1001 characters'),
    ('chair', ['wall'] * 33, 0.0, '33 negatives given; at most 32'),
    ('chair', (), math.nan, 'threshold must be a number <= 1'),
    ('chair', (), math.inf, 'threshold'),
    ('chair', (), -math.inf, 'threshold'),
    ('chair', (), 1.5, 'threshold'),
])
def test_bad_query_requests_are_refused(wall_map, text, negatives, threshold, match):
    with pytest.raises(ValueError, match=match):
        wall_map.segment(text, negatives, threshold)


def test_query_texts_are_cleaned_and_any_unicode_works(wall_map):
    chair = wall_map.segment('chair')
    assert len(chair.xyz) > 10
    for same in ('  chair\n', 'chair\x07', '\tchair\x1b\x00'):      # control characters are spaces
        np.testing.assert_array_equal(wall_map.segment(same).xyz, chair.xyz)
    assert len(wall_map.segment('c' * 1000).xyz) >= 0                # the limit itself is accepted
    for text in ('chaise longue rembourrée 🛋️', '椅子', '👩\u200d👩\u200d👧 ∑ ½ \u202e', 'ｃｈａｉｒ'):
        seg = wall_map.segment(text)
        assert len(seg.xyz) == len(seg.scores) and np.isfinite(seg.scores).all()


def test_threshold_and_negatives_defaults(wall_map):
    default = wall_map.segment('chair')
    for thr in (0.0, -1.0, -1e9):                                   # <= 0: query.default_threshold
        np.testing.assert_array_equal(wall_map.segment('chair', threshold=thr).xyz, default.xyz)
    for negs in ([], [''], ['', ' ', '\n\x00'], None):               # none given: query.default_negatives
        np.testing.assert_array_equal(wall_map.segment('chair', negs).xyz, default.xyz)
    assert len(wall_map.segment('chair', threshold=1.0).xyz) <= len(default.xyz)
    dup = wall_map.segment('chair', ['plant', 'plant', ' plant ', 'wall'])
    np.testing.assert_array_equal(dup.xyz, wall_map.segment('chair', ['plant', 'wall']).xyz)


# ------------------------------------------------------------------------------------------------ node policies
RGB = np.full((48, 64, 3), 90, np.uint8)
DEPTH_MM = np.full((48, 64), 1500, np.uint16)
CAMERA = default_camera(64, 48)
CHAIR_LABELS = np.where(np.arange(64) < 32, CLASS_NAMES.index('chair'), CLASS_NAMES.index('wall')).astype(
    np.uint16)[None].repeat(48, 0)


def process(local, timeout_s=5.0, **frame):
    """Publish one frame (BadInputPublisher.send arguments; chair labels by default), spin until the node took it
    and nothing changed for 0.3 s; returns the change of the node's counters and its last error."""
    node, client, pub = local['node'], local['client'], local['pub']
    keys = ('frames', 'keyframes', 'dropped')
    before = node.status()
    frame.setdefault('labels', CHAIR_LABELS)
    pub.send(frame.pop('rgb', RGB), frame.pop('depth', DEPTH_MM), **frame)
    end, last, since = time.monotonic() + timeout_s, None, time.monotonic()
    while time.monotonic() < end:
        client.spin(0.05)
        now = node.status()
        state = tuple(now[k] for k in keys)
        if state != last:
            last, since = state, time.monotonic()
        elif (now['pending_depth'] == 0 and now['pending_keyframes'] == 0 and state != tuple(before[k] for k in keys)
              and time.monotonic() - since > 0.3):
            return {k: now[k] - before[k] for k in keys}, now['last_error']
    raise AssertionError(f'frame not processed; status {node.status()}')


def spin_until(local, ready, timeout_s=10.0) -> dict:
    """Spin the node until ``ready(status)``; returns the status (AssertionError after ``timeout_s``)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        local['client'].spin(0.05)
        status = local['node'].status()
        if ready(status):
            return status
    raise AssertionError(f'status never became ready: {local["node"].status()}')


def test_frames_before_camera_info_wait_for_it_and_the_queue_bound_drops_with_the_reason(local_node, capfd):
    """The first test on the module's node: no valid camera info was ever sent. Frames wait for it in the input
    queue (the camera info topic is often matched after the images at start-up); a full queue drops the oldest
    with the reason, logged at most every 2 s; once a valid camera info comes, the waiting frames are used."""
    from rclpy.parameter import Parameter
    node, pub = local_node['node'], local_node['pub']
    queue = node.queue_size
    timeout = node.get_parameter('sync_timeout_s').value   # only the queue bound drops here, on a slow machine too
    assert node.set_parameters([Parameter('sync_timeout_s', value=600.0)])[0].successful
    invalid = CameraInfo(width=64, height=48, k=[0.0] * 9)
    t0 = time.monotonic()
    for i in range(queue + 5):
        pub.send(RGB, DEPTH_MM, labels=CHAIR_LABELS, camera=invalid if i == 2 else None)
        sent = i + 1 + (i >= 2)                                 # frames and the invalid camera info
        # each message is accounted for (waiting, dropped or pushed out of a full queue), and the queue is below
        # its bound before the next frame comes
        status = spin_until(local_node, lambda s: s['pending_depth'] + s['dropped'] + s['superseded'] == sent
                            and s['pending_depth'] < queue)
    assert status['frames'] == 0 and status['keyframes'] == 0, status
    assert status['pending_depth'] == queue - 1 and status['dropped'] == 1 + 6, status   # the info, 6 frames
    assert 'no valid camera info received yet on /color/camera_info' in status['last_error'], status
    assert 'the last one was rejected: camera info: invalid intrinsics' in status['last_error'], status
    assert f'the queue ({queue} depth images) was full' in status['last_error'], status
    warnings = [line for line in capfd.readouterr().err.splitlines() if 'camera info' in line]
    assert 1 <= len(warnings) <= 1 + (time.monotonic() - t0) / 2.0, warnings       # logged at most every 2 s
    info = conv.camera_to_camera_info(CAMERA)
    info.header = conv.make_header('camera', conv.sec_to_stamp(pub.now()))
    pub.pubs['color/camera_info'].publish(info)               # the camera info alone: the waiting frames go in
    done = spin_until(local_node, lambda s: s['pending_depth'] == 0 and s['pending_keyframes'] == 0
                      and s['keyframes'] == 1)
    assert done['dropped'] == status['dropped'], done          # none of the waiting frames was lost
    used = done['frames'] + done['superseded'] - status['superseded']
    assert done['frames'] >= 1 and used == status['pending_depth'], done
    assert node.set_parameters([Parameter('sync_timeout_s', value=timeout)])[0].successful


def test_invalid_camera_info_is_dropped_and_the_last_valid_one_kept(local_node):
    bad = [(CameraInfo(width=64, height=48, k=[0.0] * 9), 'invalid intrinsics'),
           (CameraInfo(width=64, height=48, k=[50.0, 0, -4, 0, 50.0, 24, 0, 0, 1]), 'principal point'),
           (CameraInfo(width=0, height=48, k=[50.0, 0, 32, 0, 50.0, 24, 0, 0, 1]), 'zero image size')]
    assert local_node['node'].cameras[0].camera_info is not None    # the valid one of the test before
    for info, match in bad:
        delta, error = process(local_node, camera=info)
        assert delta['frames'] == 1 and delta['dropped'] == 1      # the camera info; the frame used the last one
        assert match in error and 'the previous one is kept' in error
        assert 'rectified_images' not in error                     # p is no better: no hint that it would be


def test_stamp_policy(local_node):
    pub = local_node['pub']
    end = time.monotonic() + 60                  # run alone too: until the node has its camera info
    while time.monotonic() < end and local_node['node'].status()['frames'] == 0:
        pub.send(RGB, DEPTH_MM, camera=CAMERA, labels=CHAIR_LABELS)
        local_node['client'].spin(0.3)
    spin_until(local_node, lambda s: s['frames'] > 0 and s['pending_depth'] == 0 and s['pending_keyframes'] == 0)
    for stamp, match in [(0.0, 'stamp 0'), (pub.now() + 3600.0, "ahead of this node's clock")]:
        delta, error = process(local_node, stamp=stamp)
        assert delta == {'frames': 0, 'keyframes': 0, 'dropped': 1} and match in error
    t = pub.now()
    assert process(local_node, stamp=t)[0]['frames'] == 1
    for stamp in (t - 0.5, t):                                      # out of order, repeated
        delta, error = process(local_node, stamp=stamp)
        assert delta['dropped'] == 1 and 'not newer than the last processed frame' in error
    delta, _ = process(local_node, stamp=t - 100.0)                 # time jumped back (a looping bag)
    assert delta == {'frames': 1, 'keyframes': 1, 'dropped': 0}      # keyframe timing restarted
    t = pub.now()
    assert process(local_node, stamp=t)[0]['frames'] == 1
    # a loop shorter than STAMP_JUMP_S: its frames come older than the last one in a row; from the third on, a jump
    for i, stamp in enumerate((t - 3.0, t - 2.9)):
        delta, error = process(local_node, stamp=stamp)
        assert delta['dropped'] == 1 and 'not newer than the last processed frame' in error, i
    assert process(local_node, stamp=t - 2.8)[0] == {'frames': 1, 'keyframes': 1, 'dropped': 0}
    assert process(local_node, stamp=t - 2.7)[0]['frames'] == 1      # the loop goes on
    assert process(local_node)[0]['frames'] == 1


def test_a_frame_whose_pose_was_lost_takes_the_interpolation_of_the_poses_around_it(local_node):
    """Its own pose never comes (lost on the way); the poses 0.1 s before and after it do: the frame is integrated
    at the pose halfway between them, and counted in ``poses_interpolated``."""
    node = local_node['node']
    before = node.status()['cameras']
    t = local_node['pub'].now()
    delta, error = process(local_node, stamp=t, poses=[(-0.1, (0.0, 0.0, 0.0)), (0.1, (0.2, 0.0, 0.0))])
    assert delta['frames'] == 1 and delta['dropped'] == 0, error
    after = node.status()['cameras']
    assert sum(c['poses_interpolated'] for c in after.values()) == \
        sum(c['poses_interpolated'] for c in before.values()) + 1
    depth = conv.numpy_to_image(DEPTH_MM, '16UC1', conv.make_header('camera', conv.sec_to_stamp(t)))
    T = node._pose_at(node.cameras[0], depth, conv.stamp_to_sec(depth.header.stamp))
    assert T[:3, 3] == pytest.approx([0.1, 0.0, 0.0], abs=1e-6)


@pytest.mark.parametrize('frame, match', [
    ({'quaternion': (math.nan, 0, 0, 1)}, 'camera pose at .* rejected: pose orientation must be a quaternion'),
    ({'quaternion': (0, 0, 0, 0)}, 'has norm 0'),
    ({'quaternion': (0, 0, 0, 3)}, 'has norm 3'),
    ({'position': (0, math.inf, 0)}, 'pose position must be 3 finite numbers'),
    ({'depth': np.full((48, 64), np.nan, np.float32), 'depth_encoding': '32FC1'}, 'has no valid pixel'),
    ({'depth': np.full((48, 64), -1.0, np.float32), 'depth_encoding': '32FC1'}, 'has no valid pixel'),
    ({'depth': np.zeros((48, 64), np.uint16)}, 'has no valid pixel'),
])
def test_bad_poses_and_depth_drop_the_frame(local_node, frame, match):
    delta, error = process(local_node, **frame)
    assert delta == {'frames': 0, 'keyframes': 0, 'dropped': 1}
    assert re.search(match, error), error


def test_partly_invalid_depth_and_unnormalised_quaternion_are_used(local_node):
    depth = np.full((48, 64), 1.5, np.float32)
    depth[::2] = np.array([np.nan, np.inf, -1.0, 0.0])[np.arange(64) % 4]
    delta, _ = process(local_node, depth=depth, depth_encoding='32FC1', quaternion=(0, 0, 0, 1.05))
    assert delta['frames'] == 1 and delta['dropped'] == 0


def test_requests_over_the_service(local_node):
    client = local_node['client']
    assert local_node['node'].status()['voxels'] > 0
    for text, negatives, threshold, match in [
            ('', [], 0.0, 'empty'), ('\t \n', [], 0.0, 'empty'), ('x' * 5000, [], 0.0, 'at most 1000'),
            ('chair', [], math.nan, 'threshold'), ('chair', [], math.inf, 'threshold'),
            ('chair', [], 1.5, 'threshold'), ('chair', ['wall'] * 100, 0.0, 'at most 32')]:
        r = client.query(text, negatives, threshold)
        assert not r['success'] and match in r['message'], (text[:20], r['message'])
    chair = client.query('chair')
    assert chair['success'] and len(chair['xyz']) > 10, chair['message']
    for text, negatives in [('chair\x07\x1b', []), (' chair ', ['', ' ', ''])]:   # cleaned, default negatives
        r = client.query(text, negatives, -1.0)
        assert r['success'] and len(r['xyz']) == len(chair['xyz']), r['message']
    wall = client.query('chair', ['wall'])
    assert len(client.query('chair', ['wall', 'wall', '  '])['xyz']) == len(wall['xyz'])
    for text in ('chaise longue rembourrée 🛋️', '椅子', '👩\u200d👩\u200d👧'):
        r = client.query(text)
        assert r['success'], r['message']


def test_a_service_whose_handler_fails_unexpectedly_still_answers(local_node, monkeypatch):
    """An error no handler foresaw answers success=false with the reason (rclpy would send no answer at all and
    the caller would wait for its timeout); the map is kept."""
    from std_srvs.srv import Trigger
    from ov3d_ros.srv import SetVocabulary
    node, client = local_node['node'], local_node['client']
    voxels = node.status()['voxels']
    assert voxels > 0

    def fail(*args, **kwargs):
        raise KeyError('room')
    monkeypatch.setattr(node.mapper, 'clear', fail)
    r = client.call(Trigger, '/ov3d_mapping/clear_map', Trigger.Request(), timeout_s=20)
    assert not r.success and r.message == "~/clear_map failed: KeyError: 'room'"
    monkeypatch.setattr(node.mapper, 'set_vocabulary', fail)
    r = client.call(SetVocabulary, '/ov3d_mapping/set_vocabulary', SetVocabulary.Request(classes=['chair']),
                    timeout_s=20)
    assert not r.success and 'KeyError' in r.message
    assert node.status()['voxels'] == voxels


def test_a_refused_parameter_set_changes_nothing(local_node, monkeypatch):
    """ros2 param set of several parameters at once is all or nothing: when one part is refused, the parts the
    node applied before it are undone (the vocabulary, purification)."""
    from rclpy.parameter import Parameter
    node = local_node['node']
    cfg = node.mapper.cfg
    vocabulary, iterations, checkpoint = list(cfg.labels.vocabulary), cfg.purify.iterations, cfg.purify.checkpoint
    assert cfg.purify.enabled and vocabulary != ['chair', 'table', 'wall']
    r = node.set_parameters_atomically([Parameter('labels.vocabulary', value=['chair', 'table', 'wall']),
                                        Parameter('purify.checkpoint', value='/nonexistent/student.safetensors')])
    assert not r.successful and 'purification settings not applied' in r.reason
    assert cfg.labels.vocabulary == vocabulary and (node.mapper.labels is None) == (not vocabulary)

    def refuse(names, evidence=None):
        raise ValueError('no vocabulary today')
    monkeypatch.setattr(node.mapper, 'set_vocabulary', refuse)
    r = node.set_parameters_atomically([Parameter('purify.iterations', value=iterations + 2),
                                        Parameter('labels.vocabulary', value=['chair', 'table'])])
    assert not r.successful and 'no vocabulary today' in r.reason
    assert (cfg.purify.iterations, node.mapper.purifier.cfg.iterations) == (iterations, iterations)
    assert cfg.purify.checkpoint == checkpoint and node.get_parameter('purify.iterations').value == iterations


def test_setting_parameters_to_the_values_in_use_changes_nothing(local_node):
    """ros2 param load sends every parameter of a file: the vocabulary and purification settings in use are not
    applied again (that re-pooled the whole map once per purify.* parameter and recomputed the label volume from
    the stored features, which moved voxels to other classes)."""
    import torch
    from rclpy.parameter import Parameter
    node = local_node['node']
    cfg = node.mapper.cfg
    if node.mapper.labels is None:
        assert node.set_parameters([Parameter('labels.vocabulary', value=['chair', 'table', 'wall'])])[0].successful
    generation = node.mapper.generation
    evidence = node.mapper.labels.evidence.clone()
    same = [Parameter('labels.vocabulary', value=list(cfg.labels.vocabulary)),
            Parameter('purify.iterations', value=cfg.purify.iterations),
            Parameter('purify.radius_vox', value=cfg.purify.radius_vox)]
    assert all(r.successful for r in node.set_parameters(same))
    assert node.set_parameters_atomically(same).successful
    assert node.mapper.generation == generation and torch.equal(node.mapper.labels.evidence, evidence)
    r = node.set_parameters([Parameter('purify.iterations', value=cfg.purify.iterations + 1)])[0]
    assert r.successful and node.mapper.generation > generation        # a change is still applied
    assert node.set_parameters([Parameter('purify.iterations', value=cfg.purify.iterations - 1)])[0].successful


def test_the_nodes_own_parameters_do_not_wait_for_the_map_lock(local_node):
    """sync_slop_s and the other node-level parameters change nothing of the map: setting one does not wait for a
    keyframe being integrated (parameter sets and image callbacks share a callback group: it stalled image intake)."""
    import threading
    from rclpy.parameter import Parameter
    node = local_node['node']
    slop, done = node.sync_slop_s, []
    with node._lock:                                  # a keyframe being integrated
        setter = threading.Thread(target=lambda: done.append(
            node.set_parameters([Parameter('sync_slop_s', value=slop * 2)])[0]))
        setter.start()
        setter.join(60.0)
        assert done and done[0].successful and node.sync_slop_s == slop * 2
    assert node.set_parameters([Parameter('sync_slop_s', value=slop)])[0].successful


def test_new_prompt_templates_embed_the_label_volumes_classes_again(local_node, monkeypatch):
    """The label volume's classes are texts like any query's: new templates (or repetitions) embed them again and
    recompute its evidence; a set whose vocabulary part fails leaves the templates as they were."""
    import torch
    from rclpy.parameter import Parameter
    node = local_node['node']
    m = node.mapper
    if m.labels is None:
        assert node.set_parameters([Parameter('labels.vocabulary', value=['chair', 'table', 'wall'])])[0].successful
    names, before, templates = list(m.labels.names), m.labels.text.clone(), list(m.cfg.query.templates)
    other = ['a photo of a {} in a room.']
    assert templates != other
    assert node.set_parameters([Parameter('query.templates', value=other)])[0].successful
    assert m.labels.names == names and not torch.allclose(m.labels.text, before)
    assert torch.allclose(m.labels.text, m.embed_texts(names).to(m.labels.text))       # the new templates'

    def refuse(names, evidence=None):
        raise RuntimeError('out of memory')
    with monkeypatch.context() as patch:
        patch.setattr(m, 'set_vocabulary', refuse)
        r = node.set_parameters([Parameter('query.templates', value=templates)])[0]
    assert not r.successful and 'out of memory' in r.reason
    assert m.cfg.query.templates == other and node.get_parameter('query.templates').value == other
    assert node.set_parameters([Parameter('query.templates', value=templates)])[0].successful
    assert torch.allclose(m.labels.text, before)


def test_a_load_that_fails_keeps_the_map_and_one_that_cannot_be_published_says_so(local_node, monkeypatch,
                                                                                   tmp_path):
    """load_map answers "kept the current map" only when it did; a map loaded whose snapshot could not be made
    (out of memory) is not reported as kept: the answer says queries still see the previous one."""
    node = local_node['node']
    persistence = node.persistence
    node.mapper.save(tmp_path / 'm.ov3dmap')
    monkeypatch.setattr(persistence, '_path', lambda path: str(path))
    map_before = node.mapper.map

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    with monkeypatch.context() as patch:
        patch.setattr(node.mapper, '_use_loaded', out_of_memory)
        ok, message = persistence.load(tmp_path / 'm.ov3dmap')
    assert not ok and message.startswith('kept the current map') and node.mapper.map is map_before
    with monkeypatch.context() as patch:
        patch.setattr(persistence, 'changed', out_of_memory)
        ok, message = persistence.load(tmp_path / 'm.ov3dmap')
    assert not ok and 'kept' not in message and 'but queries still see the previous map' in message, message
    assert node.mapper.map is not map_before
    assert persistence.load(tmp_path / 'm.ov3dmap')[0]


def test_diagnostics_warn_when_keyframes_are_dropped(local_node, monkeypatch):
    """Keyframes dropped because integration is behind (max_pending_keyframes) turn the node's and the camera's
    diagnostics to WARN, like dropped frames."""
    from diagnostic_msgs.msg import DiagnosticStatus
    node = local_node['node']
    sent = []
    monkeypatch.setattr(node.diag_pub, 'publish', sent.append)
    node.publish_status()
    cam = node.cameras[0]
    cam.stats['keyframes_dropped'] += 2          # as the backlog bound counts them (test_multi_camera.py)
    node.publish_status()
    mapping, camera = sent[-1].status[:2]
    assert mapping.level == camera.level == DiagnosticStatus.WARN
    assert '2 keyframe(s) dropped (integration is behind)' in mapping.message
    assert camera.message.startswith('2 keyframe(s) dropped (integration is behind)')
    node.publish_status()
    assert 'keyframe(s) dropped' not in sent[-1].status[0].message


def test_a_map_emptied_by_eviction_says_so(local_node, new_sim_mapper, wall_frame, monkeypatch):
    node, client = local_node['node'], local_node['client']
    m = new_sim_mapper()
    m.integrate(wall_frame(), force=True)
    m.evict(np.zeros(3), 0)                                  # a budget that keeps nothing
    assert m.map.size == 0 and m.num_keyframes == 1
    monkeypatch.setattr(node, 'mapper', m)
    monkeypatch.setattr(node, 'snapshot', m.snapshot)
    r = client.query('chair')
    assert not r['success'] and 'the map is empty: 1 keyframe(s) integrated, but no voxel is kept' in r['message']
    m.clear()
    assert client.query('chair')['message'] == 'the map is empty: no keyframe integrated yet'


def test_the_vocabulary_parameter_follows_the_vocabulary_in_use(local_node):
    """~/set_vocabulary (and a loaded map's label volume) change the vocabulary: labels.vocabulary says so."""
    from ov3d_ros.ros.params import parameter_value
    from ov3d_ros.srv import SetVocabulary
    node, client = local_node['node'], local_node['client']
    before = list(node.mapper.cfg.labels.vocabulary) if node.mapper.labels is not None else []
    assert parameter_value(node, 'labels.vocabulary') == before
    for classes in (['sofa', 'bed', 'lamp'], [], before):
        r = client.call(SetVocabulary, '/ov3d_mapping/set_vocabulary', SetVocabulary.Request(classes=classes),
                        timeout_s=60)
        assert r.success, r.message
        assert parameter_value(node, 'labels.vocabulary') == classes
    assert node.mapper.cfg.labels.vocabulary == before


# ------------------------------------------------------------------------------------------------ node process
def test_burst_of_malformed_messages_is_survived_and_counted(graph, bad_input):
    """Garbage on every input topic of a mapping node process; it keeps counting, mapping and answering."""
    client, node, pub = graph['client'], graph['node'], bad_input
    rng = np.random.default_rng(1)
    bad_infos = [CameraInfo(width=64, height=48, k=[0.0] * 9),
                 CameraInfo(width=64, height=48, k=[math.nan, 0, 32, 0, 50, 24, 0, 0, 1]),
                 CameraInfo(width=0, height=0, k=[50.0, 0, 32, 0, 50, 24, 0, 0, 1])]
    bursts = [dict(camera=bad_infos[i % 3]) for i in range(6)] + [
        dict(camera=CAMERA, quaternion=(math.nan, 0, 0, 1)), dict(camera=CAMERA, quaternion=(0, 0, 0, 0)),
        dict(camera=CAMERA, position=(math.nan, 0, 0)), dict(camera=CAMERA, stamp=0.0),
        dict(camera=CAMERA, stamp=pub.now() + 1e6), dict(camera=CAMERA, rgb=np.zeros((8, 8, 3), np.uint8)),
        dict(camera=CAMERA, depth=np.full((48, 64), np.nan, np.float32), depth_encoding='32FC1'),
        dict(camera=CAMERA, depth=rng.integers(0, 255, (48, 64, 3), dtype=np.uint8), depth_encoding='rgb8'),
        dict(camera=CAMERA, labels=np.full((48, 64), 999, np.uint16))]
    before = dict(client.next_status())
    for i in range(60):                                             # 60 frames, about 20 Hz
        pub.send(**{'rgb': RGB, 'depth': DEPTH_MM, **bursts[i % len(bursts)]})
        client.spin(0.05)
    end = time.monotonic() + 90         # slow keyframes on a loaded machine: wait for the queue to drain
    while time.monotonic() < end and (client.status['pending_depth'] or client.status['pending_keyframes']
                                      or client.status == before):
        client.spin(0.5)
    client.spin(1.5)
    after = client.status
    assert node.alive()
    delta = {k: after[k] - before[k] for k in ('frames', 'dropped', 'superseded')}
    # bounded input queues may let DDS discard some messages on a loaded machine; the rest are all accounted for
    assert sum(delta.values()) >= 30 and delta['dropped'] >= 12, (before, after)
    assert after['last_error']
    warnings = node.log().count('[WARN]')
    assert warnings < after['dropped'] / 3, warnings                # throttled, not one line per drop
    pub.send(RGB, DEPTH_MM, camera=CAMERA, labels=CHAIR_LABELS, position=(0, 0, 2))   # a good frame is mapped...
    end = time.monotonic() + 20
    while time.monotonic() < end and client.status['keyframes'] == after['keyframes']:
        client.spin(0.3)
    r = client.query('chair')                                       # ...and queries are answered
    assert r['success'] and len(r['xyz']) > 10, (r['message'], client.status)
    assert not client.query('x' * 2000)['success'] and node.alive()
