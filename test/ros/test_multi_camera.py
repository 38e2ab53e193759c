"""Two RGB-D cameras on one rig into one map over real ROS 2, both streaming compressed colour (JPEG) and
compressedDepth (PNG): the scene player publishes the rig's body pose and both cameras' images."""
import numpy as np
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
        node = start_mapping_node(env, tmp_path / 'node.log', params=streams + [
            f'pose_to_camera:={as_list(MOUNTS)}', 'features.sim_patch_px:=8'])
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
