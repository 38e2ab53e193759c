"""Merging map files: several robots' (or sessions') maps fused into one, as if one mapper had seen it all.

Each input map comes with a rigid transform T (4, 4) from its frame to the merged map's frame (identity when
the maps share a frame). Voxels are fused exactly like observations in :meth:`VoxelFeatureMap.integrate`:
per merged voxel, features and colours are the weight-weighted means of the voxels that land in it, weights
and point counts are summed, and label-volume evidence (per-view class probabilities summed per voxel) is
summed. Under an identity transform a voxel keeps its key; otherwise its centre is transformed and re-binned
(several voxels may land in one, which fuses them with their weights; a rotation that is not a multiple of
90 degrees about the axes leaves some voxels of the target grid empty, as re-voxelising any cloud does).

Compressed maps (``projection`` (D, d) in the file) are brought into one basis: maps with identical
projections keep it; otherwise, when every map is compressed, a common basis is fitted to the sum of their
second moments (each map's tracked moment, as :class:`FeatureProjection` folds keyframes in) and each
map's features are rotated by P_i^T P_common; when some map is uncompressed, compressed features are projected
back to the full dimension (f P_i^T). Maps whose feature source, full feature dimension, simulated class names
or precomputed text table, voxel size or label vocabulary differ are refused with the reason
(:class:`MergeError`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ov3d_ros.core.compression import FeatureProjection, _top
from ov3d_ros.core.features.precomputed import same_text_table
from ov3d_ros.core.io import read_text
from ov3d_ros.core.map_io import load_map, save_map
from ov3d_ros.core.voxel_map import VoxelFeatureMap, unpack_keys, voxel_keys


class MergeError(ValueError):
    """Maps that cannot be merged (the message says why)."""


@dataclass
class MapPart:
    """One input of a merge: a loaded map file and its transform into the merged frame.

    vmap: the voxel map (its cake holds the file's layers, label_evidence among them); info: the file's info
    dict; extra: its extra tensors (projection, text_vectors);
    T: (4, 4) float64 rigid transform from this map's frame to the merged frame; name: for messages.
    """

    vmap: VoxelFeatureMap
    info: dict
    extra: Dict[str, torch.Tensor]
    T: np.ndarray = field(default_factory=lambda: np.eye(4))
    name: str = 'map'

    @classmethod
    def from_file(cls, path: str | Path, T: Optional[np.ndarray] = None) -> 'MapPart':
        vmap, info, extra = load_map(path, 'cpu')
        return cls(vmap, info, extra, np.eye(4) if T is None else np.asarray(T, np.float64), str(path))

    @property
    def projection(self) -> Optional[FeatureProjection]:
        return FeatureProjection.from_tensors(self.extra)

    @property
    def source_dim(self) -> int:
        """D of the feature source (before any compression)."""
        p = self.projection
        return p.in_dim if p is not None else self.vmap.dim

    @property
    def vocabulary(self) -> List[str]:
        return [str(n) for n in self.info.get('vocabulary') or []]


def check_rigid(T: np.ndarray, name: str = 'transform') -> np.ndarray:
    """``T`` as a (4, 4) float64 rigid transform; raises MergeError if it is not one."""
    T = np.asarray(T, dtype=np.float64)
    if T.shape != (4, 4):
        raise MergeError(f'{name}: a transform must be a finite 4x4 matrix, got shape {T.shape}')
    if not np.all(np.isfinite(T)):
        raise MergeError(f'{name}: a transform must be a finite 4x4 matrix, got NaN or inf in it')
    R = T[:3, :3]
    if np.abs(T[3] - [0, 0, 0, 1]).max() > 1e-6 or np.abs(R.T @ R - np.eye(3)).max() > 1e-4 or np.linalg.det(R) < 0:
        raise MergeError(f'{name}: not a rigid transform (rotation must be orthonormal with det +1, last row '
                         '0 0 0 1)')
    return T


def transform_from_pose(x: float, y: float, z: float, qx: float, qy: float, qz: float, qw: float) -> np.ndarray:
    """(4, 4) transform from a translation and a unit quaternion (x, y, z, w; normalised here)."""
    q = np.array([qw, qx, qy, qz], dtype=np.float64)
    if not np.all(np.isfinite(q)) or not np.all(np.isfinite([x, y, z])):
        raise MergeError(f'pose ({x}, {y}, {z}; {qx}, {qy}, {qz}, {qw}): the translation and the quaternion must be '
                         'finite numbers')
    q = q / max(np.abs(q).max(), 1e-300)          # scaled first: the norm of (1e200, ...) would overflow
    n = np.linalg.norm(q)
    if n < 1e-9:
        raise MergeError(f'quaternion ({qx}, {qy}, {qz}, {qw}) has no direction')
    w, a, b, c = q / n
    T = np.eye(4)
    T[:3, :3] = [[1 - 2 * (b * b + c * c), 2 * (a * b - c * w), 2 * (a * c + b * w)],
                 [2 * (a * b + c * w), 1 - 2 * (a * a + c * c), 2 * (b * c - a * w)],
                 [2 * (a * c - b * w), 2 * (b * c + a * w), 1 - 2 * (a * a + b * b)]]
    T[:3, 3] = [x, y, z]
    return T


def read_transform(path: str | Path) -> np.ndarray:
    """A transform file: a 4x4 matrix as text (4 rows of 4 numbers) or JSON (a 4x4 nested list, or an object
    with "matrix", or with "translation" [x, y, z] and "rotation" [qx, qy, qz, qw])."""
    import json
    path = Path(path)
    text = read_text(path, 'the transform', 'a transform is a 4x4 matrix as text or JSON', MergeError)
    try:
        if text.lstrip().startswith(('{', '[')):
            data = json.loads(text)
            if isinstance(data, dict) and 'matrix' in data:
                data = data['matrix']
            if isinstance(data, dict):
                return check_rigid(transform_from_pose(*data['translation'], *data['rotation']), str(path))
            return check_rigid(np.array(data, dtype=np.float64), str(path))
        return check_rigid(np.array([[float(v) for v in line.replace(',', ' ').split()]
                                     for line in text.splitlines() if line.strip() and not line.startswith('#')]),
                           str(path))
    except (ValueError, TypeError, KeyError, json.JSONDecodeError) as e:
        if isinstance(e, MergeError):
            raise
        raise MergeError(f'{path}: not a 4x4 matrix or a translation + quaternion ({e})') from e


def check_compatible(parts: Sequence[MapPart]) -> None:
    """Raise MergeError with the reason if the maps cannot be fused into one."""
    if not parts:
        raise MergeError('no maps to merge')
    a = parts[0]
    for b in parts[1:]:
        key = 'feature_space' if 'feature_space' in a.info and 'feature_space' in b.info else 'feature_source'
        src_a, src_b = a.info.get(key), b.info.get(key)
        if src_a != src_b:        # the space: the model and its weights (older files: the feature source)
            raise MergeError(f'{b.name}: made with {key.replace("_", " ")} {src_b!r}, {a.name} with {src_a!r}; '
                             'features of different models or weights live in different spaces')
        if a.source_dim != b.source_dim:
            raise MergeError(f'{b.name}: {b.source_dim}-d features, {a.name}: {a.source_dim}-d')
        if abs(a.vmap.voxel_size_m - b.vmap.voxel_size_m) > 1e-9:
            raise MergeError(f'{b.name}: voxel size {b.vmap.voxel_size_m} m, {a.name}: {a.vmap.voxel_size_m} m '
                             '(re-map at one voxel size)')
        if list(a.info.get('class_names') or []) != list(b.info.get('class_names') or []):
            raise MergeError(f'{b.name}: simulated features over other class names than {a.name}')
        if not same_text_table(a.info.get('text_names') or [], a.extra.get('text_vectors'),
                               b.info.get('text_names') or [], b.extra.get('text_vectors')):
            raise MergeError(f'{b.name}: another precomputed text table than {a.name}')
        va, vb = [n.strip().lower() for n in a.vocabulary], [n.strip().lower() for n in b.vocabulary]
        if va != vb:
            raise MergeError(f'{b.name}: label vocabulary {b.vocabulary} differs from {a.name}\'s {a.vocabulary}; '
                             'merge maps saved with the same vocabulary (the node\'s is set with ~/set_vocabulary)')
        for p in (a, b):
            spec = p.vmap.cake.specs.get('label_evidence')
            if p.vocabulary and (spec is None or spec.width != len(p.vocabulary)):
                raise MergeError(f'{p.name}: label evidence does not match its voxels and vocabulary')


def common_projection(parts: Sequence[MapPart]) -> Tuple[Optional[FeatureProjection], List[Optional[torch.Tensor]]]:
    """The merged map's projection (None = full dimension) and, per part, the (d_i, d) matrix that carries its
    stored features into the merged basis (None = keep them as they are)."""
    projections = [p.projection for p in parts]
    if all(p is None for p in projections):
        return None, [None] * len(parts)
    first = projections[0]
    if first is not None and all(p is not None and torch.equal(p.matrix, first.matrix) for p in projections):
        return first, [None] * len(parts)
    if any(p is None for p in projections):       # some map is uncompressed: back to the full dimension
        return None, [None if p is None else p.matrix.T for p in projections]
    d = max(p.out_dim for p in projections)
    moment = sum(p.moment() for p in projections)
    common = FeatureProjection(*_top(moment, d))
    return common, [p.matrix.T @ common.matrix for p in projections]


def merge_parts(parts: Sequence[MapPart], device: torch.device | str = 'cpu'
                ) -> Tuple[VoxelFeatureMap, dict, Dict[str, torch.Tensor]]:
    """Fuse ``parts`` into one map: (voxel map, info, extra tensors) ready for :func:`save_map`.

    Rows of the result are sorted by voxel key (so the result does not depend on the order of the parts
    beyond floating-point summation order). Raises MergeError for incompatible maps or bad transforms."""
    check_compatible(parts)
    device = torch.device(device)
    projection, carry = common_projection(parts)
    dim = projection.out_dim if projection is not None else parts[0].source_dim
    vs = parts[0].vmap.voxel_size_m
    keys, feats, weights, colors, counts, views, evidence = [], [], [], [], [], [], []
    for part, R in zip(parts, carry):
        T = check_rigid(part.T, part.name)
        st = {k: v.to(device) for k, v in part.vmap.state().items()}
        v = st['views'].float()
        if np.allclose(T, np.eye(4), atol=0, rtol=0):
            k = st['keys']
        else:
            centers = (unpack_keys(st['keys']).double() + 0.5) * vs
            Td = torch.as_tensor(T, dtype=torch.float64, device=device)
            try:
                k = voxel_keys(centers @ Td[:3, :3].T + Td[:3, 3], vs)
            except ValueError as e:
                raise MergeError(f'{part.name}: the transform moves voxels out of the map range ({e})') from e
            v = v @ Td[:3, :3].T.float()                 # directions to the cameras turn with the map
        f = st['features'].float()
        if R is not None:
            f = f @ R.to(device).float()
        keys.append(k)
        feats.append(f)
        weights.append(st['weights'].float())
        colors.append(st['colors'].float())
        views.append(v)
        counts.append(st['counts'].to(torch.int64))
        if part.vocabulary:
            evidence.append(part.vmap.cake.rows('label_evidence').to(device, torch.float32))
    keys = torch.cat(keys)
    ukeys, inv = torch.unique(keys, return_inverse=True)
    V = ukeys.shape[0]
    w = torch.cat(weights)
    w_sum = torch.zeros(V, device=device, dtype=torch.float32).index_add_(0, inv, w)
    denom = w_sum.clamp_min(1e-12)[:, None]
    f_sum = torch.zeros(V, dim, device=device).index_add_(0, inv, torch.cat(feats) * w[:, None])
    c_sum = torch.zeros(V, 3, device=device).index_add_(0, inv, torch.cat(colors) * w[:, None])
    v_sum = torch.zeros(V, 3, device=device).index_add_(0, inv, torch.cat(views) * w[:, None])
    n_sum = torch.zeros(V, dtype=torch.int64, device=device).index_add_(0, inv, torch.cat(counts))
    layers = {'keys': ukeys, 'features': (f_sum / denom).to(torch.float16), 'weights': w_sum, 'colors': c_sum / denom,
              'views': v_sum / denom, 'counts': n_sum.clamp(max=2 ** 31 - 1).to(torch.int32)}
    if evidence:
        K = evidence[0].shape[1]
        layers['label_evidence'] = torch.zeros(V, K, device=device).index_add_(0, inv, torch.cat(evidence))
    merged = VoxelFeatureMap(vs, dim, device, capacity=max(16, V))
    merged.load_state(layers)
    info = dict(parts[0].info)
    info.pop('purification', None)           # no purified layers: a loader pools the merged map
    info['keyframes'] = int(sum(int(p.info.get('keyframes', 0)) for p in parts))
    info['merged_from'] = [{'map': p.name, 'voxels': p.vmap.size, 'T': np.asarray(p.T).round(9).tolist()}
                           for p in parts]
    extra: Dict[str, torch.Tensor] = {}
    if 'text_vectors' in parts[0].extra:
        extra['text_vectors'] = parts[0].extra['text_vectors']
    if projection is not None:
        extra.update(projection.tensors())
    return merged, info, extra


def merge_files(paths: Sequence[str | Path], out: str | Path,
                transforms: Optional[Sequence[Optional[np.ndarray]]] = None) -> dict:
    """Merge map files into ``out`` (written atomically with its checksum). ``transforms[i]`` (4, 4) takes map i
    into the merged frame (None = identity). Returns a summary: voxels in and out, bytes written."""
    transforms = list(transforms or [None] * len(paths))
    if len(transforms) != len(paths):
        raise MergeError(f'{len(paths)} maps but {len(transforms)} transforms')
    parts = [MapPart.from_file(p, T) for p, T in zip(paths, transforms)]
    merged, info, extra = merge_parts(parts)
    size = save_map(out, merged, info, extra)
    return {'out': str(out), 'voxels': merged.size, 'inputs': [p.vmap.size for p in parts], 'bytes': size,
            'compressed_dim': int(extra['projection'].shape[1]) if 'projection' in extra else 0,
            'vocabulary': list(info.get('vocabulary') or [])}
