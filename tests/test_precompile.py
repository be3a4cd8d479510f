"""The cpu kernels compiled ahead in a second process (mgaussian/precompile.py) and run on the
kernels' own threads (render/_threads.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from mgaussian import precompile
from mgaussian.render import _threads

SCRIPT = precompile.__file__


def _python(code_or_args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    args = code_or_args if isinstance(code_or_args, list) else ["-c", code_or_args]
    res = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_a_precompiled_kernel_is_what_a_later_call_loads(tmp_path):
    """The second process's cache entry is found by the run's own call (an entry keyed by the
    signature's text, not its types, was not: the run compiled every kernel again)."""
    cache = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    run_script = "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    assert _python(["-c", run_script, SCRIPT, "_sum_chunks"], cache).strip() == "1"
    out = _python(
        "import numpy as np\n"
        "from mgaussian.render import _cpu_kernels as K\n"
        "K._sum_chunks(0, 3, np.zeros((2, 3)), np.empty(3))\n"
        "print(sum(K._sum_chunks.stats.cache_hits.values()), sum(K._sum_chunks.stats.cache_misses.values()))\n",
        cache,
    )
    assert out.split() == ["1", "0"]


def test_the_listed_signatures_are_those_a_run_calls(tmp_path):
    """Every kernel a default reconstruction calls from Python, with the argument types it calls it
    with, is in KERNEL_SIGNATURES (else the second process compiles what the run does not use)."""
    from conftest import write_nifti
    from test_recon import simulate_phantom

    g, aff, _, stacks, masks = simulate_phantom(tmp_path, seed=3)
    write_nifti(tmp_path / "gt.nii.gz", g, aff)
    argv = ["reconstruct", "--input-stacks", *stacks, "--stack-masks", *masks, "--thicknesses", "3.6"]
    argv += ["--output-volume", str(tmp_path / "out.nii.gz"), "--no-report", "--quiet"]
    out = _python(
        "import json, sys\n"
        "from mgaussian.cli import main\n"
        "from mgaussian.precompile import compiled_signatures\n"
        f"assert main({argv!r}) == 0\n"
        "print(json.dumps(compiled_signatures()))\n"
    )
    called = {tuple(x) for x in json.loads(out.strip().splitlines()[-1])}
    listed = set(precompile.KERNEL_SIGNATURES)
    missing = sorted(called - listed)
    assert not missing, "add to KERNEL_SIGNATURES:\n" + "\n".join(f'("{n}", "{s}"),' for n, s in missing)
    assert {n for n, _ in called} >= {"_raster_forward", "_design_matvec", "_fill_pairs"}


def test_every_listed_kernel_exists_and_its_signature_parses():
    from numba.core.registry import CPUDispatcher
    from numba.core.sigutils import normalize_signature

    from mgaussian.render import _cpu_kernels as K

    for name, argtypes in precompile.KERNEL_SIGNATURES:
        assert isinstance(getattr(K, name, None), CPUDispatcher), name
        args, _ = normalize_signature(f"({argtypes},)")
        assert precompile.signature_text(args) == argtypes


def test_started_unless_one_thread_or_switched_off(monkeypatch):
    started = []

    class Process:
        def wait(self):
            return 0

    proc = Process()
    monkeypatch.setattr(precompile.subprocess, "Popen", lambda args, **kw: started.append(args) or proc)
    monkeypatch.setenv(precompile.ENV_SWITCH, "1")
    monkeypatch.setattr(precompile.os, "cpu_count", lambda: 2)
    assert precompile.start(None) is proc and started[-1][-1] == SCRIPT
    assert precompile.start(1) is None
    monkeypatch.setattr(precompile.os, "cpu_count", lambda: 1)
    assert precompile.start(None) is None
    monkeypatch.setenv(precompile.ENV_SWITCH, "0")
    assert precompile.start(4) is None
    assert len(started) == 1


def test_the_cli_starts_it_only_for_the_cpu_kernels(monkeypatch, tmp_path):
    import mgaussian.cli as cli

    calls = []
    monkeypatch.setattr(precompile, "start", lambda threads: calls.append(threads))
    parser = cli.build_parser()
    base = ["reconstruct", "--input-stacks", "a.nii.gz", "--output-volume", str(tmp_path / "o.nii.gz")]
    cli._start_precompile(parser.parse_args(base + ["--threads", "3"]))
    cli._start_precompile(parser.parse_args(base + ["--device", "cuda"]))
    cli._start_precompile(parser.parse_args(base + ["--backend", "reference"]))
    assert calls == [3]


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
def test_parallel_range_covers_the_range_once_in_contiguous_blocks(threads):
    import numba

    seen = np.zeros(23, np.int64)
    blocks = []

    def kernel(lo, hi, out):
        blocks.append((lo, hi))
        out[lo:hi] += 1

    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        _threads.parallel_range(kernel, 23, seen)
    finally:
        numba.set_num_threads(old)
    assert (seen == 1).all()
    bounds = sorted(blocks)
    assert bounds[0][0] == 0 and bounds[-1][1] == 23
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


def test_an_error_in_a_block_reaches_the_caller():
    def kernel(lo, hi):
        if lo > 0:
            raise ValueError("bad block")

    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one core")
    old = numba.get_num_threads()
    numba.set_num_threads(2)
    try:
        with pytest.raises(ValueError, match="bad block"):
            _threads.parallel_range(kernel, 10)
    finally:
        numba.set_num_threads(old)
