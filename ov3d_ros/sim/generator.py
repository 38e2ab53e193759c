"""Seeded, labelled indoor rooms for evaluating 3D semantic segmentation.

``generate_scene(seed)`` builds a ScanNet-like room (rectangular or L-shaped; bedroom, living room, office, kitchen,
bathroom or studio) out of boxes, vertical cylinders and spheres, placed by rejection sampling so that distinct
objects never interpenetrate: they only touch (standing on the floor, resting on a table, hanging on a wall, a
chair tucked under a table). A central walkway is kept free of objects.
Camera scans through such rooms: ``ov3d_ros.sim.trajectory.scan_trajectory``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from ov3d_ros.sim.classes import class_id
from ov3d_ros.sim.scene import Scene, _Builder

ROOM_TYPES = ('bedroom', 'living_room', 'office', 'kitchen', 'bathroom', 'studio')
MAX_PRIMITIVES = 250

# interior size ranges (x, y) in metres per room type
_ROOM_SIZE = {'bedroom': ((4.5, 7.0), (3.8, 6.0)), 'living_room': ((5.0, 8.0), (4.0, 7.0)),
              'office': ((5.0, 8.0), (4.0, 7.0)), 'kitchen': ((4.5, 7.0), (3.5, 6.0)),
              'bathroom': ((4.0, 5.5), (3.5, 4.5)), 'studio': ((6.0, 8.0), (5.0, 7.0))}

_PALETTE = {
    'wall': [(215, 208, 190), (200, 210, 215), (228, 218, 200), (190, 200, 185), (232, 228, 220), (205, 188, 172)],
    'floor': [(150, 125, 95), (120, 95, 70), (170, 162, 150), (110, 110, 115), (188, 160, 120), (140, 150, 150)],
    'ceiling': [(238, 238, 232), (246, 245, 240), (230, 232, 236)],
    'wood': [(150, 95, 45), (120, 80, 50), (185, 140, 90), (95, 60, 35), (200, 170, 120), (70, 45, 30)],
    'fabric': [(120, 120, 128), (70, 90, 140), (150, 60, 60), (90, 120, 80), (180, 160, 130), (60, 60, 65),
               (140, 100, 150)],
    'chair': [(200, 30, 30), (40, 40, 45), (30, 90, 160), (190, 150, 90), (230, 230, 225), (60, 130, 70)],
    'painted': [(70, 110, 140), (235, 235, 230), (90, 90, 95), (160, 60, 50), (200, 190, 160), (60, 100, 80)],
    'bedding': [(232, 232, 240), (200, 215, 235), (240, 225, 200), (215, 200, 225)],
    'cover': [(115, 70, 95), (60, 90, 130), (150, 130, 90), (90, 120, 110), (170, 80, 60)],
    'metal': [(200, 200, 205), (60, 60, 62), (235, 235, 235), (150, 150, 155)],
    'ceramic': [(245, 245, 245), (235, 232, 225), (220, 230, 235)],
    'stone': [(90, 90, 95), (200, 195, 185), (60, 55, 50), (170, 150, 120), (235, 235, 230)],
    'pot': [(165, 85, 50), (200, 200, 195), (60, 60, 60), (120, 140, 160), (190, 120, 70)],
    'leaf': [(40, 150, 50), (60, 120, 40), (30, 110, 70), (90, 160, 60)],
    'shade': [(245, 220, 140), (240, 240, 230), (230, 150, 80), (200, 220, 240), (180, 40, 40)],
    'glass': [(170, 210, 240), (150, 190, 225), (185, 220, 235)],
    'curtain': [(180, 40, 50), (60, 80, 150), (220, 200, 160), (90, 130, 90), (200, 200, 210), (120, 70, 110)],
    'art': [(40, 90, 175), (210, 120, 40), (170, 40, 60), (50, 140, 120), (230, 200, 60), (120, 60, 160)],
    'book': [(30, 80, 160), (190, 160, 40), (40, 140, 90), (170, 40, 40), (230, 230, 220), (90, 60, 120)],
}
HOUSEHOLD_WHITE = (236, 234, 228)
"""The white of painted furniture, doors and appliances that match white walls."""


@dataclass
class _Wall:
    """A straight piece of the room's inner boundary, traversed counter-clockwise (the room is on its left)."""
    p0: np.ndarray
    t: np.ndarray           # unit direction
    length: float

    @property
    def n(self) -> np.ndarray:          # inward normal
        return np.array([-self.t[1], self.t[0]])

    @property
    def yaw(self) -> float:             # object frame: x along the wall, y into the room
        return float(np.arctan2(self.t[1], self.t[0]))


def _parts_bounds(parts, yaw: float, origin) -> Tuple[np.ndarray, np.ndarray]:
    """World AABBs (m, 3) of object parts, computed exactly as ``_Builder.add`` and ``Primitive.bounds`` do."""
    c, s = np.cos(yaw), np.sin(yaw)
    ac, as_ = abs(c), abs(s)
    lo, hi = [], []
    for kind, (lx, ly, lz), size, *_ in parts:
        center = np.array([origin[0] + c * lx - s * ly, origin[1] + s * lx + c * ly, lz], dtype=np.float64)
        sx, sy, sz = (float(v) for v in size)
        half = np.array([ac * sx + as_ * sy, as_ * sx + ac * sy, sz]) if kind == 'box' else np.array([sx, sy, sz])
        lo.append(center - half)
        hi.append(center + half)
    return np.array(lo), np.array(hi)


def _rect_hits_ellipse(lo, hi, centre, axes) -> bool:
    """Whether the xy rectangle lo..hi intersects the open axis-aligned ellipse (centre, semi-axes)."""
    q = (np.clip(centre, lo[:2], hi[:2]) - centre) / axes
    return float(q @ q) < 1.0


def _shifted(parts, dz: float):
    """Parts moved up by dz (to rest them on a surface at height dz)."""
    return [(k, (c[0], c[1], c[2] + dz), s, *col) for k, c, s, *col in parts]


def _to_frame(yaw, origin, xy):
    """A point given in an object frame (yaw, origin) → world xy."""
    c, s = np.cos(yaw), np.sin(yaw)
    return (origin[0] + c * xy[0] - s * xy[1], origin[1] + s * xy[0] + c * xy[1])


def _chair_parts(w=0.22, seat_z=0.46, back_h=0.45, leg=0.02, t=0.025, cushion=None):
    """A chair facing +x (backrest at -x), centred on the origin; footprint ±w."""
    lh = (seat_z - t) / 2
    parts = [('box', (sx * (w - leg), sy * (w - leg), lh), (leg, leg, lh)) for sx in (-1, 1) for sy in (-1, 1)]
    parts.append(('box', (0.0, 0.0, seat_z), (w, w, t)) + ((cushion,) if cushion is not None else ()))
    parts.append(('box', (-w + 0.02, 0.0, seat_z + t + back_h / 2), (0.02, w, back_h / 2)))
    return parts


class _Planner:
    """Room shell, wall pieces, free walkway and a 3D occupancy list of primitive AABBs for rejection sampling."""

    def __init__(self, seed: int):
        rng = self.rng = np.random.default_rng(seed)
        self.kind = ROOM_TYPES[seed % len(ROOM_TYPES)]
        (x0, x1), (y0, y1) = _ROOM_SIZE[self.kind]
        self.L, self.W = round(float(rng.uniform(x0, x1)), 2), round(float(rng.uniform(y0, y1)), 2)
        self.H = round(float(rng.uniform(2.4, 3.0)), 2)
        self.scene = Scene(f'generated_{seed:04d}', np.zeros(3), np.array([self.L, self.W, self.H]))
        self.b = _Builder(self.scene, rng)
        # Shared household colours come from their own stream, so the layout of a seed does not depend on them.
        self.crng = np.random.default_rng([seed, 0x5EED])
        wood = _PALETTE['wood']
        self.scheme = {'wood': np.asarray(wood[int(self.crng.integers(len(wood)))]), 'white': np.asarray(HOUSEHOLD_WHITE)}
        self.lo, self.hi = np.zeros((0, 3)), np.zeros((0, 3))
        self.supports = []          # (x0, y0, x1, y1, z_top, instance id): surfaces small objects may rest on
        self.windows = []           # (wall, u, width, sill z, height)
        self.counters = []          # (wall, u, width)
        self._shell()
        self._walkway()

    # ---------------------------------------------------------------- shell, walls, walkway
    def color(self, key, amount=18):
        pal = _PALETTE[key]
        return self.b.jitter(pal[int(self.rng.integers(len(pal)))], amount)

    def pick_shared(self, p, *anchors):
        """With probability ``p`` one of the room's shared household colours (``anchors``: 'wall', 'floor',
        'wood' (the room's furniture wood), 'white', or an RGB colour such as the table's), faintly jittered;
        else None. White cabinets on a white wall, chairs of the table's wood, a beige sofa on a beige floor."""
        if self.crng.random() >= p:
            return None
        a = anchors[int(self.crng.integers(len(anchors)))]
        base = self.scheme[a] if isinstance(a, str) else a
        return np.clip(np.asarray(base, dtype=np.int64) + self.crng.integers(-4, 5, 3), 0, 255)

    def shared(self, color, p, *anchors):
        """``color``, or with probability ``p`` a shared household colour (:meth:`pick_shared`)."""
        own = self.pick_shared(p, *anchors)
        return color if own is None else own

    def _add(self, name, parts, color, yaw=0.0, origin=(0.0, 0.0)) -> int:
        n0 = len(self.scene.primitives)
        iid = self.b.add(name, parts, color, yaw, origin)
        new = [p.bounds() for p in self.scene.primitives[n0:]]
        self.lo = np.vstack([self.lo, [lo for lo, _ in new]])
        self.hi = np.vstack([self.hi, [hi for _, hi in new]])
        return iid

    def _shell(self):
        L, W, H, t, rng = self.L, self.W, self.H, 0.1, self.rng
        wall_col = self.scheme['wall'] = self.color('wall', 8)
        self.scheme['floor'] = self.color('floor', 10)
        self._add('floor', [('box', (L / 2, W / 2, -t / 2), (L / 2 + t, W / 2 + t, t / 2))], self.scheme['floor'])
        self._add('ceiling', [('box', (L / 2, W / 2, H + t / 2), (L / 2 + t, W / 2 + t, t / 2))],
                  self.color('ceiling', 5))
        for cx, cy, hx, hy in ((-t / 2, W / 2, t / 2, W / 2), (L + t / 2, W / 2, t / 2, W / 2),
                               (L / 2, -t / 2, L / 2, t / 2), (L / 2, W + t / 2, L / 2, t / 2)):
            self._add('wall', [('box', (cx, cy, H / 2), (hx, hy, H / 2))], wall_col)
        corners = [np.array(c, dtype=np.float64) for c in ((0.0, 0.0), (L, 0.0), (L, W), (0.0, W))]
        poly, self.block = corners, None
        if self.kind != 'bathroom' and L >= 5.0 and W >= 4.2 and rng.random() < 0.45:
            k = int(rng.integers(4))
            cut = np.array([round(float(rng.uniform(0.25, 0.38)) * L, 2), round(float(rng.uniform(0.25, 0.38)) * W, 2)])
            P, tp, tn = corners[k], corners[k - 1] - corners[k], corners[(k + 1) % 4] - corners[k]
            tp, tn = tp / np.linalg.norm(tp), tn / np.linalg.norm(tn)
            a = P + tp * cut[int(abs(tp[1]) > 0.5)]
            inner = a + tn * cut[int(abs(tn[1]) > 0.5)]
            c = P + tn * cut[int(abs(tn[1]) > 0.5)]
            poly = corners[:k] + [a, inner, c] + corners[k + 1:]
            lo2, hi2 = np.minimum(P, inner), np.maximum(P, inner)
            self.block = (lo2, hi2)
            self._add('wall', [('box', ((lo2[0] + hi2[0]) / 2, (lo2[1] + hi2[1]) / 2, H / 2),
                                ((hi2[0] - lo2[0]) / 2, (hi2[1] - lo2[1]) / 2, H / 2))], wall_col)
        self.walls = []
        for i, p0 in enumerate(poly):
            d = poly[(i + 1) % len(poly)] - p0
            self.walls.append(_Wall(p0, d / np.linalg.norm(d), float(np.linalg.norm(d))))

    def _walkway(self):
        """A free ellipse in the middle of the room that no object may enter (the cameras move through it)."""
        size = np.array([self.L, self.W])
        c = size / 2
        if self.block is not None:
            c = c + 0.25 * (self.block[1] - self.block[0]) * np.sign(c - (self.block[0] + self.block[1]) / 2)
        e = np.clip(0.2 * size, 0.75, 1.3)
        e = np.maximum(np.minimum(e, np.minimum(c, size - c) - 0.9), 0.6)
        if self.block is not None:
            for _ in range(40):
                if not _rect_hits_ellipse(self.block[0] - 0.5, self.block[1] + 0.5, c, e):
                    break
                e = e * 0.95
        self.zone_c, self.zone_e = c, e

    # ---------------------------------------------------------------- placement
    def fits(self, parts, yaw=0.0, origin=(0.0, 0.0)) -> bool:
        if len(self.scene.primitives) + len(parts) > MAX_PRIMITIVES:
            return False
        lo, hi = _parts_bounds(parts, yaw, origin)
        if np.any(lo < self.scene.room_min - 1e-9) or np.any(hi > self.scene.room_max + 1e-9):
            return False
        overlap = np.minimum(hi[:, None], self.hi[None]) - np.maximum(lo[:, None], self.lo[None])
        if np.any(np.all(overlap > 1e-6, axis=2)):
            return False
        return not any(_rect_hits_ellipse(l, h, self.zone_c, self.zone_e) for l, h in zip(lo, hi))

    def place(self, name, parts, color, yaw=0.0, origin=(0.0, 0.0)) -> Optional[int]:
        """Adds the object if it fits (inside, off the walkway, touching but not entering anything); else None."""
        return self._add(name, parts, color, yaw, origin) if self.fits(parts, yaw, origin) else None

    def reserve(self, parts, yaw, origin):
        """Keeps a volume free without adding anything (e.g. in front of a door)."""
        lo, hi = _parts_bounds(parts, yaw, origin)
        self.lo, self.hi = np.vstack([self.lo, lo]), np.vstack([self.hi, hi])

    def add_support(self, iid, top_part, yaw, origin, inset=0.0):
        lo, hi = _parts_bounds([top_part], yaw, origin)
        self.supports.append((lo[0, 0] + inset, lo[0, 1] + inset, hi[0, 0] - inset, hi[0, 1] - inset, hi[0, 2], iid))

    def wall_spots(self, half_w, tries, corner_bias=0.3, min_len=0.0):
        """Random (wall, u) with u the distance of the object's centre along the wall; corners favoured."""
        walls = [w for w in self.walls if w.length >= max(2 * half_w + 0.02, min_len)]
        if not walls:
            return
        p = np.array([w.length for w in walls])
        for _ in range(tries):
            w = walls[int(self.rng.choice(len(walls), p=p / p.sum()))]
            if self.rng.random() < corner_bias:
                u = half_w + 0.005 if self.rng.random() < 0.5 else w.length - half_w - 0.005
            else:
                u = float(self.rng.uniform(half_w + 0.005, w.length - half_w - 0.005))
            yield w, u

    def place_at_spot_or_wall(self, name, parts, color, spot, half_w, corner_bias):
        """At ``spot`` (wall, u) when given, else anywhere along a wall → (iid, wall, u), Nones if it fails."""
        if spot is not None:
            w, u = spot
            return self.place(name, parts, color, w.yaw, tuple(w.p0 + u * w.t)), w, u
        placed = self.place_on_wall(name, parts, color, half_w, 40, corner_bias)
        return placed if placed is not None else (None, None, None)

    def place_on_wall(self, name, parts, color, half_w, tries=40, corner_bias=0.3):
        """Object in a wall frame (x along the wall, y into the room, origin on the wall's foot) → (iid, wall, u)."""
        for w, u in self.wall_spots(half_w, tries, corner_bias):
            origin = tuple(w.p0 + u * w.t)
            iid = self.place(name, parts, color, w.yaw, origin)
            if iid is not None:
                return iid, w, u
        return None

    # ---------------------------------------------------------------- wall openings and decorations
    def add_door(self):
        r = self.rng
        dw, dh = float(r.uniform(0.8, 0.95)), min(float(r.uniform(2.0, 2.1)), self.H - 0.2)
        parts = [('box', (0.0, 0.02, dh / 2), (dw / 2, 0.02, dh / 2)),
                 ('box', (dw / 2 - 0.1, 0.05, 1.0), (0.06, 0.01, 0.012), (200, 200, 200)),
                 ('box', (0.0, 0.012, dh + 0.04), (dw / 2 + 0.06, 0.012, 0.04), (240, 240, 235))]
        swing = [('box', (0.0, 0.04 + 0.45, 1.05), (dw / 2, 0.45, 1.05))]
        door_col = self.pick_shared(0.5, 'wall', 'white', 'wood')
        for w, u in self.wall_spots(dw / 2 + 0.1, 40, 0.0):
            origin = tuple(w.p0 + u * w.t)
            if self.fits(parts + swing, w.yaw, origin):
                col = self.color('wood')          # drawn either way: the layout stream stays the same
                iid = self._add('door', parts, col if door_col is None else door_col, w.yaw, origin)
                self.reserve(swing, w.yaw, origin)
                return iid
        return None

    def add_window(self, high=False):
        r = self.rng
        ww = float(r.uniform(0.6, 0.9) if high else r.uniform(0.8, 1.8))
        z0 = float(r.uniform(1.2, 1.4) if high else r.uniform(0.95, 1.1))
        wh = min(float(r.uniform(0.6, 0.9) if high else r.uniform(1.0, 1.3)), self.H - 0.3 - z0)
        frame = (240, 240, 236)
        parts = [('box', (0.0, 0.01, z0 + wh / 2), (ww / 2, 0.01, wh / 2)),
                 ('box', (0.0, 0.025, z0 + wh / 2), (0.025, 0.005, wh / 2), frame),
                 ('box', (0.0, 0.05, z0 - 0.02), (ww / 2 + 0.04, 0.05, 0.02), frame)]
        placed = self.place_on_wall('window', parts, self.color('glass', 8), ww / 2 + 0.45, 30, 0.0)
        if placed is None:
            return None
        self.windows.append((placed[1], placed[2], ww, z0, wh))
        return placed[0]

    def add_curtain(self, window, long=None):
        """Two panels flanking a window (partly covering it) on a rod, in front of the sill."""
        w, u, ww, z0, wh = window
        r = self.rng
        pw, ov = float(r.uniform(0.25, 0.4)), float(r.uniform(0.0, 0.15))
        top = min(z0 + wh + 0.12, self.H - 0.05)
        origin = tuple(w.p0 + u * w.t)
        col = self.shared(self.color('curtain'), 0.3, 'wall', 'white')
        for is_long in ((True, False) if long is None else (long,)):
            bottom = 0.02 if is_long else z0 - 0.15
            xc = ww / 2 + 0.04 + pw / 2 - ov
            parts = [('box', (s * xc, 0.135, (top + bottom) / 2), (pw / 2, 0.015, (top - bottom) / 2))
                     for s in (-1, 1)]
            parts.append(('box', (0.0, 0.135, top + 0.012), (xc + pw / 2 + 0.03, 0.012, 0.012), (90, 90, 90)))
            iid = self.place('curtain', parts, col, w.yaw, origin)
            if iid is not None:
                return iid
        return None

    def add_picture(self):
        r = self.rng
        pw, ph = float(r.uniform(0.3, 1.0)), float(r.uniform(0.3, 0.75))
        zc = float(r.uniform(1.3, max(1.31, min(1.8, self.H - ph / 2 - 0.15))))
        if r.random() < 0.7:    # framed canvas
            parts = [('box', (0.0, 0.01, zc), (pw / 2, 0.01, ph / 2), self.color('wood')),
                     ('box', (0.0, 0.0225, zc), (pw / 2 - 0.03, 0.0025, ph / 2 - 0.03))]
        else:                   # poster
            parts = [('box', (0.0, 0.005, zc), (pw / 2, 0.005, ph / 2))]
        placed = self.place_on_wall('picture', parts, self.color('art', 30), pw / 2, 30, 0.0)
        return None if placed is None else placed[0]

    # ---------------------------------------------------------------- furniture against walls
    def add_bed(self):
        r = self.rng
        for double in ((True, False) if min(self.L, self.W) > 4.2 and r.random() < 0.7 else (False,)):
            bw = float(r.uniform(1.4, 1.8) if double else r.uniform(0.9, 1.05))
            bl, hb = float(r.uniform(1.95, 2.1)), float(r.uniform(0.85, 1.15))
            y0, bedding = 0.08, self.color('bedding', 8)
            parts = [('box', (0.0, y0 + bl / 2, 0.15), (bw / 2, bl / 2, 0.15)),
                     ('box', (0.0, 0.04, hb / 2), (bw / 2, 0.04, hb / 2)),
                     ('box', (0.0, y0 + bl / 2, 0.39), (bw / 2 - 0.02, bl / 2 - 0.02, 0.09), bedding),
                     ('box', (0.0, y0 + (0.45 + bl) / 2, 0.495), (bw / 2 - 0.01, (bl - 0.45) / 2, 0.015),
                      self.color('cover'))]
            xs = (-bw / 4, bw / 4) if double else (0.0,)
            parts += [('box', (x, y0 + 0.22, 0.53), (min(0.3, bw / 4 - 0.03) if double else 0.3, 0.13, 0.05),
                       bedding) for x in xs]
            placed = self.place_on_wall('bed', parts, self.shared(self.color('wood'), 0.5, 'wood', 'floor', 'white'),
                                        bw / 2, 50, 0.4)
            if placed is not None:
                iid, w, u = placed
                for side in r.permutation([-1, 1])[: int(r.integers(1, 3))]:   # nightstands with lamps
                    nw = float(r.uniform(0.4, 0.55))
                    self.add_cabinet(variant='nightstand', spot=(w, u + side * (bw / 2 + 0.06 + nw / 2)), width=nw)
                return iid
        return None

    def add_cabinet(self, variant=None, spot=None, width=None):
        """Nightstand, dresser, wardrobe, TV stand, filing cabinet, tall kitchen cabinet or wall-hung cabinet."""
        r = self.rng
        variant = variant or str(r.choice(['dresser', 'wardrobe', 'tv_stand', 'filing']))
        dims = {'nightstand': ((0.4, 0.55), (0.35, 0.45), (0.5, 0.62)),
                'dresser': ((0.8, 1.4), (0.45, 0.55), (0.8, 1.0)),
                'wardrobe': ((1.0, 1.6), (0.55, 0.62), (1.9, 2.2)),
                'tv_stand': ((1.2, 1.8), (0.38, 0.45), (0.45, 0.55)),
                'filing': ((0.45, 0.9), (0.5, 0.6), (0.7, 1.3)), 'tall': ((0.5, 0.8), (0.55, 0.62), (1.9, 2.1)),
                'wall_hung': ((0.6, 1.2), (0.3, 0.36), (0.6, 0.7))}[variant]
        cw = width if width is not None else float(r.uniform(*dims[0]))
        cd, ch = float(r.uniform(*dims[1])), min(float(r.uniform(*dims[2])), self.H - 0.1)
        z0 = float(r.uniform(1.45, 1.55)) if variant == 'wall_hung' else 0.0
        front = self.color('painted' if r.random() < 0.5 else 'wood')
        own = self.pick_shared(0.45, 'wall', 'white', 'wood')    # one colour all over, shared with the room
        front = front if own is None else own
        body = ('box', (0.0, cd / 2, z0 + ch / 2), (cw / 2, cd / 2, ch / 2))
        if variant in ('wardrobe', 'tall', 'wall_hung') or (variant == 'tv_stand' and r.random() < 0.5):
            parts = [body] + [('box', (s * cw / 4, cd + 0.005, z0 + ch / 2), (cw / 4 - 0.008, 0.005, ch / 2 - 0.02),
                               front) for s in (-1, 1)]
        else:
            n = max(1, int(round(ch / 0.3)))
            parts = [body] + [('box', (0.0, cd + 0.005, z0 + (k + 0.5) * ch / n),
                               (cw / 2 - 0.02, 0.005, ch / (2 * n) - 0.015), front) for k in range(n)]
            parts = parts[:5]
        parts.append(('box', (0.0, cd + 0.016, z0 + ch * (0.55 if variant != 'wall_hung' else 0.2)),
                      (min(0.1, cw / 4), 0.006, 0.01), (190, 190, 195)))
        color = self.color('wood' if r.random() < 0.6 else 'painted')
        color = color if own is None else own
        iid, w, u = self.place_at_spot_or_wall('cabinet', parts, color, spot, cw / 2, 0.4)
        if iid is not None and ch < 1.3 and variant != 'wall_hung':
            self.add_support(iid, body, w.yaw, tuple(w.p0 + u * w.t), inset=0.02)
        return iid

    def add_bookshelf(self):
        r = self.rng
        bw, bd = float(r.uniform(0.7, 1.2)), float(r.uniform(0.28, 0.36))
        bh = min(float(r.uniform(1.5, 2.1)), self.H - 0.2)
        n = int(r.integers(3, 6))
        levels = [0.04 + k * (bh - 0.06) / n for k in range(n + 1)]
        parts = [('box', (s * (bw / 2 - 0.01), bd / 2, bh / 2), (0.01, bd / 2, bh / 2)) for s in (-1, 1)]
        parts.append(('box', (0.0, 0.01, bh / 2), (bw / 2 - 0.02, 0.01, bh / 2)))
        parts += [('box', (0.0, bd / 2 + 0.01, z), (bw / 2 - 0.02, bd / 2 - 0.01, 0.01)) for z in levels]
        inner = bw - 0.04
        for z0, z1 in zip(levels[:-1], levels[1:]):
            x = -inner / 2 + float(r.uniform(0.0, 0.1))
            for _ in range(int(r.integers(1, 3))):
                gw = float(r.uniform(0.15, 0.45)) * inner
                if x + gw > inner / 2 - 0.01 or r.random() < 0.1:
                    break
                h = min(float(r.uniform(0.16, 0.27)), z1 - z0 - 0.05)
                dep = float(r.uniform(0.16, bd - 0.06))
                parts.append(('box', (x + gw / 2, 0.02 + dep / 2, z0 + 0.01 + h / 2), (gw / 2, dep / 2, h / 2),
                              self.color('book', 35)))
                x += gw + float(r.uniform(0.03, 0.15))
        placed = self.place_on_wall('bookshelf', parts, self.shared(self.color('wood'), 0.5, 'wood', 'wall', 'white'),
                                    bw / 2, 40, 0.4)
        return None if placed is None else placed[0]

    def add_desk(self):
        """Desk against a wall (top, side panel, drawer block) with a chair tucked under or pulled out."""
        r = self.rng
        dw, dd, dh = float(r.uniform(1.1, 1.6)), float(r.uniform(0.6, 0.75)), float(r.uniform(0.72, 0.76))
        top = ('box', (0.0, dd / 2, dh - 0.015), (dw / 2, dd / 2, 0.015))
        lh = (dh - 0.03) / 2
        parts = [top, ('box', (-dw / 2 + 0.02, dd / 2, lh), (0.02, dd / 2 - 0.03, lh)),
                 ('box', (dw / 2 - 0.21, dd / 2, lh), (0.19, dd / 2 - 0.03, lh))]
        parts += [('box', (dw / 2 - 0.21, dd - 0.025, z), (0.06, 0.005, 0.012), (190, 190, 195)) for z in (0.25, 0.5)]
        color = self.shared(self.color('wood' if r.random() < 0.6 else 'painted'), 0.5, 'wood', 'white', 'floor')
        placed = self.place_on_wall('desk', parts, color, dw / 2, 40, 0.3)
        if placed is None:
            return None
        iid, w, u = placed
        origin = tuple(w.p0 + u * w.t)
        self.add_support(iid, top, w.yaw, origin, inset=0.03)
        cw = float(r.uniform(0.2, 0.24))
        chair = _chair_parts(cw, float(r.uniform(0.44, 0.5)), float(r.uniform(0.4, 0.55)))
        gap_c = (-dw / 2 + 0.04 + dw / 2 - 0.4) / 2
        col = self.shared(self.color('chair'), 0.4, color)             # a chair of the desk's wood
        for tuck in (float(r.uniform(0.08, 0.18)), float(r.uniform(-0.3, -0.05))):
            jit = 0.0 if tuck > 0 else float(r.uniform(-0.25, 0.25))
            xy = _to_frame(w.yaw, origin, (gap_c, dd + cw - tuck))
            if self.place('chair', chair, col, w.yaw - np.pi / 2 + jit, xy) is not None:
                break
        return iid

    def add_sofa(self, coffee_table=True, armchair=False):
        r = self.rng
        sw, sd = float(r.uniform(0.8, 1.0) if armchair else r.uniform(1.5, 2.3)), float(r.uniform(0.8, 0.95))
        cush = self.color('fabric', 10)
        own = self.pick_shared(0.35, 'floor', 'wall')                 # a beige sofa on a beige floor
        cush = cush if own is None else own
        parts = [('box', (0.0, 0.1, 0.44), (sw / 2, 0.1, 0.44)),
                 ('box', (0.0, sd / 2 + 0.1, 0.19), (sw / 2 - 0.12, sd / 2 - 0.1, 0.19))]
        parts += [('box', (s * (sw / 2 - 0.06), sd / 2 + 0.1, 0.3), (0.06, sd / 2 - 0.1, 0.3)) for s in (-1, 1)]
        nc = 1 if armchair else 2 if sw < 1.9 else 3
        cwid = (sw - 0.24) / nc
        parts += [('box', (-sw / 2 + 0.12 + (k + 0.5) * cwid, sd / 2 + 0.12, 0.43),
                   (cwid / 2 - 0.01, sd / 2 - 0.13, 0.05), cush) for k in range(nc)]
        body = self.color('fabric')
        placed = self.place_on_wall('sofa', parts, body if own is None else own, sw / 2, 40, 0.2)
        if placed is None:
            return None
        iid, w, u = placed
        if coffee_table:
            a, b, h = min(0.55, sw / 2 - 0.2), float(r.uniform(0.22, 0.3)), float(r.uniform(0.38, 0.45))
            xy = _to_frame(w.yaw, tuple(w.p0 + u * w.t), (0.0, sd + float(r.uniform(0.25, 0.4)) + b))
            self.add_table(center=xy, half=(a, b), height=h, yaw=w.yaw, chairs=0)
        return iid

    def add_counter(self, sink=True, width=None, depth=0.6, height=None, spot=None):
        """Kitchen counter run or bathroom vanity (base + top slab) with an optional sink resting on it."""
        r = self.rng
        cw = width if width is not None else float(r.uniform(1.4, 3.0))
        ch = height if height is not None else float(r.uniform(0.86, 0.92))
        top = ('box', (0.0, depth / 2, ch - 0.02), (cw / 2, depth / 2, 0.02))
        parts = [top, ('box', (0.0, depth / 2 - 0.02, (ch - 0.04) / 2), (cw / 2, depth / 2 - 0.02, (ch - 0.04) / 2),
                       self.shared(self.color('painted'), 0.4, 'wall', 'white')),
                 ('box', (0.0, depth - 0.035, 0.05), (cw / 2 - 0.01, 0.005, 0.05), (50, 50, 50))]
        color = self.shared(self.color('stone'), 0.3, 'white', 'floor')
        iid, w, u = self.place_at_spot_or_wall('counter', parts, color, spot, cw / 2, 0.5)
        if iid is None:
            return None
        origin = tuple(w.p0 + u * w.t)
        if sink:
            sx, sy = float(r.uniform(0.2, 0.3)), min(0.2, depth / 2 - 0.06)
            xs = float(r.uniform(-cw / 2 + sx + 0.1, cw / 2 - sx - 0.1)) if cw > 2 * sx + 0.2 else 0.0
            basin = [('box', (xs, depth / 2 + 0.02, ch + 0.06), (sx, sy, 0.06)),
                     ('cylinder', (xs, 0.06, ch + 0.14), (0.015, 0.015, 0.14), (200, 200, 205))]
            self.place('sink', basin, self.color('ceramic' if r.random() < 0.6 else 'metal', 6), w.yaw, origin)
        self.add_support(iid, top, w.yaw, origin, inset=0.04)
        self.counters.append((w, u, cw))
        return iid

    def add_refrigerator(self):
        r = self.rng
        fw, fd = float(r.uniform(0.6, 0.85)), float(r.uniform(0.65, 0.75))
        fh = min(float(r.uniform(1.7, 1.95)), self.H - 0.15)
        dark = (45, 45, 48)
        parts = [('box', (0.0, fd / 2, fh / 2), (fw / 2, fd / 2, fh / 2)),
                 ('box', (0.0, fd + 0.004, fh * 0.66), (fw / 2 - 0.01, 0.004, 0.006), dark),
                 ('box', (fw / 2 - 0.07, fd + 0.02, fh * 0.8), (0.012, 0.02, 0.1), dark),
                 ('box', (fw / 2 - 0.07, fd + 0.02, fh * 0.45), (0.012, 0.02, 0.18), dark)]
        color = self.color('metal', 8)
        for w, u, cw in self.counters:        # next to a counter first
            for side in (-1, 1):
                along = u + side * (cw / 2 + 0.03 + fw / 2)
                iid = self.place('refrigerator', parts, color, w.yaw, tuple(w.p0 + along * w.t))
                if iid is not None:
                    return iid
        placed = self.place_on_wall('refrigerator', parts, color, fw / 2, 40, 0.5)
        return None if placed is None else placed[0]

    def add_toilet(self):
        r = self.rng
        s = float(r.uniform(0.9, 1.1))
        parts = [('box', (0.0, 0.1, 0.62), (0.19 * s, 0.09, 0.2)),
                 ('box', (0.0, 0.25, 0.2), (0.12, 0.1, 0.2)),
                 ('cylinder', (0.0, 0.2 + 0.2 * s, 0.19), (0.19 * s, 0.19 * s, 0.19)),
                 ('cylinder', (0.0, 0.2 + 0.2 * s, 0.395), (0.2 * s, 0.2 * s, 0.015), self.color('ceramic', 6))]
        placed = self.place_on_wall('toilet', parts, self.color('ceramic', 6), 0.21 * s, 40, 0.2)
        return None if placed is None else placed[0]

    def add_bathtub(self, shower_curtain=True):
        r = self.rng
        tl, tw, th, e = float(r.uniform(1.5, 1.8)), float(r.uniform(0.7, 0.8)), float(r.uniform(0.5, 0.58)), 0.06
        parts = [('box', (0.0, tw / 2, 0.06), (tl / 2, tw / 2, 0.06)),
                 ('box', (0.0, e / 2, th / 2), (tl / 2, e / 2, th / 2)),
                 ('box', (0.0, tw - e / 2, th / 2), (tl / 2, e / 2, th / 2))]
        parts += [('box', (s * (tl / 2 - e / 2), tw / 2, th / 2), (e / 2, tw / 2 - e, th / 2)) for s in (-1, 1)]
        parts.append(('box', (0.0, tw / 2, 0.125), (tl / 2 - e, tw / 2 - e, 0.005), (190, 215, 235)))
        placed = self.place_on_wall('bathtub', parts, self.color('ceramic', 6), tl / 2, 40, 0.8)
        if placed is None:
            return None
        iid, w, u = placed
        if shower_curtain:
            cl = tl * float(r.uniform(0.35, 0.6))
            top = min(2.0, self.H - 0.1)
            side = 1 if r.random() < 0.5 else -1
            cparts = [('box', (side * (tl / 2 - cl / 2), tw + 0.02, (top + th + 0.1) / 2),
                       (cl / 2, 0.01, (top - th - 0.1) / 2)),
                      ('box', (0.0, tw + 0.02, top + 0.01), (tl / 2, 0.01, 0.01), (180, 180, 185))]
            self.place('curtain', cparts, self.color('curtain'), w.yaw, tuple(w.p0 + u * w.t))
        return iid

    def add_pedestal_sink(self):
        r = self.rng
        sx = float(r.uniform(0.24, 0.3))
        parts = [('cylinder', (0.0, 0.24, 0.4), (0.07, 0.07, 0.4)),
                 ('box', (0.0, 0.24, 0.86), (sx, 0.22, 0.06)),
                 ('cylinder', (0.0, 0.07, 0.99), (0.015, 0.015, 0.07), (200, 200, 205))]
        placed = self.place_on_wall('sink', parts, self.color('ceramic', 6), sx, 40, 0.0)
        return None if placed is None else placed[0]

    # ---------------------------------------------------------------- free-standing furniture
    def add_table(self, center=None, half=None, height=None, yaw=None, chairs=4, round_top=False, tries=60):
        """Rectangular or round table; up to ``chairs`` chairs around it, some tucked partly under the top."""
        r = self.rng
        h = height if height is not None else float(r.uniform(0.72, 0.78))
        if round_top:
            rad = float(r.uniform(0.45, 0.6))
            a = b = rad
            top = ('cylinder', (0.0, 0.0, h - 0.02), (rad, rad, 0.02))
            parts = [top, ('cylinder', (0.0, 0.0, (h - 0.04) / 2), (0.05, 0.05, (h - 0.04) / 2)),
                     ('cylinder', (0.0, 0.0, 0.02), (0.25, 0.25, 0.02))]
        else:
            a, b = half if half is not None else (float(r.uniform(0.5, 0.95)), float(r.uniform(0.35, 0.5)))
            top = ('box', (0.0, 0.0, h - 0.0125), (a, b, 0.0125))
            lh = (h - 0.025) / 2
            parts = [top] + [('box', (sx * (a - 0.06), sy * (b - 0.06), lh), (0.03, 0.03, lh))
                             for sx in (-1, 1) for sy in (-1, 1)]
        color = self.shared(self.color('wood' if r.random() < 0.7 else 'painted'), 0.5, 'wood', 'floor')
        # chair seats around the table frame: (local xy of centre direction, edge half length along, outward distance)
        cw = float(r.uniform(0.2, 0.23))
        chair = _chair_parts(cw, float(r.uniform(0.44, 0.5)), float(r.uniform(0.4, 0.55)))
        slots = []
        for nx, ny, edge, along in ((0, 1, b, a), (0, -1, b, a), (1, 0, a, b), (-1, 0, a, b)):
            usable = 2 * along - (0.0 if round_top else 0.2)
            k = int(usable // (2 * cw + 0.1)) if not round_top else 1
            for i in range(min(k, 3)):
                off = 0.0 if k == 1 else (i - (k - 1) / 2) * usable / k
                slots.append((nx, ny, edge, off))
        order = r.permutation(len(slots))
        tucks = [float(r.uniform(0.08, 0.18)) if r.random() < 0.6 else -float(r.uniform(0.02, 0.3)) for _ in slots]
        jits = [float(r.uniform(-0.2, 0.2)) for _ in slots]
        ccol = self.shared(self.color('chair'), 0.5, color)          # wooden chairs at a wooden table
        need = min(chairs, 2)
        for t in range(tries if center is None else 1):
            yaw_t = yaw if yaw is not None else (0.0 if r.random() < 0.5 else np.pi / 2)
            if center is None:
                ex = np.abs(_parts_bounds(parts, yaw_t, (0.0, 0.0))[1][:, :2]).max(0)
                c = (float(r.uniform(ex[0] + 0.02, self.L - ex[0] - 0.02)),
                     float(r.uniform(ex[1] + 0.02, self.W - ex[1] - 0.02)))
            else:
                c = center
            if not self.fits(parts, yaw_t, c):
                continue
            chosen = []
            for j in order:
                if len(chosen) >= chairs:
                    break
                nx, ny, edge, off = slots[j]
                tuck = tucks[j]
                dist = edge + cw - tuck
                local = (off, ny * dist) if nx == 0 else (nx * dist, off)
                yaw_c = yaw_t + np.arctan2(-ny, -nx) + (jits[j] if tuck < 0 else 0.0)
                xy = _to_frame(yaw_t, c, local)
                ok = self.fits(chair, yaw_c, xy)
                if ok:
                    lo, hi = _parts_bounds(chair, yaw_c, xy)
                    for _, clo, chi in chosen:
                        ov = np.minimum(hi[:, None], chi[None]) - np.maximum(lo[:, None], clo[None])
                        if np.any(np.all(ov > 1e-6, axis=2)):
                            ok = False
                if ok:
                    chosen.append(((yaw_c, xy), lo, hi))
            if len(chosen) < need:
                continue
            iid = self._add('table', parts, color, yaw_t, c)
            for (yaw_c, xy), _, _ in chosen:
                self.place('chair', chair, ccol, yaw_c, xy)
            if round_top:
                s = a / np.sqrt(2) - 0.02
                self.supports.append((c[0] - s, c[1] - s, c[0] + s, c[1] + s, h, iid))
            else:
                self.add_support(iid, top, yaw_t, c, inset=0.03)
            return iid
        return None

    def add_chair_at_wall(self):
        cw = float(self.rng.uniform(0.2, 0.23))
        chair = _chair_parts(cw, float(self.rng.uniform(0.44, 0.5)), float(self.rng.uniform(0.4, 0.55)))
        col = self.shared(self.color('chair'), 0.3, 'wood', 'wall')
        for w, u in self.wall_spots(cw, 40, 0.3):
            xy = _to_frame(w.yaw, tuple(w.p0 + u * w.t), (0.0, cw + 0.02))
            iid = self.place('chair', chair, col, w.yaw + np.pi / 2, xy)
            if iid is not None:
                return iid
        return None

    # ---------------------------------------------------------------- plants, lamps, small clutter
    def _plant_parts(self, small):
        r = self.rng
        if small:
            pr, ph, fr = float(r.uniform(0.05, 0.08)), float(r.uniform(0.07, 0.12)), float(r.uniform(0.08, 0.14))
            stem = 0.0
        else:
            pr, ph, fr = float(r.uniform(0.12, 0.2)), float(r.uniform(0.22, 0.4)), float(r.uniform(0.22, 0.38))
            stem = float(r.uniform(0.2, 0.7)) if r.random() < 0.4 else 0.0
        parts = [('cylinder', (0.0, 0.0, ph / 2), (pr, pr, ph / 2), self.color('pot'))]
        if stem:
            parts.append(('cylinder', (0.0, 0.0, ph + stem / 2), (0.02, 0.02, stem / 2), (95, 70, 40)))
        parts.append(('sphere', (0.0, 0.0, ph + stem + 0.8 * fr), (fr, fr, fr)))
        return parts, max(pr, fr)

    def _lamp_parts(self, small):
        r = self.rng
        if small:
            pole, br, sr, sh = (float(v) for v in (r.uniform(0.22, 0.35), r.uniform(0.05, 0.08), r.uniform(0.09, 0.13),
                                                   0.08))
        else:
            pole, br, sr, sh = (float(v) for v in (r.uniform(1.4, 1.7), r.uniform(0.12, 0.16), r.uniform(0.15, 0.22),
                                                   0.13))
        pole = min(pole, self.H - 0.45)
        dark = self.color('metal', 8)
        parts = [('cylinder', (0.0, 0.0, 0.01), (br, br, 0.01), dark),
                 ('cylinder', (0.0, 0.0, pole / 2), (0.012 if small else 0.018,) * 2 + (pole / 2,), dark)]
        if r.random() < 0.3:
            parts.append(('sphere', (0.0, 0.0, pole + sr * 0.7), (sr * 0.8,) * 3))
        else:
            parts.append(('cylinder', (0.0, 0.0, pole + sh * 0.6), (sr, sr, sh)))
        return parts, max(br, sr)

    def add_floor_item(self, name, small=False):
        """A floor plant or floor lamp, near a wall (often in a corner)."""
        parts, rad = self._plant_parts(small) if name == 'plant' else self._lamp_parts(small)
        color = self.color('leaf' if name == 'plant' else 'shade')
        for w, u in self.wall_spots(rad, 50, 0.5):
            xy = _to_frame(w.yaw, tuple(w.p0 + u * w.t), (0.0, rad + float(self.rng.uniform(0.01, 0.12))))
            iid = self.place(name, parts, color, 0.0, xy)
            if iid is not None:
                return iid
        return None

    def add_on_top(self, name, tries=30):
        """A small plant or table lamp resting on a table, desk, counter or low cabinet."""
        if not self.supports:
            return None
        parts, rad = self._plant_parts(True) if name == 'plant' else self._lamp_parts(True)
        color = self.color('leaf' if name == 'plant' else 'shade')
        r = self.rng
        for _ in range(tries):
            x0, y0, x1, y1, z, _ = self.supports[int(r.integers(len(self.supports)))]
            if x1 - x0 < 2 * rad or y1 - y0 < 2 * rad:
                continue
            xy = (float(r.uniform(x0 + rad, x1 - rad)), float(r.uniform(y0 + rad, y1 - rad)))
            iid = self.place(name, _shifted(parts, z), color, 0.0, xy)
            if iid is not None:
                return iid
        return None

    def classes(self) -> set:
        return {p.class_id for p in self.scene.primitives}


def _furnish(P: _Planner):
    """Fills the room according to its type; everything is optional, placed only where it fits."""
    r, k = P.rng, P.kind
    chance = lambda p: r.random() < p  # noqa: E731
    P.add_door()
    if k in ('living_room', 'studio') and chance(0.4):
        P.add_door()
    n_win = 1 if k == 'bathroom' else int(r.integers(1, 3 if k in ('bedroom', 'kitchen') else 4))
    for _ in range(n_win):
        P.add_window(high=(k == 'bathroom'))
    for win in list(P.windows):
        if chance({'bathroom': 0.6, 'office': 0.5, 'kitchen': 0.6}.get(k, 0.85)):
            P.add_curtain(win, long=None if k != 'bathroom' else False)
    if k == 'bedroom':
        P.add_bed()
        if chance(0.7):
            P.add_cabinet('wardrobe')
        if chance(0.5):
            P.add_cabinet('dresser')
        if chance(0.7):
            P.add_desk()
        if chance(0.6):
            P.add_bookshelf()
        if chance(0.25):
            P.add_sofa(coffee_table=False)
    elif k == 'living_room':
        P.add_sofa(coffee_table=chance(0.8))
        if chance(0.5):
            P.add_sofa(coffee_table=False)
        P.add_cabinet('tv_stand')
        for _ in range(int(r.integers(1, 3))):
            P.add_bookshelf()
        if chance(0.6):
            P.add_table(chairs=int(r.integers(2, 7)), round_top=chance(0.3))
        else:
            P.add_chair_at_wall()
        if chance(0.5):
            P.add_cabinet('dresser')
    elif k == 'office':
        for _ in range(int(r.integers(2, 4))):
            P.add_desk()
        for _ in range(int(r.integers(1, 4))):
            P.add_bookshelf()
        for _ in range(int(r.integers(1, 3))):
            P.add_cabinet('filing')
        if chance(0.6):
            P.add_table(chairs=int(r.integers(2, 7)))
        if chance(0.4):
            P.add_sofa(coffee_table=False)
    elif k == 'kitchen':
        P.add_counter(sink=True)
        if chance(0.6):
            P.add_counter(sink=False)
        for w, u, cw in list(P.counters):      # wall-hung cabinets above the counters
            for _ in range(int(r.integers(1, 3))):
                hw = float(r.uniform(0.3, 0.6))
                if cw > 2 * hw:
                    P.add_cabinet('wall_hung', spot=(w, u + float(r.uniform(-cw / 2 + hw, cw / 2 - hw))), width=2 * hw)
        P.add_refrigerator()
        if chance(0.4):
            P.add_cabinet('tall')
        P.add_table(chairs=int(r.integers(2, 5)), round_top=chance(0.4))
    elif k == 'bathroom':
        P.add_bathtub(shower_curtain=chance(0.7))
        P.add_toilet()
        if chance(0.5):
            P.add_pedestal_sink()
            P.add_counter(sink=False, width=float(r.uniform(0.6, 1.0)), depth=0.45, height=0.85)
        else:
            P.add_counter(sink=True, width=float(r.uniform(0.8, 1.4)), depth=0.5, height=0.85)
        P.add_cabinet('tall' if chance(0.5) else 'filing')
    else:   # studio: a bit of everything
        P.add_bed()
        P.add_sofa(coffee_table=chance(0.5))
        P.add_counter(sink=True, width=float(r.uniform(1.4, 2.2)))
        P.add_refrigerator()
        P.add_table(chairs=int(r.integers(2, 5)), round_top=chance(0.4))
        P.add_desk()
        P.add_bookshelf()
    # more of what fits this kind of room, until the floor is reasonably full
    fill = {'bedroom': 'cabinet plant plant lamp chair bookshelf armchair side_table',
            'living_room': 'armchair armchair plant plant lamp side_table side_table cabinet bookshelf chair',
            'office': 'desk desk cabinet cabinet bookshelf plant chair lamp',
            'kitchen': 'cabinet chair chair plant counter side_table',
            'bathroom': 'cabinet cabinet plant lamp chair',
            'studio': 'armchair plant plant lamp side_table cabinet cabinet bookshelf chair desk'}[k].split()
    makers = {'cabinet': P.add_cabinet, 'plant': lambda: P.add_floor_item('plant'),
              'lamp': lambda: P.add_floor_item('lamp'), 'chair': P.add_chair_at_wall, 'bookshelf': P.add_bookshelf,
              'armchair': lambda: P.add_sofa(coffee_table=False, armchair=True), 'desk': P.add_desk,
              'counter': lambda: P.add_counter(sink=False, width=float(r.uniform(0.8, 1.6))),
              'side_table': lambda: P.add_table(half=(float(r.uniform(0.22, 0.35)),) * 2,
                                                height=float(r.uniform(0.45, 0.6)), chairs=0, tries=20)}
    for _ in range(int(P.L * P.W / 3.0)):
        if len(P.scene.primitives) > MAX_PRIMITIVES - 40:
            break
        makers[fill[int(r.integers(len(fill)))]]()
    # plants, lamps, things resting on other things, pictures
    for _ in range(int(r.integers(1, 3))):
        P.add_floor_item('plant')
    for _ in range(int(r.integers(0, 3)) if k != 'bathroom' else int(chance(0.5))):
        P.add_floor_item('lamp')
    for _ in range(int(r.integers(2, 5))):
        P.add_on_top('lamp' if chance(0.5) else 'plant')
    for _ in range(int(r.integers(2, 5))):
        P.add_picture()
    for name in ('plant', 'lamp'):         # always some of both
        for fn in (lambda: P.add_floor_item(name), lambda: P.add_on_top(name),
                   lambda: P.add_floor_item(name, small=True)):
            if class_id(name) in P.classes() or fn() is not None:
                break
    # top up to at least 13 distinct classes where possible
    fillers = [('plant', lambda: P.add_floor_item('plant') or P.add_on_top('plant')),
               ('lamp', lambda: P.add_on_top('lamp') or P.add_floor_item('lamp')),
               ('picture', P.add_picture), ('window', P.add_window), ('cabinet', P.add_cabinet),
               ('curtain', lambda: P.windows and P.add_curtain(P.windows[0])),
               ('chair', P.add_chair_at_wall), ('bookshelf', P.add_bookshelf),
               ('table', lambda: P.add_table(chairs=0, half=(0.3, 0.3), height=0.5)), ('desk', P.add_desk)]
    for name, fn in fillers:
        if len(P.classes()) >= 13:
            break
        if class_id(name) not in P.classes():
            fn()


def generate_scene(seed: int) -> Scene:
    """A labelled indoor room, deterministic by ``seed`` (named ``generated_{seed:04d}``).

    Interior ``room_min = 0`` .. ``room_max = (L, W, H)``: L 4-8 m, W 3.5-7 m, H 2.4-3.0 m, by room type. Floor,
    ceiling and outer walls are 0.1 m thick boxes outside the interior. About 45% of the larger rooms are L-shaped: a
    full-height box of class 'wall' fills one corner (inside the interior AABB).

    The room type is ``ROOM_TYPES[seed % 6]``:
      bedroom: bed (frame, headboard, mattress, blanket, pillows), nightstand cabinets, wardrobe/dresser, desk with
        chair, bookshelf, sometimes a sofa;
      living_room: sofa (+ coffee table), armchairs (class sofa), TV-stand cabinet, bookshelves, dining table with
        chairs or side tables;
      office: desks (top, side panel, drawer block) with chairs, bookshelves, filing cabinets, meeting table;
      kitchen: counters with a sink resting on one, wall-hung cabinets, refrigerator, table with chairs;
      bathroom: bathtub (floor and rims) with shower curtain, toilet (cylinder bowl, tank, seat), sink on a pedestal
        or on a counter, cabinets;
      studio: bed, sofa, counter with sink, refrigerator, table with chairs, desk, bookshelf.
    Every room also has a door, windows (sill, mullion; often curtains on a rod), framed pictures, floor plants (pot
    cylinder + foliage sphere) and lamps (pole + shade), and small plants and lamps resting on tables, desks,
    counters or low cabinets; bookshelves hold rows of books. Chairs are often tucked partly under tables and desks.
    Sizes (about ±20%) and colours (palette choice + jitter) vary with the seed. Each room has at least 12 classes
    (usually 13+, always a plant and a lamp); any 6 consecutive seeds show all 21 classes (checked for seeds 0-300).

    Distinct objects never interpenetrate: their primitives' AABBs at most touch (resting on, hanging on, tucked
    under). An ellipse in the middle of the free floor is kept empty for the camera (see ``scan_trajectory``). At
    most ``MAX_PRIMITIVES`` primitives.
    """
    P = _Planner(seed)
    _furnish(P)
    return P.scene
