"""Leave-one-stack-out score for real data (no ground truth).

A reconstruction made without stack k is aligned rigidly to stack k (SimpleITK, inside the
stack's mask), stack k is simulated from it through the slice profile, and NCC and
gain/offset-matched PSNR (range of stack k in its mask) are reported inside stack k's mask.

SimpleITK is used for the rigid alignment because it is the field's well-kept registration
library (multi-resolution, robust optimisers); it is imported only here.
"""

from __future__ import annotations

__all__ = ["register_rigid", "heldout_score"]

import numpy as np

from .geometry import slice_frames, voxel_sizes
from .metrics import gain_offset_match, ncc, psnr
from .registration import correlation_rigid, transform_matrix
from .sampling import sample_slices

_FLIP = np.diag([-1.0, -1.0, 1.0])


def _to_sitk(data: np.ndarray, affine: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)).astype(np.float32))
    sp = voxel_sizes(affine)
    img.SetSpacing([float(s) for s in sp])
    D = _FLIP @ (affine[:3, :3] / sp[None, :])
    img.SetDirection([float(v) for v in D.ravel()])
    img.SetOrigin([float(v) for v in _FLIP @ affine[:3, 3]])
    return img


def register_rigid(fixed, fixed_aff, fixed_mask, moving, moving_aff, iterations: int = 200) -> np.ndarray:
    """Rigid transform (4x4, world RAS mm) that maps points of ``fixed`` into ``moving``'s world.

    Correlation metric inside the fixed mask, centred Euler transform, three resolution levels.
    """
    import SimpleITK as sitk

    f = _to_sitk(fixed, fixed_aff)
    m = _to_sitk(moving, moving_aff)
    fm = _to_sitk(fixed_mask.astype(np.float32), fixed_aff)
    fm = sitk.Cast(fm > 0.5, sitk.sitkUInt8)
    # start at identity in world space, rotation centre at the mask's centroid
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(fm)
    init = sitk.Euler3DTransform()
    init.SetCenter(stats.GetCentroid(1))
    correlation_rigid(f, m, init, iterations=iterations, learning_rate=1.0, min_step=1e-4, fixed_mask=fm)
    T = transform_matrix(init)  # in LPS; convert to RAS
    F = np.eye(4)
    F[:3, :3] = _FLIP
    return F @ T @ F


def heldout_score(recon, recon_aff, stack, stack_aff, stack_mask, thickness: float, profile: str = "gaussian", align: bool = True) -> dict:
    """NCC and PSNR of stack k predicted from a reconstruction that did not see it."""
    T = register_rigid(stack, stack_aff, stack_mask, recon, recon_aff) if align else np.eye(4)
    fr = slice_frames(stack_aff, stack.shape)
    sim = sample_slices(recon, recon_aff, fr.origins, fr.axes, fr.shape, fr.spacing, thickness, profile, world_transform=T)
    M = stack_mask.astype(bool)
    y = stack[M].astype(np.float64)
    x = gain_offset_match(sim[M], y)
    rng = float(y.max() - y.min())
    return {"ncc": ncc(x, y), "psnr": psnr(x, y, rng), "transform": T.tolist()}
