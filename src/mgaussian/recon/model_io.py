"""Saving and loading a trained model (Gaussians + neural residual field), atomically."""

from __future__ import annotations

__all__ = ["save_model", "load_model"]

import os
import tempfile

import numpy as np
import torch

from .. import __version__
from ..errors import InputError
from ..field import GaussianField
from .nrf import NeuralResidualField

FORMAT = "mgaussian-model/1"


def save_model(path: str, result, inputs=()) -> str:
    p = str(path)
    for q in inputs:
        if q and os.path.realpath(q) == os.path.realpath(p):
            raise InputError("--output-model", f"{p} is also an input; refusing to overwrite it")
    if os.path.isdir(p):
        raise InputError("--output-model", f"{p} is a directory")
    f = result.field
    cfg = result.config
    d = {
        "format": FORMAT,
        "version": __version__,
        "means": f.means.detach().cpu(),
        "log_scales": f.log_scales.detach().cpu(),
        "quats": f.quats.detach().cpu(),
        "intensities": f.intensities.detach().cpu(),
        "spacing": f.spacing,
        "grid_origin": np.asarray(f.grid_origin),
        "grid_index": f.grid_index,
        "grid_shape": f.grid_shape,
        "scale": result.scale,
        "affine": np.asarray(result.affine),
        "shape": tuple(result.volume.shape),
        "region": np.packbits(result.region),
        "config": cfg.to_dict(),
        "nrf": None,
        "centre": np.asarray(result.centre),
        "poses": result.poses,
        "slice_weights": result.slice_weights,
    }
    if result.nrf is not None:
        n = result.nrf
        d["nrf"] = {
            "state": {k: v.cpu() for k, v in n.state_dict().items()},
            "lo": n.lo.cpu().numpy(),
            "hi": n.hi.cpu().numpy(),
            "bands": cfg.nrf_bands,
            "width": cfg.nrf_width,
            "depth": cfg.nrf_depth,
            "scale": cfg.nrf_scale,
        }
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(p)}.", suffix=".partial", dir=os.path.dirname(os.path.abspath(p))
    )
    os.close(fd)
    try:
        torch.save(d, tmp)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p


def load_model(path: str):
    """Returns (GaussianField, nrf or None, info dict with scale, affine, shape, region, config,
    centre, poses, slice_weights: see ReconResult)."""
    p = str(path)
    if not os.path.isfile(p):
        raise InputError(p, "model file not found")
    try:
        d = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise InputError(p, f"not a readable mgaussian model ({type(exc).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise InputError(p, "not an mgaussian model file")
    f = GaussianField(
        d["means"],
        d["log_scales"],
        d["quats"],
        d["intensities"],
        d["spacing"],
        np.asarray(d["grid_origin"]),
        d["grid_index"],
        d["grid_shape"],
    )
    nrf = None
    if d.get("nrf"):
        n = d["nrf"]
        nrf = NeuralResidualField(n["lo"], n["hi"], n["bands"], n["width"], n["depth"], n["scale"])
        nrf.load_state_dict(n["state"])
        nrf.eval()
    shape = tuple(d["shape"])
    region = np.unpackbits(d["region"])[: int(np.prod(shape))].reshape(shape).astype(bool)
    info = {
        "scale": float(d["scale"]),
        "affine": np.asarray(d["affine"]),
        "shape": shape,
        "region": region,
        "config": d["config"],
        "version": d.get("version"),
        "centre": np.asarray(d.get("centre", np.zeros(3))),
        "poses": d.get("poses", []),
        "slice_weights": d.get("slice_weights", []),
    }
    return f, nrf, info
