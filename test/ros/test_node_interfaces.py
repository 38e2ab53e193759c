"""The mapping node process over real ROS 2: live parameters, pose frames, start-up failure and a clean SIGINT."""
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from rclpy.parameter import Parameter, parameter_value_to_python
from rclpy.parameter_client import AsyncParameterClient

from ov3d_ros.sim import default_camera
from ov3d_ros.tools.ros_graph import start_mapping_node, start_scene_player

from conftest import BadInputPublisher, private_domain


@pytest.fixture(scope='module')
def loaded(tmp_path_factory, request):
    """A mapping node process resumed from a saved map of the built-in scene, a DemoClient and a parameter
    client of the node: {'node', 'client', 'params', 'env', 'out'}."""
    from ov3d_ros.tools.demo_client import DemoClient
    saved = request.getfixturevalue('module_saved_map')
    out = tmp_path_factory.mktemp('interfaces')
    with private_domain() as env:
        node = start_mapping_node(env, out / 'node.log', params=[f'map_path:={saved}', 'load_map_on_start:=true'])
        client = DemoClient()
        try:
            assert client.wait_for_service(node, 120.0), node.log()
            params = AsyncParameterClient(client.node, '/ov3d_mapping')
            assert params.wait_for_services(30.0)
            yield {'node': node, 'client': client, 'params': params, 'env': env, 'out': out}
        finally:
            client.close()
            node.stop(60.0)


@pytest.fixture(scope='module')
def module_saved_map(tmp_path_factory, room_mapper_factory):
    path = tmp_path_factory.mktemp('map') / 'room.ov3dmap'
    room_mapper_factory().save(path)
    return path


def set_params(g, **values):
    """Set parameters (``a__b`` for ``a.b``) one by one over /ov3d_mapping/set_parameters: [(ok, reason)]."""
    params = [Parameter(k.replace('__', '.'), value=v) for k, v in values.items()]
    future = g['params'].set_parameters(params)
    g['client'].executor.spin_until_future_complete(future, timeout_sec=60.0)
    assert future.result() is not None, 'set_parameters got no answer'
    return [(r.successful, r.reason) for r in future.result().results]


def set_atomically(g, **values):
    """Set parameters (``a__b`` for ``a.b``) in one atomic call: (ok, reason)."""
    future = g['params'].set_parameters_atomically([Parameter(k.replace('__', '.'), value=v)
                                                    for k, v in values.items()])
    g['client'].executor.spin_until_future_complete(future, timeout_sec=60.0)
    return future.result().result.successful, future.result().result.reason


def get_param(g, name):
    future = g['params'].get_parameters([name])
    g['client'].executor.spin_until_future_complete(future, timeout_sec=30.0)
    return parameter_value_to_python(future.result().values[0])


def test_live_parameter_changes_the_answer(loaded):
    client = loaded['client']
    before = client.query('sofa')
    assert before['success'] and len(before['xyz']) > 50, before['message']
    assert set_params(loaded, query__default_threshold=0.99) == [(True, '')]
    assert get_param(loaded, 'query.default_threshold') == 0.99
    strict = client.query('sofa')
    assert strict['success'] and len(strict['xyz']) < len(before['xyz']) / 2, (len(strict['xyz']), len(before['xyz']))
    assert np.all(strict['scores'] >= 0.99)
    assert set_params(loaded, query__default_threshold=0.55) == [(True, '')]
    assert len(client.query('sofa')['xyz']) == len(before['xyz'])
    # purification switched on live: the map is re-pooled under the lock and queries keep working
    assert set_params(loaded, purify__enabled=True) == [(True, '')]
    purified = client.query('sofa')
    assert purified['success'] and len(purified['xyz']) > 50, purified['message']
    assert set_params(loaded, purify__enabled=False) == [(True, '')]
    assert loaded['node'].alive()


def test_read_only_and_invalid_values_are_refused_with_the_reason(loaded):
    refused = set_params(loaded, map__voxel_size_m=0.1, features__source='clip', pose_source='bogus',
                         load_map_on_start=False, features__compile=True)
    assert all(not ok and 'read-only' in reason for ok, reason in refused), refused
    future = loaded['params'].describe_parameters(['map.voxel_size_m', 'map_path', 'tick_rate_hz'])
    loaded['client'].executor.spin_until_future_complete(future, timeout_sec=30.0)
    voxel, path, tick = future.result().descriptors
    assert voxel.read_only and 'voxel grid' in voxel.description
    assert path.read_only and 'restart the node' in path.description
    assert (voxel.additional_constraints, tick.additional_constraints) == ('a finite number > 0',
                                                                           'a rate in [0.001, 1000] Hz')
    for name, value, match in [('query.default_threshold', 1.5, 'query.default_threshold must be a number in [0, 1]'),
                               ('keyframes.min_translation_m', -0.1, 'must be a finite number >= 0'),
                               ('purify.affinity', 'bogus', "purify.affinity must be one of 'learned', 'fallback'"),
                               ('query.templates', ['no placeholder'], 'exactly one {}'),
                               ('map.max_depth_m', 0.05, 'must be below map.max_depth_m'),
                               ('tick_rate_hz', 0.0, 'tick_rate_hz must be a rate in [0.001, 1000] Hz'),
                               ('tick_rate_hz', 1e-12, 'tick_rate_hz must be a rate in [0.001, 1000] Hz'),
                               ('query.default_threshold', 'high', "query.default_threshold takes a number, got 'high'"),
                               ('pose_to_camera', [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], 'unit quaternion'),
                               ('features.image_short_side', 0, 'features.image_short_side must be'),
                               ('features.image_short_side', 224,
                                "settings of the clip feature source; this node runs 'simulated'")]:
        [(ok, reason)] = set_params(loaded, **{name.replace('.', '__'): value})
        assert not ok and match in reason, (name, reason)
    assert get_param(loaded, 'query.default_threshold') == 0.55
    assert get_param(loaded, 'map.voxel_size_m') == 0.05
    assert set_params(loaded, purify__enabled=False) == [(True, '')]
    ok, reason = set_atomically(loaded, purify__enabled=True, purify__affinity='learned',
                                purify__checkpoint='/nonexistent.safetensors')
    assert not ok and 'purification settings not applied' in reason, reason
    assert get_param(loaded, 'purify.enabled') is False and get_param(loaded, 'purify.checkpoint') == 'default'
    assert loaded['client'].query('sofa')['success'] and loaded['node'].alive()


def test_bounded_parameters_carry_their_range_and_a_set_outside_it_gets_the_checks_reason(loaded):
    """``ros2 param describe`` shows Min value and Max value of the parameters whose check has finite bounds; a set
    outside the range is refused with the check's reason (not rclpy's 'Parameter query.default_threshold out of
    range Min: 0.0, Max: 1.0, value: 1.5'), one at its edge is taken."""
    names = ['query.default_threshold', 'labels.smoothing_radius_vox', 'map_publish_rate_hz', 'web_view.port',
             'keyframes.max_interval_s']
    future = loaded['params'].describe_parameters(names)
    loaded['client'].executor.spin_until_future_complete(future, timeout_sec=30.0)
    threshold, smoothing, publish, port, interval = future.result().descriptors
    assert [(r.from_value, r.to_value, r.step) for r in threshold.floating_point_range] == [(0.0, 1.0, 0.0)]
    assert [(r.from_value, r.to_value, r.step) for r in smoothing.integer_range] == [(0, 3, 1)]
    assert [(r.from_value, r.to_value) for r in publish.floating_point_range] == [(0.0, 1000.0)]      # 0 = off
    assert [(r.from_value, r.to_value, r.step) for r in port.integer_range] == [(0, 65535, 1)]
    assert not (threshold.integer_range or smoothing.floating_point_range or port.floating_point_range)
    assert not (interval.floating_point_range or interval.integer_range)                            # >= 0: no end
    assert threshold.additional_constraints == 'a number in [0, 1]'
    before = {n: get_param(loaded, n) for n in names[:3]}
    for name, value, reason in [
            ('query.default_threshold', 1.5, 'query.default_threshold must be a number in [0, 1], got 1.5'),
            ('query.default_threshold', -0.5, 'query.default_threshold must be a number in [0, 1], got -0.5'),
            ('labels.smoothing_radius_vox', 4, 'labels.smoothing_radius_vox must be a number in [0, 3], got 4'),
            ('map_publish_rate_hz', 5000.0,
             'map_publish_rate_hz must be 0 (off) or a rate in [0.001, 1000] Hz, got 5000.0'),
            ('web_view.port', 70000,
             'web_view.port must be a port number in [0, 65535] (0 = any free port), got 70000')]:
        assert set_params(loaded, **{name.replace('.', '__'): value}) == [(False, reason)], name
    assert set_atomically(loaded, query__default_threshold=0.6, labels__smoothing_radius_vox=7) == \
        (False, 'labels.smoothing_radius_vox must be a number in [0, 3], got 7')
    assert {n: get_param(loaded, n) for n in names[:3]} == before                                # nothing changed
    # the edges of the ranges are taken
    assert set_params(loaded, query__default_threshold=1.0, labels__smoothing_radius_vox=3,
                      map_publish_rate_hz=0.0) == [(True, '')] * 3
    assert [get_param(loaded, n) for n in names[:3]] == [1.0, 3, 0.0]
    assert set_params(loaded, **{n.replace('.', '__'): v for n, v in before.items()}) == [(True, '')] * 3
    assert loaded['client'].query('sofa')['success'] and loaded['node'].alive()


def test_values_are_taken_as_their_parameters_type_where_meant_and_refused_in_words_otherwise(loaded):
    """What ``ros2 param set`` sends for 1 to a number parameter (an integer) and for "[]" (an empty list of
    booleans) is taken as meant; a value of another type is refused naming the type in words (rclpy said "Wrong
    parameter type, expected '2' got '3'")."""
    threshold, templates = get_param(loaded, 'query.default_threshold'), get_param(loaded, 'query.templates')
    assert templates and set_params(loaded, query__default_threshold=1) == [(True, '')]
    assert get_param(loaded, 'query.default_threshold') == 1.0 and loaded['node'].alive()
    future = loaded['params'].set_parameters([Parameter('query.templates', Parameter.Type.BOOL_ARRAY, [])])
    loaded['client'].executor.spin_until_future_complete(future, timeout_sec=60.0)
    assert future.result().results[0].successful, future.result().results[0].reason
    assert get_param(loaded, 'query.templates') == []
    assert set_params(loaded, web_view__port=8080.5, labels__vocabulary='chair', query__default_negatives=[]) == [
        (False, 'web_view.port takes an integer, got 8080.5'),
        (False, "labels.vocabulary takes a list of strings, got 'chair'"),
        (False, 'query.default_negatives must be 1 to 32 negatives, none blank, got []')]
    assert set_params(loaded, query__default_threshold=threshold, query__templates=templates) == \
        [(True, '')] * 2


def test_pose_in_another_frame_is_reported_and_not_integrated(loaded):
    client = loaded['client']
    diags = []
    client.node.create_subscription(DiagnosticArray, '/diagnostics', diags.append, 10)
    pub = BadInputPublisher(client)
    try:
        rgb, depth = np.full((48, 64, 3), 90, np.uint8), np.full((48, 64), 1500, np.uint16)
        for _ in range(4):
            pub.send(rgb, depth, camera=default_camera(64, 48), pose_frame='odom')
            client.spin(0.3)
        status = pub.wait_for_error("pose frame 'odom' is not map_frame 'map' and no TF connects them")
        assert status['cameras']['camera']['dropped'] >= 1 and status['keyframes'] == 0, status
        end = time.monotonic() + 15
        found = None
        while time.monotonic() < end and found is None:
            client.spin(0.3)
            found = next((s for d in diags for s in d.status if s.name.endswith('camera camera')
                          and "pose frame 'odom' is not map_frame 'map'" in s.message), None)
        assert found is not None and found.level == DiagnosticStatus.WARN, [s.message for d in diags for s in d.status]
    finally:
        pub.close()
    assert "pose frame 'odom' is not map_frame 'map'" in loaded['node'].log()


def test_sigint_while_mapping_exits_cleanly(loaded):
    """Last in the module: SIGINT while frames are integrated and the status timer publishes."""
    client, node = loaded['client'], loaded['node']
    player = start_scene_player(loaded['env'], loaded['out'] / 'player.log',
                                ['n_frames:=200', 'rate_hz:=10.0', 'width:=160', 'height:=120', 'loop:=true'])
    try:
        keyframes = client.status['keyframes'] if client.status else 0
        end = time.monotonic() + 120
        while time.monotonic() < end and (not client.status or client.status['keyframes'] < keyframes + 3):
            client.spin(0.3)
        assert client.status['keyframes'] >= keyframes + 3, (client.status, node.log()[-2000:])
        rc = node.stop(60.0)
    finally:
        player.stop()
    log = node.log()
    assert rc == 0, log[-3000:]
    assert 'Traceback' not in log and 'Destroyable' not in log, log[-3000:]


@pytest.mark.parametrize('params, reason, lifecycle', [
    (['pose_source:=bogus'], "pose_source must be one of 'tf', 'pose', 'odometry', got 'bogus'", False),
    (['pose_source:=bogus'], "pose_source must be one of 'tf', 'pose', 'odometry', got 'bogus'", True),
    (['map.compress_dim:=64', 'map.compress_basis:={tmp}/absent.ov3dmap'],
     "map.compress_basis '{tmp}/absent.ov3dmap': {tmp}/absent.ov3dmap: cannot read", False),
    # outside the parameters' ranges: the check's words for every one (rclpy refuses the first in its own)
    (['query.default_threshold:=1.5', 'map.pixel_stride:=0'], 'ov3d_mapping cannot start: map.pixel_stride must be '
     'a number in [1, 64], got 0; query.default_threshold must be a number in [0, 1], got 1.5\n', True),
    # a value of another type than its parameter's, from a params file; whole numbers for numbers (declared
    # before it) are taken
    (['map.max_depth_m:=4', 'keyframes.min_rotation_deg:=15', 'tick_rate_hz:=10', 'web_view.refresh_s:=soon'],
     "ov3d_mapping cannot start: web_view.refresh_s takes a number, got 'soon'\n", True),
    (['autosave_period_s:=2.0e6'],
     'ov3d_mapping cannot start: autosave_period_s must be 0 (off) or a period in [0.001, 1e6] s, got 2000000.0\n',
     False),
])
def test_start_up_failure_exits_non_zero_with_a_fatal_line(tmp_path, params, reason, lifecycle):
    params, reason = [p.format(tmp=tmp_path) for p in params], reason.format(tmp=tmp_path)
    with private_domain() as env:
        node = start_mapping_node(env, tmp_path / 'bad.log', params=params, lifecycle=lifecycle)
        try:
            rc = node.proc.wait(120)
        finally:
            node.stop()
    log = node.log()
    assert rc == 1, log
    assert '[FATAL]' in log and reason in log, log
    assert 'Traceback' not in log, log                  # the half-made node goes quietly


def test_the_node_process_switches_threads_every_half_millisecond():
    """spin() shortens the interpreter's switch interval for the node's callbacks (GIL_SWITCH_S), also when the
    node then fails to start."""
    import subprocess
    import sys
    code = ('import sys; from ov3d_ros.ros.mapping_node import GIL_SWITCH_S, spin\n'
            'def bad():\n    raise ValueError("no node here")\n'
            'assert sys.getswitchinterval() == 0.005\n'
            'print(spin(bad), sys.getswitchinterval(), GIL_SWITCH_S)\n')
    with private_domain() as env:
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    rc, interval, wanted = out.stdout.split()
    assert rc == '1' and float(interval) == float(wanted) == 0.0005, out.stdout
    assert 'cannot start: no node here' in out.stderr, out.stderr


def test_the_node_starts_from_a_compression_basis_file(tmp_path, start_node, room_mapper_factory):
    """map.compress_basis reaches the core: the node starts with the file's basis and says so."""
    room_mapper_factory(compress_dim=32).save(tmp_path / 'basis.ov3dmap')
    node, _ = start_node(['map.compress_dim:=32', 'map.compress_update:=false',
                          f'map.compress_basis:={tmp_path / "basis.ov3dmap"}'])
    assert f'features stored in 32 dims, starting from the basis of {tmp_path / "basis.ov3dmap"} (fixed)' \
        in node.log(), node.log()[-3000:]


def test_diagnostics_of_a_namespaced_node_name_its_namespace():
    """Two robots (or two nodes in their own namespaces) on one diagnostic aggregator: each entry names the node
    with its namespace, in the name and the hardware id (both said 'ov3d_mapping' and overwrote each other)."""
    from conftest import in_process_node
    with in_process_node(ros_args=['-r', '__ns:=/robot1']) as (node, client, pub):
        sent = []
        node.diag_pub.publish = sent.append
        node.publish_status()
        names = [s.name for s in sent[0].status]
        assert names == ['robot1/ov3d_mapping: mapping', 'robot1/ov3d_mapping: camera camera'], names
        assert {s.hardware_id for s in sent[0].status} == {'robot1/ov3d_mapping'}
