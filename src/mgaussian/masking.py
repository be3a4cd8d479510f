"""Input preparation without user help: automatic masks and N4 bias-field correction.

Automatic mask (``reconstruct`` without ``--stack-masks``), per stack:

1. **overlap**: only voxels whose position lies inside every other stack's field of view (its
   slab of slices, half a slice spacing beyond the end slices). Stacks are planned on the same
   anatomy, so their common volume holds it; with a single stack this step is skipped;
2. **Otsu**: the intensity threshold that best splits the overlap's voxels into two classes
   (SimpleITK's Otsu filter); the brighter class is foreground;
3. **largest component**: after an in-plane opening (radius ``opening_mm``) that cuts thin
   bridges, the largest 3D connected component, closed again by the same radius and with holes
   filled slice by slice.

On simulated stacks (background 0) this finds the anatomy. On real fetal stacks it finds the
bright region around the fetal head (brain, CSF, amniotic fluid), larger than a brain mask: a
region to reconstruct, not a segmentation (benchmarks/MOTION.md, session 5: Dice against the
manual masks). For fetal brain work, give masks from a dedicated tool.

N4 (``--bias-correction``): SimpleITK's N4 bias-field correction of each stack inside its mask
(or its Otsu foreground), fitted on a copy shrunk in plane and applied at full resolution.
SimpleITK is used because it is the field's well-kept implementation of both.
"""

from __future__ import annotations

__all__ = ["overlap_region", "auto_mask", "auto_masks", "n4_correct"]

import numpy as np
from scipy import ndimage

from .geometry import voxel_sizes, voxel_to_world, world_to_voxel

# n4_correct's floor under the data, as a fraction of their 99th percentile in the mask (N4 takes
# logs; session 27 measured 0.05 and 0.2 alike on the shared field: 26.941 / 26.943 dB)
_N4_FLOOR = 0.05


def overlap_region(shape, affine, others) -> np.ndarray:
    """Voxels of a stack (``shape``, ``affine``) inside every field of view in ``others``
    [(shape, affine)]: within half a voxel of the other grid's outer voxel centres."""
    inside = np.ones(tuple(shape), dtype=bool)
    if not others:
        return inside
    w = voxel_to_world(affine, np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1))
    for sh, A in others:
        ijk = world_to_voxel(A, w)
        inside &= np.all((ijk >= -0.5) & (ijk <= np.asarray(sh, dtype=np.float64) - 0.5), axis=-1)
    return inside


def _otsu_threshold(values: np.ndarray) -> float:
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.asarray(values, dtype=np.float32).reshape(1, -1))
    f = sitk.OtsuThresholdImageFilter()
    f.SetInsideValue(0)
    f.SetOutsideValue(1)
    f.SetNumberOfHistogramBins(256)
    f.Execute(img)
    return float(f.GetThreshold())


def _disk(radius_px: tuple[int, int]) -> np.ndarray:
    ry, rx = (max(int(r), 0) for r in radius_px)
    a, b = np.mgrid[-ry : ry + 1, -rx : rx + 1]
    return ((a / max(ry, 1)) ** 2 + (b / max(rx, 1)) ** 2 <= 1.0)[:, :, None]


def auto_mask(data: np.ndarray, affine: np.ndarray, others=(), opening_mm: float = 3.0) -> np.ndarray:
    """The automatic mask of one stack (see the module's notes); ``others`` are the other stacks'
    (shape, affine). Returns a bool array of the stack's shape (all False if nothing is found)."""
    data = np.asarray(data, dtype=np.float32)
    roi = overlap_region(data.shape, affine, list(others))
    if roi.sum() < 10:
        roi = np.ones(data.shape, dtype=bool)
    vals = data[np.isfinite(data)]
    if vals.size == 0 or float(vals.max()) <= float(vals.min()):
        return np.zeros(data.shape, dtype=bool)
    fg = roi & (data > _otsu_threshold(vals))
    sp = voxel_sizes(affine)
    st = _disk((round(opening_mm / sp[0]), round(opening_mm / sp[1])))
    opened = ndimage.binary_opening(fg, structure=st)
    lab, n = ndimage.label(opened if opened.any() else fg)
    if n == 0:
        return np.zeros(data.shape, dtype=bool)
    sizes = ndimage.sum_labels(np.ones(lab.shape), lab, index=np.arange(1, n + 1))
    m = lab == (1 + int(np.argmax(sizes)))
    m = ndimage.binary_closing(m, structure=st, iterations=1) & roi
    for k in range(m.shape[2]):
        m[:, :, k] = ndimage.binary_fill_holes(m[:, :, k])
    return m


def auto_masks(stacks, log=print) -> list[np.ndarray]:
    """Automatic masks for loaded stacks (io.Stack), each using the others' fields of view."""
    out = []
    geo = [(s.data.shape, s.affine) for s in stacks]
    for i, s in enumerate(stacks):
        m = auto_mask(s.data, s.affine, [g for j, g in enumerate(geo) if j != i])
        vox = float(np.prod(voxel_sizes(s.affine)))
        log(f"stack {s.name}: automatic mask {int(m.sum())} voxels ({m.sum() * vox / 1000:.0f} ml)")
        out.append(m)
    return out


def n4_correct(
    data: np.ndarray,
    affine: np.ndarray,
    mask: np.ndarray | None = None,
    shrink: int = 4,
    iterations: int = 50,
    levels: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """N4 bias-field correction of one stack: (corrected data, bias field), both of its shape;
    data = corrected x field. The field is fitted inside ``mask`` (default: Otsu foreground) on a
    copy shrunk ``shrink`` times in plane, and evaluated at full resolution."""
    import SimpleITK as sitk

    data = np.asarray(data, dtype=np.float32)
    if mask is None or not mask.any():
        mask = data > _otsu_threshold(data[np.isfinite(data)].ravel())
    sp = voxel_sizes(affine)
    # N4 works on log intensities: the data are kept positive by a floor at _N4_FLOOR x their 99th
    # percentile in the mask. (Adding 1 - min instead, as before session 27, made N4 fit the field of
    # data + 1, half the field of a volume in units of its 99th percentile: the model's.)
    top = float(np.percentile(data[mask], 99)) if mask.any() else float(np.max(data))
    floor = _N4_FLOOR * top if top > 0 else 1.0
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.maximum(data, floor).transpose(2, 1, 0)))
    img.SetSpacing([float(v) for v in sp])
    msk = sitk.GetImageFromArray(np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0)))
    msk.CopyInformation(img)
    f = [int(shrink), int(shrink), 1]
    small, small_m = sitk.Shrink(img, f), sitk.Shrink(msk, f)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(iterations)] * int(levels))
    n4.Execute(small, small_m)
    log_field = n4.GetLogBiasFieldAsImage(img)
    field = np.exp(sitk.GetArrayFromImage(log_field).transpose(2, 1, 0)).astype(np.float32)
    return (data / field).astype(np.float32), field
