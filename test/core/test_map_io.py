import json
import re
import struct

import pytest
import torch

from ov3d_ros.core.map_io import MapFileError, encode_map, load_extra, load_map, save_map
from ov3d_ros.core.voxel_map import VoxelFeatureMap


def small_map(n=50, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = VoxelFeatureMap(0.05, dim, capacity=16)
    m.integrate(torch.rand(n, 3, generator=g) * 3 - 1, torch.randn(n, dim, generator=g),
                torch.rand(n, 3, generator=g) * 255)
    return m


def test_round_trip_is_exact(tmp_path):
    m = small_map()
    size = save_map(tmp_path / 'a.ov3dmap', m, {'feature_source': 'x', 'keyframes': 3},
                    {'text_vectors': torch.ones(2, 8)})
    assert size == (tmp_path / 'a.ov3dmap').stat().st_size
    back, info, extra = load_map(tmp_path / 'a.ov3dmap')
    assert info == {'feature_source': 'x', 'keyframes': 3}
    assert back.voxel_size_m == m.voxel_size_m and len(back) == len(m)
    for name, t in m.state().items():
        assert torch.equal(back.state()[name], t), name
    assert torch.equal(extra['text_vectors'], torch.ones(2, 8))
    info, only = load_extra(tmp_path / 'a.ov3dmap')      # the non-row tensors alone, without the voxel map
    assert info == {'feature_source': 'x', 'keyframes': 3} and list(only) == ['text_vectors']
    assert torch.equal(only['text_vectors'], torch.ones(2, 8))
    # lookups work after loading (the sorted index is rebuilt)
    assert torch.equal(back.lookup(m.keys[:len(m)]), torch.arange(len(m)))
    assert not list(tmp_path.glob('.*.tmp'))


@pytest.mark.parametrize('load_map', [load_map, load_extra], ids=['load_map', 'load_extra'])
def test_corrupt_truncated_foreign_and_future_files_are_refused(tmp_path, load_map):
    blob = bytearray(encode_map(small_map(), {}))
    path = tmp_path / 'm'
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    path.write_bytes(bytes(flipped))
    with pytest.raises(MapFileError, match='checksum'):
        load_map(path)
    path.write_bytes(bytes(blob[:len(blob) // 2]))
    with pytest.raises(MapFileError, match='checksum|corrupt|header'):
        load_map(path)
    path.write_bytes(b'\x00' * 4)
    with pytest.raises(MapFileError, match='too short'):
        load_map(path)
    path.write_bytes(b'PK\x03\x04 this is a zip, not a map' * 3)
    with pytest.raises(MapFileError, match='not a safetensors'):
        load_map(path)
    # a future format version: rewrite the header's version field
    (hlen,) = struct.unpack('<Q', blob[:8])
    header = json.loads(blob[8:8 + hlen])
    header['__metadata__']['format_version'] = '99'
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack('<Q', len(new)) + new + bytes(blob[8 + hlen:]))
    with pytest.raises(MapFileError, match='version 99 is newer'):
        load_map(path)
    with pytest.raises(MapFileError, match='cannot read'):
        load_map(tmp_path / 'missing')


def test_load_state_rejects_inconsistent_fields():
    m = small_map()
    state = dict(m.state())
    state['features'] = state['features'][:-1]
    with pytest.raises(ValueError, match='features'):
        VoxelFeatureMap(0.05, 8).load_state(state)


SAVER = '''
import sys, torch
from ov3d_ros.core.map_io import save_map
from ov3d_ros.core.voxel_map import VoxelFeatureMap
m = VoxelFeatureMap(0.05, 384, capacity=16)
m.integrate(torch.rand(60000, 3) * 20, torch.randn(60000, 384), torch.rand(60000, 3) * 255)
print('ready', flush=True)
k = 0
while True:
    k += 1
    save_map(sys.argv[1], m, {'feature_source': 'x', 'keyframes': k})
    print('saved', k, flush=True)
'''


def test_kill_9_during_saves_never_leaves_a_corrupt_map(tmp_path):
    """A process saving a 45 MB map in a loop is killed after it reported a completed save, while it writes the
    next one (at a random moment of it); the file always loads and holds the reported save or a later one. The
    kill waits for the child's report, never for the clock, so a slow machine only makes the test slower."""
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    path = tmp_path / 'm.ov3dmap'
    repo = str(Path(__file__).resolve().parents[2])
    rng = random.Random(0)
    versions = set()
    for _ in range(5):
        p = subprocess.Popen([sys.executable, '-c', SAVER, str(path)], cwd=repo, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == 'ready'
            wanted, saved = rng.randint(1, 2), 0
            while saved < wanted:                   # completed saves reported by the child
                line = p.stdout.readline().split()
                assert line and line[0] == 'saved', f'saver ended early: {line}'
                saved = int(line[1])
            time.sleep(rng.uniform(0.0, 0.3))       # somewhere in the next save (or a later one)
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait()
        vmap, info, _ = load_map(path)
        assert len(vmap) > 59000
        assert info['keyframes'] >= saved
        versions.add(info['keyframes'])
    assert path.exists() and versions


def test_files_without_a_layer_list_still_load(tmp_path):
    """Files written before the 'layers' metadata: the fusion layers, label_evidence as a layer, the rest extra."""
    from safetensors.torch import save as st_save
    from ov3d_ros.core.map_io import _payload_sha256
    m = small_map()
    n = m.size
    tensors = {k: v.contiguous() for k, v in m.state().items() if k not in VoxelFeatureMap.OPTIONAL}   # no views then
    tensors['label_evidence'] = torch.rand(n, 3)
    tensors['text_vectors'] = torch.ones(2, 8)
    meta = {'format': 'ov3d_ros.map', 'format_version': '1', 'voxel_size_m': repr(m.voxel_size_m), 'dim': '8',
            'info': json.dumps({'vocabulary': ['a', 'b', 'c']})}
    meta['payload_sha256'] = _payload_sha256(st_save(tensors, metadata=meta))
    (tmp_path / 'old.ov3dmap').write_bytes(st_save(tensors, metadata=meta))
    back, info, extra = load_map(tmp_path / 'old.ov3dmap')
    assert set(back.cake.layers) == set(VoxelFeatureMap.FIELDS) | {'norms', 'label_evidence'}
    assert torch.equal(back.cake.rows('label_evidence'), tensors['label_evidence'])
    assert list(extra) == ['text_vectors'] and back.cake.specs['features'].feature
    for name in tensors.keys() & set(VoxelFeatureMap.FIELDS):
        assert torch.equal(back.state()[name], m.state()[name]), name
    assert not back.state()['views'].any()              # no direction to the cameras: no convexity in the vote


def test_files_get_the_mode_a_plain_open_gives(tmp_path):
    """A new file: 0666 less the umask (not mkstemp's 0600, which hides it from a reader under another account);
    a replaced file keeps its own mode."""
    import os
    from ov3d_ros.core.map_io import write_atomic
    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / 'new.bin', b'x')
        os.umask(0o027)
        write_atomic(tmp_path / 'g.bin', b'x')
        (tmp_path / 'kept.bin').write_bytes(b'old')
        os.chmod(tmp_path / 'kept.bin', 0o640)
        write_atomic(tmp_path / 'kept.bin', b'new')
    finally:
        os.umask(old)
    assert (tmp_path / 'new.bin').stat().st_mode & 0o777 == 0o644
    assert (tmp_path / 'g.bin').stat().st_mode & 0o777 == 0o640
    assert (tmp_path / 'kept.bin').stat().st_mode & 0o777 == 0o640 and (tmp_path / 'kept.bin').read_bytes() == b'new'


def test_a_symlink_is_written_through(tmp_path):
    """``latest.ov3dmap`` -> a dated map: a save replaces the target and keeps the link (it replaced the link with
    a file, and the dated map kept the old contents)."""
    import os
    from ov3d_ros.core.map_io import write_atomic
    (tmp_path / 'maps').mkdir()
    target = tmp_path / 'maps' / '2026-12-07.bin'
    target.write_bytes(b'old')
    os.symlink('maps/2026-12-07.bin', tmp_path / 'latest.bin')
    write_atomic(tmp_path / 'latest.bin', b'new')
    assert (tmp_path / 'latest.bin').is_symlink() and target.read_bytes() == b'new'
    os.symlink('maps/next.bin', tmp_path / 'dangling.bin')                # a link to a file not made yet
    write_atomic(tmp_path / 'dangling.bin', b'first')
    assert (tmp_path / 'dangling.bin').is_symlink() and (tmp_path / 'maps' / 'next.bin').read_bytes() == b'first'
    assert sorted(p.name for p in (tmp_path / 'maps').iterdir()) == ['2026-12-07.bin', 'next.bin']   # no .tmp left


def test_a_file_that_is_not_a_map_is_refused_from_its_first_bytes(tmp_path):
    """A 64 GB file given by mistake (a bag, a disk image) is refused by its header, not read whole first (which
    ran out of memory); a FIFO is refused, not waited on."""
    import os
    big = tmp_path / 'recording.mcap'
    with open(big, 'wb') as f:
        f.write(b'\x89MCAP0\r\n' + b'x' * 100)
        f.truncate(1 << 36)                                             # sparse: no disk used
    for read in (lambda p: load_map(p), lambda p: load_extra(p)):
        with pytest.raises(MapFileError, match='not a safetensors map file'):
            read(big)
    os.mkfifo(tmp_path / 'pipe')
    with pytest.raises(MapFileError, match='not a regular file'):
        load_map(tmp_path / 'pipe')


def with_metadata(blob: bytes, **changes) -> bytes:
    """``blob`` with its header metadata edited (the payload and its checksum unchanged)."""
    (n,) = struct.unpack('<Q', blob[:8])
    header = json.loads(blob[8:8 + n])
    header['__metadata__'].update(changes)
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    return struct.pack('<Q', len(text)) + text + blob[8 + n:]


@pytest.mark.parametrize('changes, problem', [
    ({'voxel_size_m': 'nan'}, 'voxel_size_m must be a finite number > 0, got nan'),
    ({'voxel_size_m': '0'}, 'voxel_size_m must be a finite number > 0'),
    ({'dim': 'abc'}, "dim 'abc' is not a number"),
    ({'format_version': 'abc'}, "format_version 'abc' is not an integer"),
    ({'info': '[]'}, 'info must be an object, got list'),
    ({'info': 'null'}, 'info must be an object, got NoneType'),
    ({'info': '{"config": 3}'}, 'info.config must be an object'),
    ({'info': '{"config": {"map": 3}}'}, 'info.config must be an object'),
    ({'info': '{"class_names": 3}'}, 'info.class_names must be a list of strings'),
    ({'layers': '[]'}, 'layers must be an object'),
    # safetensors itself refused these (SafetensorError, no ValueError: a traceback in the tools, past the node's
    # service), or they loaded and failed later with a TypeError or KeyError
    ({'dim': 8}, 'metadata values must be strings, got dim = 8'),
    ({'layers': json.dumps({'keys': {'width': '0', 'dtype': 'int64'}})}, 'layers.keys must be {"width": integer'),
    ({'layers': json.dumps({'keys': {'width': 0, 'dtype': 'int65'}})}, "layers.keys: unknown layer dtype 'int65'"),
    ({'info': '{"keyframes": "x"}'}, "info.keyframes must be an integer >= 0, got 'x'"),
    ({'info': '{"keyframes": 2.5}'}, 'info.keyframes must be an integer >= 0, got 2.5'),
    ({'info': '{"text_names": ["wall"]}'}, 'info.text_names without a text_vectors tensor'),
], ids=['vs_nan', 'vs_zero', 'dim', 'version', 'info_list', 'info_null', 'config', 'section', 'class_names',
        'layers', 'not_string', 'width', 'dtype', 'keyframes', 'keyframes_float', 'text_names'])
@pytest.mark.parametrize('load_map', [load_map, load_extra], ids=['load_map', 'load_extra'])
def test_edited_headers_are_refused_naming_the_file(tmp_path, load_map, changes, problem):
    """The checksum covers the payload only: an edited header passed it and gave NaN coordinates or a
    TypeError/AttributeError in whatever read it next."""
    path = tmp_path / 'edited.ov3dmap'
    path.write_bytes(with_metadata(encode_map(small_map(), {'config': {'map': {}}}), **changes))
    with pytest.raises(MapFileError, match=problem) as e:
        load_map(path)
    assert str(e.value).startswith(f'{path}: ')


def test_a_map_whose_config_names_no_feature_source_is_refused_naming_the_file(tmp_path):
    from ov3d_ros.core.mapper import Mapper
    path = tmp_path / 'edited.ov3dmap'
    path.write_bytes(with_metadata(encode_map(small_map(), {'config': {'features': {'source': 'banana'}}})))
    with pytest.raises(MapFileError, match="unusable config in the map file .*features.source must be one of") as e:
        Mapper.from_file(path, device='cpu')
    assert str(e.value).startswith(f'{path}: ')


def with_header(blob: bytes, edit, old: bool = True) -> bytes:
    """``blob`` with its parsed safetensors header changed in place by ``edit`` (the payload unchanged); ``old``:
    without the tensor table's checksum, as files written before it."""
    (n,) = struct.unpack('<Q', blob[:8])
    header = json.loads(blob[8:8 + n])
    edit(header)
    if old:
        header['__metadata__'].pop('tensors_sha256', None)
    text = json.dumps(header).encode()
    text += b' ' * (-len(text) % 8)
    return struct.pack('<Q', len(text)) + text + blob[8 + n:]


def test_a_file_without_the_tensor_table_checksum_still_loads(tmp_path):
    path = tmp_path / 'old.ov3dmap'
    path.write_bytes(with_header(encode_map(small_map(), {'keyframes': 3}), lambda h: None))
    back, info, _ = load_map(path)
    assert len(back) == len(small_map()) and info == {'keyframes': 3}


def _offsets(h):
    h['colors']['data_offsets'][1] -= 4          # the tensor no longer fits its shape


def _colors_as_int(h):
    h['colors']['dtype'] = 'I32'                 # same bytes, read as other values


def _features_as_float32(h):
    h['features']['dtype'], h['features']['shape'] = 'F32', [h['features']['shape'][0], 4]   # (V, 8) F16: same bytes


@pytest.mark.parametrize('edit, problem', [
    (_offsets, 'invalid shape, data type, or offset'),
    (_colors_as_int, "layer 'colors' is stored as int32, its layers entry says float32"),
    (_features_as_float32, "layer 'features' is stored as float32, its layers entry says float16"),
], ids=['offsets', 'colors_int', 'features_float32'])
def test_an_edited_tensor_table_is_refused_naming_the_file(tmp_path, edit, problem):
    """The payload checksum covers the tensor data only: a tensor table edited to still parse gave safetensors'
    own exception (a traceback in ov3d query/merge/view/label, past the node's load_map service) or loaded the
    bytes as other values (colours of 1e9). Files written now checksum the table; older ones are checked against
    their layer list."""
    from ov3d_ros.cli.main import main
    blob = encode_map(small_map(), {'keyframes': 1})
    path = tmp_path / 'edited.ov3dmap'
    path.write_bytes(with_header(blob, edit, old=False))
    for load in (load_map, load_extra):
        with pytest.raises(MapFileError, match='checksum mismatch of the tensor table') as e:
            load(path)
        assert str(e.value).startswith(f'{path}: ')
    path.write_bytes(with_header(blob, edit))
    with pytest.raises(MapFileError, match=problem) as e:
        load_map(path)
    assert str(e.value).startswith(f'{path}: invalid map contents')
    assert main(['query', str(path), 'chair', '--out', str(tmp_path / 'c.ply')]) == 2
    assert not (tmp_path / 'c.ply').exists()


def test_fusion_layers_of_files_without_a_layer_list_are_checked_against_their_dtypes(tmp_path):
    from safetensors.torch import save as st_save
    from ov3d_ros.core.map_io import _payload_sha256
    m = small_map()
    tensors = {k: v.contiguous() for k, v in m.state().items()}
    tensors['colors'] = tensors['colors'].view(torch.int32)       # what an edited dtype reads
    meta = {'format': 'ov3d_ros.map', 'format_version': '1', 'voxel_size_m': repr(m.voxel_size_m), 'dim': '8',
            'info': '{}'}
    meta['payload_sha256'] = _payload_sha256(st_save(tensors, metadata=meta))
    (tmp_path / 'old.ov3dmap').write_bytes(st_save(tensors, metadata=meta))
    with pytest.raises(MapFileError, match="layer 'colors' is stored as int32, its layers entry says float32"):
        load_map(tmp_path / 'old.ov3dmap')


@pytest.mark.parametrize('layer, row, value', [('features', 3, float('nan')), ('weights', 7, float('inf')),
                                               ('colors', 0, float('-inf')), ('label_evidence', 5, float('nan'))])
def test_nan_or_inf_in_a_layer_is_refused_naming_the_layer(tmp_path, layer, row, value):
    """NaN or inf loaded silently; a merge then spread the NaN over the whole map (pooled means), and every query
    of it answered nothing."""
    from ov3d_ros.core.merge import merge_files
    m = small_map()
    m.cake.add_layer('label_evidence', 2, torch.float32)[:m.size] = 1.0
    good, bad = tmp_path / 'good.ov3dmap', tmp_path / 'bad.ov3dmap'
    save_map(good, m, {})
    m.cake[layer][row] = value
    m.cake[layer][row + 1] = value
    save_map(bad, m, {})
    with pytest.raises(MapFileError, match=re.escape(f"{bad}: invalid map contents (layer '{layer}' holds NaN or inf "
                                                     f"in 2 of {m.size} rows)")):
        load_map(bad)
    with pytest.raises(MapFileError, match='holds NaN or inf'):
        merge_files([good, bad], tmp_path / 'merged.ov3dmap')
    assert not (tmp_path / 'merged.ov3dmap').exists()


@pytest.mark.parametrize('load_map', [load_map, load_extra], ids=['load_map', 'load_extra'])
def test_nan_in_an_extra_tensor_or_a_text_table_unlike_its_names_is_refused(tmp_path, load_map):
    path = tmp_path / 'm.ov3dmap'
    vectors = torch.ones(3, 8)
    vectors[1, 2] = float('nan')
    save_map(path, small_map(), {}, {'text_vectors': vectors})
    with pytest.raises(MapFileError, match=re.escape(f"{path}: invalid map contents (tensor 'text_vectors' holds NaN "
                                                     'or inf in 1 of 3 rows)')):
        load_map(path)
    save_map(path, small_map(), {'text_names': ['wall', 'floor']}, {'text_vectors': torch.ones(3, 8)})
    with pytest.raises(MapFileError, match=r'text table \(info.text_names, text_vectors\): 2 names but vectors of '
                                           r'shape \(3, 8\)'):
        load_map(path)


def test_is_map_file_of_a_header_whose_metadata_is_not_an_object(tmp_path):
    from ov3d_ros.core.map_io import is_map_file
    path = tmp_path / 'odd.ov3dmap'
    path.write_bytes(with_header(encode_map(small_map(), {}), lambda h: h.update(__metadata__=[1]), old=False))
    assert not is_map_file(path)          # was an AttributeError
