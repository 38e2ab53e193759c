"""Open-vocabulary text queries against voxel features."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class QueryResult:
    """Voxels that answer a query. rows (M,) int64 map rows; scores (M,) float32 in [0, 1]; source: what answered
    ('features', or 'label volume')."""

    rows: torch.Tensor
    scores: torch.Tensor
    source: str = 'features'


def clean_text(text: str, what: str = 'text', max_chars: int = 1000) -> str:
    """``text`` with control characters as spaces and whitespace runs collapsed (other Unicode kept);
    ValueError naming ``what`` when it is longer than ``max_chars``."""
    if len(text) > max_chars:
        raise ValueError(f'{what} has {len(text)} characters; at most {max_chars} are accepted')
    return ' '.join(''.join(' ' if unicodedata.category(c) in ('Cc', 'Cs') else c for c in text).split())


def relevancy_scores(features: torch.Tensor, query: torch.Tensor, negatives: torch.Tensor, temperature: float,
                     chunk: int = 262144) -> torch.Tensor:
    """Score voxels for a query relative to negative texts.

    For each voxel, cosine similarities to the query and every negative go through a softmax at
    ``temperature``; the score is the query's probability, or 0 where some negative matches better.

    Args:
        features: (V, D) voxel features (any float dtype; normalised here).
        query: (D,) unit text embedding.
        negatives: (K, D) unit text embeddings, K >= 0.
        temperature: softmax temperature (> 0).
    Returns:
        (V,) float32 scores in [0, 1].
    """
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    texts = torch.cat([query[None], negatives], dim=0).to(features.device, torch.float32)
    out = torch.empty(features.shape[0], dtype=torch.float32, device=features.device)
    for start in range(0, features.shape[0], chunk):
        f = F.normalize(features[start:start + chunk].float(), dim=-1)
        p = torch.softmax(f @ texts.T / temperature, dim=-1)
        out[start:start + chunk] = torch.where(p.argmax(dim=-1) == 0, p[:, 0], torch.zeros_like(p[:, 0]))
    return out


def select(scores: torch.Tensor, weights: torch.Tensor, threshold: float, min_weight: float) -> QueryResult:
    """Keep voxels with score >= threshold and observation weight >= min_weight."""
    keep = (scores >= threshold) & (weights >= min_weight)
    rows = torch.nonzero(keep, as_tuple=True)[0]
    return QueryResult(rows, scores[rows])
