"""Stack assessment (issue 19): which stacks moved within themselves, which disagree with the rest.

Two measures per stack, combined into one score in [0, 1]:

(a) **motion within the stack**. Anatomy changes smoothly from slice to slice, so a still stack's
    neighbours in space are more alike than slices two apart: with d(s) the median over slice
    pairs s apart of 1 - NCC (inside the union of their masks; slices whose mask holds at least
    half the median count), the *motion index* is m = d(1) / d(2), well below 1 for a still
    stack. In an interleaved acquisition neighbours in space come from different passes, slices
    two apart from the same pass (neighbours in time): a fetus that moved between the passes
    makes the neighbours disagree while the same-pass pairs still agree, so m rises toward and
    past 1; motion from slice to slice raises d(1) and d(2) alike, which also pulls m toward 1.
    The index is a ratio of the stack with itself, so it does not depend on contrast, noise level
    or thickness the way a raw NCC does. ``passes``: the number of sweeps through the stack the
    slice order implies (interleaved 2, sequential 1), for the record.
(b) **agreement with the other stacks**: each pair of stacks is registered rigidly as
    :func:`mgaussian.recon.motion.register_stacks` registers them (brain-only images on a common
    grid, correlation, rotated restarts when the match is poor) up to its pyramid's coarse levels,
    and their NCC is read on that grid inside the voxels both masks cover. A stack's agreement is
    the mean of the better half of its NCCs with the others (with 3 stacks: its best): a stack of
    another subject, a flipped one or
    one wrecked by motion agrees with none, while the others still agree with each other.
    Pairwise, so that no single stack (a bad reference) decides for the rest. With two stacks
    both get the same agreement: it cannot say which one is wrong.

Score = s_agreement x (1 + s_motion) / 2, each sub-score mapped linearly to [0, 1] between the
values measured on good and on clearly damaged stacks (constants below; measurements in
docs/clinical.md). Motion within a stack can at most halve its score: the fit corrects each
slice's pose, so a stack that moved is still worth having; a stack that agrees with no other (of
another subject, flipped, or so damaged that its bulk no longer registers) is what it cannot use.

Reference (``reconstruct``): the best-scored stack, the first of equals (clean stacks all score 1,
so on clean data the first stack stays the reference). ``reconstruct`` registers only the pairs
that can still move a score (``assess_stacks(all_pairs=False)``); ``mgaussian assess`` all of them.
Exclusion (``reconstruct --stack-exclude auto``): a stack whose score is below ``EXCLUDE_FRACTION``
x the median score is dropped, when at least 3 stacks are given and at least 2 remain (see the
constant for why).
"""

from __future__ import annotations

__all__ = [
    "assess_stacks",
    "motion_index",
    "pair_agreement",
    "reference_poses",
    "choose_reference",
    "stacks_to_exclude",
    "format_table",
    "EXCLUDE_FRACTION",
]

import itertools
import time

import numpy as np

from .io import Stack
from .metrics import ncc
from .recon.motion.registration import BrainImages, registration_grid

# The motion index m = d(1)/d(2) of a still stack, and of a stack that clearly moved. Measured
# (docs/clinical.md "assess"): clean simulated sb25 stacks (3.2 mm, interleaved) 0.40-0.55; real
# MIALSRTK runs 3 and 5 0.52 and 0.63; 3 deg / 1.5 mm per-slice motion 0.59-0.74; an interleaved
# stack with one 5 deg / 2-6 mm jump near the middle of its acquisition (between its passes)
# 1.13-1.26; MIALSRTK run 1, which moved between its two passes (benchmarks/MOTION.md), 0.85.
# s_motion falls linearly from 1 at MOTION_STILL to 0 at MOTION_MOVED.
MOTION_STILL = 0.6
MOTION_MOVED = 1.1
# Agreement (the better half of a stack's NCCs with the others after rigid registration).
# Measured (docs/clinical.md "assess"): clean simulated stacks 0.92-0.97; the real MIALSRTK runs
# 0.65-0.72 (real contrast, bias and motion); an axial stack mirrored front to back 0.45-0.53; an
# axial stack of the 33-week atlas among 25-week ones 0.19-0.24 (full registrations; registered at
# the pyramid's coarse levels, as now, the real runs read 0.62-0.69 and H1's nine clinical-style
# stacks the same to 0.001). s_agreement rises linearly from AGREE_NONE (below every good stack,
# above the mirrored one) to AGREE_FULL.
AGREE_NONE = 0.4
AGREE_FULL = 0.8
# --stack-exclude auto: below this fraction of the median score. The median is the typical stack
# (robust to the one being judged). With a half, motion alone never excludes a stack whose
# agreement is intact (motion halves the score at most); a stack that agrees with nothing is
# dropped. Measured: the real MIALSRTK runs score 0.80 / 0.78 / 0.46 (run 3 / 5 / 1): none dropped
# (0.5 x median = 0.39); clean simulated stacks 1.0 beside a mirrored stack (0.12) and another
# subject's (0.00): both dropped, while a stack with a jump between its passes (0.50) is kept.
EXCLUDE_FRACTION = 0.5
_MIN_PIXELS = 50


def _dissimilarity(st: Stack, step: int, usable: np.ndarray) -> list[float]:
    out = []
    for k in range(st.n_slices - step):
        if not (usable[k] and usable[k + step]):
            continue
        m = st.mask[:, :, k] | st.mask[:, :, k + step]
        out.append(1.0 - ncc(st.data[:, :, k][m], st.data[:, :, k + step][m]))
    return out


def _passes(ranks: np.ndarray | None) -> int:
    """Sweeps through the stack in time order: 1 + the steps against the main direction
    (interleaved: 2, sequential: 1, two packages interleaved: 4)."""
    if ranks is None or len(ranks) < 2:
        return 1
    steps = np.sign(np.diff(np.argsort(ranks, kind="stable")))
    main = 1 if (steps > 0).sum() >= (steps < 0).sum() else -1
    return int(1 + np.sum(steps == -main))


def motion_index(st: Stack) -> dict:
    """(a) of the module docstring: {"motion_index", "d1", "d2", "slices_used", "passes"}."""
    counts = st.mask.reshape(-1, st.n_slices).sum(0)
    usable = counts >= max(_MIN_PIXELS, 0.5 * float(np.median(counts[counts > 0])) if (counts > 0).any() else 0)
    d1, d2 = _dissimilarity(st, 1, usable), _dissimilarity(st, 2, usable)
    res = {"slices_used": int(usable.sum()), "passes": _passes(st.slice_order)}
    if len(d1) < 2 or len(d2) < 2:
        return {**res, "motion_index": None, "d1": None, "d2": None}
    m1, m2 = float(np.median(d1)), float(np.median(d2))
    return {**res, "motion_index": m1 / max(m2, 1e-9), "d1": m1, "d2": m2}


def pair_agreement(a: Stack, b: Stack, grid=None, poses: dict | None = None, images=None) -> float:
    """NCC of two stacks after rigid registration (b onto a, on ``grid``: by default the pair's
    :func:`~mgaussian.recon.motion.registration_grid`), inside the voxels both masks cover. The
    registration stops after its pyramid's coarse levels (:func:`~mgaussian.recon.motion.coarse_pair`:
    a quarter of its time; the pose within a few tenths of a degree and millimetre of the full
    registration's, docs/clinical.md "assess"). ``poses``: where given, (pose, correlation at the
    coarse level, the best start's coarse transform) is stored in it under "pose". ``images``: the
    two brains on ``grid`` (:class:`~mgaussian.recon.motion.registration.BrainImages`), where made."""
    from .recon.motion import coarse_pair
    from .sampling import resample_volumes

    grid = registration_grid([a, b]) if grid is None else grid
    P, corr, first = coarse_pair(a, b, grid, images=images)
    if poses is not None:
        poses["pose"] = (P, corr, first)
    spacing = float(grid[1][0, 0])
    shape, aff = registration_grid([a, b], spacing, margin_mm=6.0)  # the NCC's grid
    vals, masks = [], []
    for st, A in ((a, a.affine), (b, P @ b.affine)):
        v, m = resample_volumes([(st.data * st.mask).astype(np.float32), st.mask.astype(np.float32)], A, shape, aff)
        vals.append(v)
        masks.append(m > 0.5)
    both = masks[0] & masks[1]
    if both.sum() < 100:
        return 0.0
    return ncc(vals[0][both], vals[1][both])


def reference_poses(poses: dict, reference: int, grid) -> dict:
    """The assessment's coarse registrations of the pairs with ``reference``, as
    ``register_stacks(known=...)`` finishes them ({stack: (coarse transform, reversed, the pair's
    images)}; reversed: the reference was registered onto the stack). Only those registered on
    ``grid``, the grid ``register_stacks`` would use (not where a stack was excluded since)."""
    from .recon.motion import same_grid

    out = {}
    for (i, j), (_, _, first, g, pair) in poses.items():
        if not same_grid(g, grid):
            continue
        if i == reference:
            out[j] = (first, False, pair)
        elif j == reference:
            out[i] = (first, True, pair)
    return out


def _lin(x: float | None, lo: float, hi: float) -> float:
    if x is None:
        return 1.0  # nothing measurable: no evidence against the stack
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def _settled(pair: np.ndarray, i: int) -> bool:
    """Whether stack i's score no longer depends on its pairs not yet registered: at least as many
    of its NCCs as its better half holds are >= ``AGREE_FULL``, so the mean of the better half is
    >= ``AGREE_FULL`` whatever the others are (s_agreement is 1)."""
    n = pair.shape[0]
    return int(np.sum(pair[i] >= AGREE_FULL)) >= n // 2  # the better half of its n - 1 others


def assess_stacks(stacks: list[Stack], log=None, poses: dict | None = None, all_pairs: bool = True) -> list[dict]:
    """One row per stack (in input order): motion index, agreement, the two sub-scores, the score
    and its rank (1 = best). See the module docstring. ``poses``: where given, each pair's
    registration is stored in it, {(i, j): (stack j's pose in stack i's frame, correlation, the
    coarse transform, grid, the two brains' images)} (``reconstruct`` finishes the reference's:
    :func:`reference_poses`).

    ``all_pairs`` False (``reconstruct``): a pair is not registered when both its stacks are
    already settled (:func:`_settled`), where its NCC could change neither score, only the
    agreement shown (the mean of the better half of the pairs registered). The pairs run in the
    order (0, 1), (0, 2), ... so that the first stack's are all registered. Three clean stacks:
    two registrations instead of three (mni-t4: ~3 s); the scores, ranks and reference the same."""
    t0 = time.time()
    rows = [
        {
            "stack": st.path,
            "name": st.name,
            "slices": st.n_slices,
            "slice_order_from": st.slice_order_source,
            **motion_index(st),
        }
        for st in stacks
    ]
    n = len(stacks)
    pair = np.full((n, n), np.nan)
    # every pair on the grid of all stacks, where reconstruct registers the stacks to its reference
    grid = registration_grid(stacks)
    images = BrainImages(stacks, grid)
    for i, j in itertools.combinations(range(n), 2):
        if not all_pairs and _settled(pair, i) and _settled(pair, j):
            continue
        got = {}
        pair[i, j] = pair[j, i] = pair_agreement(stacks[i], stacks[j], grid, got, (images[i], images[j]))
        if poses is not None:
            poses[(i, j)] = (*got["pose"], grid, (images[i], images[j]))
    for i, r in enumerate(rows):
        others = sorted((float(pair[i, j]) for j in range(n) if j != i and not np.isnan(pair[i, j])), reverse=True)
        # the mean of the better half: a good stack agrees with the other good ones, which are the
        # majority; a plain median is pulled down by the bad ones (two of five: 0.96 -> 0.74)
        r["agreement"] = float(np.mean(others[: (len(others) + 1) // 2])) if others else None
        r["agreement_with"] = {
            stacks[j].name: None if np.isnan(pair[i, j]) else round(float(pair[i, j]), 4) for j in range(n) if j != i
        }
        r["s_motion"] = (
            1.0 - _lin(r["motion_index"], MOTION_STILL, MOTION_MOVED) if r["motion_index"] is not None else 1.0
        )
        r["s_agreement"] = _lin(r["agreement"], AGREE_NONE, AGREE_FULL)
        r["score"] = r["s_agreement"] * (1.0 + r["s_motion"]) / 2.0
    for rank, i in enumerate(sorted(range(n), key=lambda i: -rows[i]["score"]), start=1):
        rows[i]["rank"] = rank
    if log:
        log(f"assessed {n} stacks in {time.time() - t0:.1f} s")
    return rows


def choose_reference(rows: list[dict]) -> int:
    """Index of the best-scored stack (the first of equals)."""
    return int(max(range(len(rows)), key=lambda i: (rows[i]["score"], -i)))


def stacks_to_exclude(rows: list[dict], fraction: float = EXCLUDE_FRACTION) -> list[int]:
    """Indices of stacks scoring below ``fraction`` x the median score; none with fewer than 3
    stacks (two cannot say which is wrong), and never so many that fewer than 2 remain."""
    n = len(rows)
    if n < 3:
        return []
    med = float(np.median([r["score"] for r in rows]))
    bad = sorted((i for i in range(n) if rows[i]["score"] < fraction * med), key=lambda i: rows[i]["score"])
    return sorted(bad[: max(0, min(len(bad), n - 2))])


def format_table(rows: list[dict]) -> str:
    """The ranking as a plain-text table, best first."""
    head = f"{'rank':>4}  {'score':>5}  {'motion':>6}  {'agree':>5}  {'passes':>6}  stack"
    lines = [head]
    for r in sorted(rows, key=lambda r: r["rank"]):
        mi = "-" if r["motion_index"] is None else f"{r['motion_index']:.3f}"
        ag = "-" if r["agreement"] is None else f"{r['agreement']:.3f}"
        lines.append(f"{r['rank']:>4}  {r['score']:>5.2f}  {mi:>6}  {ag:>5}  {r['passes']:>6}  {r['stack']}")
    return "\n".join(lines)
