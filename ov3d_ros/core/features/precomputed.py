"""Precomputed 2D features: any 2D model's dense features stored per frame, plus its text embeddings."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core.features.base import FeatureExtractor


def check_text_table(names: Sequence[str], vectors: np.ndarray, where: str = 'precomputed text table') -> None:
    """ValueError (starting with ``where``) unless ``names`` (K,) are K >= 1 distinct non-empty texts and
    ``vectors`` (K, D) are finite and non-zero: a NaN or zero vector scores nothing (NaN also makes the table
    unequal to itself, so a map made with it matches no table), and an empty table answers nothing."""
    vectors = np.asarray(vectors)
    if len(names) == 0:
        raise ValueError(f'{where}: no names (the table needs names (K,) and vectors (K, D) with K >= 1)')
    if vectors.ndim != 2 or len(names) != len(vectors) or vectors.shape[1] == 0:
        raise ValueError(f'{where}: {len(names)} names but vectors of shape {vectors.shape} (needs (K, D))')
    names = [str(n) for n in names]
    blank = [i for i, n in enumerate(names) if not n.strip()]
    if blank:
        raise ValueError(f'{where}: name {blank[0]} is empty')
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f'{where}: names {dupes[:5]} appear more than once')
    for problem, bad in (('not finite (NaN or inf)', ~np.isfinite(vectors).all(axis=1)),
                         ('all zero', ~np.any(vectors != 0, axis=1))):
        if bad.any():
            rows = np.flatnonzero(bad)
            raise ValueError(f'{where}: {len(rows)} of {len(names)} vectors are {problem} (those of '
                             f'{[names[i] for i in rows[:5]]})')


def same_text_table(names_a: Sequence[str], vectors_a: Optional[torch.Tensor], names_b: Sequence[str],
                    vectors_b: Optional[torch.Tensor]) -> bool:
    """Whether two precomputed text tables (names (K,), vectors (K, D); None vectors: no table) are the same: equal
    names, and both without vectors or both with vectors of one shape that agree within 1e-5. Compared value by
    value: a table is normalised again each time it is read, so a map saved again may hold other last bits."""
    if [str(n) for n in names_a] != [str(n) for n in names_b] or (vectors_a is None) != (vectors_b is None):
        return False
    if vectors_a is None:
        return True
    a, b = vectors_a.float(), vectors_b.float().to(vectors_a.device)
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5)


class PrecomputedFeatures(FeatureExtractor):
    """Text side of precomputed features: a table of text embeddings in the features' space.

    Frames carry their own features (``Frame.features``); ``encode_text`` looks texts up in the table, so
    only the names it holds (e.g. the dataset's class names) can be queried.

    Args:
        names: (K,) texts; vectors: (K, D) their embeddings (see :func:`check_text_table`).
    """

    name = 'precomputed'
    default_temperature = 0.01
    uses_templates = False

    def __init__(self, names: Sequence[str], vectors: np.ndarray, device: torch.device | str = 'cpu'):
        check_text_table(names, vectors)
        self.device = torch.device(device)
        self.names = [str(n) for n in names]
        self.vectors = F.normalize(torch.as_tensor(np.asarray(vectors), dtype=torch.float32), dim=-1).to(self.device)
        self.dim = int(self.vectors.shape[1])

    def extract(self, rgb: np.ndarray, labels: Optional[np.ndarray] = None) -> torch.Tensor:
        raise ValueError('precomputed features: every frame must carry its features (features/NNNNNN.npy)')

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        index = {n: i for i, n in enumerate(self.names)}
        missing = [t for t in texts if t not in index]
        if missing:
            more = len(self.names) - 20             # a table may hold thousands of names: 20, and how many more
            raise ValueError(f'no text embedding for {missing[:5]}; precomputed features know only: '
                             f'{", ".join(self.names[:20])}{f" and {more} more" if more > 0 else ""}')
        return self.vectors[[index[t] for t in texts]]
