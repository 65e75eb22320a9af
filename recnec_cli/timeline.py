"""The patient's timeline: each study compared with the same patient's previous study and nadir.

After radiotherapy a patient is scanned every few months; how the enhancing lesion changes between
scans is what RANO and modified RANO (mRANO) judge. This module is pure: it takes what the state
holds about each study (patient pseudonym, when it was acquired, its lesion volumes) and returns the
report's comparison columns. Dates never leave the state: the columns carry intervals in days.

Grouping and order
    Studies belong to one patient when their keyed patient pseudonyms are equal
    (:mod:`recnec_cli.pseudonym`; discovery folds IssuerOfPatientID into the identity, so the same
    PatientID text from two issuers is two patients). Within a patient they are ordered by
    acquisition date-time (DICOM StudyDate/StudyTime; for NIfTI the sidecar's
    ``AcquisitionDateTime`` / ``AcquisitionDate``), then by the BIDS ``ses-`` label, then by study
    id. A study with neither a date nor a session label cannot be placed and is left out (its
    ``timeline_note`` says so).
Which studies are compared
    Studies whose segmenter measured compartment volumes (``lesion_source`` ``segmenter``), and
    ``NO_ENHANCING_LESION`` studies (enhancing and necrotic volume 0 mL: no credible enhancing
    lesion). Failed studies and studies measured by a user mask or the heuristic detector (no
    compartments) are not compared and are not anyone's prior or nadir.
Prior and nadir
    The prior is the latest earlier comparable study; the nadir the earlier comparable study with
    the smallest enhancing volume (ties: the earliest), as mRANO takes the smallest measurement
    since the post-radiotherapy baseline (Ellingson et al. 2017). Changes are ``current - reference``
    in mL and in percent of the reference (empty when the reference is 0 mL).
Same lesion or not
    A pair is compared only when its lesions can be the same: the caller supplies, per (study,
    reference) pair, ``same_lesion`` (overlap after rigid registration of the reference's T1ce onto
    the current one), ``different_lesion`` (no overlap: the change columns stay empty and the note
    says why) or ``not_checked`` (no registration: compared, and the note says the match was not
    checked). See :mod:`recnec_cli.stages.followup`.
Volumetric suggestion
    Against the nadir's enhancing volume: ``volume_increase`` for an increase of at least
    :data:`INCREASE_PCT` percent, ``volume_decrease`` for a decrease of at least
    :data:`DECREASE_PCT` percent, else ``stable``. These are the volumetric thresholds of modified
    RANO (Ellingson, Wen, Cloughesy 2017, Neurotherapeutics 14:307, table 1): the volume change of a
    sphere whose bidimensional product grows by 25 % (1.25^1.5 = 1.40) or falls by 50 %
    (0.5^1.5 = 0.35). A nadir below :data:`MEASURABLE_ML` (mRANO's smallest measurable lesion,
    10 mm x 10 mm, as a 10 mm sphere: 0.52 mL) has no meaningful percentage: a current enhancing
    volume of at least that size is ``volume_increase`` (new measurable enhancement), otherwise
    ``stable``. This is a volumetric suggestion, not a RANO assessment (RANO also weighs
    non-enhancing disease, steroids and the clinical state).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Mapping

#: mRANO volumetric progression: enhancing volume >= +40 % against the nadir (Ellingson et al. 2017)
INCREASE_PCT = 40.0
#: mRANO volumetric response: enhancing volume <= -65 % against the nadir (Ellingson et al. 2017)
DECREASE_PCT = 65.0
#: smallest measurable enhancing volume, mL: a 10 mm sphere (mRANO measurable disease is >= 10 mm)
MEASURABLE_ML = 0.52

THRESHOLDS = {
    "volume_increase_pct": INCREASE_PCT,
    "volume_decrease_pct": DECREASE_PCT,
    "measurable_ml": MEASURABLE_ML,
    "reference": "nadir enhancing volume",
    "source": "Ellingson, Wen, Cloughesy 2017, Neurotherapeutics 14:307 (modified RANO, volumetric)",
}

COMPARTMENTS = ("enhancing", "necrotic", "oedema")
#: match states of a (study, reference) pair
SAME, DIFFERENT, NOT_CHECKED = "same_lesion", "different_lesion", "not_checked"


def _ref_columns(ref: str) -> list[str]:
    return ([f"{ref}_study_id", f"days_since_{ref}"]
            + [f"{ref}_{c}_volume_ml" for c in COMPARTMENTS]
            + [f"{c}_change_vs_{ref}_{u}" for c in COMPARTMENTS for u in ("ml", "pct")]
            + [f"{ref}_lesion_match"])


#: the report columns this module fills (empty for a study without an earlier comparable study)
COLUMNS = (["timeline_index", "timeline_studies", "days_since_first"] + _ref_columns("prior")
           + _ref_columns("nadir") + ["volumetric_suggestion", "timeline_note"])


@dataclass(frozen=True)
class TimePoint:
    """What the timeline needs of one study.

    ``patient``: keyed patient pseudonym (empty: unknown, no timeline); ``acquired``: ISO 8601
    date or date-time (empty when unknown); ``session``: BIDS ``ses-`` label (empty when none);
    volumes in mL (``None``: not measured); ``p_recurrence`` the calibrated probability.
    """

    study_id: str
    patient: str
    acquired: str = ""
    session: str = ""
    status: str = ""
    lesion_source: str = ""
    enhancing_ml: float | None = None
    necrotic_ml: float | None = None
    oedema_ml: float | None = None
    p_recurrence: float | None = None

    @property
    def comparable(self) -> bool:
        return self.enhancing_ml is not None

    def volume(self, compartment: str) -> float | None:
        return {"enhancing": self.enhancing_ml, "necrotic": self.necrotic_ml, "oedema": self.oedema_ml}[compartment]


def _num(v: Any) -> float | None:
    if v in ("", None):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if f == f else None


def time_point(study_id: str, row: Mapping[str, Any], *, patient: str, acquired: str = "",
               session: str = "") -> TimePoint:
    """A :class:`TimePoint` from a report row (:mod:`recnec_cli.orchestration.report` columns)."""
    status = str(row.get("status", ""))
    enh = nec = None
    if status == "OK" and row.get("lesion_source") == "segmenter":
        enh, nec = _num(row.get("enhancing_volume_ml")), _num(row.get("necrotic_volume_ml"))
    elif status == "NO_ENHANCING_LESION":
        enh, nec = 0.0, 0.0
    oed = _num(row.get("oedema_volume_ml")) if enh is not None else None
    return TimePoint(study_id=study_id, patient=patient, acquired=acquired, session=session, status=status,
                     lesion_source=str(row.get("lesion_source", "")), enhancing_ml=enh, necrotic_ml=nec,
                     oedema_ml=oed, p_recurrence=_num(row.get("p_recurrence")))


def parse_when(text: str) -> datetime | None:
    """``YYYY-MM-DD[Thh:mm[:ss[.ffffff]]]`` or DICOM ``YYYYMMDD[hhmmss[.ffffff]]`` -> naive
    datetime; ``None`` for empty or unparseable text."""
    t = (text or "").strip()
    if not t:
        return None
    m = re.fullmatch(r"(\d{4})-?(\d{2})-?(\d{2})(?:[T ]?(\d{2}):?(\d{2})?:?(\d{2})?(?:\.\d+)?)?", t)
    if not m:
        return None
    y, mo, d, hh, mm, ss = (int(g) if g else 0 for g in m.groups())
    try:
        return datetime(y, mo, d, hh, mm, ss)
    except ValueError:
        return None


def _natural(label: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", label) if p)


def _order_key(tp: TimePoint) -> tuple:
    when = parse_when(tp.acquired)
    return (when is None, when or datetime.min, _natural(tp.session), tp.study_id)


def _days(a: TimePoint, b: TimePoint) -> float | None:
    """Days from ``b`` to ``a`` (1 decimal), ``None`` without both dates."""
    wa, wb = parse_when(a.acquired), parse_when(b.acquired)
    if wa is None or wb is None:
        return None
    return round((wa - wb).total_seconds() / 86400.0, 1)


def _r(v: float | None, nd: int = 3) -> Any:
    return "" if v is None else round(v, nd)


def suggestion(current_ml: float, nadir_ml: float) -> str:
    """The volumetric suggestion for an enhancing volume against the nadir's (module docstring)."""
    if nadir_ml < MEASURABLE_ML:
        return "volume_increase" if current_ml >= MEASURABLE_ML else "stable"
    pct = 100.0 * (current_ml - nadir_ml) / nadir_ml
    if pct >= INCREASE_PCT:
        return "volume_increase"
    if pct <= -DECREASE_PCT:
        return "volume_decrease"
    return "stable"


def patients(points: Iterable[TimePoint]) -> dict[str, list[TimePoint]]:
    """Orderable studies grouped by patient, each list in time order (first study first)."""
    out: dict[str, list[TimePoint]] = {}
    for tp in points:
        if tp.patient and (parse_when(tp.acquired) is not None or tp.session):
            out.setdefault(tp.patient, []).append(tp)
    for lst in out.values():
        lst.sort(key=_order_key)
    return out


def references(history: list[TimePoint], i: int) -> tuple[TimePoint | None, TimePoint | None]:
    """The prior and the nadir of ``history[i]`` among ``history[:i]`` (comparable studies only)."""
    earlier = [tp for tp in history[:i] if tp.comparable]
    if not earlier:
        return None, None
    prior = earlier[-1]
    nadir = min(earlier, key=lambda tp: tp.enhancing_ml if tp.enhancing_ml is not None else float("inf"))
    return prior, nadir


def pairs_to_match(points: Iterable[TimePoint]) -> list[tuple[str, str]]:
    """Every (study, reference) pair :func:`compare` will look up: each comparable study with its
    prior and its nadir."""
    out: list[tuple[str, str]] = []
    for history in patients(points).values():
        for i, tp in enumerate(history):
            if not tp.comparable:
                continue
            for ref in references(history, i):
                if ref is not None and (tp.study_id, ref.study_id) not in out:
                    out.append((tp.study_id, ref.study_id))
    return out


def compare(points: Iterable[TimePoint], matches: Mapping[tuple[str, str], str] | None = None,
            ) -> dict[str, dict[str, Any]]:
    """The timeline columns (:data:`COLUMNS`) of every study in ``points``, by study id.

    ``matches`` maps (study id, reference study id) to :data:`SAME`, :data:`DIFFERENT` or
    :data:`NOT_CHECKED` (missing pairs count as not checked). The result does not depend on the
    order of ``points``. Studies without a patient or a place in time get only ``timeline_note``.
    """
    matches = matches or {}
    points = list(points)
    out: dict[str, dict[str, Any]] = {tp.study_id: {c: "" for c in COLUMNS} for tp in points}
    for tp in points:
        if not tp.patient:
            out[tp.study_id]["timeline_note"] = "no patient identity: no timeline"
        elif parse_when(tp.acquired) is None and not tp.session:
            out[tp.study_id]["timeline_note"] = "no study date or session label: not placed on the timeline"
    for history in patients(points).values():
        first = history[0]
        for i, tp in enumerate(history):
            cols = out[tp.study_id]
            cols["timeline_index"], cols["timeline_studies"] = i + 1, len(history)
            d0 = _days(tp, first)
            cols["days_since_first"] = "" if d0 is None else d0
            notes: list[str] = []
            if not tp.comparable:
                cols["timeline_note"] = ("no compartment volumes (lesion_source "
                                         f"{tp.lesion_source or '-'}, status {tp.status or '-'}): not compared")
                continue
            prior, nadir = references(history, i)
            if prior is None:
                cols["timeline_note"] = "first comparable study of this patient"
                continue
            comparable_to_nadir = True
            for name, ref in (("prior", prior), ("nadir", nadir)):
                assert ref is not None
                state = matches.get((tp.study_id, ref.study_id), NOT_CHECKED)
                cols[f"{name}_study_id"] = ref.study_id
                d = _days(tp, ref)
                cols[f"days_since_{name}"] = "" if d is None else d
                for c in COMPARTMENTS:
                    cols[f"{name}_{c}_volume_ml"] = _r(ref.volume(c))
                cols[f"{name}_lesion_match"] = state
                if state == DIFFERENT:
                    notes.append(f"the {name}'s lesion does not overlap this one after registration: "
                                 f"not compared with the {name}")
                    if name == "nadir":
                        comparable_to_nadir = False
                    continue
                for c in COMPARTMENTS:
                    cur, old = tp.volume(c), ref.volume(c)
                    if cur is None or old is None:
                        continue
                    cols[f"{c}_change_vs_{name}_ml"] = _r(cur - old)
                    cols[f"{c}_change_vs_{name}_pct"] = _r(100.0 * (cur - old) / old, 1) if old > 0 else ""
                if state == NOT_CHECKED:
                    notes.append(f"lesion match with the {name} not checked")
            if comparable_to_nadir and nadir is not None and nadir.enhancing_ml is not None \
                    and tp.enhancing_ml is not None:
                cols["volumetric_suggestion"] = suggestion(tp.enhancing_ml, nadir.enhancing_ml)
            if tp.status == "NO_ENHANCING_LESION":
                notes.append("no enhancing lesion in this study (0 mL)")
            cols["timeline_note"] = "; ".join(notes)
    return out
