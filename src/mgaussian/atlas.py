"""Atlas (standard) space: bring a reconstruction onto a template's grid and orientation.

A reconstruction lies in the scanner's frame, turned however the fetus lay; comparisons between
subjects, ages and methods (and atlas labels) need it in one standard space. This module
registers the volume to a template with SimpleITK and resamples it onto the template's grid.

Registration (``register_to_template``), template = fixed image, volume = moving image:

1. **start**: the centres of the two brains are matched (the template's inside its mask, the
   volume's over its foreground, voxels above 10 % of its 99th percentile); 48 candidate
   rotations are scored by the metric at 4 mm: the 24 axis-aligned rotations (the fetus may lie
   in any orientation) and the 24 that map the template's principal axes onto the volume's (the
   brain is longer front to back than across, so its axes say its orientation up to the
   symmetries of a box); the best 4 are refined at 4 mm and the best of those is kept. Any
   rotation is within 63 degrees of one of the 24 axis-aligned ones, too far for a local search
   alone; the principal axes bring the start within a few degrees when the brain's shape is clear;
2. **refinement**: rigid (Euler3D), 4-2-1 pyramid over the template's grid (smoothing 2-1-0 mm),
   regular-step gradient descent with physical-shift scales, to a step of 0.002 mm;
3. ``transform="affine"``: the rigid result starts an affine registration (2-1 pyramid), for
   templates of another age or size (a rigid map cannot scale).

The metric is the correlation (the template and the volume are both T2-weighted), or Mattes
mutual information (``metric="mattes"``), inside the template's mask grown by 4 mm (the brain's
edge against the background is where most of the alignment's information is). A template without
a mask uses its voxels above 10 % of its 99th percentile, closed and hole-filled.

The volume is then resampled (trilinear, 0 outside, as ``evaluate`` resamples) onto the
template's grid: ``v_t(x) = v(T x)``, T the 4x4 world map template mm -> volume mm. ``info``
holds T and its inverse, the rotation angle and the shift, the metric and the NCC of the result
with the template inside the template's mask.

Shipped templates (``data/templates/``, CC0 1.0, Fidon et al. 2021; see its NOTICE):
``fetal-ga21``, ``fetal-ga23``, ``fetal-ga25`` (the demo atlas), ``fetal-ga27``, ``fetal-ga33``,
all on one 135 x 189 x 155 grid at 0.8 mm. ``fetal-auto`` registers to each at the coarse level
and keeps the one whose registration ends with the best metric there (the age whose brain size and
outline match).
"""

from __future__ import annotations

__all__ = [
    "TEMPLATES",
    "AUTO",
    "Template",
    "load_templates",
    "register_to_template",
    "to_template_space",
    "brain_faded",
    "BRAIN_EDGE_MM",
    "itk_transform_text",
    "write_transform_files",
]

import itertools
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError
from .geometry import matrix_to_rotvec, orthogonal_voxel_axes, voxel_sizes

_DATA = Path(__file__).parent / "data"
TEMPLATES: dict[str, dict] = {
    "fetal-ga21": {
        "image": "templates/fetal_ga21_t2w.nii.gz",
        "mask": "templates/fetal_ga21_mask.nii.gz",
        "weeks": 21,
        "note": "spina bifida aperta, not operated",
    },
    "fetal-ga23": {
        "image": "templates/fetal_ga23_t2w.nii.gz",
        "mask": "templates/fetal_ga23_mask.nii.gz",
        "weeks": 23,
        "note": "spina bifida aperta, not operated",
    },
    "fetal-ga25": {
        "image": "demo/srr.nii.gz",
        "mask": "demo/mask.nii.gz",
        "weeks": 25,
        "note": "spina bifida aperta, not operated (the demo atlas)",
    },
    "fetal-ga27": {
        "image": "templates/fetal_ga27_t2w.nii.gz",
        "mask": "templates/fetal_ga27_mask.nii.gz",
        "weeks": 27,
        "note": "spina bifida aperta, operated",
    },
    "fetal-ga33": {
        "image": "templates/fetal_ga33_t2w.nii.gz",
        "mask": "templates/fetal_ga33_mask.nii.gz",
        "weeks": 33,
        "note": "spina bifida aperta, operated",
    },
}
AUTO = "fetal-auto"
TRANSFORMS = ("rigid", "affine")
METRICS = ("correlation", "mattes")

# the metric's region: the template mask grown by this much (the brain's outline carries most of
# the alignment; a mask cut at the brain's edge sees only its inside)
_MASK_GROW_MM = 4.0
# candidate starts scored at this spacing (a fetal brain at 21-33 weeks is 50-100 mm long: 12-25
# voxels across, enough to tell orientations apart) and the number refined there
_SEARCH_SPACING_MM = 4.0
_SEARCH_KEEP = 4
# share of the template's voxels (a regular grid, fixed seed) the full-resolution level samples:
# a quarter keeps ~40k-300k samples in the grown mask, and cuts that level's time ~3x
_FINE_SAMPLING = 0.25
_SEED = 19
# voxels above this fraction of the 99th percentile are the foreground (background of a
# reconstruction is 0 or noise; brain tissue on T2 is above 20 % of the bright CSF)
_FOREGROUND_FRACTION = 0.1


@dataclass
class Template:
    """A template image with its brain mask, on its grid (world mm, RAS)."""

    name: str
    path: str
    data: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    mask_path: str | None
    mask_from: str

    def describe(self) -> dict:
        return {
            "name": self.name,
            "path": self.path,
            "mask": self.mask_path,
            "mask_from": self.mask_from,
            "shape": list(self.data.shape),
            "voxel_mm": [round(float(v), 4) for v in voxel_sizes(self.affine)],
        }


def _foreground(vol: np.ndarray, close_vox: int = 0) -> np.ndarray:
    from scipy import ndimage

    pos = vol[vol > 0]
    if pos.size == 0:
        return np.zeros(vol.shape, bool)
    m = vol > _FOREGROUND_FRACTION * float(np.percentile(pos, 99))
    if close_vox:
        m = ndimage.binary_closing(m, iterations=close_vox)
        m = ndimage.binary_fill_holes(m)
    return m


def load_templates(spec: str, mask_path: str | None = None, *, where: str = "--template") -> list[Template]:
    """The template(s) named by ``spec``: a shipped name (``fetal-ga21`` ... ``fetal-ga33``), ``fetal-auto``
    (all of them) or a NIfTI path; ``mask_path`` replaces the mask (not with ``fetal-auto``)."""
    from .io import load_image, load_mask

    if spec == AUTO:
        if mask_path:
            raise InputError(
                "--template-mask", f"cannot be combined with --template {AUTO} (each template has its own)"
            )
        return [load_templates(n, where=where)[0] for n in TEMPLATES]
    if spec in TEMPLATES:
        t = TEMPLATES[spec]
        img_p, m_p, name = str(_DATA / t["image"]), str(_DATA / t["mask"]), spec
        if mask_path:
            m_p = mask_path
    else:
        if spec.lower().startswith("fetal-") and not os.path.exists(spec):
            names = ", ".join(list(TEMPLATES) + [AUTO])
            raise InputError(where, f"unknown template {spec!r} ({names} or a NIfTI file)")
        img_p, m_p, name = spec, mask_path, os.path.basename(spec)
    data, aff, _ = load_image(img_p, what="template")
    if m_p:
        mdata, maff, _ = load_image(m_p, what="template mask", allow_zero=True)
        if mdata.shape != data.shape or not np.allclose(maff, aff, atol=1e-3, rtol=1e-4):
            raise InputError(
                m_p,
                f"template mask grid {mdata.shape} differs from the template's {data.shape} "
                f"({os.path.basename(img_p)}): not on the same grid",
            )
        mask = load_mask(m_p, data.shape, aff, os.path.basename(img_p))
        mask_from = "shipped" if spec in TEMPLATES and not mask_path else "file"
    else:
        mask = _foreground(data, close_vox=2)
        mask_from = "foreground (no mask given)"
        if mask.sum() < 100:
            raise InputError(img_p, "the template has no foreground to register to; give --template-mask")
    return [Template(name, img_p, data, aff, mask, m_p, mask_from)]


# ----------------------------------------------------------------------------- SimpleITK helpers


def _sitk_image(vol: np.ndarray, aff: np.ndarray):
    """A SimpleITK image whose physical space is the NIfTI world (RAS mm, as the affine says)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(vol, np.float32).transpose(2, 1, 0)))
    sp = voxel_sizes(aff)
    D = aff[:3, :3] / sp[None, :]
    u, _, vt = np.linalg.svd(D)  # nearest orthonormal direction (float noise in the affine)
    img.SetSpacing([float(v) for v in sp])
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    img.SetDirection([float(v) for v in (u @ vt).ravel()])
    return img


def _resampled(img, spacing: float, *, mask: bool = False):
    """``img`` on an isotropic grid of ``spacing`` mm over the same box (smoothed first unless a mask)."""
    import SimpleITK as sitk

    sp = np.asarray(img.GetSpacing())
    size = np.asarray(img.GetSize())
    new_size = [max(int(round(n * s / spacing)), 4) for n, s in zip(size, sp)]
    src = img
    if not mask:
        sig = [math.sqrt(max(spacing**2 - s**2, 0.0)) / 2.0 for s in sp]
        if max(sig) > 0:
            src = sitk.SmoothingRecursiveGaussian(img, sig)
    origin = np.asarray(img.GetOrigin()) + np.asarray(img.GetDirection()).reshape(3, 3) @ ((spacing - sp) / 2)
    return sitk.Resample(
        src,
        new_size,
        sitk.Transform(),
        sitk.sitkNearestNeighbor if mask else sitk.sitkLinear,
        [float(v) for v in origin],
        [spacing] * 3,
        img.GetDirection(),
        0.0,
        img.GetPixelID(),
    )


def _method(
    metric: str,
    fixed_mask,
    *,
    shrink=(1,),
    smooth=(0.0,),
    iterations=200,
    learning_rate=1.0,
    min_step=2e-3,
    sampling=None,
):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    if metric == "mattes":
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    else:
        reg.SetMetricAsCorrelation()
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate,
        minStep=min_step,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-8,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel(list(smooth))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if sampling is not None:
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentagePerLevel(list(sampling), seed=_SEED)
    return reg


def _matrix(tx) -> np.ndarray:
    """4x4 world map of a SimpleITK matrix-offset transform (fixed point -> moving point)."""
    A = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    M = np.eye(4)
    M[:3, :3] = A
    M[:3, 3] = c + t - A @ c
    return M


def _moments(vol: np.ndarray, aff: np.ndarray, mask: np.ndarray):
    """(centre mm, principal axes as columns [3,3], sorted by decreasing extent) of a binary region."""
    idx = np.argwhere(mask).astype(np.float64)
    if len(idx) > 200_000:  # a regular subsample is plenty for three moments
        idx = idx[:: len(idx) // 200_000 + 1]
    w = idx @ aff[:3, :3].T + aff[:3, 3]
    c = w.mean(0)
    cov = np.cov((w - c).T)
    ev, vec = np.linalg.eigh(cov)
    return c, vec[:, np.argsort(ev)[::-1]]


def _proper_signed_permutations() -> list[np.ndarray]:
    out = []
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1, -1), repeat=3):
            P = np.zeros((3, 3))
            for i, (j, s) in enumerate(zip(perm, signs)):
                P[i, j] = s
            if np.linalg.det(P) > 0:
                out.append(P)
    return out  # the 24 rotations of a cube


def _candidates(E_fixed: np.ndarray, E_moving: np.ndarray) -> list[np.ndarray]:
    """Start rotations (template directions -> volume directions): 24 axis-aligned, 24 from the axes."""
    cube = _proper_signed_permutations()
    out = list(cube)
    for P in cube:
        R = E_moving @ P @ E_fixed.T
        if np.linalg.det(R) < 0:  # eigenvectors carry arbitrary signs: flip one to keep a rotation
            R = E_moving @ np.diag([1, 1, -1]) @ P @ E_fixed.T
        if all(_angle_deg(R, Q) > 5.0 for Q in out):
            out.append(R)
    return out


def _angle_deg(A: np.ndarray, B: np.ndarray) -> float:
    return math.degrees(float(np.linalg.norm(matrix_to_rotvec(A @ B.T))))


def _euler(R: np.ndarray, centre: np.ndarray, shift: np.ndarray):
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    tx.SetCenter([float(v) for v in centre])
    tx.SetMatrix([float(v) for v in R.ravel()], 1e-5)
    tx.SetTranslation([float(v) for v in shift])
    return tx


def register_to_template(
    volume: np.ndarray,
    affine: np.ndarray,
    template: Template,
    *,
    transform: str = "rigid",
    metric: str = "correlation",
    init: np.ndarray | None = None,
    coarse_only: bool = False,
    log=None,
) -> tuple[np.ndarray, dict]:
    """The world map T (4x4, template mm -> volume mm) that aligns ``volume`` to ``template``, and
    details of the search (module docstring for the method). ``init``: a rigid T to start from
    instead of the search; ``coarse_only``: stop after the 4 x shrunk level, rigid (what
    ``fetal-auto`` compares the templates with)."""
    import SimpleITK as sitk
    from scipy import ndimage

    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    t0 = time.time()
    vol = np.clip(np.asarray(volume, np.float32), 0, None)
    fg = _foreground(vol)
    if fg.sum() < 100:
        raise InputError("volume", "nothing to register: the volume has (almost) no foreground")
    tsp = voxel_sizes(template.affine)
    grow = np.maximum(np.round(_MASK_GROW_MM / tsp).astype(int), 1)
    st = ndimage.generate_binary_structure(3, 1)
    big = template.mask
    for _ in range(int(grow.max())):
        big = ndimage.binary_dilation(big, st)
    # crop the template to the grown mask's box (+ a margin): the metric runs over the box only
    idx = np.argwhere(big)
    lo = np.maximum(idx.min(0) - grow, 0)
    hi = np.minimum(idx.max(0) + grow + 1, np.asarray(template.data.shape))
    sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
    caff = template.affine.copy()
    caff[:3, 3] = template.affine[:3, :3] @ lo + template.affine[:3, 3]
    fixed = _sitk_image(template.data[sl], caff)
    fmask = sitk.Cast(_sitk_image(big[sl].astype(np.float32), caff) > 0.5, sitk.sitkUInt8)
    moving = _sitk_image(vol, affine)

    if init is not None:
        return _refine(
            fixed,
            fmask,
            moving,
            template,
            _rigid_from_matrix(init),
            transform,
            metric,
            t0,
            {"candidates": 0, "search_metric_value": None, "search_s": 0.0},
            coarse_only,
            log,
        )
    c_f, E_f = _moments(template.data, template.affine, template.mask)
    c_m, E_m = _moments(vol, affine, fg)
    fixed_c = _resampled(fixed, _SEARCH_SPACING_MM)
    fmask_c = _resampled(fmask, _SEARCH_SPACING_MM, mask=True)
    moving_c = _resampled(moving, _SEARCH_SPACING_MM)
    scored = []
    for R in _candidates(E_f, E_m):
        reg = _method(metric, fmask_c)
        reg.SetInitialTransform(_euler(R, c_f, c_m - c_f), inPlace=False)
        try:
            v = reg.MetricEvaluate(fixed_c, moving_c)
        except RuntimeError:  # too few overlapping samples: a hopeless start
            continue
        scored.append((float(v), R))
    if not scored:
        raise InputError("volume", "no start overlaps the template: the volume and the template do not meet")
    scored.sort(key=lambda x: x[0])
    best = None
    for v0, R in scored[:_SEARCH_KEEP]:
        tx = _euler(R, c_f, c_m - c_f)
        reg = _method(metric, fmask_c, iterations=100, learning_rate=2.0, min_step=0.01)
        reg.SetInitialTransform(tx, inPlace=True)
        try:
            reg.Execute(fixed_c, moving_c)
        except RuntimeError:
            continue
        v = float(reg.GetMetricValue())
        if best is None or v < best[0]:
            best = (v, tx, v0)
    if best is None:
        raise InputError("volume", "the registration to the template failed from every start")
    search = {"candidates": len(scored), "search_metric_value": best[0], "search_s": round(time.time() - t0, 2)}
    return _refine(fixed, fmask, moving, template, best[1], transform, metric, t0, search, coarse_only, log)


def _rigid_from_matrix(T: np.ndarray):
    """An Euler3D transform of the rigid part of a 4x4 map (the nearest rotation), centred at 0."""
    u, _, vt = np.linalg.svd(np.asarray(T, np.float64)[:3, :3])
    return _euler(u @ vt, np.zeros(3), np.asarray(T, np.float64)[:3, 3])


def _shown(value: float) -> float:
    """A SimpleITK metric value as the log and ``fetal-auto`` show it, higher the better: SimpleITK
    minimises both metrics, the correlation and the mutual information negated."""
    return -float(value)


def _refine(fixed, fmask, moving, template, tx, transform, metric, t0, search, coarse_only, log):
    """Multi-resolution rigid refinement from ``tx`` (then affine when asked): (T, details)."""
    import SimpleITK as sitk

    shrink, smooth = ((4,), (2.0,)) if coarse_only else ((4, 2, 1), (2.0, 1.0, 0.0))
    sampling = [1.0, 1.0, _FINE_SAMPLING][: len(shrink)]
    reg = _method(
        metric, fmask, shrink=shrink, smooth=smooth, iterations=200, learning_rate=1.0, min_step=2e-3, sampling=sampling
    )
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed, moving)
    value = float(reg.GetMetricValue())
    T = _matrix(tx)
    rigid_T = T.copy()
    if transform == "affine" and not coarse_only:
        atx = sitk.AffineTransform(3)
        atx.SetCenter(tx.GetCenter())
        atx.SetMatrix(tx.GetMatrix())
        atx.SetTranslation(tx.GetTranslation())
        reg = _method(
            metric,
            fmask,
            shrink=(2, 1),
            smooth=(1.0, 0.0),
            iterations=200,
            learning_rate=0.5,
            min_step=1e-3,
            sampling=[1.0, _FINE_SAMPLING],
        )
        reg.SetInitialTransform(atx, inPlace=True)
        reg.Execute(fixed, moving)
        value = float(reg.GetMetricValue())
        T = _matrix(atx)
    details = {
        "metric": metric,
        "metric_value": value,
        **search,
        "register_s": round(time.time() - t0, 2),
        "rigid_matrix": rigid_T.tolist(),
    }
    if log:
        log(
            f"template {template.name}: {'coarse ' if coarse_only else ''}{transform} registration, {metric} "
            f"{_shown(value):.4f} ({search['candidates']} starts, {details['register_s']:.1f} s)"
        )
    return T, details


def _describe_transform(T: np.ndarray, template: Template) -> dict:
    """Rotation angle, shift of the template's brain centre, and scales of a template -> volume map."""
    A = T[:3, :3]
    u, s, vt = np.linalg.svd(A)
    R = u @ vt
    c = _moments(template.data, template.affine, template.mask)[0]
    return {
        "rotation_deg": round(math.degrees(float(np.linalg.norm(matrix_to_rotvec(R)))), 4),
        "brain_centre_shift_mm": round(float(np.linalg.norm(A @ c + T[:3, 3] - c)), 4),
        "scales": [round(float(v), 5) for v in s],
    }


# the registration image's brain edge (``brain_faded``): the brain mask faded over a Gaussian of
# this sd (mm). Template-space PSNR (bench_clinical.py, the truth as template) H2 / D3: the whole
# volume 27.20 / 29.80, the mask cut sharp 26.98 / 29.43 (the stacks' masks, drawn on thick slices,
# are blocky), faded over 1.5 mm 27.09 / 29.60; the real MIALSRTK brain on fetal-ga27 turned by
# 171 degrees with the whole volume, 13 with the mask (session 26)
BRAIN_EDGE_MM = 1.5


def brain_faded(
    volume: np.ndarray, brain: np.ndarray, affine: np.ndarray, edge_mm: float = BRAIN_EDGE_MM
) -> np.ndarray:
    """``volume`` faded to 0 outside the ``brain`` mask (same grid, voxel -> world ``affine``) over a
    Gaussian of ``edge_mm``: what to register to a skull-stripped template when the volume keeps a
    rim of other tissue around the brain (``to_template_space``'s ``register_on``)."""
    from scipy import ndimage

    weight = ndimage.gaussian_filter(np.asarray(brain, np.float32), edge_mm / voxel_sizes(affine))
    return (np.asarray(volume, np.float32) * weight).astype(np.float32)


# below this NCC in the template's mask the result is reported as possibly misaligned: the same
# anatomy registers at >= 0.97 (docs/clinical.md), a template of another age at 0.6-0.7 after the
# coarse level; a real neurotypical fetal brain (MIALSRTK sub-01, ~27 weeks) on the shipped spina
# bifida templates ended at 0.04-0.20, turned by 114-171 degrees, and at 0.12 where it was masked
# to the brain and turned plausibly (docs/clinical.md, session 26)
LOW_NCC = 0.5


@dataclass(frozen=True)
class _Candidate:
    """A template tried by ``fetal-auto`` at the coarse registration level: the transform it found,
    the registration's own metric there (the choice: lowest) and the NCC inside the template's mask."""

    template: Template
    coarse_transform: np.ndarray
    metric: float
    ncc: float


def to_template_space(
    volume: np.ndarray,
    affine: np.ndarray,
    template_path: str,
    transform: str = "rigid",
    mask: str | None = None,
    *,
    metric: str = "correlation",
    log=None,
    render=None,
    register_on: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Register ``volume`` (world ``affine``) to a template and resample it onto the template's grid.

    ``template_path``: a NIfTI file, a shipped template name or ``fetal-auto`` (every shipped
    template; the one whose coarse registration ends with the best metric is kept).
    ``mask``: the template's brain mask (shipped templates bring theirs).
    ``render``: where the volume is a continuous model's (``reconstruct``), a function (shape,
    affine) -> the model on that grid: the volume on the template's grid is then the model rendered
    there, not the volume interpolated (a second, blurring sampling). Rigid transforms only: through
    an affine one the template's voxel axes are sheared in the model's frame, and the volume is
    interpolated (``matrix_convention`` says which).
    ``register_on``: the image registered in the volume's place (same grid), e.g. the volume with
    what is not brain faded to 0, as the template is: the volume itself is what is placed.
    Returns (volume on the template grid, the template's affine, info for ``OUT.template.json``)."""
    from .metrics import ncc
    from .sampling import resample_volume

    if transform not in TRANSFORMS:
        raise InputError("--template-transform", f"must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
    templates = load_templates(template_path, mask)
    vol = np.asarray(volume, np.float32)
    reg_vol = vol if register_on is None else np.asarray(register_on, np.float32)
    if reg_vol.shape != vol.shape:
        raise ValueError(f"register_on has shape {reg_vol.shape}, the volume {vol.shape}")

    def placed(tpl, T):
        grid = T @ tpl.affine
        # the model renders on grids whose voxel axes are orthogonal (a rigid transform's); an affine
        # one shears the template's grid in the model's frame, where the volume is interpolated
        if render is not None and orthogonal_voxel_axes(grid):
            out, how = np.asarray(render(tpl.data.shape, grid), np.float32), "the model rendered there"
        else:
            out, how = resample_volume(vol, affine, tpl.data.shape, grid), "trilinear"
        return out, ncc(out[tpl.mask], tpl.data[tpl.mask]), how

    def score_in_box(tpl, T):  # the same NCC of what is registered, over the mask's bounding box only
        idx = np.argwhere(tpl.mask)
        lo, hi = idx.min(0), idx.max(0) + 1
        box = tpl.affine.copy()
        box[:3, 3] = tpl.affine[:3, :3] @ lo + tpl.affine[:3, 3]
        sl = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        out = resample_volume(reg_vol, affine, tuple(int(n) for n in hi - lo), T @ box)
        m = tpl.mask[sl]
        return ncc(out[m], tpl.data[sl][m])

    results = []
    if len(templates) > 1:
        # every template through the 4 x shrunk level (rigid), then the best one to the end: the finer
        # levels refine what the coarse one found (the last millimetre), and cost the most; the
        # right age stands out already there (docs/clinical.md). Best: the coarse level's own metric
        # (SimpleITK minimises it), over the template's mask grown by 4 mm at 4 mm, where the brain's
        # size and outline count. The NCC inside the mask at full resolution compares the inner
        # anatomy only: on a real neurotypical brain (~27 weeks, 150 ml) every spina bifida template
        # scored 0.05-0.15 there and it chose the 23-week one, turned by 143 deg; the coarse
        # correlation ranks the 27-week one first (0.56 against 0.26-0.49), which registers it
        # plausibly (13 deg; session 28)
        for tpl in templates:
            T, det = register_to_template(reg_vol, affine, tpl, metric=metric, coarse_only=True, log=log)
            results.append(_Candidate(tpl, T, det["metric_value"], score_in_box(tpl, T)))
        chosen = min(results, key=lambda r: r.metric)
        tpl = chosen.template
        T, det = register_to_template(
            reg_vol, affine, tpl, transform=transform, metric=metric, init=chosen.coarse_transform, log=log
        )
    else:
        tpl = templates[0]
        T, det = register_to_template(reg_vol, affine, tpl, transform=transform, metric=metric, log=log)
    out, score, how = placed(tpl, T)
    if register_on is not None:  # the NCC of what was registered (what it left out, e.g. a rim, does not count)
        score = score_in_box(tpl, T)
    low = bool(score < LOW_NCC)
    if low:
        from .errors import warn

        warn(
            tpl.name,
            f"the volume correlates poorly with the template after registration (NCC {score:.2f} in its mask, "
            f"below {LOW_NCC:g}): it may not be aligned; check it, or give a template of the same anatomy"
            + (" (the shipped ones are of spina bifida brains)" if tpl.name in TEMPLATES else ""),
        )
    info = {
        "template": tpl.describe(),
        "template_requested": template_path,
        "transform": transform,
        "matrix_template_to_volume": T.tolist(),
        "matrix_volume_to_template": np.linalg.inv(T).tolist(),
        "matrix_convention": "world mm (NIfTI RAS) 4x4: x_volume = M x_template; the output voxel v of the "
        "template grid takes the volume's value at M @ template_affine @ v (" + how + ")",
        "ncc_in_template_mask": round(float(score), 5),
        "ncc_low": low,  # below LOW_NCC: possibly misaligned (warned)
        **_describe_transform(T, tpl),
        **det,
    }
    if results:
        info["chosen"] = tpl.name
        info["candidates_metric"] = {r.template.name: round(_shown(r.metric), 5) for r in results}
        info["candidates_ncc"] = {r.template.name: round(float(r.ncc), 5) for r in results}
        info["candidates_note"] = (
            f"after the coarse (4 x shrunk) rigid level: the registration's {metric} (the template with the "
            "highest is chosen) and the NCC inside each template's mask"
        )
        if log:
            log(
                f"template {AUTO}: chose {tpl.name} ({metric} at the coarse level: "
                + ", ".join(f"{r.template.name} {_shown(r.metric):.4f}" for r in results)
                + ")"
            )
    return out, tpl.affine.copy(), info


def itk_transform_text(T_ras: np.ndarray) -> str:
    """The map T (template mm -> volume mm, RAS) as an ITK text transform file. ITK (and ANTs,
    SimpleITK, 3D Slicer's ITK readers) works in LPS, where the map is F T F with F = diag(-1, -1, 1);
    applied with the template as the reference image and the volume as the moving one, it
    resamples the volume onto the template, as ``to_template_space`` does."""
    F = np.diag([-1.0, -1.0, 1.0, 1.0])
    M = F @ np.asarray(T_ras, np.float64) @ F
    params = [*M[:3, :3].ravel(), *M[:3, 3]]
    return (
        "#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
        "Parameters: " + " ".join(f"{v:.12g}" for v in params) + "\nFixedParameters: 0 0 0\n"
    )


def write_transform_files(info: dict, json_path: str, tfm_path: str | None = None) -> None:
    """``OUT.template.json`` (``info``) and, when asked, the ITK ``.tfm`` of the same map, atomically."""
    from .io import atomic_write_text

    if tfm_path:
        atomic_write_text(tfm_path, itk_transform_text(np.asarray(info["matrix_template_to_volume"])))
        info = {**info, "itk_transform": os.path.abspath(tfm_path)}
    atomic_write_text(json_path, json.dumps(info, indent=1))
