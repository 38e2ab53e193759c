"""Configuration dataclasses, one per component.

Each field's docstring is its description; the ROS layer declares one parameter per field
(``<section>.<field>``) and the offline tools read the same sections from YAML. :func:`validate` refuses values a
field cannot take (``CHECKS``: ranges, choices), for the node, the offline tools and the Python API alike.
"""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

from ov3d_ros.core.io import read_text


@dataclass
class MapConfig:
    voxel_size_m: float = 0.05
    """Edge length of a map voxel in metres."""
    min_depth_m: float = 0.1
    """Depth readings closer than this are ignored."""
    max_depth_m: float = 5.0
    """Depth readings farther than this (max_range) are ignored."""
    pixel_stride: int = 2
    """Use every n-th pixel in u and v when lifting a keyframe (1 = all pixels)."""
    initial_capacity: int = 65536
    """Voxel rows allocated up front; storage doubles when full (no fixed scene bound)."""
    device: str = 'auto'
    """Torch device for the map and features: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1'."""
    max_voxels: int = 0
    """Voxel budget (0 = unbounded): past it, the voxels farthest from the camera are evicted down to 90 %."""
    clear_radius_m: float = 0.0
    """Map-clearing radius (0 = off): after each keyframe, voxels farther than this from the camera are dropped
    (a local map that follows the robot)."""
    compress_dim: int = 0
    """Store voxel features in this many dimensions (0 = the feature source's D, e.g. 64 of 512): an uncentred PCA
    of the keyframes' features; queries project text the same way (ov3d_ros.core.compression)."""
    max_weight: float = 10000.0
    """Cap on a voxel's old weight in the running means of its feature and colour (nvblox's max_weight; 0 = no
    cap). A point adds weight 1, so a voxel takes a few tens per keyframe; past the cap each new observation keeps
    moving the mean by at least weight / (max_weight + weight) instead of fading out (a plain fp16 mean stops
    moving after about 1e5 points, a parked robot's few minutes). Observation counts and weights still
    accumulate everything."""
    compress_update: bool = True
    """Compression: fold every keyframe into the PCA; the stored features are rotated into a new basis only when
    the tracked subspace has turned away from theirs (``FeatureProjection.KEEP``). false = freeze the first
    keyframe's fit (or the ``compress_basis``)."""
    compress_basis: str = ''
    """Compression: a map file saved with compression (same feature source, at least ``compress_dim`` dims) whose
    basis and tracked second moment the map starts from, instead of a fit of its first keyframe: a map of the same
    kind of place, or one ``ov3d merge`` fitted over several. With ``compress_update: false`` the basis stays fixed
    and a keyframe's compression is one projection; maps made from one basis share their coordinates. '' = fit
    the first keyframe."""


@dataclass
class KeyframeConfig:
    min_translation_m: float = 0.10
    """A frame becomes a keyframe when the camera moved this far since the last keyframe ..."""
    min_rotation_deg: float = 10.0
    """... or turned this much ..."""
    max_interval_s: float = 2.0
    """... or this much time passed (0 disables the time rule)."""
    min_interval_s: float = 0.0
    """Never take keyframes closer in time than this (bounds the feature rate)."""


@dataclass
class FeatureConfig:
    source: str = 'clip'
    """2D feature source: 'clip' (open_clip dense features) or 'simulated' (from ground-truth label images)."""
    model: str = 'ViT-B-16'
    """open_clip architecture name."""
    pretrained: str = 'openai'
    """open_clip pretrained tag resolved from the local cache, or a path to a local checkpoint file."""
    cache_dir: str = ''
    """Directory searched for cached open_clip weights ('' = open_clip's default cache)."""
    allow_download: bool = False
    """When the weights of an open_clip pretrained tag are not found locally, let open_clip download them once
    (Hugging Face hub) into cache_dir or its default cache. Off: nothing is ever downloaded and missing weights
    fail at start with the places searched. Needs internet; a set HF_HUB_OFFLINE=1 still forbids it."""
    dense_mode: str = 'naclip'
    """Training-free dense last block: 'naclip', 'sclip', 'clearclip' or 'maskclip'."""
    image_short_side: int = 448
    """Images are resized so their short side has this many pixels before the ViT."""
    window_px: int = 0
    """Sliding-window inference: square windows of this many pixels of the resized image (e.g. 224, 336, 448;
    rounded to whole patches), each run through the ViT at its own token grid, overlapping tokens averaged into
    one grid over the whole image. 0 = the whole image in one pass. A window larger than the image is clipped
    to it."""
    window_stride_px: int = 0
    """Sliding-window inference: step between windows in pixels (rounded to whole patches, at most window_px);
    0 = half a window."""
    dtype: str = 'auto'
    """Precision of the ViT's weights and activations: 'auto' (float16 on CUDA, float32 otherwise), 'float32',
    'float16' or 'bfloat16'; features, text embeddings and everything after the ViT stay float32. bfloat16 pays
    on CPUs with bf16 matrix units (Intel AMX, AVX512-BF16): on a 2-core Intel Xeon with AMX, ViT-B-16 at 224 /
    336 / 448 px took 106 / 236 / 500 ms per 640x480 keyframe against 377 / 904 / 1 833 ms in float32 (one
    thread, random weights), and on a 2-core AMD EPYC Zen 4 (AVX512-BF16, no AMX) 313 / 707 / 1 472 against
    556 / 1 296 / 2 805 ms; elsewhere it can be slower than float32. What it does to trained CLIP features
    was not measured (no weights here): check with ``benchmarks/bm_dense_quality.py --dtypes float32
    bfloat16`` first."""
    compile: bool = False
    """Run the ViT through ``torch.compile`` (inductor; needs a C++ compiler on CPU, Triton on CUDA). Every new
    image size compiles once (about 40 s on a 2-core CPU). Measured on a 2-core CPU (ViT-B-16, 224-448 px, fp32
    and bf16, one thread): 0.88-1.18x the eager time, no measurable gain, so it is off by default;
    ``benchmarks/bm_compare.py --only clip --clip-compile`` measures it on the robot's device."""
    sim_patch_px: int = 16
    """Simulated source: patch size in pixels (features are constant per patch, like a ViT). Always used as
    given (no preset sets it)."""
    sim_seed: int = 0
    """Simulated source: random seed; with the per-frame counter it fixes every simulated error (same seed and
    same frame order give the same features). Always used as given."""
    sim_preset: str = 'default'
    """Simulated source: error model of the simulated 2D teacher: 'clean' (patch pooling and faint noise only),
    'default' (a typical open-vocabulary 2D model), 'hard' (a weak one), 'clip' (CLIP-like: modality gap and
    view-consistent, world-anchored errors) or 'custom'. A named preset sets sim_noise, sim_blur_patches,
    sim_confusion, sim_view_flip, sim_fragments, sim_miss_small_px, sim_world_confusion and sim_text_cosine to
    its own values and ignores those fields; 'custom' uses those fields as given (their defaults equal
    'default').
    Values: ov3d_ros.core.features.simulated.PRESETS."""
    sim_noise: float = 0.35
    """Simulated source ('custom' preset only): norm of the Gaussian noise vector added to each patch feature
    before normalisation (per-dimension std sim_noise / sqrt(D))."""
    sim_blur_patches: float = 0.5
    """Simulated source ('custom' preset only): receptive-field blur, the std in patches of a Gaussian over
    the patch grid that bleeds features across object boundaries (0 = off)."""
    sim_confusion: float = 0.06
    """Simulated source ('custom' preset only): per view, the probability that a connected region is taken
    for a semantically close class, drawn from a softmax of the class text similarities over the other
    classes with temperature sim_confusion_temp (table -> desk, cabinet -> bookshelf, sofa -> chair)."""
    sim_confusion_temp: float = 0.05
    """Simulated source: softmax temperature of the confusion target over class text cosine similarities
    (small = almost always the most similar class). Always used as given."""
    sim_view_flip: float = 0.03
    """Simulated source ('custom' preset only): per view, the probability that a connected region takes a
    uniformly random other class (view-dependent errors; the whole region flips)."""
    sim_fragments: float = 1.5
    """Simulated source ('custom' preset only): mean number (Poisson) of random elliptical blobs per view,
    each 3-12 % of the short image side in radius, filled with a random class or a random feature vector."""
    sim_miss_small_px: int = 300
    """Simulated source ('custom' preset only): connected regions smaller than this many pixels of the label
    image are missed: they take the label of the nearest larger region around them (0 = off)."""
    sim_world_confusion: float = 0.0
    """Simulated source ('custom' preset only): the probability that a world-anchored part (a cell of
    sim_world_cell_m of one class) is taken for a semantically close class in every view that sees it
    (view-consistent errors that multi-view fusion cannot average away; needs the frame's depth, camera and
    pose, which the mapper passes). 0 = off."""
    sim_world_cell_m: float = 0.4
    """Simulated source: edge of the world cells that anchor view-consistent errors, metres (each class has its
    own grid offset). Always used as given."""
    sim_text_cosine: float = 1.0
    """Simulated source ('custom' preset only): CLIP-like modality gap, the cosine between an error-free,
    noise-free feature and its class text. Below 1 every feature shares a fixed image-modality direction
    orthogonal to the class texts (real CLIP: about 0.2-0.3). 1 = off (features lie on the text embeddings)."""


@dataclass
class QueryConfig:
    templates: List[str] = field(default_factory=lambda: [
        'a photo of a {}.', 'a photo of the {}.', 'a {} in a scene.', 'a photo of a {} in a room.',
        'there is a {} in the scene.', 'a close-up photo of a {}.'])
    """Prompt templates averaged for every query text (an empty list embeds the bare text)."""
    repetitions: int = 1
    """Laser's text augmentation: every text is also embedded repeated this many times ('chair chair' for 2)
    and averaged with the plain text, in every template (1 = off; on the evaluation world 2 changed mIoU by
    -0.2 and synonym recall by +0.6 points)."""
    default_negatives: List[str] = field(default_factory=lambda: ['wall', 'floor', 'ceiling', 'object'])
    """Negative texts used when a request gives none."""
    temperature: float = 0.0
    """Softmax temperature over [query, negatives...] cosine similarities (0 = the feature source's default:
    0.01 for CLIP, i.e. its logit scale 100)."""
    default_threshold: float = 0.55
    """Score threshold used when a request gives threshold <= 0."""
    min_observations: float = 1.0
    """Voxels observed with less total weight than this are not returned."""


@dataclass
class PurifyConfig:
    enabled: bool = True
    """Geometry-guided pooling of the fused features (GeoPurify); queries then use the purified features. On by
    default with the shipped learned student and the superpoint vote: +12.2 mIoU and +8.4 boundary mIoU over raw
    fusion on the tuning split (README)."""
    affinity: str = 'learned'
    """'learned' (student affinity network, needs ``checkpoint``) or 'fallback' (colour, normal and distance)."""
    checkpoint: str = 'default'
    """Student affinity network checkpoint (.safetensors with its config), for affinity 'learned'; 'default' = the
    one shipped in ov3d_ros/models/: label-free, distilled from a self-supervised 3D teacher, reading only colour
    and normals, so it serves every feature source and dimension (CLIP, simulated, precomputed, compressed)."""
    radius_vox: int = 2
    """Neighbourhood: occupied voxels within this many voxels (ball) of each voxel."""
    iterations: int = 18
    """T: pooling steps (features <- A features) per update."""
    scale: float = 20.0
    """Learned affinity: softmax(scale * cosine of the student embeddings) over each neighbourhood."""
    sigma_color: float = 30.0
    """Fallback affinity: colour difference scale (RGB 0-255)."""
    sigma_normal: float = 0.3
    """Fallback affinity: normal disagreement scale (1 - |n_i . n_j|)."""
    sigma_distance_vox: float = 1.5
    """Fallback affinity: distance scale in voxels."""
    mode: str = 'incremental'
    """'incremental': re-pool the voxels each keyframe touched plus a margin (bounded cost per keyframe);
    'whole': re-pool the whole map once before a query when keyframes came since (offline reference)."""
    pool_dim: int = 64
    """Pooling subspace (0 = every feature dimension): features are pooled in the top ``pool_dim`` uncentred
    principal directions of the map's fused features and keep their raw component outside them, so pooling costs
    about pool_dim / D of the full products. On the tuning split (simulated CLIP-like 384-d features) 64 and 32
    gave the same mIoU and boundary mIoU as every dimension; features of at most this rank are pooled exactly.
    Ignored when the map has at most this many dimensions (e.g. ``map.compress_dim: 64``)."""
    margin_vox: int = 3
    """Incremental mode: beyond the voxels whose affinities a keyframe changed (its touched voxels, widened by the
    normal radius and the student's receptive field), re-pool this many more voxel steps around them."""
    superpoint_k: float = 0.02
    """Superpoint voting after pooling (0 = off): the map is over-segmented into regions of similar normal and
    colour (Felzenszwalb-Huttenlocher criterion with this constant on the 26-connected voxel graph; larger:
    larger regions) and each voxel's purified feature is blended with its region's mean. Label-free, reads no
    feature; brought up to date when a reader needs it after keyframes came."""
    superpoint_blend: float = 0.95
    """Weight of the region mean in the blend (0-1)."""
    superpoint_min_vox: int = 40
    """Regions smaller than this many voxels join their most similar neighbour region."""
    superpoint_convex: float = 0.5
    """Factor on the normal disagreement of convex edges (0-1; 1 = convex and concave alike): a box's own edges
    bend outwards, the creases where it meets the floor or a wall inwards, so convex edges merge more readily.
    Needs each voxel's direction to the cameras (the map's ``views`` layer, kept by fusion)."""
    superpoint_weighted: bool = True
    """Each voxel counts in its superpoint's mean by its fusion weight (the points fused into it, capped at
    ``map.max_weight`` as in fusion), so the mean is that of the superpoint's observations, as if they had been
    fused into one cell; false: each voxel once."""
    superpoint_block_vox: int = 64
    """Superpoints stay inside cubes of this many voxels a side, so after a keyframe only the cubes it changed are
    segmented and voted again (cost follows the keyframe, not the map); 0: superpoints over the whole map, voted
    over the whole map after every keyframe."""


@dataclass
class LabelConfig:
    vocabulary: List[str] = field(default_factory=list)
    """Active vocabulary of the label volume (empty = no label volume): every voxel accumulates per-keyframe
    class probabilities over these names; queries naming one of them are answered from the label volume."""
    temperature: float = 0.0
    """Softmax temperature of the per-keyframe class probabilities (0 = the feature source's default)."""
    smoothing_radius_vox: int = 1
    """Average each voxel's class distribution over its observed neighbours within this many voxels before
    picking its class (0 = off). On the evaluation world 1 gave +2.9 mIoU and fewer fragments over the
    unsmoothed label volume of raw fusion; purified maps are smooth already (there it cost 0.8 mIoU: use 0 with
    purify.enabled)."""
    feature_prior: bool = True
    """With purification: multiply each voxel's class distribution by the softmax of its purified feature (on the
    evaluation world: +0.1 mIoU and 1.305 instead of 1.321 fragments per instance)."""
    min_component_vox: int = 20
    """Connected same-class regions smaller than this many voxels take the most common class around them (a
    cleanup of isolated mislabelled clusters; 0 = off). On the evaluation world 20 gave +1.7 mIoU and 1.39
    instead of 1.50 fragments per instance on top of smoothing radius 1."""


@dataclass
class ObjectConfig:
    gap_vox: int = 1
    """Object instances of a query answer: answering voxels with at most this many empty voxels between them
    belong to one object (0 = only touching voxels, 26-neighbourhood)."""
    min_voxels: int = 5
    """Object instances with fewer answering voxels than this are left out (noise, stray voxels)."""


@dataclass
class MapperConfig:
    map: MapConfig = field(default_factory=MapConfig)
    keyframes: KeyframeConfig = field(default_factory=KeyframeConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    query: QueryConfig = field(default_factory=QueryConfig)
    purify: PurifyConfig = field(default_factory=PurifyConfig)
    labels: LabelConfig = field(default_factory=LabelConfig)
    objects: ObjectConfig = field(default_factory=ObjectConfig)


# ------------------------------------------------------------------------------------------ validation
Check = Callable[[Any], Optional[str]]
"""value -> None, or what is wrong with it ('must be ...'); its ``constraint`` attribute says what it takes and its
``bounds`` attribute, where it has one, the finite interval (lo, hi) that holds every value it takes (the ROS
layer puts both in the parameter's descriptor: the text and the range)."""


def finite(v) -> bool:
    """Whether ``v`` is a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def constrained(constraint: str, ok: Callable[[Any], bool], bounds: Optional[Tuple[float, float]] = None) -> Check:
    """A check that takes the values ``ok`` accepts and says 'must be <constraint>' of the others; ``bounds``: the
    finite interval (lo, hi) that holds every value ``ok`` accepts, if there is one."""
    def chk(v):
        return None if ok(v) else f'must be {constraint}'
    chk.constraint, chk.bounds = constraint, bounds
    return chk


def at_least(lo: float, strict: bool = False) -> Check:
    return constrained(f'a finite number {">" if strict else ">="} {lo:g}',
                       lambda v: finite(v) and (v > lo if strict else v >= lo))


def _g(x: float) -> str:
    """``x`` as ``{:g}`` writes it, with a short exponent (1e6, not 1e+06)."""
    return re.sub(r'e\+?(-?)0*(?=\d)', r'e\1', f'{x:g}')


def between(lo: float, hi: float, what: str = 'a number', unit: str = '', off: bool = False) -> Check:
    """Finite numbers in [lo, hi] ('<what> in [lo, hi] <unit>'), and with ``off`` 0 as well ('0 (off) or ...');
    its bounds are [lo, hi], widened to 0 with ``off``."""
    text = ('0 (off) or ' if off else '') + f'{what} in [{_g(lo)}, {_g(hi)}]' + (f' {unit}' if unit else '')
    return constrained(text, lambda v: finite(v) and (off and v == 0 or lo <= v <= hi),
                       (min(lo, 0), max(hi, 0)) if off else (lo, hi))


def one_of(*options: str) -> Check:
    return constrained(f'one of {", ".join(repr(o) for o in options)}', lambda v: v in options)


def _one_slot(template: str) -> bool:
    """Whether ``template.format(text)`` puts the text in exactly one place and needs nothing else."""
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError:            # a lone { or }
        return False
    return fields == [('', '', None)]


def _templates(v) -> Optional[str]:
    bad = [t for t in v if not _one_slot(t)]
    return f'every template needs exactly one {{}} for the text and no other {{...}} field; not {bad[0]!r}' \
        if bad else None


_templates.constraint = 'templates with exactly one {} each, where the text goes'


def texts(then: Optional[Check] = None) -> Check:
    """A check that takes a list of strings that ``then`` (if given) takes, for the list fields (a bare string set
    through the Python API would be read as its characters)."""
    def chk(v):
        if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) for t in v):
            return 'must be a list of strings'
        return then(v) if then is not None else None
    chk.constraint = getattr(then, 'constraint', 'a list of strings')
    return chk


_MAX_RADIUS_VOX = 3
"""Neighbourhood radii (purify.radius_vox, labels.smoothing_radius_vox): a query or re-pool holds every voxel's
neighbour rows, (V, M) int64 plus (V, M) float32 weights with M the ball's cells (radius 1 / 2 / 3 / 4 / 20: 7 / 33
/ 123 / 257 / 33 401), 1.5 GB at radius 3 for a map of 1e6 voxels (3 GB at 4, 400 GB at 20). 3 is the largest radius
tuned (README, ``tune_radius``); the defaults are 2 and 1."""


_MAX_IMAGE_PX = 2048
"""The ViT's input sizes (features.image_short_side, window_px, window_stride_px): at 2048 px a ViT-B/16 keyframe is
16 384 tokens or more, whose attention matrix alone takes 1 GB per head in float32; the sizes measured are 224-448
(README)."""


CHECKS: Dict[str, Check] = {
    'map.voxel_size_m': at_least(0.0, strict=True), 'map.min_depth_m': at_least(0.0),
    # a stride of 64 keeps 10 x 8 pixels of a 640 x 480 image; larger ones leave a keyframe a voxel or two
    'map.max_depth_m': at_least(0.0, strict=True), 'map.pixel_stride': between(1, 64),
    'map.initial_capacity': at_least(1), 'map.max_voxels': at_least(0), 'map.clear_radius_m': at_least(0.0),
    'map.compress_dim': at_least(0), 'map.max_weight': at_least(0.0),
    'keyframes.min_translation_m': at_least(0.0), 'keyframes.min_rotation_deg': at_least(0.0),
    'keyframes.max_interval_s': at_least(0.0), 'keyframes.min_interval_s': at_least(0.0),
    'features.source': one_of('clip', 'simulated', 'precomputed'),
    'features.image_short_side': between(1, _MAX_IMAGE_PX), 'features.window_px': between(0, _MAX_IMAGE_PX),
    'features.window_stride_px': between(0, _MAX_IMAGE_PX),
    'features.sim_patch_px': at_least(1), 'features.sim_noise': at_least(0.0),
    'features.sim_blur_patches': at_least(0.0), 'features.sim_confusion': between(0.0, 1.0),
    'features.sim_confusion_temp': at_least(0.0, strict=True), 'features.sim_view_flip': between(0.0, 1.0),
    'features.sim_fragments': at_least(0.0), 'features.sim_miss_small_px': at_least(0),
    'features.sim_world_confusion': between(0.0, 1.0), 'features.sim_world_cell_m': at_least(0.0, strict=True),
    'features.sim_text_cosine': between(0.0, 1.0),
    'query.templates': texts(_templates), 'query.repetitions': between(1, 16), 'query.temperature': at_least(0.0),
    'query.default_threshold': between(0.0, 1.0), 'query.min_observations': at_least(0.0),
    # none: every query that gives no negatives of its own fails ("no negative text differs from the query")
    'query.default_negatives': texts(constrained('1 to 32 negatives, none blank',
                                                 lambda v: 1 <= len(v) <= 32 and all(t.strip() for t in v))),
    'purify.affinity': one_of('learned', 'fallback'), 'purify.mode': one_of('incremental', 'whole'),
    'purify.radius_vox': between(1, _MAX_RADIUS_VOX), 'purify.iterations': between(0, 200),
    'purify.scale': at_least(0.0, strict=True),
    'purify.sigma_color': at_least(0.0, strict=True), 'purify.sigma_normal': at_least(0.0, strict=True),
    'purify.sigma_distance_vox': at_least(0.0, strict=True), 'purify.margin_vox': at_least(0),
    'purify.pool_dim': at_least(0),
    'purify.superpoint_k': at_least(0.0), 'purify.superpoint_blend': between(0.0, 1.0),
    'purify.superpoint_min_vox': at_least(0), 'purify.superpoint_block_vox': at_least(0),
    'purify.superpoint_convex': between(0.0, 1.0),
    'labels.vocabulary': texts(), 'labels.temperature': at_least(0.0),
    'labels.smoothing_radius_vox': between(0, _MAX_RADIUS_VOX),
    'labels.min_component_vox': at_least(0),
    'objects.gap_vox': at_least(0), 'objects.min_voxels': at_least(1),
}
"""Per ``section.field``: the values it can take. The dense mode, precision and simulated preset are checked by
the feature sources that define them (``ov3d_ros.core.features``)."""


def check(name: str, value, checks: Dict[str, Check] = CHECKS) -> Optional[str]:
    """What is wrong with ``value`` for ``name`` ('map.max_depth_m must be ..., got -2.0'), or None."""
    chk = checks.get(name)
    problem = chk(value) if chk is not None else None
    if not problem and isinstance(value, int) and not isinstance(value, bool) and not -2 ** 63 <= value < 2 ** 63:
        problem = 'must fit in 64 bits (a ROS integer parameter; torch indices are int64)'
    return f'{name} {problem}, got {value!r}' if problem else None


def depth_range_problem(min_depth_m: float, max_depth_m: float) -> Optional[str]:
    if finite(min_depth_m) and finite(max_depth_m) and min_depth_m >= max_depth_m:
        return f'map.min_depth_m ({min_depth_m:g}) must be below map.max_depth_m ({max_depth_m:g})'
    return None


def validate(cfg: MapperConfig) -> None:
    """Raise ValueError naming every field of ``cfg`` whose value it cannot take."""
    problems = [check(f'{section.name}.{f.name}', getattr(getattr(cfg, section.name), f.name))
                for section in fields(cfg) for f in fields(getattr(cfg, section.name))]
    defaults = MapperConfig()
    for section in fields(cfg):               # whole-number fields set to a float through the Python API
        sub, default_sub = getattr(cfg, section.name), getattr(defaults, section.name)
        for f in fields(sub):
            default, value = getattr(default_sub, f.name), getattr(sub, f.name)
            if isinstance(default, int) and not isinstance(default, bool) and \
                    (not isinstance(value, int) or isinstance(value, bool)):
                problems.append(f'{section.name}.{f.name} must be a whole number (int), got {value!r}')
    problems.append(depth_range_problem(cfg.map.min_depth_m, cfg.map.max_depth_m))
    problems = [p for p in problems if p]
    if problems:
        raise ValueError('; '.join(problems))


def section_items(cfg: Any) -> Dict[str, Any]:
    """{field name: value} of one config dataclass."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg)}


def update_from_dict(cfg: MapperConfig, values: Dict[str, Dict[str, Any]]) -> MapperConfig:
    """Set fields from ``{section: {field: value}}``; unknown keys raise ValueError."""
    for section, items in values.items():
        if not hasattr(cfg, section):
            raise ValueError(f'unknown config section {section!r}')
        sub = getattr(cfg, section)
        known = {f.name: f for f in fields(sub)}
        if items is not None and not isinstance(items, dict):
            raise ValueError(f'config section {section!r} must be a mapping of its keys (e.g. {section}: '
                             f'{{{next(iter(known))}: ...}}), got {items!r}')
        for key, value in (items or {}).items():
            if key not in known:
                raise ValueError(f'unknown config key {section}.{key}')
            setattr(sub, key, _typed(f'{section}.{key}', getattr(sub, key), value))
    return cfg


_SCIENTIFIC = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+')
"""A number in scientific notation, as YAML 1.2 reads it."""


def _typed(name: str, default, value):
    """``value`` as the type of the field's ``default``, or ValueError naming ``name``, the type and the value."""
    if isinstance(default, list):
        # every list field is a list of texts; one text (``--set labels.vocabulary=chair``) is a list of one, not
        # of its characters
        if isinstance(value, str):
            return [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f'{name} must be a list of strings (e.g. [chair, sofa], or [] for none), got {value!r}')
        bad = [v for v in value if not isinstance(v, str)]
        if bad:
            raise ValueError(f'{name} must be a list of strings, got {list(value)!r} ({bad[0]!r} is not a string)')
        return list(value)
    if isinstance(value, str) and isinstance(default, (int, float)) and not isinstance(default, bool) \
            and _SCIENTIFIC.fullmatch(value.strip()):
        number = float(value)        # YAML 1.1 reads 1e-1 (no dot in the mantissa) as a string
        if isinstance(default, float):
            return number
        if number.is_integer():
            return int(number)
        raise ValueError(f'{name} must be int, got {value!r} ({number:g} is not a whole number)')
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, type(default)) or (isinstance(value, bool) and not isinstance(default, bool)):
        raise ValueError(f'{name} must be {type(default).__name__}, got {value!r}')
    return value


def field_docs(cls: type) -> Dict[str, str]:
    """{field name: the docstring written under it} of a config dataclass (parsed from its source)."""
    import ast
    import inspect
    import textwrap
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if isinstance(stmt, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[stmt.target.id] = ' '.join(str(nxt.value.value).split())
    return docs


def load_yaml_config(paths, cfg: MapperConfig | None = None) -> MapperConfig:
    """Read the mapper sections from ROS parameter files (the node's ``config/*.yaml``) or plain YAML.

    Files are applied in order (base, then overlays). In a ROS file the first node entry's ``ros__parameters``
    is used; keys that are not config sections (node-level parameters) are ignored.
    """
    import yaml
    cfg = cfg or MapperConfig()
    section_names = {f.name for f in fields(MapperConfig)}
    for path in paths:
        text = read_text(path, 'config', 'a ROS parameter file or YAML')
        try:
            doc = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f'{path}: cannot read config ({e})') from e
        if not isinstance(doc, dict):
            raise ValueError(f'{path}: expected a mapping at the top level')
        for entry in doc.values():
            if isinstance(entry, dict) and 'ros__parameters' in entry:
                doc = entry['ros__parameters'] or {}
                if not isinstance(doc, dict):
                    raise ValueError(f'{path}: ros__parameters must be a mapping, got {doc!r}')
                break
        update_from_dict(cfg, {k: v for k, v in doc.items() if k in section_names})
    return cfg


def parse_overrides(items) -> Dict[str, Dict[str, Any]]:
    """``['map.voxel_size_m=0.04', 'features.source=simulated']`` → nested dict with YAML-typed values."""
    import yaml
    out: Dict[str, Dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition('=')
        section, dot, name = key.partition('.')
        if not sep or not dot:
            raise ValueError(f'expected section.key=value, got {item!r}')
        out.setdefault(section.strip(), {})[name.strip()] = yaml.safe_load(value)
    return out
