"""The last stage: the fitted model rendered on the output grid over the region, and the result
(volume, poses, weights, history, timings) in the units and conventions of the outputs."""

from __future__ import annotations

__all__ = [
    "ReconResult",
    "render_volume",
    "oversampling",
    "written_grid",
    "margin_voxels",
    "rendered_voxels",
    "written_shape",
    "model_volume",
    "render_result",
    "result",
]

import math
import time
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
import torch

from ..field import GaussianField
from ..geometry import voxel_sizes
from .config import ReconConfig
from .frame import current_region
from .motion.poses import matrix_to_rotvec, to_centre_convention
from .motion.registration import moved_stack
from .nrf import NeuralResidualField
from .state import ReconState


@dataclass
class ReconResult:
    volume: np.ndarray  # output volume in the inputs' intensity units, on the written grid (written_grid)
    affine: np.ndarray
    field: GaussianField
    nrf: NeuralResidualField | None
    config: ReconConfig
    region: np.ndarray  # bool mask on the written grid
    scale: float  # output = model value x scale
    centre: np.ndarray  # centre of the slice poses (mm)
    # per stack: {"stack", "slices" (indices of the fitted slices), "rotvec" [K][3] (rad),
    # "translation_mm" [K][3], "stack_rotvec" [3], "stack_translation_mm" [3]}; slice pose x ->
    # R(x - centre) + centre + t applied to the slice's nominal frame (stack pose for unfitted slices)
    poses: list[dict]
    history: list[dict] = dc_field(default_factory=list)  # {"step","level","loss","l1","ssim","time_s"}
    # per stack: {"stack", "slices", "weight" [K] in [0,1], "scale" [K] (intensity scale), "excluded" [slice indices]}
    slice_weights: list[dict] = dc_field(default_factory=list)
    # {"step", "time_s", "stacks": [{"stack", "mean_translation_mm", "mean_rotation_deg", "mean_weight"}]}
    pose_history: list[dict] = dc_field(default_factory=list)
    timings: dict = dc_field(default_factory=dict)
    backend: str = "cpu"
    # where a time budget cut the fit short (empty: the fixed schedule ended it, the run is reproducible)
    budget_cuts: list[str] = dc_field(default_factory=list)
    # with cfg.confidence (recon/confidence.py): the confidence map in [0, 1] on the output grid, the
    # intensity's standard deviation (output units) and a summary; None otherwise
    confidence: np.ndarray | None = None
    confidence_sd: np.ndarray | None = None
    confidence_info: dict | None = None
    # on noisy data, the last level's prior factor chosen by held-out slices (recon/prior_choice.py)
    prior_choice: dict | None = None
    # the stacks with their masks as given, each at its registered pose: where the brain is (the
    # volume keeps a rim of other tissue around it; atlas registration masks it out)
    brain_stacks: list = dc_field(default_factory=list)


def render_volume(
    fld: GaussianField,
    nrf,
    shape,
    affine,
    region: np.ndarray | None,
    backend: str = "auto",
    chunk: int = 16,
    dilate_vox: int = 2,
    cutoff: float = 3.0,
) -> np.ndarray:
    """Point-evaluate the model (Gaussians + NRF) on a voxel grid, slice by slice (bounded memory).

    Only voxels within ``dilate_vox`` of ``region`` are rendered; the rest is 0."""
    from scipy import ndimage

    from ..render import render_volume as render_gaussians

    if region is not None:
        reg = ndimage.binary_dilation(region, iterations=dilate_vox) if dilate_vox else region
    else:
        reg = np.ones(shape, bool)
    dev = fld.means.device
    with torch.no_grad():
        vol = render_gaussians(
            fld.means,
            fld.log_scales,
            fld.quats,
            fld.intensities,
            affine,
            shape,
            None,
            backend=backend,
            cutoff=cutoff,
            slices_per_call=chunk,
            mask=reg,
        )
        m = torch.as_tensor(reg, device=dev)
        if nrf is not None and bool(m.any()):
            A = torch.as_tensor(np.asarray(affine, dtype=np.float64))
            ijk = torch.nonzero(m).to(torch.float64)
            pts = (ijk @ A[:3, :3].T + A[:3, 3]).to(device=dev, dtype=vol.dtype)
            vals = torch.cat([nrf(pts[i : i + 262144]) for i in range(0, len(pts), 262144)])
            vol = vol.index_put(m.nonzero(as_tuple=True), vals, accumulate=True)
        vol = torch.where(m, vol, torch.zeros((), dtype=vol.dtype, device=dev))
    return vol.cpu().numpy().astype(np.float32)


# the default oversampling (2) falls back to 1 beyond this many written voxels (128 MB of float32):
# an adult brain at 1 mm would be written as 40M voxels at 0.5 mm (mni-t4: 160 MB, 15 s to render
# instead of 3), where a fetal one at its pixel size stays below 6M (the cases of TUNING.md session 19)
OVERSAMPLED_MAX_VOXELS = 2**25


def written_shape(shape, k: int) -> tuple:
    """The shape of a grid ``k`` times finer than ``shape`` with the same extent (voxel k x i of it
    is voxel i of ``shape``'s)."""
    return tuple((n - 1) * k + 1 for n in shape)


def oversampling(requested: int | None, shape) -> int:
    """The written grid's factor for an output grid of ``shape``: ``requested``
    (``cfg.output_oversampling``), or by default 2 unless that grid would pass
    ``OVERSAMPLED_MAX_VOXELS``."""
    if requested is not None:
        return int(requested)
    return 2 if math.prod(written_shape([int(n) for n in shape], 2)) <= OVERSAMPLED_MAX_VOXELS else 1


def written_grid(shape, affine: np.ndarray, region: np.ndarray, k: int) -> tuple[tuple, np.ndarray, np.ndarray]:
    """(shape, affine, region) of the grid the volume is written on: ``k`` times finer than the
    output resolution's grid (``cfg.output_oversampling``), with the same origin and extent, so that
    its voxel k x i is that grid's voxel i. The region is carried over (:func:`region_on_grid`)."""
    if k == 1:
        return tuple(shape), affine, region
    fine_shape = written_shape([int(n) for n in shape], k)
    fine_affine = np.array(affine, dtype=np.float64)
    fine_affine[:3, :3] /= k
    return fine_shape, fine_affine, region_on_grid(region, affine, fine_shape, fine_affine)


def region_on_grid(region: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray) -> np.ndarray:
    """A region (bool, on the grid ``affine``) carried onto another grid: linear interpolation > 0.5."""
    from ..sampling import resample_volume

    return resample_volume(region.astype(np.float32), affine, shape, target_affine) > 0.5


def _poses_and_weights(state: ReconState) -> tuple[list[dict], list[dict]]:
    """Per stack: the slices' poses in the outputs' convention (about ``state.centre``) and the
    stack's registered pose; the slices' weights, intensity scales and the excluded slices."""
    c = state.centre.cpu().numpy().astype(np.float64)
    poses, weights = [], []
    for ss, r, u, cs, P, sc, sw in zip(
        state.sets, state.rots, state.trans, state.cents, state.stack_poses, state.scs, state.sws
    ):
        rn = r.detach().cpu().numpy().astype(np.float64)
        t = to_centre_convention(rn, u.detach().cpu().numpy(), cs.cpu().numpy(), c)
        poses.append(
            {
                "stack": ss.name,
                "slices": ss.index.tolist(),
                "rotvec": rn.tolist(),
                "translation_mm": t.tolist(),
                "stack_rotvec": matrix_to_rotvec(P[:3, :3]).tolist(),
                "stack_translation_mm": (P[:3, 3] + P[:3, :3] @ c - c).tolist(),
            }
        )
        wl = sw.cpu().numpy().astype(float)
        weights.append(
            {
                "stack": ss.name,
                "slices": ss.index.tolist(),
                "weight": wl.tolist(),
                "scale": sc.cpu().numpy().astype(float).tolist(),
                "excluded": [int(k) for k, w in zip(ss.index, wl) if w <= 0],
            }
        )
    return poses, weights


def margin_voxels(resolution_mm: float, affine: np.ndarray) -> int:
    """How many voxels of a grid (``affine``) the volume is rendered beyond the region: two voxels
    of the output resolution, in mm whatever the grid's voxel (a margin of 2 voxels of a 2 x finer
    grid cut the brain's edge: H2 26.09 dB against 27.00, benchmarks/TUNING.md session 19)."""
    return max(1, math.ceil(2 * resolution_mm / float(voxel_sizes(affine).min()) - 1e-6))


def rendered_voxels(region: np.ndarray, resolution_mm: float, affine: np.ndarray) -> np.ndarray:
    """The voxels a volume is rendered on: ``region`` grown by :func:`margin_voxels`."""
    from scipy import ndimage

    return ndimage.binary_dilation(region, iterations=margin_voxels(resolution_mm, affine))


def render_model(fld, nrf, shape, affine, region, resolution_mm: float, scale: float, backend: str, cutoff: float):
    """A fitted model rendered as the volume is written: on :func:`rendered_voxels` of ``region``,
    clipped at 0, times ``scale`` (the inputs' intensity units)."""
    voxels = rendered_voxels(region, resolution_mm, affine)
    vol = render_volume(fld, nrf, shape, affine, voxels, backend, dilate_vox=0, cutoff=cutoff)
    return np.clip(vol, 0, None) * scale


def model_volume(state: ReconState, shape, affine: np.ndarray, region: np.ndarray) -> np.ndarray:
    """The state's model rendered on a grid as the volume is written (:func:`render_model`)."""
    cfg = state.cfg
    return render_model(
        state.fld, state.nrf, shape, affine, region, cfg.output_resolution, state.scale, state.backend, cfg.cutoff
    )


def render_result(res: ReconResult, shape, affine: np.ndarray) -> np.ndarray:
    """A fitted result's model rendered on any grid (a template's, through its registration) as the
    written volume (:func:`render_model`), over the result's region carried onto the grid."""
    region = region_on_grid(res.region, res.affine, shape, affine)
    cfg = res.config
    return render_model(
        res.field, res.nrf, shape, affine, region, cfg.output_resolution, res.scale, res.backend, cfg.cutoff
    )


def result(state: ReconState) -> ReconResult:
    """Render the volume over the region where the slices now put the anatomy, on the written grid
    (``written_grid``), in the inputs' intensity units, and gather what the outputs report."""
    t0 = time.time()
    state.region = current_region(state)
    k = oversampling(state.cfg.output_oversampling, state.shape)
    shape, affine, region = written_grid(state.shape, state.aff, state.region, k)
    vol = model_volume(state, shape, affine, region)
    state.timings["render_volume_s"] = time.time() - t0
    state.timings["total_s"] = state.elapsed()
    poses, weights = _poses_and_weights(state)
    return ReconResult(
        vol,
        affine,
        state.fld,
        state.nrf,
        state.cfg,
        region,
        state.scale,
        state.centre.cpu().numpy(),
        poses,
        state.history,
        weights,
        state.pose_history,
        state.timings,
        state.backend,
        list(state.budget_cuts),
        brain_stacks=[moved_stack(st, P) for st, P in zip(state.given, state.stack_poses)],
        prior_choice=state.prior_choice,
    )
