"""Simulate thick-slice stacks from a ground-truth volume (benchmarks and tests).

As BENCHMARK.md defines a case: each stack samples the ground truth through the slice profile
(Gaussian FWHM = thickness through plane, or a box; in-plane Gaussian FWHM = 1.2 x pixel),
each slice under its own rigid motion about the volume centre (rotation angle uniform up to the
limit about a uniformly random axis, translation uniform per axis up to the limit), with Rician
noise sigma = F x the 99th percentile of the ground truth in its mask. A stack is stored as
scanners store it: the slice axis is the third voxel axis (affine columns permuted to match, so
some affines are left-handed). Its mask is the ground-truth mask sampled the same way (> 0.5).

Motion over acquisition time (issue 19). Each slice also has an acquisition time rank
(``slice_order`` interleaved or sequential, over ``packages``; :mod:`mgaussian.slice_order`) and
the pose of slice k is the composition, all about the volume centre,

    stack motion  o  drift(t_k)  o  jumps(t_k)  o  per-slice motion,

with t_k = rank / last rank in [0, 1]:

* stack motion (``stack_motion`` = (DEG, MM)): the whole stack turned by exactly DEG about a
  random axis and shifted by exactly MM in a random direction (the fetus moving between stacks);
* drift (``motion_drift`` = (DEG, MM)): a rotation about one random axis and a translation along
  one random direction, both growing from 0 at the first slice acquired to DEG / MM at the last
  along g(t) = a t + (1 - a) t^2 (a uniform in [0, 1]: smooth and monotone, |g'| <= 2, so slices
  consecutive in time differ by at most 2 x DEG / (slices - 1));
* jumps (``motion_jumps`` = N): N sudden moves at distinct random acquisition times, each a
  rotation uniform up to ``motion_rotation`` about a random axis and a translation uniform per
  axis up to ``motion_translation``; each persists after it happens (they compose);
* per-slice motion: the uniform model above, when there are no jumps (with jumps,
  ``motion_rotation`` / ``motion_translation`` size the jumps instead).

A bias field (``bias_field`` = B > 0): each stack multiplied by its own smooth field exp(p), p a
random quadratic of the scanner position, reaching 1 + B (or 1 / (1 + B)) inside the stack's
mask (the coils' sensitivity differs between stacks; it is fixed in the scanner, not the anatomy).
With ``bias_shared`` = s in [0, 1], a part of every stack's field is one field of the scanner for
the whole session (the same coil under the same mother): p = s * p_session + (1 - s) * p_stack, the
session's field scaled once over the ground truth's mask; s = 1 gives every stack the same field.

The new parts draw from their own random stream, so with them off a seed gives the same stacks as
before they existed. Each stack gets a BIDS sidecar ``stack_XX.json`` with ``SliceThickness`` and
``SliceTiming`` (rank x ``SLICE_DURATION_S``) consistent with the order.
"""

from __future__ import annotations

__all__ = ["parse_orientation", "stack_geometry", "simulate_stacks", "motion_over_time", "SLICE_DURATION_S"]

import json
import math
import os

import numpy as np

from .errors import InputError
from .geometry import matrix_to_rotvec, rigid_matrix, rotvec_to_matrix, slice_frames, voxel_sizes
from .io import atomic_write_text, save_nifti
from .sampling import sample_slices
from .slice_order import ORDER_KINDS, order_ranks

# seconds per slice in the sidecars' SliceTiming: the RepetitionTime (one single-shot slice) of the
# shipped real HASTE stacks' sidecars (MIALSRTK sub-01, Siemens Aera: 1.2 s)
SLICE_DURATION_S = 1.2

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
            raise InputError(
                "--orientations", f"unknown orientation {tok!r} (axial, coronal, sagittal, NAME@RX,RY,RZ or RX,RY,RZ)"
            )
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


def _random_rigid(
    max_rot_deg: float, max_trans_mm: float, rng, *, exact: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(rotvec, translation) of one random rigid move: a random axis, the angle uniform up to the
    limit (exactly the limit with ``exact``), the translation uniform per axis up to its limit (with
    ``exact``: that length along a random direction)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    d = rng.normal(size=3)
    d /= np.linalg.norm(d)
    if exact:
        return axis * math.radians(max_rot_deg), d * max_trans_mm
    ang = math.radians(rng.uniform(0, max_rot_deg)) if max_rot_deg > 0 else 0.0
    tr = rng.uniform(-max_trans_mm, max_trans_mm, size=3) if max_trans_mm > 0 else np.zeros(3)
    return axis * ang, tr


def motion_over_time(
    ranks,
    centre,
    rng,
    *,
    drift=(0.0, 0.0),
    jumps: int = 0,
    jump_rotation: float = 0.0,
    jump_translation: float = 0.0,
    stack_motion=(0.0, 0.0),
) -> tuple[np.ndarray, dict]:
    """Rigid pose [K, 4, 4] (about ``centre``) of each slice from its acquisition rank: stack
    motion o drift(t) o jumps(t) (module docstring). Returns (poses, description for truth.json)."""
    ranks = np.asarray(ranks)
    K = len(ranks)
    last = int(ranks.max()) if K else 0
    t = ranks / last if last > 0 else np.zeros(K)
    c = np.asarray(centre, dtype=np.float64)
    S = rigid_matrix(*_random_rigid(*stack_motion, rng, exact=True), c) if any(stack_motion) else np.eye(4)
    poses = np.repeat(S[None], K, axis=0)
    info = {"stack_motion_matrix": S.tolist()}
    if any(drift):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        a_rot, a_tr = rng.uniform(0, 1, size=2)
        g_rot = a_rot * t + (1 - a_rot) * t**2
        g_tr = a_tr * t + (1 - a_tr) * t**2
        D = np.stack(
            [rigid_matrix(axis * math.radians(drift[0]) * gr, d * drift[1] * gt, c) for gr, gt in zip(g_rot, g_tr)]
        )
        poses = poses @ D
        info["drift"] = {
            "axis": axis.tolist(),
            "direction": d.tolist(),
            "rotation_deg": drift[0],
            "translation_mm": drift[1],
            "shape": "g(t) = a t + (1 - a) t^2",
            "a_rotation": float(a_rot),
            "a_translation": float(a_tr),
        }
    if jumps > 0:
        if jumps > last:
            raise ValueError(f"{jumps} jumps need at least {jumps + 1} acquisition times, the stack has {last + 1}")
        at = np.sort(rng.choice(np.arange(1, last + 1), size=jumps, replace=False))
        J = np.eye(4)
        cum = np.repeat(np.eye(4)[None], K, axis=0)
        listed = []
        for r in at:
            rv, tr = _random_rigid(jump_rotation, jump_translation, rng)
            M = rigid_matrix(rv, tr, c)
            J = J @ M
            cum[ranks >= r] = J
            listed.append(
                {
                    "at_rank": int(r),
                    "rotvec": rv.tolist(),
                    "rotation_deg": float(np.degrees(np.linalg.norm(rv))),
                    "translation_mm": tr.tolist(),
                }
            )
        poses = poses @ cum
        info["jumps"] = listed
    return poses, info


def _write_sidecar(output_dir: str, si: int, thickness: float, spacing: float, ranks, order: str, packages: int) -> str:
    """A stack's BIDS sidecar: SliceThickness and SliceTiming consistent with the acquisition order."""
    jp = os.path.join(output_dir, f"stack_{si:02d}.json")
    atomic_write_text(
        jp,
        json.dumps(
            {
                "SliceThickness": thickness,
                "SpacingBetweenSlices": spacing,
                "SliceTiming": [round(float(r) * SLICE_DURATION_S, 4) for r in ranks],
                "SliceEncodingDirection": "k",
                "SliceOrder": order,
                "Packages": int(packages),
                "GeneratedBy": [{"Name": "mgaussian simulate"}],
            },
            indent=1,
        ),
    )
    return jp


def _field_polynomial(rng) -> tuple[np.ndarray, np.ndarray]:
    """A random quadratic polynomial's (linear, symmetric quadratic) coefficients."""
    lin, quad = rng.normal(size=3), rng.normal(size=(3, 3))
    return lin, 0.5 * (quad + quad.T)


def _eval_polynomial(points: np.ndarray, centre: np.ndarray, radius: float, lin, quad) -> np.ndarray:
    """The polynomial at scanner ``points`` [..., 3] (mm), relative to ``centre`` in units of ``radius``."""
    u = (points - centre) / radius
    return u @ lin + 0.5 * np.einsum("...i,ij,...j->...", u, quad, u)


def _scale_to(values: np.ndarray, amp: float) -> float:
    """The factor that makes the largest of |``values``| log(1 + ``amp``) (0 for none or all zero)."""
    top = float(np.abs(values).max()) if values.size else 0.0
    return math.log1p(amp) / top if top > 0 else 0.0


def _session_field(rng, brain: np.ndarray, centre: np.ndarray, radius: float, amp: float):
    """One field of the scanner for the whole session: a random quadratic's coefficients, scaled so
    that it reaches log(1 + ``amp``) in size over the ground truth's ``brain`` points (mm)."""
    lin, quad = _field_polynomial(rng)
    scale = _scale_to(_eval_polynomial(brain, centre, radius, lin, quad), amp)
    return scale * lin, scale * quad


def _bias_field(aff, shape, centre, radius, inside, amp, rng, session=None, shared=0.0):
    """A smooth multiplicative field over a stack's voxels, fixed in the scanner (the coil's
    sensitivity; the anatomy's motion does not move it): exp(p), p a random quadratic polynomial of
    the position relative to ``centre`` (in units of ``radius``), scaled so that |p| reaches
    log(1 + ``amp``) over the voxels ``inside``; with ``session`` (the session's scaled coefficients)
    p = ``shared`` x the session's + (1 - ``shared``) x the stack's own. Returns (field, its coefficients)."""
    ijk = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"), -1)
    pts = ijk @ aff[:3, :3].T + aff[:3, 3]
    lin, quad = _field_polynomial(rng)
    p = _eval_polynomial(pts, centre, radius, lin, quad)
    scale = _scale_to(p[inside], amp)
    p, lin, quad = scale * p, scale * lin, scale * quad
    if session is not None and shared > 0:
        lin = shared * session[0] + (1 - shared) * lin
        quad = shared * session[1] + (1 - shared) * quad
        p = _eval_polynomial(pts, centre, radius, lin, quad)
    return np.exp(p).astype(np.float32), {"linear": lin.tolist(), "quadratic": quad.tolist()}


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
    slice_order: str = "interleaved",
    packages: int = 1,
    motion_drift=(0.0, 0.0),
    motion_jumps: int = 0,
    stack_motion=(0.0, 0.0),
    bias_field: float = 0.0,
    bias_shared: float = 0.0,
    inputs=(),
    gt_path: str | None = None,
    mask_path: str | None = None,
    log=print,
) -> dict:
    """Write ``stack_XX.nii.gz``, ``mask_XX.nii.gz``, their sidecars ``stack_XX.json`` and
    ``truth.json`` into ``output_dir`` (the motion model: module docstring)."""
    if slice_order not in ORDER_KINDS:
        raise ValueError(f"slice_order must be one of {ORDER_KINDS}, got {slice_order!r}")
    rng = np.random.default_rng(seed)
    # the motion over time draws from its own stream: with it off, a seed gives the same stacks
    rng_time = np.random.default_rng([int(seed), 19])
    rng_bias = np.random.default_rng([int(seed), 23])
    if not 0.0 <= bias_shared <= 1.0:
        raise ValueError(f"bias_shared must be in [0, 1], got {bias_shared}")
    over_time = any(motion_drift) or motion_jumps > 0 or any(stack_motion)
    if pixel is None:
        pixel = float(min(voxel_sizes(gt_affine)))
    if mask is None:
        mask = gt > 0
    maskf = mask.astype(np.float32)
    sl_spacing = thickness + gap
    centre = (np.asarray(gt.shape, dtype=np.float64) - 1) / 2 @ gt_affine[:3, :3].T + gt_affine[:3, 3]
    sigma = float(noise) * float(np.percentile(gt[mask], 99)) if noise > 0 else 0.0
    idx = np.argwhere(mask)
    radius = (
        float(np.linalg.norm(idx @ gt_affine[:3, :3].T + gt_affine[:3, 3] - centre, axis=1).max()) if len(idx) else 1.0
    )
    session_field = None
    if bias_field > 0 and bias_shared > 0:  # its own stream: the stacks' own fields draw as before
        brain = idx @ gt_affine[:3, :3].T + gt_affine[:3, 3]
        session_field = _session_field(np.random.default_rng([int(seed), 29]), brain, centre, radius, bias_field)
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
            "slice_order": slice_order,
            "packages": packages,
            "motion_drift": [float(v) for v in motion_drift],
            "motion_jumps": int(motion_jumps),
            "stack_motion": [float(v) for v in stack_motion],
            "bias_field": float(bias_field),
            "bias_shared": float(bias_shared),
            "motion_model": (
                "stack motion o drift(t) o jumps(t) o per-slice (per-slice only without jumps; "
                "t = acquisition rank / last rank)"
            ),
            "slice_duration_s": SLICE_DURATION_S,
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
        rv, tr = _random_motion(K, motion_rotation, motion_translation, rng)  # drawn always: same stream
        ranks = order_ranks(K, slice_order, packages=min(packages, K))
        extra = {}
        if over_time:
            if motion_jumps > 0:  # the limits size the jumps; no independent per-slice motion
                rv, tr = np.zeros((K, 3)), np.zeros((K, 3))
            T, extra = motion_over_time(
                ranks,
                centre,
                rng_time,
                drift=motion_drift,
                jumps=motion_jumps,
                jump_rotation=motion_rotation,
                jump_translation=motion_translation,
                stack_motion=stack_motion,
            )
            P = T @ np.stack([rigid_matrix(rv[k], tr[k], centre) for k in range(K)])
            rv = matrix_to_rotvec(P[:, :3, :3])
            tr = P[:, :3, 3] - centre + np.einsum("kij,j->ki", P[:, :3, :3], centre)
        R = rotvec_to_matrix(rv)
        o = np.einsum("kij,kj->ki", R, fr.origins - centre) + centre + tr
        ax = fr.axes @ np.transpose(R, (0, 2, 1))
        img = sample_slices(gt, gt_affine, o, ax, fr.shape, fr.spacing, thickness, profile)
        msk = sample_slices(maskf, gt_affine, o, ax, fr.shape, fr.spacing, thickness, profile, supersample=1) > 0.5
        img = np.clip(img, 0, None)
        if bias_field > 0:  # the coil's sensitivity multiplies the signal; the noise comes after
            field, coeffs = _bias_field(
                aff, shape, centre, radius, msk, bias_field, rng_bias, session_field, bias_shared
            )
            img = img * field
            extra = {
                **extra,
                "bias_field": {
                    "range_in_mask": [float(field[msk].min()), float(field[msk].max())],
                    "position_units_mm": radius,
                    **coeffs,
                },
            }
        if sigma > 0:
            img = _rician(img, sigma, rng)
        sp = os.path.join(output_dir, f"stack_{si:02d}.nii.gz")
        mp = os.path.join(output_dir, f"mask_{si:02d}.nii.gz")
        save_nifti(img, aff, sp, inputs=inputs)
        save_nifti(msk.astype(np.uint8), aff, mp, inputs=inputs, dtype=np.uint8)
        jp = _write_sidecar(output_dir, si, thickness, sl_spacing, ranks, slice_order, min(packages, K))
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
                "sidecar": os.path.basename(jp),
                "slice_order": slice_order,
                "packages": int(min(packages, K)),
                "acquisition_order": [int(s) for s in np.argsort(ranks, kind="stable")],
                **extra,
                "slices": [
                    {
                        "acquisition_rank": int(ranks[k]),
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
