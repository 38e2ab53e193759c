"""Distilling the student affinity network from a 3D teacher (GeoPurify's macro/micro InfoNCE).

For each anchor voxel: the positive is its spatial neighbour (among the K nearest) most similar in teacher
space; negatives are the ``n_macro`` least teacher-similar voxels of a random global pool ("macro") and the
``n_micro`` least similar among its K spatial neighbours ("micro"). InfoNCE at temperature ``tau`` on the
student's cosine similarities. Teachers: per-voxel features (any exported 3D model, e.g. Sonata) or segment
ids (ground-truth instances: same segment = similar).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core.purification.student import StudentAffinityNet, spconv_threads


@dataclass
class Teacher:
    """Per-voxel teacher: unit features (N, Ft) or segment ids (N,) (< 0 = unknown, never an anchor)."""

    features: Optional[torch.Tensor] = None
    segments: Optional[torch.Tensor] = None

    def similarity(self, a: torch.Tensor, b: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Teacher similarity of voxels a (A,) with b (A, K) -> (A, K).

        Features: a batched dot product over ``chunk`` anchors at a time, so at most chunk x K x Ft gathered
        values exist at once (never the A x K x Ft product: 8.6 GB for 4096 anchors, K = 1024, Ft = 512).
        """
        if self.features is not None:
            out = torch.empty(b.shape, dtype=self.features.dtype, device=self.features.device)
            for s in range(0, len(a), chunk):
                fa, fb = self.features[a[s:s + chunk]], self.features[b[s:s + chunk]]   # (c, Ft), (c, K, Ft)
                out[s:s + chunk] = torch.bmm(fb, fa[:, :, None])[:, :, 0]
            return out
        sa, sb = self.segments[a][:, None], self.segments[b]
        return ((sa == sb) & (sb >= 0)).float()

    def valid(self) -> torch.Tensor:
        return torch.ones(len(self.features), dtype=torch.bool) if self.features is not None else self.segments >= 0


@dataclass
class SceneBatch:
    """One training scene: voxel coords (N, 3), network inputs (N, C), spatial kNN (N, K), teacher."""

    name: str
    coords: torch.Tensor
    inputs: torch.Tensor
    knn: torch.Tensor
    teacher: Teacher


@dataclass
class DistillConfig:
    steps: int = 600
    lr: float = 2e-3
    anchors: int = 4096
    k_spatial: int = 96
    n_macro: int = 48
    n_micro: int = 15
    macro_pool: int = 1024
    tau: float = 0.07
    seed: int = 0


def pick_pairs(teacher: Teacher, knn: torch.Tensor, anchors: torch.Tensor, cfg: DistillConfig,
               gen: torch.Generator):
    """(positive (A,), negatives (A, n_macro + n_micro), negative mask (A, n)) for ``anchors``."""
    nb = knn[anchors]                                                    # (A, K)
    jitter = lambda s: s + 1e-3 * torch.rand(s.shape, generator=gen)    # noqa: E731  (random tie-break)
    ts = teacher.similarity(anchors, nb)
    tj = jitter(ts)
    pos_idx = tj.argmax(1)
    pos_sim = ts.gather(1, pos_idx[:, None])[:, 0]
    positive = nb.gather(1, pos_idx[:, None])[:, 0]
    micro_idx = (-tj).topk(cfg.n_micro, dim=1).indices
    micro, micro_sim = nb.gather(1, micro_idx), ts.gather(1, micro_idx)
    pool = torch.randint(0, len(knn), (len(anchors), cfg.macro_pool), generator=gen)
    tp = teacher.similarity(anchors, pool)
    macro_idx = (-jitter(tp)).topk(cfg.n_macro, dim=1).indices
    macro, macro_sim = pool.gather(1, macro_idx), tp.gather(1, macro_idx)
    negatives = torch.cat([macro, micro], 1)
    neg_sim = torch.cat([macro_sim, micro_sim], 1)
    # a "negative" as teacher-similar as the positive is not a negative (e.g. the same segment). The jitter only
    # breaks ties when choosing; the mask compares the unjittered similarities, so the margin is not eaten by it.
    return positive, negatives, neg_sim < pos_sim[:, None] - 0.5e-3


def infonce(emb: torch.Tensor, anchors: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
            neg_mask: torch.Tensor, tau: float):
    """(loss, accuracy: fraction of anchors whose positive beats every negative)."""
    ea = emb[anchors]
    pos = (ea * emb[positive]).sum(-1, keepdim=True)
    neg = torch.einsum('ae,ane->an', ea, emb[negatives]).masked_fill(~neg_mask, -torch.inf)
    logits = torch.cat([pos, neg], 1) / tau
    loss = F.cross_entropy(logits, torch.zeros(len(anchors), dtype=torch.long, device=emb.device))
    acc = (logits.argmax(1) == 0).float().mean()
    return loss, acc


def evaluate(net: StudentAffinityNet, scenes: List[SceneBatch], cfg: DistillConfig) -> dict:
    """Mean InfoNCE loss and accuracy over ``scenes`` (fixed anchors per scene)."""
    net.eval()
    device = next(net.parameters()).device
    losses, accs = [], []
    with torch.no_grad():
        for k, s in enumerate(scenes):
            gen = torch.Generator().manual_seed(cfg.seed + 1000 + k)
            anchors = sample_anchors(s.teacher, cfg.anchors, gen)
            pos, neg, mask = pick_pairs(s.teacher, s.knn, anchors, cfg, gen)
            emb = net(s.coords.to(device), s.inputs.to(device)).cpu()
            loss, acc = infonce(emb, anchors, pos, neg, mask, cfg.tau)
            losses.append(float(loss))
            accs.append(float(acc))
    net.train()
    return {'loss': float(np.mean(losses)), 'accuracy': float(np.mean(accs))}


def sample_anchors(teacher: Teacher, n: int, gen: torch.Generator) -> torch.Tensor:
    valid = torch.nonzero(teacher.valid(), as_tuple=True)[0]
    return valid[torch.randperm(len(valid), generator=gen)[:n]]


def train(net: StudentAffinityNet, scenes: List[SceneBatch], val: List[SceneBatch], cfg: DistillConfig,
          log: Callable[[str], None] = print) -> List[dict]:
    """Train ``net`` in place (Adam, cosine learning-rate decay); returns the validation history."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    device = next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(cfg.steps, 1))))
    history, t0 = [], time.perf_counter()
    net.train()
    for step in range(cfg.steps):
        s = scenes[int(torch.randint(len(scenes), (1,), generator=gen))]
        anchors = sample_anchors(s.teacher, cfg.anchors, gen)
        pos, neg, mask = pick_pairs(s.teacher, s.knn, anchors, cfg, gen)
        emb = net(s.coords.to(device), s.inputs.to(device)).cpu()
        loss, acc = infonce(emb, anchors, pos, neg, mask, cfg.tau)
        opt.zero_grad()
        with spconv_threads(device):      # the backward pass runs spconv kernels too
            loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            row = {'step': step + 1, 'train_loss': loss.item(), 'train_acc': acc.item(),
                   'elapsed_s': round(time.perf_counter() - t0, 1)}
            if val:
                row.update({f'val_{k}': v for k, v in evaluate(net, val, cfg).items()})
            history.append(row)
            log(' '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
    return history
