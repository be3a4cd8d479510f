"""Benchmark of the slice renderer on a realistic case (sb25-t3.2, see benchmarks/RENDER.md).

Case: the GA25 fetal atlas (0.8 mm, 135x189x155, ../shared/data/fetal_sb_atlas_ga25), three
orthogonal stacks of 0.8 x 0.8 mm pixels and 3.2 mm slices (slice spacing 3.2 mm) covering the
volume, every slice with a small random rigid motion (<= 3 deg, <= 1.5 mm); Gaussians on the
masked grid (dilated by 2 x spacing) at 1.6 mm and 0.8 mm, intensities from the atlas; the
package PSF (in-plane FWHM 1.2 x pixel, through-plane FWHM = thickness); cutoff 3.

A pass renders every slice of the three stacks once (the pixels inside the mask's row spans, or
every pixel with --all-pixels); backward is one full gradient (w.r.t. every Gaussian parameter
and every slice pose) of sum(image * G) for a fixed random G.

    python benchmarks/bench_render.py [--backends cpu,reference,gpu] [--spacings 1.6,0.8] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch

from mgaussian.field import init_field_on_grid
from mgaussian.render import (available_backends, mask_to_row_spans, render_points,
                              render_slices, slice_psf_sigma)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "fetal_sb_atlas_ga25")


def _rot(axis_angle: np.ndarray) -> np.ndarray:
    th = float(np.linalg.norm(axis_angle))
    if th < 1e-12:
        return np.eye(3)
    k = axis_angle / th
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + math.sin(th) * kx + (1 - math.cos(th)) * kx @ kx


def make_stacks(mask, affine, thickness=3.2, pixel=0.8, motion=True, all_pixels=False, seed=0):
    """Three orthogonal stacks over the volume. Returns a list of dicts (render_slices kwargs)."""
    rng = np.random.default_rng(seed)
    shape = np.array(mask.shape)
    vox = float(np.sqrt((affine[:3, :3] ** 2).sum(0))[0])
    lo = affine[:3, 3]
    ext = (shape - 1) * vox
    centre = lo + ext / 2
    ex, ey, ez = np.eye(3)
    defs = [  # (e_u, e_v, n, in-plane extent axes, through-plane axis)
        ("axial", ex, ey, ez, 0, 1, 2),
        ("coronal", ex, ez, -ey, 0, 2, 1),
        ("sagittal", ey, ez, ex, 1, 2, 0),
    ]
    inv = np.linalg.inv(affine)
    stacks = []
    for name, eu, ev, n, iu, iv, iw in defs:
        h = int(round(ext[iu] / pixel)) + 1
        w = int(round(ext[iv] / pixel)) + 1
        ns = int(math.floor(ext[iw] / thickness)) + 1
        axes0 = np.stack([eu, ev, n])
        # plane k: passes through lo + k*thickness along the stack axis (n may point backwards)
        start = lo.copy()
        if n[iw] < 0:
            start[iw] = lo[iw] + ext[iw]
        origins, axes = [], []
        for k in range(ns):
            o = start + k * thickness * n
            if motion:
                r = _rot(rng.normal(size=3) * math.radians(1.5))
                t = rng.normal(size=3) * 0.75
                c = centre
                o = r @ (o - c) + c + t
                ax = (r @ axes0.T).T
            else:
                ax = axes0
            origins.append(o)
            axes.append(ax)
        origins = np.array(origins)
        axes = np.array(axes)
        # pixel mask: the brain mask sampled at every pixel (nearest voxel)
        a = np.arange(h) * pixel
        b = np.arange(w) * pixel
        pts = (origins[:, None, None, :] + a[None, :, None, None] * axes[:, None, None, 0, :]
               + b[None, None, :, None] * axes[:, None, None, 1, :])
        v = np.rint(pts @ inv[:3, :3].T + inv[:3, 3]).astype(int)
        ok = np.all((v >= 0) & (v < shape), -1)
        vc = np.clip(v, 0, shape - 1)
        pm = ok & mask[vc[..., 0], vc[..., 1], vc[..., 2]]
        spans = None if all_pixels else mask_to_row_spans(pm, ns, (h, w))
        npix = ns * h * w if all_pixels else int((spans[..., 1] - spans[..., 0]).sum())
        stacks.append(dict(name=name, origins=torch.tensor(origins, dtype=torch.float32),
                           axes=torch.tensor(axes, dtype=torch.float32), shape=(h, w),
                           spacing=(pixel, pixel), psf=slice_psf_sigma((pixel, pixel), thickness),
                           row_spans=spans, pixels=npix, masked_pixels=int(pm.sum())))
    return stacks


def load_case():
    import nibabel as nib
    img = nib.load(os.path.join(DATA, "srr.nii.gz"))
    msk = nib.load(os.path.join(DATA, "mask.nii.gz"))
    vol = img.get_fdata(dtype=np.float32)
    vol = vol / np.percentile(vol[msk.get_fdata() > 0], 99)
    return vol, msk.get_fdata() > 0, img.affine


def run_pass(field_t, stacks, backend, slices=None, stats=None):
    """Forward over all stacks (optionally a subset of slice indices per stack). Returns images."""
    outs = []
    for st in stacks:
        o, a, sp = st["origins"], st["axes"], st["row_spans"]
        if slices is not None:
            sel = slices[st["name"]]
            o, a = o[sel], a[sel]
            sp = None if sp is None else sp[sel]
        s = {"count_pixel_pairs": True} if stats is not None else None
        outs.append(render_slices(*field_t, o, a, st["shape"], st["spacing"], st["psf"],
                                  backend=backend, row_spans=sp, stats=s))
        if stats is not None and s:
            for k in ("pairs", "pixel_pairs"):
                stats[k] = stats.get(k, 0) + s.get(k, 0)
    return outs


def bench(field, stacks, backend, reps=3, subset=None):
    params = [t.detach().clone().requires_grad_() for t in field]
    poses = [(st["origins"].clone().requires_grad_(), st["axes"].clone().requires_grad_())
             for st in stacks]
    st2 = [dict(st, origins=p[0], axes=p[1]) for st, p in zip(stacks, poses)]
    gen = torch.Generator().manual_seed(1)
    best_f = best_b = float("inf")
    grads = None
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = run_pass(params, st2, backend, subset)
        t1 = time.perf_counter()
        if grads is None:  # G = dL/dimage, fixed, made outside the timed region
            grads = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
        t2 = time.perf_counter()
        torch.autograd.backward(outs, grads)
        t3 = time.perf_counter()
        best_f = min(best_f, t1 - t0)
        best_b = min(best_b, t3 - t2)
        for p in params + [x for p in poses for x in p]:
            p.grad = None
    return best_f, best_b


def pixel_points(stacks):
    """World positions [P,3] and PSF covariances [P,3,3] of the rendered pixels of all stacks."""
    pts, covs = [], []
    for st in stacks:
        o, a, sp = st["origins"].double(), st["axes"].double(), st["row_spans"]
        h, w = st["shape"]
        du, dv = st["spacing"]
        ar = torch.arange(h, dtype=torch.float64) * du
        br = torch.arange(w, dtype=torch.float64) * dv
        p = (o[:, None, None] + ar[None, :, None, None] * a[:, None, None, 0]
             + br[None, None, :, None] * a[:, None, None, 1])
        if sp is None:
            sel = torch.ones(p.shape[:3], dtype=torch.bool)
        else:
            b = np.arange(w)
            sel = torch.from_numpy((b >= sp[..., 0:1]) & (b < sp[..., 1:2]))
        s2 = torch.tensor(st["psf"], dtype=torch.float64) ** 2
        c = a.transpose(1, 2) @ torch.diag(s2) @ a  # [S,3,3]
        pts.append(p[sel])
        covs.append(c[:, None, None].expand(*sel.shape, 3, 3)[sel])
    return torch.cat(pts).float(), torch.cat(covs).float()


def bench_points(field_t, pts, covs, h, block_radius, reps=2):
    params = [t.detach().clone().requires_grad_() for t in field_t]
    g = torch.randn(pts.shape[0], generator=torch.Generator().manual_seed(2))
    best_f = best_b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        v = render_points(*params, pts, covs, block_radius=block_radius, cell_size=h,
                          backend="cpu")
        t1 = time.perf_counter()
        torch.autograd.backward([v], [g])
        t2 = time.perf_counter()
        best_f, best_b = min(best_f, t1 - t0), min(best_b, t2 - t1)
        for p in params:
            p.grad = None
    return best_f, best_b


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--backends", default="cpu,reference,gpu")
    ap.add_argument("--spacings", default="1.6,0.8")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--ref-slices", type=int, default=3, help="slices per stack for the reference")
    ap.add_argument("--all-pixels", action="store_true", help="render every pixel, not mask spans")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--points", type=int, default=-1, metavar="R",
                    help="also time the seed's point path (render_points, cpu, block_radius R, "
                         "cell = spacing) on the same pixels")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        import numba
        numba.set_num_threads(args.threads)
    vol, mask, affine = load_case()
    stacks = make_stacks(mask, affine, all_pixels=args.all_pixels)
    npix = sum(s["pixels"] for s in stacks)
    nslices = sum(len(s["origins"]) for s in stacks)
    rows = []
    avail = available_backends()
    for h in [float(x) for x in args.spacings.split(",")]:
        f = init_field_on_grid(mask, affine, h, init_intensity=vol)
        field_t = [f.means, f.log_scales, f.quats, f.intensities]
        stats = {}
        if "cpu" in avail:
            run_pass(field_t, stacks, "cpu", stats=stats)  # warm-up (JIT) + pair counts
        for be in args.backends.split(","):
            if be not in avail:
                print(f"# {be}: not available here", file=sys.stderr)
                continue
            subset, scale, note = None, 1.0, ""
            if be == "reference":
                rng = np.random.default_rng(0)
                subset, used = {}, 0
                for st in stacks:
                    n = len(st["origins"])
                    # slices through the middle of the brain (the expensive ones)
                    mid = np.arange(n // 2 - args.ref_slices // 2, n // 2 - args.ref_slices // 2
                                    + args.ref_slices)
                    subset[st["name"]] = torch.as_tensor(mid)
                    used += sum(int((st["row_spans"][m, :, 1] - st["row_spans"][m, :, 0]).sum())
                                if st["row_spans"] is not None else st["shape"][0] * st["shape"][1]
                                for m in mid)
                scale = npix / used
                note = f"scaled from {args.ref_slices}/stack central slices ({used} px) x{scale:.1f}"
            fs, bs = bench(field_t, stacks, be, reps=1 if be == "reference" else args.reps,
                           subset=subset)
            fs, bs = fs * scale, bs * scale
            pp = stats.get("pixel_pairs", float("nan"))
            row = {"backend": be, "spacing_mm": h, "gaussians": f.num_gaussians, "pixels": npix,
                   "forward_s": round(fs, 4), "backward_s": round(bs, 4),
                   "pairs_per_s": float(f"{pp / (fs + bs):.4g}") if pp == pp else None}
            extra = {"slices": nslices, "projected_pairs": stats.get("pairs"),
                     "pixel_gaussian_pairs": pp, "threads": torch.get_num_threads(),
                     "note": note}
            rows.append((row, extra))
            if args.json:
                print(json.dumps(dict(row, **{k: v for k, v in extra.items() if v not in ("", None)})),
                      flush=True)
        if args.points >= 0:
            pts, covs = pixel_points(stacks)
            fs, bs = bench_points(field_t, pts, covs, h, args.points)
            row = {"backend": "cpu", "path": "points", "block_radius": args.points,
                   "spacing_mm": h, "gaussians": f.num_gaussians, "pixels": int(pts.shape[0]),
                   "forward_s": round(fs, 4), "backward_s": round(bs, 4), "pairs_per_s": None}
            extra = {"pixel_gaussian_pairs": float("nan"), "note": f"render_points r={args.points}"}
            rows.append((row, extra))
            if args.json:
                print(json.dumps(row), flush=True)
    if not args.json:
        print(f"{'backend':10s} {'h mm':>5s} {'gaussians':>9s} {'pixels':>8s} {'fwd s':>8s} "
              f"{'bwd s':>8s} {'pix-pairs':>10s} {'pairs/s':>9s}  note")
        for r, e in rows:
            print(f"{r['backend']:10s} {r['spacing_mm']:5.1f} {r['gaussians']:9d} {r['pixels']:8d} "
                  f"{r['forward_s']:8.3f} {r['backward_s']:8.3f} {e['pixel_gaussian_pairs']:10.3g} "
                  f"{r['pairs_per_s'] or float('nan'):9.3g}  {e['note']}")


if __name__ == "__main__":
    main()
