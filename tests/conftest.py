"""Shared helpers: every test makes its own small NIfTI files in a temporary folder."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest

# the many small runs of the suite do not each start the kernels' compile process (mgaussian/precompile.py;
# tests/test_precompile.py turns it on where it tests it)
os.environ.setdefault("MGAUSSIAN_PRECOMPILE", "0")


def write_nifti(path, data, affine=None, dtype=None):
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype)
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else np.asarray(affine, dtype=float))
    nib.save(img, str(path))
    return str(path)


def blob_volume(shape=(40, 44, 36), spacing=1.0, sigma=6.0, centre_vox=None, amp=100.0, affine=None):
    """An isotropic Gaussian blob (analytic phantom) on a voxel grid; returns (data, affine, centre_mm)."""
    if affine is None:
        affine = np.diag([spacing, spacing, spacing, 1.0])
        affine[:3, 3] = [-10.0, 5.0, 3.0]
    c = (np.asarray(shape) - 1) / 2 if centre_vox is None else np.asarray(centre_vox, float)
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    cw = c @ affine[:3, :3].T + affine[:3, 3]
    r2 = ((xyz - cw) ** 2).sum(-1)
    return (amp * np.exp(-0.5 * r2 / sigma**2)).astype(np.float32), affine, cw


@pytest.fixture
def small_case(tmp_path):
    """Three small stacks with masks on disk (from a blob phantom); returns dict of paths."""
    from mgaussian.simulate import simulate_stacks

    gt, aff, _ = blob_volume((30, 32, 28), spacing=1.5, sigma=8.0)
    gt += 5.0
    mask = gt > 20
    gp = write_nifti(tmp_path / "gt.nii.gz", gt, aff)
    mp = write_nifti(tmp_path / "gt_mask.nii.gz", mask.astype(np.uint8), aff)
    d = tmp_path / "sim"
    simulate_stacks(gt, aff, mask, str(d), thickness=4.5, seed=1, log=lambda s: None)
    return {
        "gt": gp,
        "mask": mp,
        "stacks": [str(d / f"stack_{i:02d}.nii.gz") for i in range(3)],
        "masks": [str(d / f"mask_{i:02d}.nii.gz") for i in range(3)],
        "dir": d,
    }
