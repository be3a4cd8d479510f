"""Draw docs/images/overview.png from the output folder of ``mgaussian demo``.

Three panels on the same coronal plane of the demo atlas: one of the demo's input stacks (the
axial one: 0.8 x 0.8 mm pixels, 3.2 mm slices, shown as acquired, i.e. each slice's value held
over its thickness), the reconstruction ``demo_volume.nii.gz``, and the ground truth (the atlas
shipped in ``src/mgaussian/data/demo/``). Every panel is resampled onto the atlas's grid through
the images' affines (world millimetres), so the three show the same plane.

    mgaussian demo --output-dir /tmp/demo_fig
    python docs/make_figure.py /tmp/demo_fig [--output docs/images/overview.png]
"""

from __future__ import annotations

import argparse
import os
import sys

import nibabel as nib
import numpy as np


def plane_grid(affine: np.ndarray, shape, j: int):
    """Shape and affine of the coronal plane j (the second voxel axis) of a grid."""
    a = np.array(affine, dtype=np.float64, copy=True)
    a[:3, 3] = a[:3, :3] @ np.array([0.0, j, 0.0]) + a[:3, 3]
    return (shape[0], 1, shape[2]), a


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("demo_dir", help="folder written by `mgaussian demo --output-dir DIR`")
    ap.add_argument("--output", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "images", "overview.png"))
    ap.add_argument("--stack", type=int, default=0, help="which input stack to show (0: the axial one)")
    a = ap.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mgaussian.demo import demo_dir
    from mgaussian.sampling import resample_volume

    recon_p = os.path.join(a.demo_dir, "demo_volume.nii.gz")
    stack_p = os.path.join(a.demo_dir, "stacks", f"stack_{a.stack:02d}.nii.gz")
    for p in (recon_p, stack_p):
        if not os.path.isfile(p):
            print(f"error: {p}: not found (run `mgaussian demo --output-dir {a.demo_dir}` first)", file=sys.stderr)
            return 2
    gt_img = nib.load(str(demo_dir() / "srr.nii.gz"))
    mask = np.asarray(nib.load(str(demo_dir() / "mask.nii.gz")).dataobj) > 0
    gt = np.asarray(gt_img.dataobj, dtype=np.float32)
    aff = gt_img.affine

    # the coronal plane through the middle of the brain mask
    js = np.nonzero(mask.any((0, 2)))[0]
    j = int(round((js.min() + js.max()) / 2))
    shape, paff = plane_grid(aff, gt.shape, j)

    def on_plane(path, order):
        img = nib.load(path)
        return resample_volume(np.asarray(img.dataobj, dtype=np.float32), img.affine, shape, paff, order=order)[:, 0, :]

    panels = [
        (on_plane(stack_p, 0), "input: axial stack\n(3.2 mm slices, as acquired)"),
        (on_plane(recon_p, 1), "mgaussian reconstruction\n(0.8 mm isotropic)"),
        (gt[:, j, :], "ground truth\n(the atlas the stacks were simulated from)"),
    ]
    # crop to the brain's box on this plane (plus 4 mm) and share one grey scale
    m2 = mask[:, j, :]
    ii, kk = np.nonzero(m2)
    pad = 5
    i0, i1 = max(ii.min() - pad, 0), min(ii.max() + pad + 1, m2.shape[0])
    k0, k1 = max(kk.min() - pad, 0), min(kk.max() + pad + 1, m2.shape[1])
    vmax = float(np.percentile(gt[mask], 99.5))

    fig, axes = plt.subplots(1, 3, figsize=(9.0, 3.5), dpi=100)
    for ax, (img, title) in zip(axes, panels):
        # voxel axis 0 runs left -> right (R), axis 2 bottom -> top (S); isotropic 0.8 mm pixels
        ax.imshow(img[i0:i1, k0:k1].T, origin="lower", cmap="gray", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
        for s in ax.spines.values():
            s.set_visible(False)
        kw = dict(transform=ax.transAxes, color="yellow", fontsize=8, fontweight="bold")
        ax.text(0.02, 0.5, "R" if aff[0, 0] < 0 else "L", va="center", ha="left", **kw)
        ax.text(0.98, 0.5, "L" if aff[0, 0] < 0 else "R", va="center", ha="right", **kw)
        ax.text(0.5, 0.98, "S", va="top", ha="center", **kw)
        ax.text(0.5, 0.02, "I", va="bottom", ha="center", **kw)
    fig.suptitle("Same coronal plane of the demo's fetal brain (GA 25 weeks)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    fig.savefig(a.output, dpi=100)
    print(f"wrote {a.output} ({os.path.getsize(a.output) / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
