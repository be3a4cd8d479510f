"""The C heap's settings while a level fits (glibc on Linux; elsewhere nothing).

By default glibc gives every allocation above its mmap threshold (at most 32 MB) pages of its own
and returns them to the system when freed; the next allocation of that size page-faults and the
kernel zeroes every page again. An Adam iteration allocates and frees ~2 GB of render plans,
gradients and float64 copies per stack on mni-t4 at 1 mm: ``perf`` put 12 % of a run's samples in
the kernel's page clearing (93 s of system time in a 300 s run). Inside
:func:`reuse_freed_memory` the heap keeps what is freed and hands it out again: mni-t4's Adam
iterations 7.2 -> 5.9 s each (one process, the two settings in turn), the volume bit-identical.

The last level's warm start and pose rounds run with the defaults: its intensity fits' maps (2 GB
on mni-t4) keep pages of their own. A heap kept over the whole run added its fragmentation to that
level's memory peak (3.38e9 -> 3.51e9 to 3.60e9 bytes, benchmarks/SPEED.md session 17).
"""

from __future__ import annotations

__all__ = ["reuse_freed_memory"]

import contextlib
import ctypes
import sys

# mallopt parameters (malloc.h) and glibc's defaults
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
_DEFAULT_MMAP_MAX = 65536
_DEFAULT_THRESHOLD = 128 * 1024
# freed memory above this at the heap's top goes back to the system even inside the context
_KEEP_TOP = 1024 * 1024 * 1024


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def reuse_freed_memory(enabled: bool = True):
    """Freed memory is reused instead of being returned to the system and faulted in again (no
    effect on the results: only where the bytes live). ``enabled`` False: the defaults stand."""
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TOP)
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_THRESHOLD)
        libc.malloc_trim(0)
