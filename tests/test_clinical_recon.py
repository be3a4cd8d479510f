"""reconstruct's clinical options (issue 19): slice order recorded, reference stack and exclusion
from the assessment, atlas-space output (--template), and their one-line errors."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti
from scipy.stats import spearmanr

from mgaussian.cli import main
from mgaussian.metrics import score_volume
from mgaussian.sampling import resample_volume
from mgaussian.simulate import simulate_stacks

FAST = {"iterations": [0, 10], "cg_iterations": 15}


def _phantom(shape=(36, 40, 34), spacing=1.2, seed=0):
    """A brain-like ellipsoid with asymmetric bright lumps (so that an orientation is defined)."""
    rng = np.random.default_rng(seed)
    ii = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    c0 = (np.array(shape) - 1) / 2
    brain = (((ii - c0) / (np.array(shape) * 0.36)) ** 2).sum(-1) < 1
    g = np.where(brain, 40.0, 0.0)
    for _ in range(8):
        c = c0 + rng.uniform(-7, 7, 3)
        g += rng.uniform(20, 60) * np.exp(-((ii - c) ** 2).sum(-1) / (2 * rng.uniform(1.5, 3.5) ** 2)) * brain
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = [-20, -25, -18]
    return g.astype(np.float32), aff, brain


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("clinical")
    g, aff, m = _phantom()
    # every stack turned 10 degrees (the fetus moved between stacks): the volume is not in the
    # ground truth's frame, only --template brings it there
    simulate_stacks(
        g, aff, m, str(d / "sim"), thickness=3.6, pixel=1.2, seed=0, stack_motion=(10.0, 3.0), log=lambda s: None
    )
    cfg = d / "cfg.json"
    cfg.write_text(json.dumps(FAST))
    return {
        "dir": d,
        "gt": write_nifti(d / "gt.nii.gz", g, aff),
        "mask": write_nifti(d / "m.nii.gz", m.astype(np.uint8), aff),
        "stacks": [str(d / "sim" / f"stack_{i:02d}.nii.gz") for i in range(3)],
        "masks": [str(d / "sim" / f"mask_{i:02d}.nii.gz") for i in range(3)],
        "cfg": str(cfg),
    }


def _recon(case, out, *extra, report_dir=None):
    report = ["--no-report"] if report_dir is None else ["--output-report", str(report_dir)]
    return main(
        [
            "reconstruct",
            "--input-stacks",
            *case["stacks"],
            "--stack-masks",
            *case["masks"],
            "--output-volume",
            str(out),
            "--config",
            case["cfg"],
            "--quiet",
            *report,
            *extra,
        ]
    )


def test_template_output_order_and_assessment_recorded(case, tmp_path):
    out = tmp_path / "rec.nii.gz"
    log = tmp_path / "run.log"
    assert _recon(case, out, "--template", case["gt"], "--template-mask", case["mask"], "--log", str(log)) == 0
    names = sorted(os.listdir(tmp_path))
    assert names == [
        "rec.config.json",
        "rec.nii.gz",
        "rec.poses.json",
        "rec.template.json",
        "rec.template.tfm",
        "rec_native.nii.gz",
        "run.log",
    ]
    gt = nib.load(case["gt"])
    img = nib.load(str(out))
    assert img.shape == gt.shape and np.allclose(img.affine, gt.affine)
    g, m = gt.get_fdata(), nib.load(case["mask"]).get_fdata() > 0
    nat = nib.load(str(tmp_path / "rec_native.nii.gz"))
    on_template = score_volume(img.get_fdata(), img.affine, g, gt.affine, m)
    native = score_volume(nat.get_fdata(), nat.affine, g, gt.affine, m)
    assert on_template["ncc"] > 0.9 and on_template["psnr"] > native["psnr"] + 5  # the native one is turned
    meta = json.loads((tmp_path / "rec.config.json").read_text())
    # as good as the native volume put back by the true motion of the reference stack, whose frame it is in
    truth = json.loads((case["dir"] / "sim" / "truth.json").read_text())
    ref = case["stacks"].index(meta["assessment"]["reference_stack"])
    M = np.asarray(truth["stacks"][ref]["stack_motion_matrix"])
    oracle = resample_volume(nat.get_fdata(), nat.affine, g.shape, np.linalg.inv(M) @ gt.affine)
    assert on_template["psnr"] > score_volume(oracle, gt.affine, g, gt.affine, m)["psnr"] - 0.5
    assert meta["template"]["transform"] == "rigid" and meta["output_volume_native"].endswith("rec_native.nii.gz")
    assert 5.0 < meta["template"]["rotation_deg"] < 15.0
    for inp in meta["inputs"]:
        assert inp["slice_order_from"].startswith("sidecar SliceTiming") and len(inp["slice_order_ranks"]) > 5
    assert meta["assessment"]["reference_from"] == "assessment" and meta["assessment"]["excluded"] == []
    assert len(meta["assessment"]["stacks"]) == 3
    text = log.read_text()
    assert "slice acquisition order:" in text and "assess: reference stack" in text and "template gt.nii.gz" in text


def test_reference_and_exclusion_options(case, tmp_path, capsys):
    out = tmp_path / "r.nii.gz"
    assert _recon(case, out, "--reference-stack", "2", "--stack-exclude", "auto") == 0
    meta = json.loads((tmp_path / "r.config.json").read_text())
    assert meta["config"]["reference_stack"] == 2 and meta["assessment"]["reference_from"] == "option"
    assert meta["assessment"]["reference_stack"] == case["stacks"][2]
    capsys.readouterr()
    for args, line in [
        (["--reference-stack", "3"], "error: --reference-stack: 3 is not a stack index (0..2)"),
        (["--template", str(tmp_path / "no.nii.gz")], f"error: {tmp_path / 'no.nii.gz'}: file not found"),
        (["--template-mask", case["mask"]], "error: --template-mask: needs --template"),
        (["--stack-exclude", "all"], "error: --stack-exclude: invalid choice: 'all' (choose from 'off', 'auto')"),
    ]:
        bad = tmp_path / "bad.nii.gz"
        assert _recon(case, bad, *args) == 2
        assert capsys.readouterr().err.strip().splitlines() == [line]
        assert not bad.exists() and not (tmp_path / "bad_native.nii.gz").exists()


def test_report_shows_the_volume_in_atlas_space(case, tmp_path):
    """With --template the report holds the atlas-space view: the written volume above the
    template, on the template's grid, with the registration's NCC."""
    out = tmp_path / "rec.nii.gz"
    args = ["--template", case["gt"], "--template-mask", case["mask"]]
    assert _recon(case, out, *args, report_dir=tmp_path / "report") == 0
    page = (tmp_path / "report" / "index.html").read_text()
    assert "Atlas space" in page and 'src="atlas.png"' in page
    # each section names the volume it shows: the native one above, the atlas-space one in its own
    native = tmp_path / "rec_native.nii.gz"
    assert f"<h2>Reconstruction</h2><p>Volume <code>{native}</code>" in page
    assert f"<h3>Atlas space</h3><p>The volume <code>{out}</code> is written on the grid of template" in page
    png = tmp_path / "report" / "atlas.png"
    assert png.exists() and png.stat().st_size > 10_000
    ncc = json.loads((tmp_path / "rec.config.json").read_text())["template"]["ncc_in_template_mask"]
    assert f"NCC {ncc:.4g} inside the template's mask" in page


def test_confidence_map_lies_on_the_grid_of_the_volume_it_describes(case, tmp_path, capsys):
    """With --template the confidence map is written on the template's grid beside the volume
    there, and its native twin (C_native) beside the native volume: each overlays its volume, and
    the template one is the native one carried by the volume's registration."""
    out, conf = tmp_path / "rec.nii.gz", tmp_path / "conf.nii.gz"
    args = ["--template", case["gt"], "--template-mask", case["mask"], "--output-confidence", str(conf)]
    assert _recon(case, out, *args) == 0
    vol, c = nib.load(str(out)), nib.load(str(conf))
    nat, c_nat = nib.load(str(tmp_path / "rec_native.nii.gz")), nib.load(str(tmp_path / "conf_native.nii.gz"))
    assert c.shape == vol.shape and np.allclose(c.affine, vol.affine)
    assert c_nat.shape == nat.shape and np.allclose(c_nat.affine, nat.affine)
    # the map's position term follows the volume's edges: its 1 - confidence ranks the written volume's
    # gradient where the map is defined, which the native map laid on the template's grid by its own
    # affine (turned 10 degrees and shifted by the stacks' motion) does far less (measured 0.60 / 0.40)
    v = np.asarray(vol.dataobj, np.float32)
    grad = np.sqrt(sum(gr**2 for gr in np.gradient(v)))
    ct = np.asarray(c.dataobj, np.float32)
    cn = resample_volume(np.asarray(c_nat.dataobj, np.float32), c_nat.affine, vol.shape, vol.affine)
    both = (ct > 0) & (cn > 0)
    rho = spearmanr(1 - ct[both], grad[both]).correlation
    rho_native = spearmanr(1 - cn[both], grad[both]).correlation
    assert rho > 0.5 and rho > rho_native + 0.1, (rho, rho_native)
    meta = json.loads((tmp_path / "rec.config.json").read_text())
    T = np.asarray(json.loads((tmp_path / "rec.template.json").read_text())["matrix_template_to_volume"])
    carried = resample_volume(np.asarray(c_nat.dataobj, np.float32), c_nat.affine, vol.shape, T @ vol.affine)
    assert np.abs(carried - np.asarray(c.dataobj)).max() < 1e-4  # float32 and the grid sampler
    assert meta["output_confidence"] == str(conf) and meta["output_confidence_native"] == str(
        tmp_path / "conf_native.nii.gz"
    )
    # the native map's path is checked before any work, like every output's
    capsys.readouterr()
    vol2, conf2 = tmp_path / "w_native.nii.gz", tmp_path / "w.nii.gz"
    assert _recon(case, vol2, "--template", case["gt"], "--output-confidence", str(conf2)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output-confidence: {vol2} (written beside it) is also the path of --output-volume"], err
    assert not vol2.exists() and not conf2.exists()
    # and the volume's native twin may not be another output either: named as an output, not an input
    clash = tmp_path / "u_native.nii.gz"
    assert _recon(case, tmp_path / "u.nii.gz", "--template", case["gt"], "--output-confidence", str(clash)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --output-volume: {clash} (written beside it) is also the path of --output-confidence"], err


def test_affine_template_transform_writes_the_volume_and_its_confidence(case, tmp_path):
    """--template-transform affine shears the template's grid in the model's frame, where the model
    cannot be rendered plane by plane: the volume there is the native one interpolated (it was an
    internal error before session 25), and the confidence map follows it."""
    out, conf = tmp_path / "a.nii.gz", tmp_path / "c.nii.gz"
    args = ["--template", case["gt"], "--template-mask", case["mask"], "--template-transform", "affine"]
    assert _recon(case, out, *args, "--output-confidence", str(conf)) == 0
    gt, img, c = nib.load(case["gt"]), nib.load(str(out)), nib.load(str(conf))
    assert img.shape == gt.shape == c.shape and np.allclose(img.affine, gt.affine) and np.allclose(c.affine, gt.affine)
    meta = json.loads((tmp_path / "a.template.json").read_text())
    assert meta["transform"] == "affine" and meta["matrix_convention"].endswith("(trilinear)")
    g, m = gt.get_fdata(), nib.load(case["mask"]).get_fdata() > 0
    assert score_volume(img.get_fdata(), img.affine, g, gt.affine, m)["ncc"] > 0.9
    assert (tmp_path / "c_native.nii.gz").exists() and float(np.asarray(c.dataobj)[m].mean()) > 0.3
