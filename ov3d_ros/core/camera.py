"""Pinhole camera model with optional lens distortion, and depth back-projection.

Frames: camera points use the optical convention (x right, y down, z forward); ``T_W_C`` (4, 4) maps camera
points into the world/map frame.

Lens distortion follows ROS ``sensor_msgs/CameraInfo`` (and OpenCV): ``plumb_bob`` (k1 k2 p1 p2 k3),
``rational_polynomial`` (k1 k2 p1 p2 k3 k4 k5 k6, optionally the thin-prism s1-s4) and ``equidistant``
(fisheye k1-k4). A pixel of a raw (distorted) image is back-projected along its undistorted ray
(:meth:`PinholeCamera.rays`); a depth reading is the point's z in the optical frame, as for a pinhole camera.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch

DISTORTION_MODELS = {'plumb_bob': (4, 5, 8, 12, 14), 'rational_polynomial': (4, 5, 8, 12, 14),
                     'equidistant': (4,)}
"""Lens distortion models (ROS ``sensor_msgs/distortion_models``) and the coefficient counts each takes (OpenCV's:
k1 k2 p1 p2 [k3 [k4 k5 k6 [s1 s2 s3 s4 [tx ty]]]]; the tilt tx ty must be 0)."""


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics (pixels) of a pinhole camera, with the lens distortion of its raw images when it has one
    (``distortion_model`` one of :data:`DISTORTION_MODELS` and its coefficients ``distortion``; '' = none)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    distortion_model: str = ''
    distortion: Tuple[float, ...] = ()

    def __post_init__(self):
        vals = np.array([self.fx, self.fy, self.cx, self.cy], dtype=np.float64)
        if not np.all(np.isfinite(vals)) or self.fx <= 0 or self.fy <= 0:
            raise ValueError(f'invalid intrinsics fx={self.fx} fy={self.fy} cx={self.cx} cy={self.cy}')
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f'invalid image size {self.width}x{self.height}')
        d = tuple(float(x) for x in self.distortion)
        model = self.distortion_model.strip()
        if not any(d) and all(np.isfinite(d)):   # no distortion (also a model named with all-zero coefficients)
            model, d = '', ()
        elif not np.all(np.isfinite(d)):
            raise ValueError(f'lens distortion coefficients must be finite, got {list(d)}')
        elif model not in DISTORTION_MODELS:
            raise ValueError(f'lens distortion model {self.distortion_model!r} is not supported (supported: '
                             f'{", ".join(DISTORTION_MODELS)}); feed rectified images (image_proc) instead')
        elif len(d) not in DISTORTION_MODELS[model]:
            raise ValueError(f'{model} distortion needs {" or ".join(map(str, DISTORTION_MODELS[model]))} '
                             f'coefficients, got {list(d)}')
        elif len(d) == 14 and (d[12] or d[13]):
            raise ValueError(f'tilted-sensor distortion (coefficients 13-14 = {d[12]:g}, {d[13]:g}) is not '
                             'supported; feed rectified images (image_proc) instead')
        object.__setattr__(self, 'distortion_model', model)
        object.__setattr__(self, 'distortion', d)

    @classmethod
    def from_matrix(cls, K: np.ndarray, width: int, height: int, distortion_model: str = '',
                    distortion=()) -> 'PinholeCamera':
        """Build from a (3, 3) or (4, 4) intrinsic matrix (and the lens distortion, if any)."""
        K = np.asarray(K, dtype=np.float64)
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height),
                   distortion_model, tuple(distortion))

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)

    @property
    def distorted(self) -> bool:
        """True when raw images of this camera have lens distortion (rays are not straight pinhole rays)."""
        return bool(self.distortion_model)

    def scaled(self, width: int, height: int) -> 'PinholeCamera':
        """The same camera for an image resized to ``width`` x ``height`` (distortion acts on normalised
        coordinates, so it is kept)."""
        sx, sy = width / self.width, height / self.height
        return PinholeCamera(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                             int(width), int(height), self.distortion_model, self.distortion)

    def distort(self, x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Normalised coordinates (x/z, y/z) of rays → where the lens puts them, still normalised (float64)."""
        return _distort(self.distortion_model, self.distortion, np.asarray(x, np.float64), np.asarray(y, np.float64))

    def rays(self, u: np.ndarray, v: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Undistorted rays of pixels (u, v) of a raw image: (x, y, ok), float64 normalised coordinates (the
        pixel's camera-frame point at z = 1) and whether the pixel has a ray. ``ok`` is False where the distortion
        model is not invertible (beyond the radius where it folds back) and for rays more than 85 degrees off the
        optical axis (a fisheye's rim); those pixels are not used."""
        xd = (np.asarray(u, np.float64) - self.cx) / self.fx
        yd = (np.asarray(v, np.float64) - self.cy) / self.fy
        if not self.distorted:
            return xd, yd, np.ones(xd.shape, dtype=bool)
        return _undistort(self, xd, yd)

    def pixel_rays(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """:meth:`rays` of every pixel: (H, W) x, y and ok (computed once per camera, read-only arrays)."""
        return _pixel_rays(self)

    def view_extent(self) -> Tuple[float, float]:
        """(max |x/z|, max |y/z|) over the rays of the image's pixels: how wide the view is at depth 1."""
        return _view_extent(self)

    def backproject(self, depth_m: torch.Tensor) -> torch.Tensor:
        """Back-project every pixel of a depth image.

        Args:
            depth_m: (H, W) float depth along the optical axis, metres.
        Returns:
            (H, W, 3) points in the camera frame (invalid depth gives invalid points; mask them first; pixels
            without a ray, see :meth:`rays`, give NaN).
        """
        H, W = depth_m.shape
        if (W, H) != (self.width, self.height):
            raise ValueError(f'depth is {W}x{H}, camera is {self.width}x{self.height}')
        x, y, ok = self.pixel_rays()
        x, y = np.where(ok, x, np.nan), np.where(ok, y, np.nan)
        xy = torch.from_numpy(np.stack([x, y], -1)).to(depth_m.device, depth_m.dtype)
        return torch.cat([xy * depth_m[..., None], depth_m[..., None]], dim=-1)

    def project(self, points_c: torch.Tensor) -> torch.Tensor:
        """(N, 3) camera-frame points → (N, 2) pixel coordinates (u, v) in the raw image; points must have z > 0."""
        z = points_c[:, 2]
        x, y = points_c[:, 0] / z, points_c[:, 1] / z
        if self.distorted:
            xd, yd = self.distort(x.detach().cpu().double().numpy(), y.detach().cpu().double().numpy())
            x, y = (torch.from_numpy(a).to(points_c.device, points_c.dtype) for a in (xd, yd))
        return torch.stack([x * self.fx + self.cx, y * self.fy + self.cy], -1)


def _distort(model: str, d: Tuple[float, ...], x: np.ndarray, y: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    if not model:
        return x, y
    if model == 'equidistant':
        r = np.hypot(x, y)
        th = np.arctan(r)
        t2 = th * th
        th_d = th * (1 + t2 * (d[0] + t2 * (d[1] + t2 * (d[2] + t2 * d[3]))))
        s = np.where(r > 1e-12, th_d / np.maximum(r, 1e-12), 1.0)
        return x * s, y * s
    k1, k2, p1, p2, k3, k4, k5, k6, s1, s2, s3, s4 = (d + (0.0,) * 12)[:12]
    r2 = x * x + y * y
    radial = (1 + r2 * (k1 + r2 * (k2 + r2 * k3))) / (1 + r2 * (k4 + r2 * (k5 + r2 * k6)))
    xy = x * y
    xd = x * radial + 2 * p1 * xy + p2 * (r2 + 2 * x * x) + r2 * (s1 + s2 * r2)
    yd = y * radial + p1 * (r2 + 2 * y * y) + 2 * p2 * xy + r2 * (s3 + s4 * r2)
    return xd, yd


_MAX_RAY_TAN = float(np.tan(np.radians(85.0)))
"""Rays more than 85 degrees off the optical axis are not used (a depth reading is a z, meaningless that far out)."""


@functools.lru_cache(maxsize=16)
@np.errstate(all='ignore')      # absurd coefficients overflow: no growth there, the radius ends sooner
def _unfolded_radius(model: str, d: Tuple[float, ...]) -> float:
    """The radius r = |(x, y)| up to which the model's radial part grows with r (beyond it, the lens model folds
    back: two rays land on one pixel and the inverse is not defined); inf when it grows everywhere sampled."""
    if model == 'equidistant':
        th = np.linspace(0.0, np.pi / 2, 20001)[:-1]
        t2 = th * th
        th_d = th * (1 + t2 * (d[0] + t2 * (d[1] + t2 * (d[2] + t2 * d[3]))))
        bad = np.nonzero(~(np.diff(th_d) > 0))[0]
        return float(np.tan(th[bad[0]])) if len(bad) else np.inf
    r = np.linspace(0.0, 20.0, 200001)          # up to 87 degrees off the axis
    xd, _ = _distort(model, d, r, np.zeros_like(r))
    bad = np.nonzero(~(np.diff(xd) > 0))[0]
    return float(r[bad[0]]) if len(bad) else np.inf


@np.errstate(all='ignore')      # absurd coefficients overflow: those pixels fail the check, get no ray
def _undistort(cam: PinholeCamera, xd: np.ndarray, yd: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Invert the distortion by Newton's method (Jacobian by central differences), from the distorted point. Every
    iterate stays within the radius where the model folds back (see :func:`_unfolded_radius`): the ray sought is
    there, and a lens that still stretches the image near its fold maps a second, outer ray to the same pixel,
    which an unbounded iteration may find instead."""
    model, d = cam.distortion_model, cam.distortion
    limit = _unfolded_radius(model, d)
    r_max = limit * (1 - 1e-9) if np.isfinite(limit) else np.inf    # the bound of every iterate's radius
    if model == 'equidistant':      # radial only: solve theta_d(theta) = |(xd, yd)| for theta
        rd = np.hypot(xd, yd)
        th_max = min(float(np.arctan(r_max)), np.pi / 2 - 1e-6)
        theta_d = lambda t: t * (1 + t * t * (d[0] + t * t * (d[1] + t * t * (d[2] + t * t * d[3]))))  # noqa: E731
        th = np.full(rd.size, th_max)   # pixels farther out than theta_d reaches on [0, th_max]: no ray (see below)
        todo = np.flatnonzero(rd < theta_d(th_max))
        r_d = rd.reshape(-1)[todo]
        t = np.minimum(r_d, min(1.5, th_max))
        lo, hi = np.zeros_like(r_d), np.full_like(r_d, th_max)    # theta_d grows on [0, th_max]: a bracket
        for _ in range(60):         # Newton, bisecting where a step would leave the bracket (typically 4-6 steps)
            t2 = t * t
            f = theta_d(t) - r_d
            if not np.max(np.abs(f), initial=0.0) > 1e-15:
                break
            df = 1 + t2 * (3 * d[0] + t2 * (5 * d[1] + t2 * (7 * d[2] + t2 * 9 * d[3])))
            lo, hi = np.where(f < 0, t, lo), np.where(f > 0, t, hi)
            step = t - f / np.where(np.abs(df) > 1e-12, df, 1e-12)
            t = np.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
        th[todo] = t
        r = np.tan(th.reshape(rd.shape))
        s = np.where(rd > 1e-12, r / np.maximum(rd, 1e-12), 1.0)
        x, y = xd * s, yd * s
    else:
        def within(x, y):           # (x, y) scaled back onto the bound where it lies beyond it
            if not np.isfinite(r_max):
                return x, y
            shrink = np.minimum(1.0, r_max / np.maximum(np.hypot(x, y), 1e-300))
            return x * shrink, y * shrink
        x, y = within(xd, yd)
        h = 1e-7
        for _ in range(30):
            fx, fy = _distort(model, d, x, y)
            ex, ey = fx - xd, fy - yd
            if not np.nanmax(np.abs(ex) + np.abs(ey), initial=0.0) > 1e-13:    # converged (typically 4-6 steps)
                break
            ax, ay = _distort(model, d, x + h, y)
            bx, by = _distort(model, d, x - h, y)
            cx, cy = _distort(model, d, x, y + h)
            dx, dy = _distort(model, d, x, y - h)
            j00, j10 = (ax - bx) / (2 * h), (ay - by) / (2 * h)
            j01, j11 = (cx - dx) / (2 * h), (cy - dy) / (2 * h)
            det = j00 * j11 - j01 * j10
            det = np.where(np.abs(det) > 1e-12, det, 1e-12)
            step_x, step_y = (j11 * ex - j01 * ey) / det, (j00 * ey - j10 * ex) / det
            x, y = within(x - np.clip(step_x, -0.5, 0.5), y - np.clip(step_y, -0.5, 0.5))
    bx, by = _distort(model, d, x, y)
    err = np.hypot((bx - xd) * cam.fx, (by - yd) * cam.fy)      # pixels
    ok = np.isfinite(x) & np.isfinite(y) & (err < 1e-3) & (np.hypot(x, y) < min(limit, _MAX_RAY_TAN))
    return x, y, ok


@functools.lru_cache(maxsize=8)
def _pixel_rays(cam: PinholeCamera) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    v, u = np.mgrid[0:cam.height, 0:cam.width].astype(np.float64)
    out = cam.rays(u, v)
    for a in out:
        a.flags.writeable = False
    return out


@functools.lru_cache(maxsize=16)
def _view_extent(cam: PinholeCamera) -> Tuple[float, float]:
    W, H = cam.width, cam.height
    if not cam.distorted:
        return max(cam.cx, W - cam.cx) / cam.fx, max(cam.cy, H - cam.cy) / cam.fy
    # the image border: with a lens that does not fold back (see rays), the widest rays are those of border pixels
    u = np.concatenate([np.arange(W), np.arange(W), np.zeros(H), np.full(H, W - 1)])
    v = np.concatenate([np.zeros(W), np.full(W, H - 1), np.arange(H), np.arange(H)])
    x, y, ok = cam.rays(u, v)
    if not ok.all():        # a border without rays (a fisheye's rim): the widest rays are inside, look at all
        x, y, ok = cam.pixel_rays()
    if not ok.any():
        return 0.0, 0.0
    return float(np.abs(x[ok]).max()), float(np.abs(y[ok]).max())


def transform_points(T_A_B: torch.Tensor, points_b: torch.Tensor) -> torch.Tensor:
    """Apply a (4, 4) rigid transform to (..., 3) points expressed in frame B; returns them in frame A."""
    T = T_A_B.to(points_b.dtype)
    return points_b @ T[:3, :3].T.contiguous() + T[:3, 3]
