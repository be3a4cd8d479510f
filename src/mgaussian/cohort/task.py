"""What one Dask task does for one subject-session: reconstruct it, then put its outputs in place.

Why a subprocess: ``mgaussian reconstruct`` runs as ``python -m mgaussian reconstruct`` in a
child process, so a crash or an out-of-memory kill of one subject takes down neither the Dask
worker nor the other subjects, and the memory of a finished subject is given back for sure. The
child's stderr is kept; its last ``error: ...`` line is the subject's failure reason. On Linux
the child is killed when its worker dies (``PR_SET_PDEATHSIG``), so a retried task never races
an orphan of the attempt before it.

Why it is safe to run twice (Dask retries a task whose worker died): the child writes into a
work folder ``OUT/.work/<key>/`` (with ``--checkpoint-dir`` there: a retried or rerun subject
resumes from its checkpoint); only at the end are the outputs moved into the derivative, each
by a rename, the JSON sidecar last. The sidecar is the mark of a complete subject: it records
the inputs (sizes, modification times) and the settings, and a subject whose sidecar matches,
and whose volume loads, is skipped. A lock file in the work folder keeps two runs off the same
subject at once.
"""

from __future__ import annotations

__all__ = [
    "SubjectTask",
    "run_subject",
    "is_complete",
    "fingerprint",
    "file_id",
    "quality_from_poses",
    "failure_reason",
    "CHECKPOINT_FILES",
]

import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .. import __version__
from ..io import atomic_write_text

# the files of a reconstruct checkpoint (mgaussian.recon.checkpoint.CHECKPOINT / PREVIOUS; named here so
# that a Dask worker does not import torch just to look for them; tests check the names agree)
CHECKPOINT_FILES = ("checkpoint.pt", "checkpoint.prev.pt")
_LOCK = "lock"


def file_id(path: str, root: str | None = None) -> dict:
    """What identifies an input file: its path (relative to ``root`` when inside it), size, mtime."""
    st = os.stat(path)
    p = os.path.abspath(path)
    if root and p.startswith(os.path.abspath(root) + os.sep):
        p = os.path.relpath(p, root)
    return {"path": p, "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


@dataclass
class SubjectTask:
    """Everything a worker needs for one subject-session (plain data: it travels to the worker)."""

    key: str  # sub-01[_ses-02]
    reldir: str  # sub-01[/ses-02]
    subject: str
    session: str | None
    datatype: str  # the stacks' datatype folder (anat)
    suffix: str
    bids_dir: str
    out_root: str  # OUTPUT_DIR/mgaussian
    stacks: list[str]
    masks: list[str] | None  # one per stack, or None: reconstruct's automatic masks
    thicknesses: list[float] | None  # passed as --thicknesses (from sidecars reconstruct does not read itself)
    recon_args: list[str]  # the reconstruct options common to the study
    settings: dict  # what the options mean (fingerprint: a change reruns the subject)
    inputs: list[dict]  # file_id of every stack, mask and sidecar (fingerprint)
    threads: int | None = None  # reconstruct --threads; None: the CPUs the worker may use / its Dask threads
    report: bool = True
    run_id: str = ""  # one per `mgaussian bids` invocation: attempts are counted within it
    notes: list[str] = field(default_factory=list)  # e.g. why the masks are automatic

    # ------------------------------------------------------------------ where things go
    @property
    def stem(self) -> str:
        return f"{self.key}_rec-mgaussian_{self.suffix}"

    @property
    def volume(self) -> str:
        return os.path.join(self.out_root, self.reldir, self.datatype, self.stem + ".nii.gz")

    @property
    def sidecar(self) -> str:
        return os.path.join(self.out_root, self.reldir, self.datatype, self.stem + ".json")

    @property
    def figures(self) -> str:
        return os.path.join(self.out_root, self.reldir, "figures")

    @property
    def thumbnail(self) -> str:
        return os.path.join(self.figures, self.stem + "_midplanes.png")

    @property
    def report_dir(self) -> str:
        return os.path.join(self.figures, self.stem + "_report")

    @property
    def log_dir(self) -> str:
        return os.path.join(self.out_root, self.reldir, "log")

    @property
    def work(self) -> str:
        return os.path.join(self.out_root, ".work", self.key)

    def rel(self, p: str | None) -> str | None:
        return None if p is None else os.path.relpath(p, self.out_root)


def fingerprint(task: SubjectTask) -> dict:
    """Inputs and settings of a subject's run: equal fingerprints give the same reconstruction
    (threads, workers and the mgaussian version are left out on purpose: they change how fast a
    subject runs, not what it means; a new version does not rerun a finished study)."""
    return {"inputs": task.inputs, "settings": task.settings}


def quality_from_poses(poses: dict) -> dict:
    """Slices fitted and excluded (robust weights), in total and per stack, from ``OUT.poses.json``."""
    per = []
    for w in poses.get("slice_weights") or []:
        per.append(
            {
                "stack": w.get("stack"),
                "slices": len(w.get("slices") or []),
                "excluded": [int(k) for k in (w.get("excluded") or [])],
            }
        )
    return {
        "slices": sum(p["slices"] for p in per),
        "excluded_slices": sum(len(p["excluded"]) for p in per),
        "per_stack": per,
    }


def _load_json(p: str):
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_complete(task: SubjectTask) -> dict | None:
    """The subject's sidecar if its outputs are complete and valid for these inputs and settings
    (sidecar present with the same fingerprint, volume loads with the recorded shape and finite
    values), else None."""
    side = _load_json(task.sidecar)
    if not isinstance(side, dict) or side.get("MgaussianFingerprint") != fingerprint(task):
        return None
    try:
        import nibabel as nib
        import numpy as np

        img = nib.load(task.volume)
        v = np.asarray(img.dataobj)
        if list(v.shape) != list(side.get("Quality", {}).get("shape", [])) or not np.all(np.isfinite(v)):
            return None
    except Exception:  # missing, truncated or not a NIfTI: the subject is not done
        return None
    return side


def failure_reason(stderr_text: str, returncode: int) -> str:
    """One line: the child's last ``error: ...`` line, else what killed it, else its exit code."""
    lines = [ln.strip() for ln in stderr_text.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    if errs:
        return errs[-1][len("error: ") :]
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        why = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -returncode == signal.SIGKILL else ""
        return f"reconstruct was killed by {name}{why}"
    last = f": {lines[-1][:300]}" if lines else ""
    return f"reconstruct exited with code {returncode}{last}"


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _threads(task: SubjectTask) -> int:
    if task.threads:
        return int(task.threads)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    try:
        from distributed import get_worker

        per = max(1, int(get_worker().state.nthreads))
    except Exception:  # not on a Dask worker (called directly)
        per = 1
    return max(1, cpus // per)


class _Lock:
    """An exclusive, non-blocking flock on ``path`` (released by the kernel if the holder dies)."""

    def __init__(self, path: str):
        self.path, self.fd = path, None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): run without the lock
            pass
        except OSError:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)


def _command(task: SubjectTask, out_vol: str, resume: bool, threads: int) -> list[str]:
    w = task.work
    cmd = [sys.executable, "-m", "mgaussian", "reconstruct", "--input-stacks", *task.stacks]
    if task.masks:
        cmd += ["--stack-masks", *task.masks]
    if task.thicknesses:
        cmd += ["--thicknesses", *[f"{t:g}" for t in task.thicknesses]]
    cmd += [
        "--output-volume",
        out_vol,
        "--checkpoint-dir",
        os.path.join(w, "checkpoint"),
        "--log",
        os.path.join(w, "reconstruct.log"),
        "--quiet",
        "--threads",
        str(threads),
    ]
    cmd += ["--output-report", os.path.join(w, "report")] if task.report else ["--no-report"]
    if resume:
        cmd.append("--resume")
    return cmd + list(task.recon_args)


def _run_child(cmd: list[str], stderr_path: str, threads: int) -> tuple[int, str]:
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)  # Dask's nanny sets them to 1 for its workers; the child has `threads` CPUs
    with open(stderr_path, "w", encoding="utf-8") as err:
        p = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=err,
            stderr=subprocess.STDOUT,
            env=env,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        try:
            rc = p.wait()
        except BaseException:
            p.kill()
            p.wait()
            raise
    with open(stderr_path, encoding="utf-8", errors="replace") as f:
        return rc, f.read()


def _replace_dir(src: str, dst: str) -> None:
    """Move folder ``src`` to ``dst`` by renames (an older ``dst`` is renamed away, then deleted)."""
    old = None
    if os.path.exists(dst):
        old = f"{dst}.old.{os.getpid()}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _base_record(task: SubjectTask) -> dict:
    return {
        "key": task.key,
        "reldir": task.reldir,
        "participant_id": f"sub-{task.subject}",
        "session_id": f"ses-{task.session}" if task.session else None,
        "stacks": len(task.stacks),
        "masks": "given" if task.masks else "automatic",
    }


def record_from_sidecar(task: SubjectTask, side: dict, this_run: str) -> dict:
    """The status record of a complete subject, from its sidecar."""
    q = side.get("Quality", {})
    rep = task.report_dir if os.path.isfile(os.path.join(task.report_dir, "index.html")) else None
    return {
        **_base_record(task),
        "status": "done",
        "error": None,
        "this_run": this_run,
        "excluded_slices": q.get("excluded_slices"),
        "slices": q.get("slices"),
        "shape": q.get("shape"),
        "resolution_mm": q.get("resolution_mm"),
        "wall_s": side.get("Timings", {}).get("wall_s"),
        "attempts": side.get("Attempts"),
        "finished": side.get("Finished"),
        "volume": task.rel(task.volume),
        "sidecar": task.rel(task.sidecar),
        "report": task.rel(os.path.join(rep, "index.html")) if rep else None,
        "thumbnail": task.rel(task.thumbnail) if os.path.isfile(task.thumbnail) else None,
        "notes": side.get("Notes", []),
    }


def _finish(task: SubjectTask, out_vol: str, attempt: int, wall: float, threads: int, cmd: list[str]) -> dict:
    """Move a finished reconstruction from the work folder into the derivative, sidecar last."""
    from .summary import thumbnail

    w = task.work
    stem_w = out_vol[: -len(".nii.gz")]
    meta = _load_json(stem_w + ".config.json") or {}
    poses = _load_json(stem_w + ".poses.json") or {}
    for d in (os.path.dirname(task.volume), task.log_dir, task.figures):
        os.makedirs(d, exist_ok=True)
    if os.path.exists(task.sidecar):
        os.unlink(task.sidecar)  # a stale sidecar must never describe the new volume
    os.replace(out_vol, task.volume)
    for src, name in (
        (stem_w + ".config.json", ".config.json"),
        (stem_w + ".poses.json", ".poses.json"),
        (os.path.join(w, "reconstruct.log"), ".log"),
        (os.path.join(w, "stderr.txt"), ".stderr.txt"),
    ):
        if os.path.exists(src):
            os.replace(src, os.path.join(task.log_dir, task.stem + name))
    rep = None
    if task.report and os.path.isfile(os.path.join(w, "report", "index.html")):
        _replace_dir(os.path.join(w, "report"), task.report_dir)
        rep = task.report_dir
    thumbnail(task.volume, task.thumbnail)
    import nibabel as nib

    img = nib.load(task.volume)
    quality = quality_from_poses(poses)
    quality.update(
        shape=[int(s) for s in img.shape[:3]],
        resolution_mm=float(img.header.get_zooms()[0]),
        output_scale=meta.get("output_scale"),
    )
    cfg = meta.get("config", {})
    side = {
        "Description": "Volume reconstructed from thick-slice stacks by mgaussian (slice-to-volume, magnetic "
        "3D Gaussians)",
        "Sources": [f"bids:raw:{os.path.relpath(s, task.bids_dir)}" for s in task.stacks],
        "SkullStripped": False,
        "Resolution": f"isotropic {quality['resolution_mm']:g} mm",
        "MgaussianVersion": __version__,
        "Inputs": meta.get("inputs", []),
        "Masks": "given" if task.masks else "automatic (reconstruct's; no brain masks found in the derivatives)",
        "ReconstructCommand": [os.path.basename(cmd[0])] + cmd[1:],
        "Settings": task.settings,
        "Config": cfg,
        "Timings": {**(meta.get("timings_s") or {}), "wall_s": wall, "threads": threads},
        "Quality": quality,
        "Attempts": attempt,
        "Finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "Notes": task.notes,
        "Report": task.rel(os.path.join(rep, "index.html")) if rep else None,
        "MgaussianFingerprint": fingerprint(task),
    }
    atomic_write_text(task.sidecar, json.dumps(side, indent=1) + "\n")  # the subject is complete from here
    shutil.rmtree(w, ignore_errors=True)
    return record_from_sidecar(task, side, "ran")


def run_subject(task: SubjectTask) -> dict:
    """Reconstruct one subject-session (the Dask task); returns its status record.

    A failure of the subject (bad input, out of memory, a crash of reconstruct) is returned as a
    record with ``status: failed`` and the one-line reason, not raised: the study goes on. Only
    problems of the machinery (a lock held by another run, a full disk) raise, for Dask's
    retries."""
    side = is_complete(task)
    if side is not None:  # finished by an attempt before this one (or another run)
        return record_from_sidecar(task, side, "skipped")
    w = task.work
    os.makedirs(w, exist_ok=True)
    try:
        lock = _Lock(os.path.join(w, _LOCK)).__enter__()
    except OSError:
        raise RuntimeError(f"{task.key}: another mgaussian bids run holds {os.path.join(w, _LOCK)}") from None
    try:
        fp_path = os.path.join(w, "fingerprint.json")
        if _load_json(fp_path) != fingerprint(task):  # a checkpoint for other inputs or settings is useless
            for n in os.listdir(w):
                if n != _LOCK:
                    p = os.path.join(w, n)
                    shutil.rmtree(p, ignore_errors=True) if os.path.isdir(p) else os.unlink(p)
            atomic_write_text(fp_path, json.dumps(fingerprint(task)))
        attempts = _load_json(os.path.join(w, "attempts.json"))
        if not isinstance(attempts, dict) or attempts.get("run_id") != task.run_id:
            attempts = {"run_id": task.run_id, "attempts": []}
        attempt = len(attempts["attempts"]) + 1
        attempts["attempts"].append({"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()})
        atomic_write_text(os.path.join(w, "attempts.json"), json.dumps(attempts))  # also says who is running it
        threads = _threads(task)
        out_vol = os.path.join(w, task.stem + ".nii.gz")
        resume = any(os.path.isfile(os.path.join(w, "checkpoint", n)) for n in CHECKPOINT_FILES)
        t0 = time.time()
        cmd = _command(task, out_vol, resume, threads)
        rc, err = _run_child(cmd, os.path.join(w, "stderr.txt"), threads)
        if rc == 2 and resume and failure_reason(err, rc).startswith("--resume: "):  # the checkpoint was refused
            shutil.rmtree(os.path.join(w, "checkpoint"), ignore_errors=True)  # unusable: start afresh
            task = dataclasses.replace(
                task,
                notes=[
                    *task.notes,
                    "its checkpoint could not be resumed (" + failure_reason(err, rc) + "): started afresh",
                ],
            )
            cmd = _command(task, out_vol, False, threads)
            rc, err = _run_child(cmd, os.path.join(w, "stderr.txt"), threads)
        wall = time.time() - t0
        if rc != 0 or not os.path.isfile(out_vol):
            os.makedirs(task.log_dir, exist_ok=True)
            atomic_write_text(os.path.join(task.log_dir, task.stem + ".stderr.txt"), err)
            return {
                **_base_record(task),
                "status": "failed",
                "error": failure_reason(err, rc),
                "this_run": "failed",
                "returncode": rc,
                "wall_s": wall,
                "attempts": attempt,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "stderr": task.rel(os.path.join(task.log_dir, task.stem + ".stderr.txt")),
            }
        return _finish(task, out_vol, attempt, wall, threads, cmd)
    finally:
        lock.__exit__()
