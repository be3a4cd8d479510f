"""Rigid stack-to-stack registration before fitting, with SimpleITK (a well-kept, widely used
registration library; it ships as a binary wheel): each stack's brain (intensities x mask, resampled
on a common isotropic grid) is registered rigidly to the reference stack's with a correlation
metric, a centre-of-mass start and a three-level pyramid; when the first try correlates poorly,
rotated starts are tried too."""

from __future__ import annotations

__all__ = ["register_stacks", "register_pair", "registration_grid", "registration_spacing", "same_grid", "moved_stack"]

import math
from dataclasses import replace

import numpy as np

from ...geometry import rotvec_to_matrix
from ...io import Stack
from ...registration import correlation_rigid, transform_matrix
from ...sampling import resample_volume
from .poses import matrix_to_rotvec


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


def registration_spacing(stacks: list[Stack]) -> float:
    """The registration grid's spacing: twice the finest pixel, within 1.2-3 mm."""
    fin = min(min(s.frames.spacing) for s in stacks)
    return float(min(max(2.0 * fin, 1.2), 3.0))


def registration_grid(stacks: list[Stack], spacing: float | None = None, margin_mm: float = 12.0):
    """The axis-aligned world grid (shape, affine) the stacks are registered on: covering every
    stack's mask plus a margin, at :func:`registration_spacing` unless given."""
    spacing = registration_spacing(stacks) if spacing is None else spacing
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


def same_grid(a, b) -> bool:
    return tuple(a[0]) == tuple(b[0]) and np.array_equal(a[1], b[1])


def register_pair(fixed_stack: Stack, stack: Stack, grid, good_correlation: float = 0.85) -> tuple[np.ndarray, float]:
    """Rigid pose (4x4, ``stack``'s header -> ``fixed_stack``'s frame) and its correlation, both
    brains resampled on ``grid`` (:func:`registration_grid`). Robust to offsets of >= 10 mm and
    >= 15 degrees: the start aligns the brains' centres of mass (moments), the pyramid (4x, 2x, 1x)
    widens the capture range, and when the result correlates below ``good_correlation`` eight
    rotated starts (+-25 degrees about each axis, and two diagonals) are tried and the best kept."""
    shape, aff = grid
    fixed = _sitk_image(_brain_on_grid(fixed_stack, shape, aff), aff)
    moving = _sitk_image(_brain_on_grid(stack, shape, aff), aff)
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
    M = transform_matrix(best[1])  # fixed point -> moving stack's header point
    return np.linalg.inv(M), -best[0]  # moving header -> fixed frame: the stack's pose


def register_stacks(
    stacks: list[Stack],
    reference: int = 0,
    spacing: float | None = None,
    log=print,
    good_correlation: float = 0.85,
    known: dict | None = None,
) -> list[np.ndarray]:
    """Rigid pose (4x4, header -> reference frame) of every stack; the reference's is identity.
    Each stack is registered to the reference by :func:`register_pair` on the stacks' common
    :func:`registration_grid`, except those in ``known`` ({stack index: (pose, correlation)}
    measured by that function on the same grid: the stack assessment's, ``mgaussian.assess``)."""
    grid = registration_grid(stacks, spacing)
    poses = []
    for i, st in enumerate(stacks):
        if i == reference:
            poses.append(np.eye(4))
            continue
        if known is not None and i in known:
            P, corr = known[i]
            how = "as the assessment registered it"
        else:
            P, corr = register_pair(stacks[reference], st, grid, good_correlation)
            how = "registered"
        ang = math.degrees(np.linalg.norm(matrix_to_rotvec(P[:3, :3])))
        log(
            f"stack {st.name}: {how} to {stacks[reference].name} (correlation {corr:.3f}; "
            f"{ang:.1f} deg, {np.linalg.norm(P[:3, 3] + P[:3, :3] @ _centre(st) - _centre(st)):.1f} mm at its centre)"
        )
        poses.append(P)
    return poses


def _centre(st: Stack) -> np.ndarray:
    idx = np.argwhere(st.mask) if st.mask.any() else np.argwhere(np.ones(st.mask.shape, bool))
    return idx.mean(0) @ st.affine[:3, :3].T + st.affine[:3, 3]


def moved_stack(st: Stack, P: np.ndarray) -> Stack:
    """The stack with its header moved by the rigid pose P (for grids, masks and the start)."""
    A = P @ st.affine
    from ...geometry import slice_frames

    return replace(st, affine=A, frames=slice_frames(A, st.data.shape))
