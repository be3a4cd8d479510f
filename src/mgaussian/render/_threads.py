"""The cpu kernels' threads: a serial Numba kernel run over contiguous blocks of an index range.

The kernels in :mod:`._cpu_kernels` are compiled serial (``nogil``) and take the block ``lo, hi`` of
their outer loop; :func:`parallel_range` splits the range into contiguous blocks of equal size,
several per thread, which the threads (the calling one too) take in turn. The kernels were ``parallel=True``
until session 21: Numba's parallel-loop passes doubled their compilation, which the first run after
an install waits for (sb25-t3.2 on 2 cores: 21 s of compilation, against 12 s compiled serial;
benchmarks/SPEED.md). Every block writes its own outputs (per item, or per fixed chunk of a sum), so
the result does not depend on the number of threads.
"""

from __future__ import annotations

__all__ = ["parallel_range"]

import threading
from concurrent.futures import ThreadPoolExecutor

import numba

# blocks per thread, taken in turn: slices and cells differ in work, so equal blocks, one per thread
# (prange's split), left a thread idle for a quarter of the design products' time on sb25-t3.2;
# 8 rather than 4: the forward render's idle thread-seconds over a sb25-t3.2 run 0.61 -> 0.47 s
# (session 22; the design products are held at 8 blocks by their 8 chunks of sums)
_BLOCKS_PER_THREAD = 8

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0
_pool_lock = threading.Lock()


def _workers(n: int) -> ThreadPoolExecutor:
    """A pool of at least ``n`` threads, kept between calls (a thread costs ~50 us to start). A
    bigger one replaces it when more threads are asked for; the old one is left to the calls that
    hold it (kernels may be called from several Python threads at once)."""
    global _pool, _pool_workers
    with _pool_lock:
        if _pool is None or _pool_workers < n:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="mgaussian-kernel")
            _pool_workers = n
        return _pool


def parallel_range(kernel, n: int, *args) -> None:
    """``kernel(lo, hi, *args)`` over ``range(n)`` split into contiguous blocks, ``_BLOCKS_PER_THREAD``
    per thread (``numba.get_num_threads()``, set by :func:`mgaussian.render.cpu.set_threads`), which
    the threads take in turn as they finish one, the calling thread too."""
    threads = max(1, min(numba.get_num_threads(), n))
    if threads == 1:
        kernel(0, n, *args)
        return
    blocks = min(n, threads * _BLOCKS_PER_THREAD)
    bounds = [(k * n) // blocks for k in range(blocks + 1)]
    next_block = iter(range(blocks))
    taking = threading.Lock()

    def work() -> None:
        while True:
            with taking:
                k = next(next_block, None)
            if k is None:
                return
            kernel(bounds[k], bounds[k + 1], *args)

    others = [_workers(threads - 1).submit(work) for _ in range(threads - 1)]
    work()
    for thread in others:
        thread.result()
