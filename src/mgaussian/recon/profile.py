"""The slice profile: the through-plane PSF width (x the slice thickness) that explains the data
best, among ``cfg.profile_candidates`` (a Gaussian profile and a narrower one for box-like
slices), chosen by the residual of a least-squares fit on a coarse grid."""

from __future__ import annotations

__all__ = ["bin_for_grid", "binned_sets", "choose_profile"]

import math

import numpy as np

from ..field import init_field_on_grid
from .data import SliceSet, bin_slices
from .intensity import cg_intensities
from .motion.robust import loss_weights
from .slices import predict_all


def bin_for_grid(ss: SliceSet, grid: float, cfg) -> SliceSet:
    """The slices binned for a field at ``grid`` mm (f x f pixels -> one, f = grid / pixel, at
    most cfg.coarse_binning): a coarse grid cannot hold finer detail, and f^2 fewer pixels render."""
    return bin_slices(
        ss, max(1, min(cfg.coarse_binning, int(math.floor(grid / max(ss.spacing) + 1e-3)))), cfg.inplane_fwhm_factor
    )


def binned_sets(state, grid: float) -> tuple[list[SliceSet], list]:
    """Every stack's slices binned for a field at ``grid`` mm (``bin_for_grid``) and their loss
    weights (the state's pixel and slice weights carried to the bins)."""
    sets = [bin_for_grid(ss, grid, state.cfg) for ss in state.sets]
    return sets, loss_weights(sets, state.pws, state.sws)


# stacks whose slice normals are this far apart see each other's through-plane profile in plane
_CROSSING_DEG = 20.0


def _crossing_orientations(sets: list[SliceSet]) -> bool:
    """Whether some two stacks' slices cross (their mean slice normals >= ``_CROSSING_DEG`` apart)."""
    normals = []
    for ss in sets:
        if ss.n:
            n = ss.axes[:, 2].double().mean(0)
            normals.append(n / n.norm().clamp_min(1e-12))
    cos_max = math.cos(math.radians(_CROSSING_DEG))
    return any(abs(float(a @ b)) <= cos_max for i, a in enumerate(normals) for b in normals[i + 1 :])


def choose_profile(state, n_iter: int = 12) -> float:
    """The through-plane PSF width (x thickness) among ``cfg.profile_candidates`` whose
    least-squares fit on a grid of twice the finest pixel leaves the smallest residual (whatever
    the output resolution: on a grid as coarse as the slices' thickness a narrower profile
    always wins). On such a grid the Gaussians cannot follow a wrong profile, so the residual
    tells the profile: sb25-t3.2 (Gaussian profile) 4.6e-5 at 1.0 vs 6.8e-5 at 0.8; the same with
    a box profile 9.7e-5 vs 4.1e-5 (benchmarks/TUNING.md). That needs stacks that cross: one
    orientation alone is fitted better by the narrower profile whatever the truth (one sb25 stack,
    Gaussian profile: 2.83e-5 at 1.0 vs 2.39e-5 at 0.8), so there the first candidate stays.

    The fit runs on binned slices: the grid of 2 x the finest pixel is served as well by binned
    pixels of that size (mni-t4-motion: 49 s -> ~12 s). The residuals are compared above the noise
    floor (sigma^2 over the binned pixel count), and a candidate replaces the first only when it
    is ``cfg.profile_margin`` smaller."""
    cfg = state.cfg
    if len(cfg.profile_candidates) == 1:
        return float(cfg.profile_candidates[0])
    if not _crossing_orientations(state.sets):
        state.log(
            f"slice profile: every stack's slices lie in one orientation, which cannot tell the profile "
            f"(a narrower one always fits them better); using {cfg.profile_candidates[0]:g} x thickness"
        )
        return float(cfg.profile_candidates[0])
    grid = 2.0 * min(min(ss.spacing) for ss in state.sets)
    sets, wts = binned_sets(state, grid)
    fld = init_field_on_grid(
        state.region0,
        state.aff,
        grid,
        dilate_mm=cfg.dilate_mm,
        init_intensity=state.init,
        scale_factor=cfg.scale_factor,
        device=state.dev,
    )
    wsum = float(sum(w.sum() for w in wts)) or 1.0
    scores = {}
    for f in cfg.profile_candidates:
        c = cfg.resolved(through_plane_fwhm_factor=float(f))
        params = {k: v.detach().clone().requires_grad_(True) for k, v in fld.tensors().items()}
        cg_intensities(params, sets, state.rots, state.trans, state.cents, wts, state.scs, c, state.backend, n_iter)
        preds = predict_all(params, sets, state.rots, state.trans, state.cents, c, state.backend)
        scores[float(f)] = (
            sum(
                float(((p * sc[:, None, None] - ss.obs) ** 2 * w).sum())
                for p, ss, w, sc in zip(preds, sets, wts, state.scs)
            )
            / wsum
        )
    binned = float(np.mean([ss.binning**2 for ss in sets]))
    floor = state.noise_sigma**2 / binned
    excess = {f: max(r - floor, 0.0) for f, r in scores.items()}
    first = float(cfg.profile_candidates[0])
    best = min(excess, key=excess.get)
    if excess[best] > (1.0 - cfg.profile_margin) * excess[first]:
        best = first
    state.log(
        "slice profile: through-plane FWHM "
        + ", ".join(f"{f:g} x thickness -> residual {r:.3g}" for f, r in scores.items())
        + f" (noise floor {floor:.3g}); using {best:g}"
    )
    return best
