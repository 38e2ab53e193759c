"""2D feature sources and their factory."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ov3d_ros.core.config import FeatureConfig
from ov3d_ros.core.features.base import FeatureExtractor

SOURCES = ('clip', 'simulated')


def create_extractor(cfg: FeatureConfig, device: torch.device | str = 'cpu',
                     class_names: Optional[Sequence[str]] = None) -> FeatureExtractor:
    """Build the feature source named by ``cfg.source``.

    Raises ``WeightsNotFoundError`` (a RuntimeError) when CLIP weights cannot be loaded, and ValueError for
    an unknown source or a simulated source without class names.
    """
    if cfg.source == 'clip':
        from ov3d_ros.core.features.clip_dense import OpenClipDenseExtractor
        return OpenClipDenseExtractor(cfg, device)
    if cfg.source == 'simulated':
        if not class_names:
            raise ValueError('features.source=simulated needs the class names of the label images')
        from ov3d_ros.core.features.simulated import SimulatedLabelFeatures
        return SimulatedLabelFeatures(cfg, class_names, device)
    raise ValueError(f'unknown features.source {cfg.source!r}; expected one of {SOURCES}')


__all__ = ['FeatureExtractor', 'create_extractor', 'SOURCES']
