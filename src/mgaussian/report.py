"""The reconstruction report: ``index.html`` with PNG figures beside it (``reconstruct --output-report``).

Contents: orthogonal views of the result (world orientation labels), each input stack beside the
model's simulation of it and their difference, slice poses and weights over the fit and at its
end, loss curves, runtimes, the resolved configuration, the excluded slices, version and command
line. The page is self-contained apart from the PNGs (no scripts or styles from elsewhere); an
inline script marks ``<body data-images-ok="N/M">`` once the page has loaded (N of M images
decoded), which the tests read in headless Chromium.

Writing: the folder is created if missing (its parent must exist); every file is written
atomically (temporary file in the folder, then a rename), ``index.html`` last, so a reader never
sees a half-written page; no file that is an input is ever overwritten. Other files in the folder
are left alone.
"""

from __future__ import annotations

__all__ = ["write_report", "report_targets", "check_report_dir"]

import html
import os
import sys
import time

import numpy as np

from . import __version__
from .errors import InputError
from .geometry import voxel_sizes

_DPI = 80


def report_targets(out_dir: str, n_stacks: int) -> list[str]:
    """Every file the report may write (the PNGs, then index.html)."""
    names = ["orthogonal.png", "confidence.png", "loss.png", "poses.png", "slices.png"] + [
        f"stack_{i + 1:02d}.png" for i in range(n_stacks)
    ]
    return [os.path.join(out_dir, n) for n in names] + [os.path.join(out_dir, "index.html")]


def check_report_dir(out_dir: str, inputs=(), n_stacks: int = 0, where: str = "--output-report") -> str:
    """Refuse a report folder that is a file, an input, in a missing folder, or whose files would
    overwrite an input."""
    d = str(out_dir)
    if os.path.exists(d) and not os.path.isdir(d):
        raise InputError(where, f"{d} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(d))
    if not os.path.isdir(parent):
        raise InputError(where, f"{d}: folder {parent} does not exist")
    real_in = {os.path.realpath(str(q)) for q in inputs if q}
    if os.path.realpath(d) in real_in:
        raise InputError(where, f"{d} is an input")
    for t in report_targets(d, n_stacks):
        if os.path.realpath(t) in real_in:
            raise InputError(where, f"{t} is an input; refusing to overwrite it")
    if os.path.isdir(d) and not os.access(d, os.W_OK):
        raise InputError(where, f"{d} is not writable")
    return d


# ----------------------------------------------------------------------------- figures helpers


def _letter(v) -> str:
    """Nearest anatomical direction (RAS+ world: +x Right, +y Anterior, +z Superior) of a vector."""
    v = np.asarray(v, float)
    i = int(np.argmax(np.abs(v)))
    return ("LR", "PA", "IS")[i][int(v[i] > 0)]


def _opp(c: str) -> str:
    return {"L": "R", "R": "L", "P": "A", "A": "P", "I": "S", "S": "I"}[c]


def _show(ax, img2d, extent, h_dir, v_dir, title, cmap="gray", vmin=None, vmax=None):
    """Show img2d[h, v] with h along the screen's horizontal (increasing right) and v vertical
    (increasing up); label the four edges with the world directions of h_dir and v_dir."""
    im = ax.imshow(
        np.asarray(img2d).T,
        origin="lower",
        cmap=cmap,
        vmin=vmin,
        vmax=vmax,
        extent=extent,
        interpolation="nearest",
        aspect="equal",
    )
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=8)
    kw = {
        "transform": ax.transAxes,
        "color": "yellow",
        "fontsize": 9,
        "fontweight": "bold",
        "bbox": {"facecolor": "black", "alpha": 0.5, "pad": 1, "edgecolor": "none"},
    }
    h, v = _letter(h_dir), _letter(v_dir)
    ax.text(0.01, 0.5, _opp(h), ha="left", va="center", **kw)
    ax.text(0.99, 0.5, h, ha="right", va="center", **kw)
    ax.text(0.5, 0.01, _opp(v), ha="center", va="bottom", **kw)
    ax.text(0.5, 0.99, v, ha="center", va="top", **kw)
    return im


def _save(fig, path: str, inputs_real: set) -> str:
    from .io import _atomic_target

    if os.path.realpath(path) in inputs_real:
        raise InputError("--output-report", f"{path} is an input; refusing to overwrite it")
    tmp = _atomic_target(path)
    try:
        fig.savefig(tmp, format="png", dpi=_DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _ras_planes(vol, affine, region, centre=None):
    """The volume (and region) with its voxel axes turned to the nearest of RAS+ (a permutation and
    flips, no resampling): (volume, region, voxel-axis directions [3,3], extents mm, centre voxel of
    the planes: the region's box centre, or ``centre``, or the grid's)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    v = nib.orientations.apply_orientation(vol, ornt)
    r = nib.orientations.apply_orientation(region.astype(np.uint8), ornt).astype(bool) if region is not None else None
    A = affine @ nib.orientations.inv_ornt_aff(ornt, vol.shape)
    cols = A[:3, :3]
    sp = np.linalg.norm(cols, axis=0)
    if centre is None and r is not None and r.any():
        idx = np.argwhere(r)
        centre = (idx.min(0) + idx.max(0)) // 2
    c = (np.asarray(v.shape) // 2 if centre is None else np.asarray(centre)).astype(int)
    ext = [(0, v.shape[i] * sp[i]) for i in range(3)]
    return v, r, cols, ext, c


def _window(v, r) -> float:
    vals = v[r] if r is not None and r.any() else v.ravel()
    hi = float(np.percentile(vals, 99.5)) if vals.size else 1.0
    return hi if hi > 0 else 1.0


def _three_planes(axs, v, cols, ext, c, outline=None, **kw):
    """Axial, coronal and sagittal planes through voxel ``c`` of a RAS-turned volume (``outline``:
    a mask of the same grid drawn as a contour; ``kw``: vmin, vmax, cmap); returns the last image
    for a colour bar."""
    views = [
        (lambda x: x[:, :, c[2]], (0, 1), f"axial (voxel k={c[2]})"),
        (lambda x: x[:, c[1], :], (0, 2), f"coronal (voxel j={c[1]})"),
        (lambda x: x[c[0], :, :], (1, 2), f"sagittal (voxel i={c[0]})"),
    ]
    im = None
    for ax, (cut, (h, w), title) in zip(axs, views):
        im = _show(ax, cut(v), [*ext[h], *ext[w]], cols[:, h], cols[:, w], title, **kw)
        if outline is not None:
            plane = cut(outline).astype(float).T
            if plane.any() and not plane.all():
                ax.contour(plane, levels=[0.5], colors="red", linewidths=0.7, extent=[*ext[h], *ext[w]], origin="lower")
    return im


def _ortho_figure(vol, affine, region):
    """Three planes through the centre of the region's box, the volume's voxel axes turned to the
    nearest of RAS+ (a permutation and flips, no resampling)."""
    from matplotlib.figure import Figure

    v, r, cols, ext, c = _ras_planes(vol, affine, region)
    fig = Figure(figsize=(11, 4.0))
    axs = fig.subplots(1, 3)
    im = _three_planes(axs, v, cols, ext, c, vmin=0, vmax=_window(v, r))
    fig.colorbar(im, ax=list(axs), shrink=0.8, label="intensity")
    fig.suptitle(
        "Reconstruction: planes through the centre of the reconstructed region "
        "(voxel axes nearest to R, A, S; edge letters: world directions)",
        fontsize=9,
    )
    return fig


def _atlas_figure(vol_t, template_data, template_mask, affine, name: str):
    """The volume written on the template's grid (``--template``) above the template itself, the
    same planes through the centre of the template's mask, its outline drawn on both: how well the
    registration put the brain in atlas space."""
    from matplotlib.figure import Figure

    v, m, cols, ext, c = _ras_planes(vol_t, affine, template_mask)
    t, _, _, _, _ = _ras_planes(template_data, affine, None)
    fig = Figure(figsize=(11, 7.6))
    axs = fig.subplots(2, 3)
    _three_planes(axs[0], v, cols, ext, c, outline=m, vmin=0, vmax=_window(v, m))
    _three_planes(axs[1], t, cols, ext, c, outline=m, vmin=0, vmax=_window(t, m))
    axs[0, 0].set_ylabel("reconstruction, in atlas space", fontsize=8)
    axs[1, 0].set_ylabel(f"template {name}", fontsize=8)
    fig.suptitle(
        f"Atlas space: the volume as written on the grid of template {name} (top) and the template (bottom); "
        "red: the template's brain mask",
        fontsize=9,
    )
    return fig


def _confidence_figure(vol, conf, affine, region):
    """The volume's three planes through the centre of the region (as ``_ortho_figure``) above the
    same planes of the confidence map (0 to 1)."""
    from matplotlib.figure import Figure

    v, r, cols, ext, c = _ras_planes(vol, affine, region)
    cf, _, _, _, _ = _ras_planes(conf, affine, None)
    fig = Figure(figsize=(11, 7.5))
    axs = fig.subplots(2, 3)
    for row, (img, kw) in enumerate(
        ((v, {"vmin": 0, "vmax": _window(v, r)}), (cf, {"vmin": 0, "vmax": 1, "cmap": "viridis"}))
    ):
        im = _three_planes(axs[row], img, cols, ext, c, **kw)
        fig.colorbar(im, ax=list(axs[row]), shrink=0.8, label="intensity" if row == 0 else "confidence")
    fig.suptitle(
        "Top: the reconstruction; bottom: its confidence map (1: well determined by the data, "
        "0: not at all or outside the region)",
        fontsize=9,
    )
    return fig


def _best_slice(mask: np.ndarray) -> int:
    cnt = mask.reshape(-1, mask.shape[2]).sum(0)
    if cnt.max() == 0:
        return mask.shape[2] // 2
    ks = np.nonzero(cnt)[0]
    mid = ks[len(ks) // 2]
    return int(mid)


def _stack_figure(st, sim, title):
    """Middle slice (in plane) and a through-plane cut of the input, the simulation and input - simulation."""
    from matplotlib.figure import Figure

    cols = st.affine[:3, :3]
    sp = [st.frames.spacing[0], st.frames.spacing[1], st.frames.slice_spacing]
    m = st.mask.astype(bool)
    k = _best_slice(m)
    if m.any():
        idx = np.argwhere(m)
        a0, a1 = idx[:, 0].min(), idx[:, 0].max() + 1
        b0, b1 = idx[:, 1].min(), idx[:, 1].max() + 1
        pad = 3
        a0, b0 = max(0, a0 - pad), max(0, b0 - pad)
        a1, b1 = min(st.data.shape[0], a1 + pad), min(st.data.shape[1], b1 + pad)
        bc = int(np.argwhere(m[:, :, k])[:, 1].mean()) if m[:, :, k].any() else (b0 + b1) // 2
        vals = st.data[m]
    else:
        a0, a1, b0, b1 = 0, st.data.shape[0], 0, st.data.shape[1]
        bc = st.data.shape[1] // 2
        vals = st.data.ravel()
    hi = float(np.percentile(vals, 99.5)) or 1.0
    inp, sm = st.data, sim
    diff = np.where(m, inp - sm, np.nan) if m.any() else inp - sm
    dl = float(np.nanpercentile(np.abs(diff), 99.5)) if np.isfinite(diff).any() else 1.0
    dl = dl or 1.0
    import matplotlib

    div = matplotlib.colormaps["bwr"].with_extremes(bad="0.85")
    fig = Figure(figsize=(10.5, 6.6))
    axs = fig.subplots(2, 3, gridspec_kw={"height_ratios": [max((b1 - b0) * sp[1], 1), max(st.n_slices * sp[2], 1)]})
    ext_in = [0, (a1 - a0) * sp[0], 0, (b1 - b0) * sp[1]]
    ext_tp = [0, (a1 - a0) * sp[0], 0, st.n_slices * sp[2]]
    for j, (img, name, cmap, lo, top) in enumerate(
        [(inp, "input", "gray", 0, hi), (sm, "simulated", "gray", 0, hi), (diff, "difference (in mask)", div, -dl, dl)]
    ):
        im = _show(axs[0, j], img[a0:a1, b0:b1, k], ext_in, cols[:, 0], cols[:, 1], f"{name}, slice {k}", cmap, lo, top)
        _show(
            axs[1, j],
            img[a0:a1, bc, :],
            ext_tp,
            cols[:, 0],
            cols[:, 2],
            f"{name.split(' (')[0]}, across slices",
            cmap,
            lo,
            top,
        )
        if j == 2:
            fig.colorbar(im, ax=list(axs[:, 2]), shrink=0.6)
    fig.suptitle(f"{title}\nrow 1: slice {k} in plane; row 2: all slices along pixel column {bc}", fontsize=9)
    return fig


def _history_figure(history):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    ax = fig.subplots()
    steps = np.array([h["step"] for h in history])
    for key, lab in (("loss", "total loss"), ("l1", "smooth-L1")):
        ax.plot(steps, [h[key] for h in history], marker=".", label=lab)
    if any(h.get("ssim") is not None for h in history):
        ax.plot(
            steps,
            [1 - h["ssim"] if h.get("ssim") is not None else np.nan for h in history],
            marker=".",
            label="1 - SSIM",
        )
    levels = [h.get("level") for h in history]
    for i in range(1, len(levels)):
        if levels[i] != levels[i - 1]:
            ax.axvline((steps[i] + steps[i - 1]) / 2, color="gray", ls="--", lw=1)
    vals = np.array([h["loss"] for h in history], float)
    if np.all(vals > 0):
        ax.set_yscale("log")
    ax.set_xlabel("Adam step")
    ax.set_ylabel("loss")
    t = history[-1].get("time_s")
    ax.set_title(
        "Loss over the fit" + (f" (last record at {t:.1f} s)" if t is not None else "") + "; dashed: next level",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def _pose_traces(ph):
    """Per stack: (x, translation, rotation, mean weight) over the fit's pose records, the x axis'
    label and the panels' titles. x is the time into the fit: the pose rounds all run before the
    first Adam step (at step 0), so steps would stack them on one point. Translation and rotation
    are the slices' mean distance from their stack's mean pose (the motion between slices; a
    stack's registered pose, e.g. 20 deg, would hide it) where the records hold it, else the
    slices' mean pose (older records)."""
    use_time = all(rec.get("time_s") is not None for rec in ph)
    between = all("slice_motion_mm" in s for rec in ph for s in rec.get("stacks", []))
    keys = ("slice_motion_mm", "slice_motion_deg") if between else ("mean_translation_mm", "mean_rotation_deg")
    titles = (
        ("slices from their stack's mean pose (mm)", "slices from their stack's mean pose (deg)")
        if between
        else ("mean |translation| (mm)", "mean rotation (deg)")
    ) + ("mean slice weight",)
    traces = {}
    for rec in ph:
        for s in rec.get("stacks", []):
            xs, tr, ro, we = traces.setdefault(s.get("stack"), ([], [], [], []))
            xs.append(rec["time_s"] if use_time else rec.get("step"))
            for ys, k in ((tr, keys[0]), (ro, keys[1]), (we, "mean_weight")):
                y = s.get(k)
                ys.append(np.nan if y is None else y)
    return traces, ("time into the fit (s)" if use_time else "step"), titles


def _pose_history_figure(ph):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4))
    axs = fig.subplots(1, 3)
    traces, xlabel, titles = _pose_traces(ph)
    for nm, (xs, *ys3) in traces.items():
        for ax, ys in zip(axs, ys3):
            ax.plot(xs, ys, marker=".", label=str(nm))
    for ax, lab in zip(axs, titles):
        ax.set_xlabel(xlabel)
        ax.set_title(lab, fontsize=9)
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def _final_slices_figure(stacks, poses, weights):
    """Per stack, per slice: |translation|, rotation angle and weight at the end; excluded slices marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6.6))
    axs = fig.subplots(3, 1)
    for i, st in enumerate(stacks):
        nm = st.name
        p = poses[i] if i < len(poses) else {}
        sl = np.asarray(p.get("slices", []), int)
        t = np.linalg.norm(np.asarray(p.get("translation_mm", []), float).reshape(-1, 3), axis=1)
        r = np.degrees(np.linalg.norm(np.asarray(p.get("rotvec", []), float).reshape(-1, 3), axis=1))
        ln = axs[0].plot(sl, t, marker=".", label=nm)[0]
        axs[1].plot(sl, r, marker=".", color=ln.get_color())
        w = weights[i] if i < len(weights) else {}
        wsl = np.asarray(w.get("slices", []), int)
        if wsl.size and w.get("weight") is not None:
            axs[2].plot(wsl, np.asarray(w["weight"], float), marker=".", color=ln.get_color())
        ex = np.asarray(w.get("excluded", []) or [], int)
        if ex.size:
            axs[2].scatter(ex, np.zeros(len(ex)), marker="x", color=ln.get_color(), s=40, zorder=3)
    for ax, lab in zip(axs, ("|translation| (mm)", "rotation (deg)", "slice weight (x: excluded)")):
        ax.set_ylabel(lab, fontsize=8)
        ax.grid(alpha=0.3)
    axs[2].set_xlabel("slice index in the stack")
    axs[2].set_ylim(-0.05, 1.05)
    axs[0].legend(fontsize=7)
    axs[0].set_title("Final slice poses and weights", fontsize=9)
    fig.tight_layout()
    return fig


def _trajectory_figure(stacks, poses):
    """Per stack, each slice's pose against its acquisition time rank: the rotation (deg) and the
    displacement (mm) from the stack's mean pose, so a drift over time or a jump between slices
    acquired one after another shows as a curve or a step (issue 19). None when no stack has an
    acquisition order or a fitted pose per slice."""
    from matplotlib.figure import Figure

    from .geometry import rotvec_to_matrix
    from .recon.motion.poses import matrix_to_rotvec

    rows = []
    for i, st in enumerate(stacks):
        p = poses[i] if i < len(poses) else {}
        sl = np.asarray(p.get("slices", []), int)
        order = getattr(st, "slice_order", None)
        if order is None or sl.size < 2:
            continue
        rv = np.asarray(p.get("rotvec", []), float).reshape(-1, 3)
        t = np.asarray(p.get("translation_mm", []), float).reshape(-1, 3)
        R_mean = rotvec_to_matrix(rv.mean(0))
        turn = np.degrees(
            np.linalg.norm(matrix_to_rotvec(np.einsum("kij,lj->kil", rotvec_to_matrix(rv), R_mean)), axis=1)
        )
        shift = np.linalg.norm(t - t.mean(0), axis=1)
        rank = np.asarray(order, float)[sl]
        k = np.argsort(rank, kind="stable")
        rows.append((st.name, rank[k], turn[k], shift[k]))
    if not rows:
        return None
    fig = Figure(figsize=(9, 4.8))
    axs = fig.subplots(2, 1, sharex=True)
    for nm, rank, turn, shift in rows:
        ln = axs[0].plot(rank, turn, marker=".", label=nm)[0]
        axs[1].plot(rank, shift, marker=".", color=ln.get_color())
    axs[0].set_ylabel("turn from the stack's mean (deg)", fontsize=8)
    axs[1].set_ylabel("shift from the stack's mean (mm)", fontsize=8)
    axs[1].set_xlabel("acquisition time rank within the stack")
    for ax in axs:
        ax.grid(alpha=0.3)
    axs[0].legend(fontsize=7)
    axs[0].set_title("Slice poses over acquisition time", fontsize=9)
    fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------- html


def _table(rows, head=None) -> str:
    e = html.escape
    out = ["<table>"]
    if head:
        out.append("<tr>" + "".join(f"<th>{e(str(h))}</th>" for h in head) + "</tr>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:1100px;color:#222}
h1{font-size:1.4em}h2{font-size:1.15em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;font-size:0.85em;margin:0.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}
th{background:#f2f2f2}img{max-width:100%;border:1px solid #ddd}.note{color:#555;font-style:italic}
code{background:#f5f5f5;padding:1px 3px}"""

_SCRIPT = """<script>
window.addEventListener('load', function () {
  var imgs = document.images, ok = 0;
  for (var i = 0; i < imgs.length; i++) { if (imgs[i].complete && imgs[i].naturalWidth > 0) ok++; }
  document.body.setAttribute('data-images-ok', ok + '/' + imgs.length);
});
</script>"""


def _poses_section(result, stacks, d: str, real_in: set) -> list[str]:
    """The slice poses over the fit, the final poses and weights, and the excluded slices."""
    parts = []
    parts.append("<h2>Slice poses and weights</h2>")
    ph = list(result.pose_history or [])
    if ph:
        _save(_pose_history_figure(ph), os.path.join(d, "poses.png"), real_in)
        parts.append(
            '<p>Means over each stack\'s slices during the fit.</p><img src="poses.png" alt="slice poses over the fit">'
        )
    else:
        parts.append(
            '<p class="note">No motion correction in this run: the slice poses were not optimised (no pose history).</p>'
        )
    poses, weights = list(result.poses or []), list(result.slice_weights or [])
    moved = any(
        np.any(np.asarray(p.get("rotvec", []), float)) or np.any(np.asarray(p.get("translation_mm", []), float))
        for p in poses
    )
    weighted = any(np.any(np.asarray(w.get("weight", []), float) != 1.0) or (w.get("excluded") or []) for w in weights)
    if moved or weighted or ph:
        _save(_final_slices_figure(stacks, poses, weights), os.path.join(d, "slices.png"), real_in)
        parts.append('<img src="slices.png" alt="final slice poses and weights">')
    else:
        parts.append('<p class="note">Every slice at its nominal pose with weight 1.</p>')
    traj = _trajectory_figure(stacks, poses) if (moved or ph) else None
    if traj is not None:
        _save(traj, os.path.join(d, "trajectory.png"), real_in)
        parts.append('<img src="trajectory.png" alt="slice poses over acquisition time">')
    ex_rows = [
        [w.get("stack"), ", ".join(str(k) for k in w.get("excluded") or [])] for w in weights if w.get("excluded")
    ]
    parts.append(
        "<h3>Excluded slices</h3>"
        + (_table(ex_rows, ["stack", "slice indices"]) if ex_rows else '<p class="note">none</p>')
    )
    return parts


def _run_sections(result, cfg: dict, extra: dict, timings: dict, volume_path, t0: float) -> list[str]:
    """Runtime (and how the fit was stopped), the resolved configuration, and the run's record."""
    e = html.escape
    parts = []
    rt = [[k, f"{v:.2f}" if isinstance(v, (int, float)) else str(v)] for k, v in (result.timings or {}).items()]
    if extra.get("wall_s") is not None:
        rt.append(["reconstruct command until the report (wall)", f"{extra['wall_s']:.2f}"])
    rt += [[f"report: {k}", f"{v:.2f}"] for k, v in timings.items()]
    rt.append(["report: total", f"{time.time() - t0:.2f}"])
    cuts = list(getattr(result, "budget_cuts", None) or [])
    if cuts:
        stop = (
            f'<p class="note">The time budget ({cfg.get("time_budget_s")} s) cut the fit short: '
            + e("; ".join(cuts))
            + ". The result depends on the machine's speed and load.</p>"
        )
    else:
        stop = "<p>The fixed schedule ended the fit: the same inputs and settings give the same volume.</p>"
    pc = getattr(result, "prior_choice", None)
    if pc:
        tried = ", ".join(f"x{f}: {err:.4g}" for f, err in sorted(pc["errors"].items(), reverse=True))
        stop += (
            f"<p>The last level's prior weight: x{pc['factor']:.3f} the rule's, chosen by every "
            f"{pc['holdout_every']}th slice held out (their mean squared error per factor tried: {e(tried)}; "
            "a step down is kept where it beats the slices' scatter).</p>"
        )
    parts.append(
        "<h2>Runtime (s)</h2>" + _table(rt, ["step", "seconds"]) + stop + f"<p>Backend {e(str(result.backend))}.</p>"
    )
    parts.append(
        "<h2>Resolved configuration</h2>" + _table([[k, _fmt(v)] for k, v in cfg.items()], ["setting", "value"])
    )
    cmd = extra.get("command") or sys.argv
    files = [["volume", os.path.abspath(str(volume_path))]]
    for k, lab in (("config_json", "settings and timings (JSON)"), ("model", "model")):
        if extra.get(k):
            files.append([lab, os.path.abspath(str(extra[k]))])
    parts.append(
        "<h2>Run</h2>"
        + _table(
            [
                ["mgaussian version", __version__],
                ["command line", " ".join(str(c) for c in cmd)],
                ["written", time.strftime("%Y-%m-%d %H:%M:%S")],
            ]
            + files
        )
    )
    return parts


def _atlas_section(atlas: dict, d: str, real_in) -> str:
    """The atlas-space view (``--template``): the written volume over the template, and the
    registration's record. ``atlas``: volume, affine (the template's grid), template (its
    ``Template.describe()``), transform, ncc, and optionally path (where that volume was written)."""
    from .atlas import load_templates

    info = atlas["template"]
    tpl = load_templates(info["path"], info.get("mask"), where="report")[0]
    fig = _atlas_figure(atlas["volume"], tpl.data, tpl.mask, atlas["affine"], info["name"])
    _save(fig, os.path.join(d, "atlas.png"), real_in)
    e = html.escape
    written = f"<code>{e(os.path.abspath(str(atlas['path'])))}</code> " if atlas.get("path") else ""
    return (
        f"<h3>Atlas space</h3><p>The volume {written}is written on the grid of template "
        f"<code>{e(str(info['name']))}</code> ({e(str(atlas['transform']))} registration, NCC "
        f"{_fmt(atlas.get('ncc'))} inside the template's mask); the native volume (above) is kept beside it.</p>"
        '<img src="atlas.png" alt="the reconstruction in atlas space above the template">'
    )


def write_report(out_dir, result, stacks, volume_path, sim_stacks=None, extra=None, inputs=()) -> str:
    """Write the report of a reconstruction into ``out_dir``; returns the path of index.html.

    ``result``: ReconResult; ``stacks``: the io.Stack inputs; ``volume_path``: where the volume was
    written; ``sim_stacks``: the model's simulation of each stack (computed with
    :func:`mgaussian.recon.sample.simulate_stacks_from_model` when None); ``extra``: optional dict
    with "command" (list), "wall_s", "model" (path), "config_json" (path), "atlas_view" (with
    ``--template``: see :func:`_atlas_section`); ``inputs``: further
    paths never to overwrite (the stacks, masks and volume are always protected).
    """
    import matplotlib.figure  # noqa: F401  (figures are drawn with matplotlib's Agg canvas, no pyplot state)

    t0 = time.time()
    extra = dict(extra or {})
    d = str(out_dir)
    prot = list(inputs) + [s.path for s in stacks] + [s.mask_path for s in stacks] + [volume_path]
    check_report_dir(d, prot, len(stacks))
    real_in = {os.path.realpath(str(q)) for q in prot if q}
    os.makedirs(d, exist_ok=True)
    timings = {}

    if sim_stacks is None:
        from .recon.sample import simulate_stacks_from_model

        ts = time.time()
        sim_stacks = simulate_stacks_from_model(result.field, result.nrf, result, stacks, backend=result.backend)
        timings["simulate_stacks_s"] = time.time() - ts
    from .recon.sample import stack_scores

    e = html.escape
    parts = []
    figs_t = time.time()
    _save(_ortho_figure(result.volume, result.affine, result.region), os.path.join(d, "orthogonal.png"), real_in)
    cfg = result.config.to_dict()
    sec = [
        f"<h2>Reconstruction</h2><p>Volume <code>{e(os.path.abspath(str(volume_path)))}</code>: "
        f"{' x '.join(str(s) for s in result.volume.shape)} voxels at "
        f"{_fmt(float(voxel_sizes(result.affine)[0]))} mm (the model's resolution "
        f"{_fmt(cfg.get('output_resolution'))} mm), "
        f"{result.field.num_gaussians} Gaussians, neural residual field {'on' if result.nrf is not None else 'off'}.</p>",
        '<img src="orthogonal.png" alt="orthogonal views of the reconstruction">',
    ]
    parts += sec
    conf = getattr(result, "confidence", None)
    if conf is not None:
        _save(
            _confidence_figure(result.volume, conf, result.affine, result.region),
            os.path.join(d, "confidence.png"),
            real_in,
        )
        info = getattr(result, "confidence_info", None) or {}
        parts.append(
            "<h3>Confidence</h3><p>How well the data determine each voxel: 1 / (1 + sd / sd_ref), sd the "
            "intensity's approximate posterior standard deviation (the slices reaching it, their weights "
            f"and the smoothness prior), sd_ref = {_fmt(info.get('sd_ref'))} (docs/clinical.md). Mean "
            f"{_fmt(info.get('mean_confidence_in_region'))} in the region.</p>"
            '<img src="confidence.png" alt="the reconstruction and its confidence map">'
        )

    atlas = extra.get("atlas_view")
    if atlas is not None:
        parts.append(_atlas_section(atlas, d, real_in))

    parts.append(
        "<h2>Input stacks and the model's simulation of them</h2>"
        "<p>Each slice rendered from the model through the slice profile at its fitted pose "
        "(<code>mgaussian sample-slices</code>); scores inside the stack mask (PSNR after a gain/offset match).</p>"
    )
    score_rows = []
    for i, (st, sim) in enumerate(zip(stacks, sim_stacks)):
        sc = stack_scores(sim, st)
        score_rows.append(
            [
                st.name,
                "x".join(str(s) for s in st.data.shape),
                _fmt(st.thickness),
                f"{sc['ncc']:.4f}",
                f"{sc['psnr']:.2f}",
            ]
        )
        name = f"stack_{i + 1:02d}.png"
        _save(
            _stack_figure(st, sim, f"{st.name}: NCC {sc['ncc']:.4f}, PSNR {sc['psnr']:.2f} dB in the mask"),
            os.path.join(d, name),
            real_in,
        )
    parts.append(_table(score_rows, ["stack", "shape", "thickness (mm)", "NCC", "PSNR (dB)"]))
    for i, st in enumerate(stacks):
        parts.append(
            f"<h3>{e(st.name)}</h3><p><code>{e(st.path)}</code>"
            + (
                f", mask <code>{e(st.mask_path)}</code>"
                if st.mask_path
                else ", automatic mask"
                if not st.mask.all()
                else ", no mask"
            )
            + "</p>"
            f'<img src="stack_{i + 1:02d}.png" alt="{e(st.name)}: input, simulation, difference">'
        )

    parts += _poses_section(result, stacks, d, real_in)

    parts.append("<h2>Loss</h2>")
    hist = list(result.history or [])
    if hist:
        _save(_history_figure(hist), os.path.join(d, "loss.png"), real_in)
        parts.append('<img src="loss.png" alt="loss curves">')
    else:
        parts.append('<p class="note">No optimiser steps were recorded (no Adam iterations).</p>')
    timings["figures_s"] = time.time() - figs_t

    parts += _run_sections(result, cfg, extra, timings, volume_path, t0)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>mgaussian report: {e(os.path.basename(str(volume_path)))}</title><style>{_CSS}</style></head>\n"
        f"<body><h1>mgaussian reconstruction report</h1>\n" + "\n".join(parts) + "\n" + _SCRIPT + "\n</body></html>\n"
    )
    from .io import atomic_write_text

    idx = os.path.join(d, "index.html")
    if os.path.realpath(idx) in real_in:
        raise InputError("--output-report", f"{idx} is an input; refusing to overwrite it")
    atomic_write_text(idx, page)
    return idx
