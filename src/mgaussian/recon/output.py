"""The last stage: the fitted model rendered on the output grid over the region, and the result
(volume, poses, weights, history, timings) in the units and conventions of the outputs."""

from __future__ import annotations

__all__ = ["ReconResult", "render_volume", "result"]

import time
from dataclasses import dataclass
from dataclasses import field as dc_field

import numpy as np
import torch

from ..field import GaussianField
from .config import ReconConfig
from .frame import current_region
from .motion.poses import matrix_to_rotvec, to_centre_convention
from .nrf import NeuralResidualField
from .state import ReconState


@dataclass
class ReconResult:
    volume: np.ndarray  # output volume in the inputs' intensity units
    affine: np.ndarray
    field: GaussianField
    nrf: NeuralResidualField | None
    config: ReconConfig
    region: np.ndarray  # bool mask on the output grid
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


def result(state: ReconState) -> ReconResult:
    """Render the volume over the region where the slices now put the anatomy, in the inputs'
    intensity units, and gather what the outputs report."""
    t0 = time.time()
    state.region = current_region(state)
    vol = render_volume(
        state.fld, state.nrf, state.shape, state.aff, state.region, backend=state.backend, cutoff=state.cfg.cutoff
    )
    vol = np.clip(vol, 0, None) * state.scale
    state.timings["render_volume_s"] = time.time() - t0
    state.timings["total_s"] = state.elapsed()
    poses, weights = _poses_and_weights(state)
    return ReconResult(
        vol,
        state.aff,
        state.fld,
        state.nrf,
        state.cfg,
        state.region,
        state.scale,
        state.centre.cpu().numpy(),
        poses,
        state.history,
        weights,
        state.pose_history,
        state.timings,
        state.backend,
        list(state.budget_cuts),
    )
