"""A brain mask that keeps the tumour: HD-BET's mask refined with what the images themselves say.

HD-BET was trained on brains without large lesions; on a rim-enhancing or cystic tumour that
reaches the brain surface it can cut the tumour out of the mask, and everything downstream (the
lesion search, the model box) then looks elsewhere. Two refinements, both reported:

1. **Inputs that are already skull-stripped** (most research data: BraTS, SRI24-registered sets)
   carry their own brain mask: a constant background (all voxels equal to the image minimum)
   around one brain-sized foreground. :func:`input_foreground` recognises that (one value, the
   minimum or the 0 of a z-scored image, on at least :data:`MIN_BORDER_BACKGROUND` of the field
   of view's outer faces and at least :data:`MIN_BACKGROUND_FRACTION` of its voxels; the
   foreground's largest component within the plausible brain range,
   :data:`recnec_cli.stages.skullstrip.BRAIN_VOLUME_RANGE_ML`; mostly covered by HD-BET's mask,
   :data:`MIN_HDBET_AGREEMENT`, unless HD-BET put its brain where there is no image). The mask is
   then the union of HD-BET's and the input's own foreground, holes filled (source
   ``hdbet+input``); when more than :data:`MAX_HDBET_IN_BACKGROUND` of HD-BET's mask lies in the
   input's empty background, HD-BET failed on this input and the input's foreground alone is the
   mask (source ``input``, a WARNING).
2. **Enhancing tissue cut at the mask edge** (any input): a thick, round enhancing component
   inside the mask (at least :data:`SEED_MIN_ML`, containing a ball of radius
   :data:`SEED_MIN_RADIUS_MM`, and as round as a lesion must be,
   :data:`recnec_cli.stages.lesion.MIN_LESION_ROUNDNESS`: cortical veins are too thin and a dural
   sinus, thick but a tube, too elongated to seed) that touches the mask border is followed outwards
   through enhancing voxels, at most :data:`EDGE_MARGIN_MM` beyond the mask. When that adds at
   least :data:`EDGE_MIN_ML` and at most :data:`EDGE_MAX_SEED_RATIO` times the seeds' own volume
   (more is enhancement outside the brain, and nothing is grown) the grown voxels join the mask
   and the study gets the flag :data:`EDGE_FLAG` (``LESION_AT_MASK_EDGE``): look at the QC
   picture. Enhancement is
   ``z(T1ce) - z(T1)`` with the robust z-scores of the lesion stage
   (:mod:`recnec_cli.stages.lesion`). T2 hyperintensity alone does not grow the mask: without a
   FLAIR it cannot tell oedema from the cerebrospinal fluid that lines every brain surface.

Source and method: issue 19 of this project (a BraTS-MET metastasis, skull-stripped, 47 mL with a
cystic part at the surface, cut out by HD-BET's mask); SynthStrip (Hoopes et al. 2022, NeuroImage
260:119474) and HD-BET (Isensee et al. 2019, Hum Brain Mapp 40:4952) both document lesion-bearing
brains as their weak case.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from nibabel.affines import voxel_sizes
from scipy import ndimage

from ..types import Affine, MaskRAS, VolumeRAS
from .intensity import robust_zscore
from .lesion import MIN_LESION_ROUNDNESS, roundness
from .skullstrip import BRAIN_VOLUME_RANGE_ML

log = logging.getLogger(__name__)

#: an input is skull-stripped when its constant background fills at least this fraction of the
#: field of view ...
MIN_BACKGROUND_FRACTION = 0.2
#: ... and at least this fraction of the voxels on the field of view's six faces
MIN_BORDER_BACKGROUND = 0.95
#: ... and HD-BET's mask covers at least this fraction of its foreground (a head whose air is
#: exactly 0 has a foreground of 3-5 L, of which HD-BET's brain is a third)
MIN_HDBET_AGREEMENT = 0.8
#: ... or HD-BET put more than this fraction of its brain in the input's constant background (no
#: image there at all): HD-BET failed on the stripped input, whose own foreground is then the mask
MAX_HDBET_IN_BACKGROUND = 0.1
#: enhancement (z(T1ce) - z(T1)) above which a voxel enhances; the lesion stage's threshold
ENHANCEMENT_Z = 3.0
#: a seed component holds at least this much enhancing tissue (mL) ...
SEED_MIN_ML = 0.5
#: ... and a ball of this radius (mm): vessels and the falx are thinner
SEED_MIN_RADIUS_MM = 2.5
#: the mask grows at most this far beyond its border (mm)
EDGE_MARGIN_MM = 15.0
#: growth of at least this much (mL) joins the mask and flags the study
EDGE_MIN_ML = 0.5
#: ... and at most this many times the seeds' own volume: a lesion cut by the mask continues
#: outside by about as much as it has inside; more is enhancement outside the brain (scalp, dura,
#: muscle, or T1 / T1ce differences outside the brain that the brain's z-scores do not cancel:
#: TCGA-FG-6692, 5.5 mm slices, grew by 232 mL without this bound), and nothing is grown
EDGE_MAX_SEED_RATIO = 1.0
EDGE_FLAG = "LESION_AT_MASK_EDGE"


@dataclass(frozen=True, eq=False)
class RefinedMask:
    """The refined brain mask on the common grid and what changed.

    ``mask``: bool ``(X, Y, Z)`` RAS+; ``source``: ``hdbet``, ``hdbet+input`` (union with the
    skull-stripped input's foreground) and/or ``+edge`` (grown across the edge); ``added_input_ml``
    / ``added_edge_ml``: what each refinement added (mL); ``flags``: :data:`EDGE_FLAG` or nothing.
    """

    mask: MaskRAS
    source: str
    added_input_ml: float
    added_edge_ml: float
    flags: tuple[str, ...]


def input_foreground(t1ce: VolumeRAS, hdbet_mask: MaskRAS, affine: Affine) -> MaskRAS | None:
    """The input's own brain mask when the T1ce is already skull-stripped, else ``None``.

    ``t1ce``: float ``(X, Y, Z)``; ``hdbet_mask``: bool, HD-BET's brain on the same grid;
    ``affine``: ``(4, 4)`` voxel -> RAS mm. The criteria are in the module docstring; the returned
    mask is the foreground's largest component (face connectivity), holes filled.
    """
    v = np.asarray(t1ce)
    if v.ndim != 3 or v.size == 0:
        return None
    # the background value is the one that fills the field of view's faces: the minimum of a
    # stripped image, or 0 of a stripped and then z-scored one (brain values on both sides of it)
    face_values = np.concatenate([np.take(v, idx, axis=ax).ravel() for ax in range(3) for idx in (0, -1)])
    values, counts = np.unique(face_values, return_counts=True)
    if counts.max() < MIN_BORDER_BACKGROUND * face_values.size:
        return None
    bg = v == values[int(np.argmax(counts))]
    if bg.mean() < MIN_BACKGROUND_FRACTION:
        return None
    lab, n = ndimage.label(~bg)
    if n == 0:
        return None
    sizes = np.bincount(lab.ravel())[1:]
    fg = ndimage.binary_fill_holes(lab == int(np.argmax(sizes)) + 1)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    vol = float(fg.sum()) * voxel_ml
    if not (BRAIN_VOLUME_RANGE_ML[0] <= vol <= BRAIN_VOLUME_RANGE_ML[1]):
        return None
    hd = np.asarray(hdbet_mask, dtype=bool)
    agree = float(np.count_nonzero(fg & hd)) / max(1, int(fg.sum()))
    if agree < MIN_HDBET_AGREEMENT and not hdbet_failed_on(hd, fg):
        return None
    return fg


def hdbet_in_background(hdbet_mask: MaskRAS, foreground: MaskRAS) -> float:
    """The fraction of HD-BET's brain that lies in a skull-stripped input's constant background:
    voxels that hold no image at all. Above :data:`MAX_HDBET_IN_BACKGROUND` HD-BET failed on this
    input (z-scored inputs confuse it) and the input's own foreground is the brain."""
    hd = np.asarray(hdbet_mask, dtype=bool)
    return float(np.count_nonzero(hd & ~np.asarray(foreground, dtype=bool))) / max(1, int(hd.sum()))


def hdbet_failed_on(hdbet_mask: MaskRAS, foreground: MaskRAS) -> bool:
    """HD-BET failed on a skull-stripped input (:func:`hdbet_in_background` above
    :data:`MAX_HDBET_IN_BACKGROUND`): the input's own ``foreground`` replaces its mask."""
    return hdbet_in_background(hdbet_mask, foreground) > MAX_HDBET_IN_BACKGROUND


def refine_brain_mask(hdbet_mask: MaskRAS, affine: Affine, *, t1ce: VolumeRAS, t1: VolumeRAS | None = None,
                      input_mask: MaskRAS | None = None) -> RefinedMask:
    """HD-BET's mask (bool ``(X, Y, Z)`` on the common grid ``affine``), refined as the module
    docstring says: united with ``input_mask`` (the resampled :func:`input_foreground`, when the
    input was skull-stripped), then grown across its edge along thick enhancing tissue (``t1ce``,
    ``t1``: float ``(X, Y, Z)`` registered on the same grid; ``t1`` optional).

    Never shrinks the mask; returns it unchanged (source ``hdbet``) when neither refinement applies.
    """
    mask = np.asarray(hdbet_mask, dtype=bool)
    spacing = voxel_sizes(affine)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    source = "hdbet"
    added_input = 0.0
    if input_mask is not None:
        own = np.asarray(input_mask, dtype=bool)
        if hdbet_failed_on(mask, own):
            log.warning("HD-BET put %.0f %% of its brain mask where the skull-stripped input holds no image: "
                        "the input's own brain is used", 100 * hdbet_in_background(mask, own))
            merged, source = ndimage.binary_fill_holes(own), "input"
        else:
            merged, source = ndimage.binary_fill_holes(mask | own), "hdbet+input"
        added_input = float(np.count_nonzero(merged & ~mask)) * voxel_ml
        mask = merged
    grown = _grow_enhancing_edge(mask, spacing, t1ce=t1ce, t1=t1)
    added_edge = float(np.count_nonzero(grown & ~mask)) * voxel_ml
    flags: tuple[str, ...] = ()
    if added_edge >= EDGE_MIN_ML:
        mask = ndimage.binary_fill_holes(grown)
        source += "+edge"
        flags = (EDGE_FLAG,)
    else:
        added_edge = 0.0
    return RefinedMask(mask, source, added_input, added_edge, flags)


def _grow_enhancing_edge(mask: np.ndarray, spacing: np.ndarray, *, t1ce: VolumeRAS,
                         t1: VolumeRAS | None) -> np.ndarray:
    """``mask`` plus the enhancing voxels outside it (within :data:`EDGE_MARGIN_MM`) connected to a
    thick enhancing seed component that touches the mask border."""
    if mask.sum() < 1000:
        return mask
    zc = robust_zscore(np.asarray(t1ce, dtype=np.float32), mask)
    enh = zc - robust_zscore(np.asarray(t1, dtype=np.float32), mask) if t1 is not None else zc
    hot = enh > ENHANCEMENT_Z
    inside = hot & mask
    if not inside.any():
        return mask
    st = ndimage.generate_binary_structure(3, 1)
    border = mask & ~ndimage.binary_erosion(mask, st)
    # thick: the component survives an erosion by SEED_MIN_RADIUS_MM; round: see the module docstring
    iters = max(1, int(round(SEED_MIN_RADIUS_MM / float(spacing.min()))))
    thick = ndimage.binary_erosion(inside, st, iterations=iters)
    lab, n = ndimage.label(inside, st)
    if n == 0:
        return mask
    voxel_ml = float(np.prod(spacing)) / 1000.0
    sizes = np.bincount(lab.ravel())
    ids = set(np.unique(lab[thick & (lab > 0)])) & set(np.unique(lab[border & (lab > 0)]))
    objs = ndimage.find_objects(lab)
    seeds = [i for i in ids if sizes[i] * voxel_ml >= SEED_MIN_ML
             and roundness(lab[objs[i - 1]] == i, spacing) >= MIN_LESION_ROUNDNESS]
    if not seeds:
        return mask
    seed = np.isin(lab, seeds)
    near = ndimage.distance_transform_edt(~mask, sampling=spacing) <= EDGE_MARGIN_MM
    allowed = (hot & near & ~mask) | seed
    lab2, _ = ndimage.label(allowed, st)
    keep = np.unique(lab2[seed])
    out = np.isin(lab2, keep[keep > 0]) & ~mask
    seed_ml, out_ml = float(seed.sum()) * voxel_ml, float(out.sum()) * voxel_ml
    if out_ml > EDGE_MAX_SEED_RATIO * seed_ml:
        log.info("enhancing tissue beyond the brain mask (%.1f mL) is larger than the enhancing component "
                 "inside it (%.1f mL): enhancement outside the brain, the mask is not grown", out_ml, seed_ml)
        return mask
    return mask | out
