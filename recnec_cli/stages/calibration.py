"""Probability calibration: the map from the ensemble's raw score to a calibrated probability.

The fold models are trained with a class-balanced loss (``pos_weight = n_necrosis /
n_recurrence``), so their raw outputs behave as if both classes were equally common: on a
192:42 cohort they are systematically too low for recurrence (expected calibration error 0.17 on
a fresh synthetic cohort before this map existed; ``benchmarks/README.md``). ``recnec train``
therefore fits Platt scaling (J. Platt, "Probabilistic outputs for support vector machines",
1999; the ``sigmoid`` method of scikit-learn's ``CalibratedClassifierCV``) on the out-of-fold
predictions of the cross-validation and stores it in the manifest::

    p_calibrated = 1 / (1 + exp(-(a * logit(p_raw) + b)))

with ``a > 0``, so the map is strictly increasing: every label is the same before and after, and
the decision threshold is mapped with it (``calibration.threshold``). Weights trained before the
map existed have no ``calibration`` entry and are used uncalibrated (identity).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..errors import EnvironmentBroken

#: raw probabilities are clipped to [EPS, 1 - EPS] before the logit
EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    """``log(p / (1 - p))`` of probabilities clipped to ``[EPS, 1 - EPS]``; same shape as ``p``."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


@dataclass(frozen=True)
class Calibration:
    """Platt map ``sigmoid(a * logit(p) + b)``; ``a = 1, b = 0`` is the identity."""

    a: float = 1.0
    b: float = 0.0
    method: str = "identity"

    def __call__(self, p: np.ndarray) -> np.ndarray:
        """Calibrated probabilities, float64, same shape as ``p`` (raw ensemble means in [0, 1])."""
        if self.method == "identity":
            return np.asarray(p, dtype=np.float64)
        return 1.0 / (1.0 + np.exp(-(self.a * logit(p) + self.b)))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "a": self.a, "b": self.b}

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> "Calibration":
        """The manifest's ``calibration`` entry (identity when absent).

        Raises
        ------
        EnvironmentBroken
            ``WEIGHTS_MANIFEST_INVALID`` for an unknown method or a non-increasing map (``a <= 0``).
        """
        entry = manifest.get("calibration")
        if entry is None:
            return cls()
        try:
            method = str(entry["method"])
            a, b = float(entry.get("a", 1.0)), float(entry.get("b", 0.0))
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvironmentBroken(f"manifest calibration entry unreadable: {exc}",
                                    code="WEIGHTS_MANIFEST_INVALID") from None
        if method not in ("identity", "platt") or not (np.isfinite(a) and np.isfinite(b)) or a <= 0:
            raise EnvironmentBroken(
                f"manifest calibration {method!r} with a={a}, b={b} is not an increasing Platt map",
                code="WEIGHTS_MANIFEST_INVALID")
        return cls(a=a, b=b, method=method)
