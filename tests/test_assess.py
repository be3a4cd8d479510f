"""Stack assessment (issue 19): motion within a stack, agreement with the others, ranking, CLI."""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from mgaussian.assess import assess_stacks, choose_reference, motion_index, stacks_to_exclude
from mgaussian.cli import main
from mgaussian.demo import demo_dir
from mgaussian.io import load_image, load_mask, load_stacks
from mgaussian.sampling import resample_volume
from mgaussian.simulate import simulate_stacks

ORIENT = ["axial", "coronal", "sagittal"]


def _atlas(name="srr.nii.gz", mask="mask.nii.gz", folder=None, spacing=1.6):
    """A shipped atlas on a coarser grid (fast to simulate from)."""
    d = folder or demo_dir()
    g, aff, _ = load_image(str(d / name))
    m = load_mask(str(d / mask), g.shape, aff)
    n = tuple(int(s * 0.8 / spacing) for s in g.shape)
    a2 = aff.copy()
    a2[:3, :3] = aff[:3, :3] / 0.8 * spacing
    return resample_volume(g, aff, n, a2), a2, resample_volume(m.astype(np.float32), aff, n, a2) > 0.5


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """Clean stacks, the same stacks moved between their two interleaved passes, a front-back mirror
    of the axial stack, and an axial stack of another (older) brain."""
    d = tmp_path_factory.mktemp("assess")
    g, aff, m = _atlas()
    kw = dict(thickness=3.2, pixel=2.0, seed=3, log=lambda s: None)
    simulate_stacks(g, aff, m, str(d / "clean"), orientations=ORIENT, **kw)
    simulate_stacks(g, aff, m, str(d / "moved"), orientations=ORIENT, stack_motion=(10.0, 4.0), **kw)
    out = {
        "dir": d,
        "clean": [str(d / "clean" / f"stack_{i:02d}.nii.gz") for i in range(3)],
        "masks": [str(d / "clean" / f"mask_{i:02d}.nii.gz") for i in range(3)],
    }
    # stack 1 (coronal) with its second pass acquired after the fetus moved 10 degrees and 4 mm
    ranks = json.loads((d / "clean" / "stack_01.json").read_text())["SliceTiming"]
    late = np.asarray(ranks) >= np.median(ranks)
    c, mv = nib.load(out["clean"][1]), nib.load(str(d / "moved" / "stack_01.nii.gz"))
    mixed = c.get_fdata().astype(np.float32)
    mixed[:, :, late] = mv.get_fdata()[:, :, late]
    cm, mm = nib.load(out["masks"][1]).get_fdata() > 0, nib.load(str(d / "moved" / "mask_01.nii.gz")).get_fdata() > 0
    mmask = cm.copy()
    mmask[:, :, late] = mm[:, :, late]
    out["passes_moved"] = write_nifti(d / "passes_moved.nii.gz", mixed, c.affine)
    out["passes_moved_mask"] = write_nifti(d / "passes_moved_mask.nii.gz", mmask.astype(np.uint8), c.affine)
    shutil.copy(d / "clean" / "stack_01.json", d / "passes_moved.json")
    # the axial stack mirrored front to back (a flipped header) under the same affine
    a = nib.load(out["clean"][0])
    out["flipped"] = write_nifti(d / "flipped.nii.gz", a.get_fdata()[:, ::-1].astype(np.float32), a.affine)
    out["flipped_mask"] = write_nifti(
        d / "flipped_mask.nii.gz", (nib.load(out["masks"][0]).get_fdata()[:, ::-1] > 0).astype(np.uint8), a.affine
    )
    # another subject: the 33-week atlas
    g33, a33, m33 = _atlas("fetal_ga33_t2w.nii.gz", "fetal_ga33_mask.nii.gz", demo_dir().parent / "templates")
    simulate_stacks(g33, a33, m33, str(d / "ga33"), orientations=["axial"], **kw)
    out["other"], out["other_mask"] = str(d / "ga33" / "stack_00.nii.gz"), str(d / "ga33" / "mask_00.nii.gz")
    return out


def test_motion_between_passes_raises_the_index(case):
    clean = load_stacks([case["clean"][1]], [case["masks"][1]])[0]
    moved = load_stacks([case["passes_moved"]], [case["passes_moved_mask"]])[0]
    a, b = motion_index(clean), motion_index(moved)
    assert a["passes"] == b["passes"] == 2
    assert a["motion_index"] < 0.6 < 1.0 < b["motion_index"]  # neighbours in space now disagree
    assert b["d2"] == pytest.approx(a["d2"], rel=0.35)  # the same-pass pairs still agree


def test_moved_stack_scores_below_clean_ones(case):
    stacks = load_stacks(
        case["clean"][:1] + [case["passes_moved"]] + case["clean"][2:],
        [case["masks"][0], case["passes_moved_mask"], case["masks"][2]],
    )
    rows = assess_stacks(stacks)
    assert rows[1]["score"] < min(rows[0]["score"], rows[2]["score"]) and rows[1]["rank"] == 3
    assert rows[1]["s_motion"] < 0.5 and rows[1]["agreement"] > 0.7  # its bulk still registers
    assert choose_reference(rows) in (0, 2)
    assert stacks_to_exclude(rows) == []  # motion alone halves the score at most: kept


def test_flipped_and_other_subject_score_worst(case):
    stacks = load_stacks(
        case["clean"] + [case["flipped"], case["other"]], case["masks"] + [case["flipped_mask"], case["other_mask"]]
    )
    rows = assess_stacks(stacks)
    assert {rows[3]["rank"], rows[4]["rank"]} == {4, 5}
    assert max(rows[3]["agreement"], rows[4]["agreement"]) < min(r["agreement"] for r in rows[:3]) - 0.2
    assert stacks_to_exclude(rows) == [3, 4] and choose_reference(rows) in (0, 1, 2)


def test_cli_json_fields(case, capsys):
    rc = main(
        [
            "assess",
            "--input-stacks",
            *case["clean"][:2],
            case["flipped"],
            "--stack-masks",
            *case["masks"][:2],
            case["flipped_mask"],
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"stacks", "reference_stack", "exclude_auto", "exclude_fraction_of_median", "masks"}
    row = out["stacks"][2]
    for k in (
        "stack",
        "score",
        "rank",
        "motion_index",
        "d1",
        "d2",
        "passes",
        "agreement",
        "agreement_with",
        "s_motion",
        "s_agreement",
        "slice_order_from",
    ):
        assert k in row
    assert row["rank"] == 3 and 0.0 <= row["score"] <= 1.0 and out["reference_stack"] in (0, 1)
    assert out["exclude_auto"] == [2]
    rc = main(["assess", "--input-stacks", *case["clean"][:2], "--stack-masks", *case["masks"][:2]])
    text = capsys.readouterr().out.splitlines()
    assert rc == 0 and text[0].split()[:4] == ["rank", "score", "motion", "agree"] and text[-1].startswith("reference:")


def test_reconstruct_finishes_the_assessments_registrations(case, monkeypatch):
    """The assessment registers its pairs up to the pyramid's coarse levels; the stack registration
    finishes the pairs with the reference from there, in the pair's direction, and ends exactly
    where a registration from scratch ends (the pyramid's levels run in two calls): a pair the
    other way round gives the inverse of that registration. No pair is registered from scratch."""
    from mgaussian.assess import reference_poses
    from mgaussian.recon.motion import registration
    from mgaussian.recon.motion.poses import matrix_to_rotvec

    stacks = load_stacks([case["passes_moved"]] + case["clean"][1:], [case["passes_moved_mask"]] + case["masks"][1:])
    poses = {}
    assess_stacks(stacks, poses=poses)
    assert set(poses) == {(0, 1), (0, 2), (1, 2)}
    grid = registration.registration_grid(stacks)
    fresh = registration.register_stacks(stacks, reference=1, log=lambda s: None)
    known = reference_poses(poses, 1, grid)
    assert set(known) == {0, 2} and known[2][1] is False and known[0][1] is True
    assert reference_poses(poses, 1, registration.registration_grid(stacks[1:])) == {}  # another grid
    # the coarse pose the assessment scored with is near the full registration's
    d = poses[(1, 2)][0] @ np.linalg.inv(fresh[2])
    assert np.degrees(np.linalg.norm(matrix_to_rotvec(d[:3, :3]))) < 1.0 and np.linalg.norm(d[:3, 3]) < 1.0
    scratch = []
    real_register = registration._register_pair
    monkeypatch.setattr(registration, "_register_pair", lambda *a, **k: scratch.append(a) or real_register(*a, **k))
    got = registration.register_stacks(stacks, reference=1, log=lambda s: None, known=known)
    assert scratch == []
    np.testing.assert_array_equal(got[2], fresh[2])  # (1, 2): the same registration, finished
    # (0, 1) registered stack 1 onto stack 0: the inverse of that registration poses stack 0
    back = registration.register_pair(stacks[0], stacks[1], grid)[0]
    np.testing.assert_array_equal(got[0], np.linalg.inv(back))
    d = got[0] @ np.linalg.inv(fresh[0])
    assert np.degrees(np.linalg.norm(matrix_to_rotvec(d[:3, :3]))) < 0.5 and np.linalg.norm(d[:3, 3]) < 1.0


def test_settled_pairs_are_skipped_without_changing_scores(case):
    """``all_pairs=False`` (reconstruct): with three clean stacks the pair (1, 2) is not registered
    (both already agree fully with stack 0), and the scores, ranks and reference stay; beside a
    stack that agrees with none, every pair that could move a score is still registered."""
    stacks = load_stacks(case["clean"], case["masks"])
    poses_full, poses_lazy = {}, {}
    full = assess_stacks(stacks, poses=poses_full)
    lazy = assess_stacks(stacks, poses=poses_lazy, all_pairs=False)
    assert set(poses_full) == {(0, 1), (0, 2), (1, 2)} and set(poses_lazy) == {(0, 1), (0, 2)}
    for key in ("score", "rank"):
        assert [r[key] for r in lazy] == [r[key] for r in full]
    assert choose_reference(lazy) == choose_reference(full)
    assert lazy[1]["agreement_with"][stacks[2].name] is None and lazy[1]["agreement"] >= 0.8
    for pair, (pose, *_) in poses_lazy.items():
        np.testing.assert_array_equal(pose, poses_full[pair][0])  # the same registrations
    bad = load_stacks(case["clean"] + [case["flipped"]], case["masks"] + [case["flipped_mask"]])
    poses_bad = {}
    rows = assess_stacks(bad, poses=poses_bad, all_pairs=False)
    assert {(0, 3), (1, 3), (2, 3)} <= set(poses_bad)  # the flipped stack is never settled
    assert rows[3]["rank"] == 4 and stacks_to_exclude(rows) == [3]
