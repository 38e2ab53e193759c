import pytest
import torch
import torch.nn.functional as F

from ov3d_ros.core.config import PurifyConfig
from ov3d_ros.core.purification.graph import ball_offsets, cube_offsets, estimate_normals, neighbour_rows
from ov3d_ros.core.purification.pooling import GeometryPooling
from ov3d_ros.core.purification.superpoints import (convex_edges, segment_graph, segment_rows, superpoint_vote,
                                                   voxel_edges)
from ov3d_ros.core.query import row_norms
from ov3d_ros.core.voxel_map import VoxelFeatureMap


def grid_graph(h, w):
    g = torch.arange(h * w).reshape(h, w)
    i = torch.cat([g[:, :-1].flatten(), g[:-1, :].flatten()])
    j = torch.cat([g[:, 1:].flatten(), g[1:, :].flatten()])
    return i, j


def test_segments_follow_strong_edges_and_never_cross_them():
    """A 20x20 grid in two halves joined by heavy edges: at any k up to the heavy weight, no region crosses the
    cut; a larger k gives fewer regions; min_size merges the small ones."""
    i, j = grid_graph(20, 20)
    w = torch.rand(len(i), generator=torch.Generator().manual_seed(0)) * 0.05
    left_i, left_j = (i % 20) < 10, (j % 20) < 10
    w[left_i != left_j] += 1.0
    counts = []
    for k in (0.001, 0.01, 0.5):
        seg = segment_graph(400, i, j, w, k)
        left = seg[torch.arange(400) % 20 < 10]
        right = seg[torch.arange(400) % 20 >= 10]
        assert not set(left.tolist()) & set(right.tolist())
        assert sorted(set(seg.tolist())) == list(range(int(seg.max()) + 1))      # ids 0..S-1
        counts.append(int(seg.max()) + 1)
    assert counts[0] > counts[1] >= counts[2] == 2
    seg = segment_graph(400, i, j, w, 0.001, min_size=30)
    assert int(seg.max()) + 1 < counts[0] and torch.bincount(seg).min() >= 30
    # a cut that is cheap compared with k is crossed: one region
    assert int(segment_graph(400, i, j, w * 0.01, 5.0).max()) == 0


def test_segments_of_an_edgeless_or_empty_graph():
    none = torch.zeros(0, dtype=torch.int64)
    assert segment_graph(0, none, none, torch.zeros(0), 1.0).numel() == 0
    assert segment_graph(3, none, none, torch.zeros(0), 1.0, min_size=5).tolist() == [0, 1, 2]


def box_corner_map():
    """A floor (z = 0) and a wall (x = 0) meeting at a right angle, 1 voxel per unit, the same colour, with
    features: the wall is class 1, the floor class 0, but a 4x10 part of the floor reads class 1 (a region-level
    error of the 2D model) and every voxel has some noise."""
    g = torch.Generator().manual_seed(0)
    floor = torch.stack(torch.meshgrid(torch.arange(1, 16), torch.arange(10), torch.zeros(1, dtype=torch.int64),
                                       indexing='ij'), -1).reshape(-1, 3)
    wall = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.int64), torch.arange(10), torch.arange(0, 12),
                                      indexing='ij'), -1).reshape(-1, 3)
    pts = torch.cat([floor, wall]).float() + 0.5
    cls = torch.cat([torch.zeros(len(floor), dtype=torch.int64), torch.ones(len(wall), dtype=torch.int64)])
    wrong = torch.cat([(floor[:, 0] >= 10) & (floor[:, 0] < 14), torch.zeros(len(wall), dtype=torch.bool)])
    text = torch.eye(8)[:2]
    feats = text[torch.where(wrong, 1, cls)] + 0.3 * torch.randn(len(pts), 8, generator=g)
    m = VoxelFeatureMap(1.0, 8)
    m.integrate(pts, feats, torch.full((len(pts), 3), 200.0))
    rows = m.rows_of(pts)
    return m, rows, cls, wrong, text


def test_superpoint_vote_fixes_a_region_level_error_that_pooling_keeps():
    """Known answer: the wrong floor part is 40 voxels, too large for 2-voxel pooling to outvote, but the floor
    is one superpoint (one normal, one colour) whose mean is the floor class; the wall stays the wall."""
    m, rows, cls, wrong, text = box_corner_map()
    off = ball_offsets(2)
    normals = estimate_normals(neighbour_rows(m, torch.arange(m.size), off), off)
    seg = segment_graph(m.size, *voxel_edges(m, normals), k=0.05, min_size=5)
    floor_ids, wall_ids = seg[rows[cls == 0]], seg[rows[cls == 1]]
    assert torch.bincount(floor_ids).max() > 0.8 * len(floor_ids)               # the floor is mostly one region
    cfg = dict(enabled=True, affinity='fallback', iterations=6, mode='whole', sigma_normal=0.1)
    labels = {}
    for name, blend in (('pooled', 0.0), ('voted', 0.85)):
        p = GeometryPooling(PurifyConfig(superpoint_k=0.05, superpoint_blend=blend, superpoint_min_vox=5, **cfg))
        p.update(m)
        labels[name] = (p.features(m).float()[rows] @ text.T).argmax(1)
    assert (labels['pooled'][wrong] == 1).float().mean() > 0.7                  # pooling keeps the error
    assert (labels['voted'] == cls).float().mean() > 0.97                       # the vote fixes it
    assert (labels['voted'][cls == 1] == 1).all()
    assert len(set(floor_ids.tolist()) & set(wall_ids.tolist())) <= 1           # the corner row is shared at most


def test_vote_keeps_norms_and_constant_features_and_blend_zero_is_identity():
    f = torch.randn(50, 6, generator=torch.Generator().manual_seed(3))
    seg = torch.arange(50) // 10
    out = superpoint_vote(f, seg, 0.7)
    assert torch.allclose(out.norm(dim=1), f.norm(dim=1), atol=1e-5)
    assert torch.allclose(superpoint_vote(f, seg, 0.0), f, atol=1e-6)
    full = superpoint_vote(f, seg, 1.0)                     # every voxel takes its region's mean direction
    for s in range(5):
        d = F.normalize(full[seg == s], dim=1)
        assert torch.allclose(d, d[:1].expand_as(d), atol=1e-5)
    const = torch.tensor([0.5, -1.0, 2.0, 0.25]).expand(30, -1)
    assert torch.allclose(superpoint_vote(const, torch.zeros(30, dtype=torch.int64), 0.85), const, atol=1e-5)
    # written into a given tensor (a layer's rows, fp16), chunk by chunk: the same values as a new fp16 result
    layer = torch.full((60, 6), 7.0, dtype=torch.float16)
    view = layer[5:55]
    assert superpoint_vote(f, seg, 0.7, chunk=16, out=view) is view
    assert torch.equal(layer[5:55], superpoint_vote(f, seg, 0.7, torch.float16))
    assert (layer[:5] == 7).all() and (layer[55:] == 7).all()
    with pytest.raises(ValueError, match='out must be'):
        superpoint_vote(f, seg, 0.7, out=layer)
    # rows of whole layers, gathered and written back in place: the same as voting the gathered rows
    rows = torch.randperm(60, generator=torch.Generator().manual_seed(4))[:50]
    feats = torch.zeros(60, 6, dtype=torch.float16).index_copy_(0, rows, f.half())
    voted = torch.full((60, 6), 7.0, dtype=torch.float16)
    w = torch.rand(50, generator=torch.Generator().manual_seed(5)) * 5
    assert superpoint_vote(feats, seg, 0.7, chunk=16, weights=w, out=voted, rows=rows) is voted
    assert torch.equal(voted[rows], superpoint_vote(f.half(), seg, 0.7, torch.float16, weights=w))
    # the results' norms, written at the same rows: the norm each was given (its input's), which the stored fp16
    # values keep to within their rounding
    norms = torch.full((60,), -1.0)
    again = torch.zeros(60, 6, dtype=torch.float16)
    superpoint_vote(feats, seg, 0.7, chunk=16, weights=w, out=again, rows=rows, norms=norms)
    assert torch.equal(again[rows], voted[rows]) and torch.equal(norms[rows], feats[rows].float().norm(dim=1))
    assert torch.allclose(norms[rows], row_norms(voted[rows]), rtol=1e-3, atol=0)
    assert (norms[~torch.isin(torch.arange(60), rows)] == -1).all()               # other rows untouched
    whole, whole_norms = torch.zeros(50, 6, dtype=torch.float16), torch.zeros(50)
    superpoint_vote(f, seg, 0.7, chunk=16, out=whole, norms=whole_norms)
    assert torch.equal(whole_norms, f.norm(dim=1))
    assert torch.allclose(whole_norms, row_norms(whole), rtol=1e-3, atol=0)
    rest = torch.ones(60, dtype=torch.bool).index_fill_(0, rows, False)
    assert (voted[rest] == 7).all()
    with pytest.raises(ValueError, match='rows need out'):
        superpoint_vote(feats, seg, 0.7, rows=rows)


def test_weighted_vote_is_the_mean_of_the_fused_observations():
    f = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    seg = torch.tensor([0, 0, 1])
    w = torch.tensor([9.0, 1.0, 4.0])
    full = superpoint_vote(f, seg, 1.0, weights=w)
    assert torch.allclose(full[:2], F.normalize(torch.tensor([9.0, 1.0]), dim=0).expand(2, 2), atol=1e-6)
    assert torch.allclose(full[2], f[2])
    assert torch.allclose(superpoint_vote(f, seg, 0.85, weights=torch.ones(3)), superpoint_vote(f, seg, 0.85))
    assert torch.equal(f, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]]))   # the input is left alone


def test_voted_features_follow_every_update():
    """The vote is kept between reads and brought up to date by each update: a new keyframe's voxel gets a vote."""
    m, rows, cls, wrong, text = box_corner_map()
    p = GeometryPooling(PurifyConfig(enabled=True, affinity='fallback', iterations=2, mode='whole',
                                     superpoint_k=0.05, superpoint_blend=0.85))
    p.update(m)
    first = p.features(m).clone()
    assert 'superpoints' in p.timings_s
    p.timings_s.clear()
    assert torch.equal(p.features(m), first) and 'superpoints' not in p.timings_s     # kept: no second vote
    m.integrate(torch.tensor([[20.5, 0.5, 0.5]]), torch.ones(1, 8), torch.full((1, 3), 10.0))
    p.update(m)
    out = p.features(m)
    assert out.shape[0] == first.shape[0] + 1 and 'superpoints' in p.timings_s
    assert out[-1].float().norm() > 0


def striped_room(seed=0):
    """(N, 3) voxel centres (5 cm) of a 4 m x 4 m floor and two walls with colour stripes, and their colours."""
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(80)
    floor = torch.stack(torch.meshgrid(r, r, torch.zeros(1, dtype=torch.int64), indexing='ij'), -1).reshape(-1, 3)
    wall_x = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.int64), r, torch.arange(1, 40),
                                        indexing='ij'), -1).reshape(-1, 3)
    wall_y = wall_x[:, [1, 0, 2]]
    keys = torch.cat([floor, wall_x, wall_y])
    colour = ((keys[:, 0] // 13 + keys[:, 1] // 17) % 3).float()[:, None] * 80 + torch.rand(len(keys), 3, generator=g) * 6
    return (keys.float() + 0.5) * 0.05, colour


def test_incremental_vote_over_blocks_equals_a_whole_map_vote_and_follows_eviction():
    """Keyframes add and re-fuse parts of a room with incremental pooling, reads come after some of them: the
    voted features always equal a vote over the whole map of the same pooled features, while a read after a
    small keyframe votes only the blocks it changed; superpoints never cross a block; after eviction too."""
    pts, colour = striped_room()
    g = torch.Generator().manual_seed(1)
    feats = F.normalize(torch.randn(len(pts), 16, generator=g), dim=1)
    cfg = PurifyConfig(enabled=True, affinity='fallback', iterations=3, superpoint_k=0.05, superpoint_min_vox=5,
                       superpoint_block_vox=16)
    m = VoxelFeatureMap(0.05, 16)
    p = GeometryPooling(cfg)
    order = torch.randperm(len(pts), generator=g)
    corner = torch.nonzero((pts[:, 0] < 0.3) & (pts[:, 1] < 0.3)).flatten()
    parts = list(torch.split(order, 6000)) + [corner, corner]       # then re-fuse a corner: no new voxel
    for step, part in enumerate(parts):
        new = feats[part] if step < 3 else F.normalize(torch.randn(len(part), 16, generator=g), dim=1)
        p.update(m, m.integrate(pts[part], new, colour[part] + 40 * (step == 3)))
        if step in (0, 2, 4):
            seg = p.superpoints(m)
            whole = superpoint_vote(m.cake['purified'][:m.size], seg, cfg.superpoint_blend, weights=m.weights[:m.size])
            assert torch.allclose(p.features(m).float(), whole, atol=2e-3, rtol=0)
            blocks = torch.div(torch.round(m.centers() / 0.05 - 0.5).long(), 16, rounding_mode='floor')
            for s in torch.unique(seg)[:50]:
                assert len(torch.unique(blocks[seg == s], dim=0)) == 1          # inside one block
    assert p.timings_s['superpoint_voxels'] < 0.5 * m.size                     # the corner keyframes: their blocks
    keep = torch.nonzero(m.centers()[:, 2] < 1.0).flatten()                   # evict the upper walls
    m.keep(keep)
    whole = superpoint_vote(m.cake['purified'][:m.size], p.superpoints(m), cfg.superpoint_blend,
                            weights=m.weights[:m.size])
    assert torch.allclose(p.features(m).float(), whole, atol=2e-3, rtol=0)
    assert p.timings_s['superpoint_voxels'] == m.size
    unweighted = superpoint_vote(m.cake['purified'][:m.size], p.superpoints(m), cfg.superpoint_blend)
    assert not torch.allclose(unweighted, whole, atol=2e-3, rtol=0)          # the re-fused corner counts more
    p.cfg.superpoint_weighted = False                                         # a settings change re-votes
    assert torch.allclose(p.features(m).float(), unweighted, atol=2e-3, rtol=0)


def test_eviction_through_the_purifier_votes_again_only_the_blocks_that_lose_voxels():
    """``GeometryPooling.keep`` (the mapper's eviction) compacts the map and keeps the vote: the next read votes
    again only the cubes that lost voxels (and those of voxels added meanwhile), and equals a whole-map vote."""
    pts, colour = striped_room()
    g = torch.Generator().manual_seed(2)
    feats = F.normalize(torch.randn(len(pts), 16, generator=g), dim=1)
    cfg = PurifyConfig(enabled=True, affinity='fallback', iterations=3, superpoint_k=0.05, superpoint_min_vox=5,
                       superpoint_block_vox=16)
    m, p = VoxelFeatureMap(0.05, 16), GeometryPooling(cfg)
    far = (pts[:, 0] > pts[:, 0].max() - 0.4) & (pts[:, 1] > pts[:, 1].max() - 0.4)
    first, later = torch.nonzero(~far).flatten(), torch.nonzero(far).flatten()   # later: the opposite corner
    p.update(m, m.integrate(pts[first], feats[first], colour[first]))
    p.features(m)
    m.integrate(pts[later], feats[later], colour[later])           # added without an update: fresh rows

    def check():
        whole = superpoint_vote(m.cake['purified'][:m.size], p.superpoints(m), cfg.superpoint_blend,
                                weights=m.weights[:m.size])
        assert torch.allclose(p.features(m).float(), whole, atol=2e-3, rtol=0)

    c = m.centers()
    keep = torch.nonzero(~((c[:, 0] < 0.4) & (c[:, 1] < 0.4))).flatten()   # evict a corner of the room
    p.keep(m, keep)
    assert m.size == len(keep)
    check()
    assert 0 < p.timings_s['superpoint_voxels'] < 0.7 * m.size
    p.keep(m, torch.arange(0, m.size, 2))                           # evict every other voxel: every block
    check()
    assert p.timings_s['superpoint_voxels'] == m.size
    m.keep(torch.arange(0, m.size - 10))                            # past the purifier: the whole map again
    check()
    assert p.timings_s['superpoint_voxels'] == m.size


def test_invalid_superpoint_settings_are_refused():
    import pytest
    for bad in (dict(superpoint_k=-1.0), dict(superpoint_blend=1.5), dict(superpoint_min_vox=-2),
                dict(superpoint_convex=-0.1), dict(superpoint_convex=1.5)):
        with pytest.raises(ValueError, match='superpoint'):
            GeometryPooling(PurifyConfig(enabled=True, affinity='fallback', **bad))


def test_reads_whole_map_when_pooling_or_the_vote_spans_the_map():
    def reads(**kw):
        return GeometryPooling(PurifyConfig(enabled=True, affinity='fallback', **kw)).reads_whole_map
    assert not reads(mode='incremental')                                # default: cubes of 64 voxels
    assert reads(mode='whole')
    assert reads(mode='incremental', superpoint_block_vox=0)            # superpoints over the whole map
    assert not reads(mode='incremental', superpoint_block_vox=0, superpoint_k=0.0)   # no vote at all


def test_vote_weights_are_capped_like_fusion():
    """A voxel a parked camera keeps re-observing weighs no more than ``max_weight`` in its superpoint's mean."""
    pts, colour = striped_room()
    cfg = PurifyConfig(enabled=True, affinity='fallback', iterations=0, superpoint_k=0.05, superpoint_min_vox=5)
    m = VoxelFeatureMap(0.05, 4, max_weight=2.0)                             # every other voxel: 1 point
    p = GeometryPooling(cfg)
    f = torch.zeros(len(pts), 4)
    f[:, 0] = 1.0
    p.update(m, m.integrate(pts, f, colour))
    stare = torch.arange(3)                                                  # three voxels, another meaning
    other = torch.tensor([[0.0, 1.0, 0.0, 0.0]]).expand(3, -1)
    for _ in range(20):
        p.update(m, m.integrate(pts[stare], other, colour[stare], weights=torch.full((3,), 1000.0)))
    rows = m.rows_of(pts[stare])
    assert float(m.weights[rows].min()) > 1e4
    seg = p.superpoints(m)
    capped = superpoint_vote(m.cake['purified'][:m.size], seg, cfg.superpoint_blend,
                             weights=m.weights[:m.size].clamp_max(2.0))
    assert torch.allclose(p.features(m).float(), capped, atol=2e-3, rtol=0)
    mates = torch.nonzero(seg == seg[rows[0]]).flatten()
    mates = mates[~torch.isin(mates, rows)]
    assert len(mates) > 10 and float(p.features(m)[mates, 0].float().mean()) > 0.9   # still mostly 'f0'


def box_on_floor(origins=((-20.0, -20, 30), (40, 40, 30), (-20, 40, 30), (40, -20, 30))):
    """A floor z = 0 (x, y in 0..23) and a closed box on it (x, y in 8..15, z up to 6), 1 voxel per unit, one
    colour, seen from cameras above each corner (none: fused without camera centres). Returns (map, normals,
    masks of the box top, the middle of one box side and the open floor)."""
    ax = torch.arange(24)
    fx, fy = torch.meshgrid(ax, ax, indexing='ij')
    floor = torch.stack([fx.flatten(), fy.flatten(), torch.zeros(576, dtype=torch.int64)], 1)
    floor = floor[~((floor[:, 0] >= 8) & (floor[:, 0] <= 15) & (floor[:, 1] >= 8) & (floor[:, 1] <= 15))]
    bx, by, bz = torch.meshgrid(torch.arange(8, 16), torch.arange(8, 16), torch.arange(1, 7), indexing='ij')
    box = torch.stack([bx.flatten(), by.flatten(), bz.flatten()], 1)
    box = box[(box[:, 0] == 8) | (box[:, 0] == 15) | (box[:, 1] == 8) | (box[:, 1] == 15) | (box[:, 2] == 6)]
    pts = torch.cat([floor, box]).float() + 0.5
    m = VoxelFeatureMap(1.0, 2, capacity=64)
    for o in origins or (None,):
        m.integrate(pts, torch.ones(len(pts), 2), torch.full((len(pts), 3), 100.0),
                    origin=None if o is None else torch.tensor(o))
    rows = torch.arange(m.size)
    off = cube_offsets(1)
    normals = estimate_normals(neighbour_rows(m, rows, off), off)
    c = m.centers()
    side = (c[:, 0] == 8.5) & (c[:, 1] > 9) & (c[:, 1] < 14) & (c[:, 2] > 1) & (c[:, 2] < 6)
    return m, normals, c[:, 2] == 6.5, side, (c[:, 2] == 0.5) & ((c[:, 0] < 6) | (c[:, 0] > 17))


def test_box_edges_are_convex_and_its_creases_with_the_floor_concave():
    """Oriented by the direction to the cameras, the normals tell a box's own edges (convex) from the crease where
    it stands on the floor (concave); with convex edges cheaper the box becomes one superpoint apart from the
    floor, where convex and concave alike split the box's top from its sides. Without view directions (a map
    fused without camera centres) the factor changes nothing."""
    m, n, top, side, floor = box_on_floor()
    i, j, _ = voxel_edges(m, n)
    c = m.centers()
    rim = (c[i, 2] == 6.5) & (c[j, 2] == 5.5) | (c[i, 2] == 5.5) & (c[j, 2] == 6.5)       # box top to its sides
    crease = (c[i, 2] == 0.5) & (c[j, 2] == 1.5) | (c[i, 2] == 1.5) & (c[j, 2] == 0.5)    # floor to box sides
    bent = (1 - (n[i] * n[j]).sum(1).abs()) > 0.1                                         # not flat
    step = c[j] - c[i]
    convex = convex_edges(n[i], n[j], m.views[i], m.views[j], step)
    assert (rim & bent).sum() > 20 and (crease & bent).sum() > 20
    assert convex[rim & bent].float().mean() > 0.9 and convex[crease & bent].float().mean() < 0.1
    one = segment_rows(m, n, None, 1.0, 0, 0, convex=0.0)
    assert len(set(one[top | side].tolist())) == 1 and not set(one[floor].tolist()) & set(one[top | side].tolist())
    plain = segment_rows(m, n, None, 1.0, 0, 0, convex=1.0)
    assert not set(plain[top].tolist()) & set(plain[side].tolist())
    m0, n0, *_ = box_on_floor(origins=None)
    assert not m0.views[:m0.size].any()
    assert torch.equal(segment_rows(m0, n0, None, 1.0, 0, 0, convex=0.0), segment_rows(m0, n0, None, 1.0, 0, 0))
