"""How torch runs on the CPU: code that must run on one intra-op thread (results that would differ with the thread
count, kernels that race) goes through :func:`one_thread`; :func:`native_half` says whether the CPU multiplies a half
precision natively (else torch emulates it, several times slower than float32), :func:`emulated_half` whether a
dtype on a device is such an emulated half precision."""
from __future__ import annotations

import functools
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
