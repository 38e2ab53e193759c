"""Mapper end to end on a hand-made frame with the simulated feature source (real MiniLM text space)."""
import numpy as np
import pytest
import torch

from ov3d_ros.core.camera import PinholeCamera
from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.features.base import FeatureExtractor
from ov3d_ros.core.mapper import Frame, Mapper

NAMES = ['unlabeled', 'wall', 'chair', 'plant']


@pytest.fixture(scope='module')
def mapper():
    cfg = MapperConfig()
    cfg.features.source = 'simulated'
    cfg.features.sim_patch_px = 4
    cfg.map.voxel_size_m = 0.1
    cfg.map.pixel_stride = 1
    return Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))


def wall_frame():
    """A wall 2 m in front of the camera; left half labelled chair, right half plant, top rows wall, each region
    in a colour of its own (different objects: the superpoint vote follows colour and geometry)."""
    cam = PinholeCamera(40.0, 40.0, 31.5, 23.5, 64, 48)
    depth = np.full((48, 64), 2.0, np.float32)
    labels = np.full((48, 64), 1, np.uint16)
    labels[16:, :32] = 2
    labels[16:, 32:] = 3
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[16:, :32] = (60, 60, 200)
    rgb[16:, 32:] = (40, 160, 40)
    return Frame(rgb, depth, cam, np.eye(4), 0.0, labels)


def test_simulated_features_follow_labels(mapper):
    f = wall_frame()
    grid = mapper.extractor.extract(f.rgb, f.labels)
    assert grid.shape == (12, 16, mapper.extractor.dim)
    assert np.allclose(np.linalg.norm(grid.numpy(), axis=-1), 1.0, atol=1e-5)
    chair = mapper.embed_texts(['chair'])[0]
    sims = grid @ chair
    assert sims[8, 2] > 0.8 > sims[8, 12]


def test_fusion_keeps_each_voxels_direction_to_the_camera():
    """The Mapper gives fusion the keyframe's camera centre: every voxel of a wall 2 m ahead faces the camera,
    and the direction turns as the camera moves (what orients normals for the superpoint vote)."""
    cfg = MapperConfig()
    cfg.features.source = 'simulated'
    cfg.map.voxel_size_m, cfg.purify.enabled = 0.1, False
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    f = wall_frame()
    assert m.integrate(f, force=True)
    n = m.map.size
    to_camera = -m.map.centers()                                      # the camera sits at the origin
    to_camera /= to_camera.norm(dim=1, keepdim=True)
    assert torch.allclose(m.map.views[:n], to_camera, atol=1e-5)
    moved = Frame(f.rgb, f.depth_m, f.camera, np.array(f.T_W_C), 1.0, f.labels)
    moved.T_W_C[0, 3] = 1.0                                           # 1 m to the right: the wall moves too
    assert m.integrate(moved, force=True)
    assert m.map.size > n and float(m.map.views[:m.map.size, 0].max()) > 0.2


def test_segment_finds_the_labelled_region(mapper):
    f = wall_frame()
    assert mapper.integrate(f)
    assert not mapper.integrate(f)             # same pose, same time: not a keyframe
    assert len(mapper.map) > 50
    seg = mapper.segment('chair')
    assert len(seg.xyz) > 10
    # chair is the lower-left region: camera x < 0 and y > -0.4 (optical frame, map = camera here)
    assert np.mean(seg.xyz[:, 0] < 0.05) > 0.95
    assert np.all(seg.scores >= mapper.cfg.query.default_threshold)
    assert np.mean(np.all(seg.rgb == (60, 60, 200), axis=1)) > 0.9    # the chair region's colour
    plant = mapper.segment('plant', negatives=['wall', 'chair'])
    assert np.mean(plant.xyz[:, 0] > -0.05) > 0.95
    assert len(mapper.segment('chair', negatives=['chair', 'wall', 'plant']).xyz) > 0  # query itself dropped


def test_query_equal_to_a_negative_up_to_case_is_not_its_own_negative(mapper):
    """The tokenizers lowercase: 'Wall' against the default negative 'wall' used to tie everywhere (no answer)."""
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    assert 'wall' in mapper.cfg.query.default_negatives
    upper = mapper.segment('Wall')
    assert len(upper.xyz) > 10 and np.mean(upper.xyz[:, 1] < 0) > 0.95      # the top rows (camera y < 0)
    assert np.array_equal(upper.xyz, mapper.segment(' wall ').xyz)
    # every negative equals the query: the default negatives minus the query, not the whole map
    same = mapper.segment('chair', negatives=['Chair', ' CHAIR  '])
    assert np.array_equal(same.xyz, mapper.segment('chair').xyz) and len(same.xyz) < len(mapper.map) // 2
    saved = list(mapper.cfg.query.default_negatives)
    try:
        mapper.cfg.query.default_negatives = ['WALL']
        with pytest.raises(ValueError, match='no negative text differs from the query'):
            mapper.segment('wall', negatives=['Wall'])
    finally:
        mapper.cfg.query.default_negatives = saved


def test_text_embeddings_are_cached_per_text(mapper):
    calls = []
    encode = mapper.extractor.encode_text
    mapper.extractor.encode_text = lambda texts: calls.append(list(texts)) or encode(texts)
    try:
        mapper.embed_texts(['sofa', 'wall', 'floor'])
        first = len(calls)
        again = mapper.embed_texts(['bed', 'wall', 'floor'])       # only 'bed' is new
        assert len(calls) == first + 1 and all('bed' in p for p in calls[-1])
        assert np.allclose(again[1:].numpy(), mapper.embed_texts(['wall', 'floor']).numpy())
        assert len(calls) == first + 1
    finally:
        mapper.extractor.encode_text = encode


def test_segment_rejects_bad_requests(mapper):
    with pytest.raises(ValueError, match='empty'):
        mapper.segment('   ')
    with pytest.raises(ValueError, match='threshold'):
        mapper.segment('chair', threshold=float('nan'))
    with pytest.raises(ValueError, match='threshold'):
        mapper.segment('chair', threshold=3.0)


def test_mapper_refuses_config_values_out_of_range():
    """Every config field with a range or choices is checked when a Mapper is made (the node, the ov3d tools and
    the Python API alike), each problem named; the defaults pass."""
    from dataclasses import fields
    from ov3d_ros.core.config import CHECKS, validate
    cfg = MapperConfig()
    names = {f'{s.name}.{f.name}' for s in fields(cfg) for f in fields(getattr(cfg, s.name))}
    assert set(CHECKS) <= names                                  # no misspelt field
    validate(cfg)
    cfg.features.source = 'simulated'
    extractor = create_extractor(cfg.features, 'cpu', NAMES)
    for name, value in (('map.pixel_stride', 0), ('map.max_voxels', -5), ('map.initial_capacity', 0),
                        ('map.compress_dim', -2), ('query.default_threshold', 2.0), ('purify.iterations', -1),
                        ('labels.temperature', -1.0), ('keyframes.min_translation_m', float('nan')),
                        ('features.sim_patch_px', 0), ('features.sim_view_flip', 1.5), ('objects.gap_vox', -1),
                        ('query.templates', ['no placeholder']), ('features.source', 'bogus'),
                        ('map.pixel_stride', 10 ** 20), ('map.pixel_stride', 65), ('map.max_voxels', 2 ** 63),
                        ('purify.radius_vox', 20), ('labels.smoothing_radius_vox', 20)):
        section, key = name.split('.')
        bad = MapperConfig()
        bad.features.source = 'simulated'
        setattr(getattr(bad, section), key, value)
        with pytest.raises(ValueError, match=rf'^{name} (must|every)'):
            Mapper(bad, extractor)
    bad = MapperConfig()
    bad.features.source, bad.map.compress_dim = 'simulated', extractor.dim + 1   # was stored uncompressed
    with pytest.raises(ValueError, match=rf'^map.compress_dim {extractor.dim + 1} is more than the {extractor.dim} '):
        Mapper(bad, extractor)
    bad = MapperConfig()
    bad.map.min_depth_m, bad.map.max_depth_m, bad.map.voxel_size_m = 6.0, 5.0, 0.0
    with pytest.raises(ValueError) as e:
        Mapper(bad, extractor)
    assert str(e.value) == ('map.voxel_size_m must be a finite number > 0, got 0.0; '
                            'map.min_depth_m (6) must be below map.max_depth_m (5)')


def test_integrate_rejects_mismatched_frames(mapper):
    f = wall_frame()
    with pytest.raises(ValueError, match='depth is 64x48'):
        mapper.integrate(Frame(f.rgb[:24], f.depth_m, f.camera, f.T_W_C, 1.0, f.labels))
    with pytest.raises(ValueError, match='camera info'):
        mapper.integrate(Frame(f.rgb, f.depth_m, PinholeCamera(40, 40, 31.5, 23.5, 32, 24), f.T_W_C, 1.0, f.labels))
    bad_pose = np.eye(4)
    bad_pose[0, 3] = np.nan
    with pytest.raises(ValueError, match='pose'):
        mapper.integrate(Frame(f.rgb, f.depth_m, f.camera, bad_pose, 1.0, f.labels))


def test_a_far_depth_limit_does_not_refuse_frames_that_see_less_far():
    """The map's key range bounds what a frame reaches: with map.max_depth_m = 100 km (no limit, in effect) a wall
    2 m away is fused; the same wall 90 km away, which the limit still takes, is refused with the reason."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.max_depth_m = 0.1, 1e5
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    assert m.integrate(wall_frame(), force=True) and m.map.size > 0
    f = wall_frame()
    with pytest.raises(ValueError, match='frame reaches beyond the map range'):
        m.integrate(Frame(f.rgb, np.full_like(f.depth_m, 9e4), f.camera, f.T_W_C, 1.0, f.labels), force=True)


def test_label_points_nearest_voxel_and_unobserved(mapper):
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    # a point on the chair part of the wall, one on the plant part, one far away (unobserved)
    pts = np.array([[-0.8, 0.5, 2.0], [0.8, 0.5, 2.0], [0.0, 0.0, 9.0]])
    assert mapper.label_points(pts, mapper.voxel_labels(NAMES[1:])).tolist() == [1, 2, -1]   # into NAMES[1:]


def test_save_and_reload_answer_identically(mapper, tmp_path):
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    path = tmp_path / 'wall.ov3dmap'
    mapper.save(path)
    other = Mapper.from_file(path, device='cpu')
    assert len(other.map) == len(mapper.map) and other.num_keyframes == mapper.num_keyframes
    a, b = mapper.segment('chair'), other.segment('chair')
    assert np.array_equal(a.xyz, b.xyz) and np.allclose(a.scores, b.scores)


def test_a_loaded_map_keeps_its_voxel_size_until_the_map_is_cleared(mapper, tmp_path):
    import copy
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    mapper.save(tmp_path / 'coarse.ov3dmap')                        # 10 cm voxels
    cfg = copy.deepcopy(mapper.cfg)
    cfg.map.voxel_size_m = 0.05
    fine = Mapper(cfg, mapper.extractor)
    fine.load(tmp_path / 'coarse.ov3dmap')
    assert fine.cfg.map.voxel_size_m == fine.map.voxel_size_m == 0.1 and len(fine.map) == len(mapper.map)
    fine.clear()                                                    # back to the configured grid
    assert fine.cfg.map.voxel_size_m == fine.map.voxel_size_m == 0.05
    fine.integrate(wall_frame(), force=True)
    assert len(fine.map) > len(mapper.map)                          # the same wall in smaller voxels


def test_precomputed_maps_load_only_under_their_own_text_table(tmp_path):
    """A precomputed map is queried through the loading mapper's text table: the same table (another mapper, the
    same names and vectors) takes it, another table refuses it with the reason and keeps the current map."""
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    from ov3d_ros.core.map_io import MapFileError
    table = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device, cfg.purify.enabled = 'precomputed', 'cpu', False
    made = Mapper(cfg, PrecomputedFeatures(['wall', 'chair', 'plant'], table))
    f = wall_frame()
    made.integrate(Frame(f.rgb, f.depth_m, f.camera, f.T_W_C, 0.0, features=np.tile(table[1], (12, 16, 1))))
    made.save(tmp_path / 'p.ov3dmap')
    same = Mapper(cfg, PrecomputedFeatures(['wall', 'chair', 'plant'], table.copy()))
    same.load(tmp_path / 'p.ov3dmap')
    assert same.map.size == made.map.size > 0 and len(same.segment('chair', ['wall', 'plant'], 0.5).xyz) > 0
    assert Mapper.from_file(tmp_path / 'p.ov3dmap', 'cpu').map.size == made.map.size    # its own table, read back
    for names, vectors in ((['wall', 'plant', 'chair'], table), (['wall', 'chair', 'plant'], np.roll(table, 1, 1))):
        other = Mapper(cfg, PrecomputedFeatures(names, vectors))
        with pytest.raises(MapFileError, match='made with another precomputed text table'):
            other.load(tmp_path / 'p.ov3dmap')
        assert other.map.size == 0


def test_load_refuses_a_foreign_map_and_keeps_the_current_one(mapper, tmp_path):
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    from ov3d_ros.core.map_io import MapFileError
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    cfg = MapperConfig()
    other = Mapper(cfg, PrecomputedFeatures(['chair', 'wall'], np.eye(2, 16, dtype=np.float32)))
    f = wall_frame()
    feats = np.zeros((3, 4, 16), np.float32)
    feats[..., 0] = 1.0
    other.integrate(Frame(f.rgb, f.depth_m, f.camera, f.T_W_C, 0.0, None, feats), force=True)
    other.save(tmp_path / 'pre.ov3dmap')
    before = len(mapper.map)
    with pytest.raises(MapFileError, match='precomputed'):
        mapper.load(tmp_path / 'pre.ov3dmap')
    assert len(mapper.map) == before
    reopened = Mapper.from_file(tmp_path / 'pre.ov3dmap', device='cpu')
    assert reopened.extractor.names == ['chair', 'wall']
    assert len(reopened.segment('chair', negatives=['wall']).xyz) == len(reopened.map)


@pytest.mark.parametrize('mode', ['incremental', 'whole'])
def test_purified_map_answers_queries(mode):
    """With purification on, queries read pooled features: smoother than the raw fusion, same answer."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.pixel_stride = 0.1, 1
    cfg.purify.enabled, cfg.purify.mode, cfg.purify.iterations = True, mode, 4
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    assert m.integrate(wall_frame())
    raw, pooled = m.map.features[:len(m.map)].float(), m.query_features().float()
    assert pooled.shape == raw.shape and not np.allclose(pooled.numpy(), raw.numpy())
    # pooling averages neighbours: features vary less from voxel to voxel (no new extremes)
    assert pooled.norm(dim=1).max() <= raw.norm(dim=1).max() + 1e-3
    seg = m.segment('chair')
    assert len(seg.xyz) > 10 and np.mean(seg.xyz[:, 0] < 0.05) > 0.9


@pytest.mark.parametrize('purify', [False, True])
def test_voxel_budget_evicts_farthest_from_the_camera(purify):
    import torch
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device, cfg.map.max_voxels = 'simulated', 'cpu', 3000
    cfg.purify.enabled, cfg.purify.iterations = purify, 3
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(96, 72)
    sizes = []
    for i, T in enumerate(builtin_trajectory(scene, 10, 0)):
        f = render(scene, cam, T)
        m.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
        sizes.append(m.map.size)
        assert m.map.size <= 3000
    assert m.evicted_voxels > 0 and max(sizes) <= 3000
    if purify:
        assert m.query_features().shape[0] == m.map.size
    # eviction keeps exactly the voxels nearest to the given position
    centres, pos = m.map.centers().clone(), torch.tensor([1.013, 1.027, 0.531])   # off-grid: no distance ties
    nearest = set(m.map.keys[torch.argsort((centres - pos).norm(dim=1))[:1000]].tolist())
    assert m.evict(pos.numpy(), 1000) == len(centres) - 1000
    assert set(m.map.keys[:m.map.size].tolist()) == nearest
    assert len(m.segment('floor').xyz) > 0


class ColourFeatures(FeatureExtractor):
    """A tiny real-image feature source: each 8x8 cell's mean colour as a unit 3-vector (batched or not)."""
    name, dim, uses_templates = 'colour', 3, False
    batches = 0

    def extract(self, rgb, labels=None):
        return self.extract_batch([rgb])[0]

    def extract_batch(self, images):
        import torch
        type(self).batches += 1
        x = torch.from_numpy(np.stack(images)).float()
        B, H, W, _ = x.shape
        cells = x.reshape(B, H // 8, 8, W // 8, 8, 3).mean(dim=(2, 4)) + 1.0
        return torch.nn.functional.normalize(cells, dim=-1)

    def encode_text(self, texts):
        raise NotImplementedError


def test_integrate_batch_extracts_keyframes_together_and_matches_one_by_one():
    import torch
    frames = []
    for i in range(4):
        f = wall_frame()
        f.rgb[..., 1] = 60 * i
        f.T_W_C = np.eye(4)
        f.T_W_C[0, 3] = 0.2 * (i // 2)        # frames 0-1 and 2-3 share a pose: 2 keyframes
        f.labels, f.stamp_s = None, 0.01 * i
        frames.append(f)
    cfg = MapperConfig()
    cfg.map.voxel_size_m, cfg.keyframes.max_interval_s = 0.1, 0.0
    one, batch = Mapper(cfg, ColourFeatures()), Mapper(cfg, ColourFeatures())
    assert sum(one.integrate(f) for f in frames) == 2
    ColourFeatures.batches = 0
    assert batch.integrate_batch(frames) == 2 and ColourFeatures.batches == 1
    assert batch.num_keyframes == 2 and torch.equal(batch.map.keys[:batch.map.size], one.map.keys[:one.map.size])
    assert torch.allclose(batch.map.features[:batch.map.size].float(), one.map.features[:one.map.size].float())


def test_clear_radius_keeps_a_local_map_around_the_camera():
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device, cfg.map.clear_radius_m = 'simulated', 'cpu', 2.0
    cfg.labels.vocabulary = ['floor', 'wall']
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(96, 72)
    for i, T in enumerate(builtin_trajectory(scene, 8, 0)):
        f = render(scene, cam, T)
        m.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
        d = np.linalg.norm(m.map.centers().numpy() - T[:3, 3], axis=1)
        assert m.map.size > 0 and d.max() <= 2.0
    assert m.evicted_voxels > 0 and m.label_classes()[0].shape == (m.map.size,)


def test_memory_report_covers_every_byte_of_bytes_per_voxel(mapper):
    report = mapper.memory_report()
    assert report['features'] == 2 * mapper.map.dim and report['index'] > 0 and report['keys'] == 8
    assert round(sum(report.values())) == mapper.bytes_per_voxel()


def _purified_mapper(vocabulary=('wall', 'chair', 'plant'), voxel_size_m=0.1, **purify):
    """A mapper with learned purification (shipped student) and a label volume, after two keyframes."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.voxel_size_m, cfg.map.pixel_stride = voxel_size_m, 1
    cfg.purify.enabled, cfg.purify.affinity, cfg.purify.iterations = True, 'learned', 4
    for k, v in purify.items():
        setattr(cfg.purify, k, v)
    cfg.labels.vocabulary = list(vocabulary)
    m = Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))
    m.integrate(wall_frame(), force=True)
    m.integrate(_moved(wall_frame(), 0.35), force=True)
    return m


def _moved(frame, dx_m):
    T = np.eye(4)
    T[0, 3] = dx_m
    return Frame(frame.rgb, frame.depth_m, frame.camera, T, frame.stamp_s + 1.0, frame.labels)


@pytest.fixture()
def pooling_calls(monkeypatch):
    """Counts GeometryPooling.update calls (each one a re-pooling of some or all voxels)."""
    from ov3d_ros.core.purification.pooling import GeometryPooling
    calls, update = [], GeometryPooling.update

    def counted(self, vmap, touched=None, channels=()):
        calls.append(None if touched is None else len(touched))
        return update(self, vmap, touched, channels)
    monkeypatch.setattr(GeometryPooling, 'update', counted)
    return calls


def test_purified_layers_are_restored_as_saved_with_the_same_settings(tmp_path, pooling_calls):
    import torch
    from ov3d_ros.core.purification.student import DEFAULT_CHECKPOINT
    m = _purified_mapper()
    m.save(tmp_path / 'p.ov3dmap')
    pooling_calls.clear()
    other = Mapper.from_file(tmp_path / 'p.ov3dmap', device='cpu')
    assert pooling_calls == []                                        # nothing re-pooled
    for name in ('purified', 'normals', 'embeddings', 'label_evidence', 'label_pooled', 'features'):
        assert torch.equal(other.map.cake.rows(name), m.map.cake.rows(name)), name
    assert torch.equal(other.query_features(), m.query_features())
    a, b = m.segment('red chair'), other.segment('red chair')
    assert np.array_equal(a.xyz, b.xyz) and np.array_equal(a.scores, b.scores)
    assert torch.equal(other.label_classes()[0], m.label_classes()[0])
    # purification continues incrementally from the restored layers exactly as from the original ones
    other.extractor.reset(m.extractor.frame_index)                    # the same simulated errors for the next frame
    f = _moved(wall_frame(), -0.4)
    m.integrate(f, force=True)
    other.integrate(f, force=True)
    assert len(pooling_calls) == 2 and None not in pooling_calls      # one incremental update each
    assert torch.equal(other.query_features(), m.query_features())
    # the checkpoint is named by its contents: a copy elsewhere restores as well
    copy = tmp_path / 'student.safetensors'
    copy.write_bytes(DEFAULT_CHECKPOINT.read_bytes())
    cfg = other.cfg
    cfg.purify.checkpoint = str(copy)
    pooling_calls.clear()
    Mapper(cfg, other.extractor).load(tmp_path / 'p.ov3dmap')
    assert pooling_calls == []


@pytest.mark.parametrize('change', ['iterations', 'checkpoint', 'fallback', 'newly enabled', 'no layers'])
def test_other_purification_settings_re_pool_the_loaded_map(change, tmp_path, pooling_calls):
    import copy as copy_
    from dataclasses import asdict

    import torch
    from ov3d_ros.core.map_io import save_map
    from ov3d_ros.core.purification.student import DEFAULT_CHECKPOINT
    m = _purified_mapper()
    path = tmp_path / 'p.ov3dmap'
    m.save(path)
    cfg = copy_.deepcopy(m.cfg)
    if change == 'iterations':
        cfg.purify.iterations = 6
    elif change == 'checkpoint':
        cfg.purify.checkpoint = str(DEFAULT_CHECKPOINT.parent / 'ablation' / 'student_s1.safetensors')
    elif change == 'fallback':
        cfg.purify.affinity = 'fallback'
    elif change == 'newly enabled':                  # a map saved without purification
        raw = copy_.deepcopy(m.cfg)
        raw.purify.enabled = False
        plain = Mapper(raw, m.extractor)
        plain.load(path)
        assert 'purified' not in plain.map.cake and 'label_pooled' not in plain.map.cake
        plain.save(path)
    else:                                            # a file as written before purified layers were saved
        info = {'feature_source': m.extractor.name, 'config': asdict(m.cfg), 'keyframes': m.num_keyframes,
                'class_names': NAMES, 'vocabulary': m.labels.names}
        save_map(path, m.map, info, skip_layers=('purified', 'normals', 'embeddings', 'label_pooled'))
    other = Mapper(cfg, m.extractor)
    pooling_calls.clear()
    other.load(path)
    assert pooling_calls == [None]                                    # one whole-map pooling
    ref = Mapper(copy_.deepcopy(cfg), m.extractor)                    # the same settings, pooled from scratch
    ref.load(path)
    assert torch.equal(other.query_features(), ref.query_features())
    if change != 'newly enabled' and change != 'no layers':
        assert not torch.equal(other.query_features(), m.query_features())
    assert other.labels.pooled is not None and float(other.labels.pooled[:other.map.size].sum()) > 0


def test_purification_settings_that_fail_to_re_pool_are_undone(monkeypatch, tmp_path):
    """Settings whose whole-map re-pool fails (here: out of memory, as a neighbourhood of radius 20 runs into)
    are refused and undone: the map is pooled with the previous settings again, and a save records those."""
    import copy as copy_
    from dataclasses import replace

    import torch
    from ov3d_ros.core.map_io import load_map
    from ov3d_ros.core.purification.pooling import GeometryPooling
    m = _purified_mapper()
    ref = Mapper(copy_.deepcopy(m.cfg), m.extractor)
    m.save(tmp_path / 'a.ov3dmap')
    ref.load(tmp_path / 'a.ov3dmap')
    ref.reconfigure_purification(copy_.deepcopy(ref.cfg.purify))     # the map pooled from scratch, these settings
    update = GeometryPooling.update

    def out_of_memory_for_radius_3(self, vmap, touched=None, channels=()):
        if self.cfg.radius_vox == 3:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return update(self, vmap, touched, channels)
    monkeypatch.setattr(GeometryPooling, 'update', out_of_memory_for_radius_3)
    with pytest.raises(ValueError, match=r'not applied \(the map is pooled with the previous ones\).*allocate'):
        m.reconfigure_purification(replace(m.cfg.purify, radius_vox=3))
    assert m.cfg.purify.radius_vox == 2 and m.purifier.cfg.radius_vox == 2
    assert torch.equal(m.query_features(), ref.query_features())
    assert torch.equal(m.label_classes()[0], ref.label_classes()[0])
    m.save(tmp_path / 'b.ov3dmap')
    assert load_map(tmp_path / 'b.ov3dmap')[1]['purification']['radius_vox'] == 2
    # the same with purification off before: the map is left unpurified, as it was
    m.reconfigure_purification(replace(m.cfg.purify, enabled=False))
    with pytest.raises(ValueError, match='not applied'):
        m.reconfigure_purification(replace(m.cfg.purify, enabled=True, radius_vox=3))
    assert m.purifier is None and not m.cfg.purify.enabled and 'purified' not in m.map.cake
    assert torch.equal(m.query_features(), m.map.features[:m.map.size])


def test_a_vocabulary_is_embedded_ahead_without_touching_the_map(mapper):
    """prepare_vocabulary embeds the names (the node runs it without the map lock); set_vocabulary then finds them
    cached and encodes nothing."""
    calls = []
    mapper.texts.clear()                        # earlier tests embedded these names
    encode = mapper.texts.encode_text
    mapper.texts.encode_text = lambda texts: calls.append(list(texts)) or encode(texts)
    try:
        generation, size = mapper.generation, len(mapper.map)
        mapper.prepare_vocabulary([' sofa ', 'bed'])
        assert calls and (mapper.generation, len(mapper.map), mapper.labels) == (generation, size, None)
        encoded = len(calls)
        mapper.set_vocabulary(['sofa', 'bed'])
        assert len(calls) == encoded and mapper.labels.names == ['sofa', 'bed']
        with pytest.raises(ValueError, match='unique'):
            mapper.prepare_vocabulary(['bed', 'Bed'])
    finally:
        mapper.texts.encode_text = encode
        mapper.set_vocabulary([])


def _state(m):
    """What a query or a save of ``m`` reads: its map rows, features, purified features, label volume, settings."""
    labels = None if m.labels is None else (list(m.labels.names), m.label_classes()[0].clone())
    return (m.map, m.map.size, m.map.voxel_size_m, m.cfg.map.voxel_size_m, list(m.cfg.labels.vocabulary),
            m.num_keyframes, m.query_features().clone(), labels, sorted(m.map.cake.layers))


def _same(a, b):
    assert a[:6] == b[:6] and a[8] == b[8], (a[:6], b[:6], a[8], b[8])
    assert torch.equal(a[6], b[6])
    assert (a[7] is None) == (b[7] is None) and (a[7] is None or (a[7][0] == b[7][0] and torch.equal(a[7][1], b[7][1])))


def test_a_load_or_vocabulary_change_that_fails_half_way_leaves_the_mapper_as_it_was(monkeypatch, tmp_path):
    """Running out of memory after the new map (or vocabulary) was swapped in, while the label volume or the
    pooling is recomputed, undoes the change: the map, its grid, its label volume and its purified features are
    those from before, and the mapper goes on integrating."""
    from ov3d_ros.core.purification.pooling import GeometryPooling
    m = _purified_mapper()
    other = _purified_mapper(('sofa', 'table'), voxel_size_m=0.05)
    other.save(tmp_path / 'fine.ov3dmap')                       # 5 cm voxels, another vocabulary
    m.cfg.labels.vocabulary = ['wall', 'chair', 'plant']
    before = _state(m)
    update = GeometryPooling.update

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
    with monkeypatch.context() as patch:
        patch.setattr(m.texts, 'encode_text', out_of_memory)
        with pytest.raises(RuntimeError, match='allocate'):
            m.load(tmp_path / 'fine.ov3dmap')                     # the file's vocabulary embedded: out of memory
    _same(_state(m), before)
    m.prepare_vocabulary(['sofa', 'bed'])
    with monkeypatch.context() as patch:
        patch.setattr(GeometryPooling, 'update', out_of_memory)
        with pytest.raises(RuntimeError, match='allocate'):
            m.set_vocabulary(['sofa', 'bed'])                     # the new evidence pooled: out of memory
    _same(_state(m), before)
    m.integrate(_moved(wall_frame(), -0.35), force=True)        # still a working mapper
    assert m.map.size > before[1] and m.labels.names == ['wall', 'chair', 'plant']
    m.load(tmp_path / 'fine.ov3dmap')                             # and the same calls now succeed
    assert m.map.voxel_size_m == 0.05 and m.labels.names == ['sofa', 'table']


def test_a_map_file_is_read_once_to_open_it(mapper, tmp_path, monkeypatch):
    """Mapper.from_file takes the config and the map from one read of the file (it read it twice: twice the time,
    and a file replaced in between, e.g. by a node's autosave, gave the config of one version and the map of
    another)."""
    from ov3d_ros.core import map_io
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    mapper.save(tmp_path / 'm.ov3dmap')
    reads = []
    load_map = map_io.load_map
    monkeypatch.setattr(map_io, 'load_map', lambda *a, **k: reads.append(a[0]) or load_map(*a, **k))
    opened = Mapper.from_file(tmp_path / 'm.ov3dmap', 'cpu')
    assert len(reads) == 1 and opened.map.size == mapper.map.size
    assert torch.equal(opened.map.keys[:opened.map.size], mapper.map.keys[:mapper.map.size])


def _labelled_mapper(vocabulary, **labels):
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px, cfg.features.sim_preset = 'simulated', 4, 'clean'
    cfg.map.voxel_size_m, cfg.map.pixel_stride, cfg.purify.enabled = 0.1, 1, False
    cfg.labels.vocabulary = list(vocabulary)
    for k, v in labels.items():
        setattr(cfg.labels, k, v)
    return Mapper(cfg, create_extractor(cfg.features, 'cpu', NAMES))


def test_a_voxel_absorbed_into_its_surroundings_scores_its_new_class():
    """labels.min_component_vox relabels a small region with the class around it: its score is then that class's
    share of its evidence (it kept the old class's share, so a threshold let the absorbed voxels through)."""
    m = _labelled_mapper(['wall', 'chair', 'plant'], smoothing_radius_vox=0, min_component_vox=50)
    f = wall_frame()
    f.labels[:] = 1
    f.labels[4:16, 20:32] = 2                                   # a small chair patch inside the wall
    m.integrate(f, force=True)
    dist = m.labels.distribution(m.map.size)
    labels, conf = m.label_classes()
    absorbed = (labels != dist.argmax(1)) & (labels >= 0)
    assert absorbed.sum() > 0
    seen = labels >= 0
    assert torch.allclose(conf[seen], dist[seen].gather(1, labels[seen, None])[:, 0])
    wall = m.query('wall', threshold=0.5)
    assert bool((dist[wall.rows, 0] >= 0.5).all())


def test_vocabulary_names_are_compared_as_queries_are():
    """A vocabulary class is answered from the label volume whatever the case, inner whitespace or Unicode form
    of the query (a name with a double space never was, and 'STRASSE' missed 'Straße'); names that compare
    equal are one class."""
    m = _labelled_mapper(['wall', 'dining  table', 'Straße'])
    m.integrate(wall_frame(), force=True)
    assert m.labels.names == ['wall', 'dining table', 'Straße']
    for text, k in [('dining table', 1), ('Dining   Table', 1), ('STRASSE', 2), ('wall\u200b', 0)]:
        assert m.labels.index(text) == k, text
    assert m.query('dining  table').source == 'label volume'
    with pytest.raises(ValueError, match='unique'):
        m.vocabulary_names(['dining table', 'dining  table'])


def test_a_threshold_of_0_never_returns_voxels_where_a_negative_wins(mapper):
    """Score 0 means a negative matches better: no threshold (query.default_threshold 0 included) returns it."""
    if len(mapper.map) == 0:
        mapper.integrate(wall_frame(), force=True)
    threshold = mapper.cfg.query.default_threshold
    mapper.cfg.query.default_threshold = 0.0
    try:
        r = mapper.query('chair', ['wall', 'plant'])
    finally:
        mapper.cfg.query.default_threshold = threshold
    assert 0 < len(r.rows) < mapper.map.size and bool((r.scores > 0).all())


def test_a_negative_that_is_the_query_in_another_unicode_form_is_dropped(mapper):
    """'cafe' + a combining accent, or the query with a zero-width space, embeds as the query: as a negative it
    tied with the query everywhere and emptied the answer."""
    snap = mapper.view()
    assert snap.negatives_for('café', ['cafe\u0301', 'wall']) == ['wall']
    assert snap.negatives_for('chair', ['chair\u200b', 'ＣＨＡＩＲ', 'plant']) == ['plant']
