"""A study's result as DICOM objects that file themselves under the source study.

Three objects per DICOM study whose lesion stage finished, built with highdicom (the field's
library for derived DICOM; https://highdicom.readthedocs.io):

* **SEG** (Segmentation Storage, PS3.3 A.51): the lesion on the **original T1ce series' own
  frames** (same rows, columns, positions), one frame per source instance that holds any of it,
  each frame with its derivation reference to the source instance. Segments: 1 enhancing tumour,
  2 necrotic / non-enhancing core, 3 T2/FLAIR hyperintensity (oedema) when the segmenter made the
  lesion; one segment "lesion" for a user mask or the heuristic detector. Viewers refuse SEGs on
  another geometry or without references (OHIF issues #4030, #4271; Weasis #693), hence
  :func:`labels_on_source`.
* **SR** (Comprehensive 3D SR, TID 1500 Measurement Report): one measurement group referencing
  segment 1 of the SEG, holding the report row's volumes (mL), ``p_recurrence`` and the ensemble
  spread, the label as a qualitative evaluation, the algorithm's name and model version,
  VerificationFlag ``UNVERIFIED``, and the research-use disclaimer as text and in the series
  description.
* **SC** (Secondary Capture Image Storage): the QC picture, for viewers that show neither.

All three carry the source study's patient and study modules (highdicom copies them from the
source instances): they hold the patient's identity by design, so they file under the right
patient. Their UIDs are derived from the source SeriesInstanceUID, the model version and a digest
of their content (:func:`derived_uid`): a re-run with the same result writes the same UIDs, and a
changed result gets new ones (a SOP Instance UID never names two different contents).
"""

from __future__ import annotations

import hashlib
import logging
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import atomic_write_bytes

log = logging.getLogger(__name__)

#: a research-use statement every object carries (SeriesDescription is at most 64 characters)
SERIES_DESCRIPTION = {"SEG": "recnec lesion SEG - RESEARCH USE ONLY",
                      "SR": "recnec report - RESEARCH USE ONLY",
                      "SC": "recnec QC picture - RESEARCH USE ONLY"}
DISCLAIMER = ("Research use only; not clinically validated. Produced by recnec, a research tool whose shipped "
              "weights were trained on a synthetic cohort; not a diagnosis.")
#: Series Numbers of the derived series (high, so they sort after the acquired series)
SERIES_NUMBER = {"SEG": 9901, "SR": 9902, "SC": 9903}
KINDS = ("SEG", "SR", "SC")
MANUFACTURER = "recnec"

#: the coding scheme of recnec's own concepts (PS3.16 8.2: private schemes start with "99")
PRIVATE_SCHEME = "99RECNEC"
#: segment number -> (label, SNOMED CT property type); category is "Morphologically Altered Structure"
SEGMENTS = {1: ("Enhancing tumour", ("108369006", "SCT", "Neoplasm")),
            2: ("Necrotic or non-enhancing core", ("6574001", "SCT", "Necrosis")),
            3: ("T2/FLAIR hyperintensity (oedema)", ("79654002", "SCT", "Edema"))}
SINGLE_SEGMENT = ("Lesion", ("52988006", "SCT", "Lesion"))
_CATEGORY = ("49755003", "SCT", "Morphologically Altered Structure")


class DicomExportError(Exception):
    """The objects cannot be built for this study (the reason is safe to log: no header values)."""


@dataclass(frozen=True)
class SourceLabels:
    """The lesion's labels on the source T1ce instances.

    ``labels`` uint8 ``(n_instances, Rows, Columns)``, one plane per source instance in ``files``
    order: 0 background, then segment numbers (1 enhancing, 2 core, 3 oedema; or 1 lesion when
    ``compartments`` is False). ``files`` the source instances (paths), ``series_uid`` their
    SeriesInstanceUID.
    """

    labels: np.ndarray
    files: tuple[Path, ...]
    series_uid: str
    compartments: bool


@dataclass(frozen=True)
class WrittenObject:
    """One object on disk: ``kind`` (``SEG``, ``SR``, ``SC``), its SOP Class / Instance UIDs,
    ``path`` and ``digest`` (what its content was derived from; same digest, same object)."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    path: Path
    digest: str


def read_sources(files: Sequence[Path]) -> list[Any]:
    """The source instances as pydicom datasets (pixel data not decoded).

    Raises
    ------
    DicomExportError
        A file is an Enhanced (multi-frame) instance: its SEG would need per-frame references into
        one file, not supported yet.
    """
    import pydicom

    out = []
    for f in files:
        ds = pydicom.dcmread(str(f))
        if int(getattr(ds, "NumberOfFrames", 1) or 1) > 1:
            raise DicomExportError("the T1ce is an Enhanced (multi-frame) DICOM instance; DICOM SEG / SR export "
                                   "supports classic one-image-per-file series only")
        out.append(ds)
    return out


def labels_on_source(labels: np.ndarray, grid_affine: np.ndarray, sources: Sequence[Any]) -> np.ndarray:
    """Nearest-neighbour sample of ``labels`` (uint8 ``(X, Y, Z)`` on the common grid, ``grid_affine``
    voxel -> RAS+ mm) at every pixel centre of each source instance.

    A pixel's position is ImagePositionPatient + column x PixelSpacing[1] x row direction + row x
    PixelSpacing[0] x column direction (PS3.3 C.7.6.2.1.1), in LPS; x and y are negated to RAS.
    Returns uint8 ``(n_instances, Rows, Columns)``; pixels outside the grid are 0.

    Raises
    ------
    DicomExportError
        An instance lacks ImagePositionPatient, ImageOrientationPatient or PixelSpacing.
    """
    inv = np.linalg.inv(np.asarray(grid_affine, dtype=np.float64))
    shape = np.asarray(labels.shape)
    out = []
    for ds in sources:
        try:
            ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
            iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
            dr, dc = (float(v) for v in ds.PixelSpacing)
            rows, cols = int(ds.Rows), int(ds.Columns)
        except (AttributeError, TypeError, ValueError):
            raise DicomExportError("a T1ce instance lacks its position, orientation or pixel spacing") from None
        r, c = np.mgrid[0:rows, 0:cols].astype(np.float64)
        lps = ipp + c[..., None] * dc * iop[:3] + r[..., None] * dr * iop[3:]
        ras = lps * np.array([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(np.int64)
        ok = np.all((ijk >= 0) & (ijk < shape), axis=-1)
        plane = np.zeros((rows, cols), dtype=np.uint8)
        idx = ijk[ok]
        plane[ok] = labels[idx[:, 0], idx[:, 1], idx[:, 2]]
        out.append(plane)
    return np.stack(out)


def derived_uid(*parts: str) -> str:
    """A UID under the ``2.25`` root (PS3.5 B.2: the integer of a UUID) from a name-based UUID
    (RFC 4122 version 5, SHA-1) of ``parts``: the same parts, the same UID. (pydicom's
    ``generate_uid(prefix=None)`` ignores its entropy sources and is random.)"""
    return "2.25." + str(uuid.uuid5(_UID_NAMESPACE, "\x00".join(("recnec-dicom-out", *parts))).int)


#: the namespace of :func:`derived_uid` (a fixed, random UUID)
_UID_NAMESPACE = uuid.UUID("6f0e3b7c-2d1a-4c55-9a57-3b7f0f6f2a11")


def _code(t: tuple[str, str, str]) -> Any:
    from pydicom.sr.coding import Code

    return Code(*t)


def _private(value: str, meaning: str) -> Any:
    return _code((value, PRIVATE_SCHEME, meaning))


def _algorithm(model_version: str) -> Any:
    import highdicom as hd

    return hd.AlgorithmIdentificationSequence(name="recnec", version=model_version[:64],
                                              family=_code(("123109", "DCM", "Artificial Intelligence")))


def build_seg(sources: Sequence[Any], src: SourceLabels, *, model_version: str, software_version: str,
              content_digest: str) -> Any:
    """The DICOM Segmentation of ``src`` on ``sources``' frames (empty frames omitted).

    Raises
    ------
    DicomExportError
        No source frame holds any lesion voxel (nothing to segment).
    """
    import highdicom as hd

    present = sorted(int(v) for v in np.unique(src.labels) if v)
    if not present:
        raise DicomExportError("the lesion covers no pixel of the T1ce's own frames")
    described = SEGMENTS if src.compartments else {1: SINGLE_SEGMENT}
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=n, segment_label=described[n][0], segmented_property_category=_code(_CATEGORY),
            segmented_property_type=_code(described[n][1]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=_algorithm(model_version),
            tracking_uid=derived_uid(src.series_uid, model_version, content_digest, "segment", str(n)),
            tracking_id=f"recnec lesion segment {n}")
        for n in present]
    # a label map whose values are segment numbers; highdicom needs them numbered 1..n without gaps
    remap = np.zeros(256, dtype=np.uint8)
    for i, n in enumerate(present, start=1):
        remap[n] = i
    for i, d in enumerate(descriptions, start=1):
        d.SegmentNumber = i
    return hd.seg.Segmentation(
        source_images=list(sources), pixel_array=remap[src.labels],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=derived_uid(src.series_uid, model_version, content_digest, "SEG", "series"),
        series_number=SERIES_NUMBER["SEG"],
        sop_instance_uid=derived_uid(src.series_uid, model_version, content_digest, "SEG"),
        instance_number=1, manufacturer=MANUFACTURER, manufacturer_model_name="recnec lesion segmenter",
        software_versions=software_version, device_serial_number="0",
        content_description="lesion (research use only)", content_label="LESION",
        series_description=SERIES_DESCRIPTION["SEG"], omit_empty_frames=True)


def build_sr(seg: Any, sources: Sequence[Any], row: Mapping[str, Any], src: SourceLabels, *, model_version: str,
             content_digest: str) -> Any:
    """The TID 1500 Measurement Report of the report ``row``, referencing ``seg``'s first segment.

    Measurements (only those the row holds): lesion volume (SNOMED CT "Volume", mL), enhancing,
    necrotic and oedema volumes (mL), p_recurrence and the ensemble spread (unitless), all coded
    in :data:`PRIVATE_SCHEME` but the volume; the label as a qualitative evaluation.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ml = _code(("mL", "UCUM", "milliliter"))
    one = codes.UCUM.NoUnits
    algo = hd.sr.AlgorithmIdentification(name="recnec", version=model_version[:64])
    wanted = [("lesion_volume_ml", codes.SCT.Volume, ml),
              ("enhancing_volume_ml", _private("ENH_VOL", "Enhancing tumour volume"), ml),
              ("necrotic_volume_ml", _private("NEC_VOL", "Necrotic core volume"), ml),
              ("oedema_volume_ml", _private("OED_VOL", "T2/FLAIR hyperintensity volume"), ml),
              ("p_recurrence", _private("P_RECUR", "Probability of tumour recurrence"), one),
              ("ensemble_spread", _private("SPREAD", "Ensemble spread of the probability"), one)]
    measurements = []
    for key, name, unit in wanted:
        value = row.get(key, "")
        if value not in ("", None):
            measurements.append(hd.sr.Measurement(name=name, value=float(value), unit=unit, algorithm_id=algo))
    evaluations = []
    if row.get("label"):
        label = str(row["label"])
        evaluations.append(hd.sr.QualitativeEvaluation(
            name=_private("LABEL", "CNN classification (recurrence or necrosis)"),
            value=_private(label.upper(), f"{label} (research model, not clinically validated)")))
    seg_uid = str(seg.SOPInstanceUID)
    group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(src.series_uid, model_version, content_digest, "SR", "lesion"), identifier="lesion 1"),
        referenced_segment=hd.sr.ReferencedSegment(
            sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=seg_uid, segment_number=1,
            source_series=hd.sr.SourceSeriesForSegmentation(src.series_uid)),
        finding_type=codes.SCT.Lesion, algorithm_id=algo, measurements=measurements,
        qualitative_evaluations=evaluations or None)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid("device", "recnec"), name="recnec", model_name=model_version[:64]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_code(("241615005", "SCT", "Magnetic resonance imaging of head")),
        imaging_measurements=[group])
    report[0].ContentSequence.append(hd.sr.TextContentItem(
        name=codes.DCM.Comment, value=DISCLAIMER, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    sr = hd.sr.Comprehensive3DSR(
        evidence=[seg, *sources], content=report[0],
        series_instance_uid=derived_uid(src.series_uid, model_version, content_digest, "SR", "series"),
        series_number=SERIES_NUMBER["SR"],
        sop_instance_uid=derived_uid(src.series_uid, model_version, content_digest, "SR"),
        instance_number=1, manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False,
        series_description=SERIES_DESCRIPTION["SR"])
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
    return sr


def _private_scheme() -> Any:
    """The SOP Common module's declaration of :data:`PRIVATE_SCHEME` (PS3.3 C.12.1.1.2)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "recnec local concepts"
    item.CodingSchemeResponsibleOrganization = "recnec project"
    return item


def build_sc(png: Path, reference: Any, *, series_uid: str, model_version: str, content_digest: str) -> Any:
    """The QC picture ``png`` (RGB) as a Secondary Capture in ``reference``'s study."""
    import highdicom as hd
    from PIL import Image

    with Image.open(png) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference, pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "P"),
        series_instance_uid=derived_uid(series_uid, model_version, content_digest, "SC", "series"),
        series_number=SERIES_NUMBER["SC"],
        sop_instance_uid=derived_uid(series_uid, model_version, content_digest, "SC"),
        instance_number=1, manufacturer=MANUFACTURER)
    sc.SeriesDescription = SERIES_DESCRIPTION["SC"]
    sc.ImageComments = DISCLAIMER
    sc.BurnedInAnnotation = "YES"  # the picture's header line names the study UID, not the patient
    # an unpaired body part: with it, General Series' Laterality (Type 2C) is rightly absent
    sc.BodyPartExamined = "BRAIN"
    return sc


def content_digest(src: SourceLabels, row: Mapping[str, Any], model_version: str, png: Path | None) -> str:
    """What the objects are derived from: the labels, the row's result columns, the model version
    and whether there is a QC picture (not its bytes: the picture is drawn from the same result, and
    its PNG encoding is not promised to be byte-stable)."""
    h = hashlib.sha256()
    h.update(src.labels.tobytes())
    h.update(repr(src.labels.shape).encode())
    for key in ("lesion_volume_ml", "enhancing_volume_ml", "necrotic_volume_ml", "oedema_volume_ml",
                "p_recurrence", "ensemble_spread", "label", "flags"):
        h.update(f"{key}={row.get(key, '')}\0".encode())
    h.update(model_version.encode())
    h.update(b"SC" if png is not None and Path(png).is_file() else b"")
    return h.hexdigest()


def write_objects(out_dir: Path, src: SourceLabels, row: Mapping[str, Any], *, model_version: str,
                  software_version: str, png: Path | None,
                  previous: Mapping[str, str] | None = None) -> list[WrittenObject]:
    """Build the SEG, SR and (with ``png``) SC of one study and write them atomically as
    ``out_dir/<StudyInstanceUID>/{SEG,SR,SC}.dcm``.

    ``previous`` maps kind -> digest of what the state says was last written: an object whose
    digest and file are unchanged is not rewritten (it is still returned).

    Raises
    ------
    DicomExportError
        The source instances cannot carry a SEG (see :func:`read_sources`, :func:`build_seg`).
    """
    with warnings.catch_warnings():
        # highdicom warns about odd header values (a one-component PatientName ...), quoting them:
        # that would put patient data on stderr and in the log
        warnings.simplefilter("ignore")
        return _write_objects(out_dir, src, row, model_version=model_version, software_version=software_version,
                              png=png, previous=previous)


def _write_objects(out_dir: Path, src: SourceLabels, row: Mapping[str, Any], *, model_version: str,
                   software_version: str, png: Path | None, previous: Mapping[str, str] | None) -> list[WrittenObject]:
    import pydicom

    sources = read_sources(src.files)
    digest = content_digest(src, row, model_version, png)
    study_uid = str(sources[0].StudyInstanceUID)
    from ..naming import safe_component

    folder = Path(out_dir) / safe_component(study_uid)
    previous = dict(previous or {})
    seg = build_seg(sources, src, model_version=model_version, software_version=software_version,
                    content_digest=digest)
    objects = [("SEG", seg), ("SR", build_sr(seg, sources, row, src, model_version=model_version,
                                             content_digest=digest))]
    if png is not None and Path(png).is_file():
        objects.append(("SC", build_sc(Path(png), sources[0], series_uid=src.series_uid,
                                       model_version=model_version, content_digest=digest)))
    written = []
    for kind, ds in objects:
        path = folder / f"{kind}.dcm"
        if not (previous.get(kind) == digest and path.is_file()
                and str(pydicom.dcmread(str(path), stop_before_pixels=True).SOPInstanceUID) == str(ds.SOPInstanceUID)):
            from io import BytesIO

            buf = BytesIO()
            ds.save_as(buf, enforce_file_format=True)
            atomic_write_bytes(path, buf.getvalue())
        written.append(WrittenObject(kind=kind, sop_class_uid=str(ds.SOPClassUID),
                                     sop_instance_uid=str(ds.SOPInstanceUID), path=path, digest=digest))
    for kind in KINDS:  # an SC written before, now without a picture: remove, it would be stale
        if kind not in {k for k, _ in objects} and (folder / f"{kind}.dcm").is_file():
            (folder / f"{kind}.dcm").unlink()
    return written
