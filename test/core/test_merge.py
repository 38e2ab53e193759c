"""Map merging: fusion like observations, transforms, refusals, label volumes and compression bases."""
import json
import warnings

import numpy as np
import pytest
import torch

from ov3d_ros.core.map_io import load_map, save_map
from ov3d_ros.core.merge import (MapPart, MergeError, merge_files, merge_parts, read_transform,
                                 transform_from_pose)
from ov3d_ros.core.voxel_map import VoxelFeatureMap

VS = 0.1


def make_map(coords, feats, weights=None, colors=None, vs=VS):
    """A VoxelFeatureMap with one observation per given voxel (integer coords), fused by integrate()."""
    coords = torch.as_tensor(coords, dtype=torch.float32)
    feats = torch.as_tensor(feats, dtype=torch.float32)
    vmap = VoxelFeatureMap(vs, feats.shape[1], capacity=16)
    colors = torch.full((len(coords), 3), 100.0) if colors is None else torch.as_tensor(colors, dtype=torch.float32)
    vmap.integrate((coords + 0.5) * vs, feats, colors, None if weights is None else torch.as_tensor(weights))
    return vmap


def part(vmap, T=None, info=None, extra=None, name='m'):
    return MapPart(vmap, dict({'feature_source': 'simulated', 'keyframes': 3}, **(info or {})), extra or {},
                   np.eye(4) if T is None else T, name)


def by_key(vmap):
    st = vmap.state()
    return {int(k): i for i, k in enumerate(st['keys'])}, st


def test_overlapping_voxels_fuse_like_observations():
    a = make_map([[0, 0, 0], [1, 0, 0]], [[1, 0, 0, 0], [0, 1, 0, 0]], weights=[1.0, 2.0],
                 colors=[[0, 0, 0], [10, 10, 10]])
    b = make_map([[1, 0, 0], [5, 5, 5]], [[0, 0, 1, 0], [0, 0, 0, 1]], weights=[3.0, 1.0],
                 colors=[[50, 50, 50], [7, 7, 7]])
    # the reference: one map that observed both (what a single mapper would hold)
    ref = make_map([[0, 0, 0], [1, 0, 0]], [[1, 0, 0, 0], [0, 1, 0, 0]], weights=[1.0, 2.0],
                   colors=[[0, 0, 0], [10, 10, 10]])
    ref.integrate((torch.tensor([[1, 0, 0], [5, 5, 5]]).float() + 0.5) * VS,
                  torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 1.0]]), torch.tensor([[50.0] * 3, [7.0] * 3]),
                  torch.tensor([3.0, 1.0]))
    m, info, _ = merge_parts([part(a), part(b)])
    assert m.size == 3 and info['keyframes'] == 6
    mk, ms = by_key(m)
    rk, rs = by_key(ref)
    assert set(mk) == set(rk)
    for key, i in mk.items():
        j = rk[key]
        assert torch.allclose(ms['features'][i].float(), rs['features'][j].float(), atol=1e-3)
        assert ms['weights'][i] == pytest.approx(float(rs['weights'][j]))
        assert torch.allclose(ms['colors'][i], rs['colors'][j], atol=1e-4)
        assert int(ms['counts'][i]) == int(rs['counts'][j])
    shared = mk[int(a.keys[1])]
    assert torch.allclose(ms['features'][shared].float(), torch.tensor([0, 0.4, 0.6, 0]), atol=1e-3)
    assert float(ms['colors'][shared][0]) == pytest.approx((2 * 10 + 3 * 50) / 5)


def test_a_map_merged_with_itself_under_a_known_transform_lands_where_expected():
    rng = np.random.default_rng(0)
    coords = rng.integers(-20, 20, size=(200, 3))
    coords = np.unique(coords, axis=0)
    feats = torch.nn.functional.normalize(torch.as_tensor(rng.normal(size=(len(coords), 8)), dtype=torch.float32), dim=1)
    a = make_map(coords, feats)
    # 90 degrees about z, then 1 m along x: voxel (i, j, k) -> centre rotated -> voxel (-j - 1, i, k) + (10, 0, 0)
    T = transform_from_pose(1.0, 0.0, 0.0, 0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4))
    m, info, _ = merge_parts([part(a, name='a'), part(a, T, name='a moved')])
    expect_moved = np.stack([-coords[:, 1] - 1 + 10, coords[:, 0], coords[:, 2]], axis=1)
    mk, ms = by_key(m)
    from ov3d_ros.core.voxel_map import pack_keys
    moved_keys = pack_keys(torch.as_tensor(expect_moved)).tolist()
    own_keys = pack_keys(torch.as_tensor(coords)).tolist()
    assert set(mk) == set(moved_keys) | set(own_keys)
    # a moved voxel carries the feature of its source (where it does not overlap the original)
    own = set(own_keys)
    for n, key in enumerate(moved_keys):
        if key not in own:
            assert torch.allclose(ms['features'][mk[key]].float(), feats[n], atol=2e-3)
    assert info['merged_from'][1]['T'][0][3] == 1.0
    # identity merge of a map with itself: same voxels, same features, weights and counts doubled
    m2, _, _ = merge_parts([part(a), part(a)])
    k2, s2 = by_key(m2)
    ka, sa = by_key(a)
    assert set(k2) == set(ka)
    idx = [k2[k] for k in ka]
    assert torch.equal(s2['features'][idx], sa['features'][list(ka.values())])
    assert torch.equal(s2['weights'][idx], 2 * sa['weights'][list(ka.values())])
    assert torch.equal(s2['counts'][idx], 2 * sa['counts'][list(ka.values())])


def test_incompatible_maps_are_refused_with_the_reason():
    a = make_map([[0, 0, 0]], [[1.0, 0, 0, 0]])
    with pytest.raises(MergeError, match='voxel size'):
        merge_parts([part(a), part(make_map([[0, 0, 0]], [[1.0, 0, 0, 0]], vs=0.05))])
    with pytest.raises(MergeError, match='8-d features'):
        merge_parts([part(a), part(make_map([[0, 0, 0]], [[1.0] + [0] * 7]))])
    with pytest.raises(MergeError, match="feature source 'clip"):
        merge_parts([part(a), part(a, info={'feature_source': 'clip:ViT-B-16'})])
    # CLIP maps: the feature space (model and weights) decides, not the dense mode the keyframes were seen in
    naclip, sclip = ({'feature_source': f'clip:ViT-B-16:{m}', 'feature_space': 'clip:ViT-B-16:0a1b'} for m in
                     ('naclip', 'sclip'))
    assert merge_parts([part(a, info=naclip), part(a, info=sclip)])[0].size == 1
    with pytest.raises(MergeError, match="feature space 'clip:ViT-B-16:ffff', m with 'clip:ViT-B-16:0a1b'; features of "
                                         'different models or weights'):
        merge_parts([part(a, info=naclip), part(a, info=dict(naclip, feature_space='clip:ViT-B-16:ffff'))])
    with pytest.raises(MergeError, match='vocabulary'):
        merge_parts([part(a, info={'vocabulary': ['wall']}), part(a, info={'vocabulary': ['floor']})])
    with pytest.raises(MergeError, match='class names'):
        merge_parts([part(a, info={'class_names': ['a', 'b']}), part(a, info={'class_names': ['a', 'c']})])
    shear = np.eye(4)
    shear[0, 1] = 0.5
    with pytest.raises(MergeError, match='not a rigid transform'):
        merge_parts([part(a), part(a, shear)])
    with pytest.raises(MergeError, match='got NaN or inf in it'):
        merge_parts([part(a), part(a, np.where(np.eye(4) > 0, np.nan, 0.0))])
    with pytest.raises(MergeError, match=r'got shape \(3, 3\)'):
        merge_parts([part(a), part(a, np.eye(3))])
    with pytest.raises(MergeError, match='no maps'):
        merge_parts([])


def test_label_evidence_is_summed_per_merged_voxel(tmp_path):
    a = make_map([[0, 0, 0], [1, 0, 0]], [[1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    b = make_map([[1, 0, 0], [2, 0, 0]], [[0, 1.0, 0, 0], [0, 0, 1.0, 0]])
    ev_a, ev_b = torch.tensor([[2.0, 0.0], [0.5, 1.0]]), torch.tensor([[0.0, 3.0], [1.0, 1.0]])
    for m, ev in ((a, ev_a), (b, ev_b)):                   # the label volume's layer
        m.cake.add_layer('label_evidence', 2, torch.float32)[:2] = ev
    save_map(tmp_path / 'a.ov3dmap', a, {'feature_source': 'simulated', 'vocabulary': ['wall', 'floor']})
    save_map(tmp_path / 'b.ov3dmap', b, {'feature_source': 'simulated', 'vocabulary': ['Wall', 'floor']})
    summary = merge_files([tmp_path / 'a.ov3dmap', tmp_path / 'b.ov3dmap'], tmp_path / 'm.ov3dmap')
    assert summary['voxels'] == 3 and summary['vocabulary'] == ['wall', 'floor']
    m, info, extra = load_map(tmp_path / 'm.ov3dmap')          # checksum verified on load
    keys = {int(k): i for i, k in enumerate(m.keys[:m.size])}
    ev = m.cake.rows('label_evidence')
    assert torch.equal(ev[keys[int(a.keys[0])]], torch.tensor([2.0, 0.0]))
    assert torch.equal(ev[keys[int(a.keys[1])]], torch.tensor([0.5, 4.0]))      # shared voxel: summed
    assert torch.equal(ev[keys[int(b.keys[1])]], torch.tensor([1.0, 1.0]))
    assert [r['voxels'] for r in info['merged_from']] == [2, 2]


def _compressed_part(full: torch.Tensor, coords, basis: torch.Tensor, name: str) -> MapPart:
    """A map whose features are ``full`` (N, D) compressed with the orthonormal ``basis`` (D, d)."""
    vmap = make_map(coords, full @ basis)
    energy = torch.linalg.norm(full @ basis, dim=0) ** 2
    return part(vmap, extra={'projection': basis, 'projection_energy': energy}, name=name)


def test_different_compression_bases_are_brought_into_one():
    g = torch.Generator().manual_seed(0)
    D, d = 16, 4
    sub = torch.linalg.qr(torch.randn(D, d, generator=g))[0]               # a 4-d subspace of the 16-d space
    full = torch.nn.functional.normalize(torch.randn(30, d, generator=g), dim=1) @ sub.T   # (30, 16) in it
    rot = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    coords_a = [[i, 0, 0] for i in range(20)]
    coords_b = [[i, 0, 0] for i in range(10, 30)]
    pa = _compressed_part(full[:20], coords_a, sub, 'a')
    pb = _compressed_part(full[10:], coords_b, sub @ rot, 'b')            # same subspace, another basis
    m, _, extra = merge_parts([pa, pb])
    P = extra['projection']
    assert m.dim == d and P.shape == (D, d)
    assert torch.allclose(P.T @ P, torch.eye(d), atol=1e-4)
    back = m.features[:m.size].float() @ P.T                               # merged features in the full space
    assert torch.allclose(back, full, atol=5e-3)                           # rows sorted by key = by x here
    # one uncompressed map: everything is projected back to the full dimension
    plain = part(make_map(coords_b, full[10:]), name='plain')
    m2, _, extra2 = merge_parts([pa, plain])
    assert 'projection' not in extra2 and m2.dim == D
    assert torch.allclose(m2.features[:m2.size].float(), full, atol=5e-3)


def test_transform_files_text_and_json(tmp_path):
    T = transform_from_pose(1, 2, 3, 0, 0, 0.6, 0.8)
    (tmp_path / 't.txt').write_text('\n'.join(' '.join(str(v) for v in row) for row in T))
    (tmp_path / 't.json').write_text(json.dumps(T.tolist()))
    (tmp_path / 'q.json').write_text(json.dumps({'translation': [1, 2, 3], 'rotation': [0, 0, 0.6, 0.8]}))
    for name in ('t.txt', 't.json', 'q.json'):
        assert np.allclose(read_transform(tmp_path / name), T)
    (tmp_path / 'bad.txt').write_text('1 2 3\n')
    with pytest.raises(MergeError, match='4x4'):
        read_transform(tmp_path / 'bad.txt')
    # a pose's numbers: NaN is named as such (it reached the map's rigidity check), a huge quaternion is still a
    # rotation (its norm overflowed to inf: 'no direction', with a RuntimeWarning)
    with pytest.raises(MergeError, match='must be finite numbers'):
        transform_from_pose(np.nan, 0, 0, 0, 0, 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert np.allclose(transform_from_pose(1, 2, 3, 0, 0, 0.6e200, 0.8e200), T)
    with pytest.raises(MergeError, match='has no direction'):
        transform_from_pose(1, 2, 3, 0, 0, 0, 0)


def test_views_turn_with_the_transform_and_fuse_like_colours():
    """The direction to the cameras is a world-frame vector: a moved part's views turn with its rotation, and an
    overlapping voxel takes the weight-averaged view of its parts."""
    a = VoxelFeatureMap(VS, 4, capacity=16)
    a.integrate(torch.tensor([[0.05, 0.05, 0.05]]), torch.ones(1, 4), origin=torch.tensor([0.05, 0.05, 5.0]))
    b = VoxelFeatureMap(VS, 4, capacity=16)
    b.integrate(torch.tensor([[0.05, 0.05, 0.05]]), torch.ones(1, 4), weights=torch.tensor([3.0]),
                origin=torch.tensor([5.0, 0.05, 0.05]))
    assert a.views[0].tolist() == pytest.approx([0, 0, 1]) and b.views[0].tolist() == pytest.approx([1, 0, 0])
    m, _, _ = merge_parts([part(a), part(b)])
    assert m.views[0].tolist() == pytest.approx([0.75, 0, 0.25])
    # b turned 90 degrees about z (x -> y) and moved away: its view turns with it
    T = transform_from_pose(3.0, 0.0, 0.0, 0.0, 0.0, np.sin(np.pi / 4), np.cos(np.pi / 4))
    m, _, _ = merge_parts([part(a), part(b, T)])
    k, st = by_key(m)
    moved = [i for key, i in k.items() if key != int(a.keys[0])]
    assert st['views'][moved[0]].tolist() == pytest.approx([0, 1, 0], abs=1e-6)
    assert st['views'][k[int(a.keys[0])]].tolist() == pytest.approx([0, 0, 1])


def test_text_tables_are_compared_within_rounding_and_a_missing_one_is_another_table(tmp_path):
    """A map saved again holds its text table normalised once more (other last bits): it was refused as 'another
    precomputed text table' (compared bit for bit), and a map without a table beside one with it was a KeyError."""
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    from ov3d_ros.core.mapper import Mapper
    names = ['wall', 'floor', 'chair']
    vectors = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))     # a table as given: not unit length
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device = 'precomputed', 'cpu'
    Mapper(cfg, PrecomputedFeatures(names, vectors.numpy())).save(tmp_path / 'a.ov3dmap')
    Mapper.from_file(tmp_path / 'a.ov3dmap', 'cpu').save(tmp_path / 'b.ov3dmap')      # the same table, saved again
    a, b = MapPart.from_file(tmp_path / 'a.ov3dmap'), MapPart.from_file(tmp_path / 'b.ov3dmap')
    assert not torch.equal(a.extra['text_vectors'], b.extra['text_vectors'])          # other last bits
    merge_files([tmp_path / 'a.ov3dmap', tmp_path / 'b.ov3dmap'], tmp_path / 'm.ov3dmap')
    assert torch.equal(load_map(tmp_path / 'm.ov3dmap')[2]['text_vectors'], a.extra['text_vectors'])
    grid = make_map([[0, 0, 0]], [[1.0] + [0] * 7])
    with_table = part(grid, info={'text_names': names}, extra={'text_vectors': vectors}, name='t')
    for other in (part(grid, name='plain'),                                                 # no table at all
                  part(grid, extra={'text_vectors': vectors}, name='plain'),               # vectors, no names
                  part(grid, info={'text_names': names}, extra={'text_vectors': vectors.flip(0)}, name='plain')):
        for parts in ([with_table, other], [other, with_table]):
            with pytest.raises(MergeError, match='another precomputed text table than'):
                merge_parts(parts)
