"""One SimpleITK rigid registration set-up shared by stack registration (recon.motion) and the
leave-one-stack-out score (heldout): correlation metric, linear interpolation, regular-step
gradient descent with physical-shift scales, a three-level pyramid (shrink 4-2-1, smoothing
2-1-0 mm)."""

from __future__ import annotations

__all__ = ["correlation_rigid", "transform_matrix", "PYRAMID", "COARSE_LEVELS", "FINE_LEVEL"]

import numpy as np

# the pyramid's levels: (shrink factors, smoothing sigmas in mm). Its first two levels and its last
# run as two calls give the same transform, bit for bit, as the three in one call (each level starts
# the optimiser afresh from the last level's transform), so a registration can stop after the coarse
# levels and be finished later (mgaussian.assess scores stack pairs at the coarse levels)
PYRAMID = ((4, 2, 1), (2.0, 1.0, 0.0))
COARSE_LEVELS = ((4, 2), (2.0, 1.0))
FINE_LEVEL = ((1,), (0.0,))


def correlation_rigid(
    fixed,
    moving,
    init,
    *,
    iterations: int,
    learning_rate: float,
    min_step: float,
    gradient_tolerance: float = 1e-4,
    fixed_mask=None,
    levels=PYRAMID,
) -> float:
    """Register ``moving`` to ``fixed`` (SimpleITK images), refining the rigid transform ``init``
    in place over the pyramid ``levels`` (shrink factors, smoothing sigmas in mm); returns the final
    metric value (-correlation: lower is better)."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsCorrelation()
    if fixed_mask is not None:
        reg.SetMetricFixedMask(fixed_mask)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=learning_rate,
        minStep=min_step,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=gradient_tolerance,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(levels[0]))
    reg.SetSmoothingSigmasPerLevel(list(levels[1]))
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=True)
    reg.Execute(fixed, moving)
    return float(reg.GetMetricValue())


def transform_matrix(tx) -> np.ndarray:
    """4x4 matrix of a SimpleITK rigid transform x -> A (x - c) + c + t (in the images' own
    physical frame: it maps fixed points to moving points)."""
    A = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    M = np.eye(4)
    M[:3, :3] = A
    M[:3, 3] = c + t - A @ c
    return M
