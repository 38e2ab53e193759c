"""Start the ov3d mapping node (and optionally the built-in scene player and RViz).

    ros2 launch ov3d_ros mapping.launch.py \\
        color_topic:=/camera/camera/color/image_raw camera_info_topic:=/camera/camera/color/camera_info \\
        depth_topic:=/camera/camera/aligned_depth_to_color/image_raw features.pretrained:=/path/to/ViT-B-16.pt
    ros2 launch ov3d_ros mapping.launch.py play_scene:=true rviz:=true      # built-in scene, simulated features

Parameters: config/mapping.yaml, then config/demo.yaml when play_scene is true, then the ``config`` overlay, then
the launch arguments map_frame, pose_source, use_sim_time and features.pretrained (when given). The files are
merged here and every parameter reaches the node as one ``-p`` rule: rcl ignores a later ``-p`` override of a
nested parameter that two parameter files set, and launch_ros would write a dict of parameters to a temporary
file that is never removed. When the mapping node exits with an error before the launch is shut down, the launch
fails (``ros2 launch`` exits non-zero) after stopping the other processes.
"""
import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node
from launch_ros.descriptions import Parameter

NODE_NAME = 'ov3d_mapping'


def read_parameters(path: str, namespace: str = '') -> dict:
    """The ``ros__parameters`` of the entries of a ROS parameter file that apply to the mapping node ('/**',
    its name, or its namespaced name), merged in file order."""
    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    if not isinstance(doc, dict):
        raise RuntimeError(f'{path}: not a ROS parameter file (expected a mapping at the top level)')
    ns = '/' + namespace.strip('/') if namespace.strip('/') else ''
    names = {'/**', NODE_NAME, '/' + NODE_NAME, f'{ns}/{NODE_NAME}', f'/**/{NODE_NAME}'}
    out = {}
    for key, entry in doc.items():
        if key in names and isinstance(entry, dict) and isinstance(entry.get('ros__parameters'), dict):
            merge(out, entry['ros__parameters'])
    return out


def merge(base: dict, overlay: dict) -> dict:
    """``overlay`` merged into ``base`` (nested dicts merged key by key; other values replaced)."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


def flatten(params: dict, prefix: str = '') -> dict:
    """{'features': {'pretrained': x}} → {'features.pretrained': x}."""
    out = {}
    for key, value in params.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            out.update(flatten(value, name + '.'))
        else:
            out[name] = value
    return out


def generate_launch_description():
    share = get_package_share_directory('ov3d_ros')
    base = os.path.join(share, 'config', 'mapping.yaml')
    demo = os.path.join(share, 'config', 'demo.yaml')
    arg = LaunchConfiguration
    play = arg('play_scene')
    args = [
        DeclareLaunchArgument('config', default_value='',
                              description='Overlay parameter file, applied after mapping.yaml (and demo.yaml).'),
        DeclareLaunchArgument('play_scene', default_value='false',
                              description='Also play the built-in scene (adds config/demo.yaml: simulated features).'),
        DeclareLaunchArgument('rviz', default_value='false', description='Start RViz with config/ov3d.rviz.'),
        DeclareLaunchArgument('namespace', default_value='', description='Namespace of every node started here.'),
        DeclareLaunchArgument('use_sim_time', default_value='false', description='Use /clock (bags, simulators).'),
        DeclareLaunchArgument('map_frame', default_value='', description='Fixed frame; empty: as in the files.'),
        DeclareLaunchArgument('pose_source', default_value='',
                              description="tf | pose | odometry; empty: as in the files."),
        DeclareLaunchArgument('color_topic', default_value='color/image'),
        DeclareLaunchArgument('depth_topic', default_value='depth/image'),
        DeclareLaunchArgument('camera_info_topic', default_value='color/camera_info'),
        DeclareLaunchArgument('labels_topic', default_value='labels/image'),
        DeclareLaunchArgument('pose_topic', default_value='pose'),
        DeclareLaunchArgument('odom_topic', default_value='odom'),
        DeclareLaunchArgument('log_level', default_value='info'),
        DeclareLaunchArgument('features.pretrained', default_value='',
                              description='CLIP weights (checkpoint file or open_clip tag); empty: as in the files.'),
    ]
    # The scene player gets the same remaps, so it publishes where the node listens.
    remaps = [('color/image', arg('color_topic')), ('depth/image', arg('depth_topic')),
              ('color/camera_info', arg('camera_info_topic')), ('labels/image', arg('labels_topic')),
              ('pose', arg('pose_topic')), ('odom', arg('odom_topic'))]

    def on_mapping_exit(event, context):
        """Stop everything; an error exit of the node before shutdown fails the launch (non-zero exit)."""
        if event.returncode != 0 and not context.is_shutdown:
            raise RuntimeError(f'{NODE_NAME} exited with code {event.returncode} (its log above says why)')
        return [Shutdown(reason=f'{NODE_NAME} exited')]    # also stops the scene player and RViz

    def mapping_node(context):
        namespace = arg('namespace').perform(context)
        files = [base] + ([demo] if IfCondition(play).evaluate(context) else [])
        overlay = arg('config').perform(context).strip()
        if overlay:
            if not os.path.isfile(overlay):
                raise RuntimeError(f'config:={overlay}: no such parameter file')
            files.append(overlay)
        params = {}
        for path in files:
            merge(params, read_parameters(path, namespace))
        params = flatten(params)
        for name in ('map_frame', 'pose_source', 'features.pretrained'):
            value = arg(name).perform(context).strip()
            if value:
                params[name] = value
        params['use_sim_time'] = IfCondition(arg('use_sim_time')).evaluate(context)
        # an empty list has no type for rcl, which drops it: query.templates [] (the bare text) is passed as the
        # template '{}', which means the same; labels.vocabulary [] is the node's default; any other is refused
        # here (the node would have started on its default without a word)
        empty = sorted(k for k, v in params.items() if isinstance(v, list) and not v)
        if 'query.templates' in empty:
            params['query.templates'] = ['{}']
        unsupported = [k for k in empty if k not in ('query.templates', 'labels.vocabulary')]
        if unsupported:
            raise RuntimeError(f'{", ".join(unsupported)}: an empty list cannot be passed to a ROS node (rcl drops '
                               'it and the node would use its default); give at least one value')
        rules = [Parameter(k, v) for k, v in params.items() if not (isinstance(v, list) and not v)]
        nodes = []
        if IfCondition(arg('rviz')).evaluate(context):   # first: a missing rviz2 then fails before any process starts
            nodes.append(Node(package='rviz2', executable='rviz2', name='rviz2', namespace=namespace,
                              arguments=['-d', os.path.join(share, 'config', 'ov3d.rviz'),
                                         '-f', params.get('map_frame', 'map').lstrip('/')]))
        # on Ctrl-C the node waits for its running callbacks (up to 30 s) and saves unsaved changes with autosave
        # on, and Python then takes seconds to free a large map: launch's default 5 s before SIGTERM killed it
        # after every normal shutdown (5.4 s for the built-in scene)
        nodes.append(Node(package='ov3d_ros', executable='ov3d_mapping_node', name=NODE_NAME, namespace=namespace,
                          output='screen', parameters=rules, remappings=remaps,
                          ros_arguments=['--log-level', arg('log_level')], on_exit=on_mapping_exit,
                          sigterm_timeout='45'))
        if IfCondition(play).evaluate(context):   # the player stamps and frames its poses like the node expects
            nodes.append(Node(package='ov3d_ros', executable='ov3d_scene_player', name='ov3d_scene_player',
                              namespace=namespace, output='screen', remappings=remaps,
                              parameters=[Parameter('loop', True), Parameter('use_sim_time', params['use_sim_time']),
                                          Parameter('map_frame', params.get('map_frame', 'map'))]))
        return nodes

    # RViz, when asked for, comes first in mapping_node's list: a missing rviz2 package then fails the launch before
    # any process starts (else they are orphaned). Its fixed frame is the node's map_frame (-f), its topics are
    # relative (config/ov3d.rviz), so both follow map_frame:= and namespace:=.
    return LaunchDescription(args + [OpaqueFunction(function=mapping_node)])
