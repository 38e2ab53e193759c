"""Two RGB-D cameras on one rig into one map over real ROS 2: both streaming compressed colour (JPEG) and
compressedDepth (PNG) from the scene player (the rig's body pose and both cameras' images), and both cameras'
keyframes of one tick through one feature-extractor batch (a node in this process, ticked by the test)."""
import time

import numpy as np
import torch
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient

from ov3d_ros.sim import builtin_scene
from ov3d_ros.sim.classes import CLASS_NAMES
from ov3d_ros.tools.demo_client import DemoClient
from ov3d_ros.tools.ros_graph import start_mapping_node, start_scene_player

from conftest import private_domain

# cam_a looks along the body's optical axis, cam_b is 10 cm to the right, turned 90 degrees (about optical y)
MOUNTS = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.1, 0.0, 0.0, 0.0, 0.7071068, 0.0, 0.7071068]


def as_list(values) -> str:
    return '[' + ','.join(str(v) for v in values) + ']'


def test_two_compressed_cameras_build_one_map(tmp_path):
    streams = ['cameras:=[cam_a,cam_b]', 'color_transport:=compressed', 'depth_transport:=compressedDepth']
    with private_domain() as env:
        # 8-px simulated patches: 160x120 images with a token grid like 320x240 ones at 16 px
        # raw fusion: keyframes integrate quickly even on a loaded machine, so the frames between them are taken
        # (and counted as not decoded) rather than superseded while a slow keyframe is integrated
        node = start_mapping_node(env, tmp_path / 'node.log', params=streams + [
            f'pose_to_camera:={as_list(MOUNTS)}', 'features.sim_patch_px:=8', 'purify.enabled:=false'])
        client = DemoClient()
        player = None
        try:
            assert client.wait_for_service(node, 120.0), node.log()
            # sparser keyframes (set live), so that about half the frames are not keyframe candidates
            params = AsyncParameterClient(client.node, '/ov3d_mapping')
            assert params.wait_for_services(30.0)
            future = params.set_parameters([Parameter('keyframes.min_translation_m', value=0.4),
                                            Parameter('keyframes.min_rotation_deg', value=30.0),
                                            Parameter('keyframes.max_interval_s', value=0.0)])
            client.executor.spin_until_future_complete(future, timeout_sec=60.0)
            assert all(r.successful for r in future.result().results), future.result()
            player = start_scene_player(env, tmp_path / 'player.log', streams + [
                f'camera_mounts:={as_list(MOUNTS)}', 'n_frames:=24', 'rate_hz:=4.0', 'width:=160', 'height:=120'])
            status = client.wait_until_mapped(player, node, timeout_s=600.0)
            cams = status['cameras']
            assert set(cams) == {'cam_a', 'cam_b'}, status
            for name, cam in cams.items():
                assert cam['keyframes'] >= 5, (name, status, node.log()[-3000:])
                # compressed frames are decoded only as keyframe candidates: the others are counted, not decoded
                assert cam['frames'] == cam['keyframes'] + cam['not_decoded'], (name, cam)
            assert status['keyframes'] == cams['cam_a']['keyframes'] + cams['cam_b']['keyframes']
            assert sum(c['not_decoded'] for c in cams.values()) > 0, status
            assert status['voxels'] > 1000, status
            # both cameras' voxels land where the scene's objects are (wrong mounts or decoding would smear them)
            boxes = builtin_scene(0).instance_boxes()
            for name in ('chair', 'table', 'sofa'):
                r = client.query(name)
                assert r['success'] and len(r['xyz']) > 20, (name, r['message'])
                cls = CLASS_NAMES.index(name)
                inside = np.zeros(len(r['xyz']), bool)
                for lo, hi, c in boxes:
                    if c == cls:
                        inside |= np.all((r['xyz'] >= np.asarray(lo) - 0.05) & (r['xyz'] <= np.asarray(hi) + 0.05),
                                         axis=1)
                assert inside.mean() >= 0.85, (name, inside.mean())
            assert node.alive()
        finally:
            if player is not None:
                player.stop()
            client.close()
            node.stop(60.0)


def test_keyframes_of_two_cameras_in_one_tick_share_one_feature_batch():
    """Both cameras' keyframes pending in one tick: one extract_batch call (CLIP, random weights, in bfloat16) for
    both, each integrated and counted for its camera; a frame that fails validation is dropped for its camera
    alone. The ViT's image size and dense mode change live (``ros2 param set``) for the next keyframes."""
    import rclpy
    from geometry_msgs.msg import PoseStamped
    from sensor_msgs.msg import CameraInfo, Image

    from ov3d_ros.ros import conversions as conv
    from ov3d_ros.ros.mapping_node import MappingNode
    from ov3d_ros.sim import builtin_trajectory, default_camera, render

    from conftest import private_domain
    overrides = {'cameras': ['cam_a', 'cam_b'], 'pose_to_camera': MOUNTS, 'pose_source': 'pose',
                 'input_qos': 'reliable', 'features.source': 'clip', 'features.pretrained': 'none',
                 'features.image_short_side': 64, 'features.dtype': 'bfloat16', 'map.device': 'cpu',
                 'purify.enabled': False,
                 'tick_rate_hz': 0.001}               # the timer never ticks here: the test calls tick()
    scene, camera = builtin_scene(0), default_camera(64, 48)
    with private_domain():
        client = DemoClient()
        node = MappingNode(context=client.context,
                           parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])
        pub_node = rclpy.create_node('two_camera_input', context=client.context)
        client.executor.add_node(node)
        client.executor.add_node(pub_node)
        pubs = {(ns, t): pub_node.create_publisher(m, f'{ns}/{t}', 10) for ns in ('cam_a', 'cam_b')
                for t, m in (('color/image', Image), ('depth/image', Image), ('color/camera_info', CameraInfo))}
        pose_pub = pub_node.create_publisher(PoseStamped, 'pose', 10)
        assert node.mapper.extractor.dtype == torch.bfloat16     # features.dtype reached the ViT
        batches = []
        extract_batch = node.mapper.extractor.extract_batch
        grids = []

        def counted(images):
            out = extract_batch(images)
            batches.append(len(images))
            grids.append(tuple(out.shape[1:3]))
            return out
        node.mapper.extractor.extract_batch = counted

        def send(T_W_B, stamp_s, bad_info_for=None):
            """One rig frame at ``stamp_s``: the body pose, then each camera's info, colour and depth."""
            header = conv.make_header('map', conv.sec_to_stamp(stamp_s))
            pose = PoseStamped(header=header, pose=conv.matrix_to_pose(T_W_B))
            pose_pub.publish(pose)
            for i, ns in enumerate(('cam_a', 'cam_b')):
                T_B_C = conv.pose_to_matrix(MOUNTS[7 * i:7 * i + 3], MOUNTS[7 * i + 3:7 * i + 7])
                f = render(scene, camera, T_W_B @ T_B_C)
                h = conv.make_header(f'{ns}_optical', header.stamp)
                info = conv.camera_to_camera_info(default_camera(80, 60) if ns == bad_info_for else camera, h)
                pubs[ns, 'color/camera_info'].publish(info)
                pubs[ns, 'color/image'].publish(conv.numpy_to_image(f.rgb, 'rgb8', h))
                depth = np.round(f.depth_m * 1000.0).clip(0, 65535).astype(np.uint16)
                pubs[ns, 'depth/image'].publish(conv.numpy_to_image(depth, '16UC1', h))

        def wait_pending(stamp_s):
            """Spin until both cameras hold the frame at ``stamp_s`` and its pose (no tick runs meanwhile)."""
            end = time.monotonic() + 30.0
            while time.monotonic() < end:
                client.spin(0.1)
                if node._poses.newest == stamp_s and all(
                        c.depth and c.color and conv.stamp_to_sec(c.depth[-1].header.stamp) == stamp_s
                        and c.camera_info is not None and conv.stamp_to_sec(c.camera_info.header.stamp) == stamp_s
                        for c in node.cameras):
                    return
            raise AssertionError(f'the frames at {stamp_s} did not arrive')

        try:
            poses = builtin_trajectory(scene, 8, 0)
            t0 = client.node.get_clock().now().nanoseconds * 1e-9
            send(poses[0], t0)
            wait_pending(t0)
            node.tick()
            assert batches == [2]
            status = node.status()
            for name, cam in status['cameras'].items():
                assert (cam['frames'], cam['keyframes'], cam['dropped']) == (1, 1, 0), (name, status)
            assert status['keyframes'] == 2 and node.mapper.num_keyframes == 2, status
            assert status['voxels'] > 100 and len(node._kf_times) == 2, status
            assert all(t > 0 for t in node._kf_times)

            # cam_b's camera info no longer matches its images: its frame is dropped, cam_a's is integrated alone
            send(poses[4], t0 + 1.0, bad_info_for='cam_b')
            wait_pending(t0 + 1.0)
            node.tick()
            assert batches == [2, 1]
            status = node.status()
            a, b = status['cameras']['cam_a'], status['cameras']['cam_b']
            assert (a['frames'], a['keyframes'], a['dropped']) == (2, 2, 0), status
            assert (b['frames'], b['keyframes'], b['dropped']) == (2, 1, 1), status
            assert 'camera info is 80x60 but images are 64x48' in b['last_error'], b
            assert status['keyframes'] == 3 and node.mapper.num_keyframes == 3, status

            # the ViT's image size and dense mode are live parameters: the next keyframes' features come at 96 px
            assert grids == [(4, 5), (4, 5)]              # 64x48 images at image_short_side 64
            space = status['feature_space']
            assert status['feature_source'] == 'clip:ViT-B-16:naclip'
            live = node.set_parameters([Parameter('features.image_short_side', value=96),
                                        Parameter('features.dense_mode', value='sclip')])
            assert all(r.successful for r in live), [r.reason for r in live]
            refused = node.set_parameters([Parameter('features.image_short_side', value=0),
                                           Parameter('features.dtype', value='float32')])
            assert not refused[0].successful and 'features.image_short_side must be' in refused[0].reason
            assert not refused[1].successful and 'read-only' in refused[1].reason
            # all or nothing: the ViT's new size is undone when the purification beside it is refused
            refused = node.set_parameters_atomically([Parameter('features.image_short_side', value=128),
                                                      Parameter('purify.enabled', value=True),
                                                      Parameter('purify.checkpoint', value='/nonexistent.safetensors')])
            assert not refused.successful and 'purification settings not applied' in refused.reason
            assert node.mapper.extractor.cfg.image_short_side == 96 == node.mapper.cfg.features.image_short_side
            assert node.mapper.extractor.name == 'clip:ViT-B-16:sclip'
            status = node.status()                      # what runs now, and the space (the same weights)
            assert status['feature_source'] == 'clip:ViT-B-16:sclip'
            assert status['feature_space'] == space and space.startswith('clip:ViT-B-16:')
            send(poses[7], t0 + 2.0)
            wait_pending(t0 + 2.0)
            node.tick()
            assert batches == [2, 1, 2] and grids[-1] == (6, 8), (batches, grids)
            assert node.status()['keyframes'] == 5 and node.mapper.num_keyframes == 5

            # a backlog beyond max_pending_keyframes: the reason names the ViT's image size among the remedies
            assert node.set_parameters([Parameter('max_pending_keyframes', value=1)])[0].successful
            for k, pose in enumerate((poses[2], poses[6])):
                send(pose, t0 + 3.0 + k)
                wait_pending(t0 + 3.0 + k)
                node.select()                              # selected, not integrated: they wait
            status = node.status()
            assert status['keyframes_dropped'] == 2 and status['pending_keyframes'] == 2, status
            assert 'lower features.image_short_side' in status['last_error'], status['last_error']
        finally:
            client.executor.remove_node(pub_node)
            client.executor.remove_node(node)
            pub_node.destroy_node()
            node.destroy_node()
            client.close()
