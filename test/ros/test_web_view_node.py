"""The browser view of the live map on the mapping node process (``web_view.*``): a port in use is reported and the
node maps on, a live change serves the page, the map drawn grows as keyframes arrive, a query typed in a headless
Chromium answers like /segment_by_text, and Ctrl-C still exits cleanly. The tests run in order on one node."""
import socket
import time
import urllib.request

import pytest
from rclpy.parameter import Parameter
from rclpy.parameter_client import AsyncParameterClient

from ov3d_ros.tools.ros_graph import start_mapping_node, start_scene_player

from conftest import private_domain

VOCABULARY = ['wall', 'floor', 'sofa', 'table', 'chair', 'bed']


@pytest.fixture(scope='module')
def web(tmp_path_factory):
    """A mapping node with the web view enabled on a port this test holds (so it cannot serve at first), a label
    vocabulary and 0.5 s refreshes: {'node', 'client', 'params', 'env', 'out', 'taken'}."""
    from ov3d_ros.tools.demo_client import DemoClient
    out = tmp_path_factory.mktemp('web_view')
    with private_domain() as env, socket.socket() as taken:
        taken.bind(('127.0.0.1', 0))
        taken.listen(1)
        node = start_mapping_node(env, out / 'node.log', params=[
            'web_view.enabled:=true', f'web_view.port:={taken.getsockname()[1]}', 'web_view.refresh_s:=0.5',
            f'labels.vocabulary:=[{", ".join(VOCABULARY)}]'])
        client = DemoClient()
        try:
            assert client.wait_for_service(node, 120.0), node.log()
            params = AsyncParameterClient(client.node, '/ov3d_mapping')
            assert params.wait_for_services(30.0)
            yield {'node': node, 'client': client, 'params': params, 'env': env, 'out': out,
                   'taken': taken.getsockname()[1]}
        finally:
            client.close()
            node.stop(60.0)


def set_param(g, name, value):
    """(ok, reason) of setting one parameter of the node."""
    future = g['params'].set_parameters([Parameter(name, value=value)])
    g['client'].executor.spin_until_future_complete(future, timeout_sec=60.0)
    assert future.result() is not None, 'set_parameters got no answer'
    r = future.result().results[0]
    return r.successful, r.reason


def wait_status(g, ok, what: str, timeout_s: float = 120.0) -> dict:
    """The node's ~/status once ``ok(status)`` holds (AssertionError naming ``what`` after ``timeout_s``)."""
    client = g['client']
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        client.spin(0.3)
        if client.status and ok(client.status):
            return client.status
        assert g['node'].alive(), g['node'].log()[-3000:]
    raise AssertionError(f'{what}: not within {timeout_s} s; last status {client.status}')


def test_a_port_in_use_is_reported_and_a_live_change_serves_the_page(web):
    port = web['taken']
    reason = f'cannot serve on 127.0.0.1:{port}: the port is in use'
    status = wait_status(web, lambda s: s['web_view'] is not None, 'a status with the web view')
    assert status['web_view']['enabled'] and status['web_view']['url'] == '', status['web_view']
    assert status['web_view']['error'] == reason
    assert f'web view not started: {reason}; mapping goes on without it' in web['node'].log()
    # refused with the reason (nothing changes), or by the range check
    assert set_param(web, 'web_view.port', port) == (False, f'web view not changed: {reason}')
    ok, why = set_param(web, 'web_view.port', 70000)
    assert not ok and 'web_view.port must be a port number in [0, 65535]' in why
    # any free port: the page is served
    assert set_param(web, 'web_view.port', 0) == (True, '')
    status = wait_status(web, lambda s: s['web_view']['url'], 'the web view serving')
    assert status['web_view']['error'] == '' and status['web_view']['points'] == 0     # nothing mapped yet
    with urllib.request.urlopen(status['web_view']['url'], timeout=60) as page:
        assert page.status == 200 and '<html' in page.read().decode('utf-8', 'replace').lower()
    assert f'web view of the live map on {status["web_view"]["url"]}' in web['node'].log()
    web['url'] = status['web_view']['url']
    # a refused change serves the page again where it was (port 0 had taken a free port: not another one)
    served = web['node'].log().count('web view of the live map on ')
    assert set_param(web, 'web_view.port', port) == (False, f'web view not changed: {reason}')
    log = web['node'].log()
    assert log.count('web view of the live map on ') == served + 1
    assert log.rsplit('web view of the live map on ', 1)[1].startswith(web['url'] + ' '), log[-2000:]


def test_the_map_drawn_grows_as_keyframes_arrive(web):
    player = start_scene_player(web['env'], web['out'] / 'player.log',
                                ['n_frames:=24', 'rate_hz:=4.0', 'width:=160', 'height:=120'])
    try:
        first = wait_status(web, lambda s: s['web_view']['points'] > 0, 'a first map drawn')['web_view']['points']
        web['client'].wait_until_mapped(player, web['node'], 300.0)
    finally:
        player.stop()
    status = wait_status(web, lambda s: s['web_view']['points'] == s['voxels'], 'the whole map drawn')
    assert status['keyframes'] >= 3 and status['voxels'] > first, (first, status)
    assert status['web_view']['refreshes'] >= 3 and status['web_view']['refresh_error'] == '', status['web_view']


def test_a_query_typed_in_the_page_answers_like_the_service(web, browser):
    browser.open(web['url'])
    browser.control('Query').send_keys('sofa')
    status = wait_status(web, lambda s: (s['web_view']['answer'] or {}).get('text') == 'sofa', 'the answer')
    answer = status['web_view']['answer']
    browser.wait.until(lambda d: 'sofa: ' in browser.text())
    assert f'sofa: {answer["voxels"]} voxels, {answer["objects"]} objects' in browser.text()
    service = web['client'].query('sofa')
    assert service['success'] and answer['voxels'] == len(service['xyz']) > 50, (answer, service['message'])
    assert answer['objects'] >= 1 and not answer['error']
    browser.control('Label colours').click()                 # the vocabulary's colours and legend
    browser.wait.until(lambda d: 'floor' in browser.text())


def test_switching_off_and_ctrl_c_exit_cleanly(web):
    """Last in the module: the page stops when switched off, starts again, and SIGINT exits 0 while it serves."""
    assert set_param(web, 'web_view.enabled', False) == (True, '')
    wait_status(web, lambda s: s['web_view']['url'] == '', 'the web view stopped')
    assert set_param(web, 'web_view.enabled', True) == (True, '')
    url = wait_status(web, lambda s: s['web_view']['url'], 'the web view serving again')['web_view']['url']
    with urllib.request.urlopen(url, timeout=60) as page:
        assert page.status == 200
    assert web['client'].query('sofa')['success']
    rc = web['node'].stop(60.0)
    log = web['node'].log()
    assert rc == 0, log[-3000:]
    assert 'Traceback' not in log and 'Destroyable' not in log, log[-3000:]


def test_a_page_started_by_a_change_that_ends_after_a_cleanup_is_closed():
    """A live web_view change and a lifecycle cleanup on two threads: the change starts a page (drawing a big map
    first) while cleanup closes the view. The close waits for the change and stops the page it started; a change
    after the close starts none (the page kept its port served, and the next configure could not serve on it). The
    page is a stand-in; the interface's own apply and close are the real ones."""
    import threading
    import types
    import rclpy.logging
    from ov3d_ros.ros.web_view import WebViewInterface
    started, release = threading.Event(), threading.Event()
    pages = []

    class Page:
        port, closed = 8123, False

        def close(self):
            self.closed = True

    def start(self, settings):
        page = Page()
        pages.append(page)
        started.set()
        assert release.wait(30.0)
        return page
    node = types.SimpleNamespace(get_logger=lambda: rclpy.logging.get_logger('web_view_test'))
    settings = {'enabled': False, 'host': '127.0.0.1', 'port': 8123, 'refresh_s': 1.0}
    view = WebViewInterface(node, lambda: None, settings, 1000)
    view._start = types.MethodType(start, view)
    change = threading.Thread(target=view.apply, args=({'enabled': True},))
    change.start()
    assert started.wait(30.0)
    cleanup = threading.Thread(target=view.close)
    cleanup.start()
    release.set()
    change.join(30.0)
    cleanup.join(30.0)
    assert len(pages) == 1 and pages[0].closed and view.view is None
    view.apply({'enabled': True})                       # after close: nothing starts
    assert len(pages) == 1 and view.view is None
