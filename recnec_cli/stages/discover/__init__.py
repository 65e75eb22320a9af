"""Walk a scan tree once, read headers only, and group what it finds into studies and series.

DICOM instances are indexed by PatientID / StudyInstanceUID / SeriesInstanceUID whatever the
folder layout (``docs/failure-kinds.md`` kind 8). One SeriesInstanceUID that holds more than one
volume is split (kind 7: echo, ImageType, orientation, matrix); scouts hidden inside a series are
removed (kind 6); exact duplicate instances are dropped and counted (kind 3); junk files are
skipped quietly and counted (kind 9). Enhanced (multi-frame) DICOM is indexed per frame from its
functional groups (DICOM PS3.3 C.7.6.16, C.8.13.5), so a file with two stacks becomes two series.

NIfTI (``.nii``, ``.nii.gz``) and NRRD (``.nrrd``) files are grouped one folder = one study; the
role comes later from the file name and an optional BIDS JSON sidecar (see :mod:`classify`).

No pixel data is read here; the only numbers computed are geometric (slice positions projected on
the slice normal, in mm, DICOM LPS patient coordinates, PS3.3 C.7.6.2.1.1).

Modules:

* :mod:`.walk`: :func:`discover`, the one pass over the tree, and the grouping into studies;
* :mod:`.dicom_units`: one classic instance or Enhanced frame -> :class:`ImageUnit`
  (:func:`units_from_dataset`, also used by conversion);
* :mod:`.dicom_series`: one SeriesInstanceUID -> cleaned, split volumes and their headers;
* :mod:`.files`: NIfTI / NRRD folders;
* :mod:`.values`: header values as Python types.

Names with a leading underscore are private to their module; what these modules share with each
other is public and documented (no module imports another's `_names`).
"""

from __future__ import annotations

from .dicom_units import ENHANCED_SOP_CLASSES, IMAGE_SOP_CLASSES, ImageUnit, slice_positions_mm, units_from_dataset
from .files import LESION_MASK_RE, NIFTI_SUFFIXES, NON_SERIES_RE, NRRD_SUFFIXES, SIDECAR_SUFFIX, read_nifti_header
from .walk import JUNK_NAMES, JUNK_SUFFIXES, discover, pseudonym

__all__ = ["ENHANCED_SOP_CLASSES", "IMAGE_SOP_CLASSES", "ImageUnit", "JUNK_NAMES",
           "JUNK_SUFFIXES", "LESION_MASK_RE", "NIFTI_SUFFIXES", "NON_SERIES_RE", "NRRD_SUFFIXES",
           "SIDECAR_SUFFIX", "discover", "pseudonym", "read_nifti_header", "slice_positions_mm",
           "units_from_dataset"]
