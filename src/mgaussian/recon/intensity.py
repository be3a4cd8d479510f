"""The linear part of the fit: the Gaussians' intensities for fixed shapes and slice poses, by
conjugate gradients on the weighted normal equations, under a lattice smoothness prior (on the
coefficients' curvature by default, or on their neighbour differences).

Each level starts from this least-squares fit (the warm start) and the pose rounds re-fit with
it, so Adam (when it runs at all) starts near the data term's minimum.
"""

from __future__ import annotations

__all__ = [
    "lattice_pairs",
    "laplacian_apply",
    "laplacian_apply_torch",
    "lattice_degree",
    "curvature_weight",
    "prior_apply",
    "prior_diagonal",
    "normal_diagonal",
    "cg_intensities",
    "predict_with_designs",
]

import time

import numpy as np
import torch

from .config import ReconConfig
from .slices import slice_frames, stack_design


def lattice_pairs(grid_index: np.ndarray, grid_shape) -> torch.Tensor:
    """Pairs (i, j) of Gaussians that are lattice neighbours along x, y or z: [P, 2] int32 (int64
    beyond 2^31 Gaussians)."""
    gi = np.asarray(grid_index, dtype=np.int64)
    shp = np.asarray(grid_shape, dtype=np.int64)
    lut = -np.ones(tuple(shp), np.int64)
    lut[gi[:, 0], gi[:, 1], gi[:, 2]] = np.arange(len(gi))
    pairs = []
    for ax in range(3):
        nb = gi.copy()
        nb[:, ax] += 1
        ok = nb[:, ax] < shp[ax]
        j = np.full(len(gi), -1)
        j[ok] = lut[nb[ok, 0], nb[ok, 1], nb[ok, 2]]
        keep = j >= 0
        pairs.append(np.stack([np.nonzero(keep)[0], j[keep]], 1))
    # 32-bit indices while they fit (mni-t4 at 1 mm: 6M pairs, 49 MB fewer at the peak)
    dt = torch.int32 if len(gi) < 2**31 - 1 else torch.long
    return torch.as_tensor(np.concatenate(pairs), dtype=dt)


# the lattice operators run over this many pairs at a time: their gathered differences live one
# run at a time (mni-t4 at 1 mm: 6M pairs, ~150 MB of temporaries at once on top of the intensity
# fits' peak, benchmarks/SPEED.md session 16). The additions are ordered run by run: ~1e-15 from
# the sum over all pairs at once, and the same for any thread count
_PAIR_RUN = 1 << 20


def laplacian_apply(v: torch.Tensor, pairs: torch.Tensor, pair_w: torch.Tensor | None = None) -> torch.Tensor:
    """L v for the graph Laplacian of the lattice pairs (gradient of 1/2 sum w_ij (v_i - v_j)^2;
    w = 1 unless ``pair_w`` [P] is given). On the CPU a Numba loop that adds what
    :func:`laplacian_apply_torch` adds, in its order (bit-identical, ~3x faster)."""
    if v.device.type != "cpu" or (pair_w is not None and pair_w.dtype != v.dtype):
        return laplacian_apply_torch(v, pairs, pair_w)
    from ..render._cpu_kernels import lattice_laplacian

    vv, pp = v.detach().contiguous().numpy(), pairs.contiguous().numpy()
    w = pair_w.detach().contiguous().numpy() if pair_w is not None else vv[:1]
    out = np.zeros_like(vv)
    for a in range(0, len(pp), _PAIR_RUN):
        lattice_laplacian(vv, pp, w, pair_w is not None, a, min(a + _PAIR_RUN, len(pp)), out)
    return torch.from_numpy(out)


def laplacian_apply_torch(v: torch.Tensor, pairs: torch.Tensor, pair_w: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`laplacian_apply` in PyTorch (any device; the reference its CPU loop is held to)."""
    out = torch.zeros_like(v)
    for a in range(0, len(pairs), _PAIR_RUN):
        i, j = pairs[a : a + _PAIR_RUN, 0], pairs[a : a + _PAIR_RUN, 1]
        d = v[i] - v[j]
        if pair_w is not None:
            d = d * pair_w[a : a + _PAIR_RUN]
        out.index_add_(0, i, d)
        out.index_add_(0, j, -d)
    return out


def lattice_degree(
    pairs: torch.Tensor, n: int, pair_w: torch.Tensor | None = None, dtype=torch.float64
) -> torch.Tensor:
    """Each Gaussian's weighted degree in the lattice graph (sum of its pairs' weights; 1 each
    unless ``pair_w`` [P] is given): the diagonal of :func:`laplacian_apply`'s L."""
    deg = torch.zeros(n, dtype=dtype, device=pairs.device)
    for a in range(0, len(pairs), _PAIR_RUN):
        run = pairs[a : a + _PAIR_RUN]
        w = (
            torch.ones(len(run), dtype=dtype, device=pairs.device)
            if pair_w is None
            else pair_w[a : a + _PAIR_RUN].to(dtype)
        )
        deg.index_add_(0, run[:, 0], w)
        deg.index_add_(0, run[:, 1], w)
    return deg


def curvature_weight(cfg: ReconConfig, form: str | None = None) -> float | None:
    """The curvature prior's weight relative to the level's lambda, or None for the gradient prior
    (``form``, default ``cfg.smoothness_prior``). lambda is the gradient prior's (~ sigma^2 / s^2: neighbour
    differences of smooth anatomy grow with the spacing s); the lattice Laplacian grows with s^2,
    so its weight carries one more (1 mm / s)^2, s the finest level's spacing as in lambda."""
    if (form or cfg.smoothness_prior) != "curvature":
        return None
    finest = (cfg.output_resolution or 1.0) * cfg.spacing_factors[-1]
    return cfg.curvature_scale / finest**2


def prior_apply(v: torch.Tensor, pairs: torch.Tensor, pair_w=None, curvature: float | None = None) -> torch.Tensor:
    """The gradient of the smoothness prior per unit of its weight: L v for the gradient prior
    1/2 sum w_ij (v_i - v_j)^2, or curvature x L (L v) for the curvature prior curvature/2 |L v|^2
    (L the lattice graph Laplacian, edge-weighted by ``pair_w``)."""
    lv = laplacian_apply(v, pairs, pair_w)
    return lv if curvature is None else curvature * laplacian_apply(lv, pairs, pair_w)


def prior_diagonal(pairs: torch.Tensor, n: int, pair_w=None, curvature: float | None = None, dtype=torch.float64):
    """The diagonal of :func:`prior_apply`'s operator: the degrees (L's diagonal), or curvature x
    (L^2)_ii = curvature x (deg_i^2 + sum_j w_ij^2)."""
    deg = lattice_degree(pairs, n, pair_w, dtype)
    if curvature is None:
        return deg
    w2 = None if pair_w is None else pair_w * pair_w
    return curvature * (deg * deg + lattice_degree(pairs, n, w2, dtype))


def normal_diagonal(designs, weights, ridge: float, smooth: float = 0.0, pairs=None, pair_w=None, curvature=None):
    """diag(A^T W A + ridge + smooth P), the intensity fits' normal matrix, exactly: each design's
    ``diag_normal`` (the explicit maps of the cpu backend) plus the prior P's (:func:`prior_diagonal`).
    None when a design has no explicit diagonal (:class:`mgaussian.render.AutogradDesign`: a probed
    one is too noisy here, the off-diagonal terms of neighbouring Gaussians outweigh the diagonal)."""
    if not all(hasattr(d, "diag_normal") for d in designs):
        return None
    dg = sum(d.diag_normal(w) for d, w in zip(designs, weights)) + ridge
    if smooth > 0 and pairs is not None:
        dg = dg + smooth * prior_diagonal(pairs, dg.shape[0], pair_w, curvature, dg.dtype)
    return dg


def _designs(params: dict, sets, rots, trans, cents, cfg: ReconConfig, backend: str, cache: dict | None) -> list:
    """Each stack's render as a linear map of the intensities, reused from ``cache`` while the
    slices, their poses, the Gaussians' shapes and the PSF are those of its last build."""
    c = params["intensities"]
    others = {k: v.detach() for k, v in params.items() if k != "intensities"}
    key = None
    if cache is not None:
        key = (
            tuple(id(ss) for ss in sets),
            cfg.through_plane_fwhm_factor,
            cfg.cutoff,
            cfg.use_psf,
            cfg.renderer,
            tuple((v.data_ptr(), v._version) for k, v in sorted(params.items()) if k != "intensities"),
        )
        if cache.get("key") != key or not all(torch.equal(a, b) for a, b in zip(cache["poses"], (*rots, *trans))):
            cache.clear()
    designs = cache.get("designs") if cache else None
    if designs is not None:
        return designs
    budget = cfg.design_memory_gb * 1024**3
    t_build = time.time()
    designs = []
    for si, ss in enumerate(sets):
        sel = torch.arange(ss.n, device=c.device)
        o, ax = slice_frames(ss, sel, rots[si].detach(), trans[si].detach(), cents[si])
        d = stack_design(dict(others, intensities=c.detach()), ss, o, ax, cfg, backend, max_bytes=budget)
        budget = max(0.0, budget - d.nbytes)
        designs.append(d)
    if cache is not None:
        cache.update(
            key=key, designs=designs, poses=[x.detach().clone() for x in (*rots, *trans)], build_s=time.time() - t_build
        )
    return designs


@torch.no_grad()
def predict_with_designs(params: dict, sets, rots, trans, cents, cfg: ReconConfig, backend: str, cache: dict) -> list:
    """Every slice's prediction [K,h,w] per stack as the stacks' designs applied to the intensities
    (built into ``cache`` unless current there): the intensity fit that follows reuses the maps, and
    no render plan of a whole stack is held beside them (mni-t4 at 1 mm: the robust weights' renders
    peaked at 4.3 GB against 3.7 for the fit)."""
    designs = _designs(params, sets, rots, trans, cents, cfg, backend, cache)
    c = params["intensities"].detach()
    return [d.matvec(c).to(c.dtype) for d in designs]


def cg_intensities(
    params: dict,
    sets,
    rots,
    trans,
    cents,
    wts,
    scs,
    cfg: ReconConfig,
    backend: str,
    n_iter: int,
    pairs: torch.Tensor | None = None,
    smooth: float = 0.0,
    ridge: float = 1e-6,
    deadline: float | None = None,
    min_iter: int = 0,
    pair_w: torch.Tensor | None = None,
    cache: dict | None = None,
    prior_form: str | None = None,
) -> int:
    """Least-squares intensities for fixed Gaussian shapes and slice poses: conjugate gradients
    on the weighted normal equations (A^T W A + ridge) c = A^T W y over all masked pixels; A c
    renders slices (linear in c) times each slice's intensity scale; W holds the robust pixel x
    slice weights (0 outside the masks). ``params["intensities"]`` is updated in place.

    A is each stack's ``render.slice_design``: on the cpu backend an explicit sparse map built in
    one pass (within ``cfg.design_memory_gb`` for all stacks together), so an iteration costs a
    multiply-add per (pixel, Gaussian) term instead of a render and its backward pass.

    ``cache``: a dict kept by the caller; the designs are reused from it while the slices, their
    poses, the Gaussians' shapes and the PSF are the same as at its last call (mni-t4 at 1 mm:
    16 s a build). ``deadline`` (wall time) stops the iterations after ``min_iter`` of them.

    ``cfg.cg_preconditioner`` "jacobi": preconditioned CG with the exact diagonal of the normal
    matrix (:func:`normal_diagonal`, one pass over the maps) where the designs hold it, plain CG
    otherwise. The solution is the same; it is reached in fewer iterations (see the config).
    ``prior_form``: the lattice prior's form for this fit, "gradient" or "curvature" (None:
    ``cfg.smoothness_prior``; :func:`prior_apply`). Returns the number of iterations run."""
    c = params["intensities"]
    sw2, ys = [], []
    with torch.no_grad():
        designs = _designs(params, sets, rots, trans, cents, cfg, backend, cache)
        for si, ss in enumerate(sets):
            sc = scs[si][:, None, None]
            sw2.append(wts[si] * sc * sc)  # A^T W A with the slice scales inside A
            ys.append(ss.obs / sc.clamp_min(1e-12))  # the scaled residual's target, unscaled
    use_prior = smooth > 0 and pairs is not None
    curvature = curvature_weight(cfg, prior_form)

    def normal_apply(v):
        g = sum(d.normal(v, w) for d, w in zip(designs, sw2)) + ridge * v
        if use_prior:
            g = g + smooth * prior_apply(v, pairs, pair_w, curvature)
        return g

    inv_diag = None
    if cfg.cg_preconditioner == "jacobi" and n_iter > 0:
        with torch.no_grad():
            dg = normal_diagonal(designs, sw2, ridge, smooth, pairs, pair_w, curvature)
        inv_diag = None if dg is None else 1.0 / dg.clamp_min(ridge)

    def precondition(r):
        return r if inv_diag is None else r * inv_diag

    x = c.detach().clone()
    g = sum(d.rmatvec((d.matvec(x) - y) * w) for d, y, w in zip(designs, ys, sw2))
    r = -(g + ridge * x)
    if use_prior:
        r = r - smooth * prior_apply(x, pairs, pair_w, curvature)
    z = precondition(r)
    p = z.clone()
    rz = (r * z).sum()
    done = 0
    for i in range(n_iter):
        if deadline is not None and time.time() > deadline and i >= min_iter:
            break
        done += 1
        Ap = normal_apply(p)
        alpha = rz / (p * Ap).sum().clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * Ap
        z = precondition(r)
        rz_new = (r * z).sum()
        p = z + (rz_new / rz.clamp_min(1e-30)) * p
        rz = rz_new
    with torch.no_grad():
        c.copy_(x)
    return done
