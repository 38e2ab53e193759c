"""Mapper.snapshot(): a read-only copy of the map that answers like the live mapper did when it was taken, and that
later integration, eviction, compaction, loads, clears and vocabulary changes leave as it was."""
import dataclasses
import threading

import numpy as np
import pytest
import torch

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Frame, Mapper
from ov3d_ros.core.query import row_norms
from ov3d_ros.core.text import TextEmbeddings

NAMES = ['unlabeled', 'wall', 'chair', 'plant']
VOCABULARY = ['wall', 'chair', 'plant']
TEXTS = [('chair', None, 0.0), ('plant', ['wall', 'chair'], 0.0), ('a red wall', ['floor'], 0.3),
         ('sofa', None, 0.0), ('Chair', None, 0.0)]    # 'Chair' names a vocabulary class: the label volume answers


def wall_frame(dx_m: float = 0.0, stamp_s: float = 0.0) -> Frame:
    """A wall 2 m in front of the camera (moved ``dx_m`` sideways): chair lower left, plant lower right."""
    cam = PinholeCamera(40.0, 40.0, 31.5, 23.5, 64, 48)
    depth = np.full((48, 64), 2.0, np.float32)
    depth[30:, 10:20] = 1.6                           # a step, so normals and neighbourhoods vary
    labels = np.full((48, 64), 1, np.uint16)
    labels[16:, :32] = 2
    labels[16:, 32:] = 3
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[16:, :32, 1] = 90
    T = np.eye(4)
    T[0, 3] = dx_m
    return Frame(rgb, depth, cam, T, stamp_s, labels)


def make_mapper(purify: bool = False, compress_dim: int = 0, vocabulary=VOCABULARY, **purify_cfg) -> Mapper:
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.pixel_stride, cfg.map.compress_dim = 0.1, 1, compress_dim
    cfg.labels.vocabulary, cfg.labels.min_component_vox = list(vocabulary), 3
    cfg.purify.enabled = purify
    cfg.purify.affinity, cfg.purify.iterations = 'fallback', 3
    for k, v in purify_cfg.items():
        setattr(cfg.purify, k, v)
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    m.integrate(wall_frame(), force=True)
    m.integrate(wall_frame(0.35, 1.0), force=True)
    return m


def answers(reader) -> list:
    """Everything a reader (Mapper or MapSnapshot) answers, as numpy arrays."""
    out = []
    for text, negatives, threshold in TEXTS:
        seg = reader.segment(text, negatives, threshold)
        out.append((seg.xyz, seg.rgb, seg.scores, seg.source))
    cloud = reader.map_cloud()
    out.append((cloud.xyz, cloud.rgb, cloud.scores))
    cloud = reader.map_cloud(50)
    out.append((cloud.xyz, cloud.rgb, cloud.scores))
    if reader.labels is not None:
        labels, conf = reader.label_classes()
        seg, idx = reader.label_cloud()
        out.append((labels.numpy(), conf.numpy(), seg.xyz, seg.rgb, seg.scores, idx))
    return out


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            if isinstance(u, str):
                assert u == v
            else:
                np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize('variant', [
    dict(),                                                   # raw fused features
    dict(vocabulary=()),                                      # no label volume
    dict(purify=True),                                        # incremental fallback pooling, label prior
    dict(purify=True, affinity='learned', iterations=4),      # the shipped student
    dict(purify=True, mode='whole'),                          # re-pooled when stale (snapshot does it first)
    dict(compress_dim=16),                                    # compressed features, text projected
    dict(purify=True, compress_dim=16),
])
def test_snapshot_answers_like_the_live_mapper(variant):
    m = make_mapper(**variant)
    snap = m.snapshot()
    assert snap.size == m.map.size > 100 and snap.keyframes == m.num_keyframes == 2
    assert snap.generation == m.generation
    assert snap.vocabulary == list(variant.get('vocabulary', VOCABULARY))
    assert snap.norms is not None and snap.norms.shape == (snap.size,)
    if variant.get('purify', False):       # the purified features' norms, kept with the voted rows
        assert torch.allclose(snap.norms, row_norms(snap.features), rtol=1e-3, atol=0)
        assert torch.equal(snap.norms, m.purifier.feature_norms(m.map))
    live = answers(m)
    assert any(len(a[0]) for a in live[:len(TEXTS)])            # the texts do find voxels
    assert_same(answers(snap), live)


def test_snapshot_owns_its_tensors_through_integration_eviction_and_compaction():
    m = make_mapper(purify=True)
    snap = m.snapshot()
    before = answers(snap)
    shared = {t.untyped_storage().data_ptr() for t in m.map.cake.layers.values()}
    assert not shared & {t.untyped_storage().data_ptr() for t in snap.map.cake.layers.values()}
    m.integrate(wall_frame(-0.5, 2.0), force=True)              # new rows, re-pooling, capacity growth
    assert m.map.size > snap.size
    m.evict(np.array([0.8, 0.0, 2.0]), m.map.size // 2)         # compaction: rows move
    m.set_vocabulary(['wall', 'plant'])                         # label layers replaced
    assert_same(answers(snap), before)
    later = m.snapshot()
    assert later.generation > snap.generation and later.keyframes == 3 and later.vocabulary == ['wall', 'plant']
    after = answers(m)
    assert_same(answers(later), after)
    m.clear()
    assert m.map.size == 0
    assert_same(answers(snap), before)
    assert_same(answers(later), after)


def test_snapshot_survives_a_load_and_compression_rotation(tmp_path):
    m = make_mapper(compress_dim=16)
    m.save(tmp_path / 'a.ov3dmap')
    snap = m.snapshot()
    before = answers(snap)
    m.integrate(wall_frame(0.9, 3.0), force=True)               # the projection update rotates the stored rows
    m.load(tmp_path / 'a.ov3dmap')
    assert_same(answers(snap), before)
    assert_same(answers(m.snapshot()), answers(m))


@pytest.mark.parametrize('compress_dim', [0, 16])     # 16: the basis turns at every keyframe
def test_kept_norms_of_the_voted_features_follow_updates_eviction_rotation_and_load(tmp_path, compress_dim):
    """The purifier keeps the norms of what queries read (the superpoint vote) with the voted rows instead of
    computing them per query or snapshot: after every kind of change they must still be the features' norms."""
    m = make_mapper(purify=True, compress_dim=compress_dim)

    def check():        # the norms the vote gave its rows: those of the stored fp16 rows to within their rounding
        norms = m.purifier.feature_norms(m.map)
        assert norms is not None and torch.allclose(norms, row_norms(m.purifier.features(m.map)), rtol=1e-3, atol=0)
        assert torch.equal(m.view().norms, norms) and torch.equal(m.snapshot().norms, norms)
    check()
    turned = m.map.cake.basis_epoch
    for i, dx in enumerate((-0.5, 0.9, 1.3)):                   # new rows; the projection update turns the basis
        m.integrate(wall_frame(dx, 2.0 + i), force=True)
        check()
    assert (m.map.cake.basis_epoch > turned) == bool(compress_dim)     # rotations of the voted rows happened
    m.evict(np.array([0.8, 0.0, 2.0]), m.map.size // 2)         # compaction
    check()
    m.save(tmp_path / 'm.ov3dmap')
    m.load(tmp_path / 'm.ov3dmap')                              # voted rows are not saved: voted again
    check()
    # a turn of the coordinates alone, no keyframe after it: R = P_old^T P_new of two different subspaces is not
    # orthogonal, so it changes the rows' norms (like these scaled directions)
    D = m.map.dim
    turn = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(0)))[0]
    m.map.project(turn * torch.linspace(0.3, 1.0, D))
    check()
    # without the vote nothing is kept and queries compute them
    m.reconfigure_purification(dataclasses.replace(m.cfg.purify, superpoint_k=0.0))
    assert m.purifier.feature_norms(m.map) is None
    assert torch.equal(m.snapshot().norms, row_norms(m.purifier.features(m.map)))


def test_snapshot_follows_the_query_settings_it_was_taken_with():
    m = make_mapper()
    snap = m.snapshot()
    before = answers(snap)
    m.cfg.query.default_threshold = 0.9
    m.cfg.query.default_negatives = ['chair']
    assert_same(answers(snap), before)                          # the config is copied
    assert_same(answers(m.snapshot()), answers(m))


def test_snapshot_of_an_empty_map_answers_empty():
    cfg = MapperConfig()
    cfg.features.source = 'simulated'
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    snap = m.snapshot()
    assert snap.size == 0 and len(snap.map_cloud().xyz) == 0
    assert len(snap.segment('chair').xyz) == 0


def test_a_full_text_cache_answers_the_request_that_filled_it():
    """When new texts overflow the cache, the request still gets every embedding, those it had cached too (it
    emptied the cache, then looked them up: a KeyError once per ~1 000 distinct queries, for the negatives)."""
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.nn.functional.normalize(torch.tensor([[float(len(t)), float(ord(t[0])), 1.0] for t in texts]),
                                             dim=1)
    texts = TextEmbeddings(encode, 3, torch.device('cpu'), capacity=3)
    first = texts.embed(['a', 'bb'])
    both = texts.embed(['a', 'ccc', 'dddd'])                  # 'a' cached, two new: over capacity
    assert torch.equal(both[0], first[0]) and calls[-1] == ['ccc', 'dddd'] and len(texts) == 3
    assert torch.equal(texts.embed(['dddd', 'a']), both[[2, 0]]) and len(calls) == 2      # those are kept


def test_text_embeddings_are_thread_safe_and_encoded_once():
    m = make_mapper(vocabulary=())
    calls, lock = [], threading.Lock()

    def encode(texts):
        with lock:
            calls.append(list(texts))
        return m.extractor.encode_text(texts)
    texts = TextEmbeddings(encode, m.extractor.dim, torch.device('cpu'))
    words = [f'thing {i}' for i in range(40)]
    results, errors = {}, []

    def worker(k):
        try:
            for i in range(0, len(words), 5):
                results[k, i] = texts.embed(words[i:i + 5] + ['wall'])
        except Exception as e:   # reported below
            errors.append(e)
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    encoded = [t for c in calls for t in c]
    assert sorted(encoded) == sorted(words + ['wall'])          # every text once, whatever the interleaving
    for i in range(0, len(words), 5):
        for k in range(1, 4):
            assert torch.equal(results[k, i], results[0, i])


def test_a_fixed_text_table_gets_the_default_negatives_it_holds():
    """Precomputed features embed only their table's texts: a query without negatives is scored against the
    default negatives in the table (not refused for 'object'); a table with none of them is refused with that
    reason; negatives asked for stay as given."""
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    mapper = Mapper(MapperConfig(), PrecomputedFeatures(['chair', 'wall', 'floor'], np.eye(3)))
    assert mapper.cfg.query.default_negatives == ['wall', 'floor', 'ceiling', 'object']
    assert mapper.view(refresh=False).negatives_for('chair', []) == ['wall', 'floor']
    assert mapper.query('chair').rows.numel() == 0                   # an empty map answers, nothing refused
    with pytest.raises(ValueError, match="no text embedding for \\['object'\\]"):
        mapper.query('chair', ['object'])
    bare = Mapper(MapperConfig(), PrecomputedFeatures(['chair', 'sofa'], np.eye(2)))
    with pytest.raises(ValueError, match='holds none of query.default_negatives'):
        bare.query('chair')
