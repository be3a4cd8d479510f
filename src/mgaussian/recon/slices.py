"""Rendering slices through the model: each slice's moved frame, its point-spread function, and the
prediction of its pixels by the Gaussians (and the neural residual field).

Every stage that compares the model with the data goes through these functions, so the slice
physics (the PSF integrated analytically, the slice's rigid pose) lives in one place.
Shapes: a stack's slice set holds ``K`` slices of ``h x w`` pixels; ``sel`` picks ``b`` of them.
"""

from __future__ import annotations

__all__ = [
    "GH_NODES",
    "GH_WEIGHTS",
    "slice_frames",
    "stack_psf",
    "stack_design",
    "render_stack_slices",
    "slice_pose_jacobian",
    "pixel_points",
    "nrf_slices",
    "predict_all",
]

import math

import torch

from ..geometry import apply_pose_to_frames, rotvec_left_jacobian
from ..psf import FWHM_TO_SIGMA
from ..render import (
    AutogradDesign,
    render_points,
    render_pose_channels,
    render_slices,
    shared_gaussians,
    slice_design,
    slice_psf_sigma,
)
from .config import ReconConfig
from .data import SliceSet
from .nrf import NeuralResidualField

# Gauss-Hermite nodes for the through-plane PSF of the NRF (exact for polynomials up to degree 5)
GH_NODES = (-math.sqrt(3.0), 0.0, math.sqrt(3.0))
GH_WEIGHTS = (1.0 / 6.0, 2.0 / 3.0, 1.0 / 6.0)


def slice_frames(ss: SliceSet, sel: torch.Tensor, rot: torch.Tensor, trans: torch.Tensor, cents: torch.Tensor):
    """Frames (origins [b,3], axes [b,3,3]) of the selected slices moved by their poses (about
    the slices' own centres ``cents`` [K,3], see :mod:`.motion`)."""
    return apply_pose_to_frames(ss.origins[sel], ss.axes[sel], rot[sel], trans[sel], cents[sel])


def stack_psf(ss: SliceSet, cfg: ReconConfig):
    """The PSF sigmas (u, v, n) of a stack's slices (None: the seed's point evaluation)."""
    if not cfg.use_psf:
        return None
    psf = slice_psf_sigma(ss.spacing, ss.thickness * cfg.through_plane_fwhm_factor, cfg.inplane_fwhm_factor)
    if psf is not None and ss.inplane_sigma is not None:
        psf = (*ss.inplane_sigma, psf[2])
    return psf


def stack_design(
    fld: dict, ss: SliceSet, o: torch.Tensor, ax: torch.Tensor, cfg: ReconConfig, backend: str, max_bytes: float | None
):
    """The render of all of a stack's slices (frames ``o``, ``ax``) as a linear map of the
    intensities (render.slice_design: explicit on the cpu backend within ``max_bytes``)."""
    if cfg.renderer == "points":
        sel = torch.arange(ss.n, device=o.device)
        others = {k: v.detach() for k, v in fld.items() if k != "intensities"}
        return AutogradDesign(
            lambda c: render_stack_slices(dict(others, intensities=c), ss, sel, o, ax, cfg, backend),
            fld["intensities"].shape[0],
        )
    h, w = ss.obs.shape[1:]
    return slice_design(
        fld["means"].detach(),
        fld["log_scales"].detach(),
        fld["quats"].detach(),
        o,
        ax,
        (h, w),
        ss.spacing,
        stack_psf(ss, cfg),
        backend=backend,
        cutoff=cfg.cutoff,
        row_spans=ss.row_spans,
        max_bytes=max_bytes,
    )


def render_stack_slices(
    fld: dict, ss: SliceSet, sel: torch.Tensor, o: torch.Tensor, ax: torch.Tensor, cfg: ReconConfig, backend: str
) -> torch.Tensor:
    """The Gaussians' prediction [b,h,w] of the selected slices at frames ``o``, ``ax``."""
    h, w = ss.obs.shape[1:]
    psf = stack_psf(ss, cfg)
    if cfg.renderer == "points":
        return _render_points_path(fld, ss, sel, o, ax, psf, cfg, backend)
    spans = ss.row_spans[sel] if ss.row_spans is not None else None
    return render_slices(
        fld["means"],
        fld["log_scales"],
        fld["quats"],
        fld["intensities"],
        o,
        ax,
        (h, w),
        ss.spacing,
        psf,
        backend=backend,
        cutoff=cfg.cutoff,
        row_spans=spans,
    )


def slice_pose_jacobian(
    fld: dict,
    ss: SliceSet,
    sel: torch.Tensor,
    rot: torch.Tensor,
    trans: torch.Tensor,
    cents: torch.Tensor,
    rot_dirs: torch.Tensor,
    cfg: ReconConfig,
    backend: str,
) -> torch.Tensor | None:
    """The Jacobian [b, nr + 3, h, w] (float64) of the Gaussians' prediction of the selected slices
    with respect to their poses (``rot``, ``trans`` [K,3] about ``cents``, see :func:`slice_frames`):
    columns j < nr add ``rot_dirs[:, j]`` ([b, nr, 3], world) to the rotation vector, the last three
    move the slice along world x, y, z. Analytic, from one pass of
    :func:`mgaussian.render.render_pose_channels` (the field's gradient at each pixel and its
    derivative along the turning PSF); None where that has no kernel (the gpu backend, the points
    renderer): take differences of renders there.

    A slice turned by omega (world) about its moved centre c' = c + t sees, at its pixel x, the field
    at c' + exp(omega) (x - c') through its PSF turned by the same: d value / d omega =
    (x - c') x grad + sum_{i<j} 2 H_ij (P_j - P_i) (a_j x a_i), with grad the field's world gradient,
    H the value's gradient with respect to the slice-frame covariance, P the PSF's variances and a_i
    the slice's axes; adding d to the rotation vector turns it by omega = J_l(rot) d."""
    if cfg.renderer == "points":
        return None
    h, w = ss.obs.shape[1:]
    o, ax = slice_frames(ss, sel, rot, trans, cents)
    psf = stack_psf(ss, cfg)
    spans = ss.row_spans[sel] if ss.row_spans is not None else None
    ch = render_pose_channels(
        fld["means"], fld["log_scales"], fld["quats"], fld["intensities"], o, ax, (h, w), ss.spacing, psf,
        backend=backend, cutoff=cfg.cutoff, row_spans=spans,
    )  # fmt: skip
    if ch is None:
        return None
    f64 = torch.float64
    ax = ax.to(f64)
    grad = torch.einsum("bchw,bck->bhwk", ch[:, 1:4], ax)  # the field's world gradient at each pixel
    arm = pixel_points(ss, sel, o.to(f64), ax) - (cents[sel] + trans[sel]).to(f64)[:, None, None, :]
    omega = torch.linalg.cross(arm, grad, dim=-1)
    if psf is not None:  # the PSF turning with the slice
        p2 = [float(p) ** 2 for p in psf]
        for i, j, c in ((0, 1, 4), (0, 2, 5), (1, 2, 6)):
            if p2[j] != p2[i]:
                turn = torch.linalg.cross(ax[:, j], ax[:, i], dim=-1)  # [b,3]
                omega += 2.0 * (p2[j] - p2[i]) * ch[:, c, :, :, None] * turn[:, None, None, :]
    turns = torch.einsum("bij,bkj->bki", rotvec_left_jacobian(rot[sel].to(f64)), rot_dirs.to(f64))
    j_rot = torch.einsum("bhwi,bki->bkhw", omega, turns)
    return torch.cat([j_rot, grad.permute(0, 3, 1, 2)], 1)


def pixel_points(ss: SliceSet, sel: torch.Tensor, o: torch.Tensor, ax: torch.Tensor) -> torch.Tensor:
    """World positions [b,h,w,3] of the pixels of the selected (moved) slices."""
    h, w = ss.obs.shape[1:]
    du, dv = ss.spacing
    a = torch.arange(h, dtype=o.dtype, device=o.device) * du
    b = torch.arange(w, dtype=o.dtype, device=o.device) * dv
    return (
        o[:, None, None, :]
        + a[None, :, None, None] * ax[:, None, None, 0]
        + b[None, None, :, None] * ax[:, None, None, 1]
    )


def _render_points_path(fld, ss, sel, o, ax, psf, cfg, backend):
    """The seed's path: evaluate the field at the masked pixels with the block partitioning."""
    pts = pixel_points(ss, sel, o, ax)
    m = ss.mask[sel]
    out = torch.zeros(m.shape, dtype=o.dtype, device=o.device)
    if psf is None:
        cov = None
    else:
        s2 = torch.as_tensor(psf, dtype=o.dtype, device=o.device) ** 2
        covs = ax.transpose(-1, -2) @ torch.diag_embed(s2.expand(ax.shape[0], 3)) @ ax  # [b,3,3]
        cov = covs[:, None, None].expand(*m.shape, 3, 3)[m]
    vals = render_points(
        fld["means"],
        fld["log_scales"],
        fld["quats"],
        fld["intensities"],
        pts[m],
        cov,
        block_radius=cfg.block_radius,
        backend=backend,
    )
    return out.index_put(m.nonzero(as_tuple=True), vals)


def nrf_slices(
    nrf: NeuralResidualField, ss: SliceSet, sel: torch.Tensor, o: torch.Tensor, ax: torch.Tensor, cfg: ReconConfig
) -> torch.Tensor:
    """The neural residual field's prediction [b,h,w] of the selected slices (through-plane PSF by
    three Gauss-Hermite nodes)."""
    pts = pixel_points(ss, sel, o, ax)
    m = ss.mask[sel]
    p = pts[m]
    out = torch.zeros(m.shape, dtype=p.dtype, device=p.device)
    if cfg.use_psf:
        sn = ss.thickness * cfg.through_plane_fwhm_factor * FWHM_TO_SIGMA
        n = ax[:, None, None, 2].expand(*m.shape, 3)[m]
        val = sum(wt * nrf(p + (z * sn) * n) for z, wt in zip(GH_NODES, GH_WEIGHTS))
    else:
        val = nrf(p)
    return out.index_put(m.nonzero(as_tuple=True), val)


@torch.no_grad()
def predict_all(
    params: dict,
    sets: list[SliceSet],
    rots,
    trans,
    cents,
    cfg: ReconConfig,
    backend: str,
    nrf: NeuralResidualField | None = None,
) -> list[torch.Tensor]:
    """The model's prediction of every slice of every stack at its pose: [K,h,w] per stack."""
    out = []
    fld = {k: v.detach() for k, v in params.items()}
    with shared_gaussians():  # every stack's render of the same Gaussians
        for si, ss in enumerate(sets):
            sel = torch.arange(ss.n, device=ss.obs.device)
            o, ax = slice_frames(ss, sel, rots[si], trans[si], cents[si])
            pred = render_stack_slices(fld, ss, sel, o, ax, cfg, backend)
            if nrf is not None:
                pred = pred + nrf_slices(nrf, ss, sel, o, ax, cfg)
            out.append(pred)
    return out
