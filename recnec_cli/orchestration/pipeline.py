"""The only place where recnec's stages are chained.

``preprocess_study`` turns one :class:`~recnec_cli.study.Study` into a model-input tensor (classify
-> convert -> register -> skull-strip -> lesion -> crop); ``run_batch`` runs many studies, feeds
the tensors to the ensemble in batches and returns one :class:`StudyResult` per study, failed or
not. Every stage lives in its own module under :mod:`recnec_cli.stages` and works on what it is
given: models (HD-BET, the ONNX ensemble) are loaded once per process in :class:`Resources` and
passed in (classification's image evidence uses the same HD-BET, ``resources.hdbet``), and one
:class:`~recnec_cli.study.StudyImages` memo per study makes sure each series is converted once and
each volume skull-stripped once, whichever stage needs it first (its seconds are booked to the
convert and skullstrip stages, not to classify).

Stage order and what each study row records (``../shared/FAILURES.md`` kinds are handled inside
the stages; a failure becomes the row's ``status``/``error_code``, the batch goes on):

1. classify (``classify.assign_roles``): T1, T2, T1ce chosen with confidence and reasons;
2. convert (``convert.convert_series``): canonical RAS+ float32 volumes;
3. register (``register``): T1 and T2 rigidly onto the T1ce, all resampled to a
   ``grid_spacing_mm`` isotropic grid covering the T1ce field of view, post-checked;
4. skullstrip (``skullstrip``): HD-BET on the native T1ce, plausibility check, mask resampled;
5. lesion (``lesion``): user mask (``--lesion-masks`` or ``lesion_mask.nii.gz`` in the study), which
   must be on the grid of one of the study's T1 / T2 / T1ce series and lie mostly inside the brain,
   or automatic enhancing-lesion detection;
6. model input (``modelinput.make_model_input``) with the weights manifest's recipe;
7. inference (``infer.Ensemble.predict``), batched over studies.
"""

from __future__ import annotations

import logging
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ..config import Settings
from ..devices import prepare_torch, resolve_hdbet_device
from ..errors import EnvironmentBroken, LesionError, RecnecError, RegistrationError
from ..naming import safe_component
from ..qc.captions import qc_header, qc_result_line
from ..stages.modelinput import InputSpec, box_affine, make_model_input
from ..study import RoleAssignment, SeriesRole, Study, StudyImages, Volume

log = logging.getLogger(__name__)

STAGES = ("classify", "convert", "register", "skullstrip", "lesion", "model_input", "infer")
#: minimum fraction of the brain (on the T1ce grid) that T1 and T2 must cover after registration
MIN_BRAIN_COVERAGE = 0.80


@dataclass
class Resources:
    """Everything loaded once per process: classification rules, HD-BET networks, the ensemble.

    Use :meth:`load`; pass the same object to every :func:`preprocess_study` call.
    """

    settings: Settings
    rules: Any = None
    hdbet: Any = None
    ensemble: Any = None
    spec: InputSpec = field(default_factory=InputSpec)
    decoders: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: Settings, *, need_model: bool = True, need_hdbet: bool = True,
             spec: InputSpec | None = None) -> "Resources":
        """Load rules, HD-BET and (if ``need_model``) the ONNX ensemble from ``settings.weights_dir``.

        Raises
        ------
        EnvironmentBroken
            Missing/corrupt weights or libraries: the whole run fails once (exit code 2) instead
            of every study failing the same way (``../shared/FAILURES.md`` kind 20).
        InferenceError
            ``WEIGHTS_CHECKSUM_MISMATCH`` when a weights file does not match its manifest.
        UsageError
            A broken site rules file.
        """
        from ..stages.classify import load_rules
        from ..stages.convert import decoder_report

        rules = load_rules(settings.rules_file)
        decoders = decoder_report()
        missing = sorted(k for k, ok in decoders.items() if not ok)
        if missing:
            log.warning("no pixel decoder for: %s (series using them will fail "
                        "UNSUPPORTED_TRANSFER_SYNTAX; pip install pylibjpeg pylibjpeg-openjpeg "
                        "pylibjpeg-libjpeg)", ", ".join(missing))
        ensemble = None
        if need_model:
            from ..stages.infer import Ensemble

            ensemble = Ensemble.load(settings.weights_dir, device=settings.device, threads=settings.threads)
            spec = ensemble.spec
        hdbet = None
        if need_hdbet:
            from ..stages.skullstrip import get_hdbet

            prepare_torch(settings.threads)
            hdbet = get_hdbet(mode=settings.hdbet_mode,
                              device=resolve_hdbet_device(settings.device, settings.hdbet_backend),
                              tta=settings.hdbet_tta, backend=settings.hdbet_backend, threads=settings.threads,
                              cache_dir=settings.cache_dir)
        return cls(settings=settings, rules=rules, hdbet=hdbet, ensemble=ensemble,
                   spec=spec or InputSpec(), decoders=decoders)


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """One study made ready for the model.

    ``model_input`` is float32 ``spec.shape`` = ``(C, X, Y, Z)`` (RAS+); lesion figures in world mm
    (RAS+) and mL; ``timings`` in seconds per stage; ``registration`` the per-role rigid offsets.
    """

    study: Study
    assignment: RoleAssignment
    model_input: np.ndarray
    lesion_source: str
    lesion_centroid_ras_mm: tuple[float, float, float]
    lesion_volume_ml: float
    brain_volume_ml: float
    registration: dict[str, dict[str, float | str]]
    flags: tuple[str, ...]
    timings: dict[str, float]


@dataclass
class StudyResult:
    """One report row's worth of facts about one study (see :mod:`recnec_cli.orchestration.report`)."""

    study: Study
    status: str = "OK"
    error_code: str = ""
    error_message: str = ""
    failed_stage: str = ""
    assignment: RoleAssignment | None = None
    preprocessed: Preprocessed | None = None
    #: calibrated probability of recurrence (the reported one); ``probability_raw`` before calibration
    probability: float | None = None
    probability_raw: float | None = None
    spread: float | None = None
    label: str = ""
    #: applicability distance to the training inputs (NaN: weights without an applicability model)
    #: and whether it is beyond the manifest threshold (:mod:`recnec_cli.stages.applicability`)
    applicability_distance: float | None = None
    out_of_distribution: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    #: QC pictures (``--qc``): ``name`` (file stem), ``png``, ``thumb``, ``explain`` (file names in the QC folder)
    qc: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "OK"


@contextmanager
def _timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    t0 = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - t0


def preprocess_study(study: Study, *, settings: Settings, resources: Resources,
                     assignment: RoleAssignment | None = None, qc: Any = None) -> Preprocessed:
    """Run one study from its series to the model-input tensor (see the module docstring).

    ``qc``: a :class:`recnec_cli.qc.figures.StudySnapshot` to fill with what each stage makes
    (volumes, grid, masks, lesion), so the QC picture can show it, also when a later stage fails.

    Raises
    ------
    RecnecError
        Any stage's error (its ``code`` goes to the report), with three attributes added:
        ``stage`` (name of the failed stage), ``timings`` (seconds of the stages run) and
        ``assignment`` (the role assignment, when classification got that far).
    """
    from ..stages import classify, convert, lesion, register, skullstrip

    timings: dict[str, float] = {}
    stage = "classify"
    flags: list[str] = []
    images = StudyImages()  # each series converted once, each volume skull-stripped once
    try:
        with _timed(timings, stage):
            if assignment is None:
                assignment = classify.assign_roles(study, settings=settings, rules=resources.rules,
                                                   images=images, hdbet=resources.hdbet)
        # image evidence converted and skull-stripped some series: book that time to its stages
        for st, sec in images.seconds.items():
            timings[stage] -= sec
            timings[st] = timings.get(st, 0.0) + sec
        images.seconds.clear()
        if assignment.status:
            from ..errors import ClassificationError

            msg = assignment.message or assignment.status
            if assignment.decisions:  # what was found instead, so the row explains itself
                msg += "; found: " + _decisions_summary(assignment)
            if study.issues:  # e.g. an unreadable file explains a missing role
                msg += " (discovery: " + "; ".join(study.issues) + ")"
            raise ClassificationError(msg, code=assignment.status)
        stage = "convert"
        vols: dict[SeriesRole, Volume] = {}
        with _timed(timings, stage):
            for role in SeriesRole.model_roles():
                series = assignment.chosen[role]
                try:
                    vols[role] = images.volume(series, lambda s: convert.convert_series(s, settings=settings))
                except RecnecError as exc:  # name the series the error is about
                    exc.message = f"{exc.message} [{role.value} series {_short_id(series.series_id)}]"
                    raise
                flags.extend(f"{role.value}:{f}" for f in vols[role].flags)
                if qc is not None:
                    qc.volumes[role.value] = vols[role]
        stage = "lesion"  # a user mask is checked now, before the expensive stages
        with _timed(timings, stage):
            mask_path = lesion.find_user_mask(study.lesion_mask, settings.lesion_masks_dir, study.study_id)
            mvol = None
            if mask_path is not None:
                mvol = convert.read_image_file(mask_path)
                if not any(_same_grid(mvol, vols[r]) for r in SeriesRole.model_roles()):
                    raise LesionError(
                        f"user lesion mask {mask_path.name} (shape {tuple(np.shape(mvol.data))}, voxel "
                        f"{tuple(round(v, 2) for v in mvol.spacing_mm)} mm) is on none of the study's T1 / T2 / "
                        "T1ce grids; save it on the grid of the series it was drawn on",
                        code="LESION_MASK_GRID_MISMATCH")
        stage = "register"
        with _timed(timings, stage):
            fixed = vols[SeriesRole.T1CE]
            shape, grid_aff = register.common_grid(fixed, settings.grid_spacing_mm)
            on_grid: dict[SeriesRole, np.ndarray] = {
                SeriesRole.T1CE: register.resample_to_grid(fixed, shape, grid_aff)}
            if qc is not None:
                qc.grid_affine, qc.on_grid, qc.registration = grid_aff, {}, {}
                qc.on_grid[SeriesRole.T1CE.value] = on_grid[SeriesRole.T1CE]
            transforms: dict[SeriesRole, Any] = {}
            reg_info: dict[str, dict[str, float | str]] = {}
            for role in (SeriesRole.T1, SeriesRole.T2):
                try:
                    res = register.register_rigid(
                        fixed, vols[role], max_translation_mm=settings.registration_max_translation_mm,
                        max_rotation_deg=settings.registration_max_rotation_deg)
                except RecnecError as exc:
                    exc.message = f"{role.value} onto T1ce: {exc.message}"
                    raise
                transforms[role] = res.transform
                reg_info[role.value] = {"translation_mm": round(res.translation_mm, 3),
                                        "rotation_deg": round(res.rotation_deg, 3),
                                        "metric": round(res.metric, 5), "initialisation": res.initialisation}
                on_grid[role] = register.resample_to_grid(vols[role], shape, grid_aff, res.transform)
                if qc is not None:
                    qc.on_grid[role.value] = on_grid[role]
                    qc.registration[role.value] = reg_info[role.value]
        stage = "skullstrip"
        with _timed(timings, stage):
            native_mask = images.brain_mask(assignment.chosen[SeriesRole.T1CE].series_id, fixed, resources.hdbet)
            check = skullstrip.check_brain_mask(native_mask, fixed.affine)
            brain = register.resample_to_grid(
                Volume(native_mask.astype(np.float32), fixed.affine), shape, grid_aff) > 0.5
            if qc is not None:
                qc.brain = brain
        stage = "register"
        with _timed(timings, stage):
            for role in (SeriesRole.T1, SeriesRole.T2):
                cov = register.coverage_fraction(vols[role], shape, grid_aff, transforms[role], brain)
                reg_info[role.value]["brain_coverage"] = round(cov, 4)
                if cov < MIN_BRAIN_COVERAGE:
                    raise RegistrationError(
                        f"{role.value} covers only {cov:.0%} of the brain after registration "
                        f"(need {MIN_BRAIN_COVERAGE:.0%})", code="INCOMPLETE_COVERAGE")
        stage = "lesion"
        with _timed(timings, stage):
            if mvol is not None:
                m = register.resample_to_grid(mvol, shape, grid_aff, order=0) > 0.5
                les = lesion.lesion_from_mask(m, grid_aff)
                inside = float(np.count_nonzero(m & brain)) / max(1, int(np.count_nonzero(m)))
                if inside < lesion.MIN_MASK_IN_BRAIN:
                    raise LesionError(
                        f"user lesion mask {mask_path.name}: only {inside:.0%} of it lies inside the brain "
                        f"(need {lesion.MIN_MASK_IN_BRAIN:.0%}); is it on this study's grid?",
                        code="LESION_MASK_OUTSIDE_BRAIN")
            else:
                les = lesion.detect_enhancing_lesion(
                    on_grid[SeriesRole.T1CE], brain, grid_aff, t1=on_grid[SeriesRole.T1],
                    t2=on_grid[SeriesRole.T2],
                    min_volume_ml=settings.lesion_min_volume_ml)
                if les.ambiguous:
                    flags.append(lesion.AMBIGUOUS_FLAG)
            if qc is not None:
                qc.lesion, qc.lesion_centroid_ras_mm = les.mask, tuple(float(v) for v in les.centroid_ras_mm)
                qc.box_mm = float(resources.spec.size_vox[0] * resources.spec.spacing_mm)
        stage = "model_input"
        with _timed(timings, stage):
            spec = resources.spec
            by_name = {"T1": on_grid[SeriesRole.T1], "T2": on_grid[SeriesRole.T2], "T1ce": on_grid[SeriesRole.T1CE]}
            x = make_model_input([by_name[c] for c in spec.channels], brain, grid_aff, les.centroid_ras_mm, spec)
        if settings.keep_intermediate_dir is not None:
            _write_intermediate(settings.keep_intermediate_dir, study, grid_aff, on_grid, brain, les.mask, x, spec,
                                les.centroid_ras_mm, native_mask, fixed.affine)
    except Exception as exc:
        # remember where it failed, for the report row (unexpected errors too); the error is unchanged
        exc.stage, exc.timings, exc.assignment = stage, timings, assignment  # type: ignore[attr-defined]
        raise
    return Preprocessed(
        study=study, assignment=assignment, model_input=x, lesion_source=les.source,
        lesion_centroid_ras_mm=tuple(float(v) for v in les.centroid_ras_mm),  # type: ignore[arg-type]
        lesion_volume_ml=les.volume_ml, brain_volume_ml=check.volume_ml, registration=reg_info,
        flags=tuple(flags), timings=timings)


def _same_grid(a: Volume, b: Volume, tol_mm: float = 0.1) -> bool:
    """True when two canonical volumes share shape and voxel->world affine (within ``tol_mm``)."""
    return (np.shape(a.data) == np.shape(b.data)
            and bool(np.allclose(np.asarray(a.affine), np.asarray(b.affine), atol=tol_mm)))


def _short_id(series_id: str) -> str:
    """A series id short enough for a message: the file name, or the UID's last digits."""
    if "/" in series_id or series_id.lower().endswith((".nii", ".nii.gz", ".nrrd")):
        return series_id.rsplit("/", 1)[-1]
    return series_id if len(series_id) <= 20 else "..." + series_id[-16:]


def _decisions_summary(assignment: RoleAssignment, limit: int = 8) -> str:
    """``name=ROLE`` per series (with the first reason for non-model roles), for MISSING_ROLE rows."""
    parts = []
    for d in assignment.decisions[:limit]:
        item = f"{_short_id(d.series_id)}={d.role.value}"
        if d.role not in SeriesRole.model_roles() and d.reasons:
            item += f" ({d.reasons[0][:60]})"
        parts.append(item)
    if len(assignment.decisions) > limit:
        parts.append(f"+{len(assignment.decisions) - limit} more")
    return ", ".join(parts)


def study_key(study: Study) -> str:
    """File-system-safe name for a study's outputs: its UID or id, never a patient name."""
    return safe_component(study.study_id)


def _write_intermediate(root: Path, study: Study, affine, on_grid, brain, lesion_mask, x, spec, centre,
                        native_mask, native_affine) -> None:
    """Write co-registered volumes, brain and lesion masks and the model box as NIfTI for review.

    Files in ``root/<study key>/``: ``t1_coreg``, ``t2_coreg``, ``t1ce_coreg`` (common grid),
    ``brain_mask`` and ``lesion_mask`` (common grid), ``brain_mask_t1ce_native`` (HD-BET's mask on the
    T1ce's own grid) and ``model_input_box`` (the model tensor, channels last, on the box grid).
    """
    import nibabel as nib

    out = Path(root) / study_key(study)
    out.mkdir(parents=True, exist_ok=True)
    names = {SeriesRole.T1: "t1", SeriesRole.T2: "t2", SeriesRole.T1CE: "t1ce"}
    for role, arr in on_grid.items():
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(out / f"{names[role]}_coreg.nii.gz"))
    nib.save(nib.Nifti1Image(brain.astype(np.uint8), affine), str(out / "brain_mask.nii.gz"))
    nib.save(nib.Nifti1Image(lesion_mask.astype(np.uint8), affine), str(out / "lesion_mask.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(native_mask, dtype=np.uint8), native_affine),
             str(out / "brain_mask_t1ce_native.nii.gz"))
    box = nib.Nifti1Image(np.moveaxis(x, 0, -1).astype(np.float32), box_affine(centre, spec))
    nib.save(box, str(out / "model_input_box.nii.gz"))


def process_study(study: Study, *, settings: Settings, resources: Resources,
                  qc_name: str | None = None) -> StudyResult:
    """Preprocess one study into a :class:`StudyResult`: ready for inference (``preprocessed`` set,
    ``status`` ``OK``) or failed (``status`` / ``error_code`` / ``failed_stage`` set).

    With ``settings.qc_dir`` the study picture is drawn here, where the volumes are (also for a
    failed study, from what the stages before the failure made), and written to
    ``qc_dir/<qc_name>.png`` (``qc_name`` from :func:`recnec_cli.qc.files.qc_stem`; derived with
    the site pseudonym key when not given); only the file names travel back in ``result.qc``.

    A study error never escapes: stage errors become their code, ``MemoryError`` becomes
    ``OUT_OF_MEMORY`` and unexpected exceptions ``INTERNAL_ERROR`` (type name only in the message:
    exception text can hold paths or header values; the traceback goes to DEBUG).

    Raises
    ------
    EnvironmentBroken
        The installation cannot run any study (the run fails once, not every study).
    """
    r = StudyResult(study=study)
    snap = None
    if settings.qc_dir is not None:
        from ..qc.figures import StudySnapshot

        snap = StudySnapshot()
    try:
        pre = preprocess_study(study, settings=settings, resources=resources, qc=snap)
    except EnvironmentBroken:
        raise
    except RecnecError as exc:
        r.assignment = getattr(exc, "assignment", None)
        r.timings.update(getattr(exc, "timings", {}))
        _fail(r, getattr(exc, "stage", "preprocess"), exc.code, exc.message)
    except MemoryError:
        _fail(r, "preprocess", "OUT_OF_MEMORY", "study needed more memory than available (or than --max-memory)")
    except Exception as exc:  # noqa: BLE001 - the batch must go on (STYLE.md habit 3)
        if "allocate" in str(exc).lower() and "memory" in str(exc).lower():  # torch / ITK allocators
            _fail(r, "preprocess", "OUT_OF_MEMORY", f"study needed more memory than available ({type(exc).__name__})")
        else:
            log.debug("unexpected error in study %s:\n%s", study_key(study), traceback.format_exc())
            r.assignment = getattr(exc, "assignment", None)
            r.timings.update(getattr(exc, "timings", {}))
            _fail(r, getattr(exc, "stage", "preprocess"), "INTERNAL_ERROR",
                  f"unexpected {type(exc).__name__}; rerun with -v for the traceback in the log")
    else:
        r.preprocessed = pre
        r.assignment = pre.assignment
        r.timings.update(pre.timings)
    if snap is not None:
        _draw_study_picture(r, snap, settings=settings, qc_name=qc_name)
    if not r.ok:
        r.timings["total"] = sum(v for k, v in r.timings.items() if k != "total")
    return r


def qc_name_of(study: Study, settings: Settings, key: Any = None) -> str:
    """The file-name stem of a study's QC pictures (:func:`recnec_cli.qc.files.qc_stem`): the
    StudyInstanceUID, or a keyed pseudonym of a NIfTI / NRRD study id (``key``, or the site key of
    ``settings.pseudonym_key_file``)."""
    from ..qc.files import qc_stem

    if key is None and study.source != "dicom":
        from ..pseudonym import load_key

        key = load_key(settings.pseudonym_key_file)
    return qc_stem(study.study_id, study.source, key)


def _draw_study_picture(r: StudyResult, snap: Any, *, settings: Settings, qc_name: str | None) -> None:
    """Write the study picture of ``r`` into ``settings.qc_dir``; a drawing error is logged and
    never changes the study's row (the picture is a view of the result, not part of it)."""
    from ..qc.figures import render_study
    from ..qc.files import thumb_name

    t0 = time.perf_counter()
    try:
        name = qc_name or qc_name_of(r.study, settings)
        r.qc["name"] = name
        qc_dir = Path(settings.qc_dir)  # type: ignore[arg-type]
        pic = render_study(snap, qc_dir / f"{name}.png", header=[qc_header(r, name), qc_result_line(r, None)],
                           name=name, thumb=qc_dir / thumb_name(f"{name}.png"))
        if pic is not None:
            r.qc["png"] = pic.path.name
            if pic.thumb is not None:
                r.qc["thumb"] = pic.thumb.name
    except Exception as exc:  # noqa: BLE001 - a picture must never fail a study; logged, not hidden
        log.warning("study %s: QC picture not drawn (%s)", study_key(r.study), type(exc).__name__)
        log.debug("QC picture error:\n%s", traceback.format_exc())
    r.timings["qc"] = r.timings.get("qc", 0.0) + time.perf_counter() - t0


def finish_qc(r: StudyResult, *, ensemble: Any, settings: Settings) -> None:
    """The QC work that needs the ensemble, in the process that holds it (after
    :func:`infer_batch`): the study picture's result line is stamped (probability, spread, label,
    or the failure) and, with ``settings.explain``, the explanation map is computed through the
    ensemble (:func:`recnec_cli.qc.explain.occlusion_sensitivity` on the model input) and drawn
    over the model-input T1ce (``<name>.explain.png``). Seconds go to ``timings["qc"]`` /
    ``timings["explain"]``; errors are logged and never change the study's row."""
    if settings.qc_dir is None:
        return
    qc_dir = Path(settings.qc_dir)
    threshold = report_threshold_of(ensemble)
    t_start = t0 = time.perf_counter()
    try:
        if r.qc.get("png"):
            from ..qc.figures import stamp_result

            stamp_result(qc_dir / r.qc["png"], qc_result_line(r, threshold))
    except Exception as exc:  # noqa: BLE001 - see _draw_study_picture
        log.warning("study %s: QC result line not drawn (%s)", study_key(r.study), type(exc).__name__)
        log.debug("QC stamp error:\n%s", traceback.format_exc())
    r.timings["qc"] = r.timings.get("qc", 0.0) + time.perf_counter() - t0
    if settings.explain and r.ok and r.preprocessed is not None and ensemble is not None:
        t0 = time.perf_counter()
        try:
            _draw_explanation(r, ensemble=ensemble, settings=settings, threshold=threshold)
        except Exception as exc:  # noqa: BLE001 - see _draw_study_picture
            log.warning("study %s: explanation map not drawn (%s)", study_key(r.study), type(exc).__name__)
            log.debug("explanation error:\n%s", traceback.format_exc())
        r.timings["explain"] = time.perf_counter() - t0
    r.timings["total"] = r.timings.get("total", 0.0) + time.perf_counter() - t_start


def _draw_explanation(r: StudyResult, *, ensemble: Any, settings: Settings, threshold: float | None) -> None:
    from ..qc.explain import occlusion_sensitivity
    from ..qc.figures import render_explanation

    pre = r.preprocessed
    spec = ensemble.spec
    name = r.qc.get("name") or qc_name_of(r.study, settings)
    r.qc["name"] = name
    occ = occlusion_sensitivity(ensemble, pre.model_input)  # type: ignore[union-attr]
    t1ce = pre.model_input[list(spec.channels).index("T1ce")]  # type: ignore[union-attr]
    notes = [f"occlusion sensitivity through the {getattr(ensemble, 'n_models', '?')}-model ONNX ensemble:",
             f"a {occ.patch_vox * spec.spacing_mm:g} mm cube (all channels) set to 0 = brain median, "
             f"moved in {occ.stride_vox * spec.spacing_mm:g} mm steps;",
             f"{occ.passes} ensemble passes, {occ.seconds:.1f} s", "",
             f"p(recurrence) {occ.p:.3f}", f"largest change {float(np.abs(occ.delta).max()):.3g}", "",
             f"model box {spec.size_vox[0] * spec.spacing_mm:g} mm centred on the lesion"]
    path = Path(settings.qc_dir) / f"{name}.explain.png"  # type: ignore[arg-type]
    render_explanation(t1ce, occ.delta, box_affine(pre.lesion_centroid_ras_mm, spec), path,  # type: ignore[union-attr]
                       header=[qc_header(r, name), qc_result_line(r, threshold)], name=name, notes=notes)
    r.qc["explain"] = path.name


def report_threshold_of(ensemble: Any) -> float | None:
    """The ensemble's threshold on the reported (calibrated) probability, or ``None``."""
    if ensemble is None:
        return None
    return float(getattr(ensemble, "report_threshold", ensemble.threshold))


def infer_batch(ready: Sequence[StudyResult], *, ensemble: Any) -> None:
    """Run the ensemble once on the model inputs of ``ready`` (preprocessed, OK results) and fill
    in ``probability`` (calibrated), ``probability_raw``, ``spread``, ``label``,
    ``applicability_distance`` / ``out_of_distribution`` and ``timings["infer"]`` /
    ``timings["total"]``. The label compares the raw ensemble mean with the manifest threshold
    (the calibration map is increasing, so the calibrated probability and threshold agree).

    ``ensemble.predict`` takes float32 ``(N, C, X, Y, Z)``; batched and one-by-one results agree
    within 1e-5 (``tests/test_infer.py``). An inference error fails every study of the batch with
    its code (stage ``infer``); the results are updated in place.
    """
    if not ready:
        return
    batch = np.stack([r.preprocessed.model_input for r in ready]).astype(np.float32)  # type: ignore[union-attr]
    t0 = time.perf_counter()
    try:
        pred = ensemble.predict(batch)
    except RecnecError as exc:
        for r in ready:
            _fail(r, "infer", exc.code, exc.message)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: this batch fails, the run goes on
        log.debug("unexpected inference error:\n%s", traceback.format_exc())
        for r in ready:
            _fail(r, "infer", "INTERNAL_ERROR", f"unexpected {type(exc).__name__} in inference; rerun with -v "
                  "for the traceback in the log")
    else:
        per = (time.perf_counter() - t0) / len(ready)
        thr = float(ensemble.threshold)
        calibrated = pred.probability if getattr(pred, "probability", None) is not None else pred.mean
        for i, r in enumerate(ready):
            r.probability_raw = float(pred.mean[i])
            r.probability = float(calibrated[i])
            r.spread = float(pred.spread[i])
            r.label = "recurrence" if r.probability_raw >= thr else "necrosis"
            if getattr(pred, "distance", None) is not None:
                r.applicability_distance = float(pred.distance[i])
                r.out_of_distribution = bool(pred.out_of_distribution[i])
                if r.out_of_distribution:
                    log.info("study %s: applicability distance %.1f is beyond the training data's "
                             "threshold: flagged OUT_OF_DISTRIBUTION", study_key(r.study), r.applicability_distance)
            r.timings["infer"] = per
    for r in ready:
        r.timings["total"] = sum(v for k, v in r.timings.items() if k != "total")


def run_batch(studies: Sequence[Study], *, settings: Settings, resources: Resources,
              on_study_done: Callable[[StudyResult], None] | None = None,
              on_study_start: Callable[[Study], None] | None = None) -> list[StudyResult]:
    """Preprocess every study in this process, run the ensemble in batches of ``settings.batch_size``.

    The simple serial form of what :func:`recnec_cli.orchestration.scan.scan` does with state,
    workers and incremental reports. One bad study never stops the batch (see
    :func:`process_study`). Results are returned in input order.

    Raises
    ------
    EnvironmentBroken
        From :func:`process_study`: the installation cannot run any study.
    """
    results: list[StudyResult] = []
    pending: list[StudyResult] = []

    def flush() -> None:
        infer_batch(pending, ensemble=resources.ensemble)
        for r in pending:
            finish_qc(r, ensemble=resources.ensemble, settings=settings)
            if on_study_done:
                on_study_done(r)
        pending.clear()

    for study in studies:
        if on_study_start:
            on_study_start(study)
        r = process_study(study, settings=settings, resources=resources)
        results.append(r)
        if r.ok:
            pending.append(r)
            if len(pending) >= settings.batch_size:
                flush()
        else:
            finish_qc(r, ensemble=resources.ensemble, settings=settings)
            if on_study_done:
                on_study_done(r)
    flush()
    return results


def _fail(r: StudyResult, stage: str, code: str, message: str) -> None:
    r.status = code.split(":")[0].strip() or "FAILED"
    r.error_code = r.status
    r.error_message = message
    r.failed_stage = stage
    # INFO: the row carries it, and `--quiet` (cron) must stay one summary line however many fail
    log.info("study %s failed at %s: %s", study_key(r.study), stage, code)
