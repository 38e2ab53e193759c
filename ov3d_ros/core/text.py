"""Prompt-template ensembles for text queries."""
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


def encode_prompts(encode_text: Callable[[Sequence[str]], torch.Tensor], names: Sequence[str],
                   templates: Sequence[str] = DEFAULT_TEMPLATES) -> torch.Tensor:
    """Embed each name with every template and average (the CLIP prompt ensemble).

    Args:
        encode_text: maps N strings to (N, D) L2-normalised embeddings.
        names: class names or free-text queries.
        templates: format strings with one ``{}``; an empty sequence embeds the raw names.
    Returns:
        (len(names), D) L2-normalised embeddings.
    """
    if not templates:
        return F.normalize(encode_text(list(names)).float(), dim=-1)
    prompts = [t.format(n) for n in names for t in templates]
    emb = encode_text(prompts).float().reshape(len(names), len(templates), -1)
    return F.normalize(emb.mean(dim=1), dim=-1)
