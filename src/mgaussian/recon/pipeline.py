"""The reconstruction, top to bottom: prepare the inputs (settings, stack registration, slices,
grid, starting poses) -> for each level of the progressive growth: its Gaussians, the warm start,
the pose rounds (with slice motion), the refinement -> the output volume.

Every stage is a function of the :class:`~.state.ReconState` in its own module (see
``docs/architecture.md``); this driver only says in which order they run.
"""

from __future__ import annotations

__all__ = ["reconstruct"]

import time

import numpy as np

from ..io import Stack
from .config import ReconConfig
from .frame import choose_frame
from .heap import reuse_freed_memory
from .levels import begin_level, fit_iterations, level_schedule, rebin_level, refit, robust_refit, warm_start
from .motion.rounds import pose_rounds
from .output import ReconResult, result
from .prepare import prepare
from .prior_choice import choose_prior_factor, prior_choice_active
from .profile import choose_profile
from .progress import Progress
from .refine import refine
from .state import Level, ReconState


def _log_resume(state: ReconState, resume_state: dict) -> None:
    if resume_state["done"]:
        state.log(f"resuming a finished fit (step {state.step}): rendering the volume")
    else:
        state.log(
            f"resuming from level {resume_state['level'] + 1} iteration {resume_state['iteration']} "
            f"(step {state.step}, {resume_state['elapsed_s']:.0f} s of fitting done)"
        )


def _initial_profile(state: ReconState, resume_state: dict | None) -> bool:
    """Fix the slice profile now, or defer its choice until the coarse level's poses (returns
    True): with slice motion the residual at the registered poses favours the narrower profile
    whatever the data (sb25-t3.2-motion, Gaussian profile: 0.8 chosen, 27.8 dB against 28.2 dB at
    1.0); until then the FWHM is the first candidate."""
    cfg = state.cfg
    deferred = cfg.through_plane_fwhm_factor is None and state.motion and len(cfg.profile_candidates) > 1
    if deferred:
        state.cfg = cfg.resolved(through_plane_fwhm_factor=float(cfg.profile_candidates[0]))
        if resume_state is not None and (resume_state["level"] >= 1 or resume_state["cg_done"]):
            # [checkpoint] the coarse rounds are done: the poses they left decide, as before the kill
            state.cfg = state.cfg.resolved(through_plane_fwhm_factor=choose_profile(state))
    elif cfg.through_plane_fwhm_factor is None:
        state.cfg = cfg.resolved(through_plane_fwhm_factor=choose_profile(state))
    return deferred


def _correct_motion(state: ReconState, level: Level, profile_deferred: bool) -> None:
    """The pose rounds of a level, then (coarse level) the frame and the deferred profile, and the
    field re-fitted under the level's own prior (even past the deadline: the rounds left it under a
    weak one)."""
    moved = pose_rounds(state, level, after_poses=_fields_follow(state, level))
    if level.index == 0 and state.motion and moved and state.multi:
        choose_frame(state)
    if level.index == 0 and profile_deferred:
        f = choose_profile(state)
        if f != state.cfg.through_plane_fwhm_factor:
            state.cfg = state.cfg.resolved(through_plane_fwhm_factor=f)
            refit(state, level, max(fit_iterations(state, level) // 3, 1))
    if moved:
        n_re = max(fit_iterations(state, level) // 3, 1)
        refit(state, level, n_re, min_iter=n_re)


def _fields_wanted(state: ReconState, level: Level) -> bool:
    """Whether the stacks' fields are estimated at this level: the coarse one, before a finer one."""
    return level.index == 0 and not level.last and state.cfg.stack_bias and state.multi


def _fields_follow(state: ReconState, level: Level):
    """The coarse level's pose rounds' companion (``cfg.stack_bias_rounds``): the stacks' fields
    estimated again at each round's poses and divided out, so that the next round's poses are
    fitted to stacks that agree (a field across a slice pulls its pose), or None."""
    if not (_fields_wanted(state, level) and state.cfg.stack_bias_rounds):
        return None
    from .bias import correct_stack_bias

    def follow() -> None:
        t0 = time.time()
        if correct_stack_bias(state, level.lsets):
            rebin_level(state, level)
        state.add_time("stack_bias_s", t0)  # also inside the level's motion time: timings overlap

    return follow


def _correct_bias(state: ReconState) -> None:
    """Each stack's field relative to the coarse model, divided out before the fine level (in
    place of the one the pose rounds left)."""
    from .bias import correct_stack_bias

    t0 = time.time()
    for r in correct_stack_bias(state):
        lo, hi = r["field_range"]
        state.log(f"  stack {r['stack']}: intensity field {lo:.3f}-{hi:.3f} relative to the others, divided out")
    if state.stack_fields is not None:
        state.stack_fields["settled"] = True  # [checkpoint] a resume past here does not estimate it again
    state.add_time("stack_bias_s", t0)


def _remove_shared_field(state: ReconState) -> None:
    """The field the stacks share divided out of the model where they showed fields (recon/bias.py),
    before the volume is rendered from it."""
    from .bias import remove_shared_field

    t0 = time.time()
    found = remove_shared_field(state)
    if found is None:
        return
    (lo, hi), applied = found["range"], found["applied"]
    what = "divided out" if applied else "left: as small as N4 finds in a field-free volume"
    state.log(f"  the field the stacks share (N4 on the volume): {lo:.3f}-{hi:.3f}, {what}")
    state.add_time("shared_field_s", t0)


def _choose_prior(state: ReconState, level: Level) -> None:
    """The last level's prior weight on noisy data, chosen by held-out slices (recon/prior_choice.py)."""
    t0 = time.time()
    factor = choose_prior_factor(state, level)
    errors = state.prior_choice["errors"]
    tried = ", ".join(f"x{f} {e / min(errors.values()):.4f}" for f, e in sorted(errors.items(), reverse=True))
    state.log(
        f"  prior weight x{factor:.3f} ({level.smooth:.3g}) from every {state.cfg.prior_holdout}th slice held out: "
        f"their error {tried} (relative to the lowest; a step down is kept where it beats the slices' scatter)"
    )
    state.add_time("prior_choice_s", t0)


def _start_level(
    state: ReconState,
    index: int,
    count: int,
    factor: float,
    iterations: int,
    resume_state: dict | None,
    profile_deferred: bool,
) -> Level:
    """A level's Gaussians, its warm start, and its pose rounds (with slice motion) or robust
    weights."""
    resumed = resume_state is not None and index == resume_state["level"]
    t0 = time.time()
    level = begin_level(state, index, count, factor, iterations, resumed)
    warm = not (resumed and resume_state["cg_done"])  # [checkpoint] a resumed level skips its warm start
    if warm and prior_choice_active(state, level):
        _choose_prior(state, level)
        t0 = time.time()
    if warm:
        warm_start(state, level)
    state.add_time(f"level{index + 1}_warm_start_s", t0)
    t0 = time.time()
    if warm and state.motion:
        _correct_motion(state, level, profile_deferred)
    elif warm and (state.cfg.robust or state.cfg.slice_scale):
        robust_refit(state, level)
    state.add_time(f"level{index + 1}_motion_weights_s", t0)
    return level


def _fit_levels(
    state: ReconState, resume_state: dict | None, checkpointer, history_every: int, profile_deferred: bool
) -> None:
    """The progressive growth: each level's Gaussians, warm start, pose rounds and refinement."""
    schedule = level_schedule(state.cfg)
    start = resume_state["level"] if resume_state is not None else 0
    for index, (factor, iterations) in enumerate(schedule):
        if index < start:  # [checkpoint] done before the resume point
            continue
        # the last level's maps keep pages of their own (recon/heap.py: its memory peak)
        with reuse_freed_memory(enabled=index < len(schedule) - 1):
            level = _start_level(state, index, len(schedule), factor, iterations, resume_state, profile_deferred)
        t0 = time.time()
        with reuse_freed_memory():
            refine(state, level, resume_state if level.resumed else None, checkpointer, history_every)
        state.add_time(f"level{index + 1}_refine_s", t0)
        if _fields_wanted(state, level) and not (state.stack_fields or {}).get("settled"):
            _correct_bias(state)


def reconstruct(
    stacks: list[Stack],
    cfg: ReconConfig,
    log=print,
    progress: bool = True,
    history_every: int = 10,
    checkpointer=None,
    resume_state: dict | None = None,
    slice_poses: list[np.ndarray] | None = None,
    known_stack_poses: dict | None = None,
) -> ReconResult:
    """Reconstruct a volume from loaded stacks with the given configuration.

    ``checkpointer`` (recon.checkpoint.Checkpointer) saves the state after each level's warm
    start, every ``interval_s`` at an iteration boundary and at the end of fitting;
    ``resume_state`` (its ``load()``) continues from such a state.

    ``slice_poses``: one [slices, 4, 4] array per stack, the world-to-world rigid map of each
    slice (header position -> where it was acquired), as the simulator's truth.json holds them.
    The slices start there instead of at a registered stack pose (with ``cfg.motion`` off they stay
    there): the benchmarks' reconstructions at the true poses.

    ``known_stack_poses``: {stack index: (coarse transform, reversed, images)} of stacks the stack
    assessment registered with the reference stack at the registration's coarse levels
    (``mgaussian.assess.reference_poses``): the stack registration finishes them."""
    state = prepare(stacks, cfg, log, resume_state, slice_poses, known_stack_poses)
    if resume_state is not None:
        state.restore(resume_state)
        _log_resume(state, resume_state)
    t0 = time.time()
    profile_deferred = _initial_profile(state, resume_state)
    state.add_time("profile_s", t0)
    schedule = level_schedule(state.cfg)
    state.total_steps = sum(n for _, n in schedule)
    state.progress = Progress(state.total_steps, enabled=progress)
    t_train = time.time()
    _fit_levels(state, resume_state, checkpointer, history_every, profile_deferred)
    state.progress.close()
    if checkpointer is not None and not (resume_state is not None and resume_state["done"]):  # [checkpoint]
        checkpointer.save(state.snapshot(len(schedule), 0, done=True))
        state.timings["checkpoint_s"], state.timings["checkpoints_saved"] = checkpointer.save_s, checkpointer.n_saved
    state.timings["train_s"] = time.time() - t_train
    _remove_shared_field(state)
    res = result(state)
    if state.cfg.confidence:
        from .confidence import confidence_map

        conf = confidence_map(state, volume=res.volume, grid=(res.volume.shape, res.affine, res.region))
        res.confidence, res.confidence_sd = conf.confidence, conf.sd
        res.confidence_info = {"sd_ref": conf.sd_ref, **conf.info}
        state.log(
            f"confidence map ({conf.method} diagonal): mean {conf.info['mean_confidence_in_region']:.3f} "
            f"in the region, {state.timings['confidence_s']:.1f} s"
        )
    return res
