"""Batches of inputs for ``ov3d map`` and ``ov3d eval``: one task per input on Ray, or serially in this process.

Ray (``pip install ray``) is optional and only needed here: by default a local Ray instance is started on this
machine's cores (``--num-cpus`` to limit it); ``--address`` joins an existing cluster (its nodes need ov3d_ros
installed). Each task gets ``cores // tasks`` CPUs (at least 1) and sets torch to that many threads; when the
config's device is CUDA (or ``auto`` on a cluster with GPUs) each task also asks for ``--gpus-per-task`` GPUs.
A task is a plain function of its input, seeded by the config alone, so the results equal the serial run's;
they are gathered by input index, so aggregation does not depend on the order in which tasks finish. A failing
input is reported by name and the others go on; the caller exits non-zero at the end with a summary.
"""
from __future__ import annotations

import glob
import os
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

from ov3d_ros.cli.common import CliError


@dataclass
class Job:
    """One unit of a batch: ``fn(*args)`` for the input called ``name``."""

    name: str
    fn: Callable
    args: tuple = ()


@dataclass
class Outcome:
    """What a job gave: ``result`` when ``ok``, else ``error`` (the message, with the traceback in ``detail``)."""

    name: str
    ok: bool
    result: Any = None
    error: str = ''
    detail: str = field(default='', repr=False)


def add_batch_arguments(p) -> None:
    g = p.add_argument_group('batches (several inputs; Ray)')
    g.add_argument('--serial', action='store_true',
                   help='run the inputs one after another in this process (no Ray)')
    g.add_argument('--address', default=None,
                   help='Ray cluster to run on (e.g. ray://head:10001 or auto); default: a local Ray instance')
    g.add_argument('--num-cpus', type=int, default=None,
                   help='CPUs of the local Ray instance (default: all cores of this machine)')
    g.add_argument('--gpus-per-task', type=float, default=1.0,
                   help='GPUs per task when the device is CUDA (fractions share a GPU; default 1)')


def expand_inputs(patterns: Sequence[str]) -> List[str]:
    """Inputs with glob patterns expanded (sorted); a pattern that matches nothing is kept, to fail by name."""
    out: List[str] = []
    for p in patterns:
        matches = sorted(glob.glob(p)) if glob.has_magic(p) else []
        out.extend(matches or [p])
    return out


def _run_one(job: Job, threads: int = 0) -> Outcome:
    """Run a job and catch its failure (in a Ray task or in this process)."""
    if threads > 0:
        import torch
        torch.set_num_threads(threads)
    try:
        return Outcome(job.name, True, job.fn(*job.args))
    except Exception as e:          # reported by name; the batch goes on
        return Outcome(job.name, False, error=str(e) or type(e).__name__, detail=traceback.format_exc())


def _bar(total: int, quiet: bool, desc: str):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit='input', disable=quiet, dynamic_ncols=True, file=sys.stderr)


def import_ray():
    try:
        import ray
    except ImportError:
        raise CliError('running several inputs in parallel needs Ray: pip install ray '
                       '(or pass --serial to run them one after another)') from None
    return ray


def run_jobs(jobs: Sequence[Job], args, device: str = 'cpu', on_done: Optional[Callable[[Outcome], None]] = None,
             desc: str = 'inputs') -> List[Outcome]:
    """Run ``jobs`` (on Ray unless ``args.serial`` or a single job) and return their outcomes in job order.

    ``device`` is the config's torch device name (decides whether tasks ask Ray for GPUs); ``on_done`` is
    called with each outcome as it arrives (in completion order)."""
    quiet = getattr(args, 'quiet', False)
    if getattr(args, 'serial', False) or len(jobs) <= 1:
        outcomes = []
        with _bar(len(jobs), quiet or len(jobs) <= 1, desc) as bar:
            for job in jobs:
                outcomes.append(_run_one(job))
                bar.update(1)
                if on_done:
                    on_done(outcomes[-1])
        return outcomes
    return _run_on_ray(jobs, args, device, on_done, desc)


def _run_on_ray(jobs, args, device, on_done, desc) -> List[Outcome]:
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        if args.address:
            ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
        else:
            # workers of a local instance import ov3d_ros from wherever this process does (source checkouts too)
            root = str(Path(__file__).resolve().parents[2])
            path = os.environ.get('PYTHONPATH', '')
            os.environ['PYTHONPATH'] = root + (os.pathsep + path if path else '')
            ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     object_store_memory=256 * 2 ** 20)
    try:
        resources = ray.cluster_resources()
        cores = int(resources.get('CPU', 1))
        per_task = max(1, cores // len(jobs))
        wants_gpu = device.startswith('cuda') or (device in ('', 'auto') and resources.get('GPU', 0) > 0)
        task = ray.remote(num_cpus=per_task, num_gpus=args.gpus_per_task if wants_gpu else 0,
                          max_retries=0)(_run_one)
        refs = {task.remote(job, per_task): i for i, job in enumerate(jobs)}
        outcomes: List[Optional[Outcome]] = [None] * len(jobs)
        pending = list(refs)
        with _bar(len(jobs), getattr(args, 'quiet', False), desc) as bar:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                i = refs[done[0]]
                try:
                    outcomes[i] = ray.get(done[0])
                except Exception as e:        # the worker died (out of memory, a crash): report, go on
                    outcomes[i] = Outcome(jobs[i].name, False, error=f'task failed: {type(e).__name__}: {e}')
                bar.update(1)
                if on_done:
                    on_done(outcomes[i])
        return outcomes
    finally:
        if started:
            ray.shutdown()


def report_failures(outcomes: Sequence[Outcome], command: str) -> int:
    """Print a summary of failed inputs to stderr; returns the exit code (0 all done, 2 some failed)."""
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return 0
    print(f'ov3d {command}: {len(failed)} of {len(outcomes)} inputs failed:', file=sys.stderr)
    for o in failed:
        print(f'  {o.name}: {o.error}', file=sys.stderr)
    return 2
