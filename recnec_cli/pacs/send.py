"""C-STORE of recnec's DICOM objects to a PACS (pynetdicom; PS3.4 Annex B, PS3.7 9.1.1).

One association per delivery, proposing the SOP classes of the files with their own transfer
syntax; each instance gets its own outcome, so one refused object does not hold back the others.
A PACS that is down or refuses the association gives every instance a ``failed`` outcome with the
reason; nothing is raised (a send never fails a scan).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..errors import UsageError

log = logging.getLogger(__name__)

#: seconds to wait for the association, a DIMSE reply and the network (a PACS that hangs must not
#: hang a nightly run)
TIMEOUT_S = 30.0

_DESTINATION = re.compile(r"(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(?P<port>[0-9]{1,5})")


@dataclass(frozen=True)
class Destination:
    """A PACS: its AE title, host and TCP port (``AE@HOST:PORT``)."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host  # IPv6, as --send takes it
        return f"{self.ae_title}@{host}:{self.port}"


def parse_destination(text: str, *, option: str = "--send") -> Destination:
    """``"ORTHANC@pacs.example.org:4242"`` -> :class:`Destination`.

    Raises
    ------
    UsageError
        ``text`` is not ``AE@HOST:PORT`` with an AE title of 1-16 printable ASCII characters (no
        backslash; PS3.5 6.2) and a port 1-65535.
    """
    m = _DESTINATION.fullmatch(text.strip())
    if (m is None or not m["ae"].strip() or not all(32 <= ord(c) < 127 and c != "\\" for c in m["ae"])
            or not (1 <= int(m["port"]) <= 65535)):
        raise UsageError(f"{option} must look like AE@HOST:PORT (the PACS's AE title, host and DICOM port), "
                         f"e.g. ORTHANC@pacs.example.org:4242, got {text!r}")
    return Destination(m["ae"].strip(), m["host"].strip("[]"), int(m["port"]))


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one instance: ``ok`` and a short ``message`` (status code or reason)."""

    sop_instance_uid: str
    ok: bool
    message: str


def send_files(destination: Destination, files: Sequence[Path], *, calling_ae: str = "RECNEC",
               timeout_s: float = TIMEOUT_S) -> list[SendOutcome]:
    """C-STORE ``files`` (DICOM Part 10 files) to ``destination`` in one association.

    Returns one :class:`SendOutcome` per file, in order. Never raises for network or PACS
    problems (they are outcomes); a file that cannot be read is an outcome too.
    """
    import pydicom
    from pynetdicom import AE

    datasets, outcomes = [], {}
    for f in files:
        try:
            datasets.append((f, pydicom.dcmread(str(f))))
        except Exception as exc:  # noqa: BLE001 - an unreadable file is that file's outcome
            outcomes[str(f)] = SendOutcome("", False, f"unreadable ({type(exc).__name__})")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for pair in {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}:
        ae.add_requested_context(*pair)
    results: list[SendOutcome] = []
    assoc = None
    if datasets:
        try:
            assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        except Exception as exc:
            log.debug("association error", exc_info=True)
            reason = f"association failed ({type(exc).__name__})"
        else:
            reason = ("association rejected by the PACS" if assoc.is_rejected
                      else "" if assoc.is_established
                      else "no connection (PACS down, wrong host or port, or it dropped the association)")
    try:
        for msg_id, (f, ds) in enumerate(datasets, start=1):
            uid = str(ds.SOPInstanceUID)
            if assoc is None or not assoc.is_established:
                outcomes[str(f)] = SendOutcome(uid, False, reason)
                continue
            try:
                status = assoc.send_c_store(ds, msg_id=msg_id)
            except Exception as exc:  # noqa: BLE001 - a broken association mid-way
                outcomes[str(f)] = SendOutcome(uid, False, f"C-STORE failed ({type(exc).__name__})")
                continue
            code = int(getattr(status, "Status", -1)) if status else -1
            ok = code == 0x0000 or 0xB000 <= code <= 0xBFFF  # success, or warning (stored)
            outcomes[str(f)] = SendOutcome(uid, ok, "stored" if code == 0 else
                                           "no response" if code < 0 else f"status 0x{code:04X}")
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()
    results = [outcomes[str(f)] for f in files]
    return results
