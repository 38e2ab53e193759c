"""Procedural indoor scenes made of labelled boxes, vertical cylinders and spheres (world frame: z up, metres)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import numpy as np

from ov3d_ros.sim.classes import class_id

KINDS = ('box', 'cylinder', 'sphere')


def rot_z(yaw: float) -> np.ndarray:
    """(3, 3) float64 rotation by ``yaw`` radians about z (local → world)."""
    c, s = np.cos(yaw), np.sin(yaw)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@dataclass
class Primitive:
    """One solid, in the world frame.

    kind: 'box' | 'cylinder' | 'sphere'. center (3,) float64 metres. size (3,) float64: box half extents in its
    local frame (rotated by ``yaw_rad`` about z); cylinder (radius, radius, half height), axis along z;
    sphere (radius, radius, radius). color (3,) uint8 RGB. Prefer the ``box``/``cylinder``/``sphere`` constructors.
    """

    kind: str
    center: np.ndarray
    size: np.ndarray
    class_id: int
    instance_id: int
    color: np.ndarray
    yaw_rad: float = 0.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f'unknown primitive kind {self.kind!r}')
        self.center = np.asarray(self.center, dtype=np.float64).reshape(3)
        self.size = np.asarray(self.size, dtype=np.float64).reshape(3)
        self.color = np.clip(np.asarray(self.color), 0, 255).astype(np.uint8).reshape(3)
        self.yaw_rad = float(self.yaw_rad) if self.kind == 'box' else 0.0
        if np.any(self.size <= 0):
            raise ValueError(f'primitive size must be positive, got {self.size}')

    @classmethod
    def box(cls, center, half_extents, class_id, instance_id, color, yaw_rad=0.0) -> 'Primitive':
        return cls('box', center, half_extents, class_id, instance_id, color, yaw_rad)

    @classmethod
    def cylinder(cls, center, radius, half_height, class_id, instance_id, color) -> 'Primitive':
        return cls('cylinder', center, (radius, radius, half_height), class_id, instance_id, color)

    @classmethod
    def sphere(cls, center, radius, class_id, instance_id, color) -> 'Primitive':
        return cls('sphere', center, (radius, radius, radius), class_id, instance_id, color)

    def bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """World AABB: (min (3,), max (3,)) float64."""
        c, s = abs(np.cos(self.yaw_rad)), abs(np.sin(self.yaw_rad))
        half = np.array([c * self.size[0] + s * self.size[1], s * self.size[0] + c * self.size[1], self.size[2]])
        return self.center - half, self.center + half


@dataclass
class Scene:
    """A room (free interior ``room_min``..``room_max``, (3,) float64) and its labelled primitives.

    Several primitives share one instance id per object; room surfaces (floor, ceiling, walls) lie outside the
    interior and are instances too.
    """

    name: str
    room_min: np.ndarray
    room_max: np.ndarray
    primitives: List[Primitive] = field(default_factory=list)

    def instance_classes(self) -> Dict[int, int]:
        """{instance id: semantic class id}."""
        return {p.instance_id: p.class_id for p in self.primitives}

    def instance_boxes(self) -> List[Tuple[np.ndarray, np.ndarray, int]]:
        """Per instance, sorted by id: (AABB min (3,), AABB max (3,), class id), clipped to the room interior."""
        out = {}
        for p in self.primitives:
            lo, hi = p.bounds()
            lo, hi = np.maximum(lo, self.room_min), np.minimum(hi, self.room_max)
            if p.instance_id in out:
                lo, hi = np.minimum(out[p.instance_id][0], lo), np.maximum(out[p.instance_id][1], hi)
            out[p.instance_id] = (lo, hi, p.class_id)
        return [out[k] for k in sorted(out)]


class _Builder:
    """Adds objects made of parts given in an object frame (yawed about z, placed at ``origin`` on the floor)."""

    def __init__(self, scene: Scene, rng: np.random.Generator):
        self.scene, self.rng, self.next_id = scene, rng, 1

    def jitter(self, color, amount=15):
        return np.clip(np.asarray(color) + self.rng.integers(-amount, amount + 1, 3), 0, 255)

    def add(self, name, parts, color, yaw=0.0, origin=(0.0, 0.0)) -> int:
        """parts: (kind, local center (3,), size (3,)[, own colour]); returns the new instance id."""
        iid, cid = self.next_id, class_id(name)
        self.next_id += 1
        c, s = np.cos(yaw), np.sin(yaw)
        for kind, (lx, ly, lz), size, *col in parts:
            center = (origin[0] + c * lx - s * ly, origin[1] + s * lx + c * ly, lz)
            self.scene.primitives.append(
                Primitive(kind, center, size, cid, iid, self.jitter(col[0] if col else color, 5), yaw))
        return iid


def _chair(b: _Builder, x, y, yaw, color):
    legs = [('box', (sx * 0.2, sy * 0.2, 0.215), (0.02, 0.02, 0.215)) for sx in (-1, 1) for sy in (-1, 1)]
    b.add('chair', legs + [('box', (0, 0, 0.46), (0.23, 0.23, 0.03)),
                           ('box', (-0.21, 0, 0.75), (0.02, 0.23, 0.26))], color, yaw, (x, y))


def _table(b: _Builder, x, y, color, half=(0.6, 0.4)):
    legs = [('box', (sx * (half[0] - 0.05), sy * (half[1] - 0.05), 0.36), (0.03, 0.03, 0.36))
            for sx in (-1, 1) for sy in (-1, 1)]
    b.add('table', legs + [('box', (0, 0, 0.745), (half[0], half[1], 0.025))], color, 0.0, (x, y))


def builtin_scene(seed: int = 0) -> Scene:
    """The built-in 6 m × 5 m × 2.7 m room (interior x∈[0, 6], y∈[0, 5], z∈[0, 2.7]).

    Contents: bed with a picture above it, sofa, table with two chairs, cabinet, bookshelf, window, door, plant,
    lamp. ``seed`` jitters colours and moves objects by a few centimetres; seed 0 is the documented default.
    """
    rng = np.random.default_rng(seed)
    L, W, H, t = 6.0, 5.0, 2.7, 0.1
    scene = Scene(f'builtin_room_{seed}', np.zeros(3), np.array([L, W, H]))
    b = _Builder(scene, rng)
    j = lambda: rng.uniform(-0.05, 0.05)  # noqa: E731  (placement jitter)
    b.add('floor', [('box', (L / 2, W / 2, -t / 2), (L / 2 + t, W / 2 + t, t / 2))], (150, 125, 95))
    b.add('ceiling', [('box', (L / 2, W / 2, H + t / 2), (L / 2 + t, W / 2 + t, t / 2))], (238, 238, 232))
    for cx, cy, hx, hy in ((-t / 2, W / 2, t / 2, W / 2), (L + t / 2, W / 2, t / 2, W / 2),
                           (L / 2, -t / 2, L / 2, t / 2), (L / 2, W + t / 2, L / 2, t / 2)):
        b.add('wall', [('box', (cx, cy, H / 2), (hx, hy, H / 2))], (215, 208, 190))
    # bed against the wall y = W, picture above it, lamp beside it
    bx = 1.2 + j()
    b.add('bed', [('box', (0, 0, 0.15), (1.0, 0.8, 0.15)),
                  ('box', (0, -0.02, 0.38), (0.97, 0.76, 0.08), (232, 232, 240)),
                  ('box', (0, 0.84, 0.5), (1.0, 0.04, 0.5))], b.jitter((115, 70, 95)), 0.0, (bx, W - 0.9))
    b.add('picture', [('box', (bx, W - 0.015, 1.55), (0.4, 0.015, 0.28))], b.jitter((40, 90, 175)))
    b.add('lamp', [('cylinder', (0, 0, 0.75), (0.025, 0.025, 0.75), (60, 60, 60)),
                   ('cylinder', (0, 0, 1.6), (0.2, 0.2, 0.13))], b.jitter((245, 220, 140)), 0.0, (2.65 + j(), 4.6))
    # sofa along the wall y = 0
    b.add('sofa', [('box', (0, 0.45, 0.22), (1.0, 0.42, 0.22)), ('box', (0, 0.12, 0.6), (1.0, 0.1, 0.38)),
                   ('box', (-0.92, 0.45, 0.42), (0.08, 0.42, 0.2)), ('box', (0.92, 0.45, 0.42), (0.08, 0.42, 0.2))],
          b.jitter((120, 120, 128)), 0.0, (3.0 + j(), 0.0))
    # dining table with two red chairs
    tx, ty = 4.5 + j(), 3.3 + j()
    _table(b, tx, ty, b.jitter((150, 95, 45)))
    _chair(b, tx - 0.25, ty - 0.75, np.pi / 2, b.jitter((200, 30, 30)))
    _chair(b, tx + 0.25, ty + 0.75, -np.pi / 2, b.jitter((200, 30, 30)))
    # wall x = L: cabinet, bookshelf (carcass + rows of books), window
    b.add('cabinet', [('box', (0, 0, 0.45), (0.3, 0.25, 0.45))], b.jitter((70, 110, 140)), 0.0, (L - 0.31, 0.6 + j()))
    books = [('box', (-0.16, 0, z), (0.01, 0.45, 0.12), b.jitter(c, 25))
             for z, c in ((0.35, (30, 80, 160)), (0.85, (190, 160, 40)), (1.35, (40, 140, 90)))]
    b.add('bookshelf', [('box', (0, 0, 0.9), (0.15, 0.5, 0.9))] + books, b.jitter((80, 52, 30)), 0.0,
          (L - 0.16, 1.9 + j()))
    b.add('window', [('box', (L - 0.015, 4.0, 1.45), (0.015, 0.55, 0.5))], b.jitter((170, 210, 240)))
    # wall x = 0: door; plant in the corner
    b.add('door', [('box', (0.02, 1.6, 1.02), (0.02, 0.45, 1.02))], b.jitter((190, 150, 100)))
    b.add('plant', [('cylinder', (0, 0, 0.18), (0.17, 0.17, 0.18), (165, 85, 50)),
                    ('sphere', (0, 0, 0.68), (0.32, 0.32, 0.32))], b.jitter((40, 150, 50)), 0.0, (0.5, 0.5 + j()))
    return scene
