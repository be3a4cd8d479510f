import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import write_nifti

from mgaussian.cli import main
from mgaussian.io import load_stacks
from mgaussian.metrics import score_volume
from mgaussian.recon.config import ReconConfig, config_from_dict
from mgaussian.recon.pipeline import reconstruct
from mgaussian.simulate import simulate_stacks

# shared_field_min_range: N4 takes this phantom's smooth blobs for a field spanning 21 % (brains
# without a field: 0.3-5 %; benchmarks/TUNING.md session 30), so the shared-field step runs here
# only where the stacks' fields differ, as before session 30, and these tests check the fit
FAST = {"iterations": [0, 15], "cg_iterations": 20, "shared_field_min_range": 1.0}


def _phantom(shape=(36, 40, 34), spacing=1.2, seed=0):
    rng = np.random.default_rng(seed)
    ii = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    g = np.zeros(shape)
    c0 = (np.array(shape) - 1) / 2
    brain = (((ii - c0) / (np.array(shape) * 0.36)) ** 2).sum(-1) < 1
    g[brain] = 40
    for _ in range(8):
        c = c0 + rng.uniform(-7, 7, 3)
        g += rng.uniform(20, 60) * np.exp(-((ii - c) ** 2).sum(-1) / (2 * rng.uniform(1.5, 3.5) ** 2)) * brain
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = [-20, -25, -18]
    return g.astype(np.float32), aff, brain


def simulate_phantom(d, **kw):
    """The phantom's three stacks (axial, coronal, oblique sagittal; 3.6 mm slices, 1.2 mm pixels)
    simulated into ``d/sim`` with the simulator's options ``kw``: (gt, affine, mask, stacks, masks)."""
    g, aff, m = _phantom()
    simulate_stacks(
        g,
        aff,
        m,
        str(d / "sim"),
        orientations=["axial", "coronal", "sagittal@8,0,-6"],
        thickness=3.6,
        pixel=1.2,
        log=lambda s: None,
        **kw,
    )
    stacks = [str(d / "sim" / f"stack_{i:02d}.nii.gz") for i in range(3)]
    masks = [str(d / "sim" / f"mask_{i:02d}.nii.gz") for i in range(3)]
    return g, aff, m, stacks, masks


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    d = tmp_path_factory.mktemp("recon")
    g, aff, m, _, _ = simulate_phantom(d, seed=0)
    gp = write_nifti(d / "gt.nii.gz", g, aff)
    mp = write_nifti(d / "m.nii.gz", m.astype(np.uint8), aff)
    stacks = [str(d / "sim" / f"stack_{i:02d}.nii.gz") for i in range(3)]
    masks = [str(d / "sim" / f"mask_{i:02d}.nii.gz") for i in range(3)]
    return {"dir": d, "gt": g, "aff": aff, "mask": m, "gp": gp, "mp": mp, "stacks": stacks, "masks": masks}


def test_reconstruct_beats_naive_and_overlays_truth(case):
    from mgaussian.baselines import naive_average

    st = load_stacks(case["stacks"], case["masks"], [3.6])
    res = reconstruct(st, config_from_dict(FAST), progress=False, log=lambda s: None)
    sc = score_volume(res.volume, res.affine, case["gt"], case["aff"], case["mask"])
    naive = naive_average([(s.data, s.affine) for s in st], case["gt"].shape, case["aff"])
    sn = score_volume(naive, case["aff"], case["gt"], case["aff"], case["mask"])
    assert sc["psnr"] > sn["psnr"] + 2.0, (sc, sn)
    # away from the phantom's hard 40 -> 0 edge (which thick slices blur) the fit is close
    from scipy import ndimage

    ero = ndimage.binary_erosion(case["mask"], iterations=2)
    si = score_volume(res.volume, res.affine, case["gt"], case["aff"], ero)
    ni = score_volume(naive, case["aff"], case["gt"], case["aff"], ero)
    assert si["psnr"] > 35.0 and si["psnr"] > ni["psnr"] + 6.0, (si, ni)
    # the output lies on the first stack's lattice (its voxel (0,0,0) is a grid node) at 1.2 mm,
    # written 2 x finer (output_oversampling): every other voxel is a node of that grid
    A0 = st[0].affine
    ijk = np.linalg.inv(res.affine) @ A0[:, 3]
    assert np.allclose(ijk[:3] / 2, np.round(ijk[:3] / 2), atol=1e-4)
    assert np.allclose(np.linalg.norm(res.affine[:3, :3], axis=0), 0.6)
    # poses are carried per slice (no motion here: they stay near identity) and intensities are
    # in the input units
    assert [len(p["rotvec"]) for p in res.poses] == [len(p["slices"]) for p in res.poses]
    fixed = reconstruct(
        st,
        config_from_dict(dict(FAST, motion=False, register_stacks=False, iterations=[0, 0])),
        progress=False,
        log=lambda s: None,
    )
    assert all(np.allclose(p["rotvec"], 0) and np.allclose(p["translation_mm"], 0, atol=1e-5) for p in fixed.poses)
    inside = case["mask"]
    assert 0.7 < np.percentile(res.volume[res.volume > 0], 99) / np.percentile(case["gt"][inside], 99) < 1.3


def test_ablation_switches_change_the_result(case):
    st = load_stacks(case["stacks"], case["masks"], [3.6])
    base = config_from_dict(FAST)
    a = reconstruct(st, base, progress=False, log=lambda s: None).volume
    b = reconstruct(st, base.resolved(use_psf=False), progress=False, log=lambda s: None).volume
    assert a.shape == b.shape and not np.allclose(a, b)


def test_cli_reconstruct_outputs_and_sample_volume(case, tmp_path, capsys):
    cfgp = tmp_path / "cfg.json"
    cfgp.write_text(json.dumps(FAST))
    out = tmp_path / "rec.nii.gz"
    model = tmp_path / "rec.pt"
    before = {p: open(p, "rb").read() for p in case["stacks"]}
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *case["stacks"],
            "--stack-masks",
            *case["masks"],
            "--thicknesses",
            "3.6",
            "--output-volume",
            str(out),
            "--output-model",
            str(model),
            "--config",
            str(cfgp),
            "--quiet",
            "--no-nrf",
        ]
    )
    assert rc == 0
    img = nib.load(str(out))
    meta = json.loads((tmp_path / "rec.config.json").read_text())
    assert meta["config"]["use_nrf"] is False and meta["config"]["iterations"] == [0, 15]
    assert meta["config"]["output_resolution"] == pytest.approx(1.2)
    assert all(open(p, "rb").read() == before[p] for p in case["stacks"])
    assert sorted(os.listdir(tmp_path)) == [
        "cfg.json",
        "rec.config.json",
        "rec.nii.gz",
        "rec.poses.json",
        "rec.pt",
        "rec_report",
    ]
    poses = json.loads((tmp_path / "rec.poses.json").read_text())
    assert len(poses["poses"]) == 3 and len(poses["slice_weights"]) == 3 and len(poses["centre_mm"]) == 3
    # sample-volume at the same resolution reproduces the volume; at 2.4 mm it still overlays
    s1 = tmp_path / "s1.nii.gz"
    assert main(["sample-volume", "--input-model", str(model), "--output-volume", str(s1)]) == 0
    a, b = img.get_fdata(), nib.load(str(s1)).get_fdata()
    assert np.allclose(a, b, atol=1e-3 * a.max())
    s2 = tmp_path / "s2.nii.gz"
    assert (
        main(["sample-volume", "--input-model", str(model), "--output-volume", str(s2), "--output-resolution", "2.4"])
        == 0
    )
    i2 = nib.load(str(s2))
    assert np.allclose(np.linalg.norm(i2.affine[:3, :3], axis=0), 2.4)
    sc1 = score_volume(a, img.affine, case["gt"], case["aff"], case["mask"])
    sc2 = score_volume(i2.get_fdata(), i2.affine, case["gt"], case["aff"], case["mask"])
    assert sc2["ncc"] > 0.85 and sc1["ncc"] > sc2["ncc"]  # coarser, but in place (a flip or shift scores far lower)


def test_noisy_data_and_the_fine_level_take_their_own_cg_iterations():
    """``noisy_cg_iterations`` (an integer, or null for ``cg_iterations``) sets the warm starts'
    CG iterations where the slices' noise is above ``adam_max_noise``; on clean data the last
    level grown from a coarser one takes ``fine_cg_iterations`` (null: ``cg_iterations``), the others
    ``cg_iterations``."""
    from types import SimpleNamespace

    from mgaussian.errors import InputError
    from mgaussian.recon.levels import fit_iterations

    def on(noise, cfg, last=False, index=1):
        level = SimpleNamespace(last=last, index=index) if last else None
        return fit_iterations(SimpleNamespace(cfg=cfg, noise_sigma=noise), level)

    cfg = config_from_dict({"cg_iterations": 30, "noisy_cg_iterations": 18, "fine_cg_iterations": 24})
    assert on(0.001, cfg) == 30 and on(0.001, cfg, last=True) == 24
    assert on(0.001, cfg, last=True, index=0) == 30  # one level only: nothing grown
    assert on(0.02, cfg) == 18 and on(0.02, cfg, last=True) == 18
    assert on(0.02, config_from_dict({"cg_iterations": 25, "noisy_cg_iterations": None})) == 25
    assert on(0.001, config_from_dict({"cg_iterations": 25, "fine_cg_iterations": None}), last=True) == 25
    for key in ("noisy_cg_iterations", "fine_cg_iterations"):
        for bad in ("many", 2.5, True):
            with pytest.raises(InputError, match=key):
                config_from_dict({key: bad})
        with pytest.raises(InputError, match=key):
            config_from_dict({key: -1}).validate()


def test_config_errors(case, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"iterationz": [1, 2]}))
    out = str(tmp_path / "o.nii.gz")
    rc = main(["reconstruct", "--input-stacks", *case["stacks"], "--output-volume", out, "--config", str(bad)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "unknown setting 'iterationz'" in err and "\n" not in err
    bad.write_text(json.dumps({"batch_slices": "many"}))
    assert main(["reconstruct", "--input-stacks", *case["stacks"], "--output-volume", out, "--config", str(bad)]) == 2
    assert "wrong type" in capsys.readouterr().err
    assert (
        main(["reconstruct", "--input-stacks", *case["stacks"], "--output-volume", out, "--output-resolution", "0"])
        == 2
    )
    assert "--output-resolution" in capsys.readouterr().err
    assert main(["reconstruct", "--input-stacks", *case["stacks"], "--output-volume", case["stacks"][0]]) == 2
    assert "is also an input" in capsys.readouterr().err
    for where, why in ((tmp_path / "missing.json", "config file not found"), (tmp_path, "not a regular file")):
        assert (
            main(["reconstruct", "--input-stacks", *case["stacks"], "--output-volume", out, "--config", str(where)])
            == 2
        )
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {where}") and why in err and "\n" not in err
    assert not os.path.exists(out)


def test_config_values_are_checked():
    from mgaussian.errors import InputError

    assert config_from_dict({"time_budget_s": None}).time_budget_s is None
    for bad in ({"time_budget_s": -1}, {"iterations": [1]}, {"lr_decay": 0}, {"renderer": "rays"}, {"use_psf": 1}):
        with pytest.raises(InputError):
            config_from_dict(bad)
    for key in ("confidence_position_sd_mm", "confidence_position_smooth_mm"):
        assert getattr(config_from_dict({key: 0}), key) == 0  # 0: off / unsmoothed
        for value in (-0.1, float("nan")):
            with pytest.raises(InputError, match=f"{key}: must be a number >= 0"):
                config_from_dict({key: value})


def test_adam_updates_only_the_parameters_it_is_given(case):
    """By default Adam moves the Gaussians' centres and holds the rest at the warm start's values
    bit for bit; ``adam_parameters`` chooses the groups, and a name it does not know is an error."""
    from mgaussian.errors import InputError

    st = load_stacks(case["stacks"], case["masks"], [3.6])

    def fit(**kw):
        cfg = config_from_dict({**FAST, "motion": False, **kw})
        return reconstruct(st, cfg, progress=False, log=lambda s: None).field

    warm = fit(iterations=[0, 0])
    centres = fit(iterations=[0, 3])
    every = fit(iterations=[0, 3], adam_parameters=["means", "intensities", "log_scales", "quats"])
    for name in ("intensities", "log_scales", "quats"):
        assert torch.equal(getattr(centres, name), getattr(warm, name)), name
    assert (centres.means - warm.means).abs().max() > 1e-4
    assert (every.intensities - warm.intensities).abs().max() > 1e-4
    assert (every.log_scales - warm.log_scales).abs().max() > 1e-5
    for bad in ([], ["centres"], ["means", "colour"]):
        with pytest.raises(InputError, match="adam_parameters"):
            config_from_dict({"adam_parameters": bad})


def test_output_volume_uses_the_training_cutoff(case):
    from mgaussian.recon.output import render_volume

    st = load_stacks(case["stacks"], case["masks"], [3.6])
    cfg = config_from_dict({**FAST, "cutoff": 4.0, "iterations": [0, 3]})
    res = reconstruct(st, cfg, progress=False, log=lambda s: None)
    shape = res.volume.shape
    k = round(res.config.output_resolution / float(np.linalg.norm(res.affine[:3, 0])))  # written k x finer
    v4 = render_volume(res.field, res.nrf, shape, res.affine, res.region, cutoff=4.0, dilate_vox=2 * k)
    v3 = render_volume(res.field, res.nrf, shape, res.affine, res.region, cutoff=3.0, dilate_vox=2 * k)
    assert np.allclose(res.volume, np.clip(v4, 0, None) * res.scale, rtol=1e-5, atol=1e-4)
    assert not np.allclose(res.volume, np.clip(v3, 0, None) * res.scale, rtol=1e-3, atol=1e-2)


def test_cli_off_switches_reach_the_configuration(case, tmp_path):
    """Each --no-X switch turns exactly its own setting off in the saved configuration."""
    cfgp = tmp_path / "cfg.json"
    cfgp.write_text(json.dumps({"iterations": [0, 0], "cg_iterations": 2, "output_resolution": 2.4}))
    out = tmp_path / "rec.nii.gz"
    switches = {
        "--no-motion": "motion",
        "--no-registration": "register_stacks",
        "--no-robust": "robust",
        "--no-ssim": "use_ssim",
        "--no-growth": "growth",
        "--no-anisotropy": "use_anisotropy",
        "--no-psf": "use_psf",
        "--no-nrf": "use_nrf",
        "--no-auto-mask": "auto_mask",
    }
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *case["stacks"],
            "--stack-masks",
            *case["masks"],
            "--thicknesses",
            "3.6",
            "--output-volume",
            str(out),
            "--config",
            str(cfgp),
            "--quiet",
            "--no-report",
            *switches,
        ]
    )
    assert rc == 0
    got = json.loads((tmp_path / "rec.config.json").read_text())["config"]
    assert {k: got[k] for k in switches.values()} == {k: False for k in switches.values()}
    defaults = ReconConfig()
    assert all(getattr(defaults, k) is True for k in switches.values() if k != "use_nrf")
    # and --bias-correction turns N4 on (off by default)
    assert got["bias_correction"] is False and ReconConfig().bias_correction is False


def test_volume_is_written_oversampled_on_a_grid_nested_in_the_resolution(case):
    """output_oversampling k: the volume on a grid k x finer than the output resolution's, with its
    every k-th voxel on that grid and the same values there (one fit, point evaluations of one
    model); render_result reproduces the written volume on its own grid."""
    from mgaussian.recon.output import render_result

    st = load_stacks(case["stacks"], case["masks"], [3.6])
    one = reconstruct(
        st,
        config_from_dict({**FAST, "iterations": [0, 2], "output_oversampling": 1}),
        progress=False,
        log=lambda s: None,
    )
    two = reconstruct(
        st,
        config_from_dict({**FAST, "iterations": [0, 2], "output_oversampling": 2}),
        progress=False,
        log=lambda s: None,
    )
    assert torch.equal(one.field.intensities, two.field.intensities)  # the fit does not depend on it
    assert two.volume.shape == tuple(2 * n - 1 for n in one.volume.shape)
    assert np.allclose(two.affine[:3, :3], one.affine[:3, :3] / 2) and np.allclose(two.affine[:3, 3], one.affine[:3, 3])
    assert np.allclose(two.volume[::2, ::2, ::2], one.volume, rtol=1e-5, atol=1e-5 * one.volume.max())
    assert np.array_equal(two.region[::2, ::2, ::2], one.region)
    again = render_result(two, two.volume.shape, two.affine)
    assert np.allclose(again, two.volume, rtol=1e-5, atol=1e-5 * two.volume.max())


def test_default_oversampling_falls_back_to_one_for_a_huge_written_grid():
    from mgaussian.recon.output import OVERSAMPLED_MAX_VOXELS, oversampling

    default = config_from_dict({}).output_oversampling
    assert default is None
    assert oversampling(default, (120, 140, 110)) == 2  # a fetal brain: 8.8M voxels written
    assert oversampling(default, (156, 193, 166)) == 1  # mni-t4 at 1 mm: 40M at 0.5 mm
    assert (2 * 156 - 1) * (2 * 193 - 1) * (2 * 166 - 1) > OVERSAMPLED_MAX_VOXELS
    assert oversampling(config_from_dict({"output_oversampling": 3}).output_oversampling, (156, 193, 166)) == 3
    with pytest.raises(Exception, match="output_oversampling"):
        config_from_dict({"output_oversampling": 0})
