"""Rigid transforms, slice frames and world <-> voxel mapping.

Conventions (used everywhere in mgaussian):

* World coordinates are millimetres in the scanner frame of the NIfTI affine (RAS+, as nibabel
  resolves sform/qform).
* A stack of shape (X, Y, K) with affine A has K slices; slice k is the plane of voxels
  (i, j, k). Its *frame* is an origin o_k = A @ (0, 0, k, 1) and three orthonormal rows
  ``axes = (e_u, e_v, n)``: e_u, e_v are the unit directions of voxel axes i and j and
  n = e_u x e_v (so ``axes`` is always a proper rotation, even for left-handed affines).
  Pixel (a, b) lies at o_k + a du e_u + b dv e_v with (du, dv) the in-plane spacing.
* A slice *pose* is a rigid transform T = (R, t) acting about a fixed centre c:
  x -> R (x - c) + c + t. It maps where the header says a slice is to where the anatomy it
  imaged actually was. The identity pose means "no motion".
"""

from __future__ import annotations

__all__ = [
    "voxel_to_world",
    "world_to_voxel",
    "rotvec_to_matrix",
    "rotvec_left_jacobian",
    "matrix_to_rotvec",
    "SliceFrames",
    "slice_frames",
    "apply_pose_to_frames",
    "rigid_matrix",
    "voxel_sizes",
    "orthogonal_voxel_axes",
]

from dataclasses import dataclass

import numpy as np
import torch


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Map voxel indices [..., 3] to world mm [..., 3] through a 4x4 affine."""
    ijk = np.asarray(ijk, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Map world mm [..., 3] to (fractional) voxel indices [..., 3]."""
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    xyz = np.asarray(xyz, dtype=np.float64)
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def voxel_sizes(affine: np.ndarray) -> np.ndarray:
    """Lengths of the affine's three columns (voxel spacing in mm)."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def orthogonal_voxel_axes(affine: np.ndarray, tol: float = 1e-6) -> bool:
    """Whether the affine's voxel axes (its columns) are orthogonal, up to ``tol`` of the largest
    entry of their Gram matrix: a grid the renderer can walk plane by plane (no shear)."""
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    gram = cols.T @ cols
    return float(np.abs(gram - np.diag(np.diag(gram))).max()) <= tol * float(np.abs(gram).max())


def _skew(v):
    zero = torch.zeros_like(v[..., 0])
    return torch.stack(
        [
            torch.stack([zero, -v[..., 2], v[..., 1]], -1),
            torch.stack([v[..., 2], zero, -v[..., 0]], -1),
            torch.stack([-v[..., 1], v[..., 0], zero], -1),
        ],
        -2,
    )


def rotvec_to_matrix(rv):
    """Rotation vectors [..., 3] (axis * angle in radians) -> rotation matrices [..., 3, 3].

    Accepts numpy arrays or torch tensors (differentiable, stable at zero angle).
    """
    if isinstance(rv, np.ndarray):
        return rotvec_to_matrix(torch.as_tensor(rv, dtype=torch.float64)).numpy()
    theta2 = (rv * rv).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-30)
    small = theta2 < 1e-8
    # sin(t)/t and (1-cos t)/t^2 with Taylor series near zero
    a = torch.where(small, 1 - theta2 / 6, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / torch.where(small, 1.0, theta2))
    K = _skew(rv)
    eye = torch.eye(3, dtype=rv.dtype, device=rv.device).expand(K.shape)
    return eye + a[..., None] * K + b[..., None] * (K @ K)


def rotvec_left_jacobian(rv: torch.Tensor) -> torch.Tensor:
    """The left Jacobian of rotation vectors [..., 3] -> [..., 3, 3]: R(rv + d) = exp([J d]x) R(rv)
    to first order in d, i.e. adding d to a rotation vector turns the rotation by J d more, about
    world axes (J = I + (1 - cos t) / t^2 K + (t - sin t) / t^3 K^2, K = [rv]x, t = |rv|)."""
    theta2 = (rv * rv).sum(-1, keepdim=True)
    theta = torch.sqrt(theta2 + 1e-30)
    small = theta2 < 1e-8
    # (1 - cos t) / t^2 and (t - sin t) / t^3 with Taylor series near zero
    safe2 = torch.where(small, 1.0, theta2)
    a = torch.where(small, 0.5 - theta2 / 24, (1 - torch.cos(theta)) / safe2)
    b = torch.where(small, 1.0 / 6 - theta2 / 120, (theta - torch.sin(theta)) / (safe2 * theta))
    K = _skew(rv)
    eye = torch.eye(3, dtype=rv.dtype, device=rv.device).expand(K.shape)
    return eye + a[..., None] * K + b[..., None] * (K @ K)


def matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    """Rotation matrices [..., 3, 3] -> rotation vectors [..., 3] (numpy)."""
    from scipy.spatial.transform import Rotation

    R = np.asarray(R, dtype=np.float64)
    shp = R.shape[:-2]
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(*shp, 3)


def rigid_matrix(rotvec, translation, centre) -> np.ndarray:
    """4x4 matrix of x -> R(x - c) + c + t (numpy)."""
    R = rotvec_to_matrix(np.asarray(rotvec, dtype=np.float64))
    M = np.eye(4)
    M[:3, :3] = R
    c = np.asarray(centre, dtype=np.float64)
    M[:3, 3] = c - R @ c + np.asarray(translation, dtype=np.float64)
    return M


@dataclass
class SliceFrames:
    """Nominal frames of the K slices of one stack.

    origins: [K, 3] world mm of pixel (0, 0) of each slice;
    axes: [K, 3, 3] rows (e_u, e_v, n), orthonormal, det +1;
    spacing: (du, dv) in-plane pixel spacing in mm;
    shape: (H, W) = (X, Y) pixels per slice;
    slice_spacing: distance between consecutive slice planes in mm.
    """

    origins: np.ndarray
    axes: np.ndarray
    spacing: tuple[float, float]
    shape: tuple[int, int]
    slice_spacing: float


def slice_frames(affine: np.ndarray, shape) -> SliceFrames:
    """Frames of every slice (third voxel axis) of a stack with this affine and 3D shape.

    Raises ValueError if the in-plane voxel axes are not orthogonal (a sheared grid).
    """
    A = np.asarray(affine, dtype=np.float64)
    cols = A[:3, :3]
    du, dv = float(np.linalg.norm(cols[:, 0])), float(np.linalg.norm(cols[:, 1]))
    eu, ev = cols[:, 0] / du, cols[:, 1] / dv
    if abs(float(eu @ ev)) > 1e-3:
        raise ValueError("in-plane voxel axes are not orthogonal (sheared affine)")
    ev = ev - (eu @ ev) * eu
    ev /= np.linalg.norm(ev)
    n = np.cross(eu, ev)
    K = int(shape[2])
    ks = np.arange(K, dtype=np.float64)
    origins = A[:3, 3][None, :] + ks[:, None] * cols[:, 2][None, :]
    axes = np.broadcast_to(np.stack([eu, ev, n]), (K, 3, 3)).copy()
    slice_spacing = float(abs(cols[:, 2] @ n))
    return SliceFrames(origins, axes, (du, dv), (int(shape[0]), int(shape[1])), slice_spacing)


def apply_pose_to_frames(origins, axes, rotvecs, translations, centre):
    """Move slice frames by poses x -> R(x - c) + c + t (torch, differentiable).

    origins [K,3], axes [K,3,3] (rows), rotvecs [K,3], translations [K,3], centre [3].
    Returns (origins', axes') with axes' rows = R applied to each row.
    """
    R = rotvec_to_matrix(rotvecs)
    o = torch.einsum("kij,kj->ki", R, origins - centre) + centre + translations
    ax = axes @ R.transpose(-1, -2)
    return o, ax
