"""``mgaussian bids BIDS_DIR OUTPUT_DIR participant|group``: the command line of the BIDS App.

Everything the user gave is checked before any cluster starts (the dataset, the output folder,
the labels, the masks folder, every reconstruct option): a problem ends in one line
``error: <where>: <what>`` with exit code 2. Then the subjects whose outputs are complete are
skipped, the others run on Dask, and the summary is written; the exit code is 1 when any
subject-session failed, else 0.

Reconstruct options: the common ones are options of ``bids`` itself; any other goes after
``--`` and is handed to ``mgaussian reconstruct`` as it is (``mgaussian bids in out participant
-- --no-ssim --renderer points``). Both are checked with reconstruct's own parser up front. The
inputs, outputs, checkpoints, log, threads and report folder are the App's to set.
"""

from __future__ import annotations

__all__ = ["add_parser", "parse_args", "run", "reconstruct_options"]

import argparse
import hashlib
import os
import sys
import uuid

from ..errors import InputError, flush_warnings, warn

# reconstruct options the App sets itself for every subject (dest -> what to say)
_OWNED = {
    "stack_masks": "--stack-masks (masks come from --masks-dir / the derivatives)",
    "output_report": "--output-report (reports go into the derivative)",
    "output_model": "--output-model",
    "checkpoint_dir": "--checkpoint-dir (the App keeps one per subject)",
    "resume": "--resume (give it to bids itself)",
    "log": "--log (the App keeps one per subject)",
    "threads": "--threads (use --threads-per-worker)",
    "config": "--config (give it to bids itself, before --)",
}
# reconstruct options whose extra files the App does not carry into the derivative: refused, where
# they would be lost with the subject's work folder (--template's native volume and transform) or
# written by every subject to one path (--output-confidence)
_NOT_IN_APP = {
    "template": "the derivative keeps each subject's volume in its own frame; register them with "
    "mgaussian to-template, or reconstruct the subject alone",
    "output_confidence": "one path would be written by every subject; reconstruct the subject alone",
}
# what does not change what a subject's reconstruction means (left out of its fingerprint)
_NOT_SETTINGS = {"input_stacks", "output_volume", "quiet", "func", "command", "device", "backend"} | set(_OWNED)


def add_parser(sub, num) -> None:
    """Register ``bids`` on the subparsers ``sub`` (``num`` is the CLI's number-type factory)."""
    p = sub.add_parser(
        "bids",
        help="reconstruct every subject of a BIDS dataset on Dask (BIDS App), as a BIDS derivative",
        description=(
            "Reconstruct every subject (and session) of a BIDS dataset with mgaussian reconstruct, "
            "one Dask task each, into OUTPUT_DIR/mgaussian (a BIDS derivative with summary.tsv and "
            "index.html). Subjects already done are skipped; partial ones resume. Reconstruct options "
            "not listed here go after --: mgaussian bids in out participant -- --no-ssim. "
            "Exit code 1 when any subject failed. See docs/cohort.md."
        ),
    )
    p.add_argument("bids_dir", metavar="BIDS_DIR", help="the BIDS dataset (read only: nothing is written into it)")
    p.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        help="outputs go to OUTPUT_DIR/mgaussian (created if missing); BIDS_DIR/derivatives is allowed",
    )
    p.add_argument(
        "analysis_level",
        choices=["participant", "group"],
        help="participant: reconstruct the subjects; group: only rebuild summary.tsv and index.html",
    )
    s = p.add_argument_group("which data")
    s.add_argument(
        "--participant-label", nargs="+", metavar="LABEL", help="subjects to run (01 or sub-01); default: all"
    )
    s.add_argument("--session-label", nargs="+", metavar="LABEL", help="sessions to run (02 or ses-02); default: all")
    s.add_argument("--suffix", default="T2w", help="the stacks' BIDS suffix (default T2w)")
    s.add_argument(
        "--masks-dir",
        metavar="DERIV_DIR",
        help="derivative folder holding the brain masks "
        "(*_desc-brain_mask.nii.gz); default: search every folder in BIDS_DIR/derivatives; "
        "stacks without one get reconstruct's automatic masks",
    )
    c = p.add_argument_group("Dask")
    x = c.add_mutually_exclusive_group()
    x.add_argument(
        "--workers",
        type=num("--workers", positive=True, integer=True),
        default=1,
        help="worker processes of a local Dask cluster, each running one subject at a time (default 1)",
    )
    x.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="attach to this running Dask scheduler (e.g. from dask-jobqueue) instead of starting a local cluster",
    )
    c.add_argument(
        "--threads-per-worker",
        type=num("--threads-per-worker", positive=True, integer=True),
        help="CPU threads of each subject's reconstruction (reconstruct --threads); default: this "
        "machine's CPUs / --workers, or on a scheduler the CPUs each worker may use",
    )
    c.add_argument(
        "--retries",
        type=num("--retries", nonneg=True, integer=True),
        default=2,
        help="times a task that raised is retried (default 2; a task whose worker died is rescheduled by Dask)",
    )
    c.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="skip subjects whose outputs are complete for the same inputs and settings, and resume "
        "partial ones from their checkpoints (the default); --no-resume redoes them all",
    )
    r = p.add_argument_group("reconstruct options (any other goes after --)")
    r.add_argument(
        "--output-resolution",
        type=num("--output-resolution", positive=True),
        help="the reconstruction's resolution (mm); the volume is written 2 x finer "
        "(reconstruct's --output-oversampling, which may go after --)",
    )
    r.add_argument("--time-budget", type=num("--time-budget", positive=True), help="seconds of fitting per subject")
    r.add_argument("--config", metavar="FILE", help="JSON (or TOML) file of reconstruct settings")
    r.add_argument("--seed", type=num("--seed", nonneg=True, integer=True))
    r.add_argument("--slice-profile", choices=["gaussian", "box"])
    r.add_argument(
        "--max-memory",
        metavar="GB",
        type=num("--max-memory", positive=True),
        help="per subject: refuse a reconstruction estimated above this (reconstruct's default 8)",
    )
    r.add_argument("--no-motion", action="store_true", help="no per-slice motion correction")
    r.add_argument("--bias-correction", action="store_true", help="N4 bias-field correction of every stack")
    r.add_argument("--no-report", action="store_true", help="no per-subject HTML report (the summary stays)")
    p.set_defaults(func=run)


def parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``bids`` arguments; what follows the first ``--`` is kept for reconstruct."""
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    a = parser.parse_args(argv)
    a.recon_extra = extra
    return a


def reconstruct_options(a) -> tuple[list[str], dict]:
    """The reconstruct options for every subject and what they mean (the settings fingerprint).

    Checked with reconstruct's own parser, so a bad option fails here, once, not per subject."""
    from ..cli import build_parser
    from ..recon.config import config_from_dict, load_config_file

    args: list[str] = []
    if a.output_resolution is not None:
        args += ["--output-resolution", f"{a.output_resolution:g}"]
    if a.time_budget is not None:
        args += ["--time-budget", f"{a.time_budget:g}"]
    if a.seed is not None:
        args += ["--seed", str(a.seed)]
    if a.slice_profile:
        args += ["--slice-profile", a.slice_profile]
    if a.max_memory is not None:
        args += ["--max-memory", f"{a.max_memory:g}"]
    for flag in ("no_motion", "bias_correction"):
        if getattr(a, flag):
            args.append("--" + flag.replace("_", "-"))
    extra = list(a.recon_extra)
    probe = ["reconstruct", "--input-stacks", "x.nii.gz", "--output-volume", "y.nii.gz"]
    try:
        ns = build_parser().parse_args(probe + args + extra)
    except SystemExit:  # --help after --
        raise InputError("--", "reconstruct options after -- could not be read") from None
    except InputError as exc:
        if exc.what.startswith("unrecognized arguments"):
            raise InputError("--", f"not options of mgaussian reconstruct: {exc.what.split(': ', 1)[-1]}") from None
        raise
    if ns.input_stacks != ["x.nii.gz"] or ns.output_volume != "y.nii.gz":
        raise InputError("--", "the App gives each subject's --input-stacks and --output-volume itself")
    for dest, what in _OWNED.items():
        if getattr(ns, dest, None) not in (None, False):
            raise InputError("--", f"{what.split(' ')[0]} is set by the App: {what}")
    for dest, why in _NOT_IN_APP.items():
        if getattr(ns, dest, None) not in (None, False):
            raise InputError("--", f"--{dest.replace('_', '-')} is not supported by the App: {why}")
    if ns.thicknesses is not None and len(ns.thicknesses) != 1:
        raise InputError("--thicknesses", "give one value for every stack (subjects have different numbers of stacks)")
    if ns.no_report and a.no_report is False:
        a.no_report = True
    args += extra
    settings = {k: v for k, v in sorted(vars(ns).items()) if k not in _NOT_SETTINGS}
    settings["no_report"] = bool(a.no_report)
    if a.config:
        cfg = os.path.abspath(a.config)
        if not os.path.isfile(cfg):
            raise InputError("--config", f"{a.config}: file not found")
        config_from_dict(load_config_file(cfg), where=a.config).validate(a.config)
        with open(cfg, "rb") as f:
            settings["config_sha256"] = hashlib.sha256(f.read()).hexdigest()
        args += ["--config", cfg]
    return [x for x in args if x != "--no-report"], settings


def _output_root(bids_dir: str, output_dir: str) -> str:
    """``OUTPUT_DIR/mgaussian``, refused where it would write into the BIDS dataset (except its
    ``derivatives`` folder, the BIDS Apps layout) or hold the dataset."""
    out = os.path.abspath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(output_dir, "exists and is not a folder")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise InputError(output_dir, f"its folder {parent} does not exist")
    root = os.path.join(out, "mgaussian")
    rb, rr, ro = os.path.realpath(bids_dir), os.path.realpath(root), os.path.realpath(out)
    inside = rr == rb or rr.startswith(rb + os.sep)
    if inside and ro != os.path.join(rb, "derivatives"):
        raise InputError(
            output_dir,
            f"is inside the BIDS dataset {bids_dir}; use "
            f"{os.path.join(bids_dir, 'derivatives')} or a folder outside it",
        )
    if rb.startswith(rr + os.sep):
        raise InputError(output_dir, f"OUTPUT_DIR/mgaussian would hold the BIDS dataset {bids_dir}")
    if os.path.exists(root) and not os.path.isdir(root):
        raise InputError(root, "exists and is not a folder")
    return root


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def build_tasks(a, sessions, recon_args: list[str], settings: dict, out_root: str, run_id: str):
    from .task import SubjectTask, file_id

    given_thickness = settings.get("thicknesses") is not None
    threads = a.threads_per_worker or (None if a.scheduler else max(1, _cpus() // a.workers))
    tasks = []
    for ses in sessions:
        notes = []
        masks = ses.masks
        n_masks = sum(m is not None for m in masks)
        if 0 < n_masks < len(masks):
            notes.append(
                f"brain masks found for {n_masks} of {len(masks)} stacks: reconstruct takes all or none, "
                "so every stack gets an automatic mask"
            )
            warn(ses.key, notes[-1])
        masks = list(masks) if n_masks == len(masks) else None
        thick = None
        beside = [
            th is not None and os.path.splitext(th[1])[0] == _nii_stem(p) for p, th in zip(ses.stacks, ses.thicknesses)
        ]
        inherited = [th for th, b in zip(ses.thicknesses, beside) if th is not None and not b]
        if not given_thickness and inherited:  # reconstruct reads only the sidecar beside a stack: pass them all
            thick = [th[0] if th is not None else _slice_spacing(p) for p, th in zip(ses.stacks, ses.thicknesses)]
            if any(t is None for t in thick):  # an unreadable header: reconstruct will say what is wrong
                thick = None
            else:
                srcs = sorted({os.path.relpath(th[1], a.bids_dir) for th in inherited})
                notes.append(
                    f"SliceThickness inherited from {', '.join(srcs)} (passed as --thicknesses"
                    + (", slice spacing where no sidecar has one)" if None in ses.thicknesses else ")")
                )
        side_files = sorted({p for lst in ses.sidecars for p in lst})
        inputs = (
            [file_id(p, a.bids_dir) for p in ses.stacks]
            + [file_id(p, a.bids_dir) for p in (masks or [])]
            + [file_id(p, a.bids_dir) for p in side_files]
        )
        datatype = os.path.basename(os.path.dirname(ses.stacks[0]))
        tasks.append(
            SubjectTask(
                key=ses.key,
                reldir=ses.reldir,
                subject=ses.subject,
                session=ses.session,
                datatype=datatype,
                suffix=a.suffix,
                bids_dir=a.bids_dir,
                out_root=out_root,
                stacks=ses.stacks,
                masks=masks,
                thicknesses=thick,
                recon_args=recon_args,
                settings=settings,
                inputs=inputs,
                threads=threads,
                report=not a.no_report,
                run_id=run_id,
                notes=notes,
            )
        )
    return tasks


def _slice_spacing(p: str) -> float | None:
    """The slice spacing reconstruct would take for a stack without a thickness (header only)."""
    try:
        import nibabel as nib

        from ..geometry import slice_frames

        img = nib.load(p)
        return float(slice_frames(img.affine, img.shape[:3]).slice_spacing)
    except Exception:
        return None


def _nii_stem(p: str) -> str:
    for ext in (".nii.gz", ".nii"):
        if p.endswith(ext):
            return p[: -len(ext)]
    return p


def run(a) -> int:
    """The whole command: checks, skips, the Dask run, the summary. Returns the exit code."""
    from . import layout, summary

    a.bids_dir = os.path.abspath(a.bids_dir)
    source = layout.check_dataset(a.bids_dir)
    out_root = _output_root(a.bids_dir, a.output_dir)
    if a.analysis_level == "group":
        if not summary.read_statuses(out_root):
            raise InputError(a.output_dir, "no mgaussian results to summarise (run the participant level first)")
        tsv, page = summary.write_summary(out_root)
        recs = summary.read_statuses(out_root)
        flush_warnings()
        print(
            f"summary of {len(recs)} subject-sessions ({sum(r.get('status') == 'failed' for r in recs)} failed): "
            f"{tsv}, {page}"
        )
        return 0
    if a.masks_dir and not os.path.isdir(a.masks_dir):
        raise InputError("--masks-dir", f"{a.masks_dir}: folder not found")
    recon_args, settings = reconstruct_options(a)
    sessions = layout.find_sessions(
        a.bids_dir,
        participant_labels=a.participant_label,
        session_labels=a.session_label,
        suffix=a.suffix,
        masks_dir=a.masks_dir,
        exclude_roots=(out_root,),
        warn=warn,
    )
    summary.check_dataset_description(out_root, a.bids_dir)
    run_id = uuid.uuid4().hex[:12]
    tasks = build_tasks(a, sessions, recon_args, settings, out_root, run_id)
    return _run_participants(a, tasks, out_root, run_id, source)


def _run_participants(a, tasks, out_root: str, run_id: str, source: dict) -> int:
    import contextlib
    import shutil

    from . import summary
    from .runner import describe, open_client, run_tasks
    from .task import is_complete, record_from_sidecar

    def say(s: str) -> None:
        print(s, flush=True)

    done = {t.key: is_complete(t) if a.resume else None for t in tasks}  # reads only
    todo = [t for t in tasks if done[t.key] is None]
    with contextlib.ExitStack() as stack:
        cluster_lines: list[str] = []
        client = None
        if todo:  # connecting to --scheduler checks an input too: before anything is written
            client = stack.enter_context(
                open_client(None if a.scheduler else a.workers, a.scheduler, log=cluster_lines.append)
            )
        flush_warnings()
        os.makedirs(out_root, exist_ok=True)
        summary.write_dataset_description(out_root, a.bids_dir, source)
        for t in tasks:
            if done[t.key] is not None:
                rec = record_from_sidecar(t, done[t.key], "skipped")
                summary.write_status(out_root, rec)
                say(f"{t.key}: {describe(rec)}")
            elif not a.resume:
                shutil.rmtree(t.work, ignore_errors=True)  # no checkpoint from before either
        say(f"{len(tasks)} subject-sessions: {len(tasks) - len(todo)} already done, {len(todo)} to run")
        for line in cluster_lines:
            say(line)
        if client is not None:
            run_tasks(
                client,
                todo,
                retries=a.retries,
                run_id=run_id,
                on_record=lambda rec: summary.write_status(out_root, rec),
                log=say,
            )
    tsv, page = summary.write_summary(out_root)
    recs = {r["key"]: r for r in summary.read_statuses(out_root)}
    failed = [t.key for t in tasks if recs.get(t.key, {}).get("status") != "done"]
    say(f"{len(tasks) - len(failed)} of {len(tasks)} subject-sessions done; summary {tsv} and {page}")
    if failed:
        print(
            f"error: {', '.join(failed)}: {len(failed)} of {len(tasks)} subject-sessions failed (reasons in {tsv})",
            file=sys.stderr,
        )
        return 1
    return 0
