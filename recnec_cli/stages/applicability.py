"""Applicability: does a study's model input look like the ensemble's training data?

A classifier gives a probability for anything it is fed, including a scan unlike every case it
was trained on (another contrast, a series given the wrong role, a lesion-free box, a different
anatomy). This module measures how far a model-input tensor lies from the training inputs, with
statistics that need nothing but the tensor, so ``recnec train`` and ``recnec scan`` compute the
same numbers from the same function.

Features (:data:`FEATURE_NAMES`, 16 per study), from the model input ``(3, X, Y, Z)`` (channels
T1, T2, T1ce in the manifest's order; robust z-scores inside the brain, 0 outside; see
:mod:`recnec_cli.stages.modelinput`):

* ``brain_fraction``: fraction of the box inside the brain (any channel non-zero);
* per channel, over the brain voxels: the 5th and 95th percentiles, and the fraction at the clip
  value (``|z| >= clip``: bright or dark outliers);
* per channel, the mean of the central ``12 mm`` cube (the lesion, on which the box is centred);
* the Pearson correlations T1-T2, T1-T1ce and T2-T1ce over the brain voxels (a swapped or
  wrong-contrast series changes them first).

Distance: the Mahalanobis distance of the feature vector to the training features, with the
Ledoit-Wolf shrunk covariance (fitted by :func:`recnec_cli.train.reliability.fit_applicability`,
scikit-learn ``LedoitWolf``; O. Ledoit and M. Wolf, J. Multivariate Anal. 2004). The threshold
is stored in the manifest (``applicability``); a study above it is flagged
``OUT_OF_DISTRIBUTION``. It still gets its probability: the flag says "do not trust this one",
not "this one failed".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import EnvironmentBroken

#: report flag for a study whose model input lies beyond the manifest's applicability threshold
OOD_FLAG = "OUT_OF_DISTRIBUTION"
#: edge of the central cube (mm) whose mean intensity stands for the lesion
CENTRE_MM = 12.0
#: channel order the feature names are written in (the manifest's ``input.channels``)
_CHANNELS = ("T1", "T2", "T1ce")
FEATURE_NAMES: tuple[str, ...] = (
    ("brain_fraction",)
    + tuple(f"{c}_{k}" for c in _CHANNELS for k in ("p05", "p95", "clipped", "centre_mean"))
    + ("corr_T1_T2", "corr_T1_T1ce", "corr_T2_T1ce")
)


def input_features(x: np.ndarray, *, spacing_mm: float = 1.5, clip: float = 5.0) -> np.ndarray:
    """The :data:`FEATURE_NAMES` statistics of model-input tensors.

    Parameters
    ----------
    x:
        float32 ``(N, 3, X, Y, Z)`` or ``(3, X, Y, Z)``: model inputs, channels T1, T2, T1ce.
    spacing_mm:
        Box voxel size (mm), for the central cube.
    clip:
        The normalisation's clip value (manifest ``input.clip``).

    Returns
    -------
    numpy.ndarray
        float64 ``(N, 16)`` in :data:`FEATURE_NAMES` order. A box with fewer than 10 brain voxels
        gets percentiles and correlations of 0 (and will be far from any training case).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 4:
        x = x[None]
    if x.ndim != 5 or x.shape[1] != 3:
        raise ValueError(f"model inputs must be (N, 3, X, Y, Z), got {x.shape}")
    n, _, sx, sy, sz = x.shape
    half = max(1, int(round(CENTRE_MM / spacing_mm / 2)))
    cx, cy, cz = sx // 2, sy // 2, sz // 2
    out = np.zeros((n, len(FEATURE_NAMES)), dtype=np.float64)
    for i in range(n):
        xi = x[i]
        brain = np.any(xi != 0, axis=0)
        nb = int(brain.sum())
        f = [nb / brain.size]
        vals = xi[:, brain].astype(np.float64) if nb >= 10 else None
        centre = xi[:, cx - half:cx + half, cy - half:cy + half, cz - half:cz + half]
        for c in range(3):
            if vals is None:
                f += [0.0, 0.0, 0.0]
            else:
                p05, p95 = np.percentile(vals[c], [5, 95])
                f += [float(p05), float(p95), float(np.mean(np.abs(vals[c]) >= clip - 1e-6))]
            f.append(float(centre[c].mean()))
        for a, b in ((0, 1), (0, 2), (1, 2)):
            if vals is None or vals[a].std() == 0 or vals[b].std() == 0:
                f.append(0.0)
            else:
                f.append(float(np.corrcoef(vals[a], vals[b])[0, 1]))
        out[i] = f
    return out


def mahalanobis(d: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``sqrt(d_n^T P d_n)`` for feature differences ``d`` ``(N, F)`` and a precision matrix
    ``P`` ``(F, F)``; float64 ``(N,)`` (negative round-off clipped to 0)."""
    return np.sqrt(np.maximum(np.einsum("ni,ij,nj->n", d, precision, d), 0.0))


@dataclass(frozen=True)
class Applicability:
    """The training distribution of :func:`input_features`, as stored in the manifest.

    Attributes
    ----------
    mean:
        float64 ``(F,)``: training feature means.
    precision:
        float64 ``(F, F)``: inverse of the Ledoit-Wolf covariance of the training features.
    threshold:
        Mahalanobis distance above which a study is :data:`OOD_FLAG`.
    spacing_mm, clip:
        From the manifest's input spec (the features depend on them).
    """

    mean: np.ndarray
    precision: np.ndarray
    threshold: float
    spacing_mm: float = 1.5
    clip: float = 5.0

    def distance(self, x: np.ndarray) -> np.ndarray:
        """Mahalanobis distance (unitless) of model inputs ``(N, 3, X, Y, Z)`` to the training
        features; float64 ``(N,)``."""
        d = input_features(x, spacing_mm=self.spacing_mm, clip=self.clip) - self.mean
        return mahalanobis(d, self.precision)

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "Applicability | None":
        """The manifest's ``applicability`` entry, or ``None`` for weights trained before it existed.

        Raises
        ------
        EnvironmentBroken
            ``WEIGHTS_MANIFEST_INVALID`` when the entry exists but is malformed (wrong feature
            list, shapes, or a non-positive threshold).
        """
        entry = manifest.get("applicability")
        if entry is None:
            return None
        try:
            names = tuple(entry["features"])
            mean = np.asarray(entry["mean"], dtype=np.float64)
            precision = np.asarray(entry["precision"], dtype=np.float64)
            threshold = float(entry["threshold"])
            spec = manifest.get("input", {})
            spacing, clip = float(spec.get("spacing_mm", 1.5)), float(spec.get("clip", 5.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvironmentBroken(f"manifest applicability entry unreadable: {exc}",
                                    code="WEIGHTS_MANIFEST_INVALID") from None
        f = len(FEATURE_NAMES)
        if names != FEATURE_NAMES or mean.shape != (f,) or precision.shape != (f, f) or not threshold > 0 \
                or not (np.isfinite(mean).all() and np.isfinite(precision).all()):
            raise EnvironmentBroken(
                "manifest applicability entry does not match this recnec's features "
                f"({len(names)} features, mean {mean.shape}, precision {precision.shape}, threshold {threshold})",
                code="WEIGHTS_MANIFEST_INVALID")
        return cls(mean=mean, precision=precision, threshold=threshold, spacing_mm=spacing, clip=clip)
