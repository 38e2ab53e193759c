"""Geometry-guided pooling (GeoPurify inference), online on a growing voxel map.

Every voxel i averages the features of its neighbourhood N(i) (occupied voxels within ``radius_vox``) with
affinity weights A_ij = softmax_j(logit_ij) (rows sum to 1), T times: F <- A F. Logits come from a learned
student embedding (scale * cosine) or, without a checkpoint, from colour, normal and distance differences.

Online, only the voxels a keyframe touched plus a margin are re-pooled, starting from their raw fused features;
neighbours outside that set contribute their current purified features. The cost per keyframe depends on the
touched region, not on the map size. ``mode='whole'`` re-pools everything at once (the offline reference).
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple

import torch

from ov3d_ros.core.config import PurifyConfig
from ov3d_ros.core.purification.graph import ball_offsets, estimate_normals, neighbour_rows
from ov3d_ros.core.voxel_map import VoxelFeatureMap

warnings.filterwarnings('ignore', message='Sparse CSR tensor support is in beta')

EmbedFn = Callable[[VoxelFeatureMap, torch.Tensor, torch.Tensor], torch.Tensor]
"""(map, rows (R,), normals (R, 3)) -> (R, E) unit embeddings of those voxels (the learned affinity)."""


def fallback_logits(colors: torch.Tensor, normals: torch.Tensor, offsets: torch.Tensor, nbr: torch.Tensor,
                    cfg: PurifyConfig) -> torch.Tensor:
    """(R, M) affinity logits from colour (RGB), normal and distance differences; -inf for missing neighbours.

    colors (V, 3) and normals (V, 3) are indexed by map rows; nbr (R, M) holds rows (column 0 = the voxel).
    """
    safe = nbr.clamp_min(0)
    dc = (colors[safe] - colors[safe[:, :1]]).square().sum(-1) / (2 * cfg.sigma_color ** 2)
    dn = (1 - (normals[safe] * normals[safe[:, :1]]).sum(-1).abs()) / cfg.sigma_normal
    dd = offsets.float().square().sum(-1)[None] / (2 * cfg.sigma_distance_vox ** 2)
    return torch.where(nbr >= 0, -(dc + dn + dd), torch.full_like(dc, -torch.inf))


def embedding_logits(emb: torch.Tensor, nbr: torch.Tensor, scale: float) -> torch.Tensor:
    """(R, M) logits scale * cos(e_i, e_j) from unit embeddings emb (V, E) indexed by rows; -inf if missing."""
    safe = nbr.clamp_min(0)
    cos = (emb[safe].float() * emb[safe[:, :1]].float()).sum(-1)
    return torch.where(nbr >= 0, scale * cos, torch.full_like(cos, -torch.inf))


def pool(features: torch.Tensor, rows: torch.Tensor, nbr: torch.Tensor, weights: torch.Tensor,
         outside: torch.Tensor, iterations: int) -> torch.Tensor:
    """Run ``iterations`` steps of F_rows <- W F_nbr; returns (R, D) float32 pooled features of ``rows``.

    features (R, D): start values of ``rows``; nbr (R, M) neighbour rows (-1 missing) and weights (R, M)
    (rows sum to 1); outside (V, D): values used for neighbours that are not in ``rows`` (held fixed).
    """
    R, M = nbr.shape
    cols = torch.cat([rows, nbr[nbr >= 0]])
    universe, inv = torch.unique(cols, return_inverse=True)
    local_rows, local_nbr = inv[:R], torch.full_like(nbr, -1)
    local_nbr[nbr >= 0] = inv[R:]
    x = outside[universe].float()
    x[local_rows] = features.float()
    keep = local_nbr >= 0
    crow = torch.cat([torch.zeros(1, dtype=torch.int64, device=nbr.device), keep.sum(1).cumsum(0)])
    A = torch.sparse_csr_tensor(crow, local_nbr[keep], weights[keep].float(), size=(R, len(universe)),
                                check_invariants=False)
    for _ in range(int(iterations)):
        x[local_rows] = A @ x
    return x[local_rows]


class GeometryPooling:
    """Purified features for every map row, kept up to date keyframe by keyframe.

    Args:
        cfg: purification config.
        embed: the learned affinity's embedding function, or None for the fallback affinity.
    """

    def __init__(self, cfg: PurifyConfig, embed: Optional[EmbedFn] = None):
        if cfg.affinity not in ('learned', 'fallback'):
            raise ValueError(f"purify.affinity must be 'learned' or 'fallback', got {cfg.affinity!r}")
        if cfg.affinity == 'learned' and embed is None:
            raise ValueError('purify.affinity learned needs a student network (purify.checkpoint)')
        if cfg.mode not in ('incremental', 'whole'):
            raise ValueError(f"purify.mode must be 'incremental' or 'whole', got {cfg.mode!r}")
        self.cfg, self.embed = cfg, embed if cfg.affinity == 'learned' else None
        self.offsets: Optional[torch.Tensor] = None
        self.purified: Optional[torch.Tensor] = None   # (capacity, D) float16, aligned with map rows
        self.normals: Optional[torch.Tensor] = None    # (capacity, 3)
        self.embeddings: Optional[torch.Tensor] = None  # (capacity, E) float16, learned affinity only
        self.timings_s = {}

    def _grow(self, vmap: VoxelFeatureMap, emb_dim: int = 0) -> None:
        cap, dev = vmap.capacity, vmap.device
        if self.offsets is None:
            self.offsets = ball_offsets(self.cfg.radius_vox, dev)
        for name, width, dtype in (('purified', vmap.dim, torch.float16), ('normals', 3, torch.float32),
                                   ('embeddings', emb_dim, torch.float16)):
            old = getattr(self, name)
            if name == 'embeddings' and emb_dim == 0 and old is None:
                continue
            width = old.shape[1] if old is not None else width
            if old is None or old.shape[0] < cap:
                new = torch.zeros(cap, width, dtype=dtype, device=dev)
                if old is not None:
                    new[:old.shape[0]] = old
                setattr(self, name, new)

    def region(self, vmap: VoxelFeatureMap, touched: torch.Tensor) -> torch.Tensor:
        """Sorted unique rows of ``touched`` and every occupied voxel within ``margin_vox`` of them."""
        if self.cfg.margin_vox <= 0:
            return torch.unique(touched)
        nbr = neighbour_rows(vmap, touched, ball_offsets(self.cfg.margin_vox, vmap.device))
        return torch.unique(torch.cat([touched, nbr[nbr >= 0]]))

    def update(self, vmap: VoxelFeatureMap, touched: Optional[torch.Tensor] = None,
               channels: Sequence[Tuple[torch.Tensor, torch.Tensor]] = ()) -> int:
        """Re-pool after fusion touched ``touched`` rows (or the whole map in 'whole' mode / when None).

        ``channels``: more per-voxel values pooled with the same affinities, as (raw (V, K), pooled (>= V, K))
        pairs aligned with map rows; ``pooled`` is written in place. Returns the number of re-pooled voxels.
        """
        import time
        t0 = time.perf_counter()
        n = vmap.size
        if n == 0:
            return 0
        self._grow(vmap)
        whole = touched is None or self.cfg.mode == 'whole'
        rows = torch.arange(n, device=vmap.device) if whole else self.region(vmap, touched)
        # normals need the neighbours' geometry: refresh them for the region and its rim
        nbr = neighbour_rows(vmap, rows, self.offsets)
        self.normals[rows] = estimate_normals(vmap, rows, nbr, self.offsets)
        if self.embed is not None:
            emb = self.embed(vmap, rows, self.normals[rows])
            self._grow(vmap, emb.shape[1])
            self.embeddings[rows] = emb.to(torch.float16)
            logits = embedding_logits(self.embeddings, nbr, self.cfg.scale)
        else:
            logits = fallback_logits(vmap.colors, self.normals, self.offsets, nbr, self.cfg)
        weights = torch.softmax(logits, dim=1)
        t1 = time.perf_counter()
        pooled = pool(vmap.features[rows], rows, nbr, weights, self.purified[:n], self.cfg.iterations)
        self.purified[rows] = pooled.to(torch.float16)
        for raw, out in channels:
            out[rows] = pool(raw[rows], rows, nbr, weights, out[:n], self.cfg.iterations).to(out.dtype)
        self.timings_s = {'affinity': t1 - t0, 'pooling': time.perf_counter() - t1, 'voxels': len(rows)}
        return len(rows)

    def keep(self, rows: torch.Tensor) -> None:
        """Follow :meth:`VoxelFeatureMap.keep`: keep the state of ``rows`` only, compacted in that order."""
        for name in ('purified', 'normals', 'embeddings'):
            t = getattr(self, name)
            if t is not None:
                kept = t[rows].clone()
                t.zero_()
                t[:len(rows)] = kept

    def project(self, matrix: torch.Tensor) -> None:
        """Follow :meth:`VoxelFeatureMap.project`: purified features become purified @ matrix (pooling is linear)."""
        if self.purified is not None:
            self.purified = (self.purified.float() @ matrix.to(self.purified.device).float()).to(torch.float16)

    def features(self, vmap: VoxelFeatureMap) -> torch.Tensor:
        """(V, D) purified features of all map rows (the raw ones before the first update)."""
        if self.purified is None:
            return vmap.features[:vmap.size]
        return self.purified[:vmap.size]
