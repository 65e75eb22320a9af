"""The patient's timeline in a scan: lesion matching between visits, the comparison columns of the
report and the timeline pictures, all from the state (no image is read or processed again).

:func:`match_pending` registers each study's follow-up map with those of its prior and nadir (once
per pair and map version: a re-processed or late-arriving study gets new pairs, matched in the same
run); :func:`annotate` fills the :data:`recnec_cli.timeline.COLUMNS` of every report row;
:func:`draw_trajectories` writes one trajectory picture per patient into the QC folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Mapping, MutableMapping, Sequence

from .. import timeline
from .state import ScanState

log = logging.getLogger(__name__)


def time_points(state: ScanState, rows: Sequence[Mapping[str, Any]]) -> list[timeline.TimePoint]:
    """One :class:`~recnec_cli.timeline.TimePoint` per report row, with the patient, date and
    session discovery recorded (rows of studies discovery never recorded have no timeline)."""
    known = state.timeline()
    out = []
    for row in rows:
        sid = str(row["study_id"])
        patient, acquired, session = known.get(sid, ("", "", ""))
        out.append(timeline.time_point(sid, row, patient=patient, acquired=acquired, session=session))
    return out


def _pair_key(digests: Mapping[str, str], sid: str, ref: str) -> str:
    """The map digests a (study, reference) match was computed from (``-``: no map stored)."""
    return f"{digests.get(sid, '-')}:{digests.get(ref, '-')}"


def match_pending(state: ScanState, rows: Sequence[Mapping[str, Any]], *,
                  picture: Callable[[str, str], Path | None] | None = None) -> dict[str, float]:
    """Match every (study, prior / nadir) pair not yet matched for the current maps.

    ``picture(study_id, source)`` gives the path of the study's prior/current picture (``None``: none);
    it is drawn for the prior pair when the registration worked. Returns ``{"pairs": n,
    "seconds": s}``. A failure is recorded as ``not_checked`` with its reason, never raised.
    """
    from ..stages.followup import FollowUpMap, match_lesions

    points = time_points(state, rows)
    sources = {str(r["study_id"]): str(r.get("source") or "dicom") for r in rows}
    priors = {}
    for history in timeline.patients(points).values():
        for i, tp in enumerate(history):
            prior, _ = timeline.references(history, i)
            if prior is not None and tp.comparable:
                priors[tp.study_id] = prior.study_id
    pairs = timeline.pairs_to_match(points)
    digests = state.map_digests()
    t0, n = time.perf_counter(), 0
    cache: dict[str, Any] = {}

    def load(sid: str) -> Any:
        if sid not in cache:
            data = state.follow_up_map(sid)
            try:
                cache[sid] = None if data is None else FollowUpMap.from_bytes(data)
            except ValueError:
                cache[sid] = None
        return cache[sid]

    for sid, ref in pairs:
        key = _pair_key(digests, sid, ref)
        if state.lesion_match(sid, ref, key) is not None:
            continue
        cur, old = load(sid), load(ref)
        if cur is None or old is None:
            state.record_lesion_match(sid, ref, key, timeline.NOT_CHECKED, None,
                                      "no follow-up map stored for one of the two studies")
            continue
        m = match_lesions(cur, old)
        n += 1
        state.record_lesion_match(sid, ref, key, m.status, m.overlap, m.note)
        log.info("timeline: study %s against %s: %s (%s)", sid, ref, m.status, m.note)
        if picture is not None and priors.get(sid) == ref and m.transform is not None:
            path = picture(sid, sources.get(sid, "dicom"))
            if path is not None:
                _draw_pair(path, cur, old, m, sid, ref)
    return {"pairs": n, "seconds": time.perf_counter() - t0}


def _draw_pair(path: Path, cur: Any, old: Any, m: Any, sid: str, ref: str) -> None:
    from ..qc.trajectory import draw_follow_up
    from ..stages.followup import paired_slices

    try:
        c, e, cl, el, z = paired_slices(cur, old, m.transform)
        draw_follow_up(path, current=c, earlier=e, current_lesion=cl, earlier_lesion=el, z_mm=z,
                       caption=f"{m.status.replace('_', ' ')}, {m.note}",
                       payload={"study_id": sid, "prior_study_id": ref, "match": m.status, "overlap": m.overlap})
    except Exception as exc:  # a picture never changes the report
        log.warning("timeline picture not drawn (%s)", type(exc).__name__)
        log.debug("timeline picture error", exc_info=True)


def matches_of(state: ScanState, points: Sequence[timeline.TimePoint]) -> dict[tuple[str, str], str]:
    """The recorded match state of every pair :func:`recnec_cli.timeline.compare` looks up, for
    the current maps (pairs matched for an older map count as not checked)."""
    digests = state.map_digests()
    out = {}
    for sid, ref in timeline.pairs_to_match(points):
        got = state.lesion_match(sid, ref, _pair_key(digests, sid, ref))
        if got is not None:
            out[(sid, ref)] = got[0]
    return out


def annotate(state: ScanState, rows: Sequence[MutableMapping[str, Any]]) -> list[timeline.TimePoint]:
    """Fill the timeline columns of ``rows`` (report rows, in place); the patient pseudonym is the
    one discovery recorded last (it folds in IssuerOfPatientID). Returns the time points."""
    points = time_points(state, rows)
    cols = timeline.compare(points, matches_of(state, points))
    for row, tp in zip(rows, points):
        row.update(cols[tp.study_id])
        if tp.patient:
            row["patient_pseudonym"] = tp.patient
    return points


def _same_points(path: Path, patient: str, pts: list[dict[str, Any]]) -> bool:
    import json

    from ..qc.trajectory import read_points

    if not path.is_file():
        return False
    try:
        return read_points(path) == json.loads(json.dumps({"patient": patient, "points": pts}, sort_keys=True))
    except (ValueError, OSError):
        return False


def draw_trajectories(qc_dir: Path, rows: Sequence[MutableMapping[str, Any]],
                      points: Sequence[timeline.TimePoint]) -> None:
    """One trajectory picture per patient with two or more studies on the timeline; each of the
    patient's rows gets its file name in ``trajectory_png``."""
    from ..qc.trajectory import draw_trajectory, trajectory_name

    by_id = {str(r["study_id"]): r for r in rows}
    for patient, history in timeline.patients(points).items():
        if len(history) < 2:
            continue
        pts = []
        for tp in history:
            row = by_id[tp.study_id]
            days = row.get("days_since_first")
            pts.append({"study_id": tp.study_id, "days": None if days in ("", None) else float(days),
                        "enhancing_ml": tp.enhancing_ml, "oedema_ml": tp.oedema_ml,
                        "p_recurrence": tp.p_recurrence,
                        "suggestion": str(row.get("volumetric_suggestion") or "")})
        name = trajectory_name(patient)
        try:
            if _same_points(Path(qc_dir) / name, patient, pts):
                pass  # unchanged since it was drawn
            else:
                draw_trajectory(Path(qc_dir) / name, patient=patient, points=pts)
        except Exception as exc:  # a picture never changes the report
            log.warning("trajectory picture not drawn (%s)", type(exc).__name__)
            log.debug("trajectory error", exc_info=True)
            continue
        for tp in history:
            by_id[tp.study_id]["trajectory_png"] = name
