"""pip install of the ov3d_ros Python package (offline tools and nodes without colcon).

ROS workspaces build this repository with colcon (ament_cmake, see CMakeLists.txt), which also generates the
SegmentByText service; `make setup` does the same into a virtual environment.
"""
from glob import glob

from setuptools import find_packages, setup

setup(
    name='ov3d_ros',
    version='0.1.0',
    description='Open-vocabulary 3D semantic mapping for ROS 2',
    license='Apache-2.0',
    packages=find_packages(include=('ov3d_ros', 'ov3d_ros.*')),
    package_data={'ov3d_ros': ['models/*.safetensors', 'models/*.md']},
    python_requires='>=3.10',
    # open_clip pinned: the dense CLIP path reads its nn.MultiheadAttention blocks, which later releases replace
    install_requires=['numpy', 'scipy', 'pillow', 'pyyaml', 'torch', 'open_clip_torch==3.3.0', 'transforms3d',
                      'safetensors', 'tqdm', 'rosbags'],
    extras_require={'batch': ['ray'], 'view': ['viser']},      # ov3d map/eval on Ray; ov3d view
    data_files=[('share/ov3d_ros', ['package.xml']),
                ('share/ov3d_ros/launch', glob('launch/*.py')),
                ('share/ov3d_ros/config', glob('config/*'))],
    entry_points={'console_scripts': [
        'ov3d_mapping_node = ov3d_ros.ros.mapping_node:main',
        'ov3d_lifecycle_mapping_node = ov3d_ros.ros.lifecycle_mapping_node:main',
        'ov3d_scene_player = ov3d_ros.ros.scene_player:main',
        'ov3d_demo = ov3d_ros.tools.demo:main',
        'ov3d = ov3d_ros.cli.main:main',
    ]},
)
