"""Object instances of a query answer: connected components of the answer's voxels."""
import numpy as np
import pytest
import torch

from ov3d_ros.core.map_io import is_map_file, save_map
from ov3d_ros.core.objects import connected_components, extract_objects
from ov3d_ros.core.voxel_map import VoxelFeatureMap

VOX = 0.05


def block(lo, shape):
    """(N, 3) voxel centres of a solid block of ``shape`` voxels whose first voxel has coordinates ``lo``."""
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing='ij'), -1).reshape(-1, 3)
    return (idx + np.asarray(lo) + 0.5) * VOX


def reference_components(coords: np.ndarray, reach: int) -> np.ndarray:
    """Naive pairwise reference: Chebyshev distance <= reach links two voxels (scipy's connected_components)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc
    d = np.abs(coords[:, None, :] - coords[None, :, :]).max(-1)
    i, j = np.nonzero((d <= reach) & (d > 0))
    n = len(coords)
    return cc(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)[1]


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_two_separated_chairs_are_two_objects():
    a, b = block((0, 0, 0), (6, 6, 10)), block((20, 0, 0), (4, 5, 8))
    xyz = np.concatenate([a, b])
    scores = np.concatenate([np.full(len(a), 0.7), np.full(len(b), 0.9)])
    objs = extract_objects(xyz, scores, VOX, 'chair', gap_vox=1, min_voxels=5)
    assert [o.voxels for o in objs] == [len(b), len(a)]          # best score first
    assert all(o.label == 'chair' for o in objs)
    assert objs[0].score == pytest.approx(0.9) and objs[1].score == pytest.approx(0.7)
    np.testing.assert_allclose(objs[1].centroid, a.mean(0))
    np.testing.assert_allclose(objs[1].box_min, [0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(objs[1].box_max, np.array([6, 6, 10]) * VOX, atol=1e-9)
    np.testing.assert_allclose(objs[0].box_size, np.array([4, 5, 8]) * VOX, atol=1e-9)
    np.testing.assert_allclose(objs[0].box_center, (np.array([20, 0, 0]) + np.array([4, 5, 8]) / 2) * VOX)
    assert sorted(np.concatenate([o.rows for o in objs]).tolist()) == list(range(len(xyz)))
    assert set(objs[0].rows.tolist()) == set(range(len(a), len(xyz)))


def test_gap_tolerance_and_minimum_size():
    a, b = block((0, 0, 0), (3, 3, 3)), block((5, 0, 0), (3, 3, 3))   # two empty voxels (x = 3, 4) between
    xyz = np.concatenate([a, b])
    s = np.ones(len(xyz))
    assert len(extract_objects(xyz, s, VOX, gap_vox=1)) == 2
    assert len(extract_objects(xyz, s, VOX, gap_vox=2)) == 1
    assert extract_objects(xyz, s, VOX, gap_vox=2)[0].voxels == 54
    stray = np.concatenate([xyz, block((40, 40, 40), (1, 1, 2))])
    assert len(extract_objects(stray, np.ones(len(stray)), VOX, gap_vox=1, min_voxels=5)) == 2
    assert len(extract_objects(stray, np.ones(len(stray)), VOX, gap_vox=1, min_voxels=1)) == 3
    assert extract_objects(np.zeros((0, 3)), np.zeros(0), VOX) == []


@pytest.mark.parametrize('gap', [0, 1, 2])
def test_components_match_a_pairwise_reference(gap):
    rng = np.random.default_rng(gap)
    coords = np.unique(rng.integers(-12, 12, size=(300, 3)), axis=0)
    ours = connected_components(torch.as_tensor(coords), gap).numpy()
    ref = reference_components(coords, gap + 1)
    assert same_partition(ours, ref)
    assert ours.max() + 1 == len(set(ref.tolist()))


def test_a_long_chain_is_one_component():
    """Label propagation must run to the end on thin, long shapes (a diagonal line of 400 voxels)."""
    coords = torch.stack([torch.arange(400)] * 3, 1)
    assert connected_components(coords, 0).unique().tolist() == [0]
    zigzag = torch.tensor([(i, i % 2, 0) for i in range(300)])
    assert connected_components(zigzag, 0).unique().tolist() == [0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match='voxel_size_m'):
        extract_objects(np.zeros((1, 3)), np.ones(1), 0.0)
    with pytest.raises(ValueError, match='min_voxels'):
        extract_objects(np.zeros((1, 3)), np.ones(1), VOX, min_voxels=0)
    with pytest.raises(ValueError, match='scores'):
        extract_objects(np.zeros((2, 3)), np.ones(1), VOX)
    with pytest.raises(ValueError, match='gap_vox'):
        connected_components(torch.zeros(1, 3, dtype=torch.int64), -1)


def test_is_map_file(tmp_path):
    m = VoxelFeatureMap(VOX, 4, capacity=16)
    m.integrate(torch.rand(10, 3), torch.randn(10, 4), torch.rand(10, 3) * 255)
    save_map(tmp_path / 'a.ov3dmap', m, {})
    assert is_map_file(tmp_path / 'a.ov3dmap')
    blob = (tmp_path / 'a.ov3dmap').read_bytes()
    (tmp_path / 'cut.ov3dmap').write_bytes(blob[:-20])     # a truncated map still counts as a map
    assert is_map_file(tmp_path / 'cut.ov3dmap')
    (tmp_path / 'notes.txt').write_text('export PATH=...\n')
    assert not is_map_file(tmp_path / 'notes.txt')
    assert not is_map_file(tmp_path / 'missing')
    assert not is_map_file(tmp_path)
    import safetensors.torch
    safetensors.torch.save_file({'x': torch.zeros(2)}, str(tmp_path / 'other.safetensors'))
    assert not is_map_file(tmp_path / 'other.safetensors')
