"""The start-up self-test of a scan: the chain's machinery on a tiny generated study, before the
first real one (``docs/failure-kinds.md`` kind 20)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import EnvironmentBroken
from .pipeline import Resources

log = logging.getLogger(__name__)


def self_test(resources: Resources) -> dict[str, float]:
    """Run the whole chain's machinery once on a tiny generated study before the first real one.

    Checks, in order: a 12-slice DICOM series written with pydicom (JPEG 2000 lossless when an
    encoder is installed, else uncompressed) is discovered and converted (pixel decoders,
    dicom2nifti); every loaded HD-BET network runs one forward pass on a 32^3 tensor; the ONNX ensemble (whose
    SHA-256 checksums were verified when it was loaded) predicts a finite probability in [0, 1].
    Returns the seconds per check.

    Raises
    ------
    EnvironmentBroken
        ``ENVIRONMENT_BROKEN`` naming the failed check: the run stops once with exit code 2
        instead of every study failing the same way (``docs/failure-kinds.md`` kind 20).
    """
    import tempfile

    import numpy as np

    from ..stages.convert import convert_series
    from ..stages.discover import discover

    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="recnec-selftest-") as tmp:
            compressed = _write_selftest_dicom(Path(tmp))
            found = discover(Path(tmp))
            vol = convert_series(found[0].series[0], settings=resources.settings)
            if tuple(np.shape(vol.data)) != (32, 32, 12) or float(np.max(vol.data)) <= 0:
                raise RuntimeError(f"converted shape {np.shape(vol.data)}")
        log.debug("self-test: DICOM %s series converted", "JPEG 2000" if compressed else "uncompressed")
    except EnvironmentBroken:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here means a broken installation
        raise EnvironmentBroken(f"self-test failed: DICOM decode/convert ({type(exc).__name__}: {exc})") from None
    secs["dicom"] = time.perf_counter() - t0
    if resources.hdbet is not None:
        t0 = time.perf_counter()
        try:
            resources.hdbet.check_networks()
        except Exception as exc:  # noqa: BLE001
            raise EnvironmentBroken(f"self-test failed: HD-BET ({type(exc).__name__}: {exc})") from None
        secs["hdbet"] = time.perf_counter() - t0
    if resources.ensemble is not None:
        t0 = time.perf_counter()
        try:
            pred = resources.ensemble.predict(np.zeros((1, *resources.spec.shape), dtype=np.float32))
            p = float(pred.mean[0])
            if not (0.0 <= p <= 1.0):
                raise RuntimeError(f"probability {p}")
        except Exception as exc:  # noqa: BLE001
            raise EnvironmentBroken(f"self-test failed: ONNX ensemble ({type(exc).__name__}: {exc})") from None
        secs["ensemble"] = time.perf_counter() - t0
    log.info("self-test passed (%s)", ", ".join(f"{k} {v:.1f} s" for k, v in secs.items()))
    return secs


def _write_selftest_dicom(folder: Path) -> bool:
    """A 32 x 32 x 12 MR series (axial, 1 x 1 x 2 mm) in ``folder``; True when JPEG 2000 encoded
    (openjpeg refuses images smaller than 32 x 32)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, MRImageStorage, generate_uid

    study, series = generate_uid(), generate_uid()
    compressed = True
    for k in range(12):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID = "MR", "SELFTEST"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = study, series, 1, k + 1
        ds.SeriesDescription = "T1 selftest"
        ds.ImagePositionPatient = [0.0, 0.0, 2.0 * k]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
        ds.Rows = ds.Columns = 32
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        arr = (np.arange(1024, dtype=np.uint16).reshape(32, 32) + 10 * k + 1)
        ds.PixelData = arr.tobytes()
        if compressed:
            try:
                ds.compress(JPEG2000Lossless, arr, encoding_plugin="pylibjpeg")
            except Exception:  # noqa: BLE001 - no encoder installed: test the uncompressed path
                compressed = False
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.PixelData = arr.tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)
    return compressed
