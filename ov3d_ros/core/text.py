"""Text augmentation for queries: prompt-template ensembles and Laser's repetition trick."""
from __future__ import annotations

import threading
from typing import Callable, Dict, Sequence

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


class TextEmbeddings:
    """Augmented text embeddings of one feature source (:func:`encode_prompts`), each (text, templates,
    repetitions) embedded once and cached (up to ``capacity`` entries; when full, the cache keeps only the texts of
    the request that filled it).
    Thread-safe: a mapper and the snapshots it hands to other threads share one cache.

    Args:
        encode_text: the feature source's text encoder (N strings -> (N, D) unit embeddings).
        dim: D.
        device: where the embeddings are kept.
        capacity: cached embeddings at most.
    """

    def __init__(self, encode_text: Callable[[Sequence[str]], torch.Tensor], dim: int, device: torch.device,
                 capacity: int = 1024):
        self.encode_text, self.dim, self.device, self.capacity = encode_text, int(dim), device, int(capacity)
        self._cache: Dict[tuple, torch.Tensor] = {}          # (text, templates, repetitions) -> (D,)
        self._lock = threading.Lock()

    def embed(self, texts: Sequence[str], templates: Sequence[str] = (), repetitions: int = 1) -> torch.Tensor:
        """(N, D) embeddings of ``texts`` with the given augmentation."""
        keys = [(t, tuple(templates), int(repetitions)) for t in texts]
        if not keys:
            return torch.zeros(0, self.dim, device=self.device)
        with self._lock:          # held while encoding: two threads never encode one text twice
            missing = list(dict.fromkeys(k for k in keys if k not in self._cache))
            if not missing:
                return torch.stack([self._cache[k] for k in keys])
            emb = dict(zip(missing, encode_prompts(self.encode_text, [t for t, _, _ in missing], templates,
                                                   repetitions).to(self.device)))
            out = torch.stack([emb[k] if k in emb else self._cache[k] for k in keys])
            if len(self._cache) + len(emb) > self.capacity:    # full: start again from this request's texts
                self._cache = {k: out[i] for i, k in enumerate(keys)}
            else:
                self._cache.update(emb)
            return out

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def __len__(self) -> int:
        return len(self._cache)
