"""Each stack's smooth intensity bias relative to the others, from the coarse level's model.

A coil's sensitivity differs from stack to stack and varies across a slice; the per-slice
intensity scales absorb a field's mean over each slice, not its variation across it. Once the
coarse level has put the slices where they were acquired, its model is the stacks' consensus: the
ratio of a stack's pixels to the model's prediction of them is that stack's field over the
consensus (a field common to every stack stays in the volume, as with any reconstruction). It is
fitted as exp of a quadratic of the pixels' scanner positions (the coil is fixed in the scanner,
not in the moving anatomy), robustly, and divided out of the stack's slices. Unlike N4 on each
stack (``--bias-correction``), which finds a field in a field-free stack, a stack that agrees with
the others gets a field of ~1 (measured in ``docs/clinical.md``).

A field across a slice pulls its pose, and the poses decide the fields: the fields are estimated
again after each of the coarse level's pose rounds (``cfg.stack_bias_rounds``) and once after the
level, each time from the slices as acquired, so that the estimates settle rather than add up the
coarse model's own blur. What one quadratic of the anatomy's position explains in every stack's
ratio stays in the volume: it is the anatomy's as much as a field, and taken in the scanner frame
instead it would differ between stacks that moved (benchmarks/TUNING.md, session 29).

The field the stacks share cannot be told from the anatomy by the stacks alone. After the fit a
smooth field (N4 with ``cfg.shared_field_levels`` fitting levels on the volume) is divided out of
the Gaussians' intensities (``remove_shared_field``) where the stacks show coil fields relative to
each other (``spread``: beyond ``cfg.shared_field_min_spread``; they most likely share one too) or
where N4's field itself spans more than ``cfg.shared_field_min_range`` (one coil's field shared
whole leaves the stacks agreeing). Otherwise it is left alone: N4 finds a small field in a
field-free volume too.
"""

from __future__ import annotations

__all__ = ["apply_stack_fields", "correct_stack_bias", "estimate_stack_fields", "remove_shared_field"]

import math

import numpy as np
import torch

from .motion.robust import loss_weights
from .slices import predict_all
from .state import ReconState

# a quadratic of the position: 10 terms; pixels whose prediction is below this fraction of the
# stack's 99th percentile are left out of the fit (the ratio is noise there: background, edges)
_MIN_SIGNAL = 0.2
_MIN_PIXELS = 200  # a stack with fewer such pixels keeps its intensities


def _slice_positions(ss, k: int) -> torch.Tensor:
    """Scanner positions [h,w,3] (mm, float64) of slice ``k``'s pixels at its header pose (one
    slice at a time: a stack's [K,h,w,3] and its [P,10] terms would be GBs for a large stack)."""
    _, h, w = ss.obs.shape
    o, ax = ss.origins[k].double(), ss.axes[k].double()
    a = torch.arange(h, dtype=torch.float64, device=o.device) * ss.spacing[0]
    b = torch.arange(w, dtype=torch.float64, device=o.device) * ss.spacing[1]
    return o + a[:, None, None] * ax[0] + b[None, :, None] * ax[1]


def _quadratic_terms(p: torch.Tensor, centre: torch.Tensor, radius: float) -> torch.Tensor:
    """[P,10]: 1, x, y, z, x^2, y^2, z^2, xy, xz, yz of positions relative to ``centre`` / ``radius``."""
    u = (p - centre) / radius
    x, y, z = u[:, 0], u[:, 1], u[:, 2]
    return torch.stack([torch.ones_like(x), x, y, z, x * x, y * y, z * z, x * y, x * z, y * z], 1)


def _fit_log_field(terms: torch.Tensor, logr: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted least squares of log ratios on the quadratic, then once more with the pixels beyond
    3 robust sigmas left out (vessels, partial volume, the model's blur at edges)."""
    coef = torch.zeros(terms.shape[1], dtype=terms.dtype, device=terms.device)
    for _ in range(2):
        tw = terms * w[:, None]
        coef = torch.linalg.lstsq(
            tw.T @ terms + 1e-9 * torch.eye(terms.shape[1], dtype=terms.dtype, device=terms.device), tw.T @ logr
        ).solution
        res = logr - terms @ coef
        sigma = 1.4826 * float((res - res.median()).abs().median()) + 1e-12
        w = w * (res.abs() < 3 * sigma).to(w.dtype)
    return coef


def _stack_anatomy_maps(state: ReconState) -> list[tuple]:
    """Each stack's mean slice pose (``motion.pose_means`` of its slices): where it puts a scanner
    position in the anatomy (None for a stack without slices)."""
    from .motion.poses import pose_means

    return [pose_means([r], [t], [c]) if r.shape[0] else None for r, t, c in zip(state.rots, state.trans, state.cents)]


def _anatomy_common_part(state: ReconState, pos, coefs, centre, radius) -> list:
    """The part of the stacks' fields that one quadratic of the anatomy's position explains (each
    stack's positions ``pos`` moved by its mean pose), as a quadratic of each stack's own scanner
    positions (a quadratic composed with a rigid map is one): per stack 10 numbers, or None.

    Such a part is the anatomy's as much as a field: divided out of every stack it would leave the
    stacks consistent but move intensity out of the volume, so it stays in the volume (the shared
    field step deals with it). Taken in the scanner frame instead (the stacks' mean quadratic) it
    is not one anatomy for stacks that moved, and the stacks no longer agree after the division
    (benchmarks/TUNING.md, session 29)."""
    from .motion.poses import moved_by_mean

    maps = _stack_anatomy_maps(state)
    use = [i for i, c in enumerate(coefs) if c is not None and maps[i] is not None]
    if len(use) < 2:
        return [None] * len(coefs)
    anat = {}
    rows, rhs = [], []
    for j, i in enumerate(use):
        p = pos[i][:: max(1, len(pos[i]) // 20000)]  # 20 000 positions per stack fix 10 numbers
        a = torch.as_tensor(moved_by_mean(p.cpu().numpy(), *maps[i]), dtype=torch.float64, device=p.device)
        t, ta = _quadratic_terms(p, centre, radius), _quadratic_terms(a, centre, radius)
        anat[i] = (t, ta)
        level = torch.zeros(len(p), len(use), dtype=torch.float64, device=p.device)
        level[:, j] = 1.0  # each stack's overall level is its own
        rows.append(torch.cat([level, ta[:, 1:]], 1))
        rhs.append(t @ coefs[i])
    sol = torch.linalg.lstsq(torch.cat(rows), torch.cat(rhs)[:, None]).solution[:, 0]
    q = torch.cat([sol.new_zeros(1), sol[len(use) :]])
    out = [None] * len(coefs)
    for i in use:
        t, ta = anat[i]
        out[i] = torch.linalg.lstsq(t, (ta @ q)[:, None]).solution[:, 0]
    return out


@torch.no_grad()
def estimate_stack_fields(state: ReconState, sets=None) -> dict | None:
    """Each stack's field relative to the others, as quadratics in one scanner frame:
    {"centre", "radius", "coefs": per stack 10 numbers or None (too few pixels)}; None with fewer
    than two stacks to compare. ``correct_stack_bias`` adds "spread" (the largest relative field
    of any stack, as |log|), which ``remove_shared_field`` reads; the dict, spread included, is what
    a checkpoint keeps.

    Each stack's slices as acquired (the field already divided out, ``state.stack_fields``, put
    back: every estimate is a whole one, not a correction of the last, so that repeated estimates
    settle instead of adding up the model's own bias) are compared with the model's prediction, and
    the log ratio is fitted by a quadratic. What one quadratic of the anatomy's position explains in
    all of them stays (``_anatomy_common_part``).

    ``sets``: the slices compared (default ``state.sets``; the coarse level's binned ones during its
    pose rounds: a quadratic needs no fine pixels, and they render 4 x faster)."""
    sets = state.sets if sets is None else sets
    preds = predict_all(state.params, sets, state.rots, state.trans, state.cents, state.cfg, state.backend)
    wts = loss_weights(sets, state.pws, state.sws)
    before = state.stack_fields
    fits = []
    for ss, pred, wt in zip(sets, preds, wts):
        pred, obs = pred.double(), ss.obs.double()
        sig = wt > 0
        # numpy's percentile: torch.quantile refuses more than 2^24 values (a stack of 512 x 512 x 64 unmasked)
        floor = _MIN_SIGNAL * float(np.percentile(pred[sig].cpu().numpy(), 99)) if bool(sig.any()) else 0.0
        use = sig & (pred > floor) & (obs > floor * 0.25)
        pos = torch.cat([_slice_positions(ss, k)[use[k]] for k in range(ss.n)])  # in use's order
        fits.append((pos, torch.log(obs[use] / pred[use]), wt[use].double()))
    if sum(len(f[1]) >= _MIN_PIXELS for f in fits) < 2:
        return None
    if before is not None:  # the same frame as the fields divided out
        centre = torch.tensor(before["centre"], dtype=torch.float64, device=fits[0][0].device)
        radius = float(before["radius"])
    else:
        every = torch.cat([p for p, logr, _ in fits if len(logr) >= _MIN_PIXELS])
        centre = every.mean(0)
        radius = float((every - centre).norm(dim=1).max()) or 1.0
    terms = [_quadratic_terms(p, centre, radius) if len(logr) >= _MIN_PIXELS else None for p, logr, _ in fits]
    if before is not None:  # the slices as acquired: the field divided out so far put back
        fits = [
            (p, logr if t is None or old is None else logr + t @ torch.tensor(old, dtype=t.dtype, device=t.device), w)
            for (p, logr, w), t, old in zip(fits, terms, before["coefs"])
        ]
    coefs = [None if t is None else _fit_log_field(t, logr, w) for t, (_, logr, w) in zip(terms, fits)]
    common = _anatomy_common_part(state, [p for p, _, _ in fits], coefs, centre, radius)
    out = []
    for t, coef, shared in zip(terms, coefs, common):
        if coef is None:
            out.append(None)
            continue
        if shared is not None:
            coef = coef - shared
        coef[0] = 0.0  # the stack's overall level stays with its normalisation and slice scales
        coef[0] = -math.log(float(torch.exp(t @ coef).mean()))  # mean 1 over the fitted pixels
        out.append(coef.tolist())
    return {"centre": centre.tolist(), "radius": radius, "coefs": out}


@torch.no_grad()
def apply_stack_fields(state: ReconState, fields: dict, before: dict | None = None) -> list[dict]:
    """Divide each stack's slices (``state.sets[i].obs``, in place) by its field, where ``before``
    (the fields divided out so far, in the same frame: ``estimate_stack_fields`` keeps it) has been
    put back; returns per stack the field's range over
    its slices' masks."""
    dev = state.sets[0].obs.device
    centre = torch.tensor(fields["centre"], dtype=torch.float64, device=dev)
    report = []
    for si, (ss, coef) in enumerate(zip(state.sets, fields["coefs"])):
        old = None if before is None else before["coefs"][si]
        if coef is None and old is None:
            report.append({"stack": ss.name, "field_range": [1.0, 1.0]})
            continue
        c_new = torch.tensor(coef if coef is not None else [0.0] * 10, dtype=torch.float64, device=dev)
        c_old = torch.tensor(old if old is not None else [0.0] * 10, dtype=torch.float64, device=dev)
        log_new = torch.empty(ss.obs.shape, dtype=torch.float64, device=dev)
        change = torch.empty_like(log_new)
        for k in range(ss.n):  # one slice's terms at a time: a stack's [K*h*w,10] would be GBs
            t = _quadratic_terms(_slice_positions(ss, k).reshape(-1, 3), centre, fields["radius"])
            log_new[k] = (t @ c_new).reshape(log_new.shape[1:])
            change[k] = (t @ (c_new - c_old)).reshape(log_new.shape[1:])
        ss.obs = (ss.obs.double() * torch.exp(-change)).to(ss.obs.dtype)
        f_in = torch.exp(log_new[ss.mask] if bool(ss.mask.any()) else log_new.flatten())
        report.append({"stack": ss.name, "field_range": [round(float(f_in.min()), 4), round(float(f_in.max()), 4)]})
    return report


def correct_stack_bias(state: ReconState, sets=None) -> list[dict]:
    """Estimate each stack's field relative to the others and divide it out in place of the one
    divided out before (if any); keep it on the state (a checkpoint's resume applies it again) and
    reset the slice scales the field was in. Run after each of the coarse level's pose rounds
    (``cfg.stack_bias_rounds``: the poses are fitted to slices whose fields no longer disagree)
    and once after the coarse level."""
    fields = estimate_stack_fields(state, sets)
    if fields is None:
        return []
    before = state.stack_fields
    report = apply_stack_fields(state, fields, before)
    state.stack_fields = fields
    # the largest relative field of any stack, as a log: the evidence that the coil's field is there
    fields["spread"] = max(max(abs(math.log(lo)), abs(math.log(hi))) for lo, hi in (r["field_range"] for r in report))
    for sc in state.scs:
        sc.fill_(1.0)
    return report


@torch.no_grad()
def remove_shared_field(state: ReconState) -> dict | None:
    """The field the stacks share, from the fitted model's volume (rendered on the output
    resolution's grid over the region): N4 with ``cfg.shared_field_levels`` fitting levels (a smooth
    field) on the volume shrunk 2 x in plane, divided out of each Gaussian's intensity at its centre
    (the model and the volumes rendered from it stay one) where the stacks' relative fields reached
    ``cfg.shared_field_min_spread`` or the field spans more than ``cfg.shared_field_min_range``.
    Returns {"range": the field's over the region, "applied": bool}, or None where the stacks'
    fields were not estimated."""
    from ..field import volume_at_points
    from ..masking import n4_correct
    from .frame import current_region
    from .output import model_volume

    fields = state.stack_fields
    if not state.cfg.shared_field or fields is None:
        return None
    state.region = current_region(state)
    volume = model_volume(state, state.shape, state.aff, state.region)
    _, field = n4_correct(volume, state.aff, state.region, shrink=2, levels=state.cfg.shared_field_levels)
    inside = field[state.region]
    lo, hi = float(inside.min()), float(inside.max())
    shown = fields.get("spread", 0.0) > state.cfg.shared_field_min_spread
    applied = shown or math.log(hi / lo) > state.cfg.shared_field_min_range
    if applied:
        fld = state.fld
        at = volume_at_points(field, state.aff, fld.means.detach().cpu().double().numpy())
        fld.intensities = fld.intensities / torch.as_tensor(
            at, dtype=fld.intensities.dtype, device=fld.intensities.device
        )
    return {"range": (lo, hi), "applied": applied}
