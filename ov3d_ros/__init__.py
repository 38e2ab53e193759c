"""ov3d_ros: open-vocabulary 3D semantic mapping for ROS 2.

``ov3d_ros.core`` is ROS-free (torch + numpy); ``ov3d_ros.ros`` holds the nodes. The generated service
module ``ov3d_ros.srv`` may be installed in another prefix (rosidl output), so the package path is extended
over every ``ov3d_ros`` directory on ``sys.path``.
"""
__path__ = __import__('pkgutil').extend_path(__path__, __name__)

__version__ = '0.1.0'
