"""Simulate thick-slice stacks from a ground-truth volume (benchmarks and tests).

As BENCHMARK.md defines a case: each stack samples the ground truth through the slice profile
(Gaussian FWHM = thickness through plane, or a box; in-plane Gaussian FWHM = 1.2 x pixel),
each slice under its own rigid motion about the volume centre (rotation angle uniform up to the
limit about a uniformly random axis, translation uniform per axis up to the limit), with Rician
noise sigma = F x the 99th percentile of the ground truth in its mask. A stack is stored as
scanners store it: the slice axis is the third voxel axis (affine columns permuted to match, so
some affines are left-handed). Its mask is the ground-truth mask sampled the same way (> 0.5).
"""

from __future__ import annotations

__all__ = ["parse_orientation", "stack_geometry", "simulate_stacks"]

import json
import math
import os

import numpy as np

from .errors import InputError
from .geometry import rigid_matrix, rotvec_to_matrix, slice_frames, voxel_sizes
from .io import atomic_write_text, save_nifti
from .sampling import sample_slices

_BASE = {"axial": (0, 1, 2), "coronal": (0, 2, 1), "sagittal": (1, 2, 0)}


def parse_orientation(tok: str):
    """``axial|coronal|sagittal`` optionally ``@RX,RY,RZ`` (degrees about world x, y, z), or
    bare ``RX,RY,RZ`` (an axial stack rotated so). Returns (name, perm, angles_deg)."""
    t = tok.strip().lower()
    name, _, ang = t.partition("@")
    if name not in _BASE:
        if "," in name and not ang:
            name, ang = "axial", name
        else:
            raise InputError("--orientations", f"unknown orientation {tok!r} (axial, coronal, sagittal, NAME@RX,RY,RZ or RX,RY,RZ)")
    angles = (0.0, 0.0, 0.0)
    if ang:
        try:
            angles = tuple(float(a) for a in ang.split(","))
        except ValueError:
            raise InputError("--orientations", f"bad oblique angles in {tok!r}") from None
        if len(angles) != 3 or not all(math.isfinite(a) for a in angles):
            raise InputError("--orientations", f"oblique angles need three numbers RX,RY,RZ in {tok!r}")
    return name, _BASE[name], angles


def _euler_matrix(angles_deg):
    rx, ry, rz = (math.radians(a) for a in angles_deg)
    Rx = rotvec_to_matrix(np.array([rx, 0, 0]))
    Ry = rotvec_to_matrix(np.array([0, ry, 0]))
    Rz = rotvec_to_matrix(np.array([0, 0, rz]))
    return Rz @ Ry @ Rx


def stack_geometry(gt_shape, gt_affine, perm, angles_deg, pixel: float, slice_spacing: float):
    """Affine and shape of a stack covering the ground truth's field of view.

    In-plane axes follow ground-truth voxel axes perm[0], perm[1]; slices are normal to
    perm[2]; the whole frame is turned by ``angles_deg`` about the volume centre.
    """
    A = np.asarray(gt_affine, dtype=np.float64)
    cols = A[:3, :3] / voxel_sizes(A)[None, :]
    R = _euler_matrix(angles_deg)
    dirs = R @ cols[:, list(perm)]  # unit columns of the stack axes
    # extent of the ground truth's corners along each stack axis
    sh = np.asarray(gt_shape, dtype=np.float64) - 0.5  # voxel edges
    corners = np.array([[i, j, k] for i in (-0.5, sh[0]) for j in (-0.5, sh[1]) for k in (-0.5, sh[2])])
    cw = corners @ A[:3, :3].T + A[:3, 3]
    proj = cw @ dirs  # [8, 3]
    lo, hi = proj.min(0), proj.max(0)
    steps = np.array([pixel, pixel, slice_spacing])
    n = np.maximum(1, np.ceil((hi - lo) / steps - 1e-6)).astype(int)
    centre_proj = (lo + hi) / 2
    start = centre_proj - (n - 1) * steps / 2
    aff = np.eye(4)
    aff[:3, :3] = dirs * steps[None, :]
    aff[:3, 3] = dirs @ start
    return aff, tuple(int(v) for v in n)


def _rician(x: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    n1 = rng.normal(0, sigma, x.shape)
    n2 = rng.normal(0, sigma, x.shape)
    return np.sqrt((x + n1) ** 2 + n2**2).astype(np.float32)


def _random_motion(K, max_rot_deg, max_trans_mm, rng):
    axis = rng.normal(size=(K, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    ang = np.radians(rng.uniform(0, max_rot_deg, size=K)) if max_rot_deg > 0 else np.zeros(K)
    rv = axis * ang[:, None]
    tr = rng.uniform(-max_trans_mm, max_trans_mm, size=(K, 3)) if max_trans_mm > 0 else np.zeros((K, 3))
    return rv, tr


def simulate_stacks(
    gt: np.ndarray,
    gt_affine: np.ndarray,
    mask: np.ndarray | None,
    output_dir: str,
    *,
    orientations=("axial", "coronal", "sagittal"),
    thickness: float = 3.0,
    gap: float = 0.0,
    pixel: float | None = None,
    profile: str = "gaussian",
    motion_rotation: float = 0.0,
    motion_translation: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    inputs=(),
    gt_path: str | None = None,
    mask_path: str | None = None,
    log=print,
) -> dict:
    """Write ``stack_XX.nii.gz``, ``mask_XX.nii.gz`` and ``truth.json`` into ``output_dir``."""
    rng = np.random.default_rng(seed)
    if pixel is None:
        pixel = float(min(voxel_sizes(gt_affine)))
    if mask is None:
        mask = gt > 0
    maskf = mask.astype(np.float32)
    sl_spacing = thickness + gap
    centre = (np.asarray(gt.shape, dtype=np.float64) - 1) / 2 @ gt_affine[:3, :3].T + gt_affine[:3, 3]
    sigma = float(noise) * float(np.percentile(gt[mask], 99)) if noise > 0 else 0.0
    os.makedirs(output_dir, exist_ok=True)
    truth = {
        "ground_truth": gt_path,
        "mask": mask_path,
        "settings": {
            "orientations": list(orientations),
            "thickness_mm": thickness,
            "gap_mm": gap,
            "pixel_mm": pixel,
            "profile": profile,
            "inplane_fwhm": "1.2 x pixel",
            "motion_rotation_deg": motion_rotation,
            "motion_translation_mm": motion_translation,
            "noise": noise,
            "noise_sigma": sigma,
            "seed": seed,
        },
        "pose_convention": "x_true = R (x_header - centre) + centre + t; rotvec in radians (axis*angle)",
        "centre_mm": centre.tolist(),
        "stacks": [],
    }
    for si, tok in enumerate(orientations):
        name, perm, angles = parse_orientation(tok)
        aff, shape = stack_geometry(gt.shape, gt_affine, perm, angles, pixel, sl_spacing)
        fr = slice_frames(aff, shape)
        K = shape[2]
        rv, tr = _random_motion(K, motion_rotation, motion_translation, rng)
        R = rotvec_to_matrix(rv)
        o = np.einsum("kij,kj->ki", R, fr.origins - centre) + centre + tr
        ax = fr.axes @ np.transpose(R, (0, 2, 1))
        img = sample_slices(gt, gt_affine, o, ax, fr.shape, fr.spacing, thickness, profile)
        msk = sample_slices(maskf, gt_affine, o, ax, fr.shape, fr.spacing, thickness, profile, supersample=1) > 0.5
        img = np.clip(img, 0, None)
        if sigma > 0:
            img = _rician(img, sigma, rng)
        sp = os.path.join(output_dir, f"stack_{si:02d}.nii.gz")
        mp = os.path.join(output_dir, f"mask_{si:02d}.nii.gz")
        save_nifti(img, aff, sp, inputs=inputs)
        save_nifti(msk.astype(np.uint8), aff, mp, inputs=inputs, dtype=np.uint8)
        truth["stacks"].append(
            {
                "file": os.path.basename(sp),
                "mask": os.path.basename(mp),
                "orientation": name,
                "oblique_deg": list(angles),
                "shape": list(shape),
                "affine": aff.tolist(),
                "thickness_mm": thickness,
                "slice_spacing_mm": sl_spacing,
                "slices": [
                    {
                        "rotvec": rv[k].tolist(),
                        "rotation_deg": float(np.degrees(np.linalg.norm(rv[k]))),
                        "translation_mm": tr[k].tolist(),
                        "matrix": rigid_matrix(rv[k], tr[k], centre).tolist(),
                    }
                    for k in range(K)
                ],
            }
        )
        log(f"wrote {sp} {shape} ({name}{'' if angles == (0, 0, 0) else ' @' + str(angles)}) and {mp}")
    atomic_write_text(os.path.join(output_dir, "truth.json"), json.dumps(truth, indent=1))
    return truth
