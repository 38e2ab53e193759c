"""Label volume: per-voxel class evidence, the vote across views, and the Mapper's vocabulary queries."""
import numpy as np
import pytest
import torch

from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.label_volume import LabelVolume, absorb_small_components
from ov3d_ros.core.lifting import CellFeatures
from ov3d_ros.core.mapper import Mapper
from ov3d_ros.core.voxel_map import VoxelFeatureMap

from test_mapper import NAMES, wall_frame  # noqa: E402  (test/core is on sys.path)


def one_hot_cells(classes, n_points, dim=3):
    """Every point sits on one cell whose feature is the unit vector of ``classes[cell]``."""
    grid = torch.eye(dim)[torch.as_tensor(classes)]
    cells = torch.arange(n_points)[:, None].repeat(1, 4) % len(classes)
    return CellFeatures(grid, cells, torch.full((n_points, 4), 0.5))


def voxel_row(vmap, *xs):
    """Add voxels at x = xs (1 m voxels along the x axis) to ``vmap``; they get the next rows, in order."""
    x = torch.as_tensor(xs, dtype=torch.float32)
    vmap.integrate(torch.stack([x + 0.5, torch.full_like(x, 0.5), torch.full_like(x, 0.5)], 1), torch.ones(len(x), 1))


def test_probabilities_of_fp16_rows_block_by_block_match_the_softmax_formula():
    vmap = VoxelFeatureMap(1.0, 16, capacity=16)
    g = torch.Generator().manual_seed(2)
    text = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=1)
    vol = LabelVolume(list('abcde'), text, temperature=0.05, cake=vmap.cake)
    feats = (torch.randn(2500, 16, generator=g) * 3).half()              # more rows than one block
    ref = torch.softmax(torch.nn.functional.normalize(feats.float(), dim=-1) @ text.T / 0.05, dim=-1)
    p = vol.probabilities(feats)
    assert p.dtype == torch.float32 and p.shape == (2500, 5) and torch.allclose(p, ref, atol=1e-6, rtol=0)
    assert vol.probabilities(feats[:0]).shape == (0, 5)


def test_evidence_is_a_vote_across_views():
    vmap = VoxelFeatureMap(1.0, 1, capacity=16)
    voxel_row(vmap, 0, 1, 2)
    vol = LabelVolume(['a', 'b', 'c'], torch.eye(3), temperature=0.05, cake=vmap.cake)
    rows = torch.tensor([0, 1])
    vol.integrate(rows, one_hot_cells([0, 1], 2))    # view 1: voxel 0 is a, voxel 1 is b
    vol.integrate(rows, one_hot_cells([0, 1], 2))    # view 2 agrees
    vol.integrate(rows, one_hot_cells([2, 2], 2))    # view 3 is wrong about both
    labels, conf = vol.classes(3)
    assert labels.tolist() == [0, 1, -1]                            # row 2 never observed
    assert 0.6 < conf[0] < 0.7 and conf[2] == 0
    assert torch.allclose(vol.evidence[:2].sum(1), torch.tensor([3.0, 3.0]))
    # averaging the three views' features instead would give (2a + c) / 3: still a, but with far less margin
    vmap.keep(torch.tensor([1]))                                    # eviction compacts the evidence layer too
    assert vol.classes(1)[0].tolist() == [1] and vol.evidence[1:].abs().sum() == 0
    assert vol.index(' A ') == 0 and vol.index('d') == -1
    voxel_row(vmap, 7)
    vol.recompute(torch.eye(3)[[2, 0]], torch.tensor([2.0, 1.0]))
    assert vol.classes(2)[0].tolist() == [2, 0] and torch.allclose(vol.evidence[:2].sum(1), torch.tensor([2.0, 1.0]))
    with pytest.raises(ValueError, match='rows of label evidence'):
        vol.recompute(torch.eye(3), torch.ones(3))


def test_neighbour_smoothing_removes_an_isolated_wrong_voxel():
    vmap = VoxelFeatureMap(1.0, 1, capacity=16)
    voxel_row(vmap, 0, 1, 2, 3, 4)
    vol = LabelVolume(['a', 'b'], torch.eye(2), temperature=0.05, cake=vmap.cake)
    rows = torch.arange(4)
    vol.integrate(rows, one_hot_cells([0, 0, 1, 0], 4, dim=2))    # voxel 2 alone says b
    assert vol.classes(4)[0].tolist() == [0, 0, 1, 0]
    line = torch.tensor([[0, 1, -1], [1, 0, 2], [2, 1, 3], [3, 2, -1]])        # a row of voxels, self first
    labels, conf = vol.classes(4, line)
    assert labels.tolist() == [0, 0, 0, 0] and 0.6 < conf[2] < 0.7
    assert vol.classes(5, torch.cat([line, torch.tensor([[4, -1, -1]])]))[0].tolist()[4] == -1


def test_small_regions_take_the_class_around_them():
    # a row of 9 voxels: 0 0 0 1 1 0 0 0 -1, plus an isolated voxel of class 2 with no neighbours
    labels = torch.tensor([0, 0, 0, 1, 1, 0, 0, 0, -1, 2])
    nbr = torch.full((10, 3), -1)
    for i in range(9):
        nbr[i, 0] = i
        nbr[i, 1] = i - 1 if i > 0 else -1
        nbr[i, 2] = i + 1 if i < 8 else -1
    nbr[9, 0] = 9
    out = absorb_small_components(labels, nbr, min_size=3)
    assert out.tolist() == [0, 0, 0, 0, 0, 0, 0, 0, -1, 2]     # the 2-voxel island joins its surroundings
    assert absorb_small_components(labels, nbr, min_size=2).tolist() == labels.tolist()


def test_bad_vocabularies_raise():
    cake = VoxelFeatureMap(1.0, 1, capacity=16).cake
    with pytest.raises(ValueError, match='empty'):
        LabelVolume([], torch.zeros(0, 3), 0.1, cake)
    with pytest.raises(ValueError, match='temperature'):
        LabelVolume(['a'], torch.eye(1), 0.0, cake)
    assert 'label_evidence' not in cake                                  # a refused volume adds no layer


@pytest.fixture()
def mapper():
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.pixel_stride = 0.1, 1
    cfg.labels.vocabulary, cfg.labels.smoothing_radius_vox = ['wall', 'chair', 'plant'], 0
    cfg.labels.min_component_vox = 0
    cfg.purify.enabled = False                   # the label volume itself (pooled: see the purification tests)
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    assert m.integrate(wall_frame())
    return m


def test_vocabulary_queries_come_from_the_label_volume(mapper):
    labels, conf = mapper.labels.classes(mapper.map.size)
    assert set(labels.tolist()) == {0, 1, 2} and conf.min() > 0.3
    seg = mapper.segment('Chair ')                                     # case and spaces ignored
    assert len(seg.xyz) > 10 and np.mean(seg.xyz[:, 0] < 0.05) > 0.95
    chair_rows = (labels == 1).sum().item()
    assert len(seg.xyz) == chair_rows                                   # every voxel whose class is chair
    assert np.allclose(np.sort(seg.scores), np.sort(conf[labels == 1].numpy()))
    assert len(mapper.segment('chair', threshold=1.0).xyz) == 0
    free = mapper.segment('plants')                    # not in the vocabulary: features
    assert len(free.xyz) > 0 and np.mean(free.xyz[:, 0] > -0.05) > 0.9
    pts = np.array([[-0.8, 0.5, 2.0], [0.8, 0.5, 2.0]])
    assert mapper.label_points(pts, mapper.voxel_labels(['wall', 'chair', 'plant'])).tolist() == [1, 2]


def test_new_vocabulary_is_recomputed_from_stored_features(mapper):
    mapper.set_vocabulary(['plant', 'chair'])
    labels, _ = mapper.labels.classes(mapper.map.size)
    centres = mapper.map.centers()
    lower = centres[:, 1] > -0.3                                          # below the wall band
    left = lower & (centres[:, 0] < -0.1)
    assert (labels[left] == 1).float().mean() > 0.9
    assert mapper.segment('plant').xyz[:, 0].mean() > 0
    with pytest.raises(ValueError, match='unique'):
        mapper.set_vocabulary(['chair', 'Chair'])
    with pytest.raises(ValueError, match='empty'):
        mapper.set_vocabulary(['chair', ' '])
    assert mapper.labels.names == ['plant', 'chair']                     # a refused vocabulary changes nothing
    mapper.set_vocabulary([])
    assert mapper.labels is None and len(mapper.segment('chair').xyz) > 0


def test_label_volume_survives_save_load_and_eviction(mapper, tmp_path):
    mapper.save(tmp_path / 'm.ov3dmap')
    other = Mapper.from_file(tmp_path / 'm.ov3dmap', device='cpu')
    n = mapper.map.size
    assert other.labels.names == mapper.labels.names
    assert torch.equal(other.labels.evidence[:n], mapper.labels.evidence[:n])
    before = mapper.labels.classes(n)[0]
    keys = mapper.map.keys[:n].clone()
    mapper.evict(np.array([-1.0, 0.5, 2.0]), n // 2)
    kept = mapper.map.keys[:mapper.map.size]
    rows = torch.searchsorted(torch.sort(keys).values, kept)
    order = torch.argsort(keys)
    assert torch.equal(mapper.labels.classes(mapper.map.size)[0], before[order[rows]])
    mapper.clear()
    assert mapper.labels is not None and mapper.labels.classes(0)[0].numel() == 0


def test_purified_label_volume_pools_the_distributions(tmp_path):
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.pixel_stride = 0.1, 1
    cfg.purify.enabled, cfg.purify.iterations = True, 4
    cfg.labels.vocabulary, cfg.labels.smoothing_radius_vox = ['wall', 'chair', 'plant'], 0
    cfg.labels.min_component_vox = 0
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    assert m.integrate(wall_frame())
    n = m.map.size
    raw, pooled = m.labels.channel(n)
    assert torch.allclose(pooled[:n].sum(1), torch.ones(n), atol=1e-4)       # still distributions
    assert not torch.allclose(pooled[:n], raw, atol=1e-3)                     # smoothed over neighbours
    m.cfg.labels.feature_prior = False
    labels, _ = m.label_classes()
    assert torch.equal(labels, pooled[:n].argmax(1))
    assert (labels == raw.argmax(1)).float().mean() > 0.9
    m.cfg.labels.feature_prior = True                  # weighed by the purified features' own class softmax
    prior = m.labels.probabilities(m.query_features())
    assert torch.equal(m.label_classes()[0], (pooled[:n] * prior).argmax(1))
    report = m.memory_report()                     # every layer of the map's cake, the label layers among them
    assert report['label_evidence'] == report['label_pooled'] == 4 * 3
    assert report['purified'] == 2 * m.map.dim and report['normals'] == 12
    assert m.bytes_per_voxel() == m.map.bytes_per_voxel() == round(sum(report.values()))
    m.cfg.labels.smoothing_radius_vox = 1
    smoothed, _ = m.label_classes()
    assert smoothed.shape == labels.shape and (smoothed == labels).float().mean() > 0.9
    m.cfg.labels.min_component_vox = 5
    cleaned, _ = m.label_classes()
    assert (cleaned == smoothed).float().mean() > 0.9 and set(cleaned.tolist()) <= {0, 1, 2}
    m.save(tmp_path / 'p.ov3dmap')
    other = Mapper.from_file(tmp_path / 'p.ov3dmap', device='cpu')     # same settings: restored as saved
    assert torch.equal(other.labels.pooled[:n], pooled[:n])


def test_label_cloud_of_an_empty_map_is_empty():
    """Before the first keyframe (a node's view or label topic drawing it), with neighbour smoothing on."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.labels.vocabulary, cfg.labels.smoothing_radius_vox = ['wall', 'chair', 'plant'], 1
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    seg, idx = m.label_cloud(100)
    assert seg.xyz.shape == (0, 3) and seg.rgb.shape == (0, 3) and idx.shape == (0,)
    assert m.integrate(wall_frame()) and len(m.label_cloud(100)[1]) > 0
