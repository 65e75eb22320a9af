"""Fit what makes the ensemble's output judgeable: the calibration map and the applicability model.

Both are fitted on the training cohort only, written into the manifest by
:func:`recnec_cli.train.run.train_ensemble`, and applied at inference by
:mod:`recnec_cli.stages.calibration` and :mod:`recnec_cli.stages.applicability` (numpy only).
Uses scikit-learn (``LogisticRegression`` for Platt scaling, ``LedoitWolf`` for the covariance);
no torch.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from ..stages.applicability import FEATURE_NAMES, Applicability, input_features, mahalanobis
from ..stages.calibration import Calibration, logit
from .metrics import calibration_bins

log = logging.getLogger(__name__)

#: quantile of the cross-validated training distances that sets the applicability threshold
OOD_QUANTILE = 0.99
#: the threshold is this many times that quantile (room for the scan path's own variation:
#: HD-BET masks, registration and thick slices move the features a little; see benchmarks/README.md)
OOD_MARGIN = 1.5


def fit_platt(y: np.ndarray, p_oof: np.ndarray, *, threshold: float) -> tuple[Calibration, dict[str, Any]]:
    """Platt scaling of out-of-fold probabilities (see :mod:`recnec_cli.stages.calibration`).

    Parameters
    ----------
    y:
        int ``(N,)``, 1 = recurrence.
    p_oof:
        float ``(N,)``: out-of-fold raw probabilities of the cross-validation.
    threshold:
        The decision threshold on the raw score; returned mapped through the calibration.

    Returns
    -------
    (Calibration, dict)
        The map, and the manifest entry: ``method``, ``a``, ``b``, ``threshold`` (calibrated),
        ``fitted_on``, out-of-fold ``ece_before`` / ``ece_after`` and ``brier_before`` /
        ``brier_after`` (the "after" figures are in-sample for the 2 parameters; judge on a
        fresh cohort). A fit with ``a <= 0`` (a model no better than chance) falls back to the
        identity, with a warning.
    """
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(y, dtype=np.int64)
    z = logit(p_oof).reshape(-1, 1)
    lr = LogisticRegression(C=1e6, solver="lbfgs", max_iter=1000).fit(z, y)
    a, b = float(lr.coef_[0, 0]), float(lr.intercept_[0])
    cal = Calibration(a=a, b=b, method="platt")
    if not a > 0:
        log.warning("Platt scaling slope %.3g <= 0 (model no better than chance): calibration left out", a)
        cal = Calibration()
    before, after = calibration_bins(y, p_oof), calibration_bins(y, cal(p_oof))
    entry = {
        **cal.to_dict(),
        "threshold": float(cal(np.array([threshold]))[0]),
        "formula": "p = 1 / (1 + exp(-(a * logit(p_raw) + b))), p_raw = ensemble mean clipped to [1e-6, 1 - 1e-6]",
        "fitted_on": "out-of-fold probabilities of the cross-validation (single fold models), "
                     "sklearn LogisticRegression(C=1e6) on logit(p); Platt 1999",
        "oof_ece_before": before["ece"], "oof_ece_after": after["ece"],
        "oof_brier_before": before["brier"], "oof_brier_after": after["brier"],
        "note": "the 'after' figures are in-sample for a and b; judge calibration on an independent "
                "cohort with `recnec evaluate` (its calibration.ece)",
    }
    return cal, entry


def fit_applicability(x: np.ndarray, folds: Sequence[tuple[np.ndarray, np.ndarray]], *,
                      spacing_mm: float, clip: float, quantile: float = OOD_QUANTILE,
                      margin: float = OOD_MARGIN) -> tuple[Applicability, dict[str, Any], np.ndarray]:
    """Fit the training distribution of :func:`~recnec_cli.stages.applicability.input_features`.

    Parameters
    ----------
    x:
        float32 ``(N, 3, X, Y, Z)``: the training cohort's model inputs.
    folds:
        ``(train_idx, test_idx)`` of the cross-validation: each study's distance is measured to
        a covariance fitted without it, so the threshold is not set on in-sample distances.
    spacing_mm, clip:
        The input spec's box voxel size and clip value.
    quantile, margin:
        Threshold = ``margin`` x the ``quantile`` of the cross-validated distances.

    Returns
    -------
    (Applicability, dict, numpy.ndarray)
        The model fitted on all ``N`` studies, its manifest entry, and the ``(N,)``
        cross-validated distances.
    """
    from sklearn.covariance import LedoitWolf

    feats = input_features(x, spacing_mm=spacing_mm, clip=clip)
    cv_dist = np.zeros(len(feats))
    for train_idx, test_idx in folds:
        lw = LedoitWolf().fit(feats[train_idx])
        d = feats[test_idx] - lw.location_
        cv_dist[test_idx] = mahalanobis(d, lw.precision_)
    lw = LedoitWolf().fit(feats)
    q = float(np.quantile(cv_dist, quantile))
    threshold = margin * q
    model = Applicability(mean=lw.location_.astype(np.float64), precision=lw.precision_.astype(np.float64),
                          threshold=threshold, spacing_mm=spacing_mm, clip=clip)
    entry = {
        "features": list(FEATURE_NAMES),
        "mean": [float(v) for v in model.mean],
        "precision": [[float(v) for v in row] for row in model.precision],
        "threshold": threshold,
        "distance": "Mahalanobis distance of recnec_cli.stages.applicability.input_features to the "
                    "training features (sklearn LedoitWolf covariance, all training studies)",
        "rule": f"threshold = {margin} x the {quantile:.0%} quantile of the cross-validated training distances "
                "(each study against a covariance fitted on the other folds)",
        "cv_distance_quantiles": {k: float(np.quantile(cv_dist, v))
                                  for k, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "cv_flag_rate": float(np.mean(cv_dist > threshold)),
        "flag": "OUT_OF_DISTRIBUTION",
    }
    return model, entry, cv_dist
