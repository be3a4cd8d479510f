"""Gaussian field: magnetic Gaussians on a masked regular grid, progressive growth, regulariser.

A :class:`GaussianField` holds N magnetic Gaussians with the seed's 11 parameters each:
``means`` [N,3] (mm, world), ``log_scales`` [N,3], ``quats`` [N,4] (unnormalised, w,x,y,z) and
``intensities`` [N] (peak value of the un-normalised Gaussian).

Initial scale (documented choice): every Gaussian starts isotropic with sigma = ``scale_factor`` x
spacing, default ``scale_factor = 0.6``. For sigma/h = 0.6 the first Fourier harmonic of a lattice of
equal Gaussians is 2 exp(-2 pi^2 0.36) = 1.6e-3 per axis, so a constant intensity renders a constant
field up to < 1 % ripple with point evaluation (measured 0.991-0.998) and < 0.05 % through the slice
PSF, while the number of Gaussians overlapping a pixel stays moderate (0.5 gives ~4x the ripple,
0.7 costs ~1.6x more pairs). ``init_intensity`` is the *field value* to
reproduce; it is divided by the lattice sum ``sum_k exp(-|k|^2 / (2 f^2))`` (f = scale_factor) so
that the rendered field (point evaluation, no cut-off) equals it at the grid points. With a slice PSF
(a unit-mass convolution) a constant field stays the same constant; a Mahalanobis cut-off of 3
removes ~2.9 % of every Gaussian's mass (P(chi2_3 > 9)), i.e. renders ~2.9 % low, uniformly.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from dataclasses import field as dc_field
from typing import Callable

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor

__all__ = [
    "GaussianField",
    "init_field_on_grid",
    "grow_field",
    "anisotropy_penalty",
    "lattice_sum",
    "volume_at_points",
    "DEFAULT_SCALE_FACTOR",
]

DEFAULT_SCALE_FACTOR = 0.6


@dataclass
class GaussianField:
    """N magnetic Gaussians (tensors may be made leaf Parameters by the trainer).

    means [N,3] mm, log_scales [N,3], quats [N,4] (w,x,y,z), intensities [N]; ``spacing`` (mm) of
    the grid level; ``grid_origin`` [3] (world mm of grid index 0), ``grid_index`` [N,3] int (cell of
    each Gaussian on its level, used by :func:`grow_field`), ``grid_shape`` (3 ints).
    """

    means: Tensor
    log_scales: Tensor
    quats: Tensor
    intensities: Tensor
    spacing: float
    grid_origin: np.ndarray = dc_field(default_factory=lambda: np.zeros(3))
    grid_index: np.ndarray | None = None
    grid_shape: tuple[int, int, int] | None = None

    @property
    def num_gaussians(self) -> int:
        return int(self.means.shape[0])

    def tensors(self) -> dict[str, Tensor]:
        return {
            "means": self.means,
            "log_scales": self.log_scales,
            "quats": self.quats,
            "intensities": self.intensities,
        }

    def requires_grad_(self, flag: bool = True) -> "GaussianField":
        for t in self.tensors().values():
            t.requires_grad_(flag)
        return self

    def detach(self) -> "GaussianField":
        return GaussianField(
            self.means.detach().clone(),
            self.log_scales.detach().clone(),
            self.quats.detach().clone(),
            self.intensities.detach().clone(),
            self.spacing,
            self.grid_origin.copy(),
            None if self.grid_index is None else self.grid_index.copy(),
            self.grid_shape,
        )

    def to(self, *args, **kwargs) -> "GaussianField":
        t = {k: v.detach().to(*args, **kwargs) for k, v in self.tensors().items()}
        return GaussianField(
            t["means"],
            t["log_scales"],
            t["quats"],
            t["intensities"],
            self.spacing,
            self.grid_origin,
            self.grid_index,
            self.grid_shape,
        )

    def render_slices(self, origins, axes, shape, spacing, psf_sigma=None, **kw) -> Tensor:
        """:func:`mgaussian.render.render_slices` of this field."""
        from ..render import render_slices

        return render_slices(
            self.means, self.log_scales, self.quats, self.intensities, origins, axes, shape, spacing, psf_sigma, **kw
        )

    def render_points(self, points, psf_cov=None, **kw) -> Tensor:
        """:func:`mgaussian.render.render_points` of this field (cell size = spacing by default)."""
        from ..render import render_points

        kw.setdefault("cell_size", self.spacing)
        return render_points(self.means, self.log_scales, self.quats, self.intensities, points, psf_cov, **kw)


def lattice_sum(scale_factor: float) -> float:
    """sum over the integer lattice Z^3 of exp(-|k|^2 / (2 f^2)): field of unit intensities at a node."""
    k = np.arange(-int(10 * scale_factor) - 3, int(10 * scale_factor) + 4)
    return float(np.exp(-(k**2) / (2.0 * scale_factor**2)).sum() ** 3)


# numpy reduces the rows of an [N, 3] or [N, 4] array one short row at a time: these sums of the
# columns make the same additions in the same order (the same bits), ~10 x faster (mni-t4's grid at
# 1 mm: 0.70 -> 0.06 s for the nodes' norms, benchmarks/SPEED.md session 22)
def _row_sum(x: np.ndarray) -> np.ndarray:
    out = x[:, 0].copy()
    for k in range(1, x.shape[1]):
        out += x[:, k]
    return out


def _row_norm(x: np.ndarray) -> np.ndarray:
    return np.sqrt(_row_sum(x * x))


def _rows_all(b: np.ndarray) -> np.ndarray:
    return np.logical_and.reduce([b[:, k] for k in range(b.shape[1])])


def _rows_any(b: np.ndarray) -> np.ndarray:
    return np.logical_or.reduce([b[:, k] for k in range(b.shape[1])])


# the last mask's distance map, (key, map): a run asks for the same region's grid two or three
# times (the slice profile's fit and the coarse level at one spacing, the fine level at another;
# mni-t4's 1 mm region: ~0.6 s a transform). One tuple, read once: safe between threads.
_LAST_DISTANCE: tuple | None = None


def _distance_to_mask(mask: np.ndarray, vox: np.ndarray) -> np.ndarray:
    """Distance (mm) from every voxel centre to the mask (0 inside), for voxels of size ``vox``;
    the last answer is kept and given again for the same mask and voxel size (read-only)."""
    global _LAST_DISTANCE
    key = (mask.shape, hashlib.sha1(np.packbits(mask).tobytes()).hexdigest(), tuple(float(v) for v in vox))
    last = _LAST_DISTANCE
    if last is not None and last[0] == key:
        return last[1]
    dist = ndimage.distance_transform_edt(~mask, sampling=vox)
    dist.flags.writeable = False
    _LAST_DISTANCE = (key, dist)
    return dist


def _grid_for_mask(mask: np.ndarray, affine: np.ndarray, spacing: float, dilate: float):
    """World-aligned grid over the mask's world bounding box (+dilate), cells within dilate of it."""
    mask = np.asarray(mask).astype(bool)
    affine = np.asarray(affine, dtype=np.float64)
    if not mask.any():
        raise ValueError("mask is empty")
    idx = np.argwhere(mask)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    lo = world.min(0) - dilate
    hi = world.max(0) + dilate
    shape = tuple(int(v) for v in np.floor((hi - lo) / spacing + 1e-9).astype(int) + 1)
    gi = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    pts = lo + gi * spacing
    vox = np.sqrt((affine[:3, :3] ** 2).sum(0))
    dist = _distance_to_mask(mask, vox)
    inv = np.linalg.inv(affine)
    v = pts @ inv[:3, :3].T + inv[:3, 3]
    vr = np.rint(v).astype(np.int64)
    vc = np.clip(vr, 0, np.array(mask.shape) - 1)
    # the distance beyond the mask's grid, for the nodes outside it (0 for the rest: mni-t4's fine
    # grid, 4.4M nodes, 0.59 s over all of them)
    beyond = _rows_any(vr != vc)
    outside = np.zeros(len(vr))
    outside[beyond] = _row_norm((vr[beyond] - vc[beyond]) * vox)
    d = dist[vc[:, 0], vc[:, 1], vc[:, 2]] + outside
    keep = d <= dilate + 1e-6
    return lo, shape, gi[keep], pts[keep]


def volume_at_points(volume: np.ndarray, affine: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """A volume (voxel -> world ``affine``) sampled trilinearly at world points [N,3] (mm), the
    nearest edge value outside its grid: float64 [N]."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    v = np.asarray(pts, dtype=np.float64) @ inv[:3, :3].T + inv[:3, 3]
    return ndimage.map_coordinates(np.asarray(volume, dtype=np.float64), v.T, order=1, mode="nearest")


def _sample_intensity(init_intensity, pts: np.ndarray, affine: np.ndarray) -> np.ndarray:
    if callable(init_intensity):
        return np.asarray(init_intensity(pts), dtype=np.float64).reshape(-1)
    if isinstance(init_intensity, Tensor):
        init_intensity = init_intensity.detach().cpu().numpy()
    arr = np.asarray(init_intensity, dtype=np.float64)
    if arr.ndim == 0:
        return np.full(len(pts), float(arr))
    if arr.ndim == 3:
        return volume_at_points(arr, affine, pts)
    if arr.ndim == 1 and len(arr) == len(pts):
        return arr
    raise ValueError("init_intensity: float, callable(points [N,3]) -> [N], volume like mask, or [N]")


def init_field_on_grid(
    mask: np.ndarray,
    affine: np.ndarray,
    spacing_mm: float,
    dilate_mm: float | None = None,
    init_intensity: float | np.ndarray | Tensor | Callable = 1.0,
    scale_factor: float = DEFAULT_SCALE_FACTOR,
    dtype=torch.float32,
    device="cpu",
) -> GaussianField:
    """Gaussians on a regular world-axis-aligned grid at ``spacing_mm`` over the mask.

    mask: bool (X,Y,Z) voxel mask; affine: (4,4) voxel -> world mm. The grid covers the mask's world
    bounding box grown by ``dilate_mm`` (default 2 x spacing) and keeps the nodes within
    ``dilate_mm`` of a mask voxel centre. Isotropic sigma = scale_factor x spacing, identity
    quaternions, intensities = init_intensity / lattice_sum(scale_factor) so that the rendered
    field reproduces ``init_intensity`` (float, callable on world points [N,3], volume on the mask's
    voxel grid sampled trilinearly, or per-node values [N]).
    """
    h = float(spacing_mm)
    dilate = 2.0 * h if dilate_mm is None else float(dilate_mm)
    lo, shape, gi, pts = _grid_for_mask(mask, affine, h, dilate)
    vals = _sample_intensity(init_intensity, pts, affine) / lattice_sum(scale_factor)
    n = len(pts)
    quats = torch.zeros(n, 4, dtype=dtype, device=device)
    quats[:, 0] = 1.0
    return GaussianField(
        means=torch.as_tensor(pts, dtype=dtype, device=device),
        log_scales=torch.full((n, 3), math.log(scale_factor * h), dtype=dtype, device=device),
        quats=quats,
        intensities=torch.as_tensor(vals, dtype=dtype, device=device),
        spacing=h,
        grid_origin=lo,
        grid_index=gi,
        grid_shape=shape,
    )


def _corner_sums(base, frac, lut, c0, s0, q0):
    """For each new node (its old cell ``base`` [M,3] and position ``frac`` in it), the trilinear
    weights' sum and the weighted sums of the old Gaussians' intensities ``c0``, relative
    log-scales ``s0`` and quaternions ``q0`` (each turned to the hemisphere of the node's first
    valid corner) over the cell's corners that hold a Gaussian (``lut``: grid -> Gaussian or -1).
    The cpu kernel ``grow_corners``; :func:`_corner_sums_numpy` is its twin, the same numbers."""
    from ..render._cpu_kernels import grow_corners

    m = len(base)
    acc_w, acc_c, acc_s, acc_q = np.zeros(m), np.zeros(m), np.zeros((m, 3)), np.zeros((m, 4))
    grow_corners(
        np.ascontiguousarray(base, dtype=np.int64), np.ascontiguousarray(frac, dtype=np.float64),
        np.ascontiguousarray(lut, dtype=np.int64), c0, np.ascontiguousarray(s0), np.ascontiguousarray(q0),
        acc_w, acc_c, acc_s, acc_q,
    )  # fmt: skip
    return acc_w, acc_c, acc_s, acc_q


def _corner_sums_numpy(base, frac, lut, c0, s0, q0):
    """:func:`_corner_sums` in numpy, corner by corner over all nodes at once (the reference)."""
    n1 = len(base)
    shp = np.array(lut.shape)
    acc_w = np.zeros(n1)
    acc_c = np.zeros(n1)
    acc_s = np.zeros((n1, 3))
    acc_q = np.zeros((n1, 4))
    ref_q = None
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                off = np.array([dx, dy, dz])
                corner = base + off
                inside = _rows_all((corner >= 0) & (corner < shp))
                j = np.full(n1, -1)
                cc = corner[inside]
                j[inside] = lut[cc[:, 0], cc[:, 1], cc[:, 2]]
                ok = j >= 0
                f = np.where(off == 1, frac, 1.0 - frac)
                wgt = f[:, 0] * f[:, 1] * f[:, 2] * ok
                jj = np.where(ok, j, 0)
                qq = q0[jj]
                if ref_q is None:
                    ref_q = np.where(ok[:, None], qq, 0.0)
                else:  # first valid corner becomes the hemisphere reference
                    empty = ~_rows_any(ref_q != 0) & ok
                    ref_q[empty] = qq[empty]
                sign = np.where(_row_sum(qq * ref_q) < 0, -1.0, 1.0)
                acc_w += wgt
                acc_c += wgt * c0[jj]
                acc_s += wgt[:, None] * s0[jj]
                acc_q += (wgt * sign)[:, None] * qq
    return acc_w, acc_c, acc_s, acc_q


def grow_field(
    field: GaussianField, new_spacing_mm: float, mask: np.ndarray, affine: np.ndarray, dilate_mm: float | None = None
) -> GaussianField:
    """Next level of the progressive grid, initialised from ``field`` (the paper's growth step).

    The new level is :func:`init_field_on_grid`'s grid at ``new_spacing_mm``; at each new node the
    old level's intensity and *relative* log-scale (log_scale - log(old spacing)) are interpolated
    trilinearly from the old grid nodes (corners without a Gaussian are left out and the weights
    renormalised; nodes with no old corner take the nearest old Gaussian), quaternions by
    normalised linear interpolation (signs aligned first), and the scale is moved to the new
    spacing: log_scale = interpolated + log(new spacing). Since sigma/h and the intensities are
    kept, the rendered field is nearly unchanged. The means are placed on the new grid nodes.
    """
    if field.grid_index is None or field.grid_shape is None:
        raise ValueError("field has no grid bookkeeping (grid_index/grid_shape)")
    h0, h1 = float(field.spacing), float(new_spacing_mm)
    dilate = 2.0 * h1 if dilate_mm is None else float(dilate_mm)
    lo1, shape1, gi1, pts1 = _grid_for_mask(mask, affine, h1, dilate)
    dtype, device = field.means.dtype, field.means.device
    c0 = field.intensities.detach().cpu().double().numpy()
    s0 = field.log_scales.detach().cpu().double().numpy() - math.log(h0)
    q0 = field.quats.detach().cpu().double().numpy()
    q0 = q0 / np.linalg.norm(q0, axis=1, keepdims=True)
    shp = field.grid_shape
    lut = -np.ones(shp, np.int64)
    gi0 = field.grid_index
    lut[gi0[:, 0], gi0[:, 1], gi0[:, 2]] = np.arange(len(gi0))
    u = (pts1 - field.grid_origin) / h0
    base = np.floor(u).astype(np.int64)
    frac = u - base
    acc_w, acc_c, acc_s, acc_q = _corner_sums(base, frac, lut, c0, s0, q0)
    none = acc_w <= 1e-12
    if none.any():
        from scipy.spatial import cKDTree

        old_pos = field.grid_origin + gi0 * h0
        _, nn = cKDTree(old_pos).query(pts1[none])
        acc_w[none] = 1.0
        acc_c[none] = c0[nn]
        acc_s[none] = s0[nn]
        acc_q[none] = q0[nn]
    c1 = acc_c / acc_w
    s1 = acc_s / acc_w[:, None] + math.log(h1)
    qn = _row_norm(acc_q)[:, None]
    q1 = np.where(qn > 1e-12, acc_q / np.maximum(qn, 1e-12), np.array([1.0, 0, 0, 0]))
    return GaussianField(
        means=torch.as_tensor(pts1, dtype=dtype, device=device),
        log_scales=torch.as_tensor(s1, dtype=dtype, device=device),
        quats=torch.as_tensor(q1, dtype=dtype, device=device),
        intensities=torch.as_tensor(c1, dtype=dtype, device=device),
        spacing=h1,
        grid_origin=lo1,
        grid_index=gi1,
        grid_shape=shape1,
    )


def anisotropy_penalty(field: GaussianField | Tensor, max_ratio: float = 1.5) -> Tensor:
    """The seed's anisotropy term mean(max(0, max sigma / min sigma - max_ratio)).

    ``field``: a GaussianField or its log-scales [N,3]. Returns the mean (the 0.1 weight is the
    caller's). Differentiable w.r.t. the log-scales.
    """
    ls = field.log_scales if isinstance(field, GaussianField) else field
    ratio = torch.exp(ls.max(-1).values - ls.min(-1).values)
    return torch.clamp(ratio - max_ratio, min=0.0).mean()
