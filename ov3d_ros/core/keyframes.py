"""Keyframe selection: bound the feature-extraction rate by camera motion and time."""
from __future__ import annotations

import math
from typing import Deque, Optional

import numpy as np

from ov3d_ros.core.config import KeyframeConfig


def motion(T_a: np.ndarray, T_b: np.ndarray) -> tuple:
    """(metres, degrees) the camera moved and turned from pose ``T_a`` to ``T_b`` (4, 4 each)."""
    moved = float(np.linalg.norm(T_b[:3, 3] - T_a[:3, 3]))
    R_rel = T_a[:3, :3].T @ T_b[:3, :3]
    return moved, math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(R_rel) - 1.0) / 2.0))))


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
        metres, angle = motion(self._last_T, T_W_C)
        moved = metres >= self.cfg.min_translation_m
        turned = angle >= self.cfg.min_rotation_deg
        waited = self.cfg.max_interval_s > 0 and dt >= self.cfg.max_interval_s
        return bool(moved or turned or waited)

    def accept(self, T_W_C: np.ndarray, stamp_s: float) -> None:
        """Record that the frame was used as a keyframe."""
        self._last_T, self._last_t = np.array(T_W_C, dtype=np.float64), float(stamp_s)


def thin_out(pending: Deque, rule: KeyframeConfig):
    """Remove and return the waiting keyframe (any object with a (4, 4) ``T_W_C``) whose removal leaves the
    smallest gap along the camera's path: the one whose neighbours in ``pending`` (oldest first) are closest, in
    camera motion measured in units of the keyframe rule (metres / ``min_translation_m`` + degrees /
    ``min_rotation_deg``). What waits stays spread along the path instead of losing a whole stretch of it; the
    newest is never removed, and with fewer than 3 waiting the oldest goes."""
    frames = list(pending)
    victim = 0
    if len(frames) >= 3:
        def gap(a, b) -> float:
            metres, degrees = motion(a.T_W_C, b.T_W_C)
            return metres / max(rule.min_translation_m, 1e-6) + degrees / max(rule.min_rotation_deg, 1e-6)
        victim = 1 + int(np.argmin([gap(frames[i - 1], frames[i + 1]) for i in range(1, len(frames) - 1)]))
    del pending[victim]
    return frames[victim]
