import numpy as np
import pytest

from ov3d_ros.datasets import DatasetError
from ov3d_ros.datasets.scannet_folder import ScanNetFolder, write_frame, write_intrinsics
from ov3d_ros.sim import builtin_scene, builtin_trajectory, default_camera, render


@pytest.fixture(scope='module')
def frames():
    scene, cam = builtin_scene(0), default_camera(80, 60)
    poses = builtin_trajectory(scene, 3, 0)
    return cam, [(T, render(scene, cam, T)) for T in poses]


def write_folder(root, cam, frames, features=False):
    write_intrinsics(root, cam)
    for i, (T, f) in enumerate(frames):
        feats = np.random.default_rng(i).normal(size=(5, 7, 8)).astype(np.float32) if features else None
        write_frame(root, i, f.rgb, f.depth_m, T, labels=f.semantic, instances=f.instance, features=feats)


def test_round_trip(tmp_path, frames):
    cam, fr = frames
    write_folder(tmp_path, cam, fr, features=True)
    np.savetxt(tmp_path / 'timestamps.txt', [0.5, 0.7, 0.9])
    ds = ScanNetFolder(tmp_path)
    assert len(ds) == 3 and ds.has_labels and ds.has_features
    assert np.allclose(ds.camera.K, cam.K) and (ds.camera.width, ds.camera.height) == (80, 60)
    for i, frame in enumerate(ds):
        T, f = fr[i]
        assert np.array_equal(frame.rgb, f.rgb)
        assert np.abs(frame.depth_m - f.depth_m).max() <= 0.0005 + 1e-6      # millimetre quantisation
        assert np.allclose(frame.T_W_C, T, atol=1e-8)
        assert np.array_equal(frame.labels, f.semantic)
        assert np.array_equal(ds.read_instances(i), f.instance)
        assert frame.features.shape == (5, 7, 8) and frame.stamp_s == pytest.approx(0.5 + 0.2 * i)


def test_bad_folders_give_clear_errors(tmp_path, frames):
    cam, fr = frames
    with pytest.raises(DatasetError, match='not a directory'):
        ScanNetFolder(tmp_path / 'nope')
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetError, match='needs non-empty color/, depth/ and pose/'):
        ScanNetFolder(tmp_path / 'empty')
    root = tmp_path / 'missing'
    write_folder(root, cam, fr)
    (root / 'pose' / '000001.txt').unlink()
    with pytest.raises(DatasetError, match=r'counts differ \(3/3/2\).*000001'):
        ScanNetFolder(root)
    root = tmp_path / 'corrupt'
    write_folder(root, cam, fr)
    (root / 'depth' / '000002.png').write_bytes((root / 'depth' / '000002.png').read_bytes()[:100])
    ds = ScanNetFolder(root)
    ds.read(0)
    with pytest.raises(DatasetError, match='000002.png: unreadable or corrupt'):
        ds.read(2)
    colour = next((root / 'color').glob('000001.*'))
    colour.write_bytes(colour.read_bytes()[:200])          # a truncated colour image names its file too
    with pytest.raises(DatasetError, match=f'{colour.name}: unreadable or corrupt image'):
        ds.read(1)
    root = tmp_path / 'rgbdepth'
    write_folder(root, cam, fr)
    from PIL import Image
    Image.fromarray(fr[0][1].rgb).save(root / 'depth' / '000000.png')
    with pytest.raises(DatasetError, match='16-bit single-channel'):
        ScanNetFolder(root).read(0)
    root = tmp_path / 'badpose'
    write_folder(root, cam, fr)
    (root / 'pose' / '000001.txt').write_text('1 0 0\n0 1 0\n')
    with pytest.raises(DatasetError, match='000001.txt'):
        ScanNetFolder(root).read(1)
    (root / 'timestamps.txt').write_text('0.1\n0.2\n')
    with pytest.raises(DatasetError, match='2 times for 3 frames'):
        ScanNetFolder(root)
    (root / 'timestamps.txt').write_text('0.1\n0.3\n0.2\n')           # once taken as a jump back in time
    with pytest.raises(DatasetError, match='times must increase frame by frame; frame 000002 at 0.2 s is not after'):
        ScanNetFolder(root)
    root = tmp_path / 'resized'
    write_folder(root, cam, fr)
    depth = Image.open(root / 'depth' / '000001.png')
    depth.resize((depth.width // 2, depth.height // 2)).save(root / 'depth' / '000001.png')
    with pytest.raises(DatasetError, match=r'depth/000001.png is \d+x\d+, but the intrinsics are those of a'):
        ScanNetFolder(root).read(1)


@pytest.mark.parametrize('names, vectors, problem', [
    ([], np.zeros((0, 4)), 'no names'),
    (['a', 'b'], np.array([[1, 0, 0, 0], [np.nan, 0, 0, 0]]), 'not finite'),
    (['a', 'b'], np.array([[1, 0, 0, 0], [0, 0, 0, 0]]), 'all zero'),
    (['a', 'a'], np.eye(2), 'more than once'),
    (['a', 'b'], np.eye(3), '2 names but vectors of shape'),
], ids=['empty', 'nan', 'zero', 'duplicate', 'count'])
def test_unusable_text_tables_are_refused(tmp_path, names, vectors, problem):
    """A NaN or zero vector scores nothing (and NaN != NaN made every later query refuse the map it made); an
    empty table answers nothing."""
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    from ov3d_ros.datasets.scannet_folder import read_text_embeddings
    path = tmp_path / 'text_embeddings.npz'
    np.savez(path, names=np.array(names, dtype=str), vectors=vectors)
    with pytest.raises(DatasetError, match=problem) as e:
        read_text_embeddings(path)
    assert str(path) in str(e.value)
    with pytest.raises(ValueError, match=problem):
        PrecomputedFeatures(names, vectors)


def test_files_that_are_not_npz_archives_are_refused_with_the_file_name(tmp_path):
    from ov3d_ros.datasets.scannet_folder import read_text_embeddings
    (tmp_path / 'zero.npz').write_bytes(b'')
    (tmp_path / 'random.npz').write_bytes(np.random.default_rng(0).bytes(300))
    np.save(tmp_path / 'plain.npy', np.eye(3))
    np.savez(tmp_path / 'other.npz', xyz=np.eye(3))
    np.savez(tmp_path / 'pickled.npz', names=np.array([{'a': 1}], dtype=object), vectors=np.eye(1))
    for name, problem in (('zero.npz', 'an empty file'), ('random.npz', 'another kind of file'),
                          ('plain.npy', 'a plain .npy array'), ('other.npz', 'missing array names, vectors'),
                          ('pickled.npz', 'unreadable .npz archive')):
        with pytest.raises(DatasetError, match=problem) as e:
            read_text_embeddings(tmp_path / name)
        assert str(e.value).startswith(str(tmp_path / name)), str(e.value)


def test_a_camera_with_lens_distortion_is_not_written_as_a_pinhole(tmp_path):
    from ov3d_ros.core.camera import PinholeCamera
    lens = PinholeCamera(50.0, 50.0, 20.0, 15.0, 40, 30, 'plumb_bob', (-0.1, 0.0, 0.0, 0.0, 0.0))
    with pytest.raises(DatasetError, match='keeps no lens distortion'):
        write_intrinsics(tmp_path, lens)
    assert not (tmp_path / 'intrinsic').exists()


def test_frames_with_non_finite_poses_are_skipped_counted_and_logged(tmp_path, frames, caplog):
    """ScanNet writes -inf poses where its tracking was lost: such a frame aborted the whole folder mid-run
    ("expected a finite 3x3 or 4x4 matrix, got shape (4, 4)"); the node drops it, so the folder skips it."""
    cam, fr = frames
    write_folder(tmp_path, cam, fr)
    np.savetxt(tmp_path / 'timestamps.txt', [0.5, 0.7, 0.9])
    (tmp_path / 'pose' / '000001.txt').write_text('\n'.join(['-inf -inf -inf -inf'] * 4) + '\n')
    with caplog.at_level('WARNING'):
        ds = ScanNetFolder(tmp_path)
    assert len(ds) == 2 and ds.stems == ['000000', '000002'] and ds.skipped == {'non_finite_pose': 1}
    assert ds.skipped_frames == ['000001'] and list(ds.stamps) == [0.5, 0.9]
    assert 'skipping 1 of 3 frames whose pose has non-finite values' in caplog.text and '000001' in caplog.text
    assert np.allclose(ds.read(1).T_W_C, fr[2][0], atol=1e-8) and ds.read(1).stamp_s == 0.9
    assert np.array_equal(ds.read_instances(1), fr[2][1].instance)
    for stem in ('000000', '000002'):
        (tmp_path / 'pose' / f'{stem}.txt').write_text('nan ' * 16)
    with pytest.raises(DatasetError, match='every one of the 3 poses has non-finite values'):
        ScanNetFolder(tmp_path)
    for i, (T, _) in enumerate(fr):
        np.savetxt(tmp_path / 'pose' / f'{i:06d}.txt', T)
    (tmp_path / 'intrinsic' / 'intrinsic_depth.txt').write_text('1 0 0\n0 inf 0\n0 0 1\n')
    with pytest.raises(DatasetError, match=r'intrinsic_depth.txt: expected a finite 3x3 or 4x4 matrix, got '
                                           r'non-finite values \(1 of 9'):
        ScanNetFolder(tmp_path)


def test_ov3d_map_maps_the_other_frames_and_reports_the_skipped_ones(tmp_path, frames, capsys):
    import json
    from ov3d_ros.cli.main import main
    cam, fr = frames
    write_folder(tmp_path / 'scene', cam, fr)
    (tmp_path / 'scene' / 'pose' / '000001.txt').write_text('\n'.join(['-inf -inf -inf -inf'] * 4) + '\n')
    assert main(['map', str(tmp_path / 'scene'), '--out', str(tmp_path / 'm.ov3dmap'), '--features', 'simulated',
                 '--device', 'cpu', '--quiet', '--set', 'keyframes.min_translation_m=0.0']) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary['frames'] == 2 and summary['skipped'] == {'non_finite_pose': 1} and summary['voxels'] > 0


def test_frames_named_by_unpadded_numbers_are_taken_in_number_order(tmp_path, frames):
    """ScanNet's Python SensReader writes 0.png ... 23.png: sorted as text, frame 10 came after frame 1, and
    --frames 0:12 mapped 0, 1, 10, ..., 19, 2 (the wrong frames, out of time order)."""
    cam, fr = frames
    write_intrinsics(tmp_path, cam)
    for i in range(12):
        T = fr[0][0].copy()
        T[0, 3] += 0.01 * i
        write_frame(tmp_path, i, fr[0][1].rgb, fr[0][1].depth_m, T)
    for sub, ext in (('color', 'png'), ('depth', 'png'), ('pose', 'txt')):
        for i in range(12):
            (tmp_path / sub / f'{i:06d}.{ext}').rename(tmp_path / sub / f'{i}.{ext}')
    ds = ScanNetFolder(tmp_path)
    assert ds.stems == [str(i) for i in range(12)]
    assert [round((f.T_W_C[0, 3] - fr[0][0][0, 3]) / 0.01) for f in ds] == list(range(12))
    for sub, ext in (('color', 'png'), ('depth', 'png'), ('pose', 'txt')):
        (tmp_path / sub / f'11.{ext}').rename(tmp_path / sub / f'last.{ext}')
    with pytest.raises(DatasetError, match=r'frame names mix numbers \(0, 1, 2\) with other names \(last\)'):
        ScanNetFolder(tmp_path)
    for sub, ext in (('color', 'png'), ('depth', 'png'), ('pose', 'txt')):
        (tmp_path / sub / f'last.{ext}').rename(tmp_path / sub / f'07.{ext}')
    with pytest.raises(DatasetError, match='frame names 07 and 7 are the same number'):
        ScanNetFolder(tmp_path)


def test_an_unknown_name_lists_the_first_20_known_ones_and_how_many_more():
    """The list stopped at 20 names without a sign that the table held more."""
    from ov3d_ros.core.features.precomputed import PrecomputedFeatures
    names = [f'class{i}' for i in range(25)]
    with pytest.raises(ValueError, match=r'know only: class0, class1, .*, class19 and 5 more$'):
        PrecomputedFeatures(names, np.eye(25)).encode_text(['sofa'])
    with pytest.raises(ValueError, match=r'know only: class0, .*, class19$'):
        PrecomputedFeatures(names[:20], np.eye(20)).encode_text(['sofa'])
