"""Classification rules kept as data: the bundled ``data/rules.toml`` plus an optional site file.

Loading validates every section and key and compiles the token regexes once; the result is a
frozen :class:`Rules` that the per-series and study-level passes read (never write).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ...errors import UsageError
from ...study import SeriesRole

BUNDLED_RULES = Path(__file__).resolve().parents[2] / "data" / "rules.toml"
R = SeriesRole
TOKEN_ROLES = ("T1", "T2", "FLAIR", "PD", "DWI", "SWI", "PERFUSION", "LOCALIZER", "DERIVED")
CONTRAST_KEYS = ("positive", "negative", "neutral", "agent_negative")
ROLE_BY_NAME = {r.name: r for r in SeriesRole} | {r.value.upper(): r for r in SeriesRole}


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
