"""Subject truth on the 1 mm grid and the model-space tensor made from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..stages.modelinput import InputSpec, make_model_input
from .acquisition import Acquisition
from .anatomy import truth_grid
from .lesions import LesionParams
from .subject import SubjectPlan, plan_subject, render

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


def _centroid(lesion: np.ndarray, offset: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.nonzero(lesion > 0.5)
    if len(ijk[0]) == 0:
        raise RuntimeError("synthetic lesion is empty")  # cannot happen with drawn radii >= 5 mm
    mean = np.array([float(np.mean(a)) for a in ijk]) + offset
    return affine[:3, :3] @ mean + affine[:3, 3]


def truth_from_plan(plan: SubjectPlan) -> SubjectTruth:
    """Render the full head of ``plan`` (several seconds; ~0.2 GB)."""
    shape, aff = truth_grid()
    vols = render(plan, (slice(0, shape[0]), slice(0, shape[1]), slice(0, shape[2])))
    centroid = _centroid(vols["lesion"], np.zeros(3), aff)
    return SubjectTruth(
        seed=plan.seed, index=plan.index, t1=vols["T1"], t2=vols["T2"], t1ce=vols["T1ce"],
        affine=aff, brain_mask=vols["brain"] > 0.5, lesion_mask=vols["lesion"] > 0.5,
        lesion_centroid_ras_mm=centroid, label=plan.label, acquisitions=plan.acquisitions,
        lesion=plan.lesion,
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
