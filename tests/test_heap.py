"""The heap setting around the fitting stages: big allocations come from the reused heap inside
the context, from pages of their own outside it (glibc's count of mmapped bytes tells them apart).
Checked in a fresh process: in the test run's own, earlier tests leave big free chunks in the heap
that glibc hands out before it maps new pages, whatever the setting."""

import subprocess
import sys

import pytest

_CHECK = r'''
import ctypes
import sys

import numpy as np

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


def _in_context(mmapped, enabled) -> int:
    with reuse_freed_memory(enabled=enabled):
        return _mmapped_by_64_mb_array(mmapped)


mmapped = _mmapped_bytes_fn()
if mmapped is None:
    print("no mallinfo2")
    sys.exit(0)
print(
    _mmapped_by_64_mb_array(mmapped) >= 64 << 20,  # glibc's default: pages of its own
    _in_context(mmapped, True) == 0,
    _mmapped_by_64_mb_array(mmapped) >= 64 << 20,  # the defaults are back
    _in_context(mmapped, False) >= 64 << 20,
)
'''


def test_big_allocations_reuse_the_heap_only_inside_the_context():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    out = subprocess.run([sys.executable, "-c", _CHECK], capture_output=True, text=True, check=True).stdout.split()
    if out == ["no", "mallinfo2"]:
        pytest.skip("glibc's mallinfo2 is not available here")
    assert out == ["True", "True", "True", "True"]
