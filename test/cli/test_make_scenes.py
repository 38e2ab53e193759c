"""ov3d make-scenes on tiny scenes: what it replaces, what it leaves alone, and scenes.json."""
import json

from ov3d_ros.cli.main import main



def make(out, seed, fmt, frames=2):
    return main(['make-scenes', '--out', str(out), '--seed', str(seed), '--format', fmt, '--count', '1',
                 '--frames', str(frames), '--width', '32', '--height', '24', '--quiet'])


def listed(out):
    return sorted((e['seed'], key, e[key].split('/')[-1]) for e in json.loads((out / 'scenes.json').read_text())
                  for key in ('folder', 'bag') if key in e)


def test_a_bag_run_leaves_the_folder_of_the_same_seed_and_the_list_keeps_both(tmp_path):
    """--format bag once wrote scene_SSSS/ for its ground truth and removed it after: the folder dataset of an
    earlier run was gone, and scenes.json listed only the last run."""
    assert make(tmp_path, 3, 'folder') == 0
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / 'scene_0003').rglob('*'))
    assert make(tmp_path, 3, 'bag') == 0
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / 'scene_0003').rglob('*')) == before
    assert (tmp_path / 'scene_0003_bag' / 'metadata.yaml').exists()
    assert (tmp_path / 'scene_0003_bag' / 'gt_points.npz').exists()
    assert make(tmp_path, 4, 'bag') == 0
    assert not (tmp_path / 'scene_0004').exists()          # a bag run makes no folder
    assert listed(tmp_path) == [(3, 'bag', 'scene_0003_bag'), (3, 'folder', 'scene_0003'),
                                (4, 'bag', 'scene_0004_bag')]
    # its own scene of the same name and format is replaced: 3 frames where there were 2
    assert make(tmp_path, 3, 'folder', frames=3) == 0
    assert len(list((tmp_path / 'scene_0003' / 'color').iterdir())) == 3
    assert listed(tmp_path) == [(3, 'bag', 'scene_0003_bag'), (3, 'folder', 'scene_0003'),
                                (4, 'bag', 'scene_0004_bag')]


def test_folders_with_other_files_are_never_replaced(tmp_path, capsys):
    """A user's scene_0005/ (a made scene with notes.txt added) was removed by --format bag --seed 5."""
    assert make(tmp_path, 5, 'folder') == 0
    notes = tmp_path / 'scene_0005' / 'notes.txt'
    notes.write_text('mine')
    assert make(tmp_path, 5, 'bag') == 0                   # not written by a bag run: left alone
    assert notes.read_text() == 'mine' and (tmp_path / 'scene_0005' / 'color').is_dir()
    capsys.readouterr()
    assert make(tmp_path, 5, 'both') == 2                  # written: refused, before anything is made
    err = capsys.readouterr().err
    assert 'scene_0005 is not a scene folder that make-scenes wrote (notes.txt)' in err
    assert 'never replaced' in err and notes.read_text() == 'mine'
    (tmp_path / 'scene_0005_bag' / 'extra.bin').write_bytes(b'x')
    notes.unlink()
    assert make(tmp_path, 5, 'bag') == 2
    assert 'scene_0005_bag is not a scene bag that make-scenes wrote (extra.bin)' in capsys.readouterr().err
    (tmp_path / 'scene_0006').write_text('a file')
    assert make(tmp_path, 6, 'folder') == 2
    assert 'scene_0006 is not a scene folder that make-scenes wrote (scene_0006 is not a folder)' in \
        capsys.readouterr().err
    assert (tmp_path / 'scene_0006').read_text() == 'a file'


def test_a_scenes_json_that_is_not_a_scene_list_is_refused(tmp_path, capsys):
    (tmp_path / 'scenes.json').write_text('{"mine": 1}')
    assert make(tmp_path, 1, 'folder') == 2
    assert 'scenes.json: not a scene list this tool wrote' in capsys.readouterr().err
    assert not (tmp_path / 'scene_0001').exists() and (tmp_path / 'scenes.json').read_text() == '{"mine": 1}'
