"""Fixtures shared by every test folder."""
import pytest


def map_builtin_room(vocabulary=()):
    """A Mapper of the built-in room: clean simulated features, 12 forced keyframes at 160x120, on the CPU, with
    ``vocabulary`` as its label volume (none when empty)."""
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_preset, cfg.map.device = 'simulated', 'clean', 'cpu'
    cfg.labels.vocabulary = list(vocabulary)
    mapper = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES))
    scene, cam = builtin_scene(0), default_camera(160, 120)
    for i, T in enumerate(builtin_trajectory(scene, 12, 0)):
        f = render(scene, cam, T)
        mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
    return mapper


@pytest.fixture(scope='session')
def room_mapper_factory():
    """:func:`map_builtin_room` (a fixture, so that any test folder can build the room map)."""
    return map_builtin_room
