"""Training augmentation that imitates how a scan makes its model input (issue 12).

Model-space training tensors are cut from 1 mm ground truth; a scan cuts them from series that are
often 2D with 5-7 mm slices, registered with some error. Per channel (each series of a study is
acquired and registered on its own), with the probabilities of :data:`DEFAULTS`:

* **thick slices**: along one axis (axial, i.e. S, in 60 % of the draws; coronal or sagittal
  otherwise) the channel is averaged over a slab of 3-7 mm (box profile: partial volume of a
  2D slice) sampled every slab width from a random phase, then linearly interpolated back onto
  the 1.5 mm box, as the scan's resampling onto its 1 mm grid does;
* **registration error** (T1 and T2 only, which the scan registers onto the T1ce): a sub-voxel
  shift of up to 1.5 mm in a random direction (linear interpolation);
* after either, the channel is robust-z-scored again over the brain voxels and clipped, exactly
  as :func:`recnec_cli.stages.modelinput.make_model_input` does, and voxels outside the brain
  (all channels 0 in the input) stay 0.

Lesion-centroid error is the job of the existing translation augmentation (random crop, up to
6 mm). Measured by the previous work: scan-vs-truth channel correlations 0.91-0.95 for 6 mm 2D
series and 0.96-0.996 for 3D (issue 12); this augmentation's thick-slice draw at 6 mm gives
correlations in the same range (``tests/test_acquisition_aug.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..stages.intensity import robust_zscore


@dataclass(frozen=True)
class AcquisitionAugment:
    """Probabilities and ranges of the simulated acquisition (see the module docstring).

    ``p_thick``: per channel, probability of thick slices; ``thick_mm``: slab range (mm);
    ``p_axial``: probability that a thick-slice channel is axial; ``p_misregister`` /
    ``misregister_mm``: per T1 / T2 channel, probability and largest shift (mm);
    ``spacing_mm`` / ``clip``: the model input's voxel size and clip value.
    """

    p_thick: float = 0.5
    thick_mm: tuple[float, float] = (3.0, 7.0)
    p_axial: float = 0.6
    p_misregister: float = 0.5
    misregister_mm: float = 1.5
    spacing_mm: float = 1.5
    clip: float = 5.0


DEFAULTS = AcquisitionAugment()


def thick_slices(channel: np.ndarray, axis: int, thickness_vox: float, phase: float) -> np.ndarray:
    """A 2D acquisition of ``channel`` (float ``(X, Y, Z)``) along ``axis``: slabs of
    ``thickness_vox`` voxels (box average), one sample per slab starting at ``phase`` (voxels),
    linearly interpolated back onto the original grid; same shape, float32."""
    a = np.moveaxis(np.asarray(channel, dtype=np.float32), axis, -1)
    n = a.shape[-1]
    box = ndimage.uniform_filter1d(a, size=max(1, int(round(thickness_vox))), axis=-1, mode="constant")
    centres = np.arange(phase, n - 1 + 1e-6, thickness_vox)
    if len(centres) < 2:
        return np.moveaxis(box, -1, axis)
    i0 = np.clip(np.floor(centres).astype(int), 0, n - 2)
    w = (centres - i0)[None, None, :]
    coarse = (1 - w) * box[..., i0] + w * box[..., i0 + 1]
    u = np.clip((np.arange(n) - phase) / thickness_vox, 0, len(centres) - 1)
    j0 = np.clip(np.floor(u).astype(int), 0, len(centres) - 2)
    w2 = (u - j0)[None, None, :]
    fine = (1 - w2) * coarse[..., j0] + w2 * coarse[..., j0 + 1]
    return np.moveaxis(fine.astype(np.float32), -1, axis)


def simulate_acquisition(x: np.ndarray, rng: np.random.Generator,
                         params: AcquisitionAugment = DEFAULTS) -> np.ndarray:
    """One draw of the simulated acquisition for a model input ``x``: float32 ``(3, X, Y, Z)``,
    channels T1, T2, T1ce (RAS+); returns a new array of the same shape and dtype."""
    x = np.array(x, dtype=np.float32, copy=True)
    brain = np.any(x != 0, axis=0)
    if brain.sum() < 10:
        return x
    for c in range(x.shape[0]):
        changed = False
        if rng.random() < params.p_thick:
            axis = 2 if rng.random() < params.p_axial else int(rng.integers(0, 2))
            t = rng.uniform(*params.thick_mm) / params.spacing_mm
            x[c] = thick_slices(x[c], axis, t, rng.uniform(0, t))
            changed = True
        if c < 2 and rng.random() < params.p_misregister:  # T1, T2 are registered onto the T1ce
            v = rng.normal(size=3)
            v *= rng.uniform(0, params.misregister_mm / params.spacing_mm) / max(np.linalg.norm(v), 1e-9)
            x[c] = ndimage.shift(x[c], v, order=1, mode="constant", cval=0.0)
            changed = True
        if changed:
            x[c] = np.clip(robust_zscore(x[c], brain), -params.clip, params.clip)
            x[c][~brain] = 0.0
    return x
