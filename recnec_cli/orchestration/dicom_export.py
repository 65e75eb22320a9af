"""``--dicom-out`` and ``--send`` inside a scan: when the DICOM objects of a study are made,
written, recorded in the state and delivered (what they hold: :mod:`recnec_cli.pacs.objects`).

* In the process that ran the study (where the volumes are): :func:`source_labels_of` puts the
  lesion onto the T1ce's own frames, and the study picture is drawn for the Secondary Capture
  into :func:`work_dir` when no ``--qc`` folder is given.
* In the scan's process, after inference (the SR needs the probability): :func:`export_study`
  builds and writes the objects and records them in the state, queued for ``--send``.
* At the end of a run (and in ``recnec send``): :func:`deliver` C-STOREs every current object that
  has not reached the PACS yet; a PACS that is down or refuses leaves them ``failed`` for the
  next run, with a warning, and never changes a study's row or the exit code.

NIfTI and NRRD studies get no objects (nothing to file them under); the log says so once per run.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

from .. import __version__
from ..config import Settings
from ..results import StudyResult
from ..study import SeriesRole

log = logging.getLogger(__name__)

#: what :func:`export_study` returns when the objects could not be written (the scan then clears the
#: study's fingerprint so that the next run makes them)
RETRY = "retry"

#: where study pictures for the Secondary Capture wait without ``--qc`` (inside --dicom-out)
WORK_FOLDER = ".work"


def wanted(settings: Settings, source: str) -> bool:
    """Whether a study of this ``source`` gets DICOM objects in this run."""
    return settings.dicom_out is not None and source == "dicom"


def work_dir(settings: Settings) -> Path:
    """``<dicom_out>/.work``: study pictures waiting to become Secondary Captures."""
    return Path(settings.dicom_out) / WORK_FOLDER  # type: ignore[arg-type]


def source_labels_of(ctx: Any) -> Any:
    """The lesion of a finished :class:`~recnec_cli.orchestration.pipeline.StudyContext` on its
    T1ce's own frames (:class:`recnec_cli.pacs.objects.SourceLabels`): the segmenter's compartments
    when it made the lesion, else the lesion mask as one segment.

    Raises
    ------
    recnec_cli.pacs.objects.DicomExportError
        The T1ce cannot carry a SEG (Enhanced multi-frame, no geometry, no lesion pixel).
    """
    import numpy as np

    from ..pacs.objects import SourceLabels, labels_on_source, read_sources

    series = ctx.assignment.chosen[SeriesRole.T1CE]
    sources = read_sources(series.files)
    compartments = ctx.lesion_labels is not None
    labels = ctx.lesion_labels if compartments else np.asarray(ctx.lesion.mask, dtype=np.uint8)
    frames = labels_on_source(labels, ctx.grid_affine, sources)
    return SourceLabels(labels=frames, files=tuple(series.files), series_uid=str(sources[0].SeriesInstanceUID),
                        compartments=compartments)


def export_study(r: StudyResult, row: Mapping[str, Any], *, state: Any, settings: Settings, model_version: str,
                 qc_png: Path | None) -> str:
    """Write the SEG, SR and SC of one finished study and record them in ``state`` (queued for
    ``settings.send``). Returns a short status: ``written``, ``unchanged``, :data:`RETRY` (an I/O
    error: try again next run) or why this study gets none. Never raises for a study's own problem
    (logged as a warning)."""
    from ..pacs.objects import DicomExportError, write_objects

    sid = r.study.study_id
    if r.source_labels is None:
        return r.dicom_note or "no lesion"
    previous = {k: v["digest"] for k, v in state.objects_of(sid).items()}
    try:
        objects = write_objects(Path(settings.dicom_out), r.source_labels, row,  # type: ignore[arg-type]
                                model_version=model_version, software_version=__version__, png=qc_png,
                                previous=previous)
    except DicomExportError as exc:
        log.warning("study %s: no DICOM objects: %s", _short(sid), exc)
        return str(exc)
    except Exception as exc:  # an I/O problem of --dicom-out: the study is processed again next run
        log.warning("study %s: DICOM objects not written (%s: %s); the next run processes the study again",
                    _short(sid), type(exc).__name__, getattr(exc, "strerror", "") or "see the log with -v")
        log.debug("DICOM export error", exc_info=True)
        return RETRY
    unchanged = all(previous.get(o.kind) == o.digest for o in objects) and len(previous) == len(objects)
    state.record_objects(sid, objects, written_utc=_now(), destination=settings.send)
    log.info("study %s: DICOM %s %s", _short(sid), "+".join(o.kind for o in objects),
             "unchanged" if unchanged else f"written to {objects[0].path.parent.name}/")
    return "unchanged" if unchanged else "written"


def deliver(state: Any, destination_text: str, *, calling_ae: str) -> dict[str, int]:
    """C-STORE every current object not yet ``sent`` to ``destination_text`` (``AE@HOST:PORT``),
    recording each outcome in ``state``. Returns ``{"sent": n, "failed": n}``; a PACS that is down
    gives one warning, not one per object."""
    from ..pacs.send import parse_destination, send_files

    dest = parse_destination(destination_text)
    todo = state.unsent(destination_text)
    counts = {"sent": 0, "failed": 0}
    if not todo:
        log.info("PACS %s: nothing new to send", dest)
        return counts
    present = [o for o in todo if Path(o["path"]).is_file()]
    for o in todo:
        if o not in present:
            state.record_send(destination_text, o, ok=False, message="file missing from --dicom-out", when_utc=_now())
            counts["failed"] += 1
    outcomes = send_files(dest, [Path(o["path"]) for o in present], calling_ae=calling_ae)
    reasons: set[str] = set()
    for o, out in zip(present, outcomes):
        state.record_send(destination_text, o, ok=out.ok, message=out.message, when_utc=_now())
        counts["sent" if out.ok else "failed"] += 1
        if not out.ok:
            reasons.add(out.message)
    if counts["failed"]:
        log.warning("PACS %s: %d of %d objects not delivered (%s); the next run retries them", dest,
                    counts["failed"], len(todo), "; ".join(sorted(reasons)) or "file missing")
    else:
        log.info("PACS %s: %d objects sent", dest, counts["sent"])
    return counts


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _short(study_id: str) -> str:
    return study_id if len(study_id) <= 24 else "..." + study_id[-21:]
