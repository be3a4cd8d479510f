"""Slice profiles: the point spread function of a thick 2D MRI slice.

A slice pixel integrates the volume over a profile: in plane a Gaussian of FWHM
``inplane_factor`` x pixel size (1.2 by default), through plane either a Gaussian of FWHM equal to
the slice thickness or a box (rectangle) of width equal to the thickness.
"""

from __future__ import annotations

__all__ = ["FWHM_TO_SIGMA", "through_plane_quadrature", "inplane_kernel"]

import math

import numpy as np

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))  # 1 / 2.3548


def through_plane_quadrature(thickness: float, profile: str, step: float):
    """Offsets (mm) and weights (sum 1) along the slice normal for the slice profile.

    gaussian: FWHM = thickness, nodes every <= ``step`` mm over +-3.5 sigma, weights from the pdf;
    box: width = thickness, midpoint rule with nodes every <= ``step`` mm.
    """
    if profile == "gaussian":
        s = thickness * FWHM_TO_SIGMA
        half = 3.5 * s
        n = max(3, int(math.ceil(2 * half / step)) | 1)
        w = np.linspace(-half, half, n)
        wt = np.exp(-0.5 * (w / s) ** 2)
    elif profile == "box":
        n = max(2, int(math.ceil(thickness / step)))
        w = (np.arange(n) + 0.5) / n * thickness - thickness / 2
        wt = np.ones(n)
    else:
        raise ValueError(f"unknown slice profile {profile!r} (gaussian or box)")
    return w, wt / wt.sum()


def inplane_kernel(fwhm_px: float, supersample: int):
    """Discrete in-plane Gaussian kernel on a grid of 1/supersample pixels (weights sum 1)."""
    s = fwhm_px * FWHM_TO_SIGMA * supersample
    r = max(1, int(math.ceil(3.0 * s)))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / max(s, 1e-6)) ** 2)
    return k / k.sum()
