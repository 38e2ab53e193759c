"""Ground-truth labelled point clouds of a scene's surfaces."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ov3d_ros.sim.scene import Primitive, Scene, rot_z


def _surface_points(p: Primitive, spacing: float, rng: np.random.Generator) -> np.ndarray:
    """(N, 3) points on the surface of one primitive, about ``spacing`` apart, world frame."""
    s = np.asarray(p.size, dtype=np.float64)
    if p.kind == 'box':
        pts = []
        for axis in range(3):
            a, b = [i for i in range(3) if i != axis]
            na, nb = max(2, int(np.ceil(2 * s[a] / spacing)) + 1), max(2, int(np.ceil(2 * s[b] / spacing)) + 1)
            ga, gb = np.meshgrid(np.linspace(-s[a], s[a], na), np.linspace(-s[b], s[b], nb), indexing='ij')
            for sign in (-1, 1):
                face = np.zeros((ga.size, 3))
                face[:, a], face[:, b], face[:, axis] = ga.ravel(), gb.ravel(), sign * s[axis]
                pts.append(face)
        local = np.concatenate(pts)
    elif p.kind == 'cylinder':
        r, hz = s[0], s[2]
        n_a = max(8, int(np.ceil(2 * np.pi * r / spacing)))
        n_z = max(2, int(np.ceil(2 * hz / spacing)) + 1)
        ang, z = np.meshgrid(np.linspace(0, 2 * np.pi, n_a, endpoint=False), np.linspace(-hz, hz, n_z), indexing='ij')
        side = np.stack([r * np.cos(ang.ravel()), r * np.sin(ang.ravel()), z.ravel()], 1)
        n_cap = max(4, int(np.pi * r * r / spacing ** 2))
        rr, aa = r * np.sqrt(rng.random(n_cap)), rng.random(n_cap) * 2 * np.pi
        caps = [np.stack([rr * np.cos(aa), rr * np.sin(aa), np.full(n_cap, sign * hz)], 1) for sign in (-1, 1)]
        local = np.concatenate([side] + caps)
    elif p.kind == 'sphere':
        n = max(16, int(4 * np.pi * s[0] ** 2 / spacing ** 2))
        i = np.arange(n) + 0.5
        phi, theta = np.arccos(1 - 2 * i / n), np.pi * (1 + 5 ** 0.5) * i
        local = s[0] * np.stack([np.cos(theta) * np.sin(phi), np.sin(theta) * np.sin(phi), np.cos(phi)], 1)
    else:
        raise ValueError(f'unknown primitive kind {p.kind!r}')
    return local @ rot_z(p.yaw_rad).T + p.center


def inside(p: Primitive, pts: np.ndarray, pad: float = 1e-3) -> np.ndarray:
    """(N,) bool: world points (N, 3) inside primitive ``p`` grown by ``pad`` metres (so faces in contact count)."""
    local = (pts - p.center) @ rot_z(p.yaw_rad)
    s = p.size + pad
    if p.kind == 'box':
        return np.all(np.abs(local) <= s, axis=1)
    if p.kind == 'cylinder':
        return (np.hypot(local[:, 0], local[:, 1]) <= s[0]) & (np.abs(local[:, 2]) <= s[2])
    return np.linalg.norm(local, axis=1) <= s[0]


def sample_gt_points(scene: Scene, spacing_m: float = 0.02, seed: int = 0) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labelled points on the scene's exposed surfaces, about ``spacing_m`` apart (world frame).

    Returns (xyz (N, 3) float32, semantic (N,) int32, instance (N,) int32). Points inside or touching another
    primitive (hidden contact faces, overlaps) or outside the room interior are dropped.
    """
    rng = np.random.default_rng(seed)
    xyz, sem, inst = [], [], []
    for i, p in enumerate(scene.primitives):
        pts = _surface_points(p, spacing_m, rng)
        keep = np.all((pts >= scene.room_min - 1e-3) & (pts <= scene.room_max + 1e-3), axis=1)
        for j, q in enumerate(scene.primitives):
            if j == i:
                continue
            lo, hi = q.bounds()
            near = keep & np.all((pts >= lo - 2e-3) & (pts <= hi + 2e-3), axis=1)
            if near.any():
                keep[near] &= ~inside(q, pts[near])
        xyz.append(pts[keep])
        sem.append(np.full(int(keep.sum()), p.class_id))
        inst.append(np.full(int(keep.sum()), p.instance_id))
    return (np.concatenate(xyz).astype(np.float32), np.concatenate(sem).astype(np.int32),
            np.concatenate(inst).astype(np.int32))
