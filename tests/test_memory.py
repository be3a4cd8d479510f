"""The memory bound of ``reconstruct``: the estimate grows with the run, and a run over
``--max-memory`` is refused up front (one line, exit 2, nothing written)."""

import os

import numpy as np

from mgaussian.cli import main
from mgaussian.recon.memory import GB, estimate_peak_bytes


def test_estimate_is_monotone():
    a = estimate_peak_bytes(1e5, 1e5, 1e6, 1e6)
    assert estimate_peak_bytes(2e5, 1e5, 1e6, 1e6) > a
    assert estimate_peak_bytes(1e5, 2e5, 1e6, 1e6) > a
    assert 0.5 * GB < a < 4 * GB


def test_refused_over_max_memory(small_case, tmp_path, capsys):
    out = tmp_path / "v.nii.gz"
    before = sorted(os.listdir(tmp_path))
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *small_case["stacks"],
            "--stack-masks",
            *small_case["masks"],
            "--output-volume",
            str(out),
            "--max-memory",
            "0.001",
            "--output-resolution",
            "1.5",
            "--log",
            str(tmp_path / "r.log"),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith("error: --max-memory: this run needs about ")
    assert "Gaussians at 1.5 mm" in line and "slice pixels" in line and "above the 0.001 GB limit" in line
    assert "raise --max-memory" in line
    assert sorted(os.listdir(tmp_path)) == before  # no volume, no log


def test_suggested_resolution_fits(small_case):
    from mgaussian.io import load_stacks
    from mgaussian.recon.memory import estimate_for, run_sizes, suggest_resolution

    st = load_stacks(small_case["stacks"], small_case["masks"])
    fine = estimate_for(run_sizes(st, 0.5))
    limit = 0.5 * (fine + estimate_for(run_sizes(st, 3.0)))
    r = suggest_resolution(st, 0.5, limit)
    assert r is not None and r > 0.5
    assert estimate_for(run_sizes(st, r)) <= limit
    assert np.isclose(r * 10, round(r * 10))
