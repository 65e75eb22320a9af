"""Walk a scan tree once, read headers only, and group what it finds into studies and series.

DICOM instances are indexed by PatientID / StudyInstanceUID / SeriesInstanceUID whatever the
folder layout (``../shared/FAILURES.md`` kind 8). One SeriesInstanceUID that holds more than one
volume is split (kind 7: echo, ImageType, orientation, matrix); scouts hidden inside a series are
removed (kind 6); exact duplicate instances are dropped and counted (kind 3); junk files are
skipped quietly and counted (kind 9). Enhanced (multi-frame) DICOM is indexed per frame from its
functional groups (DICOM PS3.3 C.7.6.16, C.8.13.5), so a file with two stacks becomes two series.

NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``) files are grouped one folder = one study; the
role comes later from the file name and an optional BIDS JSON sidecar (see :mod:`classify`).

No pixel data is read here; the only numbers computed are geometric (slice positions projected on
the slice normal, in mm, DICOM LPS patient coordinates, PS3.3 C.7.6.2.1.1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from ..config import Settings
from ..errors import DiscoveryError
from ..study import Series, SeriesHeader, Study

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
# Names never read as DICOM: the media directory (PS3.10 DICOMDIR) and OS/viewer litter.
JUNK_NAMES = {"dicomdir", "thumbs.db", ".ds_store", "desktop.ini", "lockfile", "version"}
JUNK_SUFFIXES = {".txt", ".md", ".pdf", ".html", ".htm", ".xml", ".csv", ".jpg", ".jpeg",
                 ".png", ".gif", ".bmp", ".zip", ".exe", ".ini", ".log", ".py", ".sh", ".bat"}

# SOP classes whose instances hold an image volume we may convert (PS3.4 B.5).
IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image Storage",
}
ENHANCED_SOP_CLASSES = {"1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.3",
                        "1.2.840.10008.5.1.4.1.1.4.4", "1.2.840.10008.5.1.4.1.1.2.1"}

# Orientation cosines are compared after rounding: scanners write 6-10 decimals and the same
# stack may differ in the last digits (dcm2niix uses a similar tolerance).
_IOP_DECIMALS = 3
# A group of images with another orientation than the main stack, at most this many images,
# inside a series of at least MIN_MAIN images, is a scout (FAILURES.md kind 6: 1-3 per plane).
SCOUT_MAX_IMAGES = 3
SCOUT_MIN_MAIN = 8


def pseudonym(patient_id: str | None) -> str:
    """First 12 hex digits of SHA-256 of the PatientID; empty string when unknown.

    Used everywhere a patient must be named in logs or reports (no raw IDs or names)."""
    if not patient_id:
        return ""
    return hashlib.sha256(patient_id.encode("utf-8", "replace")).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# one image unit = one classic instance or one frame of an enhanced instance
# --------------------------------------------------------------------------------------------
@dataclass
class _Unit:
    path: Path
    frame: int | None
    sop_uid: str
    ipp: tuple[float, float, float] | None
    iop: tuple[float, ...] | None
    rows: int
    cols: int
    echo_number: int | None
    echo_time: float | None
    image_type: tuple[str, ...]
    instance_number: int | None
    acquisition_number: int | None
    temporal: str  # concatenation of tags that distinguish time points / diffusion directions
    photometric: str
    sop_class: str
    pixel_spacing: tuple[float, float] | None
    b_value: float | None = None
    inversion_time: float | None = None
    repetition_time: float | None = None
    flip_angle: float | None = None
    echo_train_length: int | None = None
    rescale: tuple[float, float] | None = None


@dataclass
class _SeriesAcc:
    patient_id: str
    study_uid: str
    series_uid: str
    first_ds: Any  # pydicom Dataset of the first instance (series-level tags)
    units: list[_Unit] = field(default_factory=list)
    folders: set[str] = field(default_factory=set)


def _f(v: Any) -> float | None:
    try:
        if v is None or v == "":
            return None
        if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue":
            v = list(v)[0] if len(v) else None
            if v is None:
                return None
        x = float(v)
        return x if math.isfinite(x) else None
    except (TypeError, ValueError):
        return None


def _i(v: Any) -> int | None:
    x = _f(v)
    return int(round(x)) if x is not None else None


def _s(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def _multi(v: Any) -> tuple[str, ...]:
    if v is None or v == "":
        return ()
    if isinstance(v, str):
        parts = re.split(r"[\\/ ]+", v)
    else:
        parts = [str(x) for x in v]
    return tuple(p.strip().upper() for p in parts if p and p.strip())


def _dicom_time_s(v: Any) -> float | None:
    """DICOM TM (HHMMSS.FFFFFF, PS3.5 6.2) or the time part of DT -> seconds after midnight."""
    s = _s(v)
    if not s:
        return None
    if len(s) >= 14 and s[:8].isdigit():  # DT: YYYYMMDDHHMMSS...
        s = s[8:]
    m = re.match(r"^(\d{2})(\d{2})?(\d{2})?(\.\d+)?", s.replace(":", ""))
    if not m:
        return None
    h, mi, se, frac = m.groups()
    return int(h) * 3600 + int(mi or 0) * 60 + int(se or 0) + (float(frac) if frac else 0.0)


def _fg_item(ds: Any, frame: int, keyword: str) -> Any:
    """Functional-group macro ``keyword`` for ``frame``: per-frame first, then shared (PS3.3
    C.7.6.16). Returns the first item of the macro's sequence or ``None``."""
    for top in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        seq = ds.get(top)
        if not seq:
            continue
        item = seq[frame] if top.startswith("PerFrame") and frame < len(seq) else seq[0]
        sub = item.get(keyword)
        if sub:
            return sub[0]
    return None


def _units_from_dataset(ds: Any, path: Path) -> list[_Unit]:
    sop_class = str(ds.get("SOPClassUID", ""))
    rows, cols = _i(ds.get("Rows")) or 0, _i(ds.get("Columns")) or 0
    image_type = _multi(ds.get("ImageType"))
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or path.name)
    n_frames = _i(ds.get("NumberOfFrames")) or 1
    if sop_class in ENHANCED_SOP_CLASSES or ds.get("PerFrameFunctionalGroupsSequence"):
        out = []
        for k in range(n_frames):
            pos = _fg_item(ds, k, "PlanePositionSequence")
            ori = _fg_item(ds, k, "PlaneOrientationSequence")
            meas = _fg_item(ds, k, "PixelMeasuresSequence")
            echo = _fg_item(ds, k, "MREchoSequence")
            timing = _fg_item(ds, k, "MRTimingAndRelatedParametersSequence")
            modif = _fg_item(ds, k, "MRModifierSequence")
            diff = _fg_item(ds, k, "MRDiffusionSequence")
            ftype = _fg_item(ds, k, "MRImageFrameTypeSequence") or _fg_item(
                ds, k, "CTImageFrameTypeSequence")
            content = _fg_item(ds, k, "FrameContentSequence")
            pvt = _fg_item(ds, k, "PixelValueTransformationSequence")
            ipp = tuple(float(x) for x in pos.ImagePositionPatient) if pos is not None and \
                pos.get("ImagePositionPatient") else None
            iop = tuple(float(x) for x in ori.ImageOrientationPatient) if ori is not None and \
                ori.get("ImageOrientationPatient") else None
            ps = tuple(float(x) for x in meas.PixelSpacing) if meas is not None and \
                meas.get("PixelSpacing") else None
            temporal = ""
            if content is not None:
                temporal = f"t{content.get('TemporalPositionIndex', '')}"
            b = _f(diff.get("DiffusionBValue")) if diff is not None else None
            if b:
                temporal += f"b{b}"
            ti = None
            if modif is not None:
                ti = _f(modif.get("InversionTimes"))
            out.append(_Unit(
                path=path, frame=k, sop_uid=f"{sop_uid}#{k}", ipp=ipp, iop=iop,
                rows=rows, cols=cols, echo_number=None,
                echo_time=_f(echo.get("EffectiveEchoTime")) if echo is not None else None,
                image_type=_multi(ftype.get("FrameType")) if ftype is not None else image_type,
                instance_number=k + 1, acquisition_number=None, temporal=temporal,
                photometric=photometric, sop_class=sop_class, pixel_spacing=ps, b_value=b,
                inversion_time=ti,
                repetition_time=_f(timing.get("RepetitionTime")) if timing is not None else None,
                flip_angle=_f(timing.get("FlipAngle")) if timing is not None else None,
                echo_train_length=_i(timing.get("EchoTrainLength")) if timing is not None else None,
                rescale=(_f(pvt.get("RescaleSlope")) or 1.0, _f(pvt.get("RescaleIntercept")) or 0.0)
                if pvt is not None else None,
            ))
        return out
    ipp = tuple(float(x) for x in ds.ImagePositionPatient) if ds.get("ImagePositionPatient") \
        and len(ds.ImagePositionPatient) == 3 else None
    iop = tuple(float(x) for x in ds.ImageOrientationPatient) if \
        ds.get("ImageOrientationPatient") and len(ds.ImageOrientationPatient) == 6 else None
    ps = tuple(float(x) for x in ds.PixelSpacing) if ds.get("PixelSpacing") else None
    temporal_bits = [str(ds.get(k, "")) for k in ("TemporalPositionIdentifier", "TriggerTime")]
    b = _f(ds.get("DiffusionBValue"))
    if b is None and ds.get((0x0019, 0x100C)) is not None:  # Siemens CSA B_value (private)
        b = _f(ds[(0x0019, 0x100C)].value)
    if b is None and ds.get((0x0043, 0x1039)) is not None:  # GE slop_int_6 = b-value (private)
        b = _f(ds[(0x0043, 0x1039)].value)
    return [_Unit(
        path=path, frame=None, sop_uid=sop_uid, ipp=ipp, iop=iop, rows=rows, cols=cols,
        echo_number=_i(ds.get("EchoNumbers")), echo_time=_f(ds.get("EchoTime")),
        image_type=image_type, instance_number=_i(ds.get("InstanceNumber")),
        acquisition_number=_i(ds.get("AcquisitionNumber")),
        temporal="|".join(temporal_bits) + (f"|b{b}" if b else ""),
        photometric=photometric, sop_class=sop_class, pixel_spacing=ps, b_value=b,
        inversion_time=_f(ds.get("InversionTime")),
        repetition_time=_f(ds.get("RepetitionTime")), flip_angle=_f(ds.get("FlipAngle")),
        echo_train_length=_i(ds.get("EchoTrainLength")),
        rescale=(_f(ds.get("RescaleSlope")) or 1.0, _f(ds.get("RescaleIntercept")) or 0.0),
    )]


# --------------------------------------------------------------------------------------------
# geometry helpers (LPS, mm)
# --------------------------------------------------------------------------------------------
def _normal(iop: Sequence[float]) -> tuple[float, float, float]:
    r, c = iop[:3], iop[3:]
    n = (r[1] * c[2] - r[2] * c[1], r[2] * c[0] - r[0] * c[2], r[0] * c[1] - r[1] * c[0])
    norm = math.sqrt(sum(v * v for v in n)) or 1.0
    return (n[0] / norm, n[1] / norm, n[2] / norm)


def slice_positions_mm(units: Iterable[Any]) -> list[float]:
    """Positions of the images along the slice normal (mm), in the order given.

    The normal is the cross product of the row and column cosines of ImageOrientationPatient
    (PS3.3 C.7.6.2.1.1); the position is ImagePositionPatient projected on it."""
    units = list(units)
    iop = next((u.iop for u in units if u.iop), None)
    if iop is None:
        return []
    n = _normal(iop)
    return [sum(a * b for a, b in zip(u.ipp, n)) for u in units if u.ipp]


def _iop_key(iop: tuple[float, ...] | None) -> tuple[float, ...] | None:
    return tuple(round(v, _IOP_DECIMALS) + 0.0 for v in iop) if iop else None


# --------------------------------------------------------------------------------------------
# splitting one SeriesInstanceUID into volumes
# --------------------------------------------------------------------------------------------
def _split(acc: _SeriesAcc, issues: list[str]) -> list[tuple[str, list[_Unit]]]:
    uid = acc.series_uid
    units = acc.units
    # 1. foreign instances: colour secondary captures / non-image SOP classes (kind 10)
    mono = [u for u in units if u.photometric.upper().startswith("MONOCHROME")
            or not u.photometric]
    if mono and len(mono) < len(units):
        issues.append(f"{len(units) - len(mono)} non-greyscale instance(s) removed from {uid}")
        units = mono
    # 2. explicit localizers inside the series (ImageType LOCALIZER, PS3.3 C.8.16.1)
    locs = [u for u in units if "LOCALIZER" in u.image_type]
    if locs and len(locs) < len(units):
        issues.append(f"{len(locs)} localizer image(s) removed from {uid}")
        units = [u for u in units if "LOCALIZER" not in u.image_type]
    # 3. majority matrix: a few images of another size are foreign (kind 10); comparable groups
    #    are separate volumes (kind 7)
    groups: dict[tuple, list[_Unit]] = defaultdict(list)
    for u in units:
        groups[(u.rows, u.cols)].append(u)
    if len(groups) > 1:
        main = max(groups.values(), key=len)
        kept = []
        for key, g in groups.items():
            if g is not main and len(g) <= SCOUT_MAX_IMAGES and len(main) >= SCOUT_MIN_MAIN:
                issues.append(f"{len(g)} image(s) of matrix {key[0]}x{key[1]} removed from {uid} "
                              f"(majority matrix {main[0].rows}x{main[0].cols})")
            else:
                kept.extend(g)
        units = kept
    # 4. orientation: small off-plane groups are scouts (kind 6), large ones separate stacks
    ori: dict[Any, list[_Unit]] = defaultdict(list)
    for u in units:
        ori[_iop_key(u.iop)].append(u)
    if len(ori) > 1:
        main = max(ori.values(), key=len)
        kept = []
        for g in ori.values():
            if g is not main and len(g) <= SCOUT_MAX_IMAGES and len(main) >= SCOUT_MIN_MAIN:
                issues.append(f"{len(g)} scout image(s) with another orientation removed from {uid}")
            else:
                kept.extend(g)
        units = kept

    def key_of(u: _Unit) -> dict[str, str]:
        echo = str(u.echo_number) if u.echo_number is not None else (
            f"{u.echo_time:g}" if u.echo_time is not None else "")
        return {
            "echo": echo,
            "type": "\\".join(u.image_type),
            "orient": str(_iop_key(u.iop)),
            "matrix": f"{u.rows}x{u.cols}",
        }

    keys = [key_of(u) for u in units]
    varying = [k for k in ("echo", "type", "orient", "matrix") if len({d[k] for d in keys}) > 1]
    if "orient" in varying:
        # scouts (oblique MPR localizers) have a different orientation on almost every image:
        # splitting them into one-image "volumes" helps nobody. Split by orientation only when
        # at least one orientation holds a stack.
        sizes = Counter(d["orient"] for d in keys)
        if max(sizes.values()) < SCOUT_MIN_MAIN:
            varying.remove("orient")
            if not varying:
                return [(uid, units)]
    if not varying:
        return [(uid, units)]
    buckets: dict[tuple, list[_Unit]] = defaultdict(list)
    for u, d in zip(units, keys):
        buckets[tuple(d[k] for k in varying)].append(u)
    out = []
    # stable, readable suffixes: echo number/time as is, other keys by rank of first appearance
    ranks: dict[str, dict[str, int]] = {k: {} for k in varying}
    for d in keys:
        for k in varying:
            ranks[k].setdefault(d[k], len(ranks[k]) + 1)
    for bkey, g in buckets.items():
        parts = []
        for k, v in zip(varying, bkey):
            if k == "echo":
                parts.append(f"echo={v}")
            elif k == "matrix":
                parts.append(f"matrix={v}")
            else:
                parts.append(f"{k}={ranks[k][v]}")
        out.append((f"{uid}#" + ",".join(parts), g))
    issues.append(f"series {uid} split into {len(out)} volumes by {', '.join(varying)}")
    return out


def _merge_single_image_series(accl: list[_SeriesAcc], issues: list[str]) -> list[_SeriesAcc]:
    """Some exporters give every slice its own SeriesInstanceUID (FAILURES.md kind 7 variant).
    One-image series of one study that share SeriesNumber, SeriesDescription, orientation,
    matrix and echo are merged back into one series when there are at least ``SCOUT_MIN_MAIN``
    of them (fewer stay apart: they are scouts or key images)."""
    groups: dict[tuple, list[_SeriesAcc]] = defaultdict(list)
    rest = []
    for acc in accl:
        if len(acc.units) == 1 and acc.units[0].frame is None:
            u = acc.units[0]
            key = (_i(acc.first_ds.get("SeriesNumber")), str(acc.first_ds.get("SeriesDescription",
                   "")), _iop_key(u.iop), u.rows, u.cols, u.echo_number, u.echo_time)
            groups[key].append(acc)
        else:
            rest.append(acc)
    for g in groups.values():
        if len(g) >= SCOUT_MIN_MAIN:
            first = g[0]
            merged = _SeriesAcc(first.patient_id, first.study_uid,
                                f"{first.series_uid}+{len(g) - 1}", first.first_ds)
            for a in g:
                merged.units.extend(a.units)
                merged.folders |= a.folders
            issues.append(f"{len(g)} one-image series with SeriesNumber {g[0].first_ds.get('SeriesNumber')}"
                          f" merged into {merged.series_uid}")
            rest.append(merged)
        else:
            rest.extend(g)
    return rest


def _dedupe(sid: str, units: list[_Unit], issues: list[str]) -> list[_Unit]:
    """Drop exact duplicates: same SOPInstanceUID, or same position + InstanceNumber +
    AcquisitionNumber + echo + temporal tags (the same image stored twice, kind 3)."""
    seen_sop: set[str] = set()
    seen_key: set[tuple] = set()
    out = []
    dropped = 0
    for u in sorted(units, key=lambda u: (str(u.path), u.frame or 0)):
        key = (tuple(round(v, 3) for v in u.ipp) if u.ipp else None, u.instance_number,
               u.acquisition_number, u.echo_number, u.echo_time, u.temporal, u.frame)
        if u.sop_uid in seen_sop or (u.ipp is not None and key in seen_key):
            dropped += 1
            continue
        seen_sop.add(u.sop_uid)
        seen_key.add(key)
        out.append(u)
    if dropped:
        issues.append(f"{dropped} duplicate instance(s) dropped from {sid}")
    return out


def _order_units(units: list[_Unit]) -> list[_Unit]:
    """Sort by position along the normal, then temporal tags, then InstanceNumber."""
    iop = next((u.iop for u in units if u.iop), None)
    if iop is None or any(u.ipp is None for u in units):
        return sorted(units, key=lambda u: (u.instance_number or 0, str(u.path), u.frame or 0))
    n = _normal(iop)
    return sorted(units, key=lambda u: (round(sum(a * b for a, b in zip(u.ipp, n)), 3),
                                        u.temporal, u.instance_number or 0))


def _header_from(acc: _SeriesAcc, units: list[_Unit]) -> SeriesHeader:
    ds = acc.first_ds
    u0 = units[0]
    positions = slice_positions_mm(units)
    uniq = sorted({round(p, 2) for p in positions})
    n_slices = len(uniq) if uniq else len(units)
    n_temporal = 1
    extra: dict[str, str] = {}
    n_placed = sum(1 for u in units if u.ipp is not None)
    if uniq and n_placed > len(uniq):
        temporal_tags = {u.temporal for u in units}
        acq = {u.acquisition_number for u in units}
        if len(temporal_tags) > 1 or len(acq) > 1:
            extra["stack"] = "4D"
            n_temporal = max(2, round(n_placed / len(uniq)))
        else:  # same positions, nothing tells the images apart (FAILURES.md 3): AMBIGUOUS_STACK
            extra["stack"] = "repeated positions"
    spacing = None
    if len(uniq) > 1:
        diffs = sorted(b - a for a, b in zip(uniq, uniq[1:]))
        spacing = diffs[len(diffs) // 2]
    if any(u.ipp is None or u.iop is None for u in units):
        extra["missing_geometry"] = str(sum(u.ipp is None or u.iop is None for u in units))
    if "MOSAIC" in u0.image_type:
        extra["mosaic"] = "1"
    bvals = {u.b_value for u in units if u.b_value is not None}
    if acc.first_ds.get("SOPClassUID") in ENHANCED_SOP_CLASSES:
        extra["enhanced"] = "1"
    for k in ("PulseSequenceName", "EchoPulseSequence", "InversionRecovery", "BodyPartExamined",
              "AcquisitionContrast", "ImageComments"):
        v = _s(ds.get(k))
        if v:
            extra[k] = v
    if ds.get((0x2005, 0x100E)) is not None:
        extra["philips_private_scale_slope"] = str(ds[(0x2005, 0x100E)].value)
    ti = _f(ds.get("InversionTime"))
    if ti is None:
        ti = next((u.inversion_time for u in units if u.inversion_time is not None), None)
    tr = _f(ds.get("RepetitionTime")) or next(
        (u.repetition_time for u in units if u.repetition_time is not None), None)
    fa = _f(ds.get("FlipAngle")) or next((u.flip_angle for u in units if u.flip_angle), None)
    etl = _i(ds.get("EchoTrainLength")) or next(
        (u.echo_train_length for u in units if u.echo_train_length), None)
    te_vals = [u.echo_time for u in units if u.echo_time is not None]
    te = te_vals[0] if te_vals else _f(ds.get("EchoTime"))
    scanning = _multi(ds.get("ScanningSequence"))
    variant = _multi(ds.get("SequenceVariant"))
    if not scanning:  # Enhanced MR: EchoPulseSequence / InversionRecovery (PS3.3 C.8.13.4)
        eps = _s(ds.get("EchoPulseSequence"))
        sc = []
        if eps in ("SPIN", "BOTH"):
            sc.append("SE")
        if eps in ("GRADIENT", "BOTH"):
            sc.append("GR")
        if _s(ds.get("InversionRecovery")) == "YES" or ti:
            sc.append("IR")
        if _s(ds.get("EchoPlanarPulseSequence")) == "YES":
            sc.append("EP")
        scanning = tuple(sc)
    return SeriesHeader(
        modality=_s(ds.get("Modality")),
        sop_class_uid=_s(ds.get("SOPClassUID")),
        series_description=_s(ds.get("SeriesDescription")),
        protocol_name=_s(ds.get("ProtocolName")),
        sequence_name=_s(ds.get("SequenceName")) or _s(ds.get("PulseSequenceName")),
        image_type=u0.image_type if u0.image_type else _multi(ds.get("ImageType")),
        scanning_sequence=scanning,
        sequence_variant=variant,
        scan_options=_multi(ds.get("ScanOptions")),
        mr_acquisition_type=_s(ds.get("MRAcquisitionType")),
        repetition_time_ms=tr,
        echo_time_ms=te,
        inversion_time_ms=ti,
        flip_angle_deg=fa,
        echo_train_length=etl,
        diffusion_b_value=max(bvals) if bvals else None,
        contrast_bolus_agent=_s(ds.get("ContrastBolusAgent")),
        contrast_bolus_ingredient=_s(ds.get("ContrastBolusIngredient")),
        contrast_bolus_volume_ml=_f(ds.get("ContrastBolusVolume")),
        series_number=_i(ds.get("SeriesNumber")),
        acquisition_time_s=_dicom_time_s(ds.get("AcquisitionTime"))
        or _dicom_time_s(ds.get("AcquisitionDateTime")) or _dicom_time_s(ds.get("SeriesTime")),
        manufacturer=_s(ds.get("Manufacturer")),
        n_slices=n_slices,
        n_temporal=max(n_temporal, len(bvals) if len(bvals) > 1 else 1),
        rows=u0.rows or None,
        columns=u0.cols or None,
        pixel_spacing_mm=u0.pixel_spacing,
        slice_spacing_mm=spacing,
        extra=extra,
    )


# --------------------------------------------------------------------------------------------
# NIfTI / NRRD
# --------------------------------------------------------------------------------------------
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


def _file_header(path: Path, sidecar: Path | None) -> SeriesHeader:
    """Header facts of one NIfTI/NRRD file (shape and spacing from the image header only), plus
    a BIDS JSON sidecar where present (BIDS 1.9 stores times in seconds: converted to ms)."""
    stem = _strip_ext(path.name)
    shape: tuple[int, ...] = ()
    zooms: tuple[float, ...] = ()
    extra: dict[str, str] = {}
    if path.name.lower().endswith(NRRD_SUFFIXES):
        import nrrd
        import numpy as np

        hdr = nrrd.read_header(str(path))
        shape = tuple(int(s) for s in hdr.get("sizes", ()))
        dirs = hdr.get("space directions")
        if dirs is not None:
            zooms = tuple(float(np.linalg.norm(d)) for d in np.asarray(
                [d for d in dirs if d is not None and not (isinstance(d, float) and math.isnan(d))],
                dtype=float))
        extra["format"] = "nrrd"
    else:
        import nibabel as nib

        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
        descrip = img.header.get("descrip")
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
        v = _f(meta.get(key))
        return v * 1000.0 if v is not None else None

    return SeriesHeader(
        modality=_s(meta.get("Modality")) or "MR",
        series_description=_s(meta.get("SeriesDescription")) or stem,
        protocol_name=_s(meta.get("ProtocolName")),
        sequence_name=_s(meta.get("SequenceName")) or _s(meta.get("PulseSequenceDetails")),
        image_type=_multi(meta.get("ImageType")),
        scanning_sequence=_multi(meta.get("ScanningSequence")),
        sequence_variant=_multi(meta.get("SequenceVariant")),
        scan_options=_multi(meta.get("ScanOptions")),
        mr_acquisition_type=_s(meta.get("MRAcquisitionType")),
        repetition_time_ms=ms("RepetitionTime"),
        echo_time_ms=ms("EchoTime"),
        inversion_time_ms=ms("InversionTime"),
        flip_angle_deg=_f(meta.get("FlipAngle")),
        echo_train_length=_i(meta.get("EchoTrainLength")),
        contrast_bolus_agent=_s(meta.get("ContrastBolusAgent")),
        contrast_bolus_ingredient=_s(meta.get("ContrastBolusIngredient")),
        contrast_bolus_volume_ml=_f(meta.get("ContrastBolusVolume")),
        series_number=_i(meta.get("SeriesNumber")),
        acquisition_time_s=_dicom_time_s(str(meta.get("AcquisitionTime", "")).replace(":", "")),
        manufacturer=_s(meta.get("Manufacturer")),
        n_slices=spatial[2] if len(spatial) > 2 else (1 if spatial else 0),
        n_temporal=n_t,
        rows=spatial[1] if len(spatial) > 1 else None,
        columns=spatial[0] if spatial else None,
        pixel_spacing_mm=(zooms[0], zooms[1]) if len(zooms) >= 2 else None,
        slice_spacing_mm=zooms[2] if len(zooms) >= 3 else None,
        extra=extra,
    )


def _file_study(root: Path, folder: Path, names: list[str], skipped: int) -> Study | None:
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
        except Exception as exc:  # nibabel/pynrrd raise many types on corrupt headers
            issues.append(f"unreadable image header {p.name}: {type(exc).__name__}")
            log.warning("unreadable image header %s: %s", p.name, exc)
            continue
        series.append(Series(series_id=p.relative_to(root).as_posix(),
                             source="nrrd" if p.name.lower().endswith(NRRD_SUFFIXES) else "nifti",
                             files=(p,), header=hdr, sidecar=side))
    rel = folder.relative_to(root).as_posix()
    if rel == ".":  # the scan root is itself the study folder: name it by the folder
        rel = folder.resolve().name or "study"
    kinds = {s.source for s in series}
    return Study(study_id=rel, patient_pseudonym="", source=kinds.pop() if len(kinds) == 1 else
                 "nifti", location=rel, series=tuple(series),
                 lesion_mask=lesion[0] if lesion else None, skipped_files=skipped,
                 issues=tuple(issues))


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


def discover(root: Path, *, settings: Settings) -> list[Study]:
    """Index every study below ``root`` from headers only.

    Parameters
    ----------
    root:
        Folder to walk (recursively, symlinked folders not followed). A single file is accepted.
    settings:
        Run settings (not used for the walk itself; kept so the signature matches the stages).

    Returns
    -------
    list[Study]
        DICOM studies first (sorted by study_id), then NIfTI/NRRD folder studies (sorted by
        folder). Each series' ``files`` are sorted along the slice normal.

    Raises
    ------
    DiscoveryError
        ``NO_IMAGE_DICOM_FOUND`` when the tree holds no image at all (message gives the counts);
        ``INPUT_NOT_FOUND`` when ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise DiscoveryError(f"input folder does not exist: {root}", code="INPUT_NOT_FOUND")
    walk_root = root if root.is_dir() else root.parent
    accs: dict[str, _SeriesAcc] = {}
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
            pid = str(ds.get("PatientID", "") or "")
            key = "\0".join((pid, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
            acc = accs.get(key)
            if acc is None:
                acc = accs[key] = _SeriesAcc(pid, str(ds.StudyInstanceUID),
                                             str(ds.SeriesInstanceUID), ds)
            acc.folders.add(rel)
            try:
                acc.units.extend(_units_from_dataset(ds, path))
            except (ValueError, TypeError, AttributeError, KeyError) as exc:
                log.debug("unusable instance %s: %s", name, exc)
                skipped_by_folder[rel] += 1
        if image_names:
            file_folders[folder] = image_names

    # ---- DICOM studies
    by_study: dict[tuple[str, str], list[_SeriesAcc]] = defaultdict(list)
    for acc in accs.values():
        by_study[(acc.patient_id, acc.study_uid)].append(acc)
    uid_patients = Counter(study_uid for _, study_uid in by_study)
    studies: list[Study] = []
    for (pid, study_uid), accl in sorted(by_study.items(), key=lambda kv: kv[0][1]):
        issues: list[str] = []
        series: list[Series] = []
        folders: set[str] = set()
        for acc in _merge_single_image_series(
                sorted(accl, key=lambda a: (_i(a.first_ds.get("SeriesNumber")) or 0,
                                            a.series_uid)), issues):
            folders |= acc.folders
            if not acc.first_ds.get("SOPClassUID") or str(acc.first_ds.SOPClassUID) not in \
                    IMAGE_SOP_CLASSES:
                issues.append(f"series {acc.series_uid}: non-image SOP class "
                              f"{acc.first_ds.get('SOPClassUID', '?')} ignored")
                continue
            for sid, units in _split(acc, issues):
                units = _order_units(_dedupe(sid, units, issues))
                if not units:
                    continue
                files = []
                for u in units:
                    if u.path not in files:
                        files.append(u.path)
                frames = tuple(u.frame for u in units) if units[0].frame is not None else ()
                series.append(Series(series_id=sid, source="dicom", files=tuple(files),
                                     header=_header_from(acc, units), frames=frames))
        pseud = pseudonym(pid)
        sid_ = study_uid
        if uid_patients[study_uid] > 1:
            sid_ = f"{study_uid}#patient={pseud or 'unknown'}"
            issues.append("StudyInstanceUID shared by several PatientIDs: split by patient")
        if not series:
            issues.append("NO_IMAGE_DICOM_FOUND: no image series in this study")
        skipped = sum(skipped_by_folder[f] for f in folders)
        studies.append(Study(study_id=sid_, patient_pseudonym=pseud, source="dicom",
                             location=";".join(sorted(folders)), series=tuple(series),
                             skipped_files=skipped, issues=tuple(issues)))
        log.info("study %s: %d series (patient %s)", sid_, len(series), pseud or "-")

    # ---- NIfTI / NRRD folder studies
    for folder, names in sorted(file_folders.items()):
        rel = folder.relative_to(walk_root).as_posix()
        st = _file_study(walk_root, folder, names, skipped_by_folder[rel])
        if st is not None:
            studies.append(st)
            log.info("study %s: %d file series", st.study_id, len(st.series))
    if not studies:
        raise DiscoveryError(
            f"NO_IMAGE_DICOM_FOUND: no image DICOM, NIfTI or NRRD among {n_files} file(s) "
            f"({sum(skipped_by_folder.values())} skipped as non-image)",
            code="NO_IMAGE_DICOM_FOUND")
    return studies
