"""Every bad input ends in one line ``error: <file or option>: <what>``, exit 2, nothing written."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from mgaussian.cli import main


def _vol(shape=(12, 12, 8)):
    return np.random.default_rng(0).uniform(1, 2, shape).astype(np.float32)


def _run(capsys, argv, where):
    rc = main(argv)
    cap = capsys.readouterr()
    lines = [l for l in cap.err.strip().splitlines() if l]
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error: "), lines[0]
    assert where in lines[0], lines[0]
    assert "Traceback" not in cap.err + cap.out
    return lines[0]


@pytest.fixture
def files(tmp_path):
    aff = np.diag([1.0, 1.0, 3.0, 1.0])
    f = {"dir": tmp_path}
    f["good"] = write_nifti(tmp_path / "good.nii.gz", _vol(), aff)
    f["good2"] = write_nifti(tmp_path / "good2.nii.gz", _vol(), aff)
    f["mask"] = write_nifti(tmp_path / "mask.nii.gz", np.ones((12, 12, 8), np.uint8), aff)
    f["text"] = str(tmp_path / "notes.nii.gz")
    open(f["text"], "w").write("this is not an image\n")
    raw = gzip.compress(nib.Nifti1Image(_vol((40, 40, 20)), aff).to_bytes())
    f["trunc"] = str(tmp_path / "trunc.nii.gz")
    open(f["trunc"], "wb").write(raw[: len(raw) // 2])
    f["2d"] = write_nifti(tmp_path / "flat.nii.gz", np.ones((12, 12), np.float32))
    f["4d"] = write_nifti(tmp_path / "multi.nii.gz", np.ones((12, 12, 8, 3), np.float32))
    f["cplx"] = write_nifti(tmp_path / "cplx.nii.gz", (_vol() + 1j * _vol()).astype(np.complex64), aff)
    v = _vol()
    v[3, 4, 5] = np.nan
    f["nan"] = write_nifti(tmp_path / "nan.nii.gz", v, aff)
    v = _vol()
    v[1, 1, 1] = np.inf
    f["inf"] = write_nifti(tmp_path / "inf.nii.gz", v, aff)
    f["zero"] = write_nifti(tmp_path / "zero.nii.gz", np.zeros((12, 12, 8), np.float32), aff)
    f["mask_grid"] = write_nifti(tmp_path / "mask_grid.nii.gz", np.ones((10, 12, 8), np.uint8), aff)
    shifted = aff.copy()
    shifted[0, 3] = 7.0
    f["mask_aff"] = write_nifti(tmp_path / "mask_aff.nii.gz", np.ones((12, 12, 8), np.uint8), shifted)
    f["mask_empty"] = write_nifti(tmp_path / "mask_empty.nii.gz", np.zeros((12, 12, 8), np.uint8), aff)
    return f


def _listing(d):
    return sorted((p, os.path.getsize(os.path.join(d, p))) for p in os.listdir(d))


BAD_IMAGES = [
    ("missing", "file not found"),
    ("text", "not a NIfTI"),
    ("trunc", "truncated"),
    ("2d", "must be 3D"),
    ("4d", "volumes"),
    ("cplx", "complex"),
    ("nan", "NaN"),
    ("inf", "NaN or Inf"),
    ("zero", "all zeros"),
]


@pytest.mark.parametrize("key,msg", BAD_IMAGES)
def test_bad_stack_images(files, capsys, key, msg):
    p = files.get(key, str(files["dir"] / "nope.nii.gz"))
    before = _listing(files["dir"])
    line = _run(capsys, ["inspect", "--input-stacks", files["good"], p], p)
    assert msg in line
    assert _listing(files["dir"]) == before


@pytest.mark.parametrize("key,msg", BAD_IMAGES)
def test_bad_ground_truth_for_simulate(files, capsys, key, msg):
    p = files.get(key, str(files["dir"] / "nope.nii.gz"))
    out = files["dir"] / "sim_out"
    line = _run(capsys, ["simulate", p, "--output-dir", str(out)], p)
    assert msg in line
    assert not out.exists()


@pytest.mark.parametrize("key,msg", [("mask_grid", "grid"), ("mask_aff", "affine"), ("mask_empty", "empty")])
def test_bad_masks(files, capsys, key, msg):
    line = _run(capsys, ["inspect", "--input-stacks", files["good"], "--stack-masks", files[key]], files[key])
    assert msg in line


def test_non_positive_thickness(files, capsys):
    for t in ["0", "-3"]:
        line = _run(capsys, ["inspect", "--input-stacks", files["good"], "--thicknesses", t], "--thicknesses")
        assert "positive" in line
    _run(
        capsys, ["simulate", files["good"], "--output-dir", str(files["dir"] / "o"), "--thickness", "0"], "--thickness"
    )
    _run(
        capsys,
        [
            "evaluate",
            files["good"],
            "--heldout-stack",
            files["good2"],
            "--stack-mask",
            files["mask"],
            "--thickness",
            "-1",
        ],
        "--thickness",
    )
    _run(
        capsys,
        ["simulate", files["good"], "--output-dir", str(files["dir"] / "o"), "--thickness", "abc"],
        "--thickness",
    )


def test_count_mismatch(files, capsys):
    line = _run(
        capsys,
        ["inspect", "--input-stacks", files["good"], files["good2"], "--stack-masks", files["mask"]],
        "--stack-masks",
    )
    assert "1 masks given for 2 stacks" in line
    line = _run(
        capsys,
        ["inspect", "--input-stacks", files["good"], files["good2"], "--thicknesses", "3", "3", "3"],
        "--thicknesses",
    )
    assert "3 thicknesses given for 2 stacks" in line


def test_output_is_a_directory_or_an_input(files, capsys):
    d = files["dir"]
    before = _listing(d)
    good_bytes = open(files["good"], "rb").read()
    _run(
        capsys,
        [
            "naive-average",
            "--input-stacks",
            files["good"],
            "--reference-grid",
            files["good2"],
            "--output-volume",
            str(d),
        ],
        "--output-volume",
    )
    line = _run(
        capsys,
        [
            "naive-average",
            "--input-stacks",
            files["good"],
            "--reference-grid",
            files["good2"],
            "--output-volume",
            files["good"],
        ],
        "--output-volume",
    )
    assert "input" in line
    _run(
        capsys,
        [
            "naive-average",
            "--input-stacks",
            files["good"],
            "--reference-grid",
            files["good2"],
            "--output-volume",
            str(d / "missing" / "o.nii.gz"),
        ],
        "--output-volume",
    )
    line = _run(capsys, ["simulate", files["good"], "--output-dir", files["good"]], "--output-dir")
    assert _listing(d) == before
    assert open(files["good"], "rb").read() == good_bytes


def test_unknown_option_and_missing_pair(files, capsys):
    _run(capsys, ["simulate", files["good"], "--output-dir", "x", "--bogus"], "mgaussian")
    _run(capsys, ["evaluate", files["good"], "--reference", files["good2"]], "--mask")
    _run(capsys, ["evaluate", files["good"]], "evaluate")
    _run(capsys, ["simulate", files["good"], "--output-dir", "x", "--orientations", "diagonal"], "--orientations")


def test_command_line_process_exit_code(files, tmp_path):
    """The installed entry point itself: exit 2, one line, no traceback."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "mgaussian", "inspect", "--input-stacks", files["nan"]], capture_output=True, text=True
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr
