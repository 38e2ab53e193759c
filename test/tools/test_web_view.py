"""The browser view in a real headless Chromium: load the page, type a query, see the answer highlighted; and the
checks the view makes before serving."""
import io
import socket
import time

import numpy as np
import pytest


@pytest.fixture(scope='module')
def room_mapper(room_mapper_factory):
    """A map of the built-in room (clean simulated features) with a label vocabulary."""
    return room_mapper_factory(['wall', 'floor', 'sofa', 'table', 'chair', 'bed'])


def _highlighted(png: bytes) -> int:
    """Pixels of the answer's highlight colour (magenta) in a screenshot."""
    from PIL import Image
    img = np.asarray(Image.open(io.BytesIO(png)).convert('RGB')).astype(int)
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    return int(((r > 200) & (g < 80) & (b > 200)).sum())


def test_query_in_a_headless_browser_highlights_the_answer(room_mapper, browser, tmp_path):
    from ov3d_ros.tools.web_view import MapWebView
    view = MapWebView(room_mapper, port=18080)
    try:
        browser.open(view.url)
        box = browser.control('Query')
        time.sleep(5)                                             # the map's points arrive and render
        before = browser.driver.get_screenshot_as_png()
        assert _highlighted(before) < 50                          # no answer yet: no highlight
        box.send_keys('sofa')
        browser.wait.until(lambda d: view.answer is not None and view.answer.text == 'sofa')
        assert view.answer.voxels > 100 and view.answer.objects >= 1, view.answer
        browser.wait.until(lambda d: 'sofa: ' in browser.text())
        after = None
        end = time.monotonic() + 60
        while time.monotonic() < end:                             # until the highlighted points are drawn
            after = browser.driver.get_screenshot_as_png()
            if _highlighted(after) > 1000:
                break
            time.sleep(1)
        (tmp_path / 'view.png').write_bytes(after)
        assert _highlighted(after) > 1000, f'no highlighted points in {tmp_path / "view.png"}'
        # the label colours and their legend
        browser.control('Label colours').click()
        browser.wait.until(lambda d: 'floor' in browser.text())
        assert view.label_node.visible and not view.map_node.visible
    finally:
        view.close()


def test_an_address_that_cannot_be_served_is_refused_with_the_reason(room_mapper):
    from ov3d_ros.tools.web_view import MapWebView, check_address
    with socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=f'cannot serve on 127.0.0.1:{port}: the port is in use'):
            MapWebView(room_mapper, port=port, next_free_port=False)
        check_address('127.0.0.1', port)                       # ov3d view moves on to the next free port
    with pytest.raises(RuntimeError, match='cannot serve on 192.0.2.1:0: Cannot assign requested address'):
        check_address('192.0.2.1', 0)                           # not an address of this machine (TEST-NET-1)
    with pytest.raises(RuntimeError, match='the host does not resolve'):
        check_address('no-such-host.invalid', 0)


def test_a_live_map_is_redrawn_when_it_changes():
    """``refresh_s``: keyframes integrated under the lock show up in the view; an unchanged map is not resent."""
    import threading
    from ov3d_ros.core.config import MapperConfig
    from ov3d_ros.core.features import create_extractor
    from ov3d_ros.core.mapper import Frame, Mapper
    from ov3d_ros.sim import CLASS_NAMES, builtin_scene, builtin_trajectory, default_camera, render
    from ov3d_ros.tools.web_view import MapWebView
    cfg = MapperConfig()
    cfg.features.source, cfg.features.sim_preset, cfg.map.device = 'simulated', 'clean', 'cpu'
    mapper, lock = Mapper(cfg, create_extractor(cfg.features, 'cpu', CLASS_NAMES)), threading.Lock()
    scene, cam = builtin_scene(0), default_camera(80, 60)
    view = MapWebView(mapper, port=0, lock=lock, refresh_s=0.2, next_free_port=False)
    try:
        assert view.points == 0 and view.refreshes == 1 and view.port > 0
        assert view.show_query('sofa').error == 'the map is empty: no keyframe integrated yet'
        drawn = []
        for i, T in enumerate(builtin_trajectory(scene, 3, 0)):
            f = render(scene, cam, T)
            with lock:
                mapper.integrate(Frame(f.rgb, f.depth_m, cam, T, float(i), f.semantic), force=True)
                size = mapper.map.size
            end = time.monotonic() + 60
            while time.monotonic() < end and view.points != size:
                time.sleep(0.1)
            assert view.points == size, (view.points, size, view.refresh_error)
            drawn.append(view.points)
        assert drawn[0] < drawn[-1]
        refreshes = view.refreshes
        time.sleep(1.0)                                        # five periods, nothing new: nothing redrawn
        assert view.refreshes == refreshes
        answer = view.show_query('sofa')
        assert answer.voxels > 0 and not answer.error, answer
        assert view.state()['answer']['voxels'] == answer.voxels
    finally:
        view.close()
    assert not view._thread and view.server is None


def test_without_viser_the_view_says_what_to_install(room_mapper, monkeypatch):
    import sys
    from ov3d_ros.tools.web_view import MapWebView
    monkeypatch.setitem(sys.modules, 'viser', None)             # what `import viser` meets where it is missing
    with pytest.raises(RuntimeError, match='the browser view needs viser: pip install viser'):
        MapWebView(room_mapper, port=0)


@pytest.mark.parametrize('port', [70000, 65536, -1])
def test_a_port_outside_the_range_is_refused_before_the_map_is_read(tmp_path, capsys, port):
    """Once a traceback from the server thread and a hang (70000), or 'the host does not resolve' (-1)."""
    from ov3d_ros.cli.main import main
    from ov3d_ros.tools.web_view import check_address
    with pytest.raises(RuntimeError, match=f'cannot serve on 127.0.0.1:{port}: the port must be in 0..65535'):
        check_address('127.0.0.1', port)
    assert main(['view', str(tmp_path / 'missing.ov3dmap'), '--port', str(port)]) == 2     # the port, not the map
    assert 'the port must be in 0..65535' in capsys.readouterr().err


@pytest.mark.parametrize('value', ['0', '-5'])
def test_max_points_below_1_is_refused(tmp_path, capsys, value):
    """--max-points 0 or -5 was taken and drew every voxel ("voxels drawn at most")."""
    from ov3d_ros.cli.main import main
    with pytest.raises(SystemExit) as e:
        main(['view', str(tmp_path / 'missing.ov3dmap'), '--max-points', value])
    assert e.value.code == 2 and f'argument --max-points: must be >= 1, got {value}' in capsys.readouterr().err
