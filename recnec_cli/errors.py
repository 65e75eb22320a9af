"""One exception root for recnec; each stage has a subclass and every failure a stable code.

The code lands in the report's ``error_code`` column, so it must never change meaning once
released. Library code raises these; the CLI catches :class:`RecnecError` at one boundary.
"""

from __future__ import annotations


class RecnecError(Exception):
    """Root of every error recnec raises on purpose.

    Parameters
    ----------
    code:
        Stable upper-case code written to the report (e.g. ``MISSING_SLICES``).
    message:
        Human-readable explanation. Must not contain PHI (patient names, IDs, dates).
    """

    stage = "recnec"
    default_code = "RECNEC_ERROR"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code or self.default_code
        self.message = message

    def __str__(self) -> str:  # pragma: no cover - trivial
        return f"{self.code}: {self.message}"


class UsageError(RecnecError):
    """Bad command-line usage or settings (exit code 2)."""

    stage = "usage"
    default_code = "USAGE_ERROR"


class EnvironmentBroken(RecnecError):
    """The installation cannot run any study (missing weights, broken decoder): exit code 2."""

    stage = "environment"
    default_code = "ENVIRONMENT_BROKEN"


class DiscoveryError(RecnecError):
    """The scan tree could not be indexed.

    Codes: ``INPUT_NOT_FOUND`` (the path does not exist); ``NO_IMAGE_FOUND`` (no image at all:
    the tree holds NIfTI / NRRD files but none is a series, only masks, labels or unreadable
    headers; also a study issue for a NIfTI / NRRD folder whose images are all unreadable);
    ``NO_IMAGE_DICOM_FOUND`` (DICOM only: no image DICOM among the files, e.g. a DICOMDIR, SR or
    presentation states; also a study issue for a DICOM study without an image series).
    """

    stage = "discover"
    default_code = "DISCOVERY_FAILED"


class ClassificationError(RecnecError):
    """No confident series for a role (``MISSING_ROLE: T2``, ``T1CE_UNDETERMINED``, ...)."""

    stage = "classify"
    default_code = "ROLE_UNDETERMINED"


class ConversionError(RecnecError):
    """A series could not become a 3D volume (``MISSING_SLICES``, ``GANTRY_TILT``, ``NOT_3D``, ...)."""

    stage = "convert"
    default_code = "CONVERSION_FAILED"


class RegistrationError(RecnecError):
    """Rigid co-registration failed or failed its post-check (``REGISTRATION_FAILED``)."""

    stage = "register"
    default_code = "REGISTRATION_FAILED"


class SkullStripError(RecnecError):
    """HD-BET failed or produced an implausible brain mask (``SKULLSTRIP_FAILED``)."""

    stage = "skullstrip"
    default_code = "SKULLSTRIP_FAILED"


class LesionError(RecnecError):
    """No lesion to classify (``NO_ENHANCING_LESION``) or an unusable user mask."""

    stage = "lesion"
    default_code = "NO_ENHANCING_LESION"


class InferenceError(RecnecError):
    """ONNX Runtime failed, or the weights do not match their manifest."""

    stage = "infer"
    default_code = "INFERENCE_FAILED"


class TrainingError(RecnecError):
    """``recnec train`` / ``evaluate`` could not run (bad labels, too few cases per class...)."""

    stage = "train"
    default_code = "TRAINING_FAILED"
