"""Torch intra-op threads: code that must run on one CPU thread (results that would differ with the thread count,
kernels that race) goes through :func:`one_thread`."""
from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

_LOCK = threading.RLock()


@contextmanager
def one_thread(device: torch.device | str = 'cpu'):
    """Run the block on one torch intra-op thread on CPU and restore the caller's count afterwards; a no-op on
    other devices. The thread count is process-wide, so one lock keeps two such blocks in different Python
    threads from restoring each other's count."""
    if torch.device(device).type != 'cpu':
        yield
        return
    with _LOCK:
        n = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)
