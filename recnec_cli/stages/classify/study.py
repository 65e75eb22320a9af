"""Study-level pass: acquisition order, image evidence, and the choice among candidates.

:func:`assign_roles` classifies every series of a study (:mod:`.series`), resolves T1-weighted
series silent about contrast from the acquisition order, optionally measures image evidence
(:mod:`.image_evidence`), then picks one series per model role by the documented preference
order :data:`_PREFERENCE`. :func:`inspect_study` is the same, for ``recnec inspect``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from ...config import Settings
from ...study import RoleAssignment, Series, SeriesHeader, SeriesRole, Study, StudyImages
from .image_evidence import image_verdict
from .rules import Rules, default_rules, load_rules
from .series import MIN_CANDIDATE_SLICES, Verdict, header_verdict, verdict_decision

log = logging.getLogger(__name__)
R = SeriesRole


def _before(a: SeriesHeader, b: SeriesHeader) -> bool | None:
    """True if ``a`` was acquired before ``b``; ``None`` when unknown."""
    ta, tb = a.acquisition_time_s, b.acquisition_time_s
    if ta is not None and tb is not None and ta != tb:
        return ta < tb
    na, nb = a.series_number, b.series_number
    if na is not None and nb is not None and na != nb:
        return na < nb
    return None


def _same_sequence(a: SeriesHeader, b: SeriesHeader) -> bool:
    def key(h: SeriesHeader) -> tuple:
        return (h.scanning_sequence, h.mr_acquisition_type,
                round(h.repetition_time_ms or -1, 0), round(h.echo_time_ms or -1, 1),
                round(h.inversion_time_ms or -1, 0), round(h.flip_angle_deg or -1, 0))

    return key(a) == key(b) and a.repetition_time_ms is not None


def _study_context(study: Study, verdicts: dict[str, Verdict], rules: Rules) -> None:
    """Resolve T1-weighted series silent about contrast from acquisition order."""
    for _ in range(3):  # a decision may enable another (T1ce found -> earlier T1 is pre)
        if not _study_pass(study, verdicts, rules):
            return


def _study_pass(study: Study, verdicts: dict[str, Verdict], rules: Rules) -> bool:
    by_id = {s.series_id: s for s in study.series}
    conf = rules.confidence
    silent = [sid for sid, v in verdicts.items() if v.family_t1 and v.contrast == "silent"]
    if not silent:
        return False
    ce_known = [sid for sid, v in verdicts.items() if v.family_t1 and v.contrast == "positive"]
    pre_known = [sid for sid, v in verdicts.items() if v.family_t1 and v.contrast == "negative"]
    bolus = [sid for sid, v in verdicts.items() if v.role is R.PERFUSION]
    for sid in silent:
        h = by_id[sid].header
        v = verdicts[sid]
        after = [o for o in ce_known + bolus if _before(by_id[o].header, h) is True]
        if after:
            v.settle(R.T1CE, conf["contrast_order"],
                     f"acquired after {after[0]} ({verdicts[after[0]].role.value}): "
                     "gadolinium already given in this session")
            continue
        repeat_of = [o for o in pre_known if _before(by_id[o].header, h) is True
                     and _same_sequence(by_id[o].header, h)]
        if repeat_of:
            v.settle(R.T1CE, conf["contrast_repeat"],
                     f"same T1 sequence as pre-contrast {repeat_of[0]}, acquired later: "
                     "the repeat is the post-contrast acquisition")
            continue
        before_ce = [o for o in ce_known if _before(h, by_id[o].header) is True]
        if before_ce:
            v.settle(R.T1, conf["contrast_repeat"],
                     f"acquired before the contrast-enhanced {before_ce[0]}: the pre-contrast "
                     "T1 of this study")
    # two or more silent series of one sequence: first = pre, later = post (docs/failure-kinds.md kind 16)
    still = [sid for sid in silent if verdicts[sid].contrast == "silent"]
    for sid in still:
        h = by_id[sid].header
        twins = [o for o in still if o != sid and _same_sequence(by_id[o].header, h)]
        if not twins:
            continue
        order = [_before(h, by_id[o].header) for o in twins]
        v = verdicts[sid]
        if all(x is True for x in order):
            v.settle(R.T1, conf["contrast_repeat"],
                     "first of a T1 sequence repeated in this session: pre-contrast")
        elif all(x is False for x in order):
            v.settle(R.T1CE, conf["contrast_repeat"],
                     "later repeat of the same T1 sequence: post-contrast")
    return any(verdicts[sid].contrast != "silent" for sid in silent)


def _fmt_time(t: float) -> str:
    t = int(round(t))
    return f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"


# The documented preference among the candidates of one role (docs/failure-kinds.md kinds 14, 15), strongest
# first: (criterion, key, how a value is shown). Higher key wins. The last three only break ties
# between series the first five cannot tell apart, deterministically: a later acquisition (of
# two equivalent post-contrast series the later one has the more complete enhancement; of two
# pre-contrast ones, the later is the one repeated after a problem), a higher SeriesNumber,
# then the series id (file name) in alphabetical order.
_PREFERENCE: tuple[tuple[str, Any, Any], ...] = (
    ("ORIGINAL over DERIVED",
     lambda s, c: 1 if not s.header.image_type or s.header.image_type[0].upper() == "ORIGINAL"
     else 0, lambda s: (s.header.image_type or ("ORIGINAL",))[0].upper()),
    ("3D over 2D", lambda s, c: 1 if (s.header.mr_acquisition_type or "").upper() == "3D" else 0,
     lambda s: s.header.mr_acquisition_type or "?"),
    ("more slices", lambda s, c: s.header.n_slices, lambda s: f"{s.header.n_slices} slices"),
    ("finer slice spacing", lambda s, c: -(s.header.slice_spacing_mm or 99.0),
     lambda s: f"{s.header.slice_spacing_mm:g} mm" if s.header.slice_spacing_mm else "? mm"),
    ("stronger role evidence", lambda s, c: round(c.get(s.series_id, 0.0), 3),
     None),
    ("later acquisition", lambda s, c: s.header.acquisition_time_s
     if s.header.acquisition_time_s is not None else float("-inf"),
     lambda s: _fmt_time(s.header.acquisition_time_s)
     if s.header.acquisition_time_s is not None else "no AcquisitionTime"),
    ("higher SeriesNumber", lambda s, c: s.header.series_number
     if s.header.series_number is not None else -1,
     lambda s: f"#{s.header.series_number}" if s.header.series_number is not None else "no #"),
    ("series id in alphabetical order (nothing else tells them apart)", None, None),
)


def _candidate_rank(s: Series, conf: Mapping[str, float] | None = None) -> tuple:
    """Sort key of :data:`_PREFERENCE` (larger is preferred), the series id last (earlier wins)."""
    c = conf or {}
    return tuple(k(s, c) for _, k, _ in _PREFERENCE[:-1]) + (
        tuple(-ord(ch) for ch in s.series_id),)


def _why_preferred(best: Series, other: Series, conf: Mapping[str, float]) -> str:
    """The first criterion of :data:`_PREFERENCE` on which ``best`` beats ``other``, with values."""
    for name, key, show in _PREFERENCE[:-1]:
        kb, ko = key(best, conf), key(other, conf)
        if kb != ko:
            if show is None:
                return f"{name} ({conf.get(best.series_id, 0):.2f} vs " \
                       f"{conf.get(other.series_id, 0):.2f})"
            return f"{name} ({show(best)} vs {show(other)})"
    return _PREFERENCE[-1][0]


def _not_candidate(s: Series, settings: Settings) -> str | None:
    h = s.header
    if h.n_temporal > 1:
        return f"4D ({h.n_temporal} volumes)"
    if h.n_slices < MIN_CANDIDATE_SLICES:
        return f"only {h.n_slices} slice(s)"
    if h.image_type and h.image_type[0].upper() == "DERIVED" and not settings.allow_derived:
        return "derived series"
    if h.extra.get("mosaic"):
        return "MOSAIC"
    return None


def assign_roles(study: Study, *, settings: Settings, rules: Rules | None = None,
                 use_image_evidence: bool = True, images: StudyImages | None = None,
                 hdbet: Any = None) -> RoleAssignment:
    """Pick the T1, T2 and T1ce series of one study, and its FLAIR when it has one (optional: a
    study without FLAIR is complete).

    Per-series header evidence (:func:`classify_series`), then study-level acquisition order for
    T1-weighted series silent about contrast, then (``use_image_evidence=True``; for each
    T1-weighted candidate still silent: conversion, HD-BET fast and N4, 20-50 s on a 2-core CPU)
    the image measure of :func:`enhancement_evidence`, which decides T1 or T1ce only beyond its
    documented margins. The measure is skipped (and the reason says so) when no series of the
    study is or might be its T2: such a study fails ``MISSING_ROLE`` whatever the image shows
    (:func:`inspect_study` measures it anyway). Among the series of one role, the order of :data:`_PREFERENCE` picks
    one: ORIGINAL, 3D, most slices, finest slice spacing, stronger role evidence, then (ties
    only) later acquisition, higher SeriesNumber, series id. The chosen series' reasons name
    every candidate it was preferred over and the deciding criterion; each other candidate's
    reasons say which series was preferred and why (docs/failure-kinds.md kind 15). Two candidates are never
    a failure: both passed the role evidence, so either is a valid input, and the choice is
    reported. Localizers, derived, DWI/ADC, SWI, PD, perfusion, 4D and series of fewer
    than 10 slices are never candidates (the reason is added to their decision).

    ``images`` (the study's :class:`~recnec_cli.study.StudyImages`) receives the volumes and
    HD-BET masks image evidence makes, so that later stages do not convert or skull-strip them
    again; ``hdbet`` is the run's HD-BET (its mode, TTA and device), default the process-wide one
    for ``settings``.

    Returns
    -------
    RoleAssignment
        ``status`` ``None`` when all three roles are chosen; ``T1CE_UNDETERMINED`` when T1 or T1ce
        is missing while T1-weighted series of unresolved contrast exist (``message`` lists them
        with confidences); otherwise ``MISSING_ROLE`` with ``message`` like ``MISSING_ROLE: T2``.
    """
    return _assign(study, settings=settings, rules=rules, use_image_evidence=use_image_evidence,
                   image_evidence_if_incomplete=False, images=images, hdbet=hdbet)


def _t2_possible(study: Study, verdicts: Mapping[str, Verdict], settings: Settings) -> bool:
    """Whether any candidate series of the study is, or might yet be, the T2 (its verdict says
    T2 at any confidence, or T2 is among its competing roles)."""
    return any((v.role is R.T2 or any(r is R.T2 for r, _ in v.competing))
               and _not_candidate(s, settings) is None
               for s in study.series for v in (verdicts[s.series_id],))


def _assign(study: Study, *, settings: Settings, rules: Rules | None, use_image_evidence: bool,
            image_evidence_if_incomplete: bool, images: StudyImages | None = None,
            hdbet: Any = None) -> RoleAssignment:
    """:func:`assign_roles`; ``image_evidence_if_incomplete=True`` (``inspect``) measures image
    evidence even in a study that cannot be complete (no T2), where the user asked about it."""
    rules = rules or default_rules()
    thr = settings.role_confidence_threshold
    verdicts = {s.series_id: header_verdict(s, rules) for s in study.series}
    _study_context(study, verdicts, rules)
    if use_image_evidence:
        open_t1 = [s for s in study.series if verdicts[s.series_id].family_t1
                   and verdicts[s.series_id].contrast == "silent"
                   and _not_candidate(s, settings) is None]
        if open_t1 and not image_evidence_if_incomplete and \
                not _t2_possible(study, verdicts, settings):
            # 20-50 s per series spent on a study that fails MISSING_ROLE whatever it says
            for s in open_t1:
                verdicts[s.series_id].reasons.append(
                    "image evidence skipped: study has no T2 (it cannot be complete; "
                    "`recnec inspect` measures it)")
            log.debug("study %s: image evidence skipped, no T2 candidate", study.study_id)
        else:
            for s in open_t1:
                image_verdict(s, verdicts[s.series_id], settings, rules, images, hdbet)
    decisions = tuple(verdict_decision(s, verdicts[s.series_id], thr) for s in study.series)
    by_id = {s.series_id: s for s in study.series}
    conf = {d.series_id: d.confidence for d in decisions}
    extra: dict[str, list[str]] = {}
    chosen: dict[SeriesRole, Series] = {}
    for role in (*SeriesRole.model_roles(), *SeriesRole.optional_roles()):
        cands = []
        for d in decisions:
            if d.role is not role:
                continue
            why = _not_candidate(by_id[d.series_id], settings)
            if why:
                log.debug("series %s (%s) not a candidate: %s", d.series_id, role.value, why)
                extra.setdefault(d.series_id, []).append(
                    f"not a candidate for {role.value}: {why}")
                continue
            cands.append(by_id[d.series_id])
        if cands:
            best = max(cands, key=lambda x: _candidate_rank(x, conf))
            chosen[role] = best
            over = []
            for c in cands:
                if c is best:
                    continue
                why = _why_preferred(best, c, conf)
                over.append(f"{c.series_id} ({why})")
                log.debug("series %s (%s) not chosen: %s preferred by %s", c.series_id,
                          role.value, best.series_id, why)
                extra.setdefault(c.series_id, []).append(
                    f"not chosen as {role.value}: {best.series_id} preferred by {why}")
            if over:
                extra.setdefault(best.series_id, []).append(
                    f"chosen as {role.value} over " + "; ".join(over))
    if extra:
        decisions = tuple(replace(d, reasons=d.reasons + tuple(extra[d.series_id]))
                          if d.series_id in extra else d for d in decisions)
    missing = [r for r in SeriesRole.model_roles() if r not in chosen]
    status, message = None, ""
    if missing:
        open_t1 = [d for d in decisions if d.role is R.UNDETERMINED
                   and verdicts[d.series_id].family_t1
                   and _not_candidate(by_id[d.series_id], settings) is None]
        miss_txt = "MISSING_ROLE: " + ", ".join(r.value for r in missing)
        if open_t1 and (R.T1 in missing or R.T1CE in missing):
            status = "T1CE_UNDETERMINED"
            cands_txt = "; ".join(
                f"{d.series_id} (" + ", ".join(f"{r.value} {c:.2f}" for r, c in d.competing) + ")"
                for d in open_t1)
            message = (f"T1CE_UNDETERMINED: T1-weighted series without decisive contrast "
                       f"evidence: {cands_txt}; {miss_txt}")
        else:
            status, message = "MISSING_ROLE", miss_txt
    return RoleAssignment(decisions=decisions, chosen=chosen, status=status, message=message)


# ============================================================================================
# inspect
# ============================================================================================
def inspect_study(path: Path, *, settings: Settings, rules: Rules | None = None,
                  use_image_evidence: bool = True) -> list[dict]:
    """One JSON-serialisable dict per series found under ``path`` (a study folder or a tree).

    Keys: ``study_id``, ``patient``, ``series_id`` (SeriesInstanceUID, ``UID#echo=2`` for split
    series, or the file path relative to ``path``), ``description``, ``role``, ``confidence``,
    ``reasons`` (list of str), ``competing`` (list of ``[role, score]``), ``chosen`` (bool),
    ``chosen_as`` (role or ``None``), ``n_slices``, ``n_temporal``, ``study_status``,
    ``study_message``.

    Raises
    ------
    DiscoveryError
        From :func:`~recnec_cli.stages.discover.discover` (no image, path not found).
    UsageError
        A broken ``settings.rules_file`` (:func:`~.rules.load_rules`).
    """
    from ..discover import discover

    rules = rules or (load_rules(settings.rules_file) if settings.rules_file else default_rules())
    rows: list[dict] = []
    for study in discover(Path(path)):
        a = _assign(study, settings=settings, rules=rules, use_image_evidence=use_image_evidence,
                    image_evidence_if_incomplete=True)
        chosen_ids = {s.series_id: r for r, s in a.chosen.items()}
        by_id = {s.series_id: s for s in study.series}
        for d in a.decisions:
            h = by_id[d.series_id].header
            rows.append({
                "study_id": study.study_id,
                "patient": study.patient_pseudonym,
                "series_id": d.series_id,
                "description": h.series_description or "",
                "role": d.role.value,
                "confidence": d.confidence,
                "reasons": list(d.reasons),
                "competing": [[r.value, c] for r, c in d.competing],
                "chosen": d.series_id in chosen_ids,
                "chosen_as": chosen_ids[d.series_id].value if d.series_id in chosen_ids else None,
                "n_slices": h.n_slices,
                "n_temporal": h.n_temporal,
                "study_status": a.status,
                "study_message": a.message,
            })
    return rows
