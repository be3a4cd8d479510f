"""Gaussian field: masked grid initialisation, growth (>= 35 dB), anisotropy penalty."""

from __future__ import annotations

import math

import numpy as np
import torch

from mgaussian.field import GaussianField, anisotropy_penalty, grow_field, init_field_on_grid, lattice_sum
from mgaussian.render import render_points


def _phantom_case(vox=1.0, n=36):
    """Ellipsoid mask on an oblique-free but offset grid, and a smooth phantom (world function)."""
    affine = np.diag([vox, vox, vox, 1.0])
    affine[:3, 3] = [-17.0, -12.5, 3.0]
    idx = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    centre = affine[:3, 3] + vox * (n - 1) / 2
    r = (world - centre) / np.array([15.0, 13.0, 12.0])
    mask = (r**2).sum(-1) <= 1.0

    def phantom(p):
        p = np.asarray(p) - centre
        return 1.0 + 0.4 * np.sin(p[..., 0] / 5.0) * np.cos(p[..., 1] / 6.0) + 0.2 * np.cos(p[..., 2] / 4.0)

    return mask, affine, centre, phantom


def test_init_grid_restricted_to_dilated_mask():
    mask, affine, centre, _ = _phantom_case()
    f = init_field_on_grid(mask, affine, 3.0)
    assert isinstance(f, GaussianField) and f.spacing == 3.0
    n = f.num_gaussians
    # regular grid: all pairwise offsets are multiples of the spacing
    off = (f.means - f.means[0]).numpy() / 3.0
    assert np.allclose(off, np.round(off), atol=1e-4)
    # within dilate (6 mm) of the mask, and the interior is fully covered
    vox = np.argwhere(mask) @ affine[:3, :3].T + affine[:3, 3]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(vox).query(f.means.numpy())
    assert d.max() <= 6.0 + 1e-6
    box = np.prod((vox.max(0) - vox.min(0) + 12.0) / 3.0)
    assert n < 0.8 * box  # background costs nothing
    ellipsoid = 4 / 3 * math.pi * 15 * 13 * 12 / 27.0
    assert n > ellipsoid
    assert torch.allclose(f.log_scales, torch.full_like(f.log_scales, math.log(0.6 * 3.0)))
    assert torch.equal(f.quats[:, 0], torch.ones(n)) and f.quats[:, 1:].abs().max() == 0


def test_constant_intensity_renders_nearly_constant_field():
    mask, affine, centre, _ = _phantom_case()
    f = init_field_on_grid(mask, affine, 2.0, init_intensity=1.0)
    assert torch.allclose(f.intensities, torch.full_like(f.intensities, 1 / lattice_sum(0.6)))
    g = torch.Generator().manual_seed(0)
    pts = torch.tensor(centre, dtype=torch.float32) + (torch.rand(300, 3, generator=g) - 0.5) * 8
    v = render_points(f.means, f.log_scales, f.quats, f.intensities, pts, block_radius=None)
    assert float((v - 1).abs().max()) < 0.01


def _field_values(f, pts):
    return (
        render_points(f.means, f.log_scales, f.quats, f.intensities, pts, block_radius=None, backend="cpu")
        .detach()
        .double()
    )


def test_grow_keeps_rendered_field_35db():
    mask, affine, centre, phantom = _phantom_case()
    coarse = init_field_on_grid(mask, affine, 3.0, init_intensity=phantom)
    fine = grow_field(coarse, 1.5, mask, affine)
    assert fine.spacing == 1.5
    # 8x denser, in a thinner dilation shell (2 x the new spacing)
    assert 4 * coarse.num_gaussians < fine.num_gaussians < 8 * coarse.num_gaussians
    assert torch.allclose(fine.log_scales, torch.full_like(fine.log_scales, math.log(0.9)), atol=1e-5)
    # evaluation points: inside the mask, away from its border
    g = np.random.default_rng(1)
    p = centre + (g.random((4000, 3)) - 0.5) * 2 * np.array([15.0, 13.0, 12.0])
    inner = (
        ((p - centre) / np.array([15.0, 13.0, 12.0]) * np.array([15, 13, 12]) / np.array([9.0, 7.0, 6.0])) ** 2
    ).sum(1) <= 1
    pts = torch.tensor(p[inner], dtype=torch.float32)
    a, b = _field_values(coarse, pts), _field_values(fine, pts)
    psnr = 10 * math.log10(float(a.max()) ** 2 / float(((a - b) ** 2).mean()))
    assert psnr >= 35.0, psnr
    # ... and both reproduce the phantom reasonably (the field is meaningful)
    truth = torch.tensor(phantom(p[inner]))
    assert float((a - truth).abs().mean()) < 0.05
    # without the scale adjustment the field would change completely
    wrong = GaussianField(fine.means, fine.log_scales + math.log(2.0), fine.quats, fine.intensities, 1.5)
    c = _field_values(wrong, pts)
    assert 10 * math.log10(float(a.max()) ** 2 / float(((a - c) ** 2).mean())) < 20


def test_grow_nlerp_quaternions_and_intensity_interpolation():
    mask, affine, centre, phantom = _phantom_case()
    f = init_field_on_grid(mask, affine, 3.0, init_intensity=phantom)
    g = torch.Generator().manual_seed(3)
    q = torch.tensor([0.9, 0.3, -0.2, 0.1])
    sign = torch.where(torch.rand(f.num_gaussians, generator=g) < 0.5, -1.0, 1.0)
    f.quats = q[None] * sign[:, None] * 2.5  # same rotation, random sign and norm
    f.log_scales = f.log_scales + torch.tensor([0.2, -0.1, 0.0])
    fine = grow_field(f, 1.5, mask, affine)
    qn = fine.quats / fine.quats.norm(dim=1, keepdim=True)
    assert torch.allclose((qn @ (q / q.norm())).abs(), torch.ones(fine.num_gaussians), atol=1e-5)
    rel = fine.log_scales - math.log(1.5)
    assert torch.allclose(rel, (f.log_scales[0] - math.log(3.0)).expand_as(rel), atol=1e-5)
    # intensities interpolated: close to the coarse field's values at the new nodes
    c0 = phantom(fine.means.numpy()) / lattice_sum(0.6)
    assert float(np.median(np.abs(fine.intensities.numpy() - c0))) < 0.01 * c0.mean()


def test_anisotropy_penalty_values_and_gradient():
    ls = torch.log(torch.tensor([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0], [1.0, 0.25, 0.5], [1.2, 1.0, 1.0]])).requires_grad_()
    p = anisotropy_penalty(ls)
    assert torch.isclose(p, torch.tensor((0 + 0.5 + 2.5 + 0) / 4))
    p.backward()
    assert ls.grad[0].abs().max() == 0 and ls.grad[3].abs().max() == 0
    assert ls.grad[1, 0] > 0 and ls.grad[1, 1] < 0
    f = GaussianField(torch.zeros(4, 3), ls.detach(), torch.zeros(4, 4), torch.ones(4), 1.0)
    assert torch.isclose(anisotropy_penalty(f, max_ratio=3.0), torch.tensor(1.0 / 4))


def test_field_render_slices_method():
    mask, affine, centre, _ = _phantom_case()
    f = init_field_on_grid(mask, affine, 3.0, init_intensity=1.0)
    o = torch.tensor([[centre[0] - 5, centre[1] - 5, centre[2]]], dtype=torch.float32)
    img = f.render_slices(o, torch.eye(3)[None], (12, 12), (0.8, 0.8), (0.4, 0.4, 1.4), backend="cpu", cutoff=5.0)
    assert float((img - 1).abs().max()) < 0.01


def test_init_with_oblique_affine():
    mask, affine, centre, _ = _phantom_case()
    th = math.radians(30)
    rot = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    obl = affine.copy()
    obl[:3, :3] = rot @ affine[:3, :3]
    f0 = init_field_on_grid(mask, affine, 3.0)
    f1 = init_field_on_grid(mask, obl, 3.0)
    assert abs(f1.num_gaussians - f0.num_gaussians) < 0.1 * f0.num_gaussians
    vox = np.argwhere(mask) @ obl[:3, :3].T + obl[:3, 3]
    from scipy.spatial import cKDTree

    d, _ = cKDTree(vox).query(f1.means.numpy())
    assert d.max() <= 6.0 + 1.0  # dilate + nearest-voxel rounding (<= half a voxel diagonal)
    # the grid is axis-aligned in world space
    off = (f1.means - f1.means[0]).numpy() / 3.0
    assert np.allclose(off, np.round(off), atol=1e-4)


def test_grow_corner_sums_kernel_matches_numpy_twin():
    """The growth's corner sums (the cpu kernel) equal their numpy twin bit for bit, on nodes whose
    cells miss corners (outside the old grid, or holes in it) and whose corners' quaternions lie in
    opposite hemispheres."""
    from mgaussian.field import _corner_sums, _corner_sums_numpy

    rng = np.random.default_rng(7)
    lut = np.arange(6 * 5 * 4).reshape(6, 5, 4)
    lut[rng.random(lut.shape) < 0.3] = -1  # holes
    n0 = lut.size
    c0 = rng.normal(size=n0)
    s0 = rng.normal(size=(n0, 3))
    q0 = rng.normal(size=(n0, 4))
    q0 /= np.linalg.norm(q0, axis=1, keepdims=True)
    u = rng.uniform(-1.5, [7.5, 6.5, 5.5], size=(500, 3))  # some cells beyond the grid
    base = np.floor(u).astype(np.int64)
    frac = u - base
    fast = _corner_sums(base, frac, lut, c0, s0, q0)
    ref = _corner_sums_numpy(base, frac, lut, c0, s0, q0)
    assert (ref[0] == 0).sum() > 50 and (ref[0] > 0).sum() > 150  # nodes without and with corners
    for a, b in zip(fast, ref):
        assert np.array_equal(a, b)
