"""Simple reference reconstructions used for calibration: the naive average."""

from __future__ import annotations

__all__ = ["naive_average"]

import numpy as np

from .sampling import resample_volume


def naive_average(stacks, out_shape, out_affine) -> np.ndarray:
    """Each stack resampled trilinearly onto the output grid, averaged where it covers.

    ``stacks`` is a list of (data, affine). Voxels that no stack covers are 0.
    """
    acc = np.zeros(out_shape, dtype=np.float64)
    cnt = np.zeros(out_shape, dtype=np.float64)
    for data, aff in stacks:
        acc += resample_volume(data, aff, out_shape, out_affine)
        cnt += resample_volume(np.ones(data.shape, np.float32), aff, out_shape, out_affine)
    out = np.where(cnt > 1e-3, acc / np.maximum(cnt, 1e-3), 0.0)
    return out.astype(np.float32)
