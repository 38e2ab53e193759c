"""Start the ov3d mapping node (and optionally the built-in scene player and RViz).

    ros2 launch ov3d_ros mapping.launch.py color_topic:=/camera/color/image_raw \\
        depth_topic:=/camera/aligned_depth_to_color/image_raw camera_info_topic:=/camera/color/camera_info \\
        features.pretrained:=/path/to/ViT-B-16.pt
    ros2 launch ov3d_ros mapping.launch.py play_scene:=true rviz:=true      # built-in scene, simulated features
"""
import json
import os
import tempfile

from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, Shutdown
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node


def generate_launch_description():
    share = get_package_share_directory('ov3d_ros')
    base = os.path.join(share, 'config', 'mapping.yaml')
    demo = os.path.join(share, 'config', 'demo.yaml')
    arg = LaunchConfiguration
    play = arg('play_scene')
    args = [
        DeclareLaunchArgument('config', default_value=base, description='Overlay parameter file (after mapping.yaml).'),
        DeclareLaunchArgument('play_scene', default_value='false',
                              description='Also play the built-in scene (uses config/demo.yaml: simulated features).'),
        DeclareLaunchArgument('rviz', default_value='false', description='Start RViz with config/ov3d.rviz.'),
        DeclareLaunchArgument('color_topic', default_value='color/image'),
        DeclareLaunchArgument('depth_topic', default_value='depth/image'),
        DeclareLaunchArgument('camera_info_topic', default_value='color/camera_info'),
        DeclareLaunchArgument('labels_topic', default_value='labels/image'),
        DeclareLaunchArgument('pose_topic', default_value='pose'),
        DeclareLaunchArgument('odom_topic', default_value='odom'),
        DeclareLaunchArgument('log_level', default_value='info'),
        DeclareLaunchArgument('features.pretrained', default_value='',
                              description='CLIP weights (checkpoint file or open_clip tag); empty: as in the '
                                          'parameter files.'),
    ]
    # The scene player gets the same remaps, so it publishes where the node listens.
    remaps = [('color/image', arg('color_topic')), ('depth/image', arg('depth_topic')),
              ('color/camera_info', arg('camera_info_topic')), ('labels/image', arg('labels_topic')),
              ('pose', arg('pose_topic')), ('odom', arg('odom_topic'))]

    def mapping_node(context):
        params = [base]
        overlay = demo if IfCondition(play).evaluate(context) else arg('config').perform(context)
        # rcl ignores later dotted overrides (-p, launch dicts) of a nested parameter that two files set, so no
        # file is passed twice and features.pretrained goes in as a nested YAML file, only when given.
        if os.path.realpath(overlay) != os.path.realpath(base):
            params.append(overlay)
        pretrained = arg('features.pretrained').perform(context).strip()
        if pretrained:
            with tempfile.NamedTemporaryFile('w', prefix='ov3d_params_', suffix='.yaml', delete=False) as f:
                json.dump({'/**': {'ros__parameters': {'features': {'pretrained': pretrained}}}}, f)  # JSON is YAML
            params.append(f.name)
        return [Node(package='ov3d_ros', executable='mapping_node', name='ov3d_mapping', output='screen',
                     parameters=params, remappings=remaps,
                     arguments=['--ros-args', '--log-level', arg('log_level')],
                     on_exit=Shutdown(reason='ov3d_mapping exited'))]    # also stops the scene player and RViz

    mapping = OpaqueFunction(function=mapping_node)
    player = Node(package='ov3d_ros', executable='scene_player', name='ov3d_scene_player', output='screen',
                  parameters=[{'loop': True}], remappings=remaps, condition=IfCondition(play))
    rviz = Node(package='rviz2', executable='rviz2', name='rviz2',
                arguments=['-d', os.path.join(share, 'config', 'ov3d.rviz')], condition=IfCondition(arg('rviz')))
    # RViz first: a missing rviz2 package then fails the launch before any process starts (else they are orphaned).
    return LaunchDescription(args + [rviz, mapping, player])
