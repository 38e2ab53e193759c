"""Dense CLIP extractor and offline weight resolution, on a randomly initialised ViT-B-16 (no weights offline)."""
import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip('open_clip')

from ov3d_ros.core.config import FeatureConfig  # noqa: E402
from ov3d_ros.core import threads  # noqa: E402
from ov3d_ros.core.features.clip_dense import (DENSE_MODES, REDUCED_MODES, OpenClipDenseExtractor,  # noqa: E402
                                               check_config, interpolate_pos_embed, neighbourhood_bias,
                                               precision_hint, precision_warning, window_starts)
from ov3d_ros.core.features.weights import (OPENAI_EXTRA_KEYS, WeightsNotFoundError, load_weights,  # noqa: E402
                                           openai_provenance, resolve_weights, uses_quick_gelu)


@pytest.fixture(scope='module')
def ext():
    torch.manual_seed(0)
    return OpenClipDenseExtractor(FeatureConfig(model='ViT-B-16', pretrained='none', dense_mode='naclip',
                                                image_short_side=96), 'cpu')


@pytest.fixture(scope='module')
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)
    img[20:60, 30:90] = (200, 40, 40)  # some structure so that attention is not uniform
    return img


def configure(ext, monkeypatch, mode=None, **cfg):
    """Switch the shared extractor's dense mode and config fields for one test (restored afterwards)."""
    if mode is not None:
        monkeypatch.setattr(ext, 'dense_mode', mode)
    for key, value in cfg.items():
        monkeypatch.setattr(ext.cfg, key, value)


def test_attributes(ext):
    assert (ext.name, ext.dim, ext.stride, ext.simulated) == ('clip:ViT-B-16:naclip', 512, 16, False)
    assert ext.weights == 'random (pretrained=none)'
    assert ext.device == torch.device('cpu') and ext.visual.conv1.weight.dtype == torch.float32


def test_check_config():
    check_config(FeatureConfig(dense_mode='sclip', window_px=224, window_stride_px=112))
    for bad in ({'dense_mode': 'nope'}, {'window_px': -1}, {'window_stride_px': -16}, {'image_short_side': 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            check_config(FeatureConfig(**bad))
    with pytest.raises(ValueError, match='dense_mode'):
        OpenClipDenseExtractor(FeatureConfig(pretrained='none', dense_mode='sclip2'))


def test_reconfigure(ext, image, monkeypatch):
    cfg = ext.cfg
    monkeypatch.setattr(ext, 'cfg', cfg)  # restored with dense_mode after the test
    monkeypatch.setattr(ext, 'dense_mode', ext.dense_mode)
    before = ext.extract(image)
    ext.reconfigure(dataclasses.replace(cfg, dense_mode='sclip', image_short_side=64))
    assert ext.name == 'clip:ViT-B-16:sclip' and ext.extract(image).shape == (4, 5, 512)
    ext.reconfigure(cfg)
    assert ext.name == 'clip:ViT-B-16:naclip' and torch.equal(ext.extract(image), before)
    for bad in ({'model': 'ViT-B-32'}, {'pretrained': 'openai'}, {'window_px': -1}):
        with pytest.raises(ValueError):
            ext.reconfigure(dataclasses.replace(cfg, **bad))
    assert ext.cfg is cfg


def test_with_settings_shares_the_vit_and_leaves_the_source_as_it_was(ext, image, monkeypatch):
    """with_settings: another extractor on the same ViT (no copy) whose features are those of the source
    reconfigured to the same settings; the source keeps its own, and the same refusals apply."""
    before = ext.extract(image)
    settings = dataclasses.replace(ext.cfg, dense_mode='sclip', image_short_side=64)
    other = ext.with_settings(settings)
    assert other.model is ext.model and other.visual is ext.visual and other.cfg is not settings
    assert (other.name, ext.name) == ('clip:ViT-B-16:sclip', 'clip:ViT-B-16:naclip')
    assert torch.equal(ext.extract(image), before)              # the source: its own mode and size
    own = ext.cfg
    monkeypatch.setattr(ext, 'cfg', own)                        # restored with dense_mode after the test
    monkeypatch.setattr(ext, 'dense_mode', ext.dense_mode)
    ext.reconfigure(settings)
    reference = ext.extract(image)
    ext.reconfigure(own)
    assert other.extract(image).shape == (4, 5, 512) and torch.equal(other.extract(image), reference)
    compiled = ext.with_settings(dataclasses.replace(ext.cfg, compile=True))
    assert compiled._vit is not compiled.forward_vit and ext._vit == ext.forward_vit
    assert torch.allclose(compiled.extract(image), before, atol=1e-5)
    for bad in ({'model': 'ViT-B-32'}, {'dtype': 'bfloat16'}, {'window_px': -1}):
        with pytest.raises(ValueError):
            ext.with_settings(dataclasses.replace(ext.cfg, **bad))


def test_the_feature_space_follows_the_weights_not_the_dense_mode_or_precision(ext, image, tmp_path):
    """A map's feature space is the model and its weights: a map made in one dense mode loads into a mapper of the
    same weights in another mode and precision; a mapper of other weights (another random init here) refuses it."""
    from ov3d_ros.core.camera import PinholeCamera
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.map_io import MapFileError
    from ov3d_ros.core.mapper import Frame, Mapper
    torch.manual_seed(0)                                        # the fixture's weights, again, in bfloat16
    same = OpenClipDenseExtractor(dataclasses.replace(ext.cfg, dense_mode='sclip', dtype='bfloat16'), 'cpu')
    torch.manual_seed(1)
    other = OpenClipDenseExtractor(ext.cfg, 'cpu')
    assert same.space == ext.space != other.space and ext.space.startswith('clip:ViT-B-16:')
    assert ext.with_settings(dataclasses.replace(ext.cfg, dense_mode='maskclip')).space == ext.space
    cfg = MapperConfig()
    cfg.map.device, cfg.purify.enabled = 'cpu', False
    made = Mapper(cfg, ext)
    made.integrate(Frame(image, np.full(image.shape[:2], 2.0, np.float32),
                         PinholeCamera(100.0, 100.0, 63.5, 47.5, 128, 96), np.eye(4)))
    made.save(tmp_path / 'a.ov3dmap')
    loaded = Mapper(cfg, same)
    loaded.load(tmp_path / 'a.ov3dmap')
    assert loaded.map.size == made.map.size > 0
    with pytest.raises(MapFileError, match=f'made with clip:ViT-B-16:naclip .*{ext.space}.*{other.space}; its '
                                           'weights are random'):
        Mapper(cfg, other).load(tmp_path / 'a.ov3dmap')


def test_compiled_vit_gives_the_eager_features(ext, image, monkeypatch):
    """features.compile runs the same ViT through torch.compile; switching it off by reconfigure goes back to
    the eager forward."""
    cfg = ext.cfg
    monkeypatch.setattr(ext, 'cfg', cfg)
    monkeypatch.setattr(ext, '_vit', ext._vit)
    eager = ext.extract(image)
    ext.reconfigure(dataclasses.replace(cfg, compile=True))
    assert ext._vit is not ext.forward_vit
    compiled = ext.extract(image)
    assert compiled.shape == eager.shape and torch.allclose(compiled, eager, atol=1e-5)
    assert not torch.allclose(compiled, ext.extract(image[:, ::-1].copy()), atol=1e-3)   # not a cached answer
    ext.reconfigure(cfg)
    assert ext._vit == ext.forward_vit and torch.equal(ext.extract(image), eager)


@pytest.mark.parametrize('mode', DENSE_MODES)
@pytest.mark.parametrize('short_side, grid', [(64, (4, 5)), (96, (6, 8))])
def test_shape_unit_norm_deterministic(ext, image, monkeypatch, mode, short_side, grid):
    configure(ext, monkeypatch, mode, image_short_side=short_side)
    assert ext.preprocess([image]).shape == (1, 3, grid[0] * 16, grid[1] * 16)  # stride 16 grid over the image
    f = ext.extract(image)
    assert f.shape == (*grid, 512) and f.dtype == torch.float32 and f.device == ext.device
    assert torch.allclose(f.norm(dim=-1), torch.ones(grid), atol=1e-5)
    assert torch.equal(f, ext.extract(image))


@pytest.mark.parametrize('mode', DENSE_MODES)
@pytest.mark.parametrize('window_px', [0, 64])
def test_extract_batch_matches_single(ext, image, monkeypatch, mode, window_px):
    configure(ext, monkeypatch, mode, window_px=window_px)
    others = [np.ascontiguousarray(image[::-1]), np.ascontiguousarray(image[:, ::-1])]
    batch = ext.extract_batch([image, *others])
    assert batch.shape == (3, 6, 8, 512)
    for b, img in zip(batch, [image, *others]):
        assert torch.allclose(b, ext.extract(img), atol=1e-5)
    assert not torch.allclose(batch[0], batch[1], atol=1e-3)
    with pytest.raises(ValueError):
        ext.extract_batch([image, image[:64]])


def test_pos_embed_interpolation(ext):
    pos = ext.visual.positional_embedding
    assert torch.allclose(interpolate_pos_embed(pos, (14, 14), (14, 14)), pos, atol=1e-6)
    big = interpolate_pos_embed(pos, (14, 14), (6, 8))
    assert big.shape == (1 + 48, 768) and torch.equal(big[0], pos[0])


def test_neighbourhood_bias():
    b = neighbourhood_bias(3, 4, std=5.0)
    assert b.shape == (13, 13) and b[0].abs().sum() == 0 and b[:, 0].abs().sum() == 0
    yx = np.stack(np.meshgrid(np.arange(3), np.arange(4), indexing='ij'), -1).reshape(-1, 2)
    d2 = ((yx[:, None] - yx[None]) ** 2).sum(-1)
    assert np.allclose(b[1:, 1:].numpy(), np.exp(-d2 / 50.0), atol=1e-6)


def with_residual_and_ffn(blk, x, out, mode):
    """SCLIP's and MaskCLIP's official code keep the last block's residual and FFN: h = x + o, h + mlp(ln_2 h)."""
    if mode in ('naclip', 'clearclip'):
        return out
    h = x + out
    return h + blk.mlp(blk.ln_2(h))


def formula_last_block(blk, x, mode, grid):
    """Each mode's last block written out per head: out_proj(A v) with A from the papers' formulas, plus the
    residual and FFN where the official code keeps them."""
    C, heads = x.shape[-1], blk.attn.num_heads
    y, w, b = blk.ln_1(x[0]), blk.attn.in_proj_weight, blk.attn.in_proj_bias
    q, k, v = [(y @ w[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C]).view(-1, heads, C // heads).transpose(0, 1)
               for i in range(3)]  # each (heads, N, C/heads)

    def softmax_sim(a, bias=0.0):
        return torch.softmax(a @ a.transpose(1, 2) / (C // heads) ** 0.5 + bias, dim=-1)

    attn = {'maskclip': lambda: torch.eye(len(y)), 'clearclip': lambda: softmax_sim(q),
            'naclip': lambda: softmax_sim(k, neighbourhood_bias(*grid)),
            'sclip': lambda: softmax_sim(q) + softmax_sim(k)}[mode]()
    return with_residual_and_ffn(blk, x, blk.attn.out_proj((attn @ v).transpose(0, 1).reshape(len(y), C))[None], mode)


@pytest.mark.parametrize('mode', DENSE_MODES)
def test_last_block_formula_on_tiny_input(ext, monkeypatch, mode):
    configure(ext, monkeypatch, mode)
    x = torch.randn(1, 1 + 2 * 3, 768, generator=torch.Generator().manual_seed(2))  # class token + 2 x 3 grid
    blk = ext.visual.transformer.resblocks[-1]
    with torch.no_grad():
        assert torch.allclose(ext._dense_block(blk, x, (2, 3)), formula_last_block(blk, x, mode, (2, 3)), atol=1e-5)


def reference_last_block(blk, x, mode, grid):
    """The dense last block rebuilt from stock nn.MultiheadAttention modules whose projections are swapped."""
    C = x.shape[-1]
    y = blk.ln_1(x)
    if mode == 'maskclip':   # MaskCLIP's vit.py: out_proj(v) + x, then + ffn(norm2(.))
        w, b = blk.attn.in_proj_weight, blk.attn.in_proj_bias
        return with_residual_and_ffn(blk, x, blk.attn.out_proj(F.linear(y, w[2 * C:], b[2 * C:])), mode)

    def attention(src, mask=None):  # src: q-q (0) or k-k (1) attention
        attn = copy.deepcopy(blk.attn)
        w, b = attn.in_proj_weight.data, attn.in_proj_bias.data
        w[:2 * C], b[:2 * C] = w[src * C:(src + 1) * C].repeat(2, 1), b[src * C:(src + 1) * C].repeat(2)
        return attn(y, y, y, need_weights=False, attn_mask=mask)[0]

    if mode == 'sclip':  # out_proj(A_q v + A_k v): the two attention outputs less one out_proj bias
        return with_residual_and_ffn(blk, x, attention(0) + attention(1) - blk.attn.out_proj.bias, mode)
    return attention(0) if mode == 'clearclip' else attention(1, neighbourhood_bias(*grid))


def test_modes_change_only_the_last_block(ext, monkeypatch):
    configure(ext, monkeypatch, image_short_side=224)
    img = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)  # native grid 14 x 14
    x = ext.preprocess([img])
    blocks = ext.visual.transformer.resblocks
    captured, mlp_calls = [], {}
    hooks = [blocks[-2].register_forward_hook(lambda m, i, o: captured.append(o.clone()))]
    try:
        feats = {}
        for mode in DENSE_MODES:
            configure(ext, monkeypatch, mode)
            h = blocks[-1].mlp.register_forward_hook(lambda m, i, o, mode=mode: mlp_calls.update({mode: 1}))
            feats[mode] = ext.forward_dense(x)[0]
            h.remove()
    finally:
        for h in hooks:
            h.remove()
    # the last block's FFN runs for SCLIP and MaskCLIP only (NACLIP and ClearCLIP drop it)
    assert set(mlp_calls) == set(DENSE_MODES) - set(REDUCED_MODES) and len(captured) == len(DENSE_MODES)
    # blocks 0..n-2: identical across modes and equal to the stock open_clip model's intermediate
    assert all(torch.equal(c, captured[0]) for c in captured)
    with torch.no_grad():
        out = ext.visual.forward_intermediates(x, indices=[len(blocks) - 2], output_fmt='NLC', intermediates_only=True,
                                               output_extra_tokens=True)
    stock = torch.cat([out['image_intermediates_prefix'][0], out['image_intermediates'][0]], dim=1)
    assert torch.allclose(captured[0], stock, atol=1e-4)
    # the last block of each mode matches an independent rebuild, and the modes differ from one another
    for mode, f in feats.items():
        with torch.no_grad():
            ref = ext.visual.ln_post(reference_last_block(blocks[-1], captured[0], mode, (14, 14))[:, 1:])
            ref = F.normalize(ref @ ext.visual.proj, dim=-1).reshape(14, 14, 512)
        assert torch.allclose(f, ref, atol=1e-4), mode
    for i, a in enumerate(DENSE_MODES):
        for b in DENSE_MODES[i + 1:]:
            assert not torch.allclose(feats[a], feats[b], atol=1e-3), (a, b)


def test_window_starts():
    assert window_starts(8, 4, 2) == [0, 2, 4]
    assert window_starts(7, 4, 2) == [0, 2, 3]  # the last window flush with the end
    assert window_starts(8, 6, 4) == [0, 2]
    assert window_starts(6, 6, 3) == [0] and window_starts(5, 8, 2) == [0]  # one window covers the axis


@pytest.mark.parametrize('window_px, stride_px, layout', [
    (0, 0, None),
    (64, 0, ((4, 4), [(0, 0), (0, 2), (0, 4), (2, 0), (2, 2), (2, 4)])),  # default step: half a window
    (70, 50, ((4, 4), [(0, 0), (0, 3), (0, 4), (2, 0), (2, 3), (2, 4)])),  # rounded to whole patches
    (96, 0, ((6, 6), [(0, 0), (0, 2)])),  # as tall as the image
    (32, 500, ((2, 2), [(y, x) for y in (0, 2, 4) for x in (0, 2, 4, 6)])),  # step at most a window
    (448, 0, None),  # larger than the image: whole image
])
def test_window_layout(ext, monkeypatch, window_px, stride_px, layout):
    configure(ext, monkeypatch, window_px=window_px, window_stride_px=stride_px)
    assert ext.window_layout(6, 8) == layout


@pytest.mark.parametrize('mode', ['naclip', 'sclip'])
def test_windows_stitched_and_averaged(ext, image, monkeypatch, mode):
    configure(ext, monkeypatch, mode, window_stride_px=32)
    whole = ext.extract(image)
    monkeypatch.setattr(ext.cfg, 'window_px', 64)
    f = ext.extract(image)
    assert f.shape == whole.shape == (6, 8, 512)  # the whole-image grid and stride
    assert torch.allclose(f.norm(dim=-1), torch.ones(6, 8), atol=1e-5)
    assert not torch.allclose(f, whole, atol=1e-3)
    # by construction: each 4 x 4 window (64 px) through the ViT alone, tokens averaged where windows overlap
    x, total, count = ext.preprocess([image]), torch.zeros(6, 8, 512), torch.zeros(6, 8, 1)
    for y in (0, 2):
        for c in (0, 2, 4):
            total[y:y + 4, c:c + 4] += ext.forward_vit(x[:, :, 16 * y:16 * (y + 4), 16 * c:16 * (c + 4)])[0]
            count[y:y + 4, c:c + 4] += 1
    assert count.min() == 1 and count.max() == 4
    assert torch.allclose(f, F.normalize(total / count, dim=-1), atol=1e-5)


def test_window_covering_the_image_is_whole_image_inference(ext, image, monkeypatch):
    square = np.ascontiguousarray(image[:, :96])
    whole = {'square': ext.extract(square), 'image': ext.extract(image)}
    configure(ext, monkeypatch, window_px=96)
    assert torch.equal(ext.extract(square), whole['square'])
    configure(ext, monkeypatch, window_px=448)  # larger than the image: clipped to it
    assert torch.equal(ext.extract(image), whole['image'])


def test_a_half_precision_the_cpu_only_emulates_is_warned_about(monkeypatch):
    """bfloat16 or float16 on a CPU whose oneDNN reports no native kernels for it gets a warning that names the
    precision and the way out; float32, 'auto' on the CPU, a CPU with the kernels, and CUDA get none."""
    monkeypatch.setattr(threads, 'native_half', lambda dtype: False)
    for name in ('bfloat16', 'float16'):
        text = precision_warning(name, 'cpu')
        assert f'no native {name} matrix kernels' in text and "features.dtype 'auto'" in text
        assert precision_warning(name, 'cuda') == ''
    assert precision_warning('float32', 'cpu') == '' and precision_warning('auto', 'cpu') == ''
    monkeypatch.setattr(threads, 'native_half', lambda dtype: True)
    assert precision_warning('bfloat16', 'cpu') == ''


def test_a_float32_vit_on_a_cpu_with_native_bf16_kernels_gets_a_hint(monkeypatch):
    """'auto' or float32 on a CPU whose oneDNN reports native bf16 kernels gets a hint naming bfloat16 and how to
    check its quality; without those kernels, with a half precision already, and on CUDA there is none."""
    monkeypatch.setattr(threads, 'native_half', lambda dtype: dtype == torch.bfloat16)
    for name in ('auto', 'float32'):
        text = precision_hint(name, 'cpu')
        assert f"features.dtype {name!r} runs the ViT in float32" in text
        assert "features.dtype 'bfloat16'" in text and '--dtypes float32 bfloat16' in text
        assert precision_hint(name, 'cuda') == ''
    assert precision_hint('bfloat16', 'cpu') == '' and precision_hint('float16', 'cpu') == ''
    monkeypatch.setattr(threads, 'native_half', lambda dtype: False)
    assert precision_hint('auto', 'cpu') == '' and precision_hint('float32', 'cpu') == ''


def test_bf16_on_cpu_matches_fp32(ext, image, monkeypatch):
    """features.dtype bfloat16 casts the ViT once at load; features and text embeddings stay float32 and unit
    norm, and agree with the float32 model's (random weights: cosine >= 0.999 per token); another precision is
    refused by reconfigure and by the config check. The extractor carries the warning of a CPU without bf16
    kernels."""
    monkeypatch.setattr(threads, 'native_half', lambda dtype: False)
    low = OpenClipDenseExtractor(dataclasses.replace(ext.cfg, dtype='bfloat16'), 'cpu')
    assert 'bfloat16' in low.precision_warning and ext.precision_warning == ''
    low.model.load_state_dict(ext.model.state_dict())
    assert low.dtype == torch.bfloat16 and low.visual.conv1.weight.dtype == torch.bfloat16
    f = low.extract_batch([image, image[:, ::-1].copy()])
    assert f.dtype == torch.float32 and f.shape == (2, 6, 8, 512)
    assert torch.allclose(f.norm(dim=-1), torch.ones(2, 6, 8), atol=1e-5)
    assert (f[0] * ext.extract(image)).sum(-1).min() > 0.999
    assert (f[0] * f[1]).sum(-1).min() < 0.999                  # a different image gives different features
    t = low.encode_text(['a chair', 'a table'])
    assert t.dtype == torch.float32 and ((t * ext.encode_text(['a chair', 'a table'])).sum(-1) > 0.999).all()
    for other in ('float32', 'auto'):      # auto is float32 on the CPU
        with pytest.raises(ValueError, match='features.dtype'):
            low.reconfigure(dataclasses.replace(low.cfg, dtype=other))
    low.reconfigure(dataclasses.replace(low.cfg, dense_mode='sclip'))
    assert low.dtype == torch.bfloat16 and low.dense_mode == 'sclip'
    with pytest.raises(ValueError, match='features.dtype'):
        check_config(dataclasses.replace(ext.cfg, dtype='fp16'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_fp16_on_cuda_matches_cpu(ext, image):
    gpu = OpenClipDenseExtractor(copy.deepcopy(ext.cfg), 'cuda')
    gpu.model.load_state_dict(ext.model.state_dict())
    assert gpu.visual.conv1.weight.dtype == torch.float16
    f = gpu.extract_batch([image, image])
    assert f.dtype == torch.float32 and f.shape == (2, 6, 8, 512)
    assert (f[0].cpu() * ext.extract(image)).sum(-1).min() > 0.99


def test_encode_text(ext):
    t = ext.encode_text(['a chair', 'a table', 'a photo of a lamp.'])
    assert t.shape == (3, 512) and t.dtype == torch.float32
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(t[:1], ext.encode_text(['a chair']), atol=1e-5)


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    for var, sub in [('HOME', 'home'), ('HF_HOME', 'hf')]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv('HF_HUB_CACHE', raising=False)
    return tmp_path


def test_resolve_random_and_errors(offline_home):
    for tag in ('', 'none', 'None', 'random'):
        assert resolve_weights('ViT-B-16', tag, '') is None
    cache = offline_home / 'cache'
    with pytest.raises(WeightsNotFoundError) as e:
        resolve_weights('ViT-B-16', 'openai', str(cache))
    msg = str(e.value)
    for part in (str(cache / 'ViT-B-16.pt'), str(offline_home / 'home/.cache/clip/ViT-B-16.pt'),
                 'models--timm--vit_base_patch16_clip_224.openai', 'features.pretrained', 'features.source: simulated'):
        assert part in msg
    with pytest.raises(WeightsNotFoundError, match='known tags'):
        resolve_weights('ViT-B-16', 'no_such_tag', '')
    with pytest.raises(WeightsNotFoundError, match='does not exist'):
        resolve_weights('ViT-B-16', str(offline_home / 'missing.pt'), '')


def test_resolve_tag_from_local_caches(offline_home):
    cache = offline_home / 'cache'
    url_file = offline_home / 'home/.cache/clip/ViT-B-16.pt'  # open_clip's default URL cache
    url_file.parent.mkdir(parents=True)
    url_file.write_bytes(b'')
    assert resolve_weights('ViT-B-16', 'openai', str(cache)) == str(url_file)
    snap = cache / 'models--laion--CLIP-ViT-B-16-laion2B-s34B-b88K' / 'snapshots' / 'abc123'  # HF hub layout
    snap.mkdir(parents=True)
    (snap / 'open_clip_model.safetensors').write_bytes(b'')
    assert resolve_weights('ViT-B-16', 'laion2b_s34b_b88k', str(cache)) == str(snap / 'open_clip_model.safetensors')


def test_state_dict_round_trip(ext, image, tmp_path):
    path = tmp_path / 'ckpt.pt'
    torch.save(ext.model.state_dict(), path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    cfg = FeatureConfig(model='ViT-B-16', pretrained=str(path), dense_mode=ext.dense_mode, image_short_side=96)
    ext2 = OpenClipDenseExtractor(cfg, 'cpu')
    assert ext2.weights == str(path)
    assert torch.equal(ext2.extract(image), ext.extract(image))
    # a checkpoint trained at another image size gets its positional embedding resized on load
    sd = ext.model.state_dict()
    sd['visual.positional_embedding'] = interpolate_pos_embed(sd['visual.positional_embedding'], (14, 14), (10, 10))
    torch.save(sd, tmp_path / 'small.pt')
    load_weights(ext2.model, 'ViT-B-16', str(tmp_path / 'small.pt'), '')
    assert ext2.visual.positional_embedding.shape == (197, 768)
    torch.save({'not_a_clip_key': torch.zeros(1)}, tmp_path / 'bad.pt')
    with pytest.raises(WeightsNotFoundError, match='cannot load'):
        load_weights(ext2.model, 'ViT-B-16', str(tmp_path / 'bad.pt'), '')


def test_quick_gelu_detection_for_plain_state_dicts(ext, image, tmp_path):
    """A plain (non-TorchScript) state dict of OpenAI weights must build the QuickGELU model; open_clip's own state
    dicts keep GELU. The weights are a pretrained=None model's, saved in each layout (no download)."""
    from open_clip.transformer import QuickGELU
    sd = ext.model.state_dict()
    plain = tmp_path / 'plain.pt'
    torch.save(sd, plain)
    assert not uses_quick_gelu('ViT-B-16', str(plain)) and openai_provenance(str(plain)) is None
    openai_sd = dict(sd, input_resolution=torch.tensor(224), context_length=torch.tensor(77),
                     vocab_size=torch.tensor(49408))            # the entries OpenAI's released state dicts carry
    assert set(OPENAI_EXTRA_KEYS) <= set(openai_sd)
    torch.save(openai_sd, tmp_path / 'ViT-B-16.pt')
    torch.save({'state_dict': {'module.' + k: v for k, v in openai_sd.items()}}, tmp_path / 'wrapped.pt')
    hub = tmp_path / 'models--timm--vit_base_patch16_clip_224.openai' / 'snapshots' / 'abc'
    hub.mkdir(parents=True)
    torch.save(sd, hub / 'open_clip_pytorch_model.bin')         # open_clip layout, OpenAI provenance by name
    side = tmp_path / 'side'
    side.mkdir()
    torch.save(sd, side / 'weights.bin')
    (side / 'open_clip_config.json').write_text('{"model_cfg": {"embed_dim": 512, "quick_gelu": true}}')
    for p in (tmp_path / 'ViT-B-16.pt', tmp_path / 'wrapped.pt', hub / 'open_clip_pytorch_model.bin',
              side / 'weights.bin'):
        assert uses_quick_gelu('ViT-B-16', str(p)), p
    assert uses_quick_gelu('ViT-B-16', 'openai') and not uses_quick_gelu('ViT-B-16', 'laion2b_s34b_b88k')
    assert not uses_quick_gelu('ViT-B-16', 'none')
    # the extractor builds QuickGELU for the OpenAI state dict and loads it (extra entries dropped)
    cfg = FeatureConfig(model='ViT-B-16', pretrained=str(tmp_path / 'ViT-B-16.pt'), dense_mode=ext.dense_mode,
                        image_short_side=96)
    q = OpenClipDenseExtractor(cfg, 'cpu')
    assert q.quick_gelu and isinstance(q.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not ext.quick_gelu and not isinstance(ext.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    for name, t in ext.model.state_dict().items():
        assert torch.equal(q.model.state_dict()[name], t), name
    assert not torch.allclose(q.extract(image), ext.extract(image), atol=1e-3)   # the activation matters
