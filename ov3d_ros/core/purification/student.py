"""The student affinity network (GeoPurify): sparse 3D convolutions on voxels -> unit embeddings.

Input per voxel: any of the fused feature (D), colour (3, 0..1) and normal (3); the shipped student reads only
colour and normals (geometry), so one checkpoint serves every feature source and dimension. A linear projection and a
3x3x3 stem conv to ``width`` (the projection keeps a 512-d input cheap on a robot),
``blocks`` residual blocks (two 3x3x3 submanifold convs, BatchNorm, ReLU) and a 1x1x1 head to ``embed_dim``.
Built on spconv (``spconv`` on CPU, ``spconv-cu12x`` on CUDA). Checkpoints are safetensors files with the
network config in their metadata.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ov3d_ros.core.threads import one_thread
from ov3d_ros.core.voxel_map import VoxelFeatureMap, unpack_keys

INPUTS = ('features', 'color', 'normal')


def import_spconv():
    """spconv.pytorch, with its CUDA-stream query disabled on machines without CUDA (CPU backward needs it)."""
    try:
        import spconv.pytorch as spconv
    except ImportError as e:
        raise RuntimeError('the learned affinity needs spconv (pip install spconv on CPU, spconv-cu120 on CUDA 12)') from e
    if not torch.cuda.is_available():
        import importlib
        for name in ('cppcore', 'ops', 'utils', 'hash'):
            try:
                mod = importlib.import_module(f'spconv.pytorch.{name}')
            except ImportError:
                continue
            if hasattr(mod, 'get_current_stream'):
                mod.get_current_stream = lambda: 0
    return spconv


DEFAULT_CHECKPOINT = Path(__file__).resolve().parents[2] / 'models' / 'affinity_default.safetensors'
"""The shipped student (``purify.checkpoint: default``); ov3d_ros/models/README.md says how it was made."""


def spconv_threads(device: torch.device | str):
    """Run spconv on one intra-op thread on CPU: its CPU kernels race with more threads (outputs differ by up
    to ~0.5 from run to run with 2 threads). A no-op on CUDA."""
    return one_thread(device)


@dataclass
class StudentConfig:
    feature_dim: int = 384
    """D of the fused features the network was trained on (0 when 'features' is not an input)."""
    inputs: Tuple[str, ...] = ('features', 'color', 'normal')
    width: int = 32
    blocks: int = 4
    embed_dim: int = 64
    voxel_size_m: float = 0.05

    @property
    def in_channels(self) -> int:
        return (self.feature_dim if 'features' in self.inputs else 0) + 3 * ('color' in self.inputs) + \
            3 * ('normal' in self.inputs)


class StudentAffinityNet(nn.Module):
    """Sparse residual conv net mapping voxel inputs to L2-normalised embeddings."""

    def __init__(self, cfg: StudentConfig):
        super().__init__()
        unknown = set(cfg.inputs) - set(INPUTS)
        if unknown or not cfg.inputs:
            raise ValueError(f'student inputs must be a non-empty subset of {INPUTS}, got {cfg.inputs}')
        spconv = import_spconv()
        self.cfg = cfg
        w = cfg.width

        def conv(cin, cout, k=3):
            return spconv.SubMConv3d(cin, cout, k, padding=k // 2, bias=False, indice_key=f'k{k}')

        self.project = nn.Linear(cfg.in_channels, w)
        self.stem = spconv.SparseSequential(conv(w, w), nn.BatchNorm1d(w), nn.ReLU())
        self.blocks = nn.ModuleList([spconv.SparseSequential(conv(w, w), nn.BatchNorm1d(w), nn.ReLU(),
                                                             conv(w, w), nn.BatchNorm1d(w))
                                     for _ in range(cfg.blocks)])
        self.head = spconv.SubMConv3d(w, cfg.embed_dim, 1, indice_key='k1')
        self._spconv = spconv

    def forward(self, coords: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """coords (N, 3) int voxel coordinates, inputs (N, in_channels) -> (N, embed_dim) unit embeddings."""
        lo = coords.min(0).values
        c = (coords - lo).int()
        shape = (c.max(0).values + 1).tolist()
        idx = torch.cat([torch.zeros(len(c), 1, dtype=torch.int32, device=c.device), c], 1)
        with spconv_threads(inputs.device):
            x = self._spconv.SparseConvTensor(self.project(inputs.float()), idx, shape, 1)
            x = self.stem(x)
            for blk in self.blocks:
                y = blk(x)
                x = y.replace_feature(F.relu(y.features + x.features))
            return F.normalize(self.head(x).features, dim=-1)

    def voxel_inputs(self, vmap: VoxelFeatureMap, rows: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        """(R, in_channels) network inputs of map ``rows``; normals (R, 3)."""
        feats = None
        if 'features' in self.cfg.inputs:
            if vmap.dim != self.cfg.feature_dim:
                raise ValueError(f'the student was trained on D={self.cfg.feature_dim} features, the map has D={vmap.dim}')
            feats = vmap.features.index_select(0, rows)
        return self.assemble_inputs(vmap.colors.index_select(0, rows), normals, feats)

    def assemble_inputs(self, colors: torch.Tensor, normals: torch.Tensor,
                        features: torch.Tensor | None = None) -> torch.Tensor:
        """(R, in_channels) network inputs from colours (R, 3) 0..255, normals (R, 3) and, for a student that
        reads them, fused features (R, D)."""
        parts = []
        if 'features' in self.cfg.inputs:
            if features is None:
                raise ValueError('this student reads the fused features; none were given')
            parts.append(F.normalize(features.float(), dim=-1))
        if 'color' in self.cfg.inputs:
            parts.append(colors.float() / 255.0)
        if 'normal' in self.cfg.inputs:
            parts.append(normals.float())
        return torch.cat(parts, dim=1)

    @property
    def reads_features(self) -> bool:
        """Whether the network takes the fused 2D feature as an input (then it only serves that feature space)."""
        return 'features' in self.cfg.inputs

    @torch.no_grad()
    def embed(self, vmap: VoxelFeatureMap, rows: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        """(R, embed_dim) embeddings of map ``rows`` (run on those voxels; normals (R, 3))."""
        was_training = self.training
        self.eval()
        out = self(unpack_keys(vmap.keys.index_select(0, rows)), self.voxel_inputs(vmap, rows, normals))
        self.train(was_training)
        return out


STUDENT_KIND = 'ov3d-affinity-student'
"""The ``kind`` metadata of a student checkpoint (checkpoints written before it have none)."""


def save_student(path: str | Path, net: StudentAffinityNet, extra: dict | None = None) -> None:
    """Write the network weights and config (and ``extra`` notes) to a safetensors file, atomically (an
    interrupted save leaves the previous file whole)."""
    from safetensors.torch import save
    from ov3d_ros.core.map_io import write_atomic
    meta = {'kind': STUDENT_KIND, 'config': json.dumps(asdict(net.cfg)), 'notes': json.dumps(extra or {})}
    write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, metadata=meta))


def is_student_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file that :func:`save_student` wrote: ``kind`` metadata, or, in files
    written before it, a config naming the student's inputs and embedding size (the weights are not read). The
    only file ``ov3d train-affinity`` replaces."""
    from ov3d_ros.core.map_io import safetensors_metadata
    meta = safetensors_metadata(path)
    if meta is None or _other_kind(meta):
        return False
    if meta.get('kind') == STUDENT_KIND:
        return True
    try:
        cfg = json.loads(meta.get('config', ''))
    except (TypeError, ValueError):
        return False
    return isinstance(cfg, dict) and {'inputs', 'embed_dim'} <= set(cfg)


def student_notes(path: str | Path) -> dict:
    """The training notes of a student checkpoint (teacher, data, command; ``oracle`` for label-distilled ones)."""
    from safetensors import safe_open
    path = DEFAULT_CHECKPOINT if str(path) == 'default' else Path(path)
    with safe_open(str(path), 'pt') as f:
        return json.loads((f.metadata() or {}).get('notes', '{}'))


def checkpoint_identity(path: str | Path) -> dict:
    """{'bytes', 'sha256'} of a student checkpoint file ('default' = the shipped one): names its weights
    wherever the file lies. Raises ValueError if it cannot be read."""
    import hashlib
    path = DEFAULT_CHECKPOINT if str(path) == 'default' else Path(path)
    try:
        blob = path.read_bytes()
    except OSError as e:
        raise ValueError(f'purify.checkpoint {str(path)!r}: cannot read ({e.strerror})') from e
    return {'bytes': len(blob), 'sha256': hashlib.sha256(blob).hexdigest()}


def load_student(path: str | Path, device: torch.device | str = 'cpu') -> StudentAffinityNet:
    """A StudentAffinityNet from a checkpoint written by :func:`save_student` (eval mode, on ``device``)."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    path = DEFAULT_CHECKPOINT if str(path) == 'default' else Path(path)
    if not str(path) or not path.is_file():
        raise ValueError(f'purify.checkpoint {str(path)!r}: no such file (train one with `ov3d train-affinity`)')
    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise ValueError(f'{path}: not a usable student checkpoint ({e})') from e
    other = _other_kind(meta)
    if other:
        raise ValueError(f'{path}: {other}, not a student checkpoint; purify.checkpoint needs a student checkpoint '
                         "(from `ov3d train-affinity`, or 'default' for the shipped one)")
    try:
        cfg_dict = json.loads(meta['config'])
        cfg_dict['inputs'] = tuple(cfg_dict['inputs'])
        net = StudentAffinityNet(StudentConfig(**cfg_dict))
        net.load_state_dict(load_file(str(path)))
    except KeyError as e:                  # a bare KeyError read "('inputs')"
        raise ValueError(f'{path}: not a usable student checkpoint (its config has no {e.args[0]!r})') from e
    except (ValueError, TypeError, RuntimeError, OSError, SafetensorError) as e:
        raise ValueError(f'{path}: not a usable student checkpoint ({e})') from e
    return net.to(device).eval()


def _other_kind(meta: dict) -> str | None:
    """What a safetensors file is, from its metadata, when that says it is not a student checkpoint (a teacher
    checkpoint, a map file, another kind, no config); None when it may be one (its kind is STUDENT_KIND, or, written
    before that, it has none)."""
    from ov3d_ros.core.map_io import MAP_FORMAT
    from ov3d_ros.core.purification.teacher import TEACHER_KIND
    if meta.get('kind') == STUDENT_KIND:
        return None
    if meta.get('kind') == TEACHER_KIND:
        return 'a teacher checkpoint (from `ov3d train-teacher`, for `ov3d train-affinity --teacher-checkpoint`)'
    if meta.get('format') == MAP_FORMAT:
        return 'an ov3d map file'
    if 'kind' in meta:
        return f'a checkpoint of kind {meta["kind"]!r}'
    if 'config' not in meta:
        return 'a safetensors file with no network config in its metadata'
    return None
