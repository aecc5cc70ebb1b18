"""Chunked, two-thread evaluation shared by the interpolators (internal).

The interpolators evaluate a function of many voxels in independent chunks. NumPy ufuncs, BLAS and scipy's
Qhull point location release the GIL, so a small thread pool over the chunks uses the cores without copying
data between processes. BLAS is limited to one thread inside the pool (threadpoolctl) so that the pool's
threads do not each start their own BLAS threads on a small machine.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

#: Upper bound on the evaluation threads (the project targets small CPUs; more threads gain little here).
MAX_WORKERS = 4


def n_workers() -> int:
    """Threads used for chunked evaluation: the CPUs this process may run on, at most :data:`MAX_WORKERS`."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(MAX_WORKERS, n))


def run_chunks(fn: Callable[[T], None], chunks: Iterable[T], workers: int | None = None) -> None:
    """Call ``fn(chunk)`` for every chunk, on ``workers`` threads (default :func:`n_workers`), BLAS single-threaded.

    ``fn`` writes its result into a preallocated array (disjoint slices per chunk), so the order of
    completion does not matter; the first exception raised by any call is re-raised.
    """
    from threadpoolctl import threadpool_limits

    items = list(chunks)
    w = n_workers() if workers is None else max(1, int(workers))
    with threadpool_limits(limits=1, user_api="blas"):
        if w == 1 or len(items) <= 1:
            for c in items:
                fn(c)
            return
        with ThreadPoolExecutor(max_workers=w) as pool:
            for f in [pool.submit(fn, c) for c in items]:
                f.result()
