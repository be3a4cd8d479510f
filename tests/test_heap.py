"""The heap setting around the fitting stages: big allocations come from the reused heap inside
the context, from pages of their own outside it (glibc's count of mmapped bytes tells them apart)."""

import ctypes
import sys

import numpy as np
import pytest

from mgaussian.recon.heap import reuse_freed_memory


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_size_t)
        for n in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _mmapped_bytes_fn():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2
    return lambda: libc.mallinfo2().hblkhd


def _mmapped_by_64_mb_array(mmapped) -> int:
    before = mmapped()
    a = np.ones(64 << 20, np.uint8)
    grown = mmapped() - before
    del a
    return grown


def test_big_allocations_reuse_the_heap_only_inside_the_context():
    mmapped = _mmapped_bytes_fn()
    if mmapped is None:
        pytest.skip("glibc's mallinfo2 is not available here")
    assert _mmapped_by_64_mb_array(mmapped) >= 64 << 20  # glibc's default: pages of its own
    with reuse_freed_memory():
        assert _mmapped_by_64_mb_array(mmapped) == 0
    assert _mmapped_by_64_mb_array(mmapped) >= 64 << 20  # the defaults are back
    with reuse_freed_memory(enabled=False):
        assert _mmapped_by_64_mb_array(mmapped) >= 64 << 20
