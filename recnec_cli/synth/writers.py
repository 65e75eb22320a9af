"""Write a synthetic cohort: NIfTI or DICOM studies, or model-space tensors, plus labels.

Byte-for-byte reproducible: no wall-clock time anywhere (dates and times come from the seed),
gzip headers with mtime 0 and no file name, DICOM UIDs derived from the seed
(:func:`derived_uid`: ``2.25.`` + a name-based UUID).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..stages.modelinput import InputSpec
from .acquisition import Acquisition
from .constants import STORE_GAIN, derived_uid, time_of_day
from .dicom import write_series
from .series import SeriesGrid, acquire, motion_matrix, series_grid
from .subject import DEFAULT_RATIO, GENERATOR_VERSION, cohort_label, plan_subject
from .truth import SubjectTruth, model_tensor, truth_from_plan

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom")
SPACES = ("study", "model")
NIFTI_NAMES = {"T1": "{sid}_T1w.nii.gz", "T2": "{sid}_T2w.nii.gz",
               "T1ce": "{sid}_ce-gadolinium_T1w.nii.gz"}


@dataclass(frozen=True)
class CohortInfo:
    """What :func:`write_cohort` wrote. ``study_ids`` and ``labels`` are in subject order."""

    out: Path
    n: int
    seed: int
    fmt: str
    space: str
    ratio: tuple[int, int]
    study_ids: tuple[str, ...]
    labels: tuple[str, ...]
    seconds: float = 0.0
    files: int = 0
    extra: dict = field(default_factory=dict)


def study_name(index: int) -> str:
    """Folder / study id of subject ``index`` (0-based) in NIfTI and model space."""
    return f"synth-{index + 1:04d}"


def _uid(seed: int, index: int, *parts: object) -> str:
    return derived_uid(seed, index, *parts)


def _gzip_bytes(raw: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=1) as gz:
        gz.write(raw)
    return buf.getvalue()


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, *, dtype=np.int16) -> None:
    """Write ``data`` (X, Y, Z) with ``affine`` (mm, RAS+) as a reproducible ``.nii.gz``."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    path.write_bytes(_gzip_bytes(img.to_bytes()))


def _stored(img: np.ndarray, acq: Acquisition) -> np.ndarray:
    return np.clip(np.rint(img * STORE_GAIN / acq.rescale_slope), 0, 32767).astype(np.int16)


def _acquire_study(truth: SubjectTruth) -> dict[str, tuple[np.ndarray, SeriesGrid]]:
    vols = {"T1": truth.t1, "T2": truth.t2, "T1ce": truth.t1ce}
    out = {}
    for role in ("T1", "T2", "T1ce"):
        acq = truth.acquisitions[role]
        grid = series_grid(acq)
        out[role] = (acquire(vols[role], truth.affine, grid, motion_matrix(acq)), grid)
    grid = out["T1ce"][1]
    lesion = acquire(truth.lesion_mask.astype(np.float32), truth.affine, grid,
                     motion_matrix(truth.acquisitions["T1ce"]))
    out["lesion"] = ((lesion > 0.5).astype(np.uint8), grid)
    return out


def _sidecar(acq: Acquisition) -> dict:
    """BIDS-style JSON sidecar (times in seconds, BIDS 1.9) for NIfTI series."""
    d = {
        "Modality": "MR", "Manufacturer": acq.manufacturer, "ManufacturersModelName": acq.model,
        "MagneticFieldStrength": acq.field_t, "SeriesDescription": acq.series_description,
        "ProtocolName": acq.protocol_name, "SequenceName": acq.sequence_name,
        "ImageType": list(acq.image_type), "ScanningSequence": "\\".join(acq.scanning_sequence),
        "SequenceVariant": "\\".join(acq.sequence_variant), "ScanOptions": "\\".join(acq.scan_options),
        "MRAcquisitionType": acq.mode, "RepetitionTime": acq.tr_ms / 1000.0,
        "EchoTime": acq.te_ms / 1000.0, "FlipAngle": acq.flip_deg, "SeriesNumber": acq.series_number,
        "SliceThickness": acq.slice_thickness_mm,
        "AcquisitionTime": time_of_day(acq.series_time_s, colons=True),
    }
    if acq.ti_ms is not None:
        d["InversionTime"] = acq.ti_ms / 1000.0
    if acq.echo_train_length is not None:
        d["EchoTrainLength"] = acq.echo_train_length
    if acq.contrast_agent is not None:
        d["ContrastBolusAgent"] = acq.contrast_agent
    return d


def write_nifti_study(folder: Path, sid: str, truth: SubjectTruth, *, mask_path: Path) -> int:
    """Write one study as three NIfTI series (+ JSON sidecars) and its lesion mask."""
    folder.mkdir(parents=True, exist_ok=True)
    acquired = _acquire_study(truth)
    for role in ("T1", "T2", "T1ce"):
        img, grid = acquired[role]
        acq = truth.acquisitions[role]
        name = NIFTI_NAMES[role].format(sid=sid)
        write_nifti(folder / name, _stored(img, acq), grid.affine)
        side = json.dumps(_sidecar(acq), indent=1, sort_keys=True) + "\n"
        (folder / name.replace(".nii.gz", ".json")).write_text(side, encoding="utf-8")
    mask, grid = acquired["lesion"]
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(mask_path, mask, grid.affine, dtype=np.uint8)
    return 7


def write_dicom_study(root: Path, truth: SubjectTruth, *, masks_dir: Path) -> tuple[str, int]:
    """Write one study as three DICOM series, one file per slice; returns (StudyInstanceUID, n)."""
    seed, index = truth.seed, truth.index
    study_uid = _uid(seed, index, "study")
    pseudo = hashlib.sha256(f"recnec-synth/{seed}/{index}".encode()).hexdigest()[:12]
    acquired = _acquire_study(truth)
    n = 0
    for role in ("T1", "T2", "T1ce"):
        img, grid = acquired[role]
        acq = truth.acquisitions[role]
        folder = root / pseudo / f"SE{acq.series_number:04d}"
        n += write_series(folder, img, grid, acq, seed=seed, index=index, study_uid=study_uid,
                          series_uid=_uid(seed, index, "series", role),
                          frame_uid=_uid(seed, index, "frame"))
    mask, grid = acquired["lesion"]
    masks_dir.mkdir(parents=True, exist_ok=True)
    write_nifti(masks_dir / f"{study_uid}_lesion_mask.nii.gz", mask, grid.affine, dtype=np.uint8)
    return study_uid, n + 1


def parse_ratio(text: str) -> tuple[int, int]:
    """``"192:42"`` -> ``(192, 42)`` (recurrence : necrosis)."""
    try:
        a, b = (int(v) for v in text.split(":"))
    except ValueError:
        raise ValueError(f"ratio must look like 192:42, got {text!r}") from None
    if a < 0 or b < 0 or a + b == 0:
        raise ValueError(f"ratio needs non-negative counts with a positive sum, got {text!r}")
    return a, b


def write_cohort(out: Path, *, n: int, seed: int, fmt: str = "nifti", space: str = "study",
                 ratio: tuple[int, int] = DEFAULT_RATIO, masks_in_study: bool = False,
                 spec: InputSpec = InputSpec(),
                 on_subject: Callable[[int, str], None] | None = None) -> CohortInfo:
    """Generate ``n`` subjects of cohort ``seed`` and write them under ``out``.

    Layout: ``space="model"``: ``out/tensors/<study_id>.npy`` (float32 ``spec.shape``, from
    :func:`~recnec_cli.stages.modelinput.make_model_input`); ``space="study"`` with ``fmt="nifti"``:
    ``out/synth-0001/{synth-0001_T1w, _T2w, _ce-gadolinium_T1w}.nii.gz`` + JSON sidecars and the
    lesion mask in ``out/masks/<study_id>_lesion_mask.nii.gz`` (or ``out/<study>/lesion_mask.nii.gz`` with
    ``masks_in_study``); ``fmt="dicom"``: ``out/dicom/<pseudonym>/SE<nnnn>/IM<nnnnn>.dcm`` and
    ``out/masks/<StudyInstanceUID>_lesion_mask.nii.gz`` (the ``_lesion_mask`` suffix keeps
    discovery from taking ``masks/`` for a study). Always ``out/labels.csv`` (``study_id,label``),
    ``out/truth.csv`` (the drawn lesion signs: they reveal the label) and ``out/cohort.json``.
    ``on_subject(i, study_id)`` is called after each subject (progress).

    Raises
    ------
    ValueError
        For an unknown ``fmt`` / ``space``, ``n < 1`` or a bad ``ratio``.
    """
    import time

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    ratio = (int(ratio[0]), int(ratio[1]))
    if min(ratio) < 0 or sum(ratio) == 0:
        raise ValueError(f"bad ratio {ratio}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    labels: list[str] = []
    truth_rows: list[dict] = []
    files = 0
    for i in range(n):
        label = cohort_label(seed=seed, index=i, ratio=ratio)
        plan = plan_subject(seed=seed, index=i, label=label)
        sid = study_name(i)
        if space == "model":
            x, centroid = model_tensor(plan, spec)
            tdir = out / "tensors"
            tdir.mkdir(exist_ok=True)
            np.save(tdir / f"{sid}.npy", x, allow_pickle=False)
            files += 1
        else:
            truth = truth_from_plan(plan)
            centroid = truth.lesion_centroid_ras_mm
            if fmt == "nifti":
                mpath = (out / sid / "lesion_mask.nii.gz") if masks_in_study else (
                    out / "masks" / f"{sid}_lesion_mask.nii.gz")
                files += write_nifti_study(out / sid, sid, truth, mask_path=mpath)
            else:
                sid, k = write_dicom_study(out / "dicom", truth, masks_dir=out / "masks")
                files += k
        ids.append(sid)
        labels.append(label)
        les = plan.lesion
        acq = plan.acquisitions
        truth_rows.append({
            "study_id": sid, "label": label, "latent_z": f"{les.z:.4f}", "pattern": les.pattern,
            "lesion_quotient": f"{les.lesion_quotient:.3f}", "rim_mm": f"{les.rim_mm:.2f}",
            "oedema_mm": f"{les.oedema_mm:.2f}", "mean_radius_mm": f"{np.mean(les.radii_mm):.2f}",
            "enhancement": f"{les.enhancement:.3f}",
            "centroid_ras_mm": " ".join(f"{v:.2f}" for v in centroid),
            "vendor": acq["T1ce"].vendor, "field_t": acq["T1ce"].field_t,
            "t1_mode": acq["T1"].mode, "t2_mode": acq["T2"].mode, "t1ce_mode": acq["T1ce"].mode,
            "language": acq["T1ce"].language,
        })
        logger.debug("subject %d (%s): %s", i, sid, label)
        if on_subject is not None:
            on_subject(i, sid)
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["study_id", "label"])
        w.writerows(zip(ids, labels))
    with open(out / "truth.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(truth_rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(truth_rows)
    meta = {
        "generator": "recnec synth", "generator_version": GENERATOR_VERSION, "seed": seed, "n": n,
        "ratio": list(ratio), "format": fmt if space == "study" else None, "space": space,
        "masks": ("in_study" if masks_in_study else "masks/") if space == "study" else None,
        "counts": {"recurrence": labels.count("recurrence"), "necrosis": labels.count("necrosis")},
        "input_spec": spec.to_dict() if space == "model" else None,
        "anatomy": "MNI152 ICBM 2009a symmetric T1 + GM/WM maps bundled with nilearn",
    }
    (out / "cohort.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
    return CohortInfo(out=out, n=n, seed=seed, fmt=fmt, space=space, ratio=ratio,
                      study_ids=tuple(ids), labels=tuple(labels),
                      seconds=time.perf_counter() - t0, files=files + 3)
