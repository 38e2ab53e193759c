"""Map persistence of the real node: resume from a file at start, autosave after changes."""
import os
import signal
import time

from ov3d_ros.core.map_io import load_map
from ov3d_ros.tools.demo_client import DemoClient
from ov3d_ros.tools.ros_graph import private_ros_env, start_mapping_node, start_scene_player

from conftest import in_process_node, private_domain


def test_node_resumes_from_file_and_autosaves(saved_map, start_node):
    from std_srvs.srv import Trigger
    path, voxels = saved_map
    node, client = start_node([f'map_path:={path}', 'load_map_on_start:=true', 'autosave_period_s:=0.5'])
    end = time.monotonic() + 20
    while time.monotonic() < end and not (client.status and client.status['voxels'] == voxels):
        client.spin(0.3)
    assert client.status and client.status['voxels'] == voxels, (client.status, node.log()[-2000:])
    assert client.query('sofa')['success']
    from diagnostic_msgs.msg import DiagnosticArray
    diags = []
    client.node.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 10)
    end = time.monotonic() + 10
    while time.monotonic() < end and not diags:
        client.spin(0.3)
    values = {kv.key: kv.value for kv in diags[-1].status[0].values}
    assert 'ov3d_mapping' in diags[-1].status[0].name and values['voxels'] == str(voxels)
    assert 'input_rate_hz' in values and 'no input' in diags[-1].status[0].message   # nothing is publishing
    mtime = os.stat(path).st_mtime_ns
    client.spin(1.5)
    assert os.stat(path).st_mtime_ns == mtime            # unchanged map: no autosave
    assert client.call(Trigger, '/ov3d_mapping/clear_map', Trigger.Request()).success
    end = time.monotonic() + 10
    while time.monotonic() < end and os.stat(path).st_mtime_ns == mtime:
        client.spin(0.3)
    assert load_map(path)[0].size == 0, node.log()[-2000:]   # the cleared map was autosaved
    assert node.alive()


def test_sigterm_saves_the_changes_autosave_has_not_saved_yet(tmp_path):
    """autosave on: SIGTERM (as Ctrl-C) saves the map to map_path before the node exits (autosave_period_s 600,
    SIGTERM 3 keyframes in: exit 0 and no file, 15 710 voxels lost)."""
    path = tmp_path / 'map.ov3dmap'
    with private_domain() as env:
        node = start_mapping_node(env, tmp_path / 'node.log', params=[f'map_path:={path}', 'autosave_period_s:=600.0'])
        client = DemoClient()
        player = None
        try:
            assert client.wait_for_service(node, 120.0), node.log()
            player = start_scene_player(env, tmp_path / 'player.log', ['n_frames:=40', 'rate_hz:=6.0',
                                                                       'width:=160', 'height:=120'])
            end = time.monotonic() + 120
            while time.monotonic() < end and not (client.status and client.status['keyframes'] >= 3):
                client.spin(0.3)
            assert client.status and client.status['keyframes'] >= 3, (client.status, node.log()[-2000:])
            voxels = client.status['voxels']
            player.stop()
            node.proc.send_signal(signal.SIGTERM)
            rc = node.proc.wait(60)
        finally:
            if player is not None:
                player.stop()
            client.close()
            node.stop()
    log = node.log()
    assert rc == 0 and 'Traceback' not in log, log[-3000:]
    vmap, info, _ = load_map(path)                    # what the status showed, or more (integrated since)
    assert vmap.size >= voxels > 0 and info['keyframes'] >= 3, log[-3000:]
    assert f'shutdown: autosave: saved {vmap.size} voxels' in log, log[-3000:]


def test_autosave_saves_every_change_and_counts_only_map_path_as_saved(tmp_path, wall_frame):
    """Autosave compares the map's change counter, not its keyframes and voxels: a new vocabulary or query setting
    is saved (the file kept vocabulary None), and a save to or load from another file leaves map_path unsaved
    (after /load_map other.ov3dmap, map_path kept the old map)."""
    import numpy as np
    from rclpy.parameter import Parameter
    from std_srvs.srv import Trigger
    from ov3d_ros.srv import LoadMap, SaveMap, SetVocabulary
    path = tmp_path / 'map.ov3dmap'
    with in_process_node(map_path=str(path), autosave_period_s=600.0) as (node, client, pub):
        saver = node.persistence
        node._integrate([(node.cameras[0], wall_frame(1.0))])
        saver.autosave()
        assert load_map(path)[0].size == node.mapper.map.size > 0
        r = node.label_volume.on_set_vocabulary(SetVocabulary.Request(classes=['chair', 'plant']),
                                                SetVocabulary.Response())
        assert r.success, r.message
        saver.autosave()
        assert load_map(path)[1]['vocabulary'] == ['chair', 'plant']
        assert node.set_parameters([Parameter('query.default_threshold', value=0.4)])[0].successful
        saver.autosave()
        assert load_map(path)[1]['config']['query']['default_threshold'] == 0.4
        frame = wall_frame(2.0)
        frame.T_W_C = np.eye(4)
        frame.T_W_C[0, 3] = 3.0                        # beside the first wall: more voxels
        node._integrate([(node.cameras[0], frame)])
        voxels = node.mapper.map.size
        assert saver.on_save(SaveMap.Request(path='other.ov3dmap'), SaveMap.Response()).success
        saver.autosave()                               # the copy is not map_path
        assert load_map(path)[0].size == voxels
        assert saver.on_clear(Trigger.Request(), Trigger.Response()).success
        saver.autosave()
        assert load_map(path)[0].size == 0
        r = saver.on_load(LoadMap.Request(path='other.ov3dmap'), LoadMap.Response())
        assert r.success and r.voxels == voxels, r.message
        saver.autosave()                               # another file loaded: map_path does not hold it yet
        assert load_map(path)[0].size == voxels
        mtime = os.stat(path).st_mtime_ns
        saver.on_load(LoadMap.Request(path=''), LoadMap.Response())
        saver.autosave()                               # map_path itself loaded: nothing to save
        assert os.stat(path).st_mtime_ns == mtime


def test_node_refuses_to_start_from_a_corrupt_file(tmp_path, monkeypatch):
    bad = tmp_path / 'bad.ov3dmap'
    bad.write_bytes(b'junk' * 100)
    env = private_ros_env()
    node = start_mapping_node(env, tmp_path / 'node.log', params=[f'map_path:={bad}', 'load_map_on_start:=true'])
    try:
        end = time.monotonic() + 120
        while node.alive() and time.monotonic() < end:
            time.sleep(0.5)
        assert not node.alive()
        assert 'load_map_on_start' in node.log() and str(bad) in node.log()
    finally:
        node.stop()


def test_save_and_load_are_confined_to_the_map_dir(saved_map, start_node, tmp_path):
    """save_map / load_map refuse paths outside map_dir ('..', absolute, symlinks leading out) and never replace a
    file that is not an ov3d map; each refusal says why."""
    from ov3d_ros.srv import LoadMap, SaveMap
    src, voxels = saved_map
    maps, outside = tmp_path / 'maps', tmp_path / 'outside'
    maps.mkdir()
    outside.mkdir()
    (maps / 'room.ov3dmap').write_bytes(src.read_bytes())
    secret = outside / 'bashrc'
    secret.write_text('export PATH=/usr/bin\n')
    (outside / 'foreign.ov3dmap').write_bytes(src.read_bytes())
    (maps / 'escape').symlink_to(outside, target_is_directory=True)
    (maps / 'notes.txt').write_text('not a map\n')
    node, client = start_node([f'map_path:={maps / "room.ov3dmap"}', 'load_map_on_start:=true'])

    def save(path):
        return client.call(SaveMap, '/ov3d_mapping/save_map', SaveMap.Request(path=str(path)))

    def load(path):
        return client.call(LoadMap, '/ov3d_mapping/load_map', LoadMap.Request(path=str(path)))

    for path, why in [(secret, 'outside map_dir'), (outside / 'new.ov3dmap', 'outside map_dir'),
                      ('../outside/bashrc', "'..'"), (f'{maps}/../outside/x.ov3dmap', "'..'"),
                      ('escape/bashrc', 'outside map_dir'), ('escape/new.ov3dmap', 'outside map_dir'),
                      ('notes.txt', 'not an ov3d map'), (maps, 'outside map_dir')]:
        r = save(path)
        assert not r.success and why in r.message, (path, r.message)
    assert secret.read_text() == 'export PATH=/usr/bin\n'
    assert (maps / 'notes.txt').read_text() == 'not a map\n'
    assert not (outside / 'new.ov3dmap').exists() and sorted(p.name for p in outside.iterdir()) == [
        'bashrc', 'foreign.ov3dmap']
    for path in (outside / 'foreign.ov3dmap', 'escape/foreign.ov3dmap', '../outside/foreign.ov3dmap'):
        r = load(path)
        assert not r.success and 'kept the current map' in r.message and r.voxels == voxels, (path, r.message)

    r = save('copy.ov3dmap')                                  # relative: inside map_dir
    assert r.success and r.path == str(maps / 'copy.ov3dmap') and r.voxels == voxels, r.message
    r = save(maps / 'room.ov3dmap')                           # an existing map is replaced
    assert r.success, r.message
    (maps / 'alias.ov3dmap').symlink_to(maps / 'copy.ov3dmap')  # a symlink that stays inside is followed
    r = load('alias.ov3dmap')
    assert r.success and r.voxels == voxels, r.message
    assert node.alive()


def test_node_refuses_a_map_path_outside_its_map_dir(tmp_path):
    (tmp_path / 'maps').mkdir()
    env = private_ros_env()
    node = start_mapping_node(env, tmp_path / 'node.log', params=[f'map_path:={tmp_path / "elsewhere.ov3dmap"}',
                                                                   f'map_dir:={tmp_path / "maps"}'])
    try:
        end = time.monotonic() + 120
        while node.alive() and time.monotonic() < end:
            time.sleep(0.5)
        assert not node.alive()
        assert 'outside map_dir' in node.log(), node.log()[-2000:]
    finally:
        node.stop()


def test_keyframes_and_answers_of_the_map_before_a_clear_or_load_go_with_it(tmp_path, wall_frame):
    """Keyframes selected for the map before ~/clear_map or ~/load_map are not integrated into the new one (the
    next tick fused them into the cleared map: 3 pending keyframes gave a 'cleared' map of 912 voxels), nor is a
    batch taken for integration before; the last answer's latched segmentation and objects are withdrawn (a late
    subscriber got 'chair' with 471 voxels after the clear)."""
    from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import PointCloud2
    from std_srvs.srv import Trigger
    from ov3d_ros.msg import ObjectInstanceArray
    from ov3d_ros.srv import LoadMap, MergeMap, SaveMap, SegmentByText
    latched = QoSProfile(depth=1, durability=DurabilityPolicy.TRANSIENT_LOCAL, reliability=ReliabilityPolicy.RELIABLE)
    with in_process_node(map_path=str(tmp_path / 'map.ov3dmap')) as (node, client, pub):
        cam, saver = node.cameras[0], node.persistence
        node._integrate([(cam, wall_frame(1.0))])
        assert saver.on_save(SaveMap.Request(path='one.ov3dmap'), SaveMap.Response()).success
        answer = node.on_segment(SegmentByText.Request(text='floor', threshold=0.0), SegmentByText.Response())
        assert answer.success and len(answer.objects) > 0, answer.message
        merge = MergeMap.Request(paths=[str(tmp_path / 'one.ov3dmap')], replace=True)
        for how, replace in (('cleared', lambda: saver.on_clear(Trigger.Request(), Trigger.Response())),
                             ('loaded', lambda: saver.on_load(LoadMap.Request(path='one.ov3dmap'), LoadMap.Response())),
                             ('replaced by a merge', lambda: saver.on_merge(merge, MergeMap.Response()))):
            with node._pending_lock:
                cam.pending.extend([wall_frame(2.0), wall_frame(3.0)])
            taken, epoch = [(cam, wall_frame(4.0))], node._map_epoch        # a batch waiting for the map lock
            dropped = cam.stats['keyframes_dropped']
            assert replace().success
            node.integrate_pending()
            node._integrate(taken, epoch)
            assert len(cam.pending) == 0 and cam.stats['keyframes_dropped'] == dropped + 3, how
            # the file's one keyframe, or none: none of the three selected before was fused
            assert node.mapper.num_keyframes == (0 if how == 'cleared' else 1), how
            assert how != 'cleared' or node.mapper.map.size == 0
            got = {}
            subs = [client.node.create_subscription(kind, f'/ov3d_mapping/{topic}',
                                                    lambda m, t=topic: got.__setitem__(t, m), latched)
                    for kind, topic in ((ObjectInstanceArray, 'objects'), (PointCloud2, 'segmentation'))]
            for _ in range(100):
                client.spin(0.1)
                if len(got) == 2:
                    break
            for sub in subs:
                client.node.destroy_subscription(sub)
            assert len(got['objects'].objects) == 0 and got['segmentation'].width == 0, how
        node._integrate([(cam, wall_frame(5.0))])              # taken after the merge: integrated
        assert node.mapper.num_keyframes == 2
