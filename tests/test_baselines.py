"""The classical references: least-squares super-resolution beats the naive average."""

from __future__ import annotations

import numpy as np
import torch

from mgaussian.baselines import SliceOperator, lsq_superresolution, naive_average
from mgaussian.io import load_stacks
from mgaussian.metrics import score_volume
from mgaussian.simulate import simulate_stacks


def _phantom():
    """A few Gaussian blobs of different sizes and signs on a 1.5 mm grid (plus a background)."""
    shape = (28, 30, 26)
    aff = np.diag([1.5, 1.5, 1.5, 1.0])
    aff[:3, 3] = [-20.0, -22.0, -18.0]
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    xyz = ijk @ aff[:3, :3].T + aff[:3, 3]
    vol = np.zeros(shape)
    blobs = [
        ((0, 0, 0), 12.0, 60.0),
        ((5, -4, 3), 3.0, 50.0),
        ((-6, 5, -2), 2.5, -30.0),
        ((3, 6, -6), 2.0, 40.0),
        ((-4, -5, 5), 3.5, 35.0),
    ]
    for c, s, a in blobs:
        vol += a * np.exp(-0.5 * ((xyz - np.asarray(c)) ** 2).sum(-1) / s**2)
    mask = vol > 20
    return np.clip(vol, 0, None).astype(np.float32), aff, mask


def _case(tmp_path, thickness=4.5):
    gt, aff, mask = _phantom()
    d = tmp_path / "sim"
    simulate_stacks(gt, aff, mask, str(d), thickness=thickness, pixel=1.5, log=lambda s: None)
    stacks = load_stacks(
        [str(d / f"stack_{i:02d}.nii.gz") for i in range(3)],
        [str(d / f"mask_{i:02d}.nii.gz") for i in range(3)],
        [thickness],
    )
    return gt, aff, mask, stacks


def test_lsq_beats_naive_and_residual_decreases(tmp_path):
    gt, aff, mask, stacks = _case(tmp_path)
    hist = []
    x = lsq_superresolution(stacks, gt.shape, aff, history=hist, threads=1)
    assert x.shape == gt.shape and x.dtype == np.float32 and np.isfinite(x).all()
    naive = naive_average([(s.data, s.affine) for s in stacks], gt.shape, aff)
    s_lsq = score_volume(x, aff, gt, aff, mask)
    s_nv = score_volume(naive, aff, gt, aff, mask)
    assert s_lsq["psnr"] > s_nv["psnr"] + 4.0, (s_lsq, s_nv)
    assert s_lsq["ssim"] > s_nv["ssim"]
    # the data residual over the CG iterations: one value before and one after each iteration
    assert len(hist) == 41
    assert hist[1] < hist[0] and hist[5] < 0.5 * hist[0]
    assert hist[-1] < 0.2 * hist[0]
    # intensities come back on the stacks' scale
    assert 0.5 < x[mask].mean() / gt[mask].mean() < 2.0


def test_lsq_box_profile_and_zero_init(tmp_path):
    gt, aff, mask, stacks = _case(tmp_path)
    hist = []
    x = lsq_superresolution(stacks, gt.shape, aff, profile="box", init="zero", iterations=15, history=hist, threads=1)
    assert np.isfinite(x).all()
    assert all(b <= a * (1 + 1e-4) for a, b in zip(hist[:5], hist[1:6]))  # CG from zero: falls at first
    naive = naive_average([(s.data, s.affine) for s in stacks], gt.shape, aff)
    assert score_volume(x, aff, gt, aff, mask)["psnr"] > score_volume(naive, aff, gt, aff, mask)["psnr"]


def test_slice_operator_adjoint_and_chunking(tmp_path):
    old = torch.get_num_threads()
    torch.set_num_threads(1)  # (much faster than 2 busy-waiting threads on a shared machine)
    try:
        _check_operator(tmp_path)
    finally:
        torch.set_num_threads(old)


def _check_operator(tmp_path):
    gt, aff, mask, stacks = _case(tmp_path)
    op = SliceOperator(stacks, gt.shape, aff, chunk_points=5000)
    op_big = SliceOperator(stacks, gt.shape, aff)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(gt.shape, generator=g)
    v = torch.rand(op.n_pixels, generator=g)
    ax = op.forward(x)
    assert torch.allclose(ax, op_big.forward(x), rtol=1e-5, atol=1e-6)
    atv = op.adjoint(v)
    lhs = float((ax.double() * v.double()).sum())
    rhs = float((x.double() * atv.double()).sum())
    assert abs(lhs - rhs) <= 1e-4 * abs(lhs)
    ax2, atax = op.normal(x)
    assert torch.allclose(ax2, ax, rtol=1e-5, atol=1e-6)
    assert torch.allclose(atax, op.adjoint(ax), rtol=1e-4, atol=1e-5)
    # a constant volume maps to (about) that constant where the slice sits well inside the grid
    one = op.forward(torch.ones(gt.shape))
    assert float(one.max()) <= 1.0 + 1e-5 and float(np.median(one.numpy())) > 0.99
