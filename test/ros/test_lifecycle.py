"""The managed (lifecycle) mapping node over real ROS 2: configure → activate → map → deactivate → cleanup →
configure again, driven through its lifecycle services from this process."""
import contextlib
import time

import pytest

from lifecycle_msgs.msg import State, Transition
from lifecycle_msgs.srv import ChangeState, GetState
from rclpy.parameter import parameter_value_to_python
from rclpy.parameter_client import AsyncParameterClient

from ov3d_ros.tools.demo_client import DemoClient
from ov3d_ros.tools.ros_graph import start_mapping_node, start_scene_player

from conftest import private_domain


@contextlib.contextmanager
def lifecycle_node(**overrides):
    """An unconfigured LifecycleMappingNode in this process (simulated features, poses from the pose topic) with
    parameter ``overrides``, on a private domain; shut down and destroyed afterwards."""
    import rclpy
    from rclpy.parameter import Parameter
    from ov3d_ros.ros.lifecycle_mapping_node import LifecycleMappingNode
    params = {'features.source': 'simulated', 'pose_source': 'pose', **overrides}
    with private_domain():
        ctx = rclpy.Context()
        rclpy.init(context=ctx)
        node = None
        try:
            node = LifecycleMappingNode(context=ctx, parameter_overrides=[Parameter(k, value=v)
                                                                          for k, v in params.items()])
            yield node
        finally:
            if node is not None:
                node.on_shutdown(None)
                node.destroy_node()
            rclpy.shutdown(context=ctx)


def state(client) -> int:
    return client.call(GetState, '/ov3d_mapping/get_state', GetState.Request()).current_state.id


def change(client, transition: int) -> bool:
    return client.call(ChangeState, '/ov3d_mapping/change_state',
                       ChangeState.Request(transition=Transition(id=transition)), timeout_s=180.0).success


def test_lifecycle_transitions_over_ros(tmp_path):
    with private_domain() as env:
        node = start_mapping_node(env, tmp_path / 'node.log', lifecycle=True)
        client = DemoClient()
        player = None
        try:
            assert state(client) == State.PRIMARY_STATE_UNCONFIGURED, node.log()
            assert not client.client.wait_for_service(timeout_sec=1.0)      # no segment_by_text before configure
            params = AsyncParameterClient(client.node, '/ov3d_mapping')
            assert params.wait_for_services(30.0)
            # configure loads the model; parameter services are in another callback group and keep answering
            configure = client.node.create_client(ChangeState, '/ov3d_mapping/change_state')
            assert configure.wait_for_service(timeout_sec=30.0)
            pending = configure.call_async(ChangeState.Request(transition=Transition(
                id=Transition.TRANSITION_CONFIGURE)))
            got = params.get_parameters(['features.source'])
            client.executor.spin_until_future_complete(got, timeout_sec=60.0)
            assert parameter_value_to_python(got.result().values[0]) == 'simulated'
            client.executor.spin_until_future_complete(pending, timeout_sec=180.0)
            assert pending.result() is not None and pending.result().success, node.log()[-3000:]
            assert state(client) == State.PRIMARY_STATE_INACTIVE
            assert client.wait_for_service(node, 30.0)
            r = client.query('sofa')
            assert not r['success'] and 'empty' in r['message']

            assert change(client, Transition.TRANSITION_ACTIVATE) and state(client) == State.PRIMARY_STATE_ACTIVE
            player = start_scene_player(env, tmp_path / 'player.log', ['n_frames:=200', 'rate_hz:=6.0',
                                                                       'width:=320', 'height:=240', 'loop:=true'])
            end = time.monotonic() + 180
            while time.monotonic() < end and not (client.status and client.status['keyframes'] >= 4):
                client.spin(0.3)
            assert client.status and client.status['keyframes'] >= 4, (client.status, node.log()[-3000:])

            assert change(client, Transition.TRANSITION_DEACTIVATE) and state(client) == State.PRIMARY_STATE_INACTIVE
            mapped = client.query('sofa', threshold=0.3)
            assert mapped['success'], mapped['message']                   # the map stays while inactive
            client.status = None
            client.spin(3.0)
            assert client.status is None                                   # no timers: no status while inactive

            assert change(client, Transition.TRANSITION_CLEANUP) and state(client) == State.PRIMARY_STATE_UNCONFIGURED
            assert 'cleanup: done' in node.log()
            # configured again from scratch: an empty map
            assert change(client, Transition.TRANSITION_CONFIGURE), node.log()[-3000:]
            r = client.query('sofa')
            assert not r['success'] and 'empty' in r['message'], r['message']
            assert node.alive()
        finally:
            if player is not None:
                player.stop()
            client.close()
            rc = node.stop(60.0)
        assert rc == 0 and 'Traceback' not in node.log(), node.log()[-3000:]


def test_transitions_under_a_stream_never_fail_a_callback(tmp_path):
    """Activate / deactivate (and cleanup / configure) in quick succession while a player streams at 30 Hz: the
    entities a transition removes go between two executor waits, so no callback fails on one of them (destroyed
    in the transition, 2 of 24 cycles did: "cannot use Destroyable because destruction was requested")."""
    with private_domain() as env:
        node = start_mapping_node(env, tmp_path / 'node.log', lifecycle=True)
        client = DemoClient()
        player = start_scene_player(env, tmp_path / 'player.log', ['n_frames:=60', 'rate_hz:=30.0', 'width:=320',
                                                                   'height:=240', 'loop:=true'])
        try:
            assert client.node.create_client(ChangeState, '/ov3d_mapping/change_state').wait_for_service(60.0)
            assert change(client, Transition.TRANSITION_CONFIGURE), node.log()[-3000:]
            for i in range(12):
                assert change(client, Transition.TRANSITION_ACTIVATE), node.log()[-3000:]
                client.spin(0.3 + 0.2 * (i % 3))
                assert change(client, Transition.TRANSITION_DEACTIVATE), node.log()[-3000:]
                if i % 4 == 3:
                    assert change(client, Transition.TRANSITION_CLEANUP), node.log()[-3000:]
                    assert change(client, Transition.TRANSITION_CONFIGURE), node.log()[-3000:]
            assert state(client) == State.PRIMARY_STATE_INACTIVE and node.alive()
        finally:
            player.stop()
            client.close()
            rc = node.stop(60.0)
        log = node.log()
        assert log.count('deactivate: done') == 12 and log.count('cleanup: done') == 3, log[-3000:]
        assert rc == 0 and 'a callback failed' not in log and 'Destroyable' not in log, log[-3000:]


def test_parameters_set_before_configure_are_used_and_during_it_refused(monkeypatch):
    """Values set while the node is unconfigured are those it configures with (the node's own ones too: the
    timers' rates, the backlog bound); one set while configure loads the model is refused with the reason,
    never accepted and lost."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from ov3d_ros.ros import mapping_node
    with lifecycle_node() as node:
        set_early = node.set_parameters([Parameter('tick_rate_hz', value=5.0),
                                         Parameter('max_pending_keyframes', value=3),
                                         Parameter('map_publish_rate_hz', value=2.0),
                                         Parameter('query.default_threshold', value=0.7)])
        assert all(r.successful for r in set_early)
        during = []
        create = mapping_node.create_extractor

        def create_and_set(*args, **kwargs):       # a `ros2 param set` arriving while the model loads
            during.append(node.set_parameters([Parameter('query.default_threshold', value=0.3)])[0])
            return create(*args, **kwargs)
        monkeypatch.setattr(mapping_node, 'create_extractor', create_and_set)
        assert node.on_configure(None) == TransitionCallbackReturn.SUCCESS
        assert (node.tick_rate_hz, node.max_pending_keyframes, node.map_publish_rate_hz) == (5.0, 3, 2.0)
        [refused] = during
        assert not refused.successful and 'being configured' in refused.reason
        assert node.mapper.cfg.query.default_threshold == node.get_parameter('query.default_threshold').value \
            == 0.7
        r = node.set_parameters([Parameter('query.default_threshold', value=0.3)])[0]     # configured: applied
        assert r.successful and node.mapper.cfg.query.default_threshold == 0.3

        def cleaned_up_meanwhile(new):            # a cleanup on another thread took the map mid-way
            node.mapper = None
            raise AttributeError("'NoneType' object has no attribute 'cfg'")
        monkeypatch.setattr(node, '_apply', cleaned_up_meanwhile)
        r = node.set_parameters([Parameter('query.default_threshold', value=0.4)])[0]
        assert r.successful and node.get_parameter('query.default_threshold').value == 0.4   # read at configure


def test_publishers_and_services_are_destroyed_only_when_no_callback_runs():
    """What a lifecycle transition removes goes between two executor waits; publishers, services and clients, which
    a callback running on another thread may still use (publish, answer a request), wait until none runs."""
    import rclpy
    from std_msgs.msg import String
    from std_srvs.srv import Trigger
    from ov3d_ros.ros.lifecycle_mapping_node import LifecycleMappingNode
    with private_domain():
        ctx = rclpy.Context()
        rclpy.init(context=ctx)
        node = None
        try:
            node = LifecycleMappingNode(context=ctx)
            made = [node.create_timer(1.0, lambda: None), node.create_subscription(String, 'x', lambda m: None, 1),
                    node.create_publisher(String, 'y', 1), node.create_service(Trigger, 'z', lambda q, r: r),
                    node.create_client(Trigger, 'w')]
            alive = lambda: [any(e is o for o in (*node.timers, *node.subscriptions, *node.publishers,
                                                  *node.services, *node.clients)) for e in made]
            assert alive() == [True] * 5
            for e in made:
                node.destroy_soon(e)
            node.destroy_doomed(busy=True)
            assert alive() == [False, False, True, True, True]
            node.destroy_doomed(busy=True)
            assert alive() == [False, False, True, True, True]
            node.destroy_doomed()
            assert alive() == [False] * 5
        finally:
            if node is not None:
                node.destroy_node()
            rclpy.shutdown(context=ctx)


@pytest.mark.parametrize('name, value', [('autosave_period_s', -5.0), ('label_publish_rate_hz', 5000.0)])
def test_a_bad_value_of_a_persistence_or_label_volume_parameter_stops_the_node_at_start(name, value):
    """The persistence and label-volume parameters are declared and checked at start with every other: a bad
    override stops the node with the reason, as a bad tick_rate_hz does (declared at configure, they failed every
    configure, and a configure again took the declared value unchecked: timers of 5 000 Hz, autosave silently
    off)."""
    with pytest.raises(ValueError, match=f'{name} must be 0 \\(off\\) or a'):
        with lifecycle_node(**{name: value}):
            pass


def test_every_parameter_is_set_while_unconfigured_read_only_while_configured_and_set_again_after_cleanup(tmp_path):
    """Unconfigured, the node takes a set of any parameter, checked as it is set, and configures with it (map_path,
    autosave_period_s and label_publish_rate_hz were declared only at configure: a set raised
    ParameterNotDeclaredException; map_frame, map.voxel_size_m and objects.min_voxels were refused as read-only).
    Configured, those are read-only with the reason; after cleanup they take a set again, and the next configure
    uses it."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter
    from ov3d_ros.ros.params import read_only_reason

    def set_all(node, values):
        return [(r.successful, r.reason) for r in node.set_parameters([Parameter(k, value=v)
                                                                          for k, v in values.items()])]

    def runs_with(node, values):
        cfg = node.mapper.cfg
        return ((node.map_frame, node.objects.map_frame, cfg.map.voxel_size_m, cfg.objects.min_voxels,
                 node.persistence.map_path, node.persistence.autosave_period_s,
                 any(t.timer_period_ns == round(1e9 / values['label_publish_rate_hz']) for t in node.timers))
                == (values['map_frame'], values['map_frame'], values['map.voxel_size_m'],
                    values['objects.min_voxels'], values['map_path'], values['autosave_period_s'], True))

    first = {'map_path': str(tmp_path / 'a.ov3dmap'), 'autosave_period_s': 30.0, 'map.voxel_size_m': 0.1,
             'map_frame': 'odom', 'objects.min_voxels': 2, 'label_publish_rate_hz': 2.0}
    second = {'map_path': str(tmp_path / 'b.ov3dmap'), 'autosave_period_s': 60.0, 'map.voxel_size_m': 0.2,
              'map_frame': 'world', 'objects.min_voxels': 3, 'label_publish_rate_hz': 4.0}
    with lifecycle_node() as node:
        assert set_all(node, first) == [(True, '')] * len(first)
        # checked as they are set, with the checks of a start or configure
        for name, value, words in [('map.voxel_size_m', -1.0, 'map.voxel_size_m must be a finite number > 0'),
                                   ('map_frame', '/', 'map_frame must be a frame id'),
                                   ('autosave_period_s', -5.0, 'autosave_period_s must be 0 (off) or a period'),
                                   ('objects.min_voxels', 0, 'objects.min_voxels must be'),
                                   ('cameras', ['a', 'a'], 'cameras must be a list of distinct namespaces')]:
            [(ok, reason)] = set_all(node, {name: value})
            assert not ok and words in reason, (name, reason)
        assert node.on_configure(None) == TransitionCallbackReturn.SUCCESS
        assert runs_with(node, first)
        # configured: read-only, with the reason; the node runs on with the values it configured with
        for (ok, reason), name in zip(set_all(node, second), second):
            desc = node.describe_parameter(name)
            assert not ok and 'read-only' in reason and desc.read_only, (name, reason)
            assert desc.description.endswith(f'[read-only: {read_only_reason(name)}]'), desc.description
            assert node.get_parameter(name).value == first[name]
        assert node.set_parameters([Parameter('query.default_threshold', value=0.6)])[0].successful   # live
        assert runs_with(node, first)

        assert node.on_cleanup(None) == TransitionCallbackReturn.SUCCESS
        assert not node.describe_parameter('map.voxel_size_m').read_only
        assert '[read-only' not in node.describe_parameter('map.voxel_size_m').description
        assert set_all(node, second) == [(True, '')] * len(second)
        [(ok, reason)] = set_all(node, {'map.voxel_size_m': 0.0})
        assert not ok and 'map.voxel_size_m must be a finite number > 0' in reason
        assert node.on_configure(None) == TransitionCallbackReturn.SUCCESS
        assert runs_with(node, second)
        assert not set_all(node, first)[0][0]                        # read-only again


def test_cleanup_and_shutdown_save_the_changes_autosave_has_not_saved_yet(tmp_path, wall_frame):
    """autosave on: a lifecycle cleanup or shutdown saves the map to map_path when it changed since the last save
    (the changes since the last autosave period were lost), and writes nothing when it did not."""
    from rclpy.lifecycle import TransitionCallbackReturn
    from ov3d_ros.core.map_io import load_map
    path = tmp_path / 'map.ov3dmap'
    with lifecycle_node(map_path=str(path), autosave_period_s=600.0) as node:
        assert node.on_configure(None) == TransitionCallbackReturn.SUCCESS
        assert node.on_cleanup(None) == TransitionCallbackReturn.SUCCESS
        assert not path.exists()                                  # an unchanged (empty) map is not saved
        for step in (node.on_cleanup, node.on_shutdown):
            assert node.on_configure(None) == TransitionCallbackReturn.SUCCESS
            node._integrate([(node.cameras[0], wall_frame(1.0))])
            voxels = node.mapper.map.size
            assert step(None) == TransitionCallbackReturn.SUCCESS and node.mapper is None
            assert load_map(path)[0].size == voxels > 0, step.__name__
            path.unlink()
