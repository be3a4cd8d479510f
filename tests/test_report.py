"""The HTML report of reconstruct: files, contents, and that it loads with its images in Chromium."""

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import pytest

from mgaussian.cli import main

QUICK = {"iterations": [0, 3], "cg_iterations": 3}


def _png_size(path):
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def _images(index_path):
    return re.findall(r'<img src="([^"]+)"', open(index_path).read())


def _chromium():
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail(
                "chromium is not installed (.ci/run installs Debian's chromium); the report's browser check cannot run"
            )
        pytest.skip("chromium not installed")
    return exe


def _images_ok_in_chromium(index_path):
    """(decoded, total) images of the page after its load event, as its inline script counts them."""
    exe = _chromium()
    with tempfile.TemporaryDirectory() as prof:
        r = subprocess.run(
            [
                exe,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                f"--user-data-dir={prof}",
                "--dump-dom",
                "file://" + os.path.abspath(index_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert "<h1>mgaussian reconstruction report</h1>" in r.stdout, (r.returncode, r.stderr[-2000:])
    m = re.search(r'<body[^>]*data-images-ok="(\d+)/(\d+)"', r.stdout)
    assert m, "the page's load script did not run: " + r.stdout[:500]
    return int(m.group(1)), int(m.group(2))


def test_cli_report_beside_the_volume_loads_in_a_browser(small_case, tmp_path, capsys):
    cfgp = tmp_path / "cfg.json"
    cfgp.write_text(json.dumps(QUICK))
    out = tmp_path / "rec.nii.gz"
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *small_case["stacks"],
            "--stack-masks",
            *small_case["masks"],
            "--output-volume",
            str(out),
            "--config",
            str(cfgp),
        ]
    )
    assert rc == 0
    err = capsys.readouterr().err
    rep = tmp_path / "rec_report"
    idx = rep / "index.html"
    assert idx.is_file() and f"wrote the report {idx}" in err
    secs = float(re.search(r"wrote the report .* in ([0-9.]+) s", err).group(1))
    assert secs < 30  # a few seconds on 2 shared cores
    imgs = _images(idx)
    assert {"orthogonal.png", "loss.png", "stack_01.png", "stack_02.png", "stack_03.png"} <= set(imgs)
    for name in imgs:
        w, h = _png_size(rep / name)
        assert w > 100 and h > 100
    assert not [f for f in os.listdir(rep) if f.startswith(".")]  # no temporary files left
    page = idx.read_text()
    assert "poses.png" in imgs or "No motion correction" in page  # pose traces, or why there are none
    for text in (
        "Resolved configuration",
        "through_plane_fwhm_factor",
        "cg_iterations",
        "Runtime",
        "train_s",
        "mgaussian version",
        "command line",
        "stack_00",
        "NCC",
    ):
        assert text in page, text
    # the stacks are simulated well by the model (NCC column of the scores table)
    nccs = [float(v) for v in re.findall(r"<td>([01]\.\d{4})</td><td>\d+\.\d\d</td></tr>", page)]
    assert len(nccs) == 3 and min(nccs) > 0.9, nccs
    # in a browser: the page loads and every image decodes
    ok, total = _images_ok_in_chromium(idx)
    assert ok == total == len(imgs), (ok, total, imgs)
    # ... and the check sees a broken image (a copy of the report with one PNG cut short)
    bad = tmp_path / "broken"
    shutil.copytree(rep, bad)
    (bad / "orthogonal.png").write_bytes((rep / "orthogonal.png").read_bytes()[:40])
    ok, total = _images_ok_in_chromium(bad / "index.html")
    assert total == len(imgs) and ok == total - 1


def test_report_with_motion_and_weights(small_case, tmp_path):
    """Pose history, moved and excluded slices get their figures (fed in by hand here)."""
    from mgaussian.io import load_stacks
    from mgaussian.recon.config import config_from_dict
    from mgaussian.recon.pipeline import reconstruct
    from mgaussian.report import write_report

    st = load_stacks(small_case["stacks"], small_case["masks"])
    res = reconstruct(st, config_from_dict(QUICK), progress=False, log=lambda s: None)
    rng = np.random.default_rng(0)
    poses = [
        dict(
            p,
            rotvec=(rng.normal(0, 0.01, (len(p["slices"]), 3))).tolist(),
            translation_mm=(rng.normal(0, 0.5, (len(p["slices"]), 3))).tolist(),
        )
        for p in res.poses
    ]
    weights = [
        dict(w, weight=rng.uniform(0, 1, len(w["slices"])).tolist(), excluded=[int(w["slices"][1])])
        for w in res.slice_weights
    ]
    ph = [
        {
            "step": s,
            "time_s": 0.1 * s,
            "stacks": [
                {
                    "stack": p["stack"],
                    "mean_translation_mm": 0.1 * s,
                    "mean_rotation_deg": 0.2 * s,
                    "mean_weight": 1 - 0.01 * s,
                }
                for p in poses
            ],
        }
        for s in (10, 20, 30)
    ]
    res = dataclasses.replace(res, poses=poses, slice_weights=weights, pose_history=ph)
    vol = tmp_path / "v.nii.gz"
    idx = write_report(tmp_path / "rep", res, st, str(vol), extra={"command": ["mgaussian", "reconstruct", "..."]})
    page = open(idx).read()
    imgs = _images(idx)
    assert {"poses.png", "slices.png"} <= set(imgs) and "No motion correction" not in page
    # every stack has an acquisition order (the simulator's sidecars, else the default): the poses
    # over acquisition time are drawn (issue 19)
    assert all(s.slice_order is not None for s in st) and "trajectory.png" in imgs
    for name in imgs:
        _png_size(tmp_path / "rep" / name)
    assert f"<td>{weights[0]['stack']}</td><td>{weights[0]['excluded'][0]}</td>" in page
    assert not vol.exists()  # the report never writes the volume


def test_report_option_errors(small_case, tmp_path, capsys):
    out = tmp_path / "o.nii.gz"
    base = ["reconstruct", "--input-stacks", *small_case["stacks"], "--output-volume", str(out)]
    afile = tmp_path / "afile"
    afile.write_text("x")
    for extra, what in (
        (["--output-report", str(afile)], "is not a folder"),
        (["--output-report", str(tmp_path / "no" / "such")], "does not exist"),
        (["--output-report", str(tmp_path / "r"), "--no-report"], "conflicts with --no-report"),
        (["--output-report", small_case["stacks"][0]], "not a folder"),
    ):
        rc = main(base + extra)
        e = capsys.readouterr().err.strip()
        assert rc == 2 and e.startswith("error: --output-report:") and what in e and "\n" not in e, e
    assert not out.exists() and not (tmp_path / "r").exists()


def test_pose_traces_follow_the_time_of_the_fit():
    """The pose rounds all run at step 0 (before the first Adam step): the report's pose traces run
    along the time into the fit, so the rounds are apart (without times, along the steps), and show
    the slices' motion about their stack's mean pose where the records hold it."""
    from mgaussian.report import _pose_traces

    ph = [
        {
            "step": 0,
            "time_s": t,
            "stacks": [
                {
                    "stack": "a",
                    "mean_translation_mm": 7.0,
                    "mean_rotation_deg": 20.0,
                    "slice_motion_mm": m,
                    "slice_motion_deg": 2 * m,
                    "mean_weight": None,
                }
            ],
        }
        for t, m in ((10.0, 1.0), (14.0, 1.5), (19.0, 1.6))
    ]
    traces, label, titles = _pose_traces(ph)
    xs, tr, ro, we = traces["a"]
    assert label == "time into the fit (s)" and xs == [10.0, 14.0, 19.0]
    assert tr == [1.0, 1.5, 1.6] and ro == [2.0, 3.0, 3.2] and all(np.isnan(we))
    assert "stack's mean pose" in titles[0]
    for rec in ph:  # an older record: no times, no motion between slices
        del rec["time_s"], rec["stacks"][0]["slice_motion_mm"]
    traces, label, titles = _pose_traces(ph)
    assert label == "step" and traces["a"][0] == [0, 0, 0] and traces["a"][1] == [7.0] * 3
    assert titles[0] == "mean |translation| (mm)"


def test_slice_motion_is_the_motion_between_slices():
    """A stack moved as one rigid body has no motion between its slices, however far it moved; one
    slice shifted by 1 mm stands out by about 1 mm (and shifts the stack's mean by 0.1 mm)."""
    from mgaussian.geometry import rotvec_to_matrix
    from mgaussian.recon.motion import slice_motion

    rng = np.random.default_rng(0)
    s = rng.normal(size=(10, 3)) * 20
    r0 = np.array([0.1, -0.05, 0.2])  # 13 deg
    c0, t0 = np.array([5.0, 3, -2]), np.array([3.0, -1, 2])
    u = (s - c0) @ rotvec_to_matrix(r0).T + c0 + t0 - s
    mm, deg = slice_motion(np.tile(r0, (10, 1)), u, s)
    assert mm.max() < 1e-9 and deg.max() < 1e-9
    u[3] += [1.0, 0, 0]
    mm, deg = slice_motion(np.tile(r0, (10, 1)), u, s)
    assert mm[3] == pytest.approx(0.9, abs=1e-9) and np.allclose(np.delete(mm, 3), 0.1) and deg.max() < 1e-9
    rot = np.tile(r0, (10, 1))
    rot[5] += [0.0, 0.0, np.radians(2.0)]  # one slice turned 2 deg more
    assert slice_motion(rot, u, s)[1][5] == pytest.approx(1.8, abs=0.01)
