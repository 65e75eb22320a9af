"""Subject truth on the 1 mm grid, its lesion compartment volumes, and the model-space tensor
made from it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from ..stages.modelinput import InputSpec, make_model_input
from .acquisition import Acquisition
from .anatomy import truth_grid
from .lesions import INFLUENCE_MM, LesionParams
from .subject import SubjectPlan, plan_subject, render

#: volume (mL) of one truth-grid voxel (1 mm^3)
VOXEL_ML = 0.001
#: the compartment volumes of :func:`compartment_volumes`, in the order of ``follow_ups.csv``
COMPARTMENTS = ("enhancing_ml", "necrotic_ml", "oedema_ml", "lesion_ml")

#: half-width (voxels, 1 mm) of the truth sub-box rendered for a model-space tensor: covers the
#: whole lesion (radius <= ~30 mm) and the 60 mm model box around its centroid with margin
MODEL_BOX_HALF_VOX = 42


@dataclass(frozen=True, eq=False)
class SubjectTruth:
    """One synthetic subject on its 1 mm RAS+ truth grid (the MNI152 2009 grid, 197x233x189).

    Attributes
    ----------
    t1, t2, t1ce:
        float32 ``(X, Y, Z)``, RAS+, relative intensities (T1: WM ~1; T2: CSF ~1) of the
        subject's pre-contrast T1, T2 and contrast-enhanced T1 *as acquired* (each with its own
        sequence family, bias field and Rician noise) but before head motion, resolution loss
        and quantisation: the study writers resample these onto each series' grid.
    affine:
        ``(4, 4)`` voxel -> world (mm, RAS+).
    brain_mask, lesion_mask:
        bool ``(X, Y, Z)``; the lesion mask is the whole enhancing lesion outline (enhancing wall
        plus enclosed necrosis), without oedema.
    lesion_centroid_ras_mm:
        ``(3,)`` centroid of ``lesion_mask`` in world mm, RAS+.
    label:
        ``"recurrence"`` or ``"necrosis"``.
    acquisitions:
        role (``T1``, ``T2``, ``T1ce``) -> :class:`~recnec_cli.synth.acquisition.Acquisition`
        (geometry, TR/TE/TI in ms, vendor header values, head motion relative to the T1ce).
    lesion:
        The drawn :class:`~recnec_cli.synth.lesions.LesionParams` (pattern, lesion quotient,
        oedema, latent ``z``: these reveal the label, do not train on them).
    time_point, days_since_baseline:
        0 and 0 for the baseline study; ``k`` and its distance in days for the k-th follow-up
        (:func:`~recnec_cli.synth.subject.follow_up_plans`).
    volumes_ml:
        The lesion compartment volumes in mL, keys :data:`COMPARTMENTS`
        (:func:`compartment_volumes`).
    """

    seed: int
    index: int
    t1: np.ndarray
    t2: np.ndarray
    t1ce: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    lesion_mask: np.ndarray
    lesion_centroid_ras_mm: np.ndarray
    label: str
    acquisitions: Mapping[str, Acquisition]
    lesion: LesionParams
    time_point: int = 0
    days_since_baseline: int = 0
    volumes_ml: Mapping[str, float] = field(default_factory=dict)


def compartment_volumes(fields: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Lesion compartment volumes (mL) from soft compartments on the 1 mm truth grid.

    ``fields``: :func:`~recnec_cli.synth.subject.render` output (any box that holds the whole
    lesion and its oedema), float32 fractions in [0, 1] already multiplied by the brain fraction:
    ``lesion``, ``enhancing`` (<= ``lesion``) and ``oedema``. Each volume is the sum of a voxel
    fraction times :data:`VOXEL_ML` (0.001 mL per 1 mm^3 voxel), summed in float64:

    * ``enhancing_ml``: the enhancing fraction;
    * ``necrotic_ml``: inside the lesion outline but not enhancing, ``clip(lesion - enhancing, 0, 1)``
      (the enclosed necrosis or cyst, what the renderer draws as necrotic);
    * ``oedema_ml``: the vasogenic oedema fraction (outside the outline, mostly white matter);
    * ``lesion_ml``: ``enhancing_ml + necrotic_ml`` (the outline, without oedema).
    """
    les = np.asarray(fields["lesion"], dtype=np.float64)
    enh = np.asarray(fields["enhancing"], dtype=np.float64)
    enhancing = float(enh.sum()) * VOXEL_ML
    necrotic = float(np.clip(les - enh, 0.0, 1.0).sum()) * VOXEL_ML
    oedema = float(np.asarray(fields["oedema"], dtype=np.float64).sum()) * VOXEL_ML
    return {"enhancing_ml": enhancing, "necrotic_ml": necrotic, "oedema_ml": oedema,
            "lesion_ml": enhancing + necrotic}


def lesion_box(plan: SubjectPlan) -> tuple[slice, slice, slice]:
    """Truth-grid sub-box (slices) outside which ``plan``'s lesion fields are zero: the
    ``+-INFLUENCE_MM`` cube around the lesion centre, clipped to the grid."""
    shape, aff = truth_grid()
    box = []
    for a in range(3):
        lo = (plan.lesion.centre_mm[a] - INFLUENCE_MM - aff[a, 3]) / aff[a, a]
        hi = (plan.lesion.centre_mm[a] + INFLUENCE_MM - aff[a, 3]) / aff[a, a]
        lo, hi = min(lo, hi), max(lo, hi)
        box.append(slice(max(0, int(np.floor(lo))), min(shape[a], int(np.ceil(hi)) + 1)))
    return box[0], box[1], box[2]


def plan_volumes(plan: SubjectPlan) -> dict[str, float]:
    """:func:`compartment_volumes` of ``plan`` from a render of :func:`lesion_box` only (about a
    second instead of a full head; equal to the full-head values up to float64 summation order)."""
    return compartment_volumes(render(plan, lesion_box(plan)))


def _centroid(lesion: np.ndarray, offset: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.nonzero(lesion > 0.5)
    if len(ijk[0]) == 0:
        raise RuntimeError("synthetic lesion is empty")  # cannot happen with drawn radii >= 5 mm
    mean = np.array([float(np.mean(a)) for a in ijk]) + offset
    return affine[:3, :3] @ mean + affine[:3, 3]


def truth_from_plan(plan: SubjectPlan) -> SubjectTruth:
    """Render the full head of ``plan`` (several seconds; ~0.3 GB), any time point."""
    shape, aff = truth_grid()
    vols = render(plan, (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])))
    centroid = _centroid(vols["lesion"], np.zeros(3), aff)
    volumes = compartment_volumes(vols)
    return SubjectTruth(
        seed=plan.seed, index=plan.index, t1=vols["T1"], t2=vols["T2"], t1ce=vols["T1ce"],
        affine=aff, brain_mask=vols["brain"] > 0.5, lesion_mask=vols["lesion"] > 0.5,
        lesion_centroid_ras_mm=centroid, label=plan.label, acquisitions=plan.acquisitions,
        lesion=plan.lesion, time_point=plan.time_point,
        days_since_baseline=plan.days_since_baseline, volumes_ml=volumes,
    )


def generate_subject(*, seed: int, index: int, label: str | None = None) -> SubjectTruth:
    """Generate subject ``index`` (0-based) of cohort ``seed`` on its full 1 mm head grid.

    ``label`` ``None`` takes the cohort's label for the default 192:42 ratio; passing a label
    changes only the lesion's class-related signs (anatomy, acquisition and lesion position stay).
    The result does not depend on any cohort size.
    """
    return truth_from_plan(plan_subject(seed=seed, index=index, label=label))


def model_box(plan: SubjectPlan) -> tuple[slice, slice, slice]:
    """Truth-grid sub-box (slices) rendered for the model-space tensor of ``plan``."""
    shape, aff = truth_grid()
    c = np.linalg.inv(aff) @ np.r_[np.asarray(plan.lesion.centre_mm), 1.0]
    ci = np.round(c[:3]).astype(int)
    sx, sy, sz = (slice(max(0, int(i) - MODEL_BOX_HALF_VOX), min(n, int(i) + MODEL_BOX_HALF_VOX + 1))
                  for i, n in zip(ci, shape))
    return sx, sy, sz


def model_tensor(plan: SubjectPlan, spec: InputSpec = InputSpec()) -> tuple[np.ndarray, np.ndarray]:
    """Model-input tensor of ``plan`` via :func:`~recnec_cli.stages.modelinput.make_model_input`.

    Renders only the truth sub-box around the lesion (values identical to the full head there),
    then calls ``make_model_input([t1, t2, t1ce], brain_mask, box_affine, lesion_centroid)``.
    Returns ``(tensor float32 spec.shape, lesion centroid (3,) mm RAS+)``.
    """
    _, aff = truth_grid()
    box = model_box(plan)
    vols = render(plan, box)
    les = vols["lesion"] > 0.5
    edge = (les[0].any() or les[-1].any() or les[:, 0].any() or les[:, -1].any()
            or les[:, :, 0].any() or les[:, :, -1].any())
    if edge:  # pragma: no cover - radii are drawn well inside the box
        raise RuntimeError(f"lesion of subject {plan.index} touches its model box")
    offset = np.array([s.start for s in box], dtype=np.float64)
    centroid = _centroid(vols["lesion"], offset, aff)
    box_aff = aff.copy()
    box_aff[:3, 3] = aff[:3, :3] @ offset + aff[:3, 3]
    chans = [vols[c] for c in ("T1", "T2", "T1ce")]
    if tuple(spec.channels) != ("T1", "T2", "T1ce"):
        chans = [vols[c] for c in spec.channels]
    x = make_model_input(chans, vols["brain"] > 0.5, box_aff, centroid, spec)
    return x, centroid
