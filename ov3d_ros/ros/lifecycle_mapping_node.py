"""The mapping node as a managed (lifecycle) node, for Nav2's lifecycle manager or any lifecycle client.

Same parameters, topics and services as ``mapping_node`` (shared code: :class:`MappingInterface`), created in
steps: every parameter (and the parameter services) at start, so they answer while the model loads; unconfigured,
the node takes a set of any of them (checked as it is set) and configures with them; ``configure`` loads the
feature model and makes the map, the services and publishers, and makes the parameters that cannot change while
the node runs read-only; ``activate`` subscribes to the inputs and starts the timers; ``deactivate`` stops them
(the map and its services stay); ``cleanup`` releases the map and the model (with ``autosave_period_s`` on, after
saving its changes since the last autosave to ``map_path``; so does ``shutdown`` and a Ctrl-C or SIGTERM of a
configured node) and makes every parameter writable again, for the next configure.
A configure that fails (missing weights, bad parameters) answers FAILURE with the reason in the log and leaves the
node unconfigured.

    python -m ov3d_ros.ros.lifecycle_mapping_node --ros-args --params-file config/mapping.yaml
    ros2 lifecycle set /ov3d_mapping configure && ros2 lifecycle set /ov3d_mapping activate
"""
from __future__ import annotations

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.lifecycle import LifecycleNodeMixin, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node

from ov3d_ros.ros.mapping_node import MappingInterface, spin
from ov3d_ros.ros.params import mark_writable


class LifecycleMappingNode(MappingInterface, LifecycleNodeMixin, Node):
    """``ov3d_mapping`` as a lifecycle node (starts unconfigured). Built like rclpy's LifecycleNode, with the
    lifecycle services in their own callback group so that parameter services answer while configure loads the
    model (rclpy 9.1's LifecycleNode passes ``callback_group`` on to Node, which refuses it)."""

    def __init__(self, **kwargs):
        Node.__init__(self, 'ov3d_mapping', **kwargs)
        LifecycleNodeMixin.__init__(self, callback_group=MutuallyExclusiveCallbackGroup())
        self._declare_parameters()
        mark_writable(self)                # unconfigured: every parameter takes a set; configure reads them

    def _step(self, name: str, fn) -> TransitionCallbackReturn:
        try:
            fn()
        except Exception as e:      # the reason goes to the log; the lifecycle client sees FAILURE
            self.get_logger().error(f'{name} failed: {type(e).__name__}: {e}' if not isinstance(e, ValueError)
                                    else f'{name} failed: {e}')
            return TransitionCallbackReturn.FAILURE
        self.get_logger().info(f'{name}: done')
        return TransitionCallbackReturn.SUCCESS

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._step('configure', self._configure)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = self._step('activate', self._activate)
        return super().on_activate(state) if result == TransitionCallbackReturn.SUCCESS else result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = self._step('deactivate', self._deactivate)
        return super().on_deactivate(state) if result == TransitionCallbackReturn.SUCCESS else result

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        return self._step('cleanup', self._cleanup)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        if self._mapping_active:
            self._deactivate()
        if self.mapper is not None:
            self._cleanup('shutdown')              # autosave on: unsaved changes saved first
        return TransitionCallbackReturn.SUCCESS


def main(args=None) -> int:
    return spin(LifecycleMappingNode, args)


if __name__ == '__main__':
    raise SystemExit(main())
