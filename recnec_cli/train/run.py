"""``recnec train`` as a library call: cohort -> k-fold training -> ONNX ensemble + manifest.

This is the only place the training stages are chained (dataset -> loop -> metrics -> export).
Imports torch and MONAI; imported only by ``recnec train``.
"""

from __future__ import annotations

import csv
import logging
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import DISCLAIMER, __version__
from ..errors import TrainingError
from ..stages.infer import Ensemble, sha256_file
from ..stages.modelinput import InputSpec
from .config import TrainConfig, make_config
from .dataset import Cohort, load_cohort, read_labels
from .export import (
    MAX_ABS_DIFF,
    OPSET,
    check_out_dir,
    compare_with_torch,
    export_onnx,
    library_versions,
    machine,
    prepare_out_dir,
    write_manifest,
)
from .loop import CVResult, check_cohort_size, cross_validate, describe_augmentation
from .metrics import auc_score, calibration_bins, choose_threshold, plot_calibration, plot_roc, summarise
from .reliability import fit_applicability, fit_platt

log = logging.getLogger(__name__)

#: the documented command that produces the shipped ``weights/``
SHIPPED_COMMAND = "recnec train --reproduce-shipped --out weights/"
#: the shipped cohort: size and class mix of the paper (234 patients, 192 recurrence / 42 necrosis)
SHIPPED_N = 234
SHIPPED_SEED = 0
#: the synthetic cohort the shipped Platt map is fitted on (never trained on; fresh-cohort figures
#: use seeds 1 and 4242, tests 7, benchmarks 9001 / 9002)
CALIBRATION_SEED = 2
MAX_ENSEMBLE_MB = 40.0
EPOCH_LOG = "epochs.csv"
ROC_PNG = "roc.png"
CALIBRATION_PNG = "calibration.png"
OOF_CSV = "oof.csv"


@dataclass
class TrainResult:
    """What :func:`train_ensemble` produced: the manifest as written and the cross-validation."""

    out: Path
    manifest: dict[str, Any]
    cohort: Cohort
    cv: CVResult


def _write_epoch_log(path: Path, rows: list[dict[str, Any]]) -> None:
    """Per-epoch CSV (no wall-clock column, so reruns give identical bytes; timings go to the manifest)."""
    cols = ["fold", "epoch", "train_loss", "val_loss", "val_auc", "val_auc_smooth", "lr", "best_epoch"]
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(rows)


def model_version(cfg: TrainConfig, data_fingerprint: str, onnx_sha256: dict[str, str], *,
                  fine_tuned: bool = False) -> str:
    """``<recnec version>+<arch>w<width>.k<folds>.seed<seed>[.ft].<data fp 8 hex>.<weights 8 hex>``.

    The last part is a digest of the ONNX files' SHA-256 (``{file: sha256}``), so two trainings
    on the same data that give different weights (another recipe, a retrain) never share a name;
    ``.ft`` marks an ensemble fine-tuned from another (``--init-from``).
    """
    from ..orchestration.state import digest

    return (f"{__version__}+{cfg.arch}w{cfg.width}.k{cfg.folds}.seed{cfg.seed}{'.ft' if fine_tuned else ''}."
            f"{data_fingerprint[:8]}.{digest([onnx_sha256])[:8]}")


def _ensemble_probability(cv: CVResult, x: np.ndarray, batch: int = 32) -> np.ndarray:
    """Mean over the fold models of the probability of recurrence for ``x`` ``(N, 3, X, Y, Z)``;
    float64 ``(N,)`` (what the exported ONNX ensemble computes, within 1e-6)."""
    import torch

    out = np.zeros(len(x))
    with torch.no_grad():
        for f in cv.folds:
            f.model.eval()
            for i in range(0, len(x), batch):
                out[i:i + batch] += f.model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).numpy().reshape(-1)
    return out / len(cv.folds)


def _write_oof(path: Path, study_ids, y: np.ndarray, cv: CVResult, p_cal: np.ndarray,
               distance: np.ndarray) -> None:
    """Out-of-fold predictions, one row per training study: the data behind ``roc.png``,
    ``calibration.png`` and the manifest's cross-validated figures, for a reviewer to recompute."""
    fold_of = np.full(len(y), -1)
    for f in cv.folds:
        fold_of[f.test_idx] = f.fold
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["study_id", "label", "fold", "p_raw", "p_calibrated", "applicability_distance"])
        for i, sid in enumerate(study_ids):
            w.writerow([sid, "recurrence" if y[i] else "necrosis", int(fold_of[i]), f"{cv.oof[i]:.6f}",
                        f"{p_cal[i]:.6f}", f"{distance[i]:.4f}"])


def train_ensemble(
    data: Path, *, labels: Path, out: Path, config: TrainConfig | None = None,
    cache_dir: Path | None = None, settings: Any = None, command: str | None = None,
    spec: InputSpec = InputSpec(), on_epoch: Callable[[dict[str, Any]], None] | None = None,
    extra_timings: dict[str, float] | None = None, data_description: str | None = None,
    calibration_data: Path | None = None, calibration_labels: Path | None = None,
    calibration_description: str | None = None, init_from: Path | None = None,
) -> TrainResult:
    """Train a k-fold ensemble on a labelled cohort and write it to ``out``.

    Parameters
    ----------
    data:
        Model-space folder (``DATA/tensors/*.npy``) or a folder of studies (see
        :mod:`recnec_cli.train.dataset`).
    labels:
        CSV with ``study_id,label`` (``recurrence`` / ``necrosis``).
    out:
        Weights folder to write (empty, new, or a previous recnec ensemble, which is replaced).
    config:
        :class:`~recnec_cli.train.config.TrainConfig` (``make_config("default")`` if ``None``).
    cache_dir:
        Per-study tensor cache for study folders.
    settings:
        :class:`~recnec_cli.config.Settings` for preprocessing study folders.
    command:
        Command line recorded in the manifest (``command`` key).
    on_epoch:
        Optional callback receiving each per-epoch log row (dict).
    calibration_data, calibration_labels:
        Optional labelled cohort (same forms as ``data`` / ``labels``) never used for training:
        the Platt map is then fitted on the **ensemble's** mean probabilities on it, the score
        that is deployed, instead of on the out-of-fold scores of single fold models (which are
        noisier than the ensemble, so a map fitted on them leaves the ensemble under-confident).
    init_from:
        A recnec weights folder to fine-tune (``recnec train --init-from``): fold ``k`` starts from
        its model ``k mod M`` rebuilt by :func:`recnec_cli.train.init.load_init_source` (its
        architecture and width must be ``config``'s); recorded in the manifest under ``init_from``.

    Writes ``out/fold<k>.onnx`` (k = 0..folds-1), ``roc.png`` (out-of-fold ROC), ``calibration.png``
    (out-of-fold reliability diagram, before and after the Platt map), ``oof.csv`` (out-of-fold
    predictions and applicability distances), ``epochs.csv`` and, last, ``manifest.json`` with the
    ``calibration`` (:func:`~recnec_cli.train.reliability.fit_platt`) and ``applicability``
    (:func:`~recnec_cli.train.reliability.fit_applicability`) entries.

    Raises
    ------
    TrainingError
        Bad labels or tensors, too few cases, a non-empty foreign ``out``, ONNX mismatch;
        ``USAGE_ERROR`` if ``out`` is, or lies inside, the ``init_from`` folder; the ``INIT_*`` codes of
        :func:`~recnec_cli.train.init.load_init_source`.
    """
    cfg = (config or make_config("default")).validate()
    t_start = time.perf_counter()
    out = Path(out)
    init = None
    if init_from is not None:
        from .init import load_init_source

        if out.resolve().is_relative_to(Path(init_from).resolve()):
            raise TrainingError(f"--out {out} must not be inside the --init-from folder {init_from} (nor be "
                                "that folder): write the fine-tuned ensemble to a new folder beside it (the source is "
                                "needed until the new one is verified)", code="USAGE_ERROR")
        init = load_init_source(Path(init_from), spec=spec, arch=cfg.arch, width=cfg.width,
                                threads=cfg.threads)
    # cheap refusals before the (possibly hour-long) preprocessing of every study
    check_out_dir(out)
    check_cohort_size(np.array(list(read_labels(Path(labels)).values()), dtype=int), cfg.folds)
    t0 = time.perf_counter()
    cohort = load_cohort(Path(data), labels=Path(labels), spec=spec, settings=settings, cache_dir=cache_dir)
    t_data = time.perf_counter() - t0
    log.info("cohort: %d studies (%s) from %s, fingerprint %s", len(cohort.y), cohort.counts,
             cohort.source, cohort.fingerprint[:12])
    if init is not None and init.entry.get("source_data_fingerprint_sha256") == cohort.fingerprint:
        log.warning("--init-from %s was trained on this very cohort: every held-out study was seen by its "
                    "starting point, so the cross-validated figures are optimistic", init_from)
        init.entry["warning"] = "source trained on this cohort: cross-validated figures are optimistic"
    cal_cohort = None
    if calibration_data is not None:  # read and checked before training, not after
        cal_cohort = load_cohort(Path(calibration_data), labels=Path(calibration_labels or
                                 Path(calibration_data) / "labels.csv"), spec=spec, settings=settings,
                                 cache_dir=cache_dir)
        if cal_cohort.fingerprint == cohort.fingerprint:
            raise TrainingError("the calibration cohort is the training cohort: give one never used for "
                                "training", code="USAGE_ERROR")
    check_out_dir(out)  # again: the folder may have changed during preprocessing; cleared at export time
    cv = cross_validate(cohort.x, cohort.y, cfg, on_epoch=on_epoch, init=init)
    y, oof = cohort.y, cv.oof
    choice = choose_threshold(y, oof, target_sensitivity=cfg.target_sensitivity)
    cv_metrics = summarise(y, oof, choice.value, n_boot=cfg.n_boot, seed=cfg.seed)
    if cal_cohort is not None:
        p_cal = _ensemble_probability(cv, cal_cohort.x)
        calibration, calibration_entry = fit_platt(cal_cohort.y, p_cal, threshold=choice.value)
        calibration_entry["fitted_on"] = (
            "ensemble mean probabilities on a calibration cohort never used for training "
            f"({calibration_description or calibration_data}; n={len(cal_cohort.y)}, "
            f"{cal_cohort.counts}, fingerprint {cal_cohort.fingerprint[:12]}), sklearn "
            "LogisticRegression(C=1e6) on logit(p); Platt 1999")
        calibration_entry["oof_ece_before"] = calibration_bins(y, oof)["ece"]
        calibration_entry["oof_ece_after"] = calibration_bins(y, calibration(oof))["ece"]
        calibration_entry["calibration_cohort_ece_before"] = calibration_bins(cal_cohort.y, p_cal)["ece"]
        calibration_entry["calibration_cohort_ece_after"] = calibration_bins(cal_cohort.y, calibration(p_cal))["ece"]
    else:
        calibration, calibration_entry = fit_platt(y, oof, threshold=choice.value)
    all_idx = np.arange(len(y))
    _, applicability_entry, cv_dist = fit_applicability(
        cohort.x, [(np.setdiff1d(all_idx, f.test_idx), f.test_idx) for f in cv.folds],
        spacing_mm=spec.spacing_mm, clip=spec.clip)
    log.info("calibration: Platt a=%.3f b=%.3f (out-of-fold ECE %.3f -> %.3f); applicability "
             "threshold %.2f (%.1f %% of training studies beyond it, cross-validated)",
             calibration.a, calibration.b, calibration_entry["oof_ece_before"],
             calibration_entry["oof_ece_after"], applicability_entry["threshold"],
             100 * applicability_entry["cv_flag_rate"])

    prepare_out_dir(out)
    t0 = time.perf_counter()
    models, files, diffs = [], [], []
    rng = np.random.default_rng(cfg.seed)
    for f in cv.folds:
        name = f"fold{f.fold}.onnx"
        export_onnx(f.model, out / name, shape=spec.shape)
        check_x = np.concatenate([cohort.x[f.test_idx],
                                  rng.normal(size=(2, *spec.shape)).astype(np.float32)])
        diff = compare_with_torch(f.model, out / name, check_x, threads=cfg.threads)
        diffs.append(diff)
        files.append(name)
        models.append({
            "file": name, "fold": f.fold, "arch": cfg.arch, "width": cfg.width,
            "parameters": f.parameters, "bytes": (out / name).stat().st_size,
            "n_train": int(len(f.train_idx)), "n_val": int(len(f.val_idx)), "n_test": int(len(f.test_idx)),
            "best_epoch": f.best_epoch, "epochs_run": f.epochs_run,
            "val_auc_best": round(float(f.best_val_auc), 6),
            "test_auc": round(auc_score(y[f.test_idx], f.test_prob), 6),
            "onnx_vs_torch_max_abs_diff": diff, "train_seconds": round(f.seconds, 2),
            "train_cpu_seconds": round(f.cpu_seconds, 2),
        })
    t_export = time.perf_counter() - t0
    _write_epoch_log(out / EPOCH_LOG, cv.epoch_log)
    files.append(EPOCH_LOG)
    plot_roc(y, oof, out / ROC_PNG, threshold=choice.value, summary=cv_metrics,
             title=f"recnec {cfg.arch} ensemble: {cfg.folds}-fold out-of-fold ROC")
    files.append(ROC_PNG)
    plot_calibration(y, calibration(oof), out / CALIBRATION_PNG, p_before=oof,
                     title=f"recnec {cfg.arch} ensemble: {cfg.folds}-fold out-of-fold calibration")
    files.append(CALIBRATION_PNG)
    _write_oof(out / OOF_CSV, cohort.study_ids, y, cv, calibration(oof), cv_dist)
    files.append(OOF_CSV)
    ensemble_mb = sum(m["bytes"] for m in models) / 1e6
    if ensemble_mb > MAX_ENSEMBLE_MB:
        log.warning("ensemble is %.1f MB (> %.0f MB budget): reduce --width", ensemble_mb, MAX_ENSEMBLE_MB)
    epoch_secs = [r["seconds"] for r in cv.epoch_log]
    epoch_cpu = [r["cpu_seconds"] for r in cv.epoch_log]
    fp = cohort.fingerprint
    manifest: dict[str, Any] = {
        "format": "recnec-weights/1",
        "model_version": model_version(cfg, fp, {m["file"]: sha256_file(out / m["file"]) for m in models},
                                       fine_tuned=init is not None),
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command or "recnec_cli.train.train_ensemble(...)",
        "disclaimer": DISCLAIMER,
        "method": "Frontiers in Oncology 2025 (PubMed 40548110): 3D CNN on T1, T2, T1ce; "
                  "ResNet10 best (sens 0.78, spec 0.94, acc 0.91, AUC 0.83)",
        "input": spec.to_dict(),
        "output": {"name": "probability", "shape": ["N"], "meaning":
                   "probability of tumour recurrence (label 1); necrosis = label 0; ensemble score "
                   "= mean over models, recurrence if score >= threshold"},
        **({"init_from": init.entry} if init is not None else {}),
        "threshold": float(choice.value),
        "calibration": calibration_entry,
        "applicability": applicability_entry,
        "threshold_selection": {
            "method": choice.method, "target_sensitivity": choice.target_sensitivity,
            "chosen_on": "out-of-fold probabilities of the cross-validation (single fold models)",
            "oof_sensitivity": choice.sensitivity, "oof_specificity": choice.specificity,
        },
        "metrics": {
            "cross_validated": cv_metrics,
            "note": "out-of-fold predictions; the threshold was chosen on the same predictions, so "
                    "sensitivity/specificity here are optimistic; judge on an independent cohort "
                    "with `recnec evaluate`",
            "per_fold_test_auc": [m["test_auc"] for m in models],
        },
        "models": models,
        "ensemble_mb": round(ensemble_mb, 3),
        "onnx": {"exporter": "torch.onnx.export legacy (dynamo=False)", "opset": OPSET,
                 "input": "input float32 (N, 3, 40, 40, 40)", "output": "probability float32 (N,)",
                 "max_abs_diff_vs_torch": max(diffs), "limit": MAX_ABS_DIFF},
        "training": {
            "config": cfg.to_dict(),
            "seed": cfg.seed,
            "torch_threads": cfg.threads,
            "deterministic": "torch.use_deterministic_algorithms(True), monai.utils.set_determinism, "
                             "no DataLoader workers",
            "splits": "StratifiedKFold(shuffle, random_state=seed); inner StratifiedShuffleSplit "
                      f"val_fraction={cfg.val_fraction} for early stopping on validation AUC "
                      f"(mean over {cfg.select_window} epochs, checkpoints from epoch "
                      f"{cfg.select_from_epoch})",
            "class_balance": "BCEWithLogitsLoss(pos_weight = n_necrosis / n_recurrence)",
            "augmentation": describe_augmentation(cfg),
            "optimiser": f"AdamW(lr={cfg.lr}, weight_decay={cfg.weight_decay}), cosine annealing",
        },
        "data": {
            "description": data_description or str(data),
            "source": cohort.source, "fingerprint_sha256": fp, "n": int(len(y)), **cohort.counts,
            "excluded": [{"study_id": s, "code": c} for s, c, _ in cohort.excluded],
        },
        "cost": {
            "data_seconds": round(t_data, 1),
            "train_seconds": round(cv.seconds, 1),
            "train_cpu_seconds": round(cv.cpu_seconds, 1),
            "export_seconds": round(t_export, 1),
            "epochs_total": len(cv.epoch_log),
            "seconds_per_epoch_median": round(float(np.median(epoch_secs)), 3) if epoch_secs else None,
            "cpu_seconds_per_epoch_median": round(float(np.median(epoch_cpu)), 3) if epoch_cpu else None,
            "note": "seconds = wall clock on a host shared with other jobs; cpu_seconds = process CPU "
                    "time over all threads (cpu_seconds / torch_threads ~ wall time on idle cores)",
            **({k: round(v, 1) for k, v in (extra_timings or {}).items()}),
            "total_seconds": round(time.perf_counter() - t_start + sum((extra_timings or {}).values()), 1),
            "machine": machine(),
        },
        "libraries": library_versions(),
    }
    manifest = write_manifest(out, manifest, files)
    # the written folder must load and agree with PyTorch through the production code path
    ens = Ensemble.load(out, device="cpu", threads=cfg.threads)
    probe = cohort.x[: min(8, len(cohort.x))]
    ref = _ensemble_probability(cv, probe)
    got = ens.predict(probe).mean
    if np.max(np.abs(got - ref)) > MAX_ABS_DIFF:
        raise TrainingError("written ensemble disagrees with the trained models", code="ONNX_MISMATCH")
    log.info("wrote %d-model ensemble (%.1f MB) to %s; CV AUC %.3f, threshold %.3f", len(models),
             ensemble_mb, out, cv_metrics["auc"], choice.value)
    return TrainResult(out=out, manifest=manifest, cohort=cohort, cv=cv)


def reproduce_shipped(
    out: Path, *, cache_dir: Path | None = None, config: TrainConfig | None = None,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Regenerate the shipped synthetic cohort and train the shipped ensemble on it.

    Calls ``recnec_cli.synth.write_cohort(dir, n=234, seed=0, space="model")`` (in ``cache_dir``,
    or a temporary folder removed afterwards) and the same for the calibration cohort (seed
    :data:`CALIBRATION_SEED`, n=234, 192:42, never trained on), then :func:`train_ensemble` with
    the ``default`` profile and seed 0, the Platt map fitted on the ensemble's scores on the
    calibration cohort. The manifest's ``command`` is :data:`SHIPPED_COMMAND`.
    """
    try:
        from ..synth import write_cohort
    except ImportError as exc:
        raise TrainingError(f"the synthetic cohort generator is unavailable: {exc}",
                            code="ENVIRONMENT_BROKEN") from None
    cfg = config or make_config("default", seed=SHIPPED_SEED)
    with tempfile.TemporaryDirectory(prefix="recnec-synth-") as tmp:
        cohort_dir = Path(cache_dir) if cache_dir is not None else Path(tmp) / "cohort"
        t0 = time.perf_counter()
        write_cohort(cohort_dir, n=SHIPPED_N, seed=SHIPPED_SEED, fmt="nifti", space="model")
        cal_dir = cohort_dir.parent / f"{cohort_dir.name}-calibration-seed{CALIBRATION_SEED}"
        write_cohort(cal_dir, n=SHIPPED_N, seed=CALIBRATION_SEED, fmt="nifti", space="model")
        t_synth = time.perf_counter() - t0
        log.info("synthetic training and calibration cohorts written in %.1f s", t_synth)
        return train_ensemble(
            cohort_dir, labels=cohort_dir / "labels.csv", out=out, config=cfg,
            command=SHIPPED_COMMAND, on_epoch=on_epoch, extra_timings={"synth_seconds": t_synth},
            data_description=f"recnec synth, model space, n={SHIPPED_N}, seed={SHIPPED_SEED}",
            calibration_data=cal_dir, calibration_labels=cal_dir / "labels.csv",
            calibration_description=f"recnec synth, model space, n={SHIPPED_N}, seed={CALIBRATION_SEED}",
        )
