"""Camera trajectories through a scene (poses T_W_C of the optical frame: x right, y down, z forward).

``builtin_trajectory`` scans the built-in room; ``scan_trajectory`` finds the free middle of any scene from its
primitives and scans it with a handheld-like or a robot-like camera.
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.sim.scene import Scene

STYLES = ('handheld', 'robot')
CLEARANCE_M = 0.25          # scan_trajectory keeps every camera centre at least this far from every primitive AABB


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


def _rotvec(v) -> np.ndarray:
    """(3, 3) rotation of the axis-angle vector ``v`` (radians)."""
    v = np.asarray(v, dtype=np.float64)
    a = np.linalg.norm(v)
    if a < 1e-12:
        return np.eye(3)
    k = v / a
    K = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(a) * K + (1 - np.cos(a)) * K @ K


def _prim_boxes(scene: Scene) -> Tuple[np.ndarray, np.ndarray]:
    b = [p.bounds() for p in scene.primitives]
    if not b:
        return np.zeros((0, 3)), np.zeros((0, 3))
    return np.array([lo for lo, _ in b]), np.array([hi for _, hi in b])


def _box_distance(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """(N,) distance of each point (N, 3) to the nearest AABB (M boxes)."""
    if len(lo) == 0:
        return np.full(len(points), np.inf)
    gap = np.maximum(np.maximum(lo[None] - points[:, None], points[:, None] - hi[None]), 0.0)
    return np.linalg.norm(gap, axis=2).min(axis=1)


class _FreeLoop:
    """A closed elliptic loop through the free floor of a scene (walls and furniture of any height are obstacles).

    Free floor is where the 2D distance to every primitive AABB that reaches above the floor and below
    ``z_top + 0.3`` (and to the room's sides) is at least ``need``. Candidate centres on a 0.25 m grid, orientations
    and axis ratios ``ratios`` (not too small, so the path never turns sharply) are tried; each ellipse is grown
    until it leaves the part of the free floor that is visible from its centre, then scaled by ``frac`` and capped at
    ``cap`` times the room size. The longest loop wins (ties: nearest the centroid of the free floor).
    """

    RES = 0.05

    def __init__(self, scene: Scene, z_top: float, frac: float, cap: float, ratios=(1.0, 0.8, 0.6),
                 need: float = 0.42):
        lo, hi = _prim_boxes(scene)
        sel = (hi[:, 2] > 0.02) & (lo[:, 2] < z_top + 0.3)
        lo, hi = lo[sel], hi[sel]
        rmin, rmax = scene.room_min[:2], scene.room_max[:2]
        xs = np.arange(rmin[0] + self.RES / 2, rmax[0], self.RES)
        ys = np.arange(rmin[1] + self.RES / 2, rmax[1], self.RES)
        dist = np.minimum(np.minimum(xs - rmin[0], rmax[0] - xs)[:, None], np.minimum(ys - rmin[1], rmax[1] - ys)[None])
        for l, h in zip(lo, hi):
            dx = np.maximum(np.maximum(l[0] - xs, xs - h[0]), 0.0)
            dy = np.maximum(np.maximum(l[1] - ys, ys - h[1]), 0.0)
            dist = np.minimum(dist, np.hypot(dx[:, None], dy[None]))
        free = dist >= need
        if not free.any():
            raise ValueError(f'scene {scene.name!r} has no free floor for a camera trajectory')
        gx, gy = np.meshgrid(xs, ys, indexing='ij')
        centroid = np.array([gx[free].mean(), gy[free].mean()])
        step = max(1, int(round(0.25 / self.RES)))
        ci, cj = np.nonzero(dist[::step, ::step] >= need + 0.1)
        if len(ci) == 0:
            ci, cj = np.unravel_index([np.argmax(dist)], dist.shape)
        else:
            ci, cj = ci * step, cj * step
        centres = np.stack([xs[ci], ys[cj]], 1)
        phi = np.linspace(0.0, 2 * np.pi, 120, endpoint=False)
        dirs = np.stack([np.cos(phi), np.sin(phi)], 1)
        size = rmax - rmin
        steps = np.arange(0.0, cap * float(size.max()) / frac + 2 * self.RES, self.RES / 2)   # no use looking further
        t = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
        rho = np.empty((len(centres), len(phi)))
        for i0 in range(0, len(centres), 64):                                         # free distance per ray
            pts = centres[i0:i0 + 64, None, None] + steps[None, None, :, None] * dirs[None, :, None]   # (C, 120, S, 2)
            ix = np.clip(np.round((pts[..., 0] - xs[0]) / self.RES).astype(int), 0, len(xs) - 1)
            iy = np.clip(np.round((pts[..., 1] - ys[0]) / self.RES).astype(int), 0, len(ys) - 1)
            ok = np.all((pts >= rmin) & (pts <= rmax), axis=-1) & free[ix, iy]
            first_bad = np.where(ok.all(-1), len(steps), np.argmin(ok, axis=-1))
            rho[i0:i0 + 64] = steps[np.maximum(first_bad - 1, 0)]
        rho = np.minimum(rho, np.roll(rho, 1, axis=1))                                # between rays: the lesser
        off = np.linalg.norm(centres - centroid, axis=1)
        best = None
        for theta in np.radians([0, 30, 60, 90, 120, 150]):
            u, v = np.array([np.cos(theta), np.sin(theta)]), np.array([-np.sin(theta), np.cos(theta)])
            a_cap = float(1.0 / np.hypot(u[0] / (cap * size[0]), u[1] / (cap * size[1])))
            for q in ratios:
                e = np.cos(t)[:, None] * u + q * np.sin(t)[:, None] * v              # unit-size ellipse points
                k0 = np.floor(np.mod(np.arctan2(e[:, 1], e[:, 0]), 2 * np.pi) / (2 * np.pi) * len(phi)).astype(int)
                k0 %= len(phi)
                lim = np.minimum(rho[:, k0], rho[:, (k0 + 1) % len(phi)])             # both bracketing rays
                a = np.minimum(frac * np.min(lim / np.linalg.norm(e, axis=1), axis=1), a_cap)
                perim = np.round(np.pi * a * (3 * (1 + q) - np.sqrt((3 + q) * (1 + 3 * q))), 1)   # Ramanujan
                i = int(np.lexsort((off, -perim))[0])
                key = (perim[i], -off[i])
                if best is None or key > best[0]:
                    best = (key, centres[i], float(a[i]), q, float(theta))
        _, self.centre, self.a, self.q, self.theta = best
        self.rebuild(1.0)

    def rebuild(self, shrink: float):
        """Arc-length table of the loop scaled by ``shrink`` about its centre."""
        t = np.linspace(0.0, 2 * np.pi, 721)
        u = np.array([np.cos(self.theta), np.sin(self.theta)])
        v = np.array([-u[1], u[0]])
        a = self.a * shrink
        self._pts = self.centre + a * (np.cos(t)[:, None] * u + self.q * np.sin(t)[:, None] * v)
        seg = np.linalg.norm(np.diff(self._pts, axis=0), axis=1)
        self._cum = np.concatenate([[0.0], np.cumsum(seg)])
        self.length = float(self._cum[-1])

    def at(self, s):
        """xy (N, 2) at arc lengths s (any real, wrapped)."""
        if self.length < 1e-9:
            return np.broadcast_to(self.centre, np.shape(s) + (2,)).copy()
        s = np.mod(np.asarray(s, dtype=np.float64), self.length)
        return np.stack([np.interp(s, self._cum, self._pts[:, 0]), np.interp(s, self._cum, self._pts[:, 1])], -1)


def _handheld(loop: _FreeLoop, n: int, rnd: dict) -> List[np.ndarray]:
    poses = []
    for k in range(n):
        u = k / n
        a = 2 * np.pi * u
        xy = loop.at((rnd['phase'] + rnd['dir'] * u) * loop.length)
        eye = np.array([xy[0], xy[1], rnd['h0'] + 0.1 * np.sin(3 * a + rnd['ph_z'])])
        to_c = loop.centre - xy
        base = np.arctan2(to_c[1], to_c[0]) if np.hypot(*to_c) > 1e-6 else a
        heading = base + rnd['sway'] * np.sin(2 * a + rnd['ph_sway'])
        pitch = np.clip(rnd['pitch_mid'] + rnd['pitch_amp'] * np.sin(3 * a + rnd['ph_pitch']),
                        np.radians(-30), np.radians(5))
        fwd = np.array([np.cos(pitch) * np.cos(heading), np.cos(pitch) * np.sin(heading), np.sin(pitch)])
        T = look_at(eye, eye + fwd)
        T[:3, :3] = T[:3, :3] @ _rotvec(rnd['jit_r'][k])          # hand shake, camera frame
        T[:3, 3] += rnd['jit_p'][k]
        poses.append(T)
    return poses


def _robot(loop: _FreeLoop, n: int, rnd: dict) -> List[np.ndarray]:
    k = np.arange(n, dtype=np.float64)
    speed = np.ones(n)
    for kc in rnd['pauses']:                 # stop for a few frames (smooth ramps) around each pause centre
        d = np.abs(k - kc)
        speed = np.minimum(speed, np.clip((d - rnd['pause_half']) / 2.0, 0.0, 1.0))
    speed = 0.5 - 0.5 * np.cos(np.pi * speed)
    travel = np.concatenate([[0.0], np.cumsum(speed[:-1])])
    travel = travel / max(float(speed.sum()), 1e-9)
    # slower where the path bends: time per metre 1 + 0.4 * curvature (1/m)
    ds = 0.02 * rnd['dir']
    grid = rnd['phase'] * loop.length + rnd['dir'] * np.linspace(0.0, loop.length, 361)
    tg = loop.at(grid + ds) - loop.at(grid - ds)
    ang = np.unwrap(np.arctan2(tg[:, 1], tg[:, 0]))
    dist = np.linspace(0.0, loop.length, 361)
    kappa = np.abs(np.gradient(ang, dist)) if loop.length > 1e-6 else np.zeros_like(dist)
    cost = np.concatenate([[0.0], np.cumsum((1 + 0.4 * (kappa[1:] + kappa[:-1]) / 2) * np.diff(dist))])
    s = rnd['phase'] * loop.length + rnd['dir'] * np.interp(travel * cost[-1], cost, dist)
    xy = loop.at(s)
    tangent = loop.at(s + ds) - loop.at(s - ds)
    heading = np.unwrap(np.arctan2(tangent[:, 1], tangent[:, 0]))
    sigma = max(1.5, n / 10)
    for kc, turn in zip(rnd['pauses'], rnd['turns']):   # turn towards the walls (outside of the loop) and back
        heading = heading + turn * np.exp(-0.5 * ((k - kc) / sigma) ** 2)
    heading = heading + rnd['sway'] * np.sin(2 * np.pi * k / n + rnd['ph_sway'])
    pitch = np.clip(rnd['pitch0'] + np.radians(2.0) * np.sin(4 * np.pi * k / n + rnd['ph_pitch']),
                    np.radians(-10), 0.0)
    poses = []
    for i in range(n):
        eye = np.array([xy[i, 0], xy[i, 1], rnd['h0']])
        fwd = np.array([np.cos(pitch[i]) * np.cos(heading[i]), np.cos(pitch[i]) * np.sin(heading[i]), np.sin(pitch[i])])
        poses.append(look_at(eye, eye + fwd))
    return poses


def scan_trajectory(scene: Scene, n_frames: int = 60, seed: int = 0, style: str = 'handheld') -> List[np.ndarray]:
    """Camera poses scanning ``scene``: ``n_frames`` (4, 4) float64 T_W_C (optical frame x right, y down, z forward).

    Works for any scene with free floor (walls and furniture of any height count as obstacles). The path is one
    closed elliptic loop, the longest found inside the free floor (in an L-shaped room, inside its free part),
    centred near the middle of the free floor. Every camera centre stays inside the room and at least
    ``CLEARANCE_M`` from every primitive's AABB (checked; the loop shrinks towards its centre if needed).
    Deterministic by ``seed`` (start point, direction, heights, sway and pause phases, hand shake).

    style 'handheld': 1.2-1.6 m high, looking across the room at its far side via the loop's centre, with heading
    sway of 8-15 deg, pitch oscillating between about -30 and 0 deg, and seeded hand shake (at most 0.8 cm and
    0.9 deg per frame). 'robot': a level camera at a fixed 0.8-1.0 m (pitch -10..0 deg), facing along the path and
    slowing in bends, stopping two or three times to turn 40-65 deg in place towards the walls and back. With 60
    frames consecutive poses are about 5-15 cm and a few degrees apart (robot: 0 cm while stopped).
    Raises ValueError for ``n_frames < 1``, an unknown style, or a scene without free floor.
    """
    if n_frames < 1:
        raise ValueError('n_frames must be >= 1')
    if style not in STYLES:
        raise ValueError(f'unknown style {style!r}; use one of {STYLES}')
    rng = np.random.default_rng(seed)
    n = int(n_frames)
    rnd = {'phase': float(rng.uniform(0, 1)), 'dir': 1.0 if rng.random() < 0.5 else -1.0,
           'ph_z': float(rng.uniform(0, 2 * np.pi)), 'ph_sway': float(rng.uniform(0, 2 * np.pi)),
           'ph_pitch': float(rng.uniform(0, 2 * np.pi))}
    if style == 'handheld':
        rnd.update(h0=float(rng.uniform(1.33, 1.47)), sway=np.radians(rng.uniform(8, 15)),
                   pitch_mid=np.radians(rng.uniform(-16, -11)), pitch_amp=np.radians(rng.uniform(10, 14)),
                   jit_p=rng.uniform(-0.0045, 0.0045, (n, 3)), jit_r=np.radians(rng.uniform(-0.5, 0.5, (n, 3))))
        loop = _FreeLoop(scene, 1.6, frac=0.9, cap=0.18, ratios=(1.0, 0.8, 0.6, 0.45))
        build = _handheld
    else:
        n_p = 0 if n < 10 else int(rng.integers(2, 4))
        pauses = [(i + 0.5 + rng.uniform(-0.2, 0.2)) * n / n_p for i in range(n_p)]
        rnd.update(h0=float(rng.uniform(0.8, 1.0)), sway=np.radians(rng.uniform(0, 5)),
                   pitch0=np.radians(rng.uniform(-8, -2)), pauses=pauses, pause_half=max(0.5, n / 30),
                   turns=[-rnd['dir'] * np.radians(rng.uniform(40, 65)) for _ in pauses])
        loop = _FreeLoop(scene, 1.0, frac=0.9, cap=0.13, ratios=(1.0, 0.8, 0.65))
        build = _robot
    lo, hi = _prim_boxes(scene)
    for shrink in np.linspace(1.0, 0.0, 21):
        loop.rebuild(shrink)
        poses = build(loop, n, rnd)
        eye = np.array([T[:3, 3] for T in poses])
        inside = np.all((eye >= scene.room_min + CLEARANCE_M) & (eye <= scene.room_max - CLEARANCE_M))
        if inside and _box_distance(eye, lo, hi).min() >= CLEARANCE_M + 0.01:
            return poses
    raise ValueError(f'no collision-free trajectory found in scene {scene.name!r}')
