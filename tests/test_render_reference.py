"""The reference renderer against first principles: gradcheck, Monte-Carlo PSF, points vs slices,
block partitioning and cut-off truncation bounds."""

from __future__ import annotations

import math

import pytest
import torch
from test_render_helpers import img_err, random_gaussians, random_poses, rel_err, rot_vec

import mgaussian.render as R
from mgaussian.render import reference as ref
from mgaussian.render._common import covariance


def test_gradcheck_reference_slices_float64():
    params = random_gaussians(4, lo=(0, 0, -1.0), hi=(3, 3, 1.0), seed=1, log_mean=-0.1)
    o, a = random_poses(2, seed=2, shift=0.3)

    def f(mu, ls, q, c, oo, aa):
        return ref.render_slices(mu, ls, q, c, oo, aa, (4, 5), (0.7, 0.6), (0.3, 0.25, 0.8), cutoff=50.0)

    assert f(*params, o, a).abs().max() > 1e-3
    assert torch.autograd.gradcheck(f, (*params, o, a), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_reference_points_float64():
    params = random_gaussians(5, lo=(0, 0, 0), hi=(3, 3, 3), seed=3, log_mean=-0.1)
    pts = (torch.rand(6, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3).requires_grad_()
    m = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.4
    cov = (m @ m.T).requires_grad_()

    def f(mu, ls, q, c, x, pc):
        return ref.render_points(mu, ls, q, c, x, pc, block_radius=None)

    assert torch.autograd.gradcheck(f, (*params, pts, cov), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_analytic_psf_matches_monte_carlo():
    """Pixel value = E over the PSF of the point-evaluated field (exact convolution, with sqrt det)."""
    torch.manual_seed(0)
    mu = torch.tensor([[0.4, -0.3, 0.5]], dtype=torch.float64)
    ls = torch.log(torch.tensor([[0.6, 1.1, 0.4]], dtype=torch.float64))
    q = torch.tensor([[0.9, 0.2, -0.3, 0.25]], dtype=torch.float64)
    c = torch.tensor([1.7], dtype=torch.float64)
    axes = rot_vec(torch.tensor([[0.3, -0.5, 0.4]], dtype=torch.float64))
    origin = torch.tensor([[-1.0, -0.8, 0.2]], dtype=torch.float64)
    psf = (0.5, 0.4, 1.4)
    img = ref.render_slices(mu, ls, q, c, origin, axes, (4, 4), (0.6, 0.6), psf, cutoff=60.0)
    sig = covariance(ls, q)[0]
    sig_inv = torch.linalg.inv(sig)
    cov_psf = axes[0].T @ torch.diag(torch.tensor(psf, dtype=torch.float64) ** 2) @ axes[0]
    chol = torch.linalg.cholesky(cov_psf)
    n = 400_000
    z = torch.randn(n, 3, dtype=torch.float64) @ chol.T
    worst = 0.0
    for a_, b_ in [(1, 1), (2, 3), (3, 0)]:
        x = origin[0] + a_ * 0.6 * axes[0, 0] + b_ * 0.6 * axes[0, 1]
        y = x + z - mu[0]
        vals = c[0] * torch.exp(-0.5 * ((y @ sig_inv) * y).sum(1))
        mc, se = vals.mean(), vals.std() / math.sqrt(n)
        assert abs(float(img[0, a_, b_] - mc)) < 4 * float(se) + 1e-4
        worst = max(worst, abs(float(img[0, a_, b_] - mc)) / float(mc))
    assert worst < 0.01


def _world_points(origins, axes, shape, spacing):
    h, w = shape
    a = torch.arange(h, dtype=origins.dtype) * spacing[0]
    b = torch.arange(w, dtype=origins.dtype) * spacing[1]
    return (
        origins[:, None, None, :]
        + a[None, :, None, None] * axes[:, None, None, 0, :]
        + b[None, None, :, None] * axes[:, None, None, 1, :]
    )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_points_and_slices_agree_values_and_pose_gradients(backend):
    """render_slices (slice frame) == render_points (world formula, PSF turned with the pose),
    and their gradients agree along rotations (w.r.t. a rotation vector) and translations."""
    shape, spacing = (9, 11), (0.8, 0.7)
    psf = torch.tensor([0.41, 0.36, 1.36], dtype=torch.float64)
    params = random_gaussians(50, lo=(-2, -2, -3), hi=(8, 8, 3), seed=4)
    o0, a0 = random_poses(2, seed=5, shift=0.5)
    omega = torch.tensor([[0.05, -0.02, 0.01], [0.0, 0.03, -0.04]], dtype=torch.float64, requires_grad=True)
    o = o0.detach().clone().requires_grad_()

    def pose():
        return o, rot_vec(omega) @ a0.detach()

    oo, aa = pose()
    img = R.render_slices(*params, oo, aa, shape, spacing, psf, backend=backend, cutoff=40.0)
    gs = torch.autograd.grad((img * img).sum(), [omega, o] + params)
    oo, aa = pose()
    pts = _world_points(oo, aa, shape, spacing)
    cov = aa.transpose(1, 2) @ torch.diag(psf**2) @ aa  # [S,3,3], depends on the pose
    cov_pp = cov[:, None, None].expand(-1, shape[0], shape[1], 3, 3).reshape(-1, 3, 3)
    vals = R.render_points(*params, pts.reshape(-1, 3), cov_pp, block_radius=None, backend=backend)
    vals = vals.reshape(img.shape)
    gp = torch.autograd.grad((vals * vals).sum(), [omega, o] + params)
    assert img_err(img, vals) < 1e-9
    for a, b in zip(gs, gp):
        assert rel_err(a, b) < 1e-8


def test_block_partitioning_within_documented_bound():
    params = random_gaussians(300, lo=(0, 0, 0), hi=(10, 10, 10), seed=6, log_mean=-0.5)
    pts = torch.rand(200, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 10
    cov = torch.diag(torch.tensor([0.1, 0.1, 0.8], dtype=torch.float64))
    for backend in ("reference", "cpu"):
        brute = R.render_points(*params, pts, cov, block_radius=None, backend=backend).detach()
        for radius, cs in [(1, 1.0), (2, 1.0), (5, 0.5)]:
            blk = R.render_points(*params, pts, cov, block_radius=radius, cell_size=cs, backend=backend).detach()
            bound = R.block_truncation_bound(*params, pts, cov, block_radius=radius, cell_size=cs)
            diff = (blk - brute).abs()
            assert diff.max() > 0  # partitioning really drops Gaussians
            assert bool((diff <= bound + 1e-12).all())
    # larger radius, smaller error
    e1 = (R.render_points(*params, pts, cov, 1, 1.0, "cpu") - brute).abs().max()
    e3 = (R.render_points(*params, pts, cov, 3, 1.0, "cpu") - brute).abs().max()
    assert e3 < 0.2 * e1


def test_cutoff_truncation_bound_and_constant_field_loss():
    """Every dropped term is <= exp(-cutoff^2/2) x amplitude; on a dense lattice the missing mass
    is ~P(chi2_3 > cutoff^2) = 2.9 % at cutoff 3, as documented."""
    h = 1.0
    g = torch.arange(-6, 7, dtype=torch.float64) * h
    means = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    n = means.shape[0]
    ls = torch.full((n, 3), math.log(0.6 * h), dtype=torch.float64)
    q = torch.zeros(n, 4, dtype=torch.float64)
    q[:, 0] = 1
    c = torch.ones(n, dtype=torch.float64)
    o = torch.tensor([[-1.0, -1.0, 0.3]], dtype=torch.float64)
    a = torch.eye(3, dtype=torch.float64)[None]
    psf = (0.41, 0.41, 1.36)
    args = (means, ls, q, c, o, a, (4, 4), (0.5, 0.5), psf)
    full = R.render_slices(*args, backend="cpu", cutoff=12.0)
    cut = R.render_slices(*args, backend="cpu", cutoff=3.0)
    missing = float(((full - cut) / full).mean())
    assert 0.015 < missing < 0.045
    # per-term bound: sum of exp(-4.5) x amplitude over all Gaussians bounds the difference
    sig = covariance(ls, q)
    cmat = sig + torch.diag(torch.tensor(psf, dtype=torch.float64) ** 2)
    amp = c * torch.sqrt(torch.linalg.det(sig) / torch.linalg.det(cmat))
    assert float((full - cut).max()) <= math.exp(-4.5) * float(amp.sum())


@pytest.mark.parametrize("flip", [False, True])
def test_render_volume_matches_points(flip):
    params = random_gaussians(80, lo=(-3, -2, -1), hi=(5, 6, 4), seed=9, log_mean=-0.2)
    affine = torch.eye(4, dtype=torch.float64)
    affine[:3, :3] = torch.diag(torch.tensor([0.8, 0.9, 1.1], dtype=torch.float64))
    if flip:  # a reflection (det < 0) and a rotation, as NIfTI affines may have
        rot = rot_vec(torch.tensor([[0.2, -0.1, 0.3]], dtype=torch.float64))[0]
        affine[:3, :3] = rot @ affine[:3, :3] @ torch.diag(torch.tensor([-1.0, 1, 1], dtype=torch.float64))
    affine[:3, 3] = torch.tensor([-2.0, -1.0, -0.5])
    shape = (9, 8, 5)
    vol = R.render_volume(*params, affine.numpy(), shape, None, backend="cpu", cutoff=30.0, slices_per_call=2)
    idx = torch.stack(
        torch.meshgrid(*[torch.arange(n, dtype=torch.float64) for n in shape], indexing="ij"), -1
    ).reshape(-1, 3)
    pts = idx @ affine[:3, :3].T + affine[:3, 3]
    ref_v = ref.render_points(*params, pts, None, block_radius=None).reshape(shape)
    assert vol.shape == shape
    assert img_err(vol, ref_v) < 1e-9
