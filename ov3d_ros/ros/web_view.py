"""The browser view on the mapping node: the page of ``ov3d view`` (:class:`ov3d_ros.tools.web_view.MapWebView`)
served for the live map while ``web_view.enabled`` is true.

The map drawn in the page is refreshed every ``web_view.refresh_s`` when keyframes arrived (or the map was
loaded, cleared or merged, or the vocabulary changed); the drawing and the query box read the node's latest map
snapshot, like ``segment_by_text``, so they never wait for a keyframe being integrated. The page is optional: when viser is not installed or the address cannot be
served, the node logs the reason, reports it in ``~/status`` (``web_view.error``) and keeps mapping; a live change
that cannot be served is refused with the reason and the previous page kept.
"""
from __future__ import annotations

import threading
from typing import Callable, Optional

from rclpy.node import Node

from ov3d_ros.core.snapshot import MapSnapshot
from ov3d_ros.ros.params import declare

PARAMETERS = {
    'enabled': (False, 'Serve the browser view of the live map (the page of `ov3d view`; needs viser).'),
    'host': ('127.0.0.1', "Address to serve the browser view on ('127.0.0.1': this machine only; '0.0.0.0': "
                          'the network, unauthenticated: see README, security).'),
    'port': (8080, 'Port of the browser view (0 = any free port; the URL is logged and in ~/status). A port in '
                   'use is an error, not a silent move to another one.'),
    'refresh_s': (2.0, 'Redraw the map in the browser view this often when it changed, seconds.'),
}
"""``web_view.<name>``: (default, description); all live."""


def declare_web_view(node: Node) -> dict:
    """Declare the ``web_view.*`` parameters on ``node`` and return their values by short name."""
    return {k: declare(node, f'web_view.{k}', default, desc) for k, (default, desc) in PARAMETERS.items()}


class WebViewInterface:
    """Serves the map of ``snapshot`` (returns the node's latest :class:`MapSnapshot`) in the browser according
    to ``settings`` (``web_view.*`` values by short name); :meth:`apply` takes live changes, :meth:`close` stops
    the page."""

    def __init__(self, node: Node, snapshot: Callable[[], Optional[MapSnapshot]], settings: dict, max_points: int):
        self.node, self.snapshot, self.max_points = node, snapshot, max_points
        self.settings = dict(settings)
        self.view = None
        self.error = ''
        # a live change (the parameter callback) and close (a lifecycle cleanup) run on different threads: one at a
        # time, and none after close (a page started by a change that finished after close kept its port served)
        self._lock = threading.Lock()
        self.closed = False
        if self.settings['enabled']:
            try:
                self.view = self._start(self.settings)
            except Exception as e:          # never let the optional page stop the node
                self.error = _reason(e)
                node.get_logger().error(f'web view not started: {e}; mapping goes on without it (set web_view.* '
                                        'to try again)')

    def _start(self, s: dict):
        """A MapWebView for settings ``s``; an exception with the reason when it cannot serve (RuntimeError: viser
        missing, an address that cannot be served)."""
        from ov3d_ros.tools.web_view import MapWebView
        view = MapWebView(self.snapshot, s['host'], s['port'], self.max_points, refresh_s=s['refresh_s'],
                          next_free_port=False)
        self.node.get_logger().info(f'web view of the live map on {view.url} (redrawn every {s["refresh_s"]:g} s '
                                    'when it changed)')
        return view

    def apply(self, changes: dict) -> None:
        """Take new ``web_view.*`` values (short names). ValueError with the reason when the page cannot be served
        with them; the previous page then stays. After :meth:`close`, nothing (the node is being cleaned up)."""
        with self._lock:
            if not self.closed:
                self._apply(changes)

    def _apply(self, changes: dict) -> None:
        new = {**self.settings, **changes}
        old, view = self.settings, self.view
        serving = view is not None
        restart = serving != new['enabled'] or (serving and (new['host'], new['port']) != (old['host'], old['port']))
        if not restart:
            if view is not None:
                view.refresh_s = new['refresh_s']
            self.settings = new
            if not new['enabled']:
                self.error = ''
            return
        if view is not None:
            view.close()
            self.view = None
        if new['enabled']:
            try:
                self.view = self._start(new)
            except Exception as e:
                if view is not None:            # on the port it served (port 0 took a free one: keep that one)
                    self._restore({**old, 'port': view.port})
                raise ValueError(f'web view not changed: {_reason(e)}') from None
        else:
            self.node.get_logger().info('web view stopped')
        self.settings, self.error = new, ''

    def _restore(self, old: dict) -> None:
        """Serve the ``old`` settings again after a refused change."""
        try:
            self.view = self._start(old)
        except Exception as e:
            self.error = _reason(e)
            self.node.get_logger().error(f'web view lost: {e}')

    def set_max_points(self, n: int) -> None:
        self.max_points = n
        if self.view is not None:
            self.view.max_points = n

    def status(self) -> dict:
        """``~/status``'s ``web_view``: enabled, url ('' when not serving), error, and the page's points, refreshes
        and last answer."""
        view = self.view                    # a live change may replace it meanwhile
        state = view.state() if view is not None else {'url': ''}
        return {'enabled': self.settings['enabled'], **state, 'error': self.error}

    def close(self) -> None:
        """Stop the page (after a live change under way) for good."""
        with self._lock:
            self.closed = True
            if self.view is not None:
                self.view.close()
                self.view = None


def _reason(e: Exception) -> str:
    return str(e) if isinstance(e, (RuntimeError, ValueError)) else f'{type(e).__name__}: {e}'
