"""Compressed voxel features: a linear projection from the feature source's D dims to d, kept up to date.

The projection P (D, d) spans the top-d principal directions of the uncentred second moment of every keyframe's
features so far (incremental PCA: the moment is kept in low rank, P diag(energy) P^T, and each keyframe's
features are folded in). Uncentred, so dot products are kept: f . t ~= (f P) . (t P) for f inside the subspace.
Voxels store f P in fp16; a keyframe that brings new directions (a class not seen before) turns the subspace,
and the stored features are rotated into the new basis with R = P_old^T P_new (exact for their part inside
both). Text embeddings are projected with the current P at query time (not re-normalised, so the ordering of
texts per voxel is that of the full-dimension scores). With updates off the first keyframe's fit stays frozen.
"""
from __future__ import annotations

import threading
from typing import Optional

import torch


class FeatureProjection:
    """A D -> d linear projection with orthonormal columns and the energy of each column.

    Args:
        matrix: (D, d) projection; columns orthonormal.
        energy: (d,) second-moment eigenvalue of each column (default zeros).
    """

    def __init__(self, matrix: torch.Tensor, energy: Optional[torch.Tensor] = None):
        if matrix.ndim != 2 or matrix.shape[1] > matrix.shape[0]:
            raise ValueError(f'projection must be (D, d) with d <= D, got {tuple(matrix.shape)}')
        self.matrix = matrix.float()
        self.energy = torch.zeros(matrix.shape[1], device=matrix.device) if energy is None else \
            energy.float().to(matrix.device)
        if self.energy.shape != (matrix.shape[1],):
            raise ValueError(f'projection energy must be ({matrix.shape[1]},), got {tuple(self.energy.shape)}')

    @property
    def in_dim(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def out_dim(self) -> int:
        return int(self.matrix.shape[1])

    @classmethod
    def fit(cls, samples: torch.Tensor, dim: int) -> 'FeatureProjection':
        """Top-``dim`` uncentred principal directions of (N, D) ``samples``."""
        n, D = samples.shape
        if not 0 < dim <= D:
            raise ValueError(f'compressed dimension must be in 1..{D}, got {dim}')
        if n == 0:
            raise ValueError('cannot fit a feature projection without samples')
        x = samples.float()
        return cls(*_top(x.T @ x, dim))

    def update(self, samples: torch.Tensor) -> torch.Tensor:
        """Fold (N, D) ``samples`` into the moment and re-pick the top directions; returns the (d, d) rotation
        R = P_old^T P_new that carries features stored in the old basis into the new one."""
        x = samples.float().to(self.matrix.device)
        old = self.matrix
        self.matrix, self.energy = _top((old * self.energy) @ old.T + x.T @ x, self.out_dim)
        return old.T @ self.matrix

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., d) float32."""
        return x.float() @ self.matrix.to(x.device)

    def to(self, device: torch.device | str) -> 'FeatureProjection':
        return FeatureProjection(self.matrix.to(device), self.energy.to(device))


_ONE_THREAD = threading.Lock()


def _top(moment: torch.Tensor, dim: int):
    """(D, dim) eigenvectors of the largest ``dim`` eigenvalues of a symmetric matrix, and those eigenvalues.

    On CPU the decomposition runs on one thread: LAPACK's eigenvectors differ in their last bits with the thread
    count, and the same features must give the same basis in any process (the node, a Ray task, a serial run)."""
    if moment.device.type != 'cpu':
        values, vectors = torch.linalg.eigh(moment)
    else:
        with _ONE_THREAD:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                values, vectors = torch.linalg.eigh(moment)          # ascending
            finally:
                torch.set_num_threads(threads)
    return vectors[:, -dim:].flip(1).contiguous(), values[-dim:].flip(0).clamp_min(0).contiguous()
