"""Caption lines of the QC pictures, from a study's result (text only; no PHI: pseudonyms, QC
ids, series numbers of DICOM series and failure codes, never names, paths or messages)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..study import SeriesRole

if TYPE_CHECKING:  # imported for annotations only
    from ..results import StudyResult


def roles_text(r: StudyResult) -> str:
    """``T1 = series 3 (0.97) · T2 ...``: roles with confidence (series numbers for DICOM only:
    NIfTI file names can hold what the folder is named after)."""
    if r.assignment is None or not r.assignment.chosen:
        return "roles: not assigned"
    conf = {d.series_id: d.confidence for d in r.assignment.decisions}
    parts = []
    for role in (*SeriesRole.model_roles(), SeriesRole.FLAIR):
        series = r.assignment.chosen.get(role)
        if series is None:
            if role is not SeriesRole.FLAIR:  # optional: named only when the study has one
                parts.append(f"{role.value} missing")
            continue
        num = f" = series {series.header.series_number}" if series.source == "dicom" and \
            series.header.series_number is not None else ""
        c = conf.get(series.series_id)
        parts.append(f"{role.value}{num}" + (f" ({c:.2f})" if c is not None else ""))
    return "roles: " + ", ".join(parts)


def qc_header(r: StudyResult, name: str) -> str:
    """First header line of a QC picture: QC id, patient pseudonym, roles, lesion (volume, source,
    ``lesion_confidence``, ``LOW`` below :data:`recnec_cli.stages.lesion.LOW_CONFIDENCE`)."""
    from ..stages.lesion import LOW_CONFIDENCE

    p = r.preprocessed
    lesion = ""
    if p is not None:
        conf = p.lesion_confidence
        sure = "" if math.isnan(conf) else f", confidence {conf:.2f}" + (" LOW" if conf < LOW_CONFIDENCE else "")
        lesion = f" · lesion {p.lesion_volume_ml:.2f} mL ({p.lesion_source}{sure})"
    return (f"recnec QC · study {name} · patient {r.study.patient_pseudonym or '-'} · {roles_text(r)}"
            f"{lesion}")


def qc_result_line(r: StudyResult, threshold: float | None) -> str:
    """Second header line: probability, spread and label, or the failure (code and stage only:
    messages can name files)."""
    if r.ok and r.probability is not None:
        thr = f" at threshold {threshold:.3f}" if threshold is not None else ""
        return (f"p(recurrence) {r.probability:.3f} · ensemble spread {r.spread:.3f} · label {r.label}{thr}"
                " · research use only")
    if r.ok:
        return "status OK: awaiting inference"
    return f"status {r.status} (stage {r.failed_stage or '?'})"
