"""The Mapper facade: keyframe selection, feature extraction, lifting, fusion and text queries."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.compression import FeatureProjection
from ov3d_ros.core.config import MapperConfig, validate
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.features.precomputed import same_text_table
from ov3d_ros.core.keyframes import KeyframeSelector
from ov3d_ros.core.label_volume import LabelVolume
from ov3d_ros.core.lifting import CellFeatures, lift_keyframe
from ov3d_ros.core.query import QueryResult, normalise_text, row_norms
from ov3d_ros.core.snapshot import MapSnapshot, Segment  # noqa: F401  (Segment re-exported)
from ov3d_ros.core.text import TextEmbeddings
from ov3d_ros.core.voxel_map import VoxelFeatureMap


def resolve_device(name: str) -> torch.device:
    """'auto' → cuda when available, else cpu; else 'cpu', 'cuda' or 'cuda:N' (ValueError for another device)."""
    if name in ('', 'auto'):
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f'device {name!r}: {e}') from None
    if dev.type not in ('cpu', 'cuda'):
        raise ValueError(f"device {name!r}: the map runs on 'cpu' or 'cuda' ('cuda:N'); 'auto' picks")
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


class Mapper:
    """Builds and queries an open-vocabulary voxel map.

    Args:
        cfg: the mapper config.
        extractor: the 2D feature source (its device is used for the map).
    Raises:
        ValueError: naming every config value out of its range or choices (``ov3d_ros.core.config.validate``), or
            a ``map.compress_dim`` above the feature source's dimension.
    """

    def __init__(self, cfg: MapperConfig, extractor: FeatureExtractor):
        validate(cfg)
        if cfg.map.compress_dim > extractor.dim:        # would be stored uncompressed without a word
            raise ValueError(f'map.compress_dim {cfg.map.compress_dim} is more than the {extractor.dim} dimensions of '
                             f'the {extractor.name} features; give 1..{extractor.dim} (0 = uncompressed)')
        self.cfg = cfg
        self.extractor = extractor
        self.device = extractor.device
        self.timings_s: Dict[str, float] = {}
        self._checkpoint_ids: Dict[str, dict] = {}     # {purify.checkpoint: its identity}, see purification_identity
        self.purifier = self._make_purifier() if cfg.purify.enabled else None
        self.evicted_voxels = 0
        self.texts = TextEmbeddings(lambda texts: self.extractor.encode_text(texts), extractor.dim, self.device)  # shared w/ snapshots
        self.generation = 0          # counts changes of the map or its query state (see snapshot)
        self.labels: Optional[LabelVolume] = None
        self._neighbours: Tuple[tuple, dict] = ((), {})   # {radius: neighbour rows} of the current map state
        self._basis = self._starting_basis() if cfg.map.compress_basis else None
        self._voxel_size_m = cfg.map.voxel_size_m      # a loaded map brings its own grid; clear() comes back here
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
        limit = (2 ** 20 - 1) * m.voxel_size_m          # voxel_map packs 21 bits per axis
        spread = 1 + sum(cam.view_extent())
        reach = m.max_depth_m * spread                  # at most; when that is too far, what the frame sees
        if not np.abs(T[:3, 3]).max() + reach < limit:
            reach = float(np.max(depth, where=np.isfinite(depth) & (depth <= m.max_depth_m), initial=0.0)) * spread
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
        """Integrate the keyframes among ``frames`` (in order, by the map's keyframe rule) together
        (:meth:`integrate_keyframes`). Returns how many were integrated."""
        keys = []
        for f in frames:
            self.validate(f)
            if self.keyframes.check(f.T_W_C, f.stamp_s):
                self.keyframes.accept(f.T_W_C, f.stamp_s)
                keys.append(f)
        return self.integrate_keyframes(keys)

    def integrate_keyframes(self, frames: Sequence[Frame]) -> int:
        """Integrate every one of ``frames`` as a keyframe (no keyframe rule), in order, as one batch: the feature
        extractor runs once on all of them when it takes batches (``extract_batch``: one ViT batch, fp16 on
        CUDA), each is fused, and then purification runs once over every voxel they touched (consecutive
        keyframes see mostly the same voxels, so a batch costs little more than one keyframe's purification),
        followed by ``clear_radius_m`` and ``max_voxels`` around the last camera (the map may exceed
        ``max_voxels`` by one batch until then). All frames are validated before any is fused: one bad frame
        raises ValueError and integrates none. Returns how many were integrated."""
        for f in frames:
            self.validate(f)
        if frames:
            self._integrate(self.with_batched_features(frames))
        return len(frames)

    def batchable(self, frames: Sequence[Frame]) -> List[Frame]:
        """The frames among ``frames`` whose features one batch of the feature source extracts: those without
        precomputed features or label images, when there are two or more of them, all of one image size, and the
        source takes batches (``extract_batch``: one ViT batch, fp16 on CUDA); else none."""
        todo = [f for f in frames if f.features is None and f.labels is None]
        if len(todo) > 1 and hasattr(self.extractor, 'extract_batch') and len({f.rgb.shape for f in todo}) == 1:
            return todo
        return []

    def with_batched_features(self, frames: Sequence[Frame]) -> List[Frame]:
        """``frames``, those of :meth:`batchable` with their features extracted in one batch (``Frame.features``)."""
        todo = self.batchable(frames)
        if not todo:
            return list(frames)
        done = {id(f): g for f, g in zip(todo, self.extractor.extract_batch([f.rgb for f in todo]))}
        return [replace(f, features=done[id(f)]) if id(f) in done else f for f in frames]

    def integrate(self, frame: Frame, force: bool = False) -> bool:
        """Integrate ``frame`` if it is a keyframe (or ``force``); returns whether it was integrated."""
        self.validate(frame)
        if not force and not self.keyframes.check(frame.T_W_C, frame.stamp_s):
            return False
        self._integrate([frame])
        return True

    def _features(self, frame: Frame) -> torch.Tensor:
        """(h, w, D) float32 unit features of a validated frame: its precomputed ones or the extractor's."""
        if frame.features is not None:
            return torch.nn.functional.normalize(torch.as_tensor(frame.features, dtype=torch.float32,
                                                                 device=self.device), dim=-1)
        if getattr(self.extractor, 'uses_geometry', False):   # the simulated source anchors errors in the world
            return self.extractor.extract(frame.rgb, frame.labels, depth_m=frame.depth_m, camera=frame.camera,
                                          T_W_C=frame.T_W_C)
        return self.extractor.extract(frame.rgb, frame.labels)

    def _integrate(self, frames: Sequence[Frame]) -> None:
        """Fuse validated keyframes in order, then purify once over every voxel they touched. Rows do not move
        between the fusions (inserts append; eviction comes after purification), so the touched rows stay valid.
        ``timings_s``: seconds for the whole batch, and ``keyframes`` in it."""
        t0 = time.perf_counter()
        spent = {'features': 0.0, 'compress': 0.0, 'fusion': 0.0}
        touched = []
        for frame in frames:
            t_start = time.perf_counter()
            feats = self._features(frame)
            t_features = time.perf_counter()
            if 0 < self.cfg.map.compress_dim < feats.shape[-1]:
                self._update_projection(feats.reshape(-1, feats.shape[-1]))
            t1 = time.perf_counter()
            T_W_C = torch.from_numpy(np.asarray(frame.T_W_C, dtype=np.float64))
            lifted = lift_keyframe(torch.from_numpy(np.array(frame.depth_m, dtype=np.float32, order='C')),
                                   torch.from_numpy(np.array(frame.rgb, order='C')),
                                   feats if self.projection is None else self.projection.project(feats),
                                   frame.camera, T_W_C, self.cfg.map.min_depth_m, self.cfg.map.max_depth_m,
                                   self.cfg.map.pixel_stride)
            fused = self.map.integrate(lifted.points, lifted.features, lifted.colors, origin=T_W_C[:3, 3],
                                       return_point_rows=self.labels is not None)
            if self.labels is not None:   # class probabilities from the full-dimension features
                fused, point_rows = fused
                cells = CellFeatures(feats.reshape(-1, feats.shape[-1]), lifted.features.cells,
                                     lifted.features.weights)
                self.labels.integrate(point_rows, cells)
            touched.append(fused)
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
            self.keyframes.accept(frame.T_W_C, frame.stamp_s)
            self.num_keyframes += 1
            t2 = time.perf_counter()
            spent['features'] += t1 - t_start
            spent['compress'] += t1 - t_features
            spent['fusion'] += t2 - t1
        t2 = time.perf_counter()
        if self.purifier is not None and self.cfg.purify.mode == 'incremental':
            self.purifier.update(self.map, torch.cat(touched), self._label_channels())
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
        self._purified_stale = True
        position = frames[-1].T_W_C[:3, 3]
        if self.cfg.map.clear_radius_m > 0:
            self.clear_beyond(position, self.cfg.map.clear_radius_m)
        if 0 < self.cfg.map.max_voxels < self.map.size:
            self.evict(position, int(0.9 * self.cfg.map.max_voxels))
        self.generation += 1
        t3 = time.perf_counter()
        self.timings_s = {**spent, 'purify': t3 - t2, 'total': t3 - t0, 'keyframes': len(frames)}

    def _update_projection(self, samples: torch.Tensor) -> None:
        """Fit the feature compression on a keyframe's (N, D) features, or fold them into it (map.compress_*),
        carrying every feature layer of the map (fused, purified) into the new basis."""
        if self.projection is None:
            self.projection = self._basis.clone() if self._basis is not None else \
                FeatureProjection.fit(samples, self.cfg.map.compress_dim)
            change = self.projection.matrix
        elif self.cfg.map.compress_update:
            change = self.projection.update(samples)       # None while the stored basis still serves
        else:
            return
        if change is not None:
            self.map.project(change)

    def _starting_basis(self) -> FeatureProjection:
        """The projection ``map.compress_basis`` names (a compressed map's file), to ``map.compress_dim`` dims.
        Raises ValueError with the reason."""
        from ov3d_ros.core.map_io import load_extra
        path, dim = self.cfg.map.compress_basis, self.cfg.map.compress_dim
        if not 0 < dim < self.extractor.dim:
            raise ValueError(f'map.compress_basis {path!r} needs map.compress_dim in 1..{self.extractor.dim - 1} '
                             f'(the {self.extractor.name} features are {self.extractor.dim}-d), got {dim}')
        try:
            info, extra = load_extra(os.path.expanduser(path))
            projection = FeatureProjection.from_tensors(extra)
        except ValueError as e:                    # MapFileError too
            raise ValueError(f'map.compress_basis {path!r}: {e}') from e
        if projection is None:
            raise ValueError(f'map.compress_basis {path!r} is an uncompressed map (no projection); give a map '
                             'saved with map.compress_dim')
        other = self._other_source(info, projection.in_dim) or self._other_table(info, extra)
        if other:
            raise ValueError(f'map.compress_basis {path!r} was {other}')
        if projection.out_dim < dim:
            raise ValueError(f'map.compress_basis {path!r} holds {projection.out_dim} directions, fewer than '
                             f'map.compress_dim {dim}')
        return projection.leading(dim).to(self.device)

    def _other_source(self, info: dict, source_dim: int) -> str:
        """'' when a map file's info and its source dimension say its features live in this mapper's feature space
        (``FeatureExtractor.space``; files without one: the same feature source); else 'made with <source>
        (D=...), but this mapper uses <source> (D=...)'."""
        ex = self.extractor
        if source_dim == ex.dim and (info['feature_space'] == ex.space if 'feature_space' in info
                                     else info.get('feature_source') == ex.name):
            return ''
        space = f', {info["feature_space"]}' if 'feature_space' in info and info['feature_space'] != info.get(
            'feature_source') else ''
        own = f', {ex.space}' if ex.space != ex.name else ''
        why = ('; its weights are random (pretrained=none), drawn anew for every model built'
               if str(getattr(ex, 'weights', '')).startswith('random') else '')
        return (f'made with {info.get("feature_source")} (D={source_dim}{space}), but this mapper uses '
                f'{ex.name} (D={ex.dim}{own}{why})')

    def _other_table(self, info: dict, extra: dict) -> str:
        """'' unless a map file holds a precomputed text table (names and vectors) other than this mapper's: the
        loaded map would be queried through this mapper's table; else 'made with another precomputed text table
        ...'. Compared value by value: the stored vectors are normalised again when read, so their bits may differ."""
        ours = getattr(self.extractor, 'vectors', None)
        if 'text_vectors' not in extra or ours is None:
            return ''
        names = [str(n) for n in info.get('text_names') or []]
        if same_text_table(names, extra['text_vectors'].to(ours.device), self.extractor.names, ours):
            return ''
        return (f'made with another precomputed text table ({len(names)} texts: {", ".join(names[:5])}) than this '
                f"mapper's ({len(self.extractor.names)} texts: {', '.join(self.extractor.names[:5])})")

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
        when purifying). Needs a vocabulary (see :meth:`MapSnapshot.label_classes`)."""
        return self.view().label_classes()

    def view(self, refresh: bool = True) -> MapSnapshot:
        """The live map as a :class:`MapSnapshot` over its own tensors (no copies): valid until the map changes.
        Every query method of the Mapper answers through it. ``refresh``: in ``purify.mode: whole``, re-pool a
        stale map first (False for readers of geometry and colour only)."""
        key = (id(self.map), self.map.size, self.evicted_voxels)
        if self._neighbours[0] != key:          # the map's voxels changed since the last time
            self._neighbours = (key, {})
        if self.purifier is None:
            features, norms = self.map.features[:self.map.size], self.map.feature_norms()
        else:
            features = self.query_features() if refresh else self.purifier.features(self.map)
            norms = self.purifier.feature_norms(self.map)      # None: computed by each query
        return MapSnapshot(self.cfg, self.map, features, norms, self.labels,
                           self.projection, self.texts, self.extractor.uses_templates,
                           self.extractor.default_temperature, self.purifier is not None, self.generation,
                           self.num_keyframes, self._neighbours[1])

    def snapshot(self) -> MapSnapshot:
        """A read-only copy of what queries read, at this generation: voxel keys and index, colours, weights, the
        query features (purified when purifying) and their norms, the label volume, the projection and the
        config. It owns its tensors (the first ``size`` rows of each layer), so later integration, eviction,
        compaction, loads or clears never change it, and it answers ``query``, ``segment``, ``label_classes``,
        ``map_cloud`` and ``label_cloud`` exactly as the Mapper did when it was taken. Costs one copy of those
        rows (about 1 KB per voxel at D=512; README: performance), no feature extraction or pooling (in
        ``purify.mode: whole`` a stale map is re-pooled first, as a query would)."""
        import copy
        self._refresh_purified()                      # 'whole' mode: re-pool a stale map first
        names = ['weights', 'colors']
        if self.purifier is None or 'purified' not in self.map.cake:
            names += ['features', 'norms']
            source = 'features'
        else:
            names.append('purified')
            source = 'purified'
        from ov3d_ros.core.label_volume import LAYERS as LABEL_LAYERS
        names += [n for n in LABEL_LAYERS if self.labels is not None and n in self.map.cake]
        vmap = self.map.copy(names)
        norms = None
        if source == 'purified' and self.purifier.votes:   # what queries read: the superpoint vote
            vmap.cake.rows('purified').copy_(self.purifier.features(self.map))
            norms = self.purifier.feature_norms(self.map).clone()    # kept with the voted rows
        labels = None
        if self.labels is not None:
            labels = LabelVolume(self.labels.names, self.labels.text.clone(), self.labels.temperature, vmap.cake,
                                 restore=True)
        projection = None if self.projection is None else self.projection.clone()
        features = vmap.cake.rows(source)
        if norms is None:       # once, not per query
            norms = vmap.feature_norms() if source == 'features' else row_norms(features)
        return MapSnapshot(copy.deepcopy(self.cfg), vmap, features, norms, labels, projection, self.texts,
                           self.extractor.uses_templates, self.extractor.default_temperature,
                           self.purifier is not None, self.generation, self.num_keyframes)

    def purify_all(self) -> None:
        """Re-pool the whole map, label volume included (offline; a no-op without purification)."""
        if self.purifier is not None:
            self.purifier.update(self.map, None, self._label_channels())
            self._purified_stale = False

    def reconfigure_purification(self, cfg) -> None:
        """Use purification settings ``cfg`` (a PurifyConfig: on/off, affinity, checkpoint, neighbourhood, ...)
        from now on and re-pool the whole map with them. Raises ValueError, keeping the current settings, if
        ``cfg`` cannot be used (e.g. a missing checkpoint)."""
        old, old_purifier = self.cfg.purify, self.purifier
        self.cfg.purify = cfg
        try:
            purifier = self._make_purifier() if cfg.enabled else None
        except (ValueError, OSError, RuntimeError) as e:
            self.cfg.purify = old
            raise ValueError(f'purification settings not applied: {e}') from e
        try:
            self._use_purifier(purifier)
        except Exception as e:           # e.g. out of memory re-pooling with a large neighbourhood
            self.cfg.purify = old        # back to the old settings, re-pooled with them from scratch
            self._use_purifier(None if old_purifier is None else type(old_purifier)(old, old_purifier.embed))
            raise ValueError(f'purification settings not applied (the map is pooled with the previous ones): '
                             f'{type(e).__name__}: {e}') from e

    def _use_purifier(self, purifier) -> None:
        """Pool with ``purifier`` (None: no purification) from now on: drop the pooled layers; in incremental mode
        re-pool the whole map with it."""
        self.purifier, self._purified_stale = purifier, True
        self.generation += 1
        self._drop_purified()
        if self.labels is not None and purifier is not None:
            self.labels.enable_pooling()
        if self.cfg.purify.mode == 'incremental':
            self.purify_all()

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) augmented embeddings of ``texts`` (prompt templates, repetition), in the feature source's space
        (see :meth:`to_map_space`). Each text is embedded once and cached (:class:`TextEmbeddings`, shared with
        the snapshots), so the negatives and the label vocabulary are not re-embedded by every query."""
        q = self.cfg.query
        if self.extractor.uses_templates:
            return self.texts.embed(texts, q.templates, q.repetitions)
        return self.texts.embed(texts)

    def to_map_space(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Text embeddings in the space of the stored voxel features (projected when the map is compressed)."""
        emb = text_embeddings.to(self.device).float()
        return emb if self.projection is None else self.projection.project(emb)

    @contextlib.contextmanager
    def _all_or_nothing(self):
        """Put the mapper back as it was if the block raises (out of memory half-way through loading a map or
        changing the vocabulary): such a block replaces the mapper's objects (map, label volume, purifier) and the
        cake's layers rather than changing them in place, so restoring the references restores the state."""
        state, cake = dict(self.__dict__), self.map.cake
        layers, specs = dict(cake.layers), dict(cake.specs)
        vocabulary, voxel_size_m = list(self.cfg.labels.vocabulary), self.cfg.map.voxel_size_m
        try:
            yield
        except BaseException:
            self.__dict__.clear()
            self.__dict__.update(state)
            cake.layers.clear()
            cake.layers.update(layers)
            cake.specs.clear()
            cake.specs.update(specs)
            self.cfg.labels.vocabulary, self.cfg.map.voxel_size_m = vocabulary, voxel_size_m
            self.generation += 1             # whatever was derived from the state in between is stale
            raise

    def set_vocabulary(self, names: Sequence[str], evidence: Optional[torch.Tensor] = None) -> None:
        """Make ``names`` the label volume's vocabulary (empty: no label volume). Past keyframes cannot be replayed,
        so the evidence is recomputed from the stored (purified) features, unless ``evidence`` (V, K) is given (a
        saved label volume). Raises ValueError for bad names; on any error the previous vocabulary stays."""
        names = self.vocabulary_names(names)
        with self._all_or_nothing():
            self._set_vocabulary(names, evidence)

    def _set_vocabulary(self, names: List[str], evidence: Optional[torch.Tensor]) -> None:
        self.generation += 1
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

    @staticmethod
    def vocabulary_names(names: Sequence[str]) -> List[str]:
        """``names`` as a vocabulary takes them (whitespace runs collapsed); ValueError for empty, repeated (compared
        by :func:`~ov3d_ros.core.query.normalise_text`, as queries are) or too many names."""
        names = [' '.join(str(n).split()) for n in names]
        if any(not n for n in names):
            raise ValueError('vocabulary names must not be empty')
        if len({normalise_text(n) for n in names}) != len(names):
            raise ValueError('vocabulary names must be unique (case-insensitive)')
        if len(names) > 1000 or any(len(n) > 200 for n in names):
            raise ValueError('vocabulary too large: at most 1000 names of at most 200 characters')
        return names

    def prepare_vocabulary(self, names: Sequence[str]) -> None:
        """Embed a vocabulary's names ahead of :meth:`set_vocabulary` (ValueError for bad names), which then finds
        them cached. Touches no map state: callers run it without the map lock, so that integration goes on while
        a large vocabulary is embedded."""
        self.embed_texts(self.vocabulary_names(names))

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
        return self.view().segment(text, negatives, threshold)

    def query(self, text: str, negatives: Optional[Sequence[str]] = None, threshold: float = 0.0) -> QueryResult:
        """Voxels that match ``text`` better than every negative, with score >= threshold; a text naming a class
        of the label volume's vocabulary is answered from the label volume. See :meth:`MapSnapshot.query` (texts,
        negatives, thresholds and the ValueErrors for bad ones)."""
        return self.view().query(text, negatives, threshold)

    def classify(self, text_embeddings: torch.Tensor, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per voxel (all or ``rows``), the best-matching of K texts (embeddings from :meth:`embed_texts`):
        (labels (V,) int64, similarity (V,) float32) from the features."""
        return self.view().classify(text_embeddings, rows)

    def voxel_labels(self, names: Sequence[str]) -> torch.Tensor:
        """(V,) index into ``names`` of every voxel's class: from the label volume when ``names`` is its
        vocabulary, else from the features (:meth:`classify`)."""
        return self.view().voxel_labels(names)

    def label_points(self, xyz: np.ndarray, labels: torch.Tensor, max_distance_m: float = 0.0) -> np.ndarray:
        """Give (N, 3) points the label of their nearest observed voxel, from per-voxel ``labels`` (V,)
        (:meth:`voxel_labels` or :meth:`classify`); -1 for points with no voxel centre within ``max_distance_m``
        (default: one voxel size)."""
        return self.view(refresh=False).label_points(xyz, labels, max_distance_m)

    def save(self, path) -> int:
        """Write the map and what is needed to query it to ``path`` (atomic); returns the file size."""
        from dataclasses import asdict
        from ov3d_ros.core.map_io import save_map
        info = {'feature_source': self.extractor.name, 'feature_space': self.extractor.space,
                'config': asdict(self.cfg), 'keyframes': self.num_keyframes,
                'class_names': list(getattr(self.extractor, 'class_names', []) or [])}
        extra = {}
        if hasattr(self.extractor, 'vectors') and hasattr(self.extractor, 'names'):   # precomputed text table
            info['text_names'] = list(self.extractor.names)
            extra['text_vectors'] = self.extractor.vectors
        if self.projection is not None:
            extra.update(self.projection.tensors())
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
        """Replace the map with the one in ``path``; the current map is kept if the file is unusable or anything
        fails on the way (all or nothing).

        Raises MapFileError (a ValueError) with the reason. Returns the file's info.
        """
        from ov3d_ros.core.map_io import load_map
        return self._use_file(path, *load_map(path, self.device))

    def _use_file(self, path, vmap: VoxelFeatureMap, info: dict, extra: Dict[str, torch.Tensor]) -> dict:
        """:meth:`load` of what :func:`~ov3d_ros.core.map_io.load_map` read from ``path``."""
        from ov3d_ros.core.map_io import MapFileError
        try:
            projection = FeatureProjection.from_tensors(extra)
        except ValueError as e:
            raise MapFileError(f'{path}: {e}') from e
        projection = None if projection is None else projection.to(self.device)
        other = self._other_source(info, projection.in_dim if projection is not None else vmap.dim) \
            or self._other_table(info, extra)
        if other:
            raise MapFileError(f'{path}: map {other}')
        if projection is not None and projection.out_dim != vmap.dim:
            raise MapFileError(f'{path}: projection to d={projection.out_dim} but features have d={vmap.dim}')
        vocabulary = list(info.get('vocabulary') or [])
        evidence = vmap.cake.get('label_evidence')
        if vocabulary and (evidence is None or vmap.cake.specs['label_evidence'].width != len(vocabulary)):
            raise MapFileError(f'{path}: label evidence does not match {vmap.size} voxels x {len(vocabulary)} classes')
        with self._all_or_nothing():
            self._use_loaded(vmap, info, projection, vocabulary)
        return info

    def _use_loaded(self, vmap: VoxelFeatureMap, info: dict, projection: Optional[FeatureProjection],
                    vocabulary: List[str]) -> None:
        """Make a loaded map (checked by :meth:`load`) the map: its label volume or the configured one, its
        purification restored or re-pooled."""
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
            self._set_vocabulary(current, None)
        if not restore and (self.labels is None or vocabulary or vmap.size == 0):
            self.purify_all()
        self.cfg.map.voxel_size_m = vmap.voxel_size_m
        self.num_keyframes = int(info.get('keyframes', 0))
        self.keyframes = KeyframeSelector(self.cfg.keyframes)
        self.generation += 1

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
        if self.purifier is not None:          # carries the superpoint vote over to the kept rows
            self.purifier.keep(self.map, rows)
        else:
            self.map.keep(rows)
        self.evicted_voxels += gone
        self.generation += 1
        return gone

    def clear(self) -> None:
        """Forget every voxel and keyframe (the feature source and config stay; the voxel size is the configured one
        again, also after a map of another voxel size was loaded)."""
        self.cfg.map.voxel_size_m = self._voxel_size_m
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
        self.generation += 1

    @classmethod
    def from_file(cls, path, device: str = 'auto') -> 'Mapper':
        """A Mapper holding the map in ``path``, with the feature source it was made with (for queries)."""
        from ov3d_ros.core.config import update_from_dict
        from ov3d_ros.core.features import create_extractor
        from ov3d_ros.core.features.precomputed import PrecomputedFeatures
        from ov3d_ros.core.map_io import MapFileError, load_map
        dev = resolve_device(device)
        vmap, info, extra = load_map(path, dev)            # read once: the config and the map of one version
        try:
            cfg = update_from_dict(MapperConfig(), info['config'])
            validate(cfg)
        except (KeyError, ValueError) as e:
            raise MapFileError(f'{path}: unusable config in the map file ({e})') from e
        cfg.map.device = device
        cfg.map.compress_basis = ''            # the file holds its own projection (and the basis file may be gone)
        if 'text_names' in info:
            extractor = PrecomputedFeatures(info['text_names'], extra['text_vectors'].numpy(), dev)
        else:
            extractor = create_extractor(cfg.features, dev, info.get('class_names') or None)
        mapper = cls(cfg, extractor)
        mapper._use_file(path, vmap, info, extra)
        return mapper

    def map_cloud(self, max_points: int = 0) -> Segment:
        """All voxel centres and colours (uniformly subsampled to ``max_points`` when > 0); scores = weights."""
        return self.view(refresh=False).map_cloud(max_points)

    def label_cloud(self, max_points: int = 0) -> Tuple[Segment, np.ndarray]:
        """Voxels with a class in the label volume, coloured by class (scores = the class's share of the
        evidence), and their (M,) vocabulary indices. Empty without a vocabulary or voxels."""
        return self.view().label_cloud(max_points)
