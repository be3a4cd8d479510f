"""Numba kernels of the ``cpu`` backend (hand-written forward and backward, all cores).

Each parallel kernel is a Python function that allocates its outputs and runs a serial ``nogil``
kernel (named with a leading underscore) over contiguous blocks of its outer loop on the run's
threads (:func:`._threads.parallel_range`); every block writes its own items or its own chunk's
partial sums, so the result does not depend on the thread count.

Slices (see :mod:`mgaussian.render.cpu` for the pipeline):

1. ``build_cells``: counting sort of the Gaussians into uniform cells; per cell the largest
   ``trace(Sigma)`` (bounds every Gaussian's extent).
2. ``cell_slice_lists``: per non-empty cell, the slices whose plane (and in-plane extent) the cell's
   Gaussians can reach within the cut-off: a conservative pre-cull, O(cells x slices).
3. ``count_pairs`` / ``fill_pairs``: exact per (Gaussian, slice) cull and projection to a 2D Gaussian
   in the slice (centre m, conic K, amplitude alpha, in-plane threshold thr, row range), stored
   Gaussian-major (CSR by sorted Gaussian), then indexed slice-major.
4. ``raster_forward``: per (slice, row band), every pair adds alpha*exp(-q/2) on exactly the pixels
   of its ellipse q <= thr, row by row, with the exponential evaluated by a multiplicative
   recurrence along the row and walked from one row's first pixel to the next one's
   (``_row_start``: a pair's first row takes two exp(), its later rows none).
5. ``raster_backward``: per chunk of Gaussians (race-free for Gaussian gradients), each pair gathers
   six moments of grad*exp(-q/2) over the same pixels, then the hand-derived chain rule through the
   projection gives gradients w.r.t. mean, Sigma (6), w, and the slice's origin and axes (per-chunk
   buffers, summed afterwards).

All internal arithmetic is float64.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, uint64

from ._threads import parallel_range

_JIT = dict(cache=True, nogil=True)


@njit(**_JIT)
def build_cells(mu, sig, cs, per_cell):
    """Sort Gaussians into cells of size cs (cs <= 0: chosen so that a cell of the bounding box
    holds ~per_cell Gaussians). Returns (order, cstart, nonempty cells, lo, dims, r2max, cs)."""
    n = mu.shape[0]
    lo = np.empty(3)
    hi = np.empty(3)
    for k in range(3):
        lo[k] = np.inf
        hi[k] = -np.inf
    for i in range(n):
        for k in range(3):
            v = mu[i, k]
            if not math.isfinite(v):
                raise ValueError("non-finite Gaussian mean")
            if v < lo[k]:
                lo[k] = v
            if v > hi[k]:
                hi[k] = v
        for k in range(6):
            if not math.isfinite(sig[i, k]):
                raise ValueError("non-finite Gaussian covariance (log_scales or quats)")
    dims = np.empty(3, np.int64)
    if n == 0:
        for k in range(3):
            lo[k] = 0.0
            hi[k] = 0.0
    if cs <= 0.0:
        if n > 1:
            vol = 1.0
            emax = 0.0
            for k in range(3):
                e = max(hi[k] - lo[k], 1e-3)
                vol *= e
                emax = max(emax, e)
            cs = max((vol / max(n / per_cell, 1.0)) ** (1.0 / 3.0), emax / 512.0)
        else:
            cs = 1.0
    for k in range(3):
        dims[k] = int((hi[k] - lo[k]) / cs) + 1
    ncell = dims[0] * dims[1] * dims[2]
    cid = np.empty(n, np.int64)
    counts = np.zeros(ncell + 1, np.int64)
    for i in range(n):
        ix = min(int((mu[i, 0] - lo[0]) / cs), dims[0] - 1)
        iy = min(int((mu[i, 1] - lo[1]) / cs), dims[1] - 1)
        iz = min(int((mu[i, 2] - lo[2]) / cs), dims[2] - 1)
        c = (ix * dims[1] + iy) * dims[2] + iz
        cid[i] = c
        counts[c + 1] += 1
    for c in range(ncell):
        counts[c + 1] += counts[c]
    cstart = counts
    fillp = cstart[:-1].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        c = cid[i]
        order[fillp[c]] = i
        fillp[c] += 1
    nonempty = 0
    for c in range(ncell):
        if cstart[c + 1] > cstart[c]:
            nonempty += 1
    cells = np.empty(nonempty, np.int64)
    r2max = np.zeros(nonempty)
    j = 0
    for c in range(ncell):
        if cstart[c + 1] > cstart[c]:
            cells[j] = c
            m = 0.0
            for t in range(cstart[c], cstart[c + 1]):
                i = order[t]
                tr = sig[i, 0] + sig[i, 3] + sig[i, 5]
                if tr > m:
                    m = tr
            r2max[j] = m
            j += 1
    return order, cstart, cells, lo, dims, r2max, cs


@njit(**_JIT)
def _cell_hits_slice(cx, cy, cz, hd, r2, org, ax, psf2, ext, s, cut):
    dx = cx - org[s, 0]
    dy = cy - org[s, 1]
    dz = cz - org[s, 2]
    for k in range(3):
        ex = ax[s, k, 0]
        ey = ax[s, k, 1]
        ez = ax[s, k, 2]
        nn2 = ex * ex + ey * ey + ez * ez
        t = ex * dx + ey * dy + ez * dz
        reach = math.sqrt(nn2) * hd + cut * math.sqrt(nn2 * r2 + psf2[s, k])
        if k == 2:
            if abs(t) > reach:
                return False
        else:
            if t + reach < ext[s, 2 * k] or t - reach > ext[s, 2 * k + 1]:
                return False
    return True


def cell_slice_lists(cells, lo, dims, cs, r2max, org, ax, psf2, ext, cut):
    """For each non-empty cell, the slices it may touch. Returns CSR (off [nc+1], slices)."""
    nc = cells.shape[0]
    cnt = np.zeros(nc + 1, np.int64)
    parallel_range(_cell_slice_count, nc, cells, lo, dims, cs, r2max, org, ax, psf2, ext, cut, cnt)
    np.cumsum(cnt, out=cnt)
    out = np.empty(cnt[nc], np.int32)
    parallel_range(_cell_slice_fill, nc, cells, lo, dims, cs, r2max, org, ax, psf2, ext, cut, cnt, out)
    return cnt, out


@njit(**_JIT)
def _cell_slice_count(j0, j1, cells, lo, dims, cs, r2max, org, ax, psf2, ext, cut, cnt):
    """cnt[j + 1] = the number of slices cell j may touch, for j in j0 .. j1 - 1."""
    ns = org.shape[0]
    hd = cs * math.sqrt(3.0) * 0.5
    for j in range(j0, j1):
        c = cells[j]
        iz = c % dims[2]
        iy = (c // dims[2]) % dims[1]
        ix = c // (dims[1] * dims[2])
        cx = lo[0] + (ix + 0.5) * cs
        cy = lo[1] + (iy + 0.5) * cs
        cz = lo[2] + (iz + 0.5) * cs
        k = 0
        for s in range(ns):
            if _cell_hits_slice(cx, cy, cz, hd, r2max[j], org, ax, psf2, ext, s, cut):
                k += 1
        cnt[j + 1] = k


@njit(**_JIT)
def _cell_slice_fill(j0, j1, cells, lo, dims, cs, r2max, org, ax, psf2, ext, cut, cnt, out):
    """The slices cell j may touch at out[cnt[j]:], for j in j0 .. j1 - 1."""
    ns = org.shape[0]
    hd = cs * math.sqrt(3.0) * 0.5
    for j in range(j0, j1):
        c = cells[j]
        iz = c % dims[2]
        iy = (c // dims[2]) % dims[1]
        ix = c // (dims[1] * dims[2])
        cx = lo[0] + (ix + 0.5) * cs
        cy = lo[1] + (iy + 0.5) * cs
        cz = lo[2] + (iz + 0.5) * cs
        k = cnt[j]
        for s in range(ns):
            if _cell_hits_slice(cx, cy, cz, hd, r2max[j], org, ax, psf2, ext, s, cut):
                out[k] = s
                k += 1


@njit(**_JIT)
def _offset(mu, i, org, ax, s):
    """Slice-frame offset d (3) of Gaussian i's centre from slice s's origin."""
    dx = mu[i, 0] - org[s, 0]
    dy = mu[i, 1] - org[s, 1]
    dz = mu[i, 2] - org[s, 2]
    d0 = ax[s, 0, 0] * dx + ax[s, 0, 1] * dy + ax[s, 0, 2] * dz
    d1 = ax[s, 1, 0] * dx + ax[s, 1, 1] * dy + ax[s, 1, 2] * dz
    d2 = ax[s, 2, 0] * dx + ax[s, 2, 1] * dy + ax[s, 2, 2] * dz
    return d0, d1, d2


@njit(**_JIT)
def _slice_cov(sig, i, ax, psf2, s):
    """Covariance C (6: 00,01,02,11,12,22) of Gaussian i in slice s's frame, PSF added: it depends
    on the slice through its axes and PSF alone, so slices that share them share it."""
    s00 = sig[i, 0]
    s01 = sig[i, 1]
    s02 = sig[i, 2]
    s11 = sig[i, 3]
    s12 = sig[i, 4]
    s22 = sig[i, 5]
    a00 = ax[s, 0, 0]
    a01 = ax[s, 0, 1]
    a02 = ax[s, 0, 2]
    a10 = ax[s, 1, 0]
    a11 = ax[s, 1, 1]
    a12 = ax[s, 1, 2]
    a20 = ax[s, 2, 0]
    a21 = ax[s, 2, 1]
    a22 = ax[s, 2, 2]
    # T = A Sigma
    t00 = a00 * s00 + a01 * s01 + a02 * s02
    t01 = a00 * s01 + a01 * s11 + a02 * s12
    t02 = a00 * s02 + a01 * s12 + a02 * s22
    t10 = a10 * s00 + a11 * s01 + a12 * s02
    t11 = a10 * s01 + a11 * s11 + a12 * s12
    t12 = a10 * s02 + a11 * s12 + a12 * s22
    t20 = a20 * s00 + a21 * s01 + a22 * s02
    t21 = a20 * s01 + a21 * s11 + a22 * s12
    t22 = a20 * s02 + a21 * s12 + a22 * s22
    c00 = t00 * a00 + t01 * a01 + t02 * a02 + psf2[s, 0]
    c01 = t00 * a10 + t01 * a11 + t02 * a12
    c02 = t00 * a20 + t01 * a21 + t02 * a22
    c11 = t10 * a10 + t11 * a11 + t12 * a12 + psf2[s, 1]
    c12 = t10 * a20 + t11 * a21 + t12 * a22
    c22 = t20 * a20 + t21 * a21 + t22 * a22 + psf2[s, 2]
    return c00, c01, c02, c11, c12, c22


@njit(**_JIT)
def _project(mu, sig, i, org, ax, psf2, s):
    """Slice-frame offset d (3) and covariance C (6: 00,01,02,11,12,22) of Gaussian i in slice s."""
    d0, d1, d2 = _offset(mu, i, org, ax, s)
    c00, c01, c02, c11, c12, c22 = _slice_cov(sig, i, ax, psf2, s)
    return d0, d1, d2, c00, c01, c02, c11, c12, c22


@njit(**_JIT)
def _conic(c00, c01, c02, c11, c12, c22):
    """A slice-frame covariance's in-plane conditional: (ia, ib, ca, cb, cc, det) with the in-plane
    covariance [[ca, cb], [cb, cc]] given the through-plane offset (det its determinant) and the
    centre's shift (ia, ib) per unit of that offset. Like C, shared by slices of the same axes."""
    ia = c02 / c22
    ib = c12 / c22
    ca = c00 - c02 * ia
    cb = c01 - c02 * ib
    cc = c11 - c12 * ib
    return ia, ib, ca, cb, cc, ca * cc - cb * cb


@njit(**_JIT)
def _pair_in(d0, d1, d2, c22, ia, ib, ca, cb, cc, det, wi, s, cut2, du, dv, ext):
    """Exact cull + 2D projection from the pair's offset and its covariance's :func:`_conic`.
    Returns (ok, m_u, m_v, K00, K01, K11, alpha, thr, a_lo, a_hi)."""
    bad = (False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0, -1)
    z2 = d2 * d2 / c22
    if z2 > cut2:
        return bad
    thr = cut2 - z2
    if not det > 0.0:
        return bad
    mu_ = d0 - ia * d2
    mv_ = d1 - ib * d2
    xh = math.sqrt(thr * ca)
    yh = math.sqrt(thr * cc)
    a_lo = max(int(math.ceil((mu_ - xh) / du)), int(ext[s, 4]))
    a_hi = min(int(math.floor((mu_ + xh) / du)), int(ext[s, 5]))
    if a_hi < a_lo:
        return bad
    b_lo = math.ceil((mv_ - yh) / dv)
    b_hi = math.floor((mv_ + yh) / dv)
    if b_hi < ext[s, 6] or b_lo > ext[s, 7]:
        return bad
    alpha = wi * math.exp(-0.5 * z2) / math.sqrt(det * c22)
    return (True, mu_, mv_, cc / det, -cb / det, ca / det, alpha, thr, a_lo, a_hi)


@njit(**_JIT)
def _plane_var(sig, i, ax, psf2, s):
    """C_nn of :func:`_plane_hit` (shared by slices of the same axes and PSF)."""
    n0 = ax[s, 2, 0]
    n1 = ax[s, 2, 1]
    n2 = ax[s, 2, 2]
    return (
        n0 * (n0 * sig[i, 0] + n1 * sig[i, 1] + n2 * sig[i, 2])
        + n1 * (n0 * sig[i, 1] + n1 * sig[i, 3] + n2 * sig[i, 4])
        + n2 * (n0 * sig[i, 2] + n1 * sig[i, 4] + n2 * sig[i, 5])
        + psf2[s, 2]
    )


@njit(**_JIT)
def _plane_hit(mu, i, org, ax, s, cut2, cnn):
    """Cheap necessary condition for a pair: d_n^2 <= cut^2 C_nn (no projection)."""
    n0 = ax[s, 2, 0]
    n1 = ax[s, 2, 1]
    n2 = ax[s, 2, 2]
    d2 = n0 * (mu[i, 0] - org[s, 0]) + n1 * (mu[i, 1] - org[s, 1]) + n2 * (mu[i, 2] - org[s, 2])
    return d2 * d2 <= cut2 * cnn


def count_pairs(mu, sig, w, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, ext, cut2, du, dv, frame_of):
    """Upper bound of the pairs of every (sorted) Gaussian: CSR offsets [N+1]. ``frame_of`` [S]:
    :func:`mgaussian.render.cpu.shared_frames` of the slices."""
    cnt = np.zeros(order.shape[0] + 1, np.int64)
    parallel_range(
        _count_pairs, cells.shape[0], mu, sig, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, cut2, frame_of, cnt
    )
    np.cumsum(cnt, out=cnt)
    return cnt


@njit(**_JIT)
def _count_pairs(j0, j1, mu, sig, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, cut2, frame_of, cnt):
    """cnt[t + 1] = the slices sorted Gaussian t may reach, for the Gaussians of cells j0 .. j1 - 1."""
    for j in range(j0, j1):
        c = cells[j]
        for t in range(cstart[c], cstart[c + 1]):
            i = order[t]
            k = 0
            frame = -1
            cnn = 0.0
            for q in range(cl_off[j], cl_off[j + 1]):
                s = cl_sl[q]
                if frame_of[s] != frame:
                    frame = frame_of[s]
                    cnn = _plane_var(sig, i, ax, psf2, s)
                if _plane_hit(mu, i, org, ax, s, cut2, cnn):
                    k += 1
            cnt[t + 1] = k


def fill_pairs(
    mu, sig, w, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, ext, cut2, du, dv, frame_of, goff, gcnt, p_sl, p_dat,
    p_rows,
):  # fmt: skip
    """Exact cull + projection; pairs of sorted Gaussian t at goff[t] .. goff[t] + gcnt[t]. A Gaussian's
    covariance in the slices' frame is computed once for a run of its candidate slices that share
    ``frame_of`` (axes and PSF): the same numbers as per slice, a third of a pair's arithmetic."""
    parallel_range(
        _fill_pairs, cells.shape[0],
        mu, sig, w, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, ext, cut2, du, dv, frame_of, goff, gcnt, p_sl,
        p_dat, p_rows,
    )  # fmt: skip


@njit(**_JIT)
def _fill_pairs(
    j0, j1, mu, sig, w, order, cstart, cells, cl_off, cl_sl, org, ax, psf2, ext, cut2, du, dv, frame_of, goff, gcnt, p_sl,
    p_dat, p_rows,
):  # fmt: skip
    """:func:`fill_pairs` for the Gaussians of cells j0 .. j1 - 1."""
    for j in range(j0, j1):
        c = cells[j]
        for t in range(cstart[c], cstart[c + 1]):
            i = order[t]
            p = goff[t]
            frame = -1
            cnn = c22 = ia = ib = ca = cb = cc = det = 0.0
            for q in range(cl_off[j], cl_off[j + 1]):
                s = cl_sl[q]
                if frame_of[s] != frame:
                    frame = frame_of[s]
                    cnn = _plane_var(sig, i, ax, psf2, s)
                    c00, c01, c02, c11, c12, c22 = _slice_cov(sig, i, ax, psf2, s)
                    if c22 > 0.0:
                        ia, ib, ca, cb, cc, det = _conic(c00, c01, c02, c11, c12, c22)
                if not _plane_hit(mu, i, org, ax, s, cut2, cnn) or not c22 > 0.0:
                    continue
                d0, d1, d2 = _offset(mu, i, org, ax, s)
                r = _pair_in(d0, d1, d2, c22, ia, ib, ca, cb, cc, det, w[i], s, cut2, du, dv, ext)
                if r[0]:
                    p_sl[p] = s
                    p_dat[p, 0] = r[1]
                    p_dat[p, 1] = r[2]
                    p_dat[p, 2] = r[3]
                    p_dat[p, 3] = r[4]
                    p_dat[p, 4] = r[5]
                    p_dat[p, 5] = r[6]
                    p_dat[p, 6] = r[7]
                    p_rows[p, 0] = r[8]
                    p_rows[p, 1] = r[9]
                    p += 1
            gcnt[t] = p - goff[t]


# slice_index's blocks of sorted Gaussians: a fixed number, so that the blocks and their order do
# not depend on the thread count (the index is the same for any blocking: slice by slice, in the
# Gaussians' order)
_INDEX_BLOCKS = 64


def slice_index(goff, gcnt, p_sl, ns):
    """Valid pairs grouped by slice: (s_off [S+1], s_idx [pairs]), each slice's pairs in the sorted
    Gaussians' order. A counting sort over blocks of Gaussians on the kernels' threads: each block
    counts its pairs per slice, then writes them from its own start in each slice (the serial
    sort's order; mni-t4's Adam iterations: 25 ms a call on one thread)."""
    n = gcnt.shape[0]
    nb = max(1, min(n, _INDEX_BLOCKS))
    counts = np.zeros((nb, ns), np.int64)
    parallel_range(_slice_count, nb, n, nb, goff, gcnt, p_sl, counts)
    off = np.zeros(ns + 1, np.int64)
    np.cumsum(counts.sum(0), out=off[1:])
    start = off[:-1][None, :] + np.cumsum(counts, 0) - counts  # block b's first place in slice s
    idx = np.empty(off[ns], np.int64)
    parallel_range(_slice_fill, nb, n, nb, goff, gcnt, p_sl, start, idx)
    return off, idx


@njit(**_JIT)
def _slice_count(b0, b1, n, nb, goff, gcnt, p_sl, counts):
    """:func:`slice_index`'s pairs per slice of the Gaussians of blocks b0 .. b1 - 1."""
    for blk in range(b0, b1):
        for t in range(blk * n // nb, (blk + 1) * n // nb):
            for p in range(goff[t], goff[t] + gcnt[t]):
                counts[blk, p_sl[p]] += 1


@njit(**_JIT)
def _slice_fill(b0, b1, n, nb, goff, gcnt, p_sl, start, idx):
    """:func:`slice_index`'s pairs of blocks b0 .. b1 - 1, each from its block's start in its slice."""
    for blk in range(b0, b1):
        fillp = start[blk].copy()
        for t in range(blk * n // nb, (blk + 1) * n // nb):
            for p in range(goff[t], goff[t] + gcnt[t]):
                s = p_sl[p]
                idx[fillp[s]] = p
                fillp[s] += 1


@njit(**_JIT)
def _ellipse(k00, k01, k11):
    """A pair's constants for :func:`_row_span`: (k00 k11 - k01^2, 1 / k11), computed once per pair
    rather than once per row (the row loops do not hoist them: sb25's backward pass 7 % faster)."""
    return k00 * k11 - k01 * k01, 1.0 / k11


@njit(**_JIT)
def _row_span(a, s, mu_, mv_, k01, k11, kd, ik11, thr, du, idv, width, spans, has_spans):
    """Columns [b_lo, b_hi) of row a inside the ellipse q <= thr (and the row's span); x offset.
    ``kd``, ``ik11``: :func:`_ellipse` of the pair."""
    x = a * du - mu_
    disc = k11 * thr - x * x * kd
    if disc < 0.0:
        return 0, 0, x
    hh = math.sqrt(disc) * ik11
    yc = mv_ - k01 * x * ik11
    b_lo = int(math.ceil((yc - hh) * idv))
    b_hi = int(math.floor((yc + hh) * idv)) + 1
    lo = 0
    hi = width
    if has_spans:
        lo = spans[s, a, 0]
        hi = spans[s, a, 1]
    if b_lo < lo:
        b_lo = lo
    if b_hi > hi:
        b_hi = hi
    return b_lo, b_hi, x


@njit(**_JIT)
def _row_exp(x, b_lo, mv_, k00, k01, k11, dv):
    """The Gaussian exp(-q/2) at the row's first column b_lo, and the ratio between its first two
    columns (the recurrence e *= r, r *= exp(-k11 dv^2) walks the row without another exp);
    also the v offset y of that column."""
    y = b_lo * dv - mv_
    e = math.exp(-0.5 * (k00 * x * x + 2.0 * k01 * x * y + k11 * y * y))
    r = math.exp(-(k01 * x + k11 * y) * dv - 0.5 * k11 * dv * dv)
    return e, r, y


_TINY = 1e-280  # the walk stays within float64's normal range, far from under- and overflow
_HUGE = 1e280
# the walk only where a pixel step changes q by less than this: each factor's exponent carries its
# rounding into the product (~|exponent| x 1e-16), so needles a fraction of a pixel thin (no PSF:
# factors of e^+-1000 that cancel) are evaluated row by row; with a PSF q's steps stay below ~4
_WALK_CURVATURE = 16.0


@njit(**_JIT)
def _walk_none():
    """The state of :func:`_row_start` before a pair's first row."""
    return (0, 0, 0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)


@njit(inline="always", **_JIT)
def _row_start(st, a, b_lo, x, mv_, k00, k01, k11, r2, du, dv):
    """:func:`_row_exp` of row a of a pair, for the pair's rows in order: the first row's two exp()
    directly, a later row's by walking from the last row's first column, four multiplies a step
    (the exponent of exp(-q/2) is quadratic in the pixel, so its ratios between neighbours change by
    constant factors: down a row e *= p, then along the row e *= r or e /= r). Two exp() a row were
    40 % of the forward render's time (benchmarks/SPEED.md, session 22). ``st``: this function's
    state, :func:`_walk_none` before the pair's first row. Returns (e, r, y, state)."""
    y = b_lo * dv - mv_
    n, a_w, b_w, E, R, IR, P, p2, kap, ikap, ir2, x_w, y_w = st
    if n == 1 and k00 * du * du < _WALK_CURVATURE and k11 * dv * dv < _WALK_CURVATURE and _TINY < R < _HUGE:
        # a second row: the walk's constants, from the first row (else each row directly)
        n = 2
        IR = 1.0 / R
        P = math.exp(-(k00 * x_w + k01 * y_w) * du - 0.5 * k00 * du * du)
        p2 = math.exp(-k00 * du * du)
        kap = math.exp(-k01 * du * dv)
        ikap = 1.0 / kap
        ir2 = 1.0 / r2
    if n == 2:
        for _ in range(a - a_w):  # down the column b_w: the row ratios change by kap, p by p2
            E *= P
            R *= kap
            IR *= ikap
            P *= p2
        for _ in range(b_lo - b_w):  # right along the row
            E *= R
            P *= kap
            R *= r2
            IR *= ir2
        for _ in range(b_w - b_lo):  # left along the row
            R *= ir2
            IR *= r2
            E *= IR
            P *= ikap
        # a walk that left float64's normal range on the way: start again from this row
        if E > _TINY and IR < _HUGE:
            return E, R, y, (2, a, b_lo, E, R, IR, P, p2, kap, ikap, ir2, x, y)
    E, R, _ = _row_exp(x, b_lo, mv_, k00, k01, k11, dv)
    return E, R, y, (1, a, b_lo, E, R, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, x, y)


def raster_forward(ns, height, width, nband, s_off, s_idx, p_dat, p_rows, du, dv, spans, has_spans):
    out = np.zeros((ns, height, width))
    parallel_range(
        _raster_forward, ns * nband, height, width, nband, s_off, s_idx, p_dat, p_rows, du, dv, spans, has_spans, out
    )
    return out


@njit(**_JIT)
def _raster_forward(u0, u1, height, width, nband, s_off, s_idx, p_dat, p_rows, du, dv, spans, has_spans, out):
    """Row bands u0 .. u1 - 1 (band u: slice u // nband) of :func:`raster_forward`."""
    idv = 1.0 / dv
    bh = (height + nband - 1) // nband
    for u in range(u0, u1):
        s = u // nband
        r0 = (u % nband) * bh
        r1 = min(r0 + bh, height)
        img = out[s]
        for t in range(s_off[s], s_off[s + 1]):
            p = s_idx[t]
            a0 = max(p_rows[p, 0], r0)
            a1 = min(p_rows[p, 1] + 1, r1)
            if a1 <= a0:
                continue
            mu_ = p_dat[p, 0]
            mv_ = p_dat[p, 1]
            k00 = p_dat[p, 2]
            k01 = p_dat[p, 3]
            k11 = p_dat[p, 4]
            alpha = p_dat[p, 5]
            thr = p_dat[p, 6]
            r2 = math.exp(-k11 * dv * dv)
            kd, ik11 = _ellipse(k00, k01, k11)
            walk = _walk_none()
            for a in range(a0, a1):
                b_lo, b_hi, x = _row_span(a, s, mu_, mv_, k01, k11, kd, ik11, thr, du, idv, width, spans, has_spans)
                if b_hi <= b_lo:
                    continue
                e, r, y, walk = _row_start(walk, a, b_lo, x, mv_, k00, k01, k11, r2, du, dv)
                e *= alpha
                row = img[a]
                b0 = uint64(b_lo)
                for j in range(uint64(b_hi - b_lo)):
                    row[b0 + j] += e
                    e *= r
                    r *= r2


# A render's pose channels: what the Levenberg-Marquardt pose fit needs of a slice's pixels to
# differentiate them with respect to the slice's rigid pose (recon/slices.py::slice_pose_jacobian),
# in one pass instead of one render per pose parameter. Per pixel, with v a pair's term
# alpha exp(-q/2), r the pixel's slice-frame offset from the Gaussian's centre, C its slice-frame
# covariance (PSF added) and q3 = C^-1 r: the value sum v, the gradient sum -v q3 (3) with respect
# to the pixel's position in the slice frame, and the off-diagonal entries (uv, un, vn) of the
# gradient sum v/2 (q3 q3^T - C^-1) with respect to C (the PSF turns with the slice).
POSE_CHANNELS = 7


def raster_pose_channels(
    ns, height, width, nband, s_off, s_idx, p_dat, p_rows, p_g, mu, sig, org, ax, psf2, du, dv, spans, has_spans
):  # fmt: skip
    """The pose channels [ns, height, width, 7] of every slice's pixels (see ``POSE_CHANNELS``):
    row bands like :func:`raster_forward` (channel 0 is its image, the same bits); ``p_g``: each
    pair's Gaussian (:func:`pair_gaussians`)."""
    out = np.zeros((ns, height, width, POSE_CHANNELS))
    parallel_range(
        _raster_pose_channels, ns * nband,
        height, width, nband, s_off, s_idx, p_dat, p_rows, p_g, mu, sig, org, ax, psf2, du, dv, spans, has_spans, out,
    )  # fmt: skip
    return out


@njit(**_JIT)
def _raster_pose_channels(
    u0, u1, height, width, nband, s_off, s_idx, p_dat, p_rows, p_g, mu, sig, org, ax, psf2, du, dv, spans, has_spans,
    out,
):  # fmt: skip
    """Row bands u0 .. u1 - 1 of :func:`raster_pose_channels`. In the plane the pair's C^-1 r is
    (K (x, y), pnu x + pnv y - d_n / C_nn), x, y the pixel's offset from the pair's 2D centre, K its
    conic (the in-plane block of C^-1) and (pnu, pnv) = -K C_{uv,n} / C_nn the rest of C^-1's
    through-plane row."""
    idv = 1.0 / dv
    bh = (height + nband - 1) // nband
    for u in range(u0, u1):
        s = u // nband
        r0 = (u % nband) * bh
        r1 = min(r0 + bh, height)
        img = out[s]
        for t in range(s_off[s], s_off[s + 1]):
            p = s_idx[t]
            a0 = max(p_rows[p, 0], r0)
            a1 = min(p_rows[p, 1] + 1, r1)
            if a1 <= a0:
                continue
            mu_ = p_dat[p, 0]
            mv_ = p_dat[p, 1]
            k00 = p_dat[p, 2]
            k01 = p_dat[p, 3]
            k11 = p_dat[p, 4]
            alpha = p_dat[p, 5]
            thr = p_dat[p, 6]
            d0, d1, d2, c00, c01, c02, c11, c12, c22 = _project(mu, sig, p_g[p], org, ax, psf2, s)
            ia = c02 / c22
            ib = c12 / c22
            pnu = -(k00 * ia + k01 * ib)
            pnv = -(k01 * ia + k11 * ib)
            zn = d2 / c22
            r2 = math.exp(-k11 * dv * dv)
            kd, ik11 = _ellipse(k00, k01, k11)
            walk = _walk_none()
            for a in range(a0, a1):
                b_lo, b_hi, x = _row_span(a, s, mu_, mv_, k01, k11, kd, ik11, thr, du, idv, width, spans, has_spans)
                if b_hi <= b_lo:
                    continue
                e, r, y, walk = _row_start(walk, a, b_lo, x, mv_, k00, k01, k11, r2, du, dv)
                e *= alpha
                qu0 = k00 * x
                qv0 = k01 * x
                qn0 = pnu * x - zn
                row = img[a]
                b0 = uint64(b_lo)
                for j in range(uint64(b_hi - b_lo)):
                    qu = qu0 + k01 * y
                    qv = qv0 + k11 * y
                    qn = qn0 + pnv * y
                    he = 0.5 * e
                    px = row[b0 + j]
                    px[0] += e
                    px[1] -= e * qu
                    px[2] -= e * qv
                    px[3] -= e * qn
                    px[4] += he * (qu * qv - k01)
                    px[5] += he * (qu * qn - pnu)
                    px[6] += he * (qv * qn - pnv)
                    e *= r
                    r *= r2
                    y += dv


@njit(inline="always", **_JIT)
def _pair_moments(gimg, a0, a1, s, mu_, mv_, k00, k01, k11, thr, du, dv, idv, width, spans, has_spans, second):
    """The loss gradient image ``gimg`` of slice ``s`` summed against one projected 2D Gaussian's
    pixels and their first and (with ``second``) second moments in the pixel offsets (x along rows,
    y along columns): (S0, Sx, Sy, Sxx, Sxy, Syy), the second moments 0 without ``second``. Inlined,
    so that a caller's constant ``second`` compiles its own loop (the centres' gradient alone: their
    backward pass 16 % faster without the second moments, benchmarks/SPEED.md session 22)."""
    r2 = math.exp(-k11 * dv * dv)
    kd, ik11 = _ellipse(k00, k01, k11)
    S0 = 0.0
    Sx = 0.0
    Sy = 0.0
    Sxx = 0.0
    Sxy = 0.0
    Syy = 0.0
    walk = _walk_none()
    for a in range(a0, a1 + 1):
        b_lo, b_hi, x = _row_span(a, s, mu_, mv_, k01, k11, kd, ik11, thr, du, idv, width, spans, has_spans)
        if b_hi <= b_lo:
            continue
        e, r, y, walk = _row_start(walk, a, b_lo, x, mv_, k00, k01, k11, r2, du, dv)
        R0 = 0.0
        R1 = 0.0
        R2 = 0.0
        grow = gimg[a]
        b0 = uint64(b_lo)
        for j in range(uint64(b_hi - b_lo)):
            ge = grow[b0 + j] * e
            R0 += ge
            R1 += ge * y
            if second:
                R2 += ge * y * y
            e *= r
            r *= r2
            y += dv
        S0 += R0
        Sx += x * R0
        Sy += R1
        if second:
            Sxx += x * x * R0
            Sxy += x * R1
            Syy += R2
    return S0, Sx, Sy, Sxx, Sxy, Syy


@njit(**_JIT)
def _pair_gradient(mu, sig, w, i, org, ax, psf2, s, alpha, k00, k01, k11, S0, Sx, Sy, Sxx, Sxy, Syy, buf):
    """The chain rule from one (Gaussian i, slice s) pair's pixel moments back to the Gaussian's
    centre, covariance and weight, and to the slice's frame (added to ``buf[s]``): returns the
    pair's terms of the gradients of mu [3], of the covariance's six entries and of w."""
    # --- gradients w.r.t. the 2D Gaussian (alpha, m, K)
    g_alpha = S0
    gk00 = -0.5 * alpha * Sxx
    gk01 = -alpha * Sxy
    gk11 = -0.5 * alpha * Syy
    gmu_ = alpha * (k00 * Sx + k01 * Sy)
    gmv_ = alpha * (k01 * Sx + k11 * Sy)
    # --- recompute the projection
    d0, d1, d2, c00, c01, c02, c11, c12, c22 = _project(mu, sig, i, org, ax, psf2, s)
    ia, ib, ca, cb, cc, det = _conic(c00, c01, c02, c11, c12, c22)
    # K = inv([[ca, cb], [cb, cc]]); dL/dCc = -K G K with G = [[gk00, gk01/2], [., gk11]]
    h01 = 0.5 * gk01
    x00 = k00 * gk00 + k01 * h01
    x01 = k00 * h01 + k01 * gk11
    x10 = k01 * gk00 + k11 * h01
    x11 = k01 * h01 + k11 * gk11
    gca = -(x00 * k00 + x01 * k01)
    gcb = -2.0 * (x00 * k01 + x01 * k11)
    gcc = -(x10 * k01 + x11 * k11)
    # alpha = w exp(-z2/2) / sqrt(det * c22)
    gl = g_alpha * alpha
    if w[i] != 0.0:
        dw = g_alpha * alpha / w[i]
    else:
        dw = g_alpha * math.exp(-0.5 * d2 * d2 / c22) / math.sqrt(det * c22)
    gca += -0.5 * gl * cc / det
    gcc += -0.5 * gl * ca / det
    gcb += gl * cb / det
    gc22 = -0.5 * gl / c22 + 0.5 * gl * d2 * d2 / (c22 * c22)
    gd2 = -gl * d2 / c22
    # m = (d0 - ia d2, d1 - ib d2)
    gd0 = gmu_
    gd1 = gmv_
    gd2 += -(gmu_ * ia + gmv_ * ib)
    gc02 = -gmu_ * d2 / c22
    gc12 = -gmv_ * d2 / c22
    gc22 += (gmu_ * ia + gmv_ * ib) * d2 / c22
    # Cc(C)
    gc00 = gca
    gc01 = gcb
    gc11 = gcc
    gc02 += -2.0 * gca * ia - gcb * ib
    gc12 += -gcb * ia - 2.0 * gcc * ib
    gc22 += gca * ia * ia + gcb * ia * ib + gcc * ib * ib
    # symmetric matrix gradient G of C
    G00 = gc00
    G11 = gc11
    G22 = gc22
    G01 = 0.5 * gc01
    G02 = 0.5 * gc02
    G12 = 0.5 * gc12
    # C = A Sigma A^T + D: dSigma = A^T G A ; dA += 2 G A Sigma
    A00 = ax[s, 0, 0]
    A01 = ax[s, 0, 1]
    A02 = ax[s, 0, 2]
    A10 = ax[s, 1, 0]
    A11 = ax[s, 1, 1]
    A12 = ax[s, 1, 2]
    A20 = ax[s, 2, 0]
    A21 = ax[s, 2, 1]
    A22 = ax[s, 2, 2]
    # U = G A  (3x3)
    u00 = G00 * A00 + G01 * A10 + G02 * A20
    u01 = G00 * A01 + G01 * A11 + G02 * A21
    u02 = G00 * A02 + G01 * A12 + G02 * A22
    u10 = G01 * A00 + G11 * A10 + G12 * A20
    u11 = G01 * A01 + G11 * A11 + G12 * A21
    u12 = G01 * A02 + G11 * A12 + G12 * A22
    u20 = G02 * A00 + G12 * A10 + G22 * A20
    u21 = G02 * A01 + G12 * A11 + G22 * A21
    u22 = G02 * A02 + G12 * A12 + G22 * A22
    # A^T U
    m00 = A00 * u00 + A10 * u10 + A20 * u20
    m01 = A00 * u01 + A10 * u11 + A20 * u21
    m02 = A00 * u02 + A10 * u12 + A20 * u22
    m11 = A01 * u01 + A11 * u11 + A21 * u21
    m12 = A01 * u02 + A11 * u12 + A21 * u22
    m22 = A02 * u02 + A12 * u12 + A22 * u22
    s00 = sig[i, 0]
    s01 = sig[i, 1]
    s02 = sig[i, 2]
    s11 = sig[i, 3]
    s12 = sig[i, 4]
    s22 = sig[i, 5]
    dx = mu[i, 0] - org[s, 0]
    dy = mu[i, 1] - org[s, 1]
    dz = mu[i, 2] - org[s, 2]
    # dA = 2 U Sigma + gd (x) delta
    buf[s, 3] += 2.0 * (u00 * s00 + u01 * s01 + u02 * s02) + gd0 * dx
    buf[s, 4] += 2.0 * (u00 * s01 + u01 * s11 + u02 * s12) + gd0 * dy
    buf[s, 5] += 2.0 * (u00 * s02 + u01 * s12 + u02 * s22) + gd0 * dz
    buf[s, 6] += 2.0 * (u10 * s00 + u11 * s01 + u12 * s02) + gd1 * dx
    buf[s, 7] += 2.0 * (u10 * s01 + u11 * s11 + u12 * s12) + gd1 * dy
    buf[s, 8] += 2.0 * (u10 * s02 + u11 * s12 + u12 * s22) + gd1 * dz
    buf[s, 9] += 2.0 * (u20 * s00 + u21 * s01 + u22 * s02) + gd2 * dx
    buf[s, 10] += 2.0 * (u20 * s01 + u21 * s11 + u22 * s12) + gd2 * dy
    buf[s, 11] += 2.0 * (u20 * s02 + u21 * s12 + u22 * s22) + gd2 * dz
    # d = A (mu - o)
    q0 = A00 * gd0 + A10 * gd1 + A20 * gd2
    q1 = A01 * gd0 + A11 * gd1 + A21 * gd2
    q2 = A02 * gd0 + A12 * gd1 + A22 * gd2
    buf[s, 0] -= q0
    buf[s, 1] -= q1
    buf[s, 2] -= q2
    return q0, q1, q2, m00, 2.0 * m01, 2.0 * m02, m11, 2.0 * m12, m22, dw


def raster_backward(
    grad, order, goff, gcnt, p_sl, p_dat, p_rows, mu, sig, w, org, ax, psf2, du, dv, spans, has_spans, nchunk
):
    n = order.shape[0]
    ns = org.shape[0]
    g_mu = np.zeros((n, 3))
    g_sig = np.zeros((n, 6))
    g_w = np.zeros(n)
    g_sl = np.zeros((nchunk, ns, 12))
    parallel_range(
        _raster_backward, nchunk,
        grad, order, goff, gcnt, p_sl, p_dat, p_rows, mu, sig, w, org, ax, psf2, du, dv, spans, has_spans, nchunk,
        g_mu, g_sig, g_w, g_sl,
    )  # fmt: skip
    g_slices = sum_chunks(g_sl.reshape(nchunk, ns * 12)).reshape(ns, 12)  # in chunk order
    return g_mu, g_sig, g_w, g_slices


@njit(**_JIT)
def _raster_backward(
    ch0, ch1, grad, order, goff, gcnt, p_sl, p_dat, p_rows, mu, sig, w, org, ax, psf2, du, dv, spans, has_spans, nchunk,
    g_mu, g_sig, g_w, g_sl,
):  # fmt: skip
    """Chunks ch0 .. ch1 - 1 of :func:`raster_backward`'s sorted Gaussians (the slices' gradients in
    the chunks' own rows of g_sl)."""
    n = order.shape[0]
    width = grad.shape[2]
    idv = 1.0 / dv
    per = (n + nchunk - 1) // nchunk
    for ch in range(ch0, ch1):
        buf = g_sl[ch]
        for t in range(ch * per, min((ch + 1) * per, n)):
            i = order[t]
            gm0 = 0.0
            gm1 = 0.0
            gm2 = 0.0
            gs0 = 0.0
            gs1 = 0.0
            gs2 = 0.0
            gs3 = 0.0
            gs4 = 0.0
            gs5 = 0.0
            gww = 0.0
            for p in range(goff[t], goff[t] + gcnt[t]):
                s = p_sl[p]
                mu_ = p_dat[p, 0]
                mv_ = p_dat[p, 1]
                k00 = p_dat[p, 2]
                k01 = p_dat[p, 3]
                k11 = p_dat[p, 4]
                alpha = p_dat[p, 5]
                thr = p_dat[p, 6]
                S0, Sx, Sy, Sxx, Sxy, Syy = _pair_moments(
                    grad[s],
                    p_rows[p, 0],
                    p_rows[p, 1],
                    s,
                    mu_,
                    mv_,
                    k00,
                    k01,
                    k11,
                    thr,
                    du,
                    dv,
                    idv,
                    width,
                    spans,
                    has_spans,
                    True,
                )
                if S0 == 0.0 and Sx == 0.0 and Sy == 0.0 and Sxx == 0.0 and Sxy == 0.0 and Syy == 0.0:
                    continue
                q0, q1, q2, d0, d1, d2, d3, d4, d5, dw = _pair_gradient(
                    mu, sig, w, i, org, ax, psf2, s, alpha, k00, k01, k11, S0, Sx, Sy, Sxx, Sxy, Syy, buf
                )
                gww += dw
                gs0 += d0
                gs1 += d1
                gs2 += d2
                gs3 += d3
                gs4 += d4
                gs5 += d5
                gm0 += q0
                gm1 += q1
                gm2 += q2
            g_mu[i, 0] = gm0
            g_mu[i, 1] = gm1
            g_mu[i, 2] = gm2
            g_sig[i, 0] = gs0
            g_sig[i, 1] = gs1
            g_sig[i, 2] = gs2
            g_sig[i, 3] = gs3
            g_sig[i, 4] = gs4
            g_sig[i, 5] = gs5
            g_w[i] = gww


def raster_backward_means(
    grad, order, goff, gcnt, p_sl, p_dat, p_rows, mu, sig, org, ax, psf2, du, dv, spans, has_spans, nchunk
):
    """:func:`raster_backward`'s gradient of the centres alone (the shapes, weights and slice frames
    held): the pixels' first moments and the chain rule through the slice-frame offset d = A (mu - o)
    and the amplitude's through-plane factor, without the covariances' chain rule. The same sums in
    the same order as that kernel's centres, so the same bits."""
    g_mu = np.zeros((order.shape[0], 3))
    parallel_range(
        _raster_backward_means, nchunk,
        grad, order, goff, gcnt, p_sl, p_dat, p_rows, mu, sig, org, ax, psf2, du, dv, spans, has_spans, nchunk, g_mu,
    )  # fmt: skip
    return g_mu


@njit(**_JIT)
def _raster_backward_means(
    ch0, ch1, grad, order, goff, gcnt, p_sl, p_dat, p_rows, mu, sig, org, ax, psf2, du, dv, spans, has_spans, nchunk,
    g_mu,
):  # fmt: skip
    """Chunks ch0 .. ch1 - 1 of :func:`raster_backward_means`."""
    n = order.shape[0]
    width = grad.shape[2]
    idv = 1.0 / dv
    per = (n + nchunk - 1) // nchunk
    for ch in range(ch0, ch1):
        for t in range(ch * per, min((ch + 1) * per, n)):
            i = order[t]
            gm0 = 0.0
            gm1 = 0.0
            gm2 = 0.0
            for p in range(goff[t], goff[t] + gcnt[t]):
                s = p_sl[p]
                mv_ = p_dat[p, 1]
                k00 = p_dat[p, 2]
                k01 = p_dat[p, 3]
                k11 = p_dat[p, 4]
                alpha = p_dat[p, 5]
                S0, Sx, Sy, _, _, _ = _pair_moments(
                    grad[s], p_rows[p, 0], p_rows[p, 1], s, p_dat[p, 0], mv_, k00, k01, k11, p_dat[p, 6], du, dv, idv,
                    width, spans, has_spans, False,
                )  # fmt: skip
                if S0 == 0.0 and Sx == 0.0 and Sy == 0.0:
                    continue
                gmu_ = alpha * (k00 * Sx + k01 * Sy)
                gmv_ = alpha * (k01 * Sx + k11 * Sy)
                d0, d1, d2, c00, c01, c02, c11, c12, c22 = _project(mu, sig, i, org, ax, psf2, s)
                ia = c02 / c22
                ib = c12 / c22
                gl = S0 * alpha
                gd2 = -gl * d2 / c22
                gd2 += -(gmu_ * ia + gmv_ * ib)
                gm0 += ax[s, 0, 0] * gmu_ + ax[s, 1, 0] * gmv_ + ax[s, 2, 0] * gd2
                gm1 += ax[s, 0, 1] * gmu_ + ax[s, 1, 1] * gmv_ + ax[s, 2, 1] * gd2
                gm2 += ax[s, 0, 2] * gmu_ + ax[s, 1, 2] * gmv_ + ax[s, 2, 2] * gd2
            g_mu[i, 0] = gm0
            g_mu[i, 1] = gm1
            g_mu[i, 2] = gm2


def count_pixel_pairs(s_off, s_idx, p_dat, p_rows, p_sl, du, dv, width, spans, has_spans):
    """Number of (pixel, Gaussian) terms evaluated by raster_forward (for benchmarks)."""
    terms = np.zeros(s_idx.shape[0], np.int64)
    parallel_range(_pixel_pairs, s_idx.shape[0], s_idx, p_dat, p_rows, p_sl, du, dv, width, spans, has_spans, terms)
    return int(terms.sum())


@njit(**_JIT)
def _pixel_pairs(u0, u1, s_idx, p_dat, p_rows, p_sl, du, dv, width, spans, has_spans, terms):
    """terms[u] = the pixels of slice-ordered pair u, for u in u0 .. u1 - 1."""
    for u in range(u0, u1):
        p = s_idx[u]
        s = p_sl[p]
        k = 0
        kd, ik11 = _ellipse(p_dat[p, 2], p_dat[p, 3], p_dat[p, 4])
        for a in range(p_rows[p, 0], p_rows[p, 1] + 1):
            b_lo, b_hi, x = _row_span(
                a,
                s,
                p_dat[p, 0],
                p_dat[p, 1],
                p_dat[p, 3],
                p_dat[p, 4],
                kd,
                ik11,
                p_dat[p, 6],
                du,
                1.0 / dv,
                width,
                spans,
                has_spans,
            )
            if b_hi > b_lo:
                k += b_hi - b_lo
        terms[u] = k


# ----------------------------------------------------------------------------------------------
# design: the slices' render as an explicit sparse linear map of the intensities. With the means,
# scales, rotations, slice poses and PSF fixed, pixel = sum_i c_i B_i(pixel); the conjugate-gradient
# fits of the intensities apply that map and its transpose dozens of times, so its terms are
# evaluated once (by the recurrence of raster_forward) and stored: per slice-ordered pair q its
# Gaussian, first row and value offset; per row its first column and length; per term its value.


@njit(**_JIT)
def pair_gaussians(order, goff, gcnt, nbound):
    """Original Gaussian index of every pair slot (-1 for unused slots of the upper bound)."""
    out = np.full(nbound, -1, np.int32)
    for t in range(order.shape[0]):
        for p in range(goff[t], goff[t] + gcnt[t]):
            out[p] = order[t]
    return out


# A design term is exp(-q/2) <= 1 times its pair's amplitude: stored as a 16-bit fraction of that
# amplitude (half the bytes of float32; the absolute error of a term is <= 0.5 / 65535 of the
# amplitude, a relative error of a render ~1e-5; mni-t4 at 1 mm: 3.1 -> 1.6 GB of maps)
_U16_MAX = 65535
_U16_STEP = 1.0 / _U16_MAX


@njit(**_JIT)
def _to_u16(e):
    return min(int(e * _U16_MAX + 0.5), _U16_MAX)


def design_count(ns, height, width, s_off, s_idx, p_dat, p_rows, du, dv, spans, has_spans):
    """Rows and terms of every slice-ordered pair q (the rows a0..a1 of its ellipse; a row may be
    empty). Returns (nrow [Q], nval [Q])."""
    nrow = np.zeros(s_off[ns], np.int64)
    nval = np.zeros(s_off[ns], np.int64)
    parallel_range(_design_count, ns, height, width, s_off, s_idx, p_dat, p_rows, du, dv, spans, has_spans, nrow, nval)
    return nrow, nval


@njit(**_JIT)
def _design_count(s0, s1, height, width, s_off, s_idx, p_dat, p_rows, du, dv, spans, has_spans, nrow, nval):
    """:func:`design_count` for slices s0 .. s1 - 1."""
    idv = 1.0 / dv
    for s in range(s0, s1):
        for q in range(s_off[s], s_off[s + 1]):
            p = s_idx[q]
            a0 = max(p_rows[p, 0], 0)
            a1 = min(p_rows[p, 1], height - 1)
            if a1 < a0:
                continue
            k = 0
            kd, ik11 = _ellipse(p_dat[p, 2], p_dat[p, 3], p_dat[p, 4])
            for a in range(a0, a1 + 1):
                b_lo, b_hi, x = _row_span(
                    a,
                    s,
                    p_dat[p, 0],
                    p_dat[p, 1],
                    p_dat[p, 3],
                    p_dat[p, 4],
                    kd,
                    ik11,
                    p_dat[p, 6],
                    du,
                    idv,
                    width,
                    spans,
                    has_spans,
                )
                if b_hi > b_lo:
                    k += b_hi - b_lo
            nrow[q] = a1 - a0 + 1
            nval[q] = k


def design_fill(
    ns,
    height,
    width,
    s_off,
    s_idx,
    p_dat,
    p_rows,
    p_gauss,
    du,
    dv,
    spans,
    has_spans,
    roff,
    voff,
    q_g,
    q_a0,
    q_amp,
    rows,
    vals,
):
    """Fill the design of design_count's sizes (roff / voff: exclusive prefix sums, length Q + 1)."""
    parallel_range(
        _design_fill, ns,
        height, width, s_off, s_idx, p_dat, p_rows, p_gauss, du, dv, spans, has_spans, roff, voff, q_g, q_a0, q_amp,
        rows, vals,
    )  # fmt: skip


@njit(**_JIT)
def _design_fill(
    s0, s1, height, width, s_off, s_idx, p_dat, p_rows, p_gauss, du, dv, spans, has_spans, roff, voff, q_g, q_a0,
    q_amp, rows, vals,
):  # fmt: skip
    """:func:`design_fill` for slices s0 .. s1 - 1."""
    idv = 1.0 / dv
    for s in range(s0, s1):
        for q in range(s_off[s], s_off[s + 1]):
            p = s_idx[q]
            q_g[q] = p_gauss[p]
            a0 = max(p_rows[p, 0], 0)
            q_a0[q] = a0
            q_amp[q] = p_dat[p, 5] * _U16_STEP  # the pair's amplitude alpha, per 16-bit unit
            if roff[q + 1] == roff[q]:
                continue
            mu_ = p_dat[p, 0]
            mv_ = p_dat[p, 1]
            k00 = p_dat[p, 2]
            k01 = p_dat[p, 3]
            k11 = p_dat[p, 4]
            thr = p_dat[p, 6]
            r2 = math.exp(-k11 * dv * dv)
            kd, ik11 = _ellipse(k00, k01, k11)
            k = voff[q]
            r_ = roff[q]
            walk = _walk_none()
            for a in range(a0, a0 + roff[q + 1] - roff[q]):
                b_lo, b_hi, x = _row_span(a, s, mu_, mv_, k01, k11, kd, ik11, thr, du, idv, width, spans, has_spans)
                if b_hi <= b_lo:
                    rows[r_, 0] = 0
                    rows[r_, 1] = 0
                    r_ += 1
                    continue
                rows[r_, 0] = b_lo
                rows[r_, 1] = b_hi - b_lo
                r_ += 1
                e, r, _, walk = _row_start(walk, a, b_lo, x, mv_, k00, k01, k11, r2, du, dv)
                for b in range(b_lo, b_hi):
                    vals[k] = _to_u16(e)
                    k += 1
                    e *= r
                    r *= r2


# The design products index with unsigned integers: Numba wraps a negative signed index around (a
# compare and a select on every array access), an unsigned one cannot be negative. Every index here
# is >= 0 by construction. The same additions in the same order (the same bits); the products
# 0.60 -> 0.41 s (139M terms, one thread, benchmarks/SPEED.md session 23).


@njit(**_JIT)
def _design_add(img, s, c, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals):
    """img [H,W] += slice s of the design applied to intensities c."""
    for q in range(uint64(s_off[s]), uint64(s_off[s + 1])):
        ci = c[uint64(q_g[q])] * q_amp[q]
        if ci == 0.0:
            continue
        k = uint64(voff[q])
        a = uint64(q_a0[q])
        for r_ in range(uint64(roff[q]), uint64(roff[q + 1])):
            b0 = uint64(rows[r_, 0])
            n = uint64(rows[r_, 1])
            row = img[a]
            for j in range(n):
                row[b0 + j] += ci * vals[k + j]
            k += n
            a += uint64(1)


@njit(**_JIT)
def _design_dot(img, s, acc_g, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals):
    """acc_g [N] += the transpose of slice s of the design applied to img [H,W]."""
    for q in range(uint64(s_off[s]), uint64(s_off[s + 1])):
        k = uint64(voff[q])
        a = uint64(q_a0[q])
        acc = 0.0
        for r_ in range(uint64(roff[q]), uint64(roff[q + 1])):
            b0 = uint64(rows[r_, 0])
            n = uint64(rows[r_, 1])
            row = img[a]
            for j in range(n):
                acc += vals[k + j] * row[b0 + j]
            k += n
            a += uint64(1)
        acc_g[uint64(q_g[q])] += acc * q_amp[q]


@njit(**_JIT)
def _chunk_start(ch, ns, nchunk):
    """First slice of chunk ``ch`` when ``ns`` slices are spread evenly over ``nchunk`` chunks:
    with fewer slices than chunks the empty chunks are interleaved, so that each contiguous block of
    chunks (:func:`parallel_range`'s unit of work) holds its share of the slices (4 slices in 8
    chunks, 2 blocks: 2 and 2, where filling the first chunks gave 4 and 0)."""
    return (ch * ns + nchunk - 1) // nchunk


def sum_chunks(buf):
    """Sum of the per-chunk buffers [C, N] (in chunk order), over blocks of the N sums in parallel
    (mni-t4's 2M-long sums: ~17 ms each on one thread, 130 a fit)."""
    out = np.empty(buf.shape[1])
    parallel_range(_sum_chunks, buf.shape[1], buf, out)
    return out


@njit(**_JIT)
def _sum_chunks(i0, i1, buf, out):
    """:func:`sum_chunks` for the sums i0 .. i1 - 1."""
    for i in range(i0, i1):
        acc = 0.0
        for ch in range(buf.shape[0]):
            acc += buf[ch, i]
        out[i] = acc


def design_matvec(ns, height, width, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, c):
    """Images [S,H,W] = the design applied to intensities c [N] (parallel over slices)."""
    out = np.zeros((ns, height, width))
    parallel_range(_design_matvec, ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, c, out)
    return out


@njit(**_JIT)
def _design_matvec(s0, s1, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, c, out):
    for s in range(s0, s1):
        _design_add(out[s], s, c, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals)


def design_rmatvec(ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, img, buf):
    """The transpose: per Gaussian, sum over its terms of value x img, added to the per-chunk
    buffers ``buf`` [C, N] (race-free; the caller sums them: :func:`sum_chunks`)."""
    parallel_range(_design_rmatvec, buf.shape[0], ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, img, buf)


@njit(**_JIT)
def _design_rmatvec(ch0, ch1, ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, img, buf):
    nchunk = buf.shape[0]
    for ch in range(ch0, ch1):
        for s in range(_chunk_start(ch, ns, nchunk), _chunk_start(ch + 1, ns, nchunk)):
            _design_dot(img[s], s, buf[ch], s_off, q_g, q_a0, q_amp, roff, voff, rows, vals)


def design_normal(ns, height, width, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, c, weight, buf):
    """A^T diag(weight) A c in one pass over the slices (each slice's image in a local buffer),
    added to the per-chunk buffers ``buf`` [C, N]."""
    parallel_range(
        _design_normal, buf.shape[0], ns, height, width, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, c, weight, buf
    )


@njit(**_JIT)
def _design_normal(ch0, ch1, ns, height, width, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, c, weight, buf):
    nchunk = buf.shape[0]
    for ch in range(ch0, ch1):
        img = np.empty((height, width))
        for s in range(_chunk_start(ch, ns, nchunk), _chunk_start(ch + 1, ns, nchunk)):
            img[:, :] = 0.0
            _design_add(img, s, c, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals)
            ws = weight[s]
            for a in range(height):
                for b in range(width):
                    img[a, b] *= ws[a, b]
            _design_dot(img, s, buf[ch], s_off, q_g, q_a0, q_amp, roff, voff, rows, vals)


@njit(**_JIT)
def _design_dot_sq(weight, s, acc_g, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals):
    """acc_g [N] += sum over slice s's terms of weight x value^2 (the diagonal of A^T W A)."""
    for q in range(uint64(s_off[s]), uint64(s_off[s + 1])):
        k = uint64(voff[q])
        a = uint64(q_a0[q])
        acc = 0.0
        for r_ in range(uint64(roff[q]), uint64(roff[q + 1])):
            b0 = uint64(rows[r_, 0])
            n = uint64(rows[r_, 1])
            row = weight[a]
            for j in range(n):
                v = float(vals[k + j])
                acc += v * v * row[b0 + j]
            k += n
            a += uint64(1)
        acc_g[uint64(q_g[q])] += acc * q_amp[q] * q_amp[q]


def design_diag_normal(ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, weight, buf):
    """diag(A^T diag(weight) A) [N]: per Gaussian, sum over its terms of weight x value^2 (each
    pixel holds at most one term of a Gaussian, so this is exact), added to the per-chunk buffers
    ``buf`` [C, N]."""
    parallel_range(_design_diag_normal, buf.shape[0], ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, weight, buf)


@njit(**_JIT)
def _design_diag_normal(ch0, ch1, ns, s_off, q_g, q_a0, q_amp, roff, voff, rows, vals, weight, buf):
    nchunk = buf.shape[0]
    for ch in range(ch0, ch1):
        for s in range(_chunk_start(ch, ns, nchunk), _chunk_start(ch + 1, ns, nchunk)):
            _design_dot_sq(weight[s], s, buf[ch], s_off, q_g, q_a0, q_amp, roff, voff, rows, vals)


# ----------------------------------------------------------------------------------------------
# points: the seed's block partitioning (uniform cells anchored at the world origin)


@njit(**_JIT)
def cell_sort(x, cs):
    """Counting sort of points x [n,3] into cells floor(x/cs). Returns (order, start, lo, dims)."""
    n = x.shape[0]
    lo = np.zeros(3, np.int64)
    hi = np.zeros(3, np.int64)
    for k in range(3):
        lo[k] = 1 << 62
        hi[k] = -(1 << 62)
    cc = np.empty((n, 3), np.int64)
    for i in range(n):
        for k in range(3):
            if not math.isfinite(x[i, k]):
                raise ValueError("non-finite coordinate (Gaussian mean or query point)")
            c = int(math.floor(x[i, k] / cs))
            cc[i, k] = c
            if c < lo[k]:
                lo[k] = c
            if c > hi[k]:
                hi[k] = c
    if n == 0:
        for k in range(3):
            lo[k] = 0
            hi[k] = 0
    dims = np.empty(3, np.int64)
    for k in range(3):
        dims[k] = hi[k] - lo[k] + 1
    ncell = dims[0] * dims[1] * dims[2]
    start = np.zeros(ncell + 1, np.int64)
    cid = np.empty(n, np.int64)
    for i in range(n):
        c = ((cc[i, 0] - lo[0]) * dims[1] + (cc[i, 1] - lo[1])) * dims[2] + (cc[i, 2] - lo[2])
        cid[i] = c
        start[c + 1] += 1
    for c in range(ncell):
        start[c + 1] += start[c]
    fillp = start[:-1].copy()
    order = np.empty(n, np.int64)
    for i in range(n):
        order[fillp[cid[i]]] = i
        fillp[cid[i]] += 1
    return order, start, lo, dims, cc


@njit(**_JIT)
def _point_term(mu, sig, i, pts, j, psf, pj):
    """exp(-m2/2)/sqrt(det M), z = M^-1 r, M^-1 (6) for Gaussian i at point j (M = Sigma_i + P)."""
    m00 = sig[i, 0] + psf[pj, 0]
    m01 = sig[i, 1] + psf[pj, 1]
    m02 = sig[i, 2] + psf[pj, 2]
    m11 = sig[i, 3] + psf[pj, 3]
    m12 = sig[i, 4] + psf[pj, 4]
    m22 = sig[i, 5] + psf[pj, 5]
    i00 = m11 * m22 - m12 * m12
    i01 = m02 * m12 - m01 * m22
    i02 = m01 * m12 - m02 * m11
    det = m00 * i00 + m01 * i01 + m02 * i02
    inv = 1.0 / det
    i00 *= inv
    i01 *= inv
    i02 *= inv
    i11 = (m00 * m22 - m02 * m02) * inv
    i12 = (m01 * m02 - m00 * m12) * inv
    i22 = (m00 * m11 - m01 * m01) * inv
    r0 = pts[j, 0] - mu[i, 0]
    r1 = pts[j, 1] - mu[i, 1]
    r2 = pts[j, 2] - mu[i, 2]
    z0 = i00 * r0 + i01 * r1 + i02 * r2
    z1 = i01 * r0 + i11 * r1 + i12 * r2
    z2 = i02 * r0 + i12 * r1 + i22 * r2
    m2 = r0 * z0 + r1 * z1 + r2 * z2
    e = math.exp(-0.5 * m2) / math.sqrt(det)
    return e, z0, z1, z2, i00, i01, i02, i11, i12, i22


def shared_inverses(sig, psf):
    """Per Gaussian (M^-1 as 6 numbers, det(M)^-1/2) for M = Sigma_i + psf[0] (shared PSF)."""
    out = np.empty((sig.shape[0], 7))
    parallel_range(_shared_inverses, sig.shape[0], sig, psf, out)
    return out


@njit(**_JIT)
def _shared_inverses(i0, i1, sig, psf, out):
    for i in range(i0, i1):
        m00 = sig[i, 0] + psf[0, 0]
        m01 = sig[i, 1] + psf[0, 1]
        m02 = sig[i, 2] + psf[0, 2]
        m11 = sig[i, 3] + psf[0, 3]
        m12 = sig[i, 4] + psf[0, 4]
        m22 = sig[i, 5] + psf[0, 5]
        i00 = m11 * m22 - m12 * m12
        i01 = m02 * m12 - m01 * m22
        i02 = m01 * m12 - m02 * m11
        det = m00 * i00 + m01 * i01 + m02 * i02
        inv = 1.0 / det
        out[i, 0] = i00 * inv
        out[i, 1] = i01 * inv
        out[i, 2] = i02 * inv
        out[i, 3] = (m00 * m22 - m02 * m02) * inv
        out[i, 4] = (m01 * m02 - m00 * m12) * inv
        out[i, 5] = (m00 * m11 - m01 * m01) * inv
        out[i, 6] = 1.0 / math.sqrt(det)


@njit(**_JIT)
def _point_term_any(mu, sig, i, pts, j, psf, pj, pre, ginv):
    """_point_term, from the precomputed inverses ginv when the PSF is shared (pre=True)."""
    if not pre:
        return _point_term(mu, sig, i, pts, j, psf, pj)
    i00 = ginv[i, 0]
    i01 = ginv[i, 1]
    i02 = ginv[i, 2]
    i11 = ginv[i, 3]
    i12 = ginv[i, 4]
    i22 = ginv[i, 5]
    r0 = pts[j, 0] - mu[i, 0]
    r1 = pts[j, 1] - mu[i, 1]
    r2 = pts[j, 2] - mu[i, 2]
    z0 = i00 * r0 + i01 * r1 + i02 * r2
    z1 = i01 * r0 + i11 * r1 + i12 * r2
    z2 = i02 * r0 + i12 * r1 + i22 * r2
    m2 = r0 * z0 + r1 * z1 + r2 * z2
    e = math.exp(-0.5 * m2) * ginv[i, 6]
    return e, z0, z1, z2, i00, i01, i02, i11, i12, i22


def points_forward(mu, sig, w, pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad):
    out = np.zeros(pts.shape[0])
    parallel_range(
        _points_forward, pts.shape[0],
        mu, sig, w, pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad, out,
    )  # fmt: skip
    return out


@njit(**_JIT)
def _points_forward(
    j0, j1, mu, sig, w, pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad, out
):
    for j in range(j0, j1):
        pj = j * per_point
        acc = 0.0
        x0 = max(p_cells[j, 0] - rad, g_lo[0])
        x1 = min(p_cells[j, 0] + rad, g_lo[0] + g_dims[0] - 1)
        y0 = max(p_cells[j, 1] - rad, g_lo[1])
        y1 = min(p_cells[j, 1] + rad, g_lo[1] + g_dims[1] - 1)
        z0 = max(p_cells[j, 2] - rad, g_lo[2])
        z1 = min(p_cells[j, 2] + rad, g_lo[2] + g_dims[2] - 1)
        for cx in range(x0, x1 + 1):
            for cy in range(y0, y1 + 1):
                base = ((cx - g_lo[0]) * g_dims[1] + (cy - g_lo[1])) * g_dims[2] - g_lo[2]
                for t in range(g_start[base + z0], g_start[base + z1 + 1]):
                    i = g_order[t]
                    r = _point_term_any(mu, sig, i, pts, j, psf, pj, pre, ginv)
                    acc += w[i] * r[0]
        out[j] = acc


def points_backward_gaussians(
    grad, mu, sig, w, pts, psf, per_point, pre, ginv, g_cells, p_order, p_start, p_lo, p_dims, rad
):
    n = mu.shape[0]
    g_mu = np.zeros((n, 3))
    g_sig = np.zeros((n, 6))
    g_w = np.zeros(n)
    parallel_range(
        _points_backward_gaussians, n,
        grad, mu, sig, w, pts, psf, per_point, pre, ginv, g_cells, p_order, p_start, p_lo, p_dims, rad, g_mu, g_sig, g_w,
    )  # fmt: skip
    return g_mu, g_sig, g_w


@njit(**_JIT)
def _points_backward_gaussians(
    i0, i1, grad, mu, sig, w, pts, psf, per_point, pre, ginv, g_cells, p_order, p_start, p_lo, p_dims, rad, g_mu, g_sig,
    g_w,
):  # fmt: skip
    for i in range(i0, i1):
        x0 = max(g_cells[i, 0] - rad, p_lo[0])
        x1 = min(g_cells[i, 0] + rad, p_lo[0] + p_dims[0] - 1)
        y0 = max(g_cells[i, 1] - rad, p_lo[1])
        y1 = min(g_cells[i, 1] + rad, p_lo[1] + p_dims[1] - 1)
        z0 = max(g_cells[i, 2] - rad, p_lo[2])
        z1 = min(g_cells[i, 2] + rad, p_lo[2] + p_dims[2] - 1)
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        s4 = 0.0
        s5 = 0.0
        gw = 0.0
        for cx in range(x0, x1 + 1):
            for cy in range(y0, y1 + 1):
                base = ((cx - p_lo[0]) * p_dims[1] + (cy - p_lo[1])) * p_dims[2] - p_lo[2]
                for t in range(p_start[base + z0], p_start[base + z1 + 1]):
                    j = p_order[t]
                    pj = j * per_point
                    e, q0, q1, q2, i00, i01, i02, i11, i12, i22 = _point_term_any(
                        mu, sig, i, pts, j, psf, pj, pre, ginv
                    )
                    ge = grad[j] * e
                    gw += ge
                    gv = ge * w[i]
                    a0 += gv * q0
                    a1 += gv * q1
                    a2 += gv * q2
                    h = 0.5 * gv
                    s0 += h * (q0 * q0 - i00)
                    s1 += gv * (q0 * q1 - i01)
                    s2 += gv * (q0 * q2 - i02)
                    s3 += h * (q1 * q1 - i11)
                    s4 += gv * (q1 * q2 - i12)
                    s5 += h * (q2 * q2 - i22)
        g_mu[i, 0] = a0
        g_mu[i, 1] = a1
        g_mu[i, 2] = a2
        g_sig[i, 0] = s0
        g_sig[i, 1] = s1
        g_sig[i, 2] = s2
        g_sig[i, 3] = s3
        g_sig[i, 4] = s4
        g_sig[i, 5] = s5
        g_w[i] = gw


def points_backward_points(
    grad, mu, sig, w, pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad
):
    """dL/dpoints [P,3] and dL/dM [P,6] (symmetric-matrix entries xx,xy,xz,yy,yz,zz of the
    gradient w.r.t. the point's PSF covariance)."""
    npt = pts.shape[0]
    g_p = np.zeros((npt, 3))
    g_m = np.zeros((npt, 6))
    parallel_range(
        _points_backward_points, npt,
        grad, mu, sig, w, pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad, g_p, g_m,
    )  # fmt: skip
    return g_p, g_m


@njit(**_JIT)
def _points_backward_points(
    j0, j1, grad, mu, sig, w, pts, psf, per_point, pre, ginv, g_order, g_start, g_lo, g_dims, p_cells, rad, g_p, g_m
):
    for j in range(j0, j1):
        pj = j * per_point
        x0 = max(p_cells[j, 0] - rad, g_lo[0])
        x1 = min(p_cells[j, 0] + rad, g_lo[0] + g_dims[0] - 1)
        y0 = max(p_cells[j, 1] - rad, g_lo[1])
        y1 = min(p_cells[j, 1] + rad, g_lo[1] + g_dims[1] - 1)
        z0 = max(p_cells[j, 2] - rad, g_lo[2])
        z1 = min(p_cells[j, 2] + rad, g_lo[2] + g_dims[2] - 1)
        a0 = 0.0
        a1 = 0.0
        a2 = 0.0
        m0 = 0.0
        m1 = 0.0
        m2 = 0.0
        m3 = 0.0
        m4 = 0.0
        m5 = 0.0
        for cx in range(x0, x1 + 1):
            for cy in range(y0, y1 + 1):
                base = ((cx - g_lo[0]) * g_dims[1] + (cy - g_lo[1])) * g_dims[2] - g_lo[2]
                for t in range(g_start[base + z0], g_start[base + z1 + 1]):
                    i = g_order[t]
                    e, q0, q1, q2, i00, i01, i02, i11, i12, i22 = _point_term_any(
                        mu, sig, i, pts, j, psf, pj, pre, ginv
                    )
                    gv = grad[j] * w[i] * e
                    a0 -= gv * q0
                    a1 -= gv * q1
                    a2 -= gv * q2
                    h = 0.5 * gv
                    m0 += h * (q0 * q0 - i00)
                    m1 += h * (q0 * q1 - i01)
                    m2 += h * (q0 * q2 - i02)
                    m3 += h * (q1 * q1 - i11)
                    m4 += h * (q1 * q2 - i12)
                    m5 += h * (q2 * q2 - i22)
        g_p[j, 0] = a0
        g_p[j, 1] = a1
        g_p[j, 2] = a2
        g_m[j, 0] = m0
        g_m[j, 1] = m1
        g_m[j, 2] = m2
        g_m[j, 3] = m3
        g_m[j, 4] = m4
        g_m[j, 5] = m5


# ----------------------------------------------------------------------------------------------
# per-Gaussian preparation: (log-scales, quaternion, intensity) -> (Sigma (6), w) and its backward


@njit(**_JIT)
def _rotmat(q0, q1, q2, q3):
    nrm = math.sqrt(q0 * q0 + q1 * q1 + q2 * q2 + q3 * q3)
    w = q0 / nrm
    x = q1 / nrm
    y = q2 / nrm
    z = q3 / nrm
    return (
        w,
        x,
        y,
        z,
        nrm,
        1 - 2 * (y * y + z * z),
        2 * (x * y - w * z),
        2 * (x * z + w * y),
        2 * (x * y + w * z),
        1 - 2 * (x * x + z * z),
        2 * (y * z - w * x),
        2 * (x * z - w * y),
        2 * (y * z + w * x),
        1 - 2 * (x * x + y * y),
    )


def gauss_prep(ls, q, c):
    """Sigma = R diag(exp(2 s)) R^T as 6 numbers (xx,xy,xz,yy,yz,zz) and w = c exp(sum s)."""
    sig = np.empty((ls.shape[0], 6))
    w = np.empty(ls.shape[0])
    parallel_range(_gauss_prep, ls.shape[0], ls, q, c, sig, w)
    return sig, w


@njit(**_JIT)
def _gauss_prep(i0, i1, ls, q, c, sig, w):
    for i in range(i0, i1):
        r = _rotmat(q[i, 0], q[i, 1], q[i, 2], q[i, 3])
        a = math.exp(2 * ls[i, 0])
        b = math.exp(2 * ls[i, 1])
        cc = math.exp(2 * ls[i, 2])
        r00, r01, r02, r10, r11, r12, r20, r21, r22 = r[5:14]
        sig[i, 0] = r00 * r00 * a + r01 * r01 * b + r02 * r02 * cc
        sig[i, 1] = r00 * r10 * a + r01 * r11 * b + r02 * r12 * cc
        sig[i, 2] = r00 * r20 * a + r01 * r21 * b + r02 * r22 * cc
        sig[i, 3] = r10 * r10 * a + r11 * r11 * b + r12 * r12 * cc
        sig[i, 4] = r10 * r20 * a + r11 * r21 * b + r12 * r22 * cc
        sig[i, 5] = r20 * r20 * a + r21 * r21 * b + r22 * r22 * cc
        w[i] = c[i] * math.exp(ls[i, 0] + ls[i, 1] + ls[i, 2])


def gauss_prep_backward(ls, q, c, g_sig, g_w):
    """Chain rule of gauss_prep: (dL/dSigma6, dL/dw) -> (dL/dlog_scales, dL/dquats, dL/dc)."""
    n = ls.shape[0]
    g_ls = np.empty((n, 3))
    g_q = np.empty((n, 4))
    g_c = np.empty(n)
    parallel_range(_gauss_prep_backward, n, ls, q, c, g_sig, g_w, g_ls, g_q, g_c)
    return g_ls, g_q, g_c


@njit(**_JIT)
def _gauss_prep_backward(i0, i1, ls, q, c, g_sig, g_w, g_ls, g_q, g_c):
    for i in range(i0, i1):
        if (
            g_w[i] == 0.0
            and g_sig[i, 0] == 0.0
            and g_sig[i, 1] == 0.0
            and g_sig[i, 2] == 0.0
            and g_sig[i, 3] == 0.0
            and g_sig[i, 4] == 0.0
            and g_sig[i, 5] == 0.0
        ):
            for k in range(3):
                g_ls[i, k] = 0.0
            for k in range(4):
                g_q[i, k] = 0.0
            g_c[i] = 0.0
            continue
        w, x, y, z, nrm, r00, r01, r02, r10, r11, r12, r20, r21, r22 = _rotmat(q[i, 0], q[i, 1], q[i, 2], q[i, 3])
        e0 = math.exp(2 * ls[i, 0])
        e1 = math.exp(2 * ls[i, 1])
        e2 = math.exp(2 * ls[i, 2])
        # symmetric matrix gradient G
        G00 = g_sig[i, 0]
        G01 = 0.5 * g_sig[i, 1]
        G02 = 0.5 * g_sig[i, 2]
        G11 = g_sig[i, 3]
        G12 = 0.5 * g_sig[i, 4]
        G22 = g_sig[i, 5]
        # U = G R
        u00 = G00 * r00 + G01 * r10 + G02 * r20
        u01 = G00 * r01 + G01 * r11 + G02 * r21
        u02 = G00 * r02 + G01 * r12 + G02 * r22
        u10 = G01 * r00 + G11 * r10 + G12 * r20
        u11 = G01 * r01 + G11 * r11 + G12 * r21
        u12 = G01 * r02 + G11 * r12 + G12 * r22
        u20 = G02 * r00 + G12 * r10 + G22 * r20
        u21 = G02 * r01 + G12 * r11 + G22 * r21
        u22 = G02 * r02 + G12 * r12 + G22 * r22
        # dL/d(s2_k) = (R^T G R)_kk ; s2_k = exp(2 ls_k)
        d0 = r00 * u00 + r10 * u10 + r20 * u20
        d1 = r01 * u01 + r11 * u11 + r21 * u21
        d2 = r02 * u02 + r12 * u12 + r22 * u22
        wexp = math.exp(ls[i, 0] + ls[i, 1] + ls[i, 2])
        gw = g_w[i] * c[i] * wexp
        g_ls[i, 0] = 2 * e0 * d0 + gw
        g_ls[i, 1] = 2 * e1 * d1 + gw
        g_ls[i, 2] = 2 * e2 * d2 + gw
        g_c[i] = g_w[i] * wexp
        # dL/dR = 2 G R diag(s2)
        a00 = 2 * u00 * e0
        a01 = 2 * u01 * e1
        a02 = 2 * u02 * e2
        a10 = 2 * u10 * e0
        a11 = 2 * u11 * e1
        a12 = 2 * u12 * e2
        a20 = 2 * u20 * e0
        a21 = 2 * u21 * e1
        a22 = 2 * u22 * e2
        gw_ = 2 * (-z * a01 + y * a02 + z * a10 - x * a12 - y * a20 + x * a21)
        gx_ = 2 * (y * a01 + z * a02 + y * a10 - 2 * x * a11 - w * a12 + z * a20 + w * a21 - 2 * x * a22)
        gy_ = 2 * (-2 * y * a00 + x * a01 + w * a02 + x * a10 + z * a12 - w * a20 + z * a21 - 2 * y * a22)
        gz_ = 2 * (-2 * z * a00 - w * a01 + x * a02 + w * a10 - 2 * z * a11 + y * a12 + x * a20 + y * a21)
        dot = w * gw_ + x * gx_ + y * gy_ + z * gz_
        g_q[i, 0] = (gw_ - w * dot) / nrm
        g_q[i, 1] = (gx_ - x * dot) / nrm
        g_q[i, 2] = (gy_ - y * dot) / nrm
        g_q[i, 3] = (gz_ - z * dot) / nrm


# ----------------------------------------------------------------------------------------------
# the lattice prior of the intensity fits (recon/intensity.py): L v for the graph Laplacian of
# neighbouring Gaussians, the same additions in the same order as its PyTorch twin's index_add_
# on one thread (bit-identical; mni-t4 at 1 mm: 6M pairs, ~60 -> ~20 ms a product)


@njit(**_JIT)
def lattice_laplacian(v, pairs, pair_w, has_w, start, stop, out):
    """out[i] += d, out[j] -= d over pairs[start:stop], d = (v[i] - v[j]) x pair_w (with
    ``has_w``): first every i, then every j, as two index_add_ calls would."""
    for k in range(start, stop):
        d = v[pairs[k, 0]] - v[pairs[k, 1]]
        if has_w:
            d = d * pair_w[k]
        out[pairs[k, 0]] += d
    for k in range(start, stop):
        d = v[pairs[k, 0]] - v[pairs[k, 1]]
        if has_w:
            d = d * pair_w[k]
        out[pairs[k, 1]] += -d


# ----------------------------------------------------------------------------------------------
# the region where the moved slices put the anatomy (mgaussian.recon.data.region_from_slices)


@njit(**_JIT)
def region_votes(X, pos, order, o, ax, msk, du, dv, reach, near_mm, acc, cov):
    """mgaussian.recon.data's ``_stack_votes`` voxel by voxel: the arithmetic of its numpy twin in
    its order (the same bits). Per voxel the slices pos - reach .. pos + reach - 1 in the sorted
    order, the nearest along its own normal kept (the first of equals); its mask read bilinearly
    (0 outside)."""
    nk = order.shape[0]
    h = msk.shape[1]
    w = msk.shape[2]
    for i in range(X.shape[0]):
        best = np.inf
        val = 0.0
        for off in range(-reach, reach):
            j = pos[i] + off
            if j < 0 or j >= nk:
                continue
            k = order[j]
            d0 = X[i, 0] - o[k, 0]
            d1 = X[i, 1] - o[k, 1]
            d2 = X[i, 2] - o[k, 2]
            dn = abs(ax[k, 2, 0] * d0 + ax[k, 2, 1] * d1 + ax[k, 2, 2] * d2)
            if not dn < best:
                continue
            best = dn
            a = (ax[k, 0, 0] * d0 + ax[k, 0, 1] * d1 + ax[k, 0, 2] * d2) / du
            b = (ax[k, 1, 0] * d0 + ax[k, 1, 1] * d1 + ax[k, 1, 2] * d2) / dv
            a0 = int(math.floor(a))
            b0 = int(math.floor(b))
            fa = a - a0
            fb = b - b0
            v = 0.0
            for da in range(2):
                wa = fa if da == 1 else 1 - fa
                aa = a0 + da
                for db in range(2):
                    wb = fb if db == 1 else 1 - fb
                    bb = b0 + db
                    if 0 <= aa < h and 0 <= bb < w:
                        v += (wa * wb) * msk[k, aa, bb]
            val = v
        near = best <= near_mm
        acc[i] += val if near else 0.0
        cov[i] += 1.0 if near else 0.0


# ----------------------------------------------------------------------------------------------
# the progressive growth (mgaussian.field.grow_field)


@njit(**_JIT)
def grow_corners(base, frac, lut, c0, s0, q0, acc_w, acc_c, acc_s, acc_q):
    """mgaussian.field's ``_corner_sums`` (see there) node by node, adding into the zeroed
    ``acc_*``: the additions of its numpy twin in its order (the same bits; mni-t4's growth to 1 mm
    2.1 -> ~0.1 s). The corners in the order (dx, dy, dz) = 000, 001, ..., 111; a missing
    corner (outside the grid or without a Gaussian) weighs 0 and reads Gaussian 0."""
    nx, ny, nz = lut.shape
    for i in range(base.shape[0]):
        r0 = r1 = r2 = r3 = 0.0
        for dx in range(2):
            fx = frac[i, 0] if dx == 1 else 1.0 - frac[i, 0]
            cx = base[i, 0] + dx
            for dy in range(2):
                fy = frac[i, 1] if dy == 1 else 1.0 - frac[i, 1]
                cy = base[i, 1] + dy
                for dz in range(2):
                    fz = frac[i, 2] if dz == 1 else 1.0 - frac[i, 2]
                    cz = base[i, 2] + dz
                    j = -1
                    if 0 <= cx < nx and 0 <= cy < ny and 0 <= cz < nz:
                        j = lut[cx, cy, cz]
                    ok = j >= 0
                    wgt = fx * fy * fz * (1.0 if ok else 0.0)
                    jj = j if ok else 0
                    qa = q0[jj, 0]
                    qb = q0[jj, 1]
                    qc = q0[jj, 2]
                    qd = q0[jj, 3]
                    if ok and r0 == 0.0 and r1 == 0.0 and r2 == 0.0 and r3 == 0.0:
                        r0, r1, r2, r3 = qa, qb, qc, qd  # the first valid corner: the hemisphere
                    sign = -1.0 if qa * r0 + qb * r1 + qc * r2 + qd * r3 < 0 else 1.0
                    acc_w[i] += wgt
                    acc_c[i] += wgt * c0[jj]
                    for k in range(3):
                        acc_s[i, k] += wgt * s0[jj, k]
                    ws = wgt * sign
                    acc_q[i, 0] += ws * qa
                    acc_q[i, 1] += ws * qb
                    acc_q[i, 2] += ws * qc
                    acc_q[i, 3] += ws * qd
