"""``reference`` backend: plain PyTorch, chunked, autograd. The definition of correct.

Slow (dense pixel x candidate products per slice) but simple enough to read against the formulas in
:mod:`mgaussian.render._common`. Works on any device and dtype; use float64 for gradcheck.
Memory: blocks of ``_CHUNK`` pixel-Gaussian terms, checkpointed under autograd. On glibc, the many
equal-sized temporaries can still raise the peak RSS to a few GB on large inputs (malloc's dynamic
mmap threshold; ``MALLOC_MMAP_THRESHOLD_=65536`` keeps it at ~0.5 GB for the sb25 case).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._common import covariance, psf_variances, spans_to_mask, weights

_CHUNK = 1 << 20  # elements (pixels x Gaussians) per dense block


def _slice_terms(means, sig, wts, origin, a_mat, psf2_s, cut2):
    """One slice's Gaussians that its plane can see: their slice-frame offsets [n,3], inverse
    covariances (PSF added) [n,3,3] and amplitudes [n]."""
    d = (means - origin) @ a_mat.T  # [N,3] slice-frame offsets
    cmat = a_mat @ sig @ a_mat.T + torch.diag(psf2_s)  # [N,3,3]
    with torch.no_grad():  # plane cull: r^T C^-1 r >= d_n^2 / C_nn for every pixel
        keep = (d[:, 2] ** 2 <= cut2 * cmat[:, 2, 2]).nonzero().squeeze(1)
    ck = cmat[keep]
    return d[keep], torch.linalg.inv(ck), wts[keep] / torch.sqrt(torch.linalg.det(ck))


def _slice_block(r_pix, dk, cinv, amp, cut2):
    """Sum over Gaussians of one block of pixels [p,3] (slice frame)."""
    r = r_pix[:, None, :] - dk[None]  # [p,n,3]
    m2 = (torch.einsum("pni,nij->pnj", r, cinv) * r).sum(-1)
    return (amp * torch.exp(-0.5 * m2) * (m2 <= cut2)).sum(1)


def _run(fn, *args):
    """Evaluate a block; under autograd, checkpointed so memory stays bounded by one block."""
    if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def render_slices(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    intensities: Tensor,
    origins: Tensor,
    axes: Tensor,
    shape: tuple[int, int],
    spacing: tuple[float, float],
    psf_sigma=None,
    cutoff: float = 3.0,
    row_spans=None,
) -> Tensor:
    """Render slices [S,H,W]; see :func:`mgaussian.render.render_slices`.

    ``row_spans``: None or numpy int32 [S,H,2]; pixels outside the spans are 0.
    """
    h, w = shape
    du, dv = float(spacing[0]), float(spacing[1])
    n_slices = origins.shape[0]
    dtype, dev = means.dtype, means.device
    sig = covariance(log_scales, quats)  # [N,3,3]
    wts = weights(log_scales, intensities)  # [N]
    psf2 = psf_variances(psf_sigma, n_slices, dtype, dev)
    cut2 = float(cutoff) ** 2
    sel = torch.from_numpy(spans_to_mask(row_spans, n_slices, shape)).to(dev)
    aa, bb = torch.meshgrid(
        torch.arange(h, device=dev, dtype=dtype) * du, torch.arange(w, device=dev, dtype=dtype) * dv, indexing="ij"
    )
    grid = torch.stack([aa, bb, torch.zeros_like(aa)], -1).reshape(-1, 3)  # [H*W,3]
    images = []
    for s in range(n_slices):
        dk, cinv, amp = _slice_terms(means, sig, wts, origins[s], axes[s], psf2[s], cut2)
        pix = sel[s].reshape(-1).nonzero().squeeze(1)
        img = torch.zeros(h * w, dtype=dtype, device=dev)
        if dk.shape[0] == 0 or pix.numel() == 0:
            images.append(img)
            continue
        step = max(1, _CHUNK // dk.shape[0])
        vals = []
        for i in range(0, pix.numel(), step):
            vals.append(_run(_slice_block, grid[pix[i : i + step]], dk, cinv, amp, cut2))
        img = img.index_put((pix,), torch.cat(vals))
        images.append(img)
    if not images:
        return means.new_zeros(0, h, w) + 0 * intensities.sum()
    return torch.stack(images).reshape(n_slices, h, w)


def _pose_channel_block(r_pix, dk, cinv, amp, cut2):
    """:func:`render_pose_channels`' seven sums over Gaussians for one block of pixels [p,3]."""
    r = r_pix[:, None, :] - dk[None]  # [p,n,3]
    q = torch.einsum("nij,pnj->pni", cinv, r)
    v = amp * torch.exp(-0.5 * (q * r).sum(-1)) * ((q * r).sum(-1) <= cut2)  # [p,n]
    h = 0.5 * v
    chans = [
        v,
        -v * q[..., 0],
        -v * q[..., 1],
        -v * q[..., 2],
        h * (q[..., 0] * q[..., 1] - cinv[None, :, 0, 1]),
        h * (q[..., 0] * q[..., 2] - cinv[None, :, 0, 2]),
        h * (q[..., 1] * q[..., 2] - cinv[None, :, 1, 2]),
    ]
    return torch.stack([c.sum(1) for c in chans], 1)  # [p,7]


@torch.no_grad()
def render_pose_channels(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    intensities: Tensor,
    origins: Tensor,
    axes: Tensor,
    shape: tuple[int, int],
    spacing: tuple[float, float],
    psf_sigma=None,
    cutoff: float = 3.0,
    row_spans=None,
) -> Tensor:
    """Pose channels [S,7,H,W] (float64); see :func:`mgaussian.render.render_pose_channels`. The
    twin of the cpu backend's kernel, with :func:`render_slices`' formulas."""
    f64 = torch.float64
    means, origins, axes = means.to(f64), origins.to(f64), axes.to(f64)
    h, w = shape
    du, dv = float(spacing[0]), float(spacing[1])
    n_slices = origins.shape[0]
    dev = means.device
    sig = covariance(log_scales.to(f64), quats.to(f64))
    wts = weights(log_scales.to(f64), intensities.to(f64))
    psf2 = psf_variances(psf_sigma, n_slices, f64, dev)
    cut2 = float(cutoff) ** 2
    sel = torch.from_numpy(spans_to_mask(row_spans, n_slices, shape)).to(dev)
    aa, bb = torch.meshgrid(
        torch.arange(h, device=dev, dtype=f64) * du, torch.arange(w, device=dev, dtype=f64) * dv, indexing="ij"
    )
    grid = torch.stack([aa, bb, torch.zeros_like(aa)], -1).reshape(-1, 3)
    out = torch.zeros(n_slices, h * w, 7, dtype=f64, device=dev)
    for s in range(n_slices):
        dk, cinv, amp = _slice_terms(means, sig, wts, origins[s], axes[s], psf2[s], cut2)
        pix = sel[s].reshape(-1).nonzero().squeeze(1)
        if dk.shape[0] == 0 or pix.numel() == 0:
            continue
        step = max(1, _CHUNK // dk.shape[0])
        for i in range(0, pix.numel(), step):
            out[s, pix[i : i + step]] = _pose_channel_block(grid[pix[i : i + step]], dk, cinv, amp, cut2)
    return out.reshape(n_slices, h, w, 7).permute(0, 3, 1, 2)


def cell_coords(x: Tensor, cell_size: float) -> Tensor:
    """Integer cell of each point [..,3] in the uniform grid of ``cell_size`` mm anchored at 0."""
    return torch.floor(x.detach().double() / cell_size).long()


def render_points(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    intensities: Tensor,
    points: Tensor,
    psf_cov: Tensor | None = None,
    block_radius: int | None = 5,
    cell_size: float = 1.0,
) -> Tensor:
    """f(p) at points [P] with block partitioning; see :func:`mgaussian.render.render_points`.

    Gaussian i is summed at point p iff ``max_k |cell(p)_k - cell(mu_i)_k| <= block_radius``
    (``block_radius=None``: all Gaussians, the brute force).
    """
    dtype = means.dtype
    sig = covariance(log_scales, quats)
    wts = weights(log_scales, intensities)
    n = means.shape[0]
    cg = cell_coords(means, cell_size) if block_radius is not None else None
    shared = psf_cov is None or psf_cov.ndim == 2
    if shared:
        m = sig if psf_cov is None else sig + psf_cov.to(dtype)
        minv_all = torch.linalg.inv(m)
        amp_all = wts / torch.sqrt(torch.linalg.det(m))
    out = []
    per = 1 if shared else 9
    step = max(1, _CHUNK // (max(n, 1) * per))

    def block(p, pc, near):
        r = p[:, None, :] - means[None]  # [p,N,3]
        if shared:
            m2 = torch.einsum("pni,nij,pnj->pn", r, minv_all, r)
            amp = amp_all[None]
        else:
            m = sig[None] + pc[:, None].to(dtype)
            m2 = torch.einsum("pni,pnij,pnj->pn", r, torch.linalg.inv(m), r)
            amp = wts[None] / torch.sqrt(torch.linalg.det(m))
        term = amp * torch.exp(-0.5 * m2)
        if near is not None:
            term = term * near
        return term.sum(1)

    for i in range(0, points.shape[0], step):
        p = points[i : i + step]
        near = None
        if cg is not None:
            cp = cell_coords(p, cell_size)
            near = (cp[:, None, :] - cg[None]).abs().amax(-1) <= block_radius
        pc = None if shared else psf_cov[i : i + step]
        out.append(block(p, pc, near))
    if not out:
        return points.new_zeros(0)
    return torch.cat(out)
