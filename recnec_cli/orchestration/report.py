"""Report rows (CSV / JSON), the run manifest and the data behind the terminal table.

Writes are atomic (temporary file in the same folder, then ``os.replace``), so an interrupted run
never leaves a half-written report over a good one.

Columns (one row per study; empty where a stage did not run):

``study_id`` (StudyInstanceUID, or folder relative to the scan root), ``patient_pseudonym``
(HMAC-SHA256 of the PatientID with the site key, see :mod:`recnec_cli.pseudonym`), ``source``,
``location`` (NIfTI/NRRD folders; DICOM folders only with ``--dicom-locations``, since export
folder names may hold patient names), ``status`` (``OK`` or the error code), ``error_code``,
``error_message``, ``failed_stage``, ``t1_series`` / ``t2_series`` / ``t1ce_series`` /
``flair_series`` (SeriesInstanceUID or file; FLAIR is optional and only helps find the lesion),
``*_confidence`` and ``*_reasons`` (classifier evidence, ``; `` separated), ``flags``,
``lesion_source`` (``user`` for a user mask, ``segmenter`` for the shipped segmenter,
``heuristic`` for the enhancement-map detector), ``lesion_r_mm`` / ``lesion_a_mm`` /
``lesion_s_mm`` (centroid, world RAS+), ``lesion_volume_ml`` (enhancing + core, holes filled),
``enhancing_volume_ml`` / ``necrotic_volume_ml`` / ``oedema_volume_ml`` (the segmenter's
compartments of the chosen lesion; empty for the other sources), ``lesion_confidence`` (0-1:
:func:`recnec_cli.orchestration.pipeline.lesion_confidence_of`; below 0.5 also the flag
``LESION_LOW_CONFIDENCE``),
``brain_volume_ml``, ``brain_mask_source`` (``hdbet``; ``hdbet+input`` when a skull-stripped
input's own foreground was added; ``+edge`` when the mask grew along enhancing tissue cut at its
edge, flag ``LESION_AT_MASK_EDGE``: :mod:`recnec_cli.stages.brainmask`),
``t1_reg_translation_mm`` ... (rigid offsets onto the T1ce),
``p_recurrence`` (calibrated probability of recurrence: the ensemble mean through the
manifest's Platt map, :mod:`recnec_cli.stages.calibration`), ``p_recurrence_raw`` (the ensemble
mean before calibration), ``ensemble_spread`` (standard deviation across the fold models, raw
scale), ``label`` (``recurrence`` if ``p_recurrence >= threshold`` else ``necrosis``),
``threshold`` (on the calibrated scale), ``applicability`` (``in_distribution``,
``OUT_OF_DISTRIBUTION`` (also in ``flags``) or ``unknown`` for weights without an applicability
model) and ``applicability_distance`` (:mod:`recnec_cli.stages.applicability`), ``model_version``,
``seconds_<stage>`` (and ``seconds_qc`` / ``seconds_explain`` for the QC pictures),
``seconds_total``, ``qc_png`` / ``explain_png`` (file names in the ``--qc`` folder),
the patient's timeline (:data:`recnec_cli.timeline.COLUMNS`: ``timeline_index`` /
``timeline_studies`` / ``days_since_first``; for the ``prior`` and the ``nadir``: their study id,
days since, their enhancing / necrotic / oedema volumes, the change against them in mL and percent
(``enhancing_change_vs_prior_ml`` ...), whether their lesion is this one (``prior_lesion_match``);
``volumetric_suggestion`` and ``timeline_note``; intervals in days, never dates),
``trajectory_png`` / ``follow_up_png`` (the patient's trajectory and the prior/current picture,
with ``--qc``), ``pacs_send`` (with ``--dicom-out`` / ``--send``: per PACS, ``sent``, ``pending`` or
``failed: <reason>`` for the study's DICOM objects) and ``disclaimer`` (research use only,
synthetic-cohort weights, not clinically validated).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Sequence

from .. import DISCLAIMER
from ..atomic import atomic_write_text
from ..provenance import SCAN_DISTRIBUTIONS, library_versions
from ..results import STAGES, StudyResult
from ..stages.applicability import OOD_FLAG
from ..study import SeriesRole
from ..timeline import COLUMNS as TIMELINE_COLUMNS
from ..timeline import THRESHOLDS as TIMELINE_THRESHOLDS
from .pipeline import report_threshold_of

ROLE_PREFIX = {SeriesRole.T1: "t1", SeriesRole.T2: "t2", SeriesRole.T1CE: "t1ce", SeriesRole.FLAIR: "flair"}
#: seconds spent on the QC pictures (``--qc``) and the explanation map (``--explain``), per study
QC_TIMINGS = ("qc", "explain")

COLUMNS = (
    ["study_id", "patient_pseudonym", "source", "location", "status", "error_code", "error_message",
     "failed_stage"]
    + [f"{p}_{k}" for p in ("t1", "t2", "t1ce", "flair") for k in ("series", "confidence", "reasons")]
    + ["flags", "lesion_source", "lesion_r_mm", "lesion_a_mm", "lesion_s_mm", "lesion_volume_ml",
       "enhancing_volume_ml", "necrotic_volume_ml", "oedema_volume_ml", "lesion_confidence", "brain_volume_ml",
       "brain_mask_source"]
    + [f"{p}_reg_{k}" for p in ("t1", "t2") for k in ("translation_mm", "rotation_deg")]
    + ["p_recurrence", "p_recurrence_raw", "ensemble_spread", "label", "threshold", "applicability",
       "applicability_distance", "model_version"]
    + list(TIMELINE_COLUMNS)
    + [f"seconds_{s}" for s in (*STAGES, *QC_TIMINGS)]
    + ["seconds_total", "qc_png", "explain_png", "trajectory_png", "follow_up_png", "pacs_send", "run_id",
       "processed_utc", "present_in_tree",
       "disclaimer"]
)

#: written in every row so that no copy of a report travels without it
ROW_DISCLAIMER = "research use only; not clinically validated (the shipped weights come from a synthetic cohort)"


def _r(v: float | None, nd: int = 4) -> Any:
    return "" if v is None else round(float(v), nd)


def result_row(r: StudyResult, *, threshold: float | None, model_version: str,
               dicom_locations: bool = False) -> dict[str, Any]:
    """One flat report row (keys = :data:`COLUMNS`) for a study result.

    DICOM folder names often hold patient names, so ``location`` stays empty for DICOM studies
    unless ``dicom_locations`` is set (``recnec scan --dicom-locations``).
    """
    s = r.study
    row: dict[str, Any] = {c: "" for c in COLUMNS}
    row.update(study_id=s.study_id, patient_pseudonym=s.patient_pseudonym, source=s.source,
               location=s.location if (s.source != "dicom" or dicom_locations) else "", status=r.status,
               error_code=r.error_code, error_message=r.error_message, failed_stage=r.failed_stage)
    if r.assignment is not None:
        decisions = {d.series_id: d for d in r.assignment.decisions}
        for role, prefix in ROLE_PREFIX.items():
            series = r.assignment.chosen.get(role)
            if series is None:
                continue
            row[f"{prefix}_series"] = series.series_id
            d = decisions.get(series.series_id)
            if d is not None:
                row[f"{prefix}_confidence"] = round(d.confidence, 3)
                row[f"{prefix}_reasons"] = "; ".join(d.reasons)
    p = r.preprocessed
    if p is not None:
        row["flags"] = " ".join(p.flags)
        row["lesion_source"] = p.lesion_source
        row["lesion_r_mm"], row["lesion_a_mm"], row["lesion_s_mm"] = (round(v, 2) for v in p.lesion_centroid_ras_mm)
        row["lesion_volume_ml"] = _r(p.lesion_volume_ml, 3)
        for k in ("enhancing_volume_ml", "necrotic_volume_ml", "oedema_volume_ml"):
            v = getattr(p, k)
            row[k] = "" if v != v else _r(v, 3)  # NaN: not measured by this source
        row["brain_volume_ml"] = _r(p.brain_volume_ml, 1)
        row["brain_mask_source"] = p.brain_mask_source
        row["lesion_confidence"] = _r(p.lesion_confidence, 3)
        for role in ("T1", "T2"):
            info = p.registration.get(role, {})
            row[f"{role.lower()}_reg_translation_mm"] = info.get("translation_mm", "")
            row[f"{role.lower()}_reg_rotation_deg"] = info.get("rotation_deg", "")
    elif r.measured:  # a failed study: what was measured before the failure
        row.update({k: v for k, v in r.measured.items() if k in row})
    if r.probability is not None:
        row["p_recurrence"] = _r(r.probability, 6)
        row["ensemble_spread"] = _r(r.spread, 6)
        row["p_recurrence_raw"] = _r(r.probability_raw, 6)
        row["label"] = r.label
        row["threshold"] = _r(threshold, 6)
        d = r.applicability_distance
        if d is None or d != d:  # None or NaN: these weights have no applicability model
            row["applicability"] = "unknown"
        else:
            row["applicability"] = OOD_FLAG if r.out_of_distribution else "in_distribution"
            row["applicability_distance"] = round(d, 3)
        if r.out_of_distribution:
            row["flags"] = " ".join(f for f in (row["flags"], OOD_FLAG) if f)
        row["model_version"] = model_version
    for st in (*STAGES, *QC_TIMINGS):
        if st in r.timings:
            row[f"seconds_{st}"] = round(r.timings[st], 3)
    row["qc_png"] = r.qc.get("png", "")
    row["explain_png"] = r.qc.get("explain", "")
    row["seconds_total"] = round(r.timings.get("total", sum(r.timings.values())), 3)
    row["disclaimer"] = ROW_DISCLAIMER
    return row


def rows_to_csv(rows: Sequence[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow(row)
    return buf.getvalue()


def write_report(path: Path, rows: Sequence[dict[str, Any]], *, fmt: str = "csv") -> None:
    """Write the report as CSV (``fmt='csv'``) or a JSON list of row objects (``fmt='json'``)."""
    if fmt == "json":
        atomic_write_text(path, json.dumps({"disclaimer": DISCLAIMER, "studies": list(rows)}, indent=2) + "\n")
    else:
        atomic_write_text(path, rows_to_csv(rows))


def run_manifest(*, settings_dict: dict[str, Any], ensemble: Any, rows: Iterable[dict[str, Any]],
                 started: datetime, finished: datetime, input_root: str, report_path: str,
                 n_discovered: int, decoders: dict[str, bool] | None = None) -> dict[str, Any]:
    """Provenance of a report (docs/code-style.md habit 3): versions, provider, checksums, settings, status
    counts and stage seconds summed over the report ``rows`` (the flat rows of :func:`result_row`)."""
    rows = list(rows)
    stage_totals: dict[str, float] = {}
    statuses: dict[str, int] = {}
    for row in rows:
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        for st in (*STAGES, "total"):
            v = row.get(f"seconds_{st}")
            if v not in ("", None):
                stage_totals[st] = round(stage_totals.get(st, 0.0) + float(v), 3)
    return {
        "disclaimer": DISCLAIMER,
        "tool": "recnec scan",
        "versions": library_versions(SCAN_DISTRIBUTIONS),
        "started_utc": started.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "finished_utc": finished.astimezone(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round((finished - started).total_seconds(), 3),
        "input_root": input_root,
        "report": report_path,
        "studies_discovered": n_discovered,
        "status_counts": statuses,
        "execution_provider": getattr(ensemble, "provider", None),
        "model_version": getattr(ensemble, "model_version", None),
        "threshold": report_threshold_of(ensemble),
        "model_checksums": dict(getattr(ensemble, "checksums", {}) or {}),
        "pixel_decoders": dict(decoders or {}),
        "settings": settings_dict,
        "stage_seconds_total": stage_totals,
        "timeline_thresholds": dict(TIMELINE_THRESHOLDS),
    }


def utcnow() -> datetime:
    return datetime.now(timezone.utc)
