"""The interface every 2D feature source implements."""
from __future__ import annotations

import abc
from typing import Optional, Sequence

import numpy as np
import torch


class FeatureExtractor(abc.ABC):
    """Dense per-pixel features in a space shared with text embeddings.

    Attributes:
        name: short identifier, e.g. ``'clip:ViT-B-16:naclip'`` or ``'simulated:minilm'``.
        space: identity of the space the features and text embeddings live in (maps whose spaces match can be
            loaded and merged): by default ``name``; for CLIP the model and a fingerprint of its weights, so
            that maps of other weights are refused and those of another dense mode or image size are not.
        dim: feature dimension D.
        simulated: True for sources that read ground-truth labels instead of looking at the image.
        device: torch device the returned tensors live on.
        default_temperature: softmax temperature that suits this feature space for relevancy scores.
        uses_templates: whether query texts go through the prompt templates (False for fixed text tables).
        precision_warning: why this source will run slowly as configured ('' when it will not), for the node's
            log and the tools' output at start (e.g. a half precision the CPU only emulates).
        precision_hint: a faster setting this source could run in on this device ('' when none), logged at start
            as information (e.g. bfloat16 on a CPU with native bf16 kernels, while the default runs float32).
        live_settings: the ``FeatureConfig`` fields :meth:`reconfigure` takes while mapping (none by default;
            the clip source: its dense mode and image/window sizes).
    """

    name: str = 'base'
    dim: int = 0
    simulated: bool = False
    device: torch.device = torch.device('cpu')
    default_temperature: float = 0.01
    uses_templates: bool = True
    precision_warning: str = ''
    precision_hint: str = ''
    live_settings: frozenset = frozenset()

    @property
    def space(self) -> str:
        return self.name

    @abc.abstractmethod
    def extract(self, rgb: np.ndarray, labels: Optional[np.ndarray] = None) -> torch.Tensor:
        """Dense features of one image.

        Args:
            rgb: (H, W, 3) uint8 RGB image.
            labels: (H, W) integer semantic label image; only simulated sources use it.
        Returns:
            (h, w, D) float tensor on ``self.device``, L2-normalised along D. The grid covers the whole image
            (h, w may be smaller than H, W, e.g. stride 16); pixel (u, v) maps to cell
            (floor(v * h / H), floor(u * w / W)).
        """

    @abc.abstractmethod
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) L2-normalised float embeddings of ``texts`` on ``self.device``."""

    def reconfigure(self, cfg) -> None:
        """Take the ``live_settings`` fields of ``cfg`` (a ``FeatureConfig``) from the next image on; raises
        ValueError when this source takes none."""
        raise ValueError(f'the {self.name} feature source takes no settings while mapping')
