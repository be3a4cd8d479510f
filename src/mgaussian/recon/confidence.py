"""The confidence map: per voxel of the output grid, how well the data determine the volume.

The intensities are the solution of the weighted least-squares problem of the intensity fits
(``recon/intensity.py``): minimise sum_p w_p (y_p - (A c)_p)^2 + lambda/2 sum_(i,j) e_ij (c_i - c_j)^2,
A the render of every slice of every stack at its final pose (times the slice's intensity scale),
w the final robust weights (0 outside the masks and on excluded slices), lambda the last level's
lattice prior, e its edge weights (1, or the edge-preserving Huber weights on noisy data). Under
Gaussian noise of variance s^2 the intensities' posterior covariance is s^2 (A^T W A + lambda L)^-1.
Its Jacobi (diagonal) approximation per Gaussian i:

    var_i = s_i^2 / (d_i + lambda deg_i),   d_i = sum_p w_p A_pi^2,   deg_i = sum_j e_ij,

with s_i = sigma, the slices' noise (Immerkaer). With ``cfg.confidence_misfit`` s_i^2 = max(sigma^2,
m_i) instead, m_i the local weighted misfit: the robust residuals r_p = y_p - prediction_p of the
pixels reaching Gaussian i splatted back with the design's own weights, m_i = sum_p w_p A_pi r_p^2 /
sum_p w_p A_pi (where the model does not explain the data). Off by default: on the test phantom it
ranked the errors worse (docs/clinical.md).

The voxel map renders the Gaussians with sd_i = sqrt(var_i) as intensities, divided by the render
of ones (a weighted average of the sd of the Gaussians reaching each voxel), over the same region
as the volume. Confidence = 1 / (1 + sd / sd_ref), sd_ref = ``cfg.confidence_ref`` x the inputs'
99th percentile (the slices are divided by it, so sd_ref is ``confidence_ref`` in the model's
units); 0 outside the reconstructed region. See docs/clinical.md for what it means and its checks.
"""

from __future__ import annotations

__all__ = ["Confidence", "confidence_map", "design_diagonal", "position_sd", "probed_diagonal", "pooled_precision"]

import time
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from ..field import GaussianField
from .intensity import _designs, lattice_pairs
from .levels import edge_prior_active, edge_weights, smoothness_weight
from .output import render_volume, rendered_voxels
from .slices import predict_all
from .state import ReconState

# neighbourhood sweeps of pooled_precision: the prior pools data from ~this many lattice steps
# (on the test phantom the band of removed slices spans 3 x 3.6 mm = 9 Gaussians at 1.2 mm)
_SWEEPS = 3


@dataclass
class Confidence:
    confidence: np.ndarray  # float32 [shape] in [0, 1]; 0 outside the region
    sd: np.ndarray  # float32 [shape]: the intensity's standard deviation, in the output's units
    sd_ref: float  # the sd where the confidence is 1/2, in the output's units
    method: str  # "explicit" (the exact diagonal) or "probed" (Hutchinson)
    info: dict  # summary numbers (medians over the Gaussians)


def probed_diagonal(design, weight: torch.Tensor, n: int, probes: int = 16, seed: int = 0) -> torch.Tensor:
    """diag(A^T diag(weight) A) [n] by Hutchinson's estimator, mean over ``probes`` Rademacher
    vectors z of z * (A^T W A z): unbiased; each probe costs one ``design.normal`` (a render and
    its backward pass on the autograd design). Fixed ``seed``: the same map for the same inputs."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    acc = torch.zeros(n, dtype=weight.dtype, device=weight.device)
    for _ in range(probes):
        z = (torch.randint(0, 2, (n,), generator=gen) * 2 - 1).to(dtype=weight.dtype, device=weight.device)
        acc += z * design.normal(z, weight)
    return acc / probes


def design_diagonal(design, weight: torch.Tensor, n: int, probes: int = 16, seed: int = 0) -> tuple[torch.Tensor, str]:
    """diag(A^T diag(weight) A): exact from an explicit design (``diag_normal``), else probed."""
    if hasattr(design, "diag_normal"):
        return design.diag_normal(weight), "explicit"
    return probed_diagonal(design, weight, n, probes, seed), "probed"


def pooled_precision(d: torch.Tensor, pairs: torch.Tensor, k: torch.Tensor, sweeps: int = _SWEEPS) -> torch.Tensor:
    """Each Gaussian's precision with what the prior pools from its neighbours: P_i = d_i + sum_j
    k_ij P_j / (k_ij + P_j), ``sweeps`` times from P = d (the prior's link k_ij = lambda e_ij in
    series with the neighbour's own precision, as springs). A neighbour without data adds nothing,
    so a hole in the data keeps a large variance; P stays below the Jacobi d_i + sum_j k_ij, which
    a strong prior would make nearly uniform whatever the data."""
    p = d.clone()
    for _ in range(sweeps):
        pj, pi = p[pairs[:, 1]], p[pairs[:, 0]]
        nxt = d.clone()
        nxt.index_add_(0, pairs[:, 0], k * pj / (k + pj).clamp_min(1e-30))
        nxt.index_add_(0, pairs[:, 1], k * pi / (k + pi).clamp_min(1e-30))
        p = nxt
    return p


@torch.no_grad()
def position_sd(volume: np.ndarray, affine: np.ndarray, shift_mm: float, smooth_mm: float | None = None) -> np.ndarray:
    """The intensity's spread from where the anatomy lies being known to ``shift_mm`` only: the
    volume's gradient magnitude (per mm), averaged over a neighbourhood (Gaussian of sd
    ``smooth_mm``, default one voxel; a shift moves an edge's whole blurred profile), times the
    shift."""
    spacing = np.sqrt((np.asarray(affine, float)[:3, :3] ** 2).sum(0))
    grads = np.gradient(volume.astype(np.float32), *spacing)
    mag = np.sqrt(sum(g * g for g in grads))
    sd_vox = 1.0 if smooth_mm is None else tuple(float(smooth_mm) / spacing)
    return (ndimage.gaussian_filter(mag, sd_vox) * shift_mm).astype(np.float32)


def confidence_map(
    state: ReconState, misfit_term: bool | None = None, volume: np.ndarray | None = None, grid: tuple | None = None
) -> Confidence:
    """The confidence map of the fitted state (after ``output.result``, which sets the region).
    ``misfit_term`` (default ``cfg.confidence_misfit``): s_i^2 = max(sigma^2, m_i); else sigma^2.
    ``volume``: the output volume (``ReconResult.volume``); with it the voxels' sd gains the
    position term (``position_sd``, ``cfg.confidence_position_sd_mm``). ``grid``: (shape, affine,
    region) the map is rendered on, the volume's (``ReconResult``: the written grid); default the
    output resolution's grid and the state's region."""
    t0 = time.time()
    cfg, fld = state.cfg, state.fld
    misfit_term = cfg.confidence_misfit if misfit_term is None else misfit_term
    params = {k: v.detach() for k, v in fld.tensors().items()}
    n = fld.num_gaussians
    c = params["intensities"]
    designs = _designs(params, state.sets, state.rots, state.trans, state.cents, cfg, state.backend, None)
    preds = predict_all(params, state.sets, state.rots, state.trans, state.cents, cfg, state.backend, state.nrf)
    d = torch.zeros(n, dtype=c.dtype, device=c.device)
    mis_num = torch.zeros_like(d)
    mis_den = torch.zeros_like(d)
    methods = set()
    for si, (ss, des, pred) in enumerate(zip(state.sets, designs, preds)):
        sc = state.scs[si][:, None, None]
        w = state.wts[si].to(c.dtype)
        di, how = design_diagonal(des, w * sc * sc, n, cfg.confidence_probes, cfg.seed + si)
        d += di
        methods.add(how)
        r2 = (ss.obs - sc * pred) ** 2
        # the design holds A without the slice scale: A' = sc A, so A'^T (w r^2) and A'^T w
        mis_num += des.rmatvec(w * sc * r2)
        mis_den += des.rmatvec(w * sc)
    d = d.clamp_min(0.0)  # the probed diagonal can dip below 0 where the data barely reach
    smooth = smoothness_weight(state, fld.spacing)  # the last level's prior
    prec = d.clone()
    if smooth > 0:
        pairs = lattice_pairs(fld.grid_index, fld.grid_shape).to(c.device)
        # the last level's prior as its warm start left it: edge-preserving on noisy data
        pw = (
            edge_weights(c, pairs, cfg.edge_prior_k)
            if edge_prior_active(state, True, True) and cfg.edge_prior_rounds > 0
            else torch.ones(len(pairs), dtype=c.dtype, device=c.device)
        )
        prec = pooled_precision(d, pairs, smooth * pw.to(c.dtype))
    sigma2 = float(state.noise_sigma) ** 2
    # no weighted data reaching a Gaussian: its misfit is unknown, the noise stands in for it
    misfit = torch.where(mis_den > 1e-12, mis_num / mis_den.clamp_min(1e-12), torch.zeros_like(d))
    s2 = misfit.clamp_min(sigma2) if misfit_term else torch.full_like(d, sigma2)
    # ridge: the intensity fits' own (1e-6); a Gaussian no data nor prior reach gets a huge sd
    var = s2 / (prec + 1e-6)
    sd_g = var.sqrt()
    shape, aff, region = grid if grid is not None else (state.shape, state.aff, state.region)
    sd_fld = GaussianField(
        fld.means,
        fld.log_scales,
        fld.quats,
        sd_g.to(fld.intensities.dtype),
        fld.spacing,
        fld.grid_origin,
        fld.grid_index,
        fld.grid_shape,
    )
    one_fld = GaussianField(
        fld.means,
        fld.log_scales,
        fld.quats,
        torch.ones_like(fld.intensities),
        fld.spacing,
        fld.grid_origin,
        fld.grid_index,
        fld.grid_shape,
    )
    # over the voxels the volume is rendered on (output.render_model)
    rendered = rendered_voxels(region, cfg.output_resolution, aff)
    num = render_volume(sd_fld, None, shape, aff, rendered, backend=state.backend, cutoff=cfg.cutoff, dilate_vox=0)
    den = render_volume(one_fld, None, shape, aff, rendered, backend=state.backend, cutoff=cfg.cutoff, dilate_vox=0)
    inside = rendered & (den > 1e-3 * max(float(den.max()), 1e-12))
    sd = np.zeros(shape, np.float32)
    sd[inside] = num[inside] / den[inside]
    if volume is not None and cfg.confidence_position_sd_mm > 0:
        pos = position_sd(
            np.asarray(volume, np.float32) / float(state.scale),
            aff,
            cfg.confidence_position_sd_mm,
            smooth_mm=cfg.confidence_position_smooth_mm,
        )
        sd[inside] = np.sqrt(sd[inside] ** 2 + pos[inside] ** 2)
    ref = float(cfg.confidence_ref)
    conf = np.zeros(shape, np.float32)
    conf[inside] = 1.0 / (1.0 + sd[inside] / ref)
    scale = float(state.scale)
    info = {
        "median_data_term": float(d.median()),
        "smoothness": smooth,
        "noise_sigma": float(state.noise_sigma),
        "median_misfit_sd": float(misfit.sqrt().median()),
        "median_sd": float(sd_g.median()) * scale,
        "mean_confidence_in_region": float(conf[inside].mean()) if inside.any() else 0.0,
        "method": "+".join(sorted(methods)),
    }
    state.timings["confidence_s"] = time.time() - t0
    return Confidence(conf, sd * scale, ref * scale, info["method"], info)
