"""One image unit = one classic DICOM instance or one frame of an Enhanced (multi-frame) instance.

:func:`units_from_dataset` reads the per-image facts (geometry in DICOM LPS mm, echo, timing,
rescale) from a header, for classic instances from the top-level tags and for Enhanced ones from
the functional groups (PS3.3 C.7.6.16, C.8.13.5). Discovery groups units into series; conversion
reads the same units again to check and assemble the stack.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from .values import as_codes, as_float, as_int

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


@dataclass
class ImageUnit:
    """Per-image header facts of one classic instance (``frame`` ``None``) or one frame of an
    Enhanced instance (``frame`` 0-based). ``ipp`` is ImagePositionPatient (mm, DICOM LPS),
    ``iop`` ImageOrientationPatient (row then column direction cosines, LPS), ``pixel_spacing``
    PixelSpacing ``(row spacing, column spacing)`` mm, times in ms, ``rescale`` the Modality LUT
    ``(slope, intercept)``."""

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


def units_from_dataset(ds: Any, path: Path) -> list[ImageUnit]:
    """The image units of one pydicom dataset read from ``path``: one per frame for an Enhanced
    (multi-frame) instance, from its functional groups, else one.

    Raises
    ------
    ValueError, TypeError, AttributeError, KeyError
        From pydicom, on malformed tag values; discovery counts such an instance as skipped.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    rows, cols = as_int(ds.get("Rows")) or 0, as_int(ds.get("Columns")) or 0
    image_type = as_codes(ds.get("ImageType"))
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    sop_uid = str(ds.get("SOPInstanceUID", "") or path.name)
    n_frames = as_int(ds.get("NumberOfFrames")) or 1
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
            b = as_float(diff.get("DiffusionBValue")) if diff is not None else None
            if b:
                temporal += f"b{b}"
            ti = None
            if modif is not None:
                ti = as_float(modif.get("InversionTimes"))
            out.append(ImageUnit(
                path=path, frame=k, sop_uid=f"{sop_uid}#{k}", ipp=ipp, iop=iop,
                rows=rows, cols=cols, echo_number=None,
                echo_time=as_float(echo.get("EffectiveEchoTime")) if echo is not None else None,
                image_type=as_codes(ftype.get("FrameType")) if ftype is not None else image_type,
                instance_number=k + 1, acquisition_number=None, temporal=temporal,
                photometric=photometric, sop_class=sop_class, pixel_spacing=ps, b_value=b,
                inversion_time=ti,
                repetition_time=as_float(timing.get("RepetitionTime")) if timing is not None else None,
                flip_angle=as_float(timing.get("FlipAngle")) if timing is not None else None,
                echo_train_length=as_int(timing.get("EchoTrainLength")) if timing is not None else None,
                rescale=(as_float(pvt.get("RescaleSlope")) or 1.0, as_float(pvt.get("RescaleIntercept")) or 0.0)
                if pvt is not None else None,
            ))
        return out
    ipp = tuple(float(x) for x in ds.ImagePositionPatient) if ds.get("ImagePositionPatient") \
        and len(ds.ImagePositionPatient) == 3 else None
    iop = tuple(float(x) for x in ds.ImageOrientationPatient) if \
        ds.get("ImageOrientationPatient") and len(ds.ImageOrientationPatient) == 6 else None
    ps = tuple(float(x) for x in ds.PixelSpacing) if ds.get("PixelSpacing") else None
    temporal_bits = [str(ds.get(k, "")) for k in ("TemporalPositionIdentifier", "TriggerTime")]
    b = as_float(ds.get("DiffusionBValue"))
    if b is None and ds.get((0x0019, 0x100C)) is not None:  # Siemens CSA B_value (private)
        b = as_float(ds[(0x0019, 0x100C)].value)
    if b is None and ds.get((0x0043, 0x1039)) is not None:  # GE slop_int_6 = b-value (private)
        b = as_float(ds[(0x0043, 0x1039)].value)
    return [ImageUnit(
        path=path, frame=None, sop_uid=sop_uid, ipp=ipp, iop=iop, rows=rows, cols=cols,
        echo_number=as_int(ds.get("EchoNumbers")), echo_time=as_float(ds.get("EchoTime")),
        image_type=image_type, instance_number=as_int(ds.get("InstanceNumber")),
        acquisition_number=as_int(ds.get("AcquisitionNumber")),
        temporal="|".join(temporal_bits) + (f"|b{b}" if b else ""),
        photometric=photometric, sop_class=sop_class, pixel_spacing=ps, b_value=b,
        inversion_time=as_float(ds.get("InversionTime")),
        repetition_time=as_float(ds.get("RepetitionTime")), flip_angle=as_float(ds.get("FlipAngle")),
        echo_train_length=as_int(ds.get("EchoTrainLength")),
        rescale=(as_float(ds.get("RescaleSlope")) or 1.0, as_float(ds.get("RescaleIntercept")) or 0.0),
    )]


# --------------------------------------------------------------------------------------------
# geometry helpers (LPS, mm)
# --------------------------------------------------------------------------------------------
def slice_normal(iop: Sequence[float]) -> tuple[float, float, float]:
    """Unit slice normal (LPS): row cosine x column cosine of ImageOrientationPatient."""
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
    n = slice_normal(iop)
    return [sum(a * b for a, b in zip(u.ipp, n)) for u in units if u.ipp]


def iop_key(iop: tuple[float, ...] | None) -> tuple[float, ...] | None:
    """ImageOrientationPatient rounded for grouping (``None`` stays ``None``)."""
    return tuple(round(v, _IOP_DECIMALS) + 0.0 for v in iop) if iop else None

