"""Open-vocabulary text queries against voxel features."""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Optional

import torch

from ov3d_ros.core.threads import emulated_half, split_rows


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


def normalise_text(text: str) -> str:
    """``text`` in Unicode's compatibility form (NFKC: 'cafe' + a combining accent is 'café'), without format
    characters (zero-width spaces), case-folded, with whitespace runs collapsed: the key two texts are compared by."""
    text = ''.join(c for c in unicodedata.normalize('NFKC', text) if unicodedata.category(c) != 'Cf')
    return ' '.join(text.casefold().split())


FLOAT_BLOCK = 1024
"""Rows per block of :func:`float_blocks`: 1 024 x 384 float32 (1.5 MB) stay near the cache."""


def float_blocks(features: torch.Tensor, block: int = FLOAT_BLOCK):
    """Yield (start, (n, D) float32 rows start..start+n-1) of (V, D) ``features`` of any float dtype, ``block`` rows
    at a time: for row-wise work (norms, cosines, class scores) over a map's fp16 features without a float32 copy
    of them all, whose fresh pages cost more than the work (100 000 x 384 rows, one thread: norms 12 against 77 ms,
    a 20-class softmax about 50 against 162 ms; each row's values are the same whatever the block). float32
    features are yielded as views; others are converted through one reused buffer on the CPU, so a block is only
    valid until the next one is taken."""
    if features.dtype == torch.float32:
        for start in range(0, len(features), block):
            yield start, features[start:start + block]
        return
    buf = torch.empty(min(block, len(features)), features.shape[1], dtype=torch.float32, device=features.device) \
        if features.device.type == 'cpu' else None
    for start in range(0, len(features), block):
        rows = features[start:start + block]
        yield start, rows.float() if buf is None else buf[:len(rows)].copy_(rows)


def row_norms(features: torch.Tensor, block: int = FLOAT_BLOCK) -> torch.Tensor:
    """(V,) float32 L2 norms of (V, D) ``features`` rows of any float dtype, accumulated in fp32. On the CPU fp16
    rows are converted to float32 first (3x faster than ``vector_norm(..., dtype=float32)`` of the fp16 values, the
    same result), a block at a time (:func:`float_blocks`); the same values."""
    if features.device.type != 'cpu':
        return torch.linalg.vector_norm(features, dim=1, dtype=torch.float32)
    if features.dtype == torch.float32 or len(features) <= block:
        return torch.linalg.vector_norm(features.float(), dim=1)
    out = torch.empty(len(features), dtype=torch.float32)
    for start, x in float_blocks(features, block):
        torch.linalg.vector_norm(x, dim=1, out=out[start:start + len(x)])
    return out


def text_products(features: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """(V, K) float32 products of (V, D) ``features`` with (K, D) float32 ``texts``. One matmul in the features'
    own dtype (an fp16 map is not converted) where the device multiplies it natively; on a CPU that only emulates
    it (:func:`~ov3d_ros.core.threads.emulated_half`), float32 blocks (:func:`float_blocks`), each multiplied as
    texts x block^T into a (K, V) result returned transposed: on a 2-core AMD EPYC (AVX2), one thread, 100 k / 1 M
    fp16 rows by 5 texts took 30 / 338 ms against 63 / 564 ms for the fp16 matmul (and 49 / 455 ms for the blocks
    as block x texts^T: MKL there is slow on products with a narrow output). On several intra-op threads the blocks
    are shared out as one run of rows per thread (:func:`~ov3d_ros.core.threads.split_rows`): the same values as
    on one thread."""
    if not emulated_half(features.dtype, features.device):
        return (features @ texts.T.to(features.dtype)).float()
    out = torch.empty(texts.shape[0], features.shape[0], dtype=torch.float32)

    def rows(lo: int, hi: int) -> None:
        for start, x in float_blocks(features[lo:hi]):
            torch.mm(texts, x.T, out=out[:, lo + start:lo + start + len(x)])

    split_rows(rows, features.shape[0], FLOAT_BLOCK)
    return out.T


def relevancy_scores(features: torch.Tensor, query: torch.Tensor, negatives: torch.Tensor, temperature: float,
                     norms: Optional[torch.Tensor] = None, chunk: int = 262144) -> torch.Tensor:
    """Score voxels for a query relative to negative texts.

    For each voxel, cosine similarities to the query and every negative go through a softmax at
    ``temperature``; the score is the query's probability, or 0 where some negative matches better (ties go to
    the query). One product of the stored features with the K + 1 texts (:func:`text_products`); the cosines
    divide by the feature norms afterwards, so no normalised copy is made.

    Args:
        features: (V, D) voxel features (any float dtype).
        query: (D,) unit text embedding.
        negatives: (K, D) unit text embeddings, K >= 0.
        temperature: softmax temperature (> 0).
        norms: (V,) float L2 norms of ``features`` when known (``VoxelFeatureMap.feature_norms``); else computed.
    Returns:
        (V,) float32 scores in [0, 1].
    """
    if temperature <= 0:
        raise ValueError(f'temperature must be > 0, got {temperature}')
    texts = torch.cat([query[None], negatives], dim=0).to(features.device, torch.float32)
    out = torch.empty(features.shape[0], dtype=torch.float32, device=features.device)
    for start in range(0, features.shape[0], chunk):
        f = features[start:start + chunk]
        n = norms[start:start + chunk] if norms is not None else row_norms(f)
        cos = text_products(f, texts).div_(n.float().clamp_min(1e-12)[:, None])               # (c, K + 1)
        if texts.shape[0] == 1:
            out[start:start + chunk] = 1.0
            continue
        q, neg = cos[:, :1], cos[:, 1:]
        p = 1.0 / (1.0 + torch.exp((neg - q) / temperature).sum(dim=1))                  # softmax at the query
        out[start:start + chunk] = torch.where(q[:, 0] >= neg.max(dim=1).values, p, torch.zeros_like(p))
    return out


def select(scores: torch.Tensor, weights: torch.Tensor, threshold: float, min_weight: float) -> QueryResult:
    """Keep voxels with score >= threshold and observation weight >= min_weight; a score of 0 (a negative, or
    another class, wins there) never answers, whatever the threshold."""
    keep = (scores >= threshold) & (scores > 0) & (weights >= min_weight)
    rows = torch.nonzero(keep, as_tuple=True)[0]
    return QueryResult(rows, scores[rows])
