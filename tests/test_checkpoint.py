"""Checkpoints (issue 6): atomic saves, fallback to the previous checkpoint, refusal for other
inputs/settings, and kill -9 + --resume ending where an uninterrupted run ends."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_recon import simulate_phantom

from mgaussian.cli import main
from mgaussian.errors import InputError
from mgaussian.io import load_image, load_stacks
from mgaussian.metrics import score_volume
from mgaussian.recon.checkpoint import CHECKPOINT, PREVIOUS, Checkpointer, inputs_fingerprint
from mgaussian.recon.config import config_from_dict

# every iteration is checkpointed; no time budget, so an interrupted run does the same work
CFG = {"iterations": [3, 30], "cg_iterations": 8, "time_budget_s": None, "checkpoint_interval_s": 0.0}


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    g, aff, m, stacks, masks = simulate_phantom(d, seed=0)
    cfgp = d / "cfg.json"
    cfgp.write_text(json.dumps(CFG))
    return {
        "dir": d,
        "gt": g,
        "aff": aff,
        "mask": m,
        "cfg": str(cfgp),
        "stacks": stacks,
        "masks": masks,
    }


def _fp(case):
    return inputs_fingerprint(load_stacks(case["stacks"], case["masks"], [3.6]))


def _state(level, it):
    return {
        "level": level,
        "iteration": it,
        "cg_done": True,
        "done": False,
        "step": 7,
        "elapsed_s": 1.5,
        "t": torch.arange(4.0) * it,
        "rng": np.random.default_rng(3).bit_generator.state,
    }


def test_save_load_round_trip_and_interval(case, tmp_path):
    cfg = config_from_dict(CFG)
    ck = Checkpointer(tmp_path / "ck", cfg, _fp(case), interval_s=1000.0)
    assert ck.load() is None and not ck.exists()
    assert ck.maybe_save(lambda: _state(0, 1), force=True)
    assert not ck.maybe_save(lambda: pytest.fail("state built although the interval has not passed"))
    (tmp_path / "ck" / f".{CHECKPOINT}.x1y2.partial").write_bytes(b"half a checkpoint")  # a killed save
    ck.save(_state(1, 2))
    assert ck.remove_partials() == 1
    names = sorted(os.listdir(tmp_path / "ck"))
    assert names == sorted(["checkpoint.json", CHECKPOINT, PREVIOUS])  # no temporary file left behind
    st = ck.load()
    assert st["level"] == 1 and st["iteration"] == 2 and torch.equal(st["t"], torch.arange(4.0) * 2)
    assert st["rng"] == np.random.default_rng(3).bit_generator.state
    summary = json.loads((tmp_path / "ck" / "checkpoint.json").read_text())
    assert summary["level"] == 1 and summary["iteration"] == 2 and summary["bytes"] > 0
    # compute-only settings may change on resume
    assert (
        Checkpointer(
            tmp_path / "ck",
            cfg.resolved(threads=1, backend="reference", time_budget_s=5.0, checkpoint_interval_s=3.0),
            _fp(case),
        ).load()["level"]
        == 1
    )


def test_corrupt_checkpoint_falls_back_to_previous(case, tmp_path, capsys):
    cfg = config_from_dict(CFG)
    ck = Checkpointer(tmp_path, cfg, _fp(case), interval_s=0.0)
    ck.save(_state(0, 3))
    ck.save(_state(1, 4))
    p = tmp_path / CHECKPOINT
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncated, as by a full disk
    st = ck.load()
    assert (st["level"], st["iteration"]) == (0, 3)
    assert "previous checkpoint" in capsys.readouterr().err
    (tmp_path / PREVIOUS).write_bytes(b"garbage")
    with pytest.raises(InputError, match="no readable checkpoint"):
        ck.load()


def test_checkpoint_for_other_settings_or_inputs_is_refused(case, tmp_path):
    cfg = config_from_dict(CFG)
    fp = _fp(case)
    Checkpointer(tmp_path, cfg, fp).save(_state(0, 1))
    with pytest.raises(InputError, match=r"other inputs/settings: iterations \[3, 30\] -> \[3, 20\]"):
        Checkpointer(tmp_path, cfg.resolved(iterations=(3, 20)), fp).load()
    with pytest.raises(InputError, match="seed"):
        Checkpointer(tmp_path, cfg.resolved(seed=1), fp).load()
    other = json.loads(json.dumps(fp))
    other[1]["thickness_mm"] = 4.0
    with pytest.raises(InputError, match=r"stack 2 thickness_mm 3.6 -> 4.0"):
        Checkpointer(tmp_path, cfg, other).load()
    with pytest.raises(InputError, match="number of stacks 3 -> 1"):
        Checkpointer(tmp_path, cfg, fp[:1]).load()


def test_settings_of_what_is_made_after_the_fit_may_change_on_resume(case, tmp_path):
    """The confidence map's settings and the written grid are computed from the finished fit: a
    checkpoint resumes with them changed, also one saved with them in its settings (before they
    joined COMPUTE_ONLY_KEYS); a setting of the fit still refuses it."""
    cfg = config_from_dict(CFG)
    fp = _fp(case)
    ck = Checkpointer(tmp_path, cfg, fp)
    ck.save(_state(0, 1))
    for changed in (
        {"confidence": True},
        {"confidence_position_sd_mm": 0.4, "confidence_position_smooth_mm": 1.0},
        {"output_oversampling": 1},
    ):
        assert Checkpointer(tmp_path, cfg.resolved(**changed), fp).load()["iteration"] == 1
    # an older checkpoint: every setting stored
    saved = torch.load(ck.path, weights_only=False)
    saved["settings"] = cfg.to_dict()
    torch.save(saved, ck.path)
    assert Checkpointer(tmp_path, cfg.resolved(confidence=True), fp).load()["iteration"] == 1
    with pytest.raises(InputError, match="cg_iterations 8 -> 9"):
        Checkpointer(tmp_path, cfg.resolved(confidence=True, cg_iterations=9), fp).load()


def test_resumed_finished_fit_writes_the_confidence_map_of_a_fresh_run(case, tmp_path):
    """A finished fit resumed with --output-confidence: the same volume and map, bit for bit, as a
    run that asked for the map from the start."""
    base = ["reconstruct", "--input-stacks", *case["stacks"], "--stack-masks", *case["masks"]]
    base += ["--thicknesses", "3.6", "--config", case["cfg"], "--quiet", "--no-report", "--no-motion"]
    ck = tmp_path / "ck"
    assert main(base + ["--output-volume", str(tmp_path / "a.nii.gz"), "--checkpoint-dir", str(ck)]) == 0
    resumed = ["--output-volume", str(tmp_path / "b.nii.gz"), "--output-confidence", str(tmp_path / "cb.nii.gz")]
    assert main(base + resumed + ["--checkpoint-dir", str(ck), "--resume"]) == 0
    fresh = ["--output-volume", str(tmp_path / "c.nii.gz"), "--output-confidence", str(tmp_path / "cc.nii.gz")]
    assert main(base + fresh) == 0
    for x, y in (("b", "c"), ("cb", "cc")):
        vx = load_image(str(tmp_path / f"{x}.nii.gz"))[0]
        vy = load_image(str(tmp_path / f"{y}.nii.gz"))[0]
        assert np.array_equal(vx, vy), (x, y)


def test_cli_checkpoint_option_errors(case, tmp_path, capsys):
    base = [
        "reconstruct",
        "--input-stacks",
        *case["stacks"],
        "--stack-masks",
        *case["masks"],
        "--thicknesses",
        "3.6",
        "--output-volume",
        str(tmp_path / "o.nii.gz"),
        "--config",
        case["cfg"],
        "--quiet",
    ]
    assert main(base + ["--resume"]) == 2
    assert "--resume: needs --checkpoint-dir" in capsys.readouterr().err
    assert main(base + ["--checkpoint-dir", str(tmp_path / "none"), "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume: no checkpoint in") and "\n" not in err
    assert main(base + ["--checkpoint-dir", case["stacks"][0]]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert main(base + ["--checkpoint-dir", str(case["dir"] / "sim"), "--output-model", str(case["dir"] / "sim")]) == 2
    # a checkpoint for other settings is refused before anything is written
    Checkpointer(tmp_path / "ck", config_from_dict({**CFG, "seed": 5}), _fp(case)).save(_state(0, 1))
    assert main(base + ["--checkpoint-dir", str(tmp_path / "ck"), "--resume"]) == 2
    assert "other inputs/settings: seed 5 -> 0" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o.nii.gz") and not os.path.exists(tmp_path / "none")


def _wait_for(proc, summary, pred, timeout=120.0):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (rc {proc.returncode}) before it could be killed: {proc.stderr.read()!r}")
        try:
            s = json.loads(open(summary).read())
        except (OSError, ValueError):
            s = None
        if s is not None and pred(s):
            return s
        time.sleep(0.02)
    pytest.fail("no checkpoint appeared in time")


def test_kill_and_resume_matches_uninterrupted_run(case, tmp_path, capsys):
    args = [
        "reconstruct",
        "--input-stacks",
        *case["stacks"],
        "--stack-masks",
        *case["masks"],
        "--thicknesses",
        "3.6",
        "--config",
        case["cfg"],
    ]
    full = tmp_path / "full.nii.gz"
    assert main(args + ["--output-volume", str(full), "--quiet"]) == 0

    out = tmp_path / "out" / "rec.nii.gz"
    out.parent.mkdir()
    ck = tmp_path / "ck"
    cmd = [
        sys.executable,
        "-m",
        "mgaussian",
        *args,
        "--output-volume",
        str(out),
        "--checkpoint-dir",
        str(ck),
        "--quiet",
    ]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        s = _wait_for(proc, ck / "checkpoint.json", lambda s: s["level"] == 1 and s["iteration"] >= 5)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    # nothing at the output path that looks finished
    assert not out.exists() and not os.path.exists(str(out)[: -len(".nii.gz")] + ".config.json")
    assert all(n.endswith(".partial") for n in os.listdir(out.parent))
    killed_at = json.loads((ck / "checkpoint.json").read_text())
    assert killed_at["level"] == 1 and 5 <= killed_at["iteration"] < 30, (s, killed_at)

    capsys.readouterr()
    assert main(args + ["--output-volume", str(out), "--checkpoint-dir", str(ck), "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from level 2 iteration {killed_at['iteration']}" in err, err
    final = json.loads((ck / "checkpoint.json").read_text())
    assert final["done"] is True and final["step"] == 33  # the same number of steps as uninterrupted
    a, aff_a, _ = load_image(str(full))
    b, aff_b, _ = load_image(str(out))
    pa = score_volume(a, aff_a, case["gt"], case["aff"], case["mask"])["psnr"]
    pb = score_volume(b, aff_b, case["gt"], case["aff"], case["mask"])["psnr"]
    print(
        f"uninterrupted {pa:.3f} dB, killed at iteration {killed_at['iteration']} + resumed {pb:.3f} dB, "
        f"max |diff| {np.abs(a - b).max():.3g} of {np.abs(a).max():.3g}"
    )
    assert abs(pa - pb) <= 0.2, (pa, pb)
    assert np.abs(a - b).max() <= 1e-2 * np.abs(a).max()  # the same batches: equal up to float order

    # resuming a finished fit only renders and writes the volume again
    out2 = tmp_path / "out" / "rec2.nii.gz"
    assert main(args + ["--output-volume", str(out2), "--checkpoint-dir", str(ck), "--resume"]) == 0
    assert "resuming a finished fit" in capsys.readouterr().err
    assert np.allclose(load_image(str(out2))[0], b)
