"""The ``mgaussian`` command line.

Every problem with what the user gave ends in one line ``error: <file or option>: <what>`` on
stderr and exit code 2, with no traceback and nothing written. Heavy imports live inside the
commands so ``mgaussian --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from . import __version__
from .errors import InputError

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line as one ``error:`` line, exit 2."""

    def error(self, message):  # noqa: D401
        m = re.match(r"argument ([^:]+): (.*)", message)
        if m:
            raise InputError(m.group(1).split("/")[-1], m.group(2))
        raise InputError(self.prog, message)


def _num(name, *, positive=False, nonneg=False, integer=False):
    def conv(s):
        try:
            v = int(s) if integer else float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
        if not integer and not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
        if positive and v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
        if nonneg and v < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
        return v

    conv.__name__ = name
    return conv


def _add_simulate(sub):
    p = sub.add_parser(
        "simulate",
        help="simulate thick-slice stacks from a ground-truth volume",
        description="Simulate thick-slice stacks (with motion and noise) from a ground-truth volume, as BENCHMARK.md defines them.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("ground_truth", metavar="GT", help="ground-truth volume (.nii/.nii.gz)")
    p.add_argument("--output-dir", required=True, help="folder for stack_XX.nii.gz, mask_XX.nii.gz, truth.json")
    p.add_argument("--mask", help="brain mask of GT (default: GT > 0)")
    p.add_argument("--thickness", type=_num("--thickness", positive=True), default=3.0, help="slice thickness (mm)")
    p.add_argument("--gap", type=_num("--gap", nonneg=True), default=0.0, help="gap between slices (mm)")
    p.add_argument(
        "--pixel",
        type=_num("--pixel", positive=True),
        default=None,
        help="in-plane pixel size (mm); default: GT's finest spacing",
    )
    p.add_argument(
        "--orientations",
        nargs="+",
        default=["axial", "coronal", "sagittal"],
        help="one stack each: axial|coronal|sagittal, NAME@RX,RY,RZ (oblique, degrees) or RX,RY,RZ",
    )
    p.add_argument("--profile", choices=["gaussian", "box"], default="gaussian", help="through-plane slice profile")
    p.add_argument(
        "--motion-rotation",
        type=_num("--motion-rotation", nonneg=True),
        default=0.0,
        help="max per-slice rotation (degrees)",
    )
    p.add_argument(
        "--motion-translation",
        type=_num("--motion-translation", nonneg=True),
        default=0.0,
        help="max per-slice translation per axis (mm)",
    )
    p.add_argument(
        "--noise",
        type=_num("--noise", nonneg=True),
        default=0.0,
        help="Rician sigma as a fraction of GT's 99th percentile in the mask",
    )
    p.add_argument("--seed", type=_num("--seed", nonneg=True, integer=True), default=0)
    t = p.add_argument_group("motion over acquisition time (see mgaussian.simulate)")
    t.add_argument(
        "--slice-order",
        choices=["interleaved", "sequential"],
        default="interleaved",
        help="acquisition order of each stack's slices (interleaved: Siemens convention, see mgaussian.slice_order)",
    )
    t.add_argument(
        "--packages",
        type=_num("--packages", positive=True, integer=True),
        default=1,
        help="packages per stack: slice k in package k mod N, packages acquired one after the other",
    )
    t.add_argument(
        "--motion-drift",
        metavar="DEG,MM",
        type=_pair("--motion-drift"),
        default=(0.0, 0.0),
        help="smooth drift over each stack's acquisition: rotation about a random axis and translation "
        "growing to DEG / MM",
    )
    t.add_argument(
        "--motion-jumps",
        type=_num("--motion-jumps", nonneg=True, integer=True),
        default=0,
        help="N sudden moves at random acquisition times, each up to --motion-rotation / "
        "--motion-translation, persisting (replaces the per-slice motion)",
    )
    t.add_argument(
        "--stack-motion",
        metavar="DEG,MM",
        type=_pair("--stack-motion"),
        default=(0.0, 0.0),
        help="rigid motion of each whole stack: DEG about a random axis and MM in a random direction",
    )
    t.add_argument(
        "--bias-field",
        metavar="B",
        type=_num("--bias-field", nonneg=True),
        default=0.0,
        help="multiply each stack by its own smooth random field reaching 1 + B inside its mask "
        "(a coil's bias; 0.15 = up to 15 %%)",
    )
    t.add_argument(
        "--bias-shared",
        metavar="S",
        type=_num("--bias-shared", nonneg=True),
        default=0.0,
        help="the part of each stack's field (log) that is one field of the scanner for the whole "
        "session: 0 = each stack its own (default), 1 = every stack the same",
    )
    p.set_defaults(func=cmd_simulate)


def _pair(name):
    def conv(s):
        parts = s.split(",")
        try:
            v = tuple(float(x) for x in parts)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected DEG,MM (two numbers), got {s!r}") from None
        if len(v) != 2 or not all(math.isfinite(x) and x >= 0 for x in v):
            raise argparse.ArgumentTypeError(f"expected DEG,MM (two numbers >= 0), got {s!r}")
        if v[0] > 180:
            raise argparse.ArgumentTypeError(f"a rotation of {v[0]:g} degrees is more than a half turn")
        return v

    conv.__name__ = name
    return conv


def _add_evaluate(sub):
    p = sub.add_parser(
        "evaluate",
        help="score a reconstruction (against a ground truth, or by a held-out stack)",
        description=(
            "Score RECON against --reference GT inside --mask (PSNR, SSIM, NCC, NRMSE; Dice with --labels), "
            "or by leave-one-stack-out against --heldout-stack S inside --stack-mask."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("recon", metavar="RECON", help="reconstructed volume")
    p.add_argument("--reference", help="ground-truth volume")
    p.add_argument("--mask", help="ground-truth brain mask")
    p.add_argument("--labels", help="ground-truth label map for Dice (see mgaussian.metrics)")
    p.add_argument("--heldout-stack", help="a stack the reconstruction did not use")
    p.add_argument("--stack-mask", help="mask of the held-out stack")
    p.add_argument(
        "--thickness",
        type=_num("--thickness", positive=True),
        help="slice thickness of the held-out stack (mm); default: sidecar, else spacing",
    )
    p.add_argument(
        "--profile",
        choices=["gaussian", "box"],
        default="gaussian",
        help="slice profile used to predict the held-out stack",
    )
    p.add_argument("--no-align", action="store_true", help="held-out: skip the rigid alignment")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_evaluate)


def _add_naive(sub):
    p = sub.add_parser(
        "naive-average",
        help="baseline: stacks resampled trilinearly onto a grid and averaged",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-stacks", nargs="+", required=True)
    p.add_argument("--reference-grid", required=True, help="volume whose grid the output takes")
    p.add_argument("--output-volume", required=True)
    p.set_defaults(func=cmd_naive)


def _add_reconstruct(sub):
    p = sub.add_parser(
        "reconstruct",
        help="reconstruct a 3D volume from stacks of thick slices",
        description="Reconstruct an isotropic volume from stacks of thick 2D slices with magnetic 3D Gaussians (M-Gaussian).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("inputs and outputs")
    g.add_argument(
        "--input-stacks", nargs="+", required=True, help="stacks (.nii/.nii.gz); slices along the third voxel axis"
    )
    g.add_argument(
        "--stack-masks",
        nargs="+",
        help="one brain mask per stack; default: an automatic mask (the stacks' common field of view, Otsu, largest component)",
    )
    g.add_argument(
        "--no-auto-mask",
        action="store_true",
        help="without --stack-masks, use every voxel of every stack instead of the automatic mask",
    )
    g.add_argument(
        "--bias-correction",
        action="store_true",
        help="N4 bias-field correction of every stack inside its mask (SimpleITK)",
    )
    g.add_argument(
        "--no-stack-bias",
        action="store_true",
        help="keep each stack's intensities as they are (default: its smooth field relative to the other "
        "stacks, fitted after the coarse level, is divided out; docs/clinical.md)",
    )
    g.add_argument(
        "--no-shared-field",
        action="store_true",
        help="keep the field the stacks share in the volume (default: where the stacks' fields differ by "
        "more than 5 %%, or N4's field on the volume spans more than 9 %%, that very smooth field is "
        "divided out; docs/clinical.md)",
    )
    g.add_argument(
        "--thicknesses",
        nargs="+",
        type=_num("--thicknesses"),
        help="slice thickness (mm): one for all stacks or one per stack; default: JSON sidecar, else slice spacing",
    )
    g.add_argument(
        "--slice-order",
        metavar="interleaved|sequential|FILE",
        help="acquisition order of the slices: interleaved, sequential or a FILE of orders per stack; "
        "default: the JSON sidecar (SliceTiming, MultibandAccelerationFactor), else interleaved "
        "(Siemens; see mgaussian.slice_order)",
    )
    g.add_argument("--output-volume", required=True, help="reconstructed volume (.nii/.nii.gz)")
    g.add_argument(
        "--output-resolution",
        type=_num("--output-resolution", positive=True),
        help="the reconstruction's resolution (mm): its Gaussians' finest spacing; default: finest in-plane "
        "spacing of the inputs. The volume is written --output-oversampling times finer",
    )
    g.add_argument(
        "--output-oversampling",
        type=int,
        choices=(1, 2, 3, 4),
        help="write the volume on a grid this many times finer than --output-resolution, nested in it, so "
        "that linear interpolation by viewers and registrations does not blur the continuous model "
        "(default: 2, or the --config file's; 1: voxels of --output-resolution)",
    )
    g.add_argument("--output-model", help="save the trained model (for sample-volume / sample-slices)")
    g.add_argument(
        "--output-confidence",
        metavar="C.nii.gz",
        help="also write a confidence map in [0, 1] on the output volume's grid: how well the data determine "
        "each voxel (the intensities' approximate posterior sd; see docs/clinical.md). With --template "
        "also C_native.nii.gz on the native volume's grid",
    )
    g.add_argument(
        "--output-report",
        metavar="DIR",
        help="folder for the HTML report (index.html and PNGs); default: <output stem>_report beside the volume",
    )
    g.add_argument("--no-report", action="store_true", help="write no report")
    g.add_argument("--config", help="JSON (or TOML) file of settings (see mgaussian.recon.config.ReconConfig)")
    g.add_argument(
        "--log",
        metavar="FILE",
        help="write a log of the run (version, command, configuration, progress, timings, outputs)",
    )
    g.add_argument(
        "--slice-profile",
        choices=["gaussian", "box"],
        default=None,
        help="through-plane slice profile the model assumes: gaussian (FWHM = thickness) or box "
        "(modelled as a Gaussian of FWHM 0.8 x thickness, measured best on box-profile data)",
    )
    _add_reconstruct_method_options(p)
    p.set_defaults(func=cmd_reconstruct)


def _add_reconstruct_method_options(p) -> None:
    """reconstruct's compute, atlas, motion, assessment and ablation options."""
    c = p.add_argument_group("compute")
    c.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=None,
        help="where to fit (default: auto, or the --config file's)",
    )
    c.add_argument(
        "--backend",
        choices=["auto", "reference", "cpu", "gpu"],
        default=None,
        help="renderer backend (default: auto, or the --config file's)",
    )
    c.add_argument(
        "--threads", type=_num("--threads", positive=True, integer=True), help="CPU threads (default: all cores)"
    )
    c.add_argument(
        "--seed",
        type=_num("--seed", nonneg=True, integer=True),
        default=None,
        help="random seed of the batches' order (default: 0, or the --config file's)",
    )
    c.add_argument(
        "--time-budget",
        type=_num("--time-budget", positive=True),
        help="stop fitting after this many seconds (default: none; the fixed schedule ends the fit, so "
        "the same inputs give the same volume; with a budget the result depends on the machine's "
        "speed and load, and the log and report say when it cut the fit short)",
    )
    c.add_argument(
        "--max-memory",
        metavar="GB",
        type=_num("--max-memory", positive=True),
        default=8.0,
        help="refuse a run whose estimated peak memory is above this (GB); see benchmarks/MEMORY.md",
    )
    c.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    c.add_argument(
        "--checkpoint-dir",
        help="write checkpoints of the fit here (created if missing; every "
        "checkpoint_interval_s = 30 s, after each level's warm start and at the end)",
    )
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoint in --checkpoint-dir "
        "(same inputs and settings; threads, device, backend and --time-budget may change)",
    )
    t = p.add_argument_group("atlas space (see mgaussian.atlas and docs/clinical.md)")
    _template_options(t)
    a = p.add_argument_group("ablations of the seed's components")
    m = p.add_argument_group("motion correction")
    m.add_argument("--no-motion", action="store_true", help="keep every slice at its stack's registered pose")
    m.add_argument("--no-registration", action="store_true", help="skip the rigid stack-to-stack registration")
    m.add_argument("--no-robust", action="store_true", help="no outlier weights (every slice and pixel counts fully)")
    q = p.add_argument_group("stack assessment (see mgaussian.assess and docs/clinical.md)")
    q.add_argument(
        "--reference-stack",
        metavar="N",
        type=_num("--reference-stack", nonneg=True, integer=True),
        help="index (from 0) of the stack the others are registered to and whose lattice the output "
        "takes; default: the best-assessed stack (the first of equals)",
    )
    q.add_argument(
        "--stack-exclude",
        choices=["off", "auto"],
        default="off",
        help="auto: drop stacks scoring below half the median assessment score (3 or more stacks; "
        "at least 2 kept; never the --reference-stack)",
    )
    a.add_argument("--no-ssim", action="store_true", help="drop the SSIM loss")
    a.add_argument("--no-growth", action="store_true", help="train the finest Gaussian grid only")
    a.add_argument(
        "--nrf", action="store_true", help="train the neural residual field (off by default, see benchmarks/TUNING.md)"
    )
    a.add_argument("--no-nrf", action="store_true", help="drop the neural residual field")
    a.add_argument("--no-anisotropy", action="store_true", help="drop the anisotropy penalty")
    a.add_argument("--no-psf", action="store_true", help="point evaluation instead of the slice PSF")
    a.add_argument("--renderer", choices=["slices", "points"], help="slice tile renderer or the seed's block query")
    a.add_argument(
        "--block-radius",
        type=_num("--block-radius", positive=True, integer=True),
        help="block radius of the points renderer (implies --renderer points)",
    )


def _add_sample_volume(sub):
    p = sub.add_parser(
        "sample-volume",
        help="sample a volume from a saved model at any resolution",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-model", required=True)
    p.add_argument("--output-volume", required=True)
    p.add_argument(
        "--output-resolution",
        type=_num("--output-resolution", positive=True),
        help="voxel size (mm); default: the model's",
    )
    p.add_argument("--backend", choices=["auto", "reference", "cpu", "gpu"], default="auto")
    p.add_argument("--log", metavar="FILE", help="write a log of the run (version, command, timings, output)")
    p.set_defaults(func=cmd_sample_volume)


def _add_sample_slices(sub):
    p = sub.add_parser(
        "sample-slices",
        help="simulate the input stacks from a saved model (each slice at its fitted pose)",
        description=(
            "Render every slice of every input stack from a saved model through the slice profile the fit used, "
            "each slice moved by its fitted pose; writes DIR/<stack>_simulated.nii.gz on each stack's grid and "
            "prints NCC and PSNR against each stack inside its mask."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-model", required=True, help="model saved by reconstruct --output-model")
    p.add_argument(
        "--input-stacks", nargs="+", required=True, help="the stacks the model was fitted to, in the same order"
    )
    p.add_argument("--stack-masks", nargs="+", help="one mask per stack (for the scores; default: whole stack)")
    p.add_argument(
        "--thicknesses", nargs="+", type=_num("--thicknesses"), help="slice thickness (mm) as given to reconstruct"
    )
    p.add_argument("--output-dir", required=True, help="folder for <stack>_simulated.nii.gz (created if missing)")
    p.add_argument("--backend", choices=["auto", "reference", "cpu", "gpu"], default="auto")
    p.set_defaults(func=cmd_sample_slices)


def _add_inspect(sub):
    p = sub.add_parser(
        "inspect",
        help="check input stacks and print their geometry, thickness and masks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-stacks", nargs="+", required=True)
    p.add_argument("--stack-masks", nargs="+")
    p.add_argument(
        "--thicknesses", nargs="+", type=_num("--thicknesses"), help="one value for all stacks, or one per stack (mm)"
    )
    p.add_argument(
        "--slice-order",
        metavar="interleaved|sequential|FILE",
        help="acquisition order of the slices: interleaved, sequential or a FILE of orders per stack; "
        "default: the JSON sidecar (SliceTiming, MultibandAccelerationFactor), else interleaved "
        "(Siemens; see mgaussian.slice_order)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.set_defaults(func=cmd_inspect)


def _template_options(g, required: bool = False) -> None:
    g.add_argument(
        "--template",
        required=required,
        metavar="T",
        help="register the volume to this template and write it on the template's grid: a NIfTI file, "
        "a shipped fetal template (fetal-ga21, fetal-ga23, fetal-ga25, fetal-ga27, fetal-ga33) or "
        "fetal-auto (the best-matching shipped one)",
    )
    g.add_argument(
        "--template-transform",
        choices=["rigid", "affine"],
        default="rigid",
        help="rigid (same subject / same size), or affine after rigid (another age or size)",
    )
    g.add_argument(
        "--template-mask",
        metavar="M",
        help="brain mask of the template (the metric's region); shipped templates bring theirs",
    )


def _add_to_template(sub):
    p = sub.add_parser(
        "to-template",
        help="register a volume to a template and resample it onto the template's grid",
        description=(
            "Register VOLUME (rigidly, or affinely after rigid) to a template and write it on the "
            "template's grid and orientation, with OUT.template.json (the 4x4 world map) and OUT.template.tfm "
            "(the same map for ITK/ANTs)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("volume", metavar="VOLUME", help="a reconstructed volume (.nii/.nii.gz)")
    _template_options(p, required=True)
    p.add_argument(
        "--metric",
        choices=["correlation", "mattes"],
        default="correlation",
        help="registration metric: correlation (same contrast) or Mattes mutual information",
    )
    p.add_argument(
        "--volume-mask",
        metavar="M",
        help="brain mask of VOLUME (its grid): the volume is registered faded to 0 outside it, as the "
        "template is (a rim of other tissue around the brain misleads the registration); the whole "
        "volume is written",
    )
    p.add_argument("--output-volume", required=True, help="the volume on the template's grid (.nii/.nii.gz)")
    p.set_defaults(func=cmd_to_template)


def _add_assess(sub):
    p = sub.add_parser(
        "assess",
        help="score each stack (motion within it, agreement with the others) and rank them",
        description=(
            "Score every stack in [0, 1] from the motion within it (neighbouring slices against slices "
            "two apart) and its agreement with the other stacks after rigid registration, and rank them "
            "(see mgaussian.assess)."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--input-stacks", nargs="+", required=True)
    p.add_argument(
        "--stack-masks", nargs="+", help="one brain mask per stack; default: the automatic mask of reconstruct"
    )
    p.add_argument(
        "--thicknesses", nargs="+", type=_num("--thicknesses"), help="one value for all stacks, or one per stack (mm)"
    )
    p.add_argument(
        "--slice-order",
        metavar="interleaved|sequential|FILE",
        help="acquisition order of the slices (default: sidecar, else interleaved; see mgaussian.slice_order)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_assess)


def _add_demo(sub):
    p = sub.add_parser(
        "demo",
        help="run the main job on the demo shipped inside the package",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--output-dir", default="mgaussian_demo", help="where the demo writes its files")
    p.set_defaults(func=cmd_demo)


def _add_bids(sub):
    from .cohort.command import add_parser  # argparse only: Dask is imported when the command runs

    add_parser(sub, _num)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mgaussian",
        description="Slice-to-volume MRI reconstruction with magnetic 3D Gaussians.",
    )
    parser.add_argument("--version", action="version", version=f"mgaussian {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_reconstruct(sub)
    _add_sample_volume(sub)
    _add_sample_slices(sub)
    _add_simulate(sub)
    _add_evaluate(sub)
    _add_naive(sub)
    _add_inspect(sub)
    _add_demo(sub)
    _add_to_template(sub)
    _add_assess(sub)
    _add_bids(sub)
    return parser


# ----------------------------------------------------------------------------- commands


def _prepare_output_dir(d: str, inputs=()) -> str:
    if os.path.exists(d) and not os.path.isdir(d):
        raise InputError("--output-dir", f"{d} exists and is not a folder")
    for q in inputs:
        if q and os.path.realpath(q) == os.path.realpath(d):
            raise InputError("--output-dir", f"{d} is an input")
    parent = os.path.dirname(os.path.abspath(d))
    if not os.path.isdir(parent):
        raise InputError("--output-dir", f"{d}: folder {parent} does not exist")
    return d


def cmd_simulate(a) -> int:
    import numpy as np

    from .io import load_image, load_mask
    from .simulate import parse_orientation, simulate_stacks

    gt, aff, _ = load_image(a.ground_truth, what="ground truth")
    mask = load_mask(a.mask, gt.shape, aff, os.path.basename(a.ground_truth)) if a.mask else None
    from .io import MAX_THICKNESS_MM
    from .simulate import stack_geometry

    if a.thickness > MAX_THICKNESS_MM:
        raise InputError("--thickness", f"implausible slice thickness {a.thickness:g} mm (> {MAX_THICKNESS_MM:g} mm)")
    if a.pixel is not None and a.pixel < 0.05:
        raise InputError("--pixel", f"{a.pixel:g} mm is absurdly fine (>= 0.05 mm)")
    if a.bias_shared > 1:
        raise InputError("--bias-shared", f"is a part of the field, 0 to 1; got {a.bias_shared:g}")
    for o in a.orientations:
        _, perm, ang = parse_orientation(o)
        pix = a.pixel or float(min(np.sqrt((aff[:3, :3] ** 2).sum(0))))
        _, shp = stack_geometry(gt.shape, aff, perm, ang, pix, a.thickness + a.gap)
        if float(np.prod(shp)) > 600**3:
            raise InputError("--pixel" if a.pixel else "--orientations", f"stack {o} would be absurdly large {shp}")
        if a.motion_jumps >= shp[2]:
            raise InputError(
                "--motion-jumps", f"{a.motion_jumps} jumps need more acquisition times than stack {o}'s {shp[2]} slices"
            )
    if a.motion_jumps and not (a.motion_rotation or a.motion_translation):
        raise InputError(
            "--motion-jumps", "needs --motion-rotation and/or --motion-translation (the size of each jump)"
        )
    _prepare_output_dir(a.output_dir, [a.ground_truth, a.mask])
    simulate_stacks(
        gt,
        aff,
        mask,
        a.output_dir,
        orientations=a.orientations,
        thickness=a.thickness,
        gap=a.gap,
        pixel=a.pixel,
        profile=a.profile,
        motion_rotation=a.motion_rotation,
        motion_translation=a.motion_translation,
        noise=a.noise,
        seed=a.seed,
        slice_order=a.slice_order,
        packages=a.packages,
        motion_drift=a.motion_drift,
        motion_jumps=a.motion_jumps,
        stack_motion=a.stack_motion,
        bias_field=a.bias_field,
        bias_shared=a.bias_shared,
        inputs=[a.ground_truth, a.mask],
        gt_path=os.path.abspath(a.ground_truth),
        mask_path=os.path.abspath(a.mask) if a.mask else None,
    )
    print(f"wrote {len(a.orientations)} stacks, masks, sidecars (stack_XX.json) and truth.json to {a.output_dir}")
    return 0


def _settings_listing(recon: str, stack: str) -> str | None:
    """The reconstruction's settings file (RECON.config.json, written beside it by ``reconstruct``)
    where it lists ``stack`` among its inputs, else None."""
    path = _stem(recon) + ".config.json"
    try:
        with open(path) as f:
            inputs = json.load(f).get("inputs") or []
        return path if any(_same_file(str(i.get("stack", "")), stack) for i in inputs) else None
    except (OSError, ValueError, AttributeError):
        return None


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def cmd_evaluate(a) -> int:
    from .geometry import slice_frames
    from .io import load_image, load_mask, resolve_thickness

    ref_mode = a.reference is not None or a.mask is not None or a.labels is not None
    held_mode = a.heldout_stack is not None or a.stack_mask is not None
    if ref_mode and held_mode:
        raise InputError("evaluate", "give either --reference/--mask or --heldout-stack/--stack-mask, not both")
    if not ref_mode and not held_mode:
        raise InputError("evaluate", "give --reference GT --mask M, or --heldout-stack S --stack-mask M")
    recon, raff, _ = load_image(a.recon, what="reconstruction")
    if ref_mode:
        if a.reference is None:
            raise InputError("--reference", "missing (needed with --mask/--labels)")
        if a.mask is None:
            raise InputError("--mask", "missing (needed with --reference)")
        from .metrics import score_volume

        gt, gaff, _ = load_image(a.reference, what="reference")
        m = load_mask(a.mask, gt.shape, gaff, os.path.basename(a.reference))
        labels = None
        if a.labels:
            lab, _, _ = load_image(a.labels, what="label map")
            if lab.shape != gt.shape:
                raise InputError(a.labels, f"label grid {lab.shape} differs from the reference's {gt.shape}")
            labels = lab.round().astype(int)
            if not (labels[m] > 0).any():
                raise InputError(a.labels, "no label > 0 inside the mask")
        res = score_volume(recon, raff, gt, gaff, m, labels)
    else:
        if a.heldout_stack is None:
            raise InputError("--heldout-stack", "missing (needed with --stack-mask)")
        if a.stack_mask is None:
            raise InputError("--stack-mask", "missing (needed with --heldout-stack)")
        from .heldout import heldout_score

        st, saff, _ = load_image(a.heldout_stack, what="stack")
        sm = load_mask(a.stack_mask, st.shape, saff, os.path.basename(a.heldout_stack))
        try:
            fr = slice_frames(saff, st.shape)
        except ValueError as exc:
            raise InputError(a.heldout_stack, str(exc)) from None
        th, _ = resolve_thickness(a.heldout_stack, a.thickness, fr.slice_spacing)
        settings = _settings_listing(a.recon, a.heldout_stack)
        if settings:
            from .errors import warn

            warn(a.heldout_stack, f"an input of this reconstruction ({settings}): the score is not a held-out one")
        res = heldout_score(recon, raff, st, saff, sm, th, a.profile, align=not a.no_align)
        res.pop("transform", None)
    if a.json:
        print(json.dumps(res))
    else:
        for k, v in res.items():
            if isinstance(v, dict):
                print(f"{k}: " + ", ".join(f"{kk}={vv:.4f}" for kk, vv in v.items()))
            else:
                print(f"{k}: {v:.4f}")
    return 0


def cmd_naive(a) -> int:
    from .baselines import naive_average
    from .io import check_output_path, load_image, save_nifti

    inputs = list(a.input_stacks) + [a.reference_grid]
    check_output_path(a.output_volume, inputs)
    stacks = []
    for p in a.input_stacks:
        d, aff, _ = load_image(p, what="stack")
        stacks.append((d, aff))
    ref, raff, _ = load_image(a.reference_grid, what="reference grid", allow_zero=True)
    out = naive_average(stacks, ref.shape, raff)
    if not out.any():
        raise InputError("--reference-grid", "no stack overlaps the reference grid (check the affines)")
    save_nifti(out, raff, a.output_volume, inputs=inputs)
    print(f"wrote {a.output_volume}")
    return 0


def _stem(path: str) -> str:
    for suf in (".nii.gz", ".nii"):
        if path.lower().endswith(suf):
            return path[: -len(suf)]
    return path


def _native_twin(path: str) -> str:
    """OUT.nii.gz -> OUT_native.nii.gz: where the native grid's twin of an atlas-space output goes."""
    stem = _stem(path)
    return stem + "_native" + path[len(stem) :]


_COMMAND_LINE: list[str] = list(sys.argv)  # set by main() to the arguments it parses


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(str(s))


class _RunLog:
    """The --log file: opened once the inputs are checked, one line per event, flushed as it goes."""

    def __init__(self, path: str | None):
        import time

        self.t0 = time.time()
        self.f = open(path, "w", encoding="utf-8") if path else None
        if self.f:
            from .errors import add_warning_sink

            add_warning_sink(self.line)

    def line(self, s: str) -> None:
        import time

        if self.f:
            for ln in str(s).splitlines() or [""]:
                self.f.write(f"[{time.time() - self.t0:8.1f} s] {ln}\n")
            self.f.flush()

    def header(self, cfg_dict=None) -> None:
        self.line(f"mgaussian {__version__}")
        self.line("command: " + " ".join(_shell_quote(x) for x in _COMMAND_LINE))
        if cfg_dict is not None:
            self.line("config: " + json.dumps(cfg_dict))

    def close(self) -> None:
        if self.f:
            from .errors import clear_warning_sinks

            clear_warning_sinks()
            self.f.close()
            self.f = None


def _check_log_path(a, inputs, outputs):
    from .io import check_output_path

    if not getattr(a, "log", None):
        return
    check_output_path(a.log, inputs, what="--log", nifti=False)
    for q in outputs:
        if q and os.path.realpath(q) == os.path.realpath(a.log):
            raise InputError("--log", f"{a.log} is also an output")


def _prepare_stacks(a, cfg, stacks, log) -> None:
    """Automatic masks (no --stack-masks) and N4 bias-field correction, in place."""
    import time

    import numpy as np

    from .errors import warn
    from .masking import auto_masks, n4_correct

    if not a.stack_masks:
        if cfg.auto_mask:
            for st, m in zip(stacks, auto_masks(stacks, log=log)):
                if m.sum() < 10 or not np.any(st.data[m]):
                    raise InputError(st.path, "the automatic mask found no anatomy in this stack; give --stack-masks")
                st.mask = m
        else:
            warn(
                "--stack-masks",
                "no masks given: every voxel of every stack is used (slow, and background is reconstructed too)",
            )
    if cfg.bias_correction:
        for st in stacks:
            t0 = time.time()
            st.data, field = n4_correct(st.data, st.affine, st.mask if not st.mask.all() else None)
            f = field[st.mask] if st.mask.any() else field
            log(
                f"stack {st.name}: N4 bias field {float(f.min()):.2f}-{float(f.max()):.2f} in the mask "
                f"({time.time() - t0:.1f} s)"
            )


def _check_reconstruct_inputs(a, cfg, stacks):
    """Up-front checks of the whole run (before any fitting): the stacks as a set, the output
    grid, the memory bound (the stacks themselves are checked by ``validate_stacks`` before
    their masks and intensities are prepared). Returns the config with the output resolution
    resolved."""
    from .recon.data import grow_masks, output_grid
    from .recon.memory import check_memory

    res = cfg.output_resolution or round(float(min(min(s.frames.spacing) for s in stacks)), 4)
    cfg = cfg.resolved(output_resolution=res)
    stacks = grow_masks(stacks, cfg.mask_rim_mm)  # the masks the fit will see
    output_grid(stacks, res)  # refuses an absurd grid
    factors = cfg.spacing_factors if cfg.growth else cfg.spacing_factors[-1:]
    check_memory(
        stacks,
        res,
        a.max_memory,
        spacing_factors=factors,
        dilate_mm=cfg.dilate_mm,
        batch_slices=cfg.batch_slices,
        output_oversampling=cfg.output_oversampling,
    )
    # the intensity fits' explicit maps stand in for the renderer's autograd plans, which the
    # estimate counts (mni-t4-motion at 1 mm: 5.2 GB measured with 3.1 GB of maps, 7.8 GB estimated)
    return cfg.resolved(design_memory_gb=min(cfg.design_memory_gb, 0.5 * a.max_memory))


def _reconstruct_checkpoint(a, cfg, stacks, inputs):
    """(Checkpointer or None, state to resume from or None) for --checkpoint-dir / --resume."""
    from .errors import warn
    from .recon.checkpoint import Checkpointer, inputs_fingerprint

    if not a.checkpoint_dir:
        return None, None
    d = a.checkpoint_dir
    ck = Checkpointer(d, cfg, inputs_fingerprint(stacks), interval_s=cfg.checkpoint_interval_s)
    ck.remove_partials()  # left by a save that was killed
    if a.resume:
        if not os.path.isdir(d) or not ck.exists():
            raise InputError("--resume", f"no checkpoint in {d} to resume from")
        return ck, ck.load()
    if ck.exists():
        warn("--checkpoint-dir", f"{d} holds a checkpoint: starting afresh and replacing it (--resume continues it)")
    os.makedirs(d, exist_ok=True)
    return ck, None


def _check_checkpoint_dir(a, outputs) -> None:
    if a.resume and not a.checkpoint_dir:
        raise InputError("--resume", "needs --checkpoint-dir")
    if not a.checkpoint_dir:
        return
    d = a.checkpoint_dir
    if os.path.exists(d) and not os.path.isdir(d):
        raise InputError("--checkpoint-dir", f"{d} exists and is not a folder")
    for q in outputs:
        if q and os.path.realpath(q) == os.path.realpath(d):
            raise InputError("--checkpoint-dir", f"{d} is also an input or output")


def _config_overrides(a) -> dict:
    """The settings the command line gives (they replace the --config file's)."""
    over = {k: v for k, v in (("device", a.device), ("backend", a.backend), ("seed", a.seed)) if v is not None}
    if a.output_resolution is not None:
        over["output_resolution"] = a.output_resolution
    if getattr(a, "output_oversampling", None) is not None:
        over["output_oversampling"] = a.output_oversampling
    if a.threads is not None:
        over["threads"] = a.threads
    if a.slice_profile is not None:
        over["through_plane_fwhm_factor"] = 1.0 if a.slice_profile == "gaussian" else 0.8
    if a.time_budget is not None:
        over["time_budget_s"] = a.time_budget
    if a.output_confidence:
        over["confidence"] = True
    # the --no-X switches: each turns one setting off
    for flag, key in (
        ("no_motion", "motion"),
        ("no_registration", "register_stacks"),
        ("no_robust", "robust"),
        ("no_ssim", "use_ssim"),
        ("no_growth", "growth"),
        ("no_anisotropy", "use_anisotropy"),
        ("no_psf", "use_psf"),
        ("no_stack_bias", "stack_bias"),
        ("no_shared_field", "shared_field"),
    ):
        if getattr(a, flag):
            over[key] = False
    if a.no_auto_mask:
        over["auto_mask"] = False
    if a.bias_correction:
        over["bias_correction"] = True
    if a.nrf and a.no_nrf:
        raise InputError("--nrf", "conflicts with --no-nrf")
    if a.nrf:
        over["use_nrf"] = True
    if a.no_nrf:
        over["use_nrf"] = False
    if a.renderer:
        over["renderer"] = a.renderer
    if a.block_radius is not None:
        over["block_radius"] = a.block_radius
        over["renderer"] = "points"
    return over


def _brain_only(res):
    """The volume faded to 0 where the stacks' masks (as given, at their registered poses; most of
    the stacks covering a voxel) do not call brain (``atlas.brain_faded``): the volume keeps a rim
    of other tissue around the brain, which misled the registration to a skull-stripped template."""
    from .atlas import brain_faded
    from .recon.data import region_mask

    if not res.brain_stacks:
        return None
    return brain_faded(res.volume, region_mask(res.brain_stacks, res.volume.shape, res.affine), res.affine)


def _write_volumes(a, res, inputs, template_outs: dict, log) -> tuple[dict | None, dict | None]:
    """Write the volume (on the template's grid with --template, the native one beside it);
    returns the template registration's record and the report's atlas view (None, None without
    --template)."""
    from .io import save_nifti

    template_info = atlas_view = template_grid = None
    if template_outs:  # the native volume is kept beside the one in atlas space (written first)
        from .atlas import BRAIN_EDGE_MM, to_template_space, write_transform_files

        save_nifti(
            res.volume, res.affine, template_outs["native"], inputs=inputs, header_extra=f"mgaussian {__version__}"
        )
        from .recon.output import render_result

        brain = _brain_only(res)
        vol_t, aff_t, template_info = to_template_space(
            res.volume,
            res.affine,
            a.template,
            a.template_transform,
            a.template_mask,
            log=log,
            render=lambda shape, affine: render_result(res, shape, affine),
            register_on=brain,
        )
        if brain is not None:
            template_info["registered_on"] = (
                f"the volume inside the stacks' brain masks, faded to 0 outside over {BRAIN_EDGE_MM:g} mm (as the template)"
            )
        write_transform_files(
            {
                "mgaussian_version": __version__,
                "output_volume": os.path.abspath(a.output_volume),
                "output_volume_native": os.path.abspath(template_outs["native"]),
                **template_info,
            },
            template_outs["json"],
            template_outs["tfm"],
        )
        save_nifti(vol_t, aff_t, a.output_volume, inputs=inputs, header_extra=f"mgaussian {__version__}")
        template_grid = (vol_t.shape, aff_t, template_info["matrix_template_to_volume"])
        atlas_view = {
            "path": a.output_volume,
            "native_path": template_outs["native"],
            "volume": vol_t,
            "affine": aff_t,
            "template": template_info["template"],
            "transform": template_info["transform"],
            "ncc": template_info["ncc_in_template_mask"],
        }
    else:
        save_nifti(res.volume, res.affine, a.output_volume, inputs=inputs, header_extra=f"mgaussian {__version__}")
    if a.output_confidence:
        _write_confidence(a, res, inputs, template_outs, template_grid)
    return template_info, atlas_view


def _write_confidence(a, res, inputs, template_outs: dict, template_grid: tuple | None) -> None:
    """The confidence map on the grid of the volume it describes: the reconstruction's own; with
    --template (``template_grid``: the template's shape, affine and the registration's template ->
    volume world map), the template's (beside the volume there) and the native one beside the
    native volume (C_native.nii.gz), so each map overlays its volume in a viewer."""
    from .io import save_nifti

    extra = f"mgaussian {__version__} confidence"
    if template_grid is None:
        save_nifti(res.confidence, res.affine, a.output_confidence, inputs=inputs, header_extra=extra)
        return
    import numpy as np

    from .sampling import resample_volume

    save_nifti(res.confidence, res.affine, template_outs["confidence_native"], inputs=inputs, header_extra=extra)
    # carried by the volume's registration (template voxel -> native world), linearly: the map is
    # smooth (a weighted mean of the Gaussians' sd, a gradient smoothed over 1.5 mm) and its grid
    # the written one, finer than the resolution
    shape_t, aff_t, to_volume = template_grid
    conf_t = resample_volume(res.confidence, res.affine, shape_t, np.asarray(to_volume, np.float64) @ aff_t)
    save_nifti(np.clip(conf_t, 0.0, 1.0), aff_t, a.output_confidence, inputs=inputs, header_extra=extra)


def _run_record(a, res, stacks, cfg, assessment, template_info, template_outs: dict, wall_s: float) -> dict:
    """OUT.config.json: version, command, inputs, resolved settings, timings, assessment, template."""
    meta = {
        "mgaussian_version": __version__,
        "command": sys.argv,
        "inputs": [
            {
                "stack": s.path,
                "mask": s.mask_path or ("automatic" if cfg.auto_mask else "none"),
                "thickness_mm": s.thickness,
                "thickness_from": s.thickness_source,
                "slice_order_ranks": None if s.slice_order is None else [int(r) for r in s.slice_order],
                "slice_order_from": s.slice_order_source,
            }
            for s in stacks
        ],
        "config": res.config.to_dict(),
        "output_volume": os.path.abspath(a.output_volume),
        "output_scale": res.scale,
        "output_scale_note": "volume = model value x output_scale: the stacks are divided by their 99th percentile in the mask, the output is multiplied back by the mean of those divisors",
        "backend": res.backend,
        "timings_s": res.timings,
        "wall_s": wall_s,
        # empty: the fixed schedule ended the fit (same inputs and settings -> the same volume)
        "time_budget_cut": res.budget_cuts,
        # on noisy data: the last level's prior factor chosen by held-out slices (null: the rule's weight)
        "prior_choice": res.prior_choice,
    }
    meta["assessment"] = assessment
    if a.output_confidence:
        meta["output_confidence"] = os.path.abspath(a.output_confidence)
        if "confidence_native" in template_outs:
            meta["output_confidence_native"] = os.path.abspath(template_outs["confidence_native"])
        meta["confidence"] = res.confidence_info
    if template_info is not None:
        meta["output_volume_native"] = os.path.abspath(template_outs["native"])
        meta["template"] = {
            k: template_info[k]
            for k in (
                "template",
                "template_requested",
                "transform",
                "ncc_in_template_mask",
                "rotation_deg",
                "chosen",
                "candidates_metric",
                "candidates_ncc",
            )
            if k in template_info
        }
        meta["template"]["transform_json"] = os.path.abspath(template_outs["json"])
    return meta


def _write_run_report(a, res, stacks, report_dir: str, runlog, t0: float, atlas_view: dict | None) -> None:
    """The HTML report beside the volume (a warning, not an error, without matplotlib)."""
    import time

    from .errors import warn

    t_rep = time.time()
    try:
        import matplotlib  # noqa: F401

        from .report import write_report
    except ImportError as exc:  # matplotlib missing from a partial install
        warn("--output-report", f"no report written ({exc})")
    else:
        extra = {
            "command": sys.argv,
            "wall_s": t_rep - t0,
            "config_json": _stem(a.output_volume) + ".config.json",
            "model": a.output_model,
            "atlas_view": atlas_view,
        }
        # the report's views are the native volume's (with --template, the atlas-space one has its section)
        idx = write_report(
            report_dir,
            res,
            stacks,
            atlas_view["native_path"] if atlas_view else a.output_volume,
            extra=extra,
            inputs=[a.output_volume, a.output_model, _stem(a.output_volume) + ".config.json", a.output_confidence],
        )
        if not a.quiet:
            print(f"wrote the report {idx} in {time.time() - t_rep:.1f} s", file=sys.stderr)
        runlog.line(f"report: {idx}")


def _reconstruct_config(a):
    """The run's settings: the defaults, then ``--config``, then the command line's flags (not
    validated here). Reads no PyTorch."""
    from .recon.config import ReconConfig, config_from_dict, load_config_file

    cfg = config_from_dict(load_config_file(a.config), where=a.config) if a.config else ReconConfig()
    return cfg.resolved(**_config_overrides(a))


def _start_precompile(a) -> None:
    """The cpu kernels compiled ahead in a second process (precompile.py), started before
    anything else so that it has the run's first seconds: the settings read here without PyTorch (1 s
    to import); any error in them is the run's own checks' to report. Not started for a run told to
    use the gpu or reference backend or CUDA; with ``--device auto`` on a CUDA machine the process
    compiles kernels that run may not call (once: they are cached)."""
    from . import precompile

    try:
        cfg = _reconstruct_config(a)
    except Exception:
        return
    if cfg.device != "cuda" and cfg.backend in ("auto", "cpu"):
        precompile.start(cfg.threads)


def cmd_reconstruct(a) -> int:
    import time

    _start_precompile(a)

    from .errors import warn
    from .geometry import voxel_sizes
    from .io import atomic_write_text, check_output_path, load_stacks, validate_stacks

    inputs = list(a.input_stacks) + list(a.stack_masks or [])
    check_output_path(a.output_volume, inputs)
    if a.output_model:
        if os.path.realpath(a.output_model) == os.path.realpath(a.output_volume):
            raise InputError("--output-model", "must differ from --output-volume")
        check_output_path(a.output_model, inputs + [a.output_volume], what="--output-model", nifti=False)
    if a.output_confidence:
        for other, what in ((a.output_volume, "--output-volume"), (a.output_model, "--output-model")):
            if other and os.path.realpath(a.output_confidence) == os.path.realpath(other):
                raise InputError("--output-confidence", f"must differ from {what}")
        check_output_path(a.output_confidence, inputs, what="--output-confidence")
    config_json = _stem(a.output_volume) + ".config.json"
    _check_log_path(
        a,
        inputs + ([a.config] if a.config else []),
        [a.output_volume, a.output_model, config_json, a.output_confidence],
    )
    if a.output_resolution is not None and a.output_resolution < 0.1:
        raise InputError("--output-resolution", f"{a.output_resolution:g} mm is absurdly fine (>= 0.1 mm)")
    report_dir = None
    if a.no_report and a.output_report:
        raise InputError("--output-report", "conflicts with --no-report")
    if not a.no_report:
        from .report import check_report_dir

        report_dir = a.output_report or (_stem(a.output_volume) + "_report")
        check_report_dir(
            report_dir, inputs + [a.output_volume, a.output_model, a.output_confidence], len(a.input_stacks)
        )
    cfg = _reconstruct_config(a).validate("command line")
    _check_checkpoint_dir(a, inputs + [a.output_volume, a.output_model, a.config])
    others = {"--output-model": a.output_model, "--log": a.log, "--output-confidence": a.output_confidence}
    template_outs = _template_outputs(a, inputs, native=True, others={**others, "the settings file": config_json})
    stacks = load_stacks(a.input_stacks, a.stack_masks, a.thicknesses, slice_order=a.slice_order)
    ckpt, resume_state = _reconstruct_checkpoint(a, cfg, stacks, inputs)
    if len(stacks) == 1:
        warn(a.input_stacks[0], "only one stack: the through-plane resolution cannot be recovered")
    validate_stacks(stacks)  # the stacks' own checks come before what is built from them
    prep_lines = []  # shown once every check has passed (an error is the only line otherwise)
    prep_lines.append("slice acquisition order: " + "; ".join(f"{s.name} {s.slice_order_source}" for s in stacks))
    _prepare_stacks(a, cfg, stacks, prep_lines.append)
    cfg, stacks, assessment, known_poses = _assess_for_reconstruct(a, cfg, stacks, prep_lines.append)
    cfg = _check_reconstruct_inputs(a, cfg, stacks)
    if not a.quiet:
        for line in prep_lines:
            print(line, file=sys.stderr, flush=True)
    from .errors import flush_warnings
    from .recon.pipeline import reconstruct

    runlog = _RunLog(a.log)
    runlog.header(cfg.to_dict())
    for line in prep_lines:
        runlog.line(line)
    flush_warnings()

    def log(s):
        runlog.line(s)
        if not a.quiet:
            print(s, file=sys.stderr, flush=True)

    t0 = time.time()
    try:
        res = reconstruct(
            stacks,
            cfg,
            log=log,
            progress=not a.quiet,
            checkpointer=ckpt,
            resume_state=resume_state,
            known_stack_poses=known_poses,
        )
    except BaseException as exc:
        runlog.line(f"failed: {type(exc).__name__}: {exc}")
        runlog.close()
        raise
    template_info, atlas_view = _write_volumes(a, res, inputs, template_outs, log)
    meta = _run_record(a, res, stacks, cfg, assessment, template_info, template_outs, time.time() - t0)
    atomic_write_text(config_json, json.dumps(meta, indent=1))
    poses_json = _stem(a.output_volume) + ".poses.json"
    atomic_write_text(
        poses_json,
        json.dumps(
            {
                "pose_convention": "x_true = R (x_header - centre) + centre + t, R from rotvec (axis x angle, rad); "
                "slices not listed (outside the masks) take the stack pose",
                "centre_mm": [float(v) for v in res.centre],
                "poses": res.poses,
                "slice_weights": res.slice_weights,
            }
        ),
    )
    if a.output_model:
        from .recon.model_io import save_model

        save_model(a.output_model, res, inputs=inputs)
    done = (
        f"wrote {a.output_volume} ({res.volume.shape[0]}x{res.volume.shape[1]}x{res.volume.shape[2]} at "
        f"{round(float(voxel_sizes(res.affine)[0]), 4):g} mm: the model at {res.config.output_resolution:g} mm) "
        f"in {time.time() - t0:.1f} s"
    )
    if template_info is not None:
        sh = "x".join(str(n) for n in template_info["template"]["shape"])
        done = (
            f"wrote {a.output_volume} ({sh}, on the grid of template {template_info['template']['name']}, "
            f"{template_info['transform']}, NCC {template_info['ncc_in_template_mask']:.4f} in its mask) and the "
            f"native volume {template_outs['native']} in {time.time() - t0:.1f} s"
        )
    runlog.line("timings_s: " + json.dumps({**res.timings, "wall_s": time.time() - t0}))
    runlog.line(
        "outputs: "
        + json.dumps(
            [
                os.path.abspath(p)
                for p in (a.output_volume, config_json, a.output_model, a.output_confidence, *template_outs.values())
                if p
            ]
        )
    )
    runlog.line(done)
    if report_dir is not None:
        _write_run_report(a, res, stacks, report_dir, runlog, t0, atlas_view)
    runlog.close()
    if not a.quiet:
        print(done, file=sys.stderr)
    return 0


def cmd_sample_volume(a) -> int:
    import time

    import numpy as np

    from .geometry import voxel_sizes
    from .io import check_output_path, save_nifti
    from .recon.model_io import load_model
    from .recon.output import region_on_grid, render_model

    check_output_path(a.output_volume, [a.input_model])
    _check_log_path(a, [a.input_model], [a.output_volume])
    try:
        fld, nrf, info = load_model(a.input_model)
        aff, shape, region = info["affine"], info["shape"], info["region"]
    except InputError:
        raise
    except Exception as exc:  # the right format tag but missing or odd fields
        raise InputError(
            a.input_model, f"incomplete or corrupt mgaussian model file ({type(exc).__name__}: {exc})"
        ) from None
    if a.output_resolution is not None:
        old = float(np.linalg.norm(aff[:3, 0]))
        r = a.output_resolution
        if r < 0.1:
            raise InputError("--output-resolution", f"{r} mm is absurdly fine (>= 0.1 mm)")
        extent = (np.asarray(shape) - 1) * old
        new_shape = tuple(int(v) for v in np.floor(extent / r + 1e-6).astype(int) + 1)
        if np.prod(new_shape) > 600**3:
            raise InputError("--output-resolution", f"{r} mm gives an absurd grid {new_shape}")
        new_aff = aff.copy()
        new_aff[:3, :3] = aff[:3, :3] / old * r
        region = region_on_grid(region, aff, new_shape, new_aff)
        aff, shape = new_aff, new_shape
    runlog = _RunLog(a.log)
    runlog.header()
    t0 = time.time()
    model_res = float(info["config"].get("output_resolution") or voxel_sizes(aff)[0])
    cutoff = float(info["config"].get("cutoff", 3.0))
    vol = render_model(fld, nrf, shape, aff, region, model_res, info["scale"], a.backend, cutoff)
    save_nifti(vol, aff, a.output_volume, inputs=[a.input_model])
    runlog.line("timings_s: " + json.dumps({"render_volume_s": time.time() - t0}))
    runlog.line("outputs: " + json.dumps([os.path.abspath(a.output_volume)]))
    runlog.close()
    print(f"wrote {a.output_volume} ({shape[0]}x{shape[1]}x{shape[2]})", file=sys.stderr)
    return 0


def cmd_sample_slices(a) -> int:
    from .io import check_output_path, load_stacks, save_nifti
    from .recon.model_io import load_model
    from .recon.sample import simulate_stacks_from_model, stack_scores

    inputs = [a.input_model] + list(a.input_stacks) + list(a.stack_masks or [])
    _prepare_output_dir(a.output_dir, inputs)
    fld, nrf, info = load_model(a.input_model)
    stacks = load_stacks(a.input_stacks, a.stack_masks, a.thicknesses)
    outs = [os.path.join(a.output_dir, f"{s.name}_simulated.nii.gz") for s in stacks]
    if len(set(outs)) != len(outs):
        raise InputError("--input-stacks", "two stacks share a file name; their simulations would collide")
    for o in outs:
        if os.path.isdir(a.output_dir):
            check_output_path(o, inputs, what="--output-dir")
        elif any(os.path.realpath(o) == os.path.realpath(q) for q in inputs):
            raise InputError("--output-dir", f"{o} is also an input; refusing to overwrite it")
    sims = simulate_stacks_from_model(fld, nrf, info, stacks, backend=a.backend)
    os.makedirs(a.output_dir, exist_ok=True)
    for st, sim, o in zip(stacks, sims, outs):
        save_nifti(sim, st.affine, o, inputs=inputs)
        sc = stack_scores(sim, st)
        print(f"{st.path}: NCC {sc['ncc']:.4f}, PSNR {sc['psnr']:.2f} dB inside the mask -> {o}")
    return 0


def cmd_inspect(a) -> int:
    import nibabel as nib
    import numpy as np

    from .io import load_stacks, validate_stacks

    stacks = load_stacks(a.input_stacks, a.stack_masks, a.thicknesses, slice_order=a.slice_order)
    validate_stacks(stacks)
    rows = []
    for s in stacks:
        rows.append(
            {
                "stack": s.path,
                "shape": list(s.data.shape),
                "orientation": "".join(nib.aff2axcodes(s.affine)),
                "pixel_mm": [round(v, 4) for v in s.frames.spacing],
                "slice_spacing_mm": round(s.frames.slice_spacing, 4),
                "thickness_mm": s.thickness,
                "thickness_from": s.thickness_source,
                "gap_mm": round(s.gap, 4),
                "mask": s.mask_path,
                "mask_fraction": round(float(s.mask.mean()), 4),
                "acquisition_order": [int(i) for i in np.argsort(s.slice_order, kind="stable")],
                "slice_order_from": s.slice_order_source,
            }
        )
    if a.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(
                f"{r['stack']}: {r['shape'][0]}x{r['shape'][1]} pixels x {r['shape'][2]} slices, {r['orientation']}, "
                f"pixel {r['pixel_mm'][0]}x{r['pixel_mm'][1]} mm, thickness {r['thickness_mm']} mm ({r['thickness_from']}), "
                f"gap {r['gap_mm']} mm, mask {r['mask_fraction'] * 100:.1f}%, "
                f"slice order {r['slice_order_from']}"
            )
    return 0


def _template_outputs(a, inputs, *, native: bool, others: dict | None = None) -> dict:
    """Output paths of atlas-space output, checked (and the template loaded once) before any work.
    ``others``: the run's other outputs (what names them -> path), none of which they may be."""
    from .atlas import load_templates
    from .io import check_output_path

    if a.template is None:
        if a.template_mask:
            raise InputError("--template-mask", "needs --template")
        return {}
    load_templates(a.template, a.template_mask)  # a wrong path or a bad mask fails now, not after the fit
    stem = _stem(a.output_volume)
    outs = {"json": stem + ".template.json", "tfm": stem + ".template.tfm"}
    if native:
        outs["native"] = _native_twin(a.output_volume)
    if getattr(a, "output_confidence", None):  # its native map beside it, as the volume's
        outs["confidence_native"] = _native_twin(a.output_confidence)
    whose = {k: "--output-confidence" if k == "confidence_native" else "--output-volume" for k in outs}
    taken = list(inputs) + [a.template, a.template_mask]
    for k, pth in outs.items():
        check_output_path(pth, taken, what=whose[k], nifti=k in ("native", "confidence_native"))
    named = {"--output-volume": a.output_volume, **(others or {})}
    for k, pth in outs.items():
        what = whose[k]
        for name, other in named.items():
            if other and os.path.realpath(other) == os.path.realpath(pth):
                raise InputError(what, f"{pth} (written beside it) is also the path of {name}")
    return outs


def cmd_to_template(a) -> int:
    import time

    from .atlas import BRAIN_EDGE_MM, brain_faded, to_template_space, write_transform_files
    from .io import check_output_path, load_image, load_mask, save_nifti

    inputs = [a.volume] + ([a.volume_mask] if a.volume_mask else [])
    check_output_path(a.output_volume, inputs + [a.template, a.template_mask])
    outs = _template_outputs(a, inputs, native=False)
    vol, aff, _ = load_image(a.volume, what="volume")
    brain = None
    if a.volume_mask:
        m = load_mask(a.volume_mask, vol.shape, aff, os.path.basename(a.volume))
        if not m.any():
            raise InputError(a.volume_mask, "the mask is empty")
        brain = brain_faded(vol, m, aff)
    t0 = time.time()
    out, taff, info = to_template_space(
        vol,
        aff,
        a.template,
        a.template_transform,
        a.template_mask,
        metric=a.metric,
        log=lambda s: print(s, file=sys.stderr, flush=True),
        register_on=brain,
    )
    if brain is not None:
        info["registered_on"] = f"the volume inside {a.volume_mask}, faded to 0 outside over {BRAIN_EDGE_MM:g} mm"
    info = {
        "mgaussian_version": __version__,
        "command": _COMMAND_LINE,
        "volume": os.path.abspath(a.volume),
        "output_volume": os.path.abspath(a.output_volume),
        **info,
    }
    save_nifti(out, taff, a.output_volume, inputs=inputs + [a.template, a.template_mask])
    write_transform_files(info, outs["json"], outs["tfm"])
    print(
        f"wrote {a.output_volume} on the grid of {info['template']['name']} ({info['transform']}, NCC "
        f"{info['ncc_in_template_mask']:.4f} in its mask, {info['rotation_deg']:.1f} deg) and {outs['json']}, "
        f"{outs['tfm']} in {time.time() - t0:.1f} s",
        file=sys.stderr,
    )
    return 0


def cmd_assess(a) -> int:
    import numpy as np

    from .assess import EXCLUDE_FRACTION, assess_stacks, choose_reference, format_table, stacks_to_exclude
    from .io import load_stacks, validate_stacks

    stacks = load_stacks(a.input_stacks, a.stack_masks, a.thicknesses, slice_order=a.slice_order)
    validate_stacks(stacks)
    if not a.stack_masks:
        from .masking import auto_masks

        for st, m in zip(stacks, auto_masks(stacks, log=lambda s: None)):
            if m.sum() < 10 or not np.any(st.data[m]):
                raise InputError(st.path, "the automatic mask found no anatomy in this stack; give --stack-masks")
            st.mask = m
    rows = assess_stacks(stacks)
    ref = choose_reference(rows)
    excl = stacks_to_exclude(rows)
    if a.json:
        print(
            json.dumps(
                {
                    "stacks": rows,
                    "reference_stack": ref,
                    "exclude_auto": excl,
                    "exclude_fraction_of_median": EXCLUDE_FRACTION,
                    "masks": "given" if a.stack_masks else "automatic",
                }
            )
        )
    else:
        print(format_table(rows))
        print(
            f"reference: stack {ref} ({stacks[ref].name}); --stack-exclude auto would drop: "
            + (", ".join(f"{i} ({stacks[i].name})" for i in excl) or "none")
        )
    return 0


def _assess_for_reconstruct(a, cfg, stacks, log):
    """The reference stack (--reference-stack, else the best-assessed) and --stack-exclude auto.
    Returns (config, kept stacks, record for OUT.config.json, the assessment's registrations of
    the kept stacks to the reference for ``reconstruct(known_stack_poses=...)``, or None)."""
    n = len(stacks)
    if a.reference_stack is not None and a.reference_stack >= n:
        raise InputError("--reference-stack", f"{a.reference_stack} is not a stack index (0..{n - 1})")
    record = {"reference_from": "option" if a.reference_stack is not None else "default", "excluded": []}
    if n < 2 or (a.reference_stack is not None and a.stack_exclude == "off"):
        ref = a.reference_stack or 0
        record["reference_stack"] = stacks[ref].path
        return cfg.resolved(reference_stack=ref), stacks, record, None
    import time

    from .assess import assess_stacks, choose_reference, format_table, reference_poses, stacks_to_exclude
    from .recon.motion import registration_grid

    t0 = time.time()
    pair_poses = {}
    rows = assess_stacks(stacks, poses=pair_poses, all_pairs=False)  # the pairs its scores need
    for line in format_table(rows).splitlines():
        log("assess: " + line)
    drop = [i for i in stacks_to_exclude(rows) if i != a.reference_stack] if a.stack_exclude == "auto" else []
    keep = [i for i in range(n) if i not in drop]
    if a.reference_stack is not None:
        ref = keep.index(a.reference_stack)
    else:
        ref = choose_reference([rows[i] for i in keep])  # an index into the kept stacks
        record["reference_from"] = "assessment"
    for i in drop:
        log(f"assess: excluded {stacks[i].name} (score {rows[i]['score']:.2f}, below half the median)")
    kept = [stacks[i] for i in keep]
    log(f"assess: reference stack {kept[ref].name} ({record['reference_from']}; {time.time() - t0:.1f} s)")
    record.update({"reference_stack": kept[ref].path, "excluded": [stacks[i].path for i in drop], "stacks": rows})
    # the pairs with the reference are finished from the assessment's coarse registrations
    known = reference_poses(pair_poses, keep[ref], registration_grid(kept))
    known = {keep.index(i): v for i, v in known.items() if i in keep}
    return cfg.resolved(reference_stack=ref), kept, record, known


def cmd_demo(a) -> int:
    from . import precompile
    from .demo import run_demo

    _prepare_output_dir(a.output_dir)
    precompile.start(None)  # the demo is often the first run after an install: see precompile.py
    return run_demo(a.output_dir)


def main(argv=None) -> int:
    from . import errors

    global _COMMAND_LINE
    _COMMAND_LINE = ["mgaussian"] + [str(x) for x in (sys.argv[1:] if argv is None else argv)]
    parser = build_parser()
    errors.defer_warnings()  # a later error is then the only line printed
    try:
        if (sys.argv[1:] if argv is None else list(argv))[:1] == ["bids"]:  # keeps what follows -- for reconstruct
            from .cohort.command import parse_args as parse_bids_args

            a = parse_bids_args(parser, sys.argv[1:] if argv is None else list(argv))
        else:
            a = parser.parse_args(argv)
        if not getattr(a, "command", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(a.func(a) or 0)
    except InputError as exc:
        errors.discard_warnings()
        print(f"error: {exc.where}: {exc.what}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory (try a coarser --output-resolution or fewer threads)", file=sys.stderr)
        return 1
    except OSError as exc:
        where = getattr(exc, "filename", None) or "system"
        print(f"error: {where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a bug: one line, traceback only on request
        if os.environ.get("MGAUSSIAN_DEBUG"):
            raise
        print(
            f"error: internal: {type(exc).__name__}: {exc} (set MGAUSSIAN_DEBUG=1 for the traceback)", file=sys.stderr
        )
        return 1
    finally:
        errors.flush_warnings()  # nothing left after an input error (discarded)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
