"""Run the subjects' tasks on Dask: a LocalCluster on this machine, or any running scheduler.

Why Dask: imaging groups already run it, from a laptop (``LocalCluster``: worker processes on
this machine, no server to set up) to a cluster (``dask-jobqueue`` starts workers as SLURM/PBS
jobs and gives a scheduler address ``mgaussian bids --scheduler`` attaches to). One task is one
subject-session; each Dask worker runs one task at a time (``threads_per_worker=1``) and the
task's reconstruction uses its own CPU threads (``--threads-per-worker``).

Failures: a subject that fails comes back as a record (:func:`.task.run_subject`), so the others
go on. A task that raises (a problem of the machinery) is retried ``retries`` times; a worker
that dies mid-task (kill -9, a node lost) has its task rescheduled on another worker by the
scheduler (up to Dask's ``distributed.scheduler.allowed-failures``, 3 by default). Both are safe
because a task writes its outputs atomically, only at its end, and resumes from its checkpoint.
"""

from __future__ import annotations

__all__ = ["open_client", "run_tasks", "format_eta"]

import contextlib
import importlib.util
import logging
import time
import warnings

from ..errors import InputError
from .task import SubjectTask, run_subject


@contextlib.contextmanager
def open_client(workers: int | None, scheduler: str | None, log=print):
    """A Dask client on a new LocalCluster of ``workers`` processes, or on ``scheduler``.

    Prints the dashboard address (and says when bokeh, which serves it, is missing)."""
    from distributed import Client, LocalCluster

    cluster = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "port 8787 is in use, using another": the address is printed below
        if scheduler:
            try:
                client = Client(scheduler, timeout="10s")
            except (OSError, TimeoutError, ValueError) as exc:
                why = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
                raise InputError("--scheduler", f"cannot connect to {scheduler}: {why}") from None
        else:
            cluster = LocalCluster(
                n_workers=workers or 1,
                threads_per_worker=1,
                processes=True,
                silence_logs=logging.ERROR,
                dashboard_address=":8787",
            )
            client = Client(cluster)
    try:
        link = client.dashboard_link
        n = len(client.scheduler_info().get("workers", {}))
        where = (
            f"a local Dask cluster of {n} worker process{'es' if n != 1 else ''}"
            if cluster
            else f"the Dask scheduler {scheduler} ({n} worker{'s' if n != 1 else ''} now)"
        )
        if not link:
            log(f"running on {where}; no dashboard")
        elif cluster is not None and importlib.util.find_spec("bokeh") is None:
            log(f"running on {where}; dashboard unavailable (bokeh is not installed: pip install bokeh)")
        else:
            log(f"running on {where}; dashboard {link}")
        if scheduler and n == 0:
            log("the scheduler has no workers yet: the subjects wait until some join")
        yield client
    finally:
        with warnings.catch_warnings(), contextlib.suppress(Exception):
            warnings.simplefilter("ignore")
            client.close()
            if cluster is not None:
                cluster.close()


def format_eta(seconds: float) -> str:
    s = int(round(max(0.0, seconds)))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _crash_record(task: SubjectTask, exc: BaseException) -> dict:
    msg = " ".join(str(exc).split())[:400] or type(exc).__name__
    return {
        "key": task.key,
        "reldir": task.reldir,
        "participant_id": f"sub-{task.subject}",
        "session_id": f"ses-{task.session}" if task.session else None,
        "stacks": len(task.stacks),
        "masks": "given" if task.masks else "automatic",
        "status": "failed",
        "this_run": "failed",
        "error": f"the task failed on the cluster ({type(exc).__name__}: {msg})",
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def run_tasks(
    client, tasks: list[SubjectTask], *, retries: int = 2, run_id: str = "", on_record=None, log=print
) -> list[dict]:
    """Submit one task per subject-session; as each ends, call ``on_record(record)`` and print a
    progress line with the ETA (from the mean time between finished subjects so far)."""
    from distributed import as_completed

    futs = {}
    for t in tasks:
        f = client.submit(run_subject, t, key=f"mgaussian-{t.key}-{run_id}", retries=retries, pure=False)
        futs[f] = t
    t0 = time.time()
    records = []
    for i, fut in enumerate(as_completed(list(futs)), 1):
        t = futs[fut]
        try:
            rec = fut.result()
        except Exception as exc:  # KilledWorker after too many deaths, an exception left after retries
            rec = _crash_record(t, exc)
        records.append(rec)
        if on_record is not None:
            on_record(rec)
        left = len(tasks) - i
        eta = f", ETA {format_eta((time.time() - t0) / i * left)}" if left else ""
        log(f"[{i}/{len(tasks)}] {t.key}: {describe(rec)}; {left} left{eta}")
    return records


def describe(rec: dict) -> str:
    """One line for a status record: done (time, slices excluded) or failed (reason)."""
    att = f", attempt {rec['attempts']}" if (rec.get("attempts") or 1) > 1 else ""
    if rec.get("status") == "failed":
        return f"failed: {rec.get('error')}{att}"
    if rec.get("this_run") == "skipped":
        return "already done (skipped)"
    ex = rec.get("excluded_slices")
    return (
        f"done in {rec.get('wall_s') or 0:.1f} s ({rec.get('stacks')} stacks, "
        f"{'?' if ex is None else ex} of {rec.get('slices', '?')} slices excluded{att})"
    )
