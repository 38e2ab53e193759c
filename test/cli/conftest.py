"""Shared by the ov3d command-line tests: tiny generated scenes."""
from pathlib import Path

from ov3d_ros.cli.main import main


def make_tiny_scenes(out: Path, count: int, seed: int, frames: int, width: int = 160, height: int = 120,
                     *extra: str) -> Path:
    """``ov3d make-scenes`` of ``count`` scenes from ``seed`` into ``out`` (``extra``: more options, e.g.
    ``'--format', 'both'``); returns ``out``."""
    assert main(['make-scenes', '--out', str(out), '--count', str(count), '--seed', str(seed), '--frames',
                 str(frames), '--width', str(width), '--height', str(height), '--quiet', *extra]) == 0
    return out
