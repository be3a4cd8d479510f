"""Leave-one-stack-out score for real data (no ground truth).

A reconstruction made without stack k is aligned rigidly to stack k (SimpleITK, inside the
stack's mask), stack k is simulated from it through the slice profile, and NCC and
gain/offset-matched PSNR (range of stack k in its mask) are reported inside stack k's mask.

SimpleITK is used for the rigid alignment because it is the field's well-kept registration
library (multi-resolution, robust optimisers); it is imported only here.
"""

from __future__ import annotations

__all__ = ["crop_to_mask", "register_rigid", "refine_alignment", "heldout_score"]

import numpy as np

from .geometry import rigid_matrix, slice_frames, voxel_sizes, voxel_to_world
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


def crop_to_mask(data: np.ndarray, affine: np.ndarray, mask: np.ndarray, margin_mm: float = 10.0):
    """The in-plane bounding box of ``mask`` plus ``margin_mm``: (data, affine, mask) cropped.

    Slices are kept whole along the third axis. The registration's optimiser scales and pyramid
    are set from the fixed image's extent, so a 36 cm field of view around a 9 cm brain leaves
    the rotations badly scaled (measured on the real stacks: NCC 0.40 uncropped, 0.80 cropped).
    """
    if not mask.any():
        return data, affine, mask
    sp = voxel_sizes(affine)
    ij = np.argwhere(mask.any(2))
    pad = np.ceil(margin_mm / sp[:2]).astype(int)
    lo = np.maximum(ij.min(0) - pad, 0)
    hi = np.minimum(ij.max(0) + 1 + pad, mask.shape[:2])
    A = np.array(affine, dtype=np.float64, copy=True)
    A[:3, 3] = voxel_to_world(A, [lo[0], lo[1], 0.0])
    sl = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    return data[sl], A, mask[sl]


def register_rigid(fixed, fixed_aff, fixed_mask, moving, moving_aff, iterations: int = 200) -> np.ndarray:
    """Rigid transform (4x4, world RAS mm) that maps points of ``fixed`` into ``moving``'s world.

    Correlation metric inside the fixed mask, centred Euler transform, three resolution levels;
    the fixed image is first cropped to its mask's bounding box (``crop_to_mask``).
    """
    import SimpleITK as sitk

    fixed, fixed_aff, fixed_mask = crop_to_mask(fixed, fixed_aff, fixed_mask)

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


def refine_alignment(
    recon, recon_aff, stack, stack_aff, stack_mask, thickness: float, profile: str, T0: np.ndarray, iterations: int = 6
) -> np.ndarray:
    """Refine a rigid alignment ``T0`` (stack world -> reconstruction world) on the score itself:
    the NCC, inside the stack's mask, of the stack simulated through its slice profile.

    Intensity registration compares the thick slices with the sharp volume, which leaves the
    rotation loosely fixed (a textured phantom turned (4, -3, 5) deg: found 4.9 deg off, NCC
    0.9853 against 0.9867 at the truth). Maximising NCC is least squares on z-scored values, so
    this is Levenberg-Marquardt on 6 parameters (rotation in degrees about the mask's centroid,
    translation in mm) with forward-difference Jacobians: 7 simulations an iteration. On that
    phantom it ends 0.25 deg from the truth in about 18 s.
    """
    stack, stack_aff, stack_mask = crop_to_mask(stack, stack_aff, stack_mask)
    M = stack_mask.astype(bool)
    if M.sum() < 10:
        return T0
    fr = slice_frames(stack_aff, stack.shape)
    y = _zscore(stack[M])
    c = voxel_to_world(stack_aff, np.argwhere(M).mean(0))

    def transform(p):
        return T0 @ rigid_matrix(np.deg2rad(p[:3]), p[3:], c)

    def residual(p):
        sim = sample_slices(
            recon,
            recon_aff,
            fr.origins,
            fr.axes,
            fr.shape,
            fr.spacing,
            thickness,
            profile,
            world_transform=transform(p),
        )
        return _zscore(sim[M]) - y

    p = np.zeros(6)
    r = residual(p)
    cost, lam, h = float(r @ r), 1e-3, 0.05
    for _ in range(iterations):
        J = np.stack([(residual(p + h * e) - r) / h for e in np.eye(6)], 1)
        g, H = J.T @ r, J.T @ J
        while lam < 1e6:
            step = -np.linalg.solve(H + lam * np.diag(np.diag(H) + 1e-12), g)
            rn = residual(p + step)
            if float(rn @ rn) < cost:
                p, r, cost, lam = p + step, rn, float(rn @ rn), lam / 3
                break
            lam *= 10
        else:
            break
        if np.abs(step).max() < 0.01:
            break
    return transform(p)


def _zscore(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    sd = v.std()
    return (v - v.mean()) / (sd if sd > 0 else 1.0)


def heldout_score(
    recon, recon_aff, stack, stack_aff, stack_mask, thickness: float, profile: str = "gaussian", align: bool = True
) -> dict:
    """NCC and PSNR of stack k predicted from a reconstruction that did not see it.

    The alignment is a rigid registration (``register_rigid``) refined on the score's own forward
    model (``refine_alignment``)."""
    T = np.eye(4)
    if align:
        T = register_rigid(stack, stack_aff, stack_mask, recon, recon_aff)
        T = refine_alignment(recon, recon_aff, stack, stack_aff, stack_mask, thickness, profile, T)
    fr = slice_frames(stack_aff, stack.shape)
    sim = sample_slices(
        recon, recon_aff, fr.origins, fr.axes, fr.shape, fr.spacing, thickness, profile, world_transform=T
    )
    M = stack_mask.astype(bool)
    y = stack[M].astype(np.float64)
    x = gain_offset_match(sim[M], y)
    rng = float(y.max() - y.min())
    # per slice (>= 50 mask pixels): which slices the volume predicts badly (motion within the stack)
    per = {}
    for k in range(stack.shape[2]):
        mk = M[:, :, k]
        if mk.sum() >= 50 and np.ptp(sim[:, :, k][mk]) > 0 and np.ptp(stack[:, :, k][mk]) > 0:
            per[str(k)] = ncc(sim[:, :, k][mk].astype(np.float64), stack[:, :, k][mk].astype(np.float64))
    return {"ncc": ncc(x, y), "psnr": psnr(x, y, rng), "slice_ncc": per, "transform": T.tolist()}
