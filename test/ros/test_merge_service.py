"""The node's ~/merge_map service: another robot's map fused into the live map, refusals keep the map."""
import time

import numpy as np

from ov3d_ros.core.map_io import load_map, save_map

from conftest import in_process_node


def test_merge_map_service_fuses_transformed_maps_and_refuses_incompatible_ones(saved_map, start_node, tmp_path):
    from ov3d_ros.srv import MergeMap
    path, voxels = saved_map
    node, client = start_node([f'map_path:={path}', 'load_map_on_start:=true'])
    end = time.monotonic() + 20
    while time.monotonic() < end and not (client.status and client.status['voxels'] == voxels):
        client.spin(0.3)
    assert client.status and client.status['voxels'] == voxels, node.log()[-2000:]
    # the same room seen by a second robot whose map frame is 40 m along x: the maps do not overlap
    T = np.eye(4)
    T[0, 3] = 40.0
    out = tmp_path / 'merged.ov3dmap'
    req = MergeMap.Request(paths=[str(path)], transforms=T.reshape(-1).tolist(), replace=False, out_path=str(out))
    res = client.call(MergeMap, '/ov3d_mapping/merge_map', req)
    assert res.success, res.message
    assert res.voxels == 2 * voxels
    merged, info, _ = load_map(out)
    assert merged.size == 2 * voxels and len(info['merged_from']) == 2
    xs = merged.centers()[:, 0]
    assert float(xs.min()) < 10 < 30 < float(xs.max())
    assert client.query('sofa')['success']
    # another voxel size: refused with the reason, the live map is kept
    vmap, info, extra = load_map(path)
    vmap.voxel_size_m *= 2
    other = tmp_path / 'coarse.ov3dmap'
    save_map(other, vmap, info, extra)
    res = client.call(MergeMap, '/ov3d_mapping/merge_map', MergeMap.Request(paths=[str(other)]))
    assert not res.success and 'voxel size' in res.message and res.voxels == 2 * voxels
    res = client.call(MergeMap, '/ov3d_mapping/merge_map',
                      MergeMap.Request(paths=[str(path)], transforms=[1.0, 2.0, 3.0]))
    assert not res.success and '16 per map' in res.message
    # paths outside map_dir and an out_path that is not a map file: answered, refused before the map is touched
    notes = tmp_path / 'notes.txt'
    notes.write_text('not a map')
    for req, why in [(MergeMap.Request(paths=['../x.ov3dmap']), "'..' is not allowed"),
                     (MergeMap.Request(paths=['/etc/hostname']), 'outside map_dir'),
                     (MergeMap.Request(paths=[str(path)], transforms=T.reshape(-1).tolist(), out_path='/tmp/o.ov3dmap'),
                      'outside map_dir'),
                     (MergeMap.Request(paths=[str(path)], transforms=T.reshape(-1).tolist(), out_path=str(notes)),
                      'is not an ov3d map file')]:
        res = client.call(MergeMap, '/ov3d_mapping/merge_map', req, timeout_s=20)
        assert res is not None and not res.success and why in res.message and 'kept the current map' in res.message
        assert res.voxels == 2 * voxels, res.message
    assert notes.read_text() == 'not a map'
    assert node.alive()


def test_merge_into_an_empty_map_loads_the_maps_and_a_refusal_names_the_current_map(tmp_path, wall_frame):
    """Merging into the node's empty map is loading the merged maps, on their grid (a 0.1 m map merged into a fresh
    0.05 m node was refused for the voxel sizes, naming /tmp/ov3d_merge_.../current.ov3dmap); a refusal calls the
    node's map "the node's current map"."""
    import copy
    from std_srvs.srv import Trigger
    from ov3d_ros.core.mapper import Mapper
    from ov3d_ros.srv import MergeMap
    with in_process_node(map_path=str(tmp_path / 'map.ov3dmap'), **{'map.voxel_size_m': 0.05}) as (node, _, _p):
        cfg = copy.deepcopy(node.mapper.cfg)
        cfg.map.voxel_size_m = 0.1
        other = Mapper(cfg, node.mapper.extractor)
        other.integrate(wall_frame(1.0), force=True)
        other.save(tmp_path / 'grid10.ov3dmap')
        merge = MergeMap.Request(paths=['grid10.ov3dmap'])
        r = node.persistence.on_merge(merge, MergeMap.Response())
        assert r.success and r.voxels == other.map.size > 0, r.message
        assert node.mapper.cfg.map.voxel_size_m == 0.1
        assert node.persistence.on_clear(Trigger.Request(), Trigger.Response()).success     # 0.05 m again
        node._integrate([(node.cameras[0], wall_frame(2.0))])
        voxels = node.mapper.map.size
        r = node.persistence.on_merge(merge, MergeMap.Response())
        assert not r.success and r.voxels == voxels > 0, r.message
        assert "voxel size 0.1 m, the node's current map: 0.05 m" in r.message and 'ov3d_merge_' not in r.message
