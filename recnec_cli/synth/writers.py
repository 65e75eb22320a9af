"""Write a synthetic cohort: NIfTI or DICOM studies, or model-space tensors, plus labels.

Byte-for-byte reproducible: no wall-clock time anywhere (dates and times come from the seed),
gzip headers with mtime 0 and no file name, DICOM UIDs derived from the seed
(:func:`derived_uid`: ``2.25.`` + a name-based UUID).

With follow-ups (``write_cohort(..., follow_ups=K)``, study space only) every subject gets K
later studies besides its baseline (:func:`~recnec_cli.synth.subject.follow_up_plans`), and
``follow_ups.csv`` gives the true lesion compartment volumes of every time point.
"""

from __future__ import annotations

import csv
import datetime
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
from .constants import STORE_GAIN, derived_uid, study_date, time_of_day
from .dicom import write_series
from .series import SeriesGrid, acquire, motion_matrix, series_grid
from .subject import DEFAULT_RATIO, GENERATOR_VERSION, cohort_label, follow_up_plans, plan_subject
from .truth import COMPARTMENTS, SubjectTruth, model_tensor, truth_from_plan

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom")
SPACES = ("study", "model")
NIFTI_NAMES = {"T1": "{sid}_T1w.nii.gz", "T2": "{sid}_T2w.nii.gz",
               "T1ce": "{sid}_ce-gadolinium_T1w.nii.gz"}
#: columns of ``follow_ups.csv`` (see :func:`write_cohort`)
FOLLOW_UP_COLUMNS = ("subject", "time_point", "study_id", "days_since_baseline", "label",
                     *COMPARTMENTS)


@dataclass(frozen=True)
class CohortInfo:
    """What :func:`write_cohort` wrote. ``n`` is the number of subjects; ``study_ids`` and
    ``labels`` have one entry per study, in subject order and, with ``follow_ups`` K > 0, time
    point order within a subject (``n * (K + 1)`` entries)."""

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
    follow_ups: int = 0


def study_name(index: int) -> str:
    """Folder / study id of subject ``index`` (0-based) in NIfTI and model space."""
    return f"synth-{index + 1:04d}"


def session_id(index: int, time_point: int, *, width: int = 2) -> str:
    """Study id of time point ``time_point`` (0 = baseline) of subject ``index`` (0-based) in a
    NIfTI cohort with follow-ups: its folder relative to the output, BIDS-style
    (``sub-synth0001/ses-00``); ``width`` digits of session number."""
    return f"sub-synth{index + 1:04d}/ses-{time_point:0{width}d}"


def subject_name(index: int) -> str:
    """The subject column of ``follow_ups.csv`` (``synth-0001``), whatever the format."""
    return study_name(index)


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


def _sidecar(acq: Acquisition, acquisition_date: datetime.date | None = None) -> dict:
    """BIDS-style JSON sidecar (times in seconds, BIDS 1.9) for NIfTI series; with
    ``acquisition_date`` also ``AcquisitionDateTime`` (``YYYY-MM-DDThh:mm:ss``, as dcm2niix writes
    it: that date at the series time)."""
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
    if acquisition_date is not None:
        d["AcquisitionDateTime"] = (f"{acquisition_date.isoformat()}T"
                                    f"{time_of_day(acq.series_time_s, colons=True)[:8]}")
    return d


def write_nifti_study(folder: Path, sid: str, truth: SubjectTruth, *, mask_path: Path,
                      acquisition_date: datetime.date | None = None) -> int:
    """Write one study as three NIfTI series (+ JSON sidecars) and its lesion mask.

    Files ``folder/<sid>_{T1w,T2w,ce-gadolinium_T1w}.nii.gz`` (int16, each on its series grid,
    head motion applied) with ``.json`` sidecars, and ``mask_path`` (uint8 0/1 on the T1ce grid).
    ``acquisition_date`` adds ``AcquisitionDateTime`` to the sidecars. Returns the file count (7).
    """
    folder.mkdir(parents=True, exist_ok=True)
    acquired = _acquire_study(truth)
    for role in ("T1", "T2", "T1ce"):
        img, grid = acquired[role]
        acq = truth.acquisitions[role]
        name = NIFTI_NAMES[role].format(sid=sid)
        write_nifti(folder / name, _stored(img, acq), grid.affine)
        side = json.dumps(_sidecar(acq, acquisition_date), indent=1, sort_keys=True) + "\n"
        (folder / name.replace(".nii.gz", ".json")).write_text(side, encoding="utf-8")
    mask, grid = acquired["lesion"]
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    write_nifti(mask_path, mask, grid.affine, dtype=np.uint8)
    return 7


def write_dicom_study(root: Path, truth: SubjectTruth, *, masks_dir: Path) -> tuple[str, int]:
    """Write one study as three DICOM series, one file per slice; returns (StudyInstanceUID, n).

    Baseline (``truth.time_point == 0``): ``root/<pseudonym>/SE<nnnn>/IM<nnnnn>.dcm``. Follow-up
    ``k``: ``root/<pseudonym>-fu<k>/...``, same PatientID and PatientName, its own StudyInstanceUID
    (``derived_uid(seed, index, "study", "follow-up", k)``), series and frame-of-reference UIDs,
    dates ``truth.days_since_baseline`` after the baseline's. The lesion mask (uint8, T1ce grid)
    goes to ``masks_dir/<StudyInstanceUID>_lesion_mask.nii.gz``.
    """
    seed, index, tp = truth.seed, truth.index, truth.time_point
    fu: tuple[object, ...] = ("follow-up", tp) if tp else ()
    study_uid = _uid(seed, index, "study", *fu)
    pseudo = hashlib.sha256(f"recnec-synth/{seed}/{index}".encode()).hexdigest()[:12]
    if tp:
        pseudo = f"{pseudo}-fu{tp}"
    acquired = _acquire_study(truth)
    n = 0
    for role in ("T1", "T2", "T1ce"):
        img, grid = acquired[role]
        acq = truth.acquisitions[role]
        folder = root / pseudo / f"SE{acq.series_number:04d}"
        n += write_series(folder, img, grid, acq, seed=seed, index=index, study_uid=study_uid,
                          series_uid=_uid(seed, index, "series", role, *fu),
                          frame_uid=_uid(seed, index, "frame", *fu), time_point=tp,
                          days=truth.days_since_baseline)
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
                 spec: InputSpec = InputSpec(), follow_ups: int = 0,
                 on_subject: Callable[[int, str], None] | None = None) -> CohortInfo:
    """Generate ``n`` subjects of cohort ``seed`` and write them under ``out``.

    Layout: ``space="model"``: ``out/tensors/<study_id>.npy`` (float32 ``spec.shape``, from
    :func:`~recnec_cli.stages.modelinput.make_model_input`); ``space="study"`` with ``fmt="nifti"``:
    ``out/synth-0001/{synth-0001_T1w, _T2w, _ce-gadolinium_T1w}.nii.gz`` + JSON sidecars and the
    lesion mask in ``out/masks/<study_id>_lesion_mask.nii.gz`` (or ``out/<study>/lesion_mask.nii.gz`` with
    ``masks_in_study``); ``fmt="dicom"``: ``out/dicom/<pseudonym>/SE<nnnn>/IM<nnnnn>.dcm`` and
    ``out/masks/<StudyInstanceUID>_lesion_mask.nii.gz`` (the ``_lesion_mask`` suffix keeps
    discovery from taking ``masks/`` for a study). Always ``out/labels.csv`` (``study_id,label``),
    ``out/truth.csv`` (the drawn lesion signs: they reveal the label; ``centroid_ras_mm`` is the
    lesion centroid in the world coordinates of the study's T1ce) and ``out/cohort.json``.
    ``on_subject(i, study_id)`` is called after each subject (progress; the subject's last study).

    Follow-ups (``follow_ups`` K > 0, ``space="study"`` only; K = 0 writes exactly what it did
    before the option existed): each subject gets K + 1 studies, time points 0..K
    (:func:`~recnec_cli.synth.subject.follow_up_plans`: same anatomy and label, head repositioned,
    new bias and noise, lesion evolved, 56-120 days apart).

    * DICOM: time point ``k >= 1`` in ``out/dicom/<pseudonym>-fu<k>/``, same PatientID, its own
      StudyInstanceUID (the study id), dates shifted by its days since the baseline.
    * NIfTI: every time point, the baseline included, BIDS-style in
      ``out/sub-synth0001/ses-00/sub-synth0001_ses-00_{T1w,T2w,ce-gadolinium_T1w}.nii.gz`` (study
      id ``sub-synth0001/ses-00``), sidecars with ``AcquisitionDateTime``; masks in
      ``out/masks/sub-synth0001_ses-00_lesion_mask.nii.gz`` (or ``lesion_mask.nii.gz`` in the
      session folder with ``masks_in_study``).
    * ``labels.csv`` and ``truth.csv``: one row per study; ``cohort.json`` gains ``follow_ups``
      and ``studies`` (its ``n`` and ``counts`` count subjects).
    * ``out/follow_ups.csv``: one row per study with ``subject`` (``synth-0001``), ``time_point``
      (0..K), ``study_id``, ``days_since_baseline``, ``label`` and the true compartment volumes
      of :func:`~recnec_cli.synth.truth.compartment_volumes` in mL (4 decimals), computed on the
      1 mm truth grid from the soft compartments (sum of voxel fractions x 0.001 mL):
      ``enhancing_ml`` (enhancing fraction), ``necrotic_ml`` (inside the lesion outline and not
      enhancing), ``oedema_ml`` (oedema fraction, outside the outline) and ``lesion_ml``
      (``enhancing_ml + necrotic_ml``).

    Raises
    ------
    ValueError
        For an unknown ``fmt`` / ``space``, ``n < 1``, a bad ``ratio``, ``follow_ups < 0`` or
        ``follow_ups > 0`` with ``space="model"``.
    """
    import time

    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if space not in SPACES:
        raise ValueError(f"space must be one of {SPACES}, got {space!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if follow_ups < 0:
        raise ValueError(f"follow_ups must be >= 0, got {follow_ups}")
    if follow_ups and space != "study":
        raise ValueError("follow-up studies are written in study space only (space='study')")
    ratio = (int(ratio[0]), int(ratio[1]))
    if min(ratio) < 0 or sum(ratio) == 0:
        raise ValueError(f"bad ratio {ratio}")
    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    labels: list[str] = []
    subject_labels: list[str] = []
    truth_rows: list[dict] = []
    fu_rows: list[dict] = []
    width = max(2, len(str(follow_ups)))
    files = 0
    for i in range(n):
        label = cohort_label(seed=seed, index=i, ratio=ratio)
        subject_labels.append(label)
        plan = plan_subject(seed=seed, index=i, label=label)
        sid = study_name(i)
        for tp in follow_up_plans(plan, follow_ups):
            if space == "model":
                x, centroid = model_tensor(tp, spec)
                tdir = out / "tensors"
                tdir.mkdir(exist_ok=True)
                np.save(tdir / f"{sid}.npy", x, allow_pickle=False)
                files += 1
            else:
                truth = truth_from_plan(tp)
                centroid = truth.lesion_centroid_ras_mm
                if tp.time_point:  # the T1ce of a follow-up moved: its world coordinates
                    m = motion_matrix(tp.acquisitions["T1ce"])
                    centroid = m[:3, :3] @ centroid + m[:3, 3]
                if fmt == "nifti" and follow_ups:
                    sid = session_id(i, tp.time_point, width=width)
                    stem = sid.replace("/", "_")
                    mpath = (out / sid / "lesion_mask.nii.gz") if masks_in_study else (
                        out / "masks" / f"{stem}_lesion_mask.nii.gz")
                    files += write_nifti_study(
                        out / sid, stem, truth, mask_path=mpath,
                        acquisition_date=study_date(seed, i, days=tp.days_since_baseline))
                elif fmt == "nifti":
                    mpath = (out / sid / "lesion_mask.nii.gz") if masks_in_study else (
                        out / "masks" / f"{sid}_lesion_mask.nii.gz")
                    files += write_nifti_study(out / sid, sid, truth, mask_path=mpath)
                else:
                    sid, k = write_dicom_study(out / "dicom", truth, masks_dir=out / "masks")
                    files += k
                if follow_ups:
                    fu_rows.append({
                        "subject": subject_name(i), "time_point": tp.time_point, "study_id": sid,
                        "days_since_baseline": tp.days_since_baseline, "label": label,
                        **{c: f"{truth.volumes_ml[c]:.4f}" for c in COMPARTMENTS}})
                del truth
            ids.append(sid)
            labels.append(label)
            les = tp.lesion
            acq = tp.acquisitions
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
            logger.debug("subject %d (%s), time point %d: %s", i, sid, tp.time_point, label)
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
        "counts": {"recurrence": subject_labels.count("recurrence"),
                   "necrosis": subject_labels.count("necrosis")},
        "input_spec": spec.to_dict() if space == "model" else None,
        "anatomy": "MNI152 ICBM 2009a symmetric T1 + GM/WM maps bundled with nilearn",
    }
    if follow_ups:  # absent without follow-ups: K = 0 writes the same bytes as before the option
        meta["follow_ups"] = follow_ups
        meta["studies"] = len(ids)
        with open(out / "follow_ups.csv", "w", newline="", encoding="utf-8") as f:
            fw = csv.DictWriter(f, fieldnames=list(FOLLOW_UP_COLUMNS), lineterminator="\n")
            fw.writeheader()
            fw.writerows(fu_rows)
        files += 1
    (out / "cohort.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n",
                                     encoding="utf-8")
    return CohortInfo(out=out, n=n, seed=seed, fmt=fmt, space=space, ratio=ratio,
                      study_ids=tuple(ids), labels=tuple(labels),
                      seconds=time.perf_counter() - t0, files=files + 3, follow_ups=follow_ups)
