"""Simulate the input stacks from a fitted model: every slice of every stack rendered through the
slice PSF the fit used, each slice moved by its fitted pose (``mgaussian sample-slices``, and the
report's stack-vs-simulation panels).

Intensity units: a simulated slice is the model's prediction (Gaussians + neural residual field,
clipped at 0, as the output volume) x the model's output ``scale`` (the volume's units, the mean of
the stacks' normalisation divisors) x the slice's fitted intensity scale where the model has one
(``slice_weights[i]["scale"]``, 1 for slices the fit did not see). Stacks whose intensities differ
from the mean therefore differ by a gain; NCC is unaffected.
"""

from __future__ import annotations

__all__ = ["simulate_stacks_from_model", "model_view"]

import numpy as np
import torch

from ..errors import InputError, warn
from ..geometry import apply_pose_to_frames
from ..render import render_slices, resolve_backend, slice_psf_sigma

_CFG_DEFAULTS = {"use_psf": True, "through_plane_fwhm_factor": 1.0, "inplane_fwhm_factor": 1.2, "cutoff": 4.0}


def model_view(info_or_result) -> dict:
    """The parts of a model needed to simulate slices, from a ReconResult or load_model's info."""
    if isinstance(info_or_result, dict):
        d = info_or_result
        cfg = dict(d.get("config") or {})
        return {
            "config": cfg,
            "scale": float(d["scale"]),
            "centre": np.asarray(d.get("centre", np.zeros(3)), float),
            "poses": list(d.get("poses") or []),
            "slice_weights": list(d.get("slice_weights") or []),
            "affine": np.asarray(d.get("affine")) if d.get("affine") is not None else None,
            "region": d.get("region"),
        }
    r = info_or_result
    cfg = r.config.to_dict() if hasattr(r.config, "to_dict") else dict(r.config)
    return {
        "config": cfg,
        "scale": float(r.scale),
        "centre": np.asarray(r.centre, float),
        "poses": list(r.poses or []),
        "slice_weights": list(r.slice_weights or []),
        "affine": np.asarray(r.affine),
        "region": r.region,
    }


def _match(stacks, poses, where: str) -> None:
    if len(stacks) != len(poses):
        raise InputError(where, f"{len(stacks)} stacks given, but the model was fitted to {len(poses)}")
    names = [p.get("stack") for p in poses]
    given = [s.name for s in stacks]
    if all(names) and names != given:
        if sorted(names) == sorted(given):
            raise InputError(where, f"stacks given in another order than the model was fitted with: {', '.join(names)}")
        warn(where, f"stack names {given} differ from the model's {names}; matching them by order")
    for st, p in zip(stacks, poses):
        sl = np.asarray(p.get("slices", []), dtype=np.int64)
        if sl.size and (sl.min() < 0 or sl.max() >= st.n_slices):
            raise InputError(st.path, f"has {st.n_slices} slices, but the model fitted slice {int(sl.max())} of it")


def _slice_poses(pose: dict, n: int):
    """Per-slice rotation vectors and translations [n,3] of a whole stack (stack pose where unfitted)."""
    rot = np.tile(np.asarray(pose.get("stack_rotvec", [0.0, 0.0, 0.0]), np.float64), (n, 1))
    tr = np.tile(np.asarray(pose.get("stack_translation_mm", [0.0, 0.0, 0.0]), np.float64), (n, 1))
    sl = np.asarray(pose.get("slices", []), dtype=np.int64)
    if sl.size:
        rot[sl] = np.asarray(pose["rotvec"], np.float64).reshape(-1, 3)
        tr[sl] = np.asarray(pose["translation_mm"], np.float64).reshape(-1, 3)
    return rot, tr


def _slice_scales(sw: dict | None, n: int) -> np.ndarray:
    s = np.ones(n)
    if sw and sw.get("scale") is not None and sw.get("slices") is not None:
        sl = np.asarray(sw["slices"], dtype=np.int64)
        if sl.size:
            s[sl] = np.asarray(sw["scale"], np.float64)
    return s


def _nrf_on_slices(nrf, o, ax, hw, spacing, cfg, thickness, region_test):
    """The neural residual field on every pixel of the (moved) slices, through the slice PSF
    along the normal as in training (3-point Gauss-Hermite), only where ``region_test`` is True."""
    from ..psf import FWHM_TO_SIGMA
    from .slices import GH_NODES as _GH_NODES
    from .slices import GH_WEIGHTS as _GH_WEIGHTS

    h, w = hw
    a = torch.arange(h, dtype=o.dtype) * spacing[0]
    b = torch.arange(w, dtype=o.dtype) * spacing[1]
    pts = (
        o[:, None, None, :]
        + a[None, :, None, None] * ax[:, None, None, 0]
        + b[None, None, :, None] * ax[:, None, None, 1]
    )
    m = torch.as_tensor(region_test(pts.reshape(-1, 3).numpy()).reshape(pts.shape[:3]))
    out = torch.zeros(pts.shape[:3], dtype=o.dtype)
    if not bool(m.any()):
        return out
    p = pts[m]
    dev = next(nrf.parameters()).device
    if cfg["use_psf"]:
        sn = thickness * cfg["through_plane_fwhm_factor"] * FWHM_TO_SIGMA
        n = ax[:, None, None, 2].expand(*m.shape, 3)[m]
        val = sum(wt * nrf((p + (z * sn) * n).to(dev)).cpu() for z, wt in zip(_GH_NODES, _GH_WEIGHTS))
    else:
        val = nrf(p.to(dev)).cpu()
    return out.index_put(m.nonzero(as_tuple=True), val.to(o.dtype))


def _region_test(view, dilate_vox: int = 2):
    """Points -> inside the model's region (dilated as the output volume's), or None (everywhere)."""
    reg, aff = view.get("region"), view.get("affine")
    if reg is None or aff is None:
        return lambda p: np.ones(len(p), bool)
    from scipy import ndimage

    reg = ndimage.binary_dilation(np.asarray(reg, bool), iterations=dilate_vox) if dilate_vox else np.asarray(reg, bool)
    inv = np.linalg.inv(aff)

    def test(p):
        ijk = np.rint(p @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < np.asarray(reg.shape)), axis=1)
        out = np.zeros(len(p), bool)
        out[ok] = reg[ijk[ok, 0], ijk[ok, 1], ijk[ok, 2]]
        return out

    return test


def simulate_stacks_from_model(
    field, nrf, info_or_result, stacks, backend: str = "auto", chunk: int = 16, where: str = "--input-stacks"
) -> list[np.ndarray]:
    """Render every slice of every stack (its full grid) from the model, as the fit saw it.

    ``field``: GaussianField; ``nrf``: NeuralResidualField or None; ``info_or_result``: load_model's
    info dict or a ReconResult; ``stacks``: io.Stack list in the order the model was fitted with
    (names are checked where the model has them). Each slice's nominal frame is moved by its fitted
    pose x -> R(x - centre) + centre + t (the stack pose for slices the fit did not see), rendered
    through the fit's slice PSF and cut-off in chunks of ``chunk`` slices. Returns float32 arrays
    of each stack's shape, in the units described in the module docstring.
    """
    view = model_view(info_or_result)
    cfg = dict(_CFG_DEFAULTS)
    cfg.update({k: view["config"][k] for k in _CFG_DEFAULTS if k in view["config"]})
    poses = view["poses"]
    _match(stacks, poses, where)
    sws = view["slice_weights"] if len(view["slice_weights"]) == len(stacks) else [None] * len(stacks)
    name = resolve_backend(backend)
    dev = field.means.device
    if name == "gpu" and dev.type != "cuda":
        name = resolve_backend("cpu")
    dtype = field.means.dtype
    centre = torch.as_tensor(view["centre"], dtype=torch.float64)
    region_test = _region_test(view) if nrf is not None else None
    out = []
    with torch.no_grad():
        for st, pose, sw in zip(stacks, poses, sws):
            fr = st.frames
            H, W = fr.shape
            K = st.n_slices
            rot, tr = _slice_poses(pose, K)
            o, ax = apply_pose_to_frames(
                torch.as_tensor(fr.origins, dtype=torch.float64),
                torch.as_tensor(fr.axes, dtype=torch.float64),
                torch.as_tensor(rot),
                torch.as_tensor(tr),
                centre,
            )
            psf = (
                slice_psf_sigma(fr.spacing, st.thickness * cfg["through_plane_fwhm_factor"], cfg["inplane_fwhm_factor"])
                if cfg["use_psf"]
                else None
            )
            sim = np.zeros((K, H, W), np.float32)
            for k0 in range(0, K, max(1, int(chunk))):
                k1 = min(K, k0 + int(chunk))
                oc = o[k0:k1].to(device=dev, dtype=dtype)
                ac = ax[k0:k1].to(device=dev, dtype=dtype).contiguous()
                pred = render_slices(
                    field.means,
                    field.log_scales,
                    field.quats,
                    field.intensities,
                    oc,
                    ac,
                    (H, W),
                    fr.spacing,
                    psf,
                    backend=name,
                    cutoff=float(cfg["cutoff"]),
                ).cpu()
                if nrf is not None:
                    pred = pred + _nrf_on_slices(
                        nrf, o[k0:k1].to(dtype), ax[k0:k1].to(dtype), (H, W), fr.spacing, cfg, st.thickness, region_test
                    )
                sim[k0:k1] = pred.numpy()
            sim = np.clip(sim, 0, None) * view["scale"]
            sim *= _slice_scales(sw, K)[:, None, None].astype(np.float32)
            out.append(np.ascontiguousarray(sim.transpose(1, 2, 0)))
    return out


def stack_scores(sim: np.ndarray, stack) -> dict:
    """NCC and PSNR of a simulated stack against the input inside its mask (PSNR after a
    least-squares gain/offset match, range = the input's range in the mask, as evaluate's held-out
    score; ``psnr_raw`` without the match)."""
    from ..metrics import gain_offset_match, ncc, psnr

    m = stack.mask.astype(bool)
    y = stack.data[m].astype(np.float64)
    x = sim[m].astype(np.float64)
    rng = float(y.max() - y.min()) if y.size else 0.0
    if y.size == 0 or rng <= 0:
        return {"ncc": float("nan"), "psnr": float("nan"), "psnr_raw": float("nan")}
    return {"ncc": ncc(x, y), "psnr": psnr(gain_offset_match(x, y), y, rng), "psnr_raw": psnr(x, y, rng)}
