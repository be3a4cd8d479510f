"""A level of the progressive growth: its Gaussians (a finer grid grown from the last level's),
its prior, the slices it fits (binned at the coarse level), and its warm start, the least-squares
intensity fit that every level starts from."""

from __future__ import annotations

__all__ = [
    "level_schedule",
    "begin_level",
    "refit",
    "warm_start",
    "robust_refit",
    "smoothness_weight",
    "edge_prior_active",
    "edge_weights",
]

import torch

from ..field import grow_field, init_field_on_grid
from .frame import current_region
from .intensity import cg_intensities, lattice_pairs
from .motion.robust import update_robust
from .profile import binned_sets
from .state import Level, ReconState, noisy_slices


def level_schedule(cfg) -> list[tuple[float, int]]:
    """(grid spacing factor, Adam iterations) per level; without growth one level at the finest."""
    factors = list(cfg.spacing_factors)
    iters = [int(i) for i in cfg.iterations]
    if not cfg.growth:
        factors, iters = factors[-1:], [sum(iters)]
    return list(zip(factors, iters))


def _deadline(state: ReconState, last: bool, adam_follows: bool) -> float | None:
    """Where the level's warm start and pose rounds stop, with a time budget (None without one).
    Earlier levels stop at 35 % of the budget (55 % with slice motion: the coarse pose rounds are
    where motion is corrected; mni-t4-motion on 2 slow cores: 4 rounds fit in 50 %, 28.7-29.1 dB,
    5 rounds 29.3 dB); the last level's at 60 % when Adam iterations follow, else at 90 % (noisy
    data: no Adam)."""
    budget = state.cfg.time_budget_s
    if not budget:
        return None
    share = (0.6 if adam_follows else 0.9) if last else (0.55 if state.motion else 0.35)
    return state.t_start + share * budget


def smoothness_weight(state: ReconState, spacing: float) -> float:
    """The lattice prior's weight at a level of Gaussians ``spacing`` mm apart (``cfg.cg_smoothness``,
    or from the slices' noise, see the config). A coarser level's weight is larger by the ratio of
    the Gaussians' volumes: each of its Gaussians stands for (s_level / s)^3 fine ones. Once the
    last level's factor has been chosen by held-out slices (recon/prior_choice.py) it multiplies
    the weight: only the last level asks for it after that."""
    cfg = state.cfg
    if cfg.cg_smoothness is not None:
        return float(cfg.cg_smoothness)
    finest = cfg.output_resolution * cfg.spacing_factors[-1]
    factor = 1.0 if state.prior_choice is None else state.prior_choice["factor"]
    return factor * cfg.smoothness_gain * state.noise_sigma**2 * (spacing / finest) ** 3 / finest**2


def fit_iterations(state: ReconState, level: Level | None = None) -> int:
    """The intensity fits' CG iterations for a warm start: ``noisy_cg_iterations`` on noisy data
    (the slices' noise above ``adam_max_noise``, where no Adam follows), else
    ``fine_cg_iterations`` for the last ``level`` grown from a coarser one and ``cg_iterations``
    for the others (null keys: ``cg_iterations``)."""
    cfg = state.cfg
    if noisy_slices(state) and cfg.noisy_cg_iterations is not None:
        return cfg.noisy_cg_iterations
    if level is not None and level.last and level.index > 0 and cfg.fine_cg_iterations is not None:
        return cfg.fine_cg_iterations
    return cfg.cg_iterations


def edge_prior_active(state: ReconState, level_last: bool, has_prior: bool) -> bool:
    """Whether the level's prior is made edge-preserving (the last level, on noisy data)."""
    return level_last and has_prior and noisy_slices(state)


def _level_field(state: ReconState, index: int, spacing: float, resumed: bool) -> None:
    """The level's Gaussians: a checkpoint's, a new grid, or the last level's grown to ``spacing``
    over the region where the slices now put the anatomy."""
    cfg = state.cfg
    if resumed:  # [checkpoint] state.fld is the restored field of this level
        return
    if state.fld is None:
        state.fld = init_field_on_grid(
            state.region,
            state.aff,
            spacing,
            dilate_mm=cfg.dilate_mm,
            init_intensity=state.init,
            scale_factor=cfg.scale_factor,
            device=state.dev,
        )
        return
    state.region = current_region(state)
    state.fld = grow_field(state.fld, spacing, state.region, state.aff, dilate_mm=cfg.dilate_mm).to(state.dev)


def rebin_level(state: ReconState, level: Level) -> None:
    """The level's binned slices again from ``state.sets`` (after their intensities changed: a
    stack's field divided out) and their loss weights; a level on the slices themselves has nothing
    to redo."""
    if level.lsets is state.sets:
        return
    level.lsets, level.lwts = binned_sets(state, level.spacing)


def begin_level(state: ReconState, index: int, count: int, factor: float, iterations: int, resumed: bool) -> Level:
    """Set up level ``index``: its field and leaf parameters, its prior and its slices."""
    cfg = state.cfg
    spacing = factor * cfg.output_resolution
    _level_field(state, index, spacing, resumed)
    fld = state.fld
    state.params = {k: v.detach().clone().requires_grad_(True) for k, v in fld.tensors().items()}
    smooth = smoothness_weight(state, spacing)
    pairs = lattice_pairs(fld.grid_index, fld.grid_shape).to(state.dev) if smooth > 0 else None
    if smooth > 0:
        state.log(f"  smoothness prior {smooth:.3g} (noise sigma {state.noise_sigma:.4f} of the 99th percentile)")
    last = index == count - 1
    adam_follows = not noisy_slices(state) and iterations > 0
    # the coarse level's warm start and pose rounds see the slices binned to its grid (f x f
    # pixels -> one, f = the grid spacing / pixel, at most coarse_binning): f^2 fewer pixels to render
    lsets, lwts = state.sets, state.wts
    if index == 0 and not last and cfg.coarse_binning > 1:
        lsets, lwts = binned_sets(state, spacing)
        if any(b.binning > 1 for b in lsets):
            state.log(
                f"  warm start and pose rounds on binned slices ({', '.join(str(b.binning) for b in lsets)} "
                f"px): {int(sum(int(b.mask.sum()) for b in lsets))} pixels"
            )
    return Level(
        index=index,
        count=count,
        spacing=spacing,
        iterations=iterations,
        lsets=lsets,
        lwts=lwts,
        smooth=smooth,
        pairs=pairs,
        deadline=_deadline(state, last, adam_follows),
        resumed=resumed,
    )


def refit(state: ReconState, level: Level, n: int, min_iter: int = 0, weak_prior: bool = False) -> None:
    """``n`` conjugate-gradient iterations of the intensities under the level's own prior, or with
    ``weak_prior`` (between pose rounds) under ``motion_smoothness_scale`` x it, without the
    edge-preserving weights and in the gradient form whatever ``smoothness_prior`` says: the scale was
    set for that form, and the weak curvature prior holds the 2-5 mm detail the poses are fitted to
    too loosely (a small noisy phantom with 20 CG iterations a fit, tests/test_regression.py's
    settings: 24.74 dB with the gradient form throughout, 23.38 with the curvature form in the pose
    rounds too, 24.92 with it in the level's own fits only)."""
    smooth = level.smooth * state.cfg.motion_smoothness_scale if weak_prior else level.smooth
    if n > 0:
        done = cg_intensities(
            state.params,
            level.lsets,
            state.rots,
            state.trans,
            state.cents,
            level.lwts,
            state.scs,
            state.cfg,
            state.backend,
            n,
            level.pairs,
            smooth,
            deadline=level.deadline,
            min_iter=min(n, min_iter),
            pair_w=None if weak_prior else level.edge_w,
            cache=level.dcache,
            prior_form="gradient" if weak_prior else None,
        )
        if done < n:
            state.note_budget(f"level {level.index + 1}'s " + ("pose rounds" if weak_prior else "intensity fit"))


@torch.no_grad()
def edge_weights(c: torch.Tensor, pairs: torch.Tensor, k: float) -> torch.Tensor:
    """Huber weights on the lattice differences: min(1, delta / |diff|), delta = k x their median
    (the prior is linear beyond delta: edges are kept)."""
    dabs = (c[pairs[:, 0]] - c[pairs[:, 1]]).abs()
    delta = k * float(dabs.median().clamp_min(1e-12))
    return (delta / dabs.clamp_min(1e-12)).clamp(max=1.0)


def warm_start(state: ReconState, level: Level) -> None:
    """The level's least-squares intensities. A level never starts from an unfitted grid (10
    iterations at least). On noisy data the last level's prior is made edge-preserving: its
    iterations are shared with ``edge_prior_rounds`` reweighting rounds (on clean data the prior is
    ~0 and Adam follows the warm start)."""
    cfg = state.cfg
    edge_rounds = cfg.edge_prior_rounds if edge_prior_active(state, level.last, level.pairs is not None) else 0
    n0 = fit_iterations(state, level) // (edge_rounds + 1)
    refit(state, level, n0, min_iter=10 // (edge_rounds + 1))
    for _ in range(edge_rounds):
        level.edge_w = edge_weights(state.params["intensities"].detach(), level.pairs, cfg.edge_prior_k)
        refit(state, level, n0, min_iter=10 // (edge_rounds + 1))


def robust_refit(state: ReconState, level: Level) -> None:
    """Without slice motion: the robust weights and slice scales once, then a third of a warm start."""
    level.lwts, _ = update_robust(
        state.params,
        level.lsets,
        state.rots,
        state.trans,
        state.cents,
        state.scs,
        state.sws,
        state.pws,
        state.cfg,
        state.backend,
        cache=level.dcache,
    )
    refit(state, level, max(fit_iterations(state, level) // 3, 1))
