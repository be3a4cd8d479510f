"""Robustness to bad slices and pixels: per-slice intensity scales, robust pixel and slice
weights from the residuals, the loss weights that combine them, and the slices' noise level."""

from __future__ import annotations

__all__ = ["fit_slice_scales", "robust_weights", "estimate_noise", "update_robust", "loss_weights"]

import math

import numpy as np
import torch

from ..data import expand_pixels, pool_pixels
from ..slices import predict_all


@torch.no_grad()
def fit_slice_scales(
    pred: torch.Tensor, obs: torch.Tensor, w: torch.Tensor, lo: float = 0.5, hi: float = 2.0, shrink: float = 0.1
) -> torch.Tensor:
    """Least-squares intensity scale per slice [K] (obs ~ s pred), shrunk toward 1 and clipped."""
    num = (w * pred * obs).sum((1, 2))
    den = (w * pred * pred).sum((1, 2))
    ref = shrink * den.mean().clamp_min(1e-12)
    s = (num + ref) / (den + ref)
    return s.clamp(lo, hi)


@torch.no_grad()
def robust_weights(
    resid: list[torch.Tensor],
    masks: list[torch.Tensor],
    ncc: list[torch.Tensor],
    pixel_c: float = 3.0,
    slice_z: float = 3.5,
    min_ncc: float = 0.5,
    min_sigma: float = 0.0,
):
    """Pixel weights (Cauchy on residual / robust sigma) and slice weights from per-slice errors.

    resid [K,h,w] per stack (scaled prediction - observation), masks bool, ncc [K] per slice.
    The pixels' robust sigma is 1.4826 x the residuals' median |r|, at least ``min_sigma`` (on
    clean data that median is the model's own misfit: the floor keeps a blurred edge's pixels).
    A slice's error is its RMS residual; slices whose error is more than ``slice_z`` robust
    standard deviations (1.4826 MAD) above the median of all slices (and above 2.5 x the median),
    or whose NCC with the
    prediction is below ``min_ncc``, are excluded (weight 0); between 0.6 and 1 x that threshold
    the weight falls linearly from 1. Returns (pixel weights per stack, slice weights per stack,
    robust pixel sigma)."""
    allr = torch.cat([r[m] for r, m in zip(resid, masks)])
    sig = float(1.4826 * allr.abs().median()) if allr.numel() else 1.0
    sig = max(sig, min_sigma, 1e-6)
    pw = [1.0 / (1.0 + (r / (pixel_c * sig)) ** 2) for r in resid]
    rms = [torch.sqrt(((r * m) ** 2).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)) for r, m in zip(resid, masks)]
    allrms = torch.cat(rms)
    med = allrms.median()
    mad = 1.4826 * (allrms - med).abs().median().clamp_min(1e-9)
    # the threshold is also at least 2.5 x the median error: on clean data the per-slice errors are
    # tiny and spread (edge slices fit worse), and excluding those slices loses information
    thr = torch.maximum(med + slice_z * mad, 2.5 * med)
    sw = []
    for e, n in zip(rms, ncc):
        z = (e - med) / (thr - med)  # 1 at the threshold
        w = (1.0 - (z - 0.6) / 0.4).clamp(0.0, 1.0)
        w = torch.where((e >= thr) | (n < min_ncc), torch.zeros_like(w), w)
        sw.append(w)
    return pw, sw, sig


@torch.no_grad()
def estimate_noise(sets) -> float:
    """Noise standard deviation of the (normalised) slices: Immerkaer's estimator (the mean
    absolute response to the 3x3 mask [[1,-2,1],[-2,4,-2],[1,-2,1]], which cancels locally linear
    signal, x sqrt(pi/2)/6) over pixels whose whole 3x3 neighbourhood is inside the mask; the
    median over slices with enough such pixels (robust to a few bad slices)."""
    import torch.nn.functional as F

    k = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    vals = []
    for ss in sets:
        obs = ss.obs.detach().float().cpu()[:, None]
        m = ss.mask.detach().float().cpu()[:, None]
        resp = F.conv2d(obs, k[None, None]).abs()[:, 0]
        inner = F.conv2d(m, torch.ones(1, 1, 3, 3))[:, 0] >= 9 - 1e-6
        for r, i in zip(resp, inner):
            if int(i.sum()) >= 50:
                vals.append(float(r[i].mean()) * math.sqrt(math.pi / 2) / 6.0)
    return float(np.median(vals)) if vals else 0.0


def loss_weights(sets, pws, sws=None) -> list[torch.Tensor]:
    """Loss weight of each pixel of each (possibly binned) slice set: mask x pixel x slice weight
    x the pixels a binned pixel stands for. ``pws`` are per source pixel. Without ``sws`` (the
    weights a slice's own pose is fitted with) every slice counts in full: a slice excluded
    because it is far from its pose must still be moved to it, or it stays excluded for good."""
    if sws is None:
        return [ss.mask.to(pw.dtype) * pool_pixels(pw, ss.binning) * ss.pixel_weight for ss, pw in zip(sets, pws)]
    return [
        ss.mask.to(pw.dtype) * pool_pixels(pw, ss.binning) * sw[:, None, None] * ss.pixel_weight
        for ss, pw, sw in zip(sets, pws, sws)
    ]


def _slice_ncc(p: torch.Tensor, obs: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Pearson correlation [K] of each slice's prediction with its pixels inside the mask."""
    cnt = m.sum((1, 2)).clamp_min(1)
    pm = (p * m).sum((1, 2)) / cnt
    om = (obs * m).sum((1, 2)) / cnt
    pc = (p - pm[:, None, None]) * m
    oc = (obs - om[:, None, None]) * m
    return (pc * oc).sum((1, 2)) / ((pc**2).sum((1, 2)) * (oc**2).sum((1, 2))).sqrt().clamp_min(1e-12)


@torch.no_grad()
def update_robust(params, sets, rots, trans, cents, scs, sws, pws, cfg, backend: str, nrf=None, cache=None):
    """Re-estimate the per-slice intensity scales and the robust slice / pixel weights from the
    current prediction (``scs``, ``sws``, ``pws`` are updated in place); returns the new loss
    weights per stack (mask x pixel x slice weight) and the slices' NCC with the prediction.
    ``cache``: the level's design cache (:func:`..intensity.predict_with_designs`): the prediction
    through the maps the intensity re-fit after it uses (without a neural residual field)."""
    if cache is not None and nrf is None:
        from ..intensity import predict_with_designs

        preds = predict_with_designs(params, sets, rots, trans, cents, cfg, backend, cache)
    else:
        preds = predict_all(params, sets, rots, trans, cents, cfg, backend, nrf)
    resid, nccs = [], []
    for si, (ss, pred) in enumerate(zip(sets, preds)):
        m = ss.mask.to(pred.dtype)
        if cfg.slice_scale:
            pw_here = pool_pixels(pws[si], ss.binning)
            scs[si].copy_(fit_slice_scales(pred, ss.obs, m * pw_here * sws[si][:, None, None].clamp_min(1e-3)))
        p = pred * scs[si][:, None, None]
        resid.append((p - ss.obs) * m)
        nccs.append(_slice_ncc(p, ss.obs, m))
    if cfg.robust:
        masks = [ss.mask for ss in sets]
        pw, sw, _ = robust_weights(
            resid, masks, nccs, cfg.pixel_outlier_c, cfg.slice_outlier_z, cfg.slice_min_ncc, cfg.pixel_outlier_min_sigma
        )
        for si, ss in enumerate(sets):  # pixel weights are kept per source pixel (a bin's weight to each of its pixels)
            pws[si].copy_(expand_pixels(pw[si], ss.binning, tuple(pws[si].shape[1:])))
            sws[si].copy_(sw[si])
    return loss_weights(sets, pws, sws), nccs
