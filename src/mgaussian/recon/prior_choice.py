"""The last level's prior weight on noisy data, chosen by how well the fit predicts held-out slices.

The rule in :func:`.levels.smoothness_weight` sets the lattice prior's weight from the slices' noise
(lambda ~ sigma^2, the anatomy's neighbour differences taken as fixed). The weight that scores best
against the ground truth also depends on the brain, the slices' thickness and the noise's level in
ways the rule does not see: in session 27 (benchmarks/TUNING.md) four noisy 4 mm stacks wanted a
third to a half of it on the 21- and 33-week brains, and six stacks with 2 % noise the whole of it.

So on noisy data (where the prior matters: no Adam follows) every ``cfg.prior_holdout``-th slice of
each stack is held out, the last level's warm start is run on the other slices with the rule's
weight times a factor, and the held-out slices' weighted squared error of prediction is measured.
The factor steps down by sqrt(2) from 1 for as long as a step lowers the error by more than
``_STEP_Z`` standard errors (paired over the held-out slices; within ``FACTORS``), and the last one
is kept for the level's fits with every slice. A slice the robust weights exclude
counts neither way. Each factor tried costs one warm start of the last level (its design is
shared): two where the rule's weight stays, about a third more time on noisy data.

The held-out slices are thick: the error they see is the model's through each slice's profile,
not at the output's resolution. Session 27 measured the choice against the ground truth on the
clinical-style cases (benchmarks/TUNING.md).
"""

from __future__ import annotations

__all__ = ["FACTORS", "choose_prior_factor", "prior_choice_active"]


import math

import torch

from .intensity import predict_with_designs
from .levels import edge_prior_active, smoothness_weight, warm_start
from .state import Level, ReconState

# the factors on the rule's weight that may be chosen: powers of sqrt(2) from 1/(2 sqrt 2) to 1. Only
# down: where the held-out slices asked for more than the rule's weight (nine or six stacks, 2 %
# noise: x 2 / x 1.4) it gained nothing against the ground truth (31.59 -> 31.57 / 31.79 -> 31.80 dB),
# and each factor tried costs a warm start (session 27)
FACTORS = tuple(2.0 ** (k / 2) for k in range(-3, 1))
# a step to the next factor is taken only where it lowers the held-out error by more than this many
# standard errors (paired over the held-out slices): the error's curve is flat near its minimum
# (within 0.1-0.5 % over a factor of 2 on the clinical-style cases), and a step the slices' own
# scatter could make is noise
_STEP_Z = 2.0


def prior_choice_active(state: ReconState, level: Level) -> bool:
    """Whether the level's prior weight is chosen by held-out slices: the last level, on noisy data
    (where its prior is edge-preserving and no Adam follows), with the rule's weight (no
    ``cg_smoothness`` given) and ``prior_holdout`` on."""
    cfg = state.cfg
    return (
        cfg.prior_holdout > 0
        and cfg.cg_smoothness is None
        and edge_prior_active(state, level.last, level.pairs is not None)
    )


def _held_out(weights: list[torch.Tensor], every: int) -> list[torch.Tensor]:
    """[K] bool per stack: slices every-th from the (every // 2)-th, so that a stack's first and last
    slices (the anatomy's edge, little data) stay in."""
    out = []
    for w in weights:
        k = torch.arange(w.shape[0], device=w.device)
        out.append(k % every == every // 2)
    return out


def _set_intensities(state: ReconState, c: torch.Tensor) -> None:
    """The level's intensities set in place (the other leaf tensors stay the same objects, so the
    level's designs stay cached)."""
    with torch.no_grad():
        state.params["intensities"].copy_(c)


def _held_out_error(state: ReconState, level: Level, start: torch.Tensor, factor: float, train_w, held):
    """Per held-out slice (all stacks in a row): the weighted squared error of its prediction and its
    weight, after the level's warm start on the other slices with the rule's weight x ``factor``,
    from the intensities ``start``. float64 arrays [slices held out]."""
    _set_intensities(state, start)
    full_w = level.lwts
    level.lwts, level.smooth, level.edge_w = train_w, smoothness_weight(state, level.spacing) * factor, None
    try:
        warm_start(state, level)
        preds = predict_with_designs(
            state.params, level.lsets, state.rots, state.trans, state.cents, state.cfg, state.backend, level.dcache
        )
    finally:
        level.lwts, level.edge_w = full_w, None
    sse, wsum = [], []
    for ss, pred, w, h, sc in zip(level.lsets, preds, full_w, held, state.scs):
        r2 = (pred * sc[:, None, None] - ss.obs) ** 2 * w
        sse.append(r2[h].sum((1, 2), dtype=torch.float64))
        wsum.append(w[h].sum((1, 2), dtype=torch.float64))
    return torch.cat(sse).cpu().numpy(), torch.cat(wsum).cpu().numpy()


def _improvement_z(a, b) -> float:
    """How far fit b's held-out error is below fit a's, in standard errors: the slices are the units
    (paired: the same slices, the same noise), the error a ratio of their sums."""
    (sa, w), (sb, _) = a, b
    d = sa - sb
    total = max(float(w.sum()), 1e-30)
    mean = float(d.sum()) / total
    n = len(d)
    se = math.sqrt(n / max(n - 1, 1) * float(((d - mean * w) ** 2).sum())) / total
    return mean / se if se > 0 else (math.inf if mean > 0 else 0.0)


def choose_prior_factor(state: ReconState, level: Level) -> float:
    """Choose the level's prior factor (see the module); sets ``state.prior_choice`` and the level's
    weight, leaves the level's intensities where they were. Returns the factor."""
    every = state.cfg.prior_holdout
    held = _held_out(level.lwts, every)
    train_w = []
    for w, h in zip(level.lwts, held):
        tw = w.clone()
        tw[h] = 0
        train_w.append(tw)
    start = state.params["intensities"].detach().clone()
    state.prior_choice = None  # the rule's weight while the factors are tried
    fits: dict[int, tuple] = {}

    def fit(i: int) -> tuple:
        if i not in fits:
            fits[i] = _held_out_error(state, level, start, FACTORS[i], train_w, held)
        return fits[i]

    def better(j: int, i: int) -> bool:
        return 0 <= j < len(FACTORS) and _improvement_z(fit(i), fit(j)) > _STEP_Z

    i = FACTORS.index(1.0)
    while better(i - 1, i):
        i -= 1
    factor = FACTORS[i]
    _set_intensities(state, start)
    state.prior_choice = {
        "factor": factor,
        "holdout_every": every,
        # each factor tried: the held-out slices' weighted mean squared error
        "errors": {f"{FACTORS[j]:.3f}": float(fits[j][0].sum() / max(fits[j][1].sum(), 1e-30)) for j in sorted(fits)},
    }
    level.smooth = smoothness_weight(state, level.spacing)
    return factor
