"""The core on every device this machine has: fusion, the hash index, learned pooling and queries on the CPU and,
where CUDA is present, on the GPU, with the CUDA map checked against the CPU map of the same keyframes. On a
machine without CUDA the CUDA rows are skipped (pytest reports them)."""
import numpy as np
import pytest
import torch

from ov3d_ros.core.config import MapperConfig
from ov3d_ros.core.features import create_extractor
from ov3d_ros.core.mapper import Mapper
from ov3d_ros.core.voxel_map import VoxelFeatureMap, pack_keys
from test_mapper import NAMES, wall_frame  # noqa: E402  (test/core is on sys.path)

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


@pytest.mark.parametrize('device', DEVICES)
def test_learned_pooling_and_queries_run_on_the_device(device):
    """The Mapper on ``device`` with the default learned purification: the map and its purified features stay on
    the device, and 'chair' is answered by the chair half of the wall."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.device, cfg.map.voxel_size_m, cfg.map.pixel_stride = device, 0.1, 1
    cfg.purify.enabled, cfg.purify.affinity = True, 'learned'
    m = Mapper(cfg, create_extractor(cfg.features, device, NAMES))
    assert m.integrate(wall_frame(), force=True)
    assert m.map.features.device.type == m.query_features().device.type == device
    answer = m.query('chair')
    assert answer.rows.device.type == device and len(answer.rows) > 10
    x = m.map.centers(answer.rows)[:, 0].cpu()
    assert (x < 0.05).float().mean() >= 0.95                  # the chair is the left half (x < 0 in the camera)


@pytest.mark.parametrize('device', DEVICES)
def test_compressed_map_folds_keyframes_in_on_the_device(device):
    """``map.compress_dim`` on ``device``: the fit, the fold of later keyframes into the PCA and the rotation of
    the stored rows run there (purification on), and 'chair' is still answered by the chair half of the wall."""
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_patch_px = 'simulated', 4
    cfg.map.device, cfg.map.voxel_size_m, cfg.map.pixel_stride, cfg.map.compress_dim = device, 0.1, 1, 16
    cfg.purify.enabled, cfg.purify.affinity = True, 'learned'
    m = Mapper(cfg, create_extractor(cfg.features, device, NAMES))
    frame = wall_frame()
    first_labels = frame.labels.copy()
    first_labels[first_labels == 3] = 1                  # the plant is not seen in the first keyframe
    assert m.integrate(type(frame)(frame.rgb, frame.depth_m, frame.camera, frame.T_W_C, 0.0, first_labels), force=True)
    first = m.projection.matrix.clone()
    for i in (1, 2):                                     # then it is: a direction the first fit did not have
        assert m.integrate(type(frame)(frame.rgb, frame.depth_m, frame.camera, frame.T_W_C, float(i), frame.labels),
                           force=True)
    assert not torch.equal(m.projection.matrix, first)            # the stored basis turned
    p = m.projection
    assert m.map.dim == 16 and p.matrix.device.type == p.basis.device.type == m.map.features.device.type == device
    eye = torch.eye(16, device=p.basis.device)
    assert torch.allclose(p.basis.T @ p.basis, eye, atol=1e-4) and torch.allclose(p.matrix.T @ p.matrix, eye, atol=1e-4)
    answer = m.query('chair')
    x = m.map.centers(answer.rows)[:, 0].cpu()
    assert len(x) > 10 and (x < 0.05).float().mean() >= 0.95       # the chair is the left half


@CUDA
def test_cuda_map_matches_the_cpu_map_of_the_same_keyframes(room_mapper_factory):
    """The built-in room's keyframes, default learned purification: the voxels, fused features, purified features
    and query answers on CUDA agree with the CPU's (up to float rounding at voxel borders and fp16 storage)."""
    cpu, gpu = room_mapper_factory(device='cpu'), room_mapper_factory(device='cuda')
    ck, gk = cpu.map.keys[:cpu.map.size], gpu.map.keys[:gpu.map.size].cpu()
    common = np.intersect1d(ck.numpy(), gk.numpy())
    assert len(common) >= 0.995 * max(len(ck), len(gk))
    t = torch.from_numpy(common)
    rc, rg = cpu.map.lookup(t), gpu.map.lookup(t.cuda()).cpu()
    cos = torch.nn.functional.cosine_similarity
    assert cos(cpu.map.features[rc].float(), gpu.map.features.cpu()[rg].float()).mean() > 0.999
    assert cos(cpu.query_features()[rc].float(), gpu.query_features().cpu()[rg].float()).mean() > 0.99
    for text in ('sofa', 'bed', 'cabinet'):
        a = set(ck[cpu.query(text).rows].tolist())
        b = set(gk[gpu.query(text).rows.cpu()].tolist())
        assert a and len(a & b) >= 0.95 * len(a | b), text


def test_only_cpu_and_cuda_devices_are_taken():
    from ov3d_ros.core.mapper import resolve_device
    assert resolve_device('cpu') == torch.device('cpu')
    assert resolve_device('auto').type == ('cuda' if torch.cuda.is_available() else 'cpu')
    for name, problem in [('meta', "runs on 'cpu' or 'cuda'"), ('bogus', "device 'bogus'")]:
        with pytest.raises(ValueError, match=problem):          # 'meta' failed later on a tensor's .item()
            resolve_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda:0')
