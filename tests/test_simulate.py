import json
import math

import nibabel as nib
import numpy as np
import pytest
from conftest import blob_volume, write_nifti
from scipy.special import erf

from mgaussian.cli import main
from mgaussian.geometry import rigid_matrix, slice_frames
from mgaussian.psf import FWHM_TO_SIGMA
from mgaussian.simulate import simulate_stacks


def _analytic(xyz, frame_axes, centre, sigma0, amp, pixel, thickness, profile):
    """Exact slice integral of an isotropic Gaussian blob through the slice profile."""
    sp = 1.2 * pixel * FWHM_TO_SIGMA
    d = xyz - centre
    du = d @ frame_axes[0]
    dv = d @ frame_axes[1]
    dn = d @ frame_axes[2]
    s2 = sigma0**2 + sp**2
    inplane = (sigma0**2 / s2) * np.exp(-0.5 * (du**2 + dv**2) / s2)
    if profile == "gaussian":
        st = thickness * FWHM_TO_SIGMA
        t2 = sigma0**2 + st**2
        through = math.sqrt(sigma0**2 / t2) * np.exp(-0.5 * dn**2 / t2)
    else:
        h = thickness / 2
        through = (
            sigma0
            * math.sqrt(math.pi / 2)
            / thickness
            * (erf((h - dn) / (sigma0 * math.sqrt(2))) + erf((h + dn) / (sigma0 * math.sqrt(2))))
        )
    return amp * inplane * through


@pytest.mark.parametrize("profile", ["gaussian", "box"])
@pytest.mark.parametrize("orient", ["axial", "coronal", "sagittal@10,-20,30"])
def test_stack_matches_analytic_slice_integral(tmp_path, profile, orient):
    sigma0 = 5.0
    gt, aff, centre = blob_volume((100, 104, 96), spacing=0.5, sigma=sigma0)
    thickness, pixel = 4.0, 1.0
    truth = simulate_stacks(
        gt,
        aff,
        gt > 1e-3,
        str(tmp_path),
        orientations=[orient],
        thickness=thickness,
        pixel=pixel,
        profile=profile,
        motion_rotation=4.0,
        motion_translation=2.0,
        seed=3,
        log=lambda s: None,
    )
    img = nib.load(str(tmp_path / "stack_00.nii.gz"))
    data = img.get_fdata()
    fr = slice_frames(img.affine, data.shape)
    cw = np.asarray(truth["centre_mm"])
    errs = []
    for k, sl in enumerate(truth["stacks"][0]["slices"]):
        M = np.asarray(sl["matrix"])
        assert np.allclose(M, rigid_matrix(sl["rotvec"], sl["translation_mm"], cw))
        a, b = np.meshgrid(np.arange(data.shape[0]), np.arange(data.shape[1]), indexing="ij")
        p = fr.origins[k] + a[..., None] * fr.spacing[0] * fr.axes[k, 0] + b[..., None] * fr.spacing[1] * fr.axes[k, 1]
        p_true = p @ M[:3, :3].T + M[:3, 3]  # where the anatomy was
        ax_true = fr.axes[k] @ M[:3, :3].T
        exp = _analytic(p_true, ax_true, centre, sigma0, 100.0, pixel, thickness, profile)
        errs.append(np.abs(data[:, :, k] - exp).max())
    # trilinear interpolation of a 0.5 mm grid + quadrature: < 0.3% of the peak (100); leaving out
    # the in-plane PSF alone would cost ~1%, a wrong through-plane profile or pose far more
    assert max(errs) < 0.3, max(errs)


def test_simulate_cli_outputs_and_truth(tmp_path):
    gt, aff, _ = blob_volume((30, 34, 28), spacing=1.2, sigma=7.0)
    gp = write_nifti(tmp_path / "gt.nii.gz", gt + 10, aff)
    out = tmp_path / "out"
    # the same options twice: the same seed gives the same stacks
    options = [
        "--thickness",
        "3",
        "--gap",
        "0.6",
        "--motion-rotation",
        "3",
        "--motion-translation",
        "1.5",
        "--noise",
        "0.02",
        "--seed",
        "7",
        "--orientations",
        "axial",
        "coronal",
        "sagittal",
        "15,0,-10",
    ]
    rc = main(["simulate", gp, "--output-dir", str(out), *options])
    assert rc == 0
    truth = json.loads((out / "truth.json").read_text())
    assert len(truth["stacks"]) == 4
    dets = []
    for i, st in enumerate(truth["stacks"]):
        img = nib.load(str(out / st["file"]))
        m = nib.load(str(out / st["mask"])).get_fdata()
        assert img.shape == tuple(st["shape"]) and m.shape == img.shape and m.any()
        assert np.allclose(img.affine, st["affine"])
        # slice spacing = thickness + gap along the third axis
        assert np.isclose(np.linalg.norm(img.affine[:3, 2]), 3.6)
        dets.append(np.sign(np.linalg.det(img.affine[:3, :3])))
        for sl in st["slices"]:
            assert sl["rotation_deg"] <= 3.0 + 1e-9
            assert np.all(np.abs(sl["translation_mm"]) <= 1.5 + 1e-9)
    assert dets[:3] == [1, -1, 1]  # coronal stack stored left-handed, as scanners do
    assert truth["settings"]["noise_sigma"] > 0
    # same seed -> same stacks
    out2 = tmp_path / "out2"
    assert main(["simulate", gp, "--output-dir", str(out2), *options]) == 0
    a = nib.load(str(out / "stack_01.nii.gz")).get_fdata()
    b = nib.load(str(out2 / "stack_01.nii.gz")).get_fdata()
    assert np.array_equal(a, b)


def test_rician_noise_level(tmp_path):
    gt = np.full((20, 20, 20), 100.0, np.float32)
    aff = np.eye(4)
    simulate_stacks(
        gt,
        aff,
        np.ones_like(gt, bool),
        str(tmp_path),
        orientations=["axial"],
        thickness=2.0,
        noise=0.05,
        seed=0,
        log=lambda s: None,
    )
    d = nib.load(str(tmp_path / "stack_00.nii.gz")).get_fdata()[5:15, 5:15, 3:7]
    # sigma = 0.05 * 99th percentile (100) = 5; at SNR 20 Rician ~ Gaussian
    assert abs(d.std() - 5.0) < 0.6
    assert abs(d.mean() - math.sqrt(100**2 + 5**2)) < 0.8
