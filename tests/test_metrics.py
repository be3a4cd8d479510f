import json

import numpy as np
import pytest
from conftest import write_nifti
from skimage.metrics import structural_similarity

from mgaussian.cli import main
from mgaussian.metrics import gain_offset_match, ncc, psnr, score_volume, ssim


def _phantom(shape=(24, 26, 22), seed=0):
    rng = np.random.default_rng(seed)
    g = np.zeros(shape)
    ii = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    for _ in range(6):
        c = rng.uniform(4, np.array(shape) - 4)
        g += rng.uniform(20, 80) * np.exp(-((ii - c) ** 2).sum(-1) / (2 * rng.uniform(2, 5) ** 2))
    m = np.zeros(shape, bool)
    m[3:-3, 2:-4, 4:-2] = True
    return g + 10, m


def test_psnr_ncc_nrmse_hand_computed():
    g = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    x = g + np.array([0.1, -0.1, 0.1, -0.1, 0.0])
    # mse = 4 * 0.01 / 5 = 0.008; range 4 -> PSNR = 10 log10(16 / 0.008)
    assert psnr(x, g, 4.0) == pytest.approx(10 * np.log10(16 / 0.008), abs=1e-12)
    assert ncc(2 * g + 7, g) == pytest.approx(1.0)
    assert ncc(-g, g) == pytest.approx(-1.0)
    x2 = gain_offset_match(3 * g - 2, g)
    assert np.allclose(x2, g)


def test_score_on_hand_case_with_known_error():
    g, m = _phantom()
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 1.0, g.shape)
    noise[m] -= noise[m].mean()  # zero-mean inside M: the matched gain/offset stays near (1, 0)
    res = score_volume(g + noise, aff, g, aff, m)
    rngG = g[m].max() - g[m].min()
    xm = gain_offset_match((g + noise)[m], g[m])
    assert res["psnr"] == pytest.approx(10 * np.log10(rngG**2 / np.mean((xm - g[m]) ** 2)), abs=1e-4)
    assert res["nrmse"] == pytest.approx(np.sqrt(np.mean((xm - g[m]) ** 2)) / rngG, rel=1e-4)


def test_ssim_matches_skimage():
    g, m = _phantom()
    rng = np.random.default_rng(2)
    x = g + rng.normal(0, 3, g.shape)
    for a, b in [(x, g), (g * 0.5, g)]:
        R = g.max() - g.min()
        ref = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R)
        assert ssim(a, b, R) == pytest.approx(ref, abs=1e-9)


def test_scores_invariant_to_gain_and_offset():
    g, m = _phantom()
    aff = np.eye(4)
    x = g + np.random.default_rng(3).normal(0, 2, g.shape)
    r1 = score_volume(x, aff, g, aff, m)
    r2 = score_volume(3.7 * x - 55.0, aff, g, aff, m)
    for k in ("psnr", "ssim", "ncc", "nrmse"):
        assert r1[k] == pytest.approx(r2[k], rel=1e-6, abs=1e-9)  # float32 resampling
    perfect = score_volume(0.01 * g + 3, aff, g, aff, m)
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["ncc"] == pytest.approx(1.0) and perfect["psnr"] > 100


def test_flipped_axis_is_detected_and_geometry_respected():
    g, m = _phantom()
    aff = np.eye(4)
    aff[:3, 3] = [5, -3, 2]
    good = score_volume(g, aff, g, aff, m)
    flipped = score_volume(g[::-1].copy(), aff, g, aff, m)  # data flipped, header not: wrong
    assert flipped["psnr"] < good["psnr"] - 20 and flipped["ncc"] < 0.9
    # data flipped AND affine flipped to match: the same volume in the world, scores perfect
    aff_f = aff.copy()
    aff_f[:3, 0] *= -1
    aff_f[:3, 3] = aff[:3, :3] @ [g.shape[0] - 1, 0, 0] + aff[:3, 3]
    same = score_volume(g[::-1].copy(), aff_f, g, aff, m)
    assert same["psnr"] > 100
    # a shift of the origin by two voxels shows up too
    aff_s = aff.copy()
    aff_s[0, 3] += 2.0
    assert score_volume(g, aff_s, g, aff, m)["psnr"] < good["psnr"] - 20


def test_evaluate_cli_json_and_dice(tmp_path, capsys):
    g, m = _phantom()
    aff = np.diag([0.8, 0.8, 0.8, 1.0])
    lab = np.zeros(g.shape, np.int16)
    lab[g > 30] = 1
    lab[g > 50] = 2
    lab[m & (lab == 0)] = 3
    gp = write_nifti(tmp_path / "gt.nii.gz", g, aff)
    mp = write_nifti(tmp_path / "m.nii.gz", m.astype(np.uint8), aff)
    lp = write_nifti(tmp_path / "lab.nii.gz", lab, aff)
    rp = write_nifti(tmp_path / "rec.nii.gz", 2 * g + 1, aff)
    assert main(["evaluate", rp, "--reference", gp, "--mask", mp, "--labels", lp, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1
    res = json.loads(out[0])
    assert set(res) == {"psnr", "ssim", "ncc", "nrmse", "dice"}
    assert res["ssim"] == pytest.approx(1.0) and all(v == pytest.approx(1.0) for v in res["dice"].values())
    rn = write_nifti(tmp_path / "rec2.nii.gz", g + np.random.default_rng(0).normal(0, 8, g.shape), aff)
    main(["evaluate", rn, "--reference", gp, "--mask", mp, "--labels", lp, "--json"])
    res2 = json.loads(capsys.readouterr().out)
    assert res2["psnr"] < res["psnr"] and min(res2["dice"].values()) < 0.99


def test_heldout_score_prefers_the_right_volume(small_case, capsys):
    c = small_case
    # the ground truth itself predicts a held-out stack far better than a shifted blob
    assert (
        main(
            [
                "evaluate",
                c["gt"],
                "--heldout-stack",
                c["stacks"][1],
                "--stack-mask",
                c["masks"][1],
                "--thickness",
                "4.5",
                "--json",
            ]
        )
        == 0
    )
    good = json.loads(capsys.readouterr().out)
    assert good["ncc"] > 0.99
    # per-slice NCC of the slices with >= 50 mask pixels, each as good as the whole
    assert len(good["slice_ncc"]) >= 3 and min(good["slice_ncc"].values()) > 0.95
    import nibabel as nib

    img = nib.load(c["gt"])
    bad = np.roll(img.get_fdata(), 6, axis=0) ** 2
    bp = write_nifti(c["dir"] / "bad.nii.gz", bad, img.affine)
    main(
        [
            "evaluate",
            bp,
            "--heldout-stack",
            c["stacks"][1],
            "--stack-mask",
            c["masks"][1],
            "--thickness",
            "4.5",
            "--json",
            "--no-align",
        ]
    )
    worse = json.loads(capsys.readouterr().out)
    assert worse["ncc"] < good["ncc"] - 0.05
    assert "warning" not in capsys.readouterr().err
    # a held-out stack that the reconstruction's settings file lists among its inputs: said so
    settings = c["dir"] / "bad.config.json"
    settings.write_text(json.dumps({"inputs": [{"stack": c["stacks"][0]}, {"stack": str(c["stacks"][1])}]}))
    args = ["evaluate", bp, "--heldout-stack", c["stacks"][1], "--stack-mask", c["masks"][1], "--thickness", "4.5"]
    assert main([*args, "--json", "--no-align"]) == 0
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"warning: {c['stacks'][1]}: an input of this reconstruction ({settings}): the score is not a held-out one"
    )
    settings.write_text(json.dumps({"inputs": [{"stack": c["stacks"][0]}]}))
    assert main([*args, "--json", "--no-align"]) == 0 and "warning" not in capsys.readouterr().err


def _independent_scores(rec, raff, g, gaff, m):
    """BENCHMARK.md's metrics written a second way: scipy map_coordinates + skimage SSIM."""
    from scipy.ndimage import map_coordinates

    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in g.shape], indexing="ij"), -1).reshape(-1, 3).astype(float)
    M = np.linalg.inv(raff) @ gaff
    src = ijk @ M[:3, :3].T + M[:3, 3]
    x = map_coordinates(rec.astype(float), src.T, order=1, mode="constant", cval=0.0).reshape(g.shape)
    A = np.c_[x[m], np.ones(m.sum())]
    coef, *_ = np.linalg.lstsq(A, g[m], rcond=None)
    xm = A @ coef
    R = g[m].max() - g[m].min()
    mse = np.mean((xm - g[m]) ** 2)
    X = np.zeros(g.shape)
    X[m] = xm
    G = np.where(m, g, 0)
    lo, hi = np.argwhere(m).min(0), np.argwhere(m).max(0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi))
    s = structural_similarity(
        X[box], G[box], gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=R
    )
    return 10 * np.log10(R**2 / mse), s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_independent_implementation_on_oblique_grids(seed):
    from scipy.spatial.transform import Rotation

    g, m = _phantom((30, 32, 28), seed=seed)
    gaff = np.diag([1.0, 1.0, 1.0, 1.0])
    rng = np.random.default_rng(seed)
    # a "reconstruction": the truth plus noise, stored on an oblique, left-handed, finer grid
    raff = np.eye(4)
    raff[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-30, 30, 3), degrees=True).as_matrix() @ np.diag(
        [-0.7, 0.7, 0.7]
    )
    raff[:3, 3] = [28, -3, -2] + rng.normal(0, 1, 3)
    shape = (48, 52, 46)
    from mgaussian.sampling import resample_volume

    rec = resample_volume(g, gaff, shape, raff) + rng.normal(0, 1.5, shape).astype(np.float32)
    res = score_volume(rec, raff, g, gaff, m)
    p, s = _independent_scores(rec, raff, g, gaff, m)
    assert abs(res["psnr"] - p) < 0.01 and abs(res["ssim"] - s) < 0.0005
    assert 15 < res["psnr"] < 60


@pytest.mark.parametrize("order", [0, 1])
def test_resample_volumes_equals_one_at_a_time(order):
    """Several volumes in one pass get exactly what each gets alone (the grid mapped once)."""
    from mgaussian.sampling import resample_volume, resample_volumes

    rng = np.random.default_rng(2)
    vols = [rng.random((9, 11, 7)).astype(np.float32), (rng.random((9, 11, 7)) > 0.5).astype(np.float32)]
    aff = np.array([[1.5, 0.2, 0, -3], [0, 1.4, 0.1, 2], [0.1, 0, 2.0, 1], [0, 0, 0, 1.0]])
    taff = np.diag([0.7, 0.8, 0.9, 1.0])
    taff[:3, 3] = [-4, 0, 0]
    got = resample_volumes(vols, aff, (20, 18, 16), taff, order=order)
    for g, v in zip(got, vols):
        ref = resample_volume(v, aff, (20, 18, 16), taff, order=order)
        assert g.dtype == np.float32 and np.array_equal(g, ref)
    assert 0 < (got[1] > 0).mean() < 1  # partly inside the source grid, partly outside
