"""Speed, memory and quality of ``mgaussian reconstruct`` with its defaults, case by case, in one
table (issue 17): PSNR against the ground truth (real data: leave-one-out NCC is
``bench_motion.py``'s; here the real case reports its wall time and memory only), wall time of the
whole command, peak resident memory of the command's process, and the stage breakdown from the
``OUT.config.json`` it writes.

    python benchmarks/bench_speed.py [--cases sb25-t3.2,sb25-t3.2-motion,mni-t4,mni-t4-motion,real]
        [--workdir DIR] [--extra-args "--threads 2"] [--json]

Run it alone on the machine: a second job beside it doubles the times. Cases are simulated once in
the work folder and reused (see bench_reconstruct.py and bench_motion.py for their definitions).
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
sys.path.insert(0, HERE)

from bench_motion import real_runs, simulate_motion_case  # noqa: E402
from bench_reconstruct import _cli, evaluate, simulate_case  # noqa: E402

CASES = ["sb25-t3.2", "sb25-t3.2-motion", "mni-t4", "mni-t4-motion", "real"]
# the stages of OUT.config.json's timings, in the order they run
STAGES = ["register_s", "prepare_s", "profile_s", "level1_warm_start_s", "level1_motion_weights_s", "level1_refine_s",
          "level2_warm_start_s", "level2_motion_weights_s", "level2_refine_s", "render_volume_s"]


def run_measured(cmd: list[str]) -> tuple[float, float, int]:
    """Run ``cmd``; (wall s, peak resident memory GB of its process, exit code). The peak is the
    child's own (``wait4``), not the largest of all children so far."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    err = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        sys.stderr.write(err[-2000:])
    return wall, usage.ru_maxrss / 1024 ** 2, proc.returncode  # ru_maxrss is in KiB on Linux


def case_inputs(name: str, workdir: str) -> dict:
    if name == "real":
        pairs = real_runs()
        return {"stacks": [p[0] for p in pairs], "masks": [p[1] for p in pairs], "thickness": None,
                "extra": ["--output-resolution", "0.8"], "gt": None}
    c = simulate_motion_case(name, workdir) if name.endswith("-motion") else simulate_case(name, workdir)
    return {**c, "extra": ["--thicknesses", str(c["thickness"])]}


def measure(name: str, workdir: str, extra: list[str]) -> dict:
    c = case_inputs(name, workdir)
    out = os.path.join(workdir, f"{name}_speed.nii.gz")
    cmd = _cli("reconstruct", "--input-stacks", *c["stacks"], "--stack-masks", *c["masks"], "--output-volume", out,
               "--quiet", "--no-report", *c["extra"], *extra)
    wall, rss, rc = run_measured(cmd)
    row = {"case": name, "wall_s": wall, "peak_rss_gb": rss, "rc": rc}
    if rc != 0:
        return row
    meta = json.load(open(out[: -len(".nii.gz")] + ".config.json"))
    row["stages"] = {k: v for k, v in meta["timings_s"].items() if k.endswith("_s")}
    row["budget_cut"] = meta.get("time_budget_cut", [])
    if c.get("gt"):
        row["psnr"] = evaluate(out, c)["psnr"]
    return row


def _fmt_row(r: dict) -> str:
    st = r.get("stages", {})
    cells = [r["case"], f"{r['psnr']:.2f}" if "psnr" in r else "-", f"{r['wall_s']:.1f}", f"{r['peak_rss_gb']:.2f}"]
    cells += [f"{st[k]:.1f}" if k in st else "-" for k in STAGES]
    return "| " + " | ".join(cells) + " |"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--workdir", default=os.path.join(HERE, "_work"))
    ap.add_argument("--extra-args", default="", help="more options for mgaussian reconstruct")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    os.makedirs(a.workdir, exist_ok=True)
    rows = [measure(n, a.workdir, shlex.split(a.extra_args)) for n in a.cases.split(",") if n]
    print("| case | PSNR dB | wall s | peak RSS GiB | " + " | ".join(s[:-2] for s in STAGES) + " |")
    print("|" + "---|" * (4 + len(STAGES)))
    for r in rows:
        print(_fmt_row(r))
    for r in rows:
        if r.get("budget_cut"):
            print(f"{r['case']}: the time budget cut {', '.join(r['budget_cut'])}")
        if r["rc"] != 0:
            print(f"{r['case']}: mgaussian reconstruct exited with {r['rc']}")
    if a.json:
        for r in rows:
            print(json.dumps(r))
    return 1 if any(r["rc"] != 0 for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
