import pytest
import torch

from ov3d_ros.core.config import PurifyConfig
from ov3d_ros.core.purification.distill import DistillConfig, Teacher, pick_pairs
from ov3d_ros.core.purification.graph import ball_offsets, estimate_normals, neighbour_rows
from ov3d_ros.core.purification.pooling import GeometryPooling
from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys


def plane_map(x_range, dim=4, feature=None, seed=0):
    """Voxels of the plane z = 0 over x in x_range, y in [0, 10) (voxel size 1)."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.meshgrid(torch.arange(*x_range), torch.arange(10), indexing='ij')
    pts = torch.stack([xs.flatten(), ys.flatten(), torch.zeros(xs.numel(), dtype=torch.int64)], 1).float() + 0.5
    feats = torch.randn(len(pts), dim, generator=g) if feature is None else feature.expand(len(pts), -1)
    return pts, feats


def test_offsets_and_neighbours():
    off = ball_offsets(1)
    assert off.shape == (7, 3) and off[0].tolist() == [0, 0, 0]
    assert ball_offsets(2).shape[0] == 33
    m = VoxelFeatureMap(1.0, 2)
    pts, feats = plane_map((0, 10), dim=2)
    m.integrate(pts, feats)
    rows = m.lookup(pack_keys(torch.tensor([[5, 5, 0], [0, 0, 0]])))
    nbr = neighbour_rows(m, rows, off)
    assert (nbr[0] >= 0).sum() == 5 and (nbr[1] >= 0).sum() == 3   # in-plane 4-neighbourhood + itself
    normals = estimate_normals(m, rows, neighbour_rows(m, rows, ball_offsets(2)), ball_offsets(2))
    assert torch.allclose(normals.abs(), torch.tensor([[0.0, 0.0, 1.0]] * 2), atol=1e-5)


def test_pooling_keeps_constant_features_and_is_row_stochastic():
    m = VoxelFeatureMap(1.0, 4)
    pts, _ = plane_map((0, 10), dim=4)
    const = torch.tensor([0.5, -1.0, 2.0, 0.25])
    colors = torch.rand(len(pts), 3, generator=torch.Generator().manual_seed(1)) * 255
    m.integrate(pts, const.expand(len(pts), -1), colors)
    p = GeometryPooling(PurifyConfig(enabled=True, iterations=5, mode='whole'))
    p.update(m)
    assert torch.allclose(p.features(m).float(), const.half().float().expand(len(m), -1), atol=2e-3)


def test_features_never_leak_across_a_gap_wider_than_the_neighbourhood():
    m = VoxelFeatureMap(1.0, 2)
    a, _ = plane_map((0, 6), dim=2)
    b, _ = plane_map((9, 15), dim=2)     # gap of 3 empty voxel columns > radius 2
    m.integrate(a, torch.tensor([[1.0, 0.0]]).expand(len(a), -1))
    m.integrate(b, torch.tensor([[0.0, 1.0]]).expand(len(b), -1))
    p = GeometryPooling(PurifyConfig(enabled=True, radius_vox=2, iterations=18, mode='whole'))
    p.update(m)
    f = p.features(m).float()
    assert torch.all(f[:len(a), 1] == 0) and torch.all(f[len(a):, 0] == 0)


def test_incremental_matches_whole_map_pooling_on_a_growing_map():
    inc = GeometryPooling(PurifyConfig(enabled=True, iterations=4, margin_vox=3))
    whole = GeometryPooling(PurifyConfig(enabled=True, iterations=4, mode='whole'))
    m = VoxelFeatureMap(1.0, 8)
    for k in range(3):                            # the map grows by strips, like keyframes
        pts, feats = plane_map((6 * k, 6 * k + 6), dim=8, seed=k)
        touched = m.integrate(pts, feats, torch.full((len(pts), 3), 100.0))
        inc.update(m, touched)
    whole.update(m)
    err = (inc.features(m).float() - whole.features(m).float()).norm(dim=1) / whole.features(m).float().norm(dim=1)
    assert err.median() < 0.05 and err.max() < 0.5


def test_pick_pairs_uses_the_teacher_for_positives_and_negatives():
    # 6 voxels in a row: segments 0 0 0 1 1 1; knn of voxel 1 = all others
    teacher = Teacher(segments=torch.tensor([0, 0, 0, 1, 1, 1]))
    knn = torch.tensor([[j for j in range(6) if j != i] for i in range(6)])
    cfg = DistillConfig(n_macro=2, n_micro=2, macro_pool=6)
    pos, neg, mask = pick_pairs(teacher, knn, torch.tensor([1, 4]), cfg, torch.Generator().manual_seed(0))
    assert teacher.segments[pos].tolist() == [0, 1]
    assert pos.tolist()[0] in (0, 2) and pos.tolist()[1] in (3, 5)
    seg_neg = teacher.segments[neg]
    assert torch.all(seg_neg[0][mask[0]] == 1) and torch.all(seg_neg[1][mask[1]] == 0)
    assert mask[:, 2:].all()                      # micro negatives: the different-segment neighbours
    feats = Teacher(features=torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1]]), dim=1))
    pos, neg, mask = pick_pairs(feats, torch.tensor([[1, 2], [0, 2], [1, 0]]), torch.tensor([0]),
                                DistillConfig(n_macro=1, n_micro=1, macro_pool=3), torch.Generator().manual_seed(0))
    assert pos.tolist() == [1] and neg[0, 1].item() == 2


def test_student_checkpoint_round_trip(tmp_path):
    pytest.importorskip('spconv')
    from ov3d_ros.core.purification.student import StudentAffinityNet, StudentConfig, load_student, save_student
    torch.manual_seed(0)
    net = StudentAffinityNet(StudentConfig(feature_dim=4, width=8, blocks=1, embed_dim=6, voxel_size_m=1.0)).eval()
    m = VoxelFeatureMap(1.0, 4)
    pts, feats = plane_map((0, 8), dim=4)
    m.integrate(pts, feats, torch.rand(len(pts), 3) * 255)
    rows = torch.arange(len(m))
    normals = torch.tensor([[0.0, 0.0, 1.0]]).expand(len(m), -1)
    e1 = net.embed(m, rows, normals)
    save_student(tmp_path / 's.safetensors', net, {'why': 'test'})
    back = load_student(tmp_path / 's.safetensors')
    for name, t in net.state_dict().items():
        assert torch.equal(back.state_dict()[name], t), name
    e2 = back.embed(m, rows, normals)
    assert e1.shape == (len(m), 6) and torch.allclose(e1, e2, atol=1e-5)
    assert torch.allclose(e1.norm(dim=1), torch.ones(len(m)), atol=1e-5)
    with pytest.raises(ValueError, match='no such file'):
        load_student(tmp_path / 'missing.safetensors')
    (tmp_path / 'bad.safetensors').write_bytes(b'garbage')
    with pytest.raises(ValueError, match='not a usable student checkpoint'):
        load_student(tmp_path / 'bad.safetensors')


def test_student_embeddings_repeat_exactly():
    """spconv's CPU kernels race on several threads; the student must give the same answer every time."""
    pytest.importorskip('spconv')
    from ov3d_ros.core.purification.student import StudentAffinityNet, StudentConfig
    torch.manual_seed(0)
    net = StudentAffinityNet(StudentConfig(feature_dim=4, width=16, blocks=2, embed_dim=8, voxel_size_m=1.0)).eval()
    m = VoxelFeatureMap(1.0, 4)
    pts = torch.unique(torch.randint(0, 12, (3000, 3)), dim=0).float() + 0.5
    m.integrate(pts, torch.randn(len(pts), 4), torch.rand(len(pts), 3) * 255)
    rows, normals = torch.arange(len(m)), torch.nn.functional.normalize(torch.randn(len(m), 3), dim=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        first = net.embed(m, rows, normals)
        for _ in range(10):
            assert torch.allclose(net.embed(m, rows, normals), first, atol=1e-5)
        assert torch.get_num_threads() == 2             # restored after the single-threaded spconv section
    finally:
        torch.set_num_threads(threads)


def test_shipped_checkpoint_is_a_geometry_only_label_free_student():
    pytest.importorskip('spconv')
    from ov3d_ros.core.purification.student import DEFAULT_CHECKPOINT, load_student, student_notes
    assert DEFAULT_CHECKPOINT.stat().st_size < 20 * 2 ** 20
    net = load_student('default')
    assert not net.reads_features and net.cfg.feature_dim == 0 and net.cfg.voxel_size_m == 0.05
    notes = student_notes('default')
    assert notes['teacher'] == 'ssl' and not notes['oracle'] and notes['command'].startswith('ov3d train-affinity')
    m = VoxelFeatureMap(0.05, 7)
    pts, feats = plane_map((0, 30), dim=7)
    m.integrate(pts * 0.05, feats, torch.rand(len(pts), 3) * 255)
    e = net.embed(m, torch.arange(len(m)), torch.tensor([[0.0, 0.0, 1.0]]).expand(len(m), -1))
    assert e.shape == (len(m), net.cfg.embed_dim) and torch.allclose(e.norm(dim=1), torch.ones(len(m)), atol=1e-4)


def step_frame(k, rgb_w=64, rgb_h=48):
    """A wall 2 m away with a box 1.5 m away on its lower left, seen from a camera sliding along x."""
    import numpy as np
    from ov3d_ros.core.camera import PinholeCamera
    cam = PinholeCamera(40.0, 40.0, (rgb_w - 1) / 2, (rgb_h - 1) / 2, rgb_w, rgb_h)
    depth = np.full((rgb_h, rgb_w), 2.0, np.float32)
    labels = np.full((rgb_h, rgb_w), 1, np.uint16)
    rgb = np.full((rgb_h, rgb_w, 3), 200, np.uint8)
    depth[rgb_h // 2:, :rgb_w // 2], labels[rgb_h // 2:, :rgb_w // 2] = 1.5, 2
    rgb[rgb_h // 2:, :rgb_w // 2] = (120, 70, 30)
    T = np.eye(4)
    T[0, 3] = 0.1 * k
    return cam, depth, labels, rgb, T


@pytest.mark.parametrize('source', ['simulated', 'precomputed64', 'clip512', 'compressed'])
def test_the_same_shipped_student_purifies_any_feature_source_and_dimension(source):
    """One checkpoint, no retraining: simulated 384-d, precomputed 64-d, CLIP ViT-B-16 512-d (random weights,
    real architecture) and a map compressed to 16 dimensions, online (incremental) and offline (whole)."""
    pytest.importorskip('spconv')
    import numpy as np
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    from ov3d_ros.core.mapper import Frame, Mapper
    names = ['unlabeled', 'wall', 'chair']
    cfg = MapperConfig()
    cfg.map.voxel_size_m, cfg.map.pixel_stride, cfg.keyframes.min_translation_m = 0.05, 1, 0.0
    cfg.purify.enabled, cfg.purify.affinity, cfg.purify.checkpoint = True, 'learned', 'default'
    cfg.purify.iterations = 2
    vectors, ext = None, None
    if source in ('simulated', 'compressed'):
        cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
        cfg.map.compress_dim = 16 if source == 'compressed' else 0
    elif source == 'precomputed64':
        vectors = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
        ext = PrecomputedFeatures(names, vectors)
    else:
        pytest.importorskip('open_clip')
        from ov3d_ros.core.features.clip_dense import OpenClipDenseExtractor
        torch.manual_seed(0)
        cfg.features.model, cfg.features.pretrained, cfg.features.image_short_side = 'ViT-B-16', 'none', 64
        ext = OpenClipDenseExtractor(cfg.features, 'cpu')
    expected_dim = {'simulated': 384, 'precomputed64': 64, 'clip512': 512, 'compressed': 16}[source]
    answers = {}
    for mode in ('incremental', 'whole'):
        cfg.purify.mode = mode
        # a fresh simulated source per run: its seeded errors follow a per-keyframe counter
        m = Mapper(cfg, ext if ext is not None else create_extractor(cfg.features, 'cpu', names))
        for k in range(3):
            cam, depth, labels, rgb, T = step_frame(k)
            feats = vectors[labels][::4, ::4] if vectors is not None else None
            assert m.integrate(Frame(rgb, depth, cam, T, float(k), labels if source != 'clip512' else None, feats))
        raw, pooled = m.map.features[:len(m.map)].float(), m.query_features().float()
        assert pooled.shape == (len(m.map), expected_dim) == raw.shape
        assert torch.isfinite(pooled).all() and not torch.allclose(pooled, raw, atol=1e-3)
        assert m.purifier.embeddings is not None and m.purifier.embeddings.shape[1] == m.purifier.embed.__self__.cfg.embed_dim
        answers[mode] = pooled
    err = (answers['incremental'] - answers['whole']).norm(dim=1) / answers['whole'].norm(dim=1).clamp_min(1e-6)
    assert err.median() < 0.1
