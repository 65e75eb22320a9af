"""The nouns of recnec: series roles, series, studies and role decisions.

All classes are frozen dataclasses so that stages stay pure functions of their inputs and results
can be cached, pickled to worker processes or shipped to a Dask cluster later.

Geometry conventions used across recnec (see also :mod:`recnec_cli.types`):

* volumes are ``numpy`` arrays indexed ``[i, j, k]`` on a canonical **RAS+** grid (nibabel's
  ``as_closest_canonical``): ``i`` increases towards the patient's Right, ``j`` Anterior,
  ``k`` Superior;
* affines are 4x4 voxel-index -> world (mm, RAS+) matrices, as in NIfTI;
* DICOM itself is LPS; conversion to RAS happens once, in :mod:`recnec_cli.stages.convert`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping


class SeriesRole(str, enum.Enum):
    """What a series is. Only ``T1``, ``T2`` and ``T1CE`` are used by the model.

    The other members are the non-roles the classifier must recognise so that it never offers
    them as candidates (``docs/failure-kinds.md`` kinds 6, 7, 13, 15, 16, 17).
    """

    T1 = "T1"
    T2 = "T2"
    T1CE = "T1ce"
    FLAIR = "FLAIR"
    PD = "PD"
    DWI = "DWI"  # diffusion weighted, trace, ADC, FA, EPI fMRI
    SWI = "SWI"  # susceptibility weighted, T2* GRE
    PERFUSION = "PERFUSION"  # DSC / DCE / ASL, usually 4D
    LOCALIZER = "LOCALIZER"
    DERIVED = "DERIVED"  # MPR, MIP, SUB, MOCO, secondary capture
    NON_MR = "NON_MR"  # CT, PET, SR, PR ...
    UNDETERMINED = "UNDETERMINED"

    @classmethod
    def model_roles(cls) -> tuple["SeriesRole", ...]:
        """The three roles the model needs, in channel order (T1, T2, T1ce)."""
        return (cls.T1, cls.T2, cls.T1CE)

    @classmethod
    def optional_roles(cls) -> tuple["SeriesRole", ...]:
        """Roles used when the study has them and never required: FLAIR (lesion segmentation and
        the QC picture; the model input stays T1, T2, T1ce as in the paper)."""
        return (cls.FLAIR,)


@dataclass(frozen=True)
class SeriesHeader:
    """Header facts used to classify one series; ``None`` where the header is silent.

    Times are in ms (DICOM PS3.3 C.8.3.1: RepetitionTime, EchoTime, InversionTime), flip angle in
    degrees, b-value in s/mm^2, acquisition time as seconds after midnight.
    """

    modality: str | None = None
    sop_class_uid: str | None = None
    series_description: str | None = None
    protocol_name: str | None = None
    sequence_name: str | None = None
    image_type: tuple[str, ...] = ()
    scanning_sequence: tuple[str, ...] = ()
    sequence_variant: tuple[str, ...] = ()
    scan_options: tuple[str, ...] = ()
    mr_acquisition_type: str | None = None  # "2D" | "3D"
    repetition_time_ms: float | None = None
    echo_time_ms: float | None = None
    inversion_time_ms: float | None = None
    flip_angle_deg: float | None = None
    echo_train_length: int | None = None
    diffusion_b_value: float | None = None
    contrast_bolus_agent: str | None = None
    contrast_bolus_ingredient: str | None = None
    contrast_bolus_volume_ml: float | None = None
    series_number: int | None = None
    acquisition_time_s: float | None = None
    manufacturer: str | None = None
    n_slices: int = 0  # images/frames of this (split) series
    n_temporal: int = 1  # >1 for 4D (perfusion, fMRI, DWI directions)
    rows: int | None = None
    columns: int | None = None
    pixel_spacing_mm: tuple[float, float] | None = None
    slice_spacing_mm: float | None = None  # from positions, not SliceThickness
    extra: Mapping[str, str] = field(default_factory=dict)  # anything else worth a reason


@dataclass(frozen=True)
class Series:
    """One 3D (or 4D) image series as discovery found it.

    ``series_id`` is the SeriesInstanceUID for DICOM (with a suffix such as ``#echo=2`` when
    discovery split one UID into several volumes), or the file path relative to the scan root for
    NIfTI and NRRD. ``files`` holds the DICOM instances of this (split) series, sorted, or the
    single image file.
    """

    series_id: str
    source: str  # "dicom" | "nifti" | "nrrd"
    files: tuple[Path, ...]
    header: SeriesHeader
    sidecar: Path | None = None  # BIDS JSON sidecar, if any
    # 0-based frame indices inside the single Enhanced (multi-frame) DICOM file of ``files``,
    # in slice order; empty for classic one-image-per-file DICOM, NIfTI and NRRD.
    frames: tuple[int, ...] = ()


@dataclass(frozen=True)
class Study:
    """One imaging study: the unit that gets one report row.

    ``study_id`` is the StudyInstanceUID for DICOM, or the study folder's path relative to the scan
    root for NIfTI/NRRD folders. ``patient_pseudonym`` is a pseudonym of the
    PatientID, with IssuerOfPatientID when the header has one (the same PatientID text from two
    issuers is two patients), or of a NIfTI / NRRD folder's BIDS ``sub-`` label (never the raw ID
    or name), empty when unknown: in ``recnec scan`` the keyed
    HMAC-SHA256 of :mod:`recnec_cli.pseudonym`; where discovery runs without a key (inspect,
    train), an unkeyed hash prefix that is never written to a report.
    """

    study_id: str
    patient_pseudonym: str
    source: str  # "dicom" | "nifti" | "nrrd"
    location: str  # folder(s) relative to the scan root, for people to find the data
    series: tuple[Series, ...]
    lesion_mask: Path | None = None  # user-supplied lesion mask, if any
    skipped_files: int = 0  # non-image files ignored during discovery (counted, not logged)
    issues: tuple[str, ...] = ()  # discovery-level warnings (duplicates dropped, scouts removed ...)
    #: when the study was acquired, ISO 8601 (``YYYY-MM-DD[Thh:mm:ss]``; DICOM StudyDate/StudyTime,
    #: NIfTI sidecar AcquisitionDateTime / AcquisitionDate); empty when unknown. Kept in the state
    #: for the patient's timeline (:mod:`recnec_cli.timeline`), never written to a report or log.
    acquired: str = ""
    #: the BIDS ``ses-`` label of a NIfTI / NRRD study folder (empty when none)
    session: str = ""


@dataclass(frozen=True)
class RoleDecision:
    """The classifier's answer for one series."""

    series_id: str
    role: SeriesRole
    confidence: float  # 0..1
    reasons: tuple[str, ...]
    competing: tuple[tuple[SeriesRole, float], ...] = ()  # other roles considered, with scores


@dataclass(frozen=True)
class RoleAssignment:
    """Which series a study uses for T1, T2 and T1ce, and why.

    ``chosen`` maps each model role to its series when a confident choice exists. ``status`` is
    ``None`` when all three roles were chosen, otherwise a stable code such as ``MISSING_ROLE``
    or ``T1CE_UNDETERMINED`` with ``message`` explaining it.
    """

    decisions: tuple[RoleDecision, ...]
    chosen: Mapping[SeriesRole, Series]
    status: str | None = None
    message: str = ""


@dataclass(frozen=True, eq=False)
class Volume:
    """One converted 3D volume on a canonical RAS+ grid.

    ``data`` is float32 of shape ``(X, Y, Z)`` (axes towards Right, Anterior, Superior), ``affine``
    the ``(4, 4)`` voxel -> world (mm, RAS+) matrix. ``flags`` holds non-fatal findings such as
    ``ANISOTROPIC`` or ``GANTRY_TILT_RESAMPLED``; ``notes`` free-text details for the log.
    """

    data: "object"  # numpy.ndarray float32 (X, Y, Z); typed loosely to keep this module numpy-free
    affine: "object"  # numpy.ndarray float64 (4, 4)
    series_id: str = ""
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along the array axes ``(X, Y, Z)`` in mm (``nibabel.affines.voxel_sizes``)."""
        from nibabel.affines import voxel_sizes

        return tuple(float(v) for v in voxel_sizes(self.affine))  # type: ignore[return-value]


@dataclass(eq=False)
class StudyImages:
    """Per-study memo shared by the stages of one study: each series is converted at most once and
    each volume skull-stripped at most once, whichever stage asks first (classification's image
    evidence converts and skull-strips header-silent T1 series; conversion and skull stripping
    then reuse them).

    ``volumes``: series_id -> converted :class:`Volume`; ``brain_masks``: series_id -> bool
    ``(X, Y, Z)`` HD-BET mask on that volume's grid; ``seconds``: ``{"convert": s,
    "skullstrip": s}`` spent here, so the pipeline can book it to those stages.
    """

    volumes: dict = field(default_factory=dict)
    brain_masks: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)

    def volume(self, series: Series, convert) -> Volume:
        """The series converted by ``convert`` (called only the first time)."""
        import time

        if series.series_id not in self.volumes:
            t0 = time.perf_counter()
            try:
                self.volumes[series.series_id] = convert(series)
            finally:
                self.seconds["convert"] = self.seconds.get("convert", 0.0) + time.perf_counter() - t0
        return self.volumes[series.series_id]

    def brain_mask(self, series_id: str, volume: Volume, hdbet) -> "object":
        """``hdbet.brain_mask(volume)`` for this series (run only the first time)."""
        import time

        if series_id not in self.brain_masks:
            t0 = time.perf_counter()
            try:
                self.brain_masks[series_id] = hdbet.brain_mask(volume)
            finally:
                self.seconds["skullstrip"] = self.seconds.get("skullstrip", 0.0) + time.perf_counter() - t0
        return self.brain_masks[series_id]
