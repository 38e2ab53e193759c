"""Pinhole camera model and depth back-projection.

Frames: camera points use the optical convention (x right, y down, z forward); ``T_W_C`` (4, 4) maps camera
points into the world/map frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PinholeCamera:
    """Intrinsics of an undistorted pinhole camera (pixels)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self):
        vals = np.array([self.fx, self.fy, self.cx, self.cy], dtype=np.float64)
        if not np.all(np.isfinite(vals)) or self.fx <= 0 or self.fy <= 0:
            raise ValueError(f'invalid intrinsics fx={self.fx} fy={self.fy} cx={self.cx} cy={self.cy}')
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f'invalid image size {self.width}x{self.height}')

    @classmethod
    def from_matrix(cls, K: np.ndarray, width: int, height: int) -> 'PinholeCamera':
        """Build from a (3, 3) or (4, 4) intrinsic matrix."""
        K = np.asarray(K, dtype=np.float64)
        return cls(float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]), int(width), int(height))

    @property
    def K(self) -> np.ndarray:
        """(3, 3) float64 intrinsic matrix."""
        return np.array([[self.fx, 0, self.cx], [0, self.fy, self.cy], [0, 0, 1]], dtype=np.float64)

    def scaled(self, width: int, height: int) -> 'PinholeCamera':
        """The same camera for an image resized to ``width`` x ``height``."""
        sx, sy = width / self.width, height / self.height
        return PinholeCamera(self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5,
                             int(width), int(height))

    def backproject(self, depth_m: torch.Tensor) -> torch.Tensor:
        """Back-project every pixel of a depth image.

        Args:
            depth_m: (H, W) float depth along the optical axis, metres.
        Returns:
            (H, W, 3) points in the camera frame (invalid depth gives invalid points; mask them first).
        """
        H, W = depth_m.shape
        if (W, H) != (self.width, self.height):
            raise ValueError(f'depth is {W}x{H}, camera is {self.width}x{self.height}')
        v, u = torch.meshgrid(torch.arange(H, device=depth_m.device, dtype=depth_m.dtype),
                              torch.arange(W, device=depth_m.device, dtype=depth_m.dtype), indexing='ij')
        x = (u - self.cx) / self.fx * depth_m
        y = (v - self.cy) / self.fy * depth_m
        return torch.stack([x, y, depth_m], dim=-1)

    def project(self, points_c: torch.Tensor) -> torch.Tensor:
        """(N, 3) camera-frame points → (N, 2) pixel coordinates (u, v); points must have z > 0."""
        z = points_c[:, 2]
        return torch.stack([points_c[:, 0] / z * self.fx + self.cx, points_c[:, 1] / z * self.fy + self.cy], -1)


def transform_points(T_A_B: torch.Tensor, points_b: torch.Tensor) -> torch.Tensor:
    """Apply a (4, 4) rigid transform to (..., 3) points expressed in frame B; returns them in frame A."""
    T = T_A_B.to(points_b.dtype)
    return points_b @ T[:3, :3].T.contiguous() + T[:3, 3]
