"""The study's outputs beside the subjects': the derivative's ``dataset_description.json``, one
status record per subject-session, ``summary.tsv``, ``index.html`` and the mid-plane thumbnails.

Why status records: the summary has to cover every subject ever run into this folder (a study is
often run a few subjects at a time, and ``group`` rebuilds the summary without running anything),
including the failures, which leave no volume behind. So the command line writes
``<sub>/[<ses>/]log/<key>_status.json`` for every subject it handled (done, skipped as already
done, or failed with its one-line reason), and the summary is rebuilt from all of them each time.

Every file here is written atomically (a temporary file in the same folder, then a rename), the
summary's ``index.html`` last.
"""

from __future__ import annotations

__all__ = [
    "dataset_description",
    "check_dataset_description",
    "write_dataset_description",
    "status_path",
    "write_status",
    "read_statuses",
    "write_summary",
    "thumbnail",
    "SUMMARY_COLUMNS",
    "BIDS_VERSION",
]

import glob
import html
import json
import os
import tempfile
import time
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..io import atomic_write_text

BIDS_VERSION = "1.9.0"
SUMMARY_COLUMNS = (
    "participant_id",
    "session_id",
    "status",
    "error",
    "excluded_slices",
    "slices",
    "stacks",
    "masks",
    "resolution_mm",
    "shape",
    "wall_s",
    "attempts",
    "this_run",
    "finished",
    "volume",
    "report",
    "thumbnail",
)


def dataset_description(bids_dir: str, source: dict) -> dict:
    """The derivative's description (BIDS: Name, BIDSVersion, DatasetType, GeneratedBy, SourceDatasets)."""
    uri = Path(bids_dir).resolve().as_uri()
    src: dict = {"URL": uri}
    if isinstance(source.get("DatasetDOI"), str) and source["DatasetDOI"]:
        src["DOI"] = source["DatasetDOI"]
    name = source.get("Name") if isinstance(source.get("Name"), str) else os.path.basename(os.path.abspath(bids_dir))
    return {
        "Name": f"mgaussian reconstructions of {name}",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [
            {
                "Name": "mgaussian",
                "Version": __version__,
                "Description": "slice-to-volume reconstruction with magnetic 3D Gaussians (mgaussian bids)",
            }
        ],
        "SourceDatasets": [src],
        "DatasetLinks": {"raw": uri},
    }


def check_dataset_description(out_root: str, bids_dir: str) -> None:
    """Refuse an output folder that holds another pipeline's or another dataset's derivatives
    (mixing two studies' subjects in one summary would mislead)."""
    p = os.path.join(out_root, "dataset_description.json")
    uri = Path(bids_dir).resolve().as_uri()
    if os.path.exists(p):
        try:
            with open(p, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise InputError(p, "exists but is not a JSON object: not an mgaussian derivative folder")
        gen = [g.get("Name") for g in old.get("GeneratedBy", []) if isinstance(g, dict)]
        if "mgaussian" not in gen:
            raise InputError(
                p,
                f"belongs to another pipeline ({', '.join(map(str, gen)) or 'no GeneratedBy'}); "
                "choose another OUTPUT_DIR",
            )
        raw = (old.get("DatasetLinks") or {}).get("raw")
        if raw and raw != uri:
            raise InputError(p, f"holds derivatives of another dataset ({raw}); choose another OUTPUT_DIR")


def write_dataset_description(out_root: str, bids_dir: str, source: dict) -> str:
    """Write ``out_root/dataset_description.json`` (after :func:`check_dataset_description`)."""
    check_dataset_description(out_root, bids_dir)
    os.makedirs(out_root, exist_ok=True)
    p = os.path.join(out_root, "dataset_description.json")
    return atomic_write_text(p, json.dumps(dataset_description(bids_dir, source), indent=2) + "\n")


def status_path(out_root: str, reldir: str, key: str) -> str:
    return os.path.join(out_root, reldir, "log", f"{key}_status.json")


def write_status(out_root: str, record: dict) -> str:
    """Record how a subject-session ended (the dict ``task.run_subject`` returns)."""
    p = status_path(out_root, record["reldir"], record["key"])
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return atomic_write_text(p, json.dumps(record, indent=1) + "\n")


def read_statuses(out_root: str) -> list[dict]:
    """Every status record under ``out_root``, sorted by subject and session."""
    recs = []
    for pat in ("sub-*/log/*_status.json", "sub-*/ses-*/log/*_status.json"):
        for p in glob.glob(os.path.join(out_root, pat)):
            try:
                with open(p, encoding="utf-8") as f:
                    r = json.load(f)
            except (OSError, ValueError):
                continue
            if isinstance(r, dict) and "key" in r:
                recs.append(r)
    return sorted(recs, key=lambda r: (r.get("participant_id", ""), r.get("session_id") or ""))


def _cell(v) -> str:
    if v is None or v == "":
        return "n/a"
    if isinstance(v, float):
        return f"{v:.1f}"
    if isinstance(v, (list, tuple)):
        return "x".join(str(x) for x in v)
    return " ".join(str(v).split())  # no tab or newline inside a cell


def write_summary(out_root: str, records: list[dict] | None = None) -> tuple[str, str]:
    """Write ``summary.tsv`` and ``index.html`` (from every status record); returns their paths."""
    recs = read_statuses(out_root) if records is None else records
    rows = ["\t".join(SUMMARY_COLUMNS)]
    for r in recs:
        rows.append("\t".join(_cell(r.get(c)) for c in SUMMARY_COLUMNS))
    tsv = atomic_write_text(os.path.join(out_root, "summary.tsv"), "\n".join(rows) + "\n")
    page = atomic_write_text(os.path.join(out_root, "index.html"), _html(out_root, recs))
    return tsv, page


_CSS = (
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:middle;text-align:left}"
    ".done{color:#060}.failed{color:#a00;font-weight:bold}img{height:90px;display:block}"
)


def _html(out_root: str, recs: list[dict]) -> str:
    e = html.escape
    n_done = sum(r.get("status") == "done" for r in recs)
    n_failed = sum(r.get("status") == "failed" for r in recs)
    desc = {}
    try:
        with open(os.path.join(out_root, "dataset_description.json"), encoding="utf-8") as f:
            desc = json.load(f)
    except (OSError, ValueError):
        pass
    src = ", ".join(s.get("URL", "") for s in desc.get("SourceDatasets", []) if isinstance(s, dict))
    head = [
        "subject",
        "session",
        "volume",
        "status",
        "excluded slices",
        "stacks",
        "masks",
        "resolution",
        "shape",
        "time",
        "attempts",
    ]
    body = []
    for r in recs:
        thumb, report, vol = r.get("thumbnail"), r.get("report"), r.get("volume")
        link = report or vol
        img = f'<img src="{e(thumb)}" alt="mid-planes of {e(r["key"])}">' if thumb else ""
        cell = f'<a href="{e(link)}">{img or e(os.path.basename(link))}</a>' if link else img
        if r.get("status") == "failed":
            st = f'<span class="failed">failed</span>: {e(str(r.get("error") or ""))}'
        else:
            st = '<span class="done">done</span>' + (" (already done)" if r.get("this_run") == "skipped" else "")
        ex = "" if r.get("excluded_slices") is None else f'{r["excluded_slices"]} of {r.get("slices", "?")}'
        res = "" if r.get("resolution_mm") is None else f'{r["resolution_mm"]:g} mm'
        wall = "" if r.get("wall_s") is None else f'{r["wall_s"]:.0f} s'
        cells = [
            r.get("participant_id", ""),
            r.get("session_id") or "",
            None,
            None,
            ex,
            r.get("stacks", ""),
            r.get("masks", ""),
            res,
            _cell(r.get("shape")) if r.get("shape") else "",
            wall,
            r.get("attempts", ""),
        ]
        tds = [cell if i == 2 else st if i == 3 else e(str(c)) for i, c in enumerate(cells)]
        body.append("<tr>" + "".join(f"<td>{t}</td>" for t in tds) + "</tr>")
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mgaussian study summary</title>"
        f"<style>{_CSS}</style></head><body>\n<h1>mgaussian study summary</h1>\n"
        f"<p>{n_done} done, {n_failed} failed, {len(recs)} subject-sessions; source {e(src)}; "
        f"mgaussian {e(__version__)}; written {e(time.strftime('%Y-%m-%d %H:%M:%S'))}. "
        "Each picture shows the volume's three mid-planes and links to the subject's report. "
        '<a href="summary.tsv">summary.tsv</a></p>\n'
        "<table><tr>"
        + "".join(f"<th>{e(h)}</th>" for h in head)
        + "</tr>\n"
        + "\n".join(body)
        + "\n</table>\n</body></html>\n"
    )


def thumbnail(volume_path: str, png_path: str, height_in: float = 1.6, dpi: int = 80) -> str:
    """A PNG of the volume's three mid-planes (voxel axes, each shown with its voxel aspect).

    Uses matplotlib's object API, not pyplot: a Dask worker holds no global figure state."""
    import nibabel as nib
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    img = nib.load(volume_path)
    v = np.asarray(img.get_fdata(dtype=np.float32))
    if v.ndim > 3:
        v = v.reshape(v.shape[:3])
    z = [float(x) for x in img.header.get_zooms()[:3]]
    finite = v[np.isfinite(v)]
    hi = float(np.percentile(finite, 99.5)) if finite.size else 1.0
    planes = [
        (v[v.shape[0] // 2, :, :], z[2] / z[1]),
        (v[:, v.shape[1] // 2, :], z[2] / z[0]),
        (v[:, :, v.shape[2] // 2], z[1] / z[0]),
    ]
    widths = [p.shape[0] / (p.shape[1] * a) for p, a in planes]
    fig = Figure(figsize=(height_in * sum(widths), height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    x0 = 0.0
    for (p, a), w in zip(planes, widths):
        ax = fig.add_axes((x0 / sum(widths), 0, w / sum(widths), 1))
        ax.imshow(
            p.T, cmap="gray", origin="lower", vmin=0, vmax=hi if hi > 0 else None, aspect=a, interpolation="nearest"
        )
        ax.set_axis_off()
        x0 += w
    fig.set_facecolor("black")
    d = os.path.dirname(os.path.abspath(png_path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(png_path)}.", suffix=".png", dir=d)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", facecolor="black")
        os.replace(tmp, png_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return png_path
