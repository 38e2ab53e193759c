"""Time stamps, rotations and pose lookup (interpolated pose tracks, a tf tree) for recorded ROS messages.

Pure numpy on message objects of any origin (rosbags or rclpy): quaternions are (x, y, z, w), poses (4, 4) float64.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np

from ov3d_ros.datasets import DatasetError


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def split_stamp(t: float) -> Tuple[int, int]:
    """(sec, nanosec) of ``t`` seconds, rounded to the nearest nanosecond."""
    t = float(t)
    if not math.isfinite(t) or t < 0:
        raise DatasetError(f'cannot write a bag message at time {t} s (needs a finite time >= 0)')
    sec = math.floor(t)
    nanosec = int(round((t - sec) * 1e9))
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    if sec >= 2**31:
        raise DatasetError(f'time {t} s does not fit a builtin_interfaces/Time (int32 seconds)')
    return int(sec), nanosec


def ns_to_s(ns: int) -> float:
    sec, nsec = divmod(int(ns), 1_000_000_000)
    return sec + nsec * 1e-9


# ---------------------------------------------------------------------------------------------------- rotations
def quat_to_matrix(q_xyzw) -> np.ndarray:
    """(..., 4) ROS-order (x, y, z, w) quaternions → (..., 3, 3) rotation matrices (normalised first)."""
    q = np.asarray(q_xyzw, dtype=np.float64)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    x, y, z, w = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    R = np.empty(q.shape[:-1] + (3, 3))
    R[..., 0, 0] = 1 - 2 * (y * y + z * z)
    R[..., 0, 1] = 2 * (x * y - z * w)
    R[..., 0, 2] = 2 * (x * z + y * w)
    R[..., 1, 0] = 2 * (x * y + z * w)
    R[..., 1, 1] = 1 - 2 * (x * x + z * z)
    R[..., 1, 2] = 2 * (y * z - x * w)
    R[..., 2, 0] = 2 * (x * z - y * w)
    R[..., 2, 1] = 2 * (y * z + x * w)
    R[..., 2, 2] = 1 - 2 * (x * x + y * y)
    return R


def matrix_to_quat(R) -> np.ndarray:
    """(3, 3) rotation matrix → unit (x, y, z, w) quaternion with w >= 0 (Shepperd's method)."""
    R = np.asarray(R, dtype=np.float64)
    tr = R[0, 0] + R[1, 1] + R[2, 2]
    if tr > 0:
        s = 2.0 * math.sqrt(tr + 1.0)
        q = [(R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s, 0.25 * s]
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        q = [0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s, (R[2, 1] - R[1, 2]) / s]
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * math.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        q = [(R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s, (R[0, 2] - R[2, 0]) / s]
    else:
        s = 2.0 * math.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        q = [(R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s, (R[1, 0] - R[0, 1]) / s]
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return -q if q[3] < 0 else q


def slerp(q0, q1, a: float) -> np.ndarray:
    """Spherical interpolation between unit (x, y, z, w) quaternions (shortest arc), ``a`` in [0, 1]."""
    q0, q1 = np.asarray(q0, dtype=np.float64), np.asarray(q1, dtype=np.float64)
    d = float(np.dot(q0, q1))
    if d < 0:
        q1, d = -q1, -d
    if d > 0.9995:                              # nearly parallel: normalised lerp
        q = q0 + a * (q1 - q0)
    else:
        th = math.acos(min(d, 1.0))
        q = (math.sin((1 - a) * th) * q0 + math.sin(a * th) * q1) / math.sin(th)
    return q / np.linalg.norm(q)


def interpolate_pose(T0: np.ndarray, T1: np.ndarray, a: float) -> np.ndarray:
    """(4, 4) rigid transform a fraction ``a`` in [0, 1] of the way from (4, 4) ``T0`` to ``T1``: translation
    linear, rotation slerp (tf2's interpolation between two stamps)."""
    T0, T1 = np.asarray(T0, dtype=np.float64), np.asarray(T1, dtype=np.float64)
    return _between(T0[:3, 3], matrix_to_quat(T0[:3, :3]), T1[:3, 3], matrix_to_quat(T1[:3, :3]), float(a))


def _between(t0, q0, t1, q1, a: float) -> np.ndarray:
    """(4, 4) transform a fraction ``a`` of the way from (t0, q0) to (t1, q1): translation linear, rotation slerp."""
    return _transform((1 - a) * t0 + a * t1, slerp(q0, q1, a))


def _transform(t, q) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3] = quat_to_matrix(q)
    T[:3, 3] = t
    return T


def _inv(T: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = T[:3, :3].T
    out[:3, 3] = -T[:3, :3].T @ T[:3, 3]
    return out


def read_tq(where: str, t, q) -> Tuple[np.ndarray, np.ndarray]:
    tv = np.array([t.x, t.y, t.z], dtype=np.float64)
    qv = np.array([q.x, q.y, q.z, q.w], dtype=np.float64)
    n = float(np.linalg.norm(qv)) if np.all(np.isfinite(qv)) else float('nan')
    if not np.all(np.isfinite(tv)) or not 0.9 <= n <= 1.1:
        raise DatasetError(f'{where}: invalid pose (position {tv.tolist()}, quaternion xyzw {qv.tolist()}; '
                           'expected finite numbers and a unit quaternion)')
    return tv, qv / n


class PoseTrack:
    """Time series of rigid transforms (one tf edge or a pose topic), looked up by time.

    ``at(t)``: the exact pose at a stamp; else, when the two poses bracketing ``t`` are at most ``max_gap_ns``
    apart, linear interpolation of the translation and slerp of the rotation between them; else the nearest pose
    when it is within ``slop_ns``; else None (no extrapolation beyond the slop).
    """

    def __init__(self, stamps_ns, translations, quats_xyzw):
        order = np.argsort(np.asarray(stamps_ns, dtype=np.int64), kind='stable')
        self.stamps = np.asarray(stamps_ns, dtype=np.int64)[order]
        self.t = np.asarray(translations, dtype=np.float64).reshape(-1, 3)[order]
        self.q = np.asarray(quats_xyzw, dtype=np.float64).reshape(-1, 4)[order]

    def __len__(self) -> int:
        return len(self.stamps)

    def at(self, t_ns: int, slop_ns: int, max_gap_ns: int) -> Optional[np.ndarray]:
        s, n = self.stamps, len(self.stamps)
        if n == 0:
            return None
        i = int(np.searchsorted(s, t_ns))                 # first stamp >= t
        if i < n and s[i] == t_ns:
            return _transform(self.t[i], self.q[i])
        if 0 < i < n and s[i] - s[i - 1] <= max_gap_ns:
            a = (t_ns - s[i - 1]) / float(s[i] - s[i - 1])
            return _between(self.t[i - 1], self.q[i - 1], self.t[i], self.q[i], a)
        cands = [j for j in (i - 1, i) if 0 <= j < n and abs(int(s[j]) - t_ns) <= slop_ns]
        if not cands:
            return None
        j = min(cands, key=lambda k: abs(int(s[k]) - t_ns))
        return _transform(self.t[j], self.q[j])


class TfTree:
    """The /tf (dynamic, time series per edge) and /tf_static transforms of a bag; frame names without '/'."""

    def __init__(self):
        self.parent: Dict[str, str] = {}
        self.static: Dict[str, np.ndarray] = {}           # child → T_parent_child
        self._dyn: Dict[str, List[tuple]] = {}            # child → [(stamp, t, q)] while loading
        self.dynamic: Dict[str, PoseTrack] = {}

    def add(self, parent: str, child: str, stamp_ns: int, t: np.ndarray, q: np.ndarray, static: bool) -> None:
        parent, child = parent.strip('/'), child.strip('/')
        if not parent or not child or parent == child:
            return
        if static:
            self.static[child] = _transform(t, q)
            self.parent.setdefault(child, parent)
        else:
            self._dyn.setdefault(child, []).append((stamp_ns, t, q))
            self.parent[child] = parent                   # a dynamic edge wins over a static one

    def finish(self) -> None:
        for child, rows in self._dyn.items():
            self.dynamic[child] = PoseTrack([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
        self._dyn.clear()

    @property
    def frames(self) -> List[str]:
        return sorted(set(self.parent) | set(self.parent.values()))

    def _ancestors(self, frame: str) -> List[str]:
        chain, seen = [frame], {frame}
        while chain[-1] in self.parent:
            p = self.parent[chain[-1]]
            if p in seen:
                break                                     # a loop in a broken tf tree
            chain.append(p)
            seen.add(p)
        return chain

    def chain(self, target: str, source: str, static_only: bool = False) -> Optional[Tuple[List[str], List[str]]]:
        """(frames from source up to the common ancestor, frames from target up to it) or None if unconnected."""
        target, source = target.strip('/'), source.strip('/')
        up_s, up_t = self._ancestors(source), self._ancestors(target)
        common = next((f for f in up_s if f in set(up_t)), None)
        if common is None:
            return None
        up_s, up_t = up_s[:up_s.index(common) + 1], up_t[:up_t.index(common) + 1]
        if static_only and any(f in self.dynamic for f in up_s[:-1] + up_t[:-1]):
            return None
        return up_s, up_t

    def _to_ancestor(self, frames: List[str], t_ns: int, slop_ns: int, max_gap_ns: int) -> Optional[np.ndarray]:
        T = np.eye(4)
        for child in frames[:-1]:                         # T_anc_src = T_anc_.. @ ... @ T_parent_src
            if child in self.dynamic:
                E = self.dynamic[child].at(t_ns, slop_ns, max_gap_ns)
                if E is None:
                    return None
            else:
                E = self.static[child]
            T = E @ T
        return T

    def lookup(self, chain, t_ns: int, slop_ns: int, max_gap_ns: int) -> Optional[np.ndarray]:
        """T_target_source at ``t_ns`` for a ``chain()`` result, or None when a dynamic edge has no data then."""
        up_s, up_t = chain
        T_a_s = self._to_ancestor(up_s, t_ns, slop_ns, max_gap_ns)
        T_a_t = self._to_ancestor(up_t, t_ns, slop_ns, max_gap_ns)
        if T_a_s is None or T_a_t is None:
            return None
        return _inv(T_a_t) @ T_a_s
