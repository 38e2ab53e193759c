import math

import numpy as np
import pytest
import torch

from ov3d_ros.core.config import KeyframeConfig, MapperConfig, update_from_dict
from ov3d_ros.core.keyframes import KeyframeSelector
from ov3d_ros.core import query, threads
from ov3d_ros.core.query import float_blocks, relevancy_scores, row_norms, select, text_products
from ov3d_ros.core.text import encode_prompts


def test_relevancy_prefers_query_and_zeroes_negative_winners():
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
    q = torch.tensor([1.0, 0.0])
    negs = torch.tensor([[0.0, 1.0]])
    s = relevancy_scores(feats, q, negs, temperature=0.1)
    assert s[0] == pytest.approx(1 / (1 + math.exp(-10)), rel=1e-5)
    assert s[1] == 0.0
    assert 0.5 < s[2] < s[0]
    res = select(s, torch.tensor([1.0, 1.0, 0.5]), threshold=0.5, min_weight=1.0)
    assert res.rows.tolist() == [0]


def test_relevancy_without_negatives_is_one():
    s = relevancy_scores(torch.randn(5, 4), torch.tensor([1.0, 0, 0, 0]), torch.empty(0, 4), 0.05)
    assert s.tolist() == [1.0] * 5


def test_row_norms_through_a_block_buffer_equal_the_norms_of_a_float_copy():
    g = torch.Generator().manual_seed(0)
    feats = (torch.randn(2500, 48, generator=g) * torch.rand(2500, 1, generator=g) * 30).half()
    ref = torch.linalg.vector_norm(feats.float(), dim=1)
    for block in (1, 7, 1024, 2500, 4096):             # several blocks, a ragged last one, one block
        n = row_norms(feats, block)
        assert n.dtype == torch.float32 and torch.equal(n, ref)
    assert torch.equal(row_norms(feats.float()), ref)
    assert row_norms(torch.empty(0, 48, dtype=torch.float16)).shape == (0,)
    assert row_norms(torch.empty(0, 48, dtype=torch.float16), block=1).shape == (0,)


def test_float_blocks_cover_every_row_in_order_as_float32():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(2500, 48, generator=g).half()
    for source in (feats, feats.float()):
        for block in (1, 7, 1024, 4096):
            starts, parts = [], []
            for start, x in float_blocks(source, block):
                assert x.dtype == torch.float32 and len(x) == min(block, len(source) - start)
                starts.append(start)
                parts.append(x.clone())                   # a block is valid until the next is taken
            assert starts == list(range(0, 2500, block)) and torch.equal(torch.cat(parts), feats.float())
    assert list(float_blocks(torch.empty(0, 48, dtype=torch.float16))) == []


@pytest.mark.parametrize('native', [True, False])
def test_text_products_in_the_features_dtype_or_in_float32_blocks(native, monkeypatch):
    """Where the CPU multiplies fp16 natively, one fp16 matmul; where it emulates it, float32 blocks (several, a
    ragged last one) multiplied as texts x block^T: the products of the float32 values either way."""
    monkeypatch.setattr(threads, 'native_half', lambda dtype: native)
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(2500, 48, generator=g).half()
    texts = torch.nn.functional.normalize(torch.randn(5, 48, generator=g), dim=1)
    out = text_products(feats, texts)
    ref = feats.float() @ texts.T
    assert out.shape == (2500, 5) and out.dtype == torch.float32
    assert (out - ref).abs().max() < (2e-2 if native else 1e-4)
    if not native:                                   # float32 products: each the same as one row's product
        assert torch.allclose(out[1234], feats[1234].float() @ texts.T, atol=1e-5)
    assert torch.equal(text_products(feats.float(), texts), feats.float() @ texts.T)


def test_text_products_in_float32_blocks_are_the_same_on_one_and_on_two_threads(monkeypatch):
    """Two intra-op threads share the blocks out as one run of rows each (threads.split_rows): the values are
    those of one thread, bit for bit."""
    monkeypatch.setattr(threads, 'native_half', lambda dtype: False)
    g = torch.Generator().manual_seed(3)
    feats = torch.randn(5000, 384, generator=g).half()
    texts = torch.nn.functional.normalize(torch.randn(5, 384, generator=g), dim=1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = text_products(feats, texts)
        torch.set_num_threads(2)
        calls = []
        real = threads.split_rows
        monkeypatch.setattr(query, 'split_rows', lambda fn, n, block: calls.append(n) or real(fn, n, block))
        two = text_products(feats, texts)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert calls == [5000] and torch.equal(one, two)
    assert (one - feats.float() @ texts.T).abs().max() < 1e-4


@pytest.mark.parametrize('native', [True, False])
def test_relevancy_in_fp16_with_given_norms_matches_the_softmax_reference(native, monkeypatch):
    monkeypatch.setattr(threads, 'native_half', lambda dtype: native)
    g = torch.Generator().manual_seed(0)
    feats = (torch.randn(3000, 32, generator=g) * torch.rand(3000, 1, generator=g)).half()
    texts = torch.nn.functional.normalize(torch.randn(4, 32, generator=g), dim=1)
    ref_p = torch.softmax(torch.nn.functional.normalize(feats.float(), dim=1) @ texts.T / 0.05, dim=1)
    ref = torch.where(ref_p.argmax(dim=1) == 0, ref_p[:, 0], torch.zeros(3000))
    norms = feats.float().norm(dim=1)
    for n in (None, norms):
        s = relevancy_scores(feats, texts[0], texts[1:], 0.05, n, chunk=1000)
        assert s.dtype == torch.float32
        assert torch.allclose(s, ref, atol=2e-2)
        assert ((s > 0) == (ref > 0)).float().mean() > 0.995       # fp16 products may flip exact near-ties


def test_prompt_ensemble_averages_templates():
    table = {'a x': [1.0, 0.0], 'the x': [0.0, 1.0]}

    def enc(texts):
        return torch.tensor([table[t] for t in texts])

    out = encode_prompts(enc, ['x'], ['a {}', 'the {}'])
    assert out[0].tolist() == pytest.approx([math.sqrt(0.5)] * 2)


def rot_z(deg):
    a = math.radians(deg)
    T = np.eye(4)
    T[:2, :2] = [[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]]
    return T


def test_keyframe_rules():
    sel = KeyframeSelector(KeyframeConfig(min_translation_m=0.1, min_rotation_deg=10, max_interval_s=2.0,
                                          min_interval_s=0.2))
    T0 = np.eye(4)
    assert sel.check(T0, 0.0)
    sel.accept(T0, 0.0)
    assert not sel.check(T0, 1.0)                    # no motion, not enough time
    T1 = T0.copy()
    T1[0, 3] = 0.15
    assert not sel.check(T1, 0.1)                    # moved, but faster than min_interval_s
    assert sel.check(T1, 0.5)                        # moved
    assert sel.check(rot_z(12), 0.5)                 # turned
    assert not sel.check(rot_z(5), 0.5)
    assert sel.check(T0, 2.5)                        # waited


def test_config_update_validates_keys_and_types():
    cfg = update_from_dict(MapperConfig(), {'map': {'voxel_size_m': 1}, 'query': {'default_negatives': ['a']}})
    assert cfg.map.voxel_size_m == 1.0 and isinstance(cfg.map.voxel_size_m, float)
    with pytest.raises(ValueError, match='map.nope'):
        update_from_dict(MapperConfig(), {'map': {'nope': 1}})
    with pytest.raises(ValueError, match='voxel_size_m'):
        update_from_dict(MapperConfig(), {'map': {'voxel_size_m': 'big'}})


def test_thin_out_keeps_the_waiting_keyframes_spread_along_the_path():
    """Keyframes waiting beyond max_pending_keyframes: the one whose neighbours are closest along the path goes."""
    import collections
    from ov3d_ros.core.keyframes import thin_out
    from ov3d_ros.core.mapper import Frame

    def at(x, yaw_deg=0.0):
        T = np.eye(4)
        c, s = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
        T[:2, :2] = [[c, -s], [s, c]]
        T[0, 3] = x
        return Frame(None, None, None, T, stamp_s=x + yaw_deg)
    rule = KeyframeConfig(min_translation_m=0.1, min_rotation_deg=10.0)
    pending = collections.deque([at(0.0), at(1.0)])
    assert thin_out(pending, rule).stamp_s == 0.0 and len(pending) == 1          # fewer than 3: the oldest
    # gaps in units of the rule (0.1 m, 10 degrees): dropping the 1.0 m frame leaves 1.1 m and 30 degrees between
    # its neighbours (14), dropping the turned 1.1 m frame leaves 0.2 m (2), dropping 1.2 m leaves 3.9 m (42)
    pending = collections.deque([at(0.0), at(1.0), at(1.1, 30.0), at(1.2), at(5.0)])
    assert thin_out(pending, rule).stamp_s == 31.1
    assert [f.stamp_s for f in pending] == [0.0, 1.0, 1.2, 5.0]
    assert thin_out(pending, rule).stamp_s == 1.0 and [f.stamp_s for f in pending] == [0.0, 1.2, 5.0]
