"""Where the model looked: occlusion sensitivity through the ONNX ensemble itself.

Method (Zeiler & Fergus 2014, "Visualizing and Understanding Convolutional Networks", ECCV,
section 4.2): a cube of the model input (all channels) is replaced by ``fill`` (0 = the brain's
median after the robust z-score, which is also the value outside the brain), the ensemble's mean
probability of recurrence is computed again, and the drop ``p(x) - p(x occluded)`` is credited to
every voxel of the cube. The cube slides over the whole box; a voxel's value is the mean drop of
the cubes that cover it. It needs nothing but ``ensemble.predict``, so it works for any exported
ensemble (any architecture, any number of folds), at the cost of one ensemble pass per cube
position: :data:`PATCH_VOX` 10 and :data:`STRIDE_VOX` 5 on the 40^3 box are 7^3 = 343 passes.

Units: the map is in probability units (differences of p(recurrence), -1 ... 1), on the model
box grid ``(X, Y, Z)``, RAS+, 1.5 mm voxels by default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

#: edge of the occluding cube in model-box voxels (10 x 1.5 mm = 15 mm: about a lesion's radius)
PATCH_VOX = 10
#: step between cube positions in voxels (half the cube: every voxel is covered by up to 8 cubes)
STRIDE_VOX = 5
#: occluded copies per ensemble call (3 x 40^3 float32 each: 32 copies are 25 MB)
BATCH = 32


@dataclass(frozen=True, eq=False)
class Occlusion:
    """An occlusion-sensitivity map.

    ``delta``: float32 ``(X, Y, Z)`` (model box, RAS+): mean ``p(x) - p(x occluded)`` of the cubes
    covering each voxel; ``p``: the ensemble's p(recurrence) of the unoccluded input; ``passes``:
    occluded inputs evaluated; ``patch_vox`` / ``stride_vox``: cube edge and step (voxels);
    ``seconds``: wall time.
    """

    delta: np.ndarray
    p: float
    passes: int
    patch_vox: int
    stride_vox: int
    seconds: float


def _starts(n: int, patch: int, stride: int) -> list[int]:
    """Cube start positions along an axis of ``n`` voxels, the last one flush with the end."""
    if patch >= n:
        return [0]
    s = list(range(0, n - patch + 1, stride))
    if s[-1] != n - patch:
        s.append(n - patch)
    return s


def _probability(pred: Any) -> np.ndarray:
    """The reported (calibrated) probability of a prediction, or its raw ``mean``."""
    p = getattr(pred, "probability", None)
    return pred.mean if p is None else p


def occlusion_sensitivity(ensemble: Any, x: np.ndarray, *, patch_vox: int | None = None,
                          stride_vox: int | None = None, fill: float = 0.0,
                          batch: int = BATCH) -> Occlusion:
    """Occlusion sensitivity of ``ensemble`` for one model input.

    Parameters
    ----------
    ensemble:
        Anything with ``predict(x (N, C, X, Y, Z) float32) -> .mean (N,)``, e.g.
        :class:`recnec_cli.stages.infer.Ensemble`; its calibrated ``.probability`` is used when
        present, so the map is in the units of the report's ``p_recurrence``.
    x:
        float32 ``(C, X, Y, Z)``: one study's model input (channels T1, T2, T1ce; RAS+).
    patch_vox, stride_vox:
        Cube edge and step in voxels (default :data:`PATCH_VOX`, :data:`STRIDE_VOX`).
    fill:
        Value written into the cube (0: the brain median in robust z-score units).

    Returns
    -------
    Occlusion

    Raises
    ------
    ValueError
        ``x`` is not 4-D, or the cube / step is not positive.
    InferenceError
        From ``ensemble.predict``.
    """
    patch = PATCH_VOX if patch_vox is None else int(patch_vox)
    stride = STRIDE_VOX if stride_vox is None else int(stride_vox)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 4:
        raise ValueError(f"model input must be (C, X, Y, Z), got shape {x.shape}")
    if patch < 1 or stride < 1:
        raise ValueError("patch_vox and stride_vox must be >= 1")
    t0 = time.perf_counter()
    p0 = float(_probability(ensemble.predict(x[None]))[0])
    spatial = x.shape[1:]
    cubes = [(i, j, k) for i in _starts(spatial[0], patch, stride) for j in _starts(spatial[1], patch, stride)
             for k in _starts(spatial[2], patch, stride)]
    acc = np.zeros(spatial, dtype=np.float64)
    cnt = np.zeros(spatial, dtype=np.float64)
    for start in range(0, len(cubes), batch):
        chunk = cubes[start:start + batch]
        xs = np.repeat(x[None], len(chunk), axis=0)
        for n, (i, j, k) in enumerate(chunk):
            xs[n, :, i:i + patch, j:j + patch, k:k + patch] = fill
        p = np.asarray(_probability(ensemble.predict(xs, applicability=False)), dtype=np.float64)
        for n, (i, j, k) in enumerate(chunk):
            acc[i:i + patch, j:j + patch, k:k + patch] += p0 - p[n]
            cnt[i:i + patch, j:j + patch, k:k + patch] += 1.0
    delta = (acc / np.maximum(cnt, 1.0)).astype(np.float32)
    return Occlusion(delta=delta, p=p0, passes=len(cubes), patch_vox=patch, stride_vox=stride,
                     seconds=time.perf_counter() - t0)
