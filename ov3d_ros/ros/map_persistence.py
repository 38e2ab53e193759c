"""Map persistence for the mapping node: ``~/save_map``, ``~/load_map``, ``~/clear_map``, ``~/merge_map``,
autosave, load on start.

Files are the core's map format (``ov3d_ros.core.map_io``: safetensors, versioned, checksummed, written to a
temporary file, fsynced and renamed), so a crash mid-save leaves the previous file intact and ``ov3d query``
reads what the node saved. Every call holds the mapper lock: saves see a consistent map, loads and clears never
race the integration timer. Failures answer ``success=false`` with the reason and keep the current map.
"""
from __future__ import annotations

import os
import threading

from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.node import Node
from std_srvs.srv import Trigger

from ov3d_ros.core.mapper import Mapper
from ov3d_ros.ros.params import declare
from ov3d_ros.srv import LoadMap, MergeMap, SaveMap


class MapPersistence:
    """Declares the persistence parameters and services on ``node`` for ``mapper`` (guarded by ``lock``)."""

    def __init__(self, node: Node, mapper: Mapper, lock: threading.Lock):
        self.node, self.mapper, self.lock = node, mapper, lock
        self.map_path = declare(node, 'map_path', '~/.ros/ov3d/map.ov3dmap',
                                'Default file of save_map, load_map, autosave and load_map_on_start.')
        self.autosave_period_s = declare(node, 'autosave_period_s', 0.0,
                                         'Save the map to map_path this often when it changed (0 = off).')
        load_on_start = declare(node, 'load_map_on_start', False,
                                'Load map_path at start (a missing file starts an empty map; a bad one is an error).')
        self._saved_version = self._version()
        group = MutuallyExclusiveCallbackGroup()
        node.create_service(SaveMap, '~/save_map', self.on_save, callback_group=group)
        node.create_service(LoadMap, '~/load_map', self.on_load, callback_group=group)
        node.create_service(Trigger, '~/clear_map', self.on_clear, callback_group=group)
        node.create_service(MergeMap, '~/merge_map', self.on_merge, callback_group=group)
        if self.autosave_period_s > 0:
            node.create_timer(self.autosave_period_s, self.autosave, group)
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
        return os.path.abspath(os.path.expanduser(path or self.map_path))

    def _version(self):
        return self.mapper.num_keyframes, self.mapper.map.size

    def save(self, path: str):
        """(ok, message, path, voxels)."""
        path = self._path(path)
        try:
            with self.lock:
                size = self.mapper.save(path)
                version = self._version()
        except (OSError, ValueError, RuntimeError) as e:
            return False, f'cannot save the map to {path}: {e}', path, 0
        self._saved_version = version
        return True, f'saved {version[1]} voxels ({size / 2**20:.1f} MB) to {path}', path, version[1]

    def load(self, path: str):
        """(ok, message)."""
        path = self._path(path)
        try:
            with self.lock:
                self.mapper.load(path)
                self._saved_version = self._version()
        except (OSError, ValueError, RuntimeError) as e:
            return False, f'kept the current map: {e}'
        return True, f'{path}: {self.mapper.map.size} voxels, {self.mapper.num_keyframes} keyframes'

    def merge(self, paths, transforms=(), replace: bool = False, out_path: str = ''):
        """Fuse map files (``transforms``: 16 row-major numbers per path, or none) into the node's map (or, with
        ``replace``, make their merge the map); optionally also write the result to ``out_path``. (ok, message)."""
        import tempfile
        import numpy as np
        from ov3d_ros.core.map_io import write_atomic
        from ov3d_ros.core.merge import merge_files
        paths = [self._path(p) for p in paths if p.strip()]
        if not paths:
            return False, 'no map files given to merge'
        if len(transforms) not in (0, 16 * len(paths)):
            return False, f'{len(transforms)} transform numbers for {len(paths)} maps (16 per map, or none)'
        Ts = [np.asarray(transforms[16 * i:16 * i + 16], np.float64).reshape(4, 4) if len(transforms) else None
              for i in range(len(paths))]
        try:
            with self.lock, tempfile.TemporaryDirectory(prefix='ov3d_merge_') as tmp:
                if not replace:
                    current = os.path.join(tmp, 'current.ov3dmap')
                    self.mapper.save(current)
                    paths, Ts = [current] + paths, [None] + Ts
                merged = os.path.join(tmp, 'merged.ov3dmap')
                summary = merge_files(paths, merged, Ts)
                self.mapper.load(merged)             # keeps the current map if the result is unusable
                if out_path:
                    with open(merged, 'rb') as f:
                        write_atomic(self._path(out_path), f.read())
        except (OSError, ValueError, RuntimeError) as e:
            return False, f'kept the current map: {e}'
        written = f'; wrote {self._path(out_path)}' if out_path else ''
        return True, (f'merged {len(summary["inputs"])} maps ({" + ".join(map(str, summary["inputs"]))} voxels) '
                      f'into {self.mapper.map.size} voxels{written}')

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
        response.success, response.message = True, f'cleared {voxels} voxels'
        self._log(True, response.message)
        return response

    def autosave(self) -> None:
        if self._version() != self._saved_version:
            ok, message, _, _ = self.save('')
            self._log(ok, f'autosave: {message}')

    def _log(self, ok: bool, message: str) -> None:
        if ok:            # rclpy loggers allow one severity per call site
            self.node.get_logger().info(message)
        else:
            self.node.get_logger().error(message)
