"""The pose rounds of a level: the alternation that corrects slice motion. Each round fits every
slice's pose with the field fixed (Levenberg-Marquardt, :mod:`.lm`), holds the frame, carries the
slices on along their moves, re-estimates the robust weights and re-fits the intensities under a
weaker prior (a smooth field pulls slices off their true poses).

A round is started only when it can end before the level's deadline (with a time budget); the
first round decides whether the data hold slice motion at all.
"""

from __future__ import annotations

__all__ = ["extrapolation_gain", "pose_rounds"]

import math
import time

import torch

from .. import frame
from ..slices import predict_all
from .lm import optimise_poses
from .poses import mean_move
from .robust import loss_weights, update_robust


@torch.no_grad()
def extrapolation_gain(step, prev, cap: float, arm_mm: float = 40.0) -> float:
    """How far to carry on along this round's pose moves: the alternation of pose rounds and field
    re-fits converges linearly, each round's moves about rho x the last round's, so the moves
    still to come sum to rho / (1 - rho) x this round's. rho is the projection of this round's
    moves on the last round's, over all slices (rotation vectors x ``arm_mm`` to weigh like mm at
    the edge of a slice; per slice it is too noisy). The gain is capped at ``cap``; 0 unless
    0 < rho < 1 (the rounds turn back, or do not settle). ``step``, ``prev``: per stack (rotation
    [n, 3] rad, translation [n, 3] mm)."""
    num = sum(float((a[0] * b[0]).sum()) * arm_mm**2 + float((a[1] * b[1]).sum()) for a, b in zip(step, prev))
    den = sum(float((b[0] * b[0]).sum()) * arm_mm**2 + float((b[1] * b[1]).sum()) for b in prev)
    rho = num / den if den > 0 else 0.0
    return min(rho / (1.0 - rho), cap) if 0.0 < rho < 1.0 else 0.0


def _round_cost(state, level, steps: int) -> float:
    """The predicted wall time of a later level's first round: ~(10 + iterations) renders of all
    slices (the Jacobians, trial steps, weights and re-fit; mni-t4 at 1 mm: 7 s a render on 2 slow
    cores, so a round there costs more than the budget leaves). 0 without a deadline."""
    if level.index == 0 or level.deadline is None:
        return 0.0
    if level.dcache.get("build_s"):  # building the warm start's maps costs about one render (sb25: 0.85 vs 0.87 s)
        return (10 + steps) * level.dcache["build_s"]
    t0 = time.time()
    predict_all(state.params, level.lsets, state.rots, state.trans, state.cents, state.cfg, state.backend)
    return (10 + steps) * (time.time() - t0)


def _carry_on(state, step_now, prev_step) -> float:
    """Carry the slices on along this round's moves (``pose_extrapolation``); returns the gain."""
    cap = state.cfg.pose_extrapolation
    if cap <= 0 or prev_step is None:
        return 0.0
    gain = extrapolation_gain(step_now, prev_step, cap)
    if gain > 0:
        for si, (a_r, a_t) in enumerate(step_now):
            state.rots[si] += gain * a_r
            state.trans[si] += gain * a_t
        frame.hold_frame(state)
    return gain


def _no_motion_found(state, level) -> None:
    """The first round hardly moved the slices: their scatter is fitting noise. Each slice takes its
    stack's mean pose (the stack's mean move refines the registration) and motion is off from here."""
    from .poses import to_stack_poses

    state.motion = False
    to_stack_poses(state.rots, state.trans, state.cents)
    if level.deadline is not None:  # and the level's share of the budget is the motion-free one
        level.deadline = min(level.deadline, state.t_start + 0.35 * state.cfg.time_budget_s)
    state.log("  no slice motion found: one rigid pose per stack from here on")


def pose_rounds(state, level, after_poses=None) -> bool:
    """Run the level's pose rounds; returns whether any ran (the slices moved). ``after_poses``
    (no arguments) runs after each round's pose steps, before its weights and intensity re-fit:
    what else follows the poses (the pipeline's stack fields)."""
    from ..levels import refit  # here: levels imports frame, which imports this package

    cfg = state.cfg
    rounds = cfg.motion_rounds if level.index == 0 else cfg.fine_motion_rounds
    steps = cfg.pose_iterations if level.index == 0 else cfg.fine_pose_iterations
    moved = False
    round_s = _round_cost(state, level, steps) if rounds > 0 and steps > 0 else 0.0
    prev_step = None  # the last round's moves, for the extrapolation
    for rnd in range(rounds if steps > 0 else 0):
        if level.deadline is not None and time.time() + round_s > level.deadline:
            if level.index > 0 and rnd == 0:
                state.log(f"  no pose rounds at this level: one would take ~{round_s:.0f} s, beyond the time budget")
            state.note_budget(f"level {level.index + 1}'s pose rounds")
            break
        t_round = time.time()
        before = [(r.clone(), t.clone()) for r, t in zip(state.rots, state.trans)]
        # each slice's pose is fitted whatever its slice weight (its pixel weights still apply):
        # a slice excluded while far from its pose must still be moved to it (benchmarks/MOTION.md,
        # session 6: slices of 1700-2700 pixels, 4 mm off, were excluded and never moved)
        optimise_poses(
            state.params,
            level.lsets,
            state.rots,
            state.trans,
            state.cents,
            loss_weights(level.lsets, state.pws),
            state.scs,
            cfg,
            state.backend,
            steps,
            deadline=level.deadline,
            rot_axes=(0, 1, 2) if cfg.pose_tilt else (2,),
            small_slice=cfg.pose_small_slice,
            time_ranks=_time_ranks(state, level) if cfg.pose_time_prior > 0 else None,
            time_prior=cfg.pose_time_prior,
            time_scale_mm=cfg.pose_time_scale_mm,
            jac_every=cfg.pose_jacobian_every,
        )
        frame.hold_frame(state)
        step_now = [(r - b[0], t - b[1]) for r, t, b in zip(state.rots, state.trans, before)]
        gain = _carry_on(state, step_now, prev_step)
        prev_step = step_now
        d_t, d_r = mean_move(state.rots, state.trans, before)
        d_r = d_r * 180 / math.pi
        state.log(
            f"  poses round {rnd + 1}: slices moved {d_t:.3f} mm, turned {d_r:.3f} deg on average"
            + (f" (carried on x {1 + gain:.2f})" if gain > 0 else "")
            + f" ({state.elapsed():.0f} s)"
        )
        if after_poses is not None:
            after_poses()
        level.lwts, _ = update_robust(
            state.params,
            level.lsets,
            state.rots,
            state.trans,
            state.cents,
            state.scs,
            state.sws,
            state.pws,
            cfg,
            state.backend,
            cache=level.dcache,
        )
        refit(state, level, cfg.motion_refit_iterations, weak_prior=True)
        record_poses(state)
        moved = True
        round_s = time.time() - t_round
        # the first round decides whether the data hold slice motion at all; the coarse field's
        # fitting noise turns the slices of clean data by up to ~0.1 deg (clean sb25, binned
        # slices: 0.10 deg, 0.03 mm; sb25-t3.2-motion 1.9 deg, mni-t4-motion 1.1 deg)
        none_here = level.index == 0 and rnd == 0 and d_t < cfg.motion_none_mm and d_r < cfg.motion_none_deg
        if none_here:
            _no_motion_found(state, level)
            break
        if d_t < cfg.motion_stop_mm and d_r < cfg.motion_stop_deg:
            break
    return moved


def record_poses(state) -> None:
    """Append the slices' poses now (per stack: mean distance and turn from the centre convention,
    the motion between slices, the mean slice weight) to ``state.pose_history``."""
    import numpy as np

    from .poses import slice_motion, to_centre_convention

    c = state.centre.cpu().numpy().astype(np.float64)
    row = {"step": state.step, "time_s": state.elapsed(), "stacks": []}
    for ss, r, u, cs, w in zip(state.sets, state.rots, state.trans, state.cents, state.sws):
        rn = r.detach().cpu().numpy().astype(np.float64)
        un, sn = u.detach().cpu().numpy().astype(np.float64), cs.cpu().numpy().astype(np.float64)
        t = to_centre_convention(rn, un, sn, c)
        mm, deg = slice_motion(rn, un, sn)
        row["stacks"].append(
            {
                "stack": ss.name,
                "mean_translation_mm": float(np.linalg.norm(t, axis=1).mean()),
                "mean_rotation_deg": float(np.degrees(np.linalg.norm(rn, axis=1)).mean()),
                "slice_motion_mm": float(mm.mean()) if len(mm) else 0.0,
                "slice_motion_deg": float(deg.mean()) if len(deg) else 0.0,
                "mean_weight": float(w.mean()),
            }
        )
    state.pose_history.append(row)


def _time_ranks(state, level) -> list:
    """Each fitted slice's acquisition time rank, per stack (None where the order is unknown)."""
    out = []
    for st, ss in zip(state.stacks, level.lsets):
        order = getattr(st, "slice_order", None)
        out.append(None if order is None else [float(order[int(k)]) for k in ss.index])
    return out
