"""Patient pseudonyms: a keyed hash (HMAC-SHA256) of the PatientID with a site secret.

An unsalted hash of a short hospital record number can be reversed by hashing every possible
number; an HMAC (RFC 2104) with a secret key cannot, as long as the key stays secret. The key is a
file of 64 hex digits (32 random bytes from :func:`secrets.token_bytes`), created with mode 0600 on
first use. Keep it outside the report folder, back it up with the same care as the data (the same
key gives the same pseudonyms across runs; a new key gives new ones), and never share it with
whoever receives the reports.

Where it lives: ``--pseudonym-key-file`` / ``RECNEC_PSEUDONYM_KEY_FILE``, else
``platformdirs.user_config_dir("recnec")/pseudonym.key`` (``~/.config/recnec/pseudonym.key`` on
Linux). ``RECNEC_PSEUDONYM_KEY`` (64 hex digits) gives the key itself, for hosts where the
secret comes from a vault.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from .errors import UsageError

log = logging.getLogger(__name__)

KEY_ENV = "RECNEC_PSEUDONYM_KEY"
#: hex digits of the HMAC kept in reports (64 bits: collisions negligible below ~10^8 patients)
PSEUDONYM_HEX = 16


def default_key_file() -> Path:
    """``user_config_dir("recnec")/pseudonym.key`` (platformdirs)."""
    from platformdirs import user_config_dir

    return Path(user_config_dir("recnec")) / "pseudonym.key"


@dataclass(frozen=True)
class PseudonymKey:
    """The site secret. ``key_id`` (first 8 hex digits of SHA-256 of the key) names the key in
    manifests and fingerprints without revealing it; ``source`` says where it came from."""

    secret: bytes
    source: str

    @property
    def key_id(self) -> str:
        return hashlib.sha256(self.secret).hexdigest()[:8]

    def pseudonym(self, patient_id: str | None) -> str:
        """HMAC-SHA256 of ``patient_id`` with the key, first :data:`PSEUDONYM_HEX` hex digits;
        ``""`` when the ID is empty or missing."""
        if not patient_id:
            return ""
        return hmac.new(self.secret, str(patient_id).encode("utf-8", "replace"),
                        hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def load_key(path: Path | None = None, *, environ: Mapping[str, str] | None = None,
             create: bool = True) -> PseudonymKey:
    """The site key from ``RECNEC_PSEUDONYM_KEY``, else from ``path`` (default
    :func:`default_key_file`), creating the file (mode 0600) when it does not exist and ``create``.

    Raises
    ------
    UsageError
        A malformed key (not 64 hex digits), an unreadable key file, or one readable by others
        than its owner (mode & 0o077), or a missing file when ``create`` is false.
    """
    environ = os.environ if environ is None else environ
    if environ.get(KEY_ENV):
        return PseudonymKey(_parse(environ[KEY_ENV], KEY_ENV), KEY_ENV)
    path = Path(path) if path is not None else default_key_file()
    if not path.exists():
        if not create:
            raise UsageError(f"pseudonym key file {path} does not exist")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_bytes(32).hex() + "\n")
        log.warning("created a new pseudonym key %s: keep it (same key, same pseudonyms) and keep it secret", path)
    if not path.is_file():
        raise UsageError(f"pseudonym key {path} is not a file")
    if path.stat().st_mode & 0o077:
        raise UsageError(f"pseudonym key file {path} is readable by other users; chmod 600 {path}")
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read pseudonym key file {path}: {type(exc).__name__}") from None
    return PseudonymKey(_parse(text, str(path)), str(path))


def _parse(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise UsageError(f"pseudonym key from {where} must be at least 32 hex digits (64 recommended)")
    return key
