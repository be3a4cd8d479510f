"""The lattice prior: the CPU loop of L v adds what its PyTorch twin adds, bit for bit; the
curvature prior's operator and diagonal."""

import numpy as np
import pytest
import torch

from mgaussian.recon import intensity
from mgaussian.recon.intensity import laplacian_apply, laplacian_apply_torch, lattice_degree, lattice_pairs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_cpu_loop_matches_its_torch_twin(dtype, weighted, monkeypatch):
    monkeypatch.setattr(intensity, "_PAIR_RUN", 1000)  # several runs, as on a large lattice
    rng = np.random.default_rng(1)
    gi = np.argwhere(rng.random((14, 12, 11)) < 0.8)
    pairs = lattice_pairs(gi, (14, 12, 11))
    v = torch.as_tensor(rng.standard_normal(len(gi)), dtype=dtype)
    w = torch.as_tensor(rng.random(len(pairs)), dtype=dtype) if weighted else None
    got, ref = laplacian_apply(v, pairs, w), laplacian_apply_torch(v, pairs, w)
    assert got.dtype == dtype and torch.equal(got, ref)
    # and it is the Laplacian: L 1 = 0, 1^T L v = 0, v^T L v = sum w (v_i - v_j)^2
    assert torch.allclose(laplacian_apply(torch.ones_like(v), pairs, w), torch.zeros_like(v))
    assert abs(float(got.double().sum())) < 1e-3
    d = (v[pairs[:, 0]] - v[pairs[:, 1]]).double()
    quad = float(((w.double() if weighted else 1.0) * d * d).sum())
    assert float((v.double() * got.double()).sum()) == pytest.approx(quad, rel=1e-5)
    deg = lattice_degree(pairs, len(gi), w)
    e0 = torch.zeros(len(gi), dtype=dtype)
    e0[5] = 1
    assert float(laplacian_apply(e0, pairs, w)[5]) == pytest.approx(float(deg[5]), rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_curvature_prior_is_the_gradient_of_the_laplacians_energy(weighted):
    """The curvature prior curvature/2 |L c|^2: its operator is autograd's gradient of that energy,
    its diagonal is e_i through the operator, and, unlike the gradient prior, it does not penalise
    a linear ramp inside the lattice (only within two Gaussians of its edge)."""
    rng = np.random.default_rng(2)
    shape = (9, 8, 7)
    gi = np.argwhere(rng.random(shape) < 0.9)
    pairs = lattice_pairs(gi, shape)
    n = len(gi)
    w = torch.as_tensor(0.2 + rng.random(len(pairs)), dtype=torch.float64) if weighted else None
    k = 0.35
    c = torch.tensor(rng.standard_normal(n), dtype=torch.float64, requires_grad=True)
    lc = laplacian_apply_torch(c, pairs, w)
    (0.5 * k * (lc * lc).sum()).backward()
    got = intensity.prior_apply(c.detach(), pairs, w, curvature=k)
    assert torch.allclose(got, c.grad, rtol=1e-10, atol=1e-10)
    assert torch.equal(intensity.prior_apply(c.detach(), pairs, w), laplacian_apply(c.detach(), pairs, w))

    dg = intensity.prior_diagonal(pairs, n, w, curvature=k)
    for i in (0, n // 4, n // 2, n - 1):
        e = torch.zeros(n, dtype=torch.float64)
        e[i] = 1.0
        assert float(intensity.prior_apply(e, pairs, w, curvature=k)[i]) == pytest.approx(float(dg[i]), rel=1e-12)

    full = torch.as_tensor(np.argwhere(np.ones(shape)))
    fpairs = lattice_pairs(full.numpy(), shape)
    ramp = full[:, 0].double() * 0.5 - full[:, 2].double()
    inner = ((full > 1) & (full < torch.tensor(shape) - 2)).all(1)  # L ramp is 0 one voxel in
    assert float(intensity.prior_apply(ramp, fpairs, curvature=k)[inner].abs().max()) < 1e-9
    assert float((ramp * intensity.prior_apply(ramp, fpairs)).sum()) > 100  # the gradient prior's cost


def test_curvature_weight_follows_the_finest_spacing():
    """The curvature term's weight relative to lambda: curvature_scale x (1 mm / s)^2, s the finest
    level's spacing; None for the gradient prior."""
    from mgaussian.errors import InputError
    from mgaussian.recon.config import config_from_dict

    cfg = config_from_dict({"output_resolution": 1.2, "curvature_scale": 0.7})
    assert intensity.curvature_weight(cfg) == pytest.approx(0.7 / 1.44)
    assert intensity.curvature_weight(config_from_dict({"smoothness_prior": "gradient"})) is None
    with pytest.raises(InputError, match="smoothness_prior: curvature or gradient"):
        config_from_dict({"smoothness_prior": "tv"})
