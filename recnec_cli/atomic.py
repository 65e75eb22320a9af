"""Atomic file writes, and the clean-up of what a killed writer leaves behind.

Every output recnec rewrites while people may be reading it (the report, the manifest, QC
pictures, the QC index) goes through :func:`atomic_write_bytes`: a temporary
``.<name>.<random>.tmp`` in the same folder, flushed and fsynced, then ``os.replace`` (atomic on
POSIX within one file system), so a reader sees the old file or the new one, never half of one.
A process killed mid-write leaves only such a temporary; :func:`remove_stale_temporaries`
removes them at the next run.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Iterable

log = logging.getLogger(__name__)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see the module docstring); the file gets the usual
    mode (``0666`` less the umask; ``mkstemp`` alone would make it ``0600``). The parent folder is
    created when missing.

    Raises
    ------
    OSError
        The folder is not writable or the disk is full; ``path`` is unchanged and no temporary is left.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` of ``text`` in UTF-8, newlines as given."""
    atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: Path, names: Iterable[str]) -> int:
    """Remove the temporaries :func:`atomic_write_bytes` left in ``folder`` for the files named by
    ``names`` (glob patterns of file names, e.g. ``report.csv`` or ``*.png``; only our own
    ``.<name>.*.tmp`` pattern is touched). Returns how many were removed (each is logged at INFO)."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    n = 0
    for name in names:
        for p in folder.glob(f".{name}.*.tmp"):
            try:
                p.unlink()
            except OSError:
                continue
            n += 1
            log.info("removed a temporary file left by a killed run: %s", p.name)
    return n
