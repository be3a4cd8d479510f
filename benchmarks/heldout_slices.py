"""Does a held-out stack move within itself? Per-slice view of the leave-one-stack-out score.

The score (``mgaussian evaluate --heldout-stack``, BENCHMARK.md) aligns the reconstruction to the
held-out stack with ONE rigid transform. A stack whose slices moved during its acquisition cannot
be predicted that way by any reconstruction, however good. This script takes the score's
alignment, then re-aligns every slice on its own (the same refinement, one slice at a time) and
prints, per slice, the NCC under the single alignment, the NCC under its own, and the slice's
own offset (rotation in degrees about its mask's centroid, translation in mm). An alternating
pattern of offsets between even and odd slices is the mark of an interleaved acquisition with
the fetus moving between the two passes.

    python benchmarks/heldout_slices.py RECON.nii.gz STACK.nii.gz MASK.nii.gz [--thickness T]
"""

from __future__ import annotations

import argparse
import time

import nibabel as nib
import numpy as np
from mgaussian.geometry import matrix_to_rotvec, slice_frames, voxel_to_world
from mgaussian.heldout import refine_alignment, register_rigid
from mgaussian.metrics import ncc
from mgaussian.sampling import sample_slices


def per_slice(recon, raff, stack, saff, mask, thickness, profile="gaussian", min_pixels=50):
    t0 = time.time()
    T = register_rigid(stack, saff, mask, recon, raff)
    T = refine_alignment(recon, raff, stack, saff, mask, thickness, profile, T)
    fr = slice_frames(saff, stack.shape)
    glob = sample_slices(recon, raff, fr.origins, fr.axes, fr.shape, fr.spacing, thickness, profile, world_transform=T)
    own = glob.copy()
    rows = []
    for z in range(stack.shape[2]):
        m = mask[:, :, z].astype(bool)
        if m.sum() < min_pixels:
            continue
        A = np.array(saff, dtype=np.float64, copy=True)
        A[:3, 3] = A[:3, 3] + A[:3, 2] * z
        one = stack[:, :, z:z + 1]
        Tz = refine_alignment(recon, raff, one, A, mask[:, :, z:z + 1], thickness, profile, T)
        f1 = slice_frames(A, one.shape)
        own[:, :, z] = sample_slices(recon, raff, f1.origins, f1.axes, f1.shape, f1.spacing, thickness, profile,
                                     world_transform=Tz)[:, :, 0]
        D = np.linalg.inv(T) @ Tz  # the slice's own offset, in the stack's world
        c = np.argwhere(m).mean(0)
        cw = voxel_to_world(A, [c[0], c[1], 0.0])
        rows.append((z, ncc(glob[:, :, z][m], stack[:, :, z][m]), ncc(own[:, :, z][m], stack[:, :, z][m]),
                     np.rad2deg(matrix_to_rotvec(D[:3, :3])), D[:3, :3] @ cw + D[:3, 3] - cw))
    M = mask.astype(bool)
    return rows, ncc(glob[M], stack[M]), ncc(own[M], stack[M]), time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recon")
    ap.add_argument("stack")
    ap.add_argument("mask")
    ap.add_argument("--thickness", type=float, default=None, help="default: the slice spacing")
    ap.add_argument("--profile", default="gaussian", choices=["gaussian", "box"])
    a = ap.parse_args(argv)
    r, s, m = nib.load(a.recon), nib.load(a.stack), nib.load(a.mask)
    sd = np.asarray(s.dataobj, dtype=np.float32)
    md = np.asarray(m.dataobj) > 0
    th = a.thickness or slice_frames(s.affine, sd.shape).slice_spacing
    rows, g, o, dt = per_slice(np.asarray(r.dataobj, dtype=np.float32), r.affine, sd, s.affine, md, th, a.profile)
    print("| slice | NCC, one alignment | NCC, its own | own rotation (deg) | own translation (mm) |")
    print("|---|---|---|---|---|")
    for z, n0, n1, rot, tr in rows:
        print(f"| {z} | {n0:.3f} | {n1:.3f} | {np.array2string(rot, precision=1)} | {np.array2string(tr, precision=1)} |")
    print(f"\nwhole stack: NCC {g:.3f} with one alignment (the score), {o:.3f} with each slice aligned on its own "
          f"({dt:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
