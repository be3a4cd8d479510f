import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from mgaussian.geometry import (
    apply_pose_to_frames,
    rigid_matrix,
    rotvec_to_matrix,
    slice_frames,
    voxel_to_world,
    world_to_voxel,
)
from mgaussian.render._common import quat_to_rotmat


def _affines():
    rng = np.random.default_rng(0)
    ax = np.diag([0.8, 0.9, 3.0, 1.0])
    ax[:3, 3] = [-50, 20, 7]
    obl = np.eye(4)
    obl[:3, :3] = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ np.diag([1.1, 1.1, 3.3])
    obl[:3, 3] = rng.normal(size=3) * 30
    flip = np.diag([-1.0, 1.0, 1.0, 1.0]) @ obl  # left-handed
    perm = ax[:, [0, 2, 1, 3]]  # columns permuted: left-handed coronal-like stack
    return {"axis-aligned": ax, "oblique": obl, "flipped": flip, "permuted": perm}


@pytest.mark.parametrize("name", list(_affines()))
def test_world_voxel_round_trip(name):
    A = _affines()[name]
    ijk = np.random.default_rng(1).uniform(-5, 50, size=(100, 3))
    xyz = voxel_to_world(A, ijk)
    assert np.allclose(world_to_voxel(A, xyz), ijk, atol=1e-9)
    # against the 4x4 product, written out by hand
    h = np.c_[ijk, np.ones(len(ijk))] @ A.T
    assert np.allclose(xyz, h[:, :3])


@pytest.mark.parametrize("name", list(_affines()))
def test_slice_frames_place_pixels(name):
    A = _affines()[name]
    shape = (7, 9, 5)
    fr = slice_frames(A, shape)
    assert fr.origins.shape == (5, 3) and fr.axes.shape == (5, 3, 3)
    for k in range(5):
        R = fr.axes[k]
        assert np.allclose(R @ R.T, np.eye(3), atol=1e-12)
        assert np.isclose(np.linalg.det(R), 1.0)
        for a, b in [(0, 0), (3, 4), (6, 8)]:
            p = fr.origins[k] + a * fr.spacing[0] * R[0] + b * fr.spacing[1] * R[1]
            assert np.allclose(p, voxel_to_world(A, [a, b, k]), atol=1e-9)
    assert np.isclose(fr.slice_spacing, np.linalg.norm(A[:3, 2]))


def test_sheared_in_plane_rejected():
    A = np.eye(4)
    A[0, 1] = 0.5
    with pytest.raises(ValueError, match="sheared"):
        slice_frames(A, (4, 4, 4))


def test_rotations_match_scipy():
    rv = np.random.default_rng(2).normal(size=(20, 3))
    assert np.allclose(rotvec_to_matrix(rv), Rotation.from_rotvec(rv).as_matrix(), atol=1e-12)
    q = np.random.default_rng(3).normal(size=(20, 4))
    ref = Rotation.from_quat(q[:, [1, 2, 3, 0]]).as_matrix()  # scipy wants (x,y,z,w)
    assert np.allclose(quat_to_rotmat(torch.tensor(q)).numpy(), ref, atol=1e-12)
    # zero rotation has a finite gradient
    z = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    rotvec_to_matrix(z).sum().backward()
    assert torch.isfinite(z.grad).all()


def test_pose_moves_frames_like_rigid_matrix():
    A = _affines()["oblique"]
    fr = slice_frames(A, (5, 6, 4))
    rng = np.random.default_rng(4)
    rv, t, c = rng.normal(size=(4, 3)) * 0.2, rng.normal(size=(4, 3)) * 3, np.array([1.0, -2.0, 5.0])
    o, ax = apply_pose_to_frames(
        torch.tensor(fr.origins), torch.tensor(fr.axes), torch.tensor(rv), torch.tensor(t), torch.tensor(c)
    )
    for k in range(4):
        M = rigid_matrix(rv[k], t[k], c)
        p0 = fr.origins[k] + 2 * fr.spacing[0] * fr.axes[k, 0] + 3 * fr.spacing[1] * fr.axes[k, 1]
        p1 = o[k].numpy() + 2 * fr.spacing[0] * ax[k, 0].numpy() + 3 * fr.spacing[1] * ax[k, 1].numpy()
        assert np.allclose(M[:3, :3] @ p0 + M[:3, 3], p1, atol=1e-9)


def test_orthogonal_voxel_axes_tells_shear_from_rotation_and_flips():
    """The check the renderer and the atlas-space placement share: a rotated, scaled, flipped grid
    is walkable plane by plane, a sheared one is not (render_volume refuses it)."""
    from mgaussian.geometry import orthogonal_voxel_axes, rotvec_to_matrix
    from mgaussian.render import render_volume

    A = np.eye(4)
    A[:3, :3] = np.asarray(rotvec_to_matrix(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))) @ np.diag(
        [0.8, 1.2, -3.0]
    )
    assert orthogonal_voxel_axes(A)
    S = A.copy()
    S[0, 1] += 0.3
    assert not orthogonal_voxel_axes(S)
    one = torch.zeros(1, 3, dtype=torch.float64)
    args = (
        one,
        torch.zeros(1, 3, dtype=torch.float64),
        torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
    )
    assert render_volume(*args, A, (4, 4, 2), backend="reference").shape == (4, 4, 2)
    with pytest.raises(ValueError, match="orthogonal voxel axes"):
        render_volume(*args, S, (4, 4, 2), backend="reference")
