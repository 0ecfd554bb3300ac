"""Worker threads with single-threaded kernels, shared by the tiled exact search and ANN's per-cell search."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable

import torch


@contextmanager
def blas_threads():
    """numpy's BLAS with torch's thread count (what ``--threads`` / ``torch.set_num_threads`` set)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=torch.get_num_threads(), user_api="blas"):
        yield


@contextmanager
def tile_workers():
    """As many worker threads as torch's thread count, each running its kernels on one thread.

    The tiles' work is many operations of a few milliseconds each (two products, a
    comparison pass, small sorts). Run on one Python thread with 2-thread BLAS and
    2-thread torch, OpenBLAS's and OpenMP's idle threads spin against each other and
    the small torch operations ran up to 30x slower than on one thread (measured: a
    20k run took 13-30 s on 2 threads against 3.9 s on one). Instead each worker
    thread takes whole tiles with single-threaded kernels; numpy and torch release
    the GIL inside them. Yields the number of workers.
    """
    from threadpoolctl import threadpool_limits

    workers = max(1, torch.get_num_threads())
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield workers
    finally:
        torch.set_num_threads(workers)


def _run_parallel(fn: Callable[[int], None], workers: int) -> None:
    """``fn(w)`` for w = 0..workers-1 on worker threads (inline for one); the first exception is raised."""
    if workers == 1:
        with torch.no_grad():
            fn(0)
        return

    def call(w: int) -> None:
        with torch.no_grad():   # grad mode is per thread
            fn(w)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(call, w) for w in range(workers)]:
            f.result()
