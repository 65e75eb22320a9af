"""Per-series evidence: hard tags, acquisition physics, name tokens and contrast -> one verdict.

The order of the evidence (strongest first) is described in :mod:`recnec_cli.stages.classify`;
:func:`classify_series` gives the header-only decision of one series, the study-level pass
(:mod:`.study`) refines the verdicts of T1-weighted series silent about contrast.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from ...config import Settings
from ...study import RoleDecision, Series, SeriesHeader, SeriesRole
from .rules import Rules, default_rules
from .tokens import BIDS_CE_NEGATIVE, BIDS_CE_RE, normalise, pattern_hits, series_texts, token_roles

R = SeriesRole

# ImageType values (PS3.3 C.7.6.1.1.2, vendor extensions) marking a derived/reformatted image.
DERIVED_IMAGE_TYPES = {"MPR", "MIP", "MINIP", "SUB", "SUBTRACTION", "REFORMATTED", "PROJECTION IMAGE",
                       "MOCO", "CPR", "CURVED", "VOLUME", "FUSION", "SCREEN SAVE", "RESAMPLED",
                       "COLLAPSE", "MNIP", "CSAPARALLEL", "CSA RESAMPLED", "CSA MPR"}
DIFFUSION_IMAGE_TYPES = {"ADC", "TRACEW", "FA", "DIFFUSION", "EADC", "TRACE", "ISODWI", "DWI",
                         "CALC_BVALUE"}
SWI_IMAGE_TYPES = {"SWI", "MINIP", "PHASE MAP", "P", "PHASE", "SWAN"}
PERFUSION_IMAGE_TYPES = {"PERFUSION", "PERF", "TTP", "RCBV", "RCBF", "MTT", "GBP"}
SECONDARY_CAPTURE_SOP = ("1.2.840.10008.5.1.4.1.1.7",)
MIN_CANDIDATE_SLICES = 10  # same limit as convert.MIN_SLICES; fewer slices is never a volume


@dataclass
class Verdict:
    """A series' role while it is being decided (header, study and image evidence), before the
    confidence threshold turns it into a :class:`~recnec_cli.study.RoleDecision`."""

    role: SeriesRole
    confidence: float
    reasons: list[str]
    competing: list[tuple[SeriesRole, float]] = field(default_factory=list)
    family_t1: bool = False  # T1-weighted, contrast possibly unresolved
    contrast: str = "silent"  # "positive" | "negative" | "silent" | "conflict"

    def settle(self, role: SeriesRole, confidence: float, reason: str) -> None:
        """Decide the contrast of a T1-weighted series: ``role`` T1 (pre-contrast, contrast
        "negative") or T1CE ("positive") at ``confidence``; the competing roles are cleared and
        ``reason`` is added to the reasons."""
        self.role, self.confidence = role, confidence
        self.contrast = "positive" if role is R.T1CE else "negative"
        self.competing = []
        self.reasons.append(reason)


def _physics_role(h: SeriesHeader, ph: Mapping[str, float]) -> tuple[SeriesRole | None, str]:
    """Weighting from TR/TE/TI/sequence type; ``(None, why)`` when inconclusive."""
    tr, te, ti = h.repetition_time_ms, h.echo_time_ms, h.inversion_time_ms
    seq = set(h.scanning_sequence)
    variant = set(h.sequence_variant)
    gre = "GR" in seq
    ir = "IR" in seq or (ti is not None and ti > 0) or "MP" in variant and gre
    vals = f"TR={tr:g} TE={te:g}" if tr is not None and te is not None else \
        f"TR={tr} TE={te}"
    if ti:
        vals += f" TI={ti:g}"
    if "EP" in seq:
        return R.DWI, f"echo-planar (ScanningSequence EP) {vals}: diffusion/fMRI, not anatomical"
    if te is None:
        return None, "no EchoTime"
    if ti is not None and ti >= ph["flair_min_ti_ms"] and te >= ph["flair_min_te_ms"]:
        return R.FLAIR, f"long-TI inversion recovery with long TE ({vals}): FLAIR"
    if tr is not None and tr >= ph["long_tr_ms"] and te >= ph["t2_min_te_ms"] and ti \
            and ti >= ph["flair_min_ti_ms"]:
        return R.FLAIR, f"long-TI inversion recovery ({vals}): FLAIR"
    if gre and not ir and te >= ph["swi_min_te_ms"]:
        return R.SWI, f"gradient echo with long TE ({vals}): T2*/susceptibility weighted"
    if ir and ti is not None and ph["t1_ir_min_ti_ms"] <= ti <= ph["t1_ir_max_ti_ms"] and \
            te <= ph["t1_max_te_ms"]:
        return R.T1, f"inversion-prepared, TI in the T1 range, short TE ({vals}): T1-weighted"
    if gre and te <= ph["t1_gre_max_te_ms"] and (tr is None or tr <= ph["t1_gre_max_tr_ms"]
                                                 or "MP" in variant):
        return R.T1, f"spoiled gradient echo, short TR/TE ({vals}): T1-weighted"
    if tr is None:
        return None, f"no RepetitionTime ({vals})"
    kind = "spin echo, " if "SE" in seq else ""
    if not gre and tr <= ph["t1_se_max_tr_ms"] and te <= ph["t1_max_te_ms"]:
        return R.T1, f"{kind}short TR and TE ({vals}): T1-weighted"
    if not gre and tr >= ph["long_tr_ms"] and te >= ph["t2_min_te_ms"]:
        return R.T2, f"{kind}long TR and long TE ({vals}): T2-weighted"
    if not gre and tr >= ph["long_tr_ms"] and te <= ph["pd_max_te_ms"] and not ti:
        return R.PD, f"{kind}long TR and short TE ({vals}): proton density"
    return None, f"acquisition physics inconclusive ({vals})"



def _contrast(h: SeriesHeader, texts: Mapping[str, str], rules: Rules
              ) -> tuple[str, list[str], float]:
    """('positive'|'negative'|'silent'|'conflict', reasons, confidence)."""
    conf = rules.confidence
    reasons: list[str] = []
    agent = " ".join(x for x in (h.contrast_bolus_agent, h.contrast_bolus_ingredient) if x)
    tag_pos = False
    if agent.strip():
        a = normalise(agent)
        neg = [p for p in rules.contrast["agent_negative"] if p.fullmatch(a)]
        if neg:
            reasons.append("ContrastBolusAgent says none")
            return "negative", reasons, conf["contrast_tag"]
        reasons.append("ContrastBolusAgent/Ingredient filled (PS3.3 C.7.6.4)")
        tag_pos = True
    if h.contrast_bolus_volume_ml and h.contrast_bolus_volume_ml > 0:
        reasons.append(f"ContrastBolusVolume {h.contrast_bolus_volume_ml:g} ml")
        tag_pos = True
    # BIDS ce-<label> entity (BIDS 1.9 "ce": contrast agent): an explicit statement that decides
    # over generic words anywhere in the names ("acq-pre_ce-gadolinium_T1w" is post-contrast)
    m = BIDS_CE_RE.search(texts.get("file_name", ""))
    if m and not tag_pos:
        if m.group(1).lower() in BIDS_CE_NEGATIVE:
            reasons.append(f"BIDS entity ce-{m.group(1)} (explicitly no contrast agent)")
            return "negative", reasons, conf["contrast_tokens"]
        reasons.append(f"BIDS entity ce-{m.group(1)} (contrast agent named; decides over "
                       "contrast words)")
        return "positive", reasons, conf["contrast_tokens"]
    pos_hits, neg_hits = [], []
    for raw in texts.values():
        norm = normalise(raw)
        if not norm:
            continue
        for p in rules.contrast["neutral"]:
            norm = p.sub(" ", norm)
        neg_hits += [f"'{x}'" for x in pattern_hits(rules.contrast["negative"], norm)
                     if f"'{x}'" not in neg_hits]
        pos_hits += [f"'{x}'" for x in pattern_hits(rules.contrast["positive"], norm)
                     if f"'{x}'" not in pos_hits]
    if not pos_hits and not neg_hits and "file_name" in texts:
        # file-name conventions that name both T1 kinds (TCGA/BrainLes *_t1 vs *_t1c, BraTS
        # t1n vs t1c, BIDS *_T1w vs *_ce-<agent>_T1w): the plain suffix is the pre-contrast T1
        stem = re.split(r"\.nii|\.nrrd", texts["file_name"], flags=re.I)[0]
        last = re.split(r"[_\-. ]+", stem)[-1].lower() if stem else ""
        if last in ("t1", "t1w", "t1n") and not tag_pos:
            reasons.append(f"file-name suffix '_{last}' (the convention's post-contrast name "
                           "would be t1c/t1ce/ce-*)")
            return "negative", reasons, conf["contrast_order"]
    if tag_pos and neg_hits:
        reasons.append("but negative contrast words: " + ", ".join(neg_hits))
        return "conflict", reasons, 0.5
    if tag_pos:
        return "positive", reasons, conf["contrast_tag"]
    if neg_hits:
        reasons.append("negative contrast words: " + ", ".join(neg_hits)
                       + (" (win over " + ", ".join(pos_hits) + ")" if pos_hits else ""))
        return "negative", reasons, conf["contrast_tokens"]
    if pos_hits:
        reasons.append("contrast words: " + ", ".join(pos_hits))
        return "positive", reasons, conf["contrast_tokens"]
    reasons.append("header silent about contrast (no ContrastBolusAgent, no contrast words)")
    return "silent", reasons, conf["silent_t1"]


def header_verdict(series: Series, rules: Rules) -> Verdict:
    """Header-only :class:`Verdict` of one series: site pins, hard tags, physics, tokens, contrast."""
    h = series.header
    conf = rules.confidence
    ph = rules.physics
    texts = series_texts(h, series)
    itype = {t.upper() for t in h.image_type}
    # 1. pins
    for pin in rules.pins:
        fields_ = texts.keys() if pin.field == "any" else [pin.field]
        for f in fields_:
            if texts.get(f) and pin.pattern.search(texts[f]):
                return Verdict(pin.role, conf["pin"], [f"site pin {pin.source}: {f} matches "
                                                       f"/{pin.pattern.pattern}/"],
                               family_t1=pin.role in (R.T1, R.T1CE),
                               contrast="positive" if pin.role is R.T1CE else "negative")
    # 2. hard tags
    if h.modality and h.modality.upper() != "MR":
        return Verdict(R.NON_MR, conf["hard_tag"], [f"Modality {h.modality}"])
    if h.sop_class_uid and h.sop_class_uid.startswith(SECONDARY_CAPTURE_SOP):
        return Verdict(R.DERIVED, conf["hard_tag"], ["secondary capture SOP class"])
    if "LOCALIZER" in itype:
        return Verdict(R.LOCALIZER, conf["hard_tag"], ["ImageType LOCALIZER"])
    tok = token_roles(texts, rules)
    if R.LOCALIZER in tok:
        return Verdict(R.LOCALIZER, conf["hard_tag"],
                       ["localizer words: " + ", ".join(tok[R.LOCALIZER])])
    if h.mr_acquisition_type == "2D" and "GR" in h.scanning_sequence and \
            h.repetition_time_ms is not None and h.repetition_time_ms < ph["localizer_max_tr_2d_gre_ms"]:
        return Verdict(R.LOCALIZER, conf["physics"],
                       [f"2D gradient echo with TR {h.repetition_time_ms:g} ms: scout"])
    diff_types = itype & DIFFUSION_IMAGE_TYPES
    derived_types = itype & DERIVED_IMAGE_TYPES
    if (h.image_type and h.image_type[0].upper() == "DERIVED") or derived_types or diff_types:
        why = "ImageType " + "\\".join(h.image_type)
        under, _ = _physics_role(h, ph)
        comp = [(under, 0.5)] if under else []
        return Verdict(R.DERIVED, conf["hard_tag"], [f"{why}: derived/reformatted, not an "
                                                     "original acquisition"], comp)
    if R.DERIVED in tok:
        return Verdict(R.DERIVED, conf["tokens"], ["derived-series words: "
                                                   + ", ".join(tok[R.DERIVED])])
    if itype & PERFUSION_IMAGE_TYPES:
        return Verdict(R.PERFUSION, conf["hard_tag"], ["ImageType " + "\\".join(h.image_type)])
    if h.n_temporal > 1:
        if h.diffusion_b_value is not None or (R.DWI in tok and R.PERFUSION not in tok) or (
                "EP" in h.scanning_sequence and (h.repetition_time_ms or 0) >= ph["long_tr_ms"] * 2
                and R.PERFUSION not in tok):
            # DSC perfusion: EPI with TR 1-2 s; diffusion EPI: TR >= 3 s and b-values
            return Verdict(R.DWI, conf["hard_tag"], [f"4D ({h.n_temporal} volumes) with "
                                                     "diffusion weighting"])
        return Verdict(R.PERFUSION, conf["hard_tag"], [f"4D ({h.n_temporal} volumes over time):"
                                                       " perfusion/dynamic, never a candidate"])
    if h.diffusion_b_value and h.diffusion_b_value > 0:
        return Verdict(R.DWI, conf["hard_tag"], [f"DiffusionBValue {h.diffusion_b_value:g}"])
    if "MOSAIC" in itype:
        return Verdict(R.DWI, conf["hard_tag"], ["Siemens MOSAIC (EPI)"])
    if "EP" in h.scanning_sequence and R.PERFUSION not in tok:
        return Verdict(R.DWI, conf["hard_tag"], ["echo-planar (ScanningSequence EP): "
                                                 "diffusion/fMRI, not anatomical"])
    if series.source == "dicom" and 0 < h.n_slices <= ph["localizer_max_slices"]:
        return Verdict(R.LOCALIZER, conf["physics"], [f"only {h.n_slices} image(s): a scout"])
    if itype & SWI_IMAGE_TYPES and "M" not in itype:
        return Verdict(R.SWI, conf["hard_tag"], ["ImageType " + "\\".join(h.image_type)])
    # 3. physics
    prole, pwhy = _physics_role(h, ph)
    token_model_roles = {r for r in tok if r in (R.T1, R.T2, R.FLAIR, R.PD, R.DWI, R.SWI,
                                                 R.PERFUSION)}
    if prole is R.DWI and R.PERFUSION in tok:
        return Verdict(R.PERFUSION, conf["physics_nonrole"],
                       [pwhy, "perfusion words: " + ", ".join(tok[R.PERFUSION])])
    if prole in (R.FLAIR, R.SWI, R.PD, R.DWI):
        reasons = [pwhy]
        if R.T2 in tok:
            reasons.append("REJECTED_NOT_T2 (named " + ", ".join(tok[R.T2]) + f"; physics says "
                           f"{prole.value})")
        return Verdict(prole, conf["physics_nonrole"], reasons)
    if prole in (R.T1, R.T2):
        others = token_model_roles - {prole}
        # T1 physics with T1ce/T1 words is consistent; T2 words on a T1 acquisition are not
        if others and not (prole is R.T2 and others <= {R.PD}):
            return Verdict(R.UNDETERMINED, 0.5,
                           [pwhy, "but the name says " + ", ".join(
                               f"{r.value} ({', '.join(tok[r])})" for r in sorted(others, key=str))],
                           [(prole, 0.5)] + [(r, 0.4) for r in others])
        v = Verdict(prole, conf["physics"], [pwhy])
    else:
        # 4. tokens only
        if not token_model_roles:
            state, creasons, cconf = _contrast(h, texts, rules)
            if state == "positive" and prole is None:
                # gadolinium is read on T1-weighted images; FLAIR, perfusion or SWI acquired
                # after contrast carry their own words or physics (checked above)
                return Verdict(R.T1CE, min(conf["tokens"], cconf),
                               [pwhy, "no series-type words, but contrast evidence implies a "
                                "T1-weighted post-contrast acquisition"] + creasons,
                               family_t1=True, contrast="positive")
            return Verdict(R.UNDETERMINED, 0.0, [pwhy, "no series-type words in the name"])
        if R.FLAIR in token_model_roles and token_model_roles <= {R.FLAIR, R.T2}:
            token_model_roles = {R.FLAIR}  # "T2 FLAIR", "t2_tirm_tra_dark-fluid"
        if len(token_model_roles) > 1:
            return Verdict(R.UNDETERMINED, 0.4, [pwhy, "conflicting words: " + ", ".join(
                f"{r.value} ({', '.join(tok[r])})" for r in sorted(token_model_roles, key=str))],
                           [(r, 0.4) for r in token_model_roles])
        (trole,) = token_model_roles
        v = Verdict(trole, conf["tokens"], [pwhy, f"name says {trole.value}: "
                                            + ", ".join(tok[trole])])
        if trole is R.T2 and series.source == "dicom":
            # docs/failure-kinds.md kind 17: FLAIR, SWI/T2*, PD and DWI series are routinely named "T2"; a DICOM
            # series whose TR/TE are missing cannot be checked, so the name alone does not decide
            v.confidence = conf["tokens_t2_unchecked"]
            v.reasons.append("REJECTED_NOT_T2 (unchecked: no TR/TE to confirm T2 weighting)")
    if v.role is not R.T1:
        return v
    # 5. T1 family: contrast
    state, creasons, cconf = _contrast(h, texts, rules)
    v.family_t1 = True
    v.contrast = state
    v.reasons += creasons
    if state == "positive":
        v.role, v.confidence = R.T1CE, min(v.confidence, cconf)
    elif state == "negative":
        v.role, v.confidence = R.T1, min(v.confidence, cconf)
    else:
        v.role, v.confidence = R.UNDETERMINED, cconf
        v.competing = [(R.T1, cconf), (R.T1CE, round(1 - cconf, 2))]
    return v


def verdict_decision(series: Series, v: Verdict, threshold: float) -> RoleDecision:
    """The :class:`RoleDecision` of ``v``: ``UNDETERMINED`` (its role first among the competing
    ones) when its confidence is below ``threshold``."""
    role = v.role if v.confidence >= threshold else R.UNDETERMINED
    competing = list(v.competing)
    if role is R.UNDETERMINED and v.role is not R.UNDETERMINED:
        competing.insert(0, (v.role, v.confidence))
    return RoleDecision(series_id=series.series_id, role=role, confidence=round(v.confidence, 3),
                        reasons=tuple(v.reasons), competing=tuple(competing))


def classify_series(series: Series, *, rules: Rules | None = None,
                    settings: Settings | None = None) -> RoleDecision:
    """Header-only role of one series.

    Parameters
    ----------
    rules:
        Classification rules; ``None`` uses the bundled ones (:func:`~.rules.default_rules`).
    settings:
        Its ``role_confidence_threshold`` decides below which confidence the role is
        ``UNDETERMINED``; ``None`` uses the default :class:`~recnec_cli.config.Settings` (0.7).

    Returns
    -------
    RoleDecision
        ``role`` is ``UNDETERMINED`` when the evidence is below the threshold or contradicts
        itself; ``competing`` then lists the candidate roles with their scores (a T1-weighted
        series silent about contrast gives ``[(T1, 0.55), (T1CE, 0.45)]``). Study-level evidence
        (acquisition order) and image evidence are applied by
        :func:`~recnec_cli.stages.classify.assign_roles`.
    """
    threshold = (settings or Settings()).role_confidence_threshold
    return verdict_decision(series, header_verdict(series, rules or default_rules()), threshold)

