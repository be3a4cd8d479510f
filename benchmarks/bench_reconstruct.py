"""End-to-end benchmark of ``mgaussian reconstruct`` against the two classical references.

Cases (BENCHMARK.md, clean: no motion, no noise; three orthogonal stacks):

* ``mni-t4``: MNI152 2009a T1 (mask = GT > 0), 1 mm pixels, 4 mm slices;
* ``sb25-t3.2``: GA25 fetal atlas ``srr`` with its ``mask``, 0.8 mm pixels, 3.2 mm slices;
* ``sb25-t3.2-box``: the same with a rectangular through-plane profile (no inverse crime).

Each case is simulated once with ``mgaussian simulate`` (kept in the work folder and reused),
then for each method the volume is written and scored by ``mgaussian evaluate --json``:

* ``mgaussian``: ``mgaussian reconstruct ... --quiet`` (+ ``--extra-args``), wall clock of the
  whole subprocess (start-up and I/O included);
* ``naive``: :func:`mgaussian.baselines.naive_average` on the ground truth's grid;
* ``lsq``: :func:`mgaussian.baselines.lsq_superresolution` (lambda 0.02, 40 CG iterations,
  the case's slice profile) on ``mgaussian.recon.data.output_grid(stacks, pixel)``.

    python benchmarks/bench_reconstruct.py [--quick] [--cases mni-t4,sb25-t3.2,sb25-t3.2-box]
        [--methods mgaussian,naive,lsq] [--workdir DIR] [--extra-args "--threads 2"] [--json]

Data: ``$MGAUSSIAN_DATA`` or ``../shared/data`` relative to the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def data_dir() -> str:
    return os.environ.get("MGAUSSIAN_DATA") or os.path.normpath(os.path.join(REPO, "..", "shared", "data"))


def case_defs() -> dict:
    d = data_dir()
    mni = os.path.join(d, "mni152", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    sb = os.path.join(d, "fetal_sb_atlas_ga25")
    sb_case = {"gt": os.path.join(sb, "srr.nii.gz"), "mask": os.path.join(sb, "mask.nii.gz"),
               "pixel": 0.8, "thickness": 3.2}
    return {
        "mni-t4": {"gt": mni, "mask": None, "pixel": 1.0, "thickness": 4.0, "profile": "gaussian"},
        "sb25-t3.2": dict(sb_case, profile="gaussian"),
        "sb25-t3.2-box": dict(sb_case, profile="box"),
    }


DEFAULT_CASES = ["mni-t4", "sb25-t3.2", "sb25-t3.2-box"]
QUICK_CASES = ["sb25-t3.2"]
METHODS = ["mgaussian", "naive", "lsq"]


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "mgaussian", *[str(a) for a in args]]


def _run(cmd, *, timeout=None, capture=True) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run(cmd, capture_output=capture, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"mgaussian {cmd[3]}: timed out after {timeout:g} s") from None
    if res.returncode != 0:
        err = (res.stderr or "").strip().splitlines()
        how = f"killed by signal {-res.returncode}" if res.returncode < 0 else f"exit {res.returncode}"
        raise RuntimeError(f"mgaussian {cmd[3]}: {how}: " + (err[-1] if err else "(no stderr)"))
    return res


def simulate_case(name: str, workdir: str, *, force: bool = False, log=print) -> dict:
    """Simulate a case's three stacks (reused if already there with the same settings).

    Returns dict: gt, mask (a file: written for mni as GT > 0), stacks, masks, thickness,
    pixel, profile, dir.
    """
    defs = case_defs()
    if name not in defs:
        raise SystemExit(f"unknown case {name!r} (one of {', '.join(defs)})")
    c = dict(defs[name])
    if not os.path.exists(c["gt"]):
        raise SystemExit(f"ground truth not found: {c['gt']} (set MGAUSSIAN_DATA)")
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    if c["mask"] is None:  # mask = GT > 0, as a file for `mgaussian evaluate`
        mp = os.path.join(d, "gt_mask.nii.gz")
        if force or not os.path.exists(mp):
            import nibabel as nib
            import numpy as np

            img = nib.load(c["gt"])
            m = (np.asarray(img.get_fdata(dtype=np.float32)) > 0).astype(np.uint8)
            out = nib.Nifti1Image(m, img.affine)
            out.set_qform(img.affine, code=1)
            out.set_sform(img.affine, code=1)
            nib.save(out, mp)
        c["mask"] = mp
    sim = os.path.join(d, "stacks")
    stacks = [os.path.join(sim, f"stack_{i:02d}.nii.gz") for i in range(3)]
    masks = [os.path.join(sim, f"mask_{i:02d}.nii.gz") for i in range(3)]
    truth = os.path.join(sim, "truth.json")
    fresh = False
    if not force and os.path.exists(truth) and all(map(os.path.exists, stacks + masks)):
        try:
            s = json.load(open(truth))["settings"]
            fresh = (abs(s["thickness_mm"] - c["thickness"]) < 1e-9 and s["profile"] == c["profile"]
                     and abs(s["pixel_mm"] - c["pixel"]) < 1e-9 and s["noise"] == 0
                     and s["motion_rotation_deg"] == 0 and s["motion_translation_mm"] == 0)
        except Exception:
            fresh = False
    if not fresh:
        t0 = time.time()
        _run(_cli("simulate", c["gt"], "--mask", c["mask"], "--thickness", c["thickness"],
                  "--pixel", c["pixel"], "--profile", c["profile"], "--output-dir", sim))
        log(f"[{name}] simulated 3 stacks in {time.time() - t0:.1f} s -> {sim}")
    c.update(stacks=stacks, masks=masks, dir=d, name=name)
    return c


def evaluate(recon: str, case: dict) -> dict:
    """Scores of a volume by ``mgaussian evaluate --json`` (BENCHMARK.md metrics)."""
    res = _run(_cli("evaluate", recon, "--reference", case["gt"], "--mask", case["mask"], "--json"))
    lines = [ln for ln in res.stdout.strip().splitlines() if ln.strip().startswith("{")]
    return json.loads(lines[-1])


def run_reconstruct(case: dict, out: str, extra_args=(), *, timeout=None) -> float:
    """``mgaussian reconstruct`` on the case's stacks; returns the wall clock (s)."""
    cmd = _cli("reconstruct", "--input-stacks", *case["stacks"], "--stack-masks", *case["masks"],
               "--thicknesses", case["thickness"], "--output-volume", out, "--quiet", *extra_args)
    t0 = time.time()
    _run(cmd, timeout=timeout)
    return time.time() - t0


def run_naive(case: dict, out: str) -> float:
    from mgaussian.baselines import naive_average
    from mgaussian.io import load_image, load_stacks, save_nifti

    t0 = time.time()
    stacks = load_stacks(case["stacks"], case["masks"], [case["thickness"]])
    _, gaff, img = load_image(case["gt"], what="reference")
    vol = naive_average([(s.data, s.affine) for s in stacks], img.shape[:3], gaff)
    wall = time.time() - t0
    save_nifti(vol, gaff, out)
    return wall


def run_lsq(case: dict, out: str, *, threads: int | None = 1, iterations: int = 40, lam: float = 0.02) -> float:
    from mgaussian.baselines import lsq_superresolution
    from mgaussian.io import load_stacks, save_nifti
    from mgaussian.recon.data import output_grid

    t0 = time.time()
    stacks = load_stacks(case["stacks"], case["masks"], [case["thickness"]])
    res = min(min(s.frames.spacing) for s in stacks)
    shape, aff = output_grid(stacks, res)
    vol = lsq_superresolution(stacks, shape, aff, lam=lam, iterations=iterations,
                              profile=case["profile"], threads=threads)
    wall = time.time() - t0
    save_nifti(vol, aff, out)
    return wall


def format_table(rows) -> str:
    hdr = f"{'case':<15} {'method':<10} {'PSNR':>7} {'SSIM':>7} {'NCC':>7} {'NRMSE':>7} {'wall s':>8}"
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:<15} {r['method']:<10} failed: {r['error'][:200]}")
            continue
        lines.append(f"{r['case']:<15} {r['method']:<10} {r['psnr']:7.2f} {r['ssim']:7.4f} {r['ncc']:7.4f} "
                     f"{r['nrmse']:7.4f} {r['wall_s']:8.1f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="comma-separated: " + ", ".join(DEFAULT_CASES))
    ap.add_argument("--quick", action="store_true", help="sb25-t3.2 only")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ", ".join(METHODS))
    ap.add_argument("--workdir", default=os.path.join(REPO, "bench_out", "reconstruct"))
    ap.add_argument("--extra-args", default="", help="extra arguments for `mgaussian reconstruct`, one string; a single flag needs the = form: --extra-args=--no-nrf")
    ap.add_argument("--lsq-threads", type=int, default=1,
                    help="torch threads for lsq (default 1: fastest on a busy 2-core machine; 0 = torch default)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per reconstruct run")
    ap.add_argument("--resimulate", action="store_true", help="simulate the stacks again even if present")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per row")
    a = ap.parse_args(argv)
    cases = QUICK_CASES if a.quick else [c.strip() for c in a.cases.split(",") if c.strip()]
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        ap.error(f"unknown method(s) {bad}")
    extra = shlex.split(a.extra_args)
    os.makedirs(a.workdir, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = []
    for name in cases:
        case = simulate_case(name, a.workdir, force=a.resimulate, log=log)
        for m in methods:
            out = os.path.join(case["dir"], f"{m}.nii.gz")
            row = {"case": name, "method": m}
            try:
                if m == "mgaussian":
                    wall = run_reconstruct(case, out, extra, timeout=a.timeout)
                    row["args"] = extra
                elif m == "naive":
                    wall = run_naive(case, out)
                else:
                    wall = run_lsq(case, out, threads=a.lsq_threads or None)
                row.update(evaluate(out, case))
                row["wall_s"] = round(wall, 2)
                row["volume"] = out
            except Exception as exc:  # keep benchmarking the others
                row["error"] = str(exc)
            rows.append(row)
            log(f"[{name}] {m}: " + (row["error"] if "error" in row else
                                     f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} in {row['wall_s']:.1f} s"))
            if a.json:
                print(json.dumps(row), flush=True)
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
