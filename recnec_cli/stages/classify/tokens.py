"""Text evidence: names normalised for matching, token hits, and the texts a series offers.

The texts are the DICOM SeriesDescription / ProtocolName / SequenceName, and for NIfTI / NRRD the
file name with the values of BIDS label entities removed (``ses-post`` is a session label, not
"post-contrast").
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Iterable, Mapping

from ...study import Series, SeriesHeader, SeriesRole
from .rules import Rules

R = SeriesRole


def normalise(text: str | None) -> str:
    """Lower case, accents removed, separators -> single spaces, ``+`` and ``*`` standalone."""
    if not text:
        return ""
    t = unicodedata.normalize("NFKD", str(text))
    t = "".join(ch for ch in t if not unicodedata.combining(ch)).lower()
    t = re.sub(r"([+*])", r" \1 ", t)
    t = re.sub(r"[^a-z0-9+*]+", " ", t)
    return " ".join(t.split())


def pattern_hits(patterns: Iterable[re.Pattern], text: str) -> list[str]:
    """The matched text of each of ``patterns`` found in ``text``, in pattern order."""
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
#: BIDS ``ce-<label>`` entity in a file name; group 1 is the label (``gadolinium``, ``none``)
BIDS_CE_RE = re.compile(r"(?:^|_)ce-([A-Za-z0-9]+)(?=_|\.|$)")
BIDS_CE_NEGATIVE = ("none", "no", "pre", "native", "nativ", "without")


def name_text(name: str) -> str:
    """A file name (or its stem) as text for token matching: the values of BIDS label entities
    (:data:`BIDS_LABEL_ENTITIES`) removed, so that ``sub-01_ses-post_ce-gadolinium_T1w.nii.gz``
    reads ``ce-gadolinium_T1w.nii.gz``. Non-BIDS names are returned unchanged."""
    return _BIDS_LABEL_RE.sub("", name)


def series_texts(h: SeriesHeader, series: Series) -> dict[str, str]:
    """The texts a series is named by (description, protocol, sequence, file name ...), by field."""
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


def token_roles(texts: Mapping[str, str], rules: Rules) -> dict[SeriesRole, list[str]]:
    """``{role: words}`` of the rules' role tokens found in the normalised ``texts``."""
    out: dict[SeriesRole, list[str]] = {}
    for raw in texts.values():
        norm = normalise(raw)
        if not norm:
            continue
        for role_name, pats in rules.tokens.items():
            for hit in pattern_hits(pats, norm):
                lst = out.setdefault(getattr(R, role_name), [])
                if f"'{hit}'" not in lst:
                    lst.append(f"'{hit}'")
    return out

