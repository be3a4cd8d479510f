"""Ablation of the method's components on sb25-t3.2 (as Table 2 of the M-Gaussian paper).

Each row is one ``mgaussian reconstruct`` run on the same simulated stacks (see
bench_reconstruct.py, whose simulation step this reuses), with one component switched off:

    full            (no flag)
    no-ssim         --no-ssim          drop the SSIM loss
    no-growth       --no-growth        train the finest Gaussian grid only
    no-nrf          --no-nrf           drop the neural residual field
    no-anisotropy   --no-anisotropy    drop the anisotropy penalty
    no-psf          --no-psf           point evaluation instead of the slice PSF
    points-r3       --block-radius 3   the seed's block-query renderer (slow)
    points-r5       --block-radius 5   the same with a larger block (slower)

For each: PSNR, SSIM (``mgaussian evaluate``), wall clock, and the difference to ``full``.

    python benchmarks/ablation.py [--case sb25-t3.2] [--skip points-r3,points-r5]
        [--only full,no-ssim] [--quick] [--extra-args "--threads 2"] [--timeout 1800] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_reconstruct import REPO, evaluate, run_reconstruct, simulate_case  # noqa: E402

ROWS = [
    ("full", []),
    ("no-ssim", ["--no-ssim"]),
    ("no-growth", ["--no-growth"]),
    ("no-nrf", ["--no-nrf"]),
    ("no-anisotropy", ["--no-anisotropy"]),
    ("no-psf", ["--no-psf"]),
    ("points-r3", ["--block-radius", "3"]),
    ("points-r5", ["--block-radius", "5"]),
]


def format_table(rows) -> str:
    full = next((r for r in rows if r["row"] == "full" and "error" not in r), None)
    hdr = f"{'row':<14} {'flags':<20} {'PSNR':>7} {'SSIM':>7} {'dPSNR':>7} {'dSSIM':>8} {'wall s':>8}"
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        flags = " ".join(r["flags"]) or "-"
        if "error" in r:
            out.append(f"{r['row']:<14} {flags:<20} failed: {r['error'][:200]}")
            continue
        if full is not None:
            dp = f"{r['psnr'] - full['psnr']:+7.2f}"
            ds = f"{r['ssim'] - full['ssim']:+8.4f}"
        else:
            dp, ds = f"{'':>7}", f"{'':>8}"
        out.append(f"{r['row']:<14} {flags:<20} {r['psnr']:7.2f} {r['ssim']:7.4f} {dp} {ds} {r['wall_s']:8.1f}")
    return "\n".join(out)


def main(argv=None) -> int:
    names = [n for n, _ in ROWS]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--case", default="sb25-t3.2", help="a case of bench_reconstruct.py")
    ap.add_argument("--skip", default="", help="comma-separated rows to skip: " + ", ".join(names))
    ap.add_argument("--quick", action="store_true", help="only the rows full and no-psf (a check of the plumbing)")
    ap.add_argument("--only", default="", help="comma-separated rows to run (default: all)")
    ap.add_argument("--workdir", default=os.path.join(REPO, "bench_out", "reconstruct"))
    ap.add_argument("--extra-args", default="", help="extra arguments for every `mgaussian reconstruct` run, one string (a single flag: --extra-args=--no-nrf)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds allowed per run (a slower run is a failed row)")
    ap.add_argument("--json", action="store_true", help="also print one JSON line per row")
    a = ap.parse_args(argv)
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    only = {s.strip() for s in a.only.split(",") if s.strip()}
    if a.quick:
        only = {"full", "no-psf"}
    bad = (skip | only) - set(names)
    if bad:
        ap.error(f"unknown row(s) {sorted(bad)}; rows: {', '.join(names)}")
    rows_todo = [(n, f) for n, f in ROWS if n not in skip and (not only or n in only)]
    extra = shlex.split(a.extra_args)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    case = simulate_case(a.case, a.workdir, log=log)
    outdir = os.path.join(case["dir"], "ablation")
    os.makedirs(outdir, exist_ok=True)
    rows = []
    for name, flags in rows_todo:
        out = os.path.join(outdir, f"{name}.nii.gz")
        row = {"case": a.case, "row": name, "flags": flags + extra}
        try:
            wall = run_reconstruct(case, out, flags + extra, timeout=a.timeout)
            row.update(evaluate(out, case))
            row["wall_s"] = round(wall, 2)
        except Exception as exc:
            row["error"] = str(exc)
        rows.append(row)
        log(f"[{a.case}] {name}: " + (row["error"] if "error" in row else
                                      f"PSNR {row['psnr']:.2f} SSIM {row['ssim']:.4f} in {row['wall_s']:.1f} s"))
        if a.json:
            print(json.dumps(row), flush=True)
    print(format_table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
