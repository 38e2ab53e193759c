import pytest
import torch

from ov3d_ros.core.lifting import bilinear_cells
from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys, unpack_keys, voxel_coords


def test_keys_round_trip_including_negative_coordinates():
    coords = torch.tensor([[0, 0, 0], [-1, 2, -3], [1048575, -1048576, 7]])
    assert torch.equal(unpack_keys(pack_keys(coords)), coords)
    assert len(set(pack_keys(coords).tolist())) == 3
    with pytest.raises(ValueError):
        pack_keys(torch.tensor([[1 << 21, 0, 0]]))


def test_voxel_coords_floor():
    pts = torch.tensor([[0.04, -0.01, 0.11]])
    assert voxel_coords(pts, 0.05).tolist() == [[0, -1, 2]]


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
    by_cells, dense = VoxelFeatureMap(0.1, 8), VoxelFeatureMap(0.1, 8)
    by_cells.integrate(pts, cells, weights=w)
    dense.integrate(pts, cells.dense(), weights=w)
    assert len(by_cells) == len(dense) < 400
    assert torch.allclose(by_cells.features[:len(dense)].float(), dense.features[:len(dense)].float(), atol=2e-3)


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
