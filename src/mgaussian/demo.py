"""The demo that ships inside the package: a fetal brain atlas (CC0, see data/demo/NOTICE)."""

from __future__ import annotations

__all__ = ["demo_dir", "run_demo"]

import json
import os
import time
from pathlib import Path


def demo_dir() -> Path:
    return Path(__file__).parent / "data" / "demo"


def run_demo(output_dir: str) -> int:
    """Simulate three orthogonal 3.2 mm stacks of the demo atlas, reconstruct them, score.

    Writes ``output_dir/stacks/``, the volume ``output_dir/demo_volume.nii.gz`` and
    ``output_dir/demo_scores.json``.
    """
    from .baselines import naive_average
    from .io import atomic_write_text, load_image, load_mask, save_nifti
    from .metrics import score_volume
    from .simulate import simulate_stacks

    d = demo_dir()
    gt_p, m_p = str(d / "srr.nii.gz"), str(d / "mask.nii.gz")
    gt, aff, _ = load_image(gt_p, what="demo ground truth")
    mask = load_mask(m_p, gt.shape, aff)
    os.makedirs(output_dir, exist_ok=True)
    sdir = os.path.join(output_dir, "stacks")
    t0 = time.time()
    simulate_stacks(
        gt,
        aff,
        mask,
        sdir,
        thickness=3.2,
        pixel=0.8,
        noise=0.0,
        seed=0,
        inputs=[gt_p, m_p],
        gt_path=gt_p,
        mask_path=m_p,
        log=lambda s: None,
    )
    print(f"simulated 3 stacks (0.8 x 0.8 x 3.2 mm) of the demo atlas into {sdir} in {time.time() - t0:.1f} s")
    from .io import load_stacks
    from .recon.config import ReconConfig
    from .recon.pipeline import reconstruct

    stacks = load_stacks(
        [os.path.join(sdir, f"stack_{i:02d}.nii.gz") for i in range(3)],
        [os.path.join(sdir, f"mask_{i:02d}.nii.gz") for i in range(3)],
        [3.2],
    )
    t0 = time.time()
    res = reconstruct(stacks, ReconConfig(), log=lambda s: print(s, flush=True))
    vol, vaff = res.volume, res.affine
    naive = naive_average([(s.data, s.affine) for s in stacks], gt.shape, aff)
    method = "mgaussian reconstruct (default settings)"
    out = os.path.join(output_dir, "demo_volume.nii.gz")
    save_nifti(vol, vaff, out, inputs=[gt_p, m_p])
    print(f"reconstructed in {time.time() - t0:.1f} s")
    sc = score_volume(vol, vaff, gt, aff, mask)
    sn = score_volume(naive, aff, gt, aff, mask)
    atomic_write_text(
        os.path.join(output_dir, "demo_scores.json"),
        json.dumps({"method": method, **sc, "naive_average": sn}, indent=1),
    )
    print("score against the atlas:       " + ", ".join(f"{k} {v:.4f}" for k, v in sc.items()))
    print("naive average, for comparison: " + ", ".join(f"{k} {v:.4f}" for k, v in sn.items()))
    print(f"volume written to {os.path.abspath(out)}")
    return 0
