"""The read side of the map: text queries, segments, label classes and clouds over one state of it.

A :class:`MapSnapshot` answers everything a reader asks of a :class:`~ov3d_ros.core.mapper.Mapper` (``query``,
``segment``, ``label_classes``, ``map_cloud``, ``label_cloud``, ``classify``, ``label_points``) from what those
answers read: voxel keys and index, colours, weights, the query features (purified when purification is on) and
their norms, the label volume's layers and vocabulary, the feature projection and the query settings.

``Mapper.snapshot()`` copies those (the first ``size`` rows of each layer, :meth:`LayerCake.copy`) into a snapshot
that owns them: later integration, eviction, compaction, compression or a load never change it, so another
thread can query it without holding the map while the next keyframe is integrated. The Mapper's own query
methods answer through a snapshot over its live tensors (no copies), so both give the same answers by
construction. Text embeddings come from the mapper's shared, thread-safe :class:`TextEmbeddings` cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ov3d_ros.core.compression import FeatureProjection
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.label_volume import LabelVolume, absorb_small_components, class_colors
from ov3d_ros.core.query import QueryResult, clean_text, float_blocks, normalise_text, relevancy_scores, select
from ov3d_ros.core.text import TextEmbeddings
from ov3d_ros.core.voxel_map import VoxelFeatureMap


@dataclass
class Segment:
    """A query answer in the map frame: xyz (M, 3) float32, rgb (M, 3) uint8, scores (M,) float32; source: what
    answered (see QueryResult)."""

    xyz: np.ndarray
    rgb: np.ndarray
    scores: np.ndarray
    source: str = 'features'


class MapSnapshot:
    """A read-only view of the map at one generation.

    Args:
        cfg: the mapper config its answers follow (query, labels, objects sections).
        vmap: the voxels: keys and index, ``colors`` and ``weights`` layers (label layers when ``labels``).
        features: (V, d) features queries score (purified when ``purified``), rows aligned with ``vmap``.
        norms: (V,) L2 norms of ``features`` (the map's own for raw fusion, those the superpoint vote keeps for
            purified ones, :func:`~ov3d_ros.core.query.row_norms` of purified ones without the vote), or None to
            compute them in every query.
        labels: the label volume over ``vmap``'s cake, or None without a vocabulary.
        projection: the map's feature compression, or None.
        texts: the text embedding cache of the feature source.
        uses_templates: whether texts are embedded with the prompt templates (CLIP-like sources).
        default_temperature: the feature source's query temperature (used when ``query.temperature`` <= 0).
        purified: whether ``features`` are purified (then labels may take a feature prior).
        generation: the mapper's generation it shows (see ``Mapper.generation``).
        keyframes: keyframes integrated into the map it shows.
        neighbours: {radius_vox: (V, M) neighbour rows} cache for this state (empty for a new snapshot).
    """

    def __init__(self, cfg: MapperConfig, vmap: VoxelFeatureMap, features: torch.Tensor, norms: Optional[torch.Tensor],
                 labels: Optional[LabelVolume], projection: Optional[FeatureProjection], texts: TextEmbeddings,
                 uses_templates: bool, default_temperature: float, purified: bool, generation: int = 0,
                 keyframes: int = 0, neighbours: Optional[Dict[int, torch.Tensor]] = None):
        self.cfg, self.map, self.features, self.norms = cfg, vmap, features, norms
        self.labels, self.projection, self.texts = labels, projection, texts
        self.uses_templates, self.default_temperature = bool(uses_templates), float(default_temperature)
        self.purified, self.generation, self.keyframes = bool(purified), int(generation), int(keyframes)
        self.device = vmap.device
        self._neighbours: Dict[int, torch.Tensor] = {} if neighbours is None else neighbours

    @property
    def size(self) -> int:
        """V, the voxels it holds."""
        return self.map.size

    @property
    def vocabulary(self) -> list:
        """The label volume's class names ([] without one)."""
        return list(self.labels.names) if self.labels is not None else []

    def nbytes(self) -> int:
        """Bytes of the tensors it holds (layers, index, features, label text, projection)."""
        seen, total = set(), 0
        tensors = list(self.map.cake.layers.values()) + [self.map.cake.index.table, self.features]
        tensors += [t for t in (self.norms, self.labels.text if self.labels is not None else None,
                                self.projection.matrix if self.projection is not None else None) if t is not None]
        for t in tensors:
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total

    # ---- texts ------------------------------------------------------------------------------------------------
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) augmented embeddings of ``texts`` (prompt templates, repetition), in the feature source's space
        (see :meth:`to_map_space`); cached (:class:`TextEmbeddings`)."""
        q = self.cfg.query
        if self.uses_templates:
            return self.texts.embed(texts, q.templates, q.repetitions)
        return self.texts.embed(texts)

    def to_map_space(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings in the space of the stored voxel features (projected when the map is compressed)."""
        emb = text_embeddings.to(self.device).float()
        return emb if self.projection is None else self.projection.project(emb)

    # ---- queries ----------------------------------------------------------------------------------------------
    def query(self, text: str, negatives: Optional[Sequence[str]] = None, threshold: float = 0.0) -> QueryResult:
        """Voxels that match ``text`` better than every negative, with score >= threshold. A text naming a class
        of the label volume's vocabulary is answered from the label volume instead: the voxels whose most
        probable class it is (score = that class's share of the evidence; ``threshold`` <= 0 keeps them all).

        ``negatives`` None, empty or all blank uses ``query.default_negatives``; ``threshold`` <= 0 uses
        ``query.default_threshold``. Texts are cleaned: control characters become spaces, whitespace runs one space;
        any other Unicode is kept (the text encoder truncates long prompts). Raises ValueError for an empty text, a
        text or negative over 1000 characters, over 32 negatives, or a threshold that is NaN, inf or above 1.
        Negatives equal to the query up to case and whitespace are dropped (see :meth:`negatives_for`); when none
        is left the default negatives minus the query are used, and when those are all the query too, ValueError.
        """
        text = clean_text(text or '', 'query text')
        if not text:
            raise ValueError('query text is empty')
        if not np.isfinite(threshold) or threshold > 1.0:
            raise ValueError(f'threshold must be a number <= 1, got {threshold}')
        if len(negatives or ()) > 32:
            raise ValueError(f'{len(negatives)} negatives given; at most 32 are accepted')
        q = self.cfg.query
        negs = [clean_text(n, 'a negative') for n in negatives or ()]
        thr = threshold if threshold > 0 else q.default_threshold
        n = self.map.size
        k = self.labels.index(text) if self.labels is not None else -1
        if k >= 0:      # a vocabulary class: the voxels whose most probable class it is
            labels, conf = self.label_classes()
            res = select(torch.where(labels == k, conf, torch.zeros_like(conf)), self.map.weights[:n],
                         max(threshold, 1e-6), q.min_observations)
            return QueryResult(res.rows, res.scores, 'label volume')
        negs = self.negatives_for(text, negs)
        emb = self.to_map_space(self.embed_texts([text] + negs))
        temperature = q.temperature if q.temperature > 0 else self.default_temperature
        scores = relevancy_scores(self.features, emb[0], emb[1:], temperature, self.norms)
        return select(scores, self.map.weights[:n], thr, q.min_observations)

    def negatives_for(self, text: str, negatives: Sequence[str]) -> list:
        """The negatives a query of ``text`` is scored against: ``negatives`` (or ``query.default_negatives`` when
        all are blank), unique and without the query itself, compared case-folded with whitespace collapsed (the
        tokenizers lowercase, so 'Wall' against 'wall' would tie everywhere). When that leaves none, the default
        negatives minus the query; ValueError when there are none either (every voxel would score 1). A feature
        source with a fixed text table (``uses_templates`` False: precomputed features) gets the default negatives
        its table holds; ValueError when it holds none. Negatives asked for are used as given (a missing one is an
        error of the query)."""
        def usable(names):
            seen, out = {normalise_text(text)}, []
            for n in names:
                key = normalise_text(n)
                if key and key not in seen:
                    seen.add(key)
                    out.append(' '.join(n.split()))
            return out
        negs = usable(negatives)
        if negs:
            return negs
        defaults = list(self.cfg.query.default_negatives)
        negs = usable(defaults)
        if negs and not self.uses_templates:
            # a fixed text table (precomputed features) embeds only its own texts: the defaults it holds
            negs = [n for n in negs if self._embeddable(n)]
            if not negs:
                raise ValueError(f'the feature source\'s text table holds none of query.default_negatives {defaults}; '
                                 'give negatives from the table')
        if not negs:
            raise ValueError(f'no negative text differs from the query {text!r} (query.default_negatives: '
                             f'{defaults}); give negatives that name something else')
        return negs

    def _embeddable(self, text: str) -> bool:
        """Whether the feature source can embed ``text`` (a fixed text table refuses texts it lacks)."""
        try:
            self.embed_texts([text])
        except ValueError:
            return False
        return True

    def segment(self, text: str, negatives: Optional[Sequence[str]] = None, threshold: float = 0.0) -> Segment:
        """The answer of :meth:`query` as points: voxel centres, colours and scores."""
        res = self.query(text, negatives, threshold)
        return Segment(self.map.centers(res.rows).cpu().numpy(),
                       self.map.colors[res.rows].clamp(0, 255).to(torch.uint8).cpu().numpy(),
                       res.scores.cpu().numpy(), res.source)

    def classify(self, text_embeddings: torch.Tensor, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per voxel (all or ``rows``), the best-matching of K texts (embeddings from :meth:`embed_texts`):
        (labels (V,) int64, similarity (V,) float32) from the features."""
        feats = self.features if rows is None else self.features[rows]
        text = self.to_map_space(text_embeddings).T
        labels = torch.empty(feats.shape[0], dtype=torch.int64, device=feats.device)
        sims = torch.empty(feats.shape[0], dtype=torch.float32, device=feats.device)
        for s, f in float_blocks(feats):      # no float32 copy of the whole feature layer
            best = (torch.nn.functional.normalize(f, dim=-1) @ text).max(dim=-1)
            labels[s:s + len(f)], sims[s:s + len(f)] = best.indices, best.values
        return labels, sims

    def voxel_labels(self, names: Sequence[str]) -> torch.Tensor:
        """(V,) index into ``names`` of every voxel's class: from the label volume when ``names`` is its
        vocabulary, else from the features (:meth:`classify`)."""
        if self.labels is not None and self.labels.is_vocabulary(names):
            return self.label_classes()[0]
        return self.classify(self.embed_texts(list(names)))[0]

    def label_points(self, xyz: np.ndarray, labels: torch.Tensor, max_distance_m: float = 0.0) -> np.ndarray:
        """Give (N, 3) points the label of their nearest observed voxel, from per-voxel ``labels`` (V,)
        (:meth:`voxel_labels` or :meth:`classify`).

        Points with no voxel centre within ``max_distance_m`` (default: one voxel size) get -1.
        """
        from scipy.spatial import cKDTree
        n = self.map.size
        out = np.full(len(xyz), -1, dtype=np.int64)
        if n == 0 or len(xyz) == 0:
            return out
        dist, idx = cKDTree(self.map.centers().cpu().numpy()).query(
            np.asarray(xyz, np.float32), k=1, distance_upper_bound=max_distance_m or self.map.voxel_size_m)
        hit = np.isfinite(dist)
        out[hit] = labels.cpu().numpy()[idx[hit]]
        return out

    # ---- label volume -----------------------------------------------------------------------------------------
    def label_classes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per voxel, the label volume's class (vocabulary index, -1 unobserved) and its confidence (pooled
        when purifying). Needs a vocabulary."""
        if self.labels is None:
            raise ValueError('the map has no label vocabulary')
        cfg, n = self.cfg.labels, self.map.size
        prior = None
        if self.purified and cfg.feature_prior and n:
            prior = self.labels.probabilities(self.features, self.to_map_space(self.labels.text))
        dist = self.labels.distribution(n, self._neighbours_within(cfg.smoothing_radius_vox), prior)
        labels, conf = self.labels.most_probable(dist)
        if cfg.min_component_vox > 1:
            absorbed = absorb_small_components(labels, self._neighbours_within(1), cfg.min_component_vox)
            moved = torch.nonzero(absorbed != labels, as_tuple=True)[0]
            conf[moved] = dist[moved].gather(1, absorbed[moved, None])[:, 0]   # the share of the class they joined
            labels = absorbed
        return labels, conf

    def _neighbours_within(self, radius_vox: int) -> Optional[torch.Tensor]:
        """(V, M) rows of every voxel's neighbours within ``radius_vox`` (None for 0), cached for this state."""
        if radius_vox <= 0:
            return None
        if radius_vox not in self._neighbours:
            from ov3d_ros.core.purification.graph import ball_offsets, neighbour_rows
            self._neighbours[radius_vox] = neighbour_rows(self.map, torch.arange(self.map.size, device=self.device),
                                                          ball_offsets(radius_vox, self.device))
        return self._neighbours[radius_vox]

    # ---- clouds -----------------------------------------------------------------------------------------------
    def map_cloud(self, max_points: int = 0) -> Segment:
        """All voxel centres and colours (uniformly subsampled to ``max_points`` when > 0); scores = weights."""
        rows = _subsample(torch.arange(self.map.size, device=self.device), max_points)
        return Segment(self.map.centers(rows).cpu().numpy(),
                       self.map.colors[rows].clamp(0, 255).to(torch.uint8).cpu().numpy(),
                       self.map.weights[rows].cpu().numpy())

    def label_cloud(self, max_points: int = 0) -> Tuple[Segment, np.ndarray]:
        """Voxels with a class in the label volume, coloured by class (:func:`class_colors`; scores = the class's
        share of the evidence), and their (M,) vocabulary indices. Empty without a vocabulary or voxels."""
        if self.labels is None or self.map.size == 0:
            return Segment(np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8), np.zeros(0, np.float32)), \
                np.zeros(0, np.int64)
        labels, conf = self.label_classes()
        rows = _subsample(torch.nonzero(labels >= 0, as_tuple=True)[0], max_points)
        idx = labels[rows].cpu().numpy()
        return Segment(self.map.centers(rows).cpu().numpy(), class_colors(len(self.labels.names))[idx],
                       conf[rows].cpu().numpy()), idx


def _subsample(rows: torch.Tensor, max_points: int) -> torch.Tensor:
    """``rows`` evenly thinned to ``max_points`` when 0 < max_points < len(rows)."""
    if 0 < max_points < len(rows):
        return rows[torch.linspace(0, len(rows) - 1, max_points, device=rows.device).long()]
    return rows
