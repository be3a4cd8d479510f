"""``gpu`` backend: Triton tile rasteriser (3DGS-style, additive, no depth sort).

Pipeline of :func:`render_slices` (tensors stay on the inputs' device):

1. PyTorch: dense plane cull of every (slice, Gaussian) pair (d_n^2 <= cutoff^2 C_nn, chunked over
   slices), then the projection of the survivors to 2D Gaussians in the slice (centre m, conic K,
   amplitude alpha, threshold thr) with autograd: the chain rule to the Gaussian parameters and the
   slice poses is PyTorch's.
2. PyTorch: each pair's ellipse bounding box -> 16x16 pixel tiles; (slice, tile) keys sorted ->
   per-tile pair lists.
3. Triton: forward kernel, one program per tile, sums alpha exp(-q/2) over its pairs with q <= thr;
   backward kernel, one program per tile, reduces six moments of grad*exp(-q/2) per pair over the
   tile and atomically adds them to the pair's gradient, from which dL/d(alpha, m, K) follow.

Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (set before the first call; slow, for
parity tests on small sizes). ``render_points`` on this backend runs the reference ops on the
inputs' device (dense, chunked).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference as _ref
from ._common import covariance, psf_variances, weights

BLOCK_H = 16
BLOCK_W = 16
_KERNELS = None


def _kernels():
    """Build the Triton kernels on first use (so TRITON_INTERPRET set at run time is honoured)."""
    global _KERNELS
    if _KERNELS is not None:
        return _KERNELS
    import triton
    import triton.language as tl

    @triton.jit
    def fwd_kernel(
        out_ptr,
        mask_ptr,
        tstart_ptr,
        tpairs_ptr,
        pdat_ptr,
        H,
        W,
        TH,
        TW,
        du,
        dv,
        BH: tl.constexpr,
        BW: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        tid = tl.program_id(0)
        per = TH * TW
        s = tid // per
        t = tid % per
        ty = t // TW
        tx = t % TW
        rows = ty * BH + tl.arange(0, BH)
        cols = tx * BW + tl.arange(0, BW)
        pu = rows.to(tl.float32) * du
        pv = cols.to(tl.float32) * dv
        acc = tl.zeros((BH, BW), dtype=tl.float32)
        start = tl.load(tstart_ptr + tid)
        end = tl.load(tstart_ptr + tid + 1)
        for k in range(start, end):
            p = tl.load(tpairs_ptr + k).to(tl.int64)
            mu = tl.load(pdat_ptr + p * 8 + 0)
            mv = tl.load(pdat_ptr + p * 8 + 1)
            k00 = tl.load(pdat_ptr + p * 8 + 2)
            k01 = tl.load(pdat_ptr + p * 8 + 3)
            k11 = tl.load(pdat_ptr + p * 8 + 4)
            alpha = tl.load(pdat_ptr + p * 8 + 5)
            thr = tl.load(pdat_ptr + p * 8 + 6)
            x = pu[:, None] - mu
            y = pv[None, :] - mv
            q = k00 * x * x + 2.0 * k01 * x * y + k11 * y * y
            acc += tl.where(q <= thr, alpha * tl.exp(-0.5 * q), 0.0)
        inb = (rows[:, None] < H) & (cols[None, :] < W)
        offs = s.to(tl.int64) * H * W + rows[:, None] * W + cols[None, :]
        if HAS_MASK:
            m = tl.load(mask_ptr + offs, mask=inb, other=0)
            acc = tl.where(m != 0, acc, 0.0)
        tl.store(out_ptr + offs, acc, mask=inb)

    @triton.jit
    def bwd_kernel(
        grad_ptr,
        mask_ptr,
        tstart_ptr,
        tpairs_ptr,
        pdat_ptr,
        gpair_ptr,
        H,
        W,
        TH,
        TW,
        du,
        dv,
        BH: tl.constexpr,
        BW: tl.constexpr,
        HAS_MASK: tl.constexpr,
    ):
        tid = tl.program_id(0)
        per = TH * TW
        s = tid // per
        t = tid % per
        ty = t // TW
        tx = t % TW
        rows = ty * BH + tl.arange(0, BH)
        cols = tx * BW + tl.arange(0, BW)
        pu = rows.to(tl.float32) * du
        pv = cols.to(tl.float32) * dv
        inb = (rows[:, None] < H) & (cols[None, :] < W)
        offs = s.to(tl.int64) * H * W + rows[:, None] * W + cols[None, :]
        g = tl.load(grad_ptr + offs, mask=inb, other=0.0)
        if HAS_MASK:
            m = tl.load(mask_ptr + offs, mask=inb, other=0)
            g = tl.where(m != 0, g, 0.0)
        start = tl.load(tstart_ptr + tid)
        end = tl.load(tstart_ptr + tid + 1)
        for k in range(start, end):
            p = tl.load(tpairs_ptr + k).to(tl.int64)
            mu = tl.load(pdat_ptr + p * 8 + 0)
            mv = tl.load(pdat_ptr + p * 8 + 1)
            k00 = tl.load(pdat_ptr + p * 8 + 2)
            k01 = tl.load(pdat_ptr + p * 8 + 3)
            k11 = tl.load(pdat_ptr + p * 8 + 4)
            thr = tl.load(pdat_ptr + p * 8 + 6)
            x = pu[:, None] - mu
            y = pv[None, :] - mv
            q = k00 * x * x + 2.0 * k01 * x * y + k11 * y * y
            ge = tl.where(q <= thr, g * tl.exp(-0.5 * q), 0.0)
            gx = ge * x
            gy = ge * y
            tl.atomic_add(gpair_ptr + p * 6 + 0, tl.sum(tl.sum(ge, 1), 0))
            tl.atomic_add(gpair_ptr + p * 6 + 1, tl.sum(tl.sum(gx, 1), 0))
            tl.atomic_add(gpair_ptr + p * 6 + 2, tl.sum(tl.sum(gy, 1), 0))
            tl.atomic_add(gpair_ptr + p * 6 + 3, tl.sum(tl.sum(gx * x, 1), 0))
            tl.atomic_add(gpair_ptr + p * 6 + 4, tl.sum(tl.sum(gx * y, 1), 0))
            tl.atomic_add(gpair_ptr + p * 6 + 5, tl.sum(tl.sum(gy * y, 1), 0))

    _KERNELS = (fwd_kernel, bwd_kernel)
    return _KERNELS


class _Raster(torch.autograd.Function):
    """2D additive rasteriser: (m [P,2], K [P,3], alpha [P]) -> image [S,H,W] via Triton."""

    @staticmethod
    def forward(ctx, m, kc, alpha, thr, tstart, tpairs, mask, S, H, W, TH, TW, du, dv):
        fwd, _ = _kernels()
        pdat = torch.zeros(m.shape[0], 8, dtype=torch.float32, device=m.device)
        pdat[:, 0:2] = m.detach()
        pdat[:, 2:5] = kc.detach()
        pdat[:, 5] = alpha.detach()
        pdat[:, 6] = thr
        out = torch.zeros(S, H, W, dtype=torch.float32, device=m.device)
        has = mask is not None
        mk = mask if has else out
        ntile = S * TH * TW
        if ntile:
            fwd[(ntile,)](
                out, mk, tstart, tpairs, pdat, H, W, TH, TW, float(du), float(dv), BH=BLOCK_H, BW=BLOCK_W, HAS_MASK=has
            )
        ctx.save_for_backward(pdat, tstart, tpairs)
        ctx.mask = mask
        ctx.meta = (S, H, W, TH, TW, du, dv)
        return out.to(m.dtype)

    @staticmethod
    def backward(ctx, grad):
        _, bwd = _kernels()
        pdat, tstart, tpairs = ctx.saved_tensors
        S, H, W, TH, TW, du, dv = ctx.meta
        g = grad.to(torch.float32).contiguous()
        gp = torch.zeros(pdat.shape[0], 6, dtype=torch.float32, device=g.device)
        has = ctx.mask is not None
        mk = ctx.mask if has else g
        ntile = S * TH * TW
        if ntile and pdat.shape[0]:
            bwd[(ntile,)](
                g,
                mk,
                tstart,
                tpairs,
                pdat,
                gp,
                H,
                W,
                TH,
                TW,
                float(du),
                float(dv),
                BH=BLOCK_H,
                BW=BLOCK_W,
                HAS_MASK=has,
            )
        gp = gp.double()
        pd = pdat.double()
        k00, k01, k11, alpha = pd[:, 2], pd[:, 3], pd[:, 4], pd[:, 5]
        s0, sx, sy, sxx, sxy, syy = gp.unbind(1)
        g_alpha = s0
        g_m = torch.stack([alpha * (k00 * sx + k01 * sy), alpha * (k01 * sx + k11 * sy)], 1)
        g_k = torch.stack([-0.5 * alpha * sxx, -alpha * sxy, -0.5 * alpha * syy], 1)
        dt = grad.dtype
        return (
            g_m.to(dt),
            g_k.to(dt),
            g_alpha.to(dt),
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )


def _pairs(means, sig, origins, axes, psf2, cut2):
    """Dense plane cull, chunked over slices. Returns (slice index [P], Gaussian index [P])."""
    n = means.shape[0]
    ns = origins.shape[0]
    step = max(1, (1 << 25) // max(n, 1))
    out_s = [torch.zeros(0, dtype=torch.long, device=means.device)]
    out_g = [torch.zeros(0, dtype=torch.long, device=means.device)]
    with torch.no_grad():
        for a in range(0, ns, step):
            nrm = axes[a : a + step, 2]  # [s,3]
            dn = ((means[None] - origins[a : a + step, None]) * nrm[:, None]).sum(-1)  # [s,N]
            cnn = torch.einsum("si,nij,sj->sn", nrm, sig, nrm) + psf2[a : a + step, 2:3]
            keep = (dn * dn <= cut2 * cnn) & (cnn > 0)
            si, gi = keep.nonzero(as_tuple=True)
            out_s.append(si + a)
            out_g.append(gi)
    return torch.cat(out_s), torch.cat(out_g)


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
    """Triton render of slices [S,H,W]; see :func:`mgaussian.render.render_slices`."""
    from ._common import spans_to_mask

    h, w = shape
    du, dv = float(spacing[0]), float(spacing[1])
    dev = means.device
    ns = origins.shape[0]
    cut2 = float(cutoff) ** 2
    sig = covariance(log_scales, quats)
    wts = weights(log_scales, intensities)
    psf2 = psf_variances(psf_sigma, ns, means.dtype, dev)
    si, gi = _pairs(means, sig, origins, axes, psf2, cut2)
    # projection with autograd (slice frame)
    a_p = axes[si]  # [P,3,3]
    d = torch.einsum("pij,pj->pi", a_p, means[gi] - origins[si])
    c = a_p @ sig[gi] @ a_p.transpose(1, 2) + torch.diag_embed(psf2[si])
    c02, c12, c22 = c[:, 0, 2], c[:, 1, 2], c[:, 2, 2]
    ia, ib = c02 / c22, c12 / c22
    ca = c[:, 0, 0] - c02 * ia
    cb = c[:, 0, 1] - c02 * ib
    cc = c[:, 1, 1] - c12 * ib
    det = ca * cc - cb * cb
    z2 = d[:, 2] ** 2 / c22
    m = torch.stack([d[:, 0] - ia * d[:, 2], d[:, 1] - ib * d[:, 2]], 1)
    kc = torch.stack([cc / det, -cb / det, ca / det], 1)
    alpha = wts[gi] * torch.exp(-0.5 * z2) / torch.sqrt(det * c22)
    with torch.no_grad():
        thr = (cut2 - z2).clamp_min(0.0)
        xh = torch.sqrt(thr * ca)
        yh = torch.sqrt(thr * cc)
        r0 = torch.ceil((m[:, 0] - xh) / du).clamp(0, h - 1)
        r1 = torch.floor((m[:, 0] + xh) / du).clamp(-1, h - 1)
        c0 = torch.ceil((m[:, 1] - yh) / dv).clamp(0, w - 1)
        c1 = torch.floor((m[:, 1] + yh) / dv).clamp(-1, w - 1)
        th, tw = -(-h // BLOCK_H), -(-w // BLOCK_W)
        t_r0 = (r0 // BLOCK_H).long()
        t_r1 = (r1 // BLOCK_H).long()
        t_c0 = (c0 // BLOCK_W).long()
        t_c1 = (c1 // BLOCK_W).long()
        nr = (t_r1 - t_r0 + 1).clamp_min(0)
        nc = (t_c1 - t_c0 + 1).clamp_min(0)
        valid = (r1 >= r0) & (c1 >= c0)
        cnt = torch.where(valid, nr * nc, torch.zeros_like(nr))
        pid = torch.repeat_interleave(torch.arange(cnt.numel(), device=dev), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(pid.numel(), device=dev) - first[pid]
        ncol = nc[pid].clamp_min(1)
        ty = t_r0[pid] + local // ncol
        tx = t_c0[pid] + local % ncol
        key = (si[pid].long() * th + ty) * tw + tx
        key, perm = torch.sort(key, stable=True)
        tpairs = pid[perm].to(torch.int32).contiguous()
        ntile = ns * th * tw
        counts = torch.bincount(key, minlength=ntile)
        tstart = torch.zeros(ntile + 1, dtype=torch.int32, device=dev)
        tstart[1:] = torch.cumsum(counts, 0).to(torch.int32)
        mask = None
        if row_spans is not None:
            mask = torch.from_numpy(spans_to_mask(row_spans, ns, shape)).to(dev, torch.uint8)
    return _Raster.apply(m, kc, alpha, thr.float(), tstart, tpairs, mask, ns, h, w, th, tw, du, dv)


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
    """Points on the gpu backend: the reference ops on the inputs' device (dense, chunked)."""
    return _ref.render_points(means, log_scales, quats, intensities, points, psf_cov, block_radius, cell_size)
