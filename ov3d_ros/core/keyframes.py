"""Keyframe selection: bound the feature-extraction rate by camera motion and time."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from ov3d_ros.core.config import KeyframeConfig


class KeyframeSelector:
    """Accepts a frame when the camera moved, turned or waited enough since the last keyframe."""

    def __init__(self, cfg: KeyframeConfig):
        self.cfg = cfg
        self._last_T: Optional[np.ndarray] = None
        self._last_t: Optional[float] = None

    def reset(self) -> None:
        self._last_T, self._last_t = None, None

    def check(self, T_W_C: np.ndarray, stamp_s: float) -> bool:
        """True if the frame at pose ``T_W_C`` (4, 4) and time ``stamp_s`` should be a keyframe."""
        if self._last_T is None:
            return True
        dt = stamp_s - self._last_t
        if dt < self.cfg.min_interval_s:
            return False
        moved = np.linalg.norm(T_W_C[:3, 3] - self._last_T[:3, 3]) >= self.cfg.min_translation_m
        R_rel = self._last_T[:3, :3].T @ T_W_C[:3, :3]
        angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(R_rel) - 1.0) / 2.0))))
        turned = angle >= self.cfg.min_rotation_deg
        waited = self.cfg.max_interval_s > 0 and dt >= self.cfg.max_interval_s
        return bool(moved or turned or waited)

    def accept(self, T_W_C: np.ndarray, stamp_s: float) -> None:
        """Record that the frame was used as a keyframe."""
        self._last_T, self._last_t = np.array(T_W_C, dtype=np.float64), float(stamp_s)
