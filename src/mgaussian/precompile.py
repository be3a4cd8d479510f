"""The cpu backend's kernels compiled in a second process while a run starts: the first run after an install.

Numba compiles a kernel the first time it is called and keeps the machine code in its on-disk cache
(``cache=True``). So the first run after an install, or after any edit of ``render/_cpu_kernels.py``,
compiles every kernel it calls, one after the other, in the run's own process, most of them in the
run's first 20 s, where the run waits for them: sb25-t3.2 on 2 cores 43.0 s cold against 34.6 s warm
(55.7 s cold while the kernels were ``parallel=True``; benchmarks/SPEED.md, session 21).

:func:`start` runs this file as a script beside the run. It compiles the kernels a default run calls,
for the signatures it calls them with (:data:`KERNEL_SIGNATURES`), in the reverse order of their first
use, so that the two processes meet in the middle and the run finds the later kernels in the cache:
sb25-t3.2 cold 38.6 s with it. The machine code is the same whichever process compiles it, so the
volume is too (bit-identical in that measurement). Where the cache is warm the second process only
loads it (about 1 s of one core, beside the run's loading of its stacks).

A kernel called with a signature not listed here is compiled by the run itself, as before; the list
only decides what can be compiled ahead. ``tests/test_precompile.py`` checks it against a run and
prints the entries to add (:func:`compiled_signatures`).
"""

from __future__ import annotations

__all__ = ["KERNEL_SIGNATURES", "compiled_signatures", "signature_text", "start"]

import importlib.util
import os
import subprocess
import sys
import threading

# (kernel, argument types in Numba's signature syntax), in the order a default reconstruction first
# calls them (sb25-t3.2; the motion-corrected and clinical-style runs call the same ones).
KERNEL_SIGNATURES: tuple[tuple[str, str], ...] = (
    ("_gauss_prep", "int64, int64, float64[:, ::1], float64[:, ::1], float64[::1], float64[:, ::1], float64[::1]"),
    ("build_cells", "float64[:, ::1], float64[:, ::1], float64, float64"),
    (
        "_cell_slice_count",
        "int64, int64, int64[::1], float64[::1], int64[::1], float64, float64[::1], float64[:, ::1], "
        "float64[:, :, ::1], float64[:, ::1], float64[:, ::1], float64, int64[::1]",
    ),
    (
        "_cell_slice_fill",
        "int64, int64, int64[::1], float64[::1], int64[::1], float64, float64[::1], float64[:, ::1], "
        "float64[:, :, ::1], float64[:, ::1], float64[:, ::1], float64, int64[::1], int32[::1]",
    ),
    (
        "_count_pairs",
        "int64, int64, float64[:, ::1], float64[:, ::1], int64[::1], int64[::1], int64[::1], int64[::1], "
        "int32[::1], float64[:, ::1], float64[:, :, ::1], float64[:, ::1], float64, int64[::1], int64[::1]",
    ),
    (
        "_fill_pairs",
        "int64, int64, float64[:, ::1], float64[:, ::1], float64[::1], int64[::1], int64[::1], int64[::1], "
        "int64[::1], int32[::1], float64[:, ::1], float64[:, :, ::1], float64[:, ::1], float64[:, ::1], "
        "float64, float64, float64, int64[::1], int64[::1], int64[::1], int32[::1], float64[:, ::1], int64[:, ::1]",
    ),
    ("_slice_count", "int64, int64, int64, int64, int64[::1], int64[::1], int32[::1], int64[:, ::1]"),
    ("_slice_fill", "int64, int64, int64, int64, int64[::1], int64[::1], int32[::1], int64[:, ::1], int64[::1]"),
    (
        "_design_count",
        "int64, int64, int64, int64, int64[::1], int64[::1], float64[:, ::1], int64[:, ::1], float64, float64, "
        "int32[:, :, ::1], boolean, int64[::1], int64[::1]",
    ),
    ("pair_gaussians", "int64[::1], int64[::1], int64[::1], int64"),
    (
        "_design_fill",
        "int64, int64, int64, int64, int64[::1], int64[::1], float64[:, ::1], int64[:, ::1], int32[::1], "
        "float64, float64, int32[:, :, ::1], boolean, int32[::1], int32[::1], int32[::1], int32[::1], "
        "float32[::1], int16[:, ::1], uint16[::1]",
    ),
    (
        "_design_diag_normal",
        "int64, int64, int64, int64[::1], int32[::1], int32[::1], float32[::1], int32[::1], int32[::1], "
        "int16[:, ::1], uint16[::1], float64[:, :, ::1], float64[:, ::1]",
    ),
    ("_sum_chunks", "int64, int64, float64[:, ::1], float64[::1]"),
    (
        "_design_matvec",
        "int64, int64, int64[::1], int32[::1], int32[::1], float32[::1], int32[::1], int32[::1], int16[:, "
        "::1], uint16[::1], float64[::1], float64[:, :, ::1]",
    ),
    (
        "_design_rmatvec",
        "int64, int64, int64, int64[::1], int32[::1], int32[::1], float32[::1], int32[::1], int32[::1], "
        "int16[:, ::1], uint16[::1], float64[:, :, ::1], float64[:, ::1]",
    ),
    ("lattice_laplacian", "float32[::1], int32[:, ::1], float32[::1], boolean, int64, int64, float32[::1]"),
    (
        "_design_normal",
        "int64, int64, int64, int64, int64, int64[::1], int32[::1], int32[::1], float32[::1], int32[::1], "
        "int32[::1], int16[:, ::1], uint16[::1], float64[::1], float64[:, :, ::1], float64[:, ::1]",
    ),
    (
        "_raster_forward",
        "int64, int64, int64, int64, int64, int64[::1], int64[::1], float64[:, ::1], int64[:, ::1], float64, "
        "float64, int32[:, :, ::1], boolean, float64[:, :, ::1]",
    ),
    (
        "_raster_pose_channels",
        "int64, int64, int64, int64, int64, int64[::1], int64[::1], float64[:, ::1], int64[:, ::1], int32[::1], "
        "float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, :, ::1], float64[:, ::1], float64, float64, "
        "int32[:, :, ::1], boolean, float64[:, :, :, ::1]",
    ),
    (
        "region_votes",
        "float64[:, ::1], int64[::1], int64[::1], float64[:, ::1], float64[:, :, ::1], float64[:, :, ::1], "
        "float64, float64, int64, float64, float64[::1], float64[::1]",
    ),
    (
        "grow_corners",
        "int64[:, ::1], float64[:, ::1], int64[:, :, ::1], float64[::1], float64[:, ::1], float64[:, ::1], "
        "float64[::1], float64[::1], float64[:, ::1], float64[:, ::1]",
    ),
    (
        "_raster_backward_means",
        "int64, int64, float64[:, :, ::1], int64[::1], int64[::1], int64[::1], int32[::1], float64[:, ::1], "
        "int64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, ::1], float64[:, :, ::1], float64[:, "
        "::1], float64, float64, int32[:, :, ::1], boolean, int64, float64[:, ::1]",
    ),
)

# MGAUSSIAN_PRECOMPILE=0 turns the second process off (the test suite does, so that its many small
# runs do not each start one).
ENV_SWITCH = "MGAUSSIAN_PRECOMPILE"


def signature_text(argtypes) -> str:
    """A compiled signature (a tuple of Numba types) in the syntax of :data:`KERNEL_SIGNATURES`."""
    from numba.core import types

    def one(t) -> str:
        if isinstance(t, types.Array) and t.layout == "C" and t.mutable:
            return f"{t.dtype}[{', '.join([':'] * (t.ndim - 1) + ['::1'])}]"
        if isinstance(t, types.Boolean):
            return "boolean"
        return str(t)

    return ", ".join(one(t) for t in argtypes)


def compiled_signatures() -> list[tuple[str, str]]:
    """The (kernel, signature) pairs compiled or loaded so far in this process for the kernels that
    Python calls (not the helpers the kernels call), in the form of :data:`KERNEL_SIGNATURES`: after
    a run, what the list should hold (``tests/test_precompile.py`` prints it when it does not)."""
    from numba.core.registry import CPUDispatcher

    kernels = _kernels_module()
    dispatchers = {name: f for name, f in vars(kernels).items() if isinstance(f, CPUDispatcher)}
    called_by_kernels = {name for f in dispatchers.values() for name in f.py_func.__code__.co_names}
    return [
        (name, signature_text(sig))
        for name, f in dispatchers.items()
        if name not in called_by_kernels
        for sig in f.signatures
    ]


def start(threads: int | None) -> subprocess.Popen | None:
    """Start the second process, unless the run has one thread (``threads``, default all cores: it
    would take a second core) or ``MGAUSSIAN_PRECOMPILE=0``. It is not waited for: a run that ends first leaves it to
    finish filling the cache. It runs this file as a script, which imports Numba and the kernels'
    module alone, not ``mgaussian.render`` (whose import loads PyTorch: 1 s of the second process's start)."""
    if (threads or os.cpu_count() or 1) == 1 or os.environ.get(ENV_SWITCH, "1") == "0":
        return None
    run_script = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", run_script, os.path.abspath(__file__)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    except OSError:  # no second process: the run compiles what it needs itself, as it would anyway
        return None
    threading.Thread(target=process.wait, daemon=True).start()  # reaped when it ends, not left a zombie
    return process


def _kernels_module():
    """``mgaussian.render._cpu_kernels``, imported from its file without its package when the package
    is not loaded (with ``_threads``, the one module it imports from the package). Numba's cache
    locates and keys a kernel by its source file, name and bytecode, and rebuilds it in the module of
    that name, so what this compiles is what the run's own import finds."""
    render = os.path.join(os.path.dirname(os.path.abspath(__file__)), "render")
    for module in ("_threads", "_cpu_kernels"):
        name = f"mgaussian.render.{module}"
        if name not in sys.modules:
            spec = importlib.util.spec_from_file_location(name, os.path.join(render, f"{module}.py"))
            loaded = importlib.util.module_from_spec(spec)
            sys.modules[name] = loaded
            spec.loader.exec_module(loaded)
    return sys.modules["mgaussian.render._cpu_kernels"]


def compile_kernels(names: list[str] | None = None) -> int:
    """Compile (or load from the cache) the listed kernels, latest first use first; the number done.
    A signature that no longer fits its kernel is skipped: the run compiles what it calls."""
    from numba.core.sigutils import normalize_signature

    kernels = _kernels_module()
    done = 0
    for name, argtypes in reversed(KERNEL_SIGNATURES):
        if names is not None and name not in names:
            continue
        try:
            # a tuple of types, as a call compiles it: the cache keys an entry by the signature as given
            args, _ = normalize_signature(f"({argtypes},)")
            getattr(kernels, name).compile(tuple(args))
            done += 1
        except Exception:  # a stale entry; see the module's docstring
            continue
    return done


if __name__ == "__main__":
    print(compile_kernels(sys.argv[1:] or None))
