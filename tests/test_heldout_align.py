"""The leave-one-stack-out score's alignment (mgaussian.heldout): the crop keeps the geometry and
the refinement on the score's own forward model finds a rotation intensity registration leaves."""

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from mgaussian.geometry import slice_frames
from mgaussian.heldout import crop_to_mask, heldout_score, refine_alignment, register_rigid
from mgaussian.sampling import sample_slices


def _textured_case(n=90, seed=0):
    rng = np.random.default_rng(seed)
    ii = np.stack(np.meshgrid(*[np.arange(n)] * 3, indexing="ij"), -1) - n / 2
    r = np.linalg.norm(ii, axis=-1)
    brain = ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 2) * 60 + 50 * (r < 18)
    outside = 20 + ndimage.gaussian_filter(rng.normal(size=(n, n, n)), 3) * 40
    V = np.where(r < 22, brain, outside).astype(np.float32)
    Vaff = np.eye(4)
    Vaff[:3, 3] = -n / 2
    # the held-out stack: 1.5 mm pixels, 3 mm slices, a 108 mm field of view around a 40 mm mask
    A = np.diag([1.5, 1.5, 3.0, 1.0])
    A[:3, 3] = [-54, -54, -24]
    shape = (72, 72, 17)
    T = np.eye(4)
    T[:3, :3] = Rotation.from_rotvec(np.deg2rad([4.0, -3.0, 5.0])).as_matrix()
    T[:3, 3] = [4.0, -3.0, 5.0]
    fr = slice_frames(A, shape)
    S = sample_slices(V, Vaff, fr.origins, fr.axes, fr.shape, fr.spacing, 3.0, "gaussian", world_transform=T)
    S = S + rng.normal(size=S.shape).astype(np.float32) * 2.0
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1)
    w = ijk @ A[:3, :3].T + A[:3, 3]
    M = np.linalg.norm(w - T[:3, 3], axis=-1) < 20
    return V, Vaff, S, A, M, T


def _angle_deg(Ta, Tb):
    return float(np.rad2deg(np.linalg.norm(Rotation.from_matrix(Ta[:3, :3] @ Tb[:3, :3].T).as_rotvec())))


def test_crop_to_mask_keeps_world_coordinates():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(40, 50, 6))
    mask = np.zeros(data.shape, bool)
    mask[12:20, 30:41, 2:4] = True
    A = np.array([[0.0, 1.1, 0.3, -20.0], [1.1, 0.0, 0.0, 5.0], [0.0, 0.2, -3.0, 40.0], [0, 0, 0, 1]])
    d, a, m = crop_to_mask(data, A, mask, margin_mm=3.3)
    assert d.shape == (8 + 6, 11 + 6, 6) and m.sum() == mask.sum()
    # voxel (i, j, k) of the crop is voxel (i + 9, j + 27, k) of the input, at the same world point
    assert np.allclose(d, data[9:23, 27:44]) and np.array_equal(m, mask[9:23, 27:44])
    assert np.allclose(a @ [2, 3, 4, 1], A @ [11, 30, 4, 1])
    # an empty mask leaves everything as it is
    d2, a2, _ = crop_to_mask(data, A, np.zeros_like(mask))
    assert d2.shape == data.shape and np.array_equal(a2, A)


def test_alignment_refined_on_the_score_recovers_the_rotation():
    V, Vaff, S, A, M, T = _textured_case()
    T0 = register_rigid(S, A, M, V, Vaff)
    c = np.argwhere(M).mean(0) @ A[:3, :3].T + A[:3, 3]
    assert np.linalg.norm((T0 - T)[:3] @ [*c, 1]) < 1.0  # the registration finds the position...
    T1 = refine_alignment(V, Vaff, S, A, M, 3.0, "gaussian", T0)
    e0, e1 = _angle_deg(T0, T), _angle_deg(T1, T)
    assert e1 < 1.0 and e1 < e0, (e0, e1)  # ...the refinement the rotation
    assert np.linalg.norm((T1 - T)[:3] @ [*c, 1]) < 0.5
    r = heldout_score(V, Vaff, S, A, M, 3.0)
    assert r["ncc"] > 0.98 and _angle_deg(np.array(r["transform"]), T) < 1.0
