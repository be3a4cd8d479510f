"""Find each subject's stacks, sidecars and brain masks in a BIDS dataset.

Why a small layer of our own and not pybids: ``mgaussian bids`` needs four things from BIDS, all
fixed by its file-naming rules (a name is ``key-value`` pairs joined by ``_``, then a suffix,
then an extension starting at the first dot; subjects are ``sub-<label>`` folders, sessions
``ses-<label>`` folders inside them): the stacks of one suffix per subject-session, their JSON
sidecars (with the inheritance principle for ``SliceThickness``), brain masks in a derivatives
folder that carry the stack's entities, and the labels to filter on. pybids would bring
SQLAlchemy, pandas, formulaic and more into every install of a reconstruction tool, and it
indexes the whole tree into a database before answering; this module reads only the folders
of the subjects asked for, and the rules it follows are tested in ``tests/test_bids.py``.

What it accepts, on purpose:

* stacks: ``BIDS_DIR/sub-<s>/[ses-<t>/]<datatype>/sub-<s>[_ses-<t>]_..._<suffix>.nii[.gz]`` whose
  ``sub`` (and ``ses``) entities match their folders; files whose names do not follow the rules
  are skipped with a warning;
* masks (``--masks-dir``, else every folder in ``BIDS_DIR/derivatives`` but ``mgaussian``): in the
  subject's folder there, ``<stack name>_desc-brain_mask.nii[.gz]`` (the stack's full name, as
  in the MIALSRTK sample dataset) or the BIDS-derivatives form ``<stack entities>_desc-brain_mask
  .nii[.gz]`` (the stack's entities, ``desc-brain``, suffix ``mask``). Two different masks for
  one stack are an error (choose with ``--masks-dir``); a stack without one gets reconstruct's
  automatic mask;
* ``SliceThickness``: from the JSON sidecars that apply to the stack, the nearest one that has it
  (the stack's own, then the session's, the subject's and the dataset's ``[entities_]<suffix>
  .json`` whose entities are a subset of the stack's).
"""

from __future__ import annotations

__all__ = [
    "BidsName",
    "Session",
    "parse_name",
    "check_dataset",
    "find_sessions",
    "find_mask",
    "inherited_value",
    "mask_roots",
    "normalise_labels",
    "NIFTI_EXTENSIONS",
]

import json
import os
import re
from dataclasses import dataclass, field

from ..errors import InputError

NIFTI_EXTENSIONS = (".nii.gz", ".nii")
_ALNUM = re.compile(r"^[A-Za-z0-9]+$")
MASK_DESC = "brain"
MASK_SUFFIX = "mask"


@dataclass(frozen=True)
class BidsName:
    """A file name split by BIDS's rules: entities in file order, suffix, extension (with dot)."""

    entities: tuple[tuple[str, str], ...]
    suffix: str
    extension: str

    def get(self, key: str) -> str | None:
        for k, v in self.entities:
            if k == key:
                return v
        return None

    @property
    def entity_dict(self) -> dict[str, str]:
        return dict(self.entities)

    @property
    def stem(self) -> str:
        return "_".join([f"{k}-{v}" for k, v in self.entities] + [self.suffix])


def parse_name(filename: str) -> BidsName | None:
    """Split ``sub-01_ses-02_run-1_T2w.nii.gz`` into entities, suffix and extension.

    Returns None for a name that breaks the rules (a token that is neither ``key-value`` nor the
    final suffix, a key given twice, characters other than letters and digits)."""
    base = os.path.basename(filename)
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    tokens = stem.split("_")
    suffix = tokens[-1]
    if not _ALNUM.match(suffix):
        return None
    ents: list[tuple[str, str]] = []
    for t in tokens[:-1]:
        k, sep, v = t.partition("-")
        if not sep or not _ALNUM.match(k) or not _ALNUM.match(v) or any(k == kk for kk, _ in ents):
            return None
        ents.append((k, v))
    return BidsName(tuple(ents), suffix, "." + ext)


def normalise_labels(labels, prefix: str, option: str) -> list[str] | None:
    """``['sub-01', '02']`` -> ``['01', '02']`` (BIDS Apps take labels with or without the prefix)."""
    if not labels:
        return None
    out = []
    for lab in labels:
        v = lab[len(prefix) + 1 :] if lab.startswith(prefix + "-") else lab
        if not _ALNUM.match(v):
            raise InputError(option, f"{lab!r} is not a BIDS label (letters and digits only)")
        if v not in out:
            out.append(v)
    return out


def check_dataset(bids_dir: str) -> dict:
    """The dataset's ``dataset_description.json`` (a BIDS dataset must have one), checked."""
    if not os.path.exists(bids_dir):
        raise InputError(bids_dir, "BIDS folder not found")
    if not os.path.isdir(bids_dir):
        raise InputError(bids_dir, "is not a folder (expected a BIDS dataset)")
    desc = os.path.join(bids_dir, "dataset_description.json")
    if not os.path.isfile(desc):
        raise InputError(bids_dir, "no dataset_description.json: not a BIDS dataset")
    try:
        with open(desc, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError) as exc:
        raise InputError(desc, f"not valid JSON ({exc})") from None
    if not isinstance(d, dict):
        raise InputError(desc, "must hold a JSON object")
    return d


@dataclass
class Session:
    """One subject-session to reconstruct: its stacks (sorted), masks and sidecar facts."""

    subject: str  # label, without "sub-"
    session: str | None  # label, without "ses-", or None for a dataset without sessions
    stacks: list[str]  # absolute paths, in BIDS entity order (the first is the reference stack)
    masks: list[str | None]  # one per stack: absolute path or None (no mask found)
    sidecars: list[list[str]] = field(default_factory=list)  # per stack: JSON files that apply to it
    thicknesses: list[tuple[float, str] | None] = field(default_factory=list)  # (mm, sidecar path) per stack

    @property
    def key(self) -> str:
        """``sub-01`` or ``sub-01_ses-02``: names the subject-session in outputs and logs."""
        return f"sub-{self.subject}" + (f"_ses-{self.session}" if self.session else "")

    @property
    def reldir(self) -> str:
        """``sub-01`` or ``sub-01/ses-02``: the folder of its outputs inside the derivative."""
        return f"sub-{self.subject}" + (f"/ses-{self.session}" if self.session else "")


def _sort_key(name: BidsName):
    def part(v: str):
        return (0, int(v), "") if v.isdigit() else (1, 0, v)

    return tuple((k, part(v)) for k, v in name.entities) + ((name.suffix, (1, 0, "")),)


def _strip_ext(base: str) -> str | None:
    for ext in NIFTI_EXTENSIONS:
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return None


def mask_roots(bids_dir: str, masks_dir: str | None, exclude: tuple[str, ...] = ()) -> list[str]:
    """Folders searched for masks: ``--masks-dir``, else each ``BIDS_DIR/derivatives/*`` folder
    (not ``mgaussian``, nor any folder in ``exclude``: our own outputs)."""
    if masks_dir:
        return [os.path.abspath(masks_dir)]
    deriv = os.path.join(bids_dir, "derivatives")
    if not os.path.isdir(deriv):
        return []
    skip = {os.path.realpath(p) for p in exclude}
    out = []
    for n in sorted(os.listdir(deriv)):
        p = os.path.join(deriv, n)
        if n == "mgaussian" or n.startswith(".") or not os.path.isdir(p) or os.path.realpath(p) in skip:
            continue
        out.append(os.path.abspath(p))
    return out


def find_mask(stack: str, roots: list[str], subject: str, session: str | None) -> str | None:
    """The brain mask of ``stack`` in the derivative folders ``roots``, or None.

    Accepts ``<stack name>_desc-brain_mask.nii[.gz]`` and ``<stack entities>_desc-brain_mask
    .nii[.gz]`` anywhere in the subject's (and session's) folder of a root. Two different files
    are an error: which one is meant cannot be guessed."""
    stem = _strip_ext(os.path.basename(stack))
    sname = parse_name(os.path.basename(stack))
    want = sname.entity_dict if sname else None
    found: list[str] = []
    for root in roots:
        top = os.path.join(root, f"sub-{subject}")
        if session:
            top = os.path.join(top, f"ses-{session}")
        if not os.path.isdir(top):
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for fn in sorted(filenames):
                fstem = _strip_ext(fn)
                if fstem is None:
                    continue
                if fstem == f"{stem}_desc-{MASK_DESC}_{MASK_SUFFIX}":
                    found.append(os.path.join(dirpath, fn))
                    continue
                m = parse_name(fn)
                if m is None or m.suffix != MASK_SUFFIX or m.get("desc") != MASK_DESC or want is None:
                    continue
                if {k: v for k, v in m.entities if k != "desc"} == want:
                    found.append(os.path.join(dirpath, fn))
    uniq = sorted({os.path.realpath(p): p for p in found}.values())
    if len(uniq) > 1:
        raise InputError(
            stack, "several brain masks match it (" + ", ".join(uniq) + "); choose one folder with --masks-dir"
        )
    return os.path.abspath(uniq[0]) if uniq else None


def inherited_value(bids_dir: str, stack: str, key: str) -> tuple[list[str], tuple[object, str] | None]:
    """The JSON sidecars that apply to ``stack`` (BIDS inheritance principle), nearest first, and
    ``(value, sidecar)`` for ``key`` from the nearest one that holds it (None if none does).

    A sidecar applies when it sits in the stack's folder or one above it up to ``bids_dir``, has
    the stack's suffix and entities that are a subset of the stack's; within one folder the one
    with more entities is nearer."""
    name = parse_name(os.path.basename(stack))
    if name is None:
        return [], None
    ents = name.entity_dict
    root = os.path.realpath(bids_dir)
    d = os.path.dirname(os.path.realpath(stack))
    applicable: list[str] = []
    while True:
        level = []
        try:
            files = sorted(os.listdir(d))
        except OSError:
            files = []
        for fn in files:
            if not fn.endswith(".json"):
                continue
            j = parse_name(fn)
            if j is None or j.extension != ".json" or j.suffix != name.suffix:
                continue
            if all(ents.get(k) == v for k, v in j.entities):
                level.append((len(j.entities), os.path.join(d, fn)))
        applicable += [p for _, p in sorted(level, key=lambda t: -t[0])]
        if d == root or os.path.dirname(d) == d or not d.startswith(root + os.sep):
            break
        d = os.path.dirname(d)
    for p in applicable:
        try:
            with open(p, encoding="utf-8") as f:
                meta = json.load(f)
        except (OSError, ValueError) as exc:
            raise InputError(p, f"sidecar is not valid JSON ({exc})") from None
        if isinstance(meta, dict) and key in meta:
            return applicable, (meta[key], p)
    return applicable, None


def _stacks_in(folder: str, subject: str, session: str | None, suffix: str, warn) -> list[tuple[BidsName, str]]:
    out = []
    for dt in sorted(os.listdir(folder)):
        dpath = os.path.join(folder, dt)
        if dt.startswith(("ses-", ".")) or not os.path.isdir(dpath):
            continue
        for fn in sorted(os.listdir(dpath)):
            stem = _strip_ext(fn)
            if stem is None or not (stem == suffix or stem.endswith("_" + suffix)):
                continue
            name = parse_name(fn)
            if name is None or name.suffix != suffix:
                warn(os.path.join(dpath, fn), "name does not follow BIDS's rules (key-value pairs, suffix): skipped")
                continue
            if name.get("sub") != subject or (session is not None and name.get("ses") != session):
                warn(os.path.join(dpath, fn), "its sub/ses entities do not match its folder: skipped")
                continue
            out.append((name, os.path.abspath(os.path.join(dpath, fn))))
    return sorted(out, key=lambda t: _sort_key(t[0]))


def find_sessions(
    bids_dir: str,
    *,
    participant_labels=None,
    session_labels=None,
    suffix: str = "T2w",
    masks_dir: str | None = None,
    exclude_roots: tuple[str, ...] = (),
    warn=None,
) -> list[Session]:
    """Every subject-session to reconstruct, with its stacks, masks and sidecar thicknesses.

    Labels asked for that are not there, or that hold no stack, are errors (a typo must not
    silently run nothing); without labels, subjects without stacks are skipped with a warning."""
    warn = warn or (lambda where, what: None)
    subs = normalise_labels(participant_labels, "sub", "--participant-label")
    sess = normalise_labels(session_labels, "ses", "--session-label")
    if not _ALNUM.match(suffix):
        raise InputError("--suffix", f"{suffix!r} is not a BIDS suffix (letters and digits only)")
    present = sorted(
        n[4:]
        for n in os.listdir(bids_dir)
        if n.startswith("sub-") and _ALNUM.match(n[4:]) and os.path.isdir(os.path.join(bids_dir, n))
    )
    if subs is not None:
        missing = [s for s in subs if s not in present]
        if missing:
            raise InputError("--participant-label", f"no subject folder sub-{missing[0]} in {bids_dir}")
    roots = mask_roots(bids_dir, masks_dir, exclude_roots)
    out: list[Session] = []
    for s in subs if subs is not None else present:
        sdir = os.path.join(bids_dir, f"sub-{s}")
        ses_here = sorted(
            n[4:]
            for n in os.listdir(sdir)
            if n.startswith("ses-") and _ALNUM.match(n[4:]) and os.path.isdir(os.path.join(sdir, n))
        )
        folders = [(t, os.path.join(sdir, f"ses-{t}")) for t in ses_here] if ses_here else [(None, sdir)]
        if sess is not None:
            folders = [(t, f) for t, f in folders if t in sess]
        n_before = len(out)
        for t, folder in folders:
            found = _stacks_in(folder, s, t, suffix, warn)
            if not found:
                continue
            stacks = [p for _, p in found]
            ses = Session(s, t, stacks, [find_mask(p, roots, s, t) for p in stacks])
            for p in stacks:
                applicable, th = inherited_value(bids_dir, p, "SliceThickness")
                ses.sidecars.append(applicable)
                ses.thicknesses.append(th)
            out.append(ses)
        if len(out) == n_before:
            where = f"sub-{s}" + (" (sessions " + ", ".join(sess) + ")" if sess else "")
            if subs is not None:
                raise InputError("--participant-label", f"{where}: no *_{suffix}.nii[.gz] stacks in {sdir}")
            warn(sdir, f"no *_{suffix}.nii[.gz] stacks" + (" in the sessions asked for" if sess else "") + ": skipped")
    if not out:
        if sess is not None:
            names = ", ".join("ses-" + x for x in sess)
            raise InputError("--session-label", f"no session {names} with *_{suffix} stacks")
        raise InputError(bids_dir, f"no sub-*/[ses-*/]<datatype>/*_{suffix}.nii[.gz] stacks found")
    return out
