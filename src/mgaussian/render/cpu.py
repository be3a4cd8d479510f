"""``cpu`` backend: Numba kernels with hand-written forward and backward over all cores.

Pipeline of one :func:`render_slices` call (all O(N + pairs + cells x slices), no sorting),
entirely in Numba (:mod:`._cpu_kernels`), float64 inside whatever the input dtype:
``gauss_prep`` (Sigma as 6 numbers and w = c sqrt(det Sigma) per Gaussian) -> ``build_cells`` ->
``cell_slice_lists`` -> ``count_pairs``/``fill_pairs`` (cull + projection) -> ``slice_index`` ->
``raster_forward``. The backward runs ``raster_backward`` (per Gaussian, race-free; per-slice pose
gradients in per-chunk buffers) and ``gauss_prep_backward`` (to log-scales, quaternions,
intensities). One autograd node per call; PyTorch only converts arrays.

Per-call cost at fixed size: ~1 ms forward + ~1 ms backward for 2k Gaussians and one 64x64 slice;
O(N) parts (~25 ms forward + ~35 ms backward for 220k Gaussians, one slice) dominate small calls, so
batch many slices per call. Memory held for the backward: ~150 bytes per Gaussian plus ~90 bytes per
projected (Gaussian, slice) pair (~0.3 GB for the three sb25 stacks at 0.8 mm).
First use compiles the kernels (~12 s, cached on disk by Numba's ``cache=True``; ~0.5 s afterwards;
``mgaussian/precompile.py`` compiles them ahead in a second process for a run).
Threads: the kernels are serial and ``nogil``; :func:`._threads.parallel_range` runs them over
contiguous blocks on ``numba.get_num_threads()`` threads (all cores by default, see :func:`set_threads`).
"""

from __future__ import annotations

import threading
import weakref
from contextlib import contextmanager

import numba
import numpy as np
import torch
from torch import Tensor

from . import _cpu_kernels as K

# Work split into a fixed number of chunks, not one per thread: the chunks' partial sums are added
# in chunk order, so the result is the same bit for bit whatever the thread count and the load
# (issue 17). Enough chunks to keep 16 threads busy on the backward pass; the design's chunks each
# hold a vector over all Gaussians (mni-t4 at 1 mm: 15 MB), so fewer of them.
_RASTER_CHUNKS = 64
_DESIGN_CHUNKS = 8
# The designs' [C, N] chunk sums, one buffer per N shared by the designs that hold it (freed with
# the last of them): a fresh buffer pays its page faults on every product (mni-t4 at 1 mm, 131 MB:
# 0.11 s a product, three products an intensity-fit iteration of 1.7 s) where zeroing a kept one
# takes 0.016 s (benchmarks/SPEED.md, session 14).
_SHARED_CHUNK_SUMS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def set_threads(n: int | None = None) -> int:
    """Use n threads (default: all cores) for the Numba kernels. Returns the number set."""
    n = n or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n)
    return n


class SlicePlan:
    """Culled, projected (Gaussian, slice) pairs of one call; kept for the backward pass.

    Attributes: ``n_pairs`` (int), ``p_sl`` [P'] slice of each pair, ``p_dat`` [P',7]
    (m_u, m_v, K00, K01, K11, alpha, thr), ``p_rows`` [P',2] first/last row; sorted Gaussian t owns
    pairs goff[t] .. goff[t] + gcnt[t] (``goff`` [N+1] from an upper bound, P' >= P);
    ``order`` [N] sorted -> original Gaussian index; ``s_off``/``s_idx``: valid pairs by slice.
    """


def _row_bands(h: int, ns: int) -> int:
    """Row bands per slice for the raster kernels: about four blocks of work per thread."""
    return max(1, min(h, -(-4 * numba.get_num_threads() // max(ns, 1))))


def _extents(spans, n_slices, h, w, du, dv):
    ext = np.empty((n_slices, 8))
    if spans is None:
        rlo = np.zeros(n_slices)
        rhi = np.full(n_slices, h - 1.0)
        clo = np.zeros(n_slices)
        chi = np.full(n_slices, w - 1.0)
    else:
        nonempty = spans[..., 1] > spans[..., 0]  # [S,H]
        anyr = nonempty.any(1)
        rows = np.arange(h)
        rlo = np.where(anyr, np.where(nonempty, rows, h).min(1), 0).astype(float)
        rhi = np.where(anyr, np.where(nonempty, rows, -1).max(1), -1).astype(float)
        clo = np.where(anyr, np.where(nonempty, spans[..., 0], w).min(1), 0).astype(float)
        chi = np.where(anyr, np.where(nonempty, spans[..., 1] - 1, -1).max(1), -1).astype(float)
    ext[:, 0] = rlo * du
    ext[:, 1] = rhi * du
    ext[:, 2] = clo * dv
    ext[:, 3] = chi * dv
    ext[:, 4] = rlo
    ext[:, 5] = rhi
    ext[:, 6] = clo
    ext[:, 7] = chi
    return ext


def shared_frames(ax: np.ndarray, psf2: np.ndarray) -> np.ndarray:
    """Per slice [S] the index of its frame: slices with the same axes and PSF, bit for bit, share
    one (the slices of a stack without slice motion), and with it each Gaussian's covariance in that
    frame (``fill_pairs`` computes it once per run of such slices)."""
    key = np.ascontiguousarray(np.concatenate([ax.reshape(ax.shape[0], 9), psf2], axis=1), dtype=np.float64)
    return np.unique(key.view(np.int64), axis=0, return_inverse=True)[1].reshape(-1).astype(np.int64)


def gaussian_cells(mu, sig, cell_size=None):
    """``build_cells`` of the Gaussians (numpy float64 centres and covariances): what
    :func:`build_plan` needs of them besides themselves, the same for any slices."""
    return K.build_cells(mu, sig, -1.0 if cell_size is None else float(cell_size), 24.0)


def build_plan(mu, sig, w, org, ax, psf2, shape, spacing, cutoff, spans, cell_size=None, cells=None):
    """Cull and project every (Gaussian, slice) pair (numpy float64 inputs). Returns a SlicePlan.
    ``cells``: :func:`gaussian_cells` of these Gaussians, when the caller has it already."""
    h, wd = shape
    du, dv = float(spacing[0]), float(spacing[1])
    n = mu.shape[0]
    ns = org.shape[0]
    plan = SlicePlan()
    ext = _extents(spans, ns, h, wd, du, dv)
    cut = float(cutoff)
    order, cstart, cells, lo, dims, r2max, cell_size = (
        cells if cells is not None else gaussian_cells(mu, sig, cell_size)
    )
    cl_off, cl_sl = K.cell_slice_lists(cells, lo, dims, cell_size, r2max, org, ax, psf2, ext, cut)
    frame_of = shared_frames(ax, psf2)
    goff = K.count_pairs(
        mu, sig, w, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, ext, cut * cut, du, dv, frame_of
    )
    nbound = int(goff[-1])
    p_sl = np.empty(nbound, np.int32)
    p_dat = np.empty((nbound, 7))
    p_rows = np.empty((nbound, 2), np.int64)
    gcnt = np.empty(n, np.int64)
    K.fill_pairs(
        mu,
        sig,
        w,
        order,
        cstart,
        cells,
        cl_off,
        cl_sl,
        org,
        ax,
        psf2,
        ext,
        cut * cut,
        du,
        dv,
        frame_of,
        goff,
        gcnt,
        p_sl,
        p_dat,
        p_rows,
    )
    s_off, s_idx = K.slice_index(goff, gcnt, p_sl, ns)
    plan.gcnt = gcnt
    plan.n_pairs = int(s_off[-1])
    plan.order, plan.goff, plan.p_sl, plan.p_dat, plan.p_rows = order, goff, p_sl, p_dat, p_rows
    plan.s_off, plan.s_idx = s_off, s_idx
    plan.n_candidates = int(cl_off[-1])
    return plan


def _dummy_spans():
    return np.zeros((1, 1, 2), np.int32)


def _np64(t: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(t, np.ndarray):
        return np.ascontiguousarray(t, dtype=np.float64)
    a = t.detach()
    if a.device.type != "cpu":
        a = a.cpu()
    return np.ascontiguousarray(a.numpy(), dtype=np.float64)


def _to_torch(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    npdt = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype)
    if npdt is None:
        return torch.from_numpy(a).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=npdt))


# Renders of the same Gaussians one after the other (an Adam iteration renders its batch stack by
# stack) share, inside shared_gaussians(), what a render computes of the Gaussians alone: their
# float64 copies, covariances and cell sort (mni-t4's Adam stage: ~0.12 s of each stack's render
# of 2M Gaussians, benchmarks/SPEED.md session 23)
_SCOPE = threading.local()


@contextmanager
def shared_gaussians():
    """Within this block, :func:`render_slices` of Gaussian tensors that a render in it has
    already prepared, unchanged since (the same storage, no in-place change: the tensors' version
    counters), reuses that preparation. The same numbers as without it."""
    outer = getattr(_SCOPE, "slot", None)
    _SCOPE.slot = {} if outer is None else outer
    try:
        yield
    finally:
        _SCOPE.slot = outer


def _prepared_gaussians(means, log_scales, quats, intensities):
    """(mu, log-scales, quats, intensities, Sigma, w, cells) as the kernels take them, from
    :func:`shared_gaussians`'s slot when it holds these tensors' (it keeps them referenced, so
    their storage cannot be reused while it holds them)."""
    tensors = (means, log_scales, quats, intensities)
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride(), t.dtype, t.device) for t in tensors)
    slot = getattr(_SCOPE, "slot", None)
    if slot is not None and slot.get("key") == key:
        return slot["prepared"]
    a_mu, a_ls, a_q, a_c = (_np64(t) for t in tensors)
    a_sig, a_w = K.gauss_prep(a_ls, a_q, a_c)
    prepared = (a_mu, a_ls, a_q, a_c, a_sig, a_w, gaussian_cells(a_mu, a_sig))
    if slot is not None:
        slot.update(key=key, tensors=tensors, prepared=prepared)
    return prepared


class _RenderSlicesCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, log_scales, quats, intensities, origins, axes, psf2, shape, spacing, cutoff, spans, stats):
        h, wd = shape
        du, dv = spacing
        a_mu, a_ls, a_q, a_c, a_sig, a_w, cells = _prepared_gaussians(means, log_scales, quats, intensities)
        a_org, a_ax = _np64(origins), _np64(axes)
        ns = a_org.shape[0]
        plan = build_plan(a_mu, a_sig, a_w, a_org, a_ax, psf2, shape, spacing, cutoff, spans, cells=cells)
        has = spans is not None
        sp = spans if has else _dummy_spans()
        nband = _row_bands(h, ns)
        img = K.raster_forward(ns, h, wd, nband, plan.s_off, plan.s_idx, plan.p_dat, plan.p_rows, du, dv, sp, has)
        if stats is not None:
            stats["pairs"] = plan.n_pairs
            stats["candidates"] = plan.n_candidates
            if stats.get("count_pixel_pairs"):
                stats["pixel_pairs"] = int(
                    K.count_pixel_pairs(plan.s_off, plan.s_idx, plan.p_dat, plan.p_rows, plan.p_sl, du, dv, wd, sp, has)
                )
        ctx.saved = (plan, a_mu, a_ls, a_q, a_c, a_sig, a_w, a_org, a_ax, psf2, du, dv, sp, has)
        ctx.dtypes = (means.dtype, log_scales.dtype, quats.dtype, intensities.dtype, origins.dtype, axes.dtype)
        ctx.devices = [t.device for t in (means, log_scales, quats, intensities, origins, axes)]
        return _to_torch(img, means.dtype).to(means.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        plan, a_mu, a_ls, a_q, a_c, a_sig, a_w, a_org, a_ax, psf2, du, dv, sp, has = ctx.saved
        g = _np64(grad)
        nchunk = max(1, min(a_mu.shape[0], _RASTER_CHUNKS))
        d = ctx.dtypes
        if not any(ctx.needs_input_grad[1:6]):  # the centres alone (the Adam iterations' default)
            g_mu = K.raster_backward_means(
                g, plan.order, plan.goff, plan.gcnt, plan.p_sl, plan.p_dat, plan.p_rows, a_mu, a_sig, a_org, a_ax,
                psf2, du, dv, sp, has, nchunk,
            )  # fmt: skip
            return (_to_torch(g_mu, d[0]).to(ctx.devices[0]),) + (None,) * 11
        g_mu, g_sig, g_w, g_sl = K.raster_backward(
            g,
            plan.order,
            plan.goff,
            plan.gcnt,
            plan.p_sl,
            plan.p_dat,
            plan.p_rows,
            a_mu,
            a_sig,
            a_w,
            a_org,
            a_ax,
            psf2,
            du,
            dv,
            sp,
            has,
            nchunk,
        )
        g_ls, g_q, g_c = K.gauss_prep_backward(a_ls, a_q, a_c, g_sig, g_w)
        grads = (g_mu, g_ls, g_q, g_c, g_sl[:, 0:3], g_sl[:, 3:12].reshape(-1, 3, 3))
        out = tuple(_to_torch(g_, dt).to(dev) for g_, dt, dev in zip(grads, d, ctx.devices))
        return out + (None, None, None, None, None, None)


def _psf_variances(psf_sigma, ns: int) -> np.ndarray:
    """PSF variances [S,3] (u, v, n) per slice from sigmas (None: zeros, [3] or [S,3])."""
    if psf_sigma is None:
        return np.zeros((ns, 3))
    p = psf_sigma.detach().cpu().numpy() if isinstance(psf_sigma, Tensor) else psf_sigma
    p = np.asarray(p, dtype=np.float64)
    return np.ascontiguousarray(np.broadcast_to(p * p, (ns, 3)))


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
    stats: dict | None = None,
) -> Tensor:
    """CPU render of slices [S,H,W]; see :func:`mgaussian.render.render_slices`.

    ``row_spans``: None or int32 numpy [S,H,2]; ``stats``: optional dict filled with 'pairs',
    'candidates' (and 'pixel_pairs' if it holds count_pixel_pairs=True).
    """
    psf2 = _psf_variances(psf_sigma, origins.shape[0])
    return _RenderSlicesCPU.apply(
        means,
        log_scales,
        quats,
        intensities,
        origins,
        axes,
        psf2,
        (int(shape[0]), int(shape[1])),
        (float(spacing[0]), float(spacing[1])),
        float(cutoff),
        row_spans,
        stats,
    )


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
    """CPU pose channels of slices [S,7,H,W] float64; see :func:`mgaussian.render.render_pose_channels`.
    The plan of :func:`render_slices`, then one pass over the same pixels (channel 0 is its image,
    the same bits)."""
    h, wd = int(shape[0]), int(shape[1])
    du, dv = float(spacing[0]), float(spacing[1])
    psf2 = _psf_variances(psf_sigma, origins.shape[0])
    a_mu, _, _, _, a_sig, a_w, cells = _prepared_gaussians(means, log_scales, quats, intensities)
    a_org, a_ax = _np64(origins), _np64(axes)
    ns = a_org.shape[0]
    plan = build_plan(a_mu, a_sig, a_w, a_org, a_ax, psf2, (h, wd), (du, dv), cutoff, row_spans, cells=cells)
    has = row_spans is not None
    sp = row_spans if has else _dummy_spans()
    nband = _row_bands(h, ns)
    p_g = K.pair_gaussians(plan.order, plan.goff, plan.gcnt, plan.p_sl.shape[0])
    ch = K.raster_pose_channels(
        ns, h, wd, nband, plan.s_off, plan.s_idx, plan.p_dat, plan.p_rows, p_g, a_mu, a_sig, a_org, a_ax, psf2, du, dv,
        sp, has,
    )  # fmt: skip
    return torch.from_numpy(ch).permute(0, 3, 1, 2).to(means.device)


class SliceDesign:
    """The render of a set of slices as an explicit sparse linear map of the intensities, for
    fixed means, scales, rotations, slice frames and PSF: image = A c. Built once (one pass like
    the forward render, storing every (pixel, Gaussian) term), then A c and A^T x cost one
    multiply-add per term and no exp(): the conjugate-gradient intensity fits apply them dozens
    of times. Storage: 2 bytes per term (a 16-bit fraction of its pair's amplitude), ``row_bytes``
    per row of a pair's ellipse, 20 per pair
    (``nbytes``). See :func:`build_design`; its twin for every backend is
    :class:`mgaussian.render.AutogradDesign`."""

    def __init__(self, ns, shape, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, n, dtype, device):
        self.ns, self.shape, self.n = ns, shape, n
        self._arrays = (s_off, q_g, q_a0, q_amp, roff, voff, rows, vals)  # the kernels' argument order
        self.dtype, self.device = dtype, device
        self.nbytes = int(sum(a.nbytes for a in self._arrays))
        self.n_terms = int(vals.shape[0])
        self._chunk_sums: np.ndarray | None = None  # from _SHARED_CHUNK_SUMS on the first product

    def _out(self, a: np.ndarray) -> Tensor:
        return _to_torch(a, self.dtype).to(self.device)

    def chunk_buffer(self) -> np.ndarray:
        """Per-chunk sums [C, N] the transposed products add into (a fixed number of chunks: the
        sums do not depend on the thread count), zeroed; shared with the other designs over the
        same Gaussians (a product uses it only until its sum is taken)."""
        buf = self._chunk_sums
        if buf is None:
            buf = _SHARED_CHUNK_SUMS.get(self.n)
            if buf is None:
                buf = np.zeros((_DESIGN_CHUNKS, self.n))
                _SHARED_CHUNK_SUMS[self.n] = buf
            self._chunk_sums = buf
        buf.fill(0.0)
        return buf

    def matvec(self, c: Tensor) -> Tensor:
        """A c: images [S,H,W] of intensities c [N]."""
        return self._out(K.design_matvec(self.ns, *self.shape, *self._arrays, _np64(c)))

    def rmatvec(self, img: Tensor) -> Tensor:
        """A^T x: per Gaussian [N], of images x [S,H,W]."""
        return self._summed(self.rmatvec_into, img)

    def normal(self, v: Tensor, weight: Tensor) -> Tensor:
        """A^T diag(weight) A v (weight [S,H,W]), in one pass."""
        return self._summed(self.normal_into, v, weight)

    def diag_normal(self, weight: Tensor) -> Tensor:
        """diag(A^T diag(weight) A) [N] (weight [S,H,W]): sum_p weight_p A_pi^2 per Gaussian, exact,
        in one pass over the stored terms (the confidence map's data term, recon/confidence.py)."""
        return self._summed(self.diag_normal_into, weight)

    def _summed(self, into, *args) -> Tensor:
        buf = self.chunk_buffer()
        into(buf, *args)
        return self._out(K.sum_chunks(buf))

    def rmatvec_into(self, buf: np.ndarray, img: Tensor) -> None:
        K.design_rmatvec(self.ns, *self._arrays, _np64(img), buf)

    def normal_into(self, buf: np.ndarray, v: Tensor, weight: Tensor) -> None:
        K.design_normal(self.ns, *self.shape, *self._arrays, _np64(v), _np64(weight), buf)

    def diag_normal_into(self, buf: np.ndarray, weight: Tensor) -> None:
        K.design_diag_normal(self.ns, *self._arrays, _np64(weight), buf)


class SliceDesignParts:
    """A design built in runs of consecutive slices (:data:`_BUILD_SLICES`): the operations of
    :class:`SliceDesign` over the whole stack, each run's applied to its own slices, the
    transposed products added into one set of chunk sums (as one design's: no buffer of N per run)."""

    def __init__(self, parts: list[SliceDesign]):
        self.parts = parts
        self.ns = sum(p.ns for p in parts)
        self.shape, self.n = parts[0].shape, parts[0].n
        self.nbytes = int(sum(p.nbytes for p in parts))
        self.n_terms = int(sum(p.n_terms for p in parts))
        self._starts = np.cumsum([0] + [p.ns for p in parts])

    def _runs(self):
        return zip(self.parts, self._starts[:-1], self._starts[1:])

    # the operands are converted to float64 once for all runs (mni-t4: 15 runs a stack, a 2M-vector
    # each: ~4 s of conversions over a fit)
    def matvec(self, c: Tensor) -> Tensor:
        c = _np64(c)
        return torch.cat([p.matvec(c) for p in self.parts])

    def rmatvec(self, img: Tensor) -> Tensor:
        img = _np64(img)
        return self._summed(lambda p, buf, a, b: p.rmatvec_into(buf, img[a:b]))

    def normal(self, v: Tensor, weight: Tensor) -> Tensor:
        v, weight = _np64(v), _np64(weight)
        return self._summed(lambda p, buf, a, b: p.normal_into(buf, v, weight[a:b]))

    def diag_normal(self, weight: Tensor) -> Tensor:
        weight = _np64(weight)
        return self._summed(lambda p, buf, a, b: p.diag_normal_into(buf, weight[a:b]))

    def _summed(self, run_into) -> Tensor:
        buf = self.parts[0].chunk_buffer()
        for p, a, b in self._runs():
            run_into(p, buf, a, b)
        return self.parts[0]._out(K.sum_chunks(buf))


def design_size(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    origins: Tensor,
    axes: Tensor,
    shape,
    spacing,
    psf_sigma=None,
    cutoff: float = 3.0,
    row_spans=None,
):
    """(bytes a :class:`SliceDesign` of these slices takes, terms), by the counting pass alone."""
    return _design(means, log_scales, quats, origins, axes, shape, spacing, psf_sigma, cutoff, row_spans, max_bytes=0)[
        1:
    ]


def build_design(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    origins: Tensor,
    axes: Tensor,
    shape,
    spacing,
    psf_sigma=None,
    cutoff: float = 3.0,
    row_spans=None,
    max_bytes: float | None = None,
):
    """The :class:`SliceDesign` of these slices (arguments as :func:`render_slices`, intensities
    excepted), or None when it would take more than ``max_bytes``."""
    return _design(means, log_scales, quats, origins, axes, shape, spacing, psf_sigma, cutoff, row_spans, max_bytes)[0]


# A design is built this many slices at a time: the render plan of a run of slices (~100 bytes a
# (slice, Gaussian) pair) lives only while that run's terms are filled in (mni-t4 at 1 mm: ~0.8 GB
# for a whole stack of ~50 slices, on top of the maps, at the fine level's peak). Runs of 4 slices
# (joined into parts of 8 after their build) did not lower mni-t4's peak and made its builds slower:
# each run pays the plan's O(N) set-up (benchmarks/SPEED.md, session 14)
_BUILD_SLICES = 8


def _design(means, log_scales, quats, origins, axes, shape, spacing, psf_sigma, cutoff, row_spans, max_bytes):
    """(design, bytes, terms): the design built in runs of ``_BUILD_SLICES`` slices (one
    :class:`SliceDesign`, or :class:`SliceDesignParts` of several); (None, bytes so far, terms so far)
    as soon as it would take more than ``max_bytes`` (``max_bytes`` 0: count only)."""
    h, wd = int(shape[0]), int(shape[1])
    du, dv = float(spacing[0]), float(spacing[1])
    ns = origins.shape[0]
    psf2 = _psf_variances(psf_sigma, ns)
    a_mu = _np64(means)
    a_org, a_ax = _np64(origins), _np64(axes)
    # unit intensities: the basis functions; the float64 scales and rotations are not kept beside
    # the maps being built (mni-t4 at 1 mm: 115 MB of the fine level's peak)
    a_sig, a_w = K.gauss_prep(_np64(log_scales), _np64(quats), np.ones(a_mu.shape[0]))
    cells = gaussian_cells(a_mu, a_sig)  # the same for every run of slices
    parts, nbytes, n_terms = [], 0, 0
    for s0 in range(0, max(ns, 1), _BUILD_SLICES):
        s1 = min(ns, s0 + _BUILD_SLICES)
        spans = None if row_spans is None else np.ascontiguousarray(row_spans[s0:s1])
        left = None if max_bytes is None else max_bytes - nbytes
        d, b, t = _design_part(
            a_mu,
            a_sig,
            a_w,
            cells,
            a_org[s0:s1],
            a_ax[s0:s1],
            np.ascontiguousarray(psf2[s0:s1]),
            h,
            wd,
            du,
            dv,
            cutoff,
            spans,
            left,
            means.dtype,
            means.device,
        )
        nbytes, n_terms = nbytes + b, n_terms + t
        if d is None:  # beyond the budget, or counting only
            if max_bytes == 0:
                continue
            return None, nbytes, n_terms
        parts.append(d)
    if max_bytes == 0 and nbytes > 0:
        return None, nbytes, n_terms
    d = parts[0] if len(parts) == 1 else SliceDesignParts(parts)
    return d, d.nbytes, n_terms


def _design_part(
    a_mu, a_sig, a_w, cells, a_org, a_ax, psf2, h, wd, du, dv, cutoff, row_spans, max_bytes, dtype, device
):
    """The :class:`SliceDesign` of one run of slices: (design or None beyond ``max_bytes``, bytes, terms)."""
    ns = a_org.shape[0]
    n = a_mu.shape[0]
    plan = build_plan(a_mu, a_sig, a_w, a_org, a_ax, psf2, (h, wd), (du, dv), cutoff, row_spans, cells=cells)
    has = row_spans is not None
    sp = row_spans if has else _dummy_spans()
    nrow, nval = K.design_count(ns, h, wd, plan.s_off, plan.s_idx, plan.p_dat, plan.p_rows, du, dv, sp, has)
    rdt = np.int16 if max(h, wd) < 32767 else np.int32
    q = int(plan.s_off[-1])
    n_rows, n_terms = int(nrow.sum()), int(nval.sum())
    nbytes = n_terms * 2 + n_rows * 2 * np.dtype(rdt).itemsize + q * 20 + (ns + 1) * 8
    if max_bytes is not None and nbytes > max_bytes:
        return None, nbytes, n_terms
    # offsets of a run's rows and terms: 32 bits while they fit (a run of _BUILD_SLICES slices)
    odt = np.int32 if max(n_rows, n_terms) < 2**31 - 1 else np.int64
    roff = np.zeros(q + 1, odt)
    np.cumsum(nrow, out=roff[1:])
    voff = np.zeros(q + 1, odt)
    np.cumsum(nval, out=voff[1:])
    del nrow, nval
    q_g = np.empty(q, np.int32)
    q_a0 = np.empty(q, np.int32)
    q_amp = np.empty(q, np.float32)
    rows = np.empty((n_rows, 2), rdt)
    vals = np.empty(n_terms, np.uint16)
    p_g = K.pair_gaussians(plan.order, plan.goff, plan.gcnt, plan.p_sl.shape[0])
    K.design_fill(
        ns,
        h,
        wd,
        plan.s_off,
        plan.s_idx,
        plan.p_dat,
        plan.p_rows,
        p_g,
        du,
        dv,
        sp,
        has,
        roff,
        voff,
        q_g,
        q_a0,
        q_amp,
        rows,
        vals,
    )
    d = SliceDesign(ns, (h, wd), plan.s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, n, dtype, device)
    return d, d.nbytes, n_terms


_BIG_RADIUS = 1 << 40


def _psf6(psf_cov, npts):
    if psf_cov is None:
        return np.zeros((1, 6)), 0
    p = _np64(psf_cov)
    per_point = p.ndim == 3
    p = p.reshape(-1, 3, 3)
    if per_point and p.shape[0] != npts:
        raise ValueError("psf_cov must be [3,3] or [P,3,3]")
    six = np.stack([p[:, 0, 0], p[:, 0, 1], p[:, 0, 2], p[:, 1, 1], p[:, 1, 2], p[:, 2, 2]], 1)
    return np.ascontiguousarray(six), int(per_point)


def _check_cells(dims):
    if int(np.prod(dims)) > 200_000_000:
        raise ValueError("cell_size too small for the extent of the data (more than 2e8 cells)")


class _RenderPointsCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, means, log_scales, quats, intensities, pts, psf_cov, block_radius, cell_size):
        a_mu, a_ls, a_q, a_c = (_np64(t) for t in (means, log_scales, quats, intensities))
        a_pts = _np64(pts)
        a_sig, a_w = K.gauss_prep(a_ls, a_q, a_c)
        psf, per_point = _psf6(psf_cov, a_pts.shape[0])
        rad = _BIG_RADIUS if block_radius is None else int(block_radius)
        g_order, g_start, g_lo, g_dims, g_cells = K.cell_sort(a_mu, cell_size)
        _check_cells(g_dims)
        if not np.isfinite(a_pts).all():
            raise ValueError("non-finite query point")
        p_cells = np.floor(a_pts / cell_size).astype(np.int64) if a_pts.size else np.zeros((0, 3), np.int64)
        pre = not per_point
        ginv = K.shared_inverses(a_sig, psf) if pre else np.zeros((1, 7))
        out = K.points_forward(
            a_mu, a_sig, a_w, a_pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad
        )
        ctx.saved = (
            a_mu,
            a_ls,
            a_q,
            a_c,
            a_sig,
            a_w,
            a_pts,
            psf,
            per_point,
            pre,
            ginv,
            rad,
            cell_size,
            g_order,
            g_start,
            g_lo,
            g_dims,
            g_cells,
            p_cells,
        )
        ctx.dtypes = (means.dtype, log_scales.dtype, quats.dtype, intensities.dtype, pts.dtype)
        ctx.devices = [t.device for t in (means, log_scales, quats, intensities, pts)]
        ctx.psf_meta = (None, None) if psf_cov is None else (psf_cov.dtype, psf_cov.device)
        return _to_torch(out, means.dtype).to(means.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (
            a_mu,
            a_ls,
            a_q,
            a_c,
            a_sig,
            a_w,
            a_pts,
            psf,
            per_point,
            pre,
            ginv,
            rad,
            cs,
            g_order,
            g_start,
            g_lo,
            g_dims,
            g_cells,
            p_cells,
        ) = ctx.saved
        g = _np64(grad)
        d = ctx.dtypes
        g_mu = g_ls = g_q = g_c = g_pts = None
        if any(ctx.needs_input_grad[:4]):
            p_order, p_start, p_lo, p_dims, _ = K.cell_sort(a_pts, cs)
            _check_cells(p_dims)
            gm, gs, gw = K.points_backward_gaussians(
                g, a_mu, a_sig, a_w, a_pts, psf, per_point, pre, ginv, g_cells, p_order, p_start, p_lo, p_dims, rad
            )
            g_ls, g_q, g_c = K.gauss_prep_backward(a_ls, a_q, a_c, gs, gw)
            g_mu, g_ls, g_q, g_c = (_to_torch(x, t).to(dev) for x, t, dev in zip((gm, g_ls, g_q, g_c), d, ctx.devices))
        g_psf = None
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            gp, gm = K.points_backward_points(
                g, a_mu, a_sig, a_w, a_pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad
            )
            if ctx.needs_input_grad[4]:
                g_pts = _to_torch(gp, d[4]).to(ctx.devices[4])
            if ctx.needs_input_grad[5]:
                idx = np.array([[0, 1, 2], [1, 3, 4], [2, 4, 5]])
                full = gm[:, idx]  # [P,3,3] symmetric
                if not per_point:
                    full = full.sum(0)
                g_psf = _to_torch(np.ascontiguousarray(full), ctx.psf_meta[0]).to(ctx.psf_meta[1])
        return g_mu, g_ls, g_q, g_c, g_pts, g_psf, None, None


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
    """CPU f(p) with block partitioning; see :func:`mgaussian.render.render_points`."""
    return _RenderPointsCPU.apply(
        means, log_scales, quats, intensities, points, psf_cov, block_radius, float(cell_size)
    )
