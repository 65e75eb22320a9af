"""What the NIfTI and DICOM writers of :mod:`recnec_cli.synth` share: the stored-value gain, the
derived UIDs and the time-of-day format. Below both writers (:mod:`.writers`, :mod:`.dicom`), so
neither imports the other for them.
"""

from __future__ import annotations

import datetime
import hashlib
import uuid

#: stored value = relative intensity x this gain (int16 NIfTI, uint16 DICOM before slope)
STORE_GAIN = 1000.0


def derived_uid(*parts: object) -> str:
    """A UUID-derived DICOM UID (``2.25.<int>``, PS3.5 B.2) from a name-based UUID (RFC 4122
    version 5 style: SHA-256 of the parts, version and variant bits set): same parts, same UID."""
    digest = hashlib.sha256("/".join(str(p) for p in ("recnec-synth", *parts)).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"


def study_date(seed: int, index: int, *, days: int = 0) -> datetime.date:
    """Date of subject ``index``'s study ``days`` after its baseline. The baseline falls on a day
    derived from ``seed`` and ``index`` between 2019-01-01 and 2023-12-05 (never the clock)."""
    return (datetime.date(2019, 1, 1)
            + datetime.timedelta(days=(seed * 7919 + index * 37) % 1800 + int(days)))


def time_of_day(seconds: float, *, colons: bool = False) -> str:
    """``seconds`` after midnight as DICOM TM ``HHMMSS.FFFFFF`` (PS3.5 6.2), or with ``colons`` as
    the JSON sidecars write AcquisitionTime (``HH:MM:SS.FFFFFF``, dcm2niix / BIDS style)."""
    s = int(seconds) % 86400
    frac = int(round((seconds - int(seconds)) * 1e6))
    sep = ":" if colons else ""
    return f"{s // 3600:02d}{sep}{(s // 60) % 60:02d}{sep}{s % 60:02d}.{frac:06d}"
