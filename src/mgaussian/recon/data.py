"""Inputs of the training loop: normalised slices, crops, masks, frames, the output grid."""

from __future__ import annotations

__all__ = [
    "SliceSet",
    "prepare_slices",
    "grow_masks",
    "output_grid",
    "crop_box",
    "box_affine",
    "crop_grid",
    "region_mask",
    "region_and_init",
    "region_from_slices",
]

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..baselines import covered_mean
from ..errors import InputError
from ..geometry import voxel_sizes
from ..io import Stack
from ..sampling import resample_volumes


@dataclass
class SliceSet:
    """The slices of one stack that see the mask, cropped to the mask's box.

    obs [K,h,w] normalised intensities; mask [K,h,w] bool; origins [K,3] of the crop's pixel (0,0);
    axes [K,3,3]; index [K] slice numbers in the stack; spacing (du, dv); thickness; scale (the
    stack's normalisation divisor); window (a0, a1, b0, b1) of the crop in the stack's pixels.
    """

    name: str
    obs: torch.Tensor
    mask: torch.Tensor
    origins: torch.Tensor
    axes: torch.Tensor
    index: np.ndarray
    spacing: tuple[float, float]
    thickness: float
    scale: float
    window: tuple[int, int, int, int]
    row_spans: torch.Tensor | None = None
    # in-plane PSF sigmas (mm) when not the default 1.2 x pixel FWHM (binned slices, bin_slices)
    inplane_sigma: tuple[float, float] | None = None
    # loss weight of one pixel: a binned pixel stands for bin x bin pixels of the source slice
    pixel_weight: float = 1.0
    binning: int = 1

    @property
    def n(self) -> int:
        return int(self.obs.shape[0])


def _robust_scale(x: np.ndarray) -> float:
    v = float(np.percentile(x, 99)) if x.size else 0.0
    return v if v > 0 else float(x.max()) if x.size and x.max() > 0 else 1.0


def _dilate_inplane(m: np.ndarray, r_px: tuple[int, int]) -> np.ndarray:
    from scipy import ndimage

    if r_px[0] <= 0 and r_px[1] <= 0:
        return m
    a = np.arange(-r_px[0], r_px[0] + 1)[:, None] / max(r_px[0], 1)
    b = np.arange(-r_px[1], r_px[1] + 1)[None, :] / max(r_px[1], 1)
    disk = (a**2 + b**2) <= 1.0 + 1e-9
    return ndimage.binary_dilation(m, structure=disk[:, :, None])


def _grow_inplane_mm(m: np.ndarray, spacing, mm: float) -> np.ndarray:
    return _dilate_inplane(m, (int(round(mm / spacing[0])), int(round(mm / spacing[1]))))


def grow_masks(stacks: list[Stack], rim_mm: float, min_signal: float = 0.2) -> list[Stack]:
    """The stacks with their masks grown in plane by ``rim_mm`` (a disk of that radius in mm).

    A brain mask ends at the brain's edge, where the signal does not: with a rim of the data
    around it the reconstruction covers the whole brain (edge CSF included) wherever any stack's
    mask reaches, fitted to pixels rather than cut off (real MIALSRTK leave-one-out,
    benchmarks/MOTION.md session 10). Only where the data go on beyond the mask: a stack whose
    band 1.5-2.5 x ``rim_mm`` outside its mask holds a median below ``min_signal`` x the median
    inside (a masked or skull-stripped stack, or air around a head mask; measured: real fetal
    stacks 0.72-0.92, masked simulations 0.00-0.04) keeps its mask, whose edge is a cut in the
    data that the fit would only ring at (box-profile sb25: -0.6 dB with the rim, session 10; session
    33 measured gains there instead, ``ReconConfig.mask_rim_min_signal``). ``min_signal`` 0 grows
    every mask. Masks that hold every voxel, or none, are kept too."""
    if not rim_mm > 0:
        return list(stacks)
    out = []
    for st in stacks:
        m = st.mask
        if m.all() or not m.any():
            out.append(st)
            continue
        sp = st.frames.spacing
        # work inside the mask's in-plane box plus the test band (the slices of a 512 x 512 stack)
        ij = np.argwhere(m.any(2))
        pad = np.ceil(2.5 * rim_mm / np.asarray(sp, float)).astype(int) + 1
        lo, hi = np.maximum(ij.min(0) - pad, 0), np.minimum(ij.max(0) + 1 + pad, m.shape[:2])
        box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
        mb, db = m[box], st.data[box]
        band = _grow_inplane_mm(mb, sp, 2.5 * rim_mm) & ~_grow_inplane_mm(mb, sp, 1.5 * rim_mm)
        inside = float(np.median(db[mb]))
        if not band.any() or float(np.median(db[band])) < min_signal * inside:
            out.append(st)
            continue
        g = np.zeros_like(m)
        g[box] = _grow_inplane_mm(mb, sp, rim_mm)
        out.append(replace(st, mask=g))
    return out


def prepare_slices(stacks: list[Stack], margin: int = 2, dtype=torch.float32, scale_masks=None) -> list[SliceSet]:
    """Cropped, normalised slices: the slices that see their stack's mask, cropped to the mask's
    box plus ``margin`` pixels, divided by the 99th percentile inside the mask (inside
    ``scale_masks[i]`` when given: the masks before their rim, :func:`grow_masks`)."""
    out = []
    for i, st in enumerate(stacks):
        m = st.mask & (st.data != 0) if st.mask.all() else st.mask
        sm = st.mask if scale_masks is None else scale_masks[i]
        ks = np.nonzero(m.any(axis=(0, 1)))[0]
        if len(ks) == 0:
            raise InputError(st.mask_path or st.path, "mask holds no voxel with signal")
        scale = _robust_scale(st.data[sm] if sm.any() else st.data[m])
        a = np.nonzero(m.any(axis=(1, 2)))[0]
        b = np.nonzero(m.any(axis=(0, 2)))[0]
        H, W = st.data.shape[:2]
        a0, a1 = max(0, a[0] - margin), min(H, a[-1] + 1 + margin)
        b0, b1 = max(0, b[0] - margin), min(W, b[-1] + 1 + margin)
        fr = st.frames
        du, dv = fr.spacing
        obs = st.data[a0:a1, b0:b1][:, :, ks] / scale
        msk = m[a0:a1, b0:b1][:, :, ks]
        org = fr.origins[ks] + a0 * du * fr.axes[ks, 0] + b0 * dv * fr.axes[ks, 1]
        out.append(
            SliceSet(
                name=st.name,
                obs=torch.as_tensor(np.ascontiguousarray(obs.transpose(2, 0, 1)), dtype=dtype),
                mask=torch.as_tensor(np.ascontiguousarray(msk.transpose(2, 0, 1))),
                origins=torch.as_tensor(org, dtype=dtype),
                axes=torch.as_tensor(fr.axes[ks], dtype=dtype),
                index=ks,
                spacing=(float(du), float(dv)),
                thickness=float(st.thickness),
                scale=scale,
                window=(int(a0), int(a1), int(b0), int(b1)),
            )
        )
    return out


def _pool(x: torch.Tensor, f: int) -> torch.Tensor:
    """Sums over f x f pixel bins of [K,h,w] (zero-padded to whole bins) -> [K,ceil(h/f),ceil(w/f)]."""
    K, h, w = x.shape
    H, W = -(-h // f), -(-w // f)
    xp = torch.zeros((K, H * f, W * f), dtype=x.dtype, device=x.device)
    xp[:, :h, :w] = x
    return xp.reshape(K, H, f, W, f).sum((2, 4))


def expand_pixels(x: torch.Tensor, f: int, shape: tuple[int, int]) -> torch.Tensor:
    """Per-bin values [K,H,W] -> per-pixel [K,h,w] (each pixel takes its bin's value)."""
    if f <= 1:
        return x
    return x.repeat_interleave(f, 1).repeat_interleave(f, 2)[:, : shape[0], : shape[1]].contiguous()


def pool_pixels(x: torch.Tensor, f: int) -> torch.Tensor:
    """Per-pixel [K,h,w] -> per-bin means [K,H,W] (the inverse of :func:`expand_pixels`)."""
    if f <= 1:
        return x
    ones = torch.ones_like(x)
    return _pool(x, f) / _pool(ones, f).clamp_min(1)


def bin_slices(ss: SliceSet, f: int, inplane_fwhm_factor: float) -> SliceSet:
    """The slices with f x f pixels averaged into one: f^2 times fewer pixels to render for a
    field no finer than f pixels (the coarse level). A bin's value is the mean of f^2 point samples
    of the PSF-blurred slice, modelled as one sample at the bin's centre through a PSF widened by
    the spread of those points (variance (f^2 - 1) / 12 x pixel^2 per axis). Only whole bins with
    a masked pixel are masked; each bin weighs f^2 pixels in the loss, so a prior tuned for the
    pixels keeps its balance. The slices' frames (and so their poses) are the source's."""
    from ..psf import FWHM_TO_SIGMA

    if f <= 1:
        return ss
    du, dv = ss.spacing
    cnt = _pool(torch.ones_like(ss.obs), f)
    obs = _pool(ss.obs, f) / cnt.clamp_min(1)
    mask = (_pool(ss.mask.to(ss.obs.dtype), f) > 0) & (cnt >= f * f - 0.5)
    ax = ss.axes
    shift = (f - 1) / 2.0
    origins = ss.origins + shift * du * ax[:, 0] + shift * dv * ax[:, 1]
    var = (f * f - 1) / 12.0
    sig = tuple(math.sqrt((inplane_fwhm_factor * d * FWHM_TO_SIGMA) ** 2 + var * d * d) for d in (du, dv))
    out = SliceSet(
        name=ss.name,
        obs=obs,
        mask=mask,
        origins=origins,
        axes=ax,
        index=ss.index,
        spacing=(f * du, f * dv),
        thickness=ss.thickness,
        scale=ss.scale,
        window=ss.window,
        inplane_sigma=sig,
        pixel_weight=float(f * f),
        binning=f,
    )
    if ss.row_spans is not None:
        from ..render import mask_to_row_spans

        out.row_spans = torch.as_tensor(mask_to_row_spans(mask.cpu().numpy(), out.n, tuple(obs.shape[1:])))
    return out


def output_grid(stacks: list[Stack], resolution: float, margin_mm: float = 2.0, reference: int = 0):
    """Output grid at ``resolution`` over the masked anatomy, on the lattice of a reference stack.

    The grid's axes are the reference stack's voxel axes (its in-plane axes and its slice normal)
    and its lattice passes through the reference stack's voxel (0, 0, 0), as SVRTK's template
    grid does: the volume then overlays that stack voxel for voxel (where the resolution divides
    its spacing), and no half-voxel shift blurs a comparison with it. The box is the union of the
    stacks' mask boxes (each grown by half a slice and a pixel; masks that hold every voxel do not
    count), or without masks the box all the stacks' fields of view share, plus ``margin_mm``. The
    intersection of the mask boxes cut the anatomy's edge wherever one stack's mask ended short
    of another's (motion, a slab that misses the top of the head, masks drawn differently; real
    leave-one-out NCC 0.815 -> 0.833 on run 5).
    :func:`crop_grid` then trims it to the region the Gaussians live in. Returns (shape, affine).
    """
    ref = stacks[reference]
    A = ref.affine
    fr = ref.frames
    dirs = np.stack([fr.axes[0, 0], fr.axes[0, 1], A[:3, 2] / np.linalg.norm(A[:3, 2])], 1)
    if abs(float(dirs[:, 2] @ fr.axes[0, 2])) < 0.999:  # sheared through-plane axis: use the normal
        dirs[:, 2] = fr.axes[0, 2] * np.sign(float(dirs[:, 2] @ fr.axes[0, 2]) or 1.0)
    aff = np.eye(4)
    aff[:3, :3] = dirs * resolution
    aff[:3, 3] = A[:3, 3]
    inv = np.linalg.inv(aff)

    los, his = [], []
    for st in stacks:
        # the mask's box in output voxels, each point grown by pad in world space
        w = np.argwhere(st.mask) @ st.affine[:3, :3].T + st.affine[:3, 3]
        v = w @ inv[:3, :3].T + inv[:3, 3]
        pad = (st.thickness / 2 + max(st.frames.spacing)) / resolution
        los.append(v.min(0) - pad)
        his.append(v.max(0) + pad)
    real = [i for i, st in enumerate(stacks) if not st.mask.all()]
    if real:  # the union of the masks' boxes
        lo, hi = np.min([los[i] for i in real], 0), np.max([his[i] for i in real], 0)
    else:  # no masks: the box all the fields of view share (else their union)
        lo, hi = np.max(los, 0), np.min(his, 0)
        if np.any(hi <= lo):
            lo, hi = np.min(los, 0), np.max(his, 0)
    lo = np.floor(lo - margin_mm / resolution).astype(int)
    hi = np.ceil(hi + margin_mm / resolution).astype(int)
    shape = tuple(int(v) for v in (hi - lo + 1))
    if np.prod(shape) > 600**3:
        raise InputError("--output-resolution", f"{resolution} mm gives an absurd output grid {shape}")
    aff[:3, 3] = aff[:3, :3] @ lo + aff[:3, 3]
    return shape, aff


def crop_box(region: np.ndarray, affine: np.ndarray, margin_mm: float) -> tuple[slice, slice, slice]:
    """The box of the grid that holds ``region`` plus ``margin_mm`` (whole voxels)."""
    idx = np.argwhere(region)
    pad = np.ceil(margin_mm / voxel_sizes(affine)).astype(int)
    lo = np.maximum(idx.min(0) - pad, 0)
    hi = np.minimum(idx.max(0) + 1 + pad, region.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def box_affine(affine: np.ndarray, box: tuple[slice, slice, slice]) -> np.ndarray:
    """The affine of a box of a grid (the same lattice)."""
    A = np.array(affine, dtype=np.float64, copy=True)
    A[:3, 3] = A[:3, :3] @ np.array([b.start for b in box], dtype=np.float64) + A[:3, 3]
    return A


def crop_grid(region: np.ndarray, affine: np.ndarray, margin_mm: float):
    """The grid trimmed to ``region``'s box plus ``margin_mm`` (whole voxels, on the same lattice):
    (region, shape, affine)."""
    box = crop_box(region, affine, margin_mm)
    reg = region[box]
    return reg, tuple(int(v) for v in reg.shape), box_affine(affine, box)


def _majority_region(acc: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Voxels that most of the stacks covering them (``cov`` of them) call brain (``acc``)."""
    m = (cov > 0.5) & (acc >= 0.5 * cov)
    if not m.any():
        raise InputError("--stack-masks", "the stacks' masks do not overlap anywhere in space")
    return m


def region_mask(stacks: list[Stack], shape, affine) -> np.ndarray:
    """Where the Gaussians live: output voxels that most of the stacks covering them call brain."""
    acc = np.zeros(shape, np.float32)
    cov = np.zeros(shape, np.float32)
    for st in stacks:
        m, c = resample_volumes(
            [st.mask.astype(np.float32), np.ones(st.mask.shape, np.float32)], st.affine, shape, affine
        )
        acc += m
        cov += c
    return _majority_region(acc, cov)


def region_and_init(stacks: list[Stack], slicesets: list["SliceSet"], shape, affine) -> tuple[np.ndarray, np.ndarray]:
    """:func:`region_mask` and the naive average of the stacks, each divided by its slices'
    scale (the first level's intensities), from one resampling pass per stack: they share its
    coverage, and a pass is ~1 s on mni-t4's 1 mm grid."""
    acc = np.zeros(shape, np.float32)
    cov = np.zeros(shape, np.float32)
    total = np.zeros(shape, np.float64)
    count = np.zeros(shape, np.float64)
    for st, ss in zip(stacks, slicesets):
        m, c, d = resample_volumes(
            [st.mask.astype(np.float32), np.ones(st.mask.shape, np.float32), st.data / ss.scale],
            st.affine,
            shape,
            affine,
        )
        acc += m
        cov += c
        total += d
        count += c
    return _majority_region(acc, cov), covered_mean(total, count)


def region_from_slices(
    sets: list[SliceSet], frames, shape, affine, candidates: np.ndarray, reach: int = 2
) -> np.ndarray:
    """:func:`region_mask` with every slice where its pose puts it: output voxels that most of the
    stacks covering them call brain, read from the slice masks at the slices' (moved) frames.

    ``frames`` [(origins [K,3], axes [K,3,3])] per slice set (numpy, world mm); only voxels in
    ``candidates`` can join. A stack votes on a voxel when one of its slices lies within 0.75 x the
    slice spacing of it along that slice's normal (the nearest such slice decides, its mask read
    bilinearly in plane; outside its crop, background). Only the ``reach`` nominal neighbours on
    each side of a voxel's nominal slice are searched, which holds for motion below ~``reach``
    slice spacings. With motion the nominal masks disagree at the anatomy's edge (each slice's mask
    was drawn where the slice really was), and a region from them is jagged there: on
    sb25-t3.2-motion with the true poses, 29.2 dB with the nominal region against 30.5 dB with the
    true one."""
    idx = np.argwhere(candidates)
    X = idx @ np.asarray(affine, np.float64)[:3, :3].T + np.asarray(affine, np.float64)[:3, 3]
    acc = np.zeros(len(X))
    cov = np.zeros(len(X))
    for ss, (o, ax) in zip(sets, frames):
        o = np.asarray(o, np.float64)
        ax = np.asarray(ax, np.float64)
        o0 = ss.origins.detach().cpu().numpy().astype(np.float64)
        nrm = ss.axes.detach().cpu().numpy().astype(np.float64)[:, 2].mean(0)
        nrm /= np.linalg.norm(nrm)
        z = o0 @ nrm
        order = np.argsort(z)
        zs = z[order]
        gap = float(np.median(np.diff(zs))) if len(zs) > 1 else float(ss.thickness)
        gap = gap if gap > 0 else float(ss.thickness)
        pos = np.searchsorted(zs, X @ nrm)
        msk = ss.mask.detach().cpu().numpy().astype(np.float64)
        du, dv = ss.spacing
        _stack_votes(X, pos, order, o, ax, msk, float(du), float(dv), reach, 0.75 * gap, acc, cov)
    m = np.zeros(shape, bool)
    m[tuple(idx.T)] = (cov > 0) & (acc >= 0.5 * cov) & (acc > 0)
    return m


def _stack_votes(X, pos, order, o, ax, msk, du, dv, reach, near_mm, acc, cov):
    """One stack's votes for :func:`region_from_slices`, added to ``acc`` (its mask read at the
    nearest slice within ``near_mm``) and ``cov`` (1 where it has one) per voxel ``X`` [M,3];
    ``pos`` each voxel's place among the slices sorted along the stack's normal (``order``). The
    cpu kernel ``region_votes``, voxel by voxel; :func:`_stack_votes_numpy` is its twin, the same
    numbers (sb25-t3.2-motion: 0.66 -> 0.06 s a region; mni-t4-motion's took 5.6 s in numpy)."""
    from ..render._cpu_kernels import region_votes

    region_votes(
        np.ascontiguousarray(X), np.ascontiguousarray(pos, dtype=np.int64), np.ascontiguousarray(order, dtype=np.int64),
        np.ascontiguousarray(o), np.ascontiguousarray(ax), np.ascontiguousarray(msk), du, dv, int(reach),
        float(near_mm), acc, cov,
    )  # fmt: skip


def _stack_votes_numpy(X, pos, order, o, ax, msk, du, dv, reach, near_mm, acc, cov):
    """:func:`_stack_votes` in numpy, the slice offsets one after the other over all voxels at once."""
    best = np.full(len(X), np.inf)
    val = np.zeros(len(X))
    h, w = msk.shape[1:]
    for off in range(-reach, reach):
        j = pos + off
        ok = (j >= 0) & (j < len(order))
        if not ok.any():
            continue
        sel = np.nonzero(ok)[0]
        k = order[j[sel]]
        d, axk = X[sel] - o[k], ax[k]
        # the slice-frame offsets, each a sum of three products left to right, as the kernel adds
        # them (np.einsum's fused multiply-adds round otherwise: a voxel of the region in 1e5)
        q = np.stack([axk[:, c, 0] * d[:, 0] + axk[:, c, 1] * d[:, 1] + axk[:, c, 2] * d[:, 2] for c in range(3)], 1)
        dn = np.abs(q[:, 2])
        better = dn < best[sel]
        sel, k, q, dn = sel[better], k[better], q[better], dn[better]
        best[sel] = dn
        a = q[:, 0] / du
        b = q[:, 1] / dv
        a0 = np.floor(a).astype(np.int64)
        b0 = np.floor(b).astype(np.int64)
        fa, fb = a - a0, b - b0
        v = np.zeros(len(sel))
        for da, wa in ((0, 1 - fa), (1, fa)):
            for db, wb in ((0, 1 - fb), (1, fb)):
                aa, bb = a0 + da, b0 + db
                inside = (aa >= 0) & (aa < h) & (bb >= 0) & (bb < w)
                v[inside] += (wa * wb)[inside] * msk[k[inside], aa[inside], bb[inside]]
        val[sel] = v
    near = best <= near_mm
    acc += np.where(near, val, 0.0)
    cov += near
