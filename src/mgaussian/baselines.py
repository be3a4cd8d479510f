"""Simple reference reconstructions used for calibration.

* :func:`naive_average`: each stack resampled trilinearly onto the output grid, averaged.
* :func:`lsq_superresolution`: classical super-resolution without motion correction,
  ``min_x sum_stacks ||D B x - y||^2 + lam ||grad x||^2`` solved by conjugate gradients
  (BENCHMARK.md's *lsq* reference).
"""

from __future__ import annotations

__all__ = ["naive_average", "covered_mean", "lsq_superresolution", "SliceOperator"]

import math

import numpy as np
import torch
import torch.nn.functional as F

from .psf import FWHM_TO_SIGMA, through_plane_quadrature
from .sampling import resample_volumes


def naive_average(stacks, out_shape, out_affine) -> np.ndarray:
    """Each stack resampled trilinearly onto the output grid, averaged where it covers.

    ``stacks`` is a list of (data, affine). Voxels that no stack covers are 0.
    """
    acc = np.zeros(out_shape, dtype=np.float64)
    cnt = np.zeros(out_shape, dtype=np.float64)
    for data, aff in stacks:
        d, c = resample_volumes([data, np.ones(data.shape, np.float32)], aff, out_shape, out_affine)
        acc += d
        cnt += c
    return covered_mean(acc, cnt)


def covered_mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """The stacks' mean where they cover (``total`` of values over ``count`` of stacks), else 0."""
    return np.where(count > 1e-3, total / np.maximum(count, 1e-3), 0.0).astype(np.float32)


# --------------------------------------------------------------------------------------------
# classical least-squares super-resolution
# --------------------------------------------------------------------------------------------


def _gauss_hermite(n: int, sigma: float):
    """Nodes and weights (sum 1) integrating against a Gaussian of std ``sigma`` (n nodes)."""
    if n <= 1:
        return np.zeros(1), np.ones(1)
    x, w = np.polynomial.hermite_e.hermegauss(int(n))  # weight exp(-x^2/2)
    return x * sigma, w / w.sum()


class SliceOperator:
    """The linear forward model A = D B of the masked pixels of some stacks, on a voxel grid.

    A pixel's value is the slice profile integrated by quadrature over the volume, itself
    interpolated trilinearly (``grid_sample``, align_corners=True, 0 outside): through plane the
    nodes of :func:`mgaussian.psf.through_plane_quadrature` (<= ``step`` mm apart, default the
    finest output voxel size); in plane an ``inplane_nodes`` x ``inplane_nodes`` Gauss-Hermite
    rule for the Gaussian of FWHM ``inplane_factor`` x pixel. Only the stacks' masked pixels
    are modelled; they are processed in chunks of at most ``chunk_points`` quadrature points.

    ``forward(x)`` -> the pixel values [N]; ``adjoint(v)`` -> A^T v from autograd;
    ``normal(x)`` -> (A x, A^T A x) in one pass per chunk.
    """

    def __init__(
        self,
        stacks,
        out_shape,
        out_affine,
        profile: str = "gaussian",
        *,
        inplane_factor: float = 1.2,
        inplane_nodes: int = 2,
        step: float | None = None,
        chunk_points: int = 2_000_000,
    ):
        self.shape = tuple(int(s) for s in out_shape)
        A = np.asarray(out_affine, dtype=np.float64)
        inv = np.linalg.inv(A)
        vs = np.sqrt((A[:3, :3] ** 2).sum(0))
        step = float(step) if step else float(vs.min())
        X, Y, Z = self.shape
        nrm = np.diag([2.0 / max(X - 1, 1), 2.0 / max(Y - 1, 1), 2.0 / max(Z - 1, 1)])
        # world -> grid_sample coordinates (order z, y, x: flipped), one affine map
        Mg = (nrm @ inv[:3, :3])[::-1].copy()
        cg = (nrm @ inv[:3, 3] - 1.0)[::-1].copy()
        self.groups = []  # per stack: (base grid coords [N,3], node offsets [Q,3], weights [Q])
        self.n_pixels = 0
        for st in stacks:
            m = np.asarray(st.mask, dtype=bool)
            idx = np.argwhere(m)  # (a, b, k)
            if len(idx) == 0:
                continue
            fr = st.frames
            du, dv = fr.spacing
            ax = fr.axes[idx[:, 2]]  # [N,3,3]
            pw = fr.origins[idx[:, 2]] + idx[:, :1] * du * ax[:, 0] + idx[:, 1:2] * dv * ax[:, 1]
            if not np.allclose(fr.axes, fr.axes[:1], atol=1e-9):
                raise ValueError("SliceOperator expects one slice orientation per stack")
            eu, ev, en = fr.axes[0]
            su = inplane_factor * du * FWHM_TO_SIGMA
            sv = inplane_factor * dv * FWHM_TO_SIGMA
            if inplane_factor > 0:
                ou, wu = _gauss_hermite(inplane_nodes, su)
                ov, wv = _gauss_hermite(inplane_nodes, sv)
            else:
                ou, wu, ov, wv = np.zeros(1), np.ones(1), np.zeros(1), np.ones(1)
            on, wn = through_plane_quadrature(float(st.thickness), profile, step)
            offs = (ou[:, None, None, None] * eu + ov[None, :, None, None] * ev + on[None, None, :, None] * en).reshape(
                -1, 3
            )
            wts = (wu[:, None, None] * wv[None, :, None] * wn[None, None, :]).reshape(-1)
            base = pw @ Mg.T + cg
            self.groups.append(
                (
                    torch.as_tensor(base, dtype=torch.float32),
                    torch.as_tensor(offs @ Mg.T, dtype=torch.float32),
                    torch.as_tensor(wts, dtype=torch.float32),
                )
            )
            self.n_pixels += len(idx)
        if not self.groups:
            raise ValueError("no masked pixel in any stack")
        self.chunk_points = int(chunk_points)

    def _chunks(self):
        """(start index into the concatenated pixels, base, offsets, weights) per chunk."""
        start = 0
        for base, offs, wts in self.groups:
            n = max(1, self.chunk_points // len(wts))
            for i in range(0, len(base), n):
                b = base[i : i + n]
                yield start + i, b, offs, wts
            start += len(base)

    @staticmethod
    def _apply(vol5, base, offs, wts):
        # grid_sample's 3D CPU kernels run in parallel over the batch only: split the points
        # into one batch entry per thread, all reading the same (expanded) volume
        n = len(base)
        nb = max(1, min(torch.get_num_threads(), 8, n))
        m = -(-n // nb)
        if m * nb != n:
            base = torch.cat([base, base[-1:].expand(m * nb - n, 3)])
        g = (base[:, None, :] + offs[None, :, :]).reshape(nb, 1, m, len(offs), 3)
        v = F.grid_sample(
            vol5.expand(nb, *vol5.shape[1:]), g, mode="bilinear", padding_mode="zeros", align_corners=True
        )
        return (v.reshape(nb * m, len(offs)) @ wts)[:n]  # [n]

    def forward(self, x) -> torch.Tensor:
        vol5 = torch.as_tensor(x, dtype=torch.float32).reshape(1, 1, *self.shape)
        out = torch.empty(self.n_pixels, dtype=torch.float32)
        with torch.no_grad():
            for s, b, o, w in self._chunks():
                out[s : s + len(b)] = self._apply(vol5, b, o, w)
        return out

    def adjoint(self, v) -> torch.Tensor:
        """A^T v, as the gradient of <A z, v> with respect to z (autograd)."""
        v = torch.as_tensor(v, dtype=torch.float32)
        z = torch.zeros((1, 1) + self.shape, dtype=torch.float32, requires_grad=True)
        acc = torch.zeros(self.shape, dtype=torch.float32)
        for s, b, o, w in self._chunks():
            y = self._apply(z, b, o, w)
            (g,) = torch.autograd.grad(y, z, grad_outputs=v[s : s + len(b)])
            acc += g[0, 0]
        return acc

    def normal(self, x):
        """(A x [N], A^T A x [X,Y,Z]): per chunk one forward and its backward."""
        z = torch.as_tensor(x, dtype=torch.float32).reshape(1, 1, *self.shape).detach().requires_grad_(True)
        ax = torch.empty(self.n_pixels, dtype=torch.float32)
        acc = torch.zeros(self.shape, dtype=torch.float32)
        for s, b, o, w in self._chunks():
            y = self._apply(z, b, o, w)
            (g,) = torch.autograd.grad(y, z, grad_outputs=y.detach())
            ax[s : s + len(b)] = y.detach()
            acc += g[0, 0]
        return ax, acc


def _grad_sq(x: torch.Tensor) -> float:
    """||grad x||^2: sum of squared forward differences along the three grid axes."""
    return float(sum((torch.diff(x, dim=d).double() ** 2).sum() for d in range(3)))


def _lap(x: torch.Tensor) -> torch.Tensor:
    """L^T L x for L = forward differences (no wrap): half the gradient of ||grad x||^2."""
    out = torch.zeros_like(x)
    for d in range(3):
        dx = torch.diff(x, dim=d)
        n = x.shape[d]
        out.narrow(d, 0, n - 1).sub_(dx)
        out.narrow(d, 1, n - 1).add_(dx)
    return out


def lsq_superresolution(
    stacks,
    out_shape,
    out_affine,
    lam: float = 0.02,
    iterations: int = 40,
    profile: str = "gaussian",
    *,
    inplane_nodes: int = 2,
    init: str = "naive",
    history: list | None = None,
    chunk_points: int = 2_000_000,
    threads: int | None = None,
    log=None,
) -> np.ndarray:
    """Classical super-resolution without motion correction (BENCHMARK.md's *lsq*).

    Solves ``min_x sum_stacks ||D B x - y||^2 + lam ||grad x||^2`` on the output grid
    (``out_shape``, ``out_affine``) by ``iterations`` conjugate-gradient steps on the normal
    equations ``(A^T A + lam L^T L) x = A^T y``. ``stacks`` are :class:`mgaussian.io.Stack`;
    only their masked pixels count. A = D B is :class:`SliceOperator` with the slice
    ``profile`` ("gaussian": FWHM = thickness, or "box") and the in-plane Gaussian of FWHM
    1.2 x pixel. Each stack is divided by its 99th percentile in its mask; the result is
    multiplied back by the mean of those divisors. ``init``: "naive" (the average of the
    stacks resampled onto the grid) or "zero". If ``history`` is a list, the data term
    ``||A x - y||^2`` (normalised units) is appended before the first and after every iteration.
    ``threads``: torch CPU threads for the solve (restored afterwards); default: torch's current
    setting. On a machine that other jobs keep busy, 1 thread can be several times faster.
    Returns float32 [X, Y, Z].
    """
    if threads is None:
        return _lsq(
            stacks, out_shape, out_affine, lam, iterations, profile, inplane_nodes, init, history, chunk_points, log
        )
    old = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        return _lsq(
            stacks, out_shape, out_affine, lam, iterations, profile, inplane_nodes, init, history, chunk_points, log
        )
    finally:
        torch.set_num_threads(old)


def _lsq(stacks, out_shape, out_affine, lam, iterations, profile, inplane_nodes, init, history, chunk_points, log):
    if profile not in ("gaussian", "box"):
        raise ValueError(f"unknown slice profile {profile!r} (gaussian or box)")
    shape = tuple(int(s) for s in out_shape)
    op = SliceOperator(stacks, shape, out_affine, profile, inplane_nodes=inplane_nodes, chunk_points=chunk_points)
    ys, scales = [], []
    for st in stacks:
        m = np.asarray(st.mask, dtype=bool)
        if not m.any():
            continue
        v = st.data[m].astype(np.float64)
        sc = float(np.percentile(v, 99))
        if not sc > 0:
            sc = float(np.abs(v).max()) or 1.0
        scales.append(sc)
        ys.append(v / sc)
    y = torch.as_tensor(np.concatenate(ys), dtype=torch.float32)
    scale = float(np.mean(scales))
    if init == "naive":
        x = torch.as_tensor(
            naive_average(
                [(st.data / sc, st.affine) for st, sc in zip([s for s in stacks if np.asarray(s.mask).any()], scales)],
                shape,
                out_affine,
            )
        )
    elif init == "zero":
        x = torch.zeros(shape, dtype=torch.float32)
    else:
        raise ValueError(f"unknown init {init!r} (naive or zero)")
    # CG on the normal equations, residual kept by recurrence: r = y - A x, s = A^T y - N x
    ax, atax = op.normal(x)
    r = y - ax
    s = op.adjoint(r) - lam * _lap(x)
    p = s.clone()
    gamma = float((s.double() ** 2).sum())
    if history is not None:
        history.append(float((r.double() ** 2).sum()))
    for it in range(int(iterations)):
        if gamma <= 0:
            break
        ap, atap = op.normal(p)
        q = atap + lam * _lap(p)
        pq = float((p.double() * q.double()).sum())
        if pq <= 0:
            break
        alpha = gamma / pq
        x.add_(p, alpha=alpha)
        r.sub_(ap, alpha=alpha)
        s.sub_(q, alpha=alpha)
        g_new = float((s.double() ** 2).sum())
        p.mul_(g_new / gamma).add_(s)
        gamma = g_new
        if history is not None:
            history.append(float((r.double() ** 2).sum()))
        if log is not None:
            log(
                f"lsq it {it + 1}: data {float((r.double() ** 2).sum()):.5g} "
                f"reg {lam * _grad_sq(x):.5g} |s| {math.sqrt(gamma):.3g}"
            )
    return (x * scale).numpy().astype(np.float32)
