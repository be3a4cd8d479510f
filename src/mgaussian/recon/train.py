"""The M-Gaussian training loop (issue 4): Gaussians on a masked grid, progressive growth, exact
slice PSF, smooth-L1 + SSIM + anisotropy loss, neural residual field, Adam; a pose per slice is
carried through the renderer (fixed here; motion correction optimises it)."""

from __future__ import annotations

__all__ = ["ReconResult", "reconstruct", "render_volume"]

import math
import os
import time
from dataclasses import dataclass, field as dc_field

import numpy as np
import torch

from ..field import GaussianField, anisotropy_penalty, grow_field, init_field_on_grid
from ..geometry import apply_pose_to_frames
from ..io import Stack
from ..psf import FWHM_TO_SIGMA
from ..render import (AutogradDesign, mask_to_row_spans, render_points, render_slices, resolve_backend, slice_design,
                      slice_psf_sigma)
from .config import ReconConfig
from .data import (SliceSet, bin_slices, crop_grid, expand_pixels, grow_masks, naive_init, output_grid, pool_pixels,
                   prepare_slices, region_from_slices, region_mask)
from .motion import anchor_poses, fov_centre, reliable_slices
from .losses import masked_smooth_l1, masked_ssim
from .nrf import NeuralResidualField
from .progress import Progress


@dataclass
class ReconResult:
    volume: np.ndarray  # output volume in the inputs' intensity units
    affine: np.ndarray
    field: GaussianField
    nrf: NeuralResidualField | None
    config: ReconConfig
    region: np.ndarray  # bool mask on the output grid
    scale: float  # output = model value x scale
    centre: np.ndarray  # centre of the slice poses (mm)
    # per stack: {"stack", "slices" (indices of the fitted slices), "rotvec" [K][3] (rad),
    # "translation_mm" [K][3], "stack_rotvec" [3], "stack_translation_mm" [3]}; slice pose x ->
    # R(x - centre) + centre + t applied to the slice's nominal frame (stack pose for unfitted slices)
    poses: list[dict]
    history: list[dict] = dc_field(default_factory=list)  # {"step","level","loss","l1","ssim","time_s"}
    # per stack: {"stack", "slices", "weight" [K] in [0,1], "scale" [K] (intensity scale), "excluded" [slice indices]}
    slice_weights: list[dict] = dc_field(default_factory=list)
    # {"step", "time_s", "stacks": [{"stack", "mean_translation_mm", "mean_rotation_deg", "mean_weight"}]}
    pose_history: list[dict] = dc_field(default_factory=list)
    timings: dict = dc_field(default_factory=dict)
    backend: str = "cpu"


# how far the region rebuilt from the slices' poses may reach beyond the nominal one (mm)
_REGION_REACH_MM = 6.0


def _set_threads(n: int | None):
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        pass


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import InputError

        raise InputError("--device", "cuda requested but no CUDA device is available")
    return torch.device(name)


def _frames(ss: SliceSet, sel: torch.Tensor, rot, trans, cents):
    """Frames (origins [b,3], axes [b,3,3]) of the selected slices moved by their poses (about
    the slices' own centres ``cents`` [K,3], see :mod:`.motion`)."""
    return apply_pose_to_frames(ss.origins[sel], ss.axes[sel], rot[sel], trans[sel], cents[sel])


def _stack_psf(ss: SliceSet, cfg: ReconConfig):
    """The PSF sigmas (u, v, n) of a stack's slices (None: the seed's point evaluation)."""
    psf = slice_psf_sigma(ss.spacing, ss.thickness * cfg.through_plane_fwhm_factor, cfg.inplane_fwhm_factor) if cfg.use_psf else None
    if psf is not None and ss.inplane_sigma is not None:
        psf = (*ss.inplane_sigma, psf[2])
    return psf


def _stack_design(fld: dict, ss: SliceSet, o, ax, cfg: ReconConfig, backend: str, max_bytes: float | None):
    """The render of all of a stack's slices (frames ``o``, ``ax``) as a linear map of the
    intensities (render.slice_design: explicit on the cpu backend within ``max_bytes``)."""
    if cfg.renderer == "points":
        sel = torch.arange(ss.n, device=o.device)
        others = {k: v.detach() for k, v in fld.items() if k != "intensities"}
        return AutogradDesign(lambda c: _render_stack_slices(dict(others, intensities=c), ss, sel, o, ax, cfg, backend),
                              fld["intensities"].shape[0])
    h, w = ss.obs.shape[1:]
    return slice_design(fld["means"].detach(), fld["log_scales"].detach(), fld["quats"].detach(), o, ax, (h, w),
                        ss.spacing, _stack_psf(ss, cfg), backend=backend, cutoff=cfg.cutoff, row_spans=ss.row_spans,
                        max_bytes=max_bytes)


def _render_stack_slices(fld: dict, ss: SliceSet, sel: torch.Tensor, o, ax, cfg: ReconConfig, backend: str):
    h, w = ss.obs.shape[1:]
    psf = _stack_psf(ss, cfg)
    if cfg.renderer == "points":
        return _render_points_path(fld, ss, sel, o, ax, psf, cfg, backend)
    spans = ss.row_spans[sel] if ss.row_spans is not None else None
    return render_slices(fld["means"], fld["log_scales"], fld["quats"], fld["intensities"], o, ax, (h, w), ss.spacing,
                         psf, backend=backend, cutoff=cfg.cutoff, row_spans=spans)


def _pixel_points(ss: SliceSet, sel, o, ax):
    """World positions [b,h,w,3] of the pixels of the selected (moved) slices."""
    h, w = ss.obs.shape[1:]
    du, dv = ss.spacing
    a = torch.arange(h, dtype=o.dtype, device=o.device) * du
    b = torch.arange(w, dtype=o.dtype, device=o.device) * dv
    return o[:, None, None, :] + a[None, :, None, None] * ax[:, None, None, 0] + b[None, None, :, None] * ax[:, None, None, 1]


def _render_points_path(fld, ss, sel, o, ax, psf, cfg, backend):
    """The seed's path: evaluate the field at the masked pixels with the block partitioning."""
    pts = _pixel_points(ss, sel, o, ax)
    m = ss.mask[sel]
    out = torch.zeros(m.shape, dtype=o.dtype, device=o.device)
    if psf is None:
        cov = None
    else:
        s2 = torch.as_tensor(psf, dtype=o.dtype, device=o.device) ** 2
        covs = ax.transpose(-1, -2) @ torch.diag_embed(s2.expand(ax.shape[0], 3)) @ ax  # [b,3,3]
        cov = covs[:, None, None].expand(*m.shape, 3, 3)[m]
    vals = render_points(fld["means"], fld["log_scales"], fld["quats"], fld["intensities"], pts[m], cov,
                         block_radius=cfg.block_radius, backend=backend)
    return out.index_put(m.nonzero(as_tuple=True), vals)


# Gauss-Hermite nodes for the through-plane PSF of the NRF (exact for polynomials up to degree 5)
_GH_NODES = (-math.sqrt(3.0), 0.0, math.sqrt(3.0))
_GH_WEIGHTS = (1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0)


def _nrf_slices(nrf: NeuralResidualField, ss: SliceSet, sel, o, ax, cfg: ReconConfig):
    pts = _pixel_points(ss, sel, o, ax)
    m = ss.mask[sel]
    p = pts[m]
    out = torch.zeros(m.shape, dtype=p.dtype, device=p.device)
    if cfg.use_psf:
        sn = ss.thickness * cfg.through_plane_fwhm_factor * FWHM_TO_SIGMA
        n = ax[:, None, None, 2].expand(*m.shape, 3)[m]
        val = sum(wt * nrf(p + (z * sn) * n) for z, wt in zip(_GH_NODES, _GH_WEIGHTS))
    else:
        val = nrf(p)
    return out.index_put(m.nonzero(as_tuple=True), val)


def lattice_pairs(grid_index: np.ndarray, grid_shape) -> torch.Tensor:
    """Pairs (i, j) of Gaussians that are lattice neighbours along x, y or z: [P, 2] int64."""
    gi = np.asarray(grid_index, dtype=np.int64)
    shp = np.asarray(grid_shape, dtype=np.int64)
    lut = -np.ones(tuple(shp), np.int64)
    lut[gi[:, 0], gi[:, 1], gi[:, 2]] = np.arange(len(gi))
    pairs = []
    for ax in range(3):
        nb = gi.copy()
        nb[:, ax] += 1
        ok = nb[:, ax] < shp[ax]
        j = np.full(len(gi), -1)
        j[ok] = lut[nb[ok, 0], nb[ok, 1], nb[ok, 2]]
        keep = j >= 0
        pairs.append(np.stack([np.nonzero(keep)[0], j[keep]], 1))
    return torch.as_tensor(np.concatenate(pairs), dtype=torch.long)


def _laplacian_apply(v: torch.Tensor, pairs: torch.Tensor, pair_w: torch.Tensor | None = None) -> torch.Tensor:
    """L v for the graph Laplacian of the lattice pairs (gradient of 1/2 sum w_ij (v_i - v_j)^2;
    w = 1 unless ``pair_w`` [P] is given)."""
    d = v[pairs[:, 0]] - v[pairs[:, 1]]
    if pair_w is not None:
        d = d * pair_w
    out = torch.zeros_like(v)
    out.index_add_(0, pairs[:, 0], d)
    out.index_add_(0, pairs[:, 1], -d)
    return out


def _cg_intensities(params: dict, sets, rots, trans, cents, wts, scs, cfg: ReconConfig, backend: str, n_iter: int,
                    pairs: torch.Tensor | None = None, smooth: float = 0.0, ridge: float = 1e-6, deadline: float | None = None,
                    min_iter: int = 0, pair_w: torch.Tensor | None = None, cache: dict | None = None):
    """Least-squares intensities for fixed Gaussian shapes and slice poses: conjugate gradients
    on the weighted normal equations (A^T W A + ridge) c = A^T W y over all masked pixels; A c
    renders slices (linear in c) times each slice's intensity scale; W holds the robust pixel x
    slice weights (0 outside the masks). Used to warm-start each level and to re-fit after pose
    updates, so Adam starts near the data term's minimum.

    A is each stack's ``render.slice_design``: on the cpu backend an explicit sparse map built in
    one pass (within ``cfg.design_memory_gb`` for all stacks together), so an iteration costs a
    multiply-add per (pixel, Gaussian) term instead of a render and its backward pass.

    ``cache``: a dict kept by the caller; the designs are reused from it while the slices, their
    poses, the Gaussians' shapes and the PSF are the same as at its last call (mni-t4 at 1 mm:
    16 s a build)."""
    c = params["intensities"]
    others = {k: v.detach() for k, v in params.items() if k != "intensities"}
    key = None
    if cache is not None:
        key = (tuple(id(ss) for ss in sets), cfg.through_plane_fwhm_factor, cfg.cutoff, cfg.use_psf, cfg.renderer,
               tuple((v.data_ptr(), v._version) for k, v in sorted(params.items()) if k != "intensities"))
        if cache.get("key") != key or not all(torch.equal(a, b) for a, b in zip(cache["poses"], (*rots, *trans))):
            cache.clear()
    designs = cache.get("designs") if cache else None
    budget = cfg.design_memory_gb * 1024 ** 3
    sw2, ys = [], []
    with torch.no_grad():
        if designs is None:
            t_build = time.time()
            designs = []
            for si, ss in enumerate(sets):
                sel = torch.arange(ss.n, device=c.device)
                o, ax = _frames(ss, sel, rots[si].detach(), trans[si].detach(), cents[si])
                d = _stack_design(dict(others, intensities=c.detach()), ss, o, ax, cfg, backend, max_bytes=budget)
                budget = max(0.0, budget - d.nbytes)
                designs.append(d)
            if cache is not None:
                cache.update(key=key, designs=designs, poses=[x.detach().clone() for x in (*rots, *trans)],
                             build_s=time.time() - t_build)
        for si, ss in enumerate(sets):
            sc = scs[si][:, None, None]
            sw2.append(wts[si] * sc * sc)  # A^T W A with the slice scales inside A
            ys.append(ss.obs / sc.clamp_min(1e-12))  # the scaled residual's target, unscaled

    def AtA(v):
        g = sum(d.normal(v, w) for d, w in zip(designs, sw2)) + ridge * v
        if smooth > 0 and pairs is not None:
            g = g + smooth * _laplacian_apply(v, pairs, pair_w)
        return g

    x = c.detach().clone()
    g = sum(d.rmatvec((d.matvec(x) - y) * w) for d, y, w in zip(designs, ys, sw2))
    r = -(g + ridge * x)
    if smooth > 0 and pairs is not None:
        r = r - smooth * _laplacian_apply(x, pairs, pair_w)
    p = r.clone()
    rs = (r * r).sum()
    for i in range(n_iter):
        if deadline is not None and time.time() > deadline and i >= min_iter:
            break
        Ap = AtA(p)
        alpha = rs / (p * Ap).sum().clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = (r * r).sum()
        p = r + (rs_new / rs.clamp_min(1e-30)) * p
        rs = rs_new
    with torch.no_grad():
        c.copy_(x)


@torch.no_grad()
def _extrapolation_gain(step, prev, cap: float, arm_mm: float = 40.0) -> float:
    """How far to carry on along this round's pose moves: the alternation of pose rounds and field
    re-fits converges linearly, each round's moves about rho x the last round's, so the moves
    still to come sum to rho / (1 - rho) x this round's. rho is the projection of this round's
    moves on the last round's, over all slices (rotation vectors x ``arm_mm`` to weigh like mm at
    the edge of a slice; per slice it is too noisy). The gain is capped at ``cap``; 0 unless
    0 < rho < 1 (the rounds turn back, or do not settle). ``step``, ``prev``: per stack (rotation
    [n, 3] rad, translation [n, 3] mm)."""
    num = sum(float((a[0] * b[0]).sum()) * arm_mm ** 2 + float((a[1] * b[1]).sum()) for a, b in zip(step, prev))
    den = sum(float((b[0] * b[0]).sum()) * arm_mm ** 2 + float((b[1] * b[1]).sum()) for b in prev)
    rho = num / den if den > 0 else 0.0
    return min(rho / (1.0 - rho), cap) if 0.0 < rho < 1.0 else 0.0


def _optimise_poses(params: dict, sets, rots, trans, cents, wts, scs, cfg: ReconConfig, backend: str, iters: int,
                    deadline: float | None = None, skip=(), eps_rot: float = 2e-3, eps_trans: float = 0.05,
                    max_rot: float = 0.035, max_trans: float = 2.0, prior: float = 1e-3, rot_axes=(0, 1, 2),
                    small_slice: float = 0.0, jac_every: int = 1, jac_reuse_mm: float = 0.2,
                    jac_reuse_rad: float = 0.0035):
    """Levenberg-Marquardt on every slice's rigid pose (6 parameters) with the field fixed.

    Slices are independent given the field, so one render with parameter j of every slice
    perturbed gives column j of every slice's Jacobian (forward differences): 7 renders per
    iteration build each slice's 6x6 normal matrix J^T W J and gradient J^T W r, and one more
    checks the step. A step is kept per slice only if it lowers that slice's cost, else its
    damping grows. Unlike Adam (whose steps have the same size in every direction, even where
    the data do not constrain the pose, e.g. a thick slice's tilt), the damped normal equations
    step little along weakly constrained directions. ``prior`` (relative to the mean diagonal)
    keeps slices with few pixels near their current pose. Steps are capped at ``max_rot`` rad
    and ``max_trans`` mm.

    ``small_slice`` > 0 holds the slices with less pixel weight than that fraction of the stack's
    median slice near their stack's mean pose (over the stack's slices at the call's start): cost +
    sum_j P_j dev_j^2 with P = the median slice's curvature (per parameter: a thick slice's tilts are
    seen far less than its in-plane turn). A slice at the anatomy's edge with a hundred pixels
    otherwise wanders (sb25-t3.2-motion: such slices went 5-19 deg astray). A pull on every slice,
    even one worth only 100 pixels, compounds over the rounds of alternation with the field (the
    field follows the pulled poses) and cost sb25-t3.2-motion 0.5 dB.

    ``jac_every``: the Jacobian (6 renders) is recomputed every this many iterations and reused
    in between (the step and its check still see the current residual), unless a slice of the
    stack moved by more than ``jac_reuse_mm`` or ``jac_reuse_rad`` at the last step."""
    from .motion import moved_by_mean, pose_means

    fld = {k: v.detach() for k, v in params.items()}

    def render(si, r, t):
        ss = sets[si]
        sel = torch.arange(ss.n, device=r.device)
        o, ax = _frames(ss, sel, r, t, cents[si])
        return _render_stack_slices(fld, ss, sel, o, ax, cfg, backend) * scs[si][:, None, None]

    for si, ss in enumerate(sets):
        if si in skip or ss.n == 0:
            continue
        r, t, w = rots[si], trans[si], wts[si]
        lam = torch.full((ss.n,), 1e-2, dtype=torch.float64, device=r.device)
        base = render(si, r, t)
        dcost = cost = (((base - ss.obs) ** 2) * w).sum((1, 2)).double()
        use_prior = small_slice > 0 and ss.n > 2
        if use_prior:
            mean = pose_means([r], [t], [cents[si]])
            ck = cents[si].detach().cpu().numpy().astype(np.float64)
            tgt_t = torch.as_tensor(moved_by_mean(ck, *mean) - ck, dtype=torch.float64, device=r.device)
            tgt_r = torch.as_tensor(mean[0], dtype=torch.float64, device=r.device)[None, :]
            p_d = None  # [6] prior weight per parameter (rotations about the slice axes, translations), from the first Jacobian

            def prior_cost(rr, tt, axr):
                dev = torch.cat([torch.einsum("kjc,kc->kj", axr, rr.double() - tgt_r), tt.double() - tgt_t], 1)
                return (p_d * dev ** 2).sum(1), dev
        J = None
        for it in range(iters):
            if deadline is not None and time.time() > deadline:
                break
            # parameters: rotations about the slice's own axes (e_u, e_v, n: tilts first, the
            # in-plane turn last) and translations along world x, y, z
            ax_now = _frames(ss, torch.arange(ss.n, device=r.device), r, t, cents[si])[1]
            wd = w.double()
            if J is None or it % jac_every == 0:
                dirs = [ax_now[:, i] for i in rot_axes] + [None] * 3
                cols = []
                for j, dj in enumerate(dirs):
                    rr, tt = r.clone(), t.clone()
                    if j < len(rot_axes):
                        rr = rr + eps_rot * dj
                    else:
                        tt[:, j - len(rot_axes)] += eps_trans
                    cols.append((render(si, rr, tt) - base) / (eps_rot if j < len(rot_axes) else eps_trans))
                J = torch.stack(cols, 1).double()  # [K,P,h,w]
                H0 = torch.einsum("kahw,kbhw,khw->kab", J, J, wd)
            H = H0.clone()
            g = torch.einsum("kahw,khw,khw->ka", J, (base - ss.obs).double(), wd)
            dH = torch.diagonal(H, dim1=1, dim2=2)
            ref = dH.mean(0, keepdim=True).clamp_min(1e-12)
            nr = len(rot_axes)
            axr = torch.stack([ax_now[:, i] for i in rot_axes], 1).double() if nr else None  # [K,nr,3]
            if use_prior:
                # per parameter: a thick slice's tilts are seen far less than its in-plane turn
                if p_d is None:
                    Wk = wd.sum((1, 2))
                    Wmed = Wk.median().clamp_min(1e-12)
                    per = (dH / Wk.clamp_min(1e-12)[:, None]).median(0).values  # curvature per unit of pixel weight
                    small = (Wk < small_slice * Wmed).to(per.dtype)[:, None]
                    p_d = small * (Wmed * per)[None, :]  # [K,6]: a small slice weighs like a median one
                pc, dev = prior_cost(r, t, axr)  # axes fixed for this step
                cost = dcost + pc
                g = g + p_d * dev
                H = H + torch.diag_embed(p_d.expand(ss.n, -1))
            A = H + torch.diag_embed(lam[:, None] * dH + prior * ref)
            step = -torch.linalg.solve(A, g[..., None])[..., 0]
            sr = torch.einsum("kj,kjc->kc", step[:, :nr], axr) if nr else torch.zeros_like(step[:, :3])
            st = step[:, nr:]
            sr = sr * (max_rot / sr.norm(dim=1, keepdim=True).clamp_min(max_rot))
            st = st * (max_trans / st.norm(dim=1, keepdim=True).clamp_min(max_trans))
            r_new, t_new = r + sr.to(r.dtype), t + st.to(t.dtype)
            pred = render(si, r_new, t_new)
            d_new = (((pred - ss.obs) ** 2) * w).sum((1, 2)).double()
            c_new = d_new + prior_cost(r_new, t_new, axr)[0] if use_prior else d_new
            ok = c_new < cost
            r.copy_(torch.where(ok[:, None], r_new, r))
            t.copy_(torch.where(ok[:, None], t_new, t))
            base = torch.where(ok[:, None, None], pred, base)
            cost = torch.where(ok, c_new, cost)
            dcost = torch.where(ok, d_new, dcost)
            lam = torch.where(ok, (lam * 0.3).clamp_min(1e-4), lam * 10.0)
            # a slice that moved far leaves the Jacobian stale: recompute it at the next iteration
            big = ok & ((sr.norm(dim=1) > jac_reuse_rad) | (st.norm(dim=1) > jac_reuse_mm))
            if bool(big.any()):
                J = None


@torch.no_grad()
def _predict_all(params: dict, sets, rots, trans, cents, cfg: ReconConfig, backend: str, nrf=None):
    out = []
    fld = {k: v.detach() for k, v in params.items()}
    for si, ss in enumerate(sets):
        sel = torch.arange(ss.n, device=ss.obs.device)
        o, ax = _frames(ss, sel, rots[si], trans[si], cents[si])
        pred = _render_stack_slices(fld, ss, sel, o, ax, cfg, backend)
        if nrf is not None:
            pred = pred + _nrf_slices(nrf, ss, sel, o, ax, cfg)
        out.append(pred)
    return out


@torch.no_grad()
def _update_robust(params, sets, rots, trans, cents, scs, sws, pws, cfg: ReconConfig, backend: str, nrf=None):
    """Re-estimate the per-slice intensity scales and the robust slice / pixel weights from the
    current prediction; returns the new loss weights per stack (mask x pixel x slice weight)."""
    from .motion import fit_slice_scales, robust_weights

    preds = _predict_all(params, sets, rots, trans, cents, cfg, backend, nrf)
    resid, nccs = [], []
    for si, (ss, pred) in enumerate(zip(sets, preds)):
        m = ss.mask.to(pred.dtype)
        if cfg.slice_scale:
            pw_here = pool_pixels(pws[si], ss.binning)
            scs[si].copy_(fit_slice_scales(pred, ss.obs, m * pw_here * sws[si][:, None, None].clamp_min(1e-3)))
        p = pred * scs[si][:, None, None]
        resid.append((p - ss.obs) * m)
        cnt = m.sum((1, 2)).clamp_min(1)
        pm = (p * m).sum((1, 2)) / cnt
        om = (ss.obs * m).sum((1, 2)) / cnt
        pc = (p - pm[:, None, None]) * m
        oc = (ss.obs - om[:, None, None]) * m
        nccs.append((pc * oc).sum((1, 2)) / ((pc ** 2).sum((1, 2)) * (oc ** 2).sum((1, 2))).sqrt().clamp_min(1e-12))
    if cfg.robust:
        pw, sw, _ = robust_weights(resid, [ss.mask for ss in sets], nccs, cfg.pixel_outlier_c,
                                   cfg.slice_outlier_z, cfg.slice_min_ncc)
        for si, ss in enumerate(sets):  # pixel weights are kept per source pixel (a bin's weight to each of its pixels)
            pws[si].copy_(expand_pixels(pw[si], ss.binning, tuple(pws[si].shape[1:])))
            sws[si].copy_(sw[si])
    return _loss_weights(sets, pws, sws), nccs


def _loss_weights(sets, pws, sws=None):
    """Loss weight of each pixel of each (possibly binned) slice set: mask x pixel x slice weight
    x the pixels a binned pixel stands for. ``pws`` are per source pixel. Without ``sws`` (the
    weights a slice's own pose is fitted with) every slice counts in full: a slice excluded
    because it is far from its pose must still be moved to it, or it stays excluded for good."""
    if sws is None:
        return [ss.mask.to(pw.dtype) * pool_pixels(pw, ss.binning) * ss.pixel_weight for ss, pw in zip(sets, pws)]
    return [ss.mask.to(pw.dtype) * pool_pixels(pw, ss.binning) * sw[:, None, None] * ss.pixel_weight
            for ss, pw, sw in zip(sets, pws, sws)]


def render_volume(fld: GaussianField, nrf, shape, affine, region: np.ndarray | None, backend: str = "auto",
                  chunk: int = 16, dilate_vox: int = 2, cutoff: float = 3.0) -> np.ndarray:
    """Point-evaluate the model (Gaussians + NRF) on a voxel grid, slice by slice (bounded memory).

    Only voxels within ``dilate_vox`` of ``region`` are rendered; the rest is 0."""
    from scipy import ndimage

    from ..render import render_volume as render_gaussians

    if region is not None:
        reg = ndimage.binary_dilation(region, iterations=dilate_vox) if dilate_vox else region
    else:
        reg = np.ones(shape, bool)
    dev = fld.means.device
    with torch.no_grad():
        vol = render_gaussians(fld.means, fld.log_scales, fld.quats, fld.intensities, affine, shape, None,
                               backend=backend, cutoff=cutoff, slices_per_call=chunk, mask=reg)
        m = torch.as_tensor(reg, device=dev)
        if nrf is not None and bool(m.any()):
            A = torch.as_tensor(np.asarray(affine, dtype=np.float64))
            ijk = torch.nonzero(m).to(torch.float64)
            pts = (ijk @ A[:3, :3].T + A[:3, 3]).to(device=dev, dtype=vol.dtype)
            vals = torch.cat([nrf(pts[i : i + 262144]) for i in range(0, len(pts), 262144)])
            vol = vol.index_put(m.nonzero(as_tuple=True), vals, accumulate=True)
        vol = torch.where(m, vol, torch.zeros((), dtype=vol.dtype, device=dev))
    return vol.cpu().numpy().astype(np.float32)


# ---- checkpoints (issue 6): ALL the state the loop needs to continue goes through these two
# functions, as one dict. New loop state (a pose optimiser, slice weights) is one more entry in
# each, and one more keyword where reconstruct() calls _snapshot.
def _snapshot(*, level, iteration, cg_done, done, fld, params, opt, nrf, nrf_opt, rng, order, step, history,
              rots, trans, elapsed_s, motion_state=None) -> dict:
    """The loop state at an iteration boundary (``iteration`` = the next one to run in ``level``;
    ``level`` = number of levels when fitting is done), as CPU tensors and plain Python values."""
    return {
        "level": level, "iteration": iteration, "cg_done": cg_done, "done": done, "step": step,
        "elapsed_s": elapsed_s, "history": list(history),
        "field": {**{k: v.detach().cpu().clone() for k, v in params.items()}, "spacing": fld.spacing,
                  "grid_origin": np.asarray(fld.grid_origin), "grid_index": fld.grid_index, "grid_shape": fld.grid_shape},
        "opt": opt.state_dict() if opt is not None else None,  # Adam moments and step counts
        "nrf": {k: v.detach().cpu().clone() for k, v in nrf.state_dict().items()} if nrf is not None else None,
        "nrf_opt": nrf_opt.state_dict() if nrf_opt is not None else None,
        "rng": rng.bit_generator.state, "order": list(order),  # batch order: RNG + the rest of the epoch
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "rots": [r.detach().cpu().clone() for r in rots], "trans": [t.detach().cpu().clone() for t in trans],
        # stack poses, slice scales / weights, pixel weights, pose history
        "motion": {k: ([x.detach().cpu().clone() for x in v] if k in ("scs", "sws", "pws") else v)
                   for k, v in (motion_state or {}).items()},
    }


def _restore(st: dict, dev, make_nrf) -> dict:
    """The loop state of a ``_snapshot`` on device ``dev`` (``make_nrf()`` builds an empty NRF);
    also resets the torch RNGs. The caller sets the numpy RNG and builds the Adam of the level."""
    f = st["field"]
    fld = GaussianField(*(f[k].to(dev) for k in ("means", "log_scales", "quats", "intensities")), f["spacing"],
                        np.asarray(f["grid_origin"]), f["grid_index"], f["grid_shape"])
    nrf = nrf_opt = None
    if st["nrf"] is not None:
        nrf = make_nrf()
        nrf.load_state_dict(st["nrf"])
        nrf_opt = torch.optim.Adam(nrf.parameters(), lr=1.0)  # lr comes back with the state
        nrf_opt.load_state_dict(st["nrf_opt"])
    torch.set_rng_state(st["torch_rng"])
    if st.get("cuda_rng") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda_rng"])
    return {"fld": fld, "nrf": nrf, "nrf_opt": nrf_opt, "order": [tuple(x) for x in st["order"]],
            "step": int(st["step"]), "history": list(st["history"]),
            "rots": [r.to(dev) for r in st["rots"]], "trans": [t.to(dev) for t in st["trans"]],
            "motion": {k: ([x.to(dev) for x in v] if k in ("scs", "sws", "pws") else v) for k, v in st.get("motion", {}).items()}}


def _choose_profile(stacks, sets, region, aff, init, spacing, rots, trans, cents, wts, scs, cfg, backend, log, dev,
                    noise_sigma: float = 0.0, n_iter: int = 12) -> float:
    """The through-plane PSF width (x thickness) among ``cfg.profile_candidates`` whose
    least-squares fit on a grid of twice the finest pixel leaves the smallest residual (whatever
    the output resolution: on a grid as coarse as the slices' thickness a narrower profile
    always wins). On such a grid the
    Gaussians cannot follow a wrong profile, so the residual tells the profile: sb25-t3.2
    (Gaussian profile) 4.6e-5 at 1.0 vs 6.8e-5 at 0.8; the same with a box profile 9.7e-5 vs
    4.1e-5 (benchmarks/TUNING.md).

    The residuals are compared above the noise floor (``noise_sigma``^2 over the binned pixel
    count), and a candidate replaces the first only when it is ``cfg.profile_margin`` smaller."""
    if len(cfg.profile_candidates) == 1:
        return float(cfg.profile_candidates[0])
    fld = init_field_on_grid(region, aff, spacing, dilate_mm=cfg.dilate_mm, init_intensity=init,
                             scale_factor=cfg.scale_factor, device=dev)
    wsum = float(sum(w.sum() for w in wts)) or 1.0
    scores = {}
    for f in cfg.profile_candidates:
        c = cfg.resolved(through_plane_fwhm_factor=float(f))
        params = {k: v.detach().clone().requires_grad_(True) for k, v in fld.tensors().items()}
        _cg_intensities(params, sets, rots, trans, cents, wts, scs, c, backend, n_iter)
        preds = _predict_all(params, sets, rots, trans, cents, c, backend)
        scores[float(f)] = sum(float(((p * sc[:, None, None] - ss.obs) ** 2 * w).sum())
                               for p, ss, w, sc in zip(preds, sets, wts, scs)) / wsum
    binned = float(np.mean([ss.binning ** 2 for ss in sets]))
    floor = noise_sigma ** 2 / binned
    excess = {f: max(r - floor, 0.0) for f, r in scores.items()}
    first = float(cfg.profile_candidates[0])
    best = min(excess, key=excess.get)
    if excess[best] > (1.0 - cfg.profile_margin) * excess[first]:
        best = first
    log("slice profile: through-plane FWHM " + ", ".join(f"{f:g} x thickness -> residual {r:.3g}" for f, r in scores.items())
        + f" (noise floor {floor:.3g}); using {best:g}")
    return best


def reconstruct(stacks: list[Stack], cfg: ReconConfig, log=print, progress: bool = True, history_every: int = 10,
                checkpointer=None, resume_state: dict | None = None,
                slice_poses: list[np.ndarray] | None = None) -> ReconResult:
    """Reconstruct a volume from loaded stacks with the given configuration.

    ``checkpointer`` (recon.checkpoint.Checkpointer) saves the loop state after each level's warm
    start, every ``interval_s`` at an iteration boundary and at the end of fitting;
    ``resume_state`` (its ``load()``) continues from such a state.

    ``slice_poses``: one [slices, 4, 4] array per stack, the world-to-world rigid map of each
    slice (header position -> where it was acquired), as the simulator's truth.json holds them.
    The slices start there instead of at a registered stack pose (with ``cfg.motion`` off they stay
    there): the benchmarks' reconstructions at the true poses."""
    t_start = time.time()
    cfg.validate()
    _set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = _device(cfg.device)
    backend = resolve_backend(cfg.backend)
    if dev.type == "cpu" and backend == "gpu":
        backend = resolve_backend("cpu")
    res = cfg.output_resolution or round(float(min(min(s.frames.spacing) for s in stacks)), 4)
    cfg = cfg.resolved(output_resolution=res)
    timings = {}

    # ---- data
    t0 = time.time()
    multi = len(stacks) > 1
    ref = min(cfg.reference_stack, len(stacks) - 1)
    if slice_poses is not None and len(slice_poses) != len(stacks):
        raise ValueError(f"slice_poses: {len(slice_poses)} arrays for {len(stacks)} stacks")
    if resume_state is not None and resume_state.get("motion", {}).get("stack_poses") is not None:
        stack_poses = [np.asarray(P) for P in resume_state["motion"]["stack_poses"]]  # [checkpoint]
    elif cfg.register_stacks and multi and slice_poses is None:
        from .motion import register_stacks

        stack_poses = register_stacks(stacks, reference=ref, log=log)
    else:
        stack_poses = [np.eye(4) for _ in stacks]
    timings["register_s"] = time.time() - t0
    t0 = time.time()
    from .motion import moved_stack, slice_centres, slice_pose_from_matrix

    # registered on the masks as given, fitted with a rim of data around them; the intensities'
    # scale and the noise are read inside the masks as given (the noise estimate read the edge of
    # a masked simulation inside the rim as noise: clean sb25 sigma 0.0010 -> 0.0016 with 2 mm)
    given = stacks
    stacks = grow_masks(stacks, cfg.mask_rim_mm)
    placed = [moved_stack(st, P) for st, P in zip(stacks, stack_poses)]
    sets = prepare_slices(stacks, scale_masks=[st.mask for st in given])
    shape, aff = output_grid(placed, res, reference=ref)
    # trimmed to the region, with room for it to grow where the slices' poses take it
    # (_current_region), the rendered margin (2 voxels) and 2 mm
    region, shape, aff = crop_grid(region_mask(placed, shape, aff), aff, _REGION_REACH_MM + 2.0 + 2 * res)
    init = naive_init(placed, sets, shape, aff)
    init = np.where(region, init, 0.0)
    for ss in sets:
        ss.row_spans = torch.as_tensor(mask_to_row_spans(ss.mask.numpy(), ss.n, tuple(ss.obs.shape[1:])))
        ss.obs, ss.mask = ss.obs.to(dev), ss.mask.to(dev)
        ss.origins, ss.axes = ss.origins.to(dev), ss.axes.to(dev)
    scale = float(np.mean([ss.scale for ss in sets]))
    idx = np.argwhere(region)
    wlo = idx.min(0) @ aff[:3, :3].T + aff[:3, 3]
    whi = idx.max(0) @ aff[:3, :3].T + aff[:3, 3]
    centre = torch.as_tensor((wlo + whi) / 2, dtype=torch.float32, device=dev)
    half_extent = float(np.max(whi - wlo) / 2)
    # slice poses about the slices' own centres, starting at their stack's registered pose
    cents = [slice_centres(ss) for ss in sets]
    rots, trans = [], []
    for ss, cs, P in zip(sets, cents, stack_poses):
        r0, u0 = slice_pose_from_matrix(P, cs.cpu().numpy().astype(np.float64))
        rots.append(torch.as_tensor(r0, dtype=torch.float32, device=dev))
        trans.append(torch.as_tensor(u0, dtype=torch.float32, device=dev))
    from .motion import pose_means

    start_poses = [(r.clone(), t.clone()) for r, t in zip(rots, trans)]  # where the headers put the slices
    if slice_poses is not None:
        for si, (ss, cs, M) in enumerate(zip(sets, cents, slice_poses)):
            if ss.n == 0:
                continue
            M = np.asarray(M, dtype=np.float64)
            cs = cs.cpu().numpy().astype(np.float64)
            ru = [slice_pose_from_matrix(M[int(k)], cs[j:j + 1]) for j, k in enumerate(ss.index)]
            rots[si] = torch.as_tensor(np.concatenate([a for a, _ in ru]), dtype=torch.float32, device=dev)
            trans[si] = torch.as_tensor(np.concatenate([b for _, b in ru]), dtype=torch.float32, device=dev)
    anchor = pose_means(rots, trans, cents)[:2]  # the mean slice pose stays where registration put it
    anchor_pivot = None  # set when the volume is put in the headers' frame (then the poses' centre about it is held)
    fov_pivot = fov_centre(stacks)  # the pivot of the headers' frame
    anchor_reliable = reliable_slices(sets)  # the slices whose translations place it

    def hold_frame():
        """Put the slices' common frame back where ``anchor`` (and ``anchor_pivot``) hold it."""
        anchor_poses(rots, trans, cents, anchor, anchor_pivot, cfg.header_gauge_location, anchor_reliable)
    region0 = region

    region_cache = {}

    def _current_region():
        """The region from the masks where the slices are now, once they have moved from their
        stacks' poses (mean over slices > motion_none_mm, or > 5/3 x motion_none_deg: on clean sb25
        the slices turn by ~0.15 deg of fitting noise and move 0.04 mm, and a rebuilt region
        there cost 0.13 dB); else the nominal one. Deterministic in the poses, so a resumed run
        rebuilds the same region."""
        d_t = float(torch.cat([(t - b[1]).norm(dim=1) for t, b in zip(trans, start_poses)]).mean())
        d_r = math.degrees(float(torch.cat([(r - b[0]).norm(dim=1) for r, b in zip(rots, start_poses)]).mean()))
        if d_t <= cfg.motion_none_mm and d_r <= 5.0 / 3.0 * cfg.motion_none_deg:
            return region0
        key = b"".join(x.detach().cpu().numpy().tobytes() for x in (*rots, *trans))
        if region_cache.get("key") == key:  # the poses have not moved since the last rebuild
            return region_cache["region"]
        from scipy import ndimage

        t1 = time.time()
        with torch.no_grad():
            frames = []
            for ss, r, t, c in zip(sets, rots, trans, cents):
                o, ax = _frames(ss, torch.arange(ss.n, device=r.device), r.detach(), t.detach(), c)
                frames.append((o.cpu().numpy(), ax.cpu().numpy()))
        cand = ndimage.binary_dilation(region0, iterations=max(1, int(math.ceil(_REGION_REACH_MM / res))))
        reg = region_from_slices(sets, frames, shape, aff, cand)
        if not reg.any():
            return region0
        log(f"  region from the slices' poses: {int(reg.sum())} voxels (nominal {int(region0.sum())}; "
            f"{time.time() - t1:.1f} s)")
        region_cache.update(key=key, region=reg)
        return reg
    scs = [torch.ones(ss.n, device=dev) for ss in sets]  # per-slice intensity scales
    sws = [torch.ones(ss.n, device=dev) for ss in sets]  # slice weights
    pws = [torch.ones(ss.obs.shape, device=dev) for ss in sets]  # pixel weights
    wts = [ss.mask.float() for ss in sets]  # loss weights: mask x pixel x slice weight
    motion = cfg.motion and (multi or any(ss.n > 1 for ss in sets))
    pose_history = []
    timings["prepare_s"] = time.time() - t0
    n_pix = int(sum(int(ss.mask.sum()) for ss in sets))
    n_sl = sum(ss.n for ss in sets)
    from .motion import estimate_noise

    noise_sigma = estimate_noise(prepare_slices(given) if cfg.mask_rim_mm > 0 else sets)
    log(f"{len(sets)} stacks, {n_sl} slices, {n_pix} pixels in masks; output grid {shape} at {res:g} mm; "
        f"backend {backend} on {dev.type}")

    def record_poses():
        from .motion import slice_motion, to_centre_convention

        c = centre.cpu().numpy().astype(np.float64)
        row = {"step": step, "time_s": time.time() - t_start, "stacks": []}
        for ss, r, u, cs, w in zip(sets, rots, trans, cents, sws):
            rn = r.detach().cpu().numpy().astype(np.float64)
            un, sn = u.detach().cpu().numpy().astype(np.float64), cs.cpu().numpy().astype(np.float64)
            t = to_centre_convention(rn, un, sn, c)
            mm, deg = slice_motion(rn, un, sn)
            row["stacks"].append({"stack": ss.name, "mean_translation_mm": float(np.linalg.norm(t, axis=1).mean()),
                                  "mean_rotation_deg": float(np.degrees(np.linalg.norm(rn, axis=1)).mean()),
                                  "slice_motion_mm": float(mm.mean()) if len(mm) else 0.0,
                                  "slice_motion_deg": float(deg.mean()) if len(deg) else 0.0,
                                  "mean_weight": float(w.mean())})
        pose_history.append(row)

    # ---- levels
    factors = list(cfg.spacing_factors)
    iters = [int(i) for i in cfg.iterations]
    if not cfg.growth:
        factors, iters = factors[-1:], [sum(iters)]
    total = sum(iters)
    prog = Progress(total, enabled=progress)
    fld: GaussianField | None = None
    nrf = None
    nrf_opt = None
    history = []
    step = 0
    # slice sampling: every slice once per "epoch", in random order
    all_slices = [(si, k) for si, ss in enumerate(sets) for k in range(ss.n)]
    order: list = []

    def next_batch():
        nonlocal order
        out = []
        while len(out) < min(cfg.batch_slices, len(all_slices)):
            if not order:
                order = [all_slices[i] for i in rng.permutation(len(all_slices))]
            out.append(order.pop())
        return out

    # ---- checkpoint hooks (issue 6)
    params = opt = None

    def snapshot(level, iteration, cg_done=True, done=False):
        return _snapshot(level=level, iteration=iteration, cg_done=cg_done, done=done, fld=fld, params=params, opt=opt,
                         nrf=nrf, nrf_opt=nrf_opt, rng=rng, order=order, step=step, history=history, rots=rots,
                         trans=trans, elapsed_s=time.time() - t_start,
                         motion_state={"scs": scs, "sws": sws, "pws": pws, "pose_history": pose_history,
                                       "stack_poses": [P.tolist() for P in stack_poses],
                                       "anchor": [np.asarray(a).tolist() for a in anchor],
                                       "anchor_pivot": None if anchor_pivot is None else np.asarray(anchor_pivot).tolist()})

    start_lev, start_it, start_cg_done = 0, 0, False
    if resume_state is not None:
        r = _restore(resume_state, dev, lambda: NeuralResidualField(wlo - 5, whi + 5, cfg.nrf_bands, cfg.nrf_width,
                                                                     cfg.nrf_depth, cfg.nrf_scale).to(dev))
        fld, nrf, nrf_opt, order, step, history = r["fld"], r["nrf"], r["nrf_opt"], r["order"], r["step"], r["history"]
        rots, trans = r["rots"], r["trans"]
        if r["motion"]:
            scs, sws, pws = r["motion"]["scs"], r["motion"]["sws"], r["motion"]["pws"]
            pose_history[:] = r["motion"]["pose_history"]
            if r["motion"].get("anchor") is not None:
                anchor = tuple(np.asarray(a, dtype=np.float64) for a in r["motion"]["anchor"])
            if r["motion"].get("anchor_pivot") is not None:
                anchor_pivot = np.asarray(r["motion"]["anchor_pivot"], dtype=np.float64)
            wts = _loss_weights(sets, pws, sws)
        rng.bit_generator.state = resume_state["rng"]
        start_lev, start_it, start_cg_done = resume_state["level"], resume_state["iteration"], resume_state["cg_done"]
        t_start = time.time() - float(resume_state["elapsed_s"])  # the time budget counts the time before the kill
        if resume_state["done"]:
            log(f"resuming a finished fit (step {step}): rendering the volume")
        else:
            log(f"resuming from level {start_lev + 1} iteration {start_it} (step {step}, "
                f"{resume_state['elapsed_s']:.0f} s of fitting done)")
    # ---- end of checkpoint hooks

    prof_grid = 2.0 * min(min(ss.spacing) for ss in sets)

    def bin_for(ss, grid):
        """Binned slices for a field at ``grid`` mm (f = grid / pixel, at most cfg.coarse_binning)."""
        return bin_slices(ss, max(1, min(cfg.coarse_binning, int(math.floor(grid / max(ss.spacing) + 1e-3)))),
                          cfg.inplane_fwhm_factor)

    def choose_profile():
        # on the binned slices: the choice is made on a grid of 2 x the finest pixel, which binned
        # pixels of that size serve as well (mni-t4-motion: 49 s -> ~12 s)
        psets = [bin_for(ss, prof_grid) for ss in sets]
        return _choose_profile(stacks, psets, region0, aff, init, prof_grid, rots, trans, cents,
                               _loss_weights(psets, pws, sws), scs, cfg, backend, log, dev, noise_sigma)

    # with slice motion the residual at the registered poses favours the narrower profile whatever
    # the data (sb25-t3.2-motion, Gaussian profile: 0.8 chosen, 27.8 dB against 28.2 dB at 1.0), so
    # the choice waits for the coarse level's poses (FWHM = the first candidate until then)
    profile_deferred = cfg.through_plane_fwhm_factor is None and motion and len(cfg.profile_candidates) > 1
    if profile_deferred:
        cfg = cfg.resolved(through_plane_fwhm_factor=float(cfg.profile_candidates[0]))
        if resume_state is not None and (start_lev >= 1 or start_cg_done):
            # [checkpoint] the coarse rounds are done: the poses they left decide, as before the kill
            cfg = cfg.resolved(through_plane_fwhm_factor=choose_profile())
    elif cfg.through_plane_fwhm_factor is None:
        cfg = cfg.resolved(through_plane_fwhm_factor=choose_profile())

    t_train = time.time()
    for lev, (fac, n_it) in enumerate(zip(factors, iters)):
        if lev < start_lev:  # [checkpoint] done before the resume point
            continue
        resumed_here = resume_state is not None and lev == start_lev
        sp = fac * res
        if resumed_here:  # [checkpoint] fld is the restored field of this level
            pass
        elif fld is None:
            fld = init_field_on_grid(region, aff, sp, dilate_mm=cfg.dilate_mm, init_intensity=init,
                                     scale_factor=cfg.scale_factor, device=dev)
        else:
            region = _current_region()
            fld = grow_field(fld, sp, region, aff, dilate_mm=cfg.dilate_mm)
            fld = fld.to(dev)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in fld.tensors().items()}
        groups = [
            {"params": [params["means"]], "lr": cfg.lr_means * half_extent, "name": "means"},
            {"params": [params["intensities"]], "lr": cfg.lr_intensities, "name": "intensities"},
            {"params": [params["log_scales"]], "lr": cfg.lr_scales, "name": "log_scales"},
            {"params": [params["quats"]], "lr": cfg.lr_quats, "name": "quats"},
        ]
        last_level_now = lev == len(factors) - 1
        if cfg.cg_smoothness is not None:
            smooth = float(cfg.cg_smoothness)
        else:
            smooth = cfg.smoothness_gain * noise_sigma ** 2 * n_pix / max(fld.num_gaussians, 1)
        pairs = lattice_pairs(fld.grid_index, fld.grid_shape).to(dev) if smooth > 0 else None
        if smooth > 0:
            log(f"  smoothness prior {smooth:.3g} (noise sigma {noise_sigma:.4f} of the 99th percentile)")
        # the budget bounds every level: earlier levels stop their warm start / pose rounds at 35 %
        # (55 % with slice motion: the coarse pose rounds are where motion is corrected; mni-t4-motion
        # on 2 slow cores: 4 rounds fit in 50 %, 28.7-29.1 dB, 5 rounds 29.3 dB); the last
        # level's at 60 % when Adam iterations follow, else at 90 % (noisy data: no Adam)
        adam_follows = noise_sigma <= cfg.adam_max_noise and n_it > 0
        share = (0.6 if adam_follows else 0.9) if last_level_now else (0.55 if motion else 0.35)
        dl = (t_start + share * cfg.time_budget_s) if cfg.time_budget_s else None

        # the coarse level's warm start and pose rounds see the slices binned to its grid (f x f
        # pixels -> one, f = the grid spacing / pixel, at most coarse_binning): f^2 fewer pixels to render
        lsets = sets
        if lev == 0 and not last_level_now and cfg.coarse_binning > 1:
            lsets = [bin_for(ss, sp) for ss in sets]
            if any(b.binning > 1 for b in lsets):
                log(f"  warm start and pose rounds on binned slices ({', '.join(str(b.binning) for b in lsets)} px): "
                    f"{int(sum(int(b.mask.sum()) for b in lsets))} pixels")
        lwts = _loss_weights(lsets, pws, sws) if lsets is not sets else wts

        edge_w = [None]  # the edge-preserving prior's pair weights, once reweighted

        dcache = {}  # the designs of this level's intensity fits, while the poses stay

        def refit(n, min_iter=0):
            if n > 0:
                _cg_intensities(params, lsets, rots, trans, cents, lwts, scs, cfg, backend, n, pairs, smooth,
                                deadline=dl, min_iter=min(n, min_iter), pair_w=edge_w[0], cache=dcache)

        warm = not (resumed_here and start_cg_done)  # [checkpoint] a resumed level skips its warm start
        # (noisy data only: on clean data the prior is ~0 and Adam follows the warm start)
        edge_rounds = cfg.edge_prior_rounds if (last_level_now and pairs is not None
                                                and noise_sigma > cfg.adam_max_noise) else 0
        if warm:
            # a level never starts from an unfitted grid (10 iterations at least); on the last level
            # with an edge-preserving prior the iterations are shared with its reweighting rounds
            n0 = cfg.cg_iterations // (edge_rounds + 1)
            refit(n0, min_iter=10 // (edge_rounds + 1))
            for _ in range(edge_rounds):
                with torch.no_grad():
                    c = params["intensities"].detach()
                    dabs = (c[pairs[:, 0]] - c[pairs[:, 1]]).abs()
                    delta = cfg.edge_prior_k * float(dabs.median().clamp_min(1e-12))
                    edge_w[0] = (delta / dabs.clamp_min(1e-12)).clamp(max=1.0)  # Huber: linear beyond delta
                refit(n0, min_iter=10 // (edge_rounds + 1))
        if warm and motion:
            # alternate: slice poses (field fixed) -> robust weights and slice scales -> intensities,
            # the field fitted under a weaker prior meanwhile (a smooth field biases the poses)
            rounds = cfg.motion_rounds if lev == 0 else cfg.fine_motion_rounds
            steps = cfg.pose_iterations if lev == 0 else cfg.fine_pose_iterations
            smooth_m = smooth * cfg.motion_smoothness_scale

            def refit_m(n):
                _cg_intensities(params, lsets, rots, trans, cents, lwts, scs, cfg, backend, n, pairs, smooth_m, deadline=dl,
                                cache=dcache)

            moved = False
            # a round is started only when it can end before the deadline: its cost is the last
            # round's, or for a later level's first round, predicted from one render of all slices
            # (the Jacobians, trial steps, weights and re-fit: ~(10 + iterations) renders; mni-t4 at
            # 1 mm: 7 s a render on 2 slow cores, so a round there costs more than the budget leaves)
            round_s = 0.0
            if lev > 0 and rounds > 0 and steps > 0 and dl is not None:
                if dcache.get("build_s"):  # building the warm start's maps costs about one render (sb25: 0.85 vs 0.87 s)
                    round_s = (10 + steps) * dcache["build_s"]
                else:
                    t0 = time.time()
                    _predict_all(params, lsets, rots, trans, cents, cfg, backend)
                    round_s = (10 + steps) * (time.time() - t0)
            prev_step = None  # the last round's moves, for the extrapolation
            for rnd in range(rounds if steps > 0 else 0):
                if dl is not None and time.time() + round_s > dl:
                    if lev > 0 and rnd == 0:
                        log(f"  no pose rounds at this level: one would take ~{round_s:.0f} s, beyond the time budget")
                    break
                t_round = time.time()
                before = [(r.clone(), t.clone()) for r, t in zip(rots, trans)]
                # each slice's pose is fitted whatever its slice weight (its pixel weights still apply):
                # a slice excluded while far from its pose must still be moved to it (benchmarks/MOTION.md,
                # session 6: slices of 1700-2700 pixels, 4 mm off, were excluded and never moved)
                _optimise_poses(params, lsets, rots, trans, cents, _loss_weights(lsets, pws), scs, cfg, backend, steps,
                                deadline=dl,
                                rot_axes=(0, 1, 2) if cfg.pose_tilt else (2,), small_slice=cfg.pose_small_slice,
                                jac_every=cfg.pose_jacobian_every)
                hold_frame()
                step_now = [(r - b[0], t - b[1]) for r, t, b in zip(rots, trans, before)]
                gain = 0.0
                if cfg.pose_extrapolation > 0 and prev_step is not None:
                    gain = _extrapolation_gain(step_now, prev_step, cfg.pose_extrapolation)
                    if gain > 0:
                        for si, (a_r, a_t) in enumerate(step_now):
                            rots[si] += gain * a_r
                            trans[si] += gain * a_t
                        hold_frame()
                prev_step = step_now
                d_t = float(torch.cat([(t - b[1]).norm(dim=1) for t, b in zip(trans, before)]).mean())
                d_r = float(torch.cat([(r - b[0]).norm(dim=1) for r, b in zip(rots, before)]).mean()) * 180 / math.pi
                log(f"  poses round {rnd + 1}: slices moved {d_t:.3f} mm, turned {d_r:.3f} deg on average"
                    + (f" (carried on x {1 + gain:.2f})" if gain > 0 else "") + f" ({time.time() - t_start:.0f} s)")
                lwts, _ = _update_robust(params, lsets, rots, trans, cents, scs, sws, pws, cfg, backend)
                refit_m(cfg.motion_refit_iterations)
                record_poses()
                moved = True
                round_s = time.time() - t_round
                # the first round decides whether the data hold slice motion at all; the coarse field's
                # fitting noise turns the slices of clean data by up to ~0.1 deg (clean sb25, binned
                # slices: 0.10 deg, 0.03 mm; sb25-t3.2-motion 1.9 deg, mni-t4-motion 1.1 deg)
                none_here = lev == 0 and rnd == 0 and d_t < cfg.motion_none_mm and d_r < cfg.motion_none_deg
                if none_here or (d_t < cfg.motion_stop_mm and d_r < cfg.motion_stop_deg):
                    if none_here:
                        motion = False  # nothing moves: no slice motion in these data
                        # the slices' scatter is fitting noise; their stack's mean move refines the registration
                        from .motion import to_stack_poses

                        to_stack_poses(rots, trans, cents)
                        if dl is not None:  # and the level's share of the budget is the motion-free one
                            dl = min(dl, t_start + 0.35 * cfg.time_budget_s)
                        log("  no slice motion found: one rigid pose per stack from here on")
                    break
            if lev == 0 and motion and moved and len(sets) > 1:
                from .motion import stack_pose_spread

                sp_mm, sp_deg = stack_pose_spread(rots, trans, cents)
                if sp_mm <= cfg.header_gauge_mm and sp_deg <= cfg.header_gauge_deg:
                    anchor, anchor_pivot = (np.zeros(3), np.zeros(3)), fov_pivot
                    hold_frame()
                    log(f"  the stacks' mean poses agree within {sp_mm:.2f} mm, {sp_deg:.2f} deg: the volume is "
                        "put in the headers' frame")
                else:
                    log(f"  the stacks' mean poses differ by up to {sp_mm:.2f} mm, {sp_deg:.2f} deg: the volume "
                        "stays in the registration's frame")
            if lev == 0 and profile_deferred:
                f = choose_profile()
                if f != cfg.through_plane_fwhm_factor:
                    cfg = cfg.resolved(through_plane_fwhm_factor=f)
                    refit(max(cfg.cg_iterations // 3, 1))
            if moved:  # the field under the level's own prior (even past the deadline: the rounds left it under a weak one)
                n_re = max(cfg.cg_iterations // 3, 1)
                refit(n_re, min_iter=n_re)
        elif warm and (cfg.robust or cfg.slice_scale):
            lwts, _ = _update_robust(params, lsets, rots, trans, cents, scs, sws, pws, cfg, backend)
            refit(max(cfg.cg_iterations // 3, 1))
        dcache.clear()  # the designs' memory is free for the Adam iterations
        wts = _loss_weights(sets, pws, sws)
        pose_groups = []
        if motion and cfg.joint_pose_lr > 0:
            for r, t in zip(rots, trans):
                r.requires_grad_(True)
                t.requires_grad_(True)
            pose_groups = [{"params": rots, "lr": cfg.lr_pose_rotation * cfg.joint_pose_lr, "name": "pose_rot"},
                           {"params": trans, "lr": cfg.lr_pose_translation * cfg.joint_pose_lr, "name": "pose_trans"}]
        groups = groups + pose_groups
        opt = torch.optim.Adam(groups, eps=1e-15)
        base_lr = [g["lr"] for g in groups]
        if resumed_here and resume_state["opt"] is not None:  # [checkpoint]
            opt.load_state_dict(resume_state["opt"])
        elif checkpointer is not None:  # [checkpoint] after the warm start
            checkpointer.save(snapshot(lev, 0))
        last_level = lev == len(factors) - 1
        nrf_from = int(cfg.nrf_start * n_it) if (cfg.use_nrf and last_level) else None
        log(f"level {lev + 1}/{len(factors)}: {fld.num_gaussians} Gaussians at {sp:g} mm, {n_it} iterations "
            f"(warm start done at {time.time() - t_start:.0f} s)")
        if noise_sigma > cfg.adam_max_noise and n_it > 0:
            log(f"  noisy slices (sigma {noise_sigma:.3f} > {cfg.adam_max_noise:g}): the warm start is final, no Adam iterations")
            total -= n_it
            prog.total = max(1, total)
            n_it = 0
        for it in range(start_it if resumed_here else 0, n_it):
            if cfg.time_budget_s and last_level and time.time() - t_start > cfg.time_budget_s:
                log(f"time budget of {cfg.time_budget_s:g} s reached after {it} of {n_it} iterations")
                break
            frac = it / max(n_it - 1, 1)
            warm_up = min(1.0, (it + 1) / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0
            for g, lr0 in zip(opt.param_groups, base_lr):
                g["lr"] = lr0 * (cfg.lr_decay ** frac) * warm_up
            if nrf_from is not None and it == nrf_from and nrf is None:
                nrf = NeuralResidualField(wlo - 5, whi + 5, cfg.nrf_bands, cfg.nrf_width, cfg.nrf_depth, cfg.nrf_scale).to(dev)
                nrf_opt = torch.optim.Adam(nrf.parameters(), lr=cfg.lr_nrf)
            batch = next_batch()
            opt.zero_grad(set_to_none=True)
            if nrf_opt is not None:
                nrf_opt.zero_grad(set_to_none=True)
            l1_sum = 0.0
            ssim_sum = 0.0
            npx = 0
            loss = 0.0
            for si, ss in enumerate(sets):
                ks = [k for (s, k) in batch if s == si]
                if not ks:
                    continue
                sel = torch.as_tensor(ks, device=dev)
                o, ax = _frames(ss, sel, rots[si], trans[si], cents[si])
                pred = _render_stack_slices(params, ss, sel, o, ax, cfg, backend)
                if nrf is not None:
                    pred = pred + _nrf_slices(nrf, ss, sel, o, ax, cfg)
                pred = pred * scs[si][sel][:, None, None]
                obs, m, w = ss.obs[sel], ss.mask[sel], wts[si][sel]
                cnt = int(m.sum())
                l1 = masked_smooth_l1(pred, obs, m, cfg.smooth_l1_beta, weight=w)
                term = l1 * cnt
                if cfg.use_ssim:
                    s = masked_ssim(pred, obs, m, weight=sws[si][sel][:, None, None].expand_as(w))
                    term = term + cfg.ssim_weight * (1 - s) * cnt
                    ssim_sum += float(s.detach()) * cnt
                loss = loss + term
                l1_sum += float(l1.detach()) * cnt
                npx += cnt
            loss = loss / max(npx, 1)
            if pairs is not None:  # the warm start's prior, per pixel like the data term
                dc = params["intensities"][pairs[:, 0]] - params["intensities"][pairs[:, 1]]
                loss = loss + 0.5 * smooth * (dc * dc).sum() / max(n_pix, 1)
            if cfg.use_anisotropy and cfg.anisotropy_weight > 0:
                loss = loss + cfg.anisotropy_weight * anisotropy_penalty(params["log_scales"], cfg.anisotropy_max_ratio)
            loss.backward()
            opt.step()
            if pose_groups and (it + 1) % 10 == 0:
                hold_frame()
            if nrf_opt is not None:
                nrf_opt.step()
            step += 1
            rec = {"step": step, "level": lev, "loss": float(loss.detach()), "l1": l1_sum / max(npx, 1),
                   "ssim": ssim_sum / max(npx, 1) if cfg.use_ssim else None, "time_s": time.time() - t_start}
            if step % history_every == 0 or step == total:
                history.append(rec)
            prog.update(step, loss=float(loss.detach()), level=f"{lev + 1}/{len(factors)}")
            if checkpointer is not None:  # [checkpoint]
                checkpointer.maybe_save(lambda: snapshot(lev, it + 1))
        for r, t in zip(rots, trans):
            r.requires_grad_(False)
            t.requires_grad_(False)
        if pose_groups:
            hold_frame()
            record_poses()
        fld = GaussianField(params["means"].detach(), params["log_scales"].detach(), params["quats"].detach(),
                            params["intensities"].detach(), fld.spacing, fld.grid_origin, fld.grid_index, fld.grid_shape)
    prog.close()
    if checkpointer is not None and not (resume_state is not None and resume_state["done"]):  # [checkpoint]
        checkpointer.save(snapshot(len(factors), 0, done=True))
        timings["checkpoint_s"], timings["checkpoints_saved"] = checkpointer.save_s, checkpointer.n_saved
    timings["train_s"] = time.time() - t_train

    t0 = time.time()
    region = _current_region()
    vol = render_volume(fld, nrf, shape, aff, region, backend=backend, cutoff=cfg.cutoff)
    vol = np.clip(vol, 0, None) * scale
    timings["render_volume_s"] = time.time() - t0
    timings["total_s"] = time.time() - t_start
    from .motion import matrix_to_rotvec, to_centre_convention

    c = centre.cpu().numpy().astype(np.float64)
    poses, weights = [], []
    for ss, r, u, cs, P, sc, sw in zip(sets, rots, trans, cents, stack_poses, scs, sws):
        rn = r.detach().cpu().numpy().astype(np.float64)
        t = to_centre_convention(rn, u.detach().cpu().numpy(), cs.cpu().numpy(), c)
        poses.append({"stack": ss.name, "slices": ss.index.tolist(), "rotvec": rn.tolist(), "translation_mm": t.tolist(),
                      "stack_rotvec": matrix_to_rotvec(P[:3, :3]).tolist(),
                      "stack_translation_mm": (P[:3, 3] + P[:3, :3] @ c - c).tolist()})
        wl = sw.cpu().numpy().astype(float)
        weights.append({"stack": ss.name, "slices": ss.index.tolist(), "weight": wl.tolist(),
                        "scale": sc.cpu().numpy().astype(float).tolist(),
                        "excluded": [int(k) for k, w in zip(ss.index, wl) if w <= 0]})
    return ReconResult(vol, aff, fld, nrf, cfg, region, scale, centre.cpu().numpy(), poses, history,
                       weights, pose_history, timings, backend)
