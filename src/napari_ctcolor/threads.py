"""How many CPU threads a piece of work may use: torch's count, or fewer inside `at_most` (per Python thread).

The viewer recomposes the whole volume in the background while the reader drags the window. On two cores, that work
on both cores took the one the interface needs: the grey CT followed the slider 0.25 s late. So the background
recompose runs `at_most(1)`, and the composition's numpy and numba kernels ask `cpu_threads` how many threads to
use. Torch's own intra-op count is process-wide, so it is left alone.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

_LOCAL = threading.local()


def cpu_threads() -> int:
    """Threads for this thread's CPU kernels: torch's count (the user's, or OMP_NUM_THREADS), capped by `at_most`."""
    import torch

    threads = max(1, torch.get_num_threads())
    limit = getattr(_LOCAL, "limit", None)
    return threads if limit is None else max(1, min(limit, threads))


@contextmanager
def at_most(threads: int) -> Iterator[None]:
    """Within the block, this Python thread's kernels use at most ``threads`` threads (`cpu_threads`)."""
    before = getattr(_LOCAL, "limit", None)
    _LOCAL.limit = threads
    try:
        yield
    finally:
        _LOCAL.limit = before


def use_threads(threads: int) -> None:
    """Run this thread's numba kernels (the field kernels of `models`, the colour engine's) on ``threads``
    threads (torch's count: one per core, or one per batch worker), capped by numba's pool.

    The first call starts numba's thread pool. With its OpenMP layer (numba's default where no TBB is installed) that
    sets the OpenMP thread count, which torch reads as its own: a process on 1 torch thread (``OMP_NUM_THREADS=1``, a
    Dask batch worker, ``torch.set_num_threads(1)``) then ran its later convolutions on every core, and the first
    colorize in a process differed from the next in the last bits. Torch's count is put back."""
    import numba
    import torch

    torch_threads = torch.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != torch_threads:
        torch.set_num_threads(torch_threads)
