"""Dense CLIP extractor and offline weight resolution, on a randomly initialised ViT-B-16 (no weights offline)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

open_clip = pytest.importorskip('open_clip')

from ov3d_ros.core.config import FeatureConfig  # noqa: E402
from ov3d_ros.core.features.clip_dense import (DENSE_MODES, OpenClipDenseExtractor, interpolate_pos_embed,  # noqa: E402
                                               neighbourhood_bias)
from ov3d_ros.core.features.weights import WeightsNotFoundError, load_weights, resolve_weights  # noqa: E402


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


def set_mode(ext, monkeypatch, mode):
    monkeypatch.setattr(ext, 'dense_mode', mode)


def test_attributes(ext):
    assert (ext.name, ext.dim, ext.stride, ext.simulated) == ('clip:ViT-B-16:naclip', 512, 16, False)
    assert ext.weights == 'random (pretrained=none)'
    assert ext.device == torch.device('cpu') and ext.visual.conv1.weight.dtype == torch.float32


@pytest.mark.parametrize('short_side, grid', [(64, (4, 5)), (96, (6, 8))])
def test_shape_unit_norm_deterministic(ext, image, monkeypatch, short_side, grid):
    monkeypatch.setattr(ext.cfg, 'image_short_side', short_side)
    assert ext.preprocess([image]).shape == (1, 3, grid[0] * 16, grid[1] * 16)
    f = ext.extract(image)
    assert f.shape == (*grid, 512) and f.dtype == torch.float32 and f.device == ext.device
    assert torch.allclose(f.norm(dim=-1), torch.ones(grid), atol=1e-5)
    assert torch.equal(f, ext.extract(image))


def test_extract_batch_matches_single(ext, image):
    other = np.ascontiguousarray(image[::-1])
    batch = ext.extract_batch([image, other])
    assert batch.shape == (2, 6, 8, 512)
    assert torch.allclose(batch[0], ext.extract(image), atol=1e-5)
    assert torch.allclose(batch[1], ext.extract(other), atol=1e-5)
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


def reference_last_block(blk, x, mode, grid):
    """The dense last block rebuilt from a stock nn.MultiheadAttention whose projections are swapped."""
    attn, C = copy.deepcopy(blk.attn), x.shape[-1]
    w, b = attn.in_proj_weight.data, attn.in_proj_bias.data
    y = blk.ln_1(x)
    if mode == 'maskclip':
        return attn.out_proj(F.linear(y, w[2 * C:], b[2 * C:]))
    src = slice(0, C) if mode == 'clearclip' else slice(C, 2 * C)  # q-q or k-k attention
    w[:2 * C], b[:2 * C] = w[src].repeat(2, 1), b[src].repeat(2)
    mask = neighbourhood_bias(*grid) if mode == 'naclip' else None
    return attn(y, y, y, need_weights=False, attn_mask=mask)[0]


def test_modes_change_only_the_last_block(ext, monkeypatch):
    monkeypatch.setattr(ext.cfg, 'image_short_side', 224)
    img = np.random.default_rng(1).integers(0, 256, (224, 224, 3), dtype=np.uint8)  # native grid 14 x 14
    x = ext.preprocess([img])
    blocks = ext.visual.transformer.resblocks
    captured, mlp_calls = [], []
    hooks = [blocks[-2].register_forward_hook(lambda m, i, o: captured.append(o.clone())),
             blocks[-1].mlp.register_forward_hook(lambda m, i, o: mlp_calls.append(1))]
    try:
        feats = {}
        for mode in DENSE_MODES:
            set_mode(ext, monkeypatch, mode)
            feats[mode] = ext.forward_dense(x)[0]
    finally:
        for h in hooks:
            h.remove()
    assert not mlp_calls  # no FFN in the last block
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
    for a, b in [('naclip', 'clearclip'), ('naclip', 'maskclip'), ('clearclip', 'maskclip')]:
        assert not torch.allclose(feats[a], feats[b], atol=1e-3)


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
