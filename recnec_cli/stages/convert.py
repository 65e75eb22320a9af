"""One series -> one validated 3D volume on a canonical RAS+ grid.

DICOM: recnec checks the stack, dicom2nifti assembles it, nibabel canonicalises it.

1. Checks (recnec, before and independent of any converter; ``docs/failure-kinds.md`` kinds 1-5,
   10, 11, 13, 14, 20), on the images discovery put in one (possibly split) series:

   * slice positions are ImagePositionPatient projected on the normal of ImageOrientationPatient
     (DICOM PS3.3 C.7.6.2.1.1); spacing comes from these positions, never from SliceThickness;
   * a missing slice (a step > 1.5x the median step) fails ``MISSING_SLICES`` naming the gap;
   * a stack whose slice step is not along the normal (gantry tilt / shear, angle > 0.5 deg)
     fails ``GANTRY_TILT`` with the angle;
   * repeated positions fail ``AMBIGUOUS_STACK`` (or ``NOT_3D`` when time/b-value tags vary).

2. Assembly by dicom2nifti, on the datasets sorted by position along the normal:

   * classic one-image-per-file series (every real case but the Enhanced one):
     ``dicom2nifti.common.get_volume_pixeldata`` (decodes each slice through pydicom and its
     pylibjpeg/openjpeg decoders and applies that slice's own Modality LUT, RescaleSlope /
     RescaleIntercept PS3.3 C.11.1.1.2) and ``dicom2nifti.common.create_affine`` (voxel ->
     RAS mm from the first and last ImagePositionPatient);
   * an Enhanced multi-frame file whose series is the whole file, one stack stored in slice order
     (the real Siemens XA30 T1): ``common.multiframe_to_block`` and
     ``common.multiframe_create_affine``.

   These are the functions dicom2nifti's own entry points end in for a 3D anatomical stack. The
   entry points themselves (``convert_dicom.dicom_array_to_nifti``,
   ``convert_generic.dicom_to_nifti``) are not called: before assembling they group the images
   by InstanceNumber order and call the series 4D when positions do not rise with it (a valid
   20-slice stack with interleaved InstanceNumbers comes back as 10 x 2 volumes; without
   InstanceNumber they raise AttributeError), and they drop localizers/duplicates silently,
   all of which discovery already decided with reasons. Calling the assembly functions needs no
   ``dicom2nifti.settings`` change (those are process-wide globals), writes no file and no
   temporary directory.

   Enhanced files dicom2nifti cannot take keep recnec's own assembly (:func:`_own_stack`): a
   frame subset (two stacks, echoes or orientations in one file, as discovery splits them), or
   frames not stored in slice order (docs/failure-kinds.md kind 4: shuffled per-frame positions). dicom2nifti
   only converts whole files, places frames by InStackPositionNumber but takes the slice step
   from the first and last frame in file order, and applies only per-frame (not shared)
   PixelValueTransformation; on such files it fails SLICE_INCREMENT_INCONSISTENT /
   IMAGE_ORIENTATION_INCONSISTENT, or with its validation off returns a wrong affine. When
   dicom2nifti raises on a file it was given although its pixels decode (functional groups it
   does not expect), the own assembly takes over too. Which assembly ran is in ``notes``.

   Either way the block must have the header's shape and its affine must agree with the checked
   geometry within ``AFFINE_TOL_MM``. Scaling: Modality LUT per slice/frame (``PER_SLICE_SCALING``
   when it differs), as before; the Philips private scale slope (2005,100E) is recorded in
   ``notes`` but not applied (neither dicom2nifti's anatomical path nor dcm2niix's default apply
   it): recnec normalises intensities inside the brain, so a global scale does not matter, while
   per-slice differences do.

   Padding (issue 23): stored values equal to PixelPaddingValue (0028,0120), or between it and
   PixelPaddingRangeLimit (0028,0121), are compared before rescale (PS3.3 C.7.5.1.1.2) and set
   to the background, flag ``PADDING_AS_BACKGROUND`` when that moved them by more than one
   stored step (a padding value of 0 beside a background of 0 or 1 is no news).

3. The float64/integer block is cast to float32 and reordered with
   ``nibabel.as_closest_canonical``; the affine stays exact (no resampling).

4. Values are never silently wrong (issue 23, every source): up to 1 % NaN / Inf voxels are set
   to the background (``NONFINITE_VOXELS_REPLACED``), more fail ``NONFINITE_VOXELS``; an
   undeclared fill value (array minimum <= -30000 on > 5 % of the voxels, e.g. int16 -32768
   around the head) is background too (``PADDING_AS_BACKGROUND``). The background is the minimum
   of the image's other voxels, after rescale. These flags log a WARNING.

NIfTI is read with nibabel (``scl_slope``/``scl_inter`` applied, trailing singleton dimensions
squeezed; NaN / infinite scaling factors fail ``BAD_SCALING`` instead of being dropped or called
an unreadable header, :func:`_scaling_problem`). Its geometry is nibabel's, the NIfTI-1 rule: the sform when
``sform_code`` > 0, else the qform. ITK (SimpleITK) has historically preferred the qform, so the
two libraries place a file whose transforms disagree differently; recnec never reads a NIfTI
with SimpleITK (registration gets arrays and affines, :func:`register.to_sitk`), and a file whose
qform and sform disagree (an axis flipped, or > 1 mm anywhere in the field of view) is flagged
``QFORM_SFORM_DISAGREE`` with a WARNING, never mirrored silently. NRRD is read with SimpleITK
(its LPS geometry converted once, :func:`register.from_sitk`);
:func:`read_image_file` reads a single file (a user mask) the same way. No temporary files are
written and input files are only ever opened for reading. dicom2nifti is imported only when a DICOM series is
converted (0.4 s; importing it also extends pydicom's character-set table, its
``patch_pydicom_encodings``).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Settings
from ..errors import ConversionError
from ..study import Series, Volume

log = logging.getLogger(__name__)

# A brain volume needs at least this many slices: 10 slices of 6.5 mm (the thickest clinical
# protocol in our real cases) cover 65 mm, already less than a brain; vendor "stub" series of 4-8
# images and three-plane scouts fall below it (docs/failure-kinds.md kinds 6, 20).
MIN_SLICES = 10
# Tolerances (mm, degrees) for stack geometry; same order as dcm2niix's checks.
GAP_FACTOR = 1.5  # a step larger than 1.5 x median step means at least one slice is missing
NONUNIFORM_TOL = 0.1  # steps differing by more than 10 % from the median: ambiguous stack
TILT_TOL_DEG = 0.5  # angle between slice step and slice normal regarded as gantry tilt / shear
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# dicom2nifti's affine must agree with the geometry our checks accepted (mm, any element)
AFFINE_TOL_MM = 1e-3
# Non-finite voxels (NaN, +-Inf; issue 23): up to this fraction of the volume they are set to the
# background (NONFINITE_VOXELS_REPLACED), above it the series fails NONFINITE_VOXELS.
NONFINITE_MAX_FRACTION = 0.01
# Undeclared padding (issue 23): a stored value equal to the signed integer type's minimum
# (int16 -32768) is a fill value wherever it occurs (checked before scaling, NIfTI and DICOM);
# besides, an array minimum at or below this value (e.g. a float fill value) that covers more
# than PADDING_MIN_FRACTION of the voxels is background, not tissue (PADDING_AS_BACKGROUND).
PADDING_FLOOR = -30000.0
PADDING_MIN_FRACTION = 0.05
# NIfTI qform and sform (both codes > 0) disagreeing by more than this at a corner of the field
# of view, or by an axis direction, are flagged QFORM_SFORM_DISAGREE (mm).
QFORM_SFORM_TOL_MM = 1.0
#: Volume flags that also log a WARNING when set (the note that explains them starts with the flag).
WARNING_FLAGS = ("NONFINITE_VOXELS_REPLACED", "PADDING_AS_BACKGROUND", "QFORM_SFORM_DISAGREE")


def _err(code: str, message: str) -> ConversionError:
    return ConversionError(f"{code}: {message}", code=code)


# --------------------------------------------------------------------------------------------
# header-level checks (before any pixel is read)
# --------------------------------------------------------------------------------------------
def precheck(series: Series, *, settings: Settings) -> None:
    """Fail early from header facts, before any pixel is read. Cheap; :func:`convert_series`
    calls it first.

    Raises
    ------
    ConversionError
        ``NOT_3D``, ``AMBIGUOUS_STACK``, ``TOO_FEW_SLICES``, ``SERIES_TOO_LARGE`` or
        ``MISSING_GEOMETRY``.
    """
    h = series.header
    if series.source == "dicom" and h.extra.get("missing_geometry"):
        raise _err("MISSING_GEOMETRY", f"{h.extra['missing_geometry']} image(s) without "
                   "ImagePositionPatient/ImageOrientationPatient (PS3.3 C.7.6.2)")
    if h.n_temporal > 1 or h.extra.get("stack") == "4D":
        raise _err("NOT_3D", f"series has {h.n_temporal} volumes over time/diffusion "
                             f"({h.n_slices} slices each); a 4D series is never a model input")
    if h.extra.get("stack") == "repeated positions":
        raise _err("AMBIGUOUS_STACK", f"{h.n_slices} slice positions occur more than once with "
                   "nothing to tell the images apart (no echo/time/acquisition difference)")
    if h.extra.get("mosaic"):
        raise _err("NOT_3D", "Siemens MOSAIC image (EPI/fMRI/DWI), not a 3D anatomical volume")
    if series.source == "dicom":
        if h.n_slices < MIN_SLICES:
            raise _err("TOO_FEW_SLICES", f"{h.n_slices} slice(s); at least {MIN_SLICES} needed "
                       "for a brain volume")
        n_vox = (h.rows or 0) * (h.columns or 0) * max(h.n_slices, 1) * max(h.n_temporal, 1)
        if n_vox > settings.max_series_voxels:
            raise _err("SERIES_TOO_LARGE", f"{h.rows}x{h.columns}x{h.n_slices} = {n_vox} voxels "
                       f"> max_series_voxels {settings.max_series_voxels}")


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
def dicom_label(ds: Any = None, index: int | None = None) -> str:
    """How a DICOM file is named in messages: by InstanceNumber and the end of its SOPInstanceUID,
    or its position in the series, never by its path (export file names often carry the patient's
    name; the path is logged at DEBUG only)."""
    if ds is not None:
        num = ds.get("InstanceNumber")
        uid = str(ds.get("SOPInstanceUID", "") or "")
        parts = [f"instance {num}" if num not in (None, "") else "instance"]
        if uid:
            parts.append(f"(SOPInstanceUID ...{uid[-12:]})")
        return " ".join(parts)
    return f"file {index + 1} of the series" if index is not None else "a file of the series"


def _decode(ds: Any, path: Path) -> np.ndarray:
    """``ds.pixel_array`` with decoder failures mapped to stable codes (docs/failure-kinds.md kind 5)."""
    ts = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
    try:
        return np.asarray(ds.pixel_array)
    except MemoryError:  # a study past the memory limit is OUT_OF_MEMORY, not a decode error
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom/pylibjpeg raise many types on bad pixels
        try:
            from pydicom.pixels import get_decoder

            available = get_decoder(ts).is_available if ts else True
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise _err("UNSUPPORTED_TRANSFER_SYNTAX", f"no installed decoder for transfer syntax "
                       f"{ts} (install pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg or "
                       "python-gdcm)") from None
        log.debug("pixel decoding failed for %s", path.name)
        raise _err("PIXEL_DECODE_FAILED", f"{dicom_label(ds)}: {type(exc).__name__} "
                   f"(transfer syntax {ts})") from None


def _check_positions(pos: np.ndarray, steps_vec: np.ndarray, normal: np.ndarray,
                     extra: dict) -> float:
    """Validate sorted positions along the normal; returns the median slice step (mm).

    ``pos``: ``(N,)`` slice positions along ``normal`` (mm, ascending); ``steps_vec``:
    ``(N - 1, 3)`` differences of consecutive ImagePositionPatient (mm, LPS); ``normal``: ``(3,)``
    unit slice normal (LPS). Raises :class:`ConversionError` ``NOT_3D``, ``AMBIGUOUS_STACK``,
    ``MISSING_SLICES`` or ``GANTRY_TILT``.
    """
    steps = np.diff(pos)
    if np.any(steps < 1e-3):
        dup = int(np.sum(steps < 1e-3))
        if extra.get("stack") == "4D":
            raise _err("NOT_3D", "positions repeat over time/diffusion tags: a 4D series")
        raise _err("AMBIGUOUS_STACK", f"{dup} slice position(s) occur more than once with "
                   "nothing to tell the images apart (no echo/time/acquisition difference)")
    med = float(np.median(steps))
    big = np.nonzero(steps > GAP_FACTOR * med)[0]
    if big.size:
        k = int(big[0])
        missing = int(round(steps[k] / med)) - 1
        raise _err("MISSING_SLICES", f"gap of {steps[k]:.2f} mm between slices {k} and {k + 1} "
                   f"(positions {pos[k]:.2f} and {pos[k + 1]:.2f} mm along the normal; median "
                   f"step {med:.2f} mm): about {missing} slice(s) missing"
                   + (f", {big.size} gap(s) in all" if big.size > 1 else ""))
    if np.any(np.abs(steps - med) > NONUNIFORM_TOL * med):
        raise _err("AMBIGUOUS_STACK", f"non-uniform slice spacing: steps {steps.min():.2f} to "
                   f"{steps.max():.2f} mm (median {med:.2f} mm)")
    # tilt: angle between the mean step vector and the normal
    mean_step = steps_vec.mean(axis=0)
    cosang = abs(float(np.dot(mean_step, normal))) / (float(np.linalg.norm(mean_step)) or 1.0)
    angle = math.degrees(math.acos(min(1.0, cosang)))
    if angle > TILT_TOL_DEG:
        raise _err("GANTRY_TILT", f"slice stack sheared by {angle:.1f} deg (gantry tilt measured "
                   "from ImagePositionPatient against the ImageOrientationPatient normal); "
                   "resampling of tilted stacks is not implemented")
    return med


def _fill_transfer_syntax(ds: Any) -> str | None:
    """Give a dataset read without file meta (no preamble, no group 0002: docs/failure-kinds.md kind 9)
    the TransferSyntaxUID pydicom's parse found, so that pixel decoding (pydicom, dicom2nifti)
    knows the encoding. Returns the UID set, or ``None`` when the file already had one or the
    encoding is unknown. Only the in-memory dataset changes; the file is never written.

    Without file meta the pixel data can only be native (uncompressed): an encapsulated stream
    needs the transfer syntax to be found at all, so the encoding of the dataset itself (implicit
    or explicit VR, little or big endian) is the transfer syntax.
    """
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return None
    implicit, little = getattr(ds, "original_encoding", (None, None))  # pydicom >= 3
    if implicit is None:  # pragma: no cover - pydicom 2 attributes
        implicit = getattr(ds, "is_implicit_VR", None)
        little = getattr(ds, "is_little_endian", None)
    if implicit is None or little is None:
        return None
    uid = ImplicitVRLittleEndian if implicit else (
        ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    meta.TransferSyntaxUID = uid
    return str(uid)


def _read_datasets(series: Series) -> list[tuple[Path, Any]]:
    """Every file of ``series`` read with pydicom (pixel bytes loaded, not decoded); a file
    without file meta gets the TransferSyntaxUID of its parsed encoding
    (:func:`_fill_transfer_syntax`)."""
    import pydicom

    out = []
    for index, path in enumerate(series.files):
        try:
            ds = pydicom.dcmread(str(path), force=True)
        except MemoryError:  # a study past the memory limit is OUT_OF_MEMORY, not a decode error
            raise
        except Exception as exc:  # noqa: BLE001 - unreadable file becomes a coded error
            log.debug("cannot read %s", path.name)
            raise _err("PIXEL_DECODE_FAILED", f"{dicom_label(index=index)}: cannot read ({type(exc).__name__})"
                       ) from None
        filled = _fill_transfer_syntax(ds)
        if filled:
            log.debug("%s: no file meta; transfer syntax %s from the parsed encoding",
                      path.name, filled)
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        if not photometric.upper().startswith("MONOCHROME"):
            raise _err("NOT_GREYSCALE", f"{dicom_label(ds)}: PhotometricInterpretation {photometric} "
                       "(colour secondary capture?), not an MR magnitude image")
        out.append((path, ds))
    return out


def _decode_failure(pairs: list[tuple[Path, Any]], exc: Exception) -> ConversionError:
    """Name the file and cause when dicom2nifti's pixel reading raised ``exc``: re-decode with
    :func:`_decode` (failure path only) so the codes match docs/failure-kinds.md kind 5."""
    for path, ds in pairs:
        _decode(ds, path)  # raises UNSUPPORTED_TRANSFER_SYNTAX / PIXEL_DECODE_FAILED
    log.debug("dicom2nifti failed: %s", exc)
    return _err("PIXEL_DECODE_FAILED", f"dicom2nifti could not read the pixels ({type(exc).__name__})")


def _d2n_classic(pairs: list[tuple[Path, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """dicom2nifti's anatomical assembly of position-sorted classic instances.

    ``common.get_volume_pixeldata`` decodes each slice and applies its own Modality LUT
    (pydicom ``apply_modality_lut``: RescaleSlope/RescaleIntercept per slice, no Philips private
    scale); ``common.create_affine`` builds the affine from the first and last
    ImagePositionPatient. Returns data ``(cols, rows, slices)`` and the voxel -> RAS mm affine.
    """
    from dicom2nifti import common
    from dicom2nifti.exceptions import ConversionError as D2NError

    dsl = [ds for _, ds in pairs]
    try:
        data = common.get_volume_pixeldata(dsl)
        affine, _ = common.create_affine(dsl)
    except D2NError as exc:
        raise _err("AMBIGUOUS_STACK", f"dicom2nifti refused the stack: {exc}") from None
    except MemoryError:  # a study past the memory limit is OUT_OF_MEMORY, not a decode error
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom/pylibjpeg raise many types on bad pixels
        raise _decode_failure(pairs, exc) from None
    return data, np.asarray(affine, dtype=np.float64)


def _d2n_enhanced_refusal(ds: Any, frames: tuple[int, ...]) -> str | None:
    """Why dicom2nifti's multi-frame assembly cannot take this Enhanced file as it is, or ``None``.

    ``common.multiframe_to_block`` takes the whole file, places frames by InStackPositionNumber and
    applies only per-frame PixelValueTransformation; ``common.multiframe_create_affine`` takes the
    slice step from the first and last frame *in file order*. So it is exact only for a single
    stack stored in slice order."""
    from dicom2nifti import common

    n = int(ds.get("NumberOfFrames") or 1)
    if sorted(frames) != list(range(n)):
        return f"{len(frames)} of the file's {n} frames (several stacks/volumes in one file)"
    if list(frames) not in (list(range(n)), list(range(n - 1, -1, -1))):
        return "frames not stored in slice order"
    try:
        n_stacks, _ = common.multiframe_get_stack_count([ds])
    except MemoryError:  # a study past the memory limit is OUT_OF_MEMORY, not a decode error
        raise
    except Exception:  # noqa: BLE001 - malformed functional groups: let our assembly decide
        return "functional groups dicom2nifti cannot count stacks from"
    if n_stacks != 1:
        return f"dicom2nifti counts {n_stacks} stacks"
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_pvt = shared[0].get("PixelValueTransformationSequence") if shared else None
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        content = item.get("FrameContentSequence")
        stack_pos = content[0].get("InStackPositionNumber") if content else None
        if stack_pos is not None and int(stack_pos) != k + 1:
            return "InStackPositionNumber differs from the stored frame order"
        if shared_pvt and "PixelValueTransformationSequence" not in item:
            pvt = shared_pvt[0]
            if float(pvt.get("RescaleSlope", 1) or 1) != 1 or \
                    float(pvt.get("RescaleIntercept", 0) or 0) != 0:
                return "rescale only in the shared functional groups"
    return None


def _d2n_enhanced(path: Path, ds: Any) -> tuple[np.ndarray, np.ndarray] | str:
    """dicom2nifti's assembly of one whole single-stack Enhanced file (see
    :func:`_d2n_enhanced_refusal`). Returns data ``(cols, rows, frames)`` in stored frame order
    and the RAS affine, or why dicom2nifti failed when the pixels themselves decode (functional
    groups it does not expect): the caller then falls back to recnec's own assembly."""
    from dicom2nifti import common

    try:
        data = common.multiframe_to_block(ds)
        affine, _ = common.multiframe_create_affine([ds], data)
    except MemoryError:  # a study past the memory limit is OUT_OF_MEMORY, not a decode error
        raise
    except Exception as exc:  # noqa: BLE001 - pydicom/pylibjpeg/dicom2nifti raise many types
        _decode(ds, path)  # a real decoding problem keeps its code (docs/failure-kinds.md kind 5)
        log.debug("dicom2nifti multiframe assembly failed: %s", exc)
        return f"dicom2nifti failed ({type(exc).__name__})"
    return data, np.asarray(affine, dtype=np.float64)


def _own_stack(pairs: list[tuple[Path, Any]], frames: tuple[int, ...],
               rescales: list[tuple[float, float]]) -> np.ndarray:
    """recnec's own assembly: the images of ``pairs`` (classic) or ``frames`` of its single file
    (Enhanced), already in slice order, with per-image ``(slope, intercept)`` applied in float64.
    Returns ``(cols, rows, slices)`` float32."""
    slices: list[np.ndarray] = []
    for path, ds in pairs:
        arr = _decode(ds, path)
        if frames:
            arr = arr[None] if arr.ndim == 2 else arr
            slices.extend(arr[f] for f in frames)
        else:
            slices.append(arr)
    stack = np.empty((len(slices),) + slices[0].shape, dtype=np.float32)
    for k, (s, (slope, inter)) in enumerate(zip(slices, rescales)):
        stack[k] = s.astype(np.float64) * slope + inter
    return stack.transpose(2, 1, 0)


def _dicom_volume(series: Series, settings: Settings, *, own: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Checked, assembled DICOM stack: data ``(cols, rows, slices)`` float32 in slice order,
    voxel -> RAS mm affine, flags, notes. ``own=True`` forces recnec's own assembly for every
    series (the reference the dicom2nifti path is tested against)."""
    from .discover import units_from_dataset

    flags: list[str] = []
    notes: list[str] = []
    pairs = _read_datasets(series)
    if series.frames:
        path, ds = pairs[0]
        us = units_from_dataset(ds, path)
        units = [us[f] for f in series.frames]
    else:
        units = []
        for path, ds in pairs:
            if int(ds.get("NumberOfFrames") or 1) > 1:
                raise _err("AMBIGUOUS_STACK", f"{dicom_label(ds)}: {ds.NumberOfFrames} frames in a "
                           "classic (single-frame) instance")
            units.append(units_from_dataset(ds, path)[0])
    if any(u.ipp is None or u.iop is None or u.pixel_spacing is None for u in units):
        raise _err("MISSING_GEOMETRY", "image(s) without ImagePositionPatient, "
                   "ImageOrientationPatient or PixelSpacing")
    shapes = {(u.rows, u.cols) for u in units}
    if len(shapes) > 1:
        raise _err("AMBIGUOUS_STACK", f"images of different matrices {sorted(shapes)}")
    iops = np.array([u.iop for u in units], dtype=float)
    if np.abs(iops - iops[0]).max() > 1e-3:
        raise _err("AMBIGUOUS_STACK", "images with different orientations in one stack")
    iop = iops[0]
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    normal /= np.linalg.norm(normal)
    ipps = np.array([u.ipp for u in units], dtype=float)
    pos = ipps @ normal
    order = np.argsort(pos, kind="stable")
    pos, ipps = pos[order], ipps[order]
    units = [units[i] for i in order]
    if len(units) < MIN_SLICES:
        raise _err("TOO_FEW_SLICES", f"{len(units)} slice(s); at least {MIN_SLICES} needed")
    _check_positions(pos, np.diff(ipps, axis=0), normal, dict(series.header.extra))
    # the geometry the checks above accepted: voxel (col i, row j, slice k) -> LPS -> RAS mm
    dr, dc = units[0].pixel_spacing  # PixelSpacing = (row spacing, column spacing), mm
    n = len(units)
    aff_lps = np.eye(4)
    aff_lps[:3, 0] = row_dir * dc  # i: column index, along the row cosine
    aff_lps[:3, 1] = col_dir * dr  # j: row index, along the column cosine
    aff_lps[:3, 2] = (ipps[-1] - ipps[0]) / (n - 1)
    aff_lps[:3, 3] = ipps[0]
    expected = LPS_TO_RAS @ aff_lps
    rescales = [u.rescale or (1.0, 0.0) for u in units]
    frames = tuple(series.frames[i] for i in order) if series.frames else ()
    if own:
        sorted_pairs = pairs if frames else [pairs[i] for i in order]
        data, affine = _own_stack(sorted_pairs, frames, rescales), expected
        notes.append("assembled by recnec (reference)")
    elif not frames:
        data, affine = _d2n_classic([pairs[i] for i in order])
        notes.append("assembled by dicom2nifti (common.get_volume_pixeldata/create_affine)")
    else:
        result = _d2n_enhanced_refusal(pairs[0][1], frames) or _d2n_enhanced(*pairs[0])
        if isinstance(result, str):
            data, affine = _own_stack(pairs, frames, rescales), expected
            notes.append(f"Enhanced frames assembled by recnec: {result}")
        else:
            data, affine = result
            if frames[0] != 0:  # stored in descending position: flip k to our ascending order
                data = data[:, :, ::-1]
                affine = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, -1, n - 1],
                                            [0, 0, 0, 1]], dtype=np.float64)
            notes.append("assembled by dicom2nifti (common.multiframe_to_block/create_affine)")
    rows, cols = units[0].rows, units[0].cols
    if data.shape != (cols, rows, n):
        raise _err("AMBIGUOUS_STACK", f"assembled block of shape {data.shape}, expected "
                   f"{(cols, rows, n)} from the headers")
    dev = float(np.abs(affine - expected).max())
    if dev > AFFINE_TOL_MM:
        raise _err("AMBIGUOUS_STACK", f"dicom2nifti's affine differs from the checked slice "
                   f"geometry by {dev:.3g} mm")
    data = np.asarray(data, dtype=np.float32)
    slice_ds = [pairs[0][1]] * n if frames else [pairs[i][1] for i in order]
    pad = _dicom_padding_mask(data, slice_ds, rescales)
    if pad is not None:
        before = data[pad]
        value = _fill_background(data, pad)
        step = max(abs(slope) for slope, _ in rescales) or 1.0
        if float(np.abs(before - value).max()) > step:  # not already at the background level
            flags.append("PADDING_AS_BACKGROUND")
            notes.append(f"PADDING_AS_BACKGROUND: {int(pad.sum())} voxel(s) of PixelPaddingValue "
                         f"(0028,0120) set to the background {value:g}")
        else:
            notes.append(f"{int(pad.sum())} voxel(s) of PixelPaddingValue (0028,0120) already at "
                         f"the background {value:g}")
    # per-slice Modality LUT (docs/failure-kinds.md kind 11): recorded here, applied by the assembly
    uniq = sorted(set(rescales))
    if len(uniq) > 1:
        notes.append(f"per-slice rescale applied: {len(uniq)} different slope/intercept pairs")
        flags.append("PER_SLICE_SCALING")
    elif uniq[0] != (1.0, 0.0):
        notes.append(f"rescale slope {uniq[0][0]:g} intercept {uniq[0][1]:g} applied")
    if series.header.extra.get("philips_private_scale_slope"):
        notes.append("Philips private scale slope (2005,100E) "
                     f"{series.header.extra['philips_private_scale_slope']} present, not applied")
    return data, affine, flags, notes


def _stored_int(ds: Any, keyword: str) -> int | None:
    """An integer pixel-value tag (VR US or SS, e.g. PixelPaddingValue) as a Python int, or
    ``None`` when absent or unreadable; raw bytes of an unresolved ambiguous VR are read with
    the sign PixelRepresentation gives (PS3.3 C.7.6.3.1)."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (bytes, bytearray)):
        if len(value) < 2:
            return None
        signed = int(ds.get("PixelRepresentation") or 0) == 1
        order = "little" if getattr(ds, "is_little_endian", True) in (True, None) else "big"
        return int.from_bytes(bytes(value[:2]), order, signed=signed)
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        value = value[0] if len(value) else None
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _dicom_padding_mask(data: np.ndarray, slice_ds: list[Any],
                        rescales: list[tuple[float, float]]) -> np.ndarray | None:
    """bool ``(cols, rows, slices)``: voxels whose stored value is the slice's PixelPaddingValue
    (0028,0120), or lies between it and PixelPaddingRangeLimit (0028,0121) inclusive, or (signed
    pixels, PixelRepresentation 1) is the smallest value the pixel can store; ``None`` when no
    voxel is padding.

    Padding values are stored values, compared before the Modality LUT (DICOM PS3.3
    C.7.5.1.1.2); ``data`` is already rescaled, so the stored range is mapped through the slice's
    ``(slope, intercept)`` and matched within half a stored step. ``slice_ds``: the dataset of
    each slice (the one Enhanced file for every frame), in the slice order of ``data``.
    """
    mask = np.zeros(data.shape, dtype=bool)
    for k, (ds, (slope, inter)) in enumerate(zip(slice_ds, rescales)):
        tol = 0.5 * (abs(slope) or 1.0)
        sl = data[:, :, k]
        pad = _stored_int(ds, "PixelPaddingValue")
        if pad is not None:
            limit = _stored_int(ds, "PixelPaddingRangeLimit")
            lo_s, hi_s = sorted((pad, pad if limit is None else limit))
            a, b = sorted((lo_s * slope + inter, hi_s * slope + inter))
            mask[:, :, k] = (sl >= a - tol) & (sl <= b + tol)
        # undeclared: the smallest value a signed pixel can store (-32768 for 16 bits) is a fill
        # value, never an MR intensity, however few voxels hold it and whatever the rescale
        if int(ds.get("PixelRepresentation") or 0) == 1:
            bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
            fill = -(2 ** (bits - 1)) * slope + inter
            mask[:, :, k] |= np.abs(sl - fill) <= tol
    return mask if mask.any() else None


def _fill_background(data: np.ndarray, mask: np.ndarray) -> float:
    """Set ``data[mask]`` in place to the image's background: the minimum of the finite voxels
    outside ``mask`` (0 when there are none). Returns that value."""
    rest = data[~mask]
    rest = rest[np.isfinite(rest)]
    value = float(rest.min()) if rest.size else 0.0
    data[mask] = value
    return value


# --------------------------------------------------------------------------------------------
# NIfTI / NRRD
# --------------------------------------------------------------------------------------------
def _squeeze(data: np.ndarray, name: str) -> np.ndarray:
    """``data`` with trailing singleton dimensions dropped; ``NOT_3D`` beyond 3D,
    ``TOO_FEW_SLICES`` below."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim > 3:
        raise _err("NOT_3D", f"{name}: image of shape {data.shape}: a 4D series is never a model "
                   "input")
    if data.ndim < 3:
        raise _err("TOO_FEW_SLICES", f"{name}: image of shape {data.shape} is not a volume")
    return data


def _scaling_problem(header: Any) -> str | None:
    """Why a NIfTI header's ``scl_slope`` / ``scl_inter`` cannot be applied, or ``None``.

    NIfTI-1: ``scl_slope`` 0 means "no scaling" (``scl_inter`` is then ignored, as nibabel does),
    and so do a NaN slope *and* a NaN intercept together: that is how nibabel writes every
    unscaled image. Broken: an infinite slope, a NaN slope beside a number (or infinity) as the
    intercept, and a non-finite intercept beside a valid slope. nibabel reads a NaN / infinite
    slope silently as "no scaling" and refuses a non-finite intercept as an unreadable header,
    both hiding the cause.
    """
    try:
        slope, inter = float(header["scl_slope"]), float(header["scl_inter"])
    except (KeyError, TypeError, ValueError):  # an Analyze-style header without scaling fields
        return None
    if math.isnan(slope) and math.isnan(inter):
        return None  # nibabel's "unscaled" header
    if not math.isfinite(slope):
        return f"scl_slope is {slope} (NaN or infinite) with scl_inter {inter:g}"
    if slope != 0.0 and not math.isfinite(inter):
        return f"scl_inter is {inter} (NaN or infinite) with scl_slope {slope:g}"
    return None


def _transform_disagreement(header: Any, shape: tuple[int, ...]) -> str | None:
    """How a NIfTI header's qform and sform disagree, or ``None`` when they agree or only one is
    set (``qform_code`` or ``sform_code`` 0).

    Disagreement: an axis pointing another way (``nibabel.aff2axcodes`` differ, e.g. a
    left-right flip) or a corner of the field of view (voxel corners of ``shape``) placed more
    than :data:`QFORM_SFORM_TOL_MM` apart.
    """
    import nibabel as nib

    try:
        if int(header["qform_code"]) <= 0 or int(header["sform_code"]) <= 0:
            return None
        q = np.asarray(header.get_qform(), dtype=float)
        sf = np.asarray(header.get_sform(), dtype=float)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(sf))):
        return "a non-finite qform or sform"
    ext = np.array([max(int(n), 1) - 1 for n in tuple(shape[:3]) + (1,) * (3 - len(shape[:3]))])
    corners = np.array([[i, j, k, 1.0] for i in (0, ext[0]) for j in (0, ext[1])
                        for k in (0, ext[2])]).T
    dist = float(np.linalg.norm((q @ corners - sf @ corners)[:3], axis=0).max())
    codes_q, codes_s = nib.aff2axcodes(q), nib.aff2axcodes(sf)
    if codes_q != codes_s:
        return (f"axis directions differ (qform {''.join(str(c) for c in codes_q)}, sform "
                f"{''.join(str(c) for c in codes_s)}; corners up to {dist:.1f} mm apart)")
    if dist > QFORM_SFORM_TOL_MM:
        return f"field-of-view corners up to {dist:.1f} mm apart"
    return None


def _nifti_volume(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """NIfTI through nibabel: ``scl_slope`` / ``scl_inter`` applied, stored axis order.

    Geometry follows nibabel and the NIfTI-1 standard: the sform when ``sform_code`` > 0, else the
    qform (``img.affine``). Every NIfTI recnec reads (series and user masks) goes through here;
    SimpleITK reads NRRD only. A qform that disagrees with the sform used is flagged
    ``QFORM_SFORM_DISAGREE`` (:func:`_transform_disagreement`); broken scaling factors fail
    ``BAD_SCALING`` (:func:`_scaling_problem`), as does scaling that overflows float32.
    """
    import nibabel as nib

    from .discover import read_nifti_header

    try:
        # the stored factors: nibabel resets them in ``img.header`` (the proxy holds the scaling)
        # and refuses a non-finite scl_inter as HeaderDataError
        problem = _scaling_problem(read_nifti_header(path))
        if problem:
            raise _err("BAD_SCALING", f"{path.name}: NIfTI {problem}")
        img = nib.load(str(path))
        if len(img.shape) > 3 and int(np.prod(img.shape[3:])) > 1:
            raise _err("NOT_3D", f"{path.name}: image of shape {img.shape}: a 4D series is never "
                       "a model input")
        with np.errstate(over="ignore"):  # an overflow is BAD_SCALING, checked below
            data = np.asarray(img.get_fdata(dtype=np.float32))  # applies scl_slope / scl_inter
    except ConversionError:
        raise
    except MemoryError:  # a study past the memory limit is OUT_OF_MEMORY, not a decode error
        raise
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on corrupt files
        raise _err("PIXEL_DECODE_FAILED", f"{path.name}: {type(exc).__name__}: {exc}") from None
    flags: list[str] = []
    notes = []
    slope, inter = getattr(img.dataobj, "slope", 1.0), getattr(img.dataobj, "inter", 0.0)
    if slope != 1.0 or inter != 0.0:
        notes.append(f"NIfTI scl_slope {slope} scl_inter {inter} applied")
        if not np.all(np.isfinite(data)):
            raw = np.asanyarray(img.dataobj.get_unscaled())
            if np.count_nonzero(~np.isfinite(data)) > np.count_nonzero(~np.isfinite(raw)):
                raise _err("BAD_SCALING", f"{path.name}: NIfTI scl_slope {slope:g} scl_inter "
                           f"{inter:g} take stored values beyond the float32 range")
    stored = np.dtype(img.get_data_dtype())
    if stored.kind == "i":  # the signed type's minimum (int16 -32768) is a fill value, before scaling
        raw = np.asanyarray(img.dataobj.get_unscaled())
        pad = raw == np.iinfo(stored).min
        if pad.any():
            if not data.flags.writeable:
                data = data.copy()
            value = _fill_background(data, pad)
            flags.append("PADDING_AS_BACKGROUND")
            notes.append(f"PADDING_AS_BACKGROUND: {int(pad.sum())} voxel(s) stored as {np.iinfo(stored).min} "
                         f"(the {stored} minimum, a fill value) set to the background {value:g}")
    disagree = _transform_disagreement(img.header, img.shape)
    if disagree:
        used = "sform" if int(img.header["sform_code"]) > 0 else "qform"
        flags.append("QFORM_SFORM_DISAGREE")
        notes.append(f"QFORM_SFORM_DISAGREE: NIfTI qform and sform disagree ({disagree}); the "
                     f"{used} is used (sform_code {int(img.header['sform_code'])}, NIfTI-1 and "
                     "nibabel rule)")
    return _squeeze(data, path.name), np.asarray(img.affine, dtype=float), flags, notes


def _sitk_volume(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """NRRD (or any format ITK reads) through SimpleITK, its LPS geometry as voxel -> RAS mm
    (:func:`~recnec_cli.stages.register.from_sitk`), stored axis order, trailing singleton
    dimensions squeezed."""
    import SimpleITK as sitk

    from .register import from_sitk

    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:  # SimpleITK raises RuntimeError with ITK's message
        raise _err("PIXEL_DECODE_FAILED", f"{path.name}: {str(exc).strip()[-200:]}") from None
    if img.GetNumberOfComponentsPerPixel() > 1:
        raise _err("NOT_3D", f"{path.name}: {img.GetNumberOfComponentsPerPixel()} components "
                   "per voxel (a vector or 4D image), never a model input")
    if img.GetDimension() < 3:
        raise _err("TOO_FEW_SLICES", f"{path.name}: a {img.GetDimension()}D image is not a volume")
    data, affine = from_sitk(img)
    return _squeeze(data, path.name), affine, [], []


def _canonical(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(data, affine)`` reordered to the closest canonical RAS+ axes
    (``nibabel.as_closest_canonical``): float32 ``(X, Y, Z)``, float64 voxel -> RAS mm affine;
    exact, no resampling."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.Nifti1Image(data.astype(np.float32, copy=False), affine))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def _clean_values(data: np.ndarray, flags: list[str], notes: list[str]) -> np.ndarray:
    """Non-finite voxels and undeclared padding of a series set to the background, in place
    where possible; ``flags`` and ``notes`` extended. Returns ``data`` (float32, same shape).

    * NaN / +-Inf voxels: more than :data:`NONFINITE_MAX_FRACTION` of the volume fails
      ``NONFINITE_VOXELS``; fewer are set to the background and flagged
      ``NONFINITE_VOXELS_REPLACED``.
    * a minimum at or below :data:`PADDING_FLOOR` covering more than
      :data:`PADDING_MIN_FRACTION` of the voxels (e.g. int16 -32768 written outside the head
      without a PixelPaddingValue, or in a NIfTI) is background: set to it and flagged
      ``PADDING_AS_BACKGROUND``.

    The background is the minimum of the remaining (finite, non-padding) voxels.
    """
    finite = np.isfinite(data)
    n_bad = int(data.size - np.count_nonzero(finite))
    if n_bad > NONFINITE_MAX_FRACTION * data.size:
        raise _err("NONFINITE_VOXELS", f"{n_bad} of {data.size} voxels ({n_bad / data.size:.1%}) "
                   f"are NaN or infinite (more than {NONFINITE_MAX_FRACTION:.0%}): broken export "
                   "or scaling")
    pad = np.zeros(data.shape, dtype=bool)
    m = float(data[finite].min())
    if m <= PADDING_FLOOR:
        pad = data == m
        if np.count_nonzero(pad) <= PADDING_MIN_FRACTION * data.size:
            pad[...] = False
    if not n_bad and not pad.any():
        return data
    if not data.flags.writeable:
        data = data.copy()
    value = _fill_background(data, pad | ~finite)
    if n_bad:
        flags.append("NONFINITE_VOXELS_REPLACED")
        notes.append(f"NONFINITE_VOXELS_REPLACED: {n_bad} NaN / infinite voxel(s) "
                     f"({n_bad / data.size:.3%}) set to the background {value:g}")
    if pad.any():
        if "PADDING_AS_BACKGROUND" not in flags:
            flags.append("PADDING_AS_BACKGROUND")
        notes.append(f"PADDING_AS_BACKGROUND: {int(pad.sum())} voxel(s) "
                     f"({pad.sum() / data.size:.0%}) of the fill value {m:g} set to the "
                     f"background {value:g}")
    return data


def _series_label(series: Series) -> str:
    """How a series is named in a WARNING (INFO-level log: no file name): the end of its DICOM
    UID, or the study folder of a NIfTI / NRRD file (its study id); the file name goes to DEBUG."""
    if series.source == "dicom":
        sid = series.series_id
        return "series " + (sid if len(sid) <= 20 else "..." + sid[-16:])
    log.debug("series %s", series.series_id)
    folder = series.series_id.rsplit("/", 1)[0] if "/" in series.series_id else "."
    return f"{series.source.upper()} series in {folder}"


def _read_file(path: Path) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """One NIfTI or NRRD file, the same reader for a series and a user mask."""
    if path.name.lower().endswith(".nrrd"):
        return _sitk_volume(path)
    return _nifti_volume(path)


# --------------------------------------------------------------------------------------------
# public
# --------------------------------------------------------------------------------------------
def convert_series(series: Series, *, settings: Settings) -> Volume:
    """Convert one discovered series into a canonical RAS+ :class:`~recnec_cli.study.Volume`.

    Returns
    -------
    Volume
        ``data`` float32 of shape ``(X, Y, Z)`` (axes towards Right, Anterior, Superior),
        ``affine`` float64 ``(4, 4)`` voxel -> world mm RAS+, exact (no resampling).
        ``flags`` may hold ``ANISOTROPIC`` (largest/smallest voxel size above
        ``settings.anisotropy_limit``; spacing from slice positions), ``PER_SLICE_SCALING``,
        ``NONFINITE_VOXELS_REPLACED`` (up to 1 % NaN / Inf voxels set to the background),
        ``PADDING_AS_BACKGROUND`` (DICOM PixelPaddingValue / PixelPaddingRangeLimit, or an
        undeclared fill value <= -30000 covering > 5 % of the voxels, set to the background) and
        ``QFORM_SFORM_DISAGREE`` (a NIfTI whose qform and sform differ; the sform is used when
        ``sform_code`` > 0). The background is the minimum of the image's other voxels (after
        rescale). The last three also log a WARNING.

    Raises
    ------
    ConversionError
        With code ``NOT_3D``, ``TOO_FEW_SLICES``, ``SERIES_TOO_LARGE``, ``MISSING_GEOMETRY``,
        ``MISSING_SLICES``, ``GANTRY_TILT``, ``AMBIGUOUS_STACK``, ``UNSUPPORTED_TRANSFER_SYNTAX``,
        ``PIXEL_DECODE_FAILED``, ``NOT_GREYSCALE``, ``CONSTANT_IMAGE``, ``UNSUPPORTED_FORMAT``,
        ``NONFINITE_VOXELS`` (more than 1 % of the voxels NaN or infinite) or ``BAD_SCALING``
        (NIfTI ``scl_slope`` / ``scl_inter`` NaN or infinite, or overflowing float32).
    """
    precheck(series, settings=settings)
    if series.source == "dicom":
        data, affine, flags, notes = _dicom_volume(series, settings)
    elif series.source in ("nifti", "nrrd"):
        data, affine, flags, notes = _read_file(Path(series.files[0]))
    else:
        raise _err("UNSUPPORTED_FORMAT", f"unknown series source {series.source!r}")
    if data.shape[2] < MIN_SLICES:
        raise _err("TOO_FEW_SLICES", f"{data.shape[2]} slice(s); at least {MIN_SLICES} needed")
    if data.size > settings.max_series_voxels:
        raise _err("SERIES_TOO_LARGE", f"{data.shape} = {data.size} voxels > max_series_voxels "
                   f"{settings.max_series_voxels}")
    data = _clean_values(data, flags, notes)
    for note in notes:
        if note.split(":", 1)[0] in WARNING_FLAGS:
            log.warning("%s: %s", _series_label(series), note)
    lo, hi = float(data.min()), float(data.max())
    if hi - lo <= 1e-6 * max(1.0, abs(hi)):
        raise _err("CONSTANT_IMAGE", f"every voxel is {lo:g}: blank or failed export")
    from nibabel.affines import voxel_sizes

    out, aff = _canonical(data, affine)
    spacing = voxel_sizes(aff)
    if spacing.min() > 0 and spacing.max() / spacing.min() > settings.anisotropy_limit:
        flags.append("ANISOTROPIC")
        notes.append("voxel size {:.2f} x {:.2f} x {:.2f} mm: ratio {:.1f} > anisotropy_limit "
                     "{:g}".format(*spacing, spacing.max() / spacing.min(),
                                   settings.anisotropy_limit))
    log.debug("converted %s: shape %s spacing %s flags %s", series.series_id, out.shape,
              np.round(spacing, 3), flags)
    return Volume(data=out, affine=aff, series_id=series.series_id, flags=tuple(flags),
                  notes=tuple(notes))


def read_image_file(path: Path) -> Volume:
    """One NIfTI (``.nii``, ``.nii.gz``) or NRRD (``.nrrd``) file as a canonical RAS+ volume,
    read exactly as :func:`convert_series` reads a NIfTI / NRRD series (nibabel for NIfTI,
    SimpleITK for NRRD), so that a lesion mask saved on a series' grid gets that series' shape
    and affine.

    Returns
    -------
    Volume
        ``data`` float32 ``(X, Y, Z)`` RAS+ (trailing singleton dimensions squeezed), ``affine``
        float64 ``(4, 4)`` voxel -> world mm RAS+, ``series_id`` the file name. None of
        :func:`convert_series`' series checks (slice count, size, constant image) apply.

    Raises
    ------
    ConversionError
        ``NOT_3D`` (more than three non-singleton dimensions or several components per voxel),
        ``TOO_FEW_SLICES`` (fewer than three dimensions), ``PIXEL_DECODE_FAILED`` (unreadable),
        ``BAD_SCALING`` (broken NIfTI scaling factors).
    """
    path = Path(path)
    data, affine, _, notes = _read_file(path)
    for note in notes:
        if note.split(":", 1)[0] in WARNING_FLAGS:
            log.warning("lesion mask: %s", note)
    data, affine = _canonical(data, affine)
    return Volume(data=data, affine=affine, series_id=path.name, notes=tuple(notes))


# Transfer syntaxes met in MR exports (DICOM PS3.5 Table A-1 / 10.x); checked at start-up so a
# missing decoder fails the run once (docs/failure-kinds.md kind 5 and 20) instead of every study.
COMMON_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.2": "Explicit VR Big Endian",
    "1.2.840.10008.1.2.5": "RLE Lossless",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless SV1",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Near-lossless",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}


def decoder_report() -> dict[str, bool]:
    """``{transfer syntax name: decoder available}`` for :data:`COMMON_TRANSFER_SYNTAXES`, from
    pydicom's pixel-data backends (pylibjpeg, openjpeg, libjpeg, gdcm); for the run manifest."""
    from pydicom.pixels import get_decoder

    out = {}
    for uid, name in COMMON_TRANSFER_SYNTAXES.items():
        try:
            out[name] = bool(get_decoder(uid).is_available)
        except (NotImplementedError, ValueError):
            out[name] = False
    log.debug("pixel decoders: %s", out)
    return out
