"""When each slice of a stack was acquired: its acquisition time rank.

Fetal stacks are acquired one slice (one single-shot) at a time over 20-60 s, usually
interleaved, so a fetus that moves once splits a stack into two passes that disagree with each
other while neighbours in *time* (two slices apart in space) still agree. A motion model over
acquisition time needs each slice's rank in time; this module says where it comes from.

A slice's *rank* is its position in time, 0 for the first acquired; slices acquired together
(simultaneous multi-slice, "multiband") share a rank. Sources, in this order:

1. ``--slice-order interleaved|sequential|FILE`` (given explicitly: used as is for every stack,
   the sidecars are not read for the order);
2. the BIDS JSON sidecar beside the stack: ``SliceTiming`` (seconds per slice; equal times share a
   rank), else ``MultibandAccelerationFactor`` M (slices k and k + K/M share a time, the K/M
   groups in the default order below);
3. the default: ``interleaved`` in the Siemens product convention, which the shipped real stacks
   (Siemens Aera HASTE) follow: with an odd slice count 0, 2, 4, ... then 1, 3, 5, ...; with an
   even count 1, 3, 5, ... then 0, 2, 4, ... (Siemens starts with the second slice so that the
   last slice of the first pass is not next to the first of the second; CMRR's multiband
   slice-order note 2013, section 2.2.1; GE and Philips single-package scans start with slice 0
   whatever the count). Slice indices are the NIfTI's third voxel axis; a converter that stored
   the slices in the opposite direction to the scanner's numbering swaps the two passes of an
   even count, which only a sidecar or ``--slice-order FILE`` can tell.

An empty ``SliceTiming`` list (dcm2niix writes ``[]`` when the DICOMs hold no timing, as in the
MIALSRTK sidecars of the shipped real data) counts as absent.

``FILE`` (``--slice-order FILE``) gives the order per stack, as the slice indices (0-based, along
the third voxel axis) in the order they were acquired; slices acquired together are one group:

* JSON: a list with one entry per stack (in ``--input-stacks`` order), or an object keyed by the
  stack's file name (``stack_00.nii.gz``) or path. An entry is a list whose items are slice
  indices or lists of indices acquired together (``[[0, 5], [2, 7], ...]``), or the word
  ``"interleaved"`` / ``"sequential"``, or ``{"SliceTiming": [...]}`` (seconds per slice).
* text: one line per stack in ``--input-stacks`` order, slice indices separated by spaces or
  commas, a group joined by ``+`` (``0+5 2+7 4+9 ...``), or one word ``interleaved`` /
  ``sequential``; blank lines and lines starting with ``#`` are skipped.

Every slice must appear exactly once.
"""

from __future__ import annotations

__all__ = [
    "ORDER_KINDS",
    "acquisition_order",
    "ranks_from_order",
    "order_from_ranks",
    "ranks_from_timing",
    "order_ranks",
    "resolve_slice_orders",
    "slice_order_from_sidecar",
]

import json
import os
from pathlib import Path

import numpy as np

from .errors import InputError

ORDER_KINDS = ("interleaved", "sequential")


def _pattern(n: int, kind: str) -> list[int]:
    """The order (positions 0..n-1 in the order acquired) of one package of n slices."""
    if kind == "sequential":
        return list(range(n))
    if kind == "interleaved":
        # Siemens product convention (module docstring): even counts start with the second slice
        first = 1 if n % 2 == 0 else 0
        return list(range(first, n, 2)) + list(range(1 - first, n, 2))
    raise ValueError(f"unknown slice order {kind!r} ({', '.join(ORDER_KINDS)})")


def acquisition_order(n: int, kind: str = "interleaved", packages: int = 1, multiband: int = 1) -> list[list[int]]:
    """Slice indices in the order acquired, as groups acquired together.

    ``packages`` P (Siemens "concatenations", Philips "packages"): slice k belongs to package
    k mod P, the packages are acquired one after the other, each in ``kind`` order over its own
    slices. ``multiband`` M: slices k and k + n/M are excited together (n must be a multiple of
    M); the n/M groups follow the pattern."""
    if n < 1:
        raise ValueError("a stack has at least one slice")
    if multiband < 1 or n % multiband:
        raise ValueError(f"multiband factor {multiband} does not divide {n} slices")
    shots = n // multiband
    if packages < 1 or packages > shots:
        raise ValueError(f"{packages} packages for {shots} slices")
    groups = []
    for p in range(packages):
        members = list(range(p, shots, packages))
        for j in _pattern(len(members), kind):
            s = members[j]
            groups.append([s + m * shots for m in range(multiband)])
    return groups


def ranks_from_order(groups, n: int) -> np.ndarray:
    """Time rank [n] of every slice from the groups in acquisition order (ValueError if a slice is
    missing, repeated or out of range)."""
    ranks = np.full(n, -1, dtype=np.int64)
    for r, g in enumerate(groups):
        for s in g:
            if not (0 <= s < n):
                raise ValueError(f"slice index {s} outside 0..{n - 1}")
            if ranks[s] >= 0:
                raise ValueError(f"slice {s} is listed twice")
            ranks[s] = r
    missing = np.flatnonzero(ranks < 0)
    if len(missing):
        raise ValueError(f"{len(missing)} of {n} slices are not listed (e.g. slice {int(missing[0])})")
    return ranks


def order_from_ranks(ranks) -> list[list[int]]:
    """The inverse of :func:`ranks_from_order`: groups of slice indices in acquisition order."""
    ranks = np.asarray(ranks)
    return [sorted(int(s) for s in np.flatnonzero(ranks == r)) for r in np.unique(ranks)]


def ranks_from_timing(times) -> np.ndarray:
    """Dense time ranks of slice times (equal times, to 0.1 ms, share a rank: multiband)."""
    t = np.round(np.asarray(times, dtype=np.float64), 4)
    return np.unique(t, return_inverse=True)[1].astype(np.int64)


def order_ranks(n: int, kind: str = "interleaved", packages: int = 1, multiband: int = 1) -> np.ndarray:
    """Time rank [n] of every slice of an ``n``-slice stack acquired in ``kind`` order."""
    return ranks_from_order(acquisition_order(n, kind, packages, multiband), n)


def _number_list(v) -> bool:
    return isinstance(v, list) and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def slice_order_from_sidecar(stack_path: str, n: int) -> tuple[np.ndarray, str] | None:
    """(ranks, source) from the stack's BIDS sidecar, or None when it says nothing about timing.

    Errors (one line, the sidecar's path): SliceTiming of another length than the slice count, not
    numbers, negative or not finite; a multiband factor that is not a positive integer dividing
    the slice count."""
    from .io import sidecar_path

    sc = sidecar_path(stack_path)
    if not sc.exists():
        return None
    try:
        meta = json.loads(sc.read_text())
    except Exception as exc:
        raise InputError(str(sc), f"sidecar is not valid JSON: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(meta, dict):
        return None
    st = meta.get("SliceTiming")
    if st is not None and st != []:  # dcm2niix writes [] when the DICOMs hold no timing
        if not _number_list(st):
            raise InputError(str(sc), "SliceTiming must be a list of numbers (seconds per slice)")
        if len(st) != n:
            raise InputError(str(sc), f"SliceTiming has {len(st)} entries for {n} slices")
        t = np.asarray(st, dtype=np.float64)
        if not np.all(np.isfinite(t)) or np.any(t < 0):
            raise InputError(str(sc), "SliceTiming must hold finite times >= 0 (seconds)")
        return ranks_from_timing(t), f"sidecar SliceTiming ({sc})"
    mb = meta.get("MultibandAccelerationFactor")
    if mb is not None:
        if isinstance(mb, bool) or not isinstance(mb, (int, float)) or mb != int(mb) or mb < 1:
            raise InputError(str(sc), f"MultibandAccelerationFactor must be a positive integer, got {mb!r}")
        mb = int(mb)
        if n % mb:
            raise InputError(str(sc), f"MultibandAccelerationFactor {mb} does not divide the {n} slices")
        if mb > 1:
            return order_ranks(
                n, "interleaved", multiband=mb
            ), f"sidecar MultibandAccelerationFactor {mb}, groups in default interleaved order ({sc})"
    return None


def _entry_ranks(entry, n: int, where: str) -> np.ndarray:
    if isinstance(entry, str):
        if entry.strip().lower() not in ORDER_KINDS:
            raise InputError(where, f"unknown slice order {entry!r} (interleaved, sequential or a list of slices)")
        return order_ranks(n, entry.strip().lower())
    if isinstance(entry, dict):
        if set(entry) != {"SliceTiming"} or not _number_list(entry["SliceTiming"]):
            raise InputError(where, "an object entry must be {\"SliceTiming\": [seconds per slice]}")
        if len(entry["SliceTiming"]) != n:
            raise InputError(where, f"SliceTiming has {len(entry['SliceTiming'])} entries for {n} slices")
        return ranks_from_timing(entry["SliceTiming"])
    if not isinstance(entry, list):
        raise InputError(where, f"expected a list of slice indices, got {type(entry).__name__}")
    groups = []
    for g in entry:
        g = g if isinstance(g, list) else [g]
        if not g or not all(isinstance(s, int) and not isinstance(s, bool) for s in g):
            raise InputError(where, f"slice indices must be integers (or lists of integers), got {g!r}")
        groups.append(g)
    try:
        return ranks_from_order(groups, n)
    except ValueError as exc:
        raise InputError(where, f"{exc} (a stack of {n} slices)") from None


def _parse_text(text: str, path: str) -> list:
    entries = []
    for line in text.splitlines():
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if s.lower() in ORDER_KINDS:
            entries.append(s.lower())
            continue
        groups = []
        for tok in s.replace(",", " ").split():
            try:
                groups.append([int(x) for x in tok.split("+")])
            except ValueError:
                raise InputError(path, f"not a slice index: {tok!r}") from None
        entries.append(groups)
    return entries


def _order_file(path: str, stack_paths: list[str], counts: list[int]) -> list[tuple[np.ndarray, str]]:
    if not os.path.isfile(path):
        raise InputError("--slice-order", f"{path}: not interleaved, sequential or an existing file")
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        if text.lstrip()[:1] in ("[", "{"):
            raise InputError(path, "looks like JSON but does not parse") from None
        data = _parse_text(text, path)
    if isinstance(data, dict):
        entries = []
        for p in stack_paths:
            for key in (p, os.path.basename(p), os.path.realpath(p)):
                if key in data:
                    entries.append(data[key])
                    break
            else:
                raise InputError(path, f"no entry for stack {os.path.basename(p)}")
    elif isinstance(data, list):
        entries = data
        if len(entries) != len(stack_paths):
            raise InputError(path, f"{len(entries)} slice orders given for {len(stack_paths)} stacks")
    else:
        raise InputError(path, "expected a list (one entry per stack) or an object keyed by stack file name")
    return [
        (_entry_ranks(e, n, f"{path}: stack {i} ({os.path.basename(p)})"), f"file {path}")
        for i, (e, p, n) in enumerate(zip(entries, stack_paths, counts))
    ]


def resolve_slice_orders(stack_paths, counts, explicit: str | None = None) -> list[tuple[np.ndarray, str]]:
    """(time ranks [K], source) per stack, by the rules of the module docstring.

    ``explicit`` is the ``--slice-order`` value (``interleaved``, ``sequential`` or a file)."""
    stack_paths = [str(p) for p in stack_paths]
    counts = [int(n) for n in counts]
    if explicit is not None:
        kind = explicit.strip().lower()
        if kind in ORDER_KINDS:
            return [(order_ranks(n, kind), f"option --slice-order {kind}") for n in counts]
        return _order_file(explicit, stack_paths, counts)
    out = []
    for p, n in zip(stack_paths, counts):
        got = slice_order_from_sidecar(p, n)
        if got is None:
            note = "; the sidecar's SliceTiming is empty" if _empty_timing(p) else ""
            got = (order_ranks(n, "interleaved"), f"default interleaved (Siemens{note})")
        out.append(got)
    return out


def _empty_timing(stack_path: str) -> bool:
    from .io import sidecar_path

    try:
        meta = json.loads(sidecar_path(stack_path).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("SliceTiming") == []
