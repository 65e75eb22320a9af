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
4. candidate voxels closer than :data:`MERGE_MM` (4 mm) belong to one lesion: a rim-enhancing
   lesion falls apart into many fragments on thick slices, and without this the detector picks
   one fragment (0.34 mL of a large metastasis, issue 12). Each group is closed and filled, in 3D
   and plane by plane (so a necrotic rim and its core count as one lesion, also when the rim is
   open at its poles);
5. each group is scored by ``filled volume (mL) * roundness * evidence``. Roundness (``sqrt`` of
   the smallest over the largest principal variance of the voxel positions) down-weights the
   tubes and sheets that enhance normally (veins, dural sinuses, falx). Evidence is what a
   radiologist looks at next, from the T2 when the study has one: the fraction of the
   :data:`SHELL_MM` (6 mm) shell around the enhancing part that is T2-hyperintense parenchyma
   (``z(T2) > 1`` and, with a T1, ``z(T1) > -2``: oedema or non-enhancing tumour), times one minus
   the fraction that is CSF (``z(T2) > 1`` and ``z(T1) <= -2``): the choroid plexus, which
   enhances normally, sits in ventricular CSF; a vessel has neither oedema nor a ball shape.
   ``evidence = (EVIDENCE_FLOOR + oedema_fraction) * (1 - csf_fraction)``; without a T2 it is 1.
   Mean enhancement is deliberately not in the score: venous blood in the sinuses enhances more
   than tumour does. The best group is the lesion if its enhancing volume is at least
   ``min_volume_ml``. When the runner-up scores at least half as high (:data:`AMBIGUOUS_RATIO`)
   the report row gets the flag ``LESION_AMBIGUOUS``: the model box may be on the wrong
   structure (a non-enhancing tumour, for instance, leaves only normal enhancing tissue to find).
6. **No credible lesion is a status, not a guess**: a group rounder than nothing
   (:data:`MIN_LESION_ROUNDNESS` 0.25: veins, dural sinuses and the falx are tubes and sheets) or
   with more than half of its shell in CSF (:data:`MAX_LESION_CSF_FRACTION`, with a T1 and a T2:
   the choroid plexus) is never the lesion; a T1ce holding only such structures gives
   ``NO_ENHANCING_LESION`` and no probability. :attr:`Lesion.confidence` (the report's
   ``lesion_confidence``) is ``(1 - runner_up_ratio) * min(1, roundness / 0.5)``.

Perilesional T2/FLAIR hyperintensity as the companion of enhancement: RANO criteria (Wen et al.
2010, J Clin Oncol 28:1963) assess enhancing and non-enhancing (T2/FLAIR) disease together; the
choroid plexus and dural sinuses are the normally enhancing structures named there as pitfalls.

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
#: enhancing voxels closer than this (mm) are one lesion (fragments of one rim; the 1-voxel
#: opening widens every gap by up to 2 voxels)
MERGE_MM = 4.0
#: width of the shell around a candidate in which T2 evidence is measured (mm)
SHELL_MM = 6.0
#: T2 z-score above which shell voxels are hyperintense; T1 z-score at or below which they are CSF
OEDEMA_T2_Z = 1.0
CSF_T1_Z = -2.0
#: evidence weight of a candidate with no T2-hyperintense shell at all (not 0: some recurrences
#: have little oedema, and the T2 may be poorly registered)
EVIDENCE_FLOOR = 0.25
#: T2 evidence is computed for this many best candidates by volume x roundness (cost bound)
EVIDENCE_CANDIDATES = 12
#: a runner-up scoring at least this fraction of the chosen lesion makes the choice ambiguous
#: (report flag ``LESION_AMBIGUOUS``: check the QC picture, or give a lesion mask)
AMBIGUOUS_RATIO = 0.5
AMBIGUOUS_FLAG = "LESION_AMBIGUOUS"
#: a candidate is a credible lesion only when at least this round (:func:`roundness`): the
#: structures that enhance normally are tubes and sheets (cortical veins and dural sinuses about
#: 0.05-0.2, the falx less), a lesion is a blob (a 2:1 ellipsoid is 0.5)
MIN_LESION_ROUNDNESS = 0.25
#: ... and when at most this fraction of its shell is CSF (with a T2 and a T1): the choroid
#: plexus, round and enhancing, sits in ventricular CSF
MAX_LESION_CSF_FRACTION = 0.5
#: below this ``lesion_confidence`` the row gets :data:`LOW_CONFIDENCE_FLAG`
LOW_CONFIDENCE = 0.5
LOW_CONFIDENCE_FLAG = "LESION_LOW_CONFIDENCE"

#: a user lesion mask must lie at least this much inside the brain mask (a mask on another grid or
#: in another patient's space lands mostly outside: a silent wrong result, docs/failure-kinds.md)
MIN_MASK_IN_BRAIN = 0.5

#: File names recognised as a user lesion mask inside a NIfTI study folder (documented in README).
LESION_MASK_NAMES = ("lesion_mask.nii.gz", "lesion_mask.nii")


@dataclass(frozen=True, eq=False)
class Lesion:
    """Where the lesion is.

    ``mask`` is bool ``(X, Y, Z)`` on the common grid; ``centroid_ras_mm`` world mm RAS+;
    ``volume_ml`` in mL; ``source`` is ``"user"`` (user file), ``"heuristic"``
    (:func:`detect_enhancing_lesion`) or ``"segmenter"`` (:mod:`recnec_cli.stages.segment`); ``enhancement``
    the mean enhancement z of the component, ``oedema_fraction`` / ``csf_fraction`` the T2
    evidence of its shell (``nan`` for user masks or without a T2), ``runner_up_ratio`` the
    second-best candidate's score over the chosen one's (0 when there was one candidate; ``nan``
    for user masks).
    """

    mask: MaskRAS
    centroid_ras_mm: np.ndarray
    volume_ml: float
    source: str
    enhancement: float = float("nan")
    oedema_fraction: float = float("nan")
    csf_fraction: float = float("nan")
    runner_up_ratio: float = float("nan")
    roundness: float = float("nan")

    @property
    def confidence(self) -> float:
        """``lesion_confidence`` in [0, 1]: 1 for a user mask; for a detected lesion
        ``(1 - runner_up_ratio) * min(1, roundness / 0.5)``: low when another candidate scored
        almost as high, or when the chosen one is barely rounder than a vessel."""
        if self.source == "user":
            return 1.0
        sep = 1.0 - min(max(self.runner_up_ratio, 0.0), 1.0) if np.isfinite(self.runner_up_ratio) else 1.0
        shape = min(1.0, self.roundness / 0.5) if np.isfinite(self.roundness) else 1.0
        return float(sep * shape)

    @property
    def ambiguous(self) -> bool:
        """A second candidate scored at least :data:`AMBIGUOUS_RATIO` of the chosen one."""
        return bool(self.runner_up_ratio >= AMBIGUOUS_RATIO)


def roundness(mask: np.ndarray, spacing: np.ndarray) -> float:
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
    return Lesion(mask, _centroid_world(mask, affine), vol, "user")


def _ball(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """Boolean ellipsoidal structuring element of ``radius_mm`` on a grid of ``spacing`` (mm)."""
    r = np.maximum(1, np.floor(radius_mm / np.asarray(spacing, dtype=float)).astype(int))
    g = np.ogrid[tuple(slice(-k, k + 1) for k in r)]
    return sum((gi * sp) ** 2 for gi, sp in zip(g, spacing)) <= radius_mm ** 2 + 1e-6


def _fill(mask: np.ndarray) -> np.ndarray:
    """Fill what ``mask`` encloses in 3D or in any axial, coronal or sagittal plane: a rim that is
    open at its poles (thick slices, partial volume) still encloses its core in most planes."""
    out = ndimage.binary_fill_holes(mask)
    for ax in range(3):
        st = ndimage.generate_binary_structure(3, 1).copy()
        for k in (0, 2):  # no connections across planes: each plane is filled on its own
            idx = [slice(None)] * 3
            idx[ax] = k
            st[tuple(idx)] = False
        out |= ndimage.binary_fill_holes(mask, structure=st)
    return out


def _shell_evidence(filled: np.ndarray, sl: tuple[slice, ...], core: np.ndarray, zt2: np.ndarray,
                    zt1: np.ndarray | None, spacing: np.ndarray) -> tuple[float, float]:
    """(oedema fraction, CSF fraction) of the :data:`SHELL_MM` shell around ``filled`` (a mask on
    the ``sl`` box of the grid), inside ``core``; see the module docstring."""
    pad = [int(np.ceil(SHELL_MM / sp)) + 1 for sp in spacing]
    big = tuple(slice(max(0, s.start - p), min(n, s.stop + p)) for s, p, n in zip(sl, pad, core.shape))
    inner = np.zeros(tuple(b.stop - b.start for b in big), dtype=bool)
    inner[tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(sl, big))] = filled
    dist = ndimage.distance_transform_edt(~inner, sampling=spacing)
    shell = (dist > 0) & (dist <= SHELL_MM) & core[big]
    n = int(shell.sum())
    if n == 0:
        return 0.0, 0.0
    bright = zt2[big][shell] > OEDEMA_T2_Z
    if zt1 is None:
        return float(bright.mean()), 0.0
    dark = zt1[big][shell] <= CSF_T1_Z
    return float((bright & ~dark).mean()), float((bright & dark).mean())


class ShellEvidence:
    """The T2 evidence of :func:`detect_enhancing_lesion` for any candidate mask on a study's grid:
    ``(oedema fraction, CSF fraction)`` of the :data:`SHELL_MM` shell around it, inside the brain
    eroded by :data:`BORDER_EROSION_MM` (module docstring, step 5). Z-scores are computed once, in
    the constructor, from ``t1`` and ``t2`` (float ``(X, Y, Z)``) inside ``brain`` (bool).

    The segmenter's lesions pass the same CSF test as the heuristic's candidates: more than
    :data:`MAX_LESION_CSF_FRACTION` of the shell in CSF is the choroid plexus, not a lesion.
    """

    def __init__(self, brain: MaskRAS, affine: Affine, *, t1: VolumeRAS, t2: VolumeRAS) -> None:
        brain = np.asarray(brain, dtype=bool)
        self.spacing = voxel_sizes(affine)
        iters = max(1, int(round(BORDER_EROSION_MM / float(self.spacing.min()))))
        self.core = ndimage.binary_erosion(brain, ndimage.generate_binary_structure(3, 1), iterations=iters)
        inside = self.core if self.core.any() else brain
        self.zt1 = robust_zscore(np.asarray(t1, dtype=np.float32), inside)
        self.zt2 = robust_zscore(np.asarray(t2, dtype=np.float32), inside)

    def __call__(self, mask: MaskRAS) -> tuple[float, float]:
        """``(oedema fraction, CSF fraction)`` of the shell around ``mask`` (bool, the grid's shape)."""
        mask = np.asarray(mask, dtype=bool)
        found = ndimage.find_objects(mask.astype(np.int8))
        if not found or found[0] is None:
            return 0.0, 0.0
        sl = found[0]
        return _shell_evidence(mask[sl], sl, self.core, self.zt2, self.zt1, self.spacing)

    def is_choroid_like(self, mask: MaskRAS) -> bool:
        """More than :data:`MAX_LESION_CSF_FRACTION` of the shell around ``mask`` is CSF."""
        return self(mask)[1] > MAX_LESION_CSF_FRACTION


def normal_structure(mask: MaskRAS, affine: Affine, shell: ShellEvidence | None = None) -> str:
    """Why ``mask`` (bool, one enhancing component with holes filled) is a normally enhancing
    structure rather than a lesion, ``""`` when it may be a lesion: ``"vessel- or sheet-shaped"``
    (:func:`roundness` below :data:`MIN_LESION_ROUNDNESS`: veins, dural sinuses, falx) or, with a
    ``shell`` (needs T1 and T2), ``"surrounded by CSF (choroid plexus)"``. The heuristic detector's
    credibility tests, applied to the segmenter's components too."""
    if roundness(np.asarray(mask, dtype=bool), voxel_sizes(affine)) < MIN_LESION_ROUNDNESS:
        return "vessel- or sheet-shaped"
    if shell is not None and shell.is_choroid_like(mask):
        return "surrounded by CSF (choroid plexus)"
    return ""


def detect_enhancing_lesion(t1ce: VolumeRAS, brain_mask: MaskRAS, affine: Affine, *,
                            t1: VolumeRAS | None = None, t2: VolumeRAS | None = None,
                            min_volume_ml: float = 0.1) -> Lesion:
    """Find the enhancing lesion automatically (see module docstring for the method).

    Parameters
    ----------
    t1ce, t1, t2:
        float ``(X, Y, Z)`` on one co-registered grid (``affine``, voxel -> RAS mm); ``t1`` and
        ``t2`` optional (``t2`` adds the perilesional evidence, ``t1`` the enhancement
        subtraction and the CSF test).
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
    zt1 = robust_zscore(np.asarray(t1, dtype=np.float32), core) if t1 is not None else None
    enh = zc - zt1 if zt1 is not None else zc
    cand = core & (enh > ENHANCEMENT_Z) & (zc > T1CE_Z)
    cand = ndimage.binary_opening(cand, ndimage.generate_binary_structure(3, 1))
    if not cand.any():
        raise LesionError("no enhancing voxels found inside the brain (T1ce vs T1)")
    ball = _ball(MERGE_MM / 2.0, spacing)  # dilating both sides by MERGE_MM / 2 joins gaps < MERGE_MM
    groups, n = ndimage.label(ndimage.binary_dilation(cand, ball), ndimage.generate_binary_structure(3, 3))
    scored = []
    n_thin = 0
    margin = [k // 2 + 1 for k in ball.shape]  # closing needs room around the object
    for idx, sl in enumerate(ndimage.find_objects(groups), start=1):
        if sl is None:
            continue
        sl = tuple(slice(max(0, s.start - m), min(n, s.stop + m)) for s, m, n in zip(sl, margin, cand.shape))
        comp = cand[sl] & (groups[sl] == idx)
        n_vox = int(comp.sum())
        if n_vox * voxel_ml < min_volume_ml:
            continue
        filled = _fill(ndimage.binary_closing(comp, ball) | comp) & core[sl]
        rnd = roundness(filled, spacing)
        scored.append((float(filled.sum()) * voxel_ml * rnd, rnd, sl, comp, filled))
    if not scored:
        raise LesionError(f"no enhancing component of at least {min_volume_ml:g} mL inside the brain")
    scored.sort(key=lambda c: -c[0])
    zt2 = robust_zscore(np.asarray(t2, dtype=np.float32), core) if t2 is not None else None
    final, others = [], []  # credible candidates; every candidate's score (for the runner-up)
    n_thin = n_csf = 0
    for base, rnd, sl, comp, filled in scored[:EVIDENCE_CANDIDATES] if zt2 is not None else scored:
        oedema, csf = float("nan"), float("nan")
        score = base
        if zt2 is not None:
            oedema, csf = _shell_evidence(filled, sl, core, zt2, zt1, spacing)
            score = base * (EVIDENCE_FLOOR + oedema) * (1.0 - csf)
        others.append(score)
        if rnd < MIN_LESION_ROUNDNESS:  # a vessel, a sinus or the falx
            n_thin += 1
        elif zt2 is not None and zt1 is not None and csf > MAX_LESION_CSF_FRACTION:  # the choroid plexus
            n_csf += 1
        else:
            final.append((score, sl, comp, filled, oedema, csf, rnd))
    if not final:
        raise LesionError(f"only normally enhancing structures found: {n_thin} vessel- or sheet-shaped and "
                          f"{n_csf} round enhancing component(s) surrounded by CSF (choroid plexus)")
    final.sort(key=lambda c: -c[0])
    best_score, sl, comp, filled, oedema, csf, rnd = final[0]
    # the runner-up is any other candidate, credible or not: a normal structure that scores as high as
    # the chosen one still means the choice needs a look
    others.remove(best_score)
    runner_up = max(others) / best_score if others and best_score > 0 else 0.0
    mean_enh = float(enh[sl][comp].mean())
    full = np.zeros(brain.shape, dtype=bool)
    full[sl] = filled
    vol = float(full.sum()) * voxel_ml
    return Lesion(full, _centroid_world(full, affine), vol, "heuristic", mean_enh, oedema, csf, float(runner_up),
                  float(rnd))


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
