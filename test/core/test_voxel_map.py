import pytest
import torch

from ov3d_ros.core.lifting import CellFeatures, bilinear_cells
from ov3d_ros.core.voxel_map import (_RADIX_MIN, VoxelFeatureMap, _stable_sort, _unique_inverse, pack_keys,
                                      unpack_keys, voxel_coords, voxel_keys)


def test_keys_round_trip_including_negative_coordinates():
    coords = torch.tensor([[0, 0, 0], [-1, 2, -3], [1048575, -1048576, 7]])
    assert torch.equal(unpack_keys(pack_keys(coords)), coords)
    assert len(set(pack_keys(coords).tolist())) == 3
    for bad in ([1 << 20, 0, 0], [0, -(1 << 20) - 1, 0], [0, 0, 1 << 20], [0, 0, -(1 << 40)]):
        with pytest.raises(ValueError, match='out of range'):
            pack_keys(torch.tensor([[0, 0, 0], bad]))


def test_unique_inverse_matches_torch_unique():
    g = torch.Generator().manual_seed(0)
    runs = torch.randint(0, 50, (300,), generator=g).repeat_interleave(torch.randint(1, 6, (300,), generator=g))
    empty = torch.empty(0, dtype=torch.int64)
    top = torch.iinfo(torch.int32).max
    wide = torch.randint(-top, top, (20000,), generator=g, dtype=torch.int32)     # padded to a radix sort
    wide[::97] = top                                                            # ties with the padding value
    for values in (torch.randint(-1000, 1000, (5000,), generator=g), runs, torch.arange(7), empty, wide,
                   wide[:_RADIX_MIN - 1], wide[:_RADIX_MIN // 2], runs.int()):
        unique, inverse = _unique_inverse(values)
        ref_unique, ref_inverse = torch.unique(values, return_inverse=True)
        assert torch.equal(unique, ref_unique) and torch.equal(inverse, ref_inverse)
        ordered, order = _stable_sort(values)
        ref_ordered, ref_order = torch.sort(values, stable=True)
        assert torch.equal(ordered, ref_ordered) and torch.equal(order, ref_order)


def test_voxel_coords_floor():
    pts = torch.tensor([[0.04, -0.01, 0.11]])
    assert voxel_coords(pts, 0.05).tolist() == [[0, -1, 2]]


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_voxel_keys_are_packed_voxel_coords(dtype):
    g = torch.Generator().manual_seed(1)
    pts = ((torch.rand(2000, 3, generator=g, dtype=torch.float64) - 0.5) * 100).to(dtype)
    pts[:10] = torch.tensor([[0.0, -0.0, 0.05], [-0.05, 0.1, -1e-9]], dtype=dtype).repeat(5, 1)   # cell edges
    for p in (pts, pts.T.contiguous().T, pts[::3], pts.new_empty(0, 3)):        # rows, a (3, N) view, strided
        assert torch.equal(voxel_keys(p, 0.05), pack_keys(voxel_coords(p, 0.05)))
    for bad in ([(1 << 20) * 0.05, 0, 0], [0, -((1 << 20) + 1) * 0.05, 0], [0, 0, float('nan')],
                [0, float('-inf'), 0]):
        with pytest.raises(ValueError, match='out of range'):
            voxel_keys(torch.tensor([[0.0, 0.0, 0.0], bad], dtype=dtype), 0.05)


def test_fusion_is_exact_weighted_mean():
    m = VoxelFeatureMap(voxel_size_m=1.0, dim=2, capacity=16)
    pts = torch.tensor([[0.2, 0.2, 0.2], [0.7, 0.1, 0.9], [1.5, 0.5, 0.5]])
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    cols = torch.tensor([[0.0, 0, 0], [100.0, 50, 0], [255.0, 255, 255]])
    m.integrate(pts, feats, cols)
    assert len(m) == 2
    rows = m.lookup(pack_keys(torch.tensor([[0, 0, 0], [1, 0, 0], [5, 5, 5]])))
    r0, r1 = rows[:2].tolist()
    assert rows[2].item() == -1
    assert m.features[r0].float().tolist() == pytest.approx([0.5, 0.5])
    assert m.colors[r0].tolist() == pytest.approx([50.0, 25.0, 0.0])
    assert m.weights[r0].item() == 2.0 and m.counts[r0].item() == 2
    # a second observation with weight 2 moves the running mean to (2*0.5 + 2*0)/(2+2)
    m.integrate(torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[0.0, 0.0]]), weights=torch.tensor([2.0]))
    assert len(m) == 2
    assert m.features[r0].float().tolist() == pytest.approx([0.25, 0.25])
    assert m.weights[r0].item() == 4.0 and m.counts[r0].item() == 3
    assert m.centers(torch.tensor([r1])).tolist() == [[1.5, 0.5, 0.5]]


def test_map_grows_past_capacity_without_scene_bound():
    m = VoxelFeatureMap(voxel_size_m=0.1, dim=3, capacity=16)
    g = torch.Generator().manual_seed(0)
    pts = (torch.rand(5000, 3, generator=g) - 0.5) * 2000.0   # ±1 km
    feats = torch.randn(5000, 3, generator=g)
    m.integrate(pts[:2500], feats[:2500])
    m.integrate(pts[2500:], feats[2500:])
    assert len(m) == 5000 and m.capacity >= 5000
    keys = pack_keys(voxel_coords(pts, 0.1))
    rows = m.lookup(keys)
    assert (rows >= 0).all()
    assert torch.allclose(m.features[rows].float(), feats.half().float(), atol=1e-3)
    m.clear()
    assert len(m) == 0 and (m.lookup(keys) == -1).all()


def test_cell_features_fuse_like_dense_features():
    g = torch.Generator().manual_seed(1)
    grid = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g), dim=-1)
    u, v = torch.randint(0, 96, (400,), generator=g), torch.randint(0, 64, (400,), generator=g)
    cells = bilinear_cells(grid, u, v, 96, 64)
    pts = torch.stack([u / 96.0, v / 64.0, torch.zeros(400)], dim=-1)   # neighbouring pixels share voxels
    w = torch.rand(400, generator=g) + 0.5
    by_cells, dense, blocks = VoxelFeatureMap(0.1, 8), VoxelFeatureMap(0.1, 8), VoxelFeatureMap(0.1, 8)
    blocks.FUSE_VALUES = 7 * 8               # touched voxels in blocks of 7: old and new rows across block edges
    first = CellFeatures(cells.grid, cells.cells[:150], cells.weights[:150])
    for m in (by_cells, blocks):
        m.integrate(pts[:150], first, weights=w[:150])
        m.integrate(pts, cells, weights=w)
    dense.integrate(pts[:150], cells.dense()[:150], weights=w[:150])
    dense.integrate(pts, cells.dense(), weights=w)
    n = len(dense)
    assert len(by_cells) == len(blocks) == n < 400 and n > 70
    assert torch.allclose(by_cells.features[:n].float(), dense.features[:n].float(), atol=2e-3)
    assert torch.equal(blocks.features[:n], by_cells.features[:n]) and torch.equal(blocks.norms[:n], by_cells.norms[:n])


def test_keep_compacts_rows_and_forgets_the_rest():
    m = VoxelFeatureMap(1.0, 2)
    pts = torch.tensor([[0.5, 0.5, 0.5], [1.5, 0.5, 0.5], [2.5, 0.5, 0.5], [3.5, 0.5, 0.5]])
    m.integrate(pts, torch.arange(8, dtype=torch.float32).reshape(4, 2), torch.full((4, 3), 100.0))
    keys = m.keys[:4].clone()
    m.keep(torch.tensor([1, 3]))
    assert m.size == 2
    assert m.lookup(keys).tolist() == [-1, 0, -1, 1]
    assert m.features[:2].float().tolist() == [[2.0, 3.0], [6.0, 7.0]]
    m.integrate(pts[:1], torch.zeros(1, 2))                # a forgotten voxel comes back as a new row
    assert m.size == 3 and m.lookup(keys[:1]).tolist() == [2]


def test_capped_weight_keeps_following_new_observations_after_a_million_points():
    """A voxel fused from 1e6 points of feature A must still move towards B when B is observed: an exact fp16
    running mean would not move (B's share 1e-4 of the weight is below fp16 resolution of the stored values)."""
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    point = torch.tensor([[0.5, 0.5, 0.5]])
    capped, exact = VoxelFeatureMap(1.0, 2, max_weight=1000.0), VoxelFeatureMap(1.0, 2)
    for m in (capped, exact):
        for _ in range(10):                                  # 10 x 100 000 points of A in one voxel
            m.integrate(point.expand(100_000, 3), a.expand(100_000, 2))
        assert m.counts[0].item() == 1_000_000 and m.weights[0].item() == 1e6
        for _ in range(20):                                  # 20 keyframes of 50 points of B
            m.integrate(point.expand(50, 3), b.expand(50, 2))
    f = capped.features[0].float()
    assert f[1] > f[0]                                       # closer to B than to A: it followed
    assert f[1].item() == pytest.approx(1 - (1000 / 1050) ** 20, abs=2e-3)
    assert exact.features[0, 1].float().item() < 2e-3       # the uncapped mean barely moves
    assert capped.weights[0].item() == 1e6 + 1000            # all weight is still accounted for
    assert capped.feature_norms()[0].item() == pytest.approx(f.norm().item(), rel=1e-3)


def test_hash_index_matches_a_dictionary_through_growth_keep_and_reload():
    g = torch.Generator().manual_seed(3)
    m = VoxelFeatureMap(1.0, 1, capacity=16)
    coords = torch.randint(-300, 300, (4000, 3), generator=g)
    for chunk in coords.split(700):                          # repeats within and across calls, several growths
        m.integrate(chunk.float() + 0.5, torch.ones(len(chunk), 1))
    keys = pack_keys(coords)
    expect = {k: i for i, k in enumerate(m.keys[:m.size].tolist())}
    assert len(expect) == m.size == len(set(keys.tolist()))
    assert m.lookup(keys).tolist() == [expect[k] for k in keys.tolist()]
    absent = pack_keys(torch.randint(400, 500, (1000, 3), generator=g))
    assert (m.lookup(absent) == -1).all()
    kept = torch.arange(0, m.size, 3)
    kept_keys = m.keys[kept].clone()
    m.keep(kept)
    assert m.lookup(kept_keys).tolist() == list(range(len(kept)))
    assert int((m.lookup(keys) >= 0).sum()) == int(torch.isin(keys, kept_keys).sum())
    back = VoxelFeatureMap(1.0, 1, capacity=16)
    back.load_state(m.state())
    assert back.lookup(kept_keys).tolist() == list(range(len(kept)))


def test_cells_fuse_the_same_with_or_without_their_blocks():
    g = torch.Generator().manual_seed(2)
    grid = torch.nn.functional.normalize(torch.randn(5, 7, 16, generator=g), dim=-1)
    u, v = torch.randint(0, 112, (3000,), generator=g), torch.randint(0, 80, (3000,), generator=g)
    blocked = bilinear_cells(grid, u, v, 112, 80)
    assert blocked.blocks is not None
    plain = CellFeatures(blocked.grid, blocked.cells, blocked.weights)       # per-cell pairs only
    pts = torch.stack([u / 112.0, v / 80.0, torch.zeros(3000)], dim=-1)
    colors = torch.rand(3000, 3, generator=g) * 255
    a, b = VoxelFeatureMap(0.05, 16, max_weight=3.0), VoxelFeatureMap(0.05, 16, max_weight=3.0)
    for part in torch.arange(3000).split(1000):                             # later calls blend with stored rows
        blocked_part = CellFeatures(blocked.grid, None, blocked.weights[part], blocked.blocks[part],
                                    blocked.block_cells)
        plain_part = CellFeatures(plain.grid, plain.cells[part], plain.weights[part])
        rows_a = a.integrate(pts[part], blocked_part, colors[part])
        rows_b = b.integrate(pts[part], plain_part, colors[part])
        assert torch.equal(rows_a, rows_b) and torch.equal(rows_a, torch.unique(rows_a))
    n = a.size
    assert n == b.size and torch.equal(a.keys[:n], b.keys[:n]) and torch.equal(a.counts[:n], b.counts[:n])
    assert torch.allclose(a.features[:n].float(), b.features[:n].float(), atol=2e-3)
    assert torch.allclose(a.colors[:n], b.colors[:n]) and torch.allclose(a.weights[:n], b.weights[:n])
    assert torch.allclose(a.feature_norms(), a.features[:n].float().norm(dim=1))


def test_views_follow_the_weighted_mean_direction_to_the_cameras_and_persist(tmp_path):
    """Each voxel keeps the mean unit vector from its centre to the cameras that saw it, weighted by its points;
    an integration without a camera centre leaves it alone; a map file keeps it and one without it loads as zero."""
    from ov3d_ros.core.map_io import load_map, save_map
    m = VoxelFeatureMap(voxel_size_m=1.0, dim=2, capacity=16)
    pts = torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.6, 0.5], [3.5, 0.5, 0.5]])     # two points in voxel 0, one in 3
    f = torch.ones(3, 2)
    m.integrate(pts, f, origin=torch.tensor([0.5, 0.5, 10.5], dtype=torch.float64))   # above both
    r0, r3 = m.lookup(pack_keys(torch.tensor([[0, 0, 0], [3, 0, 0]]))).tolist()
    assert m.views[r0].tolist() == pytest.approx([0.0, 0.0, 1.0])
    up3 = torch.nn.functional.normalize(torch.tensor([-3.0, 0.0, 10.0]), dim=0)
    assert m.views[r3].tolist() == pytest.approx(up3.tolist(), abs=1e-6)
    # voxel 0 seen once more (1 point, weight 3) from the +x side: (2 * up + 3 * x) / 5
    m.integrate(pts[:1], f[:1], weights=torch.tensor([3.0]), origin=torch.tensor([10.5, 0.5, 0.5]))
    assert m.views[r0].tolist() == pytest.approx([0.6, 0.0, 0.4])
    m.integrate(pts[:1], f[:1])                                                   # no camera centre: kept
    assert m.views[r0].tolist() == pytest.approx([0.6, 0.0, 0.4])
    save_map(tmp_path / 'm.ov3d', m, {})
    back, _, _ = load_map(tmp_path / 'm.ov3d')
    assert torch.equal(back.views[:back.size], m.views[:m.size])
    old = {k: v for k, v in m.state().items() if k != 'views'}                   # a file written before views
    m2 = VoxelFeatureMap(voxel_size_m=1.0, dim=2, capacity=16)
    m2.load_state(old)
    assert m2.size == 2 and not m2.views[:2].any()
    with pytest.raises(ValueError, match='views'):
        m2.load_state(dict(old, views=torch.zeros(2, 2)))


def test_fusion_is_the_same_whichever_way_the_touch_numbers_the_voxels():
    """Integration numbers voxels by an offset in the points' bounding box: in int32 for a small box, int64 for a
    large one (its (voxel, cell block) pairs in int32 only while they fit), and through a sort of packed keys when
    (box x cell blocks) exceeds int64. A far point switches the path; the other voxels must come out the same in
    every case, bit for bit (same sums in the same order), and the new rows in the order of their keys. Points
    that cannot be keyed are refused and leave the map as it was."""
    g = torch.Generator().manual_seed(4)
    grid = torch.nn.functional.normalize(torch.randn(6, 8, 16, generator=g), dim=-1)
    n = 4000
    u, v = torch.randint(0, 128, (n + 1,), generator=g), torch.randint(0, 96, (n + 1,), generator=g)
    order = torch.argsort(v * 128 + u)                                      # raster order: runs of voxels
    u, v = u[order], v[order]
    cells = bilinear_cells(grid, u, v, 128, 96)
    near = torch.stack([u / 128.0, v / 96.0, (u + v) % 7 / 40.0], dim=-1)
    colors = torch.rand(n + 1, 3, generator=g) * 255
    vs = 0.05
    far = {'int32 box': [2.0, 2.0, 2.0],                                    # int32 offsets and pairs
           'int64 pairs': [100.0, 100.0, 1.0],                              # 8e7 cells < 2^31 < 8e7 x 48 blocks
           'int64 box': [3000.0, -2000.0, 1000.0],                          # 1e15 cells x 48 blocks < 2^62
           'sorted keys': [(1 << 20) - 1, -(1 << 20), (1 << 20) - 1]}          # 2^63 cells: too large for a box
    maps = {}
    for name, extra in far.items():
        pts = near.clone()
        pts[-1] = torch.tensor(extra) * (vs if name == 'sorted keys' else 1.0) + 0.01    # a voxel of its own
        m = VoxelFeatureMap(vs, 16, capacity=16, max_weight=5.0)
        for part in torch.arange(n + 1).split(1500):                       # old and new rows in later calls
            c = CellFeatures(cells.grid, None, cells.weights[part], cells.blocks[part], cells.block_cells)
            rows, point_rows = m.integrate(pts[part], c, colors[part], origin=torch.tensor([0.3, 0.2, 2.0]),
                                           return_point_rows=True)
            assert torch.equal(point_rows, m.rows_of(pts[part]))            # each point's row, as a lookup gives
            assert torch.equal(rows, torch.unique(point_rows))              # sorted, unique
        keys = pack_keys(voxel_coords(pts, vs))
        assert torch.equal(m.keys[:m.size], torch.cat([torch.unique(keys[p]) [~torch.isin(torch.unique(keys[p]),
                                                                                            keys[:p[0]])]
                                                       for p in torch.arange(n + 1).split(1500)]))
        maps[name] = m
    ref = maps['int32 box']
    near_rows = ref.rows_of(near[:n])
    for name, m in maps.items():
        rows = m.rows_of(near[:n])
        for layer in ('features', 'weights', 'colors', 'counts', 'views', 'norms'):
            assert torch.equal(m.cake[layer][rows], ref.cake[layer][near_rows]), (name, layer)
    before = {k: t.clone() for k, t in ref.state().items()}
    for bad in ([0.0, float('nan'), 0.0], [float('inf'), 0.0, 0.0], [0.0, 0.0, (1 << 20) * vs]):
        pts = near[:10].clone()
        pts[3] = torch.tensor(bad)
        c = CellFeatures(cells.grid, None, cells.weights[:10], cells.blocks[:10], cells.block_cells)
        with pytest.raises(ValueError, match='out of range'):
            ref.integrate(pts, c, colors[:10])
    assert all(torch.equal(before[k], t) for k, t in ref.state().items())
    rows, point_rows = ref.integrate(near[:0], cells.dense()[:0], return_point_rows=True)     # no points
    assert rows.shape == point_rows.shape == (0,) and ref.size == before['keys'].shape[0]
