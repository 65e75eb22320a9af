"""NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``) folders: one folder = one study.

Only headers are read (nibabel for NIfTI, SimpleITK's image-information reader for NRRD, the
same reader conversion uses); the role comes later from the file name and an optional BIDS JSON
sidecar (see :mod:`recnec_cli.stages.classify`).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from ...study import Series, SeriesHeader, Study
from .values import as_codes, as_float, as_int, as_text, dicom_time_s

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
NRRD_SUFFIXES = (".nrrd",)
SIDECAR_SUFFIX = ".json"

# Files that look like images but are not series (user masks, segmentations, brain masks).
# A lesion mask (recnec convention, README "lesion masks"): lesion_mask.nii[.gz],
# <anything>_lesion_mask.nii[.gz], or a 3D Slicer / pyradiomics label map <anything>_label.nrrd.
LESION_MASK_RE = re.compile(r"^(?:.*_)?lesion_mask\.nii(?:\.gz)?$|^.*_label\.nrrd$", re.I)
# Not series, ignored: masks of any kind (brain_mask, bet_*mask*), segmentations (*_seg*, BraTS),
# label maps (*label*), lesion drawings (*_lesion.*).
NON_SERIES_RE = re.compile(r"mask|_seg|label|_lesion\.", re.I)


def _strip_ext(name: str) -> str:
    for suf in NIFTI_SUFFIXES + NRRD_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def _sidecar_header(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("unreadable JSON sidecar %s: %s", path.name, exc)
        return {}


def read_nifti_header(path: Path) -> Any:
    """The NIfTI-1 or NIfTI-2 header of ``path`` (``.nii`` or ``.nii.gz``), read without nibabel's
    checks and without building an image.

    ``nibabel.load`` refuses a file whose ``scl_inter`` is not finite while ``scl_slope`` is
    (``HeaderDataError``); this reader keeps such a file readable so that conversion can name the
    cause (``BAD_SCALING``) instead of the series vanishing as an unreadable header. Returns a
    ``nibabel.Nifti1Header`` or ``Nifti2Header``; raises ``ValueError`` when ``sizeof_hdr`` is
    neither 348 nor 540 (not a NIfTI file), ``OSError`` when the file cannot be read.
    """
    import nibabel as nib
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        head = f.read(4)
        f.seek(0)
        sizes = {int.from_bytes(head, "little"), int.from_bytes(head, "big")}
        for cls in (nib.Nifti1Header, nib.Nifti2Header):
            if cls.sizeof_hdr in sizes:
                return cls.from_fileobj(f, check=False)
    raise ValueError("not a NIfTI-1 / NIfTI-2 header (sizeof_hdr is neither 348 nor 540)")


def _file_header(path: Path, sidecar: Path | None) -> SeriesHeader:
    """Header facts of one NIfTI/NRRD file (shape and spacing from the image header only), plus
    a BIDS JSON sidecar where present (BIDS 1.9 stores times in seconds: converted to ms)."""
    stem = _strip_ext(path.name)
    shape: tuple[int, ...] = ()
    zooms: tuple[float, ...] = ()
    extra: dict[str, str] = {}
    if path.name.lower().endswith(NRRD_SUFFIXES):
        import SimpleITK as sitk

        reader = sitk.ImageFileReader()  # the reader conversion uses; header only, no pixels
        reader.SetFileName(str(path))
        reader.ReadImageInformation()
        shape = tuple(int(s) for s in reader.GetSize())
        if reader.GetNumberOfComponents() > 1:  # a vector NRRD: components count as volumes
            shape += (int(reader.GetNumberOfComponents()),)
        zooms = tuple(float(z) for z in reader.GetSpacing())
        extra["format"] = "nrrd"
    else:
        import nibabel as nib
        from nibabel.spatialimages import HeaderDataError

        try:
            hdr = nib.load(str(path)).header
        except HeaderDataError:  # e.g. a NaN scl_inter: kept, conversion names the cause
            hdr = read_nifti_header(path)
        shape = tuple(int(s) for s in hdr.get_data_shape())
        zooms = tuple(float(z) for z in hdr.get_zooms()[:3])
        descrip = hdr.get("descrip")
        if descrip is not None:
            d = bytes(descrip).split(b"\0")[0].decode("latin-1").strip()
            if d:
                extra["descrip"] = d
        extra["format"] = "nifti"
    spatial = [s for s in shape[:3]]
    n_t = 1
    for s in shape[3:]:
        n_t *= max(int(s), 1)
    meta: dict[str, Any] = _sidecar_header(sidecar) if sidecar else {}

    def ms(key: str) -> float | None:
        v = as_float(meta.get(key))
        return v * 1000.0 if v is not None else None

    return SeriesHeader(
        modality=as_text(meta.get("Modality")) or "MR",
        series_description=as_text(meta.get("SeriesDescription")) or stem,
        protocol_name=as_text(meta.get("ProtocolName")),
        sequence_name=as_text(meta.get("SequenceName")) or as_text(meta.get("PulseSequenceDetails")),
        image_type=as_codes(meta.get("ImageType")),
        scanning_sequence=as_codes(meta.get("ScanningSequence")),
        sequence_variant=as_codes(meta.get("SequenceVariant")),
        scan_options=as_codes(meta.get("ScanOptions")),
        mr_acquisition_type=as_text(meta.get("MRAcquisitionType")),
        repetition_time_ms=ms("RepetitionTime"),
        echo_time_ms=ms("EchoTime"),
        inversion_time_ms=ms("InversionTime"),
        flip_angle_deg=as_float(meta.get("FlipAngle")),
        echo_train_length=as_int(meta.get("EchoTrainLength")),
        contrast_bolus_agent=as_text(meta.get("ContrastBolusAgent")),
        contrast_bolus_ingredient=as_text(meta.get("ContrastBolusIngredient")),
        contrast_bolus_volume_ml=as_float(meta.get("ContrastBolusVolume")),
        series_number=as_int(meta.get("SeriesNumber")),
        acquisition_time_s=dicom_time_s(str(meta.get("AcquisitionTime", "")).replace(":", "")),
        manufacturer=as_text(meta.get("Manufacturer")),
        n_slices=spatial[2] if len(spatial) > 2 else (1 if spatial else 0),
        n_temporal=n_t,
        rows=spatial[1] if len(spatial) > 1 else None,
        columns=spatial[0] if spatial else None,
        pixel_spacing_mm=(zooms[0], zooms[1]) if len(zooms) >= 2 else None,
        slice_spacing_mm=zooms[2] if len(zooms) >= 3 else None,
        extra=extra,
    )


def bids_label(rel: str, entity: str) -> str:
    """The label of a BIDS entity folder (``sub-<label>``, ``ses-<label>``) in the relative path
    ``rel`` (``/``-separated), or ``""`` (BIDS 1.9, "Entities": labels are alphanumeric)."""
    for part in rel.split("/"):
        m = re.fullmatch(entity + r"-([A-Za-z0-9]+)", part)
        if m:
            return m.group(1)
    return ""


def sidecar_datetime(path: Path | None) -> str:
    """ISO ``YYYY-MM-DD[Thh:mm:ss]`` from a JSON sidecar's ``AcquisitionDateTime`` (as dcm2niix
    writes it) or ``AcquisitionDate`` (+ ``AcquisitionTime``); empty when absent or unreadable."""
    if path is None:
        return ""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return ""
    if not isinstance(meta, dict):
        return ""
    dt = str(meta.get("AcquisitionDateTime") or "").strip()
    m = re.match(r"(\d{4}-\d{2}-\d{2})(?:T(\d{2}:\d{2}(?::\d{2})?))?", dt)
    if m:
        return m.group(1) + (f"T{m.group(2)}" if m.group(2) else "")
    d = str(meta.get("AcquisitionDate") or "").strip()
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", d):
        t = str(meta.get("AcquisitionTime") or "").strip()
        return d + (f"T{t[:8]}" if re.match(r"\d{2}:\d{2}:\d{2}", t) else "")
    return ""


def file_study(root: Path, folder: Path, names: list[str], skipped: int) -> Study | None:
    """The NIfTI / NRRD study of ``folder`` (its image files ``names``), or ``None`` without one."""
    images, sidecars, lesion = [], {}, []
    for n in names:
        low = n.lower()
        if low.endswith(SIDECAR_SUFFIX):
            sidecars[n[: -len(SIDECAR_SUFFIX)]] = folder / n
    for n in sorted(names):
        low = n.lower()
        if not low.endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES):
            continue
        if LESION_MASK_RE.match(n):
            lesion.append(folder / n)
        elif NON_SERIES_RE.search(n):
            log.debug("ignored mask/label file %s", n)
        else:
            images.append(folder / n)
    if not images:
        return None
    issues = []
    if len(lesion) > 1:
        issues.append(f"{len(lesion)} lesion masks found; using {lesion[0].name}")
    series = []
    for p in images:
        side = sidecars.get(_strip_ext(p.name))
        try:
            hdr = _file_header(p, side)
        except Exception as exc:  # noqa: BLE001 - nibabel/SimpleITK raise many types on corrupt headers
            issues.append(f"unreadable image header {p.name}: {type(exc).__name__}")
            log.warning("unreadable image header %s: %s", p.name, exc)
            continue
        series.append(Series(series_id=p.relative_to(root).as_posix(),
                             source="nrrd" if p.name.lower().endswith(NRRD_SUFFIXES) else "nifti",
                             files=(p,), header=hdr, sidecar=side))
    if not series:
        issues.append("NO_IMAGE_FOUND: no readable NIfTI / NRRD image in this folder")
    rel = folder.relative_to(root).as_posix()
    if rel == ".":  # the scan root is itself the study folder: name it by the folder
        rel = folder.resolve().name or "study"
    kinds = {s.source for s in series}
    acquired = min((d for d in (sidecar_datetime(s.sidecar) for s in series) if d), default="")
    return Study(study_id=rel, patient_pseudonym="", source=kinds.pop() if len(kinds) == 1 else
                 "nifti", location=rel, series=tuple(series),
                 lesion_mask=lesion[0] if lesion else None, skipped_files=skipped,
                 issues=tuple(issues), acquired=acquired, session=bids_label(rel, "ses"))

