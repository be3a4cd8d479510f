"""Motion correction: rigid stack-to-stack registration before fitting (:mod:`.registration`),
slice poses and their conventions (:mod:`.poses`), each slice's pose by Levenberg-Marquardt
(:mod:`.lm`), the pose rounds that alternate it with the intensity fit (:mod:`.rounds`), and the
robust slice / pixel weights and intensity scales (:mod:`.robust`). The frame the poses are held
in is :mod:`mgaussian.recon.frame`'s."""

from __future__ import annotations

from .lm import optimise_poses
from .poses import (
    matrix_to_rotvec,
    moved_by_mean,
    pose_means,
    slice_centres,
    slice_motion,
    slice_pose_from_matrix,
    stack_pose_spread,
    to_centre_convention,
    to_stack_poses,
)
from .registration import coarse_pair, moved_stack, register_pair, register_stacks, registration_grid, same_grid
from .robust import estimate_noise, fit_slice_scales, loss_weights, robust_weights, update_robust
from .rounds import extrapolation_gain, pose_rounds, record_poses

__all__ = [
    "register_stacks",
    "register_pair",
    "coarse_pair",
    "registration_grid",
    "same_grid",
    "moved_stack",
    "slice_centres",
    "slice_pose_from_matrix",
    "to_centre_convention",
    "slice_motion",
    "anchor_poses",
    "pose_means",
    "pose_centre",
    "location",
    "fov_centre",
    "reliable_slices",
    "moved_by_mean",
    "to_stack_poses",
    "stack_pose_spread",
    "fit_slice_scales",
    "robust_weights",
    "estimate_noise",
    "update_robust",
    "loss_weights",
    "matrix_to_rotvec",
    "optimise_poses",
    "extrapolation_gain",
    "pose_rounds",
    "record_poses",
]


_FRAME_NAMES = ("anchor_poses", "fov_centre", "location", "pose_centre", "reliable_slices")


def __getattr__(name: str):
    """The frame's pose functions, re-exported lazily (``..frame`` imports ``.poses``)."""
    if name in _FRAME_NAMES:
        from .. import frame

        return getattr(frame, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
