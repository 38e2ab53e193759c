"""Camera trajectories through a scene (poses T_W_C of the optical frame: x right, y down, z forward)."""
from __future__ import annotations

from typing import List

import numpy as np

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.sim.scene import Scene


def default_camera(width: int = 640, height: int = 480, hfov_deg: float = 60.0) -> PinholeCamera:
    """A pinhole camera with the given horizontal field of view and square pixels."""
    f = (width / 2.0) / np.tan(np.radians(hfov_deg) / 2.0)
    return PinholeCamera(f, f, (width - 1) / 2.0, (height - 1) / 2.0, width, height)


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> np.ndarray:
    """(4, 4) T_W_C of a camera at ``eye`` looking at ``target`` with world ``up`` pointing up in the image."""
    eye, target, up = (np.asarray(v, dtype=np.float64) for v in (eye, target, up))
    z = target - eye
    z /= np.linalg.norm(z)
    x = np.cross(z, up)
    if np.linalg.norm(x) < 1e-9:
        raise ValueError('viewing direction is parallel to up')
    x /= np.linalg.norm(x)
    y = np.cross(z, x)
    T = np.eye(4)
    T[:3, :3] = np.stack([x, y, z], axis=1)
    T[:3, 3] = eye
    return T


def builtin_trajectory(scene: Scene, n_frames: int = 60, seed: int = 0) -> List[np.ndarray]:
    """A handheld-like scan: one smooth loop (ellipse) through the free middle of the room, looking across it.

    Returns ``n_frames`` (4, 4) float64 T_W_C (optical frame). The camera is 1.3–1.5 m high and looks across the
    room's centre (heading swaying ±12°) at the far walls and furniture, pitching between −28° and 0° three times
    per loop, so floor, furniture, wall decorations and ceiling are each seen from many positions. With the built-in
    room and 60 frames, steps are ~9–11 cm and turns 3–10°. ``seed`` sets the start point and the sway phases.
    """
    if n_frames < 1:
        raise ValueError('n_frames must be >= 1')
    rng = np.random.default_rng(seed)
    size = scene.room_max - scene.room_min
    centre = scene.room_min[:2] + np.array([0.47, 0.48]) * size[:2]
    radii = np.array([size[0] / 6.0, size[1] / 6.25])
    phase, phase_pitch = rng.uniform(0, 2 * np.pi, 2)
    poses = []
    for k in range(n_frames):
        a = phase + 2 * np.pi * k / n_frames
        eye = np.array([centre[0] + radii[0] * np.cos(a), centre[1] + radii[1] * np.sin(a),
                        1.4 + 0.1 * np.sin(3 * a)])
        heading = a + np.pi + np.radians(12.0) * np.sin(2 * a + phase)
        pitch = np.radians(-14.0 + 14.0 * np.sin(3 * a + phase_pitch))
        target = eye + np.array([np.cos(pitch) * np.cos(heading), np.cos(pitch) * np.sin(heading), np.sin(pitch)])
        poses.append(look_at(eye, target))
    return poses
