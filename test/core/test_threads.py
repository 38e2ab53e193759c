"""How row-wise work is shared out over torch's CPU threads (ov3d_ros.core.threads)."""
import threading
import time

import pytest
import torch

from ov3d_ros.core import threads
from ov3d_ros.core.threads import one_thread, row_parts, split_rows


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_row_parts_cover_the_rows_in_whole_blocks_as_evenly_as_they_can():
    assert row_parts(100_000, 1024, 2) == [(0, 49 * 1024), (49 * 1024, 100_000)]
    assert row_parts(10, 4, 2) == [(0, 4), (4, 10)]              # 3 blocks: 1 and 2 (the ragged last)
    assert row_parts(3000, 1024, 4) == [(0, 1024), (1024, 2048), (2048, 3000)]   # no more parts than blocks
    assert row_parts(1000, 1024, 2) == [(0, 1000)]
    assert row_parts(0, 1024, 2) == []
    for n, block, k in ((12_345, 100, 3), (7, 1, 7), (99, 10, 1)):
        parts = row_parts(n, block, k)
        assert parts[0][0] == 0 and parts[-1][1] == n and len(parts) == min(k, -(-n // block))
        assert all(hi == lo2 for (_, hi), (lo2, _) in zip(parts, parts[1:]))
        assert all(lo % block == 0 for lo, _ in parts)
        sizes = [hi - lo for lo, hi in parts[:-1]]
        assert max(sizes, default=0) - min(sizes, default=0) <= block


def test_split_rows_runs_one_part_per_thread_each_on_one_intra_op_thread(two_threads):
    calls, lock = [], threading.Lock()

    def part(lo, hi):
        with lock:
            calls.append((lo, hi, threading.get_ident(), torch.get_num_threads()))

    split_rows(part, 5000, 1024)
    assert sorted(c[:2] for c in calls) == [(0, 2048), (2048, 5000)]
    assert len({c[2] for c in calls}) == 2                       # the caller and a worker
    assert threading.get_ident() in {c[2] for c in calls}
    assert all(c[3] == 1 for c in calls)
    assert torch.get_num_threads() == 2                          # the caller's count is back


def test_split_rows_calls_once_in_the_caller_on_one_thread_or_for_one_block(two_threads):
    calls = []
    split_rows(lambda lo, hi: calls.append((lo, hi, threading.get_ident())), 1000, 1024)     # one block
    torch.set_num_threads(1)
    split_rows(lambda lo, hi: calls.append((lo, hi, threading.get_ident())), 5000, 1024)
    assert calls == [(0, 1000, threading.get_ident()), (0, 5000, threading.get_ident())]
    split_rows(lambda lo, hi: calls.append('called'), 0, 1024)
    assert calls[-1] != 'called'


def test_split_rows_does_not_wait_while_another_thread_runs_on_one_thread(two_threads):
    """one_thread's lock held elsewhere (e.g. the student's convolutions in the mapping thread): the work runs
    at once, in one call in the calling thread."""
    held, done = threading.Event(), threading.Event()

    def holder():
        with one_thread():
            held.set()
            done.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(30)
        calls = []
        split_rows(lambda lo, hi: calls.append((lo, hi, threading.get_ident())), 5000, 1024)
        assert calls == [(0, 5000, threading.get_ident())]
    finally:
        done.set()
        t.join()


def test_an_error_in_a_part_is_raised_after_every_part_ended_and_leaves_no_state(two_threads):
    ended = []

    def part(lo, hi):
        if lo > 0:
            raise RuntimeError(f'part at {lo} failed')
        ended.append(lo)

    with pytest.raises(RuntimeError, match='part at 2048 failed'):
        split_rows(part, 5000, 1024)
    assert ended == [0]
    assert torch.get_num_threads() == 2
    free = []                    # the lock is reentrant: ask from another thread whether it was released

    def probe():
        free.append(threads._LOCK.acquire(blocking=False))
        if free[0]:
            threads._LOCK.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join()
    assert free == [True]


def test_a_worker_that_started_on_two_threads_runs_its_part_on_one(two_threads, monkeypatch):
    """torch keeps the thread count per thread: a kept worker started outside split_rows (on the process's two)
    is set to one for its part."""
    monkeypatch.setattr(threads, '_POOL', None)
    worker = threads._pool(1)
    try:
        assert worker.submit(torch.get_num_threads).result() == 2
        seen = []
        split_rows(lambda lo, hi: seen.append((lo, torch.get_num_threads())), 5000, 1024)
        assert sorted(seen) == [(0, 1), (2048, 1)]
        assert torch.get_num_threads() == 2
        assert threads._pool(1) is worker                        # split_rows used this test's pool
    finally:
        worker.shutdown(wait=True)                               # the process's own pool comes back with monkeypatch


def test_an_error_in_the_callers_part_leaves_only_after_the_workers_part_ended(two_threads):
    started, ended = threading.Event(), []

    def part(lo, hi):
        if lo == 0:
            assert started.wait(30)
            raise RuntimeError('first part failed')
        started.set()
        time.sleep(0.2)                  # still running when the caller's part fails
        ended.append(lo)

    with pytest.raises(RuntimeError, match='first part failed'):
        split_rows(part, 5000, 1024)
    assert ended == [2048]
