"""The reconstruction's extent: masks grown by a rim, the output grid over every stack's mask, the
grid trimmed to the region on the same lattice."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import write_nifti

from mgaussian.baselines import naive_average
from mgaussian.geometry import rigid_matrix, voxel_to_world
from mgaussian.io import load_stacks
from mgaussian.recon.config import config_from_dict
from mgaussian.recon.data import (
    crop_grid,
    grow_masks,
    output_grid,
    prepare_slices,
    region_and_init,
    region_mask,
)


def _stack(tmp_path, name, mask, affine, data=None):
    data = np.full(mask.shape, 100.0, np.float32) if data is None else data
    sp = write_nifti(tmp_path / f"{name}.nii.gz", data, affine)
    mp = write_nifti(tmp_path / f"{name}_mask.nii.gz", mask.astype(np.uint8), affine)
    return sp, mp


def test_masks_grow_in_plane_by_the_rim(tmp_path):
    """One masked voxel in a 0.5 x 0.5 x 3 mm stack with signal around it grows to a disk of 2 mm
    radius (4 pixels) in its slice and nowhere else; a mask holding every voxel, and a rim of 0,
    change nothing."""
    m = np.zeros((21, 21, 5), bool)
    m[10, 10, 2] = True
    st = load_stacks(*[[p] for p in _stack(tmp_path, "a", m, np.diag([0.5, 0.5, 3.0, 1.0]))], [3.0])
    g = grow_masks(st, 2.0)[0].mask
    assert g[:, :, [0, 1, 3, 4]].sum() == 0
    ii, jj = np.nonzero(g[:, :, 2])
    r = np.hypot(ii - 10, jj - 10)
    assert r.max() == pytest.approx(4.0) and g[:, :, 2].sum() == np.sum(np.hypot(*np.mgrid[-4:5, -4:5]) <= 4)
    assert st[0].mask.sum() == 1  # the loaded stack is left as it was
    assert grow_masks(st, 0.0)[0] is st[0]
    full = load_stacks(*[[p] for p in _stack(tmp_path, "b", np.ones((8, 8, 3), bool), np.eye(4))], [1.0])
    assert grow_masks(full, 2.0)[0] is full[0]


def test_masked_stacks_get_no_rim(tmp_path):
    """A stack that is empty beyond its mask (masked, skull-stripped, or air around a head mask)
    keeps its mask: there is no data in the rim, only the cut the masking made. Noise beyond the
    mask, or signal only in a thin partial-volume band at its edge, does not count as data; tissue
    around it does."""
    aff = np.diag([0.8, 0.8, 3.0, 1.0])
    ii, jj = np.mgrid[:60, :60]
    disk = np.hypot(ii - 30, jj - 30) <= 15
    m = np.repeat(disk[:, :, None], 4, 2)
    rng = np.random.default_rng(0)
    inside = 100.0 * m
    edge = np.repeat(((np.hypot(ii - 30, jj - 30) > 15) & (np.hypot(ii - 30, jj - 30) <= 16.5))[:, :, None], 4, 2)
    cases = {
        "masked": inside,
        "noisy": inside + rng.normal(0, 2.0, m.shape) ** 2,
        "partial volume": inside + 60.0 * edge,
        "tissue": inside + 60.0 * ~m,
    }
    stacks = {
        name: load_stacks(
            *[[p] for p in _stack(tmp_path, name.replace(" ", "_"), m, aff, data.astype(np.float32))], [3.0]
        )
        for name, data in cases.items()
    }
    grown = {name: int(grow_masks(st, 2.0)[0].mask.sum()) - int(m.sum()) for name, st in stacks.items()}
    assert grown["masked"] == grown["noisy"] == grown["partial volume"] == 0
    assert grown["tissue"] > 0.2 * m.sum()
    # min_signal 0 (ReconConfig.mask_rim_min_signal): every mask gets its rim, the masked one too
    assert int(grow_masks(stacks["masked"], 2.0, 0.0)[0].mask.sum()) - int(m.sum()) == grown["tissue"]


def test_output_grid_covers_every_stack_mask(tmp_path):
    """Two stacks on one field of view whose masks end in different places: the grid holds both
    masks whole (the intersection of their boxes cut the one that reaches further), and the region
    holds the voxels either mask calls brain (one of two is half)."""
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    a = np.zeros((40, 40, 20), bool)
    a[5:25, 10:30, 5:15] = True
    b = np.zeros_like(a)
    b[12:35, 10:30, 5:15] = True
    st = load_stacks(*zip(_stack(tmp_path, "a", a, aff), _stack(tmp_path, "b", b, aff)), [2.0])
    shape, gaff = output_grid(st, 1.0)
    corners = voxel_to_world(gaff, np.array([[0, 0, 0], np.asarray(shape) - 1], float))
    lo, hi = corners.min(0), corners.max(0)
    for m in (a, b):
        w = voxel_to_world(aff, np.argwhere(m).astype(float))
        assert np.all(w.min(0) >= lo) and np.all(w.max(0) <= hi)
    reg = region_mask(st, shape, gaff)
    inside = np.round(
        voxel_to_world(np.linalg.inv(gaff), voxel_to_world(aff, np.array([[6.0, 20, 10], [33, 20, 10]])))
    ).astype(int)
    assert reg[tuple(inside[0])] and reg[tuple(inside[1])]


def test_output_grid_without_masks_is_the_shared_field_of_view(tmp_path):
    """Masks that hold every voxel: the grid is the box both fields of view share (plus its
    margin), not their union."""
    a = np.ones((30, 30, 10), bool)
    aff_a = np.diag([1.0, 1.0, 3.0, 1.0])
    aff_b = aff_a.copy()
    aff_b[:3, 3] = [12.0, 0.0, 0.0]  # shifted 12 mm along x: the fields of view share x in [12, 29]
    st = load_stacks(*zip(_stack(tmp_path, "a", a, aff_a), _stack(tmp_path, "b", a, aff_b)), [3.0])
    shape, gaff = output_grid(st, 1.0, margin_mm=0.0)
    xs = voxel_to_world(gaff, np.array([[0, 0, 0], np.asarray(shape) - 1], float))[:, 0]
    pad = 3.0 / 2 + 1.0  # half a slice and a pixel
    assert xs.min() == pytest.approx(12.0 - pad, abs=1.0) and xs.max() == pytest.approx(29.0 + pad, abs=1.0)


def test_region_and_init_in_one_pass_match_their_own(tmp_path):
    """The region and the initial volume from one resampling pass per stack are the bits that
    region_mask and the naive average of the scaled stacks give alone (two oblique stacks of different
    contrast)."""
    rng = np.random.default_rng(1)
    m = np.zeros((30, 30, 8), bool)
    m[6:24, 5:25, 1:7] = True
    paths = []
    for k, rot in enumerate(([0.0, 0.0, 0.0], [0.3, 0.1, -0.2])):
        aff = rigid_matrix(np.array(rot), np.array([1.0, -2.0, 0.5]), np.zeros(3)) @ np.diag([1.0, 1.0, 3.0, 1.0])
        paths.append(_stack(tmp_path, f"s{k}", m, aff, rng.random(m.shape).astype(np.float32) * (50 + 30 * k)))
    st = load_stacks(*zip(*paths), [3.0])
    sets = prepare_slices(st)
    shape, gaff = output_grid(st, 1.0)
    region, init = region_and_init(st, sets, shape, gaff)
    assert np.array_equal(region, region_mask(st, shape, gaff))
    naive = naive_average([(s.data / ss.scale, s.affine) for s, ss in zip(st, sets)], shape, gaff)
    assert np.array_equal(init, naive) and init.dtype == np.float32
    assert region.sum() > 1000 and init[region].min() > 0


def test_distance_to_mask_is_kept_for_the_same_mask():
    """The grid's distance map is the transform's, is given again (read-only) for a mask of the
    same content and voxel size, and is computed anew for another mask or voxel size."""
    from scipy import ndimage

    from mgaussian.field import _distance_to_mask

    m = np.zeros((20, 22, 18), bool)
    m[5:12, 6:15, 4:9] = True
    vox = np.array([0.8, 0.8, 1.0])
    d = _distance_to_mask(m, vox)
    assert np.array_equal(d, ndimage.distance_transform_edt(~m, sampling=vox))
    assert _distance_to_mask(m.copy(), vox) is d and not d.flags.writeable
    m2 = m.copy()
    m2[15, 15, 15] = True
    d2 = _distance_to_mask(m2, vox)
    assert d2 is not d and d2[15, 15, 15] == 0 and d[15, 15, 15] > 0
    assert np.array_equal(_distance_to_mask(m2, np.ones(3)), ndimage.distance_transform_edt(~m2))


def test_crop_grid_keeps_the_lattice():
    """Trimming to the region's box keeps every voxel's world position (an oblique grid), with the
    margin on each side, clipped at the grid's edge."""
    rng = np.random.default_rng(0)
    aff = rigid_matrix(np.array([0.2, -0.1, 0.3]), np.array([4.0, -7.0, 2.0]), np.zeros(3)) @ np.diag(
        [0.8, 0.8, 0.8, 1.0]
    )
    reg = np.zeros((40, 50, 30), bool)
    reg[10:20, 2:30, 15:29] = rng.random((10, 28, 14)) > 0.3
    out, shape, a2 = crop_grid(reg, aff, 1.6)  # 2 voxels
    idx = np.argwhere(reg)
    lo = np.maximum(idx.min(0) - 2, 0)
    assert shape == tuple(np.minimum(idx.max(0) + 3, reg.shape) - lo) and out.shape == shape
    assert out.sum() == reg.sum()
    w0 = voxel_to_world(aff, idx.astype(float))
    w1 = voxel_to_world(a2, np.argwhere(out).astype(float))
    assert np.allclose(w0, w1, atol=1e-9)


def test_renamed_setting_still_reads():
    """A configuration saved before the rim (its loss-only dilation key) still loads."""
    assert config_from_dict({"loss_mask_dilation_mm": 0.0}).mask_rim_mm == 0.0
    with pytest.raises(Exception, match="mask_rim_mm"):
        config_from_dict({"mask_rim_mm": -1.0})


def test_region_votes_kernel_matches_numpy_twin():
    """The region's per-voxel votes from the moved slices (the cpu kernel) equal their numpy twin
    bit for bit: tilted slices, voxels beyond the first and last slice and outside the masks'
    crops, slices sorted out of acquisition order."""
    from mgaussian.geometry import rotvec_to_matrix
    from mgaussian.recon.data import _stack_votes, _stack_votes_numpy

    rng = np.random.default_rng(11)
    n, h, w = 9, 14, 12
    ax = np.stack([rotvec_to_matrix(rng.normal(0, 0.15, 3)) for _ in range(n)])
    o = np.array([[-10.0, -9.0, 3.1 * s - 12.0] for s in rng.permutation(n)]) + rng.normal(0, 0.4, (n, 3))
    msk = (rng.random((n, h, w)) > 0.3).astype(np.float64)
    X = rng.uniform([-14, -13, -20], [14, 13, 20], size=(3000, 3))
    nrm = ax[:, 2].mean(0) / np.linalg.norm(ax[:, 2].mean(0))
    z = o @ nrm
    order = np.argsort(z)
    pos = np.searchsorted(z[order], X @ nrm)
    out = []
    for votes in (_stack_votes, _stack_votes_numpy):
        acc, cov = np.zeros(len(X)), np.zeros(len(X))
        votes(X, pos, order, o, ax, msk, 2.0, 2.2, 2, 2.3, acc, cov)
        out.append((acc, cov))
    (acc, cov), (acc_ref, cov_ref) = out
    assert 0 < cov_ref.sum() < len(X) and 0 < (acc_ref > 0).sum() < cov_ref.sum()  # votes, and not everywhere
    assert np.array_equal(acc, acc_ref) and np.array_equal(cov, cov_ref)
