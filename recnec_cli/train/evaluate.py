"""``recnec evaluate`` as a library call: score a labelled cohort with an ONNX ensemble.

Needs numpy, onnxruntime and matplotlib only (no torch, no MONAI). The cohort is read exactly as
for training (:func:`recnec_cli.train.dataset.load_cohort`: model-space tensors or study folders
through the scan pipeline), with the ensemble's own input spec from its manifest.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from .. import DISCLAIMER
from ..stages.infer import Ensemble
from .dataset import LABEL_NAMES, load_cohort
from .metrics import PAPER_RESNET10, calibration_bins, plot_calibration, plot_roc, summarise, to_json

log = logging.getLogger(__name__)


def evaluate_ensemble(
    data: Path, *, labels: Path, weights_dir: Path, out: Path, device: str = "auto",
    threads: int = 0, settings: Any = None, cache_dir: Path | None = None, n_boot: int = 2000,
    seed: int = 0, roc_png: Path | None = None, batch_size: int = 32,
    calibration_png: Path | None = None,
) -> dict[str, Any]:
    """Score every labelled study with the ensemble at its manifest threshold; write ``out`` (JSON).

    Parameters
    ----------
    data, labels:
        As for :func:`recnec_cli.train.run.train_ensemble`.
    weights_dir:
        Ensemble folder (verified by SHA-256 before use).
    out:
        ``metrics.json`` path. Top-level numbers ``auc``, ``sensitivity``, ``specificity``,
        ``accuracy`` (also ``ppv``, ``npv``), ``ci95`` (bootstrap, ``seed``), ``confusion``,
        ``threshold`` (on the calibrated probability, which ``predictions`` report with the raw
        ensemble mean beside it), ``applicability`` (how many studies are
        ``OUT_OF_DISTRIBUTION``), the weights' ``model_version`` and checksums, the data fingerprint, the
        paper's ResNet10 figures for comparison, one ``predictions`` row per study, and
        ``warnings`` / ``ci95_unreliable`` (small classes, zero-width bootstrap intervals).
    roc_png:
        ROC curve PNG (default: ``out`` with suffix ``.roc.png``).
    calibration_png:
        Calibration plot (reliability diagram) PNG (default: ``out`` with suffix ``.calibration.png``);
        its bins, Brier score and ECE go to ``calibration`` in ``out``.

    Returns
    -------
    dict
        The content written to ``out``.
    """
    ens = Ensemble.load(Path(weights_dir), device=device, threads=threads)
    cohort = load_cohort(Path(data), labels=Path(labels), spec=ens.spec, settings=settings,
                         cache_dir=cache_dir)
    pred = ens.predict(cohort.x, batch_size=batch_size)
    # the reported probability is calibrated; the map is increasing, so AUC and labels are those of
    # the raw score (the threshold is mapped with it)
    prob, threshold = pred.probability, ens.report_threshold
    result: dict[str, Any] = summarise(cohort.y, prob, threshold, n_boot=n_boot, seed=seed)
    trained_on = ens.manifest.get("data", {}).get("fingerprint_sha256")
    if trained_on == cohort.fingerprint:
        log.warning("this cohort is the one the ensemble was trained on: the figures are optimistic")
        result["warnings"].append("this cohort is the one the ensemble was trained on: the "
                                  "figures are optimistic")
    for w in result["warnings"]:
        if not w.startswith("this cohort"):
            log.warning("%s", w)
    roc_png = Path(roc_png) if roc_png is not None else Path(out).with_suffix(".roc.png")
    plot_roc(cohort.y, prob, roc_png, threshold=threshold, summary=result,
             title=f"recnec evaluate: {ens.model_version}")
    calibration_png = (Path(calibration_png) if calibration_png is not None
                       else Path(out).with_suffix(".calibration.png"))
    calibration = plot_calibration(cohort.y, prob, calibration_png, title=f"recnec evaluate: {ens.model_version}",
                                   p_before=pred.mean if ens.calibration.method != "identity" else None)
    calibration["method"] = ens.calibration.method
    calibration["raw"] = {k: v for k, v in calibration_bins(cohort.y, pred.mean).items() if k in ("ece", "brier")}
    n_ood = int(np.sum(pred.out_of_distribution))
    applicability = {
        "available": ens.applicability is not None,
        "threshold": None if ens.applicability is None else ens.applicability.threshold,
        "n_out_of_distribution": n_ood if ens.applicability is not None else None,
        "fraction_out_of_distribution": n_ood / max(1, len(cohort.y)) if ens.applicability is not None else None,
    }
    result.update({
        "weights": {"dir": str(weights_dir), "model_version": ens.model_version,
                    "provider": ens.provider, "n_models": ens.n_models, "checksums": ens.checksums},
        "data": {"path": str(data), "source": cohort.source, "fingerprint_sha256": cohort.fingerprint,
                 "same_as_training_data": trained_on == cohort.fingerprint,
                 "excluded": [{"study_id": s, "code": c, "message": m} for s, c, m in cohort.excluded]},
        "paper_resnet10": PAPER_RESNET10,
        "roc_png": str(roc_png),
        "calibration_png": str(calibration_png),
        "calibration": calibration,
        "applicability": applicability,
        "disclaimer": DISCLAIMER,
        "predictions": [
            {"study_id": sid, "label": LABEL_NAMES[int(lab)], "probability": round(float(p), 6),
             "probability_raw": round(float(raw), 6), "spread": round(float(s), 6),
             "predicted": LABEL_NAMES[int(raw >= ens.threshold)],
             "applicability_distance": None if d != d else round(float(d), 3), "out_of_distribution": bool(o)}
            for sid, lab, p, raw, s, d, o in zip(cohort.study_ids, cohort.y, prob, pred.mean, pred.spread,
                                                 pred.distance, pred.out_of_distribution)
        ],
    })
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(to_json(result) + "\n", encoding="utf-8")
    log.info("evaluated %d studies: AUC %.3f, sens %.3f, spec %.3f -> %s", result["n"], result["auc"],
             result["sensitivity"], result["specificity"], out)
    return result
