"""``DIR/index.html``: the morning overview of a scan, one self-contained page.

Built from report rows (those of :func:`recnec_cli.orchestration.scan.report_row`, i.e. from the
nightly state: every study the state knows, the failed ones and those gone from the tree
included) with the Jinja2 template ``recnec_cli/data/templates/qc_index.html.j2`` (autoescaped:
error messages and ids are data, not markup). No server, no external asset: styles and the
sorting / filtering script are inline, thumbnails are relative links to the PNGs beside the page,
so the folder can be copied anywhere and opened offline in any browser.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

from .. import DISCLAIMER, __version__
from ..atomic import atomic_write_bytes
from .files import INDEX_NAME, thumb_name

TEMPLATE = "qc_index.html.j2"


def low_confidence(row: Mapping[str, Any]) -> bool:
    """True when a report row carries ``LESION_LOW_CONFIDENCE``: its ``lesion_confidence`` is below
    the lesion stage's threshold (:data:`recnec_cli.stages.lesion.LOW_CONFIDENCE_FLAG`, spelt out
    here so that the index needs no numpy). Used by the index, the terminal table and the log line."""
    return "LESION_LOW_CONFIDENCE" in str(row.get("flags") or "").split()


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def index_entries(qc_dir: Path, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One entry per report row, with the pictures that exist in ``qc_dir`` (a row from a run
    without ``--qc``, or whose pictures were deleted, has none), in the order of :func:`grouped`."""
    qc_dir = Path(qc_dir)
    out = []
    for row in rows:
        png = str(row.get("qc_png") or "")
        explain = str(row.get("explain_png") or "")
        thumb = thumb_name(png) if png else ""
        p, spread = _num(row.get("p_recurrence")), _num(row.get("ensemble_spread"))
        vol = _num(row.get("lesion_volume_ml"))
        conf = _num(row.get("lesion_confidence"))
        status = str(row.get("status") or "")
        out.append({
            "study_id": str(row.get("study_id", "")),
            "pseudonym": str(row.get("patient_pseudonym") or ""),
            "status": status,
            "failed": status not in ("OK", "DEFERRED"),
            "error_code": str(row.get("error_code") or ""),
            "error_message": str(row.get("error_message") or ""),
            "failed_stage": str(row.get("failed_stage") or ""),
            "p": p, "p_text": "" if p is None else f"{p:.3f}",
            "spread": spread, "spread_text": "" if spread is None else f"{spread:.3f}",
            "label": str(row.get("label") or ""),
            "lesion_ml": vol, "lesion_text": "" if vol is None else f"{vol:.2f}",
            "lesion_source": str(row.get("lesion_source") or ""),
            "confidence": conf, "confidence_text": "" if conf is None else f"{conf:.2f}",
            "low_confidence": low_confidence(row),
            "png": png if png and (qc_dir / png).is_file() else "",
            "thumb": thumb if thumb and (qc_dir / thumb).is_file() else "",
            "explain": explain if explain and (qc_dir / explain).is_file() else "",
            "processed_utc": str(row.get("processed_utc") or ""),
            "run_id": str(row.get("run_id") or ""),
            "present": str(row.get("present_in_tree") or "yes") != "no",
            # the patient's timeline (recnec_cli.timeline): position, change against the prior
            "visit": _int(row.get("timeline_index")), "visits": _int(row.get("timeline_studies")),
            "days_since_prior": _num(row.get("days_since_prior")),
            "change_pct": _num(row.get("enhancing_change_vs_prior_pct")),
            "change_ml": _num(row.get("enhancing_change_vs_prior_ml")),
            "match": str(row.get("prior_lesion_match") or ""),
            "suggestion": str(row.get("volumetric_suggestion") or ""),
            "trajectory": _existing(qc_dir, row.get("trajectory_png")),
            "follow_up": _existing(qc_dir, row.get("follow_up_png")),
        })
    return grouped(out)


def _int(v: Any) -> int | None:
    f = _num(v)
    return None if f is None else int(f)


def _existing(qc_dir: Path, name: Any) -> str:
    name = str(name or "")
    return name if name and (qc_dir / name).is_file() else ""


def grouped(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Entries grouped by patient, newest study first within a patient (timeline position); the
    patient whose newest processing is most recent first; studies without a patient last."""
    latest: dict[str, str] = {}
    for e in entries:
        if e["pseudonym"]:
            latest[e["pseudonym"]] = max(latest.get(e["pseudonym"], ""), e["processed_utc"])
    order = {p: i for i, p in enumerate(sorted(latest, key=lambda p: (latest[p], p), reverse=True))}
    return sorted(entries, key=lambda e: (order.get(e["pseudonym"], len(order)), e["pseudonym"] == "",
                                          -(e["visit"] or 0), e["study_id"]))


def render_index(qc_dir: Path, rows: Iterable[Mapping[str, Any]], *, title: str = "recnec scan",
                 run: Mapping[str, Any] | None = None, generated_utc: datetime | None = None) -> str:
    """The index page as HTML text (see :func:`write_index`)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    env = Environment(loader=PackageLoader("recnec_cli", "data/templates"),
                      autoescape=select_autoescape(["html", "j2"], default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    entries = index_entries(qc_dir, rows)
    counts: dict[str, int] = {}
    for e in entries:
        counts[e["status"]] = counts.get(e["status"], 0) + 1
    generated = (generated_utc or datetime.now(timezone.utc)).astimezone(timezone.utc)
    return env.get_template(TEMPLATE).render(
        title=title, disclaimer=DISCLAIMER, version=__version__, entries=entries,
        statuses=sorted(counts), counts=sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])),
        labels=sorted({e["label"] for e in entries if e["label"]}),
        generated=generated.isoformat(timespec="seconds"), run=dict(run or {}),
        n_failed=sum(e["failed"] for e in entries))


def write_index(qc_dir: Path, rows: Iterable[Mapping[str, Any]], **kwargs: Any) -> Path:
    """Write ``qc_dir/index.html`` atomically from report ``rows`` and return its path.

    One table row per report row, grouped by patient (:func:`grouped`): thumbnail (link to the
    study picture, and to the explanation map and the prior/current picture when there are),
    study id, patient pseudonym with the patient's trajectory picture, visit (position on the
    timeline), change of the enhancing volume against the prior, volumetric suggestion, status,
    p(recurrence), ensemble spread,
    label, lesion volume (mL), error code and message, when it was processed. The table sorts by
    any column (click its header) and filters by status and label; the research-use disclaimer
    stands at the top. ``kwargs``: ``title``, ``run`` (the run's id / times / summary, shown in the
    heading) and ``generated_utc`` of :func:`render_index`.
    """
    qc_dir = Path(qc_dir)
    html = render_index(qc_dir, rows, **kwargs)
    path = qc_dir / INDEX_NAME
    atomic_write_bytes(path, html.encode("utf-8"))
    return path
