"""Inputs without user help (mgaussian.masking): automatic masks and N4 bias-field correction."""

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti
from scipy import ndimage

from mgaussian.cli import main
from mgaussian.io import load_stacks
from mgaussian.masking import auto_mask, auto_masks, n4_correct, overlap_region
from mgaussian.metrics import score_volume
from mgaussian.simulate import simulate_stacks


def _dice(a, b):
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _head(shape=(44, 48, 40), spacing=1.2, seed=0):
    """A 'head' (ellipsoid with blobs) inside a dimmer, larger 'body' (as a fetal head inside
    the mother): the automatic mask must find the head's region, not the whole body."""
    rng = np.random.default_rng(seed)
    ii = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    c0 = (np.array(shape) - 1) / 2
    head = (((ii - c0) / (np.array(shape) * 0.3)) ** 2).sum(-1) < 1
    body = (((ii - c0) / (np.array(shape) * 0.49)) ** 2).sum(-1) < 1
    g = np.where(body, 15.0, 0.0) + np.where(head, 45.0, 0.0)
    for _ in range(6):
        c = c0 + rng.uniform(-5, 5, 3)
        g += rng.uniform(10, 30) * np.exp(-((ii - c) ** 2).sum(-1) / (2 * rng.uniform(1.5, 3) ** 2)) * head
    aff = np.diag([spacing] * 3 + [1.0])
    aff[:3, 3] = [-26, -28, -24]
    return g.astype(np.float32), aff, head


@pytest.fixture(scope="module")
def head_case(tmp_path_factory):
    d = tmp_path_factory.mktemp("automask")
    g, aff, head = _head()
    simulate_stacks(g, aff, head, str(d / "sim"), thickness=3.6, pixel=1.2, seed=0, log=lambda s: None)
    return {
        "dir": d,
        "gt": g,
        "aff": aff,
        "head": head,
        "stacks": [str(d / "sim" / f"stack_{i:02d}.nii.gz") for i in range(3)],
        "masks": [str(d / "sim" / f"mask_{i:02d}.nii.gz") for i in range(3)],
    }


def test_overlap_region_is_the_common_field_of_view():
    # stack A: 10 x 10 x 5 voxels of 2 mm at the origin; B: a slab that covers x in [4, 9] mm only
    A = np.diag([2.0, 2.0, 2.0, 1.0])
    B = np.diag([1.0, 1.0, 1.0, 1.0])
    B[:3, 3] = [4.0, -100.0, -100.0]
    o = overlap_region((10, 10, 5), A, [((6, 400, 400), B)])
    # voxel centres x = 0, 2, ..., 18 mm; B holds x in [3.5, 9.5] (half a voxel beyond its centres)
    assert np.array_equal(np.flatnonzero(o[:, 0, 0]), [2, 3, 4]) and o[2:5].all() and o.sum() == 3 * 50
    assert overlap_region((3, 3, 3), A, []).all()


def test_auto_mask_finds_the_head_not_the_body(head_case):
    stacks = load_stacks(head_case["stacks"], head_case["masks"])
    got = auto_masks(stacks, log=lambda s: None)
    for st, m in zip(stacks, got):
        d = _dice(m, st.mask)
        assert d > 0.85, (st.name, d)  # the simulated head mask, sampled the same way
        body = st.data > 5  # the whole body, far larger
        assert m.sum() < 0.6 * body.sum()
    # a constant stack holds nothing to find
    assert not auto_mask(np.full((8, 8, 4), 3.0, np.float32), np.eye(4)).any()


def test_reconstruct_without_masks_uses_the_automatic_mask(head_case, tmp_path):
    cfgp = tmp_path / "cfg.json"
    cfgp.write_text(json.dumps({"iterations": [0, 0], "cg_iterations": 15, "motion": False}))
    out = tmp_path / "rec.nii.gz"
    log = tmp_path / "run.log"
    rc = main(
        [
            "reconstruct",
            "--input-stacks",
            *head_case["stacks"],
            "--thicknesses",
            "3.6",
            "--output-volume",
            str(out),
            "--config",
            str(cfgp),
            "--quiet",
            "--no-report",
            "--log",
            str(log),
        ]
    )
    assert rc == 0
    text = log.read_text()
    assert text.count("automatic mask") == 3
    meta = json.loads((tmp_path / "rec.config.json").read_text())
    assert [i["mask"] for i in meta["inputs"]] == ["automatic"] * 3 and meta["config"]["auto_mask"] is True
    img = nib.load(str(out))
    sc = score_volume(
        img.get_fdata(),
        img.affine,
        head_case["gt"],
        head_case["aff"],
        ndimage.binary_erosion(head_case["head"], iterations=2),
    )
    assert sc["ncc"] > 0.9, sc


def test_constant_stack_without_masks_is_refused(tmp_path, capsys):
    A = np.diag([1.0, 1.0, 3.0, 1.0])
    s0 = write_nifti(tmp_path / "flat.nii.gz", np.full((20, 20, 6), 7.0, np.float32), A)
    rng = np.random.default_rng(0)
    s1 = write_nifti(tmp_path / "ok.nii.gz", rng.uniform(0, 10, (20, 20, 6)).astype(np.float32), A)
    rc = main(["reconstruct", "--input-stacks", s0, s1, "--output-volume", str(tmp_path / "o.nii.gz"), "--no-report"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and not (tmp_path / "o.nii.gz").exists()
    assert err[-1].startswith("error: ") and "flat.nii.gz" in err[-1] and "automatic mask" in err[-1]
    assert "Traceback" not in "\n".join(err)


def test_n4_removes_a_smooth_multiplicative_field():
    g, aff, head = _head(shape=(40, 40, 12), spacing=1.5)
    aff[2, 2] = 3.0
    x = np.linspace(-1, 1, g.shape[0])[:, None, None]
    y = np.linspace(-1, 1, g.shape[1])[None, :, None]
    field = (1.0 + 0.3 * x) * (1.0 - 0.15 * y) * np.ones(g.shape)
    biased = (g * field).astype(np.float32)
    body = g > 5
    corrected, est = n4_correct(biased, aff, body)
    assert corrected.shape == g.shape and est.shape == g.shape
    # the flat 'body' shell (15 everywhere before the field) is flat again
    shell = body & ~ndimage.binary_dilation(head, iterations=2)

    def cv(v):
        return float(v[shell].std() / v[shell].mean())

    assert cv(corrected) < 0.4 * cv(biased), (cv(biased), cv(corrected))
    # the estimated field follows the applied one up to a constant factor: what is left of the
    # applied field's variation after dividing by the estimate is at most half of it (measured 0.35)
    r = est[body] / field[body]
    f = field[body]
    assert r.std() / r.mean() < 0.5 * f.std() / f.mean(), (r.std() / r.mean(), f.std() / f.mean())
    assert np.allclose(corrected * est, biased, rtol=1e-4, atol=1e-3)  # data = corrected x field (no shift: data > 1)
