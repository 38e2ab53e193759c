"""LayerCake: one voxel index, named row-aligned layers that grow, compact, rotate, persist and report together."""
import pytest
import torch

from ov3d_ros.core.layer_cake import LayerCake, write_rows
from ov3d_ros.core.map_io import load_map, save_map
from ov3d_ros.core.voxel_map import VoxelFeatureMap


def cake_with_layers(n=10, dim=4):
    """A cake with ``n`` rows (keys 100, 101, ...) and a feature, a scalar and an integer layer filled per row."""
    cake = LayerCake('cpu', capacity=16)
    feats = cake.add_layer('feat', dim, torch.float16, feature=True)
    score = cake.add_layer('score', 0, torch.float32)
    tag = cake.add_layer('tag', 2, torch.int32, persist=False)
    rows = cake.insert(torch.arange(100, 100 + n))
    assert torch.equal(rows, torch.arange(n))
    feats[:n] = torch.arange(n * dim, dtype=torch.float16).reshape(n, dim)
    score[:n] = torch.arange(n, dtype=torch.float32) * 0.5
    tag[:n] = torch.arange(2 * n, dtype=torch.int32).reshape(n, 2)
    return cake


def test_insert_finds_existing_rows_and_appends_new_keys_once():
    cake = cake_with_layers(3)
    rows = cake.insert(torch.tensor([101, 7, 7, 100, 9]))
    assert rows.tolist() == [1, 3, 3, 0, 4] and cake.size == 5
    assert cake.lookup(torch.tensor([9, 8, 102])).tolist() == [4, -1, 2]
    assert float(cake['score'][3:5].abs().sum()) == 0               # new rows start at zero in every layer


def test_growth_doubles_capacity_and_keeps_every_layer():
    cake = cake_with_layers(10)
    before = {name: cake.rows(name).clone() for name in cake.layers}
    cake.insert(torch.arange(1000, 1030))                            # 40 rows: 16 -> 64
    assert cake.capacity == 64 and cake.size == 40
    for name, t in before.items():
        assert cake[name].shape[0] == 64, name
        assert torch.equal(cake[name][:10], t), name
        assert float(cake[name][10:].float().abs().sum()) == 0 if name != 'keys' else True
    assert torch.equal(cake.lookup(torch.arange(100, 110)), torch.arange(10))
    assert torch.equal(cake.lookup(torch.arange(1000, 1030)), torch.arange(10, 40))


def test_keep_compacts_all_layers_together_and_reindexes():
    cake = cake_with_layers(10)
    before = {name: cake.rows(name).clone() for name in cake.layers}
    kept = torch.tensor([1, 4, 8])
    cake.keep(kept)
    assert cake.size == 3
    for name, t in before.items():
        assert torch.equal(cake.rows(name), t[kept]), name
        assert float(cake[name][3:].float().abs().sum()) == 0, name   # freed rows are zero again
    assert cake.lookup(torch.tensor([101, 104, 108, 100])).tolist() == [0, 1, 2, -1]


def test_project_rotates_only_feature_layers():
    cake = cake_with_layers(5, dim=4)
    cake.add_layer('other_feat', 4, torch.float32, feature=True)[:5] = 1.0
    before = {name: cake.rows(name).clone() for name in cake.layers}
    R = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    cake.project(R)
    assert cake.specs['feat'].width == 2 and cake['feat'].shape == (cake.capacity, 2)
    assert torch.allclose(cake.rows('feat').float(), (before['feat'].float() @ R).half().float())
    assert torch.allclose(cake.rows('other_feat'), before['other_feat'] @ R)
    for name in ('keys', 'score', 'tag'):
        assert torch.equal(cake.rows(name), before[name]), name
    with pytest.raises(ValueError, match='D=3'):
        cake.project(torch.randn(3, 2))


def test_copy_is_a_cake_of_its_own_that_later_writes_do_not_change():
    cake = cake_with_layers(10)
    copy = cake.copy(['score'])
    assert list(copy.layers) == ['keys', 'score'] and copy.size == 10 and copy.capacity == 16
    cake['score'][:10] = -1
    cake.insert(torch.arange(1000, 1030))
    cake.keep(torch.tensor([0, 25]))
    assert copy.rows('score').tolist() == [0.5 * i for i in range(10)]
    assert torch.equal(copy.lookup(torch.arange(100, 110)), torch.arange(10))      # its own index
    assert copy.lookup(torch.tensor([1000])).tolist() == [-1]


def test_memory_report_lists_every_layer_and_the_index():
    cake = cake_with_layers(4, dim=6)
    report = cake.memory_report()
    assert report == {'keys': 8, 'feat': 12, 'score': 4, 'tag': 8, 'index': 16.0}   # 4 int32 slots per row
    assert cake.bytes_per_voxel() == 48


def test_add_layer_keeps_a_matching_layer_and_refuses_another_shape():
    cake = cake_with_layers(3)
    same = cake.add_layer('score', 0, torch.float32)
    assert same is cake['score'] and same[1] == 0.5                  # kept as it is
    with pytest.raises(ValueError, match="'score' exists"):
        cake.add_layer('score', 2, torch.float32)
    cake.remove_layer('score')
    assert 'score' not in cake and 'score' not in cake.memory_report()
    with pytest.raises(ValueError, match='keys'):
        cake.remove_layer('keys')


def test_save_load_round_trips_every_persisted_layer(tmp_path):
    vmap = VoxelFeatureMap(0.1, 4, capacity=16)
    g = torch.Generator().manual_seed(1)
    vmap.integrate(torch.rand(40, 3, generator=g), torch.randn(40, 4, generator=g), torch.rand(40, 3, generator=g) * 255)
    n = vmap.size
    extra_layers = {'purified': (4, torch.float16, True), 'normals': (3, torch.float32, False),
                    'embeddings': (5, torch.float16, False), 'label_evidence': (2, torch.float32, False)}
    for name, (width, dtype, feature) in extra_layers.items():
        vmap.cake.add_layer(name, width, dtype, feature=feature)[:n] = torch.randn(n, width, generator=g).to(dtype)
    vmap.cake.add_layer('scratch', 1, torch.float32, persist=False)[:n] = 1.0
    save_map(tmp_path / 'm.ov3dmap', vmap, {})
    back, _, extra = load_map(tmp_path / 'm.ov3dmap')
    assert not extra and back.size == n
    assert set(back.cake.layers) == set(vmap.cake.layers) - {'scratch'}
    for name in vmap.cake.persisted():
        assert back.cake.specs[name] == vmap.cake.specs[name], name
        assert torch.equal(back.cake.rows(name), vmap.cake.rows(name)), name
    assert torch.equal(back.norms[:n], vmap.norms[:n])              # derived, not persisted: recomputed
    back.project(torch.eye(4)[:, :2])                               # the feature flags survived the file
    assert back.cake.specs['purified'].width == 2 and back.cake.specs['normals'].width == 3
    save_map(tmp_path / 'less.ov3dmap', vmap, {}, skip_layers=('purified', 'normals'))
    less, _, _ = load_map(tmp_path / 'less.ov3dmap')
    assert 'purified' not in less.cake and 'embeddings' in less.cake


def test_load_state_validates_before_replacing():
    cake = cake_with_layers(3)
    with pytest.raises(ValueError, match='not unique'):
        cake.load_state({'keys': torch.tensor([1, 1])})
    with pytest.raises(ValueError, match="'x' has shape"):
        cake.load_state({'keys': torch.tensor([1, 2]), 'x': torch.zeros(3)})
    assert cake.size == 3 and 'feat' in cake                         # unchanged


def test_a_shared_cake_reads_the_same_rows_and_keeps_its_own_layers():
    cake = cake_with_layers(5)
    other = cake.share(['feat'])
    assert other['feat'] is cake['feat'] and 'score' not in other
    assert other.lookup(torch.tensor([103])).tolist() == [3]
    other.add_layer('pooled', 4, torch.float16)[:5] = 1
    assert 'pooled' not in cake and other.size == cake.size == 5


def test_key_index_probes_past_full_windows_and_around_the_table_end():
    from ov3d_ros.core.layer_cake import KeyIndex
    index = KeyIndex(32, torch.device('cpu'))
    candidates = torch.arange(1, 200_000)
    homes = index._home(candidates)
    last = candidates[homes == index.slots - 1][:14]        # all want the last slot: chains wrap to slot 0 onwards
    first = candidates[homes == 3][:2]                       # a home inside that chain
    keys = torch.cat([last, first])
    row_keys = torch.zeros(64, dtype=torch.int64)
    row_keys[:len(keys)] = keys
    index.insert(keys[:5], torch.arange(5))                  # in two calls: the second races past the first
    index.insert(keys[5:], torch.arange(5, len(keys)))
    assert index.find(keys, row_keys).tolist() == list(range(len(keys)))
    absent = torch.cat([candidates[homes == index.slots - 1][14:20], candidates[homes == 3][2:4]])
    assert (index.find(absent, row_keys) == -1).all()
    assert int((index.table >= 0).sum()) == len(keys)


def test_probing_slot_by_slot_finds_what_probing_by_windows_does(monkeypatch):
    """A CPU find probes one slot per step, a CUDA find windows of slots: on a crowded table (long chains, chains
    across the table's end) both return every present key's row and -1 for every absent key."""
    from ov3d_ros.core.layer_cake import KeyIndex
    g = torch.Generator().manual_seed(5)
    keys = torch.randperm(1 << 20, generator=g)[:700] * 7919
    index = KeyIndex(1024, torch.device('cpu'))                      # 60 % full: chains of many slots
    row_keys = keys[:600].clone()
    index.insert(row_keys, torch.arange(600))
    probe = keys[torch.randint(0, 700, (5_000,), generator=g)]      # present and absent keys, repeats
    homes = index._home(probe)
    run = torch.stack([index.table.index_select(0, (homes + j) & (index.slots - 1)) >= 0 for j in range(4)])
    assert int(run.all(0).sum()) > 500         # many keys meet 4 or more occupied slots from their home on
    by_slot = index.find(probe, row_keys)
    expected = torch.tensor([int(torch.nonzero(row_keys == k)[0]) if bool((row_keys == k).any()) else -1
                             for k in probe.tolist()])
    assert torch.equal(by_slot, expected) and (expected < 0).sum() > 500
    monkeypatch.setattr(KeyIndex, '_probe_slots', KeyIndex._probe_windows)
    assert torch.equal(index.find(probe, row_keys), expected)


def test_a_find_in_batches_returns_what_one_batch_does(monkeypatch):
    from ov3d_ros.core.layer_cake import KeyIndex
    g = torch.Generator().manual_seed(3)
    keys = torch.randperm(10_000, generator=g)[:300] * 7919
    cake = LayerCake('cpu', capacity=16)
    cake.insert(keys[:200])
    probe = keys[torch.randint(0, 300, (1_000,), generator=g)]      # present and absent keys, repeats
    whole = cake.lookup(probe)
    assert (whole >= 0).sum() > 500 and (whole < 0).sum() > 200
    monkeypatch.setattr(KeyIndex, 'FIND_KEYS', 64)                  # 16 batches, the last one short
    assert torch.equal(cake.lookup(probe), whole)
    assert torch.equal(cake.keys[cake.lookup(probe)[whole >= 0]], probe[whole >= 0])


def test_epoch_counts_what_moves_rows_but_not_inserts_nor_projections():
    """State kept per row (normals, the superpoint vote) rebuilds when the epoch changes: compaction, clearing
    and loading change it; inserting rows (growth included) does not, nor does a projection of the features,
    which the basis epoch counts instead."""
    cake = cake_with_layers(10)
    e = cake.epoch
    cake.insert(torch.arange(1000, 1030))
    assert cake.epoch == e
    cake.keep(torch.arange(0, 40, 2))
    assert cake.epoch == e + 1
    b = cake.basis_epoch
    cake.project(torch.eye(4)[:, :2])
    assert cake.epoch == e + 1 and cake.basis_epoch == b + 1
    cake.load_state(cake.state())
    assert cake.epoch == e + 2
    cake.clear()
    assert cake.epoch == e + 3
    assert cake.share().epoch == cake.epoch and cake.share().basis_epoch == cake.basis_epoch


@pytest.mark.parametrize('dtype,width', [(torch.float16, 384), (torch.float16, 64), (torch.float16, 6),
                                         (torch.float16, 3), (torch.float32, 3), (torch.uint8, 8)])
def test_write_rows_is_index_copy_bit_for_bit(dtype, width):
    """Rows written as wider words (16, 8 or 4 bytes where a row's bytes split into them) or element by element
    (3 fp16, 3 fp32) land exactly where index_copy_ puts them, every bit kept (NaN payloads included)."""
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 256, (40, width * torch.empty(0, dtype=dtype).element_size()), dtype=torch.uint8,
                         generator=g)
    layer = bits.view(dtype)
    rows = torch.tensor([7, 0, 39, 12, 13])
    values = torch.randint(0, 256, (6, bits.shape[1]), dtype=torch.uint8, generator=g).view(dtype)
    for v in (values[:5], values[1:]):                     # aligned, and offset by one row
        expect = layer.clone().index_copy_(0, rows, v)
        got = layer.clone()
        assert write_rows(got, rows, v) is got
        assert torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
    if dtype == torch.uint8:                               # values at an odd byte offset: element by element
        v = torch.randint(0, 256, (5 * width + 1,), dtype=torch.uint8, generator=g)[1:].view(5, width)
        assert torch.equal(write_rows(layer.clone(), rows, v), layer.clone().index_copy_(0, rows, v))
