"""Stacks, masks and sidecars in; volumes out (atomically, never over an input).

Every problem with an input raises :class:`mgaussian.errors.InputError` naming the file (or the
option) and what is wrong, so the command line can print one clean line.
"""

from __future__ import annotations

__all__ = [
    "load_image",
    "load_mask",
    "resolve_thickness",
    "Stack",
    "load_stacks",
    "save_nifti",
    "check_output_path",
    "atomic_write_text",
    "NIFTI_SUFFIXES",
    "validate_stacks",
    "MAX_THICKNESS_MM",
]

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from .errors import InputError, warn
from .geometry import SliceFrames, slice_frames, voxel_sizes

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MAX_THICKNESS_MM = 50.0  # no MRI slice is thicker; a larger value is a unit or header mistake


def _is_nifti_name(p: str | os.PathLike) -> bool:
    return str(p).lower().endswith(NIFTI_SUFFIXES)


def load_image(path: str | os.PathLike, *, what: str = "image", allow_zero: bool = False):
    """Load a 3D NIfTI image (or 4D holding one volume) and check it is usable.

    Returns ``(data float32 [X,Y,Z], affine float64 [4,4], nibabel image)``.
    """
    p = str(path)
    if not os.path.exists(p):
        raise InputError(p, "file not found")
    if os.path.isdir(p):
        raise InputError(p, "is a directory, expected a NIfTI file")
    if not os.access(p, os.R_OK):
        raise InputError(p, "file is not readable (permission denied)")
    if os.path.getsize(p) == 0:
        raise InputError(p, "file is empty")
    try:
        img = nib.load(p)
    except nib.filebasedimages.ImageFileError:
        raise InputError(p, "not a NIfTI image (.nii or .nii.gz)") from None
    except Exception as exc:  # corrupt header, bad gzip, ...
        raise InputError(p, f"cannot read header (corrupt or truncated file?): {_short(exc)}") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise InputError(p, f"not a NIfTI image ({type(img).__name__})")
    shape = tuple(int(s) for s in img.shape)
    if len(shape) < 3:
        raise InputError(p, f"{what} must be 3D, got {len(shape)}D image of shape {shape}")
    extra = shape[3:]
    if any(s != 1 for s in extra):
        raise InputError(p, f"{what} must be 3D or hold one volume, got shape {shape} ({int(np.prod(extra))} volumes)")
    if min(shape[:3]) < 1:
        raise InputError(p, f"{what} has an empty dimension: shape {shape}")
    dtype = img.get_data_dtype()
    if np.issubdtype(dtype, np.complexfloating) or dtype.names is not None:
        raise InputError(p, f"{what} has complex or structured voxels ({dtype}); expected real values")
    nbytes = int(np.prod(shape[:3])) * 4
    if nbytes > 8 * 1024**3:
        raise InputError(p, f"{what} is absurdly large ({shape}, {nbytes / 1024**3:.1f} GiB as float32)")
    try:
        data = img.get_fdata(dtype=np.float32)
    except Exception as exc:
        raise InputError(p, f"cannot read image data (truncated or corrupt file?): {_short(exc)}") from None
    data = np.asarray(data.reshape(shape[:3]), dtype=np.float32)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise InputError(p, "affine (sform/qform) is not finite")
    vs = voxel_sizes(affine)
    if np.any(vs < 1e-3) or np.any(vs > 1e3):
        raise InputError(p, f"absurd voxel size {np.round(vs, 6).tolist()} mm")
    if abs(np.linalg.det(affine[:3, :3] / vs[None, :])) < 1e-6:
        raise InputError(p, "affine (sform/qform) is singular: its voxel axes are not independent")
    if not np.all(np.isfinite(data)):
        n_bad = int(np.size(data) - np.isfinite(data).sum())
        raise InputError(p, f"{what} contains {n_bad} NaN or Inf voxels")
    if not allow_zero and not np.any(data):
        raise InputError(p, f"{what} is all zeros")
    return data, affine, img


def _short(exc: BaseException) -> str:
    s = str(exc).strip().splitlines()
    return (s[0] if s else type(exc).__name__)[:200]


def load_mask(path: str | os.PathLike, ref_shape=None, ref_affine=None, ref_name: str | None = None) -> np.ndarray:
    """Load a mask (voxels > 0 are inside); check its grid matches the reference grid."""
    data, affine, _ = load_image(path, what="mask", allow_zero=True)
    p = str(path)
    if ref_shape is not None:
        if tuple(data.shape) != tuple(ref_shape[:3]):
            raise InputError(
                p,
                f"mask grid {data.shape} differs from its stack's {tuple(ref_shape[:3])}"
                + (f" ({ref_name})" if ref_name else ""),
            )
        if ref_affine is not None and not np.allclose(affine, ref_affine, atol=1e-3, rtol=1e-4):
            raise InputError(
                p,
                "mask affine differs from its stack's (not on the same grid)" + (f" ({ref_name})" if ref_name else ""),
            )
    m = data > 0
    if not m.any():
        raise InputError(p, "mask is empty (no voxel > 0)")
    if not np.all((data == 0) | (data == 1)):
        odd = data[(data != 0) & (data != 1)]
        warn(p, f"mask holds values other than 0 and 1 (e.g. {float(odd.flat[0]):g}); voxels > 0 are taken as inside")
    return m


def sidecar_path(path: str | os.PathLike) -> Path:
    s = str(path)
    for suf in (".nii.gz", ".nii"):
        if s.lower().endswith(suf):
            return Path(s[: -len(suf)] + ".json")
    return Path(s + ".json")


def resolve_thickness(path, explicit: float | None, slice_spacing: float) -> tuple[float, str]:
    """Slice thickness in mm and where it came from.

    Order: ``explicit`` (``--thicknesses``), else the BIDS JSON sidecar's ``SliceThickness``,
    else the slice spacing from the header.
    """
    if explicit is not None:
        if not np.isfinite(explicit) or explicit <= 0:
            raise InputError("--thicknesses", f"thickness must be a positive number of mm, got {explicit}")
        if explicit > MAX_THICKNESS_MM:
            raise InputError(
                "--thicknesses", f"implausible slice thickness {explicit:g} mm (> {MAX_THICKNESS_MM:g} mm)"
            )
        return float(explicit), "option"
    sc = sidecar_path(path)
    if sc.exists():
        try:
            meta = json.loads(sc.read_text())
        except Exception as exc:
            raise InputError(str(sc), f"sidecar is not valid JSON: {_short(exc)}") from None
        if isinstance(meta, dict) and "SliceThickness" in meta:
            t = meta["SliceThickness"]
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not np.isfinite(t) or t <= 0:
                raise InputError(str(sc), f"SliceThickness must be a positive number, got {t!r}")
            if t > MAX_THICKNESS_MM:
                raise InputError(str(sc), f"implausible SliceThickness {t:g} mm (> {MAX_THICKNESS_MM:g} mm)")
            return float(t), "sidecar"
    if slice_spacing > MAX_THICKNESS_MM:
        raise InputError(
            str(path),
            f"implausible slice spacing {slice_spacing:g} mm (> {MAX_THICKNESS_MM:g} mm); "
            "check the header's voxel sizes or give --thicknesses",
        )
    return float(slice_spacing), "spacing"


@dataclass
class Stack:
    """One input stack: its voxels, grid, mask, thickness and nominal slice frames."""

    path: str
    data: np.ndarray  # float32 [X, Y, K]
    affine: np.ndarray  # [4, 4]
    mask: np.ndarray  # bool [X, Y, K]
    thickness: float
    thickness_source: str
    frames: SliceFrames = field(repr=False)
    mask_path: str | None = None
    # acquisition time rank of each slice [K] (0 = acquired first; slices acquired together share
    # a rank) and where it came from (mgaussian.slice_order); None when not resolved
    slice_order: np.ndarray | None = field(default=None, repr=False)
    slice_order_source: str | None = None

    @property
    def name(self) -> str:
        b = os.path.basename(self.path)
        for suf in (".nii.gz", ".nii"):
            if b.lower().endswith(suf):
                return b[: -len(suf)]
        return b

    @property
    def n_slices(self) -> int:
        return int(self.data.shape[2])

    @property
    def gap(self) -> float:
        """Gap between slices in mm (negative = overlap)."""
        return self.frames.slice_spacing - self.thickness


def load_stacks(paths, mask_paths=None, thicknesses=None, slice_order: str | None = None) -> list[Stack]:
    """Load stacks (and masks) with their thicknesses and slice acquisition orders; checks counts
    and grids. ``slice_order`` is ``--slice-order`` (interleaved, sequential or a file); without it
    the order comes from each stack's sidecar, else the default (see mgaussian.slice_order)."""
    paths = list(paths)
    if not paths:
        raise InputError("--input-stacks", "no stack given")
    mask_paths = list(mask_paths) if mask_paths else None
    if mask_paths is not None and len(mask_paths) != len(paths):
        raise InputError("--stack-masks", f"{len(mask_paths)} masks given for {len(paths)} stacks")
    th = list(thicknesses) if thicknesses else None
    if th is not None:
        if len(th) == 1:
            th = th * len(paths)
        elif len(th) != len(paths):
            raise InputError("--thicknesses", f"{len(th)} thicknesses given for {len(paths)} stacks")
        for t in th:
            if t is None or not np.isfinite(t) or t <= 0:
                raise InputError("--thicknesses", f"thickness must be a positive number of mm, got {t}")
    seen = set()
    for p in paths:
        rp = os.path.realpath(p)
        if rp in seen:
            raise InputError(p, "the same stack is given twice")
        seen.add(rp)
    stacks = []
    for i, p in enumerate(paths):
        data, affine, _ = load_image(p, what="stack")
        try:
            fr = slice_frames(affine, data.shape)
        except ValueError as exc:
            raise InputError(p, str(exc)) from None
        if mask_paths is not None:
            m = load_mask(mask_paths[i], data.shape, affine, ref_name=os.path.basename(p))
            mp = mask_paths[i]
            if not np.any(data[m]):
                raise InputError(
                    mp,
                    f"mask covers only zero voxels of its stack ({os.path.basename(p)}): it lies outside the anatomy",
                )
        else:
            m = np.ones(data.shape, dtype=bool)
            mp = None
        t, src = resolve_thickness(p, th[i] if th is not None else None, fr.slice_spacing)
        lo, hi = float(data.min()), float(data.max())
        if np.all((data == lo) | (data == hi)):
            warn(p, f"stack holds only two values ({lo:g}, {hi:g}): is it a mask?")
        stacks.append(Stack(str(p), data, affine, m, t, src, fr, mp))
    from .slice_order import resolve_slice_orders

    for st, (ranks, osrc) in zip(stacks, resolve_slice_orders(paths, [s.n_slices for s in stacks], slice_order)):
        st.slice_order, st.slice_order_source = ranks, osrc
    return stacks


def _world_box(st: Stack) -> tuple[np.ndarray, np.ndarray]:
    """World bounding box of a stack's masked voxels, grown by half a slice and a pixel."""
    idx = np.argwhere(st.mask)
    lo_i, hi_i = idx.min(0), idx.max(0)
    corners = np.array(
        [[a, b, c] for a in (lo_i[0], hi_i[0]) for b in (lo_i[1], hi_i[1]) for c in (lo_i[2], hi_i[2])], float
    )
    w = corners @ st.affine[:3, :3].T + st.affine[:3, 3]
    pad = st.thickness / 2 + max(st.frames.spacing)
    return w.min(0) - pad, w.max(0) + pad


def validate_stacks(stacks: list[Stack]) -> None:
    """Checks on the set of stacks for a reconstruction.

    Errors: a lone stack of one slice (nothing to reconstruct in 3D); a stack whose masked box
    meets no other stack's (the stacks do not overlap in space). Warning: a one-slice stack beside
    others (usable: it constrains the volume where it lies)."""
    if len(stacks) == 1 and stacks[0].n_slices == 1:
        raise InputError(stacks[0].path, "a single stack of one slice cannot be reconstructed in 3D; give more stacks")
    for st in stacks:
        if st.n_slices == 1 and len(stacks) > 1:
            warn(st.path, "stack has one slice only")
    if len(stacks) < 2:
        return
    boxes = [_world_box(st) for st in stacks]
    alone = [
        i
        for i, (lo, hi) in enumerate(boxes)
        if not any(np.all(lo <= h) and np.all(lo2 <= hi) for j, (lo2, h) in enumerate(boxes) if j != i)
    ]
    if alone:  # blame a later stack first: the first one anchors the output grid
        i = max(alone) if alone == [0] or len(stacks) == 2 else min(k for k in alone if k > 0)
        raise InputError(stacks[i].path, "does not overlap any other stack in space (check the affines and masks)")


def check_output_path(path, inputs=(), *, what: str = "--output-volume", nifti: bool = True) -> str:
    """Refuse an output that is a directory, an input, in a missing folder, or not .nii/.nii.gz."""
    p = str(path)
    if p.endswith(os.sep) or os.path.isdir(p):
        raise InputError(what, f"{p} is a directory, expected a file path")
    if nifti and not _is_nifti_name(p):
        raise InputError(what, f"{p}: output must end in .nii or .nii.gz")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise InputError(what, f"{p}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise InputError(what, f"{p}: folder {parent} is not writable")
    rp = os.path.realpath(p)
    for q in inputs:
        if q is None:
            continue
        if os.path.realpath(str(q)) == rp:
            raise InputError(what, f"{p} is also an input; refusing to overwrite it")
    return p


def _atomic_target(path: str):
    d = os.path.dirname(os.path.abspath(path)) or "."
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".partial", dir=d)
    os.close(fd)
    return tmp


def save_nifti(data: np.ndarray, affine: np.ndarray, path, *, inputs=(), dtype=np.float32, header_extra=None) -> str:
    """Write a NIfTI volume atomically (temporary file in the same folder, then rename).

    The qform and sform both carry ``affine`` (code 1, scanner), so every viewer places it alike.
    """
    p = check_output_path(path, inputs)
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if header_extra:
        img.header["descrip"] = str(header_extra)[:79].encode()
    tmp = _atomic_target(p)
    # nibabel chooses compression by file name: give the temp file the right suffix
    suffix = ".nii.gz" if p.lower().endswith(".gz") else ".nii"
    tmp2 = tmp + suffix
    try:
        nib.save(img, tmp2)
        os.replace(tmp2, p)
    finally:
        for t in (tmp, tmp2):
            if os.path.exists(t):
                os.unlink(t)
    return p


def atomic_write_text(path, text: str) -> str:
    p = str(path)
    tmp = _atomic_target(p)
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return p
