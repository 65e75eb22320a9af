"""QC file names and crash-safe writes.

File names never come from folder or file names of the input tree (an export folder is often
named after the patient): a DICOM study's pictures are named by its StudyInstanceUID (made safe by
:func:`~recnec_cli.naming.safe_component`), a NIfTI / NRRD study's by ``study-`` and a keyed
pseudonym of its study id (HMAC-SHA256 with the site key, :mod:`recnec_cli.pseudonym`), so the
same study gets the same name every night and the name reveals nothing without the key.

Files of one study (``<stem>`` from :func:`qc_stem`):

``<stem>.png``
    the study picture (:func:`recnec_cli.qc.figures.render_study`);
``<stem>.thumb.png``
    its T1ce axial panel, for the index;
``<stem>.explain.png``
    the explanation map (``--explain``).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from ..naming import safe_component

INDEX_NAME = "index.html"


def qc_stem(study_id: str, source: str, key: Any) -> str:
    """The file-name stem of a study's QC pictures.

    Parameters
    ----------
    study_id, source:
        :attr:`recnec_cli.study.Study.study_id` and ``.source`` (``dicom``, ``nifti``, ``nrrd``).
    key:
        The site :class:`~recnec_cli.pseudonym.PseudonymKey` (needed for NIfTI / NRRD studies).

    Returns
    -------
    str
        The StudyInstanceUID (DICOM) or ``study-`` + 16 hex digits of HMAC-SHA256("study:" + id).

    Raises
    ------
    ValueError
        A NIfTI / NRRD study without a key.
    """
    if source == "dicom":
        return safe_component(study_id)
    if key is None:
        raise ValueError("a pseudonym key is needed to name the QC pictures of a NIfTI / NRRD study")
    return "study-" + key.pseudonym("study:" + str(study_id))


def thumb_name(png_name: str) -> str:
    """``<stem>.thumb.png`` for ``<stem>.png``."""
    return png_name[:-len(".png")] + ".thumb.png" if png_name.endswith(".png") else png_name + ".thumb.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: a temporary ``.<name>.<random>.tmp`` in the same
    folder, flushed and fsynced, then ``os.replace`` (a killed process never leaves half a file)."""
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


def remove_stale_temporaries(qc_dir: Path) -> int:
    """Remove the temporaries :func:`atomic_write_bytes` leaves in ``qc_dir`` when a process is
    killed mid-write (only our own pattern: ``.<name>.png.*.tmp`` and ``.index.html.*.tmp``).
    Returns how many were removed."""
    qc_dir = Path(qc_dir)
    n = 0
    if not qc_dir.is_dir():
        return 0
    for pattern in (".*.png.*.tmp", f".{INDEX_NAME}.*.tmp"):
        for p in qc_dir.glob(pattern):
            try:
                p.unlink()
                n += 1
            except OSError:
                pass
    return n
