"""``mgaussian bids`` (issue 18): BIDS discovery, up-front errors, a small study on a 2-worker Dask
LocalCluster (two subjects done, one failed with its reason, inputs untouched, a rerun that skips
the done ones), a worker killed mid-task, a checkpoint that cannot be resumed, and the real
MIALSRTK subject (slow)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
from test_recon import _phantom

import mgaussian
from mgaussian.cli import main
from mgaussian.cohort import layout
from mgaussian.cohort.command import build_tasks
from mgaussian.cohort.summary import SUMMARY_COLUMNS
from mgaussian.cohort.task import CHECKPOINT_FILES, failure_reason, is_complete, quality_from_poses, run_subject
from mgaussian.errors import InputError
from mgaussian.simulate import simulate_stacks

REPO = Path(__file__).resolve().parents[1]
SRC = str(Path(mgaussian.__file__).resolve().parents[1])
# a few cheap iterations: the tests are about the study, not the fit
CFG = {"iterations": [0, 4], "cg_iterations": 4, "time_budget_s": 60}
RECON = ["--no-motion", "--output-resolution", "2"]


# ----------------------------------------------------------------------------- data


def _touch(p: Path, text: str = "x") -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    """Three tiny stacks (24^3 phantom at 2 mm, 4 mm slices) and their masks, simulated once."""
    d = tmp_path_factory.mktemp("sim")
    g, aff, m = _phantom(shape=(24, 24, 24), spacing=2.0)
    simulate_stacks(g, aff, m, str(d), thickness=4.0, pixel=2.0, seed=0, log=lambda s: None)
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps(CFG))
    return {
        "stacks": [d / f"stack_{i:02d}.nii.gz" for i in range(3)],
        "masks": [d / f"mask_{i:02d}.nii.gz" for i in range(3)],
        "cfg": str(cfg),
    }


def make_dataset(root: Path, sim, subjects, corrupt: str | None = None) -> Path:
    """A BIDS dataset: ``subjects`` is a list of (subject, session or None); masks in
    derivatives/masks, in the MIALSRTK form for sub-01 and the BIDS-derivatives form otherwise;
    ``corrupt``: the subject whose second stack is truncated."""
    root.mkdir(parents=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "tiny study", "BIDSVersion": "1.9.0"}))
    for sub, ses in subjects:
        rel = Path(f"sub-{sub}") / (f"ses-{ses}" if ses else "") / "anat"
        (root / rel).mkdir(parents=True)
        (root / "derivatives" / "masks" / rel).mkdir(parents=True)
        for r in range(3):
            ents = f"sub-{sub}" + (f"_ses-{ses}_acq-haste" if ses else "") + f"_run-{r + 1}"
            shutil.copy(sim["stacks"][r], root / rel / f"{ents}_T2w.nii.gz")
            (root / rel / f"{ents}_T2w.json").write_text(json.dumps({"SliceThickness": 4.0}))
            mname = f"{ents}_T2w_desc-brain_mask.nii.gz" if sub == "01" else f"{ents}_desc-brain_mask.nii.gz"
            shutil.copy(sim["masks"][r], root / "derivatives" / "masks" / rel / mname)
    if corrupt:
        p = next((root / f"sub-{corrupt}").rglob("*_run-2_T2w.nii.gz"))
        b = p.read_bytes()
        p.write_bytes(b[: len(b) // 2])
    return root


def _hashes(root: Path, skip: str | None = None) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not (skip and str(p).startswith(skip)):
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
    return out


def _bids(*args, timeout=240):
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "mgaussian", "bids", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    r.wall = time.time() - t0
    return r


def _tsv(p: Path) -> list[dict]:
    lines = p.read_text().splitlines()
    head = lines[0].split("\t")
    return [dict(zip(head, ln.split("\t"))) for ln in lines[1:]]


# ----------------------------------------------------------------------------- BIDS naming and discovery


def test_parse_name_follows_bids_rules():
    n = layout.parse_name("sub-01_ses-02_acq-haste_run-2_T2w.nii.gz")
    assert n.entities == (("sub", "01"), ("ses", "02"), ("acq", "haste"), ("run", "2"))
    assert (n.suffix, n.extension, n.get("run"), n.get("echo")) == ("T2w", ".nii.gz", "2", None)
    assert n.stem == "sub-01_ses-02_acq-haste_run-2_T2w"
    top = layout.parse_name("T2w.json")  # a dataset-level sidecar: no entities
    assert top.entities == () and top.suffix == "T2w" and top.extension == ".json"
    for bad in (
        "sub-01_run-1_T2w_desc-brain_mask.nii.gz",  # a bare token inside the name
        "sub-01_run-1_run-2_T2w.nii.gz",  # a key twice
        "sub-01_run-a.b_T2w.nii.gz",
        "sub-01_T2w",
        "sub-01_-1_T2w.nii",
        "sub-01_run-1_T2-w.nii",
    ):
        assert layout.parse_name(bad) is None, bad
    assert layout.normalise_labels(["sub-01", "02", "01"], "sub", "--participant-label") == ["01", "02"]
    with pytest.raises(InputError, match="not a BIDS label"):
        layout.normalise_labels(["0_1"], "sub", "--participant-label")


def test_find_sessions_stacks_masks_sidecars(tmp_path):
    ds = tmp_path / "ds"
    _touch(ds / "dataset_description.json", "{}")
    _touch(ds / "T2w.json", json.dumps({"SliceThickness": 3.5}))  # inherited by every T2w stack
    a = ds / "sub-01" / "anat"
    for r in (10, 2, 1):  # sorted by run as a number: 1, 2, 10
        _touch(a / f"sub-01_run-{r}_T2w.nii.gz")
    _touch(a / "sub-01_run-1_T2w.json", json.dumps({"SliceThickness": 3.0}))  # nearer than T2w.json
    _touch(a / "sub-01_run-3_T1w.nii.gz")  # another suffix
    _touch(a / "sub-02_run-4_T2w.nii.gz")  # its sub entity is not its folder's
    _touch(a / "sub-01_run-5_extra_T2w.nii.gz")  # breaks the naming rules
    b = ds / "sub-02" / "ses-02" / "anat"
    _touch(b / "sub-02_ses-02_acq-haste_run-1_T2w.nii.gz")
    _touch(b / "sub-02_ses-02_acq-haste_run-2_T2w.nii")
    _touch(ds / "sub-02" / "ses-03" / "anat" / "sub-02_ses-03_run-1_T2w.nii.gz")
    (ds / "sub-03" / "anat").mkdir(parents=True)  # no stacks
    m = ds / "derivatives" / "manual_masks" / "sub-01" / "anat"
    _touch(m / "sub-01_run-1_T2w_desc-brain_mask.nii.gz")  # the MIALSRTK form
    _touch(m / "sub-01_run-2_desc-brain_mask.nii.gz")  # the BIDS-derivatives form
    _touch(m / "sub-01_run-10_desc-other_mask.nii.gz")  # not a brain mask
    _touch(
        ds
        / "derivatives"
        / "mgaussian"
        / "sub-02"
        / "ses-02"
        / "anat"
        / "sub-02_ses-02_acq-haste_run-1_desc-brain_mask.nii.gz"
    )  # our own output folder: never searched
    warned = []
    ss = layout.find_sessions(str(ds), warn=lambda w, what: warned.append((os.path.basename(w), what)))
    assert [s.key for s in ss] == ["sub-01", "sub-02_ses-02", "sub-02_ses-03"]
    s1 = ss[0]
    assert [os.path.basename(p) for p in s1.stacks] == [
        "sub-01_run-1_T2w.nii.gz",
        "sub-01_run-2_T2w.nii.gz",
        "sub-01_run-10_T2w.nii.gz",
    ]
    assert [os.path.basename(p) if p else None for p in s1.masks] == [
        "sub-01_run-1_T2w_desc-brain_mask.nii.gz",
        "sub-01_run-2_desc-brain_mask.nii.gz",
        None,
    ]
    assert [(t[0], os.path.basename(t[1])) for t in s1.thicknesses] == [
        (3.0, "sub-01_run-1_T2w.json"),
        (3.5, "T2w.json"),
        (3.5, "T2w.json"),
    ]
    assert ss[1].masks == [None, None] and ss[1].reldir == "sub-02/ses-02"
    assert {w for w, _ in warned} == {"sub-02_run-4_T2w.nii.gz", "sub-01_run-5_extra_T2w.nii.gz", "sub-03"}
    # labels with or without their prefix; sessions filtered
    ss = layout.find_sessions(str(ds), participant_labels=["sub-02"], session_labels=["03"])
    assert [s.key for s in ss] == ["sub-02_ses-03"]
    with pytest.raises(InputError, match="no subject folder sub-09"):
        layout.find_sessions(str(ds), participant_labels=["01", "09"])
    with pytest.raises(InputError, match=r"sub-03: no \*_T2w.nii\[.gz\] stacks"):
        layout.find_sessions(str(ds), participant_labels=["03"])
    with pytest.raises(InputError, match="no session ses-07"):
        layout.find_sessions(str(ds), session_labels=["07"])
    # two derivative folders with a mask for the same stack: which one is meant cannot be guessed
    _touch(ds / "derivatives" / "other" / "sub-01" / "anat" / "sub-01_run-1_desc-brain_mask.nii.gz")
    with pytest.raises(InputError, match="several brain masks match it"):
        layout.find_sessions(str(ds), participant_labels=["01"])
    ss = layout.find_sessions(str(ds), participant_labels=["01"], masks_dir=str(ds / "derivatives" / "other"))
    assert [os.path.basename(p) if p else None for p in ss[0].masks] == [
        "sub-01_run-1_desc-brain_mask.nii.gz",
        None,
        None,
    ]


def test_build_tasks_masks_all_or_none_and_inherited_thickness(tmp_path):
    ds = tmp_path / "ds"
    _touch(ds / "dataset_description.json", "{}")
    _touch(ds / "T2w.json", json.dumps({"SliceThickness": 3.5}))
    for r in (1, 2):
        _touch(ds / "sub-01" / "anat" / f"sub-01_run-{r}_T2w.nii.gz")
    _touch(ds / "sub-01" / "anat" / "sub-01_run-1_T2w.json", json.dumps({"SliceThickness": 3.0}))
    _touch(ds / "derivatives" / "m" / "sub-01" / "anat" / "sub-01_run-1_desc-brain_mask.nii.gz")
    ss = layout.find_sessions(str(ds))
    a = SimpleNamespace(
        threads_per_worker=None, scheduler=None, workers=2, suffix="T2w", bids_dir=str(ds), no_report=True
    )
    (t,) = build_tasks(a, ss, [], {"thicknesses": None}, str(tmp_path / "out" / "mgaussian"), "r1")
    assert t.masks is None and "found for 1 of 2 stacks" in t.notes[0]  # reconstruct takes all masks or none
    assert t.thicknesses == [3.0, 3.5]  # the inherited one is passed, so both are
    assert [i["path"] for i in t.inputs] == [
        "sub-01/anat/sub-01_run-1_T2w.nii.gz",
        "sub-01/anat/sub-01_run-2_T2w.nii.gz",
        "T2w.json",
        "sub-01/anat/sub-01_run-1_T2w.json",
    ]
    assert t.volume.endswith("out/mgaussian/sub-01/anat/sub-01_rec-mgaussian_T2w.nii.gz")
    (t,) = build_tasks(a, ss, [], {"thicknesses": [4.0]}, str(tmp_path / "out" / "mgaussian"), "r1")
    assert t.thicknesses is None  # the user's --thicknesses (after --) wins
    # an inherited value for one stack, none anywhere for the other: its slice spacing (header) is passed
    ds2 = tmp_path / "ds2"
    _touch(ds2 / "dataset_description.json", "{}")
    _touch(ds2 / "acq-fast_T2w.json", json.dumps({"SliceThickness": 3.5}))  # applies to acq-fast stacks only
    anat = ds2 / "sub-01" / "anat"
    for acq in ("fast", "slow"):
        anat.mkdir(parents=True, exist_ok=True)
        nib.save(
            nib.Nifti1Image(np.ones((8, 8, 5), np.float32), np.diag([1.0, 1.0, 2.5, 1.0])),
            str(anat / f"sub-01_acq-{acq}_T2w.nii.gz"),
        )
    (t,) = build_tasks(
        SimpleNamespace(**{**vars(a), "bids_dir": str(ds2)}),
        layout.find_sessions(str(ds2)),
        [],
        {"thicknesses": None},
        str(tmp_path / "out2" / "mgaussian"),
        "r1",
    )
    assert t.thicknesses == [3.5, 2.5]
    assert t.notes == [
        "SliceThickness inherited from acq-fast_T2w.json (passed as --thicknesses, slice spacing "
        "where no sidecar has one)"
    ]


def test_failure_reason_and_quality():
    assert failure_reason("loading\nerror: a.nii.gz: file is empty\n", 2) == "a.nii.gz: file is empty"
    assert "SIGKILL (out of memory?" in failure_reason("", -9)
    assert failure_reason("Segmentation fault\n", 139) == "reconstruct exited with code 139: Segmentation fault"
    q = quality_from_poses(
        {
            "slice_weights": [
                {"stack": "a", "slices": [1, 2, 3], "excluded": [2]},
                {"stack": "b", "slices": [0, 1], "excluded": []},
            ]
        }
    )
    assert (q["slices"], q["excluded_slices"], q["per_stack"][0]["excluded"]) == (5, 1, [2])


def test_checkpoint_names_agree_with_reconstruct():
    from mgaussian.recon.checkpoint import CHECKPOINT, PREVIOUS

    assert CHECKPOINT_FILES == (CHECKPOINT, PREVIOUS)


# ----------------------------------------------------------------------------- bad command lines


def _err(capsys, argv, where):
    rc = main(["bids", *map(str, argv)])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.strip().splitlines() if ln]
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and where in lines[0], cap.err
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


def test_bad_command_lines(tmp_path, capsys, sim):
    ds = make_dataset(tmp_path / "ds", sim, [("01", None)])
    out = tmp_path / "out"
    assert "BIDS folder not found" in _err(capsys, [tmp_path / "nope", out, "participant"], "nope")
    (tmp_path / "plain").mkdir()
    assert "no dataset_description.json" in _err(capsys, [tmp_path / "plain", out, "participant"], "plain")
    assert "invalid choice: 'session'" in _err(capsys, [ds, out, "session"], "analysis_level")
    _err(capsys, [ds, out, "participant", "--participant-label", "07"], "--participant-label")
    _err(capsys, [ds, out, "participant", "--suffix", "T1w"], f"{ds}: no sub-*")
    _err(capsys, [ds, ds / "sub-01", "participant"], "is inside the BIDS dataset")
    _err(capsys, [ds, out, "participant", "--masks-dir", tmp_path / "nomasks"], "--masks-dir")
    _err(capsys, [ds, out, "participant", "--workers", "0"], "--workers")
    _err(capsys, [ds, out, "participant", "--workers", "2", "--scheduler", "tcp://x:1"], "--scheduler")
    _err(capsys, [ds, out, "participant", "--config", tmp_path / "none.json"], "--config")
    bad_cfg = tmp_path / "bad.json"
    bad_cfg.write_text(json.dumps({"iterations": [1, 2], "no_such_key": 1}))
    _err(capsys, [ds, out, "participant", "--config", bad_cfg], "bad.json")
    # reconstruct options after --: checked by reconstruct's parser; the App's own ones refused
    assert "expected a number" in _err(capsys, [ds, out, "participant", "--", "--seed", "x"], "--seed")
    _err(capsys, [ds, out, "participant", "--", "--no-such-option"], "not options of mgaussian reconstruct: --no-such")
    assert "--threads-per-worker" in _err(capsys, [ds, out, "participant", "--", "--threads", "3"], "--threads")
    _err(capsys, [ds, out, "participant", "--", "--output-volume", "x.nii.gz"], "--output-volume")
    _err(capsys, [ds, out, "participant", "--", "--thicknesses", "3", "4"], "--thicknesses")
    # options whose extra files the derivative would not keep: refused, not lost
    for extra in (["--template", "fetal-auto"], ["--output-confidence", str(tmp_path / "c.nii.gz")]):
        assert "is not supported by the App" in _err(capsys, [ds, out, "participant", "--", *extra], extra[0])
    _err(capsys, [ds, out, "group"], "no mgaussian results to summarise")
    assert not out.exists()  # nothing written by a refused command


def test_another_datasets_derivative_is_refused(tmp_path, capsys, sim):
    ds = make_dataset(tmp_path / "ds", sim, [("01", None)])
    d = tmp_path / "out" / "mgaussian"
    _touch(d / "dataset_description.json", json.dumps({"Name": "x", "GeneratedBy": [{"Name": "fmriprep"}]}))
    _err(capsys, [ds, tmp_path / "out", "participant"], "belongs to another pipeline (fmriprep)")


# ----------------------------------------------------------------------------- studies on Dask


def test_study_two_done_one_failed_then_rerun_skips(tmp_path, sim):
    ds = make_dataset(tmp_path / "ds", sim, [("01", None), ("02", "02"), ("03", None)], corrupt="03")
    before = _hashes(ds)
    out = tmp_path / "out"
    r = _bids(ds, out, "participant", "--workers", "2", "--config", sim["cfg"], *RECON)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert err == [f"error: sub-03: 1 of 3 subject-sessions failed (reasons in {out / 'mgaussian' / 'summary.tsv'})"]
    assert "running on a local Dask cluster of 2 worker processes; dashboard" in r.stdout
    progress = [ln for ln in r.stdout.splitlines() if ln.startswith("[")]
    assert len(progress) == 3 and progress[0].startswith("[1/3]") and "ETA" in progress[0]
    assert _hashes(ds) == before  # the BIDS folder is never written

    root = out / "mgaussian"
    desc = json.loads((root / "dataset_description.json").read_text())
    assert desc["DatasetType"] == "derivative" and desc["GeneratedBy"][0]["Name"] == "mgaussian"
    assert desc["GeneratedBy"][0]["Version"] == mgaussian.__version__
    assert desc["SourceDatasets"][0]["URL"] == ds.resolve().as_uri() and desc["BIDSVersion"]
    for key, rel in (("sub-01", "sub-01"), ("sub-02_ses-02", "sub-02/ses-02")):
        stem = root / rel / "anat" / f"{key}_rec-mgaussian_T2w"
        img = nib.load(str(stem) + ".nii.gz")
        v = np.asarray(img.dataobj)
        assert v.ndim == 3 and min(v.shape) >= 20 and np.all(np.isfinite(v)) and v.max() > 10
        # --output-resolution 2: the model at 2 mm, written 2 x finer (--output-oversampling)
        assert np.allclose(img.header.get_zooms(), 1.0)
        side = json.loads(Path(str(stem) + ".json").read_text())
        assert side["Masks"] == "given" and [i["thickness_from"] for i in side["Inputs"]] == ["sidecar"] * 3
        assert [s.split(":")[-1] for s in side["Sources"]] == [
            f"{rel}/anat/{key}{'_acq-haste' if 'ses' in key else ''}_run-{i}_T2w.nii.gz" for i in (1, 2, 3)
        ]
        assert side["Quality"]["slices"] == 24 and side["Quality"]["excluded_slices"] == 0
        assert side["Quality"]["shape"] == list(v.shape) and side["Config"]["iterations"] == [0, 4]
        assert side["Settings"]["no_motion"] is True and side["Timings"]["wall_s"] > 0 and side["Attempts"] == 1
        assert (root / rel / "figures" / f"{key}_rec-mgaussian_T2w_midplanes.png").read_bytes()[:4] == b"\x89PNG"
        assert (root / rel / "figures" / f"{key}_rec-mgaussian_T2w_report" / "index.html").is_file()
        assert (root / rel / "log" / f"{key}_rec-mgaussian_T2w.poses.json").is_file()
        assert not (root / ".work" / key).exists()  # the work folder goes once the outputs are in place
    assert not (root / "sub-03" / "anat").exists()
    rows = {r["participant_id"]: r for r in _tsv(root / "summary.tsv")}
    assert list(_tsv(root / "summary.tsv")[0]) == list(SUMMARY_COLUMNS)
    assert [rows[s]["status"] for s in ("sub-01", "sub-02", "sub-03")] == ["done", "done", "failed"]
    assert rows["sub-02"]["session_id"] == "ses-02" and rows["sub-01"]["excluded_slices"] == "0"
    reason = rows["sub-03"]["error"]
    assert reason.startswith(str(ds / "sub-03" / "anat" / "sub-03_run-2_T2w.nii.gz")) and "truncated" in reason
    assert (root / "sub-03" / "log" / "sub-03_rec-mgaussian_T2w.stderr.txt").read_text().strip().endswith(reason)
    page = (root / "index.html").read_text()
    assert "2 done, 1 failed" in page and "truncated or corrupt" in page
    for rel in (
        "sub-01/figures/sub-01_rec-mgaussian_T2w_midplanes.png",
        "sub-02/ses-02/figures/sub-02_ses-02_rec-mgaussian_T2w_report/index.html",
    ):
        assert f'"{rel}"' in page
    links = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert len(links) == 5 and all((root / ln).is_file() for ln in links), links  # 2 pictures, 2 reports, the tsv

    # a rerun: the done subjects are skipped without touching their files; the failed one is tried again
    done_files = {**_hashes(root / "sub-01" / "anat"), **_hashes(root / "sub-02" / "ses-02" / "figures")}
    r2 = _bids(ds, out, "participant", "--workers", "2", "--config", sim["cfg"], *RECON)
    assert r2.returncode == 1 and "3 subject-sessions: 2 already done, 1 to run" in r2.stdout, r2.stdout + r2.stderr
    assert "sub-01: already done (skipped)" in r2.stdout and "[1/1] sub-03: failed: " in r2.stdout
    assert {**_hashes(root / "sub-01" / "anat"), **_hashes(root / "sub-02" / "ses-02" / "figures")} == done_files
    # only the done ones asked for: no cluster is started at all
    r3 = _bids(ds, out, "participant", "--participant-label", "01", "02", "--config", sim["cfg"], *RECON)
    assert r3.returncode == 0 and "0 to run" in r3.stdout and "Dask" not in r3.stdout, r3.stdout + r3.stderr
    assert r3.wall < 15, r3.wall
    # the group level rebuilds the summary from the status records
    (root / "summary.tsv").unlink()
    r4 = _bids(ds, out, "group")
    assert r4.returncode == 0 and "summary of 3 subject-sessions (1 failed)" in r4.stdout, r4.stdout + r4.stderr
    assert [r["status"] for r in _tsv(root / "summary.tsv")] == ["done", "done", "failed"]
    assert _hashes(ds) == before


def _procs_with(text: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 of a worker and /proc: Linux")
def test_worker_killed_mid_task_is_retried(tmp_path, sim):
    """kill -9 of the Dask worker running sub-01: its reconstruct dies with it, Dask reruns the task
    on a live worker, and the study completes; outputs in BIDS_DIR/derivatives (the BIDS Apps layout)."""
    ds = make_dataset(tmp_path / "ds", sim, [("01", None), ("02", None)])
    before = _hashes(ds)
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mgaussian",
            "bids",
            str(ds),
            str(ds / "derivatives"),
            "participant",
            "--workers",
            "2",
            "--config",
            sim["cfg"],
            "--no-report",
            *RECON,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    att = ds / "derivatives" / "mgaussian" / ".work" / "sub-01" / "attempts.json"
    t0 = time.time()
    try:
        while not att.exists():
            assert p.poll() is None and time.time() - t0 < 120, "sub-01 never started"
            time.sleep(0.05)
        pid = json.loads(att.read_text())["attempts"][0]["pid"]
        time.sleep(0.3)  # let its reconstruct start
        os.kill(pid, signal.SIGKILL)
        stdout, stderr = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stdout + stderr
    root = ds / "derivatives" / "mgaussian"
    rows = {r["participant_id"]: r for r in _tsv(root / "summary.tsv")}
    assert rows["sub-01"]["status"] == "done" and rows["sub-01"]["attempts"] == "2"
    assert rows["sub-02"]["status"] == "done" and rows["sub-02"]["attempts"] == "1"
    assert "sub-01: done in" in stdout and "attempt 2" in stdout
    side = json.loads((root / "sub-01" / "anat" / "sub-01_rec-mgaussian_T2w.json").read_text())
    assert side["Attempts"] == 2 and side["Quality"]["slices"] == 24
    assert not _procs_with(str(root / ".work"))  # no orphaned reconstruct of the killed attempt
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert _hashes(ds, skip=str(root)) == before  # nothing outside derivatives/mgaussian changed


def test_attach_to_a_running_scheduler(tmp_path, sim):
    """--scheduler ADDRESS: the subjects run on the workers of a scheduler started elsewhere (as
    dask-jobqueue's SLURMCluster gives one); nothing is written when it cannot be reached."""
    import logging

    from distributed import LocalCluster

    ds = make_dataset(tmp_path / "ds", sim, [("01", None)])
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0", silence_logs=logging.ERROR
    ) as cluster:
        addr = cluster.scheduler_address
        r = _bids(
            ds, tmp_path / "out", "participant", "--scheduler", addr, "--config", sim["cfg"], "--no-report", *RECON
        )
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"running on the Dask scheduler {addr} (1 worker now)" in r.stdout
    sub = tmp_path / "out" / "mgaussian" / "sub-01"
    side = json.loads((sub / "anat" / "sub-01_rec-mgaussian_T2w.json").read_text())
    assert side["Timings"]["threads"] == len(os.sched_getaffinity(0))  # the CPUs of the worker's one task
    assert side["Report"] is None and not (sub / "figures" / "sub-01_rec-mgaussian_T2w_report").exists()
    r = _bids(ds, tmp_path / "out2", "participant", "--scheduler", addr, timeout=60)  # the cluster is gone
    assert r.returncode == 2 and r.stderr.startswith(f"error: --scheduler: cannot connect to {addr}"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stdout == "" and not (tmp_path / "out2").exists()


def test_unusable_checkpoint_starts_afresh(tmp_path, sim):
    """A partial subject resumes from its checkpoint; one that cannot be read is started again."""
    ds = make_dataset(tmp_path / "ds", sim, [("01", None)])
    ss = layout.find_sessions(str(ds))
    a = SimpleNamespace(threads_per_worker=1, scheduler=None, workers=1, suffix="T2w", bids_dir=str(ds), no_report=True)
    (t,) = build_tasks(a, ss, ["--config", sim["cfg"], *RECON], {"x": 1}, str(tmp_path / "out" / "mgaussian"), "r")
    from mgaussian.cohort.task import fingerprint

    os.makedirs(os.path.join(t.work, "checkpoint"))
    Path(t.work, "fingerprint.json").write_text(json.dumps(fingerprint(t)))
    Path(t.work, "checkpoint", CHECKPOINT_FILES[0]).write_bytes(b"half a checkpoint")
    rec = run_subject(t)
    assert rec["status"] == "done", rec
    side = json.loads(Path(t.sidecar).read_text())
    assert "--resume" not in side["ReconstructCommand"] and "--checkpoint-dir" in side["ReconstructCommand"]
    (note,) = side["Notes"]
    assert note.startswith(f"its checkpoint could not be resumed (--resume: no readable checkpoint in {t.work}")
    assert note.endswith("): started afresh")
    assert run_subject(t)["this_run"] == "skipped"  # complete now: a second call does nothing
    assert is_complete(t) is not None
    assert is_complete(dataclasses.replace(t, settings={"x": 2})) is None  # other settings: to be redone
    Path(t.volume).write_bytes(Path(t.volume).read_bytes()[:100])  # a damaged volume: to be redone
    assert is_complete(t) is None


@pytest.mark.slow
def test_real_mialsrtk_subject(tmp_path):
    """The real MIALSRTK fetal subject as a BIDS dataset, end to end (manual masks from
    derivatives/manual_masks in the <stack>_desc-brain_mask form, SliceThickness from sidecars)."""
    ds = REPO / ".." / "shared" / "data" / "mialsrtk_bids"
    if not (ds / "dataset_description.json").is_file():
        pytest.skip("../shared/data/mialsrtk_bids is not here")
    before = _hashes(ds)
    r = _bids(
        ds.resolve(),
        tmp_path / "out",
        "participant",
        "--workers",
        "1",
        "--time-budget",
        "60",
        "--output-resolution",
        "1.5",
        timeout=900,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    root = tmp_path / "out" / "mgaussian"
    side = json.loads((root / "sub-01" / "anat" / "sub-01_rec-mgaussian_T2w.json").read_text())
    assert side["Masks"] == "given"
    assert [os.path.basename(i["mask"]) for i in side["Inputs"]] == [
        f"sub-01_run-{k}_T2w_desc-brain_mask.nii.gz" for k in (1, 3, 5)
    ]
    assert [(i["thickness_mm"], i["thickness_from"]) for i in side["Inputs"]] == [(3.0, "sidecar")] * 3
    v = np.asarray(nib.load(str(root / "sub-01" / "anat" / "sub-01_rec-mgaussian_T2w.nii.gz")).dataobj)
    assert min(v.shape) > 40 and np.all(np.isfinite(v)) and v.max() > 0
    assert _tsv(root / "summary.tsv")[0]["status"] == "done"
    assert _hashes(ds) == before
