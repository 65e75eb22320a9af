"""What one study's processing produces: the nouns shared by the pipeline, the report, the QC
pictures and the executors (below all of them, so none imports another layer for its types).

``STAGES`` names the stages of the per-study pipeline as the report shows them: a failed study's
``failed_stage`` is one of them, and ``timings`` are booked to them (``seconds_<stage>`` columns).
One stage may hold several pipeline *steps* (:data:`recnec_cli.orchestration.pipeline.STEPS`):
the user lesion mask's check and the lesion detection are both stage ``lesion``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import RecnecError
from .study import RoleAssignment, Study

#: the pipeline's stages, in order, as the report names them (``failed_stage``, ``seconds_<stage>``)
STAGES = ("classify", "convert", "register", "skullstrip", "lesion", "model_input", "infer")


@dataclass(frozen=True, eq=False)
class Preprocessed:
    """One study made ready for the model.

    ``model_input`` is float32 ``spec.shape`` = ``(C, X, Y, Z)`` (RAS+); lesion figures in world mm
    (RAS+) and mL; ``brain_volume_ml`` of the (refined) brain mask; ``timings`` in seconds per
    stage; ``registration`` the per-role rigid offsets.
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
    #: ``hdbet``, ``hdbet+input`` (with a skull-stripped input's foreground), ``...+edge`` (grown
    #: across the edge): :mod:`recnec_cli.stages.brainmask`
    brain_mask_source: str = "hdbet"
    #: how sure the lesion choice is, in [0, 1] (``nan``: not computed)
    lesion_confidence: float = float("nan")
    #: the segmenter's compartments of the chosen lesion, mL (``nan`` for a user mask or the heuristic)
    enhancing_volume_ml: float = float("nan")
    necrotic_volume_ml: float = float("nan")
    oedema_volume_ml: float = float("nan")


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
    #: report columns measured before a failure (``brain_mask_source``, ``brain_volume_ml``,
    #: ``oedema_volume_ml``): a NO_ENHANCING_LESION row still says what the brain mask and the
    #: segmenter saw
    measured: dict[str, Any] = field(default_factory=dict)
    #: with ``--dicom-out``, a DICOM study's lesion on its T1ce's own frames
    #: (:class:`recnec_cli.pacs.objects.SourceLabels`), made where the volumes are; ``dicom_note``
    #: why there is none (empty when not asked for)
    source_labels: Any = None
    dicom_note: str = ""
    #: the study's :class:`recnec_cli.stages.followup.FollowUpMap` as bytes (T1ce and lesion at 2 mm),
    #: for comparisons with the same patient's later scans; ``None`` when the study got no brain mask
    follow_up_map: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == "OK"

    def fail(self, stage: str, code: str, message: str) -> None:
        """Mark this result failed at ``stage`` (one of :data:`STAGES`, or ``preprocess`` when the
        stage is unknown) with the report ``code`` (its first ``:``-separated word) and ``message``."""
        self.status = code.split(":")[0].strip() or "FAILED"
        self.error_code = self.status
        self.error_message = message
        self.failed_stage = stage


class StudyFailure(RecnecError):
    """A study's pipeline stopped: the one exception type :func:`~recnec_cli.orchestration.pipeline.preprocess_study`
    raises for a study, whatever went wrong (the original exception is its ``__cause__``).

    Attributes
    ----------
    code, message:
        The report's ``error_code`` / ``error_message``: the stage error's own code, or
        ``INTERNAL_ERROR`` / ``OUT_OF_MEMORY`` for an unexpected exception (type name only in the
        message: exception text can hold paths or header values).
    stage:
        The stage the failing step belongs to (one of :data:`STAGES`), the row's ``failed_stage``.
    step:
        The failing step's name (:data:`recnec_cli.orchestration.pipeline.STEPS`), for logs.
    timings:
        Seconds per stage of what ran before and during the failing step.
    assignment:
        The role assignment, when classification got that far (``None`` otherwise).
    """

    default_code = "STUDY_FAILED"

    def __init__(self, message: str, *, code: str, stage: str, step: str, timings: dict[str, float],
                 assignment: RoleAssignment | None, context: Any = None) -> None:
        super().__init__(message, code=code)
        self.stage = stage
        self.step = step
        self.timings = timings
        self.assignment = assignment
        #: the per-study context at the failure (what the steps had made), for the QC picture;
        #: stays in the process that ran the study
        self.context = context
