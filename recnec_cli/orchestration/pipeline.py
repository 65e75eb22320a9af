"""The per-study pipeline: the only place where recnec's stages are chained.

:data:`STEPS` is the pipeline, one :class:`Step` per entry, run in order over one
:class:`StudyContext` per study by :func:`run_steps`; a new step (a lesion segmenter, FLAIR, a DICOM
output) is one more entry. ``preprocess_study`` / ``process_study`` turn one
:class:`~recnec_cli.study.Study` into a model-input tensor or a failed
:class:`~recnec_cli.results.StudyResult`; ``infer_batch`` runs the ensemble on a batch of them.
Every stage lives in its own module under :mod:`recnec_cli.stages` and works on what it is given:
models (HD-BET, the ONNX ensemble) are loaded once per process in :class:`Resources` and passed in
(classification's image evidence uses the same HD-BET, ``resources.hdbet``), and one
:class:`~recnec_cli.study.StudyImages` memo per study makes sure each series is converted once and
each volume skull-stripped once, whichever step needs it first (its seconds are booked to the
convert and skullstrip stages, not to classify).

The steps, with the report stage (:data:`~recnec_cli.results.STAGES`) each one's seconds and
failures are booked to (the failure kinds each stage handles: ``docs/failure-kinds.md``; a
failure becomes the row's ``status`` / ``error_code`` / ``failed_stage``, the batch goes on):

1. ``classify`` (``classify.assign_roles``): T1, T2, T1ce chosen with confidence and reasons;
2. ``convert`` (``convert.convert_series``): canonical RAS+ float32 volumes;
3. ``user_mask`` (stage ``lesion``): a user mask (``--lesion-masks`` or ``lesion_mask.nii.gz`` in
   the study) must be on the grid of one of the study's T1 / T2 / T1ce series; checked before
   the expensive steps;
4. ``register``: T1 and T2 rigidly onto the T1ce, all resampled to a ``grid_spacing_mm`` isotropic
   grid covering the T1ce field of view;
5. ``skullstrip``: HD-BET on the native T1ce, plausibility check, mask resampled;
   ``brain_mask`` (stage ``skullstrip``): the mask united with a skull-stripped input's own
   foreground and grown across its edge along thick enhancing tissue (``LESION_AT_MASK_EDGE``);
6. ``coverage`` (stage ``register``): T1 and T2 must cover the brain after registration;
7. ``lesion``: the user mask (mostly inside the brain) or automatic enhancing-lesion detection;
8. ``model_input`` (``modelinput.make_model_input``) with the weights manifest's recipe;
9. ``keep_intermediate`` (stage ``model_input``): ``--keep-intermediate`` NIfTI files;

then inference (``infer.Ensemble.predict``, stage ``infer``), batched over studies by
:func:`recnec_cli.orchestration.batching.run_studies`.
"""

from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..config import Settings
from ..devices import prepare_torch, resolve_hdbet_device
from ..errors import EnvironmentBroken, LesionError, RecnecError, RegistrationError, SkullStripError
from ..naming import safe_component
from ..qc.captions import qc_header, qc_result_line
from ..results import STAGES, Preprocessed, StudyFailure, StudyResult
from ..stages.modelinput import InputSpec, box_affine, make_model_input
from ..study import RoleAssignment, SeriesRole, Study, StudyImages, Volume
from . import dicom_export

__all__ = ["STAGES", "STEPS", "Preprocessed", "Resources", "Step", "StudyContext", "StudyFailure", "StudyResult",
           "finish_qc", "infer_batch", "preprocess_study", "process_study", "qc_name_of", "report_threshold_of",
           "run_steps", "snapshot_of", "study_key"]

log = logging.getLogger(__name__)

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
    #: the lesion segmenter (:class:`recnec_cli.stages.segment.Segmenter`); ``None`` with the
    #: heuristic detector or when the weights hold none
    segmenter: Any = None
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
            of every study failing the same way (``docs/failure-kinds.md`` kind 20).
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
        segmenter = load_segmenter(settings) if need_hdbet else None
        return cls(settings=settings, rules=rules, hdbet=hdbet, ensemble=ensemble, segmenter=segmenter,
                   spec=spec or InputSpec(), decoders=decoders)


def load_segmenter(settings: Settings) -> Any:
    """The lesion segmenter of ``settings.weights_dir`` (else the shipped one, INFO: a weights folder
    from ``recnec train`` holds only an ensemble), or ``None`` with ``--lesion-detector heuristic``
    or when neither folder has one (WARNING: the heuristic is used).

    Raises
    ------
    EnvironmentBroken
        ``WEIGHTS_MANIFEST_INVALID`` when ``settings.weights_dir`` holds a ``segmenter.onnx``
        without its ``segmenter.json`` (the shipped segmenter would silently replace it).
    InferenceError
        ``WEIGHTS_CHECKSUM_MISMATCH`` when ``segmenter.onnx`` differs from ``segmenter.json``.
    """
    if settings.lesion_detector != "segmenter":
        return None
    from ..config import default_weights_dir
    from ..stages.lesion_score import LESION_SCORE_FILE
    from ..stages.segment import SEGMENTER_FILE, SEGMENTER_MANIFEST, Segmenter, find_segmenter

    own = Path(settings.weights_dir)
    if (own / SEGMENTER_FILE).is_file() and not (own / SEGMENTER_MANIFEST).is_file():
        raise EnvironmentBroken(f"{own} holds {SEGMENTER_FILE} without its {SEGMENTER_MANIFEST} (its checksum "
                                "and input grid): restore it, or remove the segmenter to use the shipped one",
                                code="WEIGHTS_MANIFEST_INVALID")
    folder = find_segmenter(own, default_weights_dir())
    if folder is None:
        log.warning("no lesion segmenter (segmenter.json) in %s or the shipped weights: lesions come from the "
                    "heuristic detector", settings.weights_dir)
        return None
    if folder.resolve() != own.resolve():
        log.info("no lesion segmenter in %s: the shipped one is used (%s)", own, folder)
        if (own / LESION_SCORE_FILE).is_file():
            log.warning("%s is not used: a lesion score is read only beside its segmenter (%s and %s in the "
                        "same folder); the shipped segmenter's own score is used", own / LESION_SCORE_FILE,
                        SEGMENTER_FILE, SEGMENTER_MANIFEST)
    return Segmenter.load(folder, device=settings.device, threads=settings.threads)


@dataclass
class StudyContext:
    """What the steps of one study have made so far: one per study, filled in step by step, never
    leaving the process that runs the study (the QC picture is drawn from it, also when a step
    fails).

    Geometry: ``volumes`` are canonical RAS+ :class:`~recnec_cli.study.Volume` on their own grids;
    ``grid_shape`` / ``grid_affine`` the common grid (``(X, Y, Z)`` voxels, ``(4, 4)`` voxel -> RAS
    mm) over the T1ce field of view; ``on_grid`` float32 ``(X, Y, Z)`` per role on that grid (T1 and
    T2 registered); ``native_brain_mask`` bool on the T1ce's own grid, ``brain`` bool on the common
    grid; ``lesion`` a :class:`recnec_cli.stages.lesion.Lesion` on the common grid; ``model_input``
    float32 ``(C, X, Y, Z)`` of ``resources.spec``. ``timings``: seconds per stage (:data:`STAGES`).
    """

    study: Study
    settings: Settings
    resources: Resources
    assignment: RoleAssignment | None = None
    images: StudyImages = field(default_factory=StudyImages)
    volumes: dict[SeriesRole, Volume] = field(default_factory=dict)
    user_mask_path: Path | None = None
    user_mask: Volume | None = None
    grid_shape: tuple[int, int, int] | None = None
    grid_affine: np.ndarray | None = None
    on_grid: dict[SeriesRole, np.ndarray] = field(default_factory=dict)
    transforms: dict[SeriesRole, Any] = field(default_factory=dict)
    registration: dict[str, dict[str, float | str]] = field(default_factory=dict)
    native_brain_mask: np.ndarray | None = None
    #: where ``brain`` came from (:class:`recnec_cli.stages.brainmask.RefinedMask` ``source``)
    brain_mask_source: str = ""
    #: how sure the lesion choice is, in [0, 1] (:attr:`recnec_cli.stages.lesion.Lesion.confidence`,
    #: halved when the brain mask had to be grown across its edge)
    lesion_confidence: float = float("nan")
    brain_volume_ml: float = float("nan")
    #: the segmenter's compartments of the chosen lesion (mL): enhancing, necrotic, oedema
    lesion_volumes: dict[str, float] = field(default_factory=dict)
    #: the segmenter's labels on the common grid (:class:`recnec_cli.stages.segment.Segmentation`)
    segmentation: Any = None
    #: the chosen lesion's compartments, uint8 ``(X, Y, Z)`` on the common grid: 1 enhancing, 2 core,
    #: 3 oedema (segmenter); ``None`` for a user mask or the heuristic (``lesion.mask`` is all there is)
    lesion_labels: np.ndarray | None = None
    brain: np.ndarray | None = None
    lesion: Any = None
    model_input: np.ndarray | None = None
    flags: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def measured(self) -> dict[str, Any]:
        """The report columns known so far (for a failed study's row): brain mask source and volume,
        and the segmenter's oedema volume when it ran."""
        out: dict[str, Any] = {}
        if self.brain_mask_source:
            out["brain_mask_source"] = self.brain_mask_source
        if self.brain_volume_ml == self.brain_volume_ml:  # not NaN
            out["brain_volume_ml"] = round(self.brain_volume_ml, 1)
        if "oedema" in self.lesion_volumes:
            out["oedema_volume_ml"] = round(self.lesion_volumes["oedema"], 3)
        return out

    def preprocessed(self) -> Preprocessed:
        """The finished study (after the last step)."""
        les = self.lesion
        return Preprocessed(
            study=self.study, assignment=self.assignment, model_input=self.model_input,
            lesion_source=les.source,
            lesion_centroid_ras_mm=(float(les.centroid_ras_mm[0]), float(les.centroid_ras_mm[1]),
                                    float(les.centroid_ras_mm[2])),
            lesion_volume_ml=les.volume_ml, brain_volume_ml=self.brain_volume_ml,
            registration=self.registration, flags=tuple(self.flags), timings=self.timings,
            brain_mask_source=self.brain_mask_source, lesion_confidence=self.lesion_confidence,
            enhancing_volume_ml=self.lesion_volumes.get("enhancing", float("nan")),
            necrotic_volume_ml=self.lesion_volumes.get("necrotic", float("nan")),
            oedema_volume_ml=self.lesion_volumes.get("oedema", float("nan")))


@dataclass(frozen=True)
class Step:
    """One entry of the per-study pipeline: ``run(ctx)`` reads what earlier steps put into the
    :class:`StudyContext` and adds its own. ``name`` is unique (logs, tests); ``stage`` (one of
    :data:`STAGES`) is where its seconds are booked and what a failure's row says."""

    name: str
    stage: str
    run: Callable[[StudyContext], None]


def _classify(ctx: StudyContext) -> None:
    from ..errors import ClassificationError
    from ..stages import classify

    if ctx.assignment is None:
        ctx.assignment = classify.assign_roles(ctx.study, settings=ctx.settings, rules=ctx.resources.rules,
                                               images=ctx.images, hdbet=ctx.resources.hdbet)
    a = ctx.assignment
    if a.status:
        msg = a.message or a.status
        if a.decisions:  # what was found instead, so the row explains itself
            msg += "; found: " + _decisions_summary(a)
        if ctx.study.issues:  # e.g. an unreadable file explains a missing role
            msg += " (discovery: " + "; ".join(ctx.study.issues) + ")"
        raise ClassificationError(msg, code=a.status)


def _convert(ctx: StudyContext) -> None:
    from ..stages import convert

    for role in SeriesRole.model_roles():
        series = ctx.assignment.chosen[role]
        try:
            vol = ctx.images.volume(series, lambda s: convert.convert_series(s, settings=ctx.settings))
        except RecnecError as exc:  # name the series the error is about
            exc.message = f"{exc.message} [{role.value} series {_short_id(series.series_id)}]"
            raise
        ctx.volumes[role] = vol
        ctx.flags.extend(f"{role.value}:{f}" for f in vol.flags)
    flair = ctx.assignment.chosen.get(SeriesRole.FLAIR)
    if flair is not None:  # optional: a FLAIR that cannot be read is left out, never a failure
        try:
            ctx.volumes[SeriesRole.FLAIR] = ctx.images.volume(
                flair, lambda s: convert.convert_series(s, settings=ctx.settings))
        except RecnecError as exc:
            log.warning("study %s: FLAIR series %s left out (%s: %s)", study_key(ctx.study),
                        _short_id(flair.series_id), exc.code, exc.message)
            ctx.flags.append("FLAIR_UNUSED")


def _check_user_mask(ctx: StudyContext) -> None:
    """A user lesion mask is read and checked now, before the expensive steps."""
    from ..stages import convert, lesion

    path = lesion.find_user_mask(ctx.study.lesion_mask, ctx.settings.lesion_masks_dir, ctx.study.study_id)
    if path is None:
        return
    mvol = convert.read_image_file(path)
    if not any(_same_grid(mvol, ctx.volumes[r]) for r in SeriesRole.model_roles()):
        raise LesionError(
            f"user lesion mask {path.name} (shape {tuple(np.shape(mvol.data))}, voxel "
            f"{tuple(round(v, 2) for v in mvol.spacing_mm)} mm) is on none of the study's T1 / T2 / "
            "T1ce grids; save it on the grid of the series it was drawn on",
            code="LESION_MASK_GRID_MISMATCH")
    ctx.user_mask_path, ctx.user_mask = path, mvol


def _register(ctx: StudyContext) -> None:
    from ..stages import register

    s = ctx.settings
    fixed = ctx.volumes[SeriesRole.T1CE]
    ctx.grid_shape, ctx.grid_affine = register.common_grid(fixed, s.grid_spacing_mm)
    ctx.on_grid[SeriesRole.T1CE] = register.resample_to_grid(fixed, ctx.grid_shape, ctx.grid_affine)
    for role in (SeriesRole.T1, SeriesRole.T2):
        try:
            res = register.register_rigid(fixed, ctx.volumes[role],
                                          max_translation_mm=s.registration_max_translation_mm,
                                          max_rotation_deg=s.registration_max_rotation_deg)
        except RecnecError as exc:
            exc.message = f"{role.value} onto T1ce: {exc.message}"
            raise
        ctx.transforms[role] = res.transform
        ctx.registration[role.value] = {"translation_mm": round(res.translation_mm, 3),
                                        "rotation_deg": round(res.rotation_deg, 3),
                                        "metric": round(res.metric, 5), "initialisation": res.initialisation}
        ctx.on_grid[role] = register.resample_to_grid(ctx.volumes[role], ctx.grid_shape, ctx.grid_affine,
                                                      res.transform)
    if SeriesRole.FLAIR in ctx.volumes:  # optional: a FLAIR that does not register is left out
        try:
            res = register.register_rigid(fixed, ctx.volumes[SeriesRole.FLAIR],
                                          max_translation_mm=s.registration_max_translation_mm,
                                          max_rotation_deg=s.registration_max_rotation_deg)
        except RecnecError as exc:
            log.warning("study %s: FLAIR left out, it does not register onto the T1ce (%s)",
                        study_key(ctx.study), exc.code)
            ctx.flags.append("FLAIR_UNUSED")
            return
        ctx.registration["FLAIR"] = {"translation_mm": round(res.translation_mm, 3),
                                     "rotation_deg": round(res.rotation_deg, 3), "metric": round(res.metric, 5),
                                     "initialisation": res.initialisation}
        ctx.on_grid[SeriesRole.FLAIR] = register.resample_to_grid(
            ctx.volumes[SeriesRole.FLAIR], ctx.grid_shape, ctx.grid_affine, res.transform)


def _skullstrip(ctx: StudyContext) -> None:
    from ..stages import register, skullstrip

    fixed = ctx.volumes[SeriesRole.T1CE]
    native = ctx.images.brain_mask(ctx.assignment.chosen[SeriesRole.T1CE].series_id,
                                   fixed, ctx.resources.hdbet)
    try:
        check = skullstrip.check_brain_mask(native, fixed.affine)
    except SkullStripError as exc:
        # a skull-stripped input whose own brain will replace HD-BET's (_refine_brain_mask: HD-BET
        # put part of its mask where the input holds no image) is judged by that brain instead
        from ..stages import brainmask

        own = brainmask.input_foreground(fixed.data, native, fixed.affine)
        if own is None or not brainmask.hdbet_failed_on(native, own):
            raise
        log.warning("study %s: HD-BET's brain mask failed its check (%s); the skull-stripped input's own "
                    "brain replaces it", study_key(ctx.study), exc.message)
        check = skullstrip.check_brain_mask(own, fixed.affine)
    ctx.native_brain_mask, ctx.brain_volume_ml = native, check.volume_ml
    ctx.brain = register.resample_to_grid(Volume(native.astype(np.float32), fixed.affine),
                                          ctx.grid_shape, ctx.grid_affine) > 0.5


def _refine_brain_mask(ctx: StudyContext) -> None:
    """HD-BET's mask united with a skull-stripped input's own foreground and grown across its edge
    along thick enhancing tissue (:mod:`recnec_cli.stages.brainmask`)."""
    from ..stages import brainmask, register

    fixed = ctx.volumes[SeriesRole.T1CE]
    own = brainmask.input_foreground(fixed.data, ctx.native_brain_mask, fixed.affine)
    on_grid_own = None
    if own is not None:
        on_grid_own = register.resample_to_grid(Volume(own.astype(np.float32), fixed.affine),
                                                ctx.grid_shape, ctx.grid_affine) > 0.5
    ref = brainmask.refine_brain_mask(ctx.brain, ctx.grid_affine, t1ce=ctx.on_grid[SeriesRole.T1CE],
                                      t1=ctx.on_grid[SeriesRole.T1], input_mask=on_grid_own)
    ctx.brain, ctx.brain_mask_source = ref.mask, ref.source
    ctx.flags.extend(ref.flags)
    if ref.source != "hdbet":
        voxel_ml = abs(float(np.linalg.det(np.asarray(ctx.grid_affine)[:3, :3]))) / 1000.0
        ctx.brain_volume_ml = float(np.count_nonzero(ref.mask)) * voxel_ml
        log.info("study %s: brain mask %s (+%.1f mL from the skull-stripped input, +%.1f mL across the edge)",
                 study_key(ctx.study), ref.source, ref.added_input_ml, ref.added_edge_ml)
    if ref.flags:
        log.warning("study %s: %s: enhancing tissue continued beyond HD-BET's mask (+%.1f mL); check the QC "
                    "picture", study_key(ctx.study), brainmask.EDGE_FLAG, ref.added_edge_ml)


def _check_coverage(ctx: StudyContext) -> None:
    """T1 and T2 must cover :data:`MIN_BRAIN_COVERAGE` of the brain after registration."""
    from ..stages import register

    for role in (SeriesRole.T1, SeriesRole.T2):
        cov = register.coverage_fraction(ctx.volumes[role], ctx.grid_shape, ctx.grid_affine,
                                         ctx.transforms[role], ctx.brain)
        ctx.registration[role.value]["brain_coverage"] = round(cov, 4)
        if cov < MIN_BRAIN_COVERAGE:
            raise RegistrationError(f"{role.value} covers only {cov:.0%} of the brain after registration "
                                    f"(need {MIN_BRAIN_COVERAGE:.0%})", code="INCOMPLETE_COVERAGE")


#: factor on the segmenter's confidence when the heuristic detector chose another place (or nothing)
DISAGREEMENT_FACTOR = 0.75
#: factor on any detector's confidence when the brain mask had to be grown across its edge
EDGE_FACTOR = 0.5
DISAGREE_FLAG = "LESION_DETECTORS_DISAGREE"


def lesion_confidence_of(found: Any, *, heuristic_agrees: bool, grown_edge: bool, scored: bool = False) -> float:
    """``lesion_confidence`` of a segmented lesion (:class:`recnec_cli.stages.segment.SegmentedLesion`):
    its ``confidence`` (with ``scored``, the lesion score of
    :mod:`recnec_cli.stages.lesion_score`, which already weighs the heuristic detector's agreement;
    else the segmenter's mean probability over the lesion's voxels, times
    :data:`DISAGREEMENT_FACTOR` when the heuristic detector's lesion centroid does not fall inside
    it), times :data:`EDGE_FACTOR` when the brain mask was grown across its edge (the lesion lies
    partly outside HD-BET's brain)."""
    agreement = 1.0 if (heuristic_agrees or scored) else DISAGREEMENT_FACTOR
    return float(found.confidence * agreement * (EDGE_FACTOR if grown_edge else 1.0))


def _find_lesion(ctx: StudyContext) -> None:
    """The user's mask; else the segmenter's lesion, compared with the heuristic detector's; else
    (``--lesion-detector heuristic`` or no segmenter) the heuristic's."""
    from scipy import ndimage

    from ..stages import lesion, register, segment
    from ..stages.brainmask import EDGE_FLAG

    brain = ctx.brain
    if ctx.user_mask is not None:
        m = register.resample_to_grid(ctx.user_mask, ctx.grid_shape, ctx.grid_affine, order=0) > 0.5
        ctx.lesion = lesion.lesion_from_mask(m, ctx.grid_affine)
        ctx.lesion_confidence = ctx.lesion.confidence
        inside = float(np.count_nonzero(m & brain)) / max(1, int(np.count_nonzero(m)))
        if inside < lesion.MIN_MASK_IN_BRAIN:
            raise LesionError(
                f"user lesion mask {ctx.user_mask_path.name}: only {inside:.0%} of it lies inside "
                f"the brain (need {lesion.MIN_MASK_IN_BRAIN:.0%}); is it on this study's grid?",
                code="LESION_MASK_OUTSIDE_BRAIN")
        return
    grown_edge = EDGE_FLAG in ctx.flags
    seg = ctx.resources.segmenter
    heuristic = None
    try:
        heuristic = lesion.detect_enhancing_lesion(
            ctx.on_grid[SeriesRole.T1CE], brain, ctx.grid_affine, t1=ctx.on_grid[SeriesRole.T1],
            t2=ctx.on_grid[SeriesRole.T2], min_volume_ml=ctx.settings.lesion_min_volume_ml)
    except LesionError:
        if seg is None:
            raise
    if seg is None:
        ctx.lesion = heuristic
        ctx.lesion_confidence = heuristic.confidence * (EDGE_FACTOR if grown_edge else 1.0)
        if heuristic.ambiguous:
            ctx.flags.append(lesion.AMBIGUOUS_FLAG)
    else:
        images = {r.value: ctx.on_grid.get(r) for r in (*SeriesRole.model_roles(), SeriesRole.FLAIR)}
        ctx.segmentation = seg.segment(images, brain, ctx.grid_affine)
        try:
            found = segment.find_segmented_lesion(
                ctx.segmentation, images, brain, ctx.grid_affine, lesion_score=seg.lesion_score,
                heuristic_centroid=None if heuristic is None else heuristic.centroid_ras_mm,
                min_volume_ml=ctx.settings.lesion_min_volume_ml)
        except LesionError as exc:
            voxel_ml = abs(float(np.linalg.det(np.asarray(ctx.grid_affine)[:3, :3]))) / 1000.0
            oedema_ml = float(np.count_nonzero(ctx.segmentation.labels == segment.OEDEMA)) * voxel_ml
            ctx.lesion_volumes = {"oedema": oedema_ml}
            other = (f"; the heuristic detector would have chosen {heuristic.volume_ml:.2f} mL"
                     if heuristic is not None else "; the heuristic detector found none either")
            t2 = (f"; T2/FLAIR hyperintensity without enhancement: {oedema_ml:.1f} mL (a non-enhancing tumour "
                  "or oedema is not what the model was made for)" if oedema_ml >= 1.0 else "")
            raise LesionError(exc.message + other + t2, code="NO_ENHANCING_LESION") from None
        agrees = heuristic is not None and _inside(found.mask, heuristic.centroid_ras_mm, ctx.grid_affine)
        centroid = (np.asarray(ctx.grid_affine) @ np.append(ndimage.center_of_mass(found.mask), 1.0))[:3]
        ctx.lesion = lesion.Lesion(found.mask, centroid, found.enhancing_ml + found.core_ml, "segmenter",
                                   runner_up_ratio=found.runner_up_ratio)
        ctx.lesion_volumes = {"enhancing": found.enhancing_ml, "necrotic": found.core_ml,
                              "oedema": found.oedema_ml}
        labels = np.zeros(found.mask.shape, dtype=np.uint8)
        labels[found.oedema] = 3
        labels[found.mask] = 2
        labels[found.mask & found.enhancing] = 1
        ctx.lesion_labels = labels
        ctx.lesion_confidence = lesion_confidence_of(found, heuristic_agrees=agrees, grown_edge=grown_edge,
                                                     scored=seg.lesion_score is not None)
        if ctx.lesion.ambiguous:
            ctx.flags.append(lesion.AMBIGUOUS_FLAG)
        if not agrees:
            ctx.flags.append(DISAGREE_FLAG)
        log.debug("study %s: segmenter %.1f s, %d lesion(s), heuristic %s", study_key(ctx.study),
                  ctx.segmentation.seconds, found.n_lesions, "agrees" if agrees else "disagrees")
    if ctx.lesion_confidence < lesion.LOW_CONFIDENCE:
        ctx.flags.append(lesion.LOW_CONFIDENCE_FLAG)


def _inside(mask: np.ndarray, point_ras_mm: np.ndarray, affine: np.ndarray) -> bool:
    """Whether the world point (mm, RAS+) falls on a True voxel of ``mask`` (grid ``affine``)."""
    ijk = np.round(np.linalg.solve(np.asarray(affine), np.append(point_ras_mm, 1.0))[:3]).astype(int)
    return bool(all(0 <= v < n for v, n in zip(ijk, mask.shape)) and mask[tuple(ijk)])


def _model_input(ctx: StudyContext) -> None:
    spec = ctx.resources.spec
    by_name = {"T1": ctx.on_grid[SeriesRole.T1], "T2": ctx.on_grid[SeriesRole.T2],
               "T1ce": ctx.on_grid[SeriesRole.T1CE]}
    ctx.model_input = make_model_input([by_name[c] for c in spec.channels], ctx.brain, ctx.grid_affine,
                                       ctx.lesion.centroid_ras_mm, spec)


def _keep_intermediate(ctx: StudyContext) -> None:
    """``--keep-intermediate``: the co-registered volumes, masks and model box as NIfTI."""
    if ctx.settings.keep_intermediate_dir is not None:
        _write_intermediate(ctx.settings.keep_intermediate_dir, ctx)


#: the per-study pipeline, in order (:func:`preprocess_study` runs them; a new step is one entry)
STEPS: tuple[Step, ...] = (
    Step("classify", "classify", _classify),
    Step("convert", "convert", _convert),
    Step("user_mask", "lesion", _check_user_mask),
    Step("register", "register", _register),
    Step("skullstrip", "skullstrip", _skullstrip),
    Step("brain_mask", "skullstrip", _refine_brain_mask),
    Step("coverage", "register", _check_coverage),
    Step("lesion", "lesion", _find_lesion),
    Step("model_input", "model_input", _model_input),
    Step("keep_intermediate", "model_input", _keep_intermediate),
)


def run_steps(ctx: StudyContext, steps: Sequence[Step] | None = None) -> None:
    """Run ``steps`` over ``ctx`` in order, booking each step's seconds to its stage (seconds that
    :class:`~recnec_cli.study.StudyImages` spent converting or skull-stripping on another step's
    behalf, e.g. classification's image evidence, go to ``convert`` / ``skullstrip``).

    Raises
    ------
    EnvironmentBroken
        Unchanged: the installation cannot run any study.
    StudyFailure
        Any other exception of a step, wrapped (the original as ``__cause__``) with the step's
        stage, the timings so far and the role assignment.
    """
    for step in STEPS if steps is None else steps:  # looked up at call time: benchmarks wrap the steps
        t0 = time.perf_counter()
        try:
            step.run(ctx)
        except EnvironmentBroken:
            raise
        except Exception as exc:
            _book(ctx, step, time.perf_counter() - t0)
            raise _wrap(exc, ctx, step) from exc
        _book(ctx, step, time.perf_counter() - t0)


def _book(ctx: StudyContext, step: Step, seconds: float) -> None:
    t = ctx.timings
    t[step.stage] = t.get(step.stage, 0.0) + seconds
    for stage, sec in ctx.images.seconds.items():
        t[step.stage] -= sec
        t[stage] = t.get(stage, 0.0) + sec
    ctx.images.seconds.clear()


def _wrap(exc: Exception, ctx: StudyContext, step: Step) -> StudyFailure:
    """One :class:`StudyFailure` for whatever a step raised: a stage error keeps its code and
    message; an allocation failure is ``OUT_OF_MEMORY``; anything else ``INTERNAL_ERROR`` with the
    type name only (exception text can hold paths or header values; the traceback goes to DEBUG)."""
    if isinstance(exc, RecnecError):
        code, message = exc.code, exc.message
    elif isinstance(exc, MemoryError) or ("allocate" in str(exc).lower() and "memory" in str(exc).lower()):
        code = "OUT_OF_MEMORY"  # MemoryError, or torch / ITK allocators' own exception types
        message = ("study needed more memory than available (or than --max-memory)" if isinstance(exc, MemoryError)
                   else f"study needed more memory than available ({type(exc).__name__})")
    else:
        log.debug("unexpected error in study %s at step %s:\n%s", study_key(ctx.study), step.name,
                  traceback.format_exc())
        code, message = "INTERNAL_ERROR", (f"unexpected {type(exc).__name__}; rerun with -v for the traceback "
                                           "in the log")
    return StudyFailure(message, code=code, stage=step.stage, step=step.name, timings=ctx.timings,
                        assignment=ctx.assignment, context=ctx)


def preprocess_study(study: Study, *, settings: Settings, resources: Resources,
                     assignment: RoleAssignment | None = None) -> Preprocessed:
    """Run one study through :data:`STEPS`, from its series to the model-input tensor.

    ``assignment``: a role assignment made earlier (classification then only checks it).

    Raises
    ------
    StudyFailure
        Any step's failure, with its report code, stage, the timings so far and the assignment
        (the original exception as ``__cause__``).
    EnvironmentBroken
        The installation cannot run any study.
    """
    ctx = StudyContext(study=study, settings=settings, resources=resources, assignment=assignment)
    run_steps(ctx)
    return ctx.preprocessed()


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


def _write_intermediate(root: Path, ctx: StudyContext) -> None:
    """Write co-registered volumes, brain and lesion masks and the model box as NIfTI for review.

    Files in ``root/<study key>/``: ``t1_coreg``, ``t2_coreg``, ``t1ce_coreg`` and ``flair_coreg``
    when the study has a FLAIR (common grid), ``brain_mask`` and ``lesion_mask`` (common grid),
    ``segmentation`` (the segmenter's labels on the common grid: 1 enhancing, 2 core, 3 oedema),
    ``brain_mask_t1ce_native`` (HD-BET's mask on the T1ce's own grid) and ``model_input_box`` (the
    model tensor, channels last, on the box grid).
    """
    import nibabel as nib

    out = Path(root) / study_key(ctx.study)
    out.mkdir(parents=True, exist_ok=True)
    affine = ctx.grid_affine
    for role, arr in ctx.on_grid.items():
        nib.save(nib.Nifti1Image(arr.astype(np.float32), affine), str(out / f"{role.value.lower()}_coreg.nii.gz"))
    if ctx.segmentation is not None:
        nib.save(nib.Nifti1Image(ctx.segmentation.labels.astype(np.uint8), affine), str(out / "segmentation.nii.gz"))
    nib.save(nib.Nifti1Image(ctx.brain.astype(np.uint8), affine), str(out / "brain_mask.nii.gz"))
    nib.save(nib.Nifti1Image(ctx.lesion.mask.astype(np.uint8), affine), str(out / "lesion_mask.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(ctx.native_brain_mask, dtype=np.uint8), ctx.volumes[SeriesRole.T1CE].affine),
             str(out / "brain_mask_t1ce_native.nii.gz"))
    spec = ctx.resources.spec
    box = nib.Nifti1Image(np.moveaxis(ctx.model_input, 0, -1).astype(np.float32),
                          box_affine(ctx.lesion.centroid_ras_mm, spec))
    nib.save(box, str(out / "model_input_box.nii.gz"))


def snapshot_of(ctx: StudyContext) -> Any:
    """The QC picture's view of a study (:class:`recnec_cli.qc.figures.StudySnapshot`): what its
    steps had made when it finished or failed."""
    from ..qc.figures import StudySnapshot

    snap = StudySnapshot(volumes={r.value: v for r, v in ctx.volumes.items()}, grid_affine=ctx.grid_affine,
                         on_grid={r.value: a for r, a in ctx.on_grid.items()}, brain=ctx.brain,
                         registration={k: dict(v) for k, v in ctx.registration.items()})
    if ctx.lesion is not None:
        snap.lesion = ctx.lesion.mask
        snap.lesion_centroid_ras_mm = tuple(float(v) for v in ctx.lesion.centroid_ras_mm)
        snap.box_mm = float(ctx.resources.spec.size_vox[0] * ctx.resources.spec.spacing_mm)
    if ctx.lesion_labels is not None:  # the oedema connected to the chosen lesion
        snap.oedema = ctx.lesion_labels == 3
    elif ctx.segmentation is not None:  # no lesion (NO_ENHANCING_LESION): all T2/FLAIR hyperintensity
        from ..stages.segment import OEDEMA
        snap.oedema = ctx.segmentation.labels == OEDEMA
    return snap


def process_study(study: Study, *, settings: Settings, resources: Resources,
                  qc_name: str | None = None) -> StudyResult:
    """Preprocess one study into a :class:`StudyResult`: ready for inference (``preprocessed`` set,
    ``status`` ``OK``) or failed (``status`` / ``error_code`` / ``failed_stage`` set from the
    :class:`StudyFailure`).

    With ``settings.qc_dir`` the study picture is drawn here, where the volumes are (also for a
    failed study, from what the steps before the failure made), and written to
    ``qc_dir/<qc_name>.png`` (``qc_name`` from :func:`recnec_cli.qc.files.qc_stem`; derived with
    the site pseudonym key when not given); only the file names travel back in ``result.qc``.

    A study error never escapes (stage errors become their code, allocation failures
    ``OUT_OF_MEMORY``, anything else ``INTERNAL_ERROR``: see :func:`run_steps`).

    Raises
    ------
    EnvironmentBroken
        The installation cannot run any study (the run fails once, not every study).
    """
    r = StudyResult(study=study)
    ctx = StudyContext(study=study, settings=settings, resources=resources)
    try:
        run_steps(ctx)
    except StudyFailure as exc:
        r.assignment = exc.assignment
        r.timings.update(exc.timings)
        r.fail(exc.stage, exc.code, exc.message)
        r.measured = ctx.measured()
        log.info("study %s failed at %s (step %s): %s", study_key(study), exc.stage, exc.step, exc.code)
    else:
        r.preprocessed = ctx.preprocessed()
        r.assignment = ctx.assignment
        r.timings.update(ctx.timings)
        if dicom_export.wanted(settings, study.source):
            _lesion_on_source(r, ctx)
    if r.ok or r.status == "NO_ENHANCING_LESION":
        r.follow_up_map = _follow_up_map(ctx)
    if settings.qc_dir is not None:
        _draw_study_picture(r, snapshot_of(ctx), settings=settings, qc_name=qc_name)
    elif r.source_labels is not None:  # the Secondary Capture needs the picture: drawn aside
        _draw_study_picture(r, snapshot_of(ctx), settings=settings, qc_name=qc_name,
                            folder=dicom_export.work_dir(settings), key="sc_png")
    if not r.ok:
        r.timings["total"] = sum(v for k, v in r.timings.items() if k != "total")
    return r


def _follow_up_map(ctx: StudyContext) -> bytes | None:
    """The study's follow-up map (:func:`recnec_cli.stages.followup.make_map`) as bytes, or
    ``None`` when the steps did not get that far; never fails the study."""
    from ..stages.followup import make_map

    t1ce = ctx.on_grid.get(SeriesRole.T1CE)
    if t1ce is None or ctx.brain is None or ctx.grid_affine is None:
        return None
    if ctx.lesion_labels is not None:
        labels = ctx.lesion_labels
    elif ctx.lesion is not None:
        labels = np.asarray(ctx.lesion.mask, dtype=np.uint8)
    else:
        labels = np.zeros(t1ce.shape, dtype=np.uint8)
    try:
        return make_map(t1ce, ctx.brain, labels, ctx.grid_affine).to_bytes()
    except (ValueError, MemoryError) as exc:
        log.warning("study %s: no follow-up map (%s)", study_key(ctx.study), type(exc).__name__)
        return None


def _lesion_on_source(r: StudyResult, ctx: StudyContext) -> None:
    """``r.source_labels`` for ``--dicom-out`` (or ``r.dicom_note``, why not); never fails the study."""
    from ..pacs.objects import DicomExportError

    t0 = time.perf_counter()
    try:
        r.source_labels = dicom_export.source_labels_of(ctx)
    except DicomExportError as exc:
        r.dicom_note = str(exc)
        log.warning("study %s: no DICOM objects: %s", study_key(ctx.study), exc)
    except Exception as exc:  # noqa: BLE001 - the objects are a view of the result, not part of it
        r.dicom_note = f"lesion not mapped onto the T1ce frames ({type(exc).__name__})"
        log.warning("study %s: %s", study_key(ctx.study), r.dicom_note)
        log.debug("source labels error:\n%s", traceback.format_exc())
    r.timings["dicom"] = time.perf_counter() - t0


def qc_name_of(study: Study, settings: Settings, key: Any = None) -> str:
    """The file-name stem of a study's QC pictures (:func:`recnec_cli.qc.files.qc_stem`): the
    StudyInstanceUID, or a keyed pseudonym of a NIfTI / NRRD study id (``key``, or the site key of
    ``settings.pseudonym_key_file``)."""
    from ..qc.files import qc_stem

    if key is None and study.source != "dicom":
        from ..pseudonym import load_key

        key = load_key(settings.pseudonym_key_file)
    return qc_stem(study.study_id, study.source, key)


def _draw_study_picture(r: StudyResult, snap: Any, *, settings: Settings, qc_name: str | None,
                        folder: Path | None = None, key: str = "png") -> None:
    """Write the study picture of ``r`` into ``folder`` (default ``settings.qc_dir``) and its file
    name into ``r.qc[key]`` (``sc_png``: drawn only for the Secondary Capture); a drawing error is
    logged and never changes the study's row (the picture is a view of the result, not part of it)."""
    from ..qc.figures import render_study
    from ..qc.files import thumb_name

    t0 = time.perf_counter()
    try:
        name = qc_name or qc_name_of(r.study, settings)
        r.qc["name"] = name
        qc_dir = Path(folder if folder is not None else str(settings.qc_dir))
        pic = render_study(snap, qc_dir / f"{name}.png", header=[qc_header(r, name), qc_result_line(r, None)],
                           name=name, thumb=qc_dir / thumb_name(f"{name}.png") if key == "png" else None)
        if pic is not None:
            r.qc[key] = pic.path.name
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
    if settings.qc_dir is None and not r.qc.get("sc_png"):
        return
    threshold = report_threshold_of(ensemble)
    t_start = t0 = time.perf_counter()
    try:
        from ..qc.figures import stamp_result

        if r.qc.get("png"):
            stamp_result(Path(str(settings.qc_dir)) / r.qc["png"], qc_result_line(r, threshold))
        if r.qc.get("sc_png"):
            stamp_result(dicom_export.work_dir(settings) / r.qc["sc_png"], qc_result_line(r, threshold))
    except Exception as exc:  # noqa: BLE001 - see _draw_study_picture
        log.warning("study %s: QC result line not drawn (%s)", study_key(r.study), type(exc).__name__)
        log.debug("QC stamp error:\n%s", traceback.format_exc())
    r.timings["qc"] = r.timings.get("qc", 0.0) + time.perf_counter() - t0
    if settings.qc_dir is None:
        r.timings["total"] = r.timings.get("total", 0.0) + time.perf_counter() - t_start
        return
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
    occ = occlusion_sensitivity(ensemble, pre.model_input)
    t1ce = pre.model_input[list(spec.channels).index("T1ce")]
    notes = [f"occlusion sensitivity through the {getattr(ensemble, 'n_models', '?')}-model ONNX ensemble:",
             f"a {occ.patch_vox * spec.spacing_mm:g} mm cube (all channels) set to 0 = brain median, "
             f"moved in {occ.stride_vox * spec.spacing_mm:g} mm steps;",
             f"{occ.passes} ensemble passes, {occ.seconds:.1f} s", "",
             f"p(recurrence) {occ.p:.3f}", f"largest change {float(np.abs(occ.delta).max()):.3g}", "",
             f"model box {spec.size_vox[0] * spec.spacing_mm:g} mm centred on the lesion"]
    path = Path(settings.qc_dir) / f"{name}.explain.png"
    render_explanation(t1ce, occ.delta, box_affine(pre.lesion_centroid_ras_mm, spec), path,
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
    batch = np.stack([r.preprocessed.model_input for r in ready]).astype(np.float32)
    t0 = time.perf_counter()
    try:
        pred = ensemble.predict(batch)
    except RecnecError as exc:
        for r in ready:
            _fail_infer(r, exc.code, exc.message)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own types: this batch fails, the run goes on
        log.debug("unexpected inference error:\n%s", traceback.format_exc())
        for r in ready:
            _fail_infer(r, "INTERNAL_ERROR", f"unexpected {type(exc).__name__} in inference; rerun with -v "
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


def _fail_infer(r: StudyResult, code: str, message: str) -> None:
    r.fail("infer", code, message)
    # INFO: the row carries it, and `--quiet` (cron) must stay one summary line however many fail
    log.info("study %s failed at infer: %s", study_key(r.study), code)
