"""Forward and gradient parity of every backend against ``reference``; dispatch and fallbacks."""

from __future__ import annotations

import os

import pytest
import torch
from test_render_helpers import img_err, random_gaussians, random_poses, rel_err

import mgaussian.render as R
from mgaussian.render._common import spans_to_mask

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton's interpreter runs the gpu kernels on the CPU (small sizes only); it must be chosen
    # before triton is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False

SHAPE, SPACING = (22, 27), (0.8, 0.7)
PSFS = {
    "none": None,
    "shared": (0.41, 0.36, 1.36),
    "per_slice": torch.tensor([[0.41, 0.36, 1.36], [0.3, 0.3, 2.0], [0.5, 0.2, 0.9]]),
}


def _gpu_or_skip():
    if not HAS_TRITON:
        pytest.skip("triton is not installed: gpu backend cannot run")
    if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no CUDA and TRITON_INTERPRET is not 1")


def _render_and_grad(backend, params, poses, psf, dtype, cutoff=3.0, **kw):
    # the gpu backend runs on CUDA tensors when a GPU is present, else under the interpreter
    dev = "cuda" if backend == "gpu" and HAS_CUDA else "cpu"
    p = [t.detach().to(dev, dtype).requires_grad_() for t in params]
    o, a = (t.detach().to(dev, dtype).requires_grad_() for t in poses)
    img = R.render_slices(*p, o, a, SHAPE, SPACING, psf, backend=backend, cutoff=cutoff, **kw)
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(img.shape, generator=gen, dtype=torch.float64).to(dev, dtype)
    grads = torch.autograd.grad((img * w).sum(), p + [o, a])
    return img.detach().cpu(), [g.cpu() for g in grads]


def _parity(backend, psf_key, dtype=torch.float32, n=150, tol=1e-4, **kw):
    params = random_gaussians(n, seed=3)
    poses = random_poses(3, seed=4)
    psf = PSFS[psf_key]
    img_r, g_r = _render_and_grad("reference", params, poses, psf, torch.float64, **kw)
    img_b, g_b = _render_and_grad(backend, params, poses, psf, dtype, **kw)
    assert img_r.abs().max() > 0.1  # the case is not empty
    assert img_err(img_b, img_r) <= tol
    names = ["means", "log_scales", "quats", "intensities", "origins", "axes"]
    for name, gb, gr in zip(names, g_b, g_r):
        assert gr.norm() > 0, name
        assert rel_err(gb, gr) <= tol, (name, rel_err(gb, gr))


@pytest.mark.parametrize("psf_key", list(PSFS))
def test_cpu_slices_match_reference_float32(psf_key):
    _parity("cpu", psf_key)


def test_cpu_slices_match_reference_float64_tight():
    params = random_gaussians(80, seed=7)
    poses = random_poses(3, seed=8)
    img_r, g_r = _render_and_grad("reference", params, poses, PSFS["shared"], torch.float64)
    img_b, g_b = _render_and_grad("cpu", params, poses, PSFS["shared"], torch.float64)
    assert img_err(img_b, img_r) < 1e-10
    for gb, gr in zip(g_b, g_r):
        assert rel_err(gb, gr) < 1e-9


def test_cpu_slices_pixel_selection_matches_reference():
    gen = torch.Generator().manual_seed(2)
    mask = torch.rand(3, *SHAPE, generator=gen) > 0.25
    _parity("cpu", "shared", pixel_mask=mask, window=(2, 20, 3, 25), cutoff=2.5)


def test_cpu_non_orthonormal_axes_follow_slice_frame_definition():
    params = random_gaussians(60, seed=11)
    o, a = random_poses(3, seed=12)
    a2 = a.detach() + 0.05 * torch.randn(3, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    img_r, g_r = _render_and_grad("reference", params, (o, a2), PSFS["shared"], torch.float64)
    img_b, g_b = _render_and_grad("cpu", params, (o, a2), PSFS["shared"], torch.float64)
    assert img_err(img_b, img_r) < 1e-10
    assert rel_err(g_b[-1], g_r[-1]) < 1e-9


def test_row_spans_and_mask_leave_other_pixels_zero():
    params = random_gaussians(100, seed=1)
    o, a = random_poses(3, seed=2)
    full = R.render_slices(*params, o, a, SHAPE, SPACING, PSFS["shared"], backend="cpu").detach()
    win = R.render_slices(*params, o, a, SHAPE, SPACING, PSFS["shared"], backend="cpu", window=(3, 15, 4, 20)).detach()
    inside = torch.zeros_like(full, dtype=torch.bool)
    inside[:, 3:15, 4:20] = True
    assert torch.equal(win[~inside], torch.zeros_like(win[~inside]))
    assert torch.allclose(win[inside], full[inside], rtol=0, atol=1e-12)
    assert full[~inside].abs().max() > 0


@pytest.mark.parametrize("psf", [None, "shared", "per_point"])
@pytest.mark.parametrize("radius", [None, 2])
def test_cpu_points_match_reference(psf, radius):
    params = random_gaussians(200, lo=(0, 0, 0), hi=(8, 8, 8), seed=5, log_mean=-0.4)
    gen = torch.Generator().manual_seed(6)
    pts = (torch.rand(150, 3, generator=gen, dtype=torch.float64) * 8).requires_grad_()
    if psf == "shared":
        cov = torch.diag(torch.tensor([0.2, 0.3, 1.5], dtype=torch.float64))
    elif psf == "per_point":
        m = torch.randn(150, 3, 3, generator=gen, dtype=torch.float64) * 0.4
        cov = m @ m.transpose(1, 2)
    else:
        cov = None
    out = []
    for backend, dt in (("reference", torch.float64), ("cpu", torch.float32)):
        p = [t.detach().to(dt).requires_grad_() for t in params]
        x = pts.detach().to(dt).requires_grad_()
        c = None if cov is None else cov.detach().to(dt).requires_grad_()
        v = R.render_points(*p, x, c, block_radius=radius, cell_size=1.0, backend=backend)
        w = torch.linspace(-1, 1, v.numel(), dtype=dt)
        out.append((v.detach(), torch.autograd.grad((v * w).sum(), p + [x] + ([c] if c is not None else []))))
    (vr, gr), (vb, gb) = out
    assert img_err(vb, vr) <= 1e-4
    for a, b in zip(gb, gr):
        assert rel_err(a, b) <= 1e-4


# --------------------------------------------------------------------------------------- gpu


@pytest.mark.parametrize("psf_key", ["none", "per_slice"])
def test_gpu_slices_match_reference(psf_key):
    _gpu_or_skip()
    _parity("gpu", psf_key, n=60)


def test_gpu_slices_pixel_mask_match_reference():
    _gpu_or_skip()
    gen = torch.Generator().manual_seed(9)
    mask = torch.rand(3, *SHAPE, generator=gen) > 0.3
    _parity("gpu", "shared", n=60, pixel_mask=mask)


@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs a CUDA GPU and triton")
def test_gpu_slices_match_reference_on_cuda():
    params = [t.detach().cuda() for t in random_gaussians(3000, hi=(60, 60, 5), seed=3)]
    o, a = (t.detach().cuda() for t in random_poses(6, seed=4))
    img_r = R.render_slices(
        *[p.double() for p in params], o.double(), a.double(), (80, 80), SPACING, PSFS["shared"], backend="reference"
    )
    img_g = R.render_slices(*params, o, a, (80, 80), SPACING, PSFS["shared"], backend="gpu")
    assert img_err(img_g.cpu(), img_r.cpu()) <= 1e-4


# ------------------------------------------------------------------------------------- dispatch


def test_available_and_resolve():
    av = R.available_backends()
    assert av[0] == "reference" and "cpu" in av
    assert R.resolve_backend("auto") == ("gpu" if HAS_CUDA and HAS_TRITON else "cpu")
    with pytest.raises(ValueError):
        R.resolve_backend("tpu")


def test_gpu_falls_back_with_warning(monkeypatch):
    monkeypatch.setattr(R, "_has", lambda mod: mod != "triton")
    with pytest.warns(RuntimeWarning, match="triton"):
        assert R.resolve_backend("gpu") == "cpu"
    assert R.resolve_backend("auto") == "cpu"


def test_missing_numba_falls_back_to_reference(monkeypatch):
    monkeypatch.setattr(R, "_has", lambda mod: False)
    with pytest.warns(RuntimeWarning):
        assert R.resolve_backend("auto") == "reference"
    with pytest.warns(RuntimeWarning):
        assert R.resolve_backend("cpu") == "reference"
    import contextlib

    assert isinstance(R.shared_gaussians(), contextlib.nullcontext)  # no cpu module to import


def test_cpu_stats_report_pairs():
    params = random_gaussians(100, seed=1)
    o, a = random_poses(3, seed=2)
    stats = {"count_pixel_pairs": True}
    R.render_slices(*params, o, a, SHAPE, SPACING, PSFS["shared"], backend="cpu", stats=stats)
    assert 0 < stats["pairs"] <= 300 and stats["pixel_pairs"] > stats["pairs"]


@pytest.mark.parametrize("backend", ["reference", "cpu", "gpu"])
def test_empty_and_degenerate_inputs(backend):
    if backend == "gpu":
        _gpu_or_skip()
    dev = "cuda" if backend == "gpu" and HAS_CUDA else "cpu"

    def gaussians(n):
        q = torch.zeros(n, 4, device=dev)
        q[:, 0] = 1
        return [
            torch.zeros(n, 3, device=dev).requires_grad_(),
            torch.zeros(n, 3, device=dev).requires_grad_(),
            q.requires_grad_(),
            torch.ones(n, device=dev).requires_grad_(),
        ]

    o = torch.zeros(2, 3, device=dev, requires_grad=True)
    a = torch.eye(3, device=dev).repeat(2, 1, 1).requires_grad_()
    img = R.render_slices(*gaussians(0), o, a, (4, 5), (1.0, 1.0), (0.4, 0.4, 1.3), backend=backend)
    assert img.shape == (2, 4, 5) and float(img.detach().abs().sum()) == 0
    g = gaussians(1)
    far = [g[0] + 100.0] + g[1:]
    assert float(R.render_slices(*far, o, a, (4, 5), (1.0, 1.0), None, backend=backend).detach().abs().sum()) == 0
    one = R.render_slices(*g, o, a, (4, 5), (1.0, 1.0), None, backend=backend)
    assert abs(float(one[0, 0, 0].detach()) - 1.0) < 1e-6  # peak = intensity at the mean, no PSF
    one.sum().backward()
    assert o.grad is not None and torch.isfinite(a.grad).all()
    none = R.render_slices(*gaussians(3), o[:0], a[:0], (4, 5), (1.0, 1.0), None, backend=backend)
    assert none.shape == (0, 4, 5)
    pts = R.render_points(*gaussians(3), torch.zeros(0, 3, device=dev), backend=backend)
    assert pts.shape == (0,)


def test_cpu_rejects_non_finite_gaussians():
    params = [t.detach() for t in random_gaussians(20, seed=1)]
    o, a = (t.detach() for t in random_poses(2, seed=2))
    bad = params[0].clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        R.render_slices(bad, *params[1:], o, a, SHAPE, SPACING, None, backend="cpu")
    ls = params[1].clone()
    ls[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        R.render_slices(params[0], ls, *params[2:], o, a, SHAPE, SPACING, None, backend="cpu")
    with pytest.raises(ValueError, match="non-finite"):
        R.render_points(*params, torch.full((2, 3), float("nan"), dtype=torch.float64), backend="cpu")


def test_cpu_matches_reference_at_scale_many_cells():
    """Thousands of Gaussians over many cells, large oblique slices: exercises the cell pre-cull."""
    params = random_gaussians(6000, lo=(-20, -20, -20), hi=(20, 20, 20), seed=21, log_mean=-0.3)
    o, a = random_poses(3, seed=22, max_angle=1.2, shift=3.0)
    o = (o.detach() - 18.0 * (a.detach()[:, 0] + a.detach()[:, 1])).requires_grad_()
    shape, spacing = (48, 52), (0.8, 0.75)
    out = []
    for backend in ("reference", "cpu"):
        p = [t.detach().requires_grad_() for t in params]
        oo, aa = o.detach().requires_grad_(), a.detach().requires_grad_()
        img = R.render_slices(*p, oo, aa, shape, spacing, (0.41, 0.38, 1.36), backend=backend)
        w = torch.randn(img.shape, generator=torch.Generator().manual_seed(3), dtype=img.dtype)
        out.append((img.detach(), torch.autograd.grad((img * w).sum(), p + [oo, aa])))
    (ir, gr), (ib, gb) = out
    assert (ir != 0).float().mean() > 0.9  # the slices are covered
    assert img_err(ib, ir) < 1e-10
    for x, y in zip(gb, gr):
        assert rel_err(x, y) < 1e-9


@pytest.mark.parametrize("psf_key", ["none", "per_slice"])
def test_cpu_design_matches_the_reference_render_and_its_gradient(psf_key):
    """The cpu backend's explicit linear map of the intensities (``slice_design``) against the
    reference renderer on random Gaussians and poses: A c equals the render, A^T x equals the
    render's gradient w.r.t. the intensities, and A^T W A v their composition. Its terms are 16-bit
    fractions of their pair's amplitude (error <= 0.5 / 65535 of it): within 3e-5 of the render."""
    mu, ls, q, c = (t.double() for t in random_gaussians(150, seed=3))
    o, a = (t.double() for t in random_poses(3, seed=4))
    psf = PSFS[psf_key]
    spans = torch.zeros(3, SHAPE[0], 2, dtype=torch.int32)
    spans[:, 2:19, 0], spans[:, 2:19, 1] = 3, 24  # a pixel selection: other pixels stay 0
    d = R.slice_design(mu, ls, q, o, a, SHAPE, SPACING, psf, backend="cpu", cutoff=3.0, row_spans=spans)
    assert type(d).__name__ == "SliceDesign" and d.nbytes > 0
    cc = c.detach().clone().requires_grad_(True)
    img = R.render_slices(mu, ls, q, cc, o, a, SHAPE, SPACING, psf, backend="reference", cutoff=3.0, row_spans=spans)
    assert img.abs().max() > 0.1
    assert img_err(d.matvec(c), img.detach()) <= 3e-5
    g = torch.Generator().manual_seed(7)
    x = torch.randn(img.shape, generator=g, dtype=torch.float64)
    (gc,) = torch.autograd.grad((img * x).sum(), cc)
    assert rel_err(d.rmatvec(x), gc) <= 3e-5
    wt = torch.rand(img.shape, generator=g, dtype=torch.float64)
    ref = R.AutogradDesign(
        lambda v: R.render_slices(
            mu, ls, q, v, o, a, SHAPE, SPACING, psf, backend="reference", cutoff=3.0, row_spans=spans
        ),
        c.shape[0],
    )
    assert rel_err(d.normal(c, wt), ref.normal(c, wt)) <= 3e-5
    assert rel_err(d.rmatvec(x), ref.rmatvec(x)) <= 3e-5


def test_design_falls_back_to_autograd_beyond_its_memory_limit():
    """A design that would take more than ``max_bytes`` is not built: the render goes through
    autograd instead, with the same values."""
    mu, ls, q, c = random_gaussians(80, seed=1)
    o, a = random_poses(2, seed=2)
    small = R.slice_design(mu, ls, q, o, a, SHAPE, SPACING, PSFS["shared"], backend="cpu", max_bytes=1000)
    full = R.slice_design(mu, ls, q, o, a, SHAPE, SPACING, PSFS["shared"], backend="cpu")
    assert isinstance(small, R.AutogradDesign) and full.nbytes > 1000
    assert img_err(small.matvec(c), full.matvec(c)) <= 3e-5
    g = torch.Generator().manual_seed(3)
    x = torch.randn(small.matvec(c).shape, generator=g)
    assert rel_err(small.rmatvec(x), full.rmatvec(x)) <= 3e-5


PSF5 = torch.tensor([[0.41, 0.36, 1.36], [0.3, 0.3, 2.0], [0.5, 0.2, 0.9], [0.4, 0.4, 1.5], [0.35, 0.3, 1.1]])


def test_design_built_in_runs_of_slices_equals_the_whole(monkeypatch):
    """A design built a few slices at a time (bounded plan memory) applies the same map as one
    built in one run: A c, A^T x, A^T W A v and the diagonal, to rounding."""
    from mgaussian.render import cpu

    mu, ls, q, c = (t.double() for t in random_gaussians(150, seed=5))
    o, a = (t.double() for t in random_poses(5, seed=6))
    monkeypatch.setattr(cpu, "_BUILD_SLICES", 64)
    whole = R.slice_design(mu, ls, q, o, a, SHAPE, SPACING, PSF5, backend="cpu", cutoff=3.0)
    monkeypatch.setattr(cpu, "_BUILD_SLICES", 2)
    runs = R.slice_design(mu, ls, q, o, a, SHAPE, SPACING, PSF5, backend="cpu", cutoff=3.0)
    assert type(whole).__name__ == "SliceDesign" and type(runs).__name__ == "SliceDesignParts"
    assert len(runs.parts) == 3 and runs.n_terms == whole.n_terms
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, *SHAPE, generator=g, dtype=torch.float64)
    wt = torch.rand(5, *SHAPE, generator=g, dtype=torch.float64)
    assert torch.allclose(runs.matvec(c), whole.matvec(c), rtol=0, atol=1e-12)
    assert rel_err(runs.rmatvec(x), whole.rmatvec(x)) <= 1e-12
    assert rel_err(runs.normal(c, wt), whole.normal(c, wt)) <= 1e-12
    assert rel_err(runs.diag_normal(wt), whole.diag_normal(wt)) <= 1e-12
    small = R.slice_design(mu, ls, q, o, a, SHAPE, SPACING, PSF5, backend="cpu", max_bytes=whole.nbytes // 2)
    assert isinstance(small, R.AutogradDesign)  # beyond the budget part-way: the autograd twin


@pytest.mark.parametrize("psf_key", ["none", "per_slice"])
def test_cpu_centres_alone_take_the_same_gradient(psf_key):
    """With only the centres requiring a gradient (the Adam iterations' default) the cpu backend
    runs its centres-only backward kernel: the same bits as the full kernel's centres gradient, and
    the reference's gradient within float64 rounding."""
    params = random_gaussians(150, seed=3)
    poses = random_poses(3, seed=4)
    psf = PSFS[psf_key]
    _, g_full = _render_and_grad("cpu", params, poses, psf, torch.float64)
    _, g_ref = _render_and_grad("reference", params, poses, psf, torch.float64)
    mu = params[0].detach().to(torch.float64).requires_grad_()
    rest = [t.detach().to(torch.float64) for t in params[1:]]
    o, a = (t.detach().to(torch.float64) for t in poses)
    img = R.render_slices(mu, *rest, o, a, SHAPE, SPACING, psf, backend="cpu", cutoff=3.0)
    w = torch.randn(img.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (g_mu,) = torch.autograd.grad((img * w).sum(), [mu])
    assert g_full[0].abs().max() > 1e-3  # the case moves the centres
    assert torch.equal(g_mu, g_full[0])
    assert rel_err(g_mu, g_ref[0]) < 1e-9


@pytest.mark.parametrize("shape_kind", ["wide", "needles"])
def test_cpu_row_walk_matches_reference_on_long_and_thin_ellipses(shape_kind):
    """The kernels walk exp(-q/2) from row to row by multiplication (``_row_start``): wide Gaussians
    (many rows, long column shifts) stay at float64 precision, and needles without a PSF, whose walk
    passes far outside their ellipse (where the walked value underflows), start again from the row."""
    if shape_kind == "wide":
        params = random_gaussians(40, seed=21, scale=0.3, log_mean=1.2)  # ~3.3 mm on 0.7-0.8 mm pixels
        psf = PSFS["shared"]
    else:
        params = random_gaussians(60, seed=22, scale=0.05, log_mean=0.6)
        with torch.no_grad():
            params[1][:, 0] = -4.0  # 0.02 mm thin, tilted by the random rotations
        psf = None
    poses = random_poses(3, seed=23)
    img_r, g_r = _render_and_grad("reference", params, poses, psf, torch.float64, cutoff=4.0)
    img_b, g_b = _render_and_grad("cpu", params, poses, psf, torch.float64, cutoff=4.0)
    assert img_r.abs().max() > 0.1
    assert img_err(img_b, img_r) < 1e-10
    for gb, gr in zip(g_b, g_r):
        assert rel_err(gb, gr) < 1e-9


def test_cpu_slices_sharing_a_frame_match_reference():
    """Slices with the same axes and PSF share one frame (``fill_pairs`` projects a Gaussian's
    covariance once for them): parity with the reference where frames are shared, interleaved with
    ones that are not, and where only the PSF differs."""
    from mgaussian.render.cpu import shared_frames

    params = random_gaussians(120, seed=31)
    o, a = random_poses(4, seed=32)
    a = a.detach().clone()
    a[1] = a[0]
    a[3] = a[0]  # slices 0, 1, 3: the same axes; slice 2 its own
    o = o.detach()
    o[1] = o[0] + 1.3 * a[0, 2]  # stacked along the shared normal
    o[3] = o[0] - 1.1 * a[0, 2]
    psf = torch.tensor([[0.41, 0.36, 1.36], [0.3, 0.3, 2.0], [0.41, 0.36, 1.36], [0.41, 0.36, 1.36]])
    psf2 = (psf.double() ** 2).numpy()
    frames = shared_frames(a.numpy(), psf2)
    assert frames[0] == frames[3] and len(set(frames.tolist())) == 3  # slice 1 differs by its PSF
    img_r, g_r = _render_and_grad("reference", params, (o, a), psf, torch.float64)
    img_b, g_b = _render_and_grad("cpu", params, (o, a), psf, torch.float64)
    assert img_r[[0, 1, 3]].abs().max() > 0.1
    assert img_err(img_b, img_r) < 1e-10
    for gb, gr in zip(g_b, g_r):
        assert rel_err(gb, gr) < 1e-9


def test_cpu_shared_gaussians_reuse_only_unchanged_tensors():
    """Inside ``shared_gaussians`` renders of the same Gaussian tensors over other slices give the
    images and gradients they give alone; an in-place change of a tensor is seen by the next
    render, not the stale preparation."""
    params = [t.detach().double().requires_grad_() for t in random_gaussians(150, seed=41)]
    poses = [random_poses(2, seed=s) for s in (42, 43)]
    psf = PSFS["shared"]

    def render(pose):
        o, a = (t.detach().double() for t in pose)
        img = R.render_slices(*params, o, a, SHAPE, SPACING, psf, backend="cpu")
        (g,) = torch.autograd.grad(img.square().sum(), params[0])
        return img.detach(), g

    alone = [render(p) for p in poses]
    with R.shared_gaussians():
        shared = [render(p) for p in poses]
        with torch.no_grad():
            params[1].add_(0.2)  # widened in place (Adam's step): the next render must see it
        moved = render(poses[1])
    for (ia, ga), (ib, gb) in zip(alone, shared):
        assert torch.equal(ia, ib) and torch.equal(ga, gb)
    moved_alone = render(poses[1])
    assert torch.equal(moved[0], moved_alone[0]) and torch.equal(moved[1], moved_alone[1])
    assert (moved[0] - alone[1][0]).abs().max() > 1e-3  # the change changed the image


def test_cpu_slice_index_groups_pairs_by_slice_in_gaussian_order():
    """The plan's pairs grouped by slice, each slice's in the sorted Gaussians' order (as one serial
    counting sort would place them), with gaps between the Gaussians' pair ranges, empty slices and
    more Gaussians than the sort's blocks; the same on 1 and 2 threads."""
    import numba
    import numpy as np

    from mgaussian.render import _cpu_kernels as K

    rng = np.random.default_rng(8)
    n, ns = 500, 7
    gcnt = rng.integers(0, 6, n)
    goff = np.concatenate([[0], np.cumsum(gcnt + rng.integers(0, 3, n))])  # upper bounds: gaps
    p_sl = rng.choice([0, 1, 2, 4, 6], size=goff[-1]).astype(np.int32)  # slices 3 and 5 empty
    pairs = [p for t in range(n) for p in range(goff[t], goff[t] + gcnt[t])]
    want = [p for s in range(ns) for p in pairs if p_sl[p] == s]
    old = numba.get_num_threads()
    try:
        for threads in (1, min(2, numba.config.NUMBA_NUM_THREADS)):
            numba.set_num_threads(threads)
            off, idx = K.slice_index(goff, gcnt.astype(np.int64), p_sl, ns)
            assert idx.tolist() == want
            assert off.tolist() == [0, *np.cumsum([sum(p_sl[p] == s for p in pairs) for s in range(ns)]).tolist()]
    finally:
        numba.set_num_threads(old)


@pytest.mark.parametrize("psf_key", list(PSFS))
def test_cpu_pose_channels_match_their_reference_twin(psf_key):
    """The pose channels' kernel against its PyTorch twin (the same formulas, dense), with a pixel
    mask; channel 0 is the cpu render's image, bit for bit; the gpu backend has none (None)."""
    params = [t.detach() for t in random_gaussians(150, seed=21)]
    o, a = (t.detach() for t in random_poses(3, seed=22))
    psf = PSFS[psf_key]
    mask = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(23)) > 0.2
    spans = R.mask_to_row_spans(mask, 3, SHAPE)
    ch_c = R.render_pose_channels(*params, o, a, SHAPE, SPACING, psf, backend="cpu", row_spans=spans)
    ch_r = R.render_pose_channels(*params, o, a, SHAPE, SPACING, psf, backend="reference", row_spans=spans)
    assert ch_c.shape == (3, 7, *SHAPE) and ch_c.dtype == torch.float64
    for k in range(7):
        assert ch_r[:, k].abs().max() > 1e-3, k  # every channel is exercised
        assert img_err(ch_c[:, k], ch_r[:, k]) < 1e-12, k
    img = R.render_slices(*params, o, a, SHAPE, SPACING, psf, backend="cpu", row_spans=spans)
    assert torch.equal(ch_c[:, 0], img)
    outside = ~torch.from_numpy(spans_to_mask(spans, 3, SHAPE))
    assert outside.any() and torch.equal(ch_c.permute(0, 2, 3, 1)[outside], torch.zeros(int(outside.sum()), 7).double())


def test_pose_channels_hold_the_renders_gradient_along_the_slice_axes():
    """Channels 1-3 are the render's derivative as the pixels move along the slice's axes (the
    frame's origin moved), by central differences on the reference with a cutoff wide enough to be
    smooth. Channels 4-6 (the PSF's turn) are checked through the pose Jacobian they make
    (tests/test_motion.py)."""
    params = [t.detach() for t in random_gaussians(120, seed=31)]
    o, a = (t.detach() for t in random_poses(2, seed=32))
    psf = (0.45, 0.35, 1.3)
    cut = 8.0
    ch = R.render_pose_channels(*params, o, a, SHAPE, SPACING, psf, backend="cpu", cutoff=cut)
    eps = 1e-5

    def render(oo):
        return R.render_slices(*params, oo, a, SHAPE, SPACING, psf, backend="reference", cutoff=cut)

    for c in range(3):
        fd = (render(o + eps * a[:, c]) - render(o - eps * a[:, c])) / (2 * eps)
        assert fd.abs().max() > 0.05, c
        assert img_err(ch[:, 1 + c], fd) < 1e-7, c


def test_gpu_backend_has_no_pose_channels():
    if "gpu" not in R.available_backends():
        pytest.skip("no gpu backend here")
    params = [t.detach() for t in random_gaussians(20, seed=1)]
    o, a = (t.detach() for t in random_poses(1, seed=2))
    assert R.render_pose_channels(*params, o, a, SHAPE, SPACING, None, backend="gpu") is None
