"""Label volume: per-voxel class evidence for an active vocabulary (Laser's segmentation-as-classification).

Every keyframe, each feature cell gets a softmax over the vocabulary's text embeddings at a temperature; each
lifted point takes the bilinear mix of its cells' probabilities, and each voxel sums the probabilities of its
points. A voxel's class is the argmax of its evidence and its confidence the normalised evidence of that class.
Summing per-view probabilities is a vote across views: one view's wrong feature moves a voxel's class much less
than it moves the voxel's averaged feature.

A new vocabulary cannot replay past frames, so :meth:`LabelVolume.recompute` rebuilds the evidence from the
stored (fused or purified) features instead: weight * softmax(feature . text / T).

With purification on, each voxel's class distribution (evidence / its sum) is also pooled with the geometry
affinities (GeoPurify's pooling applied to the label volume, ``pooled``); classes then come from the pooled one.
At readout (``Mapper.label_classes``) distributions may be averaged over neighbours, and same-class regions too
small to be objects are absorbed by their surroundings (:func:`absorb_small_components`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core.layer_cake import LayerCake
from ov3d_ros.core.lifting import CellFeatures
from ov3d_ros.core.query import float_blocks, normalise_text


LAYERS = ('label_evidence', 'label_pooled')
"""The label volume's layers on the map's cake: label_evidence (V, K) float32 summed class probabilities;
label_pooled (V, K) float32 pooled class distributions (only with purification)."""


class LabelVolume:
    """Class evidence in layers of the voxel map's cake (:data:`LAYERS`), so rows are the map's rows and
    eviction reaches them through the cake.

    Args:
        names: the vocabulary (K class names).
        text: (K, D) text embeddings of ``names`` in the space of the features given to :meth:`integrate`.
        temperature: softmax temperature over cosine similarities (> 0).
        cake: the map's :class:`~ov3d_ros.core.layer_cake.LayerCake`.
        restore: take the label layers the cake already holds (e.g. read from a map file; ValueError if they do
            not have K columns) instead of starting from zero evidence.
    """

    def __init__(self, names: Sequence[str], text: torch.Tensor, temperature: float, cake: LayerCake,
                 restore: bool = False):
        if not names:
            raise ValueError('the vocabulary is empty')
        if len(names) != text.shape[0]:
            raise ValueError(f'{len(names)} names but {text.shape[0]} text embeddings')
        if not temperature > 0:
            raise ValueError(f'label temperature must be > 0, got {temperature}')
        self.names: List[str] = list(names)
        self._keys = [normalise_text(n) for n in self.names]     # what index() compares, once per vocabulary
        self.cake = cake
        self.device = cake.device
        self.text = text.to(self.device, torch.float32)
        self.temperature = float(temperature)
        k = len(self.names)
        if restore:
            for name in LAYERS:
                spec = cake.specs.get(name)
                if spec is not None and spec.width != k:
                    raise ValueError(f'layer {name!r} has {spec.width} columns but the vocabulary {k} classes')
        else:
            for name in LAYERS:
                cake.remove_layer(name)
        cake.add_layer('label_evidence', k, torch.float32)

    evidence = property(lambda self: self.cake['label_evidence'],
                        doc='(capacity, K) float32 class evidence of every map row.')
    pooled = property(lambda self: self.cake.get('label_pooled'),
                      doc='(capacity, K) float32 pooled class distributions, or None without pooling.')

    def index(self, text: str) -> int:
        """Vocabulary index of ``text`` (compared by :func:`~ov3d_ros.core.query.normalise_text`: case, whitespace
        and Unicode form ignored), or -1."""
        key = normalise_text(text)
        return self._keys.index(key) if key in self._keys else -1

    def is_vocabulary(self, names: Sequence[str]) -> bool:
        """Whether ``names`` are this vocabulary, in order (compared as :meth:`index` compares)."""
        return [normalise_text(n) for n in names] == self._keys

    def _distributions(self, n: int) -> torch.Tensor:
        """(n, K) evidence of the first ``n`` rows normalised to sum 1 (0 for unobserved rows)."""
        ev = self.evidence[:n]
        return ev / ev.sum(dim=1, keepdim=True).clamp_min(1e-12)

    def enable_pooling(self) -> None:
        """Keep a pooled copy of the class distributions (filled by the purifier, see :meth:`channel`)."""
        self.cake.add_layer('label_pooled', len(self.names), torch.float32)

    def disable_pooling(self) -> None:
        self.cake.remove_layer('label_pooled')

    def channel(self, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(distributions (n, K), pooled layer (capacity, K)) for :meth:`GeometryPooling.update`'s ``channels``."""
        return self._distributions(n), self.pooled

    def probabilities(self, features: torch.Tensor, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, K) float32 softmax over the vocabulary of (N, D) features of any float dtype (against ``text``,
        default the vocabulary's): softmax(cos(f, t) / temperature), a block of rows at a time
        (:func:`~ov3d_ros.core.query.float_blocks`: no float32 copy of the features)."""
        text = self.text if text is None else text.to(self.device, torch.float32)
        out = torch.empty(features.shape[0], text.shape[0], dtype=torch.float32, device=features.device)
        for s, f in float_blocks(features):
            out[s:s + len(f)] = torch.softmax(F.normalize(f, dim=-1) @ text.T / self.temperature, dim=-1)
        return out

    def integrate(self, rows: torch.Tensor, cells: CellFeatures) -> None:
        """Add one keyframe: ``rows`` (N,) the map row of each lifted point, ``cells`` their features."""
        p_cells = self.probabilities(cells.grid.to(self.device))                    # (M, K)
        w = cells.weights.to(self.device)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-12)
        p = CellFeatures(p_cells, cells.cells.to(self.device), w).dense()                 # (N, K)
        self.evidence.index_add_(0, rows.to(self.device), p)

    def recompute(self, features: torch.Tensor, weights: torch.Tensor, text: Optional[torch.Tensor] = None,
                  chunk: int = 262144) -> None:
        """Evidence of every voxel from its (V, d) stored feature and (V,) observation weight (V = the map's
        size); ``text`` (K, d) the vocabulary in the stored features' space (default: the vocabulary's own
        embeddings). Pooled distributions are cleared (the next pooling fills them)."""
        v = features.shape[0]
        self._check_rows(v)
        ev = self.evidence
        ev.zero_()
        if self.pooled is not None:
            self.pooled.zero_()
        for s in range(0, v, chunk):
            ev[s:min(s + chunk, v)] = weights[s:s + chunk, None].to(self.device) * \
                self.probabilities(features[s:s + chunk].to(self.device), text)

    def load(self, evidence: torch.Tensor) -> None:
        """Take saved (V, K) evidence (V = the map's size; pooled distributions are cleared, the next pooling
        fills them)."""
        if evidence.ndim != 2 or evidence.shape[1] != len(self.names):
            raise ValueError(f'evidence must be (V, {len(self.names)}), got {tuple(evidence.shape)}')
        self._check_rows(evidence.shape[0])
        self.evidence.zero_()
        self.evidence[:evidence.shape[0]] = evidence.to(self.device, torch.float32)
        if self.pooled is not None:
            self.pooled.zero_()

    def _check_rows(self, v: int) -> None:
        if v != self.cake.size:
            raise ValueError(f'{v} rows of label evidence for a map of {self.cake.size} voxels')

    def classes(self, n: int, neighbours: Optional[torch.Tensor] = None,
                prior: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """(labels (n,) int64, confidence (n,) float32) of the first ``n`` rows: :meth:`most_probable` of their
        :meth:`distribution`."""
        return self.most_probable(self.distribution(n, neighbours, prior))

    def most_probable(self, dist: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(labels (n,) int64, confidence (n,) float32) of the first n rows' (n, K) distributions ``dist``: the most
        probable class and its share; unobserved rows get -1 and 0."""
        conf, labels = dist.max(dim=1)
        seen = self.evidence[:len(dist)].sum(dim=1) > 0
        return torch.where(seen, labels, torch.full_like(labels, -1)), torch.where(seen, conf, torch.zeros_like(conf))

    def distribution(self, n: int, neighbours: Optional[torch.Tensor] = None,
                     prior: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(n, K) class distributions of the first ``n`` rows (pooled when purifying).

        ``prior`` (n, K): class probabilities from another source multiplied in (then renormalised).
        ``neighbours`` (n, M) rows (-1 none; column 0 the voxel itself): each voxel's distribution is then
        averaged over its observed neighbours (a 3D majority filter that removes isolated wrong voxels), as one
        weighted embedding bag over the rows (weight 0 for a missing neighbour): no (n, M, K) gather (100 000
        voxels, M = 7, K = 21, one thread: 3 against 49-58 ms; the sums agree to the last bit or one unit in it)."""
        dist = self.pooled[:n] if self.pooled is not None else self._distributions(n)
        if prior is not None:
            dist = dist * prior
            dist = dist / dist.sum(dim=1, keepdim=True).clamp_min(1e-30)
        if neighbours is not None:
            nb = neighbours.to(self.device)
            smooth = F.embedding_bag(nb.clamp_min(0), dist, mode='sum', per_sample_weights=(nb >= 0).to(dist.dtype))
            dist = smooth / smooth.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return dist


def class_colors(k: int) -> np.ndarray:
    """(k, 3) uint8 distinct RGB colours, one per vocabulary index (golden-ratio hues; stable per index)."""
    import colorsys
    return np.array([[round(255 * c) for c in colorsys.hsv_to_rgb((0.61803398875 * i) % 1.0, 0.75, 0.95)]
                     for i in range(k)], dtype=np.uint8).reshape(k, 3)


def absorb_small_components(labels: torch.Tensor, neighbours: torch.Tensor, min_size: int) -> torch.Tensor:
    """Relabel connected same-class regions smaller than ``min_size`` voxels with the most common class of their
    neighbours in larger regions (one pass; voxels without such a neighbour keep their class).

    labels (V,) int64, -1 unobserved; neighbours (V, M) face-adjacent rows (-1 none; column 0 may be the voxel).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    V = labels.shape[0]
    lab, nb = labels.cpu().numpy(), neighbours.cpu().numpy()
    i, j = np.nonzero(nb >= 0)
    i, j = i, nb[i, j]
    same = (lab[i] == lab[j]) & (lab[i] >= 0)
    graph = coo_matrix((np.ones(int(same.sum()), np.int8), (i[same], j[same])), shape=(V, V))
    _, comp = connected_components(graph, directed=False)
    small = (np.bincount(comp)[comp] < min_size) & (lab >= 0)
    if not small.any():
        return labels
    rows = np.nonzero(small)[0]
    k = int(lab.max()) + 1
    votes = np.zeros((len(rows), k), np.int64)
    for c in range(nb.shape[1]):
        other = nb[rows, c]
        ok = (other >= 0) & ~small[np.maximum(other, 0)] & (lab[np.maximum(other, 0)] >= 0)
        np.add.at(votes, (np.nonzero(ok)[0], lab[other[ok]]), 1)
    out = lab.copy()
    has = votes.sum(1) > 0
    out[rows[has]] = votes[has].argmax(1)
    return torch.as_tensor(out, device=labels.device)
