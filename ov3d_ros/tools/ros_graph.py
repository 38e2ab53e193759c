"""Start the mapping node and the scene player as separate ROS 2 processes on a private domain."""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / 'config'


def private_ros_env(domain_id: Optional[int] = None) -> Dict[str, str]:
    """This process's environment with its own ROS_DOMAIN_ID and localhost-only discovery."""
    env = dict(os.environ)
    env['ROS_DOMAIN_ID'] = str(domain_id if domain_id is not None else random.randint(10, 200))
    env.setdefault('ROS_AUTOMATIC_DISCOVERY_RANGE', 'LOCALHOST')
    env.setdefault('RMW_IMPLEMENTATION', 'rmw_fastrtps_cpp')
    env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
    env['PYTHONUNBUFFERED'] = '1'
    return env


class RosProcess:
    """A ``python -m module --ros-args ...`` child process with its output in a log file."""

    def __init__(self, module: str, ros_args: Sequence[str], env: Dict[str, str], log_path: Path):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, 'w')
        self.proc = subprocess.Popen([sys.executable, '-m', module, '--ros-args', *ros_args], env=env, cwd=REPO,
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors='replace')

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGINT, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.alive():
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def start_mapping_node(env: Dict[str, str], log_path: Path, overlays: Sequence[str] = ('demo.yaml',),
                       params: Sequence[str] = (), lifecycle: bool = False) -> RosProcess:
    """The mapping node with config/mapping.yaml, then each overlay, then the ``name:=value`` overrides of
    ``params``. The overrides go in one more parameter file (``<log name>.params.yaml`` next to the log), not as
    ``-p`` arguments: rcl ignores a ``-p`` of a nested parameter that two parameter files set (``keyframes.*``
    in mapping.yaml and demo.yaml). ``lifecycle``: the managed node, which starts unconfigured."""
    args: List[str] = ['--params-file', str(CONFIG / 'mapping.yaml')]
    for overlay in overlays:
        args += ['--params-file', str(CONFIG / overlay)]
    if params:
        path = Path(log_path).with_suffix('.params.yaml')
        path.write_text(override_file(params))
        args += ['--params-file', str(path)]
    module = 'ov3d_ros.ros.lifecycle_mapping_node' if lifecycle else 'ov3d_ros.ros.mapping_node'
    return RosProcess(module, args, env, log_path)


def override_file(params: Sequence[str]) -> str:
    """A ROS 2 parameter file (for every node) of ``name:=value`` overrides, values read as YAML like ``-p`` does
    (``a.b:=1`` sets ``b`` under ``a``)."""
    import yaml
    tree: dict = {}
    for p in params:
        name, sep, value = p.partition(':=')
        if not sep or not name:
            raise ValueError(f'parameter override {p!r} is not name:=value')
        *sections, leaf = name.split('.')
        node = tree
        for part in sections:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return yaml.safe_dump({'/**': {'ros__parameters': tree}}, default_flow_style=None)


def start_scene_player(env: Dict[str, str], log_path: Path, params: Sequence[str] = ()) -> RosProcess:
    """The built-in scene player with ``-p name:=value`` parameters."""
    args: List[str] = []
    for p in params:
        args += ['-p', p]
    return RosProcess('ov3d_ros.ros.scene_player', args, env, log_path)
