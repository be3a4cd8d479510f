"""Errors that the command line turns into one clean line: ``error: <where>: <what>``."""

from __future__ import annotations

__all__ = ["InputError", "warn", "defer_warnings", "flush_warnings", "discard_warnings", "add_warning_sink"]

import sys


class InputError(Exception):
    """A problem with something the user gave (a file or an option).

    ``where`` names the file or option, ``what`` says what is wrong. The CLI prints
    ``error: <where>: <what>`` on stderr and exits with code 2.
    """

    def __init__(self, where: str, what: str):
        self.where = str(where)
        self.what = str(what)
        super().__init__(f"{self.where}: {self.what}")


# While the command line checks its inputs, warnings are held back: if a later check fails, the
# error is the only line printed. A command flushes them once its inputs are all checked (the CLI
# flushes what is left when the command returns).
_pending: list[str] | None = None
_sinks: list = []


def warn(where: str, what: str) -> None:
    """Print a one-line warning for usable but odd input (held back while deferred)."""
    line = f"warning: {where}: {what}"
    if _pending is not None:
        _pending.append(line)
        return
    _emit(line)


def _emit(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
    for s in _sinks:
        s(line)


def defer_warnings() -> None:
    global _pending
    _pending = []


def flush_warnings() -> None:
    """Print the held-back warnings and stop deferring."""
    global _pending
    held, _pending = _pending or [], None
    for line in held:
        _emit(line)


def discard_warnings() -> None:
    global _pending
    _pending = None


def add_warning_sink(fn) -> None:
    """Also pass every printed warning line to ``fn`` (e.g. the --log file)."""
    _sinks.append(fn)


def clear_warning_sinks() -> None:
    _sinks.clear()
