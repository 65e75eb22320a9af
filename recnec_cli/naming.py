"""File names built from header values or study ids, made safe.

Study ids come from DICOM headers (StudyInstanceUID) or folder names, and both can be hostile or
carry patient data: a UID of ``..`` or ``../../etc``, a description with ``/``, an export folder
named after the patient. Every path component recnec builds from such a value goes through
:func:`safe_component`, so it never leaves the folder it is joined to.
"""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
#: longest component kept verbatim (well under the usual 255-byte file-name limit)
MAX_COMPONENT_CHARS = 96


def safe_component(text: str, *, max_chars: int = MAX_COMPONENT_CHARS) -> str:
    """One file-name component derived from ``text`` that cannot escape its parent folder.

    ASCII letters, digits, ``-``, ``.`` and ``_`` are kept; every other run of characters becomes
    ``_``; leading dots become ``_`` (so ``.`` / ``..`` / hidden names are impossible). A name that
    had to change, or is longer than ``max_chars``, gets ``-`` and 8 hex digits of the SHA-256 of
    the original appended, so two different ids never share a file (``a/b`` vs ``a_b``).
    A DICOM UID (digits and dots) comes back unchanged.

    >>> safe_component("1.2.840.113619.2.55")
    '1.2.840.113619.2.55'
    >>> safe_component("..")[:2]
    '__'
    """
    text = str(text)
    clean = _UNSAFE.sub("_", text)
    clean = re.sub(r"^\.+", lambda m: "_" * len(m.group(0)), clean) or "_"
    if clean == text and len(clean) <= max_chars:
        return clean
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{clean[:max_chars - 9]}-{digest}"
