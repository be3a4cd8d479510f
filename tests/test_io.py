import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from mgaussian.errors import InputError
from mgaussian.io import load_image, load_stacks, resolve_thickness, save_nifti


def _stack(tmp_path, name="s.nii.gz", shape=(10, 12, 6), spacing=(1.0, 1.0, 3.3)):
    aff = np.diag([*spacing, 1.0])
    d = np.random.default_rng(0).uniform(1, 2, shape).astype(np.float32)
    return write_nifti(tmp_path / name, d, aff)


def test_thickness_resolution_order(tmp_path):
    p = _stack(tmp_path)
    # 1. no option, no sidecar: the slice spacing
    assert resolve_thickness(p, None, 3.3) == (3.3, "spacing")
    # 2. sidecar SliceThickness
    (tmp_path / "s.json").write_text(json.dumps({"SliceThickness": 3.0, "SpacingBetweenSlices": 3.3}))
    assert resolve_thickness(p, None, 3.3) == (3.0, "sidecar")
    # 3. the option wins over both
    assert resolve_thickness(p, 2.5, 3.3) == (2.5, "option")
    st = load_stacks([p])[0]
    assert st.thickness == 3.0 and st.thickness_source == "sidecar"
    assert st.gap == pytest.approx(0.3)  # gaps are kept
    st = load_stacks([p], thicknesses=[4.0])[0]
    assert st.thickness == 4.0 and st.gap == pytest.approx(-0.7)


def test_one_thickness_applies_to_all(tmp_path):
    ps = [_stack(tmp_path, f"s{i}.nii.gz") for i in range(3)]
    assert [s.thickness for s in load_stacks(ps, thicknesses=[2.0])] == [2.0, 2.0, 2.0]


def test_4d_single_volume_and_int_types_load(tmp_path):
    d = np.random.default_rng(1).integers(1, 100, (8, 9, 5, 1)).astype(np.int16)
    p = write_nifti(tmp_path / "v.nii", d)
    data, aff, _ = load_image(p)
    assert data.shape == (8, 9, 5) and data.dtype == np.float32
    assert np.array_equal(data, d[..., 0])


def test_save_is_atomic_and_keeps_geometry(tmp_path):
    aff = np.array([[0, 0, -3.0, 10], [0.8, 0, 0, -5], [0, 0.8, 0, 2], [0, 0, 0, 1]])  # left-handed, permuted
    d = np.random.default_rng(2).normal(size=(5, 6, 7)).astype(np.float32)
    out = save_nifti(d, aff, tmp_path / "o.nii.gz")
    img = nib.load(out)
    assert np.allclose(img.affine, aff) and np.allclose(img.get_qform(), aff) and np.allclose(img.get_sform(), aff)
    assert np.allclose(img.get_fdata(), d)
    assert sorted(os.listdir(tmp_path)) == ["o.nii.gz"]  # no temporary file left behind


def test_save_refuses_to_overwrite_an_input(tmp_path):
    p = _stack(tmp_path)
    before = open(p, "rb").read()
    with pytest.raises(InputError, match="also an input"):
        save_nifti(np.zeros((2, 2, 2)), np.eye(4), p, inputs=[p])
    assert open(p, "rb").read() == before
