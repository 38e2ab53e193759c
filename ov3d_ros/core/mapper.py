"""The Mapper facade: keyframe selection, feature extraction, lifting, fusion and text queries."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.compression import FeatureProjection
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.keyframes import KeyframeSelector
from ov3d_ros.core.label_volume import LabelVolume, absorb_small_components, class_colors
from ov3d_ros.core.lifting import CellFeatures, lift_keyframe
from ov3d_ros.core.query import QueryResult, clean_text, normalise_text, relevancy_scores, select
from ov3d_ros.core.text import encode_prompts
from ov3d_ros.core.voxel_map import VoxelFeatureMap


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; anything else is passed to torch.device."""
    if name in ('', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dev = torch.device(name)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {name!r} requested but CUDA is not available')
    return dev


@dataclass
class Frame:
    """One RGB-D observation. rgb (H, W, 3) uint8; depth_m (H, W) float32 metres (registered to rgb);
    T_W_C (4, 4) camera-to-map; labels (H, W) semantic ids, only for simulated sources; features (h, w, D)
    precomputed dense features covering the image (then the extractor is not run)."""

    rgb: np.ndarray
    depth_m: np.ndarray
    camera: PinholeCamera
    T_W_C: np.ndarray
    stamp_s: float = 0.0
    labels: Optional[np.ndarray] = None
    features: Optional[np.ndarray] = None


@dataclass
class Segment:
    """A query answer in the map frame: xyz (M, 3) float32, rgb (M, 3) uint8, scores (M,) float32; source: what
    answered (see QueryResult)."""

    xyz: np.ndarray
    rgb: np.ndarray
    scores: np.ndarray
    source: str = 'features'


class Mapper:
    """Builds and queries an open-vocabulary voxel map.

    Args:
        cfg: the mapper config.
        extractor: the 2D feature source (its device is used for the map).
    """

    def __init__(self, cfg: MapperConfig, extractor: FeatureExtractor):
        self.cfg = cfg
        self.extractor = extractor
        self.device = extractor.device
        self.timings_s: Dict[str, float] = {}
        self._checkpoint_ids: Dict[str, dict] = {}     # {purify.checkpoint: its identity}, see purification_identity
        self.purifier = self._make_purifier() if cfg.purify.enabled else None
        self.evicted_voxels = 0
        self._text_cache: Dict[tuple, torch.Tensor] = {}   # (text, augmentation) -> (D,)
        self.labels: Optional[LabelVolume] = None
        self._neighbours: Tuple[tuple, dict] = ((), {})   # {radius: neighbour rows} of the current map state
        self.clear()
        if cfg.labels.vocabulary:
            self.set_vocabulary(cfg.labels.vocabulary)

    def validate(self, frame: Frame) -> None:
        """Raise ValueError with the reason if a frame cannot be integrated.

        Depth pixels that are 0, NaN, inf, negative or outside [min_depth_m, max_depth_m] are ignored (a frame
        without any valid one adds nothing). The pose must be a finite rigid transform (orthonormal rotation within
        1e-3, det +1, last row 0 0 0 1) and the frame must fit the map's key range (±2^20 voxels per axis)."""
        depth = np.asarray(frame.depth_m)
        if depth.ndim != 2 or depth.size == 0 or depth.dtype.kind != 'f':
            raise ValueError(f'depth must be a non-empty (H, W) float array in metres, got {depth.shape} {depth.dtype}')
        H, W = depth.shape
        if frame.rgb.ndim != 3 or frame.rgb.shape[2] != 3 or frame.rgb.dtype != np.uint8:
            raise ValueError(f'colour must be (H, W, 3) uint8, got {frame.rgb.shape} {frame.rgb.dtype}')
        if frame.rgb.shape[:2] != (H, W):
            raise ValueError(f'colour is {frame.rgb.shape[1]}x{frame.rgb.shape[0]} but depth is {W}x{H}; '
                             'publish depth registered to the colour image')
        cam = frame.camera
        if (cam.width, cam.height) != (W, H):
            raise ValueError(f'camera info is {cam.width}x{cam.height} but images are {W}x{H}')
        if not np.isfinite(frame.stamp_s):
            raise ValueError(f'frame time stamp must be finite, got {frame.stamp_s}')
        T = np.asarray(frame.T_W_C)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError('pose must be a finite 4x4 matrix')
        R = T[:3, :3]
        if (np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6 or np.abs(R.T @ R - np.eye(3)).max() > 1e-3
                or np.linalg.det(R) < 0):
            raise ValueError('pose is not a rigid transform: its rotation must be orthonormal with det +1 and its '
                             'last row 0 0 0 1')
        m = self.cfg.map
        z = m.max_depth_m if np.isfinite(m.max_depth_m) else np.max(depth, where=np.isfinite(depth), initial=0.0)
        reach = float(z) * (1 + max(cam.cx, W - cam.cx) / cam.fx + max(cam.cy, H - cam.cy) / cam.fy)
        limit = (2 ** 20 - 1) * m.voxel_size_m          # voxel_map packs 21 bits per axis
        if np.abs(T[:3, 3]).max() + reach >= limit:
            raise ValueError(f'frame reaches beyond the map range (±{limit:.4g} m): camera at {T[:3, 3].tolist()}, '
                             f'view up to {reach:.4g} m from it')
        if frame.labels is not None:
            labels = np.asarray(frame.labels)
            if labels.shape != (H, W) or labels.dtype.kind not in 'iu':
                raise ValueError(f'label image must be ({H}, {W}) integer ids like the depth image, '
                                 f'got {labels.shape} {labels.dtype}')
        if frame.features is not None:       # a numpy array, or a tensor from integrate_batch
            feats = torch.as_tensor(frame.features)
            if feats.ndim != 3 or feats.shape[2] != self.extractor.dim or feats.numel() == 0:
                raise ValueError(f'precomputed features must be (h, w, {self.extractor.dim}), got {tuple(feats.shape)}')
            if not bool(torch.isfinite(feats).all()):
                raise ValueError('precomputed features contain NaN or inf')

    def integrate_batch(self, frames: Sequence[Frame]) -> int:
        """Integrate the keyframes among ``frames`` (in order), running the feature extractor once on all of them
        when it takes batches (``extract_batch``: one ViT batch, fp16 on CUDA). Returns how many were integrated."""
        keys = []
        for f in frames:
            self.validate(f)
            if self.keyframes.check(f.T_W_C, f.stamp_s):
                self.keyframes.accept(f.T_W_C, f.stamp_s)
                keys.append(f)
        batchable = [f for f in keys if f.features is None and f.labels is None]
        if len(batchable) > 1 and hasattr(self.extractor, 'extract_batch') and \
                len({f.rgb.shape for f in batchable}) == 1:
            grids = self.extractor.extract_batch([f.rgb for f in batchable])
            done = {id(f): g for f, g in zip(batchable, grids)}
            keys = [replace(f, features=done[id(f)]) if id(f) in done else f for f in keys]
        for f in keys:
            self.integrate(f, force=True)
        return len(keys)

    def integrate(self, frame: Frame, force: bool = False) -> bool:
        """Integrate ``frame`` if it is a keyframe (or ``force``); returns whether it was integrated."""
        self.validate(frame)
        if not force and not self.keyframes.check(frame.T_W_C, frame.stamp_s):
            return False
        t0 = time.perf_counter()
        if frame.features is not None:
            feats = torch.nn.functional.normalize(torch.as_tensor(frame.features, dtype=torch.float32,
                                                                  device=self.device), dim=-1)
        elif getattr(self.extractor, 'uses_geometry', False):   # the simulated source anchors errors in the world
            feats = self.extractor.extract(frame.rgb, frame.labels, depth_m=frame.depth_m, camera=frame.camera,
                                           T_W_C=frame.T_W_C)
        else:
            feats = self.extractor.extract(frame.rgb, frame.labels)
        t_features = time.perf_counter()
        if 0 < self.cfg.map.compress_dim < feats.shape[-1]:
            self._update_projection(feats.reshape(-1, feats.shape[-1]))
        t1 = time.perf_counter()
        lifted = lift_keyframe(torch.from_numpy(np.array(frame.depth_m, dtype=np.float32, order='C')),
                               torch.from_numpy(np.array(frame.rgb, order='C')),
                               feats if self.projection is None else self.projection.project(feats), frame.camera,
                               torch.from_numpy(np.asarray(frame.T_W_C, dtype=np.float64)),
                               self.cfg.map.min_depth_m, self.cfg.map.max_depth_m, self.cfg.map.pixel_stride)
        touched = self.map.integrate(lifted.points, lifted.features, lifted.colors)
        if self.labels is not None:   # class probabilities from the full-dimension features
            cells = CellFeatures(feats.reshape(-1, feats.shape[-1]), lifted.features.cells, lifted.features.weights)
            self.labels.integrate(self.map.rows_of(lifted.points), cells)
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        if self.purifier is not None and self.cfg.purify.mode == 'incremental':
            self.purifier.update(self.map, touched, self._label_channels())
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
        self._purified_stale = True
        if self.cfg.map.clear_radius_m > 0:
            self.clear_beyond(frame.T_W_C[:3, 3], self.cfg.map.clear_radius_m)
        if 0 < self.cfg.map.max_voxels < self.map.size:
            self.evict(frame.T_W_C[:3, 3], int(0.9 * self.cfg.map.max_voxels))
        self.keyframes.accept(frame.T_W_C, frame.stamp_s)
        self.num_keyframes += 1
        t3 = time.perf_counter()
        self.timings_s = {'features': t1 - t0, 'compress': t1 - t_features, 'fusion': t2 - t1, 'purify': t3 - t2,
                          'total': t3 - t0}
        return True

    def _update_projection(self, samples: torch.Tensor) -> None:
        """Fit the feature compression on a keyframe's (N, D) features, or fold them into it (map.compress_*),
        carrying every feature layer of the map (fused, purified) into the new basis."""
        if self.projection is None:
            self.projection = FeatureProjection.fit(samples, self.cfg.map.compress_dim)
            change = self.projection.matrix
        elif self.cfg.map.compress_update:
            change = self.projection.update(samples)
        else:
            return
        self.map.project(change)

    def _make_purifier(self):
        from ov3d_ros.core.purification.pooling import GeometryPooling
        embed = None
        if self.cfg.purify.affinity == 'learned':
            from ov3d_ros.core.purification.student import load_student
            net = load_student(self.cfg.purify.checkpoint, self.device)
            if net.reads_features and self.cfg.map.compress_dim > 0:
                raise ValueError(f'purify.checkpoint {self.cfg.purify.checkpoint!r} reads voxel features, which '
                                 'map.compress_dim compresses; use a color,normal student, purify.affinity '
                                 'fallback, or map.compress_dim 0')
            if net.reads_features and net.cfg.feature_dim != self.extractor.dim:
                raise ValueError(f'purify.checkpoint {self.cfg.purify.checkpoint!r} was trained on {net.cfg.feature_dim}-d '
                                 f'features but {self.extractor.name} gives {self.extractor.dim}-d ones; train a '
                                 'student for these features (ov3d train-affinity) or use purify.affinity fallback')
            embed = net.embed
            from ov3d_ros.core.purification.student import checkpoint_identity
            self._checkpoint_ids[str(self.cfg.purify.checkpoint)] = checkpoint_identity(self.cfg.purify.checkpoint)
        return GeometryPooling(self.cfg.purify, embed)

    def purification_identity(self) -> Optional[dict]:
        """What the purified layers depend on besides the map: every ``purify`` setting but ``enabled``, with the
        checkpoint named by its size and sha256 (learned affinity; wherever the file lies). None without
        purification. A map file whose identity matches is restored as saved; otherwise it is re-pooled."""
        if self.purifier is None:
            return None
        from dataclasses import asdict
        ident = asdict(self.cfg.purify)
        ident.pop('enabled')
        if self.cfg.purify.affinity == 'learned':     # of the weights loaded (read when the student was)
            ident['checkpoint'] = self._checkpoint_ids[str(self.cfg.purify.checkpoint)]
        else:
            ident.pop('checkpoint')
        return ident

    def _restorable(self, vmap: VoxelFeatureMap, info: dict, labelled: bool) -> bool:
        """Whether a loaded map's purification layers were made with the current settings and are complete, so
        that they are used as saved instead of re-pooling the whole map."""
        if self.purifier is None or vmap.size == 0 or info.get('purification') != self.purification_identity():
            return False
        need = {'purified': vmap.dim, 'normals': 3}
        if self.purifier.embed is not None:
            need['embeddings'] = None
        if labelled:
            need['label_pooled'] = len(info.get('vocabulary') or [])
        return all(name in vmap.cake.specs and width in (None, vmap.cake.specs[name].width)
                   for name, width in need.items())

    def _purification_layers(self) -> Tuple[str, ...]:
        from ov3d_ros.core.label_volume import LAYERS as LABEL_LAYERS
        from ov3d_ros.core.purification.pooling import LAYERS
        return LAYERS + LABEL_LAYERS[1:]

    def _drop_purified(self) -> None:
        """Remove the purification layers from the map (they do not match the current settings)."""
        for name in self._purification_layers():
            self.map.cake.remove_layer(name)

    def _reset_purifier(self) -> None:
        """Empty pooling state for a new map, keeping the loaded student (no checkpoint re-read)."""
        if self.purifier is not None:
            self.purifier = type(self.purifier)(self.cfg.purify, self.purifier.embed)
        self._purified_stale = False

    def _refresh_purified(self) -> None:
        """In ``purify.mode: whole``, re-pool the whole map when keyframes came since the last time."""
        if self.purifier is not None and self.cfg.purify.mode == 'whole' and self._purified_stale:
            self.purify_all()

    def _label_channels(self) -> list:
        """The label volume's distributions, pooled with the features when purifying."""
        if self.labels is None or self.labels.pooled is None:
            return []
        return [self.labels.channel(self.map.size)]

    def query_features(self) -> torch.Tensor:
        """(V, D) features that queries use: purified when purification is enabled, else the raw fusion."""
        if self.purifier is not None:
            self._refresh_purified()
            return self.purifier.features(self.map)
        return self.map.features[:self.map.size]

    def label_classes(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per voxel, the label volume's class (vocabulary index, -1 unobserved) and its confidence (pooled
        when purifying). Needs a vocabulary."""
        self._refresh_purified()
        cfg, n = self.cfg.labels, self.map.size
        prior = None
        if self.purifier is not None and cfg.feature_prior and n:
            prior = self.labels.probabilities(self.query_features(), self.to_map_space(self.labels.text))
        labels, conf = self.labels.classes(n, self._neighbours_within(cfg.smoothing_radius_vox), prior)
        if cfg.min_component_vox > 1:
            labels = absorb_small_components(labels, self._neighbours_within(1), cfg.min_component_vox)
        return labels, conf

    def _neighbours_within(self, radius_vox: int) -> Optional[torch.Tensor]:
        """(V, M) rows of every voxel's neighbours within ``radius_vox`` (None for 0), cached per map state."""
        if radius_vox <= 0:
            return None
        key = (id(self.map), self.map.size, self.evicted_voxels)
        if self._neighbours[0] != key:          # the map's voxels changed since the last time
            self._neighbours = (key, {})
        cache = self._neighbours[1]
        if radius_vox not in cache:
            from ov3d_ros.core.purification.graph import ball_offsets, neighbour_rows
            cache[radius_vox] = neighbour_rows(self.map, torch.arange(self.map.size, device=self.device),
                                               ball_offsets(radius_vox, self.device))
        return cache[radius_vox]

    def purify_all(self) -> None:
        """Re-pool the whole map, label volume included (offline; a no-op without purification)."""
        if self.purifier is not None:
            self.purifier.update(self.map, None, self._label_channels())
            self._purified_stale = False

    def reconfigure_purification(self, cfg) -> None:
        """Use purification settings ``cfg`` (a PurifyConfig: on/off, affinity, checkpoint, neighbourhood, ...)
        from now on and re-pool the whole map with them. Raises ValueError, keeping the current settings, if
        ``cfg`` cannot be used (e.g. a missing checkpoint)."""
        old = self.cfg.purify
        self.cfg.purify = cfg
        try:
            purifier = self._make_purifier() if cfg.enabled else None
        except (ValueError, OSError, RuntimeError) as e:
            self.cfg.purify = old
            raise ValueError(f'purification settings not applied: {e}') from e
        self.purifier, self._purified_stale = purifier, True
        self._drop_purified()
        if self.labels is not None and purifier is not None:
            self.labels.enable_pooling()
        if cfg.mode == 'incremental':
            self.purify_all()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) augmented embeddings of ``texts`` (prompt templates, repetition), in the feature source's space
        (see :meth:`to_map_space`). Each text is embedded once and cached (up to 1024 texts), so the negatives and
        the label vocabulary are not re-embedded by every query."""
        q = self.cfg.query
        augment = (tuple(q.templates), q.repetitions) if self.extractor.uses_templates else ((), 1)
        keys = [(t, augment) for t in texts]
        missing = list(dict.fromkeys(k for k in keys if k not in self._text_cache))
        if missing:
            if len(self._text_cache) + len(missing) > 1024:
                self._text_cache.clear()
            emb = encode_prompts(self.extractor.encode_text, [t for t, _ in missing], *augment).to(self.device)
            self._text_cache.update(zip(missing, emb))
        if not keys:
            return torch.zeros(0, self.extractor.dim, device=self.device)
        return torch.stack([self._text_cache[k] for k in keys])

    def to_map_space(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings in the space of the stored voxel features (projected when the map is compressed)."""
        emb = text_embeddings.to(self.device).float()
        return emb if self.projection is None else self.projection.project(emb)

    def set_vocabulary(self, names: Sequence[str], evidence: Optional[torch.Tensor] = None) -> None:
        """Make ``names`` the label volume's vocabulary (empty: no label volume). Past keyframes cannot be replayed,
        so the evidence is recomputed from the stored (purified) features, unless ``evidence`` (V, K) is given (a
        saved label volume). Raises ValueError for bad names."""
        names = [str(n).strip() for n in names]
        if any(not n for n in names):
            raise ValueError('vocabulary names must not be empty')
        if len({n.lower() for n in names}) != len(names):
            raise ValueError('vocabulary names must be unique (case-insensitive)')
        if len(names) > 1000 or any(len(n) > 200 for n in names):
            raise ValueError('vocabulary too large: at most 1000 names of at most 200 characters')
        if not names:
            from ov3d_ros.core.label_volume import LAYERS
            for name in LAYERS:
                self.map.cake.remove_layer(name)
            self.cfg.labels.vocabulary, self.labels = [], None
            return
        if evidence is not None and tuple(evidence.shape) != (self.map.size, len(names)):
            raise ValueError(f'evidence must be ({self.map.size}, {len(names)}), got {tuple(evidence.shape)}')
        self._make_labels(names)
        if evidence is not None:
            self.labels.load(evidence)
        elif self.map.size:
            self.labels.recompute(self.query_features(), self.map.weights[:self.map.size],
                                  self.to_map_space(self.labels.text))
        if self.purifier is not None and self.map.size:
            self.purify_all()

    def _make_labels(self, names: Sequence[str], restore: bool = False) -> None:
        """A label volume over ``names`` on the map's cake (fresh, or the layers already there: ``restore``)."""
        t = self.cfg.labels.temperature if self.cfg.labels.temperature > 0 else self.extractor.default_temperature
        text = self.embed_texts(names)
        self.labels = LabelVolume(names, text, t, self.map.cake, restore)
        if self.purifier is not None:
            self.labels.enable_pooling()
        self.cfg.labels.vocabulary = list(names)

    def segment(self, text: str, negatives: Optional[Sequence[str]] = None, threshold: float = 0.0) -> Segment:
        """The answer of :meth:`query` as points: voxel centres, colours and scores."""
        res = self.query(text, negatives, threshold)
        return Segment(self.map.centers(res.rows).cpu().numpy(),
                       self.map.colors[res.rows].clamp(0, 255).to(torch.uint8).cpu().numpy(),
                       res.scores.cpu().numpy(), res.source)

    def query(self, text: str, negatives: Optional[Sequence[str]] = None, threshold: float = 0.0) -> QueryResult:
        """Voxels that match ``text`` better than every negative, with score >= threshold. A text naming a class
        of the label volume's vocabulary is answered from the label volume instead: the voxels whose most
        probable class it is (score = that class's share of the evidence; ``threshold`` <= 0 keeps them all).

        ``negatives`` None, empty or all blank uses ``query.default_negatives``; ``threshold`` <= 0 uses
        ``query.default_threshold``. Texts are cleaned: control characters become spaces, whitespace runs one space;
        any other Unicode is kept (the text encoder truncates long prompts). Raises ValueError for an empty text, a
        text or negative over 1000 characters, over 32 negatives, or a threshold that is NaN, inf or above 1.
        Negatives equal to the query up to case and whitespace are dropped (see :meth:`_negatives_for`); when none
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
        negs = self._negatives_for(text, negs)
        emb = self.to_map_space(self.embed_texts([text] + negs))
        temperature = q.temperature if q.temperature > 0 else self.extractor.default_temperature
        norms = self.map.feature_norms() if self.purifier is None else None      # raw map: norms kept by the map
        scores = relevancy_scores(self.query_features(), emb[0], emb[1:], temperature, norms)
        return select(scores, self.map.weights[:n], thr, q.min_observations)

    def _negatives_for(self, text: str, negatives: Sequence[str]) -> list:
        """The negatives a query of ``text`` is scored against: ``negatives`` (or ``query.default_negatives`` when
        all are blank), unique and without the query itself, compared case-folded with whitespace collapsed (the
        tokenizers lowercase, so 'Wall' against 'wall' would tie everywhere). When that leaves none, the default
        negatives minus the query; ValueError when there are none either (every voxel would score 1)."""
        def usable(names):
            seen, out = {normalise_text(text)}, []
            for n in names:
                key = normalise_text(n)
                if key and key not in seen:
                    seen.add(key)
                    out.append(' '.join(n.split()))
            return out
        negs = usable(negatives)
        if not negs:
            negs = usable(self.cfg.query.default_negatives)
        if not negs:
            raise ValueError(f'no negative text differs from the query {text!r} (query.default_negatives: '
                             f'{list(self.cfg.query.default_negatives)}); give negatives that name something else')
        return negs

    def classify(self, text_embeddings: torch.Tensor, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per voxel (all or ``rows``), the best-matching of K texts (embeddings from :meth:`embed_texts`):
        (labels (V,) int64, similarity (V,) float32) from the features."""
        feats = self.query_features() if rows is None else self.query_features()[rows]
        sims = torch.nn.functional.normalize(feats.float(), dim=-1) @ self.to_map_space(text_embeddings).T
        best = sims.max(dim=-1)
        return best.indices, best.values

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

    def save(self, path) -> int:
        """Write the map and what is needed to query it to ``path`` (atomic); returns the file size."""
        from dataclasses import asdict
        from ov3d_ros.core.map_io import save_map
        info = {'feature_source': self.extractor.name, 'config': asdict(self.cfg), 'keyframes': self.num_keyframes,
                'class_names': list(getattr(self.extractor, 'class_names', []) or [])}
        extra = {}
        if hasattr(self.extractor, 'vectors') and hasattr(self.extractor, 'names'):   # precomputed text table
            info['text_names'] = list(self.extractor.names)
            extra['text_vectors'] = self.extractor.vectors
        if self.projection is not None:
            extra['projection'], extra['projection_energy'] = self.projection.matrix, self.projection.energy
        if self.labels is not None:
            info['vocabulary'] = self.labels.names
        skip: Tuple[str, ...] = ()
        if self.purifier is not None and not (self.cfg.purify.mode == 'whole' and self._purified_stale) \
                and 'purified' in self.map.cake:
            info['purification'] = self.purification_identity()
        else:                        # stale or absent: a loader re-pools
            skip = self._purification_layers()
        return save_map(path, self.map, info, extra, skip)

    def load(self, path) -> dict:
        """Replace the map with the one in ``path``; the current map is kept if the file is unusable.

        Raises MapFileError (a ValueError) with the reason. Returns the file's info.
        """
        from ov3d_ros.core.map_io import MapFileError, load_map
        vmap, info, extra = load_map(path, self.device)
        projection = None
        if 'projection' in extra:
            try:
                projection = FeatureProjection(extra['projection'], extra.get('projection_energy')).to(self.device)
            except ValueError as e:
                raise MapFileError(f'{path}: {e}') from e
        source_dim = projection.in_dim if projection is not None else vmap.dim
        if source_dim != self.extractor.dim or info.get('feature_source') != self.extractor.name:
            raise MapFileError(f'{path}: map made with {info.get("feature_source")} (D={source_dim}), but this '
                               f'mapper uses {self.extractor.name} (D={self.extractor.dim})')
        if projection is not None and projection.out_dim != vmap.dim:
            raise MapFileError(f'{path}: projection to d={projection.out_dim} but features have d={vmap.dim}')
        vocabulary = list(info.get('vocabulary') or [])
        evidence = vmap.cake.get('label_evidence')
        if vocabulary and (evidence is None or vmap.cake.specs['label_evidence'].width != len(vocabulary)):
            raise MapFileError(f'{path}: label evidence does not match {vmap.size} voxels x {len(vocabulary)} classes')
        restore = self._restorable(vmap, info, bool(vocabulary))
        vmap.max_weight = float(self.cfg.map.max_weight)
        self.map, self.projection = vmap, projection
        if not restore:
            self._drop_purified()
        if not vocabulary:
            self.map.cake.remove_layer('label_evidence')
        self._reset_purifier()
        current, self.labels = list(self.cfg.labels.vocabulary), None
        if vocabulary:                     # the file's label volume
            self._make_labels(vocabulary, restore=True)
        elif current:                      # the configured one, recomputed from the stored features
            self.set_vocabulary(current)
        if not restore and (self.labels is None or vocabulary or vmap.size == 0):
            self.purify_all()
        self.cfg.map.voxel_size_m = vmap.voxel_size_m
        self.num_keyframes = int(info.get('keyframes', 0))
        self.keyframes = KeyframeSelector(self.cfg.keyframes)
        return info

    def bytes_per_voxel(self) -> int:
        """Memory per voxel of everything the mapper keeps per row: every layer of the map and its index."""
        return self.map.cake.bytes_per_voxel()

    def memory_report(self) -> Dict[str, float]:
        """Bytes per voxel row of every layer of the map ('keys', 'features', ..., 'purified', 'normals',
        'embeddings', 'label_evidence', 'label_pooled' as kept for the current configuration) and of the hash
        index ('index')."""
        return self.map.cake.memory_report()

    def evict(self, position, keep: int) -> int:
        """Keep the ``keep`` voxels nearest to ``position`` (3,) in metres, drop the rest; returns how many went."""
        if keep >= self.map.size:
            return 0
        rows = torch.topk(self._distances(position), keep, largest=False).indices
        return self._keep_rows(torch.sort(rows).values)

    def clear_beyond(self, position, radius_m: float) -> int:
        """Drop the voxels whose centres are farther than ``radius_m`` from ``position`` (3,); returns how many."""
        rows = torch.nonzero(self._distances(position) <= radius_m, as_tuple=True)[0]
        return self._keep_rows(rows) if len(rows) < self.map.size else 0

    def _distances(self, position) -> torch.Tensor:
        """(V,) distances of the voxel centres to ``position`` (3,) in metres."""
        return (self.map.centers() - torch.as_tensor(np.asarray(position, np.float32), device=self.device)).norm(dim=1)

    def _keep_rows(self, rows: torch.Tensor) -> int:
        """Keep only ``rows`` (sorted) in every layer of the map; returns how many went."""
        gone = self.map.size - len(rows)
        self.map.keep(rows)
        self.evicted_voxels += gone
        return gone

    def clear(self) -> None:
        """Forget every voxel and keyframe (the feature source and config stay)."""
        self.map = VoxelFeatureMap(self.cfg.map.voxel_size_m, self.extractor.dim, self.device,
                                   self.cfg.map.initial_capacity, self.cfg.map.max_weight)
        self.projection = None
        if self.labels is not None:
            self.labels = LabelVolume(self.labels.names, self.labels.text, self.labels.temperature, self.map.cake)
            if self.purifier is not None:
                self.labels.enable_pooling()
        self._reset_purifier()
        self.keyframes = KeyframeSelector(self.cfg.keyframes)
        self.num_keyframes = 0

    @classmethod
    def from_file(cls, path, device: str = 'auto') -> 'Mapper':
        """A Mapper holding the map in ``path``, with the feature source it was made with (for queries)."""
        from ov3d_ros.core.config import update_from_dict
        from ov3d_ros.core.features import create_extractor
        from ov3d_ros.core.features.precomputed import PrecomputedFeatures
        from ov3d_ros.core.map_io import MapFileError, load_map
        _, info, extra = load_map(path, 'cpu')
        try:
            cfg = update_from_dict(MapperConfig(), info['config'])
        except (KeyError, ValueError) as e:
            raise MapFileError(f'{path}: unusable config in the map file ({e})') from e
        cfg.map.device = device
        dev = resolve_device(device)
        if 'text_names' in info:
            extractor = PrecomputedFeatures(info['text_names'], extra['text_vectors'].numpy(), dev)
        else:
            extractor = create_extractor(cfg.features, dev, info.get('class_names') or None)
        mapper = cls(cfg, extractor)
        mapper.load(path)
        return mapper

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
