"""Precomputed 2D features: any 2D model's dense features stored per frame, plus its text embeddings."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core.features.base import FeatureExtractor


class PrecomputedFeatures(FeatureExtractor):
    """Text side of precomputed features: a table of text embeddings in the features' space.

    Frames carry their own features (``Frame.features``); ``encode_text`` looks texts up in the table, so
    only the names it holds (e.g. the dataset's class names) can be queried.

    Args:
        names: (K,) texts; vectors: (K, D) their embeddings.
    """

    name = 'precomputed'
    default_temperature = 0.01
    uses_templates = False

    def __init__(self, names: Sequence[str], vectors: np.ndarray, device: torch.device | str = 'cpu'):
        if len(names) != len(vectors):
            raise ValueError(f'{len(names)} names but {len(vectors)} text vectors')
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
            raise ValueError(f'no text embedding for {missing[:5]}; precomputed features know only: '
                             f'{", ".join(self.names[:20])}')
        return self.vectors[[index[t] for t in texts]]
