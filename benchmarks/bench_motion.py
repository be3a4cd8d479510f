"""Motion benchmark (issue 5): the public motion cases and the real MIALSRTK stacks.

* ``sb25-t3.2-motion``: GA25 fetal atlas, 0.8 / 3.2 mm, per-slice motion 3 deg / 1.5 mm, 2 % noise;
* ``mni-t4-motion``: MNI152 T1, 1 / 4 mm, 3 deg / 2 mm, 2 % noise;
* ``real-loo-runN``: ``data/mialsrtk_sub01`` runs 1, 3, 5 (3 mm slices, manual masks): reconstruct
  from two runs at 0.8 mm, predict the third, scored by ``mgaussian evaluate --heldout-stack``
  (NCC and gain/offset-matched PSNR inside its mask);
* ``real-all``: all three runs at 0.8 mm (wall time only: no ground truth).

Simulated cases are scored by ``mgaussian evaluate`` against the ground truth beside the naive
average. Bars (issue 5): sb25 motion >= 30 dB in <= 240 s, mni motion >= 29 dB in <= 360 s, real
leave-one-out NCC >= 0.80 for each held-out run.

    python benchmarks/bench_motion.py [--cases sb25-t3.2-motion,mni-t4-motion,real-loo,real-all]
        [--workdir DIR] [--extra-args "..."] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reconstruct import REPO, _cli, _run, case_defs, data_dir, evaluate, run_naive, run_reconstruct  # noqa: E402

MOTION = {"sb25-t3.2-motion": ("sb25-t3.2", 3.0, 1.5), "mni-t4-motion": ("mni-t4", 3.0, 2.0)}
CASES = ["sb25-t3.2-motion", "mni-t4-motion", "real-loo", "real-all"]


def simulate_motion_case(name: str, workdir: str, log=print) -> dict:
    base, rot, tr = MOTION[name]
    c = dict(case_defs()[base])
    d = os.path.join(workdir, name)
    os.makedirs(d, exist_ok=True)
    if c["mask"] is None:
        import nibabel as nib
        import numpy as np

        mp = os.path.join(d, "gt_mask.nii.gz")
        if not os.path.exists(mp):
            img = nib.load(c["gt"])
            nib.save(nib.Nifti1Image((np.asarray(img.dataobj) > 0).astype(np.uint8), img.affine), mp)
        c["mask"] = mp
    sim = os.path.join(d, "stacks")
    stacks = [os.path.join(sim, f"stack_{i:02d}.nii.gz") for i in range(3)]
    masks = [os.path.join(sim, f"mask_{i:02d}.nii.gz") for i in range(3)]
    if not all(map(os.path.exists, stacks + masks)):
        t0 = time.time()
        _run(_cli("simulate", c["gt"], "--mask", c["mask"], "--thickness", c["thickness"], "--pixel", c["pixel"],
                  "--profile", c["profile"], "--motion-rotation", rot, "--motion-translation", tr, "--noise", 0.02,
                  "--seed", 1, "--output-dir", sim))
        log(f"[{name}] simulated in {time.time() - t0:.1f} s")
    c.update(stacks=stacks, masks=masks, dir=d, name=name)
    return c


def real_runs() -> list[tuple[str, str]]:
    r = os.path.join(data_dir(), "mialsrtk_sub01")
    return [(os.path.join(r, "anat", f"sub-01_run-{k}_T2w.nii.gz"),
             os.path.join(r, "masks", f"sub-01_run-{k}_T2w_desc-brain_mask.nii.gz")) for k in (1, 3, 5)]


def reconstruct_real(pairs, out, extra, timeout=None) -> float:
    cmd = _cli("reconstruct", "--input-stacks", *[p[0] for p in pairs], "--stack-masks", *[p[1] for p in pairs],
               "--output-resolution", 0.8, "--output-volume", out, "--quiet", "--no-report", *extra)
    t0 = time.time()
    _run(cmd, timeout=timeout)
    return time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--workdir", default=os.path.join(REPO, "bench_out", "motion"))
    ap.add_argument("--extra-args", default="", help="extra arguments for `mgaussian reconstruct` (one string)")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    extra = shlex.split(a.extra_args)
    os.makedirs(a.workdir, exist_ok=True)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    rows = []

    def add(row):
        rows.append(row)
        log(json.dumps(row))
        if a.json:
            print(json.dumps(row), flush=True)

    for name in [c.strip() for c in a.cases.split(",") if c.strip()]:
        try:
            if name in MOTION:
                case = simulate_motion_case(name, a.workdir, log)
                for method in ("mgaussian", "naive"):
                    out = os.path.join(case["dir"], f"{method}.nii.gz")
                    wall = run_reconstruct(case, out, [*extra, "--no-report"], timeout=a.timeout) if method == "mgaussian" \
                        else run_naive(case, out)
                    add({"case": name, "method": method, **evaluate(out, case), "wall_s": round(wall, 1)})
            elif name == "real-loo":
                runs = real_runs()
                for k in range(3):
                    out = os.path.join(a.workdir, f"real_without_run{2 * k + 1}.nii.gz")
                    wall = reconstruct_real([p for i, p in enumerate(runs) if i != k], out, extra, a.timeout)
                    res = _run(_cli("evaluate", out, "--heldout-stack", runs[k][0], "--stack-mask", runs[k][1], "--json"))
                    sc = json.loads([ln for ln in res.stdout.splitlines() if ln.startswith("{")][-1])
                    add({"case": f"real-loo-run{2 * k + 1}", "method": "mgaussian", **sc, "wall_s": round(wall, 1)})
            elif name == "real-all":
                out = os.path.join(a.workdir, "real_all.nii.gz")
                wall = reconstruct_real(real_runs(), out, extra, a.timeout)
                add({"case": "real-all", "method": "mgaussian", "wall_s": round(wall, 1), "volume": out})
            else:
                raise SystemExit(f"unknown case {name!r}")
        except RuntimeError as exc:
            add({"case": name, "method": "mgaussian", "error": str(exc)})
    hdr = f"{'case':<18} {'method':<10} {'PSNR':>7} {'SSIM':>7} {'NCC':>7} {'wall s':>7}"
    print(hdr + "\n" + "-" * len(hdr))
    for r in rows:
        if "error" in r:
            print(f"{r['case']:<18} {r['method']:<10} failed: {r['error'][:150]}")
            continue
        f = lambda k, w=7, p=2: f"{r[k]:{w}.{p}f}" if isinstance(r.get(k), (int, float)) else " " * (w - 1) + "-"  # noqa: E731
        print(f"{r['case']:<18} {r['method']:<10} {f('psnr')} {f('ssim', 7, 4)} {f('ncc', 7, 4)} {f('wall_s', 7, 1)}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
