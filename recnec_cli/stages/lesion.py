"""Lesion localisation: a user-supplied lesion mask, or automatic detection of the enhancing lesion.

Automatic detection (no mask given) looks for voxels that enhance after contrast:

1. inside the brain mask, each of T1ce and (registered) T1 is robustly standardised
   (:func:`~recnec_cli.stages.intensity.robust_zscore`: median / IQR-based sigma of the brain
   voxels, the same z-score as the model input);
2. enhancement ``e = z(T1ce) - z(T1)`` (T1ce alone when no T1 is available, e.g. a single-sequence
   study); candidate voxels have ``e > 3`` and ``z(T1ce) > 2``; this is the contrast-enhancement
   map used in RANO-style volumetry (Ellingson et al. 2014, Neuro-Oncology 16:1411, "T1
   subtraction maps"), here on rigidly co-registered, intensity-standardised images;
3. the candidate map is opened with a 1-voxel ball (removes vessels thinner than ~2 mm) and the
   brain mask is eroded by 3 mm first so dura and scalp edges at the mask border do not count;
4. connected components (26-connectivity); each is filled (so a necrotic rim and its core count as
   one lesion) and scored by ``filled volume (mL) * roundness``, where roundness (``sqrt`` of the
   smallest over the largest principal variance of the component's voxel positions) down-weights
   the tubes and sheets that enhance normally (veins, dural sinuses, falx). Mean enhancement is
   deliberately not in the score: venous blood in the sinuses enhances more than tumour does;
   the best component is the lesion if its enhancing volume is at least ``min_volume_ml``.

The lesion centroid is the centre of mass of the filled component, in world mm (RAS+); the
reported volume is the filled volume in mL. No component -> :class:`LesionError`
``NO_ENHANCING_LESION`` (a status, not a crash).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage

from ..errors import LesionError
from ..types import Affine, MaskRAS, VolumeRAS
from .intensity import robust_zscore

log = logging.getLogger(__name__)

ENHANCEMENT_Z = 3.0
T1CE_Z = 2.0
BORDER_EROSION_MM = 3.0

#: a user lesion mask must lie at least this much inside the brain mask (a mask on another grid or
#: in another patient's space lands mostly outside: FAILURES.md-style silent wrong result)
MIN_MASK_IN_BRAIN = 0.5

#: File names recognised as a user lesion mask inside a NIfTI study folder (documented in README).
LESION_MASK_NAMES = ("lesion_mask.nii.gz", "lesion_mask.nii")


@dataclass(frozen=True, eq=False)
class Lesion:
    """Where the lesion is.

    ``mask`` is bool ``(X, Y, Z)`` on the common grid; ``centroid_ras_mm`` world mm RAS+;
    ``volume_ml`` in mL; ``source`` is ``"mask"`` (user file) or ``"auto"``; ``enhancement``
    the mean enhancement z of the component (``nan`` for user masks).
    """

    mask: MaskRAS
    centroid_ras_mm: np.ndarray
    volume_ml: float
    source: str
    enhancement: float = float("nan")


def _roundness(mask: np.ndarray, spacing: np.ndarray) -> float:
    """sqrt(smallest / largest principal variance) of a component's voxel positions (mm).

    1 for a ball, near 0 for the thin tubes and sheets that enhance normally (cortical veins,
    dural venous sinuses, falx): a lesion is a blob, a vessel is not.
    """
    pts = np.argwhere(mask).astype(np.float64) * spacing
    if len(pts) < 4:
        return 0.0
    ev = np.linalg.eigvalsh(np.cov(pts.T))
    return float(np.sqrt(max(ev[0], 0.0) / ev[-1])) if ev[-1] > 0 else 0.0


def _centroid_world(mask: np.ndarray, affine: Affine) -> np.ndarray:
    com = np.asarray(ndimage.center_of_mass(mask))
    return (np.asarray(affine) @ np.append(com, 1.0))[:3]


def lesion_from_mask(mask: np.ndarray, affine: Affine, *, min_volume_ml: float = 0.0) -> Lesion:
    """Lesion figures from a user mask already on the common grid.

    ``mask``: bool (or 0/1) ``(X, Y, Z)`` RAS+; ``affine``: ``(4, 4)`` voxel -> RAS mm of that
    grid; ``min_volume_ml``: smallest accepted mask volume, mL.

    Raises
    ------
    LesionError
        ``LESION_MASK_EMPTY`` when the mask is empty or below ``min_volume_ml``.
    """
    mask = np.asarray(mask) > 0
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    vol = float(mask.sum()) * voxel_ml
    if mask.sum() == 0 or vol < min_volume_ml:
        raise LesionError(f"user lesion mask is empty on the co-registered grid ({vol:.3f} mL)",
                          code="LESION_MASK_EMPTY")
    return Lesion(mask, _centroid_world(mask, affine), vol, "mask")


def detect_enhancing_lesion(t1ce: VolumeRAS, brain_mask: MaskRAS, affine: Affine, *,
                            t1: VolumeRAS | None = None, min_volume_ml: float = 0.1) -> Lesion:
    """Find the enhancing lesion automatically (see module docstring for the method).

    Parameters
    ----------
    t1ce, t1:
        float ``(X, Y, Z)`` on one co-registered grid (``affine``, voxel -> RAS mm); ``t1`` optional.
    brain_mask:
        bool ``(X, Y, Z)``, True inside the brain.
    min_volume_ml:
        Smallest enhancing volume accepted, in mL.

    Raises
    ------
    LesionError
        ``NO_ENHANCING_LESION`` when no component passes.
    """
    brain = np.asarray(brain_mask, dtype=bool)
    spacing = voxel_sizes(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    iters = max(1, int(round(BORDER_EROSION_MM / float(spacing.min()))))
    core = ndimage.binary_erosion(brain, ndimage.generate_binary_structure(3, 1), iterations=iters)
    if core.sum() < 1000:
        raise LesionError("brain mask too small to search for an enhancing lesion")
    zc = robust_zscore(np.asarray(t1ce, dtype=np.float32), core)
    enh = zc - robust_zscore(np.asarray(t1, dtype=np.float32), core) if t1 is not None else zc
    cand = core & (enh > ENHANCEMENT_Z) & (zc > T1CE_Z)
    cand = ndimage.binary_opening(cand, ndimage.generate_binary_structure(3, 1))
    lab, n = ndimage.label(cand, ndimage.generate_binary_structure(3, 3))
    if n == 0:
        raise LesionError("no enhancing voxels found inside the brain (T1ce vs T1)")
    objects = ndimage.find_objects(lab)
    best = None
    for idx, sl in enumerate(objects, start=1):
        comp = lab[sl] == idx
        n_vox = int(comp.sum())
        if n_vox * voxel_ml < min_volume_ml:
            continue
        filled = ndimage.binary_fill_holes(comp)
        mean_enh = float(enh[sl][comp].mean())
        score = float(filled.sum()) * voxel_ml * _roundness(filled, spacing)
        if best is None or score > best[0]:
            best = (score, idx, sl, filled, mean_enh)
    if best is None:
        raise LesionError(f"no enhancing component of at least {min_volume_ml:g} mL inside the brain")
    _, idx, sl, filled, mean_enh = best
    full = np.zeros(brain.shape, dtype=bool)
    full[sl] = filled
    vol = float(full.sum()) * voxel_ml
    return Lesion(full, _centroid_world(full, affine), vol, "auto", mean_enh)


def find_user_mask(study_lesion_mask: Path | None, masks_dir: Path | None, study_id: str) -> Path | None:
    """The user lesion-mask file for a study, if any.

    Looked up in this order: ``masks_dir/<name>_lesion_mask.nii.gz`` or ``masks_dir/<name>.nii.gz``
    (also ``.nii``, ``.nrrd``) where ``<name>`` is the study id with ``/`` replaced by ``_``, or the
    last path component of the study id; then the mask found inside the study folder by discovery
    (``lesion_mask.nii.gz``). The ``_lesion_mask`` form is what ``recnec synth`` writes: discovery
    never mistakes such a folder for a study.
    """
    if masks_dir is not None:
        names = {study_id.replace("/", "_"), study_id.rstrip("/").split("/")[-1]}
        for name in sorted(names):
            for stem in (f"{name}_lesion_mask", name):
                for ext in (".nii.gz", ".nii", ".nrrd"):
                    p = Path(masks_dir) / f"{stem}{ext}"
                    if p.is_file():
                        return p
    return study_lesion_mask
