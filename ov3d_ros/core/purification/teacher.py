"""A self-supervised 3D teacher for the student affinity network: no 3D labels, geometry and colour only.

GeoPurify distils its student from a frozen self-supervised 3D backbone (Sonata). This module trains one of our
own, PointContrast-style: two partial scans of the same scene (voxels seen by two overlapping windows of
keyframes), each randomly rotated about the vertical axis, scaled, jittered, re-voxelised and colour-jittered,
go through a sparse-convolution U-Net; the features of voxels that are the same world voxel in both scans are
positives, the other sampled voxels of the second scan negatives (InfoNCE). The network never sees a semantic or
instance label, nor a 2D feature: only occupancy (the sparse structure), colour and normals.

Network: per voxel (colour - 0.5, sign-canonical normal) -> a submanifold stem, two stride-2 levels
(``width``, 2 ``width``, 4 ``width`` channels), transposed convolutions back up with skip connections, and a
linear head to ``out_dim`` unit features. Receptive field about 20 voxels (1 m at 5 cm), enough to see an object
and its support. Built on spconv like the student; checkpoints are safetensors files with the config and the
training notes (data, command) in their metadata.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ov3d_ros.core.purification.student import import_spconv, spconv_threads

MAX_KEYFRAME_BITS = 63
"""Keyframe k of a scene sets bit ``k % 63`` of a voxel's observation mask (int64)."""


@dataclass
class VoxelScene:
    """One fused scene as the teacher sees it (no labels, no 2D features).

    coords (N, 3) int64 voxel coordinates (world frame); colors (N, 3) float32 0..255 (fused); normals (N, 3)
    float32 unit (zero where undefined), as :func:`ov3d_ros.core.purification.graph.estimate_normals` gives them
    on the map; seen_by (N,) int64 bit masks of the keyframes that observed each voxel (bit ``k % 63``);
    num_keyframes: K.
    """

    name: str
    coords: torch.Tensor
    colors: torch.Tensor
    normals: torch.Tensor
    seen_by: torch.Tensor
    num_keyframes: int

    def __len__(self) -> int:
        return len(self.coords)

    ARRAYS = ('name', 'coords', 'colors', 'normals', 'seen_by', 'num_keyframes')

    def save(self, path: str | Path) -> None:
        """Write the scene as an .npz archive, atomically (an interrupted save leaves no half-written file)."""
        import io
        from ov3d_ros.core.map_io import write_atomic
        buf = io.BytesIO()
        np.savez_compressed(buf, name=self.name, coords=self.coords.numpy().astype(np.int32),
                            colors=self.colors.numpy().astype(np.uint8), normals=self.normals.numpy().astype(np.float16),
                            seen_by=self.seen_by.numpy(), num_keyframes=self.num_keyframes)
        write_atomic(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> 'VoxelScene':
        """A scene written by :meth:`save`; ValueError naming the file when it is not one."""
        from ov3d_ros.core.io import read_npz
        z = read_npz(path, cls.ARRAYS)
        try:
            n = len(z['coords'])
            if z['coords'].shape != (n, 3) or z['colors'].shape != (n, 3) or z['normals'].shape != (n, 3) \
                    or z['seen_by'].shape != (n,):
                raise ValueError('arrays of different lengths or widths')
            return cls(str(z['name']), torch.from_numpy(z['coords'].astype(np.int64)),
                       torch.from_numpy(z['colors'].astype(np.float32)),
                       torch.from_numpy(z['normals'].astype(np.float32)),
                       torch.from_numpy(z['seen_by'].astype(np.int64)), int(z['num_keyframes']))
        except (ValueError, TypeError) as e:
            raise ValueError(f'{path}: not a voxel scene ({e})') from None


@dataclass
class TeacherConfig:
    width: int = 24
    """Channels of the finest level (x2, x4 at the coarser ones)."""
    out_dim: int = 32
    """Dimension of the unit output features."""
    voxel_size_m: float = 0.05
    """Voxel size the teacher was trained at."""

    @property
    def in_channels(self) -> int:
        return 6


def teacher_inputs(colors: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
    """(N, 6) network inputs from colours (N, 3) 0..255 and normals (N, 3): colour - 0.5 and the normal with
    its sign fixed (z >= 0, then y, then x), since estimated normals have no orientation."""
    n = normals.float()
    key = n[:, 2] + 1e-3 * n[:, 1] + 1e-6 * n[:, 0]
    n = n * torch.where(key < 0, -1.0, 1.0)[:, None]
    return torch.cat([colors.float() / 255.0 - 0.5, n], dim=1)


class TeacherNet(nn.Module):
    """Sparse U-Net (two stride-2 levels) mapping voxel inputs to unit features; batches of scenes."""

    def __init__(self, cfg: TeacherConfig):
        super().__init__()
        spconv = import_spconv()
        self.cfg, self._spconv = cfg, spconv
        w = cfg.width

        def subm(cin, cout, key):
            return spconv.SparseSequential(spconv.SubMConv3d(cin, cout, 3, padding=1, bias=False, indice_key=key),
                                           nn.BatchNorm1d(cout), nn.ReLU())

        def down(cin, cout, key):
            return spconv.SparseSequential(spconv.SparseConv3d(cin, cout, 2, stride=2, bias=False, indice_key=key),
                                           nn.BatchNorm1d(cout), nn.ReLU())

        def up(cin, cout, key):
            return spconv.SparseSequential(spconv.SparseInverseConv3d(cin, cout, 2, bias=False, indice_key=key),
                                           nn.BatchNorm1d(cout), nn.ReLU())

        self.enc0 = spconv.SparseSequential(subm(cfg.in_channels, w, 's0'), subm(w, w, 's0'))
        self.down1, self.enc1 = down(w, 2 * w, 'd1'), subm(2 * w, 2 * w, 's1')
        self.down2 = down(2 * w, 4 * w, 'd2')
        self.enc2 = spconv.SparseSequential(subm(4 * w, 4 * w, 's2'), subm(4 * w, 4 * w, 's2'))
        self.up2, self.dec1 = up(4 * w, 2 * w, 'd2'), subm(4 * w, 2 * w, 's1')
        self.up1, self.dec0 = up(2 * w, w, 'd1'), subm(2 * w, w, 's0')
        self.head = nn.Linear(w, cfg.out_dim)

    def forward(self, coords: torch.Tensor, inputs: torch.Tensor, batch: Optional[torch.Tensor] = None) -> torch.Tensor:
        """coords (N, 3) int voxel coordinates, inputs (N, 6) (:func:`teacher_inputs`), batch (N,) scene index
        (default all 0) -> (N, out_dim) unit features, in input order."""
        if len(coords) == 0:
            return torch.zeros(0, self.cfg.out_dim, device=inputs.device)
        b = torch.zeros(len(coords), dtype=torch.int64, device=coords.device) if batch is None else batch.long()
        c = coords.long() - coords.long().min(0).values
        shape = [int(v) + 2 for v in c.max(0).values.tolist()]
        idx = torch.cat([b[:, None], c], 1).int()
        sp = self._spconv
        with spconv_threads(inputs.device):
            x0 = self.enc0(sp.SparseConvTensor(inputs.float(), idx, shape, int(b.max()) + 1))
            x1 = self.enc1(self.down1(x0))
            x2 = self.enc2(self.down2(x1))
            y1 = self.up2(x2)
            y1 = self.dec1(y1.replace_feature(torch.cat([y1.features, x1.features], 1)))
            y0 = self.up1(y1)
            y0 = self.dec0(y0.replace_feature(torch.cat([y0.features, x0.features], 1)))
            return F.normalize(self.head(y0.features), dim=-1)

    @torch.no_grad()
    def features(self, coords: torch.Tensor, colors: torch.Tensor, normals: torch.Tensor) -> torch.Tensor:
        """(N, out_dim) frozen teacher features of one scene: coords (N, 3), colors (N, 3) 0..255, normals (N, 3)."""
        was = self.training
        self.eval()
        dev = next(self.parameters()).device
        out = self(coords.to(dev), teacher_inputs(colors, normals).to(dev)).cpu()
        self.train(was)
        return out


# ---------------------------------------------------------------------------------------------- SSL training
@dataclass
class SSLConfig:
    steps: int = 400
    lr: float = 2e-3
    pairs: int = 1024
    """Corresponding voxels sampled per step (positives; each one's negatives are the other sampled voxels)."""
    tau: float = 0.1
    """InfoNCE temperature."""
    window: Tuple[float, float] = (0.35, 0.7)
    """Each partial scan keeps the voxels seen by a window of this fraction of the keyframes."""
    max_voxels: int = 40000
    """Views larger than this are cropped to the voxels nearest a random point of their overlap."""
    rotate: bool = True
    """Random rotation about the vertical (z) axis per view."""
    scale: Tuple[float, float] = (0.9, 1.1)
    jitter_vox: float = 0.1
    """Gaussian jitter of voxel centres before re-voxelisation (in voxels)."""
    color_jitter: float = 0.1
    """Brightness / contrast / per-channel shift scale of the colour jitter."""
    seed: int = 0


@dataclass
class View:
    """An augmented partial scan: coords (M, 3), inputs (M, 6), and for every original scene voxel in it
    (``members`` (P,) scene indices) its voxel in the view (``slot`` (P,))."""

    coords: torch.Tensor
    inputs: torch.Tensor
    members: torch.Tensor
    slot: torch.Tensor


def keyframe_window(num_keyframes: int, start: int, frac: float) -> int:
    """Bit mask of ``frac`` of the keyframes from ``start`` on (wrapping around)."""
    k = max(1, num_keyframes)
    length = max(1, int(round(frac * k)))
    mask = 0
    for j in range(length):
        mask |= 1 << (((start + j) % k) % MAX_KEYFRAME_BITS)
    return mask


def augment(scene: VoxelScene, members: torch.Tensor, cfg: SSLConfig, gen: torch.Generator) -> View:
    """Rotate (about z), scale, jitter, re-voxelise and colour-jitter the scene voxels ``members`` (P,)."""
    u = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=gen))  # noqa: E731
    theta = u(0, 2 * math.pi) if cfg.rotate else 0.0
    c, s = math.cos(theta), math.sin(theta)
    R = torch.tensor([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
    p = (scene.coords[members].float() + 0.5) @ R.T * u(*cfg.scale)
    p = p + cfg.jitter_vox * torch.randn(p.shape, generator=gen)
    vox, slot = torch.unique(torch.floor(p).long(), dim=0, return_inverse=True)
    m = len(vox)
    cnt = torch.zeros(m).index_add_(0, slot, torch.ones(len(slot)))
    col = torch.zeros(m, 3).index_add_(0, slot, scene.colors[members].float()) / cnt[:, None]
    nrm = torch.zeros(m, 3).index_add_(0, slot, scene.normals[members].float() @ R.T)
    nrm = F.normalize(nrm, dim=1)
    j = cfg.color_jitter
    col = (col - 128.0) * u(1 - j, 1 + j) + 128.0 + 255.0 * j * u(-1, 1) + 255.0 * j * 0.5 * torch.randn(3, generator=gen)
    col = (col + 255.0 * 0.02 * torch.randn(col.shape, generator=gen)).clamp(0, 255)
    return View(vox, teacher_inputs(col, nrm), members, slot)


def make_views(scene: VoxelScene, cfg: SSLConfig, gen: torch.Generator) -> Tuple[View, View, torch.Tensor, torch.Tensor]:
    """Two augmented partial scans of ``scene`` and their corresponding voxels: (view a, view b, slots in a
    (P,), slots in b (P,)) for P <= ``cfg.pairs`` distinct voxels of the overlap."""
    K = scene.num_keyframes
    for _ in range(8):
        frac_a, frac_b = (cfg.window[0] + (cfg.window[1] - cfg.window[0]) * torch.rand(2, generator=gen)).tolist()
        start_a = int(torch.randint(K, (1,), generator=gen))
        start_b = start_a + int(torch.randint(-int(frac_a * K / 2) - 1, int(frac_a * K / 2) + 2, (1,), generator=gen))
        in_a = (scene.seen_by & keyframe_window(K, start_a, frac_a)) != 0
        in_b = (scene.seen_by & keyframe_window(K, start_b % K, frac_b)) != 0
        if (in_a & in_b).sum() >= 16:
            break
    both = torch.nonzero(in_a & in_b, as_tuple=True)[0]
    if len(both) == 0:
        raise ValueError(f'{scene.name}: no voxels seen by two keyframe windows')
    if int(in_a.sum()) > cfg.max_voxels or int(in_b.sum()) > cfg.max_voxels:   # crop around an overlap voxel
        centre = scene.coords[both[int(torch.randint(len(both), (1,), generator=gen))]].float()
        d = (scene.coords.float() - centre).norm(dim=1)
        for mask in (in_a, in_b):
            if int(mask.sum()) > cfg.max_voxels:
                r = torch.kthvalue(d[mask], cfg.max_voxels).values
                mask &= d <= r
        both = torch.nonzero(in_a & in_b, as_tuple=True)[0]
        if len(both) == 0:
            raise ValueError(f'{scene.name}: empty overlap after cropping')
    a = augment(scene, torch.nonzero(in_a, as_tuple=True)[0], cfg, gen)
    b = augment(scene, torch.nonzero(in_b, as_tuple=True)[0], cfg, gen)
    pos_a = torch.full((len(scene),), -1, dtype=torch.int64)
    pos_b = pos_a.clone()
    pos_a[a.members], pos_b[b.members] = a.slot, b.slot
    pick = both[torch.randperm(len(both), generator=gen)]
    sa, sb = pos_a[pick], pos_b[pick]
    _, first = np.unique(sa.numpy(), return_index=True)        # one pair per voxel of view a
    keep = torch.from_numpy(np.sort(first))[:cfg.pairs]
    return a, b, sa[keep], sb[keep]


def forward_views(net: TeacherNet, a: View, b: View) -> Tuple[torch.Tensor, torch.Tensor]:
    """Both views through the network as one batch: (features of a (Ma, E), features of b (Mb, E))."""
    dev = next(net.parameters()).device
    coords = torch.cat([a.coords, b.coords])
    batch = torch.cat([torch.zeros(len(a.coords), dtype=torch.int64), torch.ones(len(b.coords), dtype=torch.int64)])
    out = net(coords.to(dev), torch.cat([a.inputs, b.inputs]).to(dev), batch.to(dev))
    return out[:len(a.coords)], out[len(a.coords):]


def point_infonce(fa: torch.Tensor, fb: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric InfoNCE of matched rows fa (P, E), fb (P, E): (loss, top-1 matching accuracy a -> b)."""
    logits = fa @ fb.T / tau
    target = torch.arange(len(fa), device=fa.device)
    loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    return loss, (logits.argmax(1) == target).float().mean()


@torch.no_grad()
def matching_accuracy(net: TeacherNet, scenes: List[VoxelScene], cfg: SSLConfig, seed: int = 12345) -> float:
    """Top-1 accuracy of finding each sampled voxel of one augmented partial scan among the sampled voxels of
    another (fixed views per scene): how invariant and how distinctive the features are."""
    was = net.training
    net.eval()
    gen = torch.Generator().manual_seed(seed)
    accs = []
    for s in scenes:
        a, b, sa, sb = make_views(s, cfg, gen)
        fa, fb = forward_views(net, a, b)
        accs.append(float(point_infonce(fa[sa].cpu(), fb[sb].cpu(), cfg.tau)[1]))
    net.train(was)
    return float(np.mean(accs))


def train_teacher(net: TeacherNet, scenes: List[VoxelScene], cfg: SSLConfig, val: List[VoxelScene] = (),
                  log: Callable[[str], None] = print) -> List[dict]:
    """Self-supervised training of ``net`` in place (Adam, cosine decay); returns the logged history."""
    if not scenes:
        raise ValueError('the teacher needs at least one training scene')
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(cfg.steps, 1))))
    history, t0, run_loss = [], time.perf_counter(), []
    dev = next(net.parameters()).device
    net.train()
    for step in range(cfg.steps):
        s = scenes[int(torch.randint(len(scenes), (1,), generator=gen))]
        a, b, sa, sb = make_views(s, cfg, gen)
        fa, fb = forward_views(net, a, b)
        loss, acc = point_infonce(fa[sa.to(dev)], fb[sb.to(dev)], cfg.tau)
        opt.zero_grad()
        with spconv_threads(dev):
            loss.backward()
        opt.step()
        sched.step()
        run_loss.append((loss.item(), acc.item()))
        if (step + 1) % max(1, cfg.steps // 10) == 0 or step + 1 == cfg.steps:
            lo, ac = np.mean(run_loss, axis=0)
            row = {'step': step + 1, 'train_loss': float(lo), 'train_acc': float(ac),
                   'elapsed_s': round(time.perf_counter() - t0, 1)}
            run_loss = []
            if val:
                row['val_match_acc'] = matching_accuracy(net, list(val), cfg)
            history.append(row)
            log(' '.join(f'{k}={v:.3f}' if isinstance(v, float) else f'{k}={v}' for k, v in row.items()))
    return history


# ---------------------------------------------------------------------------------------------- checkpoints
TEACHER_KIND = 'ov3d-ssl-teacher'
"""The ``kind`` metadata of a teacher checkpoint."""


def save_teacher(path: str | Path, net: TeacherNet, notes: Optional[dict] = None) -> None:
    """Write the teacher's weights, config and ``notes`` (data, command, history) to a safetensors file,
    atomically (an interrupted save leaves the previous file whole)."""
    from safetensors.torch import save
    from ov3d_ros.core.map_io import write_atomic
    meta = {'kind': TEACHER_KIND, 'config': json.dumps(asdict(net.cfg)), 'notes': json.dumps(notes or {})}
    write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, metadata=meta))


def is_teacher_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a safetensors file that :func:`save_teacher` wrote (its ``kind`` metadata; the weights
    are not read): the only file ``ov3d train-teacher`` replaces."""
    from ov3d_ros.core.map_io import safetensors_metadata
    meta = safetensors_metadata(path)
    return meta is not None and meta.get('kind') == TEACHER_KIND


def load_teacher(path: str | Path, device: torch.device | str = 'cpu') -> TeacherNet:
    """A frozen :class:`TeacherNet` (eval mode) from :func:`save_teacher`'s file; ValueError if unusable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise ValueError(f'teacher checkpoint {str(path)!r}: no such file (train one with `ov3d train-teacher`)')
    try:
        with safe_open(str(path), 'pt') as f:
            meta = f.metadata() or {}
        if meta.get('kind') != TEACHER_KIND:
            raise ValueError('not written by ov3d train-teacher')
        net = TeacherNet(TeacherConfig(**json.loads(meta['config'])))
        net.load_state_dict(load_file(str(path)))
    except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as e:
        raise ValueError(f'{path}: not a usable teacher checkpoint ({e})') from e
    for p in net.parameters():
        p.requires_grad_(False)
    return net.to(device).eval()


def checkpoint_notes(path: str | Path) -> dict:
    """The ``notes`` metadata of a teacher or student checkpoint ({} when absent)."""
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata() or {}
    return json.loads(meta.get('notes', '{}'))
