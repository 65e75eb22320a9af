"""The walk: every file below the scan root read once (headers only) and grouped into studies."""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable

from ...config import Settings
from ...errors import DiscoveryError
from ...study import Series, Study
from .dicom_series import SeriesAcc, dedupe_units, header_from, merge_single_image_series, order_units, split_series
from .dicom_units import IMAGE_SOP_CLASSES, units_from_dataset
from .files import NIFTI_SUFFIXES, NRRD_SUFFIXES, SIDECAR_SUFFIX, bids_label, file_study
from .values import as_int

log = logging.getLogger(__name__)

# Names never read as DICOM: the media directory (PS3.10 DICOMDIR) and OS/viewer litter.
JUNK_NAMES = {"dicomdir", "thumbs.db", ".ds_store", "desktop.ini", "lockfile", "version"}
JUNK_SUFFIXES = {".txt", ".md", ".pdf", ".html", ".htm", ".xml", ".csv", ".jpg", ".jpeg",
                 ".png", ".gif", ".bmp", ".zip", ".exe", ".ini", ".log", ".py", ".sh", ".bat"}



def patient_identity(ds: Any) -> str:
    """The text a patient pseudonym is made from: PatientID, or ``PatientID`` + ``^^`` +
    IssuerOfPatientID when the header names an issuer (PS3.3 C.7.1.1: a PatientID is unique only
    within its issuer). Empty when the PatientID is empty."""
    pid = str(ds.get("PatientID", "") or "").strip()
    issuer = str(ds.get("IssuerOfPatientID", "") or "").strip()
    return f"{pid}^^{issuer}" if pid and issuer else pid


def study_datetime(ds: Any) -> str:
    """ISO 8601 ``YYYY-MM-DD[Thh:mm:ss]`` from StudyDate / StudyTime (DA / TM, PS3.5 6.2), falling
    back to SeriesDate / AcquisitionDate; empty when no valid date."""
    for dk, tk in (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("AcquisitionDate", "AcquisitionTime")):
        d = str(ds.get(dk, "") or "").strip()
        if len(d) == 8 and d.isdigit():
            t = str(ds.get(tk, "") or "").strip().replace(":", "")
            iso = f"{d[:4]}-{d[4:6]}-{d[6:8]}"
            if len(t) >= 4 and t[:6].split(".")[0].isdigit():
                t6 = (t.split(".")[0] + "0000")[:6]
                iso += f"T{t6[:2]}:{t6[2:4]}:{t6[4:6]}"
            return iso
    return ""


def pseudonym(patient_id: str | None) -> str:
    """First 12 hex digits of SHA-256 of the PatientID; empty string when unknown.

    Used everywhere a patient must be named in logs or reports (no raw IDs or names)."""
    if not patient_id:
        return ""
    return hashlib.sha256(patient_id.encode("utf-8", "replace")).hexdigest()[:12]



# --------------------------------------------------------------------------------------------
# the walk
# --------------------------------------------------------------------------------------------
def _read_dicom_header(path: Path) -> Any | None:
    """pydicom dataset without pixel data, or ``None`` for anything that is not an image DICOM
    with the three UIDs (junk, DICOMDIR, SR/PR objects, empty files)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
        # PS3.10 7.1: 128-byte preamble + "DICM"; preamble-less files start with a group 0002 or
        # 0008 element (either byte order). Anything else is not parsed at all (fast on big junk).
        starts = (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08")
        if len(head) < 132 or not (head[128:132] == b"DICM" or head[:2] in starts):
            return None
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError,
            EOFError, OverflowError, NotImplementedError) as exc:
        log.debug("not DICOM: %s (%s)", path.name, type(exc).__name__)
        return None
    try:
        if not (ds.get("SeriesInstanceUID") and ds.get("StudyInstanceUID")):
            return None
        if "PixelData" not in ds and "FloatPixelData" not in ds and not ds.get("Rows"):
            return None  # stop_before_pixels drops PixelData itself: Rows marks an image
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
        log.debug("not usable DICOM: %s (%s)", path.name, type(exc).__name__)
        return None
    return ds


def discover(root: Path, *, settings: Settings | None = None, pseudonym_key: Any = None) -> list[Study]:
    """Index every study below ``root`` from headers only.

    Parameters
    ----------
    root:
        Folder to walk (recursively, symlinked folders not followed). A single file is accepted.
    settings:
        Ignored; accepted so that older callers passing ``settings=`` keep working. The walk
        depends on nothing but the files.
    pseudonym_key:
        A :class:`recnec_cli.pseudonym.PseudonymKey`: patient pseudonyms are its HMAC of the
        PatientID (what ``recnec scan`` reports). Without one, :func:`pseudonym` (an unkeyed
        hash, for tools that show no pseudonym to anyone but the operator: inspect, train).

    Returns
    -------
    list[Study]
        DICOM studies first (sorted by study_id), then NIfTI/NRRD folder studies (sorted by
        folder). Each series' ``files`` are sorted along the slice normal.

    Raises
    ------
    DiscoveryError
        When the tree holds no image at all (message gives the counts): ``NO_IMAGE_FOUND`` if
        it has NIfTI / NRRD files but none is a series (masks, labels, unreadable headers),
        else ``NO_IMAGE_DICOM_FOUND`` (no image DICOM among the files). ``INPUT_NOT_FOUND`` when
        ``root`` does not exist. Not raised but recorded in ``Study.issues``: a DICOM study
        without an image series (``NO_IMAGE_DICOM_FOUND``), a NIfTI / NRRD folder whose images
        are all unreadable (``NO_IMAGE_FOUND``).
    """
    root = Path(root)
    if not root.exists():
        raise DiscoveryError(f"input folder does not exist: {root}", code="INPUT_NOT_FOUND")
    walk_root = root if root.is_dir() else root.parent
    accs: dict[str, SeriesAcc] = {}
    skipped_by_folder: Counter[str] = Counter()
    file_folders: dict[Path, list[str]] = {}
    n_files = 0
    if root.is_file():
        walk: Iterable[tuple[str, list[str], list[str]]] = [(str(root.parent), [], [root.name])]
    else:
        walk = os.walk(root)
    for dirpath, dirnames, filenames in walk:
        dirnames.sort()
        folder = Path(dirpath)
        rel = folder.relative_to(walk_root).as_posix()
        image_names = []
        for name in sorted(filenames):
            n_files += 1
            low = name.lower()
            path = folder / name
            if low.endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES) or low.endswith(SIDECAR_SUFFIX):
                image_names.append(name)
                continue
            suffix = os.path.splitext(low)[1]
            if low in JUNK_NAMES or suffix in JUNK_SUFFIXES or low.startswith("."):
                skipped_by_folder[rel] += 1
                continue
            ds = _read_dicom_header(path)
            if ds is None:
                skipped_by_folder[rel] += 1
                continue
            pid = patient_identity(ds)
            key = "\0".join((pid, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
            acc = accs.get(key)
            if acc is None:
                acc = accs[key] = SeriesAcc(pid, str(ds.StudyInstanceUID),
                                            str(ds.SeriesInstanceUID), ds)
            acc.folders.add(rel)
            try:
                acc.units.extend(units_from_dataset(ds, path))
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                log.debug("unusable instance %s: %s", name, exc)
                skipped_by_folder[rel] += 1
        if image_names:
            file_folders[folder] = image_names

    # ---- DICOM studies
    by_study: dict[tuple[str, str], list[SeriesAcc]] = defaultdict(list)
    for acc in accs.values():
        by_study[(acc.patient_id, acc.study_uid)].append(acc)
    uid_patients = Counter(study_uid for _, study_uid in by_study)
    studies: list[Study] = []
    for (pid, study_uid), accl in sorted(by_study.items(), key=lambda kv: kv[0][1]):
        issues: list[str] = []
        series: list[Series] = []
        folders: set[str] = set()
        for acc in merge_single_image_series(
                sorted(accl, key=lambda a: (as_int(a.first_ds.get("SeriesNumber")) or 0,
                                            a.series_uid)), issues):
            folders |= acc.folders
            if not acc.first_ds.get("SOPClassUID") or str(acc.first_ds.SOPClassUID) not in \
                    IMAGE_SOP_CLASSES:
                issues.append(f"series {acc.series_uid}: non-image SOP class "
                              f"{acc.first_ds.get('SOPClassUID', '?')} ignored")
                continue
            for sid, units in split_series(acc, issues):
                units = order_units(dedupe_units(sid, units, issues))
                if not units:
                    continue
                files = []
                for u in units:
                    if u.path not in files:
                        files.append(u.path)
                frames = tuple(u.frame for u in units) if units[0].frame is not None else ()
                series.append(Series(series_id=sid, source="dicom", files=tuple(files),
                                     header=header_from(acc, units), frames=frames))
        pseud = pseudonym_key.pseudonym(pid) if pseudonym_key is not None else pseudonym(pid)
        acquired = min((d for d in (study_datetime(a.first_ds) for a in accl) if d), default="")
        sid_ = study_uid
        if uid_patients[study_uid] > 1:
            sid_ = f"{study_uid}#patient={pseud or 'unknown'}"
            issues.append("StudyInstanceUID shared by several PatientIDs: split by patient")
        if not series:
            issues.append("NO_IMAGE_DICOM_FOUND: no image series in this study")
        skipped = sum(skipped_by_folder[f] for f in folders)
        studies.append(Study(study_id=sid_, patient_pseudonym=pseud, source="dicom",
                             location=";".join(sorted(folders)), series=tuple(series),
                             skipped_files=skipped, issues=tuple(issues), acquired=acquired))
        log.debug("study %s: %d series (patient %s)", sid_, len(series), pseud or "-")

    # ---- NIfTI / NRRD folder studies
    for folder, names in sorted(file_folders.items()):
        rel = folder.relative_to(walk_root).as_posix()
        st = file_study(walk_root, folder, names, skipped_by_folder[rel])
        if st is not None:
            sub = bids_label(rel, "sub")
            if sub:  # a BIDS subject: its label names the patient (pseudonymised like a PatientID)
                ident = "bids-sub-" + sub
                st = replace(st, patient_pseudonym=pseudonym_key.pseudonym(ident) if pseudonym_key is not None
                             else pseudonym(ident))
            studies.append(st)
            log.debug("study %s: %d file series", st.study_id, len(st.series))
    if not studies:
        # NIfTI / NRRD files present but none a series: NO_IMAGE_FOUND; else nothing but DICOM
        # candidates and other files: NO_IMAGE_DICOM_FOUND
        code = "NO_IMAGE_FOUND" if file_folders else "NO_IMAGE_DICOM_FOUND"
        raise DiscoveryError(
            f"{code}: no image DICOM, NIfTI or NRRD among {n_files} file(s) "
            f"({sum(skipped_by_folder.values())} skipped as non-image"
            + (", NIfTI / NRRD files all masks, labels or unreadable)" if file_folders else ")"),
            code=code)
    return studies
