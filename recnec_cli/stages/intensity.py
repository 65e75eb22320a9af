"""Intensity standardisation shared by lesion detection and the model input.

One robust z-score, so that "standardised inside the brain" means the same thing in
:mod:`~recnec_cli.stages.lesion` (enhancement map) and :mod:`~recnec_cli.stages.modelinput`
(the model's channels, recipe stored in the weights manifest).
"""

from __future__ import annotations

import numpy as np

#: IQR of a normal distribution in units of its standard deviation (2 x 0.6745)
IQR_PER_SIGMA = 1.349


def robust_zscore(x: np.ndarray, inside: np.ndarray) -> np.ndarray:
    """``(x - median) / (IQR / 1.349)`` with median and IQR taken over the voxels of ``inside``.

    Parameters
    ----------
    x:
        float array of any shape (a volume ``(X, Y, Z)`` RAS+ in the stages), image units.
    inside:
        bool array of ``x``'s shape, True where the statistics are taken (the brain); must
        select at least one voxel.

    Returns
    -------
    numpy.ndarray
        ``x`` standardised (same shape; float32 for float32 input), every voxel, inside or not.
        When the IQR is not a usable scale (not finite, or at most ``1e-6 * max(1, |median|)``:
        more than half the voxels share one value) the standard deviation of the inside voxels
        is used instead, and 1 when that is 0 too (a constant region stays at 0).

    Raises
    ------
    ValueError
        When ``inside`` selects no voxel (numpy's median / percentile of an empty array).
    """
    v = np.asarray(x)[np.asarray(inside, dtype=bool)]
    if v.size == 0:
        raise ValueError("robust_zscore: no voxel inside the mask")
    med = float(np.median(v))
    q25, q75 = np.percentile(v, [25.0, 75.0])
    scale = float(q75 - q25) / IQR_PER_SIGMA
    if not np.isfinite(scale) or scale <= 1e-6 * max(1.0, abs(med)):
        scale = float(np.std(v)) or 1.0
    return (x - med) / scale
