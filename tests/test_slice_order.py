"""Acquisition order of the slices (issue 19): defaults, sidecars, --slice-order FILE, errors."""

import json

import numpy as np
import pytest
from conftest import blob_volume, write_nifti

from mgaussian.cli import main
from mgaussian.errors import InputError
from mgaussian.io import load_stacks
from mgaussian.slice_order import acquisition_order, order_from_ranks, order_ranks, ranks_from_timing


def test_default_orders():
    # Siemens interleaved: odd count starts with slice 0, even count with slice 1
    assert [g[0] for g in acquisition_order(5)] == [0, 2, 4, 1, 3]
    assert [g[0] for g in acquisition_order(6)] == [1, 3, 5, 0, 2, 4]
    assert order_ranks(6).tolist() == [3, 0, 4, 1, 5, 2]
    assert order_ranks(4, "sequential").tolist() == [0, 1, 2, 3]
    # two packages: slices 0,2,4,6 first (interleaved among themselves), then 1,3,5,7
    assert [g[0] for g in acquisition_order(8, "interleaved", packages=2)] == [2, 6, 0, 4, 3, 7, 1, 5]
    # multiband 2: slices k and k + 4 share a time
    r = order_ranks(8, multiband=2)
    assert np.array_equal(r[:4], r[4:]) and len(set(r.tolist())) == 4
    assert ranks_from_timing([0.0, 1.2, 0.6, 0.0, 1.2, 0.6]).tolist() == [0, 2, 1, 0, 2, 1]
    assert order_from_ranks(order_ranks(5)) == [[0], [2], [4], [1], [3]]


def _stack(tmp_path, name="s", k=6, sidecar=None):
    data, aff, _ = blob_volume((12, 12, k), spacing=1.0, sigma=4.0)
    p = write_nifti(tmp_path / f"{name}.nii.gz", data + 1.0, aff)
    if sidecar is not None:
        (tmp_path / f"{name}.json").write_text(sidecar if isinstance(sidecar, str) else json.dumps(sidecar))
    return p


def test_sources_in_order(tmp_path):
    a = _stack(tmp_path, "a", 6)  # no sidecar: default
    b = _stack(tmp_path, "b", 6, {"SliceTiming": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]})
    c = _stack(tmp_path, "c", 6, {"SliceTiming": [], "SliceThickness": 1.0})  # dcm2niix's "unknown"
    d = _stack(tmp_path, "d", 6, {"MultibandAccelerationFactor": 2})
    sa, sb, sc, sd = load_stacks([a, b, c, d])
    assert sa.slice_order.tolist() == [3, 0, 4, 1, 5, 2] and sa.slice_order_source.startswith("default interleaved")
    assert sb.slice_order.tolist() == [0, 1, 2, 3, 4, 5] and "SliceTiming" in sb.slice_order_source
    assert sc.slice_order_source == "default interleaved (Siemens; the sidecar's SliceTiming is empty)"
    assert np.array_equal(sd.slice_order[:3], sd.slice_order[3:]) and "Multiband" in sd.slice_order_source
    # the option overrides every sidecar
    for st in load_stacks([a, b], slice_order="sequential"):
        assert st.slice_order.tolist() == list(range(6)) and st.slice_order_source == "option --slice-order sequential"


def test_order_file_json_and_text(tmp_path):
    a, b = _stack(tmp_path, "a", 4), _stack(tmp_path, "b", 5)
    fj = tmp_path / "order.json"
    fj.write_text(json.dumps({"b.nii.gz": "sequential", "a.nii.gz": [[0, 2], 1, 3]}))
    sa, sb = load_stacks([a, b], slice_order=str(fj))
    assert sa.slice_order.tolist() == [0, 1, 0, 2] and sb.slice_order.tolist() == [0, 1, 2, 3, 4]
    assert sa.slice_order_source == f"file {fj}"
    ft = tmp_path / "order.txt"
    ft.write_text("# one line per stack\n3 2 1 0\n0+1, 2 3 4\n")
    sa, sb = load_stacks([a, b], slice_order=str(ft))
    assert sa.slice_order.tolist() == [3, 2, 1, 0] and sb.slice_order.tolist() == [0, 0, 1, 2, 3]
    ft.write_text("0 1 2\n0 1 2 3 4\n")
    with pytest.raises(InputError, match=r"stack 0 \(a.nii.gz\): 1 of 4 slices are not listed"):
        load_stacks([a, b], slice_order=str(ft))
    fj.write_text(json.dumps([[0, 1, 1, 2], "sequential"]))
    with pytest.raises(InputError, match="slice 1 is listed twice"):
        load_stacks([a, b], slice_order=str(fj))
    fj.write_text(json.dumps({"a.nii.gz": "sequential"}))
    with pytest.raises(InputError, match="no entry for stack b.nii.gz"):
        load_stacks([a, b], slice_order=str(fj))


@pytest.mark.parametrize(
    "sidecar, message",
    [
        ({"SliceTiming": [0.0, 1.0, 2.0]}, "SliceTiming has 3 entries for 6 slices"),
        ({"SliceTiming": [0, "x", 1, 2, 3, 4]}, "SliceTiming must be a list of numbers (seconds per slice)"),
        ({"SliceTiming": [0, -1, 1, 2, 3, 4]}, "SliceTiming must hold finite times >= 0 (seconds)"),
        ({"MultibandAccelerationFactor": 4}, "MultibandAccelerationFactor 4 does not divide the 6 slices"),
    ],
)
def test_bad_sidecar_is_one_line(tmp_path, capsys, sidecar, message):
    p = _stack(tmp_path, "s", 6, sidecar)
    rc = main(["inspect", "--input-stacks", p])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: {tmp_path / 's.json'}: {message}"]


def test_bad_option_is_one_line(tmp_path, capsys):
    p = _stack(tmp_path, "s", 6)
    rc = main(["inspect", "--input-stacks", p, "--slice-order", "interleave"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == ["error: --slice-order: interleave: not interleaved, sequential or an existing file"]
