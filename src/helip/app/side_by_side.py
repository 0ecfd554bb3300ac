"""Independent runs side by side, one process each, the cores split between them.

The demo's two continued trainings (baseline, HELIP) and the benchmarks' runs
are independent and each barely uses a second thread: on a 2-core CPU a second
torch thread speeds one run up only 1.2-1.45x, so two one-thread runs at once
finish sooner than two two-thread runs one after the other.

A function run here reads what it shares with the others (datasets, the
starting checkpoint, the hard pairs) from ``CONTEXT``: it is set once per
worker process, so those are sent once per worker, not once per run.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterator, Sequence, Tuple

import torch

CONTEXT: dict = {}  # what every run needs: set in this process (jobs 1) or once in each worker (jobs > 1)


def cores() -> int:
    """The cores this process may run on (the affinity mask, which a container or ``taskset`` narrows)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _init_worker(context: dict, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(threads)
    threadpool_limits(threads)  # numpy's BLAS too (the linear probe, mining): for the rest of the process
    CONTEXT.update(context)


def run_side_by_side(fn: Callable, calls: Sequence[tuple], context: dict, jobs: int) -> Iterator[Tuple[tuple, object]]:
    """Yield ``(args, fn(*args))`` for every ``args`` in ``calls``, as each run finishes.

    ``jobs`` runs at once, each in its own process with ``cores() // jobs``
    torch and BLAS threads; ``jobs`` 1 (or a single call) runs them here, one
    after the other, with this process's threads. ``fn`` must be importable
    by name (a module-level function): the workers are spawned, not forked,
    since forking a process whose OpenMP threads have run can hang the child.
    """
    CONTEXT.update(context)
    if jobs <= 1 or len(calls) < 2:
        for args in calls:
            yield args, fn(*args)
        return
    threads = max(1, cores() // jobs)
    with ProcessPoolExecutor(min(jobs, len(calls)), mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(context, threads)) as pool:
        futures = {pool.submit(fn, *args): args for args in calls}
        for fut in as_completed(futures):
            yield futures[fut], fut.result()
