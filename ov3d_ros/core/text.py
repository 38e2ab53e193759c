"""Text augmentation for queries: prompt-template ensembles and Laser's repetition trick."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES = (
    'a photo of a {}.',
    'a photo of the {}.',
    'a {} in a scene.',
    'a photo of a {} in a room.',
    'there is a {} in the scene.',
    'a close-up photo of a {}.',
)


def prompts_for(name: str, templates: Sequence[str] = DEFAULT_TEMPLATES, repetitions: int = 1) -> list:
    """Every prompt of ``name``: each template (or the bare name when there are none) filled with the name and,
    for ``repetitions`` r > 1, with the name repeated r times ('chair chair')."""
    variants = [name] + ([' '.join([name] * repetitions)] if repetitions > 1 else [])
    return [t.format(v) for v in variants for t in (templates or ['{}'])]


def encode_prompts(encode_text: Callable[[Sequence[str]], torch.Tensor], names: Sequence[str],
                   templates: Sequence[str] = DEFAULT_TEMPLATES, repetitions: int = 1) -> torch.Tensor:
    """Embed every prompt of each name (:func:`prompts_for`) and average (the CLIP prompt ensemble).

    Args:
        encode_text: maps N strings to (N, D) L2-normalised embeddings.
        names: class names or free-text queries.
        templates: format strings with one ``{}``; an empty sequence embeds the bare names.
        repetitions: Laser's repetition augmentation (1 = off).
    Returns:
        (len(names), D) L2-normalised embeddings.
    """
    if repetitions < 1:
        raise ValueError(f'repetitions must be >= 1, got {repetitions}')
    prompts = [p for n in names for p in prompts_for(n, templates, repetitions)]
    emb = encode_text(prompts).float().reshape(len(names), len(prompts) // max(len(names), 1), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)
