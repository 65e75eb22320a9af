"""DICOM MR Image Storage files for synthetic series: one file per slice, deterministic bytes.

Header values follow DICOM PS3.3 (MR Image module C.8.3.1, Image Plane C.7.6.2): positions and
orientations in LPS, ``PixelSpacing`` as (row spacing, column spacing), ``SpacingBetweenSlices``
from the grid step. Identifying attributes are synthetic and pseudonymous (PatientID
``SYNTH<nnnnnn>``); dates and times are derived from the seed, never from the clock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .acquisition import Acquisition
from .constants import STORE_GAIN, derived_uid, study_date, time_of_day
from .series import SeriesGrid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: fixed implementation identity so files do not change with the pydicom version
IMPLEMENTATION_UID = "2.25.195375412263893839163651129271218316731"
_LPS = np.diag([-1.0, -1.0, 1.0])


def _ds_str(v: float) -> str:
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.8e}"[:16]


def mr_dataset(pixels: np.ndarray, *, sop_uid: str, implementation: tuple[str, str] | None = None,
               **attributes: Any) -> Any:
    """One classic MR Image Storage instance (a single slice) as a ``pydicom.Dataset`` ready for
    ``ds.save_as(path, enforce_file_format=True)``: the one DICOM builder of recnec's synthetic
    series and of the test fixtures.

    ``pixels``: the stored values, shape ``(Rows, Columns)`` (row index = DICOM row, i.e. along the
    column direction of ImageOrientationPatient), written as they are (uint16 unless the caller
    says otherwise through ``attributes``). Sets the file meta (Explicit VR Little Endian;
    ``implementation`` = (ImplementationClassUID, ImplementationVersionName) when given, else
    pydicom's own), SOPClassUID / SOPInstanceUID, Modality MR and the Image Pixel module
    (MONOCHROME2, 16 bits allocated and stored, unsigned), then every keyword of ``attributes``
    (DICOM keywords, e.g. ``ImagePositionPatient`` in LPS mm; a value of ``None`` leaves the
    attribute out), which may override any of the above.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if implementation is not None:
        meta.ImplementationClassUID, meta.ImplementationVersionName = implementation
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MR_IMAGE_STORAGE
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "MR"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    for keyword, value in attributes.items():
        if value is not None:
            setattr(ds, keyword, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_series(folder: Path, img: np.ndarray, grid: SeriesGrid, acq: Acquisition, *, seed: int,
                 index: int, study_uid: str, series_uid: str, frame_uid: str,
                 time_point: int = 0, days: int = 0) -> int:
    """Write ``img`` (grid.shape, relative intensities) as ``folder/IM<nnnnn>.dcm`` files.

    Stored pixels are uint16 ``round(img * 1000 / RescaleSlope)``. Returns the number of files.
    ``time_point`` (0 = baseline) and ``days`` (after the baseline) date a follow-up study:
    Study/Series/Acquisition/ContentDate are the baseline date plus ``days``, and the
    AccessionNumber and StudyID gain ``F<time_point>`` / ``-<time_point>``; PatientID and
    PatientName stay those of the subject.
    """
    folder.mkdir(parents=True, exist_ok=True)
    aff = grid.affine
    row_dir = _LPS @ (aff[:3, 0] / np.linalg.norm(aff[:3, 0]))  # along array axis 0 (columns)
    col_dir = _LPS @ (aff[:3, 1] / np.linalg.norm(aff[:3, 1]))  # along array axis 1 (rows)
    d_i, d_j = float(np.linalg.norm(aff[:3, 0])), float(np.linalg.norm(aff[:3, 1]))
    step = float(np.linalg.norm(aff[:3, 2]))
    stored = np.clip(np.rint(img * STORE_GAIN / acq.rescale_slope), 0, 65535).astype(np.uint16)
    window = float(np.percentile(stored[::4, ::4, :], 99.5)) * acq.rescale_slope or 1000.0
    date = study_date(seed, index, days=days).strftime("%Y%m%d")
    follow_up = f"F{time_point}" if time_point else ""
    t0 = acq.series_time_s
    nk = grid.shape[2]
    normal = np.cross(row_dir, col_dir)
    for k in range(nk):
        pos = _LPS @ (aff[:3, :3] @ np.array([0.0, 0.0, k]) + aff[:3, 3])
        ds = mr_dataset(
            stored[:, :, k].T,  # (rows = axis 1, columns = axis 0)
            sop_uid=derived_uid(seed, index, "sop", series_uid, k),
            implementation=(IMPLEMENTATION_UID, "RECNEC_SYNTH_1"),
            SpecificCharacterSet="ISO_IR 100",
            ImageType=list(acq.image_type),
            StudyDate=date, SeriesDate=date, AcquisitionDate=date, ContentDate=date,
            StudyTime=time_of_day(t0 - 600 - (t0 % 600)),
            SeriesTime=time_of_day(t0), AcquisitionTime=time_of_day(t0),
            ContentTime=time_of_day(t0 + k * 0.5),
            AccessionNumber=f"SYN{seed:03d}{index:06d}{follow_up}",
            Manufacturer=acq.manufacturer,
            ManufacturerModelName=acq.model,
            InstitutionName="recnec synthetic",
            StudyDescription="synthetic brain MRI (recnec synth)",
            SeriesDescription=acq.series_description,
            ProtocolName=acq.protocol_name,
            PatientName=f"Synthetic^{seed:03d}-{index + 1:06d}",
            PatientID=f"SYNTH{seed:03d}{index + 1:06d}",
            PatientBirthDate="",
            PatientSex="O",
            ScanningSequence=list(acq.scanning_sequence),
            SequenceVariant=list(acq.sequence_variant),
            ScanOptions=list(acq.scan_options),
            MRAcquisitionType=acq.mode,
            SequenceName=acq.sequence_name,
            SliceThickness=_ds_str(acq.slice_thickness_mm),
            SpacingBetweenSlices=_ds_str(step),
            RepetitionTime=_ds_str(acq.tr_ms),
            EchoTime=_ds_str(acq.te_ms),
            InversionTime=None if acq.ti_ms is None else _ds_str(acq.ti_ms),
            NumberOfAverages="1",
            ImagingFrequency=_ds_str(42.577 * acq.field_t),
            MagneticFieldStrength=_ds_str(acq.field_t),
            EchoNumbers="1",
            EchoTrainLength=None if acq.echo_train_length is None else str(acq.echo_train_length),
            FlipAngle=_ds_str(acq.flip_deg),
            ContrastBolusAgent=acq.contrast_agent,
            PatientPosition="HFS",
            StudyInstanceUID=study_uid,
            SeriesInstanceUID=series_uid,
            StudyID=f"{index + 1}-{time_point}" if time_point else f"{index + 1}",
            SeriesNumber=str(acq.series_number),
            AcquisitionNumber="1",
            InstanceNumber=str(k + 1),
            ImagePositionPatient=[_ds_str(v) for v in pos],
            ImageOrientationPatient=[_ds_str(v) for v in (*row_dir, *col_dir)],
            FrameOfReferenceUID=frame_uid,
            PositionReferenceIndicator="",
            SliceLocation=_ds_str(float(pos @ normal)),
            PixelSpacing=[_ds_str(d_j), _ds_str(d_i)],
            RescaleIntercept="0",
            RescaleSlope=_ds_str(acq.rescale_slope),
            RescaleType="US",
            WindowCenter=_ds_str(window / 2.0),
            WindowWidth=_ds_str(window),
        )
        ds.save_as(folder / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return nk
