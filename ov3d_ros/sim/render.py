"""Analytic ray casting of a scene: RGB, depth, semantic and instance images in one pass (torch, any device)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.sim.scene import KINDS, Scene, rot_z

LIGHT = (0.35, 0.5, 0.8)       # direction towards the light, world frame (normalised below)
AMBIENT, DIFFUSE = 0.5, 0.5
_EPS = 1e-6


@dataclass
class RenderedFrame:
    """rgb (H, W, 3) uint8; depth_m (H, W) float32 optical-axis depth z_C in metres, 0 where nothing is hit;
    semantic, instance (H, W) uint16 (0 = nothing hit)."""

    rgb: np.ndarray
    depth_m: np.ndarray
    semantic: np.ndarray
    instance: np.ndarray


def _rot_t(cos, sin, v):
    """Rotate (..., 3) vectors by -yaw about z (world → local) given cos/sin broadcastable to v[..., 0]."""
    x, y, z = v.unbind(-1)
    x, y = cos * x + sin * y, -sin * x + cos * y
    return torch.stack([x, y, z.expand_as(x)], -1)


def _miss(t, ok):
    return torch.where(ok & (t > _EPS), t, torch.full_like(t, float('inf')))


def _t_box(ol, inv, h):
    """Entry distance of rays into a box, all in its local frame: ol (3,) origin, inv (n, 3) 1/direction,
    h (3,) half extents → (n,), inf = miss (also when the origin is inside)."""
    t1, t2 = (-h - ol) * inv, (h - ol) * inv
    tn, tf = torch.minimum(t1, t2).amax(-1), torch.maximum(t1, t2).amin(-1)
    return _miss(tn, tn <= tf)


def _t_cylinder(ol, d, r, hz):
    """Same for a vertical cylinder (radius r, half height hz; ol = origin - centre), side and caps."""
    dx, dy, dz = d.unbind(-1)
    a = (dx * dx + dy * dy).clamp(min=_EPS)
    b = ol[0] * dx + ol[1] * dy
    disc = b * b - a * (ol[0] ** 2 + ol[1] ** 2 - r * r)
    ts = (-b - disc.clamp(min=0).sqrt()) / a
    ts = _miss(ts, (disc >= 0) & ((ol[2] + ts * dz).abs() <= hz))
    dz = torch.where(dz.abs() < _EPS, torch.full_like(dz, _EPS), dz)
    tc = (-torch.sign(dz) * hz - ol[2]) / dz                                   # the cap facing the ray
    tc = _miss(tc, (ol[0] + tc * dx) ** 2 + (ol[1] + tc * dy) ** 2 <= r * r)
    return torch.minimum(ts, tc)


def _t_sphere(ol, d, r):
    """Same for a sphere of radius r (ol = origin - centre)."""
    a = (d * d).sum(-1)
    b = d @ ol
    disc = b * b - a * (float(ol @ ol) - r * r)
    return _miss((-b - disc.clamp(min=0).sqrt()) / a, disc >= 0)


def _window(p, T_C_W: np.ndarray, camera: PinholeCamera):
    """Pixel rectangle (v0, v1, u0, u1) covering primitive p's projected AABB; None if it is behind the camera."""
    lo, hi = p.bounds()
    corners = np.stack(np.meshgrid(*zip(lo, hi), indexing='ij'), -1).reshape(-1, 3)
    pc = corners @ T_C_W[:3, :3].T + T_C_W[:3, 3]
    z = pc[:, 2]
    if np.all(z <= 1e-6):
        return None
    if np.any(z <= 1e-3) or camera.distorted:       # (a lens bends the projected box: test every pixel)
        return 0, camera.height, 0, camera.width
    u, v = pc[:, 0] / z * camera.fx + camera.cx, pc[:, 1] / z * camera.fy + camera.cy
    u0, u1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 2, camera.width)
    v0, v1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 2, camera.height)
    return (v0, v1, u0, u1) if u0 < u1 and v0 < v1 else None


def _hash01(ijk, k):
    """Deterministic hash of integer cells (N, 3) int64 and primitive ids k (N,) → (N,) float in [0, 1)."""
    h = (ijk[:, 0] * 73856093) ^ (ijk[:, 1] * 19349663) ^ (ijk[:, 2] * 83492791) ^ (k * 2654435761)
    h = (h ^ (h >> 13)) * 1274126177
    return ((h ^ (h >> 16)) & 1023).to(torch.float32) / 1024.0


def _value_noise(p: torch.Tensor, cell: float, key: int) -> torch.Tensor:
    """Smooth value noise in [0, 1) of world points p (N, 3): hashed lattice values every ``cell`` metres,
    trilinearly interpolated with smoothstep weights → (N,) float32."""
    q = p / cell
    i0 = torch.floor(q)
    t = q - i0
    t = t * t * (3.0 - 2.0 * t)
    i0 = i0.long()
    out = torch.zeros(len(p), dtype=torch.float32, device=p.device)
    key_t = torch.full((len(p),), key, dtype=torch.long, device=p.device)
    for corner in range(8):
        o = torch.tensor([(corner >> 2) & 1, (corner >> 1) & 1, corner & 1], device=p.device)
        w = torch.where(o.bool(), t, 1.0 - t).prod(1)
        out = out + w * _hash01(i0 + o, key_t)
    return out


def world_texture(pw: torch.Tensor) -> torch.Tensor:
    """View-consistent colour variation of world points pw (N, 3) → (N, 3) float32 RGB factors around 1.

    A deterministic function of the world point alone (not of the object hit), so it runs across object
    boundaries and two objects of one colour stay alike: low-frequency brightness blotches (0.7 m lattice,
    ±14 %), finer mottling (0.15 m, ±5 %) and a faint tint (0.5 m, ±4 % per channel), like stains, wood grain
    and uneven lighting.
    """
    pw = pw.to(torch.float32)
    shade = 1.0 + 0.28 * (_value_noise(pw, 0.7, 11) - 0.5) + 0.1 * (_value_noise(pw, 0.15, 12) - 0.5)
    tint = torch.stack([_value_noise(pw, 0.5, 21 + c) for c in range(3)], -1) - 0.5
    return shade[:, None] * (1.0 + 0.08 * tint)


def render(scene: Scene, camera: PinholeCamera, T_W_C: np.ndarray, device='cpu', depth_noise: float = 0.0,
           hole_fraction: float = 0.0, seed: int = 0) -> RenderedFrame:
    """Ray-cast every pixel of ``camera`` at pose ``T_W_C`` ((4, 4) float64, optical frame → world); nearest hit wins.

    ``depth_noise``: σ of Gaussian depth noise is ``depth_noise · z²`` (metres); ``hole_fraction``: fraction of
    pixels whose depth is set to 0. Both seeded by ``seed`` and off by default; rgb/labels are unaffected.
    """
    dev, f = torch.device(device), torch.float32
    H, W = camera.height, camera.width
    prims = scene.primitives
    if not prims:
        z = np.zeros((H, W), np.uint16)
        return RenderedFrame(np.zeros((H, W, 3), np.uint8), np.zeros((H, W), np.float32), z, z.copy())
    tt = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), device=dev).to(f)  # noqa: E731
    T_W_C = np.asarray(T_W_C, dtype=np.float64)
    T_C_W = np.linalg.inv(T_W_C)
    x, y, has_ray = camera.pixel_rays()      # a camera with lens distortion renders its raw (distorted) images
    d_c = np.stack([np.where(has_ray, x, 0.0), np.where(has_ray, y, 0.0), np.ones_like(x)], -1)
    d = tt(d_c @ T_W_C[:3, :3].T)             # (H, W, 3) world rays with z_C = 1: the ray parameter is the depth
    best_t = torch.full((H, W), float('inf'), device=dev, dtype=f)
    best_i = torch.zeros((H, W), dtype=torch.long, device=dev)
    inv_by_yaw = {}
    for idx, p in enumerate(prims):           # each primitive tests only the pixels its bounding box covers
        win = _window(p, T_C_W, camera)
        if win is None:
            continue
        v0, v1, u0, u1 = win
        oc = T_W_C[:3, 3] - p.center
        if p.kind == 'box':
            R = rot_z(p.yaw_rad)
            if p.yaw_rad not in inv_by_yaw:   # 1 / ray direction in the box's yawed frame
                dl = d @ tt(R)
                inv_by_yaw[p.yaw_rad] = 1.0 / torch.where(dl.abs() < _EPS, torch.full_like(dl, _EPS), dl)
            t = _t_box(tt(oc @ R), inv_by_yaw[p.yaw_rad][v0:v1, u0:u1], tt(p.size))
        elif p.kind == 'cylinder':
            t = _t_cylinder(tt(oc), d[v0:v1, u0:u1], p.size[0], p.size[2])
        else:
            t = _t_sphere(tt(oc), d[v0:v1, u0:u1], p.size[0])
        bt, bi = best_t[v0:v1, u0:u1], best_i[v0:v1, u0:u1]
        closer = t < bt
        bt.copy_(torch.where(closer, t, bt))
        bi.masked_fill_(closer, idx)
    if not has_ray.all():                     # pixels the lens gives no ray (a fisheye's rim): nothing hit
        best_t[torch.from_numpy(~has_ray).to(dev)] = float('inf')
    # shading of the winning primitive only: its normal from the hit point in its local frame
    d, i = d.reshape(-1, 3), best_i.reshape(-1)
    hit = torch.isfinite(best_t.reshape(-1))
    t = torch.where(hit, best_t.reshape(-1), torch.zeros_like(hit, dtype=f))
    pw = tt(T_W_C[:3, 3]) + t[:, None] * d
    yaw = torch.as_tensor([p.yaw_rad for p in prims], dtype=torch.float64, device=dev)[i]
    cos, sin = torch.cos(yaw).to(f), torch.sin(yaw).to(f)
    pl = _rot_t(cos, sin, pw - tt([p.center for p in prims])[i]) / tt([p.size for p in prims])[i]  # local / size
    q = pl.abs()
    n_box = torch.nn.functional.one_hot(q.argmax(1), 3).to(f) * torch.sign(pl)
    side = q[:, 2] < torch.hypot(pl[:, 0], pl[:, 1])
    n_cyl = torch.where(side[:, None], pl * tt([1, 1, 0]), tt([0, 0, 1]) * torch.sign(pl))
    kind = torch.as_tensor([KINDS.index(p.kind) for p in prims], device=dev)[i][:, None]
    nl = torch.nn.functional.normalize(torch.where(kind == 0, n_box, torch.where(kind == 1, n_cyl, pl)), dim=1)
    n = _rot_t(cos, -sin, nl)                 # local → world
    lambert = AMBIENT + DIFFUSE * (n @ torch.nn.functional.normalize(tt(LIGHT), dim=0)).clamp(min=0)
    # texture by world position: per-primitive 10 cm checker + 2 cm cell noise, and the object-independent
    # low-frequency world texture (world_texture); all view-consistent
    cells = torch.floor(pw / 0.02).long()
    checker = ((torch.div(cells, 5, rounding_mode='floor').sum(1) + i) % 2).to(f)
    texture = (0.95 + 0.05 * checker + 0.08 * (_hash01(cells, i) - 0.5))[:, None] * world_texture(pw)
    rgb = (tt(np.stack([p.color for p in prims]))[i] * lambert[:, None] * texture).clamp(0, 255).round()
    rgb = (rgb * hit[:, None]).to(torch.uint8)
    sem = torch.as_tensor([p.class_id for p in prims], device=dev)[i] * hit
    inst = torch.as_tensor([p.instance_id for p in prims], device=dev)[i] * hit
    depth = t.cpu().numpy().reshape(H, W)
    if depth_noise > 0 or hole_fraction > 0:
        rng = np.random.default_rng(seed)
        depth = np.where(depth > 0, np.maximum(depth + depth_noise * depth ** 2 * rng.standard_normal(depth.shape),
                                               0.0), 0.0)
        depth[rng.random(depth.shape) < hole_fraction] = 0.0
    return RenderedFrame(rgb.cpu().numpy().reshape(H, W, 3), depth.astype(np.float32),
                         sem.cpu().numpy().astype(np.uint16).reshape(H, W),
                         inst.cpu().numpy().astype(np.uint16).reshape(H, W))
