"""Shared pieces of the rendering backends: covariances, PSF handling, pixel windows.

Conventions (fixed for the package):

* Gaussian i: mean ``mu_i`` [3] (mm), log-scales ``s_i`` [3], unnormalised quaternion ``q_i`` [4]
  (w, x, y, z), intensity ``c_i``. ``Sigma_i = R(q_i/|q_i|) diag(exp(2 s_i)) R^T``.
* A slice s: origin ``o_s`` [3], ``axes_s`` [3, 3] whose rows are (e_u, e_v, n). Pixel (a, b) is
  the world point ``o + a*du*e_u + b*dv*e_v``.
* All slice backends evaluate in the slice frame: ``d = A (mu - o)``, ``C = A Sigma A^T + diag(psf^2)``
  and the pixel value ``sum_i w_i / sqrt(det C) * exp(-1/2 r^T C^-1 r)`` with ``r = (a du, b dv, 0) - d``
  and ``w_i = c_i sqrt(det Sigma_i) = c_i exp(sum s_i)``. For orthonormal axes this is exactly the
  world formula with ``Sigma_psf = A^T diag(psf^2) A`` (the PSF turns with the slice); for
  non-orthonormal axes the slice-frame formula *is* the definition (gradients w.r.t. ``axes`` are
  those of this formula; along rotations they equal the world formula's).
* Cut-off: a (pixel, Gaussian) term is kept iff its Mahalanobis distance ``r^T C^-1 r <= cutoff^2``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..psf import FWHM_TO_SIGMA  # one definition for the package


def quat_to_rotmat(quats: Tensor) -> Tensor:
    """Unnormalised quaternions [..., 4] (w, x, y, z) -> rotation matrices [..., 3, 3]."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    r = torch.stack(
        [
            1 - 2 * (y * y + z * z),
            2 * (x * y - w * z),
            2 * (x * z + w * y),
            2 * (x * y + w * z),
            1 - 2 * (x * x + z * z),
            2 * (y * z - w * x),
            2 * (x * z - w * y),
            2 * (y * z + w * x),
            1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    )
    return r.reshape(q.shape[:-1] + (3, 3))


def covariance(log_scales: Tensor, quats: Tensor) -> Tensor:
    """Sigma = R diag(exp(2 s)) R^T.  log_scales [N,3], quats [N,4] -> [N,3,3]."""
    r = quat_to_rotmat(quats)
    m = r * torch.exp(log_scales).unsqueeze(-2)  # R S
    return m @ m.transpose(-1, -2)


def covariance6(log_scales: Tensor, quats: Tensor) -> Tensor:
    """Upper triangle of Sigma as [N,6] = (xx, xy, xz, yy, yz, zz), computed without 3x3 matmuls."""
    q = quats / quats.norm(dim=-1, keepdim=True)
    w, x, y, z = q.unbind(-1)
    s2 = torch.exp(2.0 * log_scales)
    a, b, c = s2.unbind(-1)
    r00 = 1 - 2 * (y * y + z * z)
    r01 = 2 * (x * y - w * z)
    r02 = 2 * (x * z + w * y)
    r10 = 2 * (x * y + w * z)
    r11 = 1 - 2 * (x * x + z * z)
    r12 = 2 * (y * z - w * x)
    r20 = 2 * (x * z - w * y)
    r21 = 2 * (y * z + w * x)
    r22 = 1 - 2 * (x * x + y * y)
    return torch.stack(
        [
            r00 * r00 * a + r01 * r01 * b + r02 * r02 * c,
            r00 * r10 * a + r01 * r11 * b + r02 * r12 * c,
            r00 * r20 * a + r01 * r21 * b + r02 * r22 * c,
            r10 * r10 * a + r11 * r11 * b + r12 * r12 * c,
            r10 * r20 * a + r11 * r21 * b + r12 * r22 * c,
            r20 * r20 * a + r21 * r21 * b + r22 * r22 * c,
        ],
        dim=-1,
    )


def weights(log_scales: Tensor, intensities: Tensor) -> Tensor:
    """w_i = c_i sqrt(det Sigma_i) = c_i exp(sum_k s_ik).  [N]"""
    return intensities * torch.exp(log_scales.sum(-1))


def psf_variances(psf_sigma, n_slices: int, dtype, device) -> Tensor:
    """psf_sigma: None | float triple | Tensor [3] or [S,3] (sigma_u, sigma_v, sigma_n in mm).

    Returns the slice-frame PSF variances [S,3] (zeros for None = point evaluation). The PSF is a
    constant of the model: no gradient flows to it.
    """
    if psf_sigma is None:
        return torch.zeros(n_slices, 3, dtype=dtype, device=device)
    p = torch.as_tensor(psf_sigma, dtype=dtype, device=device).detach()
    if p.ndim == 1:
        p = p.expand(n_slices, 3)
    if p.shape != (n_slices, 3):
        raise ValueError(f"psf_sigma must be [3] or [S,3], got {tuple(p.shape)}")
    return (p * p).contiguous()


def slice_psf_sigma(
    pixel_spacing: tuple[float, float], thickness: float, inplane_fwhm_factor: float = 1.2
) -> tuple[float, float, float]:
    """The package's slice PSF: in-plane FWHM = 1.2 x pixel size, through-plane FWHM = thickness.

    Returns (sigma_u, sigma_v, sigma_n) in mm, ready for ``psf_sigma``.
    """
    du, dv = pixel_spacing
    return (
        inplane_fwhm_factor * du * FWHM_TO_SIGMA,
        inplane_fwhm_factor * dv * FWHM_TO_SIGMA,
        thickness * FWHM_TO_SIGMA,
    )


def mask_to_row_spans(pixel_mask, n_slices: int, shape: tuple[int, int]) -> np.ndarray:
    """Boolean pixel mask [H,W] or [S,H,W] -> row spans [S,H,2] int32 (first, last+1) of True.

    Rows without any True pixel get (0, 0). Renderers evaluate every pixel inside a row's span
    (masked or not) and leave the rest at 0: for a compact mask the span is the mask up to holes.
    """
    m = pixel_mask.detach().cpu().numpy() if isinstance(pixel_mask, Tensor) else np.asarray(pixel_mask)
    m = m.astype(bool)
    h, w = shape
    if m.ndim == 2:
        m = np.broadcast_to(m, (n_slices, h, w))
    if m.shape != (n_slices, h, w):
        raise ValueError(f"pixel_mask must be [H,W] or [S,H,W], got {m.shape}")
    anyr = m.any(-1)
    first = np.argmax(m, axis=-1)
    last = w - np.argmax(m[..., ::-1], axis=-1)
    spans = np.stack([np.where(anyr, first, 0), np.where(anyr, last, 0)], -1).astype(np.int32)
    return np.ascontiguousarray(spans)


def resolve_row_spans(row_spans, pixel_mask, window, n_slices: int, shape: tuple[int, int]):
    """Combine the optional pixel selections into row spans [S,H,2] int32, or None (= all pixels).

    * ``row_spans``: [S,H,2] or [H,2] integer (b_first, b_last+1) per row.
    * ``pixel_mask``: bool [H,W] or [S,H,W] (converted with :func:`mask_to_row_spans`).
    * ``window``: (a0, a1, b0, b1) or [S,4]: only rows a0 <= a < a1 and columns b0 <= b < b1.
    """
    h, w = shape
    spans = None
    if row_spans is not None:
        rs = row_spans.detach().cpu().numpy() if isinstance(row_spans, Tensor) else np.asarray(row_spans)
        rs = np.broadcast_to(rs.astype(np.int32), (n_slices, h, 2))
        spans = np.clip(rs, 0, w)
    if pixel_mask is not None:
        ms = mask_to_row_spans(pixel_mask, n_slices, shape)
        if spans is None:
            spans = ms
        else:
            spans = np.stack([np.maximum(spans[..., 0], ms[..., 0]), np.minimum(spans[..., 1], ms[..., 1])], -1)
    if window is not None:
        wi = window.detach().cpu().numpy() if isinstance(window, Tensor) else np.asarray(window)
        wi = np.broadcast_to(wi.astype(np.int64), (n_slices, 4))
        if spans is None:
            spans = np.zeros((n_slices, h, 2), np.int32)
            spans[..., 1] = w
        else:
            spans = spans.copy()
        rows = np.arange(h)
        for s in range(n_slices):
            a0, a1, b0, b1 = wi[s]
            out = (rows < a0) | (rows >= a1)
            spans[s, :, 0] = np.maximum(spans[s, :, 0], b0)
            spans[s, :, 1] = np.minimum(spans[s, :, 1], b1)
            spans[s, out, :] = 0
    if spans is None:
        return None
    spans = np.ascontiguousarray(spans, dtype=np.int32)
    spans[..., 1] = np.maximum(spans[..., 1], spans[..., 0])
    return spans


def spans_to_mask(spans: np.ndarray | None, n_slices: int, shape: tuple[int, int]) -> np.ndarray:
    """Row spans [S,H,2] -> bool [S,H,W] (all True for None)."""
    h, w = shape
    if spans is None:
        return np.ones((n_slices, h, w), bool)
    b = np.arange(w)
    return (b >= spans[..., 0:1]) & (b < spans[..., 1:2])
