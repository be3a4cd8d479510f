"""Rigid stack-to-stack registration before fitting, with SimpleITK (a well-kept, widely used
registration library; it ships as a binary wheel): each stack's brain (intensities x mask, resampled
on a common isotropic grid) is registered rigidly to the reference stack's with a correlation
metric, a centre-of-mass start and a three-level pyramid; when the first try correlates poorly,
rotated starts are tried too. The stack assessment runs the pyramid's coarse levels for every pair
(:func:`coarse_pair`) and the registration finishes the pairs with the reference from there."""

from __future__ import annotations

__all__ = [
    "register_stacks",
    "register_pair",
    "coarse_pair",
    "BrainImages",
    "registration_grid",
    "registration_spacing",
    "same_grid",
    "moved_stack",
]

import math
from dataclasses import replace

import numpy as np

from ...geometry import rotvec_to_matrix
from ...io import Stack
from ...registration import COARSE_LEVELS, FINE_LEVEL, PYRAMID, correlation_rigid, transform_matrix
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


def _start(fixed, moving, start_rotvec=(0.0, 0.0, 0.0)):
    """The rigid start: the brains' centres of mass aligned (moments), turned by ``start_rotvec``."""
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    init = sitk.CenteredTransformInitializer(fixed, moving, tx, sitk.CenteredTransformInitializerFilter.MOMENTS)
    init = sitk.Euler3DTransform(init)
    if any(start_rotvec):
        R = rotvec_to_matrix(np.asarray(start_rotvec, dtype=np.float64))
        init.SetMatrix([float(v) for v in R.ravel()])
    return init


def _refine(fixed, moving, tx, levels, iterations: int = 150) -> float:
    """Refine ``tx`` in place over the pyramid ``levels``; returns the metric (-correlation)."""
    return correlation_rigid(
        fixed, moving, tx, iterations=iterations, learning_rate=2.0, min_step=1e-3, gradient_tolerance=1e-8,
        levels=levels,
    )  # fmt: skip


def _register_pair(fixed, moving, start_rotvec=(0.0, 0.0, 0.0), iterations: int = 150):
    """Rigid registration; returns (metric value (lower is better: -correlation), sitk transform)."""
    init = _start(fixed, moving, start_rotvec)
    return _refine(fixed, moving, init, PYRAMID, iterations), init


# rotated starts tried when the first registration correlates poorly: +-25 degrees about each axis,
# and two diagonals
_A = math.radians(25.0)
_ROTATED_STARTS = (
    [(s * _A, 0, 0) for s in (1, -1)]
    + [(0, s * _A, 0) for s in (1, -1)]
    + [(0, 0, s * _A) for s in (1, -1)]
    + [(_A / 1.7, _A / 1.7, _A / 1.7), (-_A / 1.7, -_A / 1.7, -_A / 1.7)]
)


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


class BrainImages:
    """Each stack's brain as a SimpleITK image on one registration grid, resampled once: a stack
    takes part in several pairs (mni-t4: 0.1-0.3 s a stack)."""

    def __init__(self, stacks: list[Stack], grid):
        self.stacks, self.grid = stacks, grid
        self._images: dict[int, object] = {}

    def __getitem__(self, i: int):
        if i not in self._images:
            shape, aff = self.grid
            self._images[i] = _sitk_image(_brain_on_grid(self.stacks[i], shape, aff), aff)
        return self._images[i]


def _pair_images(fixed_stack: Stack, stack: Stack, grid, images=None):
    """The two brains as SimpleITK images on ``grid`` (``images``: the pair's, made already)."""
    if images is not None:
        return images
    pair = BrainImages([fixed_stack, stack], grid)
    return pair[0], pair[1]


def register_pair(
    fixed_stack: Stack, stack: Stack, grid, good_correlation: float = 0.85, coarse=None, images=None
) -> tuple[np.ndarray, float]:
    """Rigid pose (4x4, ``stack``'s header -> ``fixed_stack``'s frame) and its correlation, both
    brains resampled on ``grid`` (:func:`registration_grid`). Robust to offsets of >= 10 mm and
    >= 15 degrees: the start aligns the brains' centres of mass (moments), the pyramid (4x, 2x, 1x)
    widens the capture range, and when the result correlates below ``good_correlation`` eight
    rotated starts (+-25 degrees about each axis, and two diagonals) are tried and the best kept.
    ``coarse``: the best start's transform after the pyramid's coarse levels, as
    :func:`coarse_pair` left it (which tried the rotated starts, at those levels, where needed):
    only the last level is run on it, as the whole pyramid from that start would end. ``images``:
    the two brains on ``grid`` (:class:`BrainImages`), where made already."""
    fixed, moving = _pair_images(fixed_stack, stack, grid, images)
    if coarse is not None:
        import SimpleITK as sitk

        tx = sitk.Euler3DTransform(coarse)
        value = _refine(fixed, moving, tx, FINE_LEVEL)
        return np.linalg.inv(transform_matrix(tx)), -value
    best = _register_pair(fixed, moving)
    if -best[0] < good_correlation:
        for r0 in _ROTATED_STARTS:
            cand = _register_pair(fixed, moving, r0)
            if cand[0] < best[0]:
                best = cand
    M = transform_matrix(best[1])  # fixed point -> moving stack's header point
    return np.linalg.inv(M), -best[0]  # moving header -> fixed frame: the stack's pose


def coarse_pair(fixed_stack: Stack, stack: Stack, grid, good_correlation: float = 0.85, images=None):
    """:func:`register_pair` at the pyramid's coarse levels only (4x and 2x: a quarter of its
    time, the last level on the grid itself being the rest), enough to compare two stacks
    (``mgaussian.assess``). Rotated starts are tried, at the coarse levels, when the first start
    correlates below ``good_correlation`` there. Returns (pose, correlation at the 2x level, the
    best start's transform for ``register_pair(coarse=...)``).

    The 2x level's correlation runs higher than the last level's (smoother images: three of H1's
    pairs 0.954-0.972 against 0.922-0.953, the real MIALSRTK runs' 0.886-0.912 against
    0.835-0.866), so fewer pairs take the rotated starts than in :func:`register_pair`: they are
    for a registration caught in a wrong optimum (a stack turned or flipped far from its start),
    which correlates far lower at any level. Real runs 3 and 1 took them at the last level (0.835)
    and found the same optimum there (the best start 0.83558, the first 0.83547)."""
    import SimpleITK as sitk

    fixed, moving = _pair_images(fixed_stack, stack, grid, images)
    first = _start(fixed, moving)
    best = (_refine(fixed, moving, first, COARSE_LEVELS), first)
    if -best[0] < good_correlation:
        for r0 in _ROTATED_STARTS:
            tx = _start(fixed, moving, r0)
            cand = (_refine(fixed, moving, tx, COARSE_LEVELS), tx)
            if cand[0] < best[0]:
                best = cand
    return np.linalg.inv(transform_matrix(best[1])), -best[0], sitk.Euler3DTransform(best[1])


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
    :func:`registration_grid`. ``known``: {stack index: (coarse transform, reversed, the pair's two
    images)} of pairs the stack assessment (``mgaussian.assess``) registered on the same grid at
    the coarse levels (:func:`coarse_pair`; ``reversed``: the reference registered onto the stack;
    the images fixed first): they are finished from there, in the pair's direction (a reversed
    pair's pose inverted), as a registration of that pair from scratch would end."""
    grid = registration_grid(stacks, spacing)
    images = BrainImages(stacks, grid)
    poses = []
    for i, st in enumerate(stacks):
        if i == reference:
            poses.append(np.eye(4))
            continue
        if known is not None and i in known:
            coarse, reverse, pair = known[i]
            if reverse:
                P, corr = register_pair(st, stacks[reference], grid, good_correlation, coarse, pair)
                P = np.linalg.inv(P)
            else:
                P, corr = register_pair(stacks[reference], st, grid, good_correlation, coarse, pair)
            how = "registered from the assessment's start"
        else:
            pair = (images[reference], images[i])
            P, corr = register_pair(stacks[reference], st, grid, good_correlation, images=pair)
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
