"""Colour/depth/pose pairing of one camera (CameraInput.take) on real sensor_msgs messages: which depth images wait,
which are taken, superseded or dropped, and why."""
import collections
import math
import time

import numpy as np
import pytest
from geometry_msgs.msg import PoseStamped
from rclpy.qos import ReliabilityPolicy
from sensor_msgs.msg import Image

from conftest import in_process_node
from ov3d_ros.datasets.poses import interpolate_pose
from ov3d_ros.ros import conversions as conv
from ov3d_ros.ros.camera_input import CameraInput, PoseBuffer
from ov3d_ros.sim import default_camera

SLOP = 0.05


def image(stamp: float) -> Image:
    return conv.numpy_to_image(np.zeros((4, 4), np.uint16), 'mono16', conv.make_header('camera', conv.sec_to_stamp(stamp)))


def camera(queue: int = 10, info: bool = True) -> CameraInput:
    """A camera input; ``info``: its valid camera info has come."""
    cam = CameraInput('', queue)
    if info:
        cam.camera_info = conv.camera_to_camera_info(default_camera(4, 4))
    return cam


def take(cam: CameraInput, timeout_s: float = 5.0, poses=None):
    """cam.take with the pose topic holding ``poses`` (stamps; None = every stamp has its pose)."""
    ready = (lambda depth, t, settled: True) if poses is None else \
        (lambda depth, t, settled: any(abs(p - t) <= SLOP for p in poses))
    return cam.take(SLOP, timeout_s, False, ready, lambda depth: 'pose message')


def push(cam: CameraInput, color=(), depth=()):
    for t in color:
        cam._push(cam.color, cam._generation)(image(t))
    for t in depth:
        cam._push(cam.depth, cam._generation)(image(t))


def test_a_depth_image_waits_for_a_colour_image_that_may_still_come():
    cam = camera()
    push(cam, color=[1.0], depth=[1.0, 2.0])
    # frame 2's colour is late (a reliable image re-sent, a busy publisher): 1 is taken, nothing is dropped
    assert take(cam)[3] == 1.0
    for _ in range(3):
        assert take(cam, timeout_s=0.0) is None          # waiting past the timeout, but nothing newer came
    assert len(cam.depth) == 1 and cam.stats['dropped'] == 0
    push(cam, color=[2.0])
    depth, color, labels, t = take(cam)
    assert t == 2.0 and conv.stamp_to_sec(color.header.stamp) == 2.0 and labels is None


def test_a_depth_image_is_paired_with_its_own_colour_image_when_that_comes_a_little_later():
    """At 30 Hz the previous frame's colour image is within sync_slop_s of a depth image: it is used only when the
    depth image's own colour image cannot come any more, or after sync_timeout_s (it paired every depth image with
    the frame before when colour came a few ms after depth)."""
    cam = camera()
    push(cam, color=[0.0], depth=[0.0, 1 / 30])
    assert take(cam)[3] == 0.0
    assert take(cam) is None                               # 0.0 is within slop of 1/30, but 1/30's may still come
    push(cam, color=[1 / 30])
    depth, color, _, t = take(cam)
    assert t == conv.stamp_to_sec(color.header.stamp) == pytest.approx(1 / 30, abs=1e-6)
    # colour stamped a little before its depth image (another clock): taken once a later colour image came ...
    push(cam, color=[2 / 30 - 0.004], depth=[2 / 30])
    assert take(cam) is None
    push(cam, color=[3 / 30 - 0.004])
    assert conv.stamp_to_sec(take(cam)[1].header.stamp) == pytest.approx(2 / 30 - 0.004, abs=1e-6)
    # ... or once the depth image waited sync_timeout_s (the stream's last frame)
    push(cam, color=[4 / 30 - 0.004], depth=[4 / 30])
    assert take(cam, timeout_s=0.2) is None
    time.sleep(0.3)
    assert conv.stamp_to_sec(take(cam, timeout_s=0.2)[1].header.stamp) == pytest.approx(4 / 30 - 0.004, abs=1e-6)


def test_newest_complete_frame_is_taken_and_older_ones_superseded():
    cam = camera()
    push(cam, color=[1.0, 2.0, 3.0], depth=[1.0, 2.0, 3.0, 4.0])
    assert take(cam)[3] == 3.0                          # 4 has no colour yet
    assert cam.stats['superseded'] == 2 and [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [4.0]


def test_with_a_preference_the_oldest_preferred_complete_frame_is_taken_first():
    """The node prefers keyframe candidates: of frames that piled up, each candidate is taken in turn (older
    non-candidates superseded, newer frames kept); with no candidate left, the newest complete frame."""
    cam = camera()
    push(cam, color=[1.0, 2.0, 3.0, 4.0, 5.0], depth=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0])   # 6: no colour yet
    asked = []

    def keyframe(depth, t):
        asked.append(t)
        return t in (2.0, 4.0)

    prefer = lambda: cam.take(SLOP, 5.0, False, lambda d, t, settled: True, lambda d: 'pose', keyframe)  # noqa: E731
    assert prefer()[3] == 2.0 and cam.stats['superseded'] == 1
    assert asked == [1.0, 2.0]                                   # oldest first, stops at the first candidate
    assert [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [3.0, 4.0, 5.0, 6.0]
    assert prefer()[3] == 4.0 and cam.stats['superseded'] == 2
    assert prefer()[3] == 5.0 and cam.stats['superseded'] == 2   # no candidate left: the newest complete one
    assert [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [6.0]
    assert prefer() is None


def test_depth_images_pushed_out_of_a_full_queue_are_counted_as_superseded():
    cam = camera(queue=3)
    push(cam, color=[1.0, 2.0, 3.0, 4.0, 5.0], depth=[1.0, 2.0, 3.0, 4.0, 5.0])
    assert cam.stats['superseded'] == 2 and len(cam.color) == 3
    assert [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [3.0, 4.0, 5.0]
    assert list(cam.depth.order) == [7, 8, 9] and len(cam.depth.arrival) == 3      # kept in step


def test_a_depth_image_whose_colour_was_lost_is_dropped_at_once():
    cam = camera()
    push(cam, color=[1.0], depth=[2.0])
    push(cam, color=[3.0])                               # colour 2 never came, and a newer one (3) came after
    with pytest.raises(ValueError, match=r'no colour image within sync_slop_s=0.05 s; its colour image never '
                                         r'came \(a newer one did\)'):
        take(cam)
    assert len(cam.depth) == 0


def test_a_depth_image_stamped_back_in_time_waits_for_its_own_colour_image():
    cam = camera()
    push(cam, color=[100.0, 101.0], depth=[100.0])
    assert take(cam)[3] == 100.0
    push(cam, depth=[5.0])                               # time jumped back (a looping bag); colour 5 still to come
    assert take(cam, timeout_s=0.0) is None             # later-stamped colour images came before it: no evidence
    push(cam, color=[5.0])
    assert take(cam)[3] == 5.0


def test_a_stalled_colour_stream_drops_old_depth_images_after_the_timeout():
    cam = camera()
    push(cam, depth=[1.0, 2.0])                          # no colour at all, depth keeps coming
    assert take(cam, timeout_s=60.0) is None             # within the timeout: waiting
    with pytest.raises(ValueError, match=r'no colour image .*; waited 0.0 s while newer depth images came'):
        take(cam, timeout_s=0.0)
    assert [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [2.0]
    assert take(cam, timeout_s=0.0) is None              # the newest one keeps waiting


def test_a_missing_pose_is_named_and_a_full_queue_drops_the_oldest():
    cam = camera(queue=3)
    push(cam, color=[1.0, 2.0, 3.0], depth=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r'no pose message within .*the queue \(3 depth images\) was full'):
        take(cam, timeout_s=60.0, poses=[])
    assert take(cam, poses=[3.0])[3] == 3.0 and cam.stats['superseded'] == 1


def pose(stamp: float, x: float, frame: str = 'map', yaw_deg: float = 0.0) -> PoseStamped:
    msg = PoseStamped()
    msg.header = conv.make_header(frame, conv.sec_to_stamp(stamp))
    msg.pose.position.x = x
    half = math.radians(yaw_deg) / 2
    msg.pose.orientation.z, msg.pose.orientation.w = math.sin(half), math.cos(half)
    return msg


def test_a_depth_image_between_two_poses_takes_their_interpolation_and_otherwise_the_nearest():
    """PoseBuffer.bracket: the pose stamped exactly at the image; else the two around it (same frame, at most
    max_gap apart) with the fraction of the way; else the nearest within the slop; else none. Poses that arrive
    out of order are kept in stamp order."""
    poses = [pose(1.0, 0.0), pose(1.1, 1.0), pose(1.3, 3.0), pose(2.0, 9.0, frame='odom')]
    buffer = PoseBuffer()
    buffer.extend([poses[i] for i in (0, 2, 1, 3)])
    assert list(buffer) == poses
    exact = buffer.bracket(1.1, SLOP, 0.5)
    assert exact[0] is poses[1] and exact[1] is None
    before, after, a = buffer.bracket(1.26, SLOP, 0.5)                 # its own pose lost: 1.1 and 1.3 around it
    assert (before, after) == (poses[1], poses[2]) and a == pytest.approx(0.8)
    nearest = buffer.bracket(1.26, SLOP, 0.1)                          # 0.2 s apart: too far to interpolate
    assert nearest[0] is poses[2] and nearest[1] is None
    assert buffer.bracket(1.6, SLOP, 0.5) is None                      # 1.3 (map) and 2.0 (odom): other frames
    assert buffer.bracket(2.2, SLOP, 0.5) is None                      # after the last pose, beyond the slop
    assert buffer.bracket(0.97, SLOP, 0.5)[0] is poses[0]              # before the first, within the slop


def test_the_pose_buffer_keeps_ten_seconds_of_poses_whatever_their_rate():
    """200 Hz odometry: a depth image stamped 0.3 s before the newest pose (a depth pipeline's latency) finds the
    two poses around it (50 messages, the buffer before, covered 0.25 s); poses more than 10 s older than the
    newest go, and one stamped more than 10 s before the newest (a bag loop) restarts the buffer."""
    buffer = PoseBuffer()
    for i in range(2401):                                               # 12 s at 200 Hz
        buffer.append(pose(100.0 + i / 200, i / 200))
    assert len(buffer) == 2001 and conv.stamp_to_sec(next(iter(buffer)).header.stamp) == pytest.approx(102.0)
    before, after, a = buffer.bracket(111.7025, SLOP, 0.5)              # 0.3 s before the newest (112.0)
    assert before.pose.position.x == pytest.approx(11.7) and after.pose.position.x == pytest.approx(11.705)
    assert a == pytest.approx(0.5)
    assert buffer.bracket(101.0, SLOP, 0.5) is None                     # 11 s old: gone
    assert not buffer.append(pose(103.0025, -5.0))                      # out of order, within the 10 s: kept
    assert buffer.bracket(103.0025, SLOP, 0.5)[0].pose.position.x == -5.0
    assert buffer.append(pose(50.0, -1.0)) and len(buffer) == 1 and buffer.newest == 50.0     # time jumped back
    small = PoseBuffer(max_len=100)
    small.extend(pose(float(i), 0.0) for i in range(1, 301))
    assert len(small) == 11 and small.newest == 300.0                   # 290-300 s at 1 Hz (the cap: 100)
    small = PoseBuffer(max_len=100)
    small.extend(pose(1.0 + i / 1000, 0.0) for i in range(300))
    assert len(small) == 100 and small.newest == pytest.approx(1.299)


def test_the_node_finds_the_pose_of_a_late_depth_image_among_200_hz_odometry(local_node):
    """The node's pose buffer with 200 Hz odometry and images 0.3 s behind it: the image's pose is there (it was
    pushed out by the newer poses before, and every such frame dropped)."""
    node = local_node['node']
    with node._pose_lock:
        saved = list(node._poses)
        node._poses.clear()
    try:
        for i in range(400):
            node._push_pose(pose(10.0 + i / 200, i / 200))
        assert node._pose_ready(image(11.7), 11.7, settled=False)
        assert node._pose_at(node.cameras[0], image(11.7025), 11.7025)[0, 3] == pytest.approx(1.7025)
    finally:
        with node._pose_lock:
            node._poses.clear()
            node._poses.extend(saved)


def test_the_clock_jumping_back_clears_tf_and_the_pose_buffer(local_node, monkeypatch):
    """use_sim_time and a bag played with --clock --loop: when /clock jumps back, the TF buffer's (dynamic)
    transforms and the buffered poses are of the other pass and go, as tf2_ros's Buffer does for the clock it was
    given (the node's Buffer is made without the node and watches the system clock). A stand-in for
    tf2_ros.Buffer.clear: tf2_ros has no wheel here."""
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock
    node, client = local_node['node'], local_node['client']

    class Buffer:
        cleared = 0

        def clear(self):
            self.cleared += 1
    tf = Buffer()
    monkeypatch.setattr(node, 'tf_buffer', tf)
    with node._pose_lock:
        saved = list(node._poses)
    clock_pub = client.node.create_publisher(Clock, '/clock', 10)

    def publish_clock(t: float, until):
        end = time.monotonic() + 20.0
        while not until() and time.monotonic() < end:
            clock_pub.publish(Clock(clock=conv.sec_to_stamp(t)))
            client.spin(0.1)
        assert until()
    try:
        node.set_parameters([Parameter('use_sim_time', value=True)])
        cleared = tf.cleared                                             # switching to sim time clears too
        publish_clock(100.0, lambda: node.get_clock().now().nanoseconds == 100 * 10 ** 9)
        node._push_pose(pose(99.9, 1.0))
        publish_clock(100.5, lambda: node.get_clock().now().nanoseconds == 100.5 * 10 ** 9)
        assert tf.cleared == cleared and len(node._poses) >= 1           # forward: nothing cleared
        publish_clock(40.0, lambda: node.get_clock().now().nanoseconds == 40 * 10 ** 9)
        assert tf.cleared == cleared + 1 and len(node._poses) == 0
    finally:
        node.set_parameters([Parameter('use_sim_time', value=False)])
        client.node.destroy_publisher(clock_pub)
        with node._pose_lock:
            node._poses.clear()
            node._poses.extend(saved)


def test_a_depth_image_waits_for_the_pose_that_brackets_it(local_node):
    """Odometry a few ms behind the images: the pose before the image is within sync_slop_s, but the next one will
    bracket it; the image waits for it (it took the earlier pose, 5 cm off at 1.5 m/s), unless it waited
    sync_timeout_s already or a later pose shows that none will (too far apart to interpolate)."""
    node = local_node['node']
    depth = image(1.02)
    with node._pose_lock:
        saved = list(node._poses)
        node._poses.clear()
        node._poses.append(pose(1.0, 0.0))
    try:
        assert not node._pose_ready(depth, 1.02, settled=False)
        assert node._pose_ready(depth, 1.02, settled=True)
        with node._pose_lock:
            node._poses.append(pose(1.04, 0.06))
        assert node._pose_ready(depth, 1.02, settled=False)
        cam = node.cameras[0]
        assert node._pose_at(cam, depth, 1.02)[0, 3] == pytest.approx(0.03)     # interpolated
        assert node._pose_ready(image(1.0), 1.0, settled=False)                 # its own stamp
        with node._pose_lock:
            node._poses.append(pose(2.0, 1.0))
        assert node._pose_ready(image(1.06), 1.06, settled=False)   # 1.04 nearest; 2.0 is too far to bracket it
    finally:
        with node._pose_lock:
            node._poses.clear()
            node._poses.extend(saved)


def test_once_tf_gave_a_cameras_mount_a_frame_without_it_is_dropped(local_node, monkeypatch):
    """An odometry body frame and a camera mounted by TF (a pan-tilt head): a frame whose mount TF cannot give yet
    is dropped with the reason, not fused with the pose_to_camera parameter's mount (the identity by default:
    the camera looking up). Before TF gave the mount at all, the parameter is the mount, as documented."""
    import types
    from geometry_msgs.msg import TransformStamped
    node = local_node['node']
    cam = node.cameras[0]

    class Buffer:                                 # tf2_ros.Buffer.lookup_transform, for the one mount
        ok = False

        def lookup_transform(self, target, source, stamp):
            if not self.ok:
                raise LookupError('Lookup would require extrapolation into the future')
            msg = TransformStamped()
            msg.transform.translation.x, msg.transform.rotation.w = 0.2, 1.0
            return msg
    tf = Buffer()
    monkeypatch.setattr(node, 'tf_buffer', tf)
    monkeypatch.setattr(cam, 'mount_from_tf', False, raising=False)
    odom = types.SimpleNamespace(child_frame_id='base_link')
    depth = image(1.0)
    assert np.array_equal(node._mount(cam, odom, depth), cam.T_B_C)           # no TF mount yet: the parameter
    tf.ok = True
    assert node._mount(cam, odom, depth)[0, 3] == pytest.approx(0.2)
    tf.ok = False
    with pytest.raises(ValueError, match='no TF mount base_link -> camera for this frame .* though TF gave it before'):
        node._mount(cam, odom, depth)


def test_interpolated_pose_is_linear_in_translation_and_slerp_in_rotation():
    T0 = conv.pose_msg_to_matrix(pose(0.0, 0.0, yaw_deg=0.0))
    T1 = conv.pose_msg_to_matrix(pose(0.0, 2.0, yaw_deg=90.0))
    T = interpolate_pose(T0, T1, 0.25)
    assert T[:3, 3] == pytest.approx([0.5, 0.0, 0.0])
    yaw = math.degrees(math.atan2(T[1, 0], T[0, 0]))
    assert yaw == pytest.approx(22.5) and np.allclose(T[:3, :3] @ T[:3, :3].T, np.eye(3))
    assert np.allclose(interpolate_pose(T0, T1, 0.0), T0) and np.allclose(interpolate_pose(T0, T1, 1.0), T1)


def test_pose_callbacks_never_wait_behind_image_callbacks(local_node):
    """Poses are stored from a callback group of their own: under a multi-threaded executor a pose is taken while
    image callbacks (taken first when several are ready) keep theirs busy. The images' group is not the node's
    default one either, where rclpy's parameter services run (test_snapshot_queries)."""
    node = local_node['node']
    subs = {s.topic_name: s for s in node.subscriptions}
    assert {'/pose', '/color/image', '/depth/image'} <= set(subs), sorted(subs)
    images = {subs[t].callback_group for t in ('/color/image', '/depth/image')}
    assert len(images) == 1 and node.default_callback_group not in images
    assert subs['/pose'].callback_group not in images
    assert sum(s.callback_group is subs['/pose'].callback_group for s in node.subscriptions) == 1
    # best effort (pose_qos default) though the images are reliable here: a lost pose never holds back the next
    assert subs['/pose'].qos_profile.reliability == ReliabilityPolicy.BEST_EFFORT
    assert subs['/depth/image'].qos_profile.reliability == ReliabilityPolicy.RELIABLE


def test_reliable_inputs_get_their_first_camera_info_best_effort_too(local_node):
    """Under input_qos reliable the camera info is also subscribed best effort until the first valid one (a
    reliable reader matched mid-stream held it back ~1 s while the depth queue filled); then only reliably."""
    node, client, pub = local_node['node'], local_node['client'], local_node['pub']
    cam = node.cameras[0]

    def info_qos():
        return sorted(s.qos_profile.reliability.name for s in node.subscriptions
                      if s.topic_name == '/color/camera_info')

    def send_until(msg, done) -> int:
        for n in range(1, 101):                # re-sent: the first may go out before the readers are matched
            pub.pubs['color/camera_info'].publish(msg)
            client.spin(0.05)
            if done():
                return n
        raise AssertionError('the node did not take the camera info')
    assert cam.camera_info is None and info_qos() == ['BEST_EFFORT', 'RELIABLE']
    bad = conv.camera_to_camera_info(default_camera(64, 48))
    bad.k[0] = float('nan')
    dropped = cam.stats['dropped']
    sent = send_until(bad, lambda: cam.camera_error != '')
    client.spin(0.3)
    assert 1 <= cam.stats['dropped'] - dropped <= sent          # one subscription heard: none counted twice
    node.select()
    assert cam.camera_info is None and info_qos() == ['BEST_EFFORT', 'RELIABLE']   # an invalid one ends nothing
    info = conv.camera_to_camera_info(default_camera(64, 48))
    send_until(info, lambda: cam.camera_info is not None)
    node.select()
    assert info_qos() == ['BEST_EFFORT', 'RELIABLE']            # ended, destroyed between two executor waits
    node.destroy_doomed()                                       # as spin() does between them
    assert info_qos() == ['RELIABLE']
    info.k[0] = 123.0
    send_until(info, lambda: cam.camera_info.k[0] == 123.0)                  # later ones come reliably


def test_depth_images_wait_for_the_first_camera_info_and_a_full_queue_drops_with_the_reason():
    cam = camera(queue=3, info=False)
    push(cam, color=[1.0, 2.0], depth=[1.0, 2.0])
    assert take(cam) is None                               # complete but no camera info: they wait
    assert len(cam.depth) == 2 and cam.stats['dropped'] == 0
    cam.camera_error = 'camera info: zero image size'
    push(cam, color=[3.0], depth=[3.0])                    # the queue is full now
    with pytest.raises(ValueError, match=r'no valid camera info received yet on color/camera_info \(the last one '
                                         r'was rejected: camera info: zero image size\); the queue \(3 depth '
                                         r'images\) was full'):
        take(cam)
    assert [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [2.0, 3.0]
    cam.camera_info, cam.camera_error = conv.camera_to_camera_info(default_camera(4, 4)), ''
    assert take(cam)[3] == 3.0 and cam.stats['superseded'] == 1     # the waiting frames are taken as usual


def test_deactivated_inputs_go_between_two_executor_waits_and_are_ignored_until_then(local_node):
    """Deactivate runs in a lifecycle transition's callback while the executor may wait on the inputs: their
    subscriptions and timers are doomed there and destroyed between two waits (destroy_doomed, as spin() does);
    what a doomed subscription still delivers is ignored, after a new activation too."""
    node = local_node['node']
    cam = node.cameras[0]
    node.destroy_doomed()
    subs = {s.topic_name: s for s in node.subscriptions}
    old_depth, old_pose = subs['/depth/image'], subs['/pose']
    timers = list(node._mapping_timers.values())                          # tick, select, status, map
    assert len(timers) >= 3 and all(t in node.timers and not t.is_canceled() for t in timers)
    node._deactivate()
    assert old_depth in node.subscriptions and old_pose in node.subscriptions       # not under the executor's wait
    assert all(t.is_canceled() for t in timers) and all(t in node.timers for t in timers)
    old_depth.callback(image(1.0))
    old_pose.callback(PoseStamped(header=conv.make_header('map', conv.sec_to_stamp(1.0))))
    assert len(cam.depth) == 0 and len(node._poses) == 0                  # delivered by doomed ones: ignored
    node.destroy_doomed()
    assert old_depth not in node.subscriptions and old_pose not in node.subscriptions
    assert not any(t in node.timers for t in timers)
    node._activate()
    try:
        new_depth = next(s for s in node.subscriptions if s.topic_name == '/depth/image')
        old_depth.callback(image(2.0))
        assert len(cam.depth) == 0
        new_depth.callback(image(3.0))
        assert [conv.stamp_to_sec(d.header.stamp) for d in cam.depth] == [3.0]
    finally:
        with cam.lock:
            cam.depth.clear()


def test_compressed_topics_follow_their_base_topics_remaps():
    """The launch file remaps color/image and depth/image to the driver's topics; with compressed transports the node
    listens on the remapped base topic plus the transport's suffix, as image_transport does (it listened on
    /color/image/compressed and /depth/image/compressedDepth, never remapped: a remap matches whole names)."""
    remaps = ['-r', 'color/image:=/camera/camera/color/image_raw',
              '-r', 'depth/image:=/camera/camera/aligned_depth_to_color/image_raw',
              '-r', 'color/camera_info:=/camera/camera/color/camera_info']
    with in_process_node(ros_args=remaps, color_transport='compressed', depth_transport='compressedDepth') as (
            node, client, pub):
        topics = {s.topic_name for s in node.subscriptions}
        assert {'/camera/camera/color/image_raw/compressed',
                '/camera/camera/aligned_depth_to_color/image_raw/compressedDepth',
                '/camera/camera/color/camera_info'} <= topics
        assert not any(t.startswith(('/color/image', '/depth/image')) for t in topics)


def test_frame_ids_with_ros1s_leading_slash_are_the_same_frames(local_node, monkeypatch):
    """A bag converted from ROS 1 (TUM RGB-D) stamps '/map' and '/openni_rgb_optical_frame': a pose in '/map' is in
    map_frame 'map' (8 of 8 frames were dropped as in another frame), and TF is asked for the frames without the
    slash, which tf2 refuses in a lookup ("frame_ids cannot start with a '/'") and stores stripped."""
    from geometry_msgs.msg import TransformStamped
    node = local_node['node']
    cam = node.cameras[0]
    depth = image(1.0)
    depth.header.frame_id = '/openni_rgb_optical_frame'
    with node._pose_lock:
        saved = list(node._poses)
        node._poses.clear()
        node._poses.append(pose(1.0, 0.5, frame='/map'))
    asked = []

    class Buffer:                                  # tf2's rule for the frames of a lookup
        def lookup_transform(self, target, source, stamp):
            asked.append((target, source))
            if target.startswith('/') or source.startswith('/'):
                raise ValueError("frame_ids cannot start with a '/'")
            msg = TransformStamped()
            msg.transform.translation.x, msg.transform.rotation.w = 0.2, 1.0
            return msg

        def can_transform(self, target, source, stamp):
            return not (target.startswith('/') or source.startswith('/'))
    monkeypatch.setattr(node, 'tf_buffer', Buffer())
    monkeypatch.setattr(cam, 'mount_from_tf', False, raising=False)
    monkeypatch.setattr(node, 'pose_frame', '/base_link')
    try:
        T = node._pose_at(cam, depth, 1.0)
        assert T[0, 3] == pytest.approx(0.7) and asked == [('base_link', 'openni_rgb_optical_frame')]
        monkeypatch.setattr(node, 'pose_source', 'tf')
        assert node._pose_ready(depth, 1.0)
        assert node._pose_at(cam, depth, 1.0)[0, 3] == pytest.approx(0.2)
        assert asked[-1] == ('map', 'openni_rgb_optical_frame')
    finally:
        with node._pose_lock:
            node._poses.clear()
            node._poses.extend(saved)


def test_with_use_sim_time_and_no_clock_the_node_still_works():
    """use_sim_time and a bag played without --clock (or a simulator that does not bridge /clock): the node's
    timers run on the steady clock, so frames are integrated and the status published (on ROS time, stuck at 0,
    no timer fired: 20 valid frames gave no frame, no status, no log line)."""
    from ov3d_ros.sim import default_camera
    with in_process_node(use_sim_time=True) as (node, client, pub):
        rgb = np.full((48, 64, 3), 120, np.uint8)
        depth = np.full((48, 64), 2000, np.uint16)
        t = pub.now()
        for _ in range(300):
            pub.send(rgb, depth, camera=default_camera(64, 48), stamp=t)
            client.spin(0.2)
            if node.cameras[0].stats['keyframes'] >= 1 and client.status is not None:
                break
        assert node.get_clock().now().nanoseconds == 0                  # no /clock: ROS time stands at 0
        assert node.cameras[0].stats['keyframes'] >= 1 and client.status is not None


def test_a_camera_info_published_once_and_latched_is_received():
    """A calibration publisher that publishes its camera info once, transient-local (latched), before the node
    subscribes: the node's volatile subscriptions never get that message (the camera was never mapped); seeing a
    transient-local publisher on the topic, the node subscribes transient-local too until a camera info came, then
    drops that subscription. (A deactivate / activate makes the node a late joiner here.)"""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo
    with in_process_node() as (node, client, pub):
        cam = node.cameras[0]
        latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                             reliability=ReliabilityPolicy.RELIABLE)
        info_pub = pub.node.create_publisher(CameraInfo, 'color/camera_info', latched)
        info = conv.camera_to_camera_info(default_camera(64, 48), conv.make_header('camera', conv.sec_to_stamp(1.0)))
        info_pub.publish(info)
        for _ in range(100):
            client.spin(0.1)
            if cam.camera_info is not None:
                break
        assert cam.camera_info is not None                      # matched before it was published: received
        node._deactivate()
        node.destroy_doomed()
        cam.camera, cam.camera_info = None, None
        node._activate()
        for _ in range(100):
            client.spin(0.1)
            node.select()
            if cam.camera_info is not None:
                break
        assert cam.camera_info is not None and cam.camera.width == 64          # the latched one, as a late joiner
        node.select()
        node.destroy_doomed()
        infos = [s for s in node.subscriptions if s.topic_name == '/color/camera_info']
        assert len(infos) == 1 and infos[0].qos_profile.durability != DurabilityPolicy.TRANSIENT_LOCAL
