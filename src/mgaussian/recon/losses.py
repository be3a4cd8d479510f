"""Training losses: smooth-L1 on masked pixels and SSIM on whole slices."""

from __future__ import annotations

__all__ = ["ssim_map", "masked_ssim", "masked_smooth_l1"]


import torch
import torch.nn.functional as F

_KERNELS: dict = {}


def _gauss_kernel(sigma: float, dtype, device):
    key = (sigma, dtype, device)
    if key not in _KERNELS:
        r = int(3.5 * sigma + 0.5)
        x = torch.arange(-r, r + 1, dtype=dtype, device=device)
        k = torch.exp(-0.5 * (x / sigma) ** 2)
        _KERNELS[key] = k / k.sum()
    return _KERNELS[key]


def _blur(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur of [B,1,H,W] with zero padding.

    Written as a sum of shifted copies: PyTorch's single-channel conv2d runs at ~0.1 GFLOP/s on
    a CPU (measured 10 ms for an 18x74x95 batch); this is ~20x faster, and so is its backward.
    """
    r = (k.numel() - 1) // 2
    H, W = x.shape[-2:]
    xp = F.pad(x, (0, 0, r, r))
    y = k[0] * xp[..., 0:H, :]
    for t in range(1, 2 * r + 1):
        y = y + k[t] * xp[..., t : t + H, :]
    yp = F.pad(y, (r, r, 0, 0))
    z = k[0] * yp[..., :, 0:W]
    for t in range(1, 2 * r + 1):
        z = z + k[t] * yp[..., :, t : t + W]
    return z


def ssim_map(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5) -> torch.Tensor:
    """SSIM map of image batches [B,H,W] (Gaussian window sigma 1.5, K1 0.01, K2 0.03)."""
    k = _gauss_kernel(sigma, x.dtype, x.device)
    X, Y = x[:, None], y[:, None]
    ux, uy = _blur(X, k), _blur(Y, k)
    vx = _blur(X * X, k) - ux * ux
    vy = _blur(Y * Y, k) - uy * uy
    vxy = _blur(X * Y, k) - ux * uy
    C1 = (0.01 * data_range) ** 2
    C2 = (0.03 * data_range) ** 2
    s = ((2 * ux * uy + C1) * (2 * vxy + C2)) / ((ux * ux + uy * uy + C1) * (vx + vy + C2))
    return s[:, 0]


def masked_ssim(
    pred: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean SSIM over the masked pixels of whole slices; outside the mask both images are 0."""
    m = mask.to(pred.dtype)
    s = ssim_map(pred * m, obs * m)
    w = m if weight is None else m * weight
    return (s * w).sum() / w.sum().clamp_min(1.0)


def masked_smooth_l1(
    pred: torch.Tensor, obs: torch.Tensor, mask: torch.Tensor, beta: float = 1.0, weight: torch.Tensor | None = None
) -> torch.Tensor:
    m = mask.to(pred.dtype)
    w = m if weight is None else m * weight
    l = F.smooth_l1_loss(pred, obs, reduction="none", beta=beta)
    return (l * w).sum() / w.sum().clamp_min(1.0)
