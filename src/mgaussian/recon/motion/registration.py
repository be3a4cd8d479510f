"""Rigid stack-to-stack registration before fitting, with SimpleITK (a well-kept, widely used
registration library; it ships as a binary wheel): each stack's brain (intensities x mask, resampled
on a common isotropic grid) is registered rigidly to the reference stack's with a correlation
metric, a centre-of-mass start and a three-level pyramid; when the first try correlates poorly,
rotated starts are tried too."""

from __future__ import annotations

__all__ = ["register_stacks", "moved_stack"]

import math
from dataclasses import replace

import numpy as np

from ...geometry import rotvec_to_matrix
from ...io import Stack
from ...registration import correlation_rigid, transform_matrix
from ...sampling import resample_volume
from .poses import matrix_to_rotvec


def _registration_grid(stacks: list[Stack], spacing: float, margin_mm: float = 12.0):
    """An axis-aligned world grid (shape, affine) covering every stack's mask plus a margin."""
    los, his = [], []
    for st in stacks:
        idx = np.argwhere(st.mask)
        w = idx @ st.affine[:3, :3].T + st.affine[:3, 3]
        los.append(w.min(0))
        his.append(w.max(0))
    lo = np.min(los, 0) - margin_mm
    hi = np.max(his, 0) + margin_mm
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing) + 1)
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = lo
    return shape, aff


def _brain_on_grid(st: Stack, shape, aff) -> np.ndarray:
    from scipy import ndimage

    m = ndimage.binary_dilation(st.mask, iterations=1) if st.mask.any() and not st.mask.all() else st.mask
    v = resample_volume((st.data * m).astype(np.float32), st.affine, shape, aff)
    scale = float(np.percentile(st.data[st.mask], 99)) if st.mask.any() else 1.0
    return v / (scale if scale > 0 else 1.0)


def _sitk_image(vol: np.ndarray, aff: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(np.float32))
    img.SetSpacing([float(aff[0, 0])] * 3)
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    return img


def _register_pair(fixed, moving, start_rotvec=(0.0, 0.0, 0.0), iterations: int = 150):
    """Rigid registration; returns (metric value (lower is better: -correlation), sitk transform)."""
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    init = sitk.CenteredTransformInitializer(fixed, moving, tx, sitk.CenteredTransformInitializerFilter.MOMENTS)
    init = sitk.Euler3DTransform(init)
    if any(start_rotvec):
        R = rotvec_to_matrix(np.asarray(start_rotvec, dtype=np.float64))
        init.SetMatrix([float(v) for v in R.ravel()])
    value = correlation_rigid(
        fixed, moving, init, iterations=iterations, learning_rate=2.0, min_step=1e-3, gradient_tolerance=1e-8
    )
    return value, init


def register_stacks(
    stacks: list[Stack], reference: int = 0, spacing: float | None = None, log=print, good_correlation: float = 0.85
) -> list[np.ndarray]:
    """Rigid pose (4x4, header -> reference frame) of every stack; the reference's is identity.

    Robust to offsets of >= 10 mm and >= 15 degrees: the start aligns the brains' centres of mass
    (moments), the pyramid (4x, 2x, 1x) widens the capture range, and when the result correlates
    below ``good_correlation`` eight rotated starts (+-25 degrees about each axis, and two
    diagonals) are tried and the best kept."""
    import SimpleITK as sitk

    if spacing is None:
        fin = min(min(s.frames.spacing) for s in stacks)
        spacing = float(min(max(2.0 * fin, 1.2), 3.0))
    shape, aff = _registration_grid(stacks, spacing)
    fixed = _sitk_image(_brain_on_grid(stacks[reference], shape, aff), aff)
    poses = []
    for i, st in enumerate(stacks):
        if i == reference:
            poses.append(np.eye(4))
            continue
        moving = _sitk_image(_brain_on_grid(st, shape, aff), aff)
        best = _register_pair(fixed, moving)
        if -best[0] < good_correlation:
            a = math.radians(25.0)
            starts = (
                [(s * a, 0, 0) for s in (1, -1)]
                + [(0, s * a, 0) for s in (1, -1)]
                + [(0, 0, s * a) for s in (1, -1)]
                + [(a / 1.7, a / 1.7, a / 1.7), (-a / 1.7, -a / 1.7, -a / 1.7)]
            )
            for r0 in starts:
                cand = _register_pair(fixed, moving, r0)
                if cand[0] < best[0]:
                    best = cand
        M = transform_matrix(best[1])  # reference point -> moving stack's header point
        P = np.linalg.inv(M)  # moving header -> reference frame: the stack's pose
        ang = math.degrees(np.linalg.norm(matrix_to_rotvec(P[:3, :3])))
        log(
            f"stack {st.name}: registered to {stacks[reference].name} (correlation {-best[0]:.3f}; "
            f"{ang:.1f} deg, {np.linalg.norm(P[:3, 3] + P[:3, :3] @ _centre(st) - _centre(st)):.1f} mm at its centre)"
        )
        poses.append(P)
    del sitk
    return poses


def _centre(st: Stack) -> np.ndarray:
    idx = np.argwhere(st.mask) if st.mask.any() else np.argwhere(np.ones(st.mask.shape, bool))
    return idx.mean(0) @ st.affine[:3, :3].T + st.affine[:3, 3]


def moved_stack(st: Stack, P: np.ndarray) -> Stack:
    """The stack with its header moved by the rigid pose P (for grids, masks and the start)."""
    A = P @ st.affine
    from ...geometry import slice_frames

    return replace(st, affine=A, frames=slice_frames(A, st.data.shape))
