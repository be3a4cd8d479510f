"""Motion correction (issue 5): rigid stack-to-stack registration before fitting, per-slice pose
optimisation through the renderer, per-slice intensity scales and robust slice/pixel weights.

Pose conventions. A pose maps a slice's nominal (header) position to its true position in the
reconstruction's frame. Inside the fit each slice k has parameters (r_k, u_k) about its own
centre s_k (the centroid of its masked pixels): x -> R(r_k)(x - s_k) + s_k + u_k, so rotation and
translation are nearly decoupled (a rotation about a far-away volume centre would also translate).
Outputs use the simulator's convention about one volume centre c: x -> R(x - c) + c + t with
t = u + (I - R)(s - c).

Stack registration uses SimpleITK (a well-kept, widely used registration library; it ships as a
binary wheel): each stack's brain (intensities x mask, resampled on a common isotropic grid) is
registered rigidly to the reference stack's with a correlation metric, a centre-of-mass start and
a three-level pyramid; when the first try correlates poorly, rotated starts are tried too.
"""

from __future__ import annotations

__all__ = ["register_stacks", "moved_stack", "slice_centres", "to_centre_convention",
           "anchor_poses", "pose_means", "pose_centre", "location", "fov_centre", "reliable_slices", "moved_by_mean", "to_stack_poses", "stack_pose_spread", "fit_slice_scales", "robust_weights", "matrix_to_rotvec"]

import math
from dataclasses import replace

import numpy as np
import torch

from ..geometry import rotvec_to_matrix
from ..io import Stack
from ..registration import correlation_rigid, transform_matrix
from ..sampling import resample_volume


def matrix_to_rotvec(R: np.ndarray) -> np.ndarray:
    """Rotation vectors [...,3] (axis x angle, rad) of rotation matrices [...,3,3]."""
    from scipy.spatial.transform import Rotation

    R = np.asarray(R, dtype=np.float64)
    return Rotation.from_matrix(R.reshape(-1, 3, 3)).as_rotvec().reshape(R.shape[:-2] + (3,))


def _registration_grid(stacks: list[Stack], spacing: float, margin_mm: float = 12.0):
    """An axis-aligned world grid (shape, affine) covering every stack's mask plus a margin."""
    los, his = [], []
    for st in stacks:
        idx = np.argwhere(st.mask)
        w = idx @ st.affine[:3, :3].T + st.affine[:3, 3]
        los.append(w.min(0))
        his.append(w.max(0))
    lo = np.min(los, 0) - margin_mm
    hi = np.max(his, 0) + margin_mm
    shape = tuple(int(v) for v in np.ceil((hi - lo) / spacing) + 1)
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = lo
    return shape, aff


def _brain_on_grid(st: Stack, shape, aff) -> np.ndarray:
    from scipy import ndimage

    m = ndimage.binary_dilation(st.mask, iterations=1) if st.mask.any() and not st.mask.all() else st.mask
    v = resample_volume((st.data * m).astype(np.float32), st.affine, shape, aff)
    scale = float(np.percentile(st.data[st.mask], 99)) if st.mask.any() else 1.0
    return v / (scale if scale > 0 else 1.0)


def _sitk_image(vol: np.ndarray, aff: np.ndarray):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(vol.transpose(2, 1, 0)).astype(np.float32))
    img.SetSpacing([float(aff[0, 0])] * 3)
    img.SetOrigin([float(v) for v in aff[:3, 3]])
    return img


def _register_pair(fixed, moving, start_rotvec=(0.0, 0.0, 0.0), iterations: int = 150):
    """Rigid registration; returns (metric value (lower is better: -correlation), sitk transform)."""
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    init = sitk.CenteredTransformInitializer(fixed, moving, tx, sitk.CenteredTransformInitializerFilter.MOMENTS)
    init = sitk.Euler3DTransform(init)
    if any(start_rotvec):
        R = rotvec_to_matrix(np.asarray(start_rotvec, dtype=np.float64))
        init.SetMatrix([float(v) for v in R.ravel()])
    value = correlation_rigid(fixed, moving, init, iterations=iterations, learning_rate=2.0, min_step=1e-3,
                              gradient_tolerance=1e-8)
    return value, init


def register_stacks(stacks: list[Stack], reference: int = 0, spacing: float | None = None, log=print,
                    good_correlation: float = 0.85) -> list[np.ndarray]:
    """Rigid pose (4x4, header -> reference frame) of every stack; the reference's is identity.

    Robust to offsets of >= 10 mm and >= 15 degrees: the start aligns the brains' centres of mass
    (moments), the pyramid (4x, 2x, 1x) widens the capture range, and when the result correlates
    below ``good_correlation`` eight rotated starts (+-25 degrees about each axis, and two
    diagonals) are tried and the best kept."""
    import SimpleITK as sitk

    if spacing is None:
        fin = min(min(s.frames.spacing) for s in stacks)
        spacing = float(min(max(2.0 * fin, 1.2), 3.0))
    shape, aff = _registration_grid(stacks, spacing)
    fixed = _sitk_image(_brain_on_grid(stacks[reference], shape, aff), aff)
    poses = []
    for i, st in enumerate(stacks):
        if i == reference:
            poses.append(np.eye(4))
            continue
        moving = _sitk_image(_brain_on_grid(st, shape, aff), aff)
        best = _register_pair(fixed, moving)
        if -best[0] < good_correlation:
            a = math.radians(25.0)
            starts = [(s * a, 0, 0) for s in (1, -1)] + [(0, s * a, 0) for s in (1, -1)] + \
                     [(0, 0, s * a) for s in (1, -1)] + [(a / 1.7, a / 1.7, a / 1.7), (-a / 1.7, -a / 1.7, -a / 1.7)]
            for r0 in starts:
                cand = _register_pair(fixed, moving, r0)
                if cand[0] < best[0]:
                    best = cand
        M = transform_matrix(best[1])  # reference point -> moving stack's header point
        P = np.linalg.inv(M)  # moving header -> reference frame: the stack's pose
        ang = math.degrees(np.linalg.norm(matrix_to_rotvec(P[:3, :3])))
        log(f"stack {st.name}: registered to {stacks[reference].name} (correlation {-best[0]:.3f}; "
            f"{ang:.1f} deg, {np.linalg.norm(P[:3, 3] + P[:3, :3] @ _centre(st) - _centre(st)):.1f} mm at its centre)")
        poses.append(P)
    del sitk
    return poses


def _centre(st: Stack) -> np.ndarray:
    idx = np.argwhere(st.mask) if st.mask.any() else np.argwhere(np.ones(st.mask.shape, bool))
    return idx.mean(0) @ st.affine[:3, :3].T + st.affine[:3, 3]


def moved_stack(st: Stack, P: np.ndarray) -> Stack:
    """The stack with its header moved by the rigid pose P (for grids, masks and the start)."""
    A = P @ st.affine
    from ..geometry import slice_frames

    return replace(st, affine=A, frames=slice_frames(A, st.data.shape))


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


def reliable_slices(sets, fraction: float = 0.5) -> np.ndarray:
    """Slices whose pose the data determine well: at least ``fraction`` of the median pixel count
    over all slices (sb25-t3.2-motion: the smallest fifth of the slices end ~1 mm off their
    simulated poses, up to 3.5 mm; the others 0.1-0.2 mm)."""
    n = np.concatenate([ss.mask.reshape(ss.n, -1).gt(0).sum(1).cpu().numpy() for ss in sets]).astype(np.float64)
    return n >= fraction * np.median(n) if len(n) else n.astype(bool)


def fov_centre(stacks) -> np.ndarray:
    """The mean centre of the stacks' fields of view (world mm): where the acquisitions were
    centred, the pivot of the headers' frame (a simulator turns its slices about the volume it samples)."""
    return np.mean([((np.array(st.data.shape[:3]) - 1) / 2) @ st.affine[:3, :3].T + st.affine[:3, 3] for st in stacks],
                   axis=0)


def location(x: np.ndarray, kind: str = "mean", light_tail_kurtosis: float = 2.3, k: int = 3) -> np.ndarray:
    """Location of samples ``x`` [N, D], per column. ``mean``; or ``adaptive`` (Hogg's adaptive
    estimator, reduced to two cases): when the columns' mean sample kurtosis is below
    ``light_tail_kurtosis`` (uniform: 1.8, normal: 3; pooled over the columns, which are taken to
    be drawn alike, because one column's kurtosis scatters too much over ~50 samples) the samples
    are light-tailed and bounded, and the centre of each column's range is a far better estimate
    than the mean (error ~1/N instead of 1/sqrt(N)); the range centre is averaged over the ``k``
    outermost pairs of order statistics, which damps one badly estimated sample. Otherwise the
    mean. Shift-equivariant either way."""
    if kind not in ("mean", "adaptive"):
        raise ValueError(f"location: unknown kind {kind!r} (mean, adaptive)")
    x = np.asarray(x, dtype=np.float64)
    m = x.mean(0)
    if kind == "mean" or x.shape[0] < 8 * k:
        return m
    d = x - m
    var = (d * d).mean(0)
    if not np.all(var > 0):
        return m
    kurt = float(((d ** 4).mean(0) / (var * var)).mean())
    if kurt >= light_tail_kurtosis:
        return m
    s = np.sort(x, axis=0)
    return np.mean([(s[j] + s[-1 - j]) / 2 for j in range(k)], axis=0)


def pose_centre(rots, trans, centres, pivot: np.ndarray, kind: str = "mean",
                reliable=None) -> tuple[np.ndarray, np.ndarray]:
    """The centre of the slice poses written about one ``pivot`` p, x -> R (x - p) + p + t: the mean
    rotation vector and the :func:`location` of the translations t (per world axis), over the
    ``reliable`` slices only when given (a bool array over all slices in order): a range's ends
    must not be slices whose pose is poorly determined."""
    r = torch.cat([x.detach() for x in rots]).cpu().numpy().astype(np.float64)
    u = torch.cat([x.detach() for x in trans]).cpu().numpy().astype(np.float64)
    s = torch.cat([x.detach() for x in centres]).cpu().numpy().astype(np.float64)
    p = np.asarray(pivot, dtype=np.float64)
    t = np.einsum("kij,kj->ki", rotvec_to_matrix(r), p - s) + s + u - p
    if reliable is not None and kind != "mean":
        t = t[np.asarray(reliable, dtype=bool)]
    return r.mean(0), location(t, kind)


def _move_all(rots, trans, centres, G: np.ndarray, pivot: np.ndarray, shift: np.ndarray):
    """Compose every slice pose with the global rigid map x -> G (x - pivot) + pivot + shift."""
    for k in range(len(rots)):
        s = centres[k].detach().cpu().numpy().astype(np.float64)
        R = rotvec_to_matrix(rots[k].detach().cpu().numpy().astype(np.float64))
        u = trans[k].detach().cpu().numpy().astype(np.float64)
        Rn = np.einsum("ij,kjl->kil", G, R)
        un = (s + u - pivot) @ G.T + pivot + shift - s
        rots[k].copy_(torch.as_tensor(matrix_to_rotvec(Rn), dtype=rots[k].dtype))
        trans[k].copy_(torch.as_tensor(un, dtype=trans[k].dtype))


@torch.no_grad()
def anchor_poses(rots: list[torch.Tensor], trans: list[torch.Tensor], centres: list[torch.Tensor],
                 targets: tuple[np.ndarray, np.ndarray], pivot: np.ndarray | None = None, kind: str = "mean",
                 reliable=None):
    """Remove the global rigid drift that joint fitting leaves free (moving every slice and the
    volume together changes nothing): the mean pose over ALL slices is held at its start
    ``targets`` = (mean rotvec, mean slice-centre displacement) by a global rigid map G about the
    slices' mean centre. (Holding one reference stack instead lets the others turn about that
    stack's weakly seen tilt axes: measured 2 degrees of drift on sb25-t3.2-motion.)

    With a ``pivot`` (the headers' frame: ``targets`` are then ignored) the centre of the poses
    about the pivot (:func:`pose_centre` with ``kind`` and ``reliable``) is held at the identity instead."""
    if pivot is not None:
        p = np.asarray(pivot, dtype=np.float64)
        for _ in range(2):  # the rotation first, then the translation it leaves
            r_c, _ = pose_centre(rots, trans, centres, p, kind, reliable)
            _move_all(rots, trans, centres, rotvec_to_matrix(-r_c), p, np.zeros(3))
            _, t_c = pose_centre(rots, trans, centres, p, kind, reliable)
            _move_all(rots, trans, centres, np.eye(3), p, -t_c)
        return
    r_mean, _, cref = pose_means(rots, trans, centres)
    _move_all(rots, trans, centres, rotvec_to_matrix(targets[0] - r_mean), cref, np.zeros(3))
    du = targets[1] - pose_means(rots, trans, centres)[1]
    for k in range(len(trans)):
        trans[k].add_(torch.as_tensor(du, dtype=trans[k].dtype, device=trans[k].device))


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
        worst_deg = max(worst_deg, math.degrees(float(np.linalg.norm(matrix_to_rotvec(rotvec_to_matrix(stack[0]) @ Rg.T)))))
    return worst_mm, worst_deg


@torch.no_grad()
def fit_slice_scales(pred: torch.Tensor, obs: torch.Tensor, w: torch.Tensor, lo: float = 0.5, hi: float = 2.0,
                     shrink: float = 0.1) -> torch.Tensor:
    """Least-squares intensity scale per slice [K] (obs ~ s pred), shrunk toward 1 and clipped."""
    num = (w * pred * obs).sum((1, 2))
    den = (w * pred * pred).sum((1, 2))
    ref = shrink * den.mean().clamp_min(1e-12)
    s = (num + ref) / (den + ref)
    return s.clamp(lo, hi)


@torch.no_grad()
def robust_weights(resid: list[torch.Tensor], masks: list[torch.Tensor], ncc: list[torch.Tensor],
                   pixel_c: float = 3.0, slice_z: float = 3.5, min_ncc: float = 0.5):
    """Pixel weights (Cauchy on residual / robust sigma) and slice weights from per-slice errors.

    resid [K,h,w] per stack (scaled prediction - observation), masks bool, ncc [K] per slice.
    A slice's error is its RMS residual; slices whose error is more than ``slice_z`` robust
    standard deviations (1.4826 MAD) above the median of all slices (and above 2.5 x the median),
    or whose NCC with the
    prediction is below ``min_ncc``, are excluded (weight 0); between 0.6 and 1 x that threshold
    the weight falls linearly from 1. Returns (pixel weights per stack, slice weights per stack,
    robust pixel sigma)."""
    allr = torch.cat([r[m] for r, m in zip(resid, masks)])
    sig = float(1.4826 * allr.abs().median()) if allr.numel() else 1.0
    sig = max(sig, 1e-6)
    pw = [1.0 / (1.0 + (r / (pixel_c * sig)) ** 2) for r in resid]
    rms = [torch.sqrt(((r * m) ** 2).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)) for r, m in zip(resid, masks)]
    allrms = torch.cat(rms)
    med = allrms.median()
    mad = 1.4826 * (allrms - med).abs().median().clamp_min(1e-9)
    # the threshold is also at least 2.5 x the median error: on clean data the per-slice errors are
    # tiny and spread (edge slices fit worse), and excluding those slices loses information
    thr = torch.maximum(med + slice_z * mad, 2.5 * med)
    sw = []
    for e, n in zip(rms, ncc):
        z = (e - med) / (thr - med)  # 1 at the threshold
        w = (1.0 - (z - 0.6) / 0.4).clamp(0.0, 1.0)
        w = torch.where((e >= thr) | (n < min_ncc), torch.zeros_like(w), w)
        sw.append(w)
    return pw, sw, sig


@torch.no_grad()
def estimate_noise(sets) -> float:
    """Noise standard deviation of the (normalised) slices: Immerkaer's estimator (the mean
    absolute response to the 3x3 mask [[1,-2,1],[-2,4,-2],[1,-2,1]], which cancels locally linear
    signal, x sqrt(pi/2)/6) over pixels whose whole 3x3 neighbourhood is inside the mask; the
    median over slices with enough such pixels (robust to a few bad slices)."""
    import torch.nn.functional as F

    k = torch.tensor([[1.0, -2.0, 1.0], [-2.0, 4.0, -2.0], [1.0, -2.0, 1.0]])
    vals = []
    for ss in sets:
        obs = ss.obs.detach().float().cpu()[:, None]
        m = ss.mask.detach().float().cpu()[:, None]
        resp = F.conv2d(obs, k[None, None]).abs()[:, 0]
        inner = F.conv2d(m, torch.ones(1, 1, 3, 3))[:, 0] >= 9 - 1e-6
        for r, i in zip(resp, inner):
            if int(i.sum()) >= 50:
                vals.append(float(r[i].mean()) * math.sqrt(math.pi / 2) / 6.0)
    return float(np.median(vals)) if vals else 0.0
