"""Top-down pictures of map clouds with segmented points highlighted."""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

HIGHLIGHTS = [(255, 40, 40), (40, 220, 40), (40, 120, 255), (255, 200, 0), (220, 0, 220), (0, 220, 220)]


def render_topdown(map_xyz: np.ndarray, map_rgb: np.ndarray, segments: Sequence[Tuple[str, np.ndarray]],
                   px_per_m: float = 80.0, point_size_m: float = 0.05) -> Image.Image:
    """Orthographic top view (x right, y up) of the map, ceiling removed, with each segment in a solid colour.

    Args:
        map_xyz: (N, 3) map points; map_rgb: (N, 3) uint8 colours.
        segments: (label, (M, 3) points) pairs drawn over the map, with a legend.
        point_size_m: each point is drawn as a square this wide (the voxel size).
    """
    keep = map_xyz[:, 2] < np.percentile(map_xyz[:, 2], 97) - 0.05 if len(map_xyz) else slice(None)
    xyz, rgb = map_xyz[keep], map_rgb[keep]
    lo, hi = xyz[:, :2].min(0) - 0.2, xyz[:, :2].max(0) + 0.2
    w, h = (np.ceil((hi - lo) * px_per_m)).astype(int) + 1
    img = np.full((h, w, 3), 255, dtype=np.uint8)

    def splat(points, colors):
        u = ((points[:, 0] - lo[0]) * px_per_m).astype(int).clip(0, w - 1)
        v = (h - 1 - (points[:, 1] - lo[1]) * px_per_m).astype(int).clip(0, h - 1)
        order = np.argsort(points[:, 2])            # draw low to high: the highest point wins each pixel
        k = int(np.ceil(point_size_m * px_per_m)) + 1
        for du in range(k):
            for dv in range(k):
                img[(v[order] + dv - k // 2).clip(0, h - 1), (u[order] + du - k // 2).clip(0, w - 1)] = colors[order]

    splat(xyz, (rgb * 0.6 + 100).clip(0, 255).astype(np.uint8))
    for i, (_, pts) in enumerate(segments):
        if len(pts):
            splat(pts, np.tile(np.array(HIGHLIGHTS[i % len(HIGHLIGHTS)], np.uint8), (len(pts), 1)))
    pic = Image.fromarray(img)
    draw = ImageDraw.Draw(pic)
    for i, (label, pts) in enumerate(segments):
        draw.rectangle([8, 8 + 16 * i, 20, 20 + 16 * i], fill=HIGHLIGHTS[i % len(HIGHLIGHTS)])
        draw.text((26, 8 + 16 * i), f'{label} ({len(pts)})', fill=(0, 0, 0))
    return pic
