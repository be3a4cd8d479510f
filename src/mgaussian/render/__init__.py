"""Rendering ops of the Gaussian field: whole slices (the training path) and arbitrary points.

Model (fixed conventions, see :mod:`mgaussian.render._common`): the value at a point p observed
through a PSF of covariance Sigma_psf is

    sum_i c_i sqrt(det Sigma_i / det(Sigma_i + Sigma_psf)) exp(-1/2 d^T (Sigma_i + Sigma_psf)^-1 d),

d = p - mu_i: the exact convolution of the field with a unit-mass Gaussian PSF (Sigma_psf = 0 is the
seed's point evaluation).

Backends (one signature each): ``reference`` (PyTorch, chunked, autograd: the definition of
correct), ``cpu`` (Numba, hand-written forward/backward, all cores), ``gpu`` (Triton kernels on
CUDA; runs on the CPU under ``TRITON_INTERPRET=1`` for tests). ``auto`` = gpu if CUDA and Triton,
else cpu if Numba, else reference; a missing optional dependency falls back with a warning. In the
ops, 'auto' uses gpu only for CUDA tensors (CPU tensors go to cpu), and an explicit 'gpu' with CPU
tensors falls back to cpu with a warning (unless TRITON_INTERPRET=1). reference and cpu are
deterministic (the cpu kernels use no atomics); the gpu backward sums with float atomics, so its
rounding depends on the order.

Truncation (documented bounds):

* slices: a (pixel, Gaussian) term is dropped iff its Mahalanobis distance under Sigma_i +
  Sigma_psf exceeds ``cutoff``. Each dropped term is below exp(-cutoff^2/2) x the Gaussian's
  amplitude (1.1 % at 3.0, 0.03 % at 4.0); summed over a smooth field the missing part is the
  fraction of a 3D Gaussian's mass outside that radius, P(chi2_3 > cutoff^2) = 2.9 % at 3.0
  (0.11 % at 4.0), nearly uniform, so mostly a global scale that the intensities absorb.
* points (the seed's block partitioning): Gaussian i is summed at p iff their cells (uniform cells of
  ``cell_size`` mm anchored at the world origin) are within ``block_radius`` cells in every axis. A
  dropped Gaussian is at least block_radius x cell_size away along some axis, so its term is at most
  |c_i| sqrt(det Sigma_i/det M) exp(-(block_radius cell_size)^2 / (2 lambda_max(M))), M = Sigma_i +
  Sigma_psf; :func:`block_truncation_bound` evaluates the sum of these bounds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings

import torch
from torch import Tensor

from ._common import FWHM_TO_SIGMA, mask_to_row_spans, resolve_row_spans, slice_psf_sigma

__all__ = [
    "render_slices",
    "render_pose_channels",
    "shared_gaussians",
    "slice_design",
    "AutogradDesign",
    "render_points",
    "render_volume",
    "available_backends",
    "resolve_backend",
    "slice_psf_sigma",
    "mask_to_row_spans",
    "block_truncation_bound",
    "FWHM_TO_SIGMA",
]

_BACKENDS = ("reference", "cpu", "gpu")


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


def _gpu_usable() -> bool:
    if not _has("triton"):
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends() -> list[str]:
    """Backends that can run here ('gpu' needs Triton and CUDA, or TRITON_INTERPRET=1)."""
    out = ["reference"]
    if _has("numba"):
        out.append("cpu")
    if _gpu_usable():
        out.append("gpu")
    return out


def resolve_backend(name: str = "auto") -> str:
    """'auto' -> 'gpu' if CUDA + Triton, else 'cpu' if Numba, else 'reference'.

    An explicit backend whose dependency is missing falls back (gpu -> cpu -> reference) with a
    warning. Unknown names raise ValueError.
    """
    if name == "auto":
        if torch.cuda.is_available() and _has("triton"):
            return "gpu"
        if _has("numba"):
            return "cpu"
        warnings.warn("numba is not installed: the 'reference' renderer is used (slow)", RuntimeWarning, stacklevel=2)
        return "reference"
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose auto, " + ", ".join(_BACKENDS))
    if name == "gpu" and not _gpu_usable():
        why = "triton is not installed" if not _has("triton") else "no CUDA device"
        fb = "cpu" if _has("numba") else "reference"
        warnings.warn(f"gpu backend unavailable ({why}); falling back to {fb!r}", RuntimeWarning, stacklevel=2)
        return fb
    if name == "cpu" and not _has("numba"):
        warnings.warn("numba is not installed: falling back to 'reference'", RuntimeWarning, stacklevel=2)
        return "reference"
    return name


def _for_tensors(backend: str, t: Tensor) -> str:
    """Resolve ``backend`` for tensors on t's device: 'auto' uses the GPU only for CUDA tensors."""
    name = resolve_backend(backend)
    if name == "gpu" and t.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        if backend != "auto":
            warnings.warn(
                "gpu backend needs CUDA tensors; using 'cpu' for these CPU tensors", RuntimeWarning, stacklevel=3
            )
        name = "cpu" if _has("numba") else "reference"
    return name


def _module(name: str):
    if name == "cpu":
        from . import cpu as m
    elif name == "gpu":
        from . import gpu as m
    else:
        from . import reference as m
    return m


def shared_gaussians():
    """A block within which renders of the same, unchanged Gaussian tensors (several calls over
    different slices: a batch rendered stack by stack) share their per-Gaussian preparation; the
    same images and gradients as without it. The cpu backend's (:func:`.cpu.shared_gaussians`); the
    others prepare nothing worth sharing, so a block changes nothing for them (nor where Numba,
    hence the cpu backend, is missing)."""
    if not _has("numba"):
        return contextlib.nullcontext()
    from . import cpu

    return cpu.shared_gaussians()


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
    backend: str = "auto",
    cutoff: float = 3.0,
    *,
    pixel_mask=None,
    row_spans=None,
    window=None,
    stats: dict | None = None,
) -> Tensor:
    """Render whole slices through the Gaussian field, differentiably.

    Args:
        means [N,3], log_scales [N,3], quats [N,4] (w,x,y,z, unnormalised), intensities [N]:
            Gaussian parameters (may require grad).
        origins [S,3]: world position (mm) of pixel (0,0) of each slice.
        axes [S,3,3]: rows (e_u, e_v, n), orthonormal with det +1. Pixel (a,b) of slice s is at
            origins[s] + a*du*axes[s,0] + b*dv*axes[s,1].
        shape: (H, W), shared by all slices of the call.  spacing: (du, dv) in mm.
        psf_sigma: None (point evaluation), (sigma_u, sigma_v, sigma_n) in mm as a tuple / Tensor
            [3], or per slice [S,3]; the PSF covariance is axes^T diag(sigma^2) axes (it turns with
            the slice). See :func:`slice_psf_sigma`. No gradient flows to it.
        backend: 'auto' | 'reference' | 'cpu' | 'gpu'.
        cutoff: Mahalanobis cut-off of each (pixel, Gaussian) term (truncation: module docstring).
        pixel_mask: optional bool [H,W] or [S,H,W]: only rows' mask spans are rendered (see row_spans).
        row_spans: optional int [H,2] or [S,H,2] (b_first, b_last+1) per row: only these pixels are
            evaluated, every other pixel is 0. Precompute it once per stack with
            :func:`mask_to_row_spans` to avoid the per-call conversion of a mask.
        window: optional (a0, a1, b0, b1) or [S,4]: only rows [a0,a1) x columns [b0,b1).
        stats: optional dict, filled by the cpu backend with 'pairs' (projected (Gaussian, slice)
            pairs) and 'candidates'.

    Returns:
        Tensor [S,H,W] in means.dtype; gradients flow to all Gaussian parameters, origins and axes
        (for axes: of the slice-frame formula, equal to the world formula's along rotations).
    """
    name = _for_tensors(backend, means)
    n_slices = origins.shape[0]
    spans = resolve_row_spans(row_spans, pixel_mask, window, n_slices, tuple(shape))
    kw = {"stats": stats} if name == "cpu" else {}
    return _module(name).render_slices(
        means,
        log_scales,
        quats,
        intensities,
        origins,
        axes,
        tuple(shape),
        tuple(spacing),
        psf_sigma,
        float(cutoff),
        spans,
        **kw,
    )


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
    backend: str = "auto",
    cutoff: float = 3.0,
    *,
    row_spans=None,
) -> Tensor | None:
    """What differentiating slices with respect to their rigid poses needs of their pixels, in one
    pass (arguments as :func:`render_slices`; no autograd). Returns float64 [S,7,H,W]: per pixel,

    * 0: the pixel's value (:func:`render_slices`' image);
    * 1-3: its gradient with respect to the pixel's position, in the slice frame (u, v, n);
    * 4-6: the (uv, un, vn) entries of its gradient with respect to the slice-frame covariance
      C = A Sigma A^T + diag(psf^2) of every term (the PSF turns with the slice).

    A moved slice's pixel sees the field at its moved point through its turned PSF, so these
    give its derivative along any rigid motion (:func:`mgaussian.recon.slices.slice_pose_jacobian`).
    None on the gpu backend, which has no kernel for it: take differences of renders there.
    """
    name = _for_tensors(backend, means)
    if name == "gpu":
        return None
    spans = resolve_row_spans(row_spans, None, None, origins.shape[0], tuple(shape))
    return _module(name).render_pose_channels(
        means,
        log_scales,
        quats,
        intensities,
        origins,
        axes,
        tuple(shape),
        tuple(spacing),
        psf_sigma,
        float(cutoff),
        spans,
    )


class AutogradDesign:
    """A render that is linear in the intensities, as a linear map through autograd: A c is
    ``render(c)``, A^T x its vector-Jacobian product, A^T W A v one render and one backward pass.
    ``render``: intensities [N] -> images (everything else fixed inside it). The definition that
    the cpu backend's explicit :class:`mgaussian.render.cpu.SliceDesign` is tested against, and the
    path on the other backends (or when the explicit map would not fit in memory)."""

    def __init__(self, render, n: int):
        self._render = render
        self.n = int(n)
        self.nbytes = 0

    def matvec(self, c: Tensor) -> Tensor:
        with torch.no_grad():
            return self._render(c.detach())

    def rmatvec(self, img: Tensor) -> Tensor:
        x = torch.zeros(self.n, dtype=img.dtype, device=img.device, requires_grad=True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self._render(x), x, img)
        return g

    def normal(self, v: Tensor, weight: Tensor) -> Tensor:
        x = v.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            out = self._render(x)
            (g,) = torch.autograd.grad((out * out * weight).sum() * 0.5, x)
        return g


def slice_design(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    origins: Tensor,
    axes: Tensor,
    shape: tuple[int, int],
    spacing: tuple[float, float],
    psf_sigma=None,
    backend: str = "auto",
    cutoff: float = 3.0,
    *,
    row_spans=None,
    max_bytes: float | None = None,
):
    """The render of these slices as a linear map of the intensities, for conjugate-gradient fits:
    an object with ``matvec(c)`` -> [S,H,W], ``rmatvec(x)`` -> [N], ``normal(v, weight)`` = A^T
    diag(weight) A v, and ``nbytes``. On the cpu backend the map is stored explicitly (one pass to
    build, then a multiply-add per term: ~20x cheaper than a render and its backward) unless it
    would take more than ``max_bytes``; otherwise (and on other backends) :class:`AutogradDesign`.
    Arguments as :func:`render_slices`."""
    name = _for_tensors(backend, means)
    spans = resolve_row_spans(row_spans, None, None, origins.shape[0], tuple(shape))
    if name == "cpu":
        from .cpu import build_design

        d = build_design(
            means, log_scales, quats, origins, axes, shape, spacing, psf_sigma, cutoff, spans, max_bytes=max_bytes
        )
        if d is not None:
            return d
    m, ls, q = means.detach(), log_scales.detach(), quats.detach()
    o, ax = origins.detach(), axes.detach()
    return AutogradDesign(
        lambda c: render_slices(m, ls, q, c, o, ax, shape, spacing, psf_sigma, name, cutoff, row_spans=spans),
        means.shape[0],
    )


def render_volume(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    intensities: Tensor,
    affine,
    shape: tuple[int, int, int],
    psf_sigma=None,
    backend: str = "auto",
    cutoff: float = 3.0,
    slices_per_call: int = 32,
    mask=None,
) -> Tensor:
    """Render the field on a voxel grid through the slice path: volume [X,Y,Z].

    Voxel (i,j,k) sits at ``affine @ (i,j,k,1)``; plane k is rendered as a slice with e_u, e_v the
    unit first/second voxel axes (orthogonal affines only; shear raises ValueError), in chunks of
    ``slices_per_call`` planes. ``psf_sigma`` as in :func:`render_slices` ((sigma_u, sigma_v,
    sigma_n) along the voxel axes; None = point values). ``mask``: optional bool [X,Y,Z]: only the
    row spans of the mask are rendered, the rest is 0. Autograd works, but wrap in
    ``torch.no_grad()`` for output volumes.
    """
    import numpy as np

    from ..geometry import orthogonal_voxel_axes

    aff = torch.as_tensor(np.asarray(affine, dtype=np.float64))
    cols = aff[:3, :3]
    du, dv = float(cols[:, 0].norm()), float(cols[:, 1].norm())
    eu, ev = cols[:, 0] / du, cols[:, 1] / dv
    n = torch.linalg.cross(eu, ev)
    if not orthogonal_voxel_axes(aff.numpy()):
        raise ValueError("render_volume needs an affine with orthogonal voxel axes")
    nx, ny, nz = (int(v) for v in shape)
    axes_one = torch.stack([eu, ev, n]).to(means.dtype)
    out = []
    for k0 in range(0, nz, max(1, int(slices_per_call))):
        ks = torch.arange(k0, min(nz, k0 + int(slices_per_call)), dtype=torch.float64)
        origins = (aff[:3, 3][None] + ks[:, None] * cols[:, 2][None]).to(means.device, means.dtype)
        axes = axes_one.to(means.device).expand(len(ks), 3, 3).contiguous()
        pm = None if mask is None else np.moveaxis(np.asarray(mask, bool)[:, :, k0 : k0 + len(ks)], 2, 0)
        out.append(
            render_slices(
                means,
                log_scales,
                quats,
                intensities,
                origins,
                axes,
                (nx, ny),
                (du, dv),
                psf_sigma,
                backend=backend,
                cutoff=cutoff,
                pixel_mask=pm,
            )
        )
    if not out:
        return means.new_zeros(nx, ny, 0)
    return torch.cat(out).permute(1, 2, 0)


def default_cell_size(means: Tensor) -> float:
    """Cell edge when none is given: (bounding-box volume / N)^(1/3) of the means (~grid spacing)."""
    n = means.shape[0]
    if n < 2:
        return 1.0
    m = means.detach()
    ext = (m.max(0).values - m.min(0).values).clamp_min(1e-3)
    return float((ext.prod() / n) ** (1.0 / 3.0))


def render_points(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    intensities: Tensor,
    points: Tensor,
    psf_cov: Tensor | None = None,
    block_radius: int | None = 5,
    cell_size: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """f(p) at arbitrary points [P] with the seed's block partitioning.

    Args:
        means, log_scales, quats, intensities: Gaussian parameters as in :func:`render_slices`.
        points [P,3]: world mm (may require grad).
        psf_cov: None (point evaluation), [3,3] shared or [P,3,3] per point (symmetric); may
            require grad (e.g. a PSF turned with a slice pose): its gradient is returned as the
            symmetric matrix gradient.
        block_radius: neighbourhood radius in cells (seed default 5); None sums all Gaussians.
        cell_size: cell edge in mm (pass the field's grid spacing); default
            :func:`default_cell_size`.
        backend: as in :func:`render_slices` (the gpu backend runs the reference ops on CUDA).
    Returns: [P] values, differentiable w.r.t. Gaussian parameters, points and psf_cov.
    """
    name = _for_tensors(backend, means)
    cs = default_cell_size(means) if cell_size is None else float(cell_size)
    return _module(name).render_points(means, log_scales, quats, intensities, points, psf_cov, block_radius, cs)


def block_truncation_bound(
    means: Tensor,
    log_scales: Tensor,
    quats: Tensor,
    intensities: Tensor,
    points: Tensor,
    psf_cov: Tensor | None = None,
    block_radius: int = 5,
    cell_size: float = 1.0,
) -> Tensor:
    """Per point [P], an upper bound of |brute force - block partitioned| (see module docstring)."""
    from ._common import covariance
    from .reference import cell_coords

    with torch.no_grad():
        sig = covariance(log_scales, quats)
        m = sig if psf_cov is None or psf_cov.ndim == 3 else sig + psf_cov
        lam = torch.linalg.eigvalsh(m)[:, -1]
        amp = intensities.abs() * torch.sqrt(torch.linalg.det(sig) / torch.linalg.det(m))
        if psf_cov is not None and psf_cov.ndim == 3:
            raise NotImplementedError("bound for per-point PSFs: use the shared-PSF bound")
        bound = amp * torch.exp(-((block_radius * cell_size) ** 2) / (2.0 * lam))
        cg = cell_coords(means, cell_size)
        cp = cell_coords(points, cell_size)
        far = (cp[:, None, :] - cg[None]).abs().amax(-1) > block_radius
        return (far * bound[None]).sum(1)
