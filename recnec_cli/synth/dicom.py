"""DICOM MR Image Storage files for synthetic series: one file per slice, deterministic bytes.

Header values follow DICOM PS3.3 (MR Image module C.8.3.1, Image Plane C.7.6.2): positions and
orientations in LPS, ``PixelSpacing`` as (row spacing, column spacing), ``SpacingBetweenSlices``
from the grid step. Identifying attributes are synthetic and pseudonymous (PatientID
``SYNTH<nnnnnn>``); dates and times are derived from the seed, never from the clock.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .acquisition import Acquisition
from .series import SeriesGrid

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
#: fixed implementation identity so files do not change with the pydicom version
IMPLEMENTATION_UID = "2.25.195375412263893839163651129271218316731"
_LPS = np.diag([-1.0, -1.0, 1.0])


def _ds_str(v: float) -> str:
    s = f"{v:.6g}"
    return s if len(s) <= 16 else f"{v:.8e}"[:16]


def _study_date(seed: int, index: int) -> str:
    import datetime as _dt

    day = _dt.date(2019, 1, 1) + _dt.timedelta(days=(seed * 7919 + index * 37) % 1800)
    return day.strftime("%Y%m%d")


def write_series(folder: Path, img: np.ndarray, grid: SeriesGrid, acq: Acquisition, *, seed: int,
                 index: int, study_uid: str, series_uid: str, frame_uid: str) -> int:
    """Write ``img`` (grid.shape, relative intensities) as ``folder/IM<nnnnn>.dcm`` files.

    Stored pixels are uint16 ``round(img * 1000 / RescaleSlope)``. Returns the number of files.
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    from .writers import STORE_GAIN, derived_uid

    folder.mkdir(parents=True, exist_ok=True)
    aff = grid.affine
    row_dir = _LPS @ (aff[:3, 0] / np.linalg.norm(aff[:3, 0]))  # along array axis 0 (columns)
    col_dir = _LPS @ (aff[:3, 1] / np.linalg.norm(aff[:3, 1]))  # along array axis 1 (rows)
    d_i, d_j = float(np.linalg.norm(aff[:3, 0])), float(np.linalg.norm(aff[:3, 1]))
    step = float(np.linalg.norm(aff[:3, 2]))
    stored = np.clip(np.rint(img * STORE_GAIN / acq.rescale_slope), 0, 65535).astype(np.uint16)
    window = float(np.percentile(stored[::4, ::4, :], 99.5)) * acq.rescale_slope or 1000.0
    date = _study_date(seed, index)
    t0 = acq.series_time_s
    ni, nj, nk = grid.shape
    for k in range(nk):
        sop_uid = derived_uid(seed, index, "sop", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = IMPLEMENTATION_UID
        meta.ImplementationVersionName = "RECNEC_SYNTH_1"
        ds = FileDataset(str(folder / f"IM{k + 1:05d}.dcm"), {}, file_meta=meta,
                         preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(acq.image_type)
        ds.SOPClassUID = MR_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        hms = _hms(t0)
        ds.StudyTime = _hms(t0 - 600 - (t0 % 600))
        ds.SeriesTime = ds.AcquisitionTime = hms
        ds.ContentTime = _hms(t0 + k * 0.5)
        ds.AccessionNumber = f"SYN{seed:03d}{index:06d}"
        ds.Modality = "MR"
        ds.Manufacturer = acq.manufacturer
        ds.ManufacturerModelName = acq.model
        ds.InstitutionName = "recnec synthetic"
        ds.StudyDescription = "synthetic brain MRI (recnec synth)"
        ds.SeriesDescription = acq.series_description
        ds.ProtocolName = acq.protocol_name
        ds.PatientName = f"Synthetic^{seed:03d}-{index + 1:06d}"
        ds.PatientID = f"SYNTH{seed:03d}{index + 1:06d}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.ScanningSequence = list(acq.scanning_sequence)
        ds.SequenceVariant = list(acq.sequence_variant)
        ds.ScanOptions = list(acq.scan_options)
        ds.MRAcquisitionType = acq.mode
        ds.SequenceName = acq.sequence_name
        ds.SliceThickness = _ds_str(acq.slice_thickness_mm)
        ds.SpacingBetweenSlices = _ds_str(step)
        ds.RepetitionTime = _ds_str(acq.tr_ms)
        ds.EchoTime = _ds_str(acq.te_ms)
        if acq.ti_ms is not None:
            ds.InversionTime = _ds_str(acq.ti_ms)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = _ds_str(42.577 * acq.field_t)
        ds.MagneticFieldStrength = _ds_str(acq.field_t)
        ds.EchoNumbers = "1"
        if acq.echo_train_length is not None:
            ds.EchoTrainLength = str(acq.echo_train_length)
        ds.FlipAngle = _ds_str(acq.flip_deg)
        if acq.contrast_agent is not None:
            ds.ContrastBolusAgent = acq.contrast_agent
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = f"{index + 1}"
        ds.SeriesNumber = str(acq.series_number)
        ds.AcquisitionNumber = "1"
        ds.InstanceNumber = str(k + 1)
        pos = _LPS @ (aff[:3, :3] @ np.array([0.0, 0.0, k]) + aff[:3, 3])
        ds.ImagePositionPatient = [_ds_str(v) for v in pos]
        ds.ImageOrientationPatient = [_ds_str(v) for v in (*row_dir, *col_dir)]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        normal = np.cross(row_dir, col_dir)
        ds.SliceLocation = _ds_str(float(pos @ normal))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = nj
        ds.Columns = ni
        ds.PixelSpacing = [_ds_str(d_j), _ds_str(d_i)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = _ds_str(acq.rescale_slope)
        ds.RescaleType = "US"
        sl = stored[:, :, k].T  # (rows = axis 1, columns = axis 0)
        ds.WindowCenter = _ds_str(window / 2.0)
        ds.WindowWidth = _ds_str(window)
        ds.PixelData = np.ascontiguousarray(sl).tobytes()
        ds.save_as(folder / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return nk


def _hms(seconds: float) -> str:
    s = int(seconds) % 86400
    frac = int(round((seconds - int(seconds)) * 1e6))
    return f"{s // 3600:02d}{(s // 60) % 60:02d}{s % 60:02d}.{frac:06d}"
