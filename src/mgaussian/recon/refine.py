"""The refinement of a level after its warm start: Adam with the seed's loss (smooth L1 + SSIM)
over random batches of slices on the Gaussians' centres (``cfg.adam_parameters``: also their
intensities, under the lattice prior, and their scales and rotations, under the anisotropy
penalty), and from halfway through the last level the neural residual field. Skipped on noisy
data, where it refits the noise."""

from __future__ import annotations

__all__ = ["refine"]

import torch

from ..field import GaussianField, anisotropy_penalty
from ..render import shared_gaussians
from .frame import hold_frame
from .intensity import curvature_weight, laplacian_apply_torch
from .losses import masked_smooth_l1, masked_ssim
from .motion.robust import loss_weights
from .motion.rounds import record_poses
from .slices import nrf_slices, render_stack_slices, slice_frames
from .state import Level, ReconState, noisy_slices


def _param_groups(state: ReconState) -> list[dict]:
    """Adam's parameter groups: the Gaussians' parameters in ``cfg.adam_parameters`` (the others
    are held: no gradient) and, with ``joint_pose_lr``, the slice poses."""
    cfg, params = state.cfg, state.params
    rates = {
        "means": cfg.lr_means * state.half_extent,
        "intensities": cfg.lr_intensities,
        "log_scales": cfg.lr_scales,
        "quats": cfg.lr_quats,
    }
    groups = []
    for name, lr in rates.items():
        held = name not in cfg.adam_parameters
        params[name].requires_grad_(not held)
        if not held:
            groups.append({"params": [params[name]], "lr": lr, "name": name})
    if state.motion and cfg.joint_pose_lr > 0:
        for r, t in zip(state.rots, state.trans):
            r.requires_grad_(True)
            t.requires_grad_(True)
        groups += [
            {"params": state.rots, "lr": cfg.lr_pose_rotation * cfg.joint_pose_lr, "name": "pose_rot"},
            {"params": state.trans, "lr": cfg.lr_pose_translation * cfg.joint_pose_lr, "name": "pose_trans"},
        ]
    return groups


def _next_batch(state: ReconState) -> list[tuple[int, int]]:
    """(stack, slice) pairs of the next batch: every slice once per epoch, in random order."""
    all_slices = [(si, k) for si, ss in enumerate(state.sets) for k in range(ss.n)]
    out = []
    while len(out) < min(state.cfg.batch_slices, len(all_slices)):
        if not state.order:
            state.order = [all_slices[i] for i in state.rng.permutation(len(all_slices))]
        out.append(state.order.pop())
    return out


def _batch_backward(state: ReconState, batch) -> tuple[float, float, float, int]:
    """The seed's loss over a batch, per pixel, back-propagated stack by stack (a stack's render
    plans and graph are freed before the next stack's render: mni-t4 at 1 mm, ~1.5 GB of plans for
    a 64-slice batch at once; the gradient is the same sum): (loss, smooth-L1 sum, SSIM sum, pixels)."""
    l1_sum = ssim_sum = loss_sum = 0.0
    per_stack = []
    for si, ss in enumerate(state.sets):
        ks = [k for (s, k) in batch if s == si]
        if ks:
            sel = torch.as_tensor(ks, device=state.dev)
            per_stack.append((si, ss, sel, int(ss.mask[sel].sum())))
    npx = sum(cnt for *_, cnt in per_stack)
    with shared_gaussians():  # the stacks' renders prepare the Gaussians once
        for si, ss, sel, cnt in per_stack:
            term, l1, s = _stack_term(state, si, ss, sel, cnt, npx)
            term.backward()
            loss_sum += float(term.detach())
            l1_sum += float(l1.detach()) * cnt
            if s is not None:
                ssim_sum += float(s.detach()) * cnt
    return loss_sum, l1_sum, ssim_sum, npx


def _stack_term(state: ReconState, si: int, ss, sel: torch.Tensor, cnt: int, npx: int):
    """One stack's part of the batch loss, weighted by its share of the batch's pixels: (term,
    smooth-L1 mean, SSIM or None)."""
    cfg, params = state.cfg, state.params
    o, ax = slice_frames(ss, sel, state.rots[si], state.trans[si], state.cents[si])
    pred = render_stack_slices(params, ss, sel, o, ax, cfg, state.backend)
    if state.nrf is not None:
        pred = pred + nrf_slices(state.nrf, ss, sel, o, ax, cfg)
    pred = pred * state.scs[si][sel][:, None, None]
    obs, m, w = ss.obs[sel], ss.mask[sel], state.wts[si][sel]
    l1 = masked_smooth_l1(pred, obs, m, cfg.smooth_l1_beta, weight=w)
    term = l1 * cnt
    s = None
    if cfg.use_ssim:
        s = masked_ssim(pred, obs, m, weight=state.sws[si][sel][:, None, None].expand_as(w))
        term = term + cfg.ssim_weight * (1 - s) * cnt
    return term / max(npx, 1), l1, s


def _adam_iteration(
    state: ReconState,
    level: Level,
    opt,
    it: int,
    base_lr: list[float],
    nrf_from: int | None,
    history_every: int,
    pose_groups: bool,
) -> None:
    """One Adam iteration of the level (learning rates decayed and warmed up, NRF started on time)."""
    cfg, params = state.cfg, state.params
    n_it = level.iterations
    frac = it / max(n_it - 1, 1)
    warm_up = min(1.0, (it + 1) / cfg.lr_warmup) if cfg.lr_warmup > 0 else 1.0
    for g, lr0 in zip(opt.param_groups, base_lr):
        g["lr"] = lr0 * (cfg.lr_decay**frac) * warm_up
    if nrf_from is not None and it == nrf_from and state.nrf is None:
        state.nrf = state.make_nrf()
        state.nrf_opt = torch.optim.Adam(state.nrf.parameters(), lr=cfg.lr_nrf)
    batch = _next_batch(state)
    opt.zero_grad(set_to_none=True)
    if state.nrf_opt is not None:
        state.nrf_opt.zero_grad(set_to_none=True)
    loss, l1_sum, ssim_sum, npx = _batch_backward(state, batch)
    penalty = None
    # the warm start's prior, per pixel like the data term (on intensities Adam updates)
    if level.pairs is not None and params["intensities"].requires_grad:
        c = params["intensities"]
        curvature = curvature_weight(cfg)
        if curvature is None:
            dc = c[level.pairs[:, 0]] - c[level.pairs[:, 1]]
            prior = (dc * dc).sum()
        else:
            lc = laplacian_apply_torch(c, level.pairs)
            prior = curvature * (lc * lc).sum()
        penalty = 0.5 * level.smooth * prior / max(state.n_pix, 1)
    if cfg.use_anisotropy and cfg.anisotropy_weight > 0 and params["log_scales"].requires_grad:
        aniso = cfg.anisotropy_weight * anisotropy_penalty(params["log_scales"], cfg.anisotropy_max_ratio)
        penalty = aniso if penalty is None else penalty + aniso
    if penalty is not None:
        penalty.backward()
        loss += float(penalty.detach())
    opt.step()
    if pose_groups and (it + 1) % 10 == 0:
        hold_frame(state)
    if state.nrf_opt is not None:
        state.nrf_opt.step()
    state.step += 1
    rec = {
        "step": state.step,
        "level": level.index,
        "loss": loss,
        "l1": l1_sum / max(npx, 1),
        "ssim": ssim_sum / max(npx, 1) if cfg.use_ssim else None,
        "time_s": state.elapsed(),
    }
    if state.step % history_every == 0 or state.step == state.total_steps:
        state.history.append(rec)
    state.progress.update(state.step, loss=loss, level=f"{level.index + 1}/{level.count}")


def refine(state: ReconState, level: Level, resume_state: dict | None, checkpointer, history_every: int) -> None:
    """The level's Adam iterations (from ``resume_state``'s iteration when the level resumes);
    leaves the fitted Gaussians in ``state.fld``."""
    cfg = state.cfg
    level.dcache.clear()  # the designs' memory is free for the Adam iterations
    state.wts = loss_weights(state.sets, state.pws, state.sws)
    nrf_from = int(cfg.nrf_start * level.iterations) if (cfg.use_nrf and level.last) else None
    state.log(
        f"level {level.index + 1}/{level.count}: {state.fld.num_gaussians} Gaussians at {level.spacing:g} mm, "
        f"{level.iterations} iterations (warm start done at {state.elapsed():.0f} s)"
    )
    if noisy_slices(state) and level.iterations > 0:
        state.log(
            f"  noisy slices (sigma {state.noise_sigma:.3f} > {cfg.adam_max_noise:g}): the warm start is "
            "final, no Adam iterations"
        )
        state.total_steps -= level.iterations
        state.progress.total = max(1, state.total_steps)
        level.iterations = 0
    # Adam only for a level that iterates (creating it costs ~0.5 s the first time: PyTorch's imports)
    groups = _param_groups(state) if level.iterations > 0 else []
    pose_groups = any(g["name"].startswith("pose_") for g in groups)
    state.opt = opt = torch.optim.Adam(groups, eps=1e-15) if groups else None
    base_lr = [g["lr"] for g in groups]
    if resume_state is not None and resume_state["opt"] is not None and opt is not None:  # [checkpoint]
        opt.load_state_dict(resume_state["opt"])
    elif checkpointer is not None and resume_state is None:  # [checkpoint] after the warm start
        checkpointer.save(state.snapshot(level.index, 0))
    for it in range(resume_state["iteration"] if resume_state is not None else 0, level.iterations):
        if cfg.time_budget_s and level.last and state.elapsed() > cfg.time_budget_s:
            state.log(f"time budget of {cfg.time_budget_s:g} s reached after {it} of {level.iterations} iterations")
            state.note_budget(f"level {level.index + 1}'s Adam refinement ({it} of {level.iterations} iterations)")
            break
        _adam_iteration(state, level, opt, it, base_lr, nrf_from, history_every, pose_groups)
        if checkpointer is not None:  # [checkpoint]
            checkpointer.maybe_save(lambda: state.snapshot(level.index, it + 1))
    for r, t in zip(state.rots, state.trans):
        r.requires_grad_(False)
        t.requires_grad_(False)
    for v in state.params.values():  # the held parameters as the level left them
        v.requires_grad_(True)
    if pose_groups:
        hold_frame(state)
        record_poses(state)
    p = state.params
    state.fld = GaussianField(
        p["means"].detach(),
        p["log_scales"].detach(),
        p["quats"].detach(),
        p["intensities"].detach(),
        state.fld.spacing,
        state.fld.grid_origin,
        state.fld.grid_index,
        state.fld.grid_shape,
    )
