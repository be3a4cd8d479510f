"""Slice poses and their conventions.

A pose maps a slice's nominal (header) position to its true position in the reconstruction's
frame. Inside the fit each slice k has parameters (r_k, u_k) about its own centre s_k (the
centroid of its masked pixels): x -> R(r_k)(x - s_k) + s_k + u_k, so rotation and translation are
nearly decoupled (a rotation about a far-away volume centre would also translate). Outputs use the
simulator's convention about one volume centre c: x -> R(x - c) + c + t with t = u + (I - R)(s - c).
"""

from __future__ import annotations

__all__ = [
    "matrix_to_rotvec",
    "slice_centres",
    "slice_pose_from_matrix",
    "to_centre_convention",
    "slice_motion",
    "pose_means",
    "moved_by_mean",
    "to_stack_poses",
    "stack_pose_spread",
]

import math

import numpy as np
import torch

from ...geometry import rotvec_to_matrix


def matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    """Rotation vectors [...,3] (axis x angle, rad) of rotation matrices [...,3,3]."""
    from scipy.spatial.transform import Rotation

    R = np.asarray(R, dtype=np.float64)
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(R.shape[:-2] + (3,))


def slice_centres(ss) -> torch.Tensor:
    """Centroid (world mm, nominal frame) of each slice's masked pixels: [K,3]."""
    m = ss.mask.to(torch.float64)
    h, w = m.shape[1:]
    du, dv = ss.spacing
    a = torch.arange(h, dtype=torch.float64, device=m.device) * du
    b = torch.arange(w, dtype=torch.float64, device=m.device) * dv
    cnt = m.sum((1, 2)).clamp_min(1.0)
    ma = (m.sum(2) * a).sum(1) / cnt
    mb = (m.sum(1) * b).sum(1) / cnt
    ax = ss.axes.to(torch.float64)
    c = ss.origins.to(torch.float64) + ma[:, None] * ax[:, 0] + mb[:, None] * ax[:, 1]
    return c.to(ss.origins.dtype)


def slice_pose_from_matrix(P: np.ndarray, centres: np.ndarray):
    """(rotvecs [K,3], u [K,3]) about slice centres of the same rigid pose P for every slice."""
    R = P[:3, :3]
    r = np.broadcast_to(matrix_to_rotvec(R), centres.shape).copy()
    u = centres @ R.T + P[:3, 3] - centres
    return r, u


def to_centre_convention(rot: np.ndarray, u: np.ndarray, s: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Translation t about volume centre c of poses (rot, u) about slice centres s."""
    R = rotvec_to_matrix(np.asarray(rot, dtype=np.float64))
    d = np.asarray(s, np.float64) - np.asarray(c, np.float64)
    return np.asarray(u, np.float64) + d - np.einsum("kij,kj->ki", R, d)


def slice_motion(rot: np.ndarray, u: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each slice's pose (rotation vector ``rot``, displacement ``u`` of its centre ``s``; [n, 3])
    against its stack's mean rigid map (mean rotation vector, and the mean displacement at the
    slices' mean centre): (the slice centre's distance from where the mean map puts it, mm; the
    rotation between them, degrees). A stack moved as one rigid body gives zeros: what is left is
    the motion between its slices."""
    rot, u, s = (np.asarray(x, dtype=np.float64) for x in (rot, u, s))
    if len(rot) == 0:
        return np.zeros(0), np.zeros(0)
    r_bar, c_bar = rot.mean(0), s.mean(0)
    R = rotvec_to_matrix(rot)
    R_bar = rotvec_to_matrix(r_bar)
    t_bar = (u + np.einsum("kij,kj->ki", R, c_bar - s) - (c_bar - s)).mean(0)  # each slice's map at c_bar, averaged
    mm = np.linalg.norm(s + u - ((s - c_bar) @ R_bar.T + c_bar + t_bar), axis=1)
    deg = np.degrees(np.linalg.norm(matrix_to_rotvec(np.einsum("kij,lj->kil", R, R_bar)), axis=1))
    return mm, deg


def pose_means(rots, trans, centres):
    """(mean rotvec, mean slice-centre displacement, mean centre) over all slices of all stacks."""
    r = torch.cat([x.detach() for x in rots]).cpu().numpy().astype(np.float64)
    u = torch.cat([x.detach() for x in trans]).cpu().numpy().astype(np.float64)
    c = torch.cat([x.detach() for x in centres]).cpu().numpy().astype(np.float64)
    return r.mean(0), u.mean(0), c.mean(0)


def moved_by_mean(pts: np.ndarray, r_mean, u_mean, c_mean) -> np.ndarray:
    """Where a mean pose (mean rotvec, mean slice-centre displacement, mean centre; see
    :func:`pose_means`) puts the points ``pts`` [K,3]: R (p - c) + c + u."""
    return (pts - c_mean) @ rotvec_to_matrix(r_mean).T + c_mean + u_mean


@torch.no_grad()
def to_stack_poses(rots, trans, centres):
    """Replace every slice's pose by its stack's mean pose (one rigid map per stack, about the
    stack's mean slice centre): keeps a stack-level correction, drops slice-to-slice scatter."""
    for k in range(len(rots)):
        if rots[k].shape[0] == 0:
            continue
        rb, ub, cb = pose_means([rots[k]], [trans[k]], [centres[k]])
        ck = centres[k].detach().cpu().numpy().astype(np.float64)
        tk = moved_by_mean(ck, rb, ub, cb) - ck
        rots[k].copy_(torch.as_tensor(np.tile(rb, (len(ck), 1)), dtype=rots[k].dtype))
        trans[k].copy_(torch.as_tensor(tk, dtype=trans[k].dtype))


@torch.no_grad()
def stack_pose_spread(rots, trans, centres) -> tuple[float, float]:
    """How far the stacks' mean slice poses lie from the mean pose over all slices: (largest mean
    displacement over a stack's slice centres in mm, largest rotation difference in degrees).
    Poses are relative to the headers, so a small spread says the headers agree with each other
    up to one rigid map (no motion between the stacks, only within them)."""
    everyone = pose_means(rots, trans, centres)
    Rg = rotvec_to_matrix(everyone[0])
    worst_mm = worst_deg = 0.0
    for r, u, c in zip(rots, trans, centres):
        if r.shape[0] == 0:
            continue
        stack = pose_means([r], [u], [c])
        pts = c.detach().cpu().numpy().astype(np.float64)
        gap = moved_by_mean(pts, *stack) - moved_by_mean(pts, *everyone)
        worst_mm = max(worst_mm, float(np.linalg.norm(gap, axis=1).mean()))
        worst_deg = max(
            worst_deg, math.degrees(float(np.linalg.norm(matrix_to_rotvec(rotvec_to_matrix(stack[0]) @ Rg.T))))
        )
    return worst_mm, worst_deg


def mean_move(rots, trans, ref) -> tuple[float, float]:
    """How far the slices are from the poses ``ref`` (per stack (rotation vectors, displacements)):
    (mean displacement change in mm, mean rotation-vector change in rad) over all slices."""
    d_t = float(torch.cat([(t - b[1]).norm(dim=1) for t, b in zip(trans, ref)]).mean())
    d_r = float(torch.cat([(r - b[0]).norm(dim=1) for r, b in zip(rots, ref)]).mean())
    return d_t, d_r
