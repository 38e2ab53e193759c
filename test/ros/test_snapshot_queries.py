"""Readers of the mapping node answer from the latest map snapshot, never waiting for a keyframe being integrated:
a node in this process, ticked by the test, with its integration held in the middle of a keyframe (map lock
taken) while ``segment_by_text``, ``~/map_cloud`` and ``~/label_cloud`` answer; after the keyframe they answer from
the new generation."""
import contextlib
import threading

import numpy as np
from rclpy.parameter import Parameter

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.ros.conversions import stamp_to_sec
from ov3d_ros.srv import SegmentByText

from conftest import BadInputPublisher, private_domain


def wall(shift_px: int = 0):
    """rgb (48, 64, 3), depth (48, 64) uint16 mm, labels (48, 64): a wall at 2 m, chair lower left, plant right."""
    depth = np.full((48, 64), 2000, np.uint16)
    labels = np.full((48, 64), 1, np.uint16)
    labels[16:, :32 + shift_px] = 2
    labels[16:, 32 + shift_px:] = 3
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    return rgb, depth, labels


def finishes(fn, timeout_s: float = 120.0):
    """Run ``fn`` in a thread and return its result; fails if it is still waiting after ``timeout_s`` (it would
    wait forever on a lock the test holds: the timeout only turns a hang into a failure)."""
    out = {}
    worker = threading.Thread(target=lambda: out.setdefault('value', fn()), daemon=True)
    worker.start()
    worker.join(timeout_s)
    assert not worker.is_alive(), f'{fn} waited for the map lock'
    return out.get('value')


OVERRIDES = {'pose_source': 'pose', 'input_qos': 'reliable', 'features.source': 'simulated',
             'features.sim_patch_px': 4, 'map.device': 'cpu', 'map.voxel_size_m': 0.1, 'map.pixel_stride': 1,
             'purify.enabled': False, 'labels.vocabulary': ['wall', 'chair', 'plant'],
             'labels.min_component_vox': 1, 'keyframes.min_interval_s': 0.0,
             'tick_rate_hz': 0.001, 'map_publish_rate_hz': 0.0, 'label_publish_rate_hz': 0.0}
CAMERA = PinholeCamera(40.0, 40.0, 31.5, 23.5, 64, 48)


@contextlib.contextmanager
def ticked_node(**changes):
    """A MappingNode in this process (OVERRIDES + ``changes``), its timers effectively off, and
    ``send_and_tick(position, shift_px)``: one frame at ``position``, spun until the node holds it, then ticked."""
    from ov3d_ros.ros.mapping_node import MappingNode
    from ov3d_ros.tools.demo_client import DemoClient
    with private_domain():
        client = DemoClient()
        node = MappingNode(context=client.context, parameter_overrides=[
            Parameter(k, value=v) for k, v in {**OVERRIDES, **changes}.items()])
        client.executor.add_node(node)
        pub = BadInputPublisher(client)

        def send_and_tick(position, shift_px):
            t = pub.now()
            rgb, depth, lab = wall(shift_px)
            pub.send(rgb, depth, camera=CAMERA, labels=lab, stamp=t, position=position)
            for _ in range(300):
                client.spin(0.1)
                cam = node.cameras[0]
                if cam.depth and cam.color and cam.labels and cam.camera_info is not None and len(node._poses):
                    break
            node.tick()
        try:
            yield client, node, pub, send_and_tick
        finally:
            client.executor.remove_node(pub.node)
            client.executor.remove_node(node)
            pub.node.destroy_node()
            node.destroy_node()
            client.close()


def ask(node, text, threshold=0.0):
    return node.on_segment(SegmentByText.Request(text=text, threshold=threshold), SegmentByText.Response())


def test_queries_answer_from_the_snapshot_while_a_keyframe_holds_the_lock():
    with ticked_node() as (client, node, pub, send_and_tick):
        maps, labels = [], []
        node.map_pub.publish = maps.append                  # what the map and label timers would publish
        node.label_volume.cloud_pub.publish = labels.append
        res = ask(node, 'chair')                                    # empty map: refused from the first snapshot
        assert res.success is False and res.message == 'the map is empty: no keyframe integrated yet'
        mid = []                                # asked once the first keyframe is fused, before its snapshot
        publish = node.publish_snapshot
        node.publish_snapshot = lambda: (mid.append(ask(node, 'chair')), publish())
        send_and_tick((0.0, 0.0, 0.0), 0)
        node.publish_snapshot = publish
        assert [(r.success, r.message) for r in mid] == [
            (False, 'the map is empty: the first keyframe is still being integrated')]
        first = node.snapshot()
        assert first.keyframes == 1 and first.size == node.mapper.map.size > 100
        expected = {t: first.segment(t, [], th) for t, th in (('chair', 0.0), ('a red sofa', 0.01))}
        assert len(expected['chair'].xyz) > 10 and expected['chair'].source == 'label volume'

        # hold the next keyframe inside the integration, the map lock taken
        entered, release = threading.Event(), threading.Event()
        integrate = node.mapper.integrate_keyframes

        def held(*args, **kwargs):
            entered.set()
            assert release.wait(300.0)
            return integrate(*args, **kwargs)
        node.mapper.integrate_keyframes = held
        t = pub.now()
        rgb, depth, lab = wall(12)
        pub.send(rgb, depth, camera=CAMERA, labels=lab, stamp=t, position=(0.6, 0.0, 0.0))
        for _ in range(300):
            client.spin(0.1)
            if node.cameras[0].depth and node.cameras[0].depth[-1].header.stamp.sec == int(t) and \
                    len(node._poses) > 1:
                break
        ticking = threading.Thread(target=node.tick, daemon=True)
        ticking.start()
        try:
            assert entered.wait(300.0)
            assert node._lock.locked()
            for text, want in expected.items():
                res = finishes(lambda: ask(node, text, 0.01 if text == 'a red sofa' else 0.0))
                assert res.success, res.message
                np.testing.assert_array_equal(np.array(res.scores, np.float32), want.scores)
                assert res.cloud.width == len(want.scores)
            finishes(node.publish_map)
            finishes(node.label_volume.publish)
            assert maps[-1].width == first.size
            assert labels[-1].width == len(first.label_cloud()[0].xyz)
            assert node.snapshot() is first                 # nothing new published mid-keyframe
        finally:
            release.set()
            ticking.join(300.0)
        assert not ticking.is_alive()
        node.mapper.integrate_keyframes = integrate

        # the keyframe is in: readers answer from the new generation
        second = node.snapshot()
        assert second.keyframes == 2 and second.generation > first.generation
        assert second.size == node.mapper.map.size > first.size
        with node._lock:
            live = node.mapper.segment('chair')
        res = ask(node, 'chair')
        assert res.success
        np.testing.assert_array_equal(np.array(res.scores, np.float32), live.scores)
        assert len(live.scores) != len(expected['chair'].scores)
        node.publish_map()
        assert maps[-1].width == second.size


def test_keyframes_that_come_while_one_is_integrated_wait_and_are_integrated_together():
    """Keyframes selected while a batch holds the map lock wait as frames (not in the input queue, which holds one
    depth image here and would push them out) and are integrated together afterwards, one purification and one
    snapshot for all; beyond max_pending_keyframes one is dropped with the reason (thin_out)."""
    with ticked_node(**{'queue_size': 1, 'purify.enabled': True, 'purify.affinity': 'fallback'}) as \
            (client, node, pub, send_and_tick):
        send_and_tick((0.0, 0.0, 0.0), 0)
        assert node.status()['keyframes'] == 1
        entered, release = threading.Event(), threading.Event()
        integrate, batches = node.mapper.integrate_keyframes, []
        updates = []
        update = node.mapper.purifier.update
        node.mapper.purifier.update = lambda *a, **k: updates.append(1) or update(*a, **k)

        def held(frames):
            batches.append([f.stamp_s for f in frames])
            entered.set()
            assert release.wait(300.0)
            return integrate(frames)
        node.mapper.integrate_keyframes = held

        def arrive(position):
            """One frame at ``position``, spun until the node holds it, then selected (no integration)."""
            t = pub.now()
            rgb, depth, lab = wall(4)
            pub.send(rgb, depth, camera=CAMERA, labels=lab, stamp=t, position=position)
            for _ in range(300):
                client.spin(0.1)
                cam = node.cameras[0]
                if cam.depth and abs(stamp_to_sec(cam.depth[-1].header.stamp) - t) < 1e-6 and len(node._poses) and \
                        abs(node._poses.newest - t) < 1e-6:
                    break
            finishes(node.select)                       # never waits for the map lock
            return t

        stamps = [arrive((0.5, 0.0, 0.0))]
        ticking = threading.Thread(target=node.integrate_pending, daemon=True)
        ticking.start()
        try:
            assert entered.wait(300.0) and node._lock.locked()
            stamps += [arrive((0.5 * i, 0.0, 0.0)) for i in (2, 3, 4)]
            status = node.status()
            assert status['pending_keyframes'] == 3 and status['dropped'] == 0, status
        finally:
            release.set()
            ticking.join(300.0)
        assert not ticking.is_alive()
        updates.clear()
        node.integrate_pending()                        # the three that waited: one batch
        assert batches == [stamps[:1], stamps[1:]] and len(updates) == 1
        status = node.status()
        assert (status['keyframes'], status['pending_keyframes'], status['dropped'], status['keyframes_dropped']) == \
            (5, 0, 0, 0), status
        assert node.snapshot().keyframes == 5 and node.mapper.num_keyframes == 5
        assert len(node._kf_times) == 5

        # at most max_pending_keyframes wait: the one whose neighbours are closest goes (the 3.0 m one: without
        # it the path jumps 0.65 m, without the 3.15 m one 1 m), with the reason; the rest stay spread out
        node.set_parameters([Parameter('max_pending_keyframes', value=3)])
        late = [arrive((x, 0.0, 0.0)) for x in (2.5, 3.0, 3.15, 4.0)]
        status = node.status()
        assert (status['pending_keyframes'], status['keyframes_dropped'], status['dropped']) == (3, 1, 0), status
        assert 'max_pending_keyframes' in status['last_error'] and f'{late[1]:.3f}' in status['last_error']
        assert 'image_short_side' not in status['last_error']        # the simulated source has no ViT to shrink
        node.integrate_pending()
        assert batches[-1] == [late[0], late[2], late[3]] and node.status()['keyframes'] == 8
        res = node.set_parameters([Parameter('max_pending_keyframes', value=0)])
        assert not res[0].successful and node.max_pending_keyframes == 3


def test_whole_mode_pools_when_a_reader_needs_it_not_after_every_keyframe():
    with ticked_node(**{'purify.enabled': True, 'purify.affinity': 'fallback',
                        'purify.mode': 'whole'}) as (client, node, pub, send_and_tick):
        pools = []
        purify_all = node.mapper.purify_all
        node.mapper.purify_all = lambda: (pools.append(1), purify_all())[1]
        send_and_tick((0.0, 0.0, 0.0), 0)
        send_and_tick((0.6, 0.0, 0.0), 12)
        assert node.mapper.num_keyframes == 2 and pools == [] and node._snapshot_stale
        res = ask(node, 'chair')                     # the first reader pools the whole map once
        assert res.success and len(pools) == 1 and not node._snapshot_stale
        with node._lock:
            live = node.mapper.segment('chair')
        np.testing.assert_array_equal(np.array(res.scores, np.float32), live.scores)
        assert ask(node, 'plant').success and len(pools) == 1     # no keyframe since: the same snapshot
        assert node.snapshot().keyframes == 2


def test_images_keep_coming_while_a_parameter_set_waits_for_the_map_lock():
    """rclpy's parameter services run in the node's default callback group, and a map parameter set waits there
    for the map lock (a keyframe batch being integrated: seconds with CLIP on a CPU). The image subscriptions have
    a group of their own, so images are taken in meanwhile (they shared the default group: none was until the batch
    ended, and the sensor-data queue of 5 lost the rest). The node spun as ``spin`` does (4 threads)."""
    import time
    import rclpy
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.parameter_client import AsyncParameterClient
    from ov3d_ros.ros import conversions as conv
    from ov3d_ros.ros.mapping_node import MappingNode
    from ov3d_ros.tools.demo_client import DemoClient
    with private_domain():
        client = DemoClient()
        context = rclpy.Context()
        rclpy.init(context=context)
        node = MappingNode(context=context, parameter_overrides=[Parameter(k, value=v) for k, v in OVERRIDES.items()])
        executor = MultiThreadedExecutor(num_threads=4, context=context)
        executor.add_node(node)
        spinning = threading.Thread(target=executor.spin, daemon=True)
        spinning.start()
        pub = BadInputPublisher(client)
        waiting = threading.Event()
        apply = node._apply_map
        node._apply_map = lambda new: (waiting.set(), apply(new))[1]
        depth = node.cameras[0].depth
        try:
            params = AsyncParameterClient(client.node, node.get_fully_qualified_name())
            assert params.wait_for_services(60.0)
            with node._lock:                                  # a keyframe batch being integrated
                future = params.set_parameters([Parameter('query.default_threshold', value=0.3)])
                for _ in range(600):
                    client.spin(0.1)
                    if waiting.is_set():
                        break
                assert waiting.is_set()                       # the set waits for the lock, in the default group
                t = pub.now()
                image = conv.numpy_to_image(wall()[1], '16UC1', conv.make_header('camera', conv.sec_to_stamp(t)))
                for _ in range(300):
                    pub.pubs['depth/image'].publish(image)
                    client.spin(0.1)
                    with node.cameras[0].lock:
                        if any(stamp_to_sec(m.header.stamp) == t for m in depth):
                            break
                with node.cameras[0].lock:
                    assert any(stamp_to_sec(m.header.stamp) == t for m in depth)    # taken in while the set waits
                assert not future.done()
            for _ in range(600):
                client.spin(0.1)
                if future.done():
                    break
            assert future.result().results[0].successful and node.mapper.cfg.query.default_threshold == 0.3
        finally:
            pub.close()
            executor.shutdown()
            spinning.join(30.0)
            node.destroy_node()
            rclpy.shutdown(context=context)
            client.close()
