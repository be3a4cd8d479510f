"""Errors that the command line turns into one clean line: ``error: <where>: <what>``."""

from __future__ import annotations

__all__ = ["InputError", "warn"]

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


def warn(where: str, what: str) -> None:
    """Print a one-line warning for usable but odd input."""
    print(f"warning: {where}: {what}", file=sys.stderr)
