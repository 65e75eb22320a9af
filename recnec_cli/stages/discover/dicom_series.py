"""The DICOM series of one study: a SeriesInstanceUID split into volumes, cleaned and described.

One SeriesInstanceUID that holds more than one volume is split (``docs/failure-kinds.md`` kind 7:
echo, ImageType, orientation, matrix); scouts hidden inside a series are removed (kind 6); exact
duplicate instances are dropped and counted (kind 3); one-image series of one acquisition are
merged back; the series header (:class:`~recnec_cli.study.SeriesHeader`) is built from the first
instance and the units.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from ...study import SeriesHeader
from .dicom_units import ENHANCED_SOP_CLASSES, ImageUnit, iop_key, slice_normal, slice_positions_mm
from .values import as_codes, as_float, as_int, as_text, dicom_time_s

# A group of images with another orientation than the main stack, at most this many images,
# inside a series of at least MIN_MAIN images, is a scout (docs/failure-kinds.md kind 6: 1-3 per plane).
SCOUT_MAX_IMAGES = 3
SCOUT_MIN_MAIN = 8


@dataclass
class SeriesAcc:
    """The instances of one SeriesInstanceUID collected by the walk, before splitting."""

    patient_id: str
    study_uid: str
    series_uid: str
    first_ds: Any  # pydicom Dataset of the first instance (series-level tags)
    units: list[ImageUnit] = field(default_factory=list)
    folders: set[str] = field(default_factory=set)



# --------------------------------------------------------------------------------------------
# splitting one SeriesInstanceUID into volumes
# --------------------------------------------------------------------------------------------
def split_series(acc: SeriesAcc, issues: list[str]) -> list[tuple[str, list[ImageUnit]]]:
    """One SeriesInstanceUID -> ``(series id, units)`` per volume (foreign instances, scouts,
    echoes, ImageType, orientation, matrix split off); what was dropped goes to ``issues``."""
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
    groups: dict[tuple, list[ImageUnit]] = defaultdict(list)
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
    ori: dict[Any, list[ImageUnit]] = defaultdict(list)
    for u in units:
        ori[iop_key(u.iop)].append(u)
    if len(ori) > 1:
        main = max(ori.values(), key=len)
        kept = []
        for g in ori.values():
            if g is not main and len(g) <= SCOUT_MAX_IMAGES and len(main) >= SCOUT_MIN_MAIN:
                issues.append(f"{len(g)} scout image(s) with another orientation removed from {uid}")
            else:
                kept.extend(g)
        units = kept

    def key_of(u: ImageUnit) -> dict[str, str]:
        echo = str(u.echo_number) if u.echo_number is not None else (
            f"{u.echo_time:g}" if u.echo_time is not None else "")
        return {
            "echo": echo,
            "type": "\\".join(u.image_type),
            "orient": str(iop_key(u.iop)),
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
    buckets: dict[tuple, list[ImageUnit]] = defaultdict(list)
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


def merge_single_image_series(accl: list[SeriesAcc], issues: list[str]) -> list[SeriesAcc]:
    """Some exporters give every slice its own SeriesInstanceUID (docs/failure-kinds.md kind 7 variant).
    One-image series of one study that share SeriesNumber, SeriesDescription, orientation,
    matrix and echo are merged back into one series when there are at least ``SCOUT_MIN_MAIN``
    of them (fewer stay apart: they are scouts or key images)."""
    groups: dict[tuple, list[SeriesAcc]] = defaultdict(list)
    rest = []
    for acc in accl:
        if len(acc.units) == 1 and acc.units[0].frame is None:
            u = acc.units[0]
            key = (as_int(acc.first_ds.get("SeriesNumber")), str(acc.first_ds.get("SeriesDescription",
                   "")), iop_key(u.iop), u.rows, u.cols, u.echo_number, u.echo_time)
            groups[key].append(acc)
        else:
            rest.append(acc)
    for g in groups.values():
        if len(g) >= SCOUT_MIN_MAIN:
            first = g[0]
            merged = SeriesAcc(first.patient_id, first.study_uid,
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


def dedupe_units(sid: str, units: list[ImageUnit], issues: list[str]) -> list[ImageUnit]:
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


def order_units(units: list[ImageUnit]) -> list[ImageUnit]:
    """Sort by position along the normal, then temporal tags, then InstanceNumber."""
    iop = next((u.iop for u in units if u.iop), None)
    if iop is None or any(u.ipp is None for u in units):
        return sorted(units, key=lambda u: (u.instance_number or 0, str(u.path), u.frame or 0))
    n = slice_normal(iop)
    return sorted(units, key=lambda u: (round(sum(a * b for a, b in zip(u.ipp, n)), 3),
                                        u.temporal, u.instance_number or 0))


def header_from(acc: SeriesAcc, units: list[ImageUnit]) -> SeriesHeader:
    """The :class:`SeriesHeader` of one split volume from its first dataset and its units."""
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
        else:  # same positions, nothing tells the images apart (docs/failure-kinds.md kind 3): AMBIGUOUS_STACK
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
        v = as_text(ds.get(k))
        if v:
            extra[k] = v
    if ds.get((0x2005, 0x100E)) is not None:
        extra["philips_private_scale_slope"] = str(ds[(0x2005, 0x100E)].value)
    ti = as_float(ds.get("InversionTime"))
    if ti is None:
        ti = next((u.inversion_time for u in units if u.inversion_time is not None), None)
    tr = as_float(ds.get("RepetitionTime")) or next(
        (u.repetition_time for u in units if u.repetition_time is not None), None)
    fa = as_float(ds.get("FlipAngle")) or next((u.flip_angle for u in units if u.flip_angle), None)
    etl = as_int(ds.get("EchoTrainLength")) or next(
        (u.echo_train_length for u in units if u.echo_train_length), None)
    te_vals = [u.echo_time for u in units if u.echo_time is not None]
    te = te_vals[0] if te_vals else as_float(ds.get("EchoTime"))
    scanning = as_codes(ds.get("ScanningSequence"))
    variant = as_codes(ds.get("SequenceVariant"))
    if not scanning:  # Enhanced MR: EchoPulseSequence / InversionRecovery (PS3.3 C.8.13.4)
        eps = as_text(ds.get("EchoPulseSequence"))
        sc = []
        if eps in ("SPIN", "BOTH"):
            sc.append("SE")
        if eps in ("GRADIENT", "BOTH"):
            sc.append("GR")
        if as_text(ds.get("InversionRecovery")) == "YES" or ti:
            sc.append("IR")
        if as_text(ds.get("EchoPlanarPulseSequence")) == "YES":
            sc.append("EP")
        scanning = tuple(sc)
    return SeriesHeader(
        modality=as_text(ds.get("Modality")),
        sop_class_uid=as_text(ds.get("SOPClassUID")),
        series_description=as_text(ds.get("SeriesDescription")),
        protocol_name=as_text(ds.get("ProtocolName")),
        sequence_name=as_text(ds.get("SequenceName")) or as_text(ds.get("PulseSequenceName")),
        image_type=u0.image_type if u0.image_type else as_codes(ds.get("ImageType")),
        scanning_sequence=scanning,
        sequence_variant=variant,
        scan_options=as_codes(ds.get("ScanOptions")),
        mr_acquisition_type=as_text(ds.get("MRAcquisitionType")),
        repetition_time_ms=tr,
        echo_time_ms=te,
        inversion_time_ms=ti,
        flip_angle_deg=fa,
        echo_train_length=etl,
        diffusion_b_value=max(bvals) if bvals else None,
        contrast_bolus_agent=as_text(ds.get("ContrastBolusAgent")),
        contrast_bolus_ingredient=as_text(ds.get("ContrastBolusIngredient")),
        contrast_bolus_volume_ml=as_float(ds.get("ContrastBolusVolume")),
        series_number=as_int(ds.get("SeriesNumber")),
        acquisition_time_s=dicom_time_s(ds.get("AcquisitionTime"))
        or dicom_time_s(ds.get("AcquisitionDateTime")) or dicom_time_s(ds.get("SeriesTime")),
        manufacturer=as_text(ds.get("Manufacturer")),
        n_slices=n_slices,
        n_temporal=max(n_temporal, len(bvals) if len(bvals) > 1 else 1),
        rows=u0.rows or None,
        columns=u0.cols or None,
        pixel_spacing_mm=u0.pixel_spacing,
        slice_spacing_mm=spacing,
        extra=extra,
    )

