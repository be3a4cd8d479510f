"""The lattice prior's L v: the CPU loop adds what its PyTorch twin adds, bit for bit."""

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
