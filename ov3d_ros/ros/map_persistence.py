"""Map persistence for the mapping node: ``~/save_map``, ``~/load_map``, ``~/clear_map``, ``~/merge_map``,
autosave, load on start.

Files are the core's map format (``ov3d_ros.core.map_io``: safetensors, versioned, checksummed, written to a
temporary file, fsynced and renamed), so a crash mid-save leaves the previous file intact and ``ov3d query``
reads what the node saved. Every call holds the mapper lock: saves see a consistent map, loads and clears never
race the integration timer; a load, merge or clear then calls ``changed`` (still under the lock: the node
publishes a new snapshot for its readers). Failures answer ``success=false`` with the reason and keep the current
map.

Paths are confined to ``map_dir`` (default: the folder of ``map_path``): a requested path is resolved (``~``
expanded, relative paths taken inside ``map_dir``, symlinks followed) and refused when it names ``..`` or lands
outside ``map_dir``; a save never replaces an existing file that is not an ov3d map. Anyone on the DDS domain
can call these services: on an untrusted network also restrict who may call them with SROS2 (README: security).
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Optional

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_srvs.srv import Trigger

from ov3d_ros.core.map_io import check_replaceable
from ov3d_ros.core.mapper import Mapper
from ov3d_ros.ros.params import declare
from ov3d_ros.ros.services import create_service
from ov3d_ros.srv import LoadMap, MergeMap, SaveMap


PARAMETERS = {
    'map_path': ('~/.ros/ov3d/map.ov3dmap', 'Default file of save_map, load_map, autosave and load_map_on_start.'),
    'map_dir': ('', "The only folder save_map and load_map read and write (symlinks followed, '..' refused); "
                    "relative paths are taken inside it. Empty: map_path's folder."),
    'autosave_period_s': (0.0, 'Save the map to map_path this often when it changed (0 = off).'),
    'load_map_on_start': (False, 'Load map_path at start (a missing file starts an empty map; a bad one is an '
                                 'error).'),
}
"""The persistence parameters: (default, description); all read when the node is configured."""


def declare_map_persistence(node: Node) -> dict:
    """Declare the persistence parameters on ``node`` and return their values by name."""
    return {name: declare(node, name, default, desc) for name, (default, desc) in PARAMETERS.items()}


class MapPersistence:
    """The persistence services on ``node`` for ``mapper`` (guarded by ``lock``), with ``settings`` (the values of
    :data:`PARAMETERS` by name, :func:`declare_map_persistence`); ``changed`` is called under the lock after the
    map was replaced (load, merge, clear)."""

    def __init__(self, node: Node, mapper: Mapper, lock: threading.Lock, settings: dict,
                 changed: Optional[Callable[[], None]] = None):
        self.node, self.mapper, self.lock = node, mapper, lock
        self.changed = changed or (lambda: None)
        self.map_path = settings['map_path']
        self.map_dir = os.path.realpath(os.path.expanduser(settings['map_dir'] or os.path.dirname(
            os.path.abspath(os.path.expanduser(self.map_path)))))
        self.map_path = self._path('')      # ValueError (the node does not start) when map_path is outside map_dir
        self.autosave_period_s = settings['autosave_period_s']
        load_on_start = settings['load_map_on_start']
        self._saved_version = self._version()
        group = MutuallyExclusiveCallbackGroup()
        create_service(node, SaveMap, '~/save_map', self.on_save, callback_group=group)
        create_service(node, LoadMap, '~/load_map', self.on_load, callback_group=group)
        create_service(node, Trigger, '~/clear_map', self.on_clear, callback_group=group)
        create_service(node, MergeMap, '~/merge_map', self.on_merge, callback_group=group)
        if self.autosave_period_s > 0:
            node.create_steady_timer(self.autosave_period_s, self.autosave, group)
        if load_on_start:
            path = self._path('')
            if os.path.exists(path):
                ok, message = self.load(path)
                if not ok:
                    raise RuntimeError(f'load_map_on_start: {message}')
                node.get_logger().info(f'resumed from {message}')
            else:
                node.get_logger().info(f'load_map_on_start: {path} does not exist yet; starting an empty map')

    def _path(self, path: str) -> str:
        """The resolved file for a requested ``path`` ('' = map_path); ValueError when it is not inside map_dir."""
        raw = os.path.expanduser(path or self.map_path)
        if '\0' in raw:
            raise ValueError('the path contains a NUL character')
        if '..' in raw.replace('\\', '/').split('/'):
            raise ValueError(f"path {raw!r} refused: '..' is not allowed (map_dir is {self.map_dir})")
        resolved = os.path.realpath(os.path.join(self.map_dir, raw))     # an absolute raw replaces map_dir
        if os.path.commonpath([resolved, self.map_dir]) != self.map_dir or resolved == self.map_dir:
            raise ValueError(f'path {raw!r} refused: it resolves to {resolved}, outside map_dir {self.map_dir} '
                             '(symlinks are followed)')
        return resolved

    def _writable(self, path: str) -> str:
        """:meth:`_path` for a file to write: ValueError also when it exists and is not an ov3d map (never replaced)."""
        path = self._path(path)
        check_replaceable(path)
        return path

    def _version(self) -> int:
        """The map's change counter (``Mapper.generation``): integration, eviction, load, merge, clear, vocabulary,
        purification and query settings advance it. Autosave compares it with the one last saved to map_path; it
        compared (keyframes, voxels) and so missed changes that keep both (a new vocabulary, another map of as
        many voxels loaded)."""
        return self.mapper.generation

    def save(self, path: str):
        """(ok, message, path, voxels)."""
        try:
            path = self._writable(path)
        except ValueError as e:
            return False, f'not saved: {e}', '', 0
        try:
            with self.lock:
                size = self.mapper.save(path)
                version, voxels = self._version(), self.mapper.map.size
        except (OSError, ValueError, RuntimeError) as e:
            return False, f'cannot save the map to {path}: {e}', path, 0
        if path == self.map_path:                # a copy elsewhere leaves map_path as old as it was
            self._saved_version = version
        return True, f'saved {voxels} voxels ({size / 2**20:.1f} MB) to {path}', path, voxels

    def load(self, path: str):
        """(ok, message)."""
        try:
            path = self._path(path)
        except ValueError as e:
            return False, f'kept the current map: {e}'
        with self.lock:
            try:
                self.mapper.load(path)               # all or nothing
                if path == self.map_path:            # another file: map_path does not hold this map yet
                    self._saved_version = self._version()
            except (OSError, ValueError, RuntimeError) as e:
                return False, f'kept the current map: {e}'
            self.node.map_replaced('loaded')
            done = f'{path}: {self.mapper.map.size} voxels, {self.mapper.num_keyframes} keyframes'
            return self._published(done)

    def _published(self, done: str):
        """(ok, message) once the map changed as ``done`` says: its snapshot published for queries and views."""
        try:
            self.changed()
        except (OSError, ValueError, RuntimeError) as e:
            return False, f'{done}, but queries still see the previous map ({type(e).__name__}: {e})'
        return True, done

    def merge(self, paths, transforms=(), replace: bool = False, out_path: str = ''):
        """Fuse map files (``transforms``: 16 row-major numbers per path, or none) into the node's map (or, with
        ``replace``, make their merge the map); optionally also write the result to ``out_path``. (ok, message).

        An empty node map is left out: merging into it is loading the merge of the files, on their voxel grid (it
        took part, and a 0.1 m map merged into a fresh node of 0.05 m voxels was refused for the voxel sizes).
        The node's map goes to the merge as a temporary file: a refusal calls it "the node's current map"."""
        import tempfile
        import numpy as np
        from ov3d_ros.core.map_io import write_atomic
        from ov3d_ros.core.merge import merge_files
        try:                                         # every path is checked before the map is touched
            paths = [self._path(p) for p in paths if p.strip()]
            out = self._writable(out_path) if out_path.strip() else ''
        except ValueError as e:
            return False, f'kept the current map: {e}'
        if not paths:
            return False, 'no map files given to merge'
        if len(transforms) not in (0, 16 * len(paths)):
            return False, f'{len(transforms)} transform numbers for {len(paths)} maps (16 per map, or none)'
        Ts = [np.asarray(transforms[16 * i:16 * i + 16], np.float64).reshape(4, 4) if len(transforms) else None
              for i in range(len(paths))]
        current = ''
        try:
            with self.lock, tempfile.TemporaryDirectory(prefix='ov3d_merge_') as tmp:
                if not replace and self.mapper.map.size:
                    current = os.path.join(tmp, 'current.ov3dmap')
                    self.mapper.save(current)
                    paths, Ts = [current] + paths, [None] + Ts
                merged = os.path.join(tmp, 'merged.ov3dmap')
                summary = merge_files(paths, merged, Ts)
                self.mapper.load(merged)             # all or nothing: the current map stays on any error
                if replace:                          # the merge of the files alone: another map, as a load
                    self.node.map_replaced('replaced by a merge')
                done = (f'merged {len(summary["inputs"])} maps ({" + ".join(map(str, summary["inputs"]))} voxels) '
                        f'into {self.mapper.map.size} voxels')
                ok, done = self._published(done)
                if not ok:
                    return ok, done
                if out:
                    try:
                        with open(merged, 'rb') as f:
                            write_atomic(out, f.read())
                    except OSError as e:
                        return False, f'{done}, but {out} was not written: {e}'
                    if out == self.map_path:
                        self._saved_version = self._version()
        except (OSError, ValueError, RuntimeError) as e:
            reason = str(e).replace(current, "the node's current map") if current else str(e)
            return False, f'kept the current map: {reason}'
        return True, done + (f'; wrote {out}' if out else '')

    def on_merge(self, request, response):
        response.success, response.message = self.merge(list(request.paths), list(request.transforms),
                                                        request.replace, request.out_path)
        response.voxels = self.mapper.map.size
        self._log(response.success, response.message)
        return response

    def on_save(self, request, response):
        response.success, response.message, response.path, response.voxels = self.save(request.path)
        self._log(response.success, response.message)
        return response

    def on_load(self, request, response):
        response.success, response.message = self.load(request.path)
        response.voxels = self.mapper.map.size
        self._log(response.success, response.message)
        return response

    def on_clear(self, request, response):
        with self.lock:
            voxels = self.mapper.map.size
            self.mapper.clear()
            self.node.map_replaced('cleared')
            self.changed()
        response.success, response.message = True, f'cleared {voxels} voxels'
        self._log(True, response.message)
        return response

    def autosave(self) -> None:
        if self._version() != self._saved_version:
            ok, message, _, _ = self.save('')
            self._log(ok, f'autosave: {message}')

    def save_unsaved(self, when: str) -> None:
        """With autosave on, save the map to map_path once more if it changed since it was last saved there:
        called as the node stops (``when``: 'shutdown', 'cleanup'), after its callbacks finished and before the map
        goes. Without it the changes since the last autosave period were lost on Ctrl-C, SIGTERM or a lifecycle
        cleanup (autosave_period_s 600 and SIGTERM 3 keyframes in: exit 0, 15 710 voxels, no file). The outcome
        is logged; a failed save never stops the shutdown (a second Ctrl-C abandons it: the previous file stays,
        files being written atomically). A save takes about 0.3 s per 100 k voxels."""
        if self.autosave_period_s <= 0 or self._version() == self._saved_version:
            return
        try:
            ok, message, _, _ = self.save('')
        except KeyboardInterrupt:
            ok, message = False, f'not saved to {self.map_path}: interrupted (the previous file is kept)'
        except Exception as e:       # never keep the node from stopping
            ok, message = False, f'cannot save the map to {self.map_path}: {type(e).__name__}: {e}'
        self._log(ok, f'{when}: autosave: {message}')

    def _log(self, ok: bool, message: str) -> None:
        if ok:            # rclpy loggers allow one severity per call site
            self.node.get_logger().info(message)
        else:
            self.node.get_logger().error(message)
