"""A browser view of a map with viser (``pip install viser``): the coloured voxels as a point cloud, a query box
whose answer is highlighted with one box per object (connected component), and the label volume's class colours
with their legend when the map has a vocabulary.

    view = MapWebView(Mapper.from_file('room.ov3dmap', 'cpu'), port=8080)    # http://localhost:8080
    view.show_query('sofa')                                                   # what typing in the box does

viser serves its own prebuilt web client (three.js) and pushes scene updates over a websocket; nothing here
draws by hand. The map is read from a Mapper under ``lock``, or from snapshots: for a live map (the mapping
node's ``web_view.*`` parameters) pass a function returning the node's latest
:class:`~ov3d_ros.core.snapshot.MapSnapshot` and ``refresh_s``, and a background thread redraws the map whenever
it changed. The lock is held only to copy the points out and to run the query itself; drawing, object extraction
and sending happen outside it.
"""
from __future__ import annotations

import errno
import html
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np

from ov3d_ros.core.mapper import Mapper
from ov3d_ros.core.snapshot import MapSnapshot

HIGHLIGHT_RGB = (255, 0, 255)       # answer voxels (a colour no generated scene uses)
BOX_RGB = (255, 220, 0)             # object boxes


@dataclass
class Answer:
    """The last query's answer: text, voxels, objects (connected components), source, error (if refused)."""

    text: str
    voxels: int = 0
    objects: int = 0
    source: str = ''
    error: str = ''


def import_viser():
    try:
        import viser
    except ImportError:
        raise RuntimeError('the browser view needs viser: pip install viser') from None
    return viser


class MapWebView:
    """Serves ``mapper``'s map on http://host:port.

    Args:
        mapper: the map to show and query: a Mapper (read under ``lock``), or a function returning the
            :class:`MapSnapshot` to read (the newest one each time; None: nothing to show yet).
        host, port: where to serve (127.0.0.1 = this machine only; 0.0.0.0 = the network).
        max_points: voxels drawn at most (uniformly thinned above that).
        min_object_voxels: connected components of the answer smaller than this get no box
            (ov3d_ros.core.objects.extract_objects, with the map config's objects.gap_vox).
        lock: held while reading the map (e.g. the node's mapper lock); default a private one.
    """

    def __init__(self, mapper: Union[Mapper, Callable[[], Optional[MapSnapshot]]], host: str = '127.0.0.1', port: int = 8080, max_points: int = 400_000,
                 min_object_voxels: int = 8, lock: Optional[threading.Lock] = None, refresh_s: float = 0.0,
                 next_free_port: bool = True):
        viser = import_viser()
        self.max_points, self.min_object_voxels = max_points, min_object_voxels
        self._read = mapper.view if isinstance(mapper, Mapper) else mapper
        self.lock = lock or threading.Lock()
        self.refresh_s = refresh_s
        self.answer: Optional[Answer] = None
        self._answer_nodes: list = []
        self._typing = threading.Lock()
        self._drawing = threading.Lock()
        self.answered = threading.Event()
        self.points, self.refreshes, self.refresh_error = 0, 0, ''
        self._drawn = None              # map version last drawn (see _version)
        self._framed = False            # initial camera set (once, on the first non-empty map)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        check_address(host, port, next_free_port)
        self.host = host
        self.server = viser.ViserServer(host=host, port=port, verbose=False)
        self.port = self.server.get_port()
        try:
            if not next_free_port and port and self.port != port:      # taken between the check and the bind
                raise RuntimeError(f'cannot serve on {host}:{port}: the port is in use')
            self._build()
        except BaseException:
            self.close()                    # no server left running behind a failed start
            raise
        if refresh_s > 0:
            self._thread = threading.Thread(target=self._refresh_loop, name='ov3d-web-view-refresh', daemon=True)
            self._thread.start()

    def _build(self) -> None:
        """The GUI panel and the first drawing of the map."""
        self.server.scene.set_up_direction('+z')
        gui = self.server.gui
        self.query_box = gui.add_text('Query', '', hint='what to look for, e.g. "sofa"; Enter to search')
        self.status = gui.add_markdown('Type a query.')
        self.label_toggle = gui.add_checkbox('Label colours', False, visible=False)
        self.legend = gui.add_html('', visible=False)
        self.query_box.on_update(lambda event: self._on_typed())
        self.label_toggle.on_update(lambda event: self._show_labels(self.label_toggle.value))
        self.refresh()

    @property
    def url(self) -> str:
        host = self.host if self.host not in ('0.0.0.0', '::', '', '127.0.0.1', '::1') else 'localhost'
        return f'http://[{host}]:{self.port}' if ':' in host else f'http://{host}:{self.port}'

    def _version(self, snap: MapSnapshot) -> tuple:
        """What the drawn map depends on: the map's generation, vocabulary and the points drawn."""
        return (snap.generation, snap.keyframes, snap.size, tuple(snap.vocabulary), self.max_points)

    def _snapshot(self) -> MapSnapshot:
        """The map to read now (caller holds ``lock``); ValueError while there is none (a node not configured)."""
        snap = self._read()
        if snap is None:
            raise ValueError('the map is not ready yet')
        return snap

    def refresh(self, if_changed: bool = False) -> bool:
        """(Re)draw the map, and the label colours and legend when the map has a vocabulary; with ``if_changed``
        only when keyframes, voxels or the vocabulary changed since the last drawing. Whether it drew."""
        with self._drawing:
            with self.lock:
                snap = self._snapshot()
                version = self._version(snap)
                if if_changed and version == self._drawn:
                    return False
                cloud = snap.map_cloud(self.max_points)
                labels, idx = snap.label_cloud(self.max_points)
                names = snap.vocabulary
                vs = snap.map.voxel_size_m
            self._draw(cloud, labels, idx, names, vs)
            self._drawn, self.points = version, len(cloud.xyz)
            self.refreshes += 1
        return True

    def _refresh_loop(self) -> None:
        """Redraw a changed map every ``refresh_s`` until :meth:`close` (an error is kept in ``refresh_error``
        and the next period tries again)."""
        while not self._stop.wait(self.refresh_s):
            try:
                self.refresh(if_changed=True)
                self.refresh_error = ''
            except Exception as e:      # never let one failed drawing end the refreshes
                self.refresh_error = f'{type(e).__name__}: {e}'

    def _draw(self, cloud, labels, idx, names, vs) -> None:
        scene = self.server.scene
        self.map_node = scene.add_point_cloud('/map', cloud.xyz, cloud.rgb, point_size=vs,
                                              point_shading='flat', precision='float32')
        if len(cloud.xyz) and not self._framed:
            self._framed = True
            lo, hi = cloud.xyz.min(0), cloud.xyz.max(0)
            centre, extent = (lo + hi) / 2, float(np.max(hi - lo))
            cam = self.server.initial_camera
            cam.look_at = centre
            cam.position = centre + np.array([-0.15, -0.55, 0.85]) * max(extent, 1.0)
        self.label_node = scene.add_point_cloud('/labels', labels.xyz, labels.rgb, point_size=vs,
                                                point_shading='flat', precision='float32',
                                                visible=self.label_toggle.value)
        self.label_toggle.visible = bool(names)
        if names:
            from ov3d_ros.core.label_volume import class_colors
            colors, present = class_colors(len(names)), np.bincount(idx, minlength=len(names))
            items = ''.join(
                f'<div style="display:flex;align-items:center;gap:6px;font-size:12px">'
                f'<span style="width:12px;height:12px;background:rgb{tuple(int(c) for c in colors[k])}"></span>'
                f'{html.escape(n)} <span style="opacity:.6">{present[k]}</span></div>'
                for k, n in enumerate(names) if present[k])
            self.legend.content = f'<div>{items}</div>'
        self._show_labels(self.label_toggle.value)

    def _show_labels(self, on: bool) -> None:
        self.label_node.visible = on
        self.map_node.visible = not on
        self.legend.visible = on and self.label_toggle.visible

    def _on_typed(self) -> None:
        """The box sends every keystroke: answer only the latest text (stale callbacks return at once)."""
        with self._typing:
            if self.answer is None or self.answer.text != self.query_box.value.strip():
                self.show_query(self.query_box.value)

    def show_query(self, text: str) -> Answer:
        """Answer ``text`` like ``/segment_by_text``: highlight its voxels and box its objects."""
        from ov3d_ros.core.objects import extract_objects
        text = (text or '').strip()
        scene = self.server.scene
        for node in self._answer_nodes:
            node.remove()
        self._answer_nodes = []
        if not text:
            self.answer = Answer('')
            self.status.content = 'Type a query.'
            return self.answer
        try:
            with self.lock:
                snap = self._snapshot()
                if snap.size == 0:
                    raise ValueError('the map is empty: no keyframe integrated yet')
                res = snap.query(text)
                xyz = snap.map.centers(res.rows).cpu().numpy()
                scores = res.scores.cpu().numpy()
                vs, gap = snap.map.voxel_size_m, snap.cfg.objects.gap_vox
            objects = extract_objects(xyz, scores, vs, text, gap, self.min_object_voxels)
        except ValueError as e:
            self.answer = Answer(text, error=str(e))
            self.status.content = f'**{html.escape(text)}**: {html.escape(str(e))}'
            self.answered.set()
            return self.answer
        if len(xyz):
            self._answer_nodes.append(scene.add_point_cloud('/answer', xyz, np.array(HIGHLIGHT_RGB, np.uint8), point_size=1.3 * vs,
                                  point_shading='flat', precision='float32'))
        for i, obj in enumerate(objects):
            self._answer_nodes.append(scene.add_box(
                f'/objects/{i}', color=BOX_RGB, dimensions=tuple(obj.box_size), wireframe=True,
                position=tuple(obj.box_center), cast_shadow=False, receive_shadow=False))
        self.answer = Answer(text, len(xyz), len(objects), res.source)
        self.status.content = (f'**{html.escape(text)}**: {len(xyz)} voxels, {len(objects)} objects '
                               f'(from the {res.source})' if len(xyz) else f'**{html.escape(text)}**: no answer')
        self.answered.set()
        return self.answer

    def state(self) -> dict:
        """Where it serves and what it shows: url, points drawn, refreshes, the last answer, a refresh error."""
        a = self.answer
        return {'url': self.url, 'points': self.points, 'refreshes': self.refreshes,
                'answer': {'text': a.text, 'voxels': a.voxels, 'objects': a.objects, 'error': a.error} if a else None,
                'refresh_error': self.refresh_error}

    def close(self) -> None:
        """Stop the refreshes and the server (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30.0)       # at most one drawing in progress
            self._thread = None
        if self.server is not None:
            self.server.stop()
            self.server = None


def check_address(host: str, port: int, next_free_port: bool = True) -> None:
    """RuntimeError saying why ``host:port`` cannot be served: a host that does not resolve or is not an address
    of this machine, or (``next_free_port`` False) a port in use. viser would otherwise retry the next 1000 ports
    of an unusable host and never return, or move to the next free port without saying so; a port outside
    0..65535 fails in its server thread and leaves the caller waiting forever."""
    if not 0 <= port <= 65535:
        raise RuntimeError(f'cannot serve on {host}:{port}: the port must be in 0..65535')
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise RuntimeError(f'cannot serve on {host}:{port}: the host does not resolve ({e})') from None
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)        # as the server's own socket
            try:
                s.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE and next_free_port:
                    continue
                why = 'the port is in use' if e.errno == errno.EADDRINUSE else e.strerror
                raise RuntimeError(f'cannot serve on {host}:{port}: {why}') from None
