"""The core on every device this machine has: fusion, the hash index, learned pooling and queries on the CPU and,
where CUDA is present, on the GPU, with the CUDA map checked against the CPU map of the same keyframes. On a
machine without CUDA the CUDA rows are skipped (pytest reports them)."""
import numpy as np
import pytest
import torch

from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Frame, Mapper
from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
DEVICES = ['cpu', pytest.param('cuda', marks=CUDA)]


@pytest.mark.parametrize('device', DEVICES)
def test_hash_index_and_capped_fusion_on_the_device(device):
    """The hash index finds every key through growth and compaction, and a capped voxel still follows new
    observations after 1e6 points, with every layer on ``device``."""
    g = torch.Generator().manual_seed(3)
    m = VoxelFeatureMap(1.0, 2, device=device, capacity=16, max_weight=1000.0)
    coords = torch.randint(-300, 300, (4000, 3), generator=g)
    for chunk in coords.split(700):                          # repeats within and across calls, several growths
        m.integrate((chunk.float() + 0.5).to(device), torch.ones(len(chunk), 2, device=device))
    assert m.features.device.type == m.keys.device.type == m.weights.device.type == device
    keys = pack_keys(coords).to(device)
    expect = {k: i for i, k in enumerate(m.keys[:m.size].cpu().tolist())}
    assert len(expect) == m.size == len(set(keys.cpu().tolist()))
    assert m.lookup(keys).cpu().tolist() == [expect[k] for k in keys.cpu().tolist()]
    kept = torch.arange(0, m.size, 3, device=device)
    kept_keys = m.keys[kept].clone()
    m.keep(kept)
    assert m.lookup(kept_keys).cpu().tolist() == list(range(len(kept)))

    point = torch.tensor([[0.5, 0.5, 0.5]], device=device)
    a, b = torch.tensor([[1.0, 0.0]], device=device), torch.tensor([[0.0, 1.0]], device=device)
    c = VoxelFeatureMap(1.0, 2, device=device, max_weight=1000.0)
    for _ in range(10):
        c.integrate(point.expand(100_000, 3), a.expand(100_000, 2))
    for _ in range(20):
        c.integrate(point.expand(50, 3), b.expand(50, 2))
    f = c.features[0].float().cpu()
    assert f[1].item() == pytest.approx(1 - (1000 / 1050) ** 20, abs=2e-3)
    assert c.weights[0].item() == 1e6 + 1000


def _wall_frame():
    """A wall 2 m ahead: left half labelled chair (blue), right half plant (green), top rows wall (red)."""
    from ov3d_ros.core.camera import PinholeCamera
    cam = PinholeCamera(40.0, 40.0, 31.5, 23.5, 64, 48)
    labels = np.full((48, 64), 1, np.uint16)
    labels[16:, :32], labels[16:, 32:] = 2, 3
    rgb = np.zeros((48, 64, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[16:, :32], rgb[16:, 32:] = (60, 60, 200), (40, 160, 40)
    return Frame(rgb, np.full((48, 64), 2.0, np.float32), cam, np.eye(4), 0.0, labels)


@pytest.mark.parametrize('device', DEVICES)
def test_learned_pooling_and_queries_run_on_the_device(device):
    """The Mapper on ``device`` with the default learned purification: the map and its purified features stay on
    the device, and 'chair' is answered by the chair half of the wall."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.device, cfg.map.voxel_size_m, cfg.map.pixel_stride = device, 0.1, 1
    cfg.purify.enabled, cfg.purify.affinity = True, 'learned'
    m = Mapper(cfg, create_extractor(cfg.features, device, ['unlabeled', 'wall', 'chair', 'plant']))
    assert m.integrate(_wall_frame(), force=True)
    assert m.map.features.device.type == m.query_features().device.type == device
    answer = m.query('chair')
    assert answer.rows.device.type == device and len(answer.rows) > 10
    x = m.map.centers(answer.rows)[:, 0].cpu()
    assert (x < 0.05).float().mean() >= 0.95                  # the chair is the left half (x < 0 in the camera)


def _room_map(device):
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.map.device = 'simulated', device
    cfg.purify.enabled, cfg.purify.affinity = True, 'learned'
    m = Mapper(cfg, create_extractor(cfg.features, device, CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(160, 120)
    for i, T in enumerate(builtin_trajectory(scene, 8, 0)):
        f = render(scene, cam, T)
        m.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
    return m


@CUDA
def test_cuda_map_matches_the_cpu_map_of_the_same_keyframes():
    """Same keyframes, default learned purification: the voxels, fused features, purified features and query
    answers on CUDA agree with the CPU's (up to float rounding at voxel borders and fp16 storage)."""
    cpu, gpu = _room_map('cpu'), _room_map('cuda')
    ck, gk = cpu.map.keys[:cpu.map.size], gpu.map.keys[:gpu.map.size].cpu()
    common = np.intersect1d(ck.numpy(), gk.numpy())
    assert len(common) >= 0.995 * max(len(ck), len(gk))
    t = torch.from_numpy(common)
    rc, rg = cpu.map.lookup(t), gpu.map.lookup(t.cuda()).cpu()
    cos = torch.nn.functional.cosine_similarity
    assert cos(cpu.map.features[rc].float(), gpu.map.features.cpu()[rg].float()).mean() > 0.999
    assert cos(cpu.query_features()[rc].float(), gpu.query_features().cpu()[rg].float()).mean() > 0.99
    for text in ('chair', 'sofa', 'bed'):
        a = set(ck[cpu.query(text).rows].tolist())
        b = set(gk[gpu.query(text).rows.cpu()].tolist())
        assert a and len(a & b) >= 0.95 * len(a | b), text
