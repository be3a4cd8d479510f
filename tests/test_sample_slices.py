import json

import nibabel as nib
import numpy as np
import pytest
from test_recon import simulate_phantom

from mgaussian.cli import main

QUICK = {"iterations": [0, 3], "cg_iterations": 10}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """The small simulated case of test_recon, reconstructed quickly with --output-model."""
    d = tmp_path_factory.mktemp("sample_slices")
    g, aff, m, stacks, masks = simulate_phantom(d, seed=0)
    cfgp = d / "cfg.json"
    cfgp.write_text(json.dumps(QUICK))
    model = d / "rec.pt"
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *stacks,
            "--stack-masks",
            *masks,
            "--thicknesses",
            "3.6",
            "--output-volume",
            str(d / "rec.nii.gz"),
            "--output-model",
            str(model),
            "--config",
            str(cfgp),
            "--quiet",
            "--no-report",
        ]
    )
    assert rc == 0
    return {"dir": d, "stacks": stacks, "masks": masks, "model": str(model)}


def test_sample_slices_reproduces_the_inputs(fitted, tmp_path, capsys):
    out = tmp_path / "new" / "sims"  # a missing folder is created
    (tmp_path / "new").mkdir()
    before = {p: open(p, "rb").read() for p in fitted["stacks"]}
    rc = main(
        [
            "sample-slices",
            "--input-model",
            fitted["model"],
            "--input-stacks",
            *fitted["stacks"],
            "--stack-masks",
            *fitted["masks"],
            "--thicknesses",
            "3.6",
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("NCC" in ln and "PSNR" in ln for ln in lines)
    for i, (sp, mp) in enumerate(zip(fitted["stacks"], fitted["masks"])):
        src, msk = nib.load(sp), nib.load(mp)
        sim = nib.load(str(out / f"stack_{i:02d}_simulated.nii.gz"))
        assert sim.shape == src.shape
        assert np.allclose(sim.affine, src.affine, atol=1e-5)
        m = np.asarray(msk.dataobj) > 0
        x, y = sim.get_fdata()[m], src.get_fdata()[m]
        ncc = np.corrcoef(x, y)[0, 1]
        assert ncc > 0.9, (i, ncc)
        # in the inputs' units (the stacks here share one intensity scale)
        assert 0.8 < x.mean() / y.mean() < 1.25
        assert float(lines[i].split("NCC ")[1].split(",")[0]) == pytest.approx(ncc, abs=2e-3)
    assert all(open(p, "rb").read() == before[p] for p in fitted["stacks"])


def test_sample_slices_errors(fitted, tmp_path, capsys):
    out = tmp_path / "o"
    # fewer stacks than the model's poses
    rc = main(
        [
            "sample-slices",
            "--input-model",
            fitted["model"],
            "--input-stacks",
            *fitted["stacks"][:2],
            "--output-dir",
            str(out),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: --input-stacks:") and "fitted to 3" in err and "\n" not in err
    # stacks in another order
    st = fitted["stacks"]
    rc = main(
        [
            "sample-slices",
            "--input-model",
            fitted["model"],
            "--input-stacks",
            st[1],
            st[0],
            st[2],
            "--output-dir",
            str(out),
        ]
    )
    assert rc == 2 and "order" in capsys.readouterr().err
    # not a model
    rc = main(["sample-slices", "--input-model", st[0], "--input-stacks", *st, "--output-dir", str(out)])
    assert rc == 2 and "not a readable mgaussian model" in capsys.readouterr().err
    # output folder that is an input (the stacks' folder is fine, a file is not)
    rc = main(["sample-slices", "--input-model", fitted["model"], "--input-stacks", *st, "--output-dir", st[0]])
    assert rc == 2 and "--output-dir" in capsys.readouterr().err
    assert not out.exists()


def test_simulate_uses_the_fitted_poses(fitted):
    """A slice moved by its pose samples the model where the pose puts it."""
    from mgaussian.io import load_stacks
    from mgaussian.recon.model_io import load_model
    from mgaussian.recon.sample import simulate_stacks_from_model

    fld, nrf, info = load_model(fitted["model"])
    stacks = load_stacks(fitted["stacks"], fitted["masks"], [3.6])
    zero = [
        dict(
            p,
            rotvec=[[0.0] * 3] * len(p["slices"]),
            translation_mm=[[0.0] * 3] * len(p["slices"]),
            stack_rotvec=[0.0] * 3,
            stack_translation_mm=[0.0] * 3,
        )
        for p in info["poses"]
    ]
    ones = [dict(w, scale=[1.0] * len(w["slices"])) for w in info["slice_weights"]]
    info = dict(
        info, poses=zero, slice_weights=ones
    )  # fitted poses are near identity here (no motion); start from exact identity
    base = simulate_stacks_from_model(fld, nrf, info, stacks)
    moved = dict(info, poses=[dict(p) for p in info["poses"]])
    p0 = moved["poses"][0]
    # stack 0 is axial with 1.2 mm pixels: shift every slice by 2 pixels along the first in-plane axis
    shift = (2.4 * stacks[0].frames.axes[0, 0]).tolist()
    p0["translation_mm"] = [shift] * len(p0["slices"])
    p0["stack_translation_mm"] = shift
    sim = simulate_stacks_from_model(fld, nrf, moved, stacks)
    assert np.allclose(sim[1], base[1]) and np.allclose(sim[2], base[2])
    # pixel (a, b) now sees what pixel (a + 2, b) saw
    assert np.allclose(sim[0][:-2], base[0][2:], atol=1e-3 * base[0].max())
    # a per-slice intensity scale multiplies its slice
    k = int(info["poses"][0]["slices"][3])
    sw = [dict(w) for w in info["slice_weights"]]
    sw[0]["scale"] = [1.0] * len(sw[0]["slices"])
    sw[0]["scale"][3] = 2.0
    sim2 = simulate_stacks_from_model(fld, nrf, dict(info, slice_weights=sw), stacks)
    assert np.allclose(sim2[0][:, :, k], 2 * base[0][:, :, k]) and np.allclose(
        sim2[0][:, :, k + 1], base[0][:, :, k + 1]
    )
