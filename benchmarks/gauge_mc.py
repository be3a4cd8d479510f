"""What the slices' unobservable mean motion costs, from the motion model alone (no reconstruction).

Moving every slice and the volume together changes no slice, so motion correction fixes the
frame by an estimate of the mean slice pose (``motion.anchor_poses``: the mean over all slices of
the rotation vector and the slice-centre displacement). Even with every relative pose exact, the
volume is then off by the sample mean of the random motions. This script draws the motions of
BENCHMARK.md's model (angle uniform up to ``--rotation`` about a random axis, translation uniform
per axis up to ``--translation``, about the volume centre) for three orthogonal stacks over the
sb25 atlas's brain mask, and prints the mean displacement per brain voxel that several
estimators of the mean pose leave (computed from the true poses, or from them with iid noise
``--noise`` mm / deg per slice; ``--normal`` draws normal motion of the same spread instead).
The range-centre estimators and ``adaptive`` (``motion.location``, what the headers' frame uses)
take the translations about the volume centre (the stacks' field-of-view centre).

    python benchmarks/gauge_mc.py [--draws 400] [--rotation 3] [--translation 1.5] [--thickness 3.2]
        [--noise 0.1] [--normal]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_reconstruct import case_defs  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--draws", type=int, default=400)
    ap.add_argument("--rotation", type=float, default=3.0)
    ap.add_argument("--translation", type=float, default=1.5)
    ap.add_argument("--thickness", type=float, default=3.2)
    ap.add_argument("--noise", type=float, default=0.0, help="iid pose noise per slice (mm and deg)")
    ap.add_argument("--normal", action="store_true", help="normal motion with the uniform's spread")
    a = ap.parse_args(argv)
    import nibabel as nib

    from mgaussian.geometry import rotvec_to_matrix
    from mgaussian.recon.motion import location

    img = nib.load(case_defs()["sb25-t3.2"]["mask"])
    A = img.affine
    msk = np.asarray(img.dataobj) > 0
    X = np.argwhere(msk)[::5].astype(float) @ A[:3, :3].T + A[:3, 3]
    centre = (np.array(msk.shape) - 1) / 2 @ A[:3, :3].T + A[:3, 3]
    res = {k: [] for k in ("equal weights", "pixel-count weights", "sqrt-pixel weights", "about a common centre",
                           "range centre, 1 pair", "range centre, 3 pairs", "adaptive (ours)")}
    for seed in range(a.draws):
        rng = np.random.default_rng(seed)
        S = []
        for ax_ in range(3):
            k = np.floor((X[:, ax_] - X[:, ax_].min()) / a.thickness).astype(int)
            for j in range(k.max() + 1):
                P = X[k == j]
                if len(P) == 0:
                    continue
                axis = rng.normal(size=3)
                axis /= np.linalg.norm(axis)
                if a.normal:  # the same second moments: E|r|^2 = rot^2 / 3, var t = tr^2 / 3
                    S.append((P, rng.normal(size=3) * np.radians(a.rotation) / 3, rng.normal(size=3) * a.translation / np.sqrt(3)))
                else:
                    S.append((P, axis * np.radians(rng.uniform(0, a.rotation)), rng.uniform(-a.translation, a.translation, 3)))
        if a.noise > 0:  # what the estimators see: the poses with fitting noise
            S = [(P, r + rng.normal(size=3) * np.radians(a.noise), t + rng.normal(size=3) * a.noise) for P, r, t in S]
        n = np.array([len(P) for P, _, _ in S], float)
        s = np.array([P.mean(0) for P, _, _ in S])
        rv = np.array([r for _, r, _ in S])
        u = np.array([rotvec_to_matrix(r) @ (c - centre) + centre + t - c for (_, r, t), c in zip(S, s)])
        allP = np.concatenate([P for P, _, _ in S])

        def err(w, about=None):
            w = w / w.sum()
            rb = (w[:, None] * rv).sum(0)
            if about is None:
                cb, ub = (w[:, None] * s).sum(0), (w[:, None] * u).sum(0)
            else:
                cb = about
                ub = (w[:, None] * np.array([ui + si - cb - rotvec_to_matrix(r) @ (si - cb)
                                             for ui, si, r in zip(u, s, rv)])).sum(0)
            d = (allP - cb) @ rotvec_to_matrix(rb).T + cb + ub - allP
            return float(np.linalg.norm(d, axis=1).mean())

        tc = np.array([t for _, _, t in S])  # the translations about the volume centre

        def err_centre(kind):
            rb = rv.mean(0)
            tb = {"mid1": lambda: (tc.min(0) + tc.max(0)) / 2,
                  "mid3": lambda: np.mean([(np.sort(tc, 0)[j] + np.sort(tc, 0)[-1 - j]) / 2 for j in range(3)], 0),
                  "adaptive": lambda: location(tc, "adaptive")}[kind]()
            d = (allP - centre) @ rotvec_to_matrix(rb).T + centre + tb - allP
            return float(np.linalg.norm(d, axis=1).mean())

        ones = np.ones(len(S))
        for key, v in zip(res, (err(ones), err(n), err(np.sqrt(n)), err(ones, about=s.mean(0)),
                                err_centre("mid1"), err_centre("mid3"), err_centre("adaptive"))):
            res[key].append(v)
    print(f"{a.draws} draws, {'normal' if a.normal else 'uniform'} {a.rotation:g} deg / {a.translation:g} mm, pose noise "
          f"{a.noise:g}, {a.thickness:g} mm slices: mean displacement "
          "per brain voxel of the mean-pose estimate (mm)")
    print(f"{'estimator':<24} {'mean':>6} {'median':>7} {'p10':>6} {'p90':>6}")
    for k, v in res.items():
        v = np.asarray(v)
        print(f"{k:<24} {v.mean():6.3f} {np.median(v):7.3f} {np.percentile(v, 10):6.3f} {np.percentile(v, 90):6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
