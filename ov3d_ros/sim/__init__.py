"""Built-in procedural indoor scenes: labelled primitives, analytic ray casting, trajectories, ground truth."""
from ov3d_ros.sim.classes import CLASS_NAMES, class_id
from ov3d_ros.sim.gt import sample_gt_points
from ov3d_ros.sim.render import RenderedFrame, render
from ov3d_ros.sim.scene import Primitive, Scene, builtin_scene
from ov3d_ros.sim.trajectory import builtin_trajectory, default_camera, look_at

__all__ = ['CLASS_NAMES', 'class_id', 'sample_gt_points', 'RenderedFrame', 'render', 'Primitive', 'Scene',
           'builtin_scene', 'builtin_trajectory', 'default_camera', 'look_at']
