"""Header values as Python types: DICOM / JSON-sidecar values of any VR -> float, int, text, codes.

Shared by the DICOM and the NIfTI / NRRD (BIDS sidecar) indexing; every function returns ``None``
(or ``()``) for an absent, empty or unparsable value instead of raising.
"""

from __future__ import annotations

import math
import re
from typing import Any


def as_float(v: Any) -> float | None:
    """A finite float from a number, numeric string or the first of a multi-value; else ``None``."""
    try:
        if v is None or v == "":
            return None
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = list(v)[0] if len(v) else None
            if v is None:
                return None
        x = float(v)
        return x if math.isfinite(x) else None
    except (TypeError, ValueError):
        return None


def as_int(v: Any) -> int | None:
    """:func:`as_float` rounded to the nearest int, or ``None``."""
    x = as_float(v)
    return int(round(x)) if x is not None else None


def as_text(v: Any) -> str | None:
    """The value as stripped text; ``None`` when absent or blank."""
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def as_codes(v: Any) -> tuple[str, ...]:
    """A multi-valued code string (``ORIGINAL\\PRIMARY``, ``["GR", "IR"]``) as upper-case parts."""
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        parts = re.split(r"[\\/ ]+", v)
    else:
        parts = [str(x) for x in v]
    return tuple(p.strip().upper() for p in parts if p and p.strip())


def dicom_time_s(v: Any) -> float | None:
    """DICOM TM (HHMMSS.FFFFFF, PS3.5 6.2) or the time part of DT -> seconds after midnight."""
    s = as_text(v)
    if not s:
        return None
    if len(s) >= 14 and s[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        s = s[8:]
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", s.replace(":", ""))
    if not m:
        return None
    h, mi, se, frac = m.groups()
    return int(h) * 3600 + int(mi or 0) * 60 + int(se or 0) + (float(frac) if frac else 0.0)
