"""The frame of the reconstruction and its region.

No data show where the slices' common frame is: moving every slice and the volume together
changes no slice. This module holds that free rigid motion fixed (the anchor: the slices' mean pose,
or in the headers' frame the centre of the slice poses about the stacks' field-of-view centre),
decides between the two frames after the coarse pose rounds, and rebuilds the output region from
the slice masks where the poses put them.
"""

from __future__ import annotations

__all__ = [
    "reliable_slices",
    "fov_centre",
    "location",
    "pose_centre",
    "anchor_poses",
    "hold_frame",
    "current_region",
    "choose_frame",
]

import math
import time

import numpy as np
import torch

from ..geometry import rotvec_to_matrix
from .motion.poses import matrix_to_rotvec, mean_move, pose_means


def reliable_slices(sets, fraction: float = 0.5) -> np.ndarray:
    """Slices whose pose the data determine well: at least ``fraction`` of the median pixel count
    over all slices (sb25-t3.2-motion: the smallest fifth of the slices end ~1 mm off their
    simulated poses, up to 3.5 mm; the others 0.1-0.2 mm)."""
    n = np.concatenate([ss.mask.reshape(ss.n, -1).gt(0).sum(1).cpu().numpy() for ss in sets]).astype(np.float64)
    return n >= fraction * np.median(n) if len(n) else n.astype(bool)


def fov_centre(stacks) -> np.ndarray:
    """The mean centre of the stacks' fields of view (world mm): where the acquisitions were
    centred, the pivot of the headers' frame (a simulator turns its slices about the volume it samples)."""
    return np.mean(
        [((np.array(st.data.shape[:3]) - 1) / 2) @ st.affine[:3, :3].T + st.affine[:3, 3] for st in stacks], axis=0
    )


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
    kurt = float(((d**4).mean(0) / (var * var)).mean())
    if kurt >= light_tail_kurtosis:
        return m
    s = np.sort(x, axis=0)
    return np.mean([(s[j] + s[-1 - j]) / 2 for j in range(k)], axis=0)


def pose_centre(
    rots, trans, centres, pivot: np.ndarray, kind: str = "mean", reliable=None
) -> tuple[np.ndarray, np.ndarray]:
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
def anchor_poses(
    rots: list[torch.Tensor],
    trans: list[torch.Tensor],
    centres: list[torch.Tensor],
    targets: tuple[np.ndarray, np.ndarray],
    pivot: np.ndarray | None = None,
    kind: str = "mean",
    reliable=None,
):
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


# how far the region rebuilt from the slices' poses may reach beyond the nominal one (mm)
REGION_REACH_MM = 6.0


def hold_frame(state) -> None:
    """Put the slices' common frame back where ``state.anchor`` (and ``state.anchor_pivot``) hold it."""
    anchor_poses(
        state.rots,
        state.trans,
        state.cents,
        state.anchor,
        state.anchor_pivot,
        state.cfg.header_gauge_location,
        state.anchor_reliable,
    )


def choose_frame(state) -> None:
    """After the coarse pose rounds: when every stack's mean slice pose agrees with the others'
    within ``header_gauge_mm`` / ``_deg`` the headers agree, and the volume is put in their frame;
    else it stays in the registration's."""
    from .motion.poses import stack_pose_spread

    cfg = state.cfg
    sp_mm, sp_deg = stack_pose_spread(state.rots, state.trans, state.cents)
    if sp_mm <= cfg.header_gauge_mm and sp_deg <= cfg.header_gauge_deg:
        state.anchor, state.anchor_pivot = (np.zeros(3), np.zeros(3)), state.fov_pivot
        hold_frame(state)
        state.log(
            f"  the stacks' mean poses agree within {sp_mm:.2f} mm, {sp_deg:.2f} deg: the volume is "
            "put in the headers' frame"
        )
    else:
        state.log(
            f"  the stacks' mean poses differ by up to {sp_mm:.2f} mm, {sp_deg:.2f} deg: the volume "
            "stays in the registration's frame"
        )


def _moved_from_start(state) -> bool:
    """Whether the slices have moved from their stacks' poses: mean over slices > motion_none_mm,
    or > 5/3 x motion_none_deg (on clean sb25 the slices turn by ~0.15 deg of fitting noise and move
    0.04 mm, and a region rebuilt there cost 0.13 dB)."""
    cfg = state.cfg
    d_t, d_r = mean_move(state.rots, state.trans, state.start_poses)
    d_r = math.degrees(d_r)
    return not (d_t <= cfg.motion_none_mm and d_r <= 5.0 / 3.0 * cfg.motion_none_deg)


def current_region(state) -> np.ndarray:
    """The region from the masks where the slices are now, once they have moved from their stacks'
    poses; else the nominal one. Deterministic in the poses, so a resumed run rebuilds the same
    region."""
    from scipy import ndimage

    from .data import region_from_slices
    from .slices import slice_frames

    if not _moved_from_start(state):
        return state.region0
    key = b"".join(x.detach().cpu().numpy().tobytes() for x in (*state.rots, *state.trans))
    if state.region_cache.get("key") == key:  # the poses have not moved since the last rebuild
        return state.region_cache["region"]
    t1 = time.time()
    with torch.no_grad():
        frames = []
        for ss, r, t, c in zip(state.sets, state.rots, state.trans, state.cents):
            o, ax = slice_frames(ss, torch.arange(ss.n, device=r.device), r.detach(), t.detach(), c)
            frames.append((o.cpu().numpy(), ax.cpu().numpy()))
    res = state.cfg.output_resolution
    cand = ndimage.binary_dilation(state.region0, iterations=max(1, int(math.ceil(REGION_REACH_MM / res))))
    reg = region_from_slices(state.sets, frames, state.shape, state.aff, cand)
    if not reg.any():
        return state.region0
    state.log(
        f"  region from the slices' poses: {int(reg.sum())} voxels (nominal {int(state.region0.sum())}; "
        f"{time.time() - t1:.1f} s)"
    )
    state.region_cache.update(key=key, region=reg)
    return reg
