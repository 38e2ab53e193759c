"""Packaging: one executable name set for colcon (CMakeLists.txt) and pip (setup.py), the runtime requirements
carry no ROS wheels or test tools, and `make setup` puts the console scripts on the venv's PATH."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cmake_executables():
    text = (REPO / 'CMakeLists.txt').read_text()
    block = re.search(r'foreach\(_exe (.*?)\)', text, re.S).group(1)
    return dict(item.split(':') for item in block.split())


def pip_console_scripts():
    text = (REPO / 'setup.py').read_text()
    return dict(re.findall(r"'([\w.]+) = ([\w.]+):main'", text))


def test_colcon_and_pip_install_the_same_executables():
    cmake, pip = cmake_executables(), pip_console_scripts()
    assert cmake == pip and 'ov3d' in cmake and 'ov3d_mapping_node' in cmake


def test_the_launch_file_starts_installed_executables():
    text = (REPO / 'launch' / 'mapping.launch.py').read_text()
    used = set(re.findall(r"executable='(ov3d\w*)'", text))
    assert used and used <= set(cmake_executables())


def test_runtime_requirements_have_no_ros_wheels_or_test_tools():
    lines = [ln.split('#')[0].strip() for ln in (REPO / 'requirements-runtime.txt').read_text().splitlines()]
    names = [re.split(r'[<>=!~ ;\[]', ln)[0].lower() for ln in lines if ln]
    assert 'torch' in names and 'open_clip_torch' in names
    assert not [n for n in names if n.startswith('ros-') or n in ('pytest', 'hypothesis', 'catkin_pkg')]
    assert '-r requirements-runtime.txt' in (REPO / 'requirements.txt').read_text()


@pytest.mark.skipif(not (Path(sys.prefix) / '.srv-installed').exists(), reason='not the venv made by make setup')
def test_ov3d_is_on_the_venv_path(tmp_path):
    exe = Path(sys.prefix) / 'bin' / 'ov3d'
    p = subprocess.run([str(exe), '--help'], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})
    assert p.returncode == 0 and 'usage: ov3d' in p.stdout, p.stderr[-2000:]
