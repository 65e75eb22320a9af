"""Follow-up maps: what a study keeps for comparisons with the same patient's later scans.

A processed study stores a small :class:`FollowUpMap` in the state: its T1ce (brain only, 8-bit)
and its lesion labels, both at :data:`MAP_SPACING_MM` on the common grid cropped to the brain. A
later study of the same patient is compared with it without reading or processing any image again
(:func:`match_lesions`): the earlier T1ce is rigidly registered onto the later one (the head sits
differently at every visit), the earlier labels follow, and the two lesions count as the same when
they overlap (:data:`MIN_OVERLAP`). The same registration gives the side-by-side picture of both
T1ce at one anatomical slice (:func:`paired_slices`).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from ..errors import RegistrationError
from ..study import Volume

log = logging.getLogger(__name__)

#: voxel size of a follow-up map, mm (isotropic): 2 mm keeps a map near 0.3 MB compressed and
#: registers in about a second
MAP_SPACING_MM = 2.0
#: two lesions are the same when the overlap of their outlines (enhancing + core), as a fraction of
#: the smaller one, reaches this after registration; shrinking necrosis lies inside its earlier
#: outline and a growing recurrence contains its earlier one, so either way the fraction is high
MIN_OVERLAP = 0.10
#: bounds of the rigid transform between two visits (head repositioned, not a different head)
MAX_TRANSLATION_MM = 80.0
MAX_ROTATION_DEG = 45.0


@dataclass(frozen=True, eq=False)
class FollowUpMap:
    """A study's T1ce and lesion at :data:`MAP_SPACING_MM`.

    ``t1ce`` uint8 ``(X, Y, Z)`` RAS+ (0 outside the brain; 1-255 the brain's 0.5-99.5 percentile
    window), ``labels`` uint8 of the same shape (1 enhancing, 2 necrotic core, 3 oedema; a lesion
    without compartments is all 1), ``affine`` ``(4, 4)`` voxel -> world mm (RAS+).
    """

    t1ce: np.ndarray
    labels: np.ndarray
    affine: np.ndarray

    @property
    def lesion(self) -> np.ndarray:
        """bool ``(X, Y, Z)``: enhancing tissue and its core (the lesion outline, no oedema)."""
        return (self.labels == 1) | (self.labels == 2)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, t1ce=self.t1ce, labels=self.labels, affine=self.affine)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "FollowUpMap":
        """Raises ``ValueError`` for bytes that are not a follow-up map."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                return cls(t1ce=z["t1ce"], labels=z["labels"], affine=z["affine"])
        except (OSError, KeyError, EOFError) as exc:
            raise ValueError(f"not a follow-up map ({type(exc).__name__})") from None


def make_map(t1ce: np.ndarray, brain: np.ndarray, labels: np.ndarray, affine: np.ndarray) -> FollowUpMap:
    """The :class:`FollowUpMap` of a study on its common grid.

    ``t1ce`` float ``(X, Y, Z)``, ``brain`` bool, ``labels`` uint8 (0 background, 1 enhancing,
    2 core, 3 oedema), all on the grid of ``affine`` (voxel -> RAS mm, axis-aligned, as the common
    grid is). Sub-sampled by the whole factor nearest to :data:`MAP_SPACING_MM` / voxel size and
    cropped to the brain's bounding box (2 voxels margin).

    Raises
    ------
    ValueError
        For an empty brain mask or arrays of different shapes.
    """
    t1ce, brain, labels = np.asarray(t1ce), np.asarray(brain, dtype=bool), np.asarray(labels)
    if not (t1ce.shape == brain.shape == labels.shape):
        raise ValueError(f"shapes differ: {t1ce.shape}, {brain.shape}, {labels.shape}")
    if not brain.any():
        raise ValueError("empty brain mask")
    affine = np.asarray(affine, dtype=np.float64)
    vox = float(np.mean(np.linalg.norm(affine[:3, :3], axis=0)))
    step = max(1, int(round(MAP_SPACING_MM / vox)))
    idx = np.nonzero(brain)
    lo = [max(0, int(a.min()) - 2 * step) for a in idx]
    hi = [min(n, int(a.max()) + 2 * step + 1) for a, n in zip(idx, brain.shape)]
    sl = tuple(slice(a, b, step) for a, b in zip(lo, hi))
    vals = t1ce[brain]
    p_lo, p_hi = np.percentile(vals, [0.5, 99.5]) if vals.size else (0.0, 1.0)
    scaled = np.clip((t1ce[sl] - p_lo) / max(float(p_hi - p_lo), 1e-6), 0.0, 1.0) * 254.0 + 1.0
    out_t1 = np.where(brain[sl], np.rint(scaled), 0).astype(np.uint8)
    out_aff = affine.copy()
    out_aff[:3, :3] = affine[:3, :3] * step
    out_aff[:3, 3] = affine[:3, :3] @ np.asarray(lo, dtype=np.float64) + affine[:3, 3]
    return FollowUpMap(t1ce=out_t1, labels=np.asarray(labels[sl], dtype=np.uint8), affine=out_aff)


@dataclass(frozen=True)
class LesionMatch:
    """The outcome of :func:`match_lesions`: ``status`` (:data:`recnec_cli.timeline.SAME`,
    ``DIFFERENT`` or ``NOT_CHECKED``), ``overlap`` (fraction of the smaller lesion inside the other,
    ``None`` when not checked), ``note`` (why, for the log and the report)."""

    status: str
    overlap: float | None
    note: str
    transform: object = None


def _register(current: FollowUpMap, earlier: FollowUpMap):
    from .register import register_rigid

    fixed = Volume(current.t1ce.astype(np.float32), current.affine)
    moving = Volume(earlier.t1ce.astype(np.float32), earlier.affine)
    return register_rigid(fixed, moving, max_translation_mm=MAX_TRANSLATION_MM,
                          max_rotation_deg=MAX_ROTATION_DEG).transform


def match_lesions(current: FollowUpMap, earlier: FollowUpMap) -> LesionMatch:
    """Whether ``earlier``'s lesion is ``current``'s: rigid registration of the earlier T1ce onto
    the current one (:func:`recnec_cli.stages.register.register_rigid`, Mattes MI, Euler3D, within
    :data:`MAX_TRANSLATION_MM` / :data:`MAX_ROTATION_DEG`), the earlier labels resampled
    (nearest neighbour) onto the current map, overlap = |both| / min(|current|, |earlier|).

    Never raises: a failed registration or an empty lesion is ``not_checked`` with the reason.
    """
    from .. import timeline
    from .register import resample_to_grid

    if not current.lesion.any() or not earlier.lesion.any():
        return LesionMatch(timeline.NOT_CHECKED, None, "no enhancing lesion in one of the two studies")
    try:
        tx = _register(current, earlier)
    except (RegistrationError, ValueError, RuntimeError) as exc:
        return LesionMatch(timeline.NOT_CHECKED, None, f"registration of the two T1ce failed ({str(exc)[:120]})")
    moved = resample_to_grid(Volume(earlier.lesion.astype(np.float32), earlier.affine), current.t1ce.shape,
                             current.affine, tx, order=0) > 0.5
    cur = current.lesion
    n_cur, n_old = int(cur.sum()), int(earlier.lesion.sum())
    both = int(np.count_nonzero(cur & moved))
    overlap = both / max(1, min(n_cur, n_old))
    status = timeline.SAME if overlap >= MIN_OVERLAP else timeline.DIFFERENT
    return LesionMatch(status, round(overlap, 3), f"overlap {overlap:.2f} of the smaller lesion", tx)


def paired_slices(current: FollowUpMap, earlier: FollowUpMap, transform: object
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """The axial slice through the current lesion's centroid (or the brain's centre) of the current
    T1ce and of the earlier T1ce registered onto it (``transform`` from :func:`match_lesions`).

    Returns ``(current (X, Y) uint8, earlier (X, Y) uint8, current lesion (X, Y) bool, earlier
    lesion (X, Y) bool, z in world mm)``; the slices are RAS+ ``(X, Y)`` (R, A).
    """
    from .register import resample_to_grid

    shape = current.t1ce.shape
    t1 = resample_to_grid(Volume(earlier.t1ce.astype(np.float32), earlier.affine), shape, current.affine,
                          transform, order=1)
    les = resample_to_grid(Volume(earlier.lesion.astype(np.float32), earlier.affine), shape, current.affine,
                           transform, order=0) > 0.5
    where = np.nonzero(current.lesion) if current.lesion.any() else np.nonzero(current.t1ce)
    k = int(round(float(np.mean(where[2])))) if len(where[2]) else shape[2] // 2
    z_mm = float((current.affine @ np.array([0.0, 0.0, k, 1.0]))[2])
    return (current.t1ce[:, :, k], np.clip(t1[:, :, k], 0, 255).astype(np.uint8), current.lesion[:, :, k],
            les[:, :, k], z_mm)

