"""The self-supervised 3D teacher: views, training signal, invariance, checkpoints (no labels anywhere)."""
import numpy as np
import pytest
import torch

pytest.importorskip('spconv')

from ov3d_ros.core.purification.graph import ball_offsets, estimate_normals, neighbour_rows  # noqa: E402
from ov3d_ros.core.purification.teacher import (SSLConfig, TeacherConfig, TeacherNet, VoxelScene,  # noqa: E402
                                                keyframe_window, load_teacher, make_views, matching_accuracy,
                                                save_teacher, train_teacher)
from ov3d_ros.core.voxel_map import VoxelFeatureMap  # noqa: E402


def box(lo, hi):
    """Integer voxels of the surface of the box [lo, hi] (inclusive)."""
    ax = [torch.arange(a, b + 1) for a, b in zip(lo, hi)]
    g = torch.stack(torch.meshgrid(*ax, indexing='ij'), -1).reshape(-1, 3)
    lo, hi = torch.tensor(lo), torch.tensor(hi)
    return g[((g == lo) | (g == hi)).any(1)]


def tiny_room(seed=0, keyframes=10):
    """A 24 x 18 room (floor and two walls) with three coloured boxes; keyframe k sees a sweep of x."""
    g = torch.Generator().manual_seed(seed)
    parts = [(box((0, 0, 0), (23, 17, 0)), (150, 140, 120)), (box((0, 0, 0), (0, 17, 10)), (230, 230, 225)),
             (box((0, 17, 0), (23, 17, 10)), (200, 200, 190)), (box((4, 4, 1), (8, 7, 4)), (120, 70, 30)),
             (box((12, 9, 1), (14, 12, 6)), (60, 90, 160)), (box((17, 3, 1), (21, 5, 2)), (230, 230, 225))]
    coords = torch.cat([p for p, _ in parts])
    colors = torch.cat([torch.tensor(c, dtype=torch.float32).expand(len(p), 3) for p, c in parts])
    coords, inv = torch.unique(coords, dim=0, return_inverse=True)
    colors = torch.zeros(len(coords), 3).index_put_((inv,), colors)    # one of the parts' colours per voxel
    colors = (colors + 8 * torch.randn(colors.shape, generator=g)).clamp(0, 255)
    m = VoxelFeatureMap(1.0, 1)
    m.integrate(coords.float() + 0.5, torch.ones(len(coords), 1), colors)
    rows = m.rows_of(coords.float() + 0.5)
    off = ball_offsets(2)
    normals = estimate_normals(neighbour_rows(m, rows, off), off)
    x = coords[:, 0].float()
    seen = torch.zeros(len(coords), dtype=torch.int64)
    for k in range(keyframes):                   # each keyframe sees a band of x (a sweep along the room)
        centre = 24.0 * k / (keyframes - 1)
        seen |= torch.where((x - centre).abs() <= 7, 1 << k, 0)
    return VoxelScene(f'room{seed}', coords, colors, normals, seen, keyframes)


CFG = SSLConfig(steps=40, lr=3e-3, pairs=256, max_voxels=4000, seed=0)


@pytest.fixture(scope='module')
def trained():
    torch.manual_seed(0)
    init = TeacherNet(TeacherConfig(width=8, out_dim=16, voxel_size_m=1.0))
    net = TeacherNet(TeacherConfig(width=8, out_dim=16, voxel_size_m=1.0))
    net.load_state_dict(init.state_dict())
    history = train_teacher(net, [tiny_room(0)], CFG, log=lambda s: None)
    return init, net, history


def test_views_are_partial_augmented_scans_with_exact_correspondences():
    scene = tiny_room(0)
    assert keyframe_window(10, 8, 0.3) == (1 << 8) | (1 << 9) | 1
    a, b, sa, sb = make_views(scene, CFG, torch.Generator().manual_seed(1))
    assert 0 < len(a.members) < len(scene) and 0 < len(b.members) < len(scene)   # partial scans
    assert len(sa) == len(sb) > 16 and len(torch.unique(sa)) == len(sa)
    # a corresponding pair comes from one scene voxel: its colour (before jitter) is the same in both views
    pos_a = {int(m): int(s) for m, s in zip(a.members, a.slot)}
    pos_b = {int(m): int(s) for m, s in zip(b.members, b.slot)}
    shared = set(pos_a) & set(pos_b)
    pairs = {(pos_a[m], pos_b[m]) for m in shared}
    assert all((int(x), int(y)) in pairs for x, y in zip(sa, sb))
    # the views are rotated / scaled copies, not the scene's own coordinates
    assert not torch.equal(a.coords[a.slot[:50]], scene.coords[a.members[:50]])


def test_teacher_loss_goes_down_on_a_tiny_scene(trained):
    _, _, history = trained
    assert history[-1]['train_loss'] < history[0]['train_loss'] - 0.3
    assert history[-1]['train_acc'] > history[0]['train_acc']


def test_teacher_features_match_across_augmentations_better_than_at_init(trained):
    init, net, _ = trained
    val = [tiny_room(1)]                 # other colour noise: not the training scene
    cfg = SSLConfig(pairs=256, max_voxels=4000)
    acc_init, acc = matching_accuracy(init, val, cfg), matching_accuracy(net, val, cfg)
    assert acc > 3 * acc_init and acc > acc_init + 0.02, (acc_init, acc)      # chance: 1 / 256
    f = net.features(val[0].coords, val[0].colors, val[0].normals)
    assert f.shape == (len(val[0]), 16) and torch.allclose(f.norm(dim=1), torch.ones(len(f)), atol=1e-4)


def test_teacher_checkpoint_round_trip_and_refusals(trained, tmp_path):
    _, net, _ = trained
    save_teacher(tmp_path / 't.safetensors', net, {'command': 'ov3d train-teacher x'})
    back = load_teacher(tmp_path / 't.safetensors')
    s = tiny_room(2)
    assert torch.allclose(back.features(s.coords, s.colors, s.normals), net.features(s.coords, s.colors, s.normals),
                          atol=1e-5)
    assert not any(p.requires_grad for p in back.parameters())
    with pytest.raises(ValueError, match='no such file'):
        load_teacher(tmp_path / 'missing.safetensors')
    from ov3d_ros.core.purification.student import DEFAULT_CHECKPOINT
    with pytest.raises(ValueError, match='not a usable teacher checkpoint'):
        load_teacher(DEFAULT_CHECKPOINT)          # a student is not a teacher


def test_voxel_scene_file_round_trip(tmp_path):
    s = tiny_room(0)
    s.save(tmp_path / 's.npz')
    back = VoxelScene.load(tmp_path / 's.npz')
    assert torch.equal(back.coords, s.coords) and torch.equal(back.seen_by, s.seen_by)
    assert back.num_keyframes == 10 and back.name == 'room0'
    assert torch.allclose(back.colors, s.colors.round(), atol=1.0)


def test_a_damaged_voxel_scene_cache_is_named_and_made_again(tmp_path, monkeypatch, capsys):
    """A cache file cut short (or of another kind) is refused with its name; the training tools voxelise the input
    again instead of stopping with a zip error."""
    s = tiny_room(0)
    s.save(tmp_path / 's.npz')
    blob = (tmp_path / 's.npz').read_bytes()
    (tmp_path / 'cut.npz').write_bytes(blob[:len(blob) // 2])
    with pytest.raises(ValueError, match=r'cut\.npz: unreadable \.npz archive'):
        VoxelScene.load(tmp_path / 'cut.npz')
    np.savez(tmp_path / 'other.npz', coords=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r'other\.npz: missing array name, colors, normals, seen_by'):
        VoxelScene.load(tmp_path / 'other.npz')
    from ov3d_ros.cli import common
    from ov3d_ros.core.config import MapperConfig
    cfg = MapperConfig()
    made = []
    monkeypatch.setattr(common, 'open_input', lambda path, args: path)         # the input is not read here
    monkeypatch.setattr(common, 'voxelise_input', lambda source, cfg, quiet, frames: made.append(source) or s)
    scene = common.cached_voxel_scene(tmp_path / 'room', None, cfg, tmp_path / 'cache')      # made, cached
    cached = next((tmp_path / 'cache').glob('room_*.npz'))
    assert made == [tmp_path / 'room'] and len(scene) == len(s)
    assert len(common.cached_voxel_scene(tmp_path / 'room', None, cfg, tmp_path / 'cache')) == len(s)
    assert len(made) == 1                                                     # read back from the cache
    cached.write_bytes(b'PK\x03\x04 damaged')
    assert len(common.cached_voxel_scene(tmp_path / 'room', None, cfg, tmp_path / 'cache')) == len(s)
    assert len(made) == 2 and 'voxelising the input again' in capsys.readouterr().err
    assert torch.equal(VoxelScene.load(cached).coords, s.coords)             # the cache is whole again
