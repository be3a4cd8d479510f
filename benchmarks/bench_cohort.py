"""Throughput of ``mgaussian bids`` on a simulated cohort, on 1 and 2 Dask workers, and what the
App adds per subject to ``mgaussian reconstruct`` run alone.

A BIDS dataset of N subjects is simulated (a small synthetic phantom, three orthogonal stacks
each, a different seed per subject, masks in derivatives/masks, SliceThickness in sidecars).
Then, for each worker count W (each subject's reconstruction gets CPUs / W threads):

* ``alone``: ``mgaussian reconstruct`` on one subject with the same settings and threads, timed
  from process start to exit (the median of a few runs, after one untimed warm-up that fills
  Numba's cache);
* ``mgaussian bids DS OUT participant --workers W``, timed from start to exit (cluster start,
  every subject, thumbnails, summary, cluster stop), into a fresh OUT.

Columns: workers, threads per subject, subjects, wall time, throughput (subjects/min), reconstruct
alone (s), reconstruct in the App (the mean of the subjects' ``wall_s`` in summary.tsv: the
child process of each task, with its checkpoints), and the overhead per subject,
``W x wall / N - alone``: the worker-seconds each subject costs beyond its reconstruction run
alone (0 for a free, perfectly parallel App).

    python benchmarks/bench_cohort.py --subjects 4 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIG = {"iterations": [0, 10], "cg_iterations": 10, "time_budget_s": 120}


def _phantom(n: int, spacing: float, seed: int):
    rng = np.random.default_rng(seed)
    ii = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1).astype(float)
    c0 = (n - 1) / 2
    brain = (((ii - c0) / (n * 0.36)) ** 2).sum(-1) < 1
    g = np.where(brain, 40.0, 0.0)
    for _ in range(8):
        c = c0 + rng.uniform(-n / 4, n / 4, 3)
        g += rng.uniform(20, 60) * np.exp(-((ii - c) ** 2).sum(-1) / (2 * rng.uniform(1.5, 3.5) ** 2)) * brain
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = -c0 * spacing
    return g.astype(np.float32), aff, brain


def make_cohort(root: str, n_subjects: int, size: int, spacing: float, thickness: float) -> None:
    from mgaussian.simulate import simulate_stacks

    os.makedirs(root)
    with open(os.path.join(root, "dataset_description.json"), "w") as f:
        json.dump({"Name": f"simulated cohort of {n_subjects}", "BIDSVersion": "1.9.0"}, f)
    for s in range(1, n_subjects + 1):
        g, aff, m = _phantom(size, spacing, seed=s)
        tmp = os.path.join(root, "..", f"sim{s}")
        simulate_stacks(g, aff, m, tmp, thickness=thickness, pixel=spacing, motion_rotation=2.0,
                        motion_translation=1.0, noise=0.01, seed=s, log=lambda x: None)
        anat = os.path.join(root, f"sub-{s:02d}", "anat")
        manat = os.path.join(root, "derivatives", "masks", f"sub-{s:02d}", "anat")
        os.makedirs(anat)
        os.makedirs(manat)
        for r in range(3):
            e = f"sub-{s:02d}_run-{r + 1}"
            shutil.copy(os.path.join(tmp, f"stack_{r:02d}.nii.gz"), os.path.join(anat, f"{e}_T2w.nii.gz"))
            with open(os.path.join(anat, f"{e}_T2w.json"), "w") as f:
                json.dump({"SliceThickness": thickness}, f)
            shutil.copy(os.path.join(tmp, f"mask_{r:02d}.nii.gz"), os.path.join(manat, f"{e}_desc-brain_mask.nii.gz"))
        shutil.rmtree(tmp)


def _run(cmd) -> float:
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stdout}\n{r.stderr}")
    return wall


def alone(ds: str, work: str, cfg: str, threads: int, extra: list[str], repeats: int) -> float:
    anat = os.path.join(ds, "sub-01", "anat")
    manat = os.path.join(ds, "derivatives", "masks", "sub-01", "anat")
    cmd = [sys.executable, "-m", "mgaussian", "reconstruct",
           "--input-stacks", *[os.path.join(anat, f"sub-01_run-{r}_T2w.nii.gz") for r in (1, 2, 3)],
           "--stack-masks", *[os.path.join(manat, f"sub-01_run-{r}_desc-brain_mask.nii.gz") for r in (1, 2, 3)],
           "--output-volume", os.path.join(work, "alone.nii.gz"), "--config", cfg, "--threads", str(threads),
           "--quiet", *extra]
    return statistics.median(_run(cmd) for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", type=int, default=4)
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    ap.add_argument("--size", type=int, default=28, help="phantom voxels per side")
    ap.add_argument("--spacing", type=float, default=2.0, help="phantom voxel size (mm)")
    ap.add_argument("--thickness", type=float, default=4.0, help="slice thickness of the stacks (mm)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of reconstruct alone (median)")
    ap.add_argument("--workdir", help="keep the data and outputs here (default: a temporary folder)")
    a = ap.parse_args()
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    work = a.workdir or tempfile.mkdtemp(prefix="bench_cohort_")
    os.makedirs(work, exist_ok=True)
    ds = os.path.join(work, "ds")
    if os.path.exists(ds):
        shutil.rmtree(ds)
    make_cohort(ds, a.subjects, a.size, a.spacing, a.thickness)
    cfg = os.path.join(work, "cfg.json")
    with open(cfg, "w") as f:
        json.dump(CONFIG, f)
    extra = ["--output-resolution", f"{a.spacing:g}"]
    alone(ds, work, cfg, cpus, extra, 1)  # warm-up: Numba compiles its kernels into its cache once
    rows = []
    for w in [int(x) for x in a.workers.split(",")]:
        threads = max(1, cpus // w)
        t_alone = alone(ds, work, cfg, threads, extra, a.repeats)
        out = os.path.join(work, f"out_w{w}")
        shutil.rmtree(out, ignore_errors=True)
        wall = _run([sys.executable, "-m", "mgaussian", "bids", ds, out, "participant", "--workers", str(w),
                     "--threads-per-worker", str(threads), "--config", cfg, *extra])
        with open(os.path.join(out, "mgaussian", "summary.tsv")) as f:
            lines = [ln.rstrip("\n").split("\t") for ln in f]
        col = lines[0].index("wall_s")
        in_app = statistics.mean(float(r[col]) for r in lines[1:])
        rows.append((w, threads, a.subjects, wall, a.subjects / wall * 60, t_alone, in_app,
                     w * wall / a.subjects - t_alone))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"# {a.subjects} subjects: {a.size}^3 phantom at {a.spacing:g} mm, 3 stacks of {a.thickness:g} mm slices "
          f"with motion and 1 % noise; reconstruct settings {json.dumps(CONFIG)} {' '.join(extra)}; "
          f"{cpus} CPUs, load average {load:.1f} at the end")
    print("| workers | threads/subject | subjects | wall (s) | subjects/min | reconstruct alone (s) | "
          "reconstruct in the App (s) | overhead/subject (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for w, th, n, wall, thr, t1, t_app, ov in rows:
        print(f"| {w} | {th} | {n} | {wall:.1f} | {thr:.1f} | {t1:.1f} | {t_app:.1f} | {ov:+.1f} |")


if __name__ == "__main__":
    main()
