"""A bound on the peak memory of ``mgaussian reconstruct``, from sizes known before fitting.

The estimate is linear in five counts, with the coefficients measured by
``benchmarks/bench_memory.py`` (see ``benchmarks/MEMORY.md``):

* Gaussians at the finest level (parameters, their gradients, Adam's two moments, the
  renderer's per-tile lists, the growth step's temporaries),
* slice pixels rendered per pass (the crops of every slice that sees its mask: the conjugate-
  gradient warm start renders all of them at once, with the autograd graph),
* output-grid voxels (region mask, naive initialisation, resampling buffers, the output volume),
  and the written grid's voxels (the volume rendered 2 x finer at the end, `output_oversampling`),
* stack voxels (the loaded stacks and masks).

plus a fixed base (Python, PyTorch, Numba and the compiled kernels). All coefficients live in
``COEFFS`` below, in one place: when the training loop changes its memory use (e.g. the warm
start chunked over slices), re-run the benchmark and update them.
"""

from __future__ import annotations

__all__ = ["COEFFS", "RunSizes", "run_sizes", "estimate_peak_bytes", "check_memory", "suggest_resolution"]

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

GB = 1024**3

# bytes per unit; measured on CPU (benchmarks/MEMORY.md), rounded up
COEFFS = {
    "base": 0.55 * GB,  # interpreter + torch + numba + kernels
    # refitted 2026-12-04 when the intensity fits' maps went to 16-bit terms (2100 -> 1300): peak
    # RSS measured 4.13 GiB on mni-t4 (estimate 4.79), 1.04 / 0.89 on sb25-t3.2 / -motion (1.14);
    # since the maps are built 8 slices at a time: 3.27 GiB on mni-t4, 0.92 on sb25 (MEMORY.md)
    "per_gaussian": 1300.0,  # finest level, incl. its share of the intensity fits' maps
    "per_pixel": 250.0,  # slice pixels rendered in one pass (warm start: all slices)
    "per_output_voxel": 40.0,
    # the volume written on the 2 x finer grid (recon/output.py: its render, clip, region and
    # dilation at the end of a run): sb25-t3.2's peak 0.90 -> 1.07 GiB for 5.6M written voxels
    "per_written_voxel": 32.0,
    "per_stack_voxel": 16.0,
    "margin": 1.15,  # safety factor on the sum
}


@dataclass
class RunSizes:
    n_gaussians: int  # at the finest level
    finest_spacing_mm: float
    masked_pixels: int  # slice pixels inside the masks
    rendered_pixels: int  # crop pixels of the slices that see their mask
    output_voxels: int
    stack_voxels: int
    batch_slices: int
    resolution_mm: float
    written_voxels: int = 0  # the written grid's (output_oversampling), 0: not counted


def _mask_volume_mm3(st) -> float:
    vs = np.sqrt((st.affine[:3, :3] ** 2).sum(0))
    return float(st.mask.sum()) * float(np.prod(vs))


def _crop_pixels(st, margin: int = 2) -> int:
    m = st.mask
    ks = np.nonzero(m.any(axis=(0, 1)))[0]
    if len(ks) == 0:
        return 0
    a = np.nonzero(m.any(axis=(1, 2)))[0]
    b = np.nonzero(m.any(axis=(0, 2)))[0]
    H, W = m.shape[:2]
    h = min(H, a[-1] + 1 + margin) - max(0, a[0] - margin)
    w = min(W, b[-1] + 1 + margin) - max(0, b[0] - margin)
    return int(h * w * len(ks))


def run_sizes(
    stacks,
    resolution: float,
    spacing_factors=(2.0, 1.0),
    dilate_mm: float | None = None,
    batch_slices: int = 64,
    output_shape=None,
    output_oversampling: int | None = None,
) -> RunSizes:
    """The counts the estimate needs, computed cheaply from the loaded stacks.

    Gaussians at the finest level: the anatomy's volume (median over the stacks of their mask
    volumes) over the finest grid spacing cubed, times the growth of a ball of that volume by the
    grid's dilation (2 x spacing by default)."""
    sp = float(min(spacing_factors)) * float(resolution)
    d = 2.0 * sp if dilate_mm is None else float(dilate_mm)
    vol = float(np.median([_mask_volume_mm3(st) for st in stacks]))
    r = (3.0 * vol / (4.0 * math.pi)) ** (1.0 / 3.0)
    dil = ((r + d) / r) ** 3 if r > 0 else 1.0
    n_g = int(math.ceil(vol / sp**3 * dil))
    if output_shape is None:
        # the masked anatomy's box plus margins, roughly: a cube of the anatomy's extent + 2 x 6 mm
        side = 2.0 * r * 1.25 + 12.0
        axes = (side / resolution,) * 3
        output_voxels = int(axes[0] ** 3)
    else:
        axes = tuple(output_shape)
        output_voxels = int(np.prod(output_shape))
    # the grid the volume is written on (recon/output.py)
    from .output import oversampling, written_shape

    k = oversampling(output_oversampling, axes)
    written = int(math.prod(written_shape([float(n) for n in axes], k)))
    return RunSizes(
        n_gaussians=n_g,
        finest_spacing_mm=sp,
        masked_pixels=int(sum(int(st.mask.sum()) for st in stacks)),
        rendered_pixels=int(sum(_crop_pixels(st) for st in stacks)),
        output_voxels=output_voxels,
        stack_voxels=int(sum(st.data.size for st in stacks)),
        batch_slices=int(batch_slices),
        resolution_mm=float(resolution),
        written_voxels=int(written),
    )


def estimate_peak_bytes(
    n_gaussians: int,
    rendered_pixels: int,
    output_voxels: int,
    stack_voxels: int = 0,
    coeffs: dict | None = None,
    written_voxels: int = 0,
) -> float:
    """Predicted peak resident memory (bytes) of ``reconstruct`` on the CPU."""
    c = COEFFS if coeffs is None else coeffs
    s = (
        c["base"]
        + c["per_gaussian"] * n_gaussians
        + c["per_pixel"] * rendered_pixels
        + c["per_output_voxel"] * output_voxels
        + c["per_stack_voxel"] * stack_voxels
        + c.get("per_written_voxel", 0.0) * written_voxels
    )
    return float(s * c["margin"])


def estimate_for(sizes: RunSizes) -> float:
    return estimate_peak_bytes(
        sizes.n_gaussians,
        sizes.rendered_pixels,
        sizes.output_voxels,
        sizes.stack_voxels,
        written_voxels=sizes.written_voxels,
    )


def suggest_resolution(stacks, resolution: float, limit_bytes: float, **kw) -> float | None:
    """The finest output resolution (in steps of 0.1 mm, coarser than ``resolution``) that fits."""
    r = math.ceil(resolution * 10 + 1e-6) / 10
    if r <= resolution + 1e-9:
        r += 0.1
    while r <= 10.0:
        if estimate_for(run_sizes(stacks, r, **kw)) <= limit_bytes:
            return round(r, 1)
        r += 0.1
    return None


def check_memory(
    stacks,
    resolution: float,
    max_gb: float,
    spacing_factors=(2.0, 1.0),
    dilate_mm=None,
    batch_slices: int = 64,
    output_oversampling: int | None = None,
) -> tuple[float, RunSizes]:
    """Refuse (InputError on ``--max-memory``) a run whose estimated peak exceeds ``max_gb``."""
    kw = dict(
        spacing_factors=spacing_factors,
        dilate_mm=dilate_mm,
        batch_slices=batch_slices,
        output_oversampling=output_oversampling,
    )
    sizes = run_sizes(stacks, resolution, **kw)
    est = estimate_for(sizes)
    limit = float(max_gb) * GB
    if est > limit:
        sug = suggest_resolution(stacks, resolution, limit, **kw)
        hint = f"use --output-resolution {sug:g} or tighter --stack-masks" if sug else "use tighter --stack-masks"
        raise InputError(
            "--max-memory",
            f"this run needs about {est / GB:.1f} GB ({sizes.n_gaussians} Gaussians at {sizes.finest_spacing_mm:g} mm, "
            f"{sizes.masked_pixels} slice pixels), above the {max_gb:g} GB limit; {hint}, or raise --max-memory",
        )
    return est, sizes
