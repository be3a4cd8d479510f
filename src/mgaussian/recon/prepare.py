"""The first stages of a reconstruction: settings resolved for this run, the stacks registered,
their slices prepared, the output grid and region, the initial volume, the slices' starting
poses and weights, and the noise level. Returns the :class:`~.state.ReconState` every later stage
works on."""

from __future__ import annotations

__all__ = ["prepare"]

import os
import time

import numpy as np
import torch

from ..io import Stack
from ..render import mask_to_row_spans, resolve_backend
from .config import ReconConfig
from .data import box_affine, crop_box, grow_masks, output_grid, prepare_slices, region_and_init
from .frame import REGION_REACH_MM, fov_centre, reliable_slices
from .motion.poses import pose_means, slice_centres, slice_pose_from_matrix
from .motion.registration import moved_stack, register_stacks
from .motion.robust import estimate_noise
from .state import ReconState


def _set_threads(n: int | None) -> None:
    """``n`` threads for the Numba kernels (the renderers and sparse maps, where the time goes);
    PyTorch's own operations run on one thread. Multi-threaded, PyTorch's element-wise and
    reduction kernels gave results that differed in the last bit from run to run on a loaded
    machine (clean sb25 at 2 threads: the Adam parameters diverged within 2 iterations in 3 of 4
    runs; at 1 thread 4 of 4 identical), and the volume with them. The Numba kernels split their
    work into a fixed number of chunks, so with this the result does not depend on the thread count
    or the load (tests/test_determinism.py)."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(1)
    try:
        import numba

        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    except Exception:
        pass


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ..errors import InputError

        raise InputError("--device", "cuda requested but no CUDA device is available")
    return torch.device(name)


def _stack_poses(stacks: list[Stack], cfg: ReconConfig, resume_state, slice_poses, known, log) -> list[np.ndarray]:
    """Each stack's rigid pose: from the checkpoint, else registered to the reference stack (or
    as ``known`` has it already)."""
    if resume_state is not None and resume_state.get("motion", {}).get("stack_poses") is not None:
        return [np.asarray(P) for P in resume_state["motion"]["stack_poses"]]
    if cfg.register_stacks and len(stacks) > 1 and slice_poses is None:
        return register_stacks(stacks, reference=min(cfg.reference_stack, len(stacks) - 1), log=log, known=known)
    return [np.eye(4) for _ in stacks]


def _start_poses(sets, cents, stack_poses, slice_poses, dev):
    """The slices' starting poses (rotation vectors, displacements per stack): their stack's
    registered pose, or the given per-slice poses ([slices, 4, 4] world maps per stack)."""
    rots, trans = [], []
    for cs, P in zip(cents, stack_poses):
        r0, u0 = slice_pose_from_matrix(P, cs.cpu().numpy().astype(np.float64))
        rots.append(torch.as_tensor(r0, dtype=torch.float32, device=dev))
        trans.append(torch.as_tensor(u0, dtype=torch.float32, device=dev))
    start = [(r.clone(), t.clone()) for r, t in zip(rots, trans)]  # where the headers put the slices
    if slice_poses is not None:
        for si, (ss, cs, M) in enumerate(zip(sets, cents, slice_poses)):
            if ss.n == 0:
                continue
            M = np.asarray(M, dtype=np.float64)
            cs = cs.cpu().numpy().astype(np.float64)
            ru = [slice_pose_from_matrix(M[int(k)], cs[j : j + 1]) for j, k in enumerate(ss.index)]
            rots[si] = torch.as_tensor(np.concatenate([a for a, _ in ru]), dtype=torch.float32, device=dev)
            trans[si] = torch.as_tensor(np.concatenate([b for _, b in ru]), dtype=torch.float32, device=dev)
    return rots, trans, start


def _grid_and_region(placed, sets, cfg: ReconConfig):
    """The output grid (shape, affine) trimmed to the region, the region and the initial volume.
    The grid keeps room for the region to grow where the slices' poses take it
    (``REGION_REACH_MM``), the rendered margin (2 voxels) and 2 mm."""
    res = cfg.output_resolution
    shape, aff = output_grid(placed, res, reference=min(cfg.reference_stack, len(placed) - 1))
    region, init = region_and_init(placed, sets, shape, aff)
    box = crop_box(region, aff, REGION_REACH_MM + 2.0 + 2 * res)
    region, init = region[box], init[box]
    return region.shape, box_affine(aff, box), region, np.where(region, init, 0.0)


def prepare(
    stacks: list[Stack],
    cfg: ReconConfig,
    log,
    resume_state: dict | None = None,
    slice_poses: list[np.ndarray] | None = None,
    known_stack_poses: dict | None = None,
) -> ReconState:
    """Everything before fitting; ``cfg`` is resolved here (output resolution, device, backend)."""
    t_start = time.time()
    cfg.validate()
    _set_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = _device(cfg.device)
    backend = resolve_backend(cfg.backend)
    if dev.type == "cpu" and backend == "gpu":
        backend = resolve_backend("cpu")
    res = cfg.output_resolution or round(float(min(min(s.frames.spacing) for s in stacks)), 4)
    cfg = cfg.resolved(output_resolution=res)
    timings = {}
    if slice_poses is not None and len(slice_poses) != len(stacks):
        raise ValueError(f"slice_poses: {len(slice_poses)} arrays for {len(stacks)} stacks")

    t0 = time.time()
    stack_poses = _stack_poses(stacks, cfg, resume_state, slice_poses, known_stack_poses, log)
    timings["register_s"] = time.time() - t0
    t0 = time.time()
    # registered on the masks as given, fitted with a rim of data around them; the intensities'
    # scale and the noise are read inside the masks as given (the noise estimate read the edge of
    # a masked simulation inside the rim as noise: clean sb25 sigma 0.0010 -> 0.0016 with 2 mm)
    given = stacks
    stacks = grow_masks(stacks, cfg.mask_rim_mm, cfg.mask_rim_min_signal)
    placed = [moved_stack(st, P) for st, P in zip(stacks, stack_poses)]
    sets = prepare_slices(stacks, scale_masks=[st.mask for st in given])
    shape, aff, region, init = _grid_and_region(placed, sets, cfg)
    for ss in sets:
        ss.row_spans = torch.as_tensor(mask_to_row_spans(ss.mask.numpy(), ss.n, tuple(ss.obs.shape[1:])))
        ss.obs, ss.mask = ss.obs.to(dev), ss.mask.to(dev)
        ss.origins, ss.axes = ss.origins.to(dev), ss.axes.to(dev)
    idx = np.argwhere(region)
    wlo = idx.min(0) @ aff[:3, :3].T + aff[:3, 3]
    whi = idx.max(0) @ aff[:3, :3].T + aff[:3, 3]
    # slice poses about the slices' own centres, starting at their stack's registered pose
    cents = [slice_centres(ss) for ss in sets]
    rots, trans, start = _start_poses(sets, cents, stack_poses, slice_poses, dev)
    state = ReconState(
        cfg=cfg,
        dev=dev,
        backend=backend,
        log=log,
        t_start=t_start,
        given=given,
        stacks=stacks,
        stack_poses=stack_poses,
        sets=sets,
        cents=cents,
        noise_sigma=0.0,
        n_pix=0,
        shape=shape,
        aff=aff,
        region0=region,
        region=region,
        init=init,
        scale=float(np.mean([ss.scale for ss in sets])),
        centre=torch.as_tensor((wlo + whi) / 2, dtype=torch.float32, device=dev),
        wlo=wlo,
        whi=whi,
        rots=rots,
        trans=trans,
        start_poses=start,
        scs=[torch.ones(ss.n, device=dev) for ss in sets],  # per-slice intensity scales
        sws=[torch.ones(ss.n, device=dev) for ss in sets],  # slice weights
        pws=[torch.ones(ss.obs.shape, device=dev) for ss in sets],  # pixel weights
        wts=[ss.mask.float() for ss in sets],  # loss weights: mask x pixel x slice weight
        motion=cfg.motion and (len(sets) > 1 or any(ss.n > 1 for ss in sets)),
        anchor=pose_means(rots, trans, cents)[:2],  # the mean slice pose stays where registration put it
        anchor_pivot=None,
        fov_pivot=fov_centre(stacks),
        anchor_reliable=reliable_slices(sets),
        rng=rng,
        timings=timings,
    )
    timings["prepare_s"] = time.time() - t0
    state.n_pix = int(sum(int(ss.mask.sum()) for ss in sets))
    state.noise_sigma = estimate_noise(prepare_slices(given) if cfg.mask_rim_mm > 0 else sets)
    log(
        f"{len(sets)} stack{'s' if len(sets) != 1 else ''}, {sum(ss.n for ss in sets)} slices, {state.n_pix} pixels in masks; output grid "
        f"{shape} at {res:g} mm; backend {backend} on {dev.type}"
    )
    return state
