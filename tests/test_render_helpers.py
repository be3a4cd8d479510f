"""Shared random inputs for the render tests (not a test module itself)."""

from __future__ import annotations

import math

import torch

from mgaussian.render._common import quat_to_rotmat


def random_gaussians(
    n, lo=(0.0, 0.0, -5.0), hi=(16.0, 18.0, 5.0), dtype=torch.float64, seed=0, scale=0.25, log_mean=0.1
):
    g = torch.Generator().manual_seed(seed)
    lo_t, hi_t = torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64)
    means = lo_t + torch.rand(n, 3, generator=g, dtype=torch.float64) * (hi_t - lo_t)
    log_scales = torch.randn(n, 3, generator=g, dtype=torch.float64) * scale + log_mean
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    intens = torch.randn(n, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (means, log_scales, quats, intens)]


def random_poses(s, dtype=torch.float64, seed=1, max_angle=0.35, shift=2.0):
    """Slices near the z=0 plane: axes = R (small random rotation), origins ~ N(0, shift)."""
    g = torch.Generator().manual_seed(seed)
    axis = torch.randn(s, 3, generator=g, dtype=torch.float64)
    axis = axis / axis.norm(dim=1, keepdim=True)
    ang = (torch.rand(s, generator=g, dtype=torch.float64) * 2 - 1) * max_angle
    q = torch.cat([torch.cos(ang / 2)[:, None], torch.sin(ang / 2)[:, None] * axis], 1)
    axes = quat_to_rotmat(q)
    origins = torch.randn(s, 3, generator=g, dtype=torch.float64) * shift
    return origins.to(dtype).requires_grad_(), axes.to(dtype).requires_grad_()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def img_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def rot_vec(omega: torch.Tensor) -> torch.Tensor:
    """Rodrigues: rotation vectors [S,3] -> matrices [S,3,3] (differentiable)."""
    th = omega.norm(dim=1).clamp_min(1e-12)[:, None, None]
    k = omega / th[:, :, 0]
    z = torch.zeros_like(k[:, 0])
    kx = torch.stack(
        [
            torch.stack([z, -k[:, 2], k[:, 1]], 1),
            torch.stack([k[:, 2], z, -k[:, 0]], 1),
            torch.stack([-k[:, 1], k[:, 0], z], 1),
        ],
        1,
    )
    eye = torch.eye(3, dtype=omega.dtype).expand_as(kx)
    return eye + torch.sin(th) * kx + (1 - torch.cos(th)) * kx @ kx


SQRT2LN2 = 2.0 * math.sqrt(2.0 * math.log(2.0))
