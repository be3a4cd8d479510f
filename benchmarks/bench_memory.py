"""Peak memory of ``mgaussian reconstruct`` against ``mgaussian.recon.memory``'s estimate.

Each case is a short reconstruction (few iterations: the peak is reached in the warm start and
the first Adam steps of the finest level) in its own process; its peak RSS is read with
``resource.getrusage(RUSAGE_CHILDREN)`` from a wrapper process that runs only it.

    python benchmarks/bench_memory.py --data DIR   # DIR/<case>/stack_XX.nii.gz, mask_XX.nii.gz
    python benchmarks/bench_memory.py --data DIR --fit   # also least-squares coefficients

Cases are made with ``mgaussian simulate`` (see benchmarks/MEMORY.md). Prints one table:
case, Gaussians (estimated / actual), pixels, estimated GB, measured peak GB.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

GB = 1024**3
CONFIG = {"iterations": [0, 5], "cg_iterations": 3}

# (case name, data sub-folder, output resolution in mm)
CASES = [
    ("sb25-t3.2 @1.4", "sb25", 1.4),
    ("sb25-t3.2 @1.0", "sb25", 1.0),
    ("sb25-t3.2 @0.8", "sb25", 0.8),
    ("sb25-t1.6 @0.8", "sb25t16", 0.8),
    ("sb25-t3.2 @0.6", "sb25", 0.6),
    ("mni-t4 @1.0", "mni", 1.0),
    ("mni-t4-motion @1.0", "mnimotion", 1.0),
]

_WRAP = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
         "sys.stderr.write(r.stderr); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")


def measure(stacks, masks, res, workdir):
    cfg = os.path.join(workdir, "cfg.json")
    with open(cfg, "w") as f:
        json.dump(CONFIG, f)
    out = os.path.join(workdir, "out.nii.gz")
    cmd = [sys.executable, "-m", "mgaussian", "reconstruct", "--input-stacks", *stacks, "--stack-masks", *masks,
           "--output-volume", out, "--output-resolution", str(res), "--config", cfg, "--max-memory", "1000"]
    r = subprocess.run([sys.executable, "-c", _WRAP, *cmd], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"reconstruct failed:\n{r.stderr}")
    peak = int(r.stdout.strip().splitlines()[-1]) * 1024  # ru_maxrss is in KiB on Linux
    n = [int(x) for x in re.findall(r"(\d+) Gaussians at", r.stderr)]
    grid = re.search(r"output grid \((\d+), (\d+), (\d+)\)", r.stderr)
    shape = tuple(int(g) for g in grid.groups()) if grid else None
    return peak, (n[-1] if n else None), shape


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding one sub-folder of simulated stacks per case")
    ap.add_argument("--cases", nargs="*", help="case names to run (default: all)")
    ap.add_argument("--fit", action="store_true", help="least-squares coefficients from the measurements")
    a = ap.parse_args()

    from mgaussian.io import load_stacks
    from mgaussian.recon.config import ReconConfig
    from mgaussian.recon.data import grow_masks, output_grid
    from mgaussian.recon.memory import COEFFS, estimate_peak_bytes, run_sizes

    rows = []
    print(f"{'case':<18} {'Gaussians est/actual':>22} {'pixels (masked/rendered)':>26} {'out voxels':>11} "
          f"{'est GB':>7} {'peak GB':>8}")
    for name, sub, res in CASES:
        if a.cases and name not in a.cases:
            continue
        d = os.path.join(a.data, sub)
        stacks = sorted(glob.glob(os.path.join(d, "stack_*.nii.gz")))
        masks = sorted(glob.glob(os.path.join(d, "mask_*.nii.gz")))
        loaded = grow_masks(load_stacks(stacks, masks), ReconConfig().mask_rim_mm)  # the masks the fit sees
        shape, _ = output_grid(loaded, res)
        sz = run_sizes(loaded, res, output_shape=shape)
        est = estimate_peak_bytes(
            sz.n_gaussians, sz.rendered_pixels, sz.output_voxels, sz.stack_voxels, written_voxels=sz.written_voxels
        )
        with tempfile.TemporaryDirectory() as w:
            peak, n_actual, _ = measure(stacks, masks, res, w)
        rows.append((sz, n_actual, peak))
        print(f"{name:<18} {sz.n_gaussians:>11}/{n_actual or 0:<10} {sz.masked_pixels:>12}/{sz.rendered_pixels:<13} "
              f"{sz.output_voxels:>11} {est / GB:>7.2f} {peak / GB:>8.2f}", flush=True)
    if a.fit and len(rows) >= 3:
        # peak - base - stacks = g * Gaussians + p * pixels + v * voxels (actual Gaussian counts)
        X = np.array([[n or s.n_gaussians, s.rendered_pixels, s.output_voxels] for s, n, _ in rows], float)
        y = np.array([pk - COEFFS["base"] - COEFFS["per_stack_voxel"] * s.stack_voxels for s, _, pk in rows])
        coef, *_ = np.linalg.lstsq(X, y, rcond=None)
        print("fit (bytes): per_gaussian %.0f, per_pixel %.0f, per_output_voxel %.0f" % tuple(coef))


if __name__ == "__main__":
    main()
