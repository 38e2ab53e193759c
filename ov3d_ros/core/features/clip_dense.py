"""Dense open-vocabulary features from an open_clip ViT with a training-free dense last block.

All blocks but the last run unchanged; the last block's attention is replaced by one of
  * 'naclip'    (NACLIP, Hajimiri et al. 2025): k-k attention plus a Gaussian neighbourhood bias over the patch grid,
  * 'clearclip' (ClearCLIP, Lan et al. 2024): q-q attention,
  * 'sclip'     (SCLIP, Wang et al. 2024): correlative attention, (softmax(q q^T) + softmax(k k^T)) v,
  * 'maskclip'  (MaskCLIP, Zhou et al. 2022): the value embedding alone (no token mixing),
followed by the attention's output projection, as in each method's official code: NACLIP and ClearCLIP drop the
block's residual connection and FFN (their "reduced" last block), SCLIP and MaskCLIP keep both
(x + attn(ln_1 x), then + mlp(ln_2 .)). Every patch token then goes through ``ln_post`` and ``proj`` into the
joint image-text space.

With ``window_px`` set, the resized image is cut into overlapping square windows (sliding-window inference); each
runs through the ViT at its own token grid and the window grids are stitched back, overlapping tokens averaged.
"""
from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ov3d_ros.core import threads
from ov3d_ros.core.config import FeatureConfig
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.features.weights import (WeightsNotFoundError, fetch_weights, load_weights, resolve_weights,
                                            uses_quick_gelu)

DENSE_MODES = ('naclip', 'sclip', 'clearclip', 'maskclip')
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
"""``features.dtype`` values besides 'auto' (float16 on CUDA, float32 otherwise)."""
REDUCED_MODES = ('naclip', 'clearclip')
"""Modes whose last block is the attention output alone (no residual connection, no FFN), as their papers have it."""
NACLIP_STD = 5.0
"""Std of NACLIP's Gaussian neighbourhood bias, in patches."""


def model_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """The torch dtype of ``features.dtype`` ``name`` on ``device`` ('auto': float16 on CUDA, float32 otherwise)."""
    if name == 'auto':
        return torch.float16 if torch.device(device).type == 'cuda' else torch.float32
    return DTYPES[name]


def precision_warning(name: str, device: torch.device | str) -> str:
    """Why ``features.dtype`` ``name`` will make the ViT slow on ``device`` ('' when it will not): a half precision
    on a CPU without native kernels for it, where torch emulates it. On a 2-core AMD EPYC (Zen 3, AVX2), ViT-B/16
    at 224 / 336 / 448 px took 6.1 / 17.5 / 39.7 s per 640x480 keyframe in bfloat16 against 0.85 / 1.59 / 3.81 s
    in float32 (``bm_compare.py --only clip``, one thread), and 6.2 s in float16 against 0.95 s at 224 px."""
    dtype = model_dtype(name, device)
    if not threads.emulated_half(dtype, device):
        return ''
    half = str(dtype).removeprefix('torch.')
    return (f'features.dtype {name!r}: this CPU has no native {half} matrix kernels (oneDNN reports none), so the '
            f'ViT runs {half} emulated, several times slower than float32 (6-11x on an AVX2 CPU); use '
            "features.dtype 'auto' (float32 on the CPU)")


def precision_hint(name: str, device: torch.device | str) -> str:
    """A faster precision this CPU offers while ``features.dtype`` ``name`` runs the ViT in float32 on it ('' when
    there is none, or off the CPU): bfloat16, where oneDNN reports native bf16 matrix kernels (AMX, AVX512-BF16).
    ViT-B/16 at 224 / 336 / 448 px ran 3.6-3.8x faster in bfloat16 than in float32 on a 2-core Intel Xeon with
    AMX and 1.8-1.9x on a 2-core AMD EPYC Zen 4 with AVX512-BF16 (``bm_compare.py --only clip``, one thread,
    random weights). Not the default: what bfloat16 does to trained CLIP features was not measured here."""
    if (torch.device(device).type != 'cpu' or model_dtype(name, device) != torch.float32
            or not threads.native_half(torch.bfloat16)):
        return ''
    return (f'features.dtype {name!r} runs the ViT in float32, and this CPU has native bfloat16 matrix kernels '
            "(oneDNN reports them): features.dtype 'bfloat16' ran it 1.8-3.8x faster on such CPUs; check what it "
            'does to your model\'s features first (benchmarks/bm_dense_quality.py --dtypes float32 bfloat16)')


def interpolate_pos_embed(pos: torch.Tensor, old_grid: Tuple[int, int], new_grid: Tuple[int, int]) -> torch.Tensor:
    """Resample a (1 + gh*gw, C) ViT positional embedding to ``new_grid``; bicubic on the 2D grid, class token kept."""
    cls, grid = pos[:1], pos[1:].reshape(1, old_grid[0], old_grid[1], -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=tuple(new_grid), mode='bicubic', align_corners=False).to(pos.dtype)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(-1, pos.shape[1])])


def neighbourhood_bias(gh: int, gw: int, std: float = NACLIP_STD) -> torch.Tensor:
    """(1 + gh*gw)^2 additive attention bias exp(-d^2 / 2 std^2), d the grid distance of two patches; 0 for the
    class token's row and column."""
    yy, xx = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing='ij')
    yx = torch.stack([yy.flatten(), xx.flatten()], 1).float()
    bias = torch.exp(-torch.cdist(yx, yx).square() / (2 * std ** 2))
    return F.pad(bias, (1, 0, 1, 0))


def window_starts(size: int, window: int, step: int) -> List[int]:
    """Offsets of windows of length ``window`` every ``step`` along an axis of length ``size``, the last one flush
    with the end (so every position is covered); [0] when one window covers the axis."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, step))
    return starts if starts[-1] == size - window else starts + [size - window]


def weights_space(model: torch.nn.Module, name: str, quick_gelu: bool) -> str:
    """'clip:<model>[:quickgelu]:<fingerprint>': the space a CLIP model's features and text embeddings live in, the
    fingerprint a hash of its float32 image and text projections (so the same weights give the same space on any
    device, in any precision, from any file; other weights, another)."""
    digest = hashlib.sha256()
    for t in (model.visual.proj, model.text_projection):
        digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return f'clip:{name}:{"quickgelu:" if quick_gelu else ""}{digest.hexdigest()[:16]}'


def _weights_of(cfg: FeatureConfig) -> Tuple[str, str, str]:
    """What names a ViT's weights in a feature config: the model, the weights tag or file, the cache folder."""
    return cfg.model, cfg.pretrained, cfg.cache_dir


def check_config(cfg: FeatureConfig) -> None:
    """Raise ValueError for settings of ``cfg`` the dense extractor cannot use."""
    if cfg.dense_mode not in DENSE_MODES:
        raise ValueError(f'features.dense_mode must be one of {DENSE_MODES}, got {cfg.dense_mode!r}')
    if cfg.dtype != 'auto' and cfg.dtype not in DTYPES:
        raise ValueError(f"features.dtype must be 'auto' or one of {tuple(DTYPES)}, got {cfg.dtype!r}")
    if cfg.image_short_side < 1 or cfg.window_px < 0 or cfg.window_stride_px < 0:
        raise ValueError(f'features.image_short_side must be positive and window_px, window_stride_px >= 0; got '
                         f'{cfg.image_short_side}, {cfg.window_px}, {cfg.window_stride_px}')


class OpenClipDenseExtractor(FeatureExtractor):
    """Dense CLIP features (h, w, D) from an open_clip ViT (e.g. ViT-B-16: stride 16, D 512).

    Args:
        cfg: feature config (model, pretrained, cache_dir, dense_mode, image_short_side, window_px,
            window_stride_px, dtype, compile).
        device: torch device; the ViT runs in ``cfg.dtype`` (by default fp16 on CUDA, fp32 otherwise).
    Raises:
        WeightsNotFoundError: the weights named by ``cfg.pretrained`` are not available locally.
        ValueError: unknown dense mode, bad sizes, or a model that is not an open_clip VisionTransformer.
    """

    simulated = False
    live_settings = frozenset({'dense_mode', 'image_short_side', 'window_px', 'window_stride_px'})

    def __init__(self, cfg: FeatureConfig, device: torch.device | str = 'cpu'):
        import open_clip
        if not cfg.allow_download:
            os.environ.setdefault('HF_HUB_OFFLINE', '1')  # never reach for the network (e.g. HF tokenizers)
        check_config(cfg)
        # fail fast, before building the model (with allow_download: download a missing tag first)
        (fetch_weights if cfg.allow_download else resolve_weights)(cfg.model, cfg.pretrained, cfg.cache_dir)
        self.cfg, self.dense_mode = cfg, cfg.dense_mode
        self.device = torch.device(device)
        self.dtype = model_dtype(cfg.dtype, self.device)
        self.precision_warning = precision_warning(cfg.dtype, self.device)
        self.precision_hint = precision_hint(cfg.dtype, self.device)
        self.quick_gelu = uses_quick_gelu(cfg.model, cfg.pretrained)   # OpenAI weights need QuickGELU
        model = open_clip.create_model(cfg.model, pretrained=None, pretrained_image=False, pretrained_text=False,
                                       force_quick_gelu=self.quick_gelu)
        self.weights = load_weights(model, cfg.model, cfg.pretrained, cfg.cache_dir)
        self._space = weights_space(model, cfg.model, self.quick_gelu)
        self.model = model.eval().requires_grad_(False).to(self.device, self.dtype)
        self.visual = v = model.visual
        if not all(hasattr(v, a) for a in ('conv1', 'class_embedding', 'positional_embedding', 'ln_post', 'proj')) \
                or not all(isinstance(b.attn, torch.nn.MultiheadAttention) for b in v.transformer.resblocks):
            raise ValueError(f'{cfg.model!r} is not an open_clip VisionTransformer with standard attention blocks')
        self.stride = int(v.patch_size[0])
        self.dim = int(v.proj.shape[1])
        pcfg = open_clip.pretrained.get_pretrained_cfg(cfg.model, cfg.pretrained or '')
        mean, std = pcfg.get('mean', v.preprocess_cfg['mean']), pcfg.get('std', v.preprocess_cfg['std'])
        self._mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.tokenizer = open_clip.get_tokenizer(cfg.model)
        self._pos_cache: dict = {}
        self._bias_cache: dict = {}
        self._vit = self._compiled() if cfg.compile else self.forward_vit

    def _compiled(self):
        """:meth:`forward_vit` through ``torch.compile`` (static shapes: one graph per image size)."""
        return torch.compile(self.forward_vit, dynamic=False)

    def reconfigure(self, cfg: FeatureConfig) -> None:
        """Take the dense mode and image/window sizes of ``cfg`` without reloading the model; raises ValueError when
        ``cfg`` names another model, other weights or another precision, or has bad settings."""
        if _weights_of(cfg) != _weights_of(self.cfg):
            raise ValueError('reconfigure keeps the model and weights; create a new extractor for other ones')
        check_config(cfg)
        if model_dtype(cfg.dtype, self.device) != self.dtype:
            raise ValueError(f'features.dtype {cfg.dtype!r}: the weights were cast to {self.dtype} when loaded; '
                             'create a new extractor for another precision')
        if cfg.compile != self.cfg.compile:
            self._vit = self._compiled() if cfg.compile else self.forward_vit
        self.cfg, self.dense_mode = cfg, cfg.dense_mode
        self.precision_warning = precision_warning(cfg.dtype, self.device)
        self.precision_hint = precision_hint(cfg.dtype, self.device)

    def holds(self, cfg: FeatureConfig, device: torch.device | str) -> bool:
        """Whether this extractor's ViT is the one ``cfg`` asks for on ``device``: the same model, weights and
        precision there (what :meth:`reconfigure` and :meth:`with_settings` keep)."""
        return torch.device(device) == self.device and _weights_of(cfg) == _weights_of(self.cfg) \
            and model_dtype(cfg.dtype, self.device) == self.dtype

    def with_settings(self, cfg: FeatureConfig) -> 'OpenClipDenseExtractor':
        """Another extractor on this one's ViT and weights (shared, not copied) with the dense mode and image/window
        sizes of (a copy of) ``cfg``; this one is left as it is. Raises ValueError as :meth:`reconfigure` does."""
        other = copy.copy(self)
        other._vit = other.forward_vit               # the copied attribute is bound to this extractor
        other.cfg = replace(self.cfg, compile=False)
        other.reconfigure(copy.deepcopy(cfg))
        return other

    @property
    def name(self) -> str:
        return f'clip:{self.cfg.model}:{self.dense_mode}'

    @property
    def space(self) -> str:
        return self._space

    def grid_size(self, height: int, width: int) -> Tuple[int, int]:
        """(h, w) patch grid of an image of this size after resizing its short side to ``image_short_side``."""
        s, p = self.cfg.image_short_side / min(height, width), self.stride
        return max(1, round(height * s / p)), max(1, round(width * s / p))

    def window_layout(self, gh: int, gw: int) -> Optional[Tuple[Tuple[int, int], List[Tuple[int, int]]]]:
        """Sliding windows over a (gh, gw) token grid: ((wh, ww) window size, [(y, x) offsets]), all in patches;
        None for whole-image inference (``window_px`` 0, or one window covering the whole grid)."""
        if self.cfg.window_px <= 0:
            return None
        win = max(1, round(self.cfg.window_px / self.stride))
        step = round(self.cfg.window_stride_px / self.stride) if self.cfg.window_stride_px else win // 2
        step = min(win, max(1, step))
        offsets = [(y, x) for y in window_starts(gh, win, step) for x in window_starts(gw, win, step)]
        return ((min(win, gh), min(win, gw)), offsets) if len(offsets) > 1 else None

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, h*stride, w*stride) normalised ViT input of same-size (H, W, 3) uint8 RGB images."""
        shapes = {im.shape for im in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3 or next(iter(shapes))[2] != 3:
            raise ValueError(f'expected (H, W, 3) RGB images of one size, got shapes {sorted(shapes)}')
        gh, gw = self.grid_size(*images[0].shape[:2])
        x = torch.from_numpy(np.stack(images)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        x = F.interpolate(x, size=(gh * self.stride, gw * self.stride), mode='bicubic', align_corners=False,
                          antialias=True).clamp_(0.0, 1.0)
        return ((x - self._mean) / self._std).to(self.dtype)

    def _pos_embed(self, grid: Tuple[int, int]) -> torch.Tensor:
        if grid not in self._pos_cache:
            self._pos_cache = {grid: interpolate_pos_embed(self.visual.positional_embedding,
                                                           self.visual.grid_size, grid)}
        return self._pos_cache[grid]

    def _attn_bias(self, grid: Tuple[int, int]) -> torch.Tensor:
        if grid not in self._bias_cache:
            self._bias_cache = {grid: neighbourhood_bias(*grid).to(self.device, self.dtype)}
        return self._bias_cache[grid]

    def _dense_block(self, blk, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """The training-free last block on (B, N, C) tokens: attention (per dense mode) and out_proj; for 'sclip'
        and 'maskclip' also the block's residual connections and FFN (their official code keeps them)."""
        attn, (B, N, C) = blk.attn, x.shape
        heads = attn.num_heads
        q, k, v = F.linear(blk.ln_1(x), attn.in_proj_weight, attn.in_proj_bias) \
            .view(B, N, 3, heads, C // heads).permute(2, 0, 3, 1, 4)  # each (B, heads, N, C/heads)
        if self.dense_mode == 'maskclip':
            out = v
        elif self.dense_mode == 'sclip':
            out = F.scaled_dot_product_attention(q, q, v) + F.scaled_dot_product_attention(k, k, v)
        elif self.dense_mode == 'clearclip':
            out = F.scaled_dot_product_attention(q, q, v)
        elif self.dense_mode == 'naclip':
            out = F.scaled_dot_product_attention(k, k, v, attn_mask=self._attn_bias(grid))
        else:
            raise ValueError(f'unknown dense mode {self.dense_mode!r}; expected one of {DENSE_MODES}')
        out = attn.out_proj(out.transpose(1, 2).reshape(B, N, C))
        if self.dense_mode in REDUCED_MODES:
            return out
        x = x + blk.ls_1(out) if hasattr(blk, 'ls_1') else x + out
        y = blk.mlp(blk.ln_2(x))
        return x + blk.ls_2(y) if hasattr(blk, 'ls_2') else x + y

    @torch.no_grad()
    def forward_vit(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) L2-normalised float features of a preprocessed (B, 3, H', W') batch in one ViT pass."""
        v = self.visual
        t = v.conv1(x)
        B, C, gh, gw = t.shape
        t = torch.cat([v.class_embedding.to(t.dtype).expand(B, 1, C), t.flatten(2).transpose(1, 2)], dim=1)
        t = v.ln_pre(t + self._pos_embed((gh, gw)).to(t.dtype))
        blocks = v.transformer.resblocks
        batch_first = getattr(v.transformer, 'batch_first', True)
        t = t if batch_first else t.transpose(0, 1)
        for blk in blocks[:-1]:
            t = blk(t)
        t = t if batch_first else t.transpose(0, 1)
        t = self._dense_block(blocks[-1], t, (gh, gw))
        t = v.ln_post(t[:, 1:]) @ v.proj
        return F.normalize(t.float(), dim=-1).reshape(B, gh, gw, -1)

    @torch.no_grad()
    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, D) L2-normalised float features of a preprocessed (B, 3, H', W') batch: one ViT pass, or
        sliding windows (those of all images in one ViT batch) whose overlapping tokens are averaged."""
        B, p = x.shape[0], self.stride
        gh, gw = x.shape[2] // p, x.shape[3] // p
        layout = self.window_layout(gh, gw)
        if layout is None:
            return self._vit(x)
        (wh, ww), offsets = layout
        crops = torch.stack([x[:, :, y * p:(y + wh) * p, c * p:(c + ww) * p] for y, c in offsets], 1)
        f = self._vit(crops.flatten(0, 1)).view(B, len(offsets), wh, ww, -1)
        out = f.new_zeros(B, gh, gw, f.shape[-1])
        for i, (y, c) in enumerate(offsets):
            out[:, y:y + wh, c:c + ww] += f[:, i]
        return F.normalize(out, dim=-1)  # the normalised sum of unit vectors is the normalised mean

    def extract_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, h, w, D) features of same-size (H, W, 3) uint8 RGB images (batched keyframes)."""
        return self.forward_dense(self.preprocess(images))

    def extract(self, rgb: np.ndarray, labels: Optional[np.ndarray] = None) -> torch.Tensor:
        return self.extract_batch([rgb])[0]

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)


__all__ = ['OpenClipDenseExtractor', 'WeightsNotFoundError', 'DENSE_MODES', 'DTYPES', 'REDUCED_MODES', 'check_config',
           'interpolate_pos_embed', 'model_dtype', 'precision_hint', 'precision_warning',
           'neighbourhood_bias', 'weights_space', 'window_starts']
