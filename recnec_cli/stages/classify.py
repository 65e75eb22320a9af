"""Series -> role (T1, T2, T1ce or a non-role), with a confidence and the reasons, never a guess.

Evidence, strongest first (``../shared/FAILURES.md`` kinds 6, 7, 13, 15, 16, 17):

1. site pins from a rules file (a protocol name the site knows);
2. hard tags: non-MR Modality, ImageType LOCALIZER / DERIVED / MPR / MIP / SUB / ADC ...
   (DICOM PS3.3 C.7.6.1.1.2 and C.8.13.1.1.1), 4D series, diffusion b-values;
3. acquisition physics: ScanningSequence (EP/IR/GR/SE, PS3.3 C.8.3.1), TR, TE, TI, including the
   Enhanced MR functional groups read by :mod:`discover`. Physics decides the weighting; a name
   never overrides physics that says FLAIR, SWI/T2*, PD or DWI (``REJECTED_NOT_T2``);
4. description / protocol / sequence / file-name tokens (multilingual, kept as data in
   ``data/rules.toml``), used when the physics is absent or inconclusive; a conflict between the
   name and the physics for a model role gives ``UNDETERMINED``;
5. for T1-weighted series, contrast: ContrastBolusAgent / Ingredient / Volume, BIDS ``ce-``,
   positive and negative contrast tokens (negative wins), then at study level the acquisition
   order (after a contrast series or a perfusion bolus, the same T1 sequence repeated later), and
   finally, optionally, image evidence (:func:`enhancement_evidence`).

Every decision carries a confidence in 0..1; below ``Settings.role_confidence_threshold`` the role
is ``UNDETERMINED`` and the competing roles are listed. Library code: no Typer or Rich here.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..config import Settings
from ..errors import RecnecError, UsageError
from ..study import RoleAssignment, RoleDecision, Series, SeriesHeader, SeriesRole, Study

log = logging.getLogger(__name__)

BUNDLED_RULES = Path(__file__).resolve().parents[1] / "data" / "rules.toml"
R = SeriesRole
TOKEN_ROLES = ("T1", "T2", "FLAIR", "PD", "DWI", "SWI", "PERFUSION", "LOCALIZER", "DERIVED")
CONTRAST_KEYS = ("positive", "negative", "neutral", "agent_negative")
ROLE_BY_NAME = {r.name: r for r in SeriesRole} | {r.value.upper(): r for r in SeriesRole}

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


# ============================================================================================
# rules
# ============================================================================================
@dataclass(frozen=True)
class Pin:
    """A site rule: text matching ``pattern`` (case-insensitive regex, searched) in ``field``
    (``series_description``, ``protocol_name``, ``sequence_name`` or ``any``) is ``role``."""

    pattern: re.Pattern
    role: SeriesRole
    field: str = "any"
    source: str = ""


@dataclass(frozen=True)
class Rules:
    """Validated classification rules: compiled token regexes, thresholds and pins."""

    tokens: Mapping[str, tuple[re.Pattern, ...]]
    contrast: Mapping[str, tuple[re.Pattern, ...]]
    physics: Mapping[str, float]
    confidence: Mapping[str, float]
    pins: tuple[Pin, ...] = ()
    sources: tuple[str, ...] = ()
    raw_tokens: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


def _toml_load(path: Path) -> dict:
    try:
        import tomllib  # Python >= 3.11
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise UsageError(f"rules file {path}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"rules file {path}: not valid TOML ({exc})") from None


def _compile_token(src: str, tok: Any, where: str) -> re.Pattern:
    if not isinstance(tok, str) or not tok.strip():
        raise UsageError(f"rules file {src}: {where}: tokens must be non-empty strings, got {tok!r}")
    try:
        return re.compile(r"(?<![a-z0-9])(?:" + tok.strip() + r")(?![a-z0-9])")
    except re.error as exc:
        raise UsageError(f"rules file {src}: {where}: bad regular expression {tok!r} ({exc})"
                         ) from None


def _role(src: str, name: Any, where: str) -> SeriesRole:
    r = ROLE_BY_NAME.get(str(name).strip().upper()) if isinstance(name, str) else None
    if r is None or r is R.UNDETERMINED:
        raise UsageError(f"rules file {src}: {where}: unknown role {name!r} (one of "
                         f"{', '.join(x.value for x in SeriesRole if x is not R.UNDETERMINED)})")
    return r


_ALLOWED = {"version", "tokens", "contrast", "physics", "confidence", "pin"}
_PIN_KEYS = {"pattern", "role", "field"}
_PIN_FIELDS = {"any", "series_description", "protocol_name", "sequence_name"}


def load_rules(path: Path | None = None) -> Rules:
    """Load the bundled ``data/rules.toml`` plus an optional site TOML on top of it.

    The site file may add tokens (``[tokens] T1 = [...]``, ``[contrast] positive = [...]``),
    change physics limits / confidences key by key, and pin roles::

        [[pin]]
        pattern = "^NEURO_T1_3D_KM"      # regex, case-insensitive, searched
        role = "T1ce"
        field = "protocol_name"          # or series_description, sequence_name, any

    Raises
    ------
    UsageError
        Unknown section or key, bad regular expression, unknown role, non-numeric threshold,
        unreadable or invalid TOML; the message names the file and the key.
    """
    layers = [(str(BUNDLED_RULES), _toml_load(BUNDLED_RULES))]
    if path is not None:
        layers.append((str(path), _toml_load(Path(path))))
    raw_tokens: dict[str, list[str]] = {k: [] for k in TOKEN_ROLES}
    raw_contrast: dict[str, list[str]] = {k: [] for k in CONTRAST_KEYS}
    tokens: dict[str, list[re.Pattern]] = {k: [] for k in TOKEN_ROLES}
    contrast: dict[str, list[re.Pattern]] = {k: [] for k in CONTRAST_KEYS}
    physics: dict[str, float] = {}
    confidence: dict[str, float] = {}
    pins: list[Pin] = []
    for i, (src, data) in enumerate(layers):
        bad = set(data) - _ALLOWED
        if bad:
            raise UsageError(f"rules file {src}: unknown section(s) {sorted(bad)} (allowed: "
                             f"{sorted(_ALLOWED)})")
        for sect, target, raw, keys in (("tokens", tokens, raw_tokens, TOKEN_ROLES),
                                        ("contrast", contrast, raw_contrast, CONTRAST_KEYS)):
            part = data.get(sect, {})
            if not isinstance(part, dict):
                raise UsageError(f"rules file {src}: [{sect}] must be a table")
            for key, toks in part.items():
                if key not in keys:
                    raise UsageError(f"rules file {src}: [{sect}] unknown key {key!r} (allowed: "
                                     f"{', '.join(keys)})")
                if not isinstance(toks, list):
                    raise UsageError(f"rules file {src}: [{sect}] {key} must be a list of strings")
                for t in toks:
                    target[key].append(_compile_token(src, t, f"[{sect}] {key}"))
                    if key in raw:
                        raw[key].append(t.strip())
        for sect, target in (("physics", physics), ("confidence", confidence)):
            part = data.get(sect, {})
            if not isinstance(part, dict):
                raise UsageError(f"rules file {src}: [{sect}] must be a table")
            for key, val in part.items():
                if i > 0 and key not in target:
                    raise UsageError(f"rules file {src}: [{sect}] unknown key {key!r} (allowed: "
                                     f"{', '.join(sorted(target))})")
                if isinstance(val, bool) or not isinstance(val, (int, float)):
                    raise UsageError(f"rules file {src}: [{sect}] {key} must be a number")
                if sect == "confidence" and not 0.0 <= float(val) <= 1.0:
                    raise UsageError(f"rules file {src}: [confidence] {key} must be within 0..1")
                target[key] = float(val)
        plist = data.get("pin", [])
        if not isinstance(plist, list):
            raise UsageError(f"rules file {src}: use [[pin]] tables for pins")
        for j, p in enumerate(plist):
            where = f"[[pin]] #{j + 1}"
            if not isinstance(p, dict):
                raise UsageError(f"rules file {src}: {where} must be a table")
            bad = set(p) - _PIN_KEYS
            if bad or "pattern" not in p or "role" not in p:
                raise UsageError(f"rules file {src}: {where}: keys must be pattern, role and "
                                 f"optional field (got {sorted(p)})")
            fld = p.get("field", "any")
            if fld not in _PIN_FIELDS:
                raise UsageError(f"rules file {src}: {where}: field {fld!r} not one of "
                                 f"{sorted(_PIN_FIELDS)}")
            if not isinstance(p["pattern"], str) or not p["pattern"]:
                raise UsageError(f"rules file {src}: {where}: pattern must be a non-empty string")
            try:
                pat = re.compile(p["pattern"], re.I)
            except re.error as exc:
                raise UsageError(f"rules file {src}: {where}: bad regular expression "
                                 f"{p['pattern']!r} ({exc})") from None
            pins.append(Pin(pattern=pat, role=_role(src, p["role"], where), field=fld,
                            source=f"{Path(src).name} {where}"))
    missing = {"flair_min_ti_ms", "t1_max_te_ms", "long_tr_ms"} - set(physics)
    if missing:  # pragma: no cover - bundled file broken
        raise UsageError(f"bundled rules lack physics keys {sorted(missing)}")
    return Rules(tokens={k: tuple(v) for k, v in tokens.items()},
                 contrast={k: tuple(v) for k, v in contrast.items()},
                 physics=physics, confidence=confidence, pins=tuple(pins),
                 sources=tuple(src for src, _ in layers),
                 raw_tokens={k: tuple(v) for k, v in raw_tokens.items()})


_DEFAULT_RULES: Rules | None = None


def default_rules() -> Rules:
    """The bundled rules, loaded once per process."""
    global _DEFAULT_RULES
    if _DEFAULT_RULES is None:
        _DEFAULT_RULES = load_rules(None)
    return _DEFAULT_RULES


# ============================================================================================
# text normalisation and token matching
# ============================================================================================
def normalise(text: str | None) -> str:
    """Lower case, accents removed, separators -> single spaces, ``+`` and ``*`` standalone."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKD", str(text))
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    t = re.sub(r"([+*])", r" \1 ", t)
    t = re.sub(r"[^a-z0-9+*]+", " ", t)
    return " ".join(t.split())


def _hits(patterns: Iterable[re.Pattern], text: str) -> list[str]:
    out = []
    for p in patterns:
        m = p.search(text)
        if m:
            out.append(m.group(0))
    return out


# BIDS entities whose values are arbitrary labels or indices, never a description of the image
# (BIDS 1.9 Appendix "Entities": sub, ses, task are free labels; run, echo, flip, inv, chunk,
# split are indices). ``sub-01_ses-post_T1w`` is the session "post", not a post-contrast T1.
# acq-, rec-, ce-, mt-, part- and desc- do describe the acquisition and are kept.
BIDS_LABEL_ENTITIES = ("sub", "ses", "task", "run", "echo", "flip", "inv", "chunk", "split")
_BIDS_LABEL_RE = re.compile(r"(?:^|(?<=_))(?:" + "|".join(BIDS_LABEL_ENTITIES)
                            + r")-[A-Za-z0-9]+(?:_|(?=\.)|$)")
_BIDS_CE_RE = re.compile(r"(?:^|_)ce-([A-Za-z0-9]+)(?=_|\.|$)")
BIDS_CE_NEGATIVE = ("none", "no", "pre", "native", "nativ", "without")


def name_text(name: str) -> str:
    """A file name (or its stem) as text for token matching: the values of BIDS label entities
    (:data:`BIDS_LABEL_ENTITIES`) removed, so that ``sub-01_ses-post_ce-gadolinium_T1w.nii.gz``
    reads ``ce-gadolinium_T1w.nii.gz``. Non-BIDS names are returned unchanged."""
    return _BIDS_LABEL_RE.sub("", name)


def _texts(h: SeriesHeader, series: Series) -> dict[str, str]:
    desc = h.series_description or ""
    d = {
        "series_description": desc,
        "protocol_name": h.protocol_name or "",
        "sequence_name": h.sequence_name or "",
    }
    if series.source in ("nifti", "nrrd"):
        name = Path(series.series_id).name
        d["file_name"] = name_text(name)
        if desc and name.startswith(desc):  # no sidecar: discover used the file stem
            d["series_description"] = name_text(desc)
    return d


# ============================================================================================
# per-series classification
# ============================================================================================
@dataclass
class _Verdict:
    role: SeriesRole
    confidence: float
    reasons: list[str]
    competing: list[tuple[SeriesRole, float]] = field(default_factory=list)
    family_t1: bool = False  # T1-weighted, contrast possibly unresolved
    contrast: str = "silent"  # "positive" | "negative" | "silent" | "conflict"


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


def _token_roles(texts: Mapping[str, str], rules: Rules) -> dict[SeriesRole, list[str]]:
    out: dict[SeriesRole, list[str]] = {}
    for raw in texts.values():
        norm = normalise(raw)
        if not norm:
            continue
        for role_name, pats in rules.tokens.items():
            for hit in _hits(pats, norm):
                lst = out.setdefault(getattr(R, role_name), [])
                if f"'{hit}'" not in lst:
                    lst.append(f"'{hit}'")
    return out


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
    m = _BIDS_CE_RE.search(texts.get("file_name", ""))
    if m and not tag_pos:
        if m.group(1).lower() in BIDS_CE_NEGATIVE:
            reasons.append(f"BIDS entity ce-{m.group(1)} (explicitly no contrast agent)")
            return "negative", reasons, conf["contrast_tokens"]
        reasons.append(f"BIDS entity ce-{m.group(1)} (contrast agent named; decides over "
                       "contrast words)")
        return "positive", reasons, conf["contrast_tokens"]
    pos_hits, neg_hits = [], []
    for key, raw in texts.items():
        norm = normalise(raw)
        if not norm:
            continue
        for p in rules.contrast["neutral"]:
            norm = p.sub(" ", norm)
        neg_hits += [f"'{x}'" for x in _hits(rules.contrast["negative"], norm)
                     if f"'{x}'" not in neg_hits]
        pos_hits += [f"'{x}'" for x in _hits(rules.contrast["positive"], norm)
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


def _classify(series: Series, rules: Rules) -> _Verdict:
    h = series.header
    conf = rules.confidence
    ph = rules.physics
    texts = _texts(h, series)
    itype = {t.upper() for t in h.image_type}
    # 1. pins
    for pin in rules.pins:
        fields_ = texts.keys() if pin.field == "any" else [pin.field]
        for f in fields_:
            if texts.get(f) and pin.pattern.search(texts[f]):
                return _Verdict(pin.role, conf["pin"], [f"site pin {pin.source}: {f} matches "
                                                        f"/{pin.pattern.pattern}/"],
                                family_t1=pin.role in (R.T1, R.T1CE),
                                contrast="positive" if pin.role is R.T1CE else "negative")
    # 2. hard tags
    if h.modality and h.modality.upper() != "MR":
        return _Verdict(R.NON_MR, conf["hard_tag"], [f"Modality {h.modality}"])
    if h.sop_class_uid and h.sop_class_uid.startswith(SECONDARY_CAPTURE_SOP):
        return _Verdict(R.DERIVED, conf["hard_tag"], ["secondary capture SOP class"])
    if "LOCALIZER" in itype:
        return _Verdict(R.LOCALIZER, conf["hard_tag"], ["ImageType LOCALIZER"])
    tok = _token_roles(texts, rules)
    if R.LOCALIZER in tok:
        return _Verdict(R.LOCALIZER, conf["hard_tag"],
                        ["localizer words: " + ", ".join(tok[R.LOCALIZER])])
    if h.mr_acquisition_type == "2D" and "GR" in h.scanning_sequence and \
            h.repetition_time_ms is not None and h.repetition_time_ms < ph["localizer_max_tr_2d_gre_ms"]:
        return _Verdict(R.LOCALIZER, conf["physics"],
                        [f"2D gradient echo with TR {h.repetition_time_ms:g} ms: scout"])
    diff_types = itype & DIFFUSION_IMAGE_TYPES
    derived_types = itype & DERIVED_IMAGE_TYPES
    if (h.image_type and h.image_type[0].upper() == "DERIVED") or derived_types or diff_types:
        why = "ImageType " + "\\".join(h.image_type)
        under, _ = _physics_role(h, ph)
        comp = [(under, 0.5)] if under else []
        return _Verdict(R.DERIVED, conf["hard_tag"], [f"{why}: derived/reformatted, not an "
                                                      "original acquisition"], comp)
    if R.DERIVED in tok:
        return _Verdict(R.DERIVED, conf["tokens"], ["derived-series words: "
                                                    + ", ".join(tok[R.DERIVED])])
    if itype & PERFUSION_IMAGE_TYPES:
        return _Verdict(R.PERFUSION, conf["hard_tag"], ["ImageType " + "\\".join(h.image_type)])
    if h.n_temporal > 1:
        if h.diffusion_b_value is not None or (R.DWI in tok and R.PERFUSION not in tok) or (
                "EP" in h.scanning_sequence and (h.repetition_time_ms or 0) >= ph["long_tr_ms"] * 2
                and R.PERFUSION not in tok):
            # DSC perfusion: EPI with TR 1-2 s; diffusion EPI: TR >= 3 s and b-values
            return _Verdict(R.DWI, conf["hard_tag"], [f"4D ({h.n_temporal} volumes) with "
                                                      "diffusion weighting"])
        return _Verdict(R.PERFUSION, conf["hard_tag"], [f"4D ({h.n_temporal} volumes over time):"
                                                        " perfusion/dynamic, never a candidate"])
    if h.diffusion_b_value and h.diffusion_b_value > 0:
        return _Verdict(R.DWI, conf["hard_tag"], [f"DiffusionBValue {h.diffusion_b_value:g}"])
    if "MOSAIC" in itype:
        return _Verdict(R.DWI, conf["hard_tag"], ["Siemens MOSAIC (EPI)"])
    if "EP" in h.scanning_sequence and R.PERFUSION not in tok:
        return _Verdict(R.DWI, conf["hard_tag"], ["echo-planar (ScanningSequence EP): "
                                                  "diffusion/fMRI, not anatomical"])
    if series.source == "dicom" and 0 < h.n_slices <= ph["localizer_max_slices"]:
        return _Verdict(R.LOCALIZER, conf["physics"], [f"only {h.n_slices} image(s): a scout"])
    if itype & SWI_IMAGE_TYPES and "M" not in itype:
        return _Verdict(R.SWI, conf["hard_tag"], ["ImageType " + "\\".join(h.image_type)])
    # 3. physics
    prole, pwhy = _physics_role(h, ph)
    token_model_roles = {r for r in tok if r in (R.T1, R.T2, R.FLAIR, R.PD, R.DWI, R.SWI,
                                                 R.PERFUSION)}
    if prole is R.DWI and R.PERFUSION in tok:
        return _Verdict(R.PERFUSION, conf["physics_nonrole"],
                        [pwhy, "perfusion words: " + ", ".join(tok[R.PERFUSION])])
    if prole in (R.FLAIR, R.SWI, R.PD, R.DWI):
        reasons = [pwhy]
        if R.T2 in tok:
            reasons.append("REJECTED_NOT_T2 (named " + ", ".join(tok[R.T2]) + f"; physics says "
                           f"{prole.value})")
        return _Verdict(prole, conf["physics_nonrole"], reasons)
    if prole in (R.T1, R.T2):
        others = token_model_roles - {prole}
        # T1 physics with T1ce/T1 words is consistent; T2 words on a T1 acquisition are not
        if others and not (prole is R.T2 and others <= {R.PD}):
            return _Verdict(R.UNDETERMINED, 0.5,
                            [pwhy, "but the name says " + ", ".join(
                                f"{r.value} ({', '.join(tok[r])})" for r in sorted(others, key=str))],
                            [(prole, 0.5)] + [(r, 0.4) for r in others])
        v = _Verdict(prole, conf["physics"], [pwhy])
    else:
        # 4. tokens only
        if not token_model_roles:
            state, creasons, cconf = _contrast(h, texts, rules)
            if state == "positive" and prole is None:
                # gadolinium is read on T1-weighted images; FLAIR, perfusion or SWI acquired
                # after contrast carry their own words or physics (checked above)
                return _Verdict(R.T1CE, min(conf["tokens"], cconf),
                                [pwhy, "no series-type words, but contrast evidence implies a "
                                 "T1-weighted post-contrast acquisition"] + creasons,
                                family_t1=True, contrast="positive")
            return _Verdict(R.UNDETERMINED, 0.0, [pwhy, "no series-type words in the name"])
        if R.FLAIR in token_model_roles and token_model_roles <= {R.FLAIR, R.T2}:
            token_model_roles = {R.FLAIR}  # "T2 FLAIR", "t2_tirm_tra_dark-fluid"
        if len(token_model_roles) > 1:
            return _Verdict(R.UNDETERMINED, 0.4, [pwhy, "conflicting words: " + ", ".join(
                f"{r.value} ({', '.join(tok[r])})" for r in sorted(token_model_roles, key=str))],
                            [(r, 0.4) for r in token_model_roles])
        (trole,) = token_model_roles
        v = _Verdict(trole, conf["tokens"], [pwhy, f"name says {trole.value}: "
                                             + ", ".join(tok[trole])])
        if trole is R.T2 and series.source == "dicom":
            # FAILURES.md 17: FLAIR, SWI/T2*, PD and DWI series are routinely named "T2"; a DICOM
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


def _decision(series: Series, v: _Verdict, threshold: float) -> RoleDecision:
    role = v.role if v.confidence >= threshold else R.UNDETERMINED
    competing = list(v.competing)
    if role is R.UNDETERMINED and v.role is not R.UNDETERMINED:
        competing.insert(0, (v.role, v.confidence))
    return RoleDecision(series_id=series.series_id, role=role, confidence=round(v.confidence, 3),
                        reasons=tuple(v.reasons), competing=tuple(competing))


def classify_series(series: Series, *, rules: Rules) -> RoleDecision:
    """Header-only role of one series.

    Returns
    -------
    RoleDecision
        ``role`` is ``UNDETERMINED`` when the evidence is below the default threshold (0.7) or
        contradicts itself; ``competing`` then lists the candidate roles with their scores
        (a T1-weighted series silent about contrast gives ``[(T1, 0.55), (T1CE, 0.45)]``).
        Study-level evidence (acquisition order) and image evidence are applied by
        :func:`assign_roles`.
    """
    return _decision(series, _classify(series, rules), Settings().role_confidence_threshold)


# ============================================================================================
# image evidence (optional, T1 vs T1ce)
# ============================================================================================
# Physics. Gadolinium shortens T1, so on a T1-weighted image acquired after it, normal structures
# without a blood-brain barrier or with slow-flowing blood become clearly brighter than white
# matter: choroid plexus, cortical and deep veins (internal cerebral, thalamostriate, basal vein),
# dural venous sinuses, dura, pituitary and infundibulum (Smirniotopoulos et al., "Patterns of
# contrast enhancement in the brain and meninges", RadioGraphics 2007;27:525-551, "normal
# enhancement"; Osborn's Brain, ch. 1). Before contrast, white matter is the brightest tissue
# inside the brain on T1: only fat, marrow and scalp (outside the brain) and rare T1-bright lesions
# (methaemoglobin, melanin, calcification, fat) exceed it.
#
# Measure (:func:`enhancement_evidence`):
#   1. HD-BET brain mask (``fast``, one fold; the HD-BET networks are loaded once per process);
#   2. N4 bias-field correction (Tustison et al., IEEE TMI 2010;29:1310) INSIDE that mask, on the
#      image shrunk to ~6 mm, 5 fitting levels: a receive-coil bias is smooth, an enhancing vessel
#      or the choroid plexus is a few mm wide; fitting inside the brain keeps scalp fat out of the
#      fit (a 3-level fit, on the whole head or in the mask, left the XA30's strong coil bias in
#      place: 23-25 % of its brain voxels above 1.3 x WM);
#   3. white-matter reference = the highest-intensity histogram mode above the brain median;
#   4. the brain core = mask voxels more than 3 mm (world distance) from the mask border, which
#      drops partial-volume voxels of scalp fat, marrow and sinus at the edge of the mask;
#   5. feature = percent of core voxels brighter than 1.3 x WM, per hemisphere (split at the mask
#      centroid along R-L). Normal enhancement is bilateral (both choroid plexuses, veins on both
#      sides); a T1-bright haematoma, resection-cavity blood or an enhancing tumour is usually one-
#      sided. The decision uses the LOW hemisphere for T1ce and the HIGH one for T1, so one-sided
#      brightness never decides either way.
# Measured on the ten real cases in ../shared/data/real (tests/test_classify.py::
# test_image_evidence_values): percent of brain-core voxels > 1.3 x WM, left / right hemisphere
# (whole core), and the core's 99.9th percentile / WM:
#   pre-contrast  TCGA-FG-6692 T1 SE 5.5 mm ....... 0.024 / 0.009 (0.016)   p99.9 1.23
#                 UIH uMR770 3D GRE-IR ............ 0.004 / 0.008 (0.006)         1.19
#                 Philips Elition 3D MPRAGE ....... 0.004 / 0.005 (0.005)         1.19
#                 Siemens E11 2D FLASH 4.8 mm ..... 0.014 / 0.012 (0.013)         1.18
#                 Siemens XA30 3D MPRAGE 2 mm ..... 0.044 / 0.013 (0.028)         1.25
#   post-contrast TCGA-FG-6692 T1c SE 5.5 mm ...... 0.927 / 1.126 (1.028)         1.88
#                 VS-SEG-001 MPRAGE (no hint) ..... 0.961 / 1.074 (1.018)         1.81
#                 pyradiomics brain1 6.5 mm ....... 1.389 / 1.051 (1.219)         1.83
#                 pyradiomics brain2 6.5 mm ....... 1.022 / 0.859 (0.940)         1.95
#                 niivue MR_Gd (skull-stripped) ... 0.832 / 0.232 (0.497)         1.76
# For comparison, the previous measure (% of a central head box > 1.4 x WM, no bias correction,
# no brain mask) gave pre 0.00-1.11 and post 0.16-1.76: overlapping. N4 on the whole head with 3
# levels still left the XA30 at 23 % (coil bias); 5 levels inside the brain mask removed it.
# Gap between the groups, on the statistics the rule uses: highest pre-contrast HIGH hemisphere
# 0.044 (XA30), lowest post-contrast LOW hemisphere 0.232 (MR_Gd): a factor 5.3. Centre = their
# geometric mean 0.101 %; the rule answers only a factor 1.5 beyond the centre on either side
# (so each threshold is also a factor 1.5 from the nearest measured case):
#   max(left, right) <= 0.067 %  -> T1 (pre-contrast)
#   min(left, right) >= 0.152 %  -> T1ce (post-contrast)
#   otherwise not decisive: the series stays T1CE_UNDETERMINED.
# Ten series of nine subjects; the pre-contrast side is four volunteers and one glioma patient,
# no case is after radiotherapy: a SMALL sample.
# The thresholds sit in a measured gap; they are not a validated operating point. Known ways to
# fool it: a pre-contrast T1 with T1-bright blood, fat or calcification on BOTH sides (-> wrong
# T1ce); a scan acquired seconds after injection or with a tiny dose (-> undetermined); a failed
# mask or a field of view that cuts the brain (-> no answer: skullstrip.check_brain_mask, core
# size). Cost per series: conversion (0.1-9 s) + HD-BET fast on a 2-core CPU (15-40 s) + N4 and
# the measure (3-10 s). It runs only for T1-weighted series whose header and study order leave
# contrast open, and never with use_image_evidence=False.
IMAGE_BRIGHT_FACTOR = 1.3       # x white-matter peak
IMAGE_CORE_MM = 3.0             # distance from the brain-mask border, mm
IMAGE_GAP_CENTRE_PERCENT = 0.101  # geometric mean of 0.044 (pre, max) and 0.232 (post, min)
IMAGE_MARGIN_FACTOR = 1.5       # each threshold this factor from the centre and from the data
IMAGE_T1_MAX_PERCENT = IMAGE_GAP_CENTRE_PERCENT / IMAGE_MARGIN_FACTOR    # 0.067, on max(L, R)
IMAGE_T1CE_MIN_PERCENT = IMAGE_GAP_CENTRE_PERCENT * IMAGE_MARGIN_FACTOR  # 0.152, on min(L, R)
IMAGE_N4_SHRINK_MM = 6.0
IMAGE_N4_LEVELS = 5
IMAGE_MIN_CORE_VOXELS = 20000
IMAGE_MEASURE_MM = 1.0         # voxels finer than this are strided to about 1 mm

def _hdbet(settings: Settings) -> Any:
    """HD-BET (fast, one fold), shared per process with the skull-strip stage."""
    from ..devices import resolve_torch_device
    from .skullstrip import get_hdbet

    return get_hdbet(mode="fast", device=resolve_torch_device(settings.device))


def _n4_in_mask(data: Any, spacing: Any, mask: Any) -> Any:
    """Bias-corrected copy of ``data`` (float32 ``(X, Y, Z)``), N4 fitted inside ``mask``."""
    import numpy as np
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(mask.transpose(2, 1, 0)).astype(np.uint8))
    msk.CopyInformation(img)
    f = [max(1, int(round(IMAGE_N4_SHRINK_MM / s))) for s in spacing]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([30] * IMAGE_N4_LEVELS)
    n4.SetNumberOfControlPoints([4, 4, 4])
    n4.Execute(sitk.Shrink(img, f), sitk.Shrink(msk, f))
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).transpose(2, 1, 0)
    return data / np.exp(log_bias)


def _wm_peak(x: Any) -> float:
    """Highest-intensity histogram mode above the median of brain intensities ``x`` (1D)."""
    import numpy as np
    from scipy import ndimage as ndi

    lo, hi = np.percentile(x, [1, 99.5])
    h, e = np.histogram(x, bins=128, range=(lo, hi))
    h = ndi.gaussian_filter1d(h.astype(float), 2)
    c = 0.5 * (e[:-1] + e[1:])
    sel = c > np.median(x)
    return float(c[sel][np.argmax(h[sel])]) if sel.any() else float("nan")


def enhancement_evidence(volume: Any, *, brain_mask: Any = None,
                         settings: Settings | None = None) -> dict[str, float]:
    """Measure normal-structure enhancement on a canonical volume (see the comment above).

    ``volume``: :class:`~recnec_cli.study.Volume` (float32 ``(X, Y, Z)`` RAS+, mm).
    ``brain_mask``: bool ``(X, Y, Z)`` on the same grid; ``None`` runs HD-BET fast (15-40 s on
    a 2-core CPU, the networks loaded once per process on ``settings.device``).

    Returns ``{"bright_percent": % of brain-core voxels > 1.3 x WM, "bright_left": ...,
    "bright_right": ... (per hemisphere, left = R-L coordinate below the mask centroid),
    "p999_ratio": 99.9th percentile of the core / WM, "wm_peak": WM reference (image units,
    after N4), "n_voxels": core voxels, "mask_ml": brain-mask volume (mL), "seconds": N4 and
    measure time}``; the percentages are NaN when the mask is implausible or the core too small.

    Raises
    ------
    SkullStripError
        When HD-BET is run here and fails.
    """
    import time

    import numpy as np
    from scipy import ndimage as ndi

    from .skullstrip import check_brain_mask

    nan = float("nan")
    d = np.asarray(volume.data, dtype=np.float32)
    sp = np.asarray(volume.spacing_mm, dtype=float)
    if brain_mask is None:
        brain_mask = _hdbet(settings or Settings()).brain_mask(volume)
    m = np.asarray(brain_mask, dtype=bool)
    t0 = time.perf_counter()
    # measured at ~1 mm: sub-millimetre series (0.4-0.5 mm in-plane) are strided, which keeps
    # N4 and the distance transform to a few seconds and the voxel size comparable across scanners
    stride = np.maximum(1, np.floor(IMAGE_MEASURE_MM / np.maximum(sp, 1e-3) + 0.01)).astype(int)
    if (stride > 1).any():
        sl = tuple(slice(None, None, int(k)) for k in stride)
        d, m, sp = d[sl], m[sl], sp * stride
    out = {"bright_percent": nan, "bright_left": nan, "bright_right": nan, "p999_ratio": nan,
           "wm_peak": nan, "n_voxels": 0.0, "mask_ml": float(m.sum() * np.prod(sp) / 1000.0),
           "seconds": 0.0}
    try:
        aff = np.asarray(volume.affine, dtype=float).copy()
        aff[:3, :3] = aff[:3, :3] * stride
        check_brain_mask(m, aff)
    except RecnecError as exc:
        log.debug("image evidence: brain mask rejected (%s)", exc)
        return out
    c = _n4_in_mask(d, sp, m)
    wm = _wm_peak(c[m])
    core = ndi.distance_transform_edt(m, sampling=sp) > IMAGE_CORE_MM
    out["n_voxels"] = float(core.sum())
    if core.sum() < IMAGE_MIN_CORE_VOXELS or not wm > 0:
        out["seconds"] = time.perf_counter() - t0
        return out
    x_mid = ndi.center_of_mass(m)[0]
    left = np.zeros_like(core)
    left[: int(round(x_mid))] = True  # RAS+: axis 0 points to the patient's Right; low = Left
    bright = c > IMAGE_BRIGHT_FACTOR * wm
    xc = c[core]
    out.update({
        "bright_percent": float(bright[core].mean() * 100),
        "bright_left": float(bright[core & left].mean() * 100),
        "bright_right": float(bright[core & ~left].mean() * 100),
        "p999_ratio": float(np.percentile(xc, 99.9) / wm),
        "wm_peak": wm,
        "seconds": time.perf_counter() - t0,
    })
    return out


def _image_call(ev: Mapping[str, float]) -> SeriesRole | None:
    """The documented rule on :func:`enhancement_evidence` output: ``T1`` when both hemispheres
    are at most :data:`IMAGE_T1_MAX_PERCENT`, ``T1CE`` when both are at least
    :data:`IMAGE_T1CE_MIN_PERCENT`, ``None`` (not decisive) otherwise or when nothing was measured."""
    left, right = ev.get("bright_left", float("nan")), ev.get("bright_right", float("nan"))
    if left != left or right != right:  # NaN
        return None
    if min(left, right) >= IMAGE_T1CE_MIN_PERCENT:
        return R.T1CE
    if max(left, right) <= IMAGE_T1_MAX_PERCENT:
        return R.T1
    return None


def _image_verdict(series: Series, v: _Verdict, settings: Settings, rules: Rules) -> None:
    from .convert import convert_series

    try:
        vol = convert_series(series, settings=settings)
        ev = enhancement_evidence(vol, settings=settings)
    except RecnecError as exc:
        v.reasons.append(f"image evidence not available ({exc.code})")
        return
    left, right = ev["bright_left"], ev["bright_right"]
    if left != left or right != right:  # NaN
        v.reasons.append("image evidence: brain mask implausible or brain core too small, "
                         "nothing measured")
        return
    what = (f"image evidence: {left:.3f} % / {right:.3f} % (left / right) of brain-core voxels > "
            f"{IMAGE_BRIGHT_FACTOR} x white matter after N4")
    call = _image_call(ev)
    if call is R.T1CE:
        v.role, v.confidence, v.contrast = R.T1CE, rules.confidence["image_strong"], "positive"
        v.competing = []
        v.reasons.append(f"{what}: both >= {IMAGE_T1CE_MIN_PERCENT:.3f} % (enhancing choroid "
                         "plexus, veins, dura): post-contrast")
    elif call is R.T1:
        v.role, v.confidence, v.contrast = R.T1, rules.confidence["image_strong"], "negative"
        v.competing = []
        v.reasons.append(f"{what}: both <= {IMAGE_T1_MAX_PERCENT:.3f} % (nothing inside the "
                         "brain brighter than white matter): pre-contrast")
    else:
        v.reasons.append(f"{what}: not both <= {IMAGE_T1_MAX_PERCENT:.3f} % nor both >= "
                         f"{IMAGE_T1CE_MIN_PERCENT:.3f} %; not decisive")


# ============================================================================================
# study level
# ============================================================================================
def _when(h: SeriesHeader) -> tuple[float, float]:
    """Acquisition order key: AcquisitionTime (s), then SeriesNumber."""
    t = h.acquisition_time_s if h.acquisition_time_s is not None else float("nan")
    return (t, float(h.series_number) if h.series_number is not None else float("nan"))


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


def _study_context(study: Study, verdicts: dict[str, _Verdict], rules: Rules) -> None:
    """Resolve T1-weighted series silent about contrast from acquisition order."""
    for _ in range(3):  # a decision may enable another (T1ce found -> earlier T1 is pre)
        if not _study_pass(study, verdicts, rules):
            return


def _study_pass(study: Study, verdicts: dict[str, _Verdict], rules: Rules) -> bool:
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
            v.role, v.confidence, v.contrast = R.T1CE, conf["contrast_order"], "positive"
            v.competing = []
            v.reasons.append(f"acquired after {after[0]} ({verdicts[after[0]].role.value}): "
                             "gadolinium already given in this session")
            continue
        repeat_of = [o for o in pre_known if _before(by_id[o].header, h) is True
                     and _same_sequence(by_id[o].header, h)]
        if repeat_of:
            v.role, v.confidence, v.contrast = R.T1CE, conf["contrast_repeat"], "positive"
            v.competing = []
            v.reasons.append(f"same T1 sequence as pre-contrast {repeat_of[0]}, acquired later: "
                             "the repeat is the post-contrast acquisition")
            continue
        before_ce = [o for o in ce_known if _before(h, by_id[o].header) is True]
        if before_ce:
            v.role, v.confidence, v.contrast = R.T1, conf["contrast_repeat"], "negative"
            v.competing = []
            v.reasons.append(f"acquired before the contrast-enhanced {before_ce[0]}: the "
                             "pre-contrast T1 of this study")
    # two or more silent series of one sequence: first = pre, later = post (FAILURES.md 16)
    still = [sid for sid in silent if verdicts[sid].contrast == "silent"]
    for sid in still:
        h = by_id[sid].header
        twins = [o for o in still if o != sid and _same_sequence(by_id[o].header, h)]
        if not twins:
            continue
        order = [_before(h, by_id[o].header) for o in twins]
        v = verdicts[sid]
        if all(x is True for x in order):
            v.role, v.confidence, v.contrast = R.T1, conf["contrast_repeat"], "negative"
            v.reasons.append("first of a T1 sequence repeated in this session: pre-contrast")
            v.competing = []
        elif all(x is False for x in order):
            v.role, v.confidence, v.contrast = R.T1CE, conf["contrast_repeat"], "positive"
            v.reasons.append("later repeat of the same T1 sequence: post-contrast")
            v.competing = []
    return any(verdicts[sid].contrast != "silent" for sid in silent)


def _fmt_time(t: float) -> str:
    t = int(round(t))
    return f"{t // 3600:02d}:{t % 3600 // 60:02d}:{t % 60:02d}"


# The documented preference among the candidates of one role (FAILURES.md 14, 15), strongest
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
                 use_image_evidence: bool = True) -> RoleAssignment:
    """Pick the T1, T2 and T1ce series of one study.

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
    reasons say which series was preferred and why (FAILURES.md 15). Two candidates are never
    a failure: both passed the role evidence, so either is a valid input, and the choice is
    reported. Localizers, derived, DWI/ADC, SWI, FLAIR, PD, perfusion, 4D and series of fewer
    than 10 slices are never candidates (the reason is added to their decision).

    Returns
    -------
    RoleAssignment
        ``status`` ``None`` when all three roles are chosen; ``T1CE_UNDETERMINED`` when T1 or T1ce
        is missing while T1-weighted series of unresolved contrast exist (``message`` lists them
        with confidences); otherwise ``MISSING_ROLE`` with ``message`` like ``MISSING_ROLE: T2``.
    """
    return _assign(study, settings=settings, rules=rules, use_image_evidence=use_image_evidence,
                   image_evidence_if_incomplete=False)


def _t2_possible(study: Study, verdicts: Mapping[str, _Verdict], settings: Settings) -> bool:
    """Whether any candidate series of the study is, or might yet be, the T2 (its verdict says
    T2 at any confidence, or T2 is among its competing roles)."""
    return any((v.role is R.T2 or any(r is R.T2 for r, _ in v.competing))
               and _not_candidate(s, settings) is None
               for s in study.series for v in (verdicts[s.series_id],))


def _assign(study: Study, *, settings: Settings, rules: Rules | None, use_image_evidence: bool,
            image_evidence_if_incomplete: bool) -> RoleAssignment:
    """:func:`assign_roles`; ``image_evidence_if_incomplete=True`` (``inspect``) measures image
    evidence even in a study that cannot be complete (no T2), where the user asked about it."""
    rules = rules or default_rules()
    thr = settings.role_confidence_threshold
    verdicts = {s.series_id: _classify(s, rules) for s in study.series}
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
                _image_verdict(s, verdicts[s.series_id], settings, rules)
    decisions = tuple(_decision(s, verdicts[s.series_id], thr) for s in study.series)
    by_id = {s.series_id: s for s in study.series}
    conf = {d.series_id: d.confidence for d in decisions}
    extra: dict[str, list[str]] = {}
    chosen: dict[SeriesRole, Series] = {}
    for role in SeriesRole.model_roles():
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
    ``study_message``. Raises :class:`~recnec_cli.errors.DiscoveryError` from discovery.
    """
    from .discover import discover

    rules = rules or (load_rules(settings.rules_file) if settings.rules_file else default_rules())
    rows: list[dict] = []
    for study in discover(Path(path), settings=settings):
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
