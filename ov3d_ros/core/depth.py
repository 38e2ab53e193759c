"""Depth image decoding and validity masks."""
from __future__ import annotations

import math

import numpy as np
import torch

DEPTH_ENCODINGS = ('16UC1', 'mono16', '32FC1')


def depth_to_meters(depth: np.ndarray, encoding: str) -> np.ndarray:
    """Decode a raw depth image to metres.

    Args:
        depth: (H, W) uint16 millimetres for '16UC1'/'mono16', float32 metres for '32FC1'.
        encoding: the ROS image encoding.
    Returns:
        (H, W) float32 metres; invalid readings (0, NaN, inf) are returned as 0.
    """
    if encoding in ('16UC1', 'mono16'):
        if depth.dtype != np.uint16:
            raise ValueError(f'{encoding} depth must be uint16, got {depth.dtype}')
        return depth.astype(np.float32) * np.float32(1e-3)
    if encoding == '32FC1':
        out = np.asarray(depth, dtype=np.float32).copy()
        out[~np.isfinite(out)] = 0.0
        return out
    raise ValueError(f'depth encoding {encoding!r} not supported; expected one of {", ".join(DEPTH_ENCODINGS)}')


def valid_depth_mask(depth_m: torch.Tensor, min_depth_m: float, max_depth_m: float) -> torch.Tensor:
    """(H, W) bool: finite depth within [min_depth_m, max_depth_m] (so 0, NaN, inf, negative are invalid).

    With finite bounds the two comparisons alone reject NaN and +-inf (every comparison with NaN is false), so
    ``isfinite`` (several passes over the image on CPU: 0.85 of 1.1 ms for a strided 320x240 view) runs only for
    infinite bounds."""
    valid = (depth_m >= min_depth_m) & (depth_m <= max_depth_m)
    if not (math.isfinite(min_depth_m) and math.isfinite(max_depth_m)):
        valid &= torch.isfinite(depth_m)
    return valid
