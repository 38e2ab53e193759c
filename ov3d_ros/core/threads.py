"""How torch runs on the CPU: code that must run on one intra-op thread (results that would differ with the thread
count, kernels that race) goes through :func:`one_thread`; :func:`split_rows` runs row-wise work as one part per
thread instead of splitting each small op; :func:`native_half` says whether the CPU multiplies a half
precision natively (else torch emulates it, several times slower than float32), :func:`emulated_half` whether a
dtype on a device is such an emulated half precision."""
from __future__ import annotations

import functools
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import Callable, List, Optional, Tuple

import torch

_LOCK = threading.RLock()


@contextmanager
def one_thread(device: torch.device | str = 'cpu'):
    """Run the block on one torch intra-op thread on CPU and restore the caller's count afterwards; a no-op on
    other devices. torch keeps the count per thread, and each count it sets also becomes the count a thread
    starts with on its first torch call (torch 2.14 on Linux, OpenMP: a worker's ``set_num_threads(1)`` left
    the main thread on 2 and made threads started after it begin on 1); one lock keeps two such blocks in
    different Python threads from leaving that starting count at 1."""
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


def row_parts(n: int, block: int, parts: int) -> List[Tuple[int, int]]:
    """Up to ``parts`` contiguous (lo, hi) ranges covering rows 0..n-1 in order, each a whole number of ``block``
    rows but the last, as even as that allows; none for n = 0."""
    blocks = -(-n // block) if n > 0 else 0
    parts = max(1, min(parts, blocks))
    cuts = [min(n, (blocks * i // parts) * block) for i in range(parts + 1)]
    return [(lo, hi) for lo, hi in zip(cuts[:-1], cuts[1:]) if hi > lo]


_POOL: Optional[Tuple[ThreadPoolExecutor, int]] = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """The kept worker threads of :func:`split_rows` (at least ``workers``; a larger pool replaces a smaller)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL[1] < workers:
            _POOL = (ThreadPoolExecutor(max_workers=workers, thread_name_prefix='ov3d_rows'), workers)
        return _POOL[0]


def _on_one_thread(fn: Callable[[int, int], None], lo: int, hi: int) -> None:
    """A worker's part of :func:`split_rows`, on one intra-op thread (a worker started while the caller held the
    lock already is; one started otherwise is set to it, under the caller's lock)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    fn(lo, hi)


def split_rows(fn: Callable[[int, int], None], n: int, block: int) -> None:
    """Call ``fn(lo, hi)`` over rows 0..n-1: on a CPU where torch runs several intra-op threads, as one part per
    thread (:func:`row_parts`, whole ``block``-row blocks), every part on its own Python thread (the caller's and
    kept workers) with one intra-op thread each; else once, ``fn(0, n)``, in the calling thread.

    For loops of small row-block ops (convert a block, multiply it): torch splits each op across its threads, and
    on a 2-core AMD EPYC that loop took longer on two threads than on one (the text products of 100 k / 1 M fp16
    rows with 5 texts: medians 25 / 268 ms, upper quartiles 30 / 636 ms, against 32 / 317 ms on one), while one
    part per thread took 21 / 191 ms. Each part computes exactly what one thread computes for its rows (MKL's
    products on two threads can differ in their last bits). ``fn`` must write disjoint outputs per range. The
    thread count is set per thread, and the kept workers must start on one, so this shares :func:`one_thread`'s
    lock: while another thread holds it (a block that runs on one thread), ``fn(0, n)`` runs at once in the
    calling thread instead of waiting. An exception in a part is raised here after every part has ended."""
    parts = row_parts(n, block, torch.get_num_threads())
    if len(parts) < 2 or not _LOCK.acquire(blocking=False):
        if n > 0:
            fn(0, n)
        return
    try:
        with one_thread():                # the lock is this thread's already: one_thread takes it again
            futures = [_pool(len(parts) - 1).submit(_on_one_thread, fn, lo, hi) for lo, hi in parts[1:]]
            try:
                fn(*parts[0])
            finally:
                wait(futures)             # every part ends before an error leaves
            for f in futures:
                f.result()                # a worker's error
    finally:
        _LOCK.release()


@functools.lru_cache(maxsize=None)
def native_half(dtype: torch.dtype) -> bool:
    """Whether this CPU multiplies ``dtype`` (bfloat16 or float16) matrices natively, as oneDNN reports it from the
    CPU's flags (AVX512-BF16 or AMX for bf16, AVX512-FP16 or AMX-FP16 for fp16); True where torch cannot say.
    Asked once per dtype (the answer cannot change while the process runs)."""
    probe = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported' if dtype == torch.bfloat16 else
                    '_is_mkldnn_fp16_supported', None)
    try:
        return True if probe is None else bool(probe())
    except RuntimeError:
        return True


def emulated_half(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether torch only emulates ``dtype`` on ``device``: bfloat16 or float16 on a CPU without native kernels for
    it (:func:`native_half`). Never on CUDA, never for float32 or float64."""
    return (torch.device(device).type == 'cpu' and dtype in (torch.bfloat16, torch.float16)
            and not native_half(dtype))
