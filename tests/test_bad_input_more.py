"""More bad input, every subcommand: exit 2, one ``error:`` line naming the file or option, no
traceback, the inputs untouched (bytes and mtime) and nothing written. Also the warnings for odd
but usable input.

Each case builds its files in a fresh folder; the whole folder is fingerprinted (every file's
name, size, hash and mtime) before and after the run, which checks both that the inputs are
unchanged and that no output (not even a temporary file) was created.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os

import nibabel as nib
import numpy as np
import pytest
from conftest import write_nifti

from mgaussian.cli import main

AFF = np.diag([1.0, 1.0, 3.0, 1.0])
SHAPE = (12, 12, 8)


def _vol(shape=SHAPE, seed=0):
    return np.random.default_rng(seed).uniform(1, 2, shape).astype(np.float32)


def _fingerprint(d):
    out = {}
    for root, dirs, names in os.walk(d):
        for n in dirs + names:
            p = os.path.join(root, n)
            st = os.lstat(p)
            h = None
            if os.path.isfile(p) and os.access(p, os.R_OK) and st.st_mode & 0o444:
                h = hashlib.sha256(open(p, "rb").read()).hexdigest()
            out[os.path.relpath(p, d)] = (st.st_size if os.path.isfile(p) else -1, st.st_mtime_ns, h)
    return out


def _run_bad(capsys, d, argv, where, msg=None):
    before = _fingerprint(d)
    rc = main([str(x) for x in argv])
    cap = capsys.readouterr()
    lines = [ln for ln in cap.err.strip().splitlines() if ln]
    assert rc == 2, (rc, cap.err)
    assert len(lines) == 1, cap.err
    assert lines[0].startswith("error: "), lines[0]
    assert str(where) in lines[0], lines[0]
    if msg is not None:
        assert msg in lines[0], lines[0]
    assert "Traceback" not in cap.err + cap.out
    assert _fingerprint(d) == before, "an input changed or an output was written"
    return lines[0]


class Files:
    """Lazily made small files in one folder."""

    def __init__(self, d):
        self.d = d

    def p(self, name):
        return str(self.d / name)

    def nii(self, name, data, aff=AFF, dtype=None):
        return write_nifti(self.d / name, data, aff, dtype)

    @property
    def stack(self):
        return self.nii("s1.nii.gz", _vol())

    @property
    def stack2(self):
        return self.nii("s2.nii.gz", _vol(seed=1))

    @property
    def mask(self):
        return self.nii("m1.nii.gz", np.ones(SHAPE, np.uint8))

    @property
    def mask2(self):
        return self.nii("m2.nii.gz", np.ones(SHAPE, np.uint8))

    def text(self, name, content="not an image\n"):
        with open(self.p(name), "w") as f:
            f.write(content)
        return self.p(name)

    def raw_header(self, name, shape, zooms=(1.0, 1.0, 1.0), nbytes=64):
        """A .nii whose header claims ``shape``/``zooms`` with only ``nbytes`` of data."""
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(np.float32)
        hdr.set_data_shape(shape)
        hdr.set_zooms(zooms)
        hdr.set_sform(np.diag(list(zooms) + [1.0]), code=1)
        hdr["vox_offset"] = 352
        with open(self.p(name), "wb") as f:
            f.write(hdr.binaryblock + b"\0" * 4 + np.ones(nbytes // 4, np.float32).tobytes())
        return self.p(name)

    def config(self, obj, name="cfg.json"):
        return self.text(name, obj if isinstance(obj, str) else json.dumps(obj))


def _recon(f, *extra, stacks=None, masks=None, out=None):
    argv = ["reconstruct", "--input-stacks", *(stacks or [f.stack, f.stack2])]
    if masks is not False:
        argv += ["--stack-masks", *(masks or [f.mask, f.mask2])]
    argv += ["--output-volume", out or f.p("out.nii.gz"), *extra]
    return argv


def _shifted(f, name, dx=500.0):
    a = AFF.copy()
    a[0, 3] = dx
    return f.nii(name, _vol(seed=2), a)


def _half_signal(f):
    v = _vol()
    v[6:] = 0
    return f.nii("half.nii.gz", v)


def _half_mask(f):
    m = np.zeros(SHAPE, np.uint8)
    m[8:] = 1
    return f.nii("mh.nii.gz", m)


def _binary_dtype_file(f):
    """A NIfTI whose datatype is DT_BINARY (1 bit per voxel), which no tool reads as an image."""
    img = nib.Nifti1Image(np.ones(SHAPE, np.uint8), AFF)
    raw = bytearray(img.to_bytes())
    hdr = nib.Nifti1Header.from_fileobj(__import__("io").BytesIO(bytes(raw[:348])))
    hdr["datatype"] = 1
    hdr["bitpix"] = 1
    raw[:348] = hdr.binaryblock
    open(f.p("bool.nii"), "wb").write(bytes(raw))
    return f.p("bool.nii")


def _truncated_gz(f, name="trunc.nii.gz"):
    raw = gzip.compress(nib.Nifti1Image(_vol((30, 30, 20)), AFF).to_bytes())
    open(f.p(name), "wb").write(raw[: len(raw) // 2])
    return f.p(name)


def _model_like(f, name, obj=None, truncate=False):
    import torch

    p = f.p(name)
    torch.save(obj if obj is not None else {"format": "mgaussian-model/1", "means": torch.zeros(100, 3)}, p)
    if truncate:
        b = open(p, "rb").read()
        open(p, "wb").write(b[: len(b) // 2])
    return p


def _sidecar(f, stack, obj):
    f.text(os.path.basename(stack).replace(".nii.gz", ".json"), json.dumps(obj))
    return stack


def _sidecar_text(f, stack, text):
    f.text(os.path.basename(stack).replace(".nii.gz", ".json"), text)
    return stack


# (id, argv(f), where(f) or str, substring of the message)
CASES = [
    # ---- reconstruct: geometry and masks
    (
        "recon-stacks-do-not-overlap",
        lambda f: _recon(f, stacks=[f.stack, _shifted(f, "far.nii.gz")], masks=False),
        lambda f: f.p("far.nii.gz"),
        "does not overlap",
    ),
    (
        "recon-mask-outside-signal",
        lambda f: _recon(f, stacks=[_half_signal(f), f.stack2], masks=[_half_mask(f), f.mask2]),
        lambda f: f.p("mh.nii.gz"),
        "outside the anatomy",
    ),
    (
        "recon-mask-other-shape",
        lambda f: _recon(f, masks=[f.nii("mg.nii.gz", np.ones((12, 10, 8), np.uint8)), f.mask2]),
        lambda f: f.p("mg.nii.gz"),
        "grid",
    ),
    (
        "recon-mask-other-affine",
        lambda f: _recon(
            f, masks=[f.mask, f.nii("ma.nii.gz", np.ones(SHAPE, np.uint8), np.diag([1.0, 1.0, 2.0, 1.0]))]
        ),
        lambda f: f.p("ma.nii.gz"),
        "affine",
    ),
    (
        "recon-empty-mask",
        lambda f: _recon(f, masks=[f.mask, f.nii("me.nii.gz", np.zeros(SHAPE, np.uint8))]),
        lambda f: f.p("me.nii.gz"),
        "empty",
    ),
    (
        "recon-mask-with-nan",
        lambda f: _recon(f, masks=[f.mask, f.nii("mn.nii.gz", np.where(_vol() > 1.5, np.nan, 1.0).astype(np.float32))]),
        lambda f: f.p("mn.nii.gz"),
        "NaN",
    ),
    ("recon-masks-count", lambda f: _recon(f, masks=[f.mask]), "--stack-masks", "1 masks given for 2 stacks"),
    ("recon-same-stack-twice", lambda f: _recon(f, stacks=[f.stack, f.stack], masks=False), lambda f: f.stack, "twice"),
    # ---- reconstruct: outputs
    (
        "recon-output-missing-folder",
        lambda f: _recon(f, out=f.p("nofolder/out.nii.gz")),
        "--output-volume",
        "does not exist",
    ),
    ("recon-output-is-an-input", lambda f: _recon(f, out=f.mask2), "--output-volume", "input"),
    ("recon-output-is-a-directory", lambda f: _recon(f, out=str(f.d)), "--output-volume", "directory"),
    ("recon-output-not-nifti", lambda f: _recon(f, out=f.p("out.png")), "--output-volume", ".nii"),
    ("recon-model-equals-volume", lambda f: _recon(f, "--output-model", f.p("out.nii.gz")), "--output-model", "differ"),
    ("recon-log-is-an-input", lambda f: _recon(f, "--log", f.stack), "--log", "input"),
    ("recon-log-missing-folder", lambda f: _recon(f, "--log", f.p("nofolder/run.log")), "--log", "does not exist"),
    ("recon-log-is-the-config-json", lambda f: _recon(f, "--log", f.p("out.config.json")), "--log", "output"),
    # ---- reconstruct: image contents and headers
    (
        "recon-pixdim-1e6",
        lambda f: _recon(f, stacks=[f.stack, f.nii("big.nii.gz", _vol(), np.diag([1e6, 1e6, 3.0, 1.0]))], masks=False),
        lambda f: f.p("big.nii.gz"),
        "voxel size",
    ),
    (
        "recon-pixdim-1e-6",
        lambda f: _recon(
            f, stacks=[f.stack, f.nii("tiny.nii.gz", _vol(), np.diag([1e-6, 1e-6, 3.0, 1.0]))], masks=False
        ),
        lambda f: f.p("tiny.nii.gz"),
        "voxel size",
    ),
    (
        "recon-dims-32000",
        lambda f: _recon(f, stacks=[f.stack, f.raw_header("huge.nii", (32000, 32000, 4))], masks=False),
        lambda f: f.p("huge.nii"),
        "absurdly large",
    ),
    (
        "recon-header-larger-than-data",
        lambda f: _recon(f, stacks=[f.stack, f.raw_header("short.nii", (64, 64, 10))], masks=False),
        lambda f: f.p("short.nii"),
        "truncated",
    ),
    (
        "recon-slice-spacing-500",
        lambda f: _recon(
            f, stacks=[f.stack, f.nii("thick.nii.gz", _vol(), np.diag([1.0, 1.0, 500.0, 1.0]))], masks=False
        ),
        lambda f: f.p("thick.nii.gz"),
        "implausible",
    ),
    (
        "recon-rgb-stack",
        lambda f: _recon(
            f,
            stacks=[f.stack, f.nii("rgb.nii.gz", np.ones(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))],
            masks=False,
        ),
        lambda f: f.p("rgb.nii.gz"),
        "structured",
    ),
    (
        "recon-complex-stack",
        lambda f: _recon(f, stacks=[f.stack, f.nii("c.nii.gz", (_vol() + 1j).astype(np.complex64))], masks=False),
        lambda f: f.p("c.nii.gz"),
        "complex",
    ),
    (
        "recon-binary-datatype-stack",
        lambda f: _recon(f, stacks=[f.stack, _binary_dtype_file(f)], masks=False),
        lambda f: f.p("bool.nii"),
        None,
    ),
    (
        "recon-4d-two-volumes",
        lambda f: _recon(f, stacks=[f.stack, f.nii("4d.nii.gz", np.stack([_vol(), _vol()], -1))], masks=False),
        lambda f: f.p("4d.nii.gz"),
        "2 volumes",
    ),
    (
        "recon-inf-voxels",
        lambda f: _recon(
            f,
            stacks=[f.stack, f.nii("inf.nii.gz", np.where(_vol() > 1.9, np.inf, 1.0).astype(np.float32))],
            masks=False,
        ),
        lambda f: f.p("inf.nii.gz"),
        "NaN or Inf",
    ),
    (
        "recon-all-zero-stack",
        lambda f: _recon(f, stacks=[f.stack, f.nii("z.nii.gz", np.zeros(SHAPE, np.float32))], masks=False),
        lambda f: f.p("z.nii.gz"),
        "all zeros",
    ),
    (
        "recon-one-slice-alone",
        lambda f: _recon(f, stacks=[f.nii("one.nii.gz", _vol((12, 12, 1)))], masks=False),
        lambda f: f.p("one.nii.gz"),
        "one slice",
    ),
    (
        "recon-non-nifti-file",
        lambda f: _recon(f, stacks=[f.stack, f.text("notes.txt")], masks=False),
        lambda f: f.p("notes.txt"),
        "not a NIfTI",
    ),
    (
        "recon-truncated-gz",
        lambda f: _recon(f, stacks=[f.stack, _truncated_gz(f)], masks=False),
        lambda f: f.p("trunc.nii.gz"),
        "truncated",
    ),
    (
        "recon-directory-as-stack",
        lambda f: _recon(f, stacks=[f.stack, str(f.d)], masks=False),
        lambda f: str(f.d),
        "directory",
    ),
    (
        "recon-empty-file",
        lambda f: _recon(f, stacks=[f.stack, f.text("empty.nii.gz", "")], masks=False),
        lambda f: f.p("empty.nii.gz"),
        "empty",
    ),
    # ---- reconstruct: options
    (
        "recon-thicknesses-count",
        lambda f: _recon(f, "--thicknesses", "3", "3", "3"),
        "--thicknesses",
        "3 thicknesses given for 2 stacks",
    ),
    ("recon-thickness-500", lambda f: _recon(f, "--thicknesses", "500"), "--thicknesses", "implausible"),
    ("recon-thickness-nan", lambda f: _recon(f, "--thicknesses", "nan"), "--thicknesses", "finite"),
    ("recon-thickness-inf", lambda f: _recon(f, "--thicknesses", "3", "inf"), "--thicknesses", "finite"),
    ("recon-thickness-negative", lambda f: _recon(f, "--thicknesses", "-2"), "--thicknesses", "positive"),
    (
        "recon-sidecar-thickness-500",
        lambda f: _recon(f, stacks=[_sidecar(f, f.stack, {"SliceThickness": 500}), f.stack2]),
        lambda f: f.p("s1.json"),
        "implausible",
    ),
    ("recon-resolution-zero", lambda f: _recon(f, "--output-resolution", "0"), "--output-resolution", "> 0"),
    ("recon-resolution-negative", lambda f: _recon(f, "--output-resolution", "-1"), "--output-resolution", "> 0"),
    ("recon-resolution-nan", lambda f: _recon(f, "--output-resolution", "nan"), "--output-resolution", "finite"),
    ("recon-resolution-inf", lambda f: _recon(f, "--output-resolution", "inf"), "--output-resolution", "finite"),
    (
        "recon-resolution-0.001",
        lambda f: _recon(f, "--output-resolution", "0.001"),
        "--output-resolution",
        "absurdly fine",
    ),
    ("recon-threads-0", lambda f: _recon(f, "--threads", "0"), "--threads", "> 0"),
    ("recon-time-budget-negative", lambda f: _recon(f, "--time-budget", "-5"), "--time-budget", "> 0"),
    ("recon-max-memory-zero", lambda f: _recon(f, "--max-memory", "0"), "--max-memory", "> 0"),
    (
        "recon-config-unknown-key",
        lambda f: _recon(f, "--config", f.config({"iterations": [0, 2], "learning_rate": 1})),
        lambda f: f.p("cfg.json"),
        "unknown setting 'learning_rate'",
    ),
    (
        "recon-config-wrong-type",
        lambda f: _recon(f, "--config", f.config({"cg_iterations": "many"})),
        lambda f: f.p("cfg.json"),
        "wrong type",
    ),
    (
        "recon-config-invalid-json",
        lambda f: _recon(f, "--config", f.config("{'iterations': [0, 2],}")),
        lambda f: f.p("cfg.json"),
        "not valid JSON",
    ),
    (
        "recon-config-missing",
        lambda f: _recon(f, "--config", f.p("nocfg.json")),
        lambda f: f.p("nocfg.json"),
        "not found",
    ),
    (
        "recon-config-not-a-mapping",
        lambda f: _recon(f, "--config", f.config([1, 2, 3])),
        lambda f: f.p("cfg.json"),
        "mapping",
    ),
    (
        "recon-config-bad-value",
        lambda f: _recon(f, "--config", f.config({"iterations": [0, -3]})),
        lambda f: f.p("cfg.json"),
        "iterations",
    ),
    # ---- sample-volume
    (
        "sample-model-is-a-nifti",
        lambda f: ["sample-volume", "--input-model", f.stack, "--output-volume", f.p("o.nii.gz")],
        lambda f: f.stack,
        "model",
    ),
    (
        "sample-model-truncated",
        lambda f: [
            "sample-volume",
            "--input-model",
            _model_like(f, "m.pt", truncate=True),
            "--output-volume",
            f.p("o.nii.gz"),
        ],
        lambda f: f.p("m.pt"),
        "model",
    ),
    (
        "sample-model-other-pickle",
        lambda f: [
            "sample-volume",
            "--input-model",
            _model_like(f, "m.pt", obj={"weights": [1, 2]}),
            "--output-volume",
            f.p("o.nii.gz"),
        ],
        lambda f: f.p("m.pt"),
        "not an mgaussian model",
    ),
    (
        "sample-model-incomplete",
        lambda f: ["sample-volume", "--input-model", _model_like(f, "m.pt"), "--output-volume", f.p("o.nii.gz")],
        lambda f: f.p("m.pt"),
        "model",
    ),
    (
        "sample-model-missing",
        lambda f: ["sample-volume", "--input-model", f.p("none.pt"), "--output-volume", f.p("o.nii.gz")],
        lambda f: f.p("none.pt"),
        "not found",
    ),
    (
        "sample-output-is-a-directory",
        lambda f: ["sample-volume", "--input-model", _model_like(f, "m.pt"), "--output-volume", str(f.d)],
        "--output-volume",
        "directory",
    ),
    (
        "sample-log-is-the-model",
        lambda f: [
            "sample-volume",
            "--input-model",
            _model_like(f, "m.pt"),
            "--output-volume",
            f.p("o.nii.gz"),
            "--log",
            f.p("m.pt"),
        ],
        "--log",
        "input",
    ),
    (
        "sample-resolution-zero",
        lambda f: [
            "sample-volume",
            "--input-model",
            _model_like(f, "m.pt"),
            "--output-volume",
            f.p("o.nii.gz"),
            "--output-resolution",
            "0",
        ],
        "--output-resolution",
        "> 0",
    ),
    # ---- simulate
    (
        "simulate-orientation-two-angles",
        lambda f: ["simulate", f.stack, "--output-dir", f.p("sim"), "--orientations", "axial@10,20"],
        "--orientations",
        "three numbers",
    ),
    (
        "simulate-orientation-not-numbers",
        lambda f: ["simulate", f.stack, "--output-dir", f.p("sim"), "--orientations", "coronal@a,b,c"],
        "--orientations",
        "angles",
    ),
    (
        "simulate-orientation-nan",
        lambda f: ["simulate", f.stack, "--output-dir", f.p("sim"), "--orientations", "axial@nan,0,0"],
        "--orientations",
        None,
    ),
    (
        "simulate-mask-other-grid",
        lambda f: [
            "simulate",
            f.stack,
            "--mask",
            f.nii("mg.nii.gz", np.ones((12, 10, 8), np.uint8)),
            "--output-dir",
            f.p("sim"),
        ],
        lambda f: f.p("mg.nii.gz"),
        "grid",
    ),
    (
        "simulate-output-parent-missing",
        lambda f: ["simulate", f.stack, "--output-dir", f.p("a/b/sim")],
        "--output-dir",
        "does not exist",
    ),
    (
        "simulate-pixel-absurd",
        lambda f: ["simulate", f.stack, "--output-dir", f.p("sim"), "--pixel", "1e-6"],
        "--pixel",
        None,
    ),
    (
        "simulate-thickness-500",
        lambda f: ["simulate", f.stack, "--output-dir", f.p("sim"), "--thickness", "500"],
        "--thickness",
        "implausible",
    ),
    (
        "simulate-gt-4d",
        lambda f: ["simulate", f.nii("4d.nii.gz", np.stack([_vol(), _vol()], -1)), "--output-dir", f.p("sim")],
        lambda f: f.p("4d.nii.gz"),
        "volumes",
    ),
    # ---- evaluate
    (
        "evaluate-reference-mask-other-grid",
        lambda f: [
            "evaluate",
            f.stack,
            "--reference",
            f.stack2,
            "--mask",
            f.nii("mg.nii.gz", np.ones((12, 12, 9), np.uint8)),
        ],
        lambda f: f.p("mg.nii.gz"),
        "grid",
    ),
    (
        "evaluate-mask-empty",
        lambda f: [
            "evaluate",
            f.stack,
            "--reference",
            f.stack2,
            "--mask",
            f.nii("me.nii.gz", np.zeros(SHAPE, np.uint8)),
        ],
        lambda f: f.p("me.nii.gz"),
        "empty",
    ),
    (
        "evaluate-recon-is-a-directory",
        lambda f: ["evaluate", str(f.d), "--reference", f.stack2, "--mask", f.mask],
        lambda f: str(f.d),
        "directory",
    ),
    (
        "evaluate-labels-other-grid",
        lambda f: [
            "evaluate",
            f.stack,
            "--reference",
            f.stack2,
            "--mask",
            f.mask,
            "--labels",
            f.nii("lab.nii.gz", np.ones((10, 12, 8), np.uint8)),
        ],
        lambda f: f.p("lab.nii.gz"),
        "grid",
    ),
    (
        "evaluate-heldout-4d",
        lambda f: [
            "evaluate",
            f.stack,
            "--heldout-stack",
            f.nii("4d.nii.gz", np.stack([_vol(), _vol()], -1)),
            "--stack-mask",
            f.mask,
        ],
        lambda f: f.p("4d.nii.gz"),
        "volumes",
    ),
    (
        "evaluate-heldout-without-mask",
        lambda f: ["evaluate", f.stack, "--heldout-stack", f.stack2],
        "--stack-mask",
        "missing",
    ),
    # ---- naive-average
    (
        "naive-reference-grid-missing",
        lambda f: [
            "naive-average",
            "--input-stacks",
            f.stack,
            "--reference-grid",
            f.p("none.nii.gz"),
            "--output-volume",
            f.p("o.nii.gz"),
        ],
        lambda f: f.p("none.nii.gz"),
        "not found",
    ),
    (
        "naive-reference-grid-truncated",
        lambda f: [
            "naive-average",
            "--input-stacks",
            f.stack,
            "--reference-grid",
            _truncated_gz(f),
            "--output-volume",
            f.p("o.nii.gz"),
        ],
        lambda f: f.p("trunc.nii.gz"),
        "truncated",
    ),
    (
        "naive-stacks-outside-reference-grid",
        lambda f: [
            "naive-average",
            "--input-stacks",
            _shifted(f, "far.nii.gz"),
            "--reference-grid",
            f.stack,
            "--output-volume",
            f.p("o.nii.gz"),
        ],
        "--reference-grid",
        "no stack overlaps",
    ),
    (
        "naive-output-is-reference",
        lambda f: [
            "naive-average",
            "--input-stacks",
            f.stack,
            "--reference-grid",
            f.stack2,
            "--output-volume",
            f.stack2,
        ],
        "--output-volume",
        "input",
    ),
    # ---- inspect
    (
        "inspect-stacks-do-not-overlap",
        lambda f: ["inspect", "--input-stacks", f.stack, _shifted(f, "far.nii.gz")],
        lambda f: f.p("far.nii.gz"),
        "does not overlap",
    ),
    (
        "inspect-sidecar-invalid-json",
        lambda f: ["inspect", "--input-stacks", f.stack, _sidecar_text(f, f.stack2, "{SliceThickness: 3")],
        lambda f: f.p("s2.json"),
        "not valid JSON",
    ),
    (
        "inspect-one-slice-alone",
        lambda f: ["inspect", "--input-stacks", f.nii("one.nii.gz", _vol((12, 12, 1)))],
        lambda f: f.p("one.nii.gz"),
        "one slice",
    ),
    (
        "inspect-mask-outside-signal",
        lambda f: ["inspect", "--input-stacks", _half_signal(f), "--stack-masks", _half_mask(f)],
        lambda f: f.p("mh.nii.gz"),
        "outside the anatomy",
    ),
    # ---- demo
    ("demo-output-dir-is-a-file", lambda f: ["demo", "--output-dir", f.stack], "--output-dir", "not a folder"),
    (
        "demo-output-parent-missing",
        lambda f: ["demo", "--output-dir", f.p("a/b/demo")],
        "--output-dir",
        "does not exist",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(case, tmp_path, capsys):
    _, argv, where, msg = case
    d = tmp_path / "case"
    d.mkdir()
    f = Files(d)
    args = argv(f)
    w = where(f) if callable(where) else where
    _run_bad(capsys, d, args, w, msg)


def test_at_least_thirty_cases():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


@pytest.fixture
def not_root():
    if os.geteuid() == 0:
        pytest.skip("root reads and writes regardless of permissions")


def test_unreadable_stack(tmp_path, capsys, not_root):
    f = Files(tmp_path)
    p = f.stack
    os.chmod(p, 0)
    try:
        _run_bad(capsys, tmp_path, _recon(f, stacks=[p, f.stack2], masks=False), p, "not readable")
    finally:
        os.chmod(p, 0o644)


def test_non_writable_output_folder(tmp_path, capsys, not_root):
    f = Files(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    args = _recon(f, out=str(ro / "out.nii.gz"))
    os.chmod(ro, 0o555)
    try:
        _run_bad(capsys, tmp_path, args, "--output-volume", "not writable")
    finally:
        os.chmod(ro, 0o755)


# ----------------------------------------------------------------------------- warnings


def _run_ok(capsys, argv):
    rc = main([str(x) for x in argv])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    assert "Traceback" not in cap.err
    return [ln for ln in cap.err.splitlines() if ln]


def test_warning_mask_values_other_than_0_1(tmp_path, capsys):
    f = Files(tmp_path)
    m = np.zeros(SHAPE, np.uint8)
    m[2:10, 2:10] = 255
    err = _run_ok(capsys, ["inspect", "--input-stacks", f.stack, "--stack-masks", f.nii("m255.nii.gz", m)])
    assert any(ln.startswith("warning: ") and "m255" in ln and "other than 0 and 1" in ln for ln in err), err


def test_warning_one_slice_stack_beside_others(tmp_path, capsys):
    f = Files(tmp_path)
    err = _run_ok(capsys, ["inspect", "--input-stacks", f.stack, f.nii("one.nii.gz", _vol((12, 12, 1)))])
    assert any(ln.startswith("warning: ") and "one.nii.gz" in ln and "one slice" in ln for ln in err), err


def test_very_different_intensity_ranges_are_not_an_error(tmp_path, capsys):
    f = Files(tmp_path)
    loud = f.nii("loud.nii.gz", _vol(seed=3) * 1e4)
    err = _run_ok(capsys, ["inspect", "--input-stacks", f.stack, loud])
    assert not any(ln.startswith("error") for ln in err)


def test_warning_stack_that_looks_like_a_mask(tmp_path, capsys):
    f = Files(tmp_path)
    b = f.nii("bin.nii.gz", (_vol() > 1.5).astype(np.uint8))
    err = _run_ok(capsys, ["inspect", "--input-stacks", f.stack, b])
    assert any(ln.startswith("warning: ") and "bin.nii.gz" in ln and "mask" in ln for ln in err), err


def test_warnings_are_held_back_when_an_error_follows(tmp_path, capsys):
    """A warning (mask values) and then an error (thickness count): only the error line."""
    f = Files(tmp_path)
    m = np.full(SHAPE, 2, np.uint8)
    _run_bad(
        capsys,
        tmp_path,
        [
            "inspect",
            "--input-stacks",
            f.stack,
            f.stack2,
            "--stack-masks",
            f.nii("m2v.nii.gz", m),
            f.mask2,
            "--thicknesses",
            "3",
            "3",
            "3",
        ],
        "--thicknesses",
    )


def test_warning_only_one_stack(small_case, tmp_path, capsys):
    """One stack is usable (a tiny fit runs) but gets a warning."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"iterations": [0, 1], "cg_iterations": 1, "spacing_factors": [2.0, 2.0]}))
    out = tmp_path / "one.nii.gz"
    err = _run_ok(
        capsys,
        [
            "reconstruct",
            "--input-stacks",
            small_case["stacks"][0],
            "--stack-masks",
            small_case["masks"][0],
            "--output-volume",
            out,
            "--config",
            cfg,
            "--output-resolution",
            "3",
            "--quiet",
        ],
    )
    assert any(ln.startswith("warning: ") and "only one stack" in ln for ln in err), err
    assert out.exists()
