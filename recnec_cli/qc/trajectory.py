"""Pictures of a patient's timeline (:mod:`recnec_cli.timeline`): the trajectory of one patient
and the earlier and current T1ce of one study side by side.

Both are PNGs without a time stamp (same input, same bytes) that carry what they plot as a JSON
text chunk (:data:`TRAJECTORY_KEY`), so a test or a script can read the plotted values back
(:func:`read_points`). Days since the patient's first study, never dates.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import atomic_write_bytes

TRAJECTORY_KEY = "recnec-trajectory"
FOLLOW_UP_KEY = "recnec-follow-up"


def trajectory_name(patient: str) -> str:
    """File name of a patient's trajectory picture (from the keyed pseudonym, never an ID)."""
    return f"patient-{patient}-trajectory.png"


def follow_up_name(stem: str) -> str:
    """File name of a study's prior/current picture from its QC stem (:func:`recnec_cli.qc.files.qc_stem`)."""
    return f"{stem}-vs-prior.png"


def _save(fig: Any, path: Path, key: str, payload: Mapping[str, Any]) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    buf.seek(0)
    with Image.open(buf) as img:
        rgb = img.convert("RGB")
        info = PngInfo()
        info.add_text(key, json.dumps(payload, sort_keys=True))
        out = io.BytesIO()
        rgb.save(out, format="PNG", pnginfo=info, compress_level=6)
    atomic_write_bytes(Path(path), out.getvalue())


def draw_trajectory(path: Path, *, patient: str, points: Sequence[Mapping[str, Any]]) -> Path:
    """Write the trajectory picture of one patient.

    ``points``: one mapping per study in time order with ``study_id``, ``days`` (since the first
    study; ``None`` when the study has no date: plotted at its index), ``enhancing_ml``,
    ``oedema_ml`` (mL or ``None``), ``p_recurrence`` (or ``None``) and ``suggestion``. Left axis:
    enhancing and oedema volume (mL); right axis: p_recurrence (0-1). The points are stored in
    the PNG (:func:`read_points`).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    pts = [dict(p) for p in points]
    xs = [p["days"] if p.get("days") is not None else float(i) for i, p in enumerate(pts)]
    fig = Figure(figsize=(4.8, 3.0))
    ax = fig.add_subplot(111)
    for key, colour, label in (("enhancing_ml", "#d62728", "enhancing (mL)"), ("oedema_ml", "#1f77b4", "oedema (mL)")):
        xy = [(x, p[key]) for x, p in zip(xs, pts) if p.get(key) is not None]
        if xy:
            ax.plot([a for a, _ in xy], [b for _, b in xy], "o-", color=colour, label=label, ms=4)
    ax.set_xlabel("days since first study" if all(p.get("days") is not None for p in pts) else "study")
    ax.set_ylabel("volume (mL)")
    ax2 = ax.twinx()
    xy = [(x, p["p_recurrence"]) for x, p in zip(xs, pts) if p.get("p_recurrence") is not None]
    if xy:
        ax2.plot([a for a, _ in xy], [b for _, b in xy], "s--", color="#555555", label="p_recurrence", ms=3)
    ax2.set_ylim(0, 1)
    ax2.set_ylabel("p_recurrence")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    if h1 or h2:  # below the axes: inside them it hid the first points
        fig.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower center", ncol=3, frameon=False)
    # the whole pseudonym, as in the report's patient column
    ax.set_title(f"patient {patient} · {len(pts)} studies · research use only", fontsize=8)
    fig.tight_layout(rect=(0.0, 0.07, 1.0, 1.0))
    _save(fig, path, TRAJECTORY_KEY, {"patient": patient, "points": pts})
    return Path(path)


def draw_follow_up(path: Path, *, current: np.ndarray, earlier: np.ndarray, current_lesion: np.ndarray,
                   earlier_lesion: np.ndarray, z_mm: float, caption: str, payload: Mapping[str, Any]) -> Path:
    """Write the earlier (registered onto the current) and current T1ce side by side.

    ``current`` / ``earlier`` uint8 ``(X, Y)`` axial slices (R, A) on the same grid, the lesion
    outlines bool of that shape (earlier's in yellow, current's in red, both drawn on both panels);
    ``z_mm`` the slice's superior coordinate (RAS+); ``payload`` stored in the PNG.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 3.6))
    for i, (img, title) in enumerate(((earlier, "earlier study (registered)"), (current, "this study"))):
        ax = fig.add_subplot(1, 2, i + 1)
        # radiological display: patient's right on the screen's left; anterior up
        ax.imshow(np.asarray(img, dtype=float).T[::-1, ::-1], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        for mask, colour in ((earlier_lesion, "#ffd700"), (current_lesion, "#ff3030")):
            if np.asarray(mask).any():
                ax.contour(np.asarray(mask, dtype=float).T[::-1, ::-1], levels=[0.5], colors=colour, linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_axis_off()
    fig.suptitle(f"{caption} · z = {z_mm:.0f} mm · R on the left · research use only", fontsize=7)
    fig.tight_layout()
    _save(fig, path, FOLLOW_UP_KEY, payload)
    return Path(path)


def read_points(path: Path, key: str = TRAJECTORY_KEY) -> dict[str, Any]:
    """The JSON a timeline picture carries (``{"patient", "points"}`` for a trajectory).

    Raises
    ------
    ValueError
        When the PNG holds no such chunk.
    """
    from PIL import Image

    with Image.open(path) as img:
        text = getattr(img, "text", {}).get(key)
    if not text:
        raise ValueError(f"{Path(path).name} holds no {key} data")
    return json.loads(text)
