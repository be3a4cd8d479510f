"""Quality metrics exactly as BENCHMARK.md defines them.

A reconstruction is scored against a ground truth G inside G's mask M:

1. resample the reconstruction into G's grid through both affines (trilinear, 0 outside);
2. inside M, match intensities by a least-squares gain and offset x <- a x + b;
3. range = max(G[M]) - min(G[M]);
   PSNR = 10 log10(range^2 / mean((x - G)^2)) over M;
   SSIM: 3D, Gaussian window sigma 1.5 (truncate 3.5), K1 0.01, K2 0.03, data range = range,
   population covariances, over the bounding box of M with voxels outside M set to 0 in both,
   mean over the box cropped by the window radius (as skimage's structural_similarity with
   ``gaussian_weights=True, use_sample_covariance=False``);
   NCC: Pearson correlation over M; NRMSE: RMSE over M / range.

Segmentation (``--labels``): the ground-truth labels define, per label l > 0, the mean and
standard deviation of G's intensity within l. Both G and the matched reconstruction are then
segmented the same way: every voxel of M that carries a label is given the label of maximum
Gaussian likelihood N(value; mean_l, std_l). Dice is computed per label between the two
segmentations (so a perfect reconstruction scores 1.0 whatever the intensity overlap of classes).
"""

from __future__ import annotations

__all__ = ["gain_offset_match", "psnr", "ssim", "ncc", "nrmse", "score_volume", "segment_by_labels", "dice_scores"]

import numpy as np
from scipy import ndimage

from .sampling import resample_volume


def gain_offset_match(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Least-squares a, b minimising ||a x + b - g||^2; returns a x + b."""
    x = x.astype(np.float64)
    g = g.astype(np.float64)
    xm, gm = x.mean(), g.mean()
    vx = ((x - xm) ** 2).sum()
    a = ((x - xm) * (g - gm)).sum() / vx if vx > 0 else 0.0
    return a * (x - xm) + gm


def psnr(x: np.ndarray, g: np.ndarray, data_range: float) -> float:
    mse = float(np.mean((x.astype(np.float64) - g) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


def ncc(x: np.ndarray, g: np.ndarray) -> float:
    x = x.astype(np.float64) - x.mean()
    g = g.astype(np.float64) - g.mean()
    d = np.sqrt((x * x).sum() * (g * g).sum())
    return float((x * g).sum() / d) if d > 0 else 0.0


def nrmse(x: np.ndarray, g: np.ndarray, data_range: float) -> float:
    return float(np.sqrt(np.mean((x.astype(np.float64) - g) ** 2)) / data_range)


def ssim(x: np.ndarray, g: np.ndarray, data_range: float, sigma: float = 1.5, truncate: float = 3.5) -> float:
    """Mean SSIM of two N-d arrays, Gaussian window, population covariances (skimage's recipe)."""
    X = x.astype(np.float64)
    Y = g.astype(np.float64)
    filt = lambda a: ndimage.gaussian_filter(a, sigma=sigma, truncate=truncate)  # noqa: E731
    ux, uy = filt(X), filt(Y)
    uxx, uyy, uxy = filt(X * X), filt(Y * Y), filt(X * Y)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    C1 = (0.01 * data_range) ** 2
    C2 = (0.03 * data_range) ** 2
    S = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    win = 2 * int(truncate * sigma + 0.5) + 1
    pad = (win - 1) // 2
    sl = tuple(slice(pad, s - pad) for s in S.shape)
    return float(S[sl].mean())


def segment_by_labels(img: np.ndarray, ref: np.ndarray, labels: np.ndarray, region: np.ndarray):
    """Maximum-likelihood segmentation of ``img`` with class models fitted on ``ref`` and ``labels``."""
    ids = [int(l) for l in np.unique(labels[region]) if l > 0]
    vals = img[region].astype(np.float64)
    ll = np.empty((len(ids), vals.size))
    for c, l in enumerate(ids):
        r = ref[region & (labels == l)].astype(np.float64)
        mu, sd = r.mean(), max(r.std(), 1e-6 * (abs(r.mean()) + 1))
        ll[c] = -0.5 * ((vals - mu) / sd) ** 2 - np.log(sd)
    seg = np.zeros(img.shape, dtype=np.int32)
    seg[region] = np.asarray(ids)[np.argmax(ll, axis=0)]
    return seg, ids


def dice_scores(seg_a: np.ndarray, seg_b: np.ndarray, ids) -> dict:
    out = {}
    for l in ids:
        a, b = seg_a == l, seg_b == l
        den = a.sum() + b.sum()
        out[str(l)] = float(2 * (a & b).sum() / den) if den else 1.0
    return out


def score_volume(recon, recon_affine, gt, gt_affine, mask, labels=None) -> dict:
    """All metrics of a reconstruction against a ground truth (BENCHMARK.md definitions)."""
    x = resample_volume(recon, recon_affine, gt.shape, gt_affine, order=1).astype(np.float64)
    M = mask.astype(bool)
    G = gt.astype(np.float64)
    xm = gain_offset_match(x[M], G[M])
    rng = float(G[M].max() - G[M].min())
    res = {
        "psnr": psnr(xm, G[M], rng),
        "ncc": ncc(xm, G[M]),
        "nrmse": nrmse(xm, G[M], rng),
    }
    idx = np.argwhere(M)
    lo, hi = idx.min(0), idx.max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    Xb = np.zeros(M.shape)
    Xb[M] = xm
    Xb, Gb = Xb[box], np.where(M, G, 0.0)[box]
    res["ssim"] = ssim(Xb, Gb, rng)
    res = {k: res[k] for k in ("psnr", "ssim", "ncc", "nrmse")}
    if labels is not None:
        region = M & (labels > 0)
        Xf = np.zeros(M.shape)
        Xf[M] = xm
        seg_x, ids = segment_by_labels(Xf, G, labels, region)
        seg_g, _ = segment_by_labels(G, G, labels, region)
        res["dice"] = dice_scores(seg_x, seg_g, ids)
    return res
