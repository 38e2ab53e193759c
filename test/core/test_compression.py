"""Compressed voxel features: the projection itself, and a Mapper that compresses after its first keyframes."""
import numpy as np
import pytest
import torch

from ov3d_ros.core.compression import FeatureProjection
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Frame, Mapper
from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render


def test_projection_keeps_dot_products_inside_the_fitted_subspace():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(64, 8)).Q                     # an 8-d subspace of R^64
    coords = torch.randn(500, 8)
    samples = coords @ basis.T
    p = FeatureProjection.fit(samples, 8)
    assert (p.in_dim, p.out_dim) == (64, 8)
    assert torch.allclose(p.matrix.T @ p.matrix, torch.eye(8), atol=1e-5)
    texts = torch.randn(5, 8) @ basis.T
    assert torch.allclose(p.project(samples[:20]) @ p.project(texts).T, samples[:20] @ texts.T, atol=1e-3)
    # a direction orthogonal to the subspace vanishes
    outside = torch.randn(64)
    outside -= basis @ (basis.T @ outside)
    assert p.project(outside).norm() < 1e-3
    # fewer dimensions keep the strongest directions first
    weighted = (coords * torch.tensor([10.0] + [1.0] * 7)) @ basis.T
    assert FeatureProjection.fit(weighted, 1).project(basis[:, 0]).abs().item() > 0.99


def test_the_fit_does_not_depend_on_the_thread_count():
    """The same features give a bit-identical basis, fitted and updated, on one thread and on several (a Ray
    task and a serial run must agree), and the caller's thread count is restored."""
    g = torch.Generator().manual_seed(0)
    x, later = torch.randn(2048, 384, generator=g).half(), torch.randn(1200, 384, generator=g)
    before = torch.get_num_threads()
    try:
        bases = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = FeatureProjection.fit(x, 64)
            fitted = p.matrix
            p.update(later)
            bases.append((fitted, p.basis, p.energy))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*bases))


def test_update_folds_keyframes_like_a_full_eigendecomposition():
    """One Rayleigh-Ritz step in span(U, x^T x U) is exact when the new moment's range lies there: the tracked
    directions and energies are those of an ``eigh`` of the whole D x D moment; they stay orthonormal over many
    updates, and samples with fewer rows than d or inside the subspace are folded in too."""
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(48, 6, generator=g)).Q
    first = (torch.randn(300, 3, generator=g) * torch.tensor([3.0, 2.0, 1.5])) @ basis[:, :3].T
    later = torch.randn(300, 6, generator=g) @ basis.T                 # three new directions as well
    p = FeatureProjection.fit(first, 4)
    moment = (p.basis * p.energy) @ p.basis.T + later.T @ later
    p.update(later)
    values, vectors = torch.linalg.eigh(moment)
    assert torch.allclose(p.energy, values[-4:].flip(0), rtol=1e-4)
    assert torch.allclose(p.moment(), (vectors[:, -4:] * values[-4:]) @ vectors[:, -4:].T, atol=1e-3)
    for i in range(200):
        x = torch.randn(1 + i % 7, 48, generator=g)                  # fewer rows than d, some inside the span
        p.update(x if i % 2 else x @ p.basis @ p.basis.T)
    eye = torch.eye(4)
    assert torch.allclose(p.basis.T @ p.basis, eye, atol=1e-5) and torch.allclose(p.matrix.T @ p.matrix, eye, atol=1e-5)


def test_the_stored_basis_turns_only_when_it_misses_more_than_keep():
    """A keyframe like those before leaves the stored basis (and so every stored row) as it is; one that brings
    a strong new direction turns it onto the tracked directions, and the rotation carries stored rows over."""
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(32, 5, generator=g)).Q
    seen = (torch.randn(400, 4, generator=g) * torch.tensor([4.0, 3.0, 2.0, 1.0])) @ basis[:, :4].T
    p = FeatureProjection.fit(seen, 4)
    stored = p.matrix.clone()
    again = (torch.randn(400, 4, generator=g) * torch.tensor([4.0, 3.0, 2.0, 1.0])) @ basis[:, :4].T
    assert p.update(again) is None and torch.equal(p.matrix, stored)
    assert p.missed() <= FeatureProjection.KEEP
    # a map file keeps the tracked directions apart from the stored basis
    loaded = FeatureProjection.from_tensors(p.tensors())
    assert not torch.equal(p.basis, p.matrix) and torch.equal(loaded.basis, p.basis)
    assert torch.equal(loaded.matrix, p.matrix) and torch.equal(loaded.energy, p.energy)
    new = torch.randn(400, 1, generator=g) * 20.0 @ basis[:, 4:].T      # a strong direction never seen
    R = p.update(new)
    assert R is not None and torch.equal(p.matrix, p.basis) and p.missed() == 0.0
    assert p.project(new).norm() > 0.99 * new.norm()
    assert torch.allclose(R, stored.T @ p.matrix) and torch.allclose(seen[:3] @ stored @ R, p.project(seen[:3]), atol=1e-3)


def test_projection_rejects_bad_sizes():
    with pytest.raises(ValueError, match='1..4'):
        FeatureProjection.fit(torch.randn(10, 4), 5)
    with pytest.raises(ValueError, match='samples'):
        FeatureProjection.fit(torch.zeros(0, 4), 2)
    with pytest.raises(ValueError):
        FeatureProjection(torch.zeros(4, 8))


def test_update_turns_the_subspace_towards_new_directions():
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(32, 6)).Q
    first, later = torch.randn(200, 3) @ basis[:, :3].T, torch.randn(200, 3) @ basis[:, 3:].T
    p = FeatureProjection.fit(first, 4)
    stored = p.project(first[:5])
    assert p.project(later).norm() < 0.6 * later.norm()                  # most of the new part is missing
    R = p.update(later)
    assert p.project(later).norm() > 0.7 * later.norm()
    assert torch.allclose(p.matrix.T @ p.matrix, torch.eye(4), atol=1e-4)
    # stored features rotate into the new basis; the part of them kept there is exact
    rotated, direct = stored @ R, p.project(first[:5])
    assert torch.allclose(rotated, direct, atol=1e-4)
    frozen = FeatureProjection.fit(first, 4)
    assert frozen.project(later).norm() < p.project(later).norm()


def scene_mapper(compress_dim: int, frames: int = 6, update: bool = True, basis: str = '') -> Mapper:
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device = 'simulated', 'cpu'
    cfg.map.compress_dim, cfg.map.compress_update, cfg.map.compress_basis = compress_dim, update, basis
    cfg.purify.enabled, cfg.purify.iterations = True, 2
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(96, 72)
    for i, T in enumerate(builtin_trajectory(scene, frames, 0)):
        f = render(scene, cam, T)
        m.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
        assert m.map.dim == (compress_dim or 384) and m.query_features().shape[1] == m.map.dim
    return m


@pytest.fixture(scope='module')
def pair():
    return scene_mapper(0), scene_mapper(32)


def test_compressed_map_answers_like_the_full_one(pair):
    full, small = pair
    assert small.projection is not None and small.projection.out_dim == 32
    assert small.map.bytes_per_voxel() < full.map.bytes_per_voxel() - 2 * (384 - 32) + 1
    assert torch.equal(small.map.keys[:small.map.size], full.map.keys[:full.map.size])
    names = list(CLASS_NAMES[1:])
    agree = (small.voxel_labels(names) == full.voxel_labels(names)).float().mean().item()
    assert agree > 0.9, agree
    frozen = scene_mapper(32, update=False)
    assert (frozen.voxel_labels(names) == full.voxel_labels(names)).float().mean().item() < agree
    a, b = full.segment('floor'), small.segment('floor')
    common = {tuple(p) for p in a.xyz.round(3).tolist()} & {tuple(p) for p in b.xyz.round(3).tolist()}
    assert len(common) > 0.8 * max(len(a.xyz), len(b.xyz))


def test_compressed_map_file_records_the_projection(pair, tmp_path):
    _, small = pair
    small.save(tmp_path / 'small.ov3dmap')
    other = Mapper.from_file(tmp_path / 'small.ov3dmap', device='cpu')
    assert other.map.dim == 32 and torch.equal(other.projection.matrix, small.projection.matrix)
    # the moment it follows too, so that the loaded mapper folds later keyframes in as the saving one would
    assert torch.equal(other.projection.basis, small.projection.basis)
    assert torch.equal(other.projection.energy, small.projection.energy)
    a, b = small.segment('table'), other.segment('table')     # loading re-pools the whole map: fp16-close
    assert np.array_equal(a.xyz, b.xyz) and np.allclose(a.scores, b.scores, atol=2e-3)
    # an uncompressed mapper of the same source takes it too; it then keeps integrating in 32 dims
    fresh = scene_mapper(0, frames=1)
    fresh.cfg.map.compress_dim = 0
    fresh.load(tmp_path / 'small.ov3dmap')
    assert fresh.map.dim == 32 and fresh.projection is not None


def test_learned_feature_student_refuses_compression(tmp_path):
    """A student that reads the fused features cannot serve a compressed map (the shipped geometry-only one can)."""
    pytest.importorskip('spconv')
    from ov3d_ros.core.purification.student import StudentAffinityNet, StudentConfig, save_student
    save_student(tmp_path / 'f.safetensors', StudentAffinityNet(StudentConfig(feature_dim=384, width=8, blocks=1)))
    cfg = MapperConfig()
    cfg.features.source, cfg.map.compress_dim = 'simulated', 64
    cfg.purify.enabled, cfg.purify.affinity = True, 'learned'
    cfg.purify.checkpoint = str(tmp_path / 'f.safetensors')
    with pytest.raises(ValueError, match='compress_dim'):
        Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    cfg.map.compress_dim = 0
    cfg.features.source = 'precomputed'
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    with pytest.raises(ValueError, match='384-d'):
        Mapper(cfg, PrecomputedFeatures(['a', 'b'], np.eye(2, 64, dtype=np.float32)))


def test_map_starts_from_the_basis_of_a_saved_map(pair, tmp_path):
    """map.compress_basis: a fresh map takes a compressed map file's basis instead of fitting its first keyframe;
    with updates off it stays fixed, and maps made from it share their coordinates."""
    full, small = pair
    small.save(tmp_path / 'basis.ov3dmap')
    names = list(CLASS_NAMES[1:])

    def seeded(dim, update, frames=6):
        return scene_mapper(dim, frames, update, basis=str(tmp_path / 'basis.ov3dmap'))

    fixed = seeded(32, update=False)
    assert torch.equal(fixed.projection.matrix, small.projection.matrix)          # no fit, no turn
    assert torch.equal(fixed.projection.energy, small.projection.energy)
    assert fixed.map.dim == 32 and torch.equal(fixed.map.keys[:fixed.map.size], full.map.keys[:full.map.size])
    agree = (fixed.voxel_labels(names) == full.voxel_labels(names)).float().mean().item()
    first = scene_mapper(32, update=False)                          # the first keyframe's fit, frozen
    assert agree > 0.9 and agree > (first.voxel_labels(names) == full.voxel_labels(names)).float().mean().item()
    assert torch.equal(seeded(32, update=False, frames=2).projection.matrix, fixed.projection.matrix)
    # fewer dims: the strongest tracked directions of the file
    narrow = seeded(16, update=False, frames=1)
    assert torch.equal(narrow.projection.matrix, small.projection.basis[:, :16]) and narrow.map.dim == 16
    # updates on: the file's moment goes on growing from there
    grown = seeded(32, update=True, frames=2)
    assert grown.projection.energy.sum() > small.projection.energy.sum()
    # a cleared map starts from the file again
    fixed.clear()
    assert fixed.projection is None
    scene, cam = builtin_scene(0), default_camera(96, 72)
    T = builtin_trajectory(scene, 6, 0)[3]
    f = render(scene, cam, T)
    fixed.integrate(Frame(f.rgb, f.depth_m, cam, T, 0.0, f.semantic), force=True)
    assert torch.equal(fixed.projection.matrix, small.projection.matrix)
    # its own file holds the projection: it loads where the basis file is gone
    fixed.save(tmp_path / 'fixed.ov3dmap')
    (tmp_path / 'basis.ov3dmap').unlink()
    loaded = Mapper.from_file(tmp_path / 'fixed.ov3dmap', device='cpu')
    assert torch.equal(loaded.projection.matrix, small.projection.matrix) and loaded.map.size == fixed.map.size


def test_a_basis_the_map_cannot_start_from_is_refused_with_the_reason(pair, tmp_path):
    full, small = pair
    small.save(tmp_path / 'small.ov3dmap')
    full.save(tmp_path / 'full.ov3dmap')
    cases = [(32, 'full.ov3dmap', 'uncompressed map'), (0, 'small.ov3dmap', 'needs map.compress_dim'),
             (48, 'small.ov3dmap', 'fewer than map.compress_dim 48'), (32, 'absent.ov3dmap', 'cannot read')]
    for dim, name, reason in cases:
        cfg = MapperConfig()
        cfg.features.source, cfg.map.compress_dim = 'simulated', dim
        cfg.map.compress_basis = str(tmp_path / name)
        with pytest.raises(ValueError, match=reason):
            Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    (tmp_path / 'cut.ov3dmap').write_bytes((tmp_path / 'small.ov3dmap').read_bytes()[:-100])
    cfg.map.compress_basis = str(tmp_path / 'cut.ov3dmap')
    with pytest.raises(ValueError, match='checksum'):
        Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures     # another feature source
    cfg.features.source, cfg.map.compress_dim = 'precomputed', 16
    cfg.map.compress_basis = str(tmp_path / 'small.ov3dmap')
    with pytest.raises(ValueError, match='made with simulated'):
        Mapper(cfg, PrecomputedFeatures(['a', 'b'], np.eye(2, 384, dtype=np.float32)))
