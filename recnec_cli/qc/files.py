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

from pathlib import Path
from typing import Any

from ..atomic import remove_stale_temporaries as _remove_stale
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


def remove_stale_temporaries(qc_dir: Path) -> int:
    """Remove the temporaries :func:`~recnec_cli.atomic.atomic_write_bytes` leaves in ``qc_dir``
    when a process is killed mid-write (pictures and the index only). Returns how many were removed."""
    return _remove_stale(qc_dir, ("*.png", INDEX_NAME))
