"""The Mapper facade: keyframe selection, feature extraction, lifting, fusion and text queries."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.keyframes import KeyframeSelector
from ov3d_ros.core.lifting import lift_keyframe
from ov3d_ros.core.query import relevancy_scores, select
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
    """A query answer in the map frame: xyz (M, 3) float32, rgb (M, 3) uint8, scores (M,) float32."""

    xyz: np.ndarray
    rgb: np.ndarray
    scores: np.ndarray


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
        self.purifier = self._make_purifier() if cfg.purify.enabled else None
        self.evicted_voxels = 0
        self._text_cache: Dict[Tuple[str, ...], torch.Tensor] = {}
        self.clear()

    def validate(self, frame: Frame) -> None:
        """Raise ValueError with the reason if a frame cannot be integrated."""
        H, W = frame.depth_m.shape[:2]
        if frame.rgb.ndim != 3 or frame.rgb.shape[2] != 3 or frame.rgb.dtype != np.uint8:
            raise ValueError(f'colour must be (H, W, 3) uint8, got {frame.rgb.shape} {frame.rgb.dtype}')
        if frame.rgb.shape[:2] != (H, W):
            raise ValueError(f'colour is {frame.rgb.shape[1]}x{frame.rgb.shape[0]} but depth is {W}x{H}; '
                             'publish depth registered to the colour image')
        if (frame.camera.width, frame.camera.height) != (W, H):
            raise ValueError(f'camera info is {frame.camera.width}x{frame.camera.height} but images are {W}x{H}')
        T = np.asarray(frame.T_W_C)
        if T.shape != (4, 4) or not np.all(np.isfinite(T)):
            raise ValueError('pose must be a finite 4x4 matrix')
        if frame.labels is not None and frame.labels.shape[:2] != (H, W):
            raise ValueError('label image size differs from the depth image')
        if frame.features is not None and (frame.features.ndim != 3 or frame.features.shape[2] != self.extractor.dim):
            raise ValueError(f'precomputed features must be (h, w, {self.extractor.dim}), got {frame.features.shape}')

    def integrate(self, frame: Frame, force: bool = False) -> bool:
        """Integrate ``frame`` if it is a keyframe (or ``force``); returns whether it was integrated."""
        self.validate(frame)
        if not force and not self.keyframes.check(frame.T_W_C, frame.stamp_s):
            return False
        t0 = time.perf_counter()
        if frame.features is not None:
            feats = torch.nn.functional.normalize(torch.as_tensor(frame.features, dtype=torch.float32,
                                                                  device=self.device), dim=-1)
        else:
            feats = self.extractor.extract(frame.rgb, frame.labels)
        t1 = time.perf_counter()
        lifted = lift_keyframe(torch.from_numpy(np.array(frame.depth_m, dtype=np.float32, order='C')),
                               torch.from_numpy(np.array(frame.rgb, order='C')), feats, frame.camera,
                               torch.from_numpy(np.asarray(frame.T_W_C, dtype=np.float64)),
                               self.cfg.map.min_depth_m, self.cfg.map.max_depth_m, self.cfg.map.pixel_stride)
        touched = self.map.integrate(lifted.points, lifted.features, lifted.colors)
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
        t2 = time.perf_counter()
        if self.purifier is not None and self.cfg.purify.mode == 'incremental':
            self.purifier.update(self.map, touched)
            if self.device.type == 'cuda':
                torch.cuda.synchronize(self.device)
        self._purified_stale = True
        if 0 < self.cfg.map.max_voxels < self.map.size:
            self.evict(frame.T_W_C[:3, 3], int(0.9 * self.cfg.map.max_voxels))
        self.keyframes.accept(frame.T_W_C, frame.stamp_s)
        self.num_keyframes += 1
        t3 = time.perf_counter()
        self.timings_s = {'features': t1 - t0, 'fusion': t2 - t1, 'purify': t3 - t2, 'total': t3 - t0}
        return True

    def _make_purifier(self):
        from ov3d_ros.core.purification.pooling import GeometryPooling
        embed = None
        if self.cfg.purify.affinity == 'learned':
            from ov3d_ros.core.purification.student import load_student
            net = load_student(self.cfg.purify.checkpoint, self.device)
            if 'features' in net.cfg.inputs and net.cfg.feature_dim != self.extractor.dim:
                raise ValueError(f'purify.checkpoint {self.cfg.purify.checkpoint!r} was trained on {net.cfg.feature_dim}-d '
                                 f'features but {self.extractor.name} gives {self.extractor.dim}-d ones; train a '
                                 'student for these features (ov3d train-affinity) or use purify.affinity fallback')
            embed = net.embed
        return GeometryPooling(self.cfg.purify, embed)

    def _reset_purifier(self) -> None:
        """Empty pooling state for a new map, keeping the loaded student (no checkpoint re-read)."""
        if self.purifier is not None:
            self.purifier = type(self.purifier)(self.cfg.purify, self.purifier.embed)
        self._purified_stale = False

    def query_features(self) -> torch.Tensor:
        """(V, D) features that queries use: purified when purification is enabled, else the raw fusion.

        In ``purify.mode: whole`` the whole map is re-pooled here when keyframes came since the last time."""
        if self.purifier is not None:
            if self.cfg.purify.mode == 'whole' and self._purified_stale:
                self.purify_all()
            return self.purifier.features(self.map)
        return self.map.features[:self.map.size]

    def purify_all(self) -> None:
        """Re-pool the whole map (offline; a no-op without purification)."""
        if self.purifier is not None:
            self.purifier.update(self.map)
            self._purified_stale = False

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """(N, D) prompt-ensemble embeddings of ``texts`` (cached)."""
        key = tuple(texts)
        if key not in self._text_cache:
            if len(self._text_cache) > 256:
                self._text_cache.clear()
            templates = self.cfg.query.templates if self.extractor.uses_templates else ()
            self._text_cache[key] = encode_prompts(self.extractor.encode_text, list(texts), templates).to(self.device)
        return self._text_cache[key]

    def segment(self, text: str, negatives: Optional[Sequence[str]] = None, threshold: float = 0.0) -> Segment:
        """Voxels that match ``text`` better than every negative, with score >= threshold.

        ``negatives`` None or empty uses ``query.default_negatives``; ``threshold`` <= 0 uses
        ``query.default_threshold``. Raises ValueError for empty text or a threshold above 1.
        """
        text = (text or '').strip()
        if not text:
            raise ValueError('query text is empty')
        if not np.isfinite(threshold) or threshold > 1.0:
            raise ValueError(f'threshold must be a number <= 1, got {threshold}')
        q = self.cfg.query
        negs = [n.strip() for n in (negatives or q.default_negatives) if n.strip() and n.strip() != text]
        thr = threshold if threshold > 0 else q.default_threshold
        emb = self.embed_texts([text] + negs)
        n = self.map.size
        temperature = q.temperature if q.temperature > 0 else self.extractor.default_temperature
        scores = relevancy_scores(self.query_features(), emb[0], emb[1:], temperature)
        res = select(scores, self.map.weights[:n], thr, q.min_observations)
        return Segment(self.map.centers(res.rows).cpu().numpy(),
                       self.map.colors[res.rows].clamp(0, 255).to(torch.uint8).cpu().numpy(),
                       res.scores.cpu().numpy())

    def classify(self, text_embeddings: torch.Tensor, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per voxel (all or ``rows``), the best-matching of K texts: (labels (V,) int64, cosine (V,) float32)."""
        feats = self.query_features() if rows is None else self.query_features()[rows]
        sims = torch.nn.functional.normalize(feats.float(), dim=-1) @ text_embeddings.to(self.device).float().T
        best = sims.max(dim=-1)
        return best.indices, best.values

    def label_points(self, xyz: np.ndarray, text_embeddings: torch.Tensor, max_distance_m: float = 0.0) -> np.ndarray:
        """Label (N, 3) points with the index of the best text of their nearest observed voxel.

        Points with no voxel centre within ``max_distance_m`` (default: one voxel size) get -1.
        """
        from scipy.spatial import cKDTree
        n = self.map.size
        out = np.full(len(xyz), -1, dtype=np.int64)
        if n == 0 or len(xyz) == 0:
            return out
        labels, _ = self.classify(text_embeddings)
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
        return save_map(path, self.map, info, extra)

    def load(self, path) -> dict:
        """Replace the map with the one in ``path``; the current map is kept if the file is unusable.

        Raises MapFileError (a ValueError) with the reason. Returns the file's info.
        """
        from ov3d_ros.core.map_io import MapFileError, load_map
        vmap, info, _ = load_map(path, self.device)
        if vmap.dim != self.map.dim or info.get('feature_source') != self.extractor.name:
            raise MapFileError(f'{path}: map made with {info.get("feature_source")} (D={vmap.dim}), but this '
                               f'mapper uses {self.extractor.name} (D={self.map.dim})')
        self.map = vmap
        self._reset_purifier()
        self.purify_all()
        self.cfg.map.voxel_size_m = vmap.voxel_size_m
        self.num_keyframes = int(info.get('keyframes', 0))
        self.keyframes = KeyframeSelector(self.cfg.keyframes)
        return info

    def evict(self, position, keep: int) -> int:
        """Keep the ``keep`` voxels nearest to ``position`` (3,) in metres, drop the rest; returns how many went."""
        n = self.map.size
        if keep >= n:
            return 0
        d = (self.map.centers() - torch.as_tensor(np.asarray(position, np.float32), device=self.device)).norm(dim=1)
        rows = torch.sort(torch.topk(d, keep, largest=False).indices).values
        self.map.keep(rows)
        if self.purifier is not None:
            self.purifier.keep(rows)
        self.evicted_voxels += n - keep
        return n - keep

    def clear(self) -> None:
        """Forget every voxel and keyframe (the feature source and config stay)."""
        self.map = VoxelFeatureMap(self.cfg.map.voxel_size_m, self.extractor.dim, self.device,
                                   self.cfg.map.initial_capacity)
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
            extractor = create_extractor(cfg.features, dev, info.get('class_names') or None, cfg.query.templates)
        mapper = cls(cfg, extractor)
        mapper.load(path)
        return mapper

    def map_cloud(self, max_points: int = 0) -> Segment:
        """All voxel centres and colours (uniformly subsampled to ``max_points`` when > 0); scores = weights."""
        n = self.map.size
        rows = torch.arange(n, device=self.device)
        if 0 < max_points < n:
            rows = rows[torch.linspace(0, n - 1, max_points, device=self.device).long()]
        return Segment(self.map.centers(rows).cpu().numpy(),
                       self.map.colors[rows].clamp(0, 255).to(torch.uint8).cpu().numpy(),
                       self.map.weights[rows].cpu().numpy())
