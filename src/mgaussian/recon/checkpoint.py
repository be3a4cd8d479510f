"""Checkpoints of a reconstruction (issue 6): written atomically every ``interval_s`` seconds at an
iteration boundary, after each level's warm start and at the end of fitting, so that the same
command with ``--resume`` continues a killed run.

A checkpoint directory holds ``checkpoint.pt`` (the newest), ``checkpoint.prev.pt`` (the one
before it, kept until the new one is in place) and ``checkpoint.json`` (a small human-readable
summary: level, iteration, step, time). Each ``.pt`` is written to a temporary file in the same
folder, fsync'ed, then renamed, so a kill at any moment leaves a complete checkpoint behind.

A checkpoint records the settings and a fingerprint of the inputs it was written for; loading
it for other settings or inputs is refused. Settings that only change how fast the run goes, or
what is made of the finished fit (``COMPUTE_ONLY_KEYS``), may differ.
"""

from __future__ import annotations

__all__ = ["Checkpointer", "inputs_fingerprint", "COMPUTE_ONLY_KEYS", "CHECKPOINT", "PREVIOUS"]

import json
import os
import tempfile
import time

import torch

from .. import __version__
from ..errors import InputError, warn

FORMAT = "mgaussian-checkpoint/1"
CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
SUMMARY = "checkpoint.json"
# settings a resumed run may change: they change the speed, not the result (time_budget_s only
# decides where fitting stops), or only what is made of the fit once it is done (output_oversampling:
# the grid the volume is written on; the confidence map's settings: a map computed after the fit)
COMPUTE_ONLY_KEYS = (
    "threads",
    "device",
    "backend",
    "time_budget_s",
    "checkpoint_interval_s",
    "output_oversampling",
    "confidence",
    "confidence_probes",
    "confidence_ref",
    "confidence_misfit",
    "confidence_position_sd_mm",
    "confidence_position_smooth_mm",
)


def _file_id(p: str | None):
    if p is None:
        return None
    st = os.stat(p)
    return {"path": os.path.realpath(p), "size": int(st.st_size), "mtime_ns": int(st.st_mtime_ns)}


def inputs_fingerprint(stacks) -> list[dict]:
    """What identifies the inputs of a run: per stack its file and mask file (real path, size,
    modification time), voxel shape and slice thickness."""
    return [
        {
            "stack": _file_id(s.path),
            "mask": _file_id(s.mask_path),
            "shape": [int(x) for x in s.data.shape],
            "mask_shape": [int(x) for x in s.mask.shape],
            "thickness_mm": float(s.thickness),
        }
        for s in stacks
    ]


def _settings_key(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: v for k, v in d.items() if k not in COMPUTE_ONLY_KEYS}


def _differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k, "<unset>"), now.get(k, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k} ")
        elif a != b:
            out.append(f"{prefix}{k} {a!r} -> {b!r}")
    return out


def _fsync_dir(d: str) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    """Writes and reads the checkpoints of one run in ``directory``.

    ``config`` is the run's ReconConfig (or its dict) and ``inputs`` the run's
    ``inputs_fingerprint``; both are stored with every checkpoint and checked by ``load``."""

    def __init__(self, directory: str, config, inputs, interval_s: float = 30.0, log=None):
        self.dir = str(directory)
        self.settings = _settings_key(config)
        self.inputs = inputs
        self.interval_s = float(interval_s)
        self.log = log or (lambda s: None)
        self.path = os.path.join(self.dir, CHECKPOINT)
        self.prev_path = os.path.join(self.dir, PREVIOUS)
        self._last = time.time()
        self.n_saved = 0
        self.save_s = 0.0  # total time spent saving
        self.last_bytes = 0

    # ------------------------------------------------------------------ writing
    def maybe_save(self, state_fn, force: bool = False) -> bool:
        """Save ``state_fn()`` if ``interval_s`` has passed since the last save (or ``force``)."""
        if not force and time.time() - self._last < self.interval_s:
            return False
        self.save(state_fn())
        return True

    def save(self, state: dict) -> str:
        """Write ``state`` atomically as the newest checkpoint (the older one becomes PREVIOUS)."""
        t0 = time.time()
        os.makedirs(self.dir, exist_ok=True)
        d = {
            "format": FORMAT,
            "version": __version__,
            "saved_at": time.time(),
            "settings": self.settings,
            "inputs": self.inputs,
            "state": state,
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{CHECKPOINT}.", suffix=".partial", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(d, f)
                f.flush()
                os.fsync(f.fileno())
            self.last_bytes = os.path.getsize(tmp)
            if os.path.exists(self.path):
                os.replace(self.path, self.prev_path)  # load() falls back to it until the next line is done
            os.replace(tmp, self.path)
            _fsync_dir(self.dir)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        summary = {k: state.get(k) for k in ("level", "iteration", "cg_done", "step", "done", "elapsed_s")}
        summary.update(saved_at=d["saved_at"], bytes=self.last_bytes, version=__version__)
        self._write_summary(summary)
        self._last = time.time()
        self.n_saved += 1
        self.save_s += self._last - t0
        return self.path

    def _write_summary(self, summary: dict) -> None:
        fd, tmp = tempfile.mkstemp(prefix=f".{SUMMARY}.", suffix=".partial", dir=self.dir)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(summary, f)
            os.replace(tmp, os.path.join(self.dir, SUMMARY))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def remove_partials(self) -> int:
        """Delete temporary files a killed save left behind; returns how many."""
        n = 0
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if name.startswith((f".{CHECKPOINT}.", f".{SUMMARY}.")) and name.endswith(".partial"):
                    try:
                        os.unlink(os.path.join(self.dir, name))
                        n += 1
                    except OSError:
                        pass
        return n

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return os.path.isfile(self.path) or os.path.isfile(self.prev_path)

    def _read(self, p: str):
        d = torch.load(p, map_location="cpu", weights_only=False)
        if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("state"), dict):
            raise ValueError("not an mgaussian checkpoint")
        return d

    def load(self) -> dict | None:
        """The newest readable checkpoint's state, or None when the folder holds none.

        A corrupt or truncated newest checkpoint falls back to the previous one (with a warning);
        a checkpoint for other settings or inputs is refused (InputError)."""
        found = [p for p in (self.path, self.prev_path) if os.path.isfile(p)]
        if not found:
            return None
        errors = []
        for p in found:
            try:
                d = self._read(p)
            except Exception as exc:  # truncated, corrupt, or not ours
                errors.append(f"{os.path.basename(p)}: {type(exc).__name__}")
                continue
            if errors:
                warn(
                    "--resume",
                    f"{errors[0]} is unreadable; resuming from the previous checkpoint {os.path.basename(p)}",
                )
            self._check(d)
            return d["state"]
        raise InputError("--resume", f"no readable checkpoint in {self.dir} ({'; '.join(errors)})")

    def _check(self, d: dict) -> None:
        # the saved settings through the same filter: a checkpoint written before a key joined
        # COMPUTE_ONLY_KEYS still resumes
        diffs = _differences(_settings_key(d.get("settings") or {}), self.settings)
        saved_in, now_in = d.get("inputs") or [], self.inputs
        if len(saved_in) != len(now_in):
            diffs.append(f"number of stacks {len(saved_in)} -> {len(now_in)}")
        else:
            for i, (a, b) in enumerate(zip(saved_in, now_in)):
                diffs += _differences(a, b, prefix=f"stack {i + 1} ")
        if diffs:
            more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
            raise InputError(
                "--resume",
                f"checkpoint in {self.dir} was written for other inputs/settings: {'; '.join(diffs[:3])}{more}",
            )
