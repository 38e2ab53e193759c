"""The SIMULATED 2D teacher's error model: determinism, presets, confusion, view flips, missed small objects,
the CLIP-like preset's modality gap and world-anchored (view-consistent) errors."""
import numpy as np
import pytest
import torch
from scipy import ndimage

from ov3d_ros.core.config import FeatureConfig, MapperConfig, field_docs
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.features.simulated import (PRESET_FIELDS, PRESETS, SimulatedLabelFeatures, connected_regions,
                                              pixel_world_points, resolve_error_model)
from ov3d_ros.core.mapper import Frame, Mapper
from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render

C = len(CLASS_NAMES)
TABLE, DESK, CEILING = (CLASS_NAMES.index(n) for n in ('table', 'desk', 'ceiling'))
ERRORS_OFF = dict(sim_noise=0.0, sim_blur_patches=0.0, sim_confusion=0.0, sim_view_flip=0.0, sim_fragments=0.0,
                  sim_miss_small_px=0)


@pytest.fixture(scope='module')
def ext():
    return create_extractor(FeatureConfig(source='simulated'), 'cpu', list(CLASS_NAMES))


@pytest.fixture(scope='module')
def views():
    """Six overlapping rendered 160x120 views of the built-in scene: (camera, [(T_W_C, RenderedFrame)])."""
    scene = builtin_scene(0)
    cam = default_camera(160, 120)
    return cam, [(T, render(scene, cam, T)) for T in builtin_trajectory(scene, 40, 0)[:12:2]]


@pytest.fixture(scope='module')
def frames():
    """Four 160x120 label images of the built-in scene."""
    scene = builtin_scene(0)
    cam = default_camera(160, 120)
    return [render(scene, cam, T).semantic for T in builtin_trajectory(scene, 8, 0)[::2]]


def configure(ext, preset='custom', **fields):
    """Point the shared extractor at a fresh config and restart its frame counter."""
    ext.cfg = FeatureConfig(source='simulated', sim_preset=preset, **fields)
    ext.reset()
    return ext


def pixel_classes(ext, feats, shape):
    """Best class (by text embedding) of each pixel's feature cell: (H, W) int64."""
    H, W = shape
    h, w = feats.shape[:2]
    best = (feats @ ext.class_embeddings.T).argmax(-1).numpy()
    return best[(np.arange(H) * h // H)[:, None], (np.arange(W) * w // W)[None, :]]


def test_same_seed_same_features_other_seed_differs(ext, frames):
    def run(seed):
        configure(ext, 'default', sim_seed=seed)
        return [ext.extract(None, lab) for lab in frames]
    a, b, c = run(0), run(0), run(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.allclose(x, y, atol=1e-3) for x, y in zip(a, c))
    configure(ext, 'default')
    first, second = ext.extract(None, frames[0]), ext.extract(None, frames[0])
    assert not torch.allclose(first, second, atol=1e-3)       # the frame counter moves the errors on
    ext.reset(1)
    assert torch.equal(ext.extract(None, frames[0]), second)


def test_output_is_a_normalised_patch_grid(ext, frames):
    configure(ext, 'hard', sim_patch_px=8)
    for lab in frames:
        g = ext.extract(None, lab)
        assert g.shape == (120 // 8, 160 // 8, ext.dim)
        assert torch.allclose(g.norm(dim=-1), torch.ones(g.shape[:2]), atol=1e-5)
        assert ext.last_labels.shape == lab.shape


def test_clean_reproduces_labels_and_presets_degrade_in_order(ext, frames):
    p = 8
    agreement = {}
    for preset in ('clean', 'default', 'hard'):
        configure(ext, preset, sim_patch_px=p)
        hits = total = 0
        for lab in frames:
            pred = pixel_classes(ext, ext.extract(None, lab), lab.shape)
            valid = lab > 0
            hits += int((pred[valid] == lab[valid]).sum())
            total += int(valid.sum())
            if preset == 'clean':     # pixels whose whole patch neighbourhood has their label
                lab64, size = lab.astype(np.int64), 2 * p + 1
                interior = valid & (ndimage.minimum_filter(lab64, size) == ndimage.maximum_filter(lab64, size))
                assert interior.sum() > 500
                assert (pred[interior] == lab[interior]).mean() >= 0.9
        agreement[preset] = hits / total
    assert agreement['clean'] > agreement['default'] > agreement['hard'], agreement
    assert agreement['clean'] - agreement['hard'] > 0.15, agreement


def test_confusion_picks_semantically_close_classes(ext):
    configure(ext, **{**ERRORS_OFF, 'sim_confusion': 1.0, 'sim_patch_px': 4})
    labels = np.full((24, 32), TABLE, np.uint16)
    counts = np.zeros(C, np.int64)
    for _ in range(200):
        feats = ext.extract(None, labels)
        out = np.unique(ext.last_labels)
        assert len(out) == 1                                    # one region, one class in a view
        assert np.all(pixel_classes(ext, feats, labels.shape) == out[0])
        counts[out[0]] += 1
    assert counts[TABLE] == 0 and counts[0] == 0                # always confused, never into 'unlabeled'
    assert counts[DESK] > counts[CEILING] + 10, dict(zip(CLASS_NAMES, counts))
    sim = ext._similarity[TABLE].numpy()
    chosen = np.repeat(np.arange(C), counts)
    others = [j for j in range(1, C) if j != TABLE]
    assert sim[chosen].mean() > sim[others].mean() + 0.03


def test_view_flips_keep_each_region_one_class(ext, frames):
    configure(ext, **{**ERRORS_OFF, 'sim_view_flip': 0.5, 'sim_patch_px': 1})
    flipped = kept = 0
    for lab in frames:
        region, rclass, _ = connected_regions(lab)
        pred = pixel_classes(ext, ext.extract(None, lab), lab.shape)
        for r in range(len(rclass)):
            got = np.unique(pred[region == r])
            assert len(got) == 1, (r, rclass[r], got)
            if rclass[r] > 0:
                flipped += int(got[0] != rclass[r])
                kept += int(got[0] == rclass[r])
    assert flipped > 5 and kept > 5
    # the same view seen again flips differently: the errors are per view, not per class
    lab = frames[0]
    region, _, _ = connected_regions(lab)
    first_pixel = np.unique(region.ravel(), return_index=True)[1]
    outcomes = set()
    for _ in range(4):
        ext.extract(None, lab)
        outcomes.add(tuple(ext.last_labels.ravel()[first_pixel].tolist()))
    assert len(outcomes) > 1


def test_small_objects_are_missed_only_with_miss_small_on(ext):
    labels = np.full((48, 64), CLASS_NAMES.index('wall'), np.uint16)
    labels[10:16, 10:16] = CLASS_NAMES.index('plant')           # 36 px
    labels[20:40, 30:50] = CLASS_NAMES.index('chair')           # 400 px
    for miss, plant_kept in ((0, True), (100, False)):
        configure(ext, **{**ERRORS_OFF, 'sim_miss_small_px': miss, 'sim_patch_px': 1})
        pred = pixel_classes(ext, ext.extract(None, labels), labels.shape)
        assert np.all(pred[20:40, 30:50] == CLASS_NAMES.index('chair'))
        plant = pred[10:16, 10:16]
        if plant_kept:
            assert np.all(plant == CLASS_NAMES.index('plant'))
        else:
            assert np.all(plant == CLASS_NAMES.index('wall'))


def test_blur_bleeds_across_boundaries(ext):
    labels = np.full((64, 64), CLASS_NAMES.index('chair'), np.uint16)
    labels[:, 32:] = CLASS_NAMES.index('plant')
    chair = ext.class_embeddings[CLASS_NAMES.index('chair')]
    sims = {}
    for blur in (0.0, 1.5):
        configure(ext, **{**ERRORS_OFF, 'sim_blur_patches': blur, 'sim_patch_px': 8})
        sims[blur] = (ext.extract(None, labels) @ chair)[4]     # one row of patches, (8,)
    assert torch.allclose(sims[0.0][:4], torch.ones(4), atol=1e-5)
    assert sims[1.5][3] < 0.97                                   # next to the boundary: mixed with plant
    assert sims[1.5][4] > sims[0.0][4] + 0.05                    # chair bleeds into the plant side


def test_fragments_put_blobs_of_other_classes_or_random_vectors(ext):
    configure(ext, **{**ERRORS_OFF, 'sim_fragments': 3.0, 'sim_patch_px': 4})
    labels = np.full((60, 80), CLASS_NAMES.index('floor'), np.uint16)
    changed, random_vector = [], False
    for _ in range(10):
        g = ext.extract(None, labels)
        changed.append((ext.last_labels != labels).mean())
        random_vector |= bool((ext.last_labels >= C).any())
        assert torch.allclose(g.norm(dim=-1), torch.ones(g.shape[:2]), atol=1e-5)
    assert 0 < np.mean(changed) < 0.5 and random_vector


def test_presets_and_custom_fields():
    for name, values in PRESETS.items():
        assert set(values) == set(PRESET_FIELDS)
        m = resolve_error_model(FeatureConfig(sim_preset=name, sim_noise=9.0, sim_view_flip=0.9))
        assert m.noise == values['sim_noise'] and m.view_flip == values['sim_view_flip']
    m = resolve_error_model(FeatureConfig(sim_preset='custom', sim_noise=9.0, sim_view_flip=0.9))
    assert (m.noise, m.view_flip) == (9.0, 0.9)
    custom_defaults = FeatureConfig()
    assert all(getattr(custom_defaults, f) == PRESETS['default'][f] for f in PRESET_FIELDS)
    docs = field_docs(FeatureConfig)
    assert all(docs.get(f) for f in PRESET_FIELDS + ('sim_preset', 'sim_confusion_temp'))
    with pytest.raises(ValueError, match='probability'):
        resolve_error_model(FeatureConfig(sim_preset='custom', sim_confusion=1.5))


def test_unknown_preset_is_rejected_with_the_list(ext):
    with pytest.raises(ValueError, match='clean, default, hard, clip, custom'):
        SimulatedLabelFeatures(FeatureConfig(source='simulated', sim_preset='noisy'), list(CLASS_NAMES))
    configure(ext, 'Default')
    with pytest.raises(ValueError, match="'Default'"):
        ext.extract(None, np.ones((8, 8), np.uint16))
    # the simulator takes no settings while mapping (the clip source takes its dense mode and image sizes)
    assert not ext.live_settings
    with pytest.raises(ValueError, match='takes no settings while mapping'):
        ext.reconfigure(FeatureConfig(source='simulated', sim_preset='hard'))


def geometry(cam, T, f):
    return dict(depth_m=f.depth_m, camera=cam, T_W_C=T)


def test_clip_preset_has_a_modality_gap_but_an_informative_ranking(ext, views):
    cam, frames = views
    configure(ext, 'clip', sim_patch_px=8)
    E = ext.class_embeddings[1:]                          # every class text but 'unlabeled'
    right, best_wrong, ranks, hits, total = [], [], [], 0, 0
    for T, f in frames:
        feats = ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
        assert torch.allclose(feats.norm(dim=-1), torch.ones(feats.shape[:2]), atol=1e-5)
        H, W = f.semantic.shape
        h, w = feats.shape[:2]
        cell = feats[(np.arange(H) * h // H)[:, None], (np.arange(W) * w // W)[None, :]]
        lab = torch.from_numpy(f.semantic.astype(np.int64))
        valid = lab > 0
        s, t = cell[valid] @ E.T, lab[valid] - 1
        r = s.gather(1, t[:, None])[:, 0]
        right.append(r)
        best_wrong.append(s.scatter(1, t[:, None], -2.0).amax(1))
        ranks.append((s > r[:, None]).sum(1))
        hits += int((s.argmax(1) == t).sum())
        total += len(t)
    right, best_wrong, ranks = torch.cat(right), torch.cat(best_wrong), torch.cat(ranks).float()
    assert 0.15 <= right.mean() <= 0.35, right.mean()          # CLIP-like image/text cosine
    assert best_wrong.mean() < right.mean() < best_wrong.mean() + 0.1    # small margins
    chance = (E.shape[0] - 1) / 2
    assert ranks.mean() < chance / 3 and hits / total > 0.4, (ranks.mean(), hits / total)
    # without the gap (same errors) the text cosines are large: the gap is what makes them small
    configure(ext, 'custom', **{f: PRESETS['clip'][f] for f in PRESET_FIELDS if f != 'sim_text_cosine'},
              sim_patch_px=8)
    T, f = frames[0]
    g = ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
    assert (g @ E.T).amax(-1).mean() > 0.6


def test_default_temperature_follows_the_modality_gap(ext, views):
    """Text-like presets keep 0.15; with the gap, CLIP's 0.01, at which a true class's voxels beat the negatives
    by a margin the default threshold keeps (at 0.15 the softmax is almost flat: nothing passes 0.55)."""
    from ov3d_ros.core.features.simulated import GAP_TEMPERATURE, TEXT_TEMPERATURE
    from ov3d_ros.core.query import relevancy_scores
    assert configure(ext, 'default').default_temperature == TEXT_TEMPERATURE == 0.15
    assert configure(ext, 'clip', sim_patch_px=8).default_temperature == GAP_TEMPERATURE == 0.01
    cam, frames = views
    T, f = frames[0]
    feats = ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
    H, W = f.semantic.shape
    h, w = feats.shape[:2]
    lab = torch.from_numpy(f.semantic.astype(np.int64))[(np.arange(h) * H // h)[:, None], (np.arange(w) * W // w)[None, :]]
    counts = torch.bincount(lab[lab > 0].flatten())
    k = int(counts.argmax())                             # the most visible class of the view
    negs = torch.stack([ext.class_embeddings[j] for j in range(1, len(ext.class_embeddings)) if j != k][:4])
    flat = feats.reshape(-1, feats.shape[-1])
    mine = (lab == k).flatten()
    gap = relevancy_scores(flat, ext.class_embeddings[k], negs, GAP_TEMPERATURE)
    text = relevancy_scores(flat, ext.class_embeddings[k], negs, TEXT_TEMPERATURE)
    assert (gap[mine] >= 0.55).float().mean() > 0.3, (gap[mine] >= 0.55).float().mean()
    assert (text[mine] >= 0.55).float().mean() == 0.0


def test_clip_gap_direction_is_shared_and_orthogonal_to_the_class_texts(ext):
    configure(ext, 'clip')
    g = ext.modality_direction()
    assert abs(float(g.norm()) - 1) < 1e-5 and float((ext.class_embeddings @ g).abs().max()) < 1e-4
    labels = np.full((32, 32), TABLE, np.uint16)
    configure(ext, 'custom', **{**ERRORS_OFF, 'sim_text_cosine': 0.25, 'sim_patch_px': 8})
    feats = ext.extract(None, labels)
    assert torch.allclose(feats @ ext.class_embeddings[TABLE], torch.full(feats.shape[:2], 0.25), atol=1e-4)
    assert torch.allclose(feats @ g, torch.full(feats.shape[:2], (1 - 0.25 ** 2) ** 0.5), atol=1e-4)


def world_match(cam, a, b):
    """Pixels of view a whose world point view b sees unoccluded: (index into a (N, 2), index into b (N, 2))."""
    (Ta, fa), (Tb, fb) = a, b
    pts, valid = pixel_world_points(fa.depth_m, cam, Ta)
    Tcw = np.linalg.inv(Tb)
    pc = pts @ Tcw[:3, :3].T + Tcw[:3, 3]
    z = np.where(valid, pc[..., 2], -1.0)
    u = np.round(pc[..., 0] / np.maximum(z, 1e-6) * cam.fx + cam.cx).astype(int)
    v = np.round(pc[..., 1] / np.maximum(z, 1e-6) * cam.fy + cam.cy).astype(int)
    ok = valid & (z > 0.1) & (u >= 0) & (u < cam.width) & (v >= 0) & (v < cam.height)
    va, ua = np.nonzero(ok)
    vb, ub = v[ok], u[ok]
    seen = (np.abs(fb.depth_m[vb, ub] - z[ok]) < 0.01) & (fa.semantic[va, ua] == fb.semantic[vb, ub])
    return (va[seen], ua[seen]), (vb[seen], ub[seen])


def test_world_anchored_errors_are_the_same_from_every_pose(ext, views):
    cam, frames = views
    configure(ext, 'custom', **{**ERRORS_OFF, 'sim_world_confusion': 0.3, 'sim_patch_px': 1})
    world = []
    for T, f in frames:
        ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
        world.append(ext.last_world_labels)
        assert np.array_equal(ext.last_labels, ext.last_world_labels)    # nothing else is on
        wrong = (world[-1] != f.semantic) & (f.semantic > 0)
        assert 0.05 < wrong.mean() < 0.6 and not (world[-1][f.semantic > 0] == 0).any()
    agree = confused = 0
    for i, j in ((0, 1), (0, 2), (1, 3), (2, 4), (3, 5)):
        (va, ua), (vb, ub) = world_match(cam, frames[i], frames[j])
        assert len(va) > 1000, (i, j, len(va))
        same = world[i][va, ua] == world[j][vb, ub]
        agree += int(same.sum())
        confused += int((same & (world[i][va, ua] != frames[i][1].semantic[va, ua])).sum())
        assert same.mean() > 0.95, (i, j, same.mean())          # misses: points on a cell boundary
    assert confused > 500                                       # the same world part, the same wrong class
    # the frame counter does not move them (per-view errors do), the seed does
    T, f = frames[0]
    ext.reset(7)
    ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
    assert np.array_equal(ext.last_world_labels, world[0])
    ext.cfg.sim_seed = 1
    ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
    assert not np.array_equal(ext.last_world_labels, world[0])


def test_clip_preset_is_deterministic_by_seed_and_needs_the_geometry(ext, views):
    cam, frames = views
    def run(seed):
        configure(ext, 'clip', sim_seed=seed)
        return [ext.extract(f.rgb, f.semantic, **geometry(cam, T, f)) for T, f in frames[:3]]
    a, b, c = run(0), run(0), run(3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.allclose(x, y, atol=1e-3) for x, y in zip(a, c))
    configure(ext, 'clip')
    with pytest.raises(ValueError, match='depth, camera and pose'):
        ext.extract(None, frames[0][1].semantic)


def test_mapper_hands_the_frame_geometry_to_the_simulated_source(ext, views):
    cam, frames = views
    configure(ext, 'clip')
    cfg = MapperConfig()
    cfg.features, cfg.map.device = ext.cfg, 'cpu'
    mapper = Mapper(cfg, ext)
    T, f = frames[0]
    assert mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, 0.0, f.semantic), force=True)
    through_mapper = ext.last_world_labels
    ext.extract(f.rgb, f.semantic, **geometry(cam, T, f))
    assert np.array_equal(through_mapper, ext.last_world_labels)
    assert (through_mapper != f.semantic).any() and mapper.map.size > 0
