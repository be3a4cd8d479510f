"""Each slice's rigid pose by Levenberg-Marquardt with the field fixed (the pose half of the
alternation that corrects motion; :mod:`.rounds` alternates it with the intensity fit)."""

from __future__ import annotations

__all__ = ["optimise_poses"]

import time

import numpy as np
import torch

from ...render import shared_gaussians
from ..config import ReconConfig
from ..slices import render_stack_slices, slice_frames, slice_pose_jacobian
from .poses import moved_by_mean, pose_means


def optimise_poses(
    params: dict,
    sets,
    rots,
    trans,
    cents,
    wts,
    scs,
    cfg: ReconConfig,
    backend: str,
    iters: int,
    deadline: float | None = None,
    skip=(),
    eps_rot: float = 2e-3,
    eps_trans: float = 0.05,
    max_rot: float = 0.035,
    max_trans: float = 2.0,
    prior: float = 1e-3,
    rot_axes=(0, 1, 2),
    small_slice: float = 0.0,
    jac_every: int = 1,
    jac_reuse_mm: float = 0.2,
    jac_reuse_rad: float = 0.0035,
    time_ranks=None,
    time_prior: float = 0.0,
    time_scale_mm: float = 1.0,
):
    """Levenberg-Marquardt on every slice's rigid pose (6 parameters) with the field fixed.

    Every slice's Jacobian (6 columns per pixel) builds its 6x6 normal matrix J^T W J and
    gradient J^T W r, and one render checks the step. The Jacobian is analytic
    (``cfg.pose_jacobian``: one pass of the renderer's pose channels, :func:`slice_pose_jacobian`)
    or, on backends without that pass, forward differences: slices are independent given the
    field, so one render with parameter j of every slice perturbed gives column j of all of them.
    A step is kept per slice only if it lowers that slice's cost, else its damping grows. Unlike
    Adam (whose steps have the same size in every direction, even where the data do not constrain
    the pose, e.g. a thick slice's tilt), the damped normal equations step little along weakly
    constrained directions. ``prior`` (relative to the mean diagonal) keeps slices with few pixels
    near their current pose. Steps are capped at ``max_rot`` rad and ``max_trans`` mm.

    ``small_slice`` > 0 holds the slices with less pixel weight than that fraction of the stack's
    median slice near their stack's mean pose (over the stack's slices at the call's start): cost +
    sum_j P_j dev_j^2 with P = the median slice's curvature (per parameter: a thick slice's tilts are
    seen far less than its in-plane turn). A slice at the anatomy's edge with a hundred pixels
    otherwise wanders (sb25-t3.2-motion: such slices went 5-19 deg astray). A pull on every slice,
    even one worth only 100 pixels, compounds over the rounds of alternation with the field (the
    field follows the pulled poses) and cost sb25-t3.2-motion 0.5 dB.

    ``jac_every``: the Jacobian is recomputed every this many iterations and reused
    in between (the step and its check still see the current residual), unless a slice of the
    stack moved by more than ``jac_reuse_mm`` or ``jac_reuse_rad`` at the last step.

    ``time_prior`` > 0 with ``time_ranks`` (per stack, each fitted slice's acquisition time rank):
    motion is a trajectory in time, so each slice is pulled toward the slices acquired just before
    and after it (their poses at the call's start: the rounds update them), with a Cauchy weight
    1 / (1 + (d / ``time_scale_mm``)^2) on their pose difference d (rotations as their arc at
    40 mm), so that a sudden jump between two slices costs little; the pull is ``time_prior`` x the
    median slice's curvature per parameter (like ``small_slice``)."""
    fld = {k: v.detach() for k, v in params.items()}

    def render(si, r, t):
        ss = sets[si]
        sel = torch.arange(ss.n, device=r.device)
        o, ax = slice_frames(ss, sel, r, t, cents[si])
        return render_stack_slices(fld, ss, sel, o, ax, cfg, backend) * scs[si][:, None, None]

    def jacobian(si, r, t, base, ax_now):
        """[K,6,h,w] float64: analytic where the backend has the pose channels, else differences."""
        ss = sets[si]
        if cfg.pose_jacobian == "analytic":
            sel = torch.arange(ss.n, device=r.device)
            dirs = torch.stack([ax_now[:, i] for i in rot_axes], 1) if rot_axes else ax_now[:, :0]
            J = slice_pose_jacobian(fld, ss, sel, r, t, cents[si], dirs, cfg, backend)
            if J is not None:
                return J * scs[si].double()[:, None, None, None]
        return _jacobian(lambda rr, tt: render(si, rr, tt), r, t, base, ax_now, rot_axes, eps_rot, eps_trans)

    # the field is fixed here: its renders (8 an LM iteration, every stack) prepare the Gaussians once
    with shared_gaussians():
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

            tt_target = None
            if time_prior > 0 and time_ranks is not None and time_ranks[si] is not None and ss.n > 2:
                tt_target = _time_neighbour_targets(r, t, cents[si], np.asarray(time_ranks[si]), time_scale_mm)
                use_prior = True
                if not (small_slice > 0):
                    p_d = None
                    tgt_r = torch.zeros((1, 3), dtype=torch.float64, device=r.device)
                    tgt_t = torch.zeros((ss.n, 3), dtype=torch.float64, device=r.device)

            def prior_cost(rr, tt, axr):
                dev = torch.cat([torch.einsum("kjc,kc->kj", axr, rr.double() - tgt_r), tt.double() - tgt_t], 1)
                return (p_d * dev**2).sum(1), dev

            J = None
            for it in range(iters):
                if deadline is not None and time.time() > deadline:
                    break
                # parameters: rotations about the slice's own axes (e_u, e_v, n: tilts first, the
                # in-plane turn last) and translations along world x, y, z
                ax_now = slice_frames(ss, torch.arange(ss.n, device=r.device), r, t, cents[si])[1]
                wd = w.double()
                if J is None or it % jac_every == 0:
                    J = jacobian(si, r, t, base, ax_now)
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
                        small = (
                            (Wk < small_slice * Wmed).to(per.dtype)[:, None] if small_slice > 0 else 0.0 * Wk[:, None]
                        )
                        p_d = small * (Wmed * per)[None, :]  # [K,6]: a small slice weighs like a median one
                        if tt_target is not None:  # the two quadratic pulls as one: summed weights, weighted target
                            p_t = time_prior * tt_target[2][:, None] * (Wmed * per)[None, :]
                            tgt_r, tgt_t = _combine_targets(p_d, tgt_r, tgt_t, p_t, tt_target, len(rot_axes), axr)
                            p_d = p_d + p_t
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


def _time_neighbour_targets(
    r: torch.Tensor, t: torch.Tensor, c: torch.Tensor, ranks: np.ndarray, scale_mm: float, arm_mm: float = 40.0
):
    """Each slice's pull toward the slices acquired just before and after it: (target rotation
    vectors [K,3], target displacements [K,3], summed Cauchy weights [K]) from the poses now. A
    neighbour's target is its own rigid map evaluated at this slice's centre ``c`` (poses are about
    each slice's centre: the same rigid motion displaces two centres differently)."""
    from ...geometry import rotvec_to_matrix

    K = len(ranks)
    order = np.argsort(ranks, kind="stable")
    rd, td, cd = r.detach().double(), t.detach().double(), c.detach().double()
    R = torch.as_tensor(rotvec_to_matrix(rd.cpu().numpy()), dtype=torch.float64, device=r.device)
    num_r = torch.zeros_like(rd)
    num_t = torch.zeros_like(td)
    wsum = torch.zeros(K, dtype=torch.float64, device=r.device)
    for a, b in zip(order[:-1], order[1:]):  # neighbours in acquisition time
        for k, j in ((a, b), (b, a)):
            u_jk = R[j] @ (cd[k] - cd[j]) + cd[j] + td[j] - cd[k]  # j's map, displacing k's centre
            d = torch.sqrt(((rd[k] - rd[j]) * arm_mm).pow(2).sum() + (td[k] - u_jk).pow(2).sum())
            w = 1.0 / (1.0 + (d / scale_mm) ** 2)
            num_r[k] += w * rd[j]
            num_t[k] += w * u_jk
            wsum[k] += w
    safe = wsum.clamp_min(1e-12)[:, None]
    return num_r / safe, num_t / safe, wsum


def _combine_targets(p_s, tgt_r, tgt_t, p_t, tt_target, n_rot: int, axr):
    """The target of the sum of two quadratic pulls, per parameter: (p_s tgt_s + p_t tgt_t) / (p_s + p_t).
    Rotations are combined as rotation vectors (small differences), by the mean of the rotation
    parameters' weights."""
    w_s = p_s[:, :n_rot].mean(1, keepdim=True) if n_rot else p_s[:, :1]
    w_t = p_t[:, :n_rot].mean(1, keepdim=True) if n_rot else p_t[:, :1]
    den = (w_s + w_t).clamp_min(1e-30)
    r_new = (w_s * tgt_r.expand_as(tt_target[0]) + w_t * tt_target[0]) / den
    den_t = (p_s[:, n_rot:] + p_t[:, n_rot:]).clamp_min(1e-30)
    t_new = (p_s[:, n_rot:] * tgt_t + p_t[:, n_rot:] * tt_target[1]) / den_t
    return r_new, t_new


def _jacobian(render, r, t, base, ax_now, rot_axes, eps_rot: float, eps_trans: float) -> torch.Tensor:
    """Every slice's Jacobian [K,P,h,w] by forward differences: one render per parameter with that
    parameter of every slice perturbed (rotations about the slice's own axes ``rot_axes``, then
    translations along world x, y, z)."""
    dirs = [ax_now[:, i] for i in rot_axes] + [None] * 3
    cols = []
    for j, dj in enumerate(dirs):
        rr, tt = r.clone(), t.clone()
        if j < len(rot_axes):
            rr = rr + eps_rot * dj
        else:
            tt[:, j - len(rot_axes)] += eps_trans
        cols.append((render(rr, tt) - base) / (eps_rot if j < len(rot_axes) else eps_trans))
    return torch.stack(cols, 1).double()
