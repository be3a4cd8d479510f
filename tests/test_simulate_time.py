"""Simulated clinical acquisitions (issue 19): order, sidecars, drift, jumps, stack motion, bias fields."""

import json
import math

import numpy as np
import pytest
from conftest import blob_volume, write_nifti

from mgaussian.cli import main
from mgaussian.geometry import matrix_to_rotvec, rigid_matrix
from mgaussian.io import load_stacks
from mgaussian.simulate import simulate_stacks


def _gt():
    gt, aff, _ = blob_volume((28, 30, 26), spacing=1.5, sigma=7.0)
    return gt + 5.0, aff


def _sim(tmp_path, **kw):
    gt, aff = _gt()
    d = tmp_path / "sim"
    truth = simulate_stacks(gt, aff, gt > 20, str(d), thickness=2.0, pixel=3.0, seed=4, log=lambda s: None, **kw)
    return d, truth


def _poses_in_time(stack):
    """The slices' pose matrices [K,4,4] sorted by acquisition rank, and the ranks."""
    sl = stack["slices"]
    r = np.array([s["acquisition_rank"] for s in sl])
    M = np.array([s["matrix"] for s in sl])
    o = np.argsort(r, kind="stable")
    return M[o], r[o]


def _angle_deg(A, B):
    return math.degrees(float(np.linalg.norm(matrix_to_rotvec(A[:3, :3] @ B[:3, :3].T))))


@pytest.mark.parametrize("order, packages", [("interleaved", 1), ("sequential", 1), ("interleaved", 2)])
def test_order_and_sidecar_round_trip(tmp_path, order, packages):
    d, truth = _sim(tmp_path, slice_order=order, packages=packages)
    paths = [str(d / f"stack_{i:02d}.nii.gz") for i in range(3)]
    for st, ts in zip(load_stacks(paths), truth["stacks"]):
        ranks = [s["acquisition_rank"] for s in ts["slices"]]
        assert st.slice_order.tolist() == ranks and "SliceTiming" in st.slice_order_source
        assert st.thickness == 2.0 and st.thickness_source == "sidecar"
        side = json.loads((d / ts["sidecar"]).read_text())
        assert side["SliceThickness"] == 2.0 and len(side["SliceTiming"]) == st.n_slices
        assert ts["acquisition_order"] == np.argsort(ranks).tolist()
        if order == "sequential":
            assert ranks == list(range(st.n_slices))
        elif packages == 1:  # Siemens: an even count starts with slice 1, an odd one with slice 0
            assert ts["acquisition_order"][0] == (1 if st.n_slices % 2 == 0 else 0)
            assert all(b - a == 2 for a, b in zip(ts["acquisition_order"][:3], ts["acquisition_order"][1:4]))
        else:  # package 0 (even slices) first
            n0 = (st.n_slices + 1) // 2
            assert all(s % 2 == 0 for s in ts["acquisition_order"][:n0])


def test_drift_is_smooth_in_time(tmp_path):
    deg, mm = 8.0, 4.0
    _, truth = _sim(tmp_path, motion_drift=(deg, mm))
    for ts in truth["stacks"]:
        M, r = _poses_in_time(ts)
        K = len(M)
        steps = [_angle_deg(M[k + 1], M[k]) for k in range(K - 1)]
        moves = [float(np.linalg.norm(M[k + 1][:3, 3] - M[k][:3, 3])) for k in range(K - 1)]
        # g(t) = a t + (1 - a) t^2 has |g'| <= 2: consecutive in time differ by <= 2 x DEG / (K - 1)
        assert max(steps) <= 2 * deg / (K - 1) + 1e-6
        assert _angle_deg(M[0], np.eye(4)) < 1e-9 and abs(_angle_deg(M[-1], np.eye(4)) - deg) < 1e-6
        # neighbours in space, acquired half a stack apart in time, differ much more
        sl = ts["slices"]
        spatial = [_angle_deg(np.array(sl[k + 1]["matrix"]), np.array(sl[k]["matrix"])) for k in range(K - 1)]
        assert np.median(spatial) > 3 * np.median(steps)
        assert max(moves) < 3 * mm  # the rotation about the volume centre moves points too, but smoothly


def test_jumps_persist(tmp_path):
    _, truth = _sim(tmp_path, motion_jumps=2, motion_rotation=6.0, motion_translation=3.0)
    for ts in truth["stacks"]:
        M, r = _poses_in_time(ts)
        at = [j["at_rank"] for j in ts["jumps"]]
        assert len(at) == 2 and len(set(at)) == 2
        changes = [k + 1 for k in range(len(M) - 1) if not np.allclose(M[k + 1], M[k], atol=1e-9)]
        assert [int(r[k]) for k in changes] == sorted(at)  # constant between jumps, changes only at them
        assert np.allclose(M[0], np.eye(4))  # before the first jump: where the header says
        # after each jump the pose is the composition of the jumps so far (they persist)
        J = [rigid_matrix(j["rotvec"], j["translation_mm"], truth["centre_mm"]) for j in ts["jumps"]]
        assert np.allclose(M[changes[0]], J[0], atol=1e-9)
        assert np.allclose(M[-1], J[0] @ J[1], atol=1e-9)
        assert all(j["rotation_deg"] <= 6.0 and max(abs(v) for v in j["translation_mm"]) <= 3.0 for j in ts["jumps"])


def test_stack_motion_moves_whole_stacks(tmp_path):
    _, truth = _sim(tmp_path, stack_motion=(12.0, 5.0))
    for ts in truth["stacks"]:
        M, _ = _poses_in_time(ts)
        assert np.allclose(M, M[0])  # one rigid map for the whole stack
        assert abs(_angle_deg(M[0], np.eye(4)) - 12.0) < 1e-6
        assert np.allclose(M[0], np.array(ts["stack_motion_matrix"]))
    # each stack moved differently
    assert (
        _angle_deg(
            np.array(truth["stacks"][0]["stack_motion_matrix"]), np.array(truth["stacks"][1]["stack_motion_matrix"])
        )
        > 1.0
    )


def test_default_model_unchanged_by_new_stream(tmp_path):
    """Without the new options the per-slice draws are those of the original model."""
    gt, aff = _gt()
    a = simulate_stacks(
        gt, aff, None, str(tmp_path / "a"), thickness=2.0, pixel=3.0, seed=5, motion_rotation=3.0, log=lambda s: None
    )
    b = simulate_stacks(
        gt,
        aff,
        None,
        str(tmp_path / "b"),
        thickness=2.0,
        pixel=3.0,
        seed=5,
        motion_rotation=3.0,
        slice_order="sequential",
        log=lambda s: None,
    )
    for sa, sb in zip(a["stacks"], b["stacks"]):
        assert all(np.allclose(x["matrix"], y["matrix"]) for x, y in zip(sa["slices"], sb["slices"]))


def test_cli_options_and_errors(tmp_path, capsys):
    gt, aff = _gt()
    g = write_nifti(tmp_path / "gt.nii.gz", gt, aff)
    out = tmp_path / "o"
    rc = main(
        [
            "simulate",
            g,
            "--output-dir",
            str(out),
            "--thickness",
            "2",
            "--pixel",
            "3",
            "--slice-order",
            "sequential",
            "--packages",
            "2",
            "--motion-drift",
            "5,2",
            "--motion-jumps",
            "1",
            "--motion-rotation",
            "4",
            "--stack-motion",
            "10,3",
        ]
    )
    assert rc == 0
    t = json.loads((out / "truth.json").read_text())
    assert t["settings"]["motion_drift"] == [5.0, 2.0] and t["settings"]["stack_motion"] == [10.0, 3.0]
    assert t["stacks"][0]["packages"] == 2 and len(t["stacks"][0]["jumps"]) == 1
    capsys.readouterr()
    for args, msg in [
        (["--motion-drift", "5"], "error: --motion-drift: expected DEG,MM (two numbers >= 0), got '5'"),
        (["--stack-motion", "200,1"], "error: --stack-motion: a rotation of 200 degrees is more than a half turn"),
        (["--motion-jumps", "2"], "error: --motion-jumps: needs --motion-rotation and/or --motion-translation"),
        (["--motion-jumps", "500", "--motion-rotation", "3"], "error: --motion-jumps: 500 jumps need more acquisition"),
    ]:
        rc = main(["simulate", g, "--output-dir", str(tmp_path / "x"), "--thickness", "2", "--pixel", "3"] + args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and err[0].startswith(msg), err
    assert not (tmp_path / "x").exists()


def test_bias_field_multiplies_each_stack_by_its_own_smooth_field(tmp_path):
    """--bias-field B: each stack is the bias-free one times a smooth field that reaches 1 + B (or
    1 / (1 + B)) inside its mask, a different field per stack; the rest of the simulation (poses,
    masks) is unchanged, and truth.json records the field."""
    gt, aff = _gt()
    kw = dict(thickness=2.0, pixel=3.0, seed=6, motion_rotation=2.0, log=lambda s: None)
    plain = simulate_stacks(gt, aff, gt > 20, str(tmp_path / "a"), **kw)
    biased = simulate_stacks(gt, aff, gt > 20, str(tmp_path / "b"), bias_field=0.2, **kw)
    a = load_stacks(
        [str(tmp_path / "a" / f"stack_{i:02d}.nii.gz") for i in range(3)],
        [str(tmp_path / "a" / f"mask_{i:02d}.nii.gz") for i in range(3)],
    )
    b = load_stacks(
        [str(tmp_path / "b" / f"stack_{i:02d}.nii.gz") for i in range(3)],
        [str(tmp_path / "b" / f"mask_{i:02d}.nii.gz") for i in range(3)],
    )
    ranges = []
    for sa, sb, ta, tb in zip(a, b, plain["stacks"], biased["stacks"]):
        assert np.array_equal(sa.mask, sb.mask)
        assert all(np.allclose(x["matrix"], y["matrix"]) for x, y in zip(ta["slices"], tb["slices"]))
        m = sa.mask & (sa.data > 1.0)
        ratio = sb.data[m] / sa.data[m]
        lo, hi = float(ratio.min()), float(ratio.max())
        assert lo >= 1 / 1.2 - 1e-3 and hi <= 1.2 + 1e-3
        assert hi > 1.19 or lo < 1 / 1.19  # the field reaches its bound in the mask
        assert tb["bias_field"]["range_in_mask"] == pytest.approx([lo, hi], abs=0.02)
        ranges.append((lo, hi))
    assert len({tuple(np.round(t["bias_field"]["linear"], 6)) for t in biased["stacks"]}) == 3  # one per stack
    assert len(ranges) == 3
    assert biased["settings"]["bias_field"] == 0.2 and "bias_field" not in plain["stacks"][0]


def test_session_field_is_one_field_of_the_scanner(tmp_path):
    """--bias-shared 1: every stack carries the same field of the scanner (one coil for the session),
    so two stacks' ratios to the field-free ones agree wherever both reach the same scanner position;
    --bias-shared 0 draws as before; a share beyond 1 is a one-line error."""
    gt, aff = _gt()
    kw = dict(thickness=2.0, pixel=3.0, seed=6, log=lambda s: None)
    own = simulate_stacks(gt, aff, gt > 20, str(tmp_path / "own"), bias_field=0.2, **kw)
    zero = simulate_stacks(gt, aff, gt > 20, str(tmp_path / "zero"), bias_field=0.2, bias_shared=0.0, **kw)
    one = simulate_stacks(gt, aff, gt > 20, str(tmp_path / "one"), bias_field=0.2, bias_shared=1.0, **kw)
    half = simulate_stacks(gt, aff, gt > 20, str(tmp_path / "half"), bias_field=0.2, bias_shared=0.5, **kw)
    for a, b in zip(own["stacks"], zero["stacks"]):
        assert a["bias_field"] == b["bias_field"]
    coef = [(tuple(np.round(t["bias_field"]["linear"], 9)), t["bias_field"]["range_in_mask"]) for t in one["stacks"]]
    assert len({c[0] for c in coef}) == 1  # one polynomial for all
    for t_own, t_one, t_half in zip(own["stacks"], one["stacks"], half["stacks"]):
        mix = 0.5 * np.asarray(t_own["bias_field"]["quadratic"]) + 0.5 * np.asarray(t_one["bias_field"]["quadratic"])
        assert np.allclose(t_half["bias_field"]["quadratic"], mix)
    # the same scanner field: the stacks' voxel ratios follow one polynomial of the scanner position
    simulate_stacks(gt, aff, gt > 20, str(tmp_path / "plain"), **kw)
    assert one["settings"]["bias_shared"] == 1.0
    logs = []
    for i in range(3):
        a = load_stacks([str(tmp_path / "plain" / f"stack_{i:02d}.nii.gz")])[0]
        b = load_stacks([str(tmp_path / "one" / f"stack_{i:02d}.nii.gz")])[0]
        m = a.data > 1.0
        ijk = np.argwhere(m).astype(float)
        pos = ijk @ a.affine[:3, :3].T + a.affine[:3, 3]
        logs.append((pos, np.log(b.data[m] / a.data[m])))
    bf, c, r = (
        one["stacks"][0]["bias_field"],
        np.asarray(one["centre_mm"]),
        one["stacks"][0]["bias_field"]["position_units_mm"],
    )
    for pos, lr in logs:
        u = (pos - c) / r
        p = u @ np.asarray(bf["linear"]) + 0.5 * np.einsum("ni,ij,nj->n", u, np.asarray(bf["quadratic"]), u)
        assert np.abs(lr - p).max() < 2e-3  # float32 stacks


def test_session_field_share_out_of_range(tmp_path, capsys):
    gt, aff = _gt()
    g = write_nifti(tmp_path / "gt.nii.gz", gt, aff)
    rc = main(["simulate", g, "--output-dir", str(tmp_path / "x"), "--bias-field", "0.1", "--bias-shared", "1.5"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --bias-shared: is a part of the field, 0 to 1; got 1.5"]
    assert not (tmp_path / "x").exists()


def test_stack_fields_are_found_and_divided_out(tmp_path):
    """Stacks simulated with their own 20 % fields: the reconstruction finds and divides out a field
    per stack (relative to the others) of more than 10 % across its mask; ``stack_bias`` off, none."""
    from mgaussian.metrics import score_volume
    from mgaussian.recon.config import config_from_dict
    from mgaussian.recon.pipeline import reconstruct

    gt, aff = _gt()
    d = tmp_path / "b"
    simulate_stacks(gt, aff, gt > 20, str(d), thickness=2.0, pixel=1.5, seed=2, bias_field=0.2, log=lambda s: None)
    stacks = load_stacks(
        [str(d / f"stack_{i:02d}.nii.gz") for i in range(3)], [str(d / f"mask_{i:02d}.nii.gz") for i in range(3)]
    )
    logs = []
    cfg = config_from_dict({"iterations": [0, 0], "cg_iterations": 10, "motion": False, "threads": 1})
    res = reconstruct(stacks, cfg, progress=False, log=logs.append)
    lines = [s for s in logs if "intensity field" in s]
    assert len(lines) == 3 and "stack_bias_s" in res.timings
    spans = [
        float(s.split("field ")[1].split(" ")[0].split("-")[1]) - float(s.split("field ")[1].split("-")[0])
        for s in lines
    ]
    assert max(spans) > 0.1  # 20 % fields, relative to each other: a visible correction
    # they showed fields, so the one they share is divided out of the model after the fit
    assert "shared_field_s" in res.timings and any("the field the stacks share" in s for s in logs)
    kept = reconstruct(
        stacks, config_from_dict({**cfg.to_dict(), "shared_field": False}), progress=False, log=lambda s: None
    )
    assert "shared_field_s" not in kept.timings
    psnr = {k: score_volume(r.volume, r.affine, gt, aff, gt > 20)["psnr"] for k, r in (("with", res), ("kept", kept))}
    assert psnr["with"] > psnr["kept"], psnr
    off = reconstruct(
        stacks, config_from_dict({**cfg.to_dict(), "stack_bias": False}), progress=False, log=lambda s: None
    )
    assert "stack_bias_s" not in off.timings and "shared_field_s" not in off.timings
