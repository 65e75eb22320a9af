"""``recnec train`` and ``recnec evaluate``: thin wrappers over :mod:`recnec_cli.train`."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer

from .. import DISCLAIMER
from ..exitcodes import EXIT_OK
from ..train.config import DEFAULT_WIDTH, FINE_TUNE_LR, TrainConfig, lr_text
from .common import (
    DeviceOpt,
    HdBetMode,
    HdBetModeOpt,
    LesionMasksOpt,
    QuietOpt,
    VerboseOpt,
    error_boundary,
    results_console,
    setup_logging,
)

log = logging.getLogger("recnec.train")


class Arch(str, Enum):
    resnet10 = "resnet10"
    resnet18 = "resnet18"
    vgg16 = "vgg16"
    densenet121 = "densenet121"


TRAIN_HELP = f"""Train a cross-validated CNN ensemble on a labelled cohort and export it to ONNX.

DATA is either a model-space folder (DATA/tensors/<study_id>.npy, float32 (3, 40, 40, 40), as
written by `recnec synth --space model`) or a folder of studies (DICOM / NIfTI / NRRD) that is
preprocessed with exactly the code `recnec scan` uses, each study's tensor cached under --cache.
LABELS is a CSV with columns study_id,label where label is recurrence or necrosis (1/0).

Stratified k-fold cross-validation: one model per fold forms the ensemble; early stopping on an
inner validation split (AUC); class-weighted loss; MONAI augmentation plus a simulated acquisition
(thick slices, misregistration); deterministic per --seed. The decision threshold is chosen on
out-of-fold predictions (Youden's J, or the best specificity reaching --target-sensitivity). The
reported probability is calibrated (Platt scaling on the out-of-fold scores, or on the ensemble's
scores on --calibration-data), and the training inputs' statistics are stored so that `recnec
scan` flags studies unlike them (OUT_OF_DISTRIBUTION). OUT receives fold<k>.onnx, manifest.json
(SHA-256 per file, input spec, threshold, calibration, applicability, CV metrics with bootstrap
95 % CIs, seed, data fingerprint, versions), roc.png, calibration.png (reliability diagram of the
out-of-fold predictions, before and after calibration), oof.csv (the out-of-fold predictions)
and epochs.csv. OUT must be new, empty, or a previous recnec ensemble (replaced).

--init-from WEIGHTS fine-tunes an existing ensemble instead (the shipped weights/ or any recnec
train --out): the same cross-validation, each fold starting from one of its models with its batch
norms frozen (folded into the convolutions, as exported), learning rate {lr_text(FINE_TUNE_LR)} unless --lr.

Examples:

\b
  recnec train --reproduce-shipped --out weights/      # the shipped ensemble (~20 min on 2 cores)
  recnec train cohort/ --labels cohort/labels.csv --out my_weights/ --cache cache/
  recnec train cohort/ --labels labels.csv --out vgg/ --arch vgg16     # the paper's comparison
  recnec train cohort/ --labels labels.csv --out site/ --init-from weights/   # fine-tune the shipped

{DISCLAIMER}
"""

EVALUATE_HELP = f"""Score a labelled cohort with an ensemble: AUC, sensitivity, specificity, accuracy.

DATA and LABELS as for `recnec train`. Uses the shipped weights/ unless --weights is given; the
manifest's threshold decides recurrence (>= threshold) versus necrosis; probabilities and the
threshold are on the calibrated scale (the raw ensemble means beside them). Writes OUT (JSON with
top-level auc, sensitivity, specificity, accuracy, bootstrap 95 % CIs under ci95, the confusion
matrix and one prediction per study), a ROC curve PNG (OUT's stem + .roc.png) and a calibration
plot (reliability diagram, OUT's stem + .calibration.png; bins, Brier score and ECE in OUT).

Example:

\b
  recnec evaluate fresh_cohort/ --labels fresh_cohort/labels.csv --out metrics.json

{DISCLAIMER}
"""


def register(app: typer.Typer) -> None:
    app.command("train", help=TRAIN_HELP)(train)
    app.command("evaluate", help=EVALUATE_HELP, no_args_is_help=True)(evaluate)


def _settings(device: Optional[str], hdbet_mode: Optional[HdBetMode], lesion_masks: Optional[Path],
              threads: Optional[int], weights: Optional[Path] = None) -> Any:
    from ..config import resolve_settings

    return resolve_settings({
        "device": device, "hdbet_mode": hdbet_mode.value if hdbet_mode else None,
        "lesion_masks_dir": lesion_masks, "threads": threads, "weights_dir": weights,
    })


def _labels_path(data: Path, labels: Optional[Path]) -> Path:
    from ..errors import UsageError

    if labels is not None:
        return labels
    if (data / "labels.csv").is_file():
        return data / "labels.csv"
    raise UsageError("--labels is required (no labels.csv inside DATA)")


def train(
    data: Optional[Path] = typer.Argument(None, help="Model-space folder (tensors/*.npy) or folder of "
                                          "studies. Not used with --reproduce-shipped.", show_default=False),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV study_id,label "
                                          "(recurrence/necrosis) [default: DATA/labels.csv]", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Weights folder to write.", show_default=False),
    arch: Optional[Arch] = typer.Option(None, "--arch", help="Network family (paper: ResNet10 best) "
                                        f"[default: {TrainConfig.arch}; with --init-from: the folder's]",
                                        show_default=False),
    quick: bool = typer.Option(False, "--quick", help="Tiny profile for tests: 2 folds, 2 epochs, width 4."),
    folds: Optional[int] = typer.Option(None, "--folds", min=2,
                                        help=f"Cross-validation folds [default: {TrainConfig.folds}]",
                                        show_default=False),
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Maximum epochs per fold "
                                         f"[default: {TrainConfig.max_epochs}, early stopping]", show_default=False),
    patience: Optional[int] = typer.Option(None, "--patience", min=1, help="Early-stopping patience in "
                                           f"epochs [default: {TrainConfig.patience}]", show_default=False),
    width: Optional[int] = typer.Option(None, "--width", min=2, help="Base channel width "
                                        f"[default: {TrainConfig.width}; vgg16: {DEFAULT_WIDTH['vgg16']}; "
                                        "with --init-from: "
                                        "the folder's]",
                                        show_default=False),
    lr: Optional[float] = typer.Option(None, "--lr", min=1e-7, max=1.0, help="AdamW learning rate "
                                       f"[default: {lr_text(TrainConfig.lr)}; "
                                       f"with --init-from: {lr_text(FINE_TUNE_LR)}]",
                                       show_default=False),
    init_from: Optional[Path] = typer.Option(
        None, "--init-from", help="Fine-tune this ensemble (the shipped weights/ or any recnec train "
        "--out; checksums verified first; not the --out folder) instead of random weights: fold k starts "
        "from its model k mod M, same cross-validation and manifest. resnet10, resnet18 and vgg16 only "
        "(densenet121: INIT_UNSUPPORTED).", show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2, help=f"[default: {TrainConfig.batch_size}]",
                                             show_default=False),
    seed: int = typer.Option(0, "--seed", help="Seed for splits, initialisation, augmentation, bootstrap."),
    target_sensitivity: Optional[float] = typer.Option(None, "--target-sensitivity", min=0.0, max=1.0,
                                                       help="Choose the threshold reaching this "
                                                       "sensitivity [default: Youden's J]", show_default=False),
    threads: int = typer.Option(1, "--threads", min=1, help="torch CPU threads (recorded; results are "
                                "reproducible for a fixed value)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Per-study tensor cache (study folders), or "
                                         "where --reproduce-shipped keeps its synthetic cohort (and, "
                                         "beside it, NAME-calibration-seed2).",
                                         show_default=False),
    calibration_data: Optional[Path] = typer.Option(
        None, "--calibration-data", help="A labelled cohort never used for training (same forms as DATA): "
        "the probability calibration (Platt) is fitted on the ensemble's scores on it [default: on the "
        "out-of-fold scores]", show_default=False),
    calibration_labels: Optional[Path] = typer.Option(
        None, "--calibration-labels", help="Labels of --calibration-data [default: "
        "CALIBRATION_DATA/labels.csv]", show_default=False),
    reproduce_shipped: bool = typer.Option(False, "--reproduce-shipped", help="Regenerate the synthetic "
                                           "cohort (n=234, seed 0) and train the shipped ensemble."),
    device: DeviceOpt = None,
    hdbet_mode: HdBetModeOpt = None,
    lesion_masks: LesionMasksOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    out = out.expanduser()
    with error_boundary():
        from ..errors import UsageError

        setup_logging(verbose=verbose, quiet=quiet)
        from ..train.config import make_config

        arch_name = arch.value if arch is not None else None
        if init_from is not None:
            from ..train.config import FINE_TUNE_LR
            from ..train.init import source_architecture

            if reproduce_shipped:
                raise UsageError("--reproduce-shipped trains from scratch: drop --init-from")
            src_arch, src_width = source_architecture(init_from)
            arch_name, width = arch_name or src_arch, width or src_width
            lr = lr if lr is not None else FINE_TUNE_LR
        cfg = make_config(
            "quick" if quick else "default", arch=arch_name, folds=folds, max_epochs=epochs,
            patience=patience, width=width, batch_size=batch_size, seed=seed,
            target_sensitivity=target_sensitivity, threads=threads, lr=lr,
        )
        on_epoch = _epoch_reporter(cfg, quiet=quiet)
        if reproduce_shipped:
            from ..train.run import SHIPPED_COMMAND
            from ..train.run import reproduce_shipped as _reproduce

            if data is not None or quick or calibration_data is not None:
                raise UsageError("--reproduce-shipped takes no DATA, --quick or --calibration-data")
            if cfg != make_config("default", seed=0, threads=threads):
                raise UsageError("--reproduce-shipped uses the default profile: drop the other training options")
            log.info("reproducing the shipped ensemble: %s", SHIPPED_COMMAND)
            result = _reproduce(out, cache_dir=cache, config=cfg, on_epoch=on_epoch)
        else:
            if data is None:
                raise UsageError("DATA is required (or use --reproduce-shipped)")
            if not data.is_dir():
                raise UsageError(f"DATA must be a folder: {data}")
            from ..train.run import train_ensemble

            lab = _labels_path(data, labels)
            cal_lab = None
            if calibration_data is not None:
                if not calibration_data.is_dir():
                    raise UsageError(f"--calibration-data must be a folder: {calibration_data}")
                cal_lab = _labels_path(calibration_data, calibration_labels)
            elif calibration_labels is not None:
                raise UsageError("--calibration-labels needs --calibration-data")
            command = _command_line(data, lab, out, cfg, quick=quick, cache=cache)
            if init_from is not None:
                command += f" --init-from {init_from}"
            if calibration_data is not None:
                command += f" --calibration-data {calibration_data} --calibration-labels {cal_lab}"
            result = train_ensemble(
                data, labels=lab, out=out, config=cfg, cache_dir=cache,
                settings=_settings(device, hdbet_mode, lesion_masks, None), command=command,
                on_epoch=on_epoch, calibration_data=calibration_data, calibration_labels=cal_lab,
                init_from=init_from,
            )
        if not quiet:
            _print_train_summary(result.manifest, out)
        for w in result.manifest["metrics"]["cross_validated"].get("warnings", []):
            typer.echo(f"warning: {w}", err=True)  # e.g. a CI resting on fewer than 10 necroses, as evaluate says
    raise typer.Exit(EXIT_OK)


def _command_line(data: Path, labels: Path, out: Path, cfg: Any, *, quick: bool, cache: Optional[Path]) -> str:
    """The equivalent command line, with every training option spelled out (for the manifest)."""
    parts = ["recnec train", str(data), "--labels", str(labels), "--out", str(out)]
    if quick:
        parts.append("--quick")
    parts += ["--arch", cfg.arch, "--folds", str(cfg.folds), "--epochs", str(cfg.max_epochs),
              "--patience", str(cfg.patience), "--width", str(cfg.width), "--batch-size", str(cfg.batch_size),
              "--lr", f"{cfg.lr:g}", "--seed", str(cfg.seed), "--threads", str(cfg.threads)]
    if cfg.target_sensitivity is not None:
        parts += ["--target-sensitivity", str(cfg.target_sensitivity)]
    if cache is not None:
        parts += ["--cache", str(cache)]
    return " ".join(parts)


def _epoch_reporter(cfg: Any, *, quiet: bool):
    """Per-epoch callback: one log line per epoch (DEBUG when a terminal shows fold summaries)."""
    level = logging.DEBUG if (quiet or sys.stderr.isatty()) else logging.INFO

    def on_epoch(row: dict) -> None:
        log.log(level, "fold %d/%d epoch %d: train loss %.4f, val loss %.4f, val AUC %.3f (best epoch %d, %.2f s)",
                row["fold"] + 1, cfg.folds, row["epoch"], row["train_loss"], row["val_loss"], row["val_auc"],
                row["best_epoch"], row["seconds"])
        if level == logging.DEBUG and not quiet and row["epoch"] % 10 == 0:
            log.info("fold %d/%d: epoch %d, val AUC %.3f", row["fold"] + 1, cfg.folds, row["epoch"], row["val_auc"])

    return on_epoch


def _fmt_ci(m: dict, key: str) -> str:
    lo, hi = m["ci95"][key]
    return f"{m[key]:.3f} ({lo:.3f}-{hi:.3f})"


def _print_train_summary(manifest: dict, out: Path) -> None:
    from rich.table import Table

    m = manifest["metrics"]["cross_validated"]
    t = Table(title=f"recnec train: {manifest['model_version']} (research use only)")
    t.add_column("cross-validated (out-of-fold)")
    t.add_column("value (95 % CI)")
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        t.add_row(k, _fmt_ci(m, k))
    t.add_row("threshold", f"{manifest['threshold']:.4f} ({manifest['threshold_selection']['method']})")
    cal = manifest.get("calibration")
    if cal:
        where = (f"calibration-cohort ECE {cal['calibration_cohort_ece_before']:.3f} -> "
                 f"{cal['calibration_cohort_ece_after']:.3f}" if "calibration_cohort_ece_after" in cal else
                 f"out-of-fold ECE {cal['oof_ece_before']:.3f} -> {cal['oof_ece_after']:.3f}")
        t.add_row("calibration", f"Platt a={cal['a']:.3f} b={cal['b']:.3f}; {where}; threshold "
                  f"{cal['threshold']:.4f} on the calibrated scale")
    app = manifest.get("applicability")
    if app:
        t.add_row("applicability", f"OUT_OF_DISTRIBUTION beyond distance {app['threshold']:.2f} "
                  f"({app['cv_flag_rate']:.1%} of training studies, cross-validated)")
    t.add_row("studies", f"{m['n']} ({m['n_recurrence']} recurrence / {m['n_necrosis']} necrosis)")
    t.add_row("ensemble", f"{len(manifest['models'])} x {manifest['models'][0]['arch']}, "
              f"{manifest['ensemble_mb']:.1f} MB, ONNX max |diff| {manifest['onnx']['max_abs_diff_vs_torch']:.2g}")
    t.add_row("time", f"{manifest['cost']['total_seconds']:.0f} s "
              f"({manifest['cost']['seconds_per_epoch_median']} s/epoch)")
    t.add_row("written to", str(out))
    results_console().print(t)


def evaluate(
    data: Path = typer.Argument(..., help="Model-space folder (tensors/*.npy) or folder of studies.",
                                show_default=False),
    labels: Optional[Path] = typer.Option(None, "--labels", help="CSV study_id,label "
                                          "[default: DATA/labels.csv]", show_default=False),
    out: Path = typer.Option(Path("metrics.json"), "--out", "-o", help="Metrics JSON to write."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Ensemble folder [default: the shipped "
                                           "weights/]", show_default=False),
    roc: Optional[Path] = typer.Option(None, "--roc", help="ROC PNG [default: OUT stem + .roc.png]",
                                       show_default=False),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Calibration plot PNG "
                                               "[default: OUT stem + .calibration.png]", show_default=False),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    n_boot: int = typer.Option(TrainConfig.n_boot, "--n-boot", min=100, help="Bootstrap resamples for the 95 % CIs."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Per-study tensor cache (study folders).",
                                         show_default=False),
    device: DeviceOpt = None,
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime threads (0 = default).",
                                          show_default=False),
    hdbet_mode: HdBetModeOpt = None,
    lesion_masks: LesionMasksOpt = None,
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    out = out.expanduser()
    with error_boundary():
        from ..errors import UsageError

        setup_logging(verbose=verbose, quiet=quiet)
        if not data.is_dir():
            raise UsageError(f"DATA must be a folder: {data}")
        settings = _settings(device, hdbet_mode, lesion_masks, threads, weights)
        from ..train.evaluate import evaluate_ensemble

        result = evaluate_ensemble(
            data, labels=_labels_path(data, labels), weights_dir=settings.weights_dir, out=out,
            device=settings.device, threads=settings.threads, settings=settings, cache_dir=cache,
            n_boot=n_boot, seed=seed, roc_png=roc, calibration_png=calibration,
        )
        if not quiet:
            from rich.table import Table

            t = Table(title=f"recnec evaluate: {result['weights']['model_version']} (research use only)")
            t.add_column("metric")
            t.add_column("value (95 % CI)")
            t.add_column("paper ResNet10")
            for k in ("auc", "sensitivity", "specificity", "accuracy"):
                t.add_row(k, _fmt_ci(result, k), f"{result['paper_resnet10'][k]:.2f}")
            c = result["confusion"]
            t.add_row("confusion", f"TP {c['tp']} FN {c['fn']} TN {c['tn']} FP {c['fp']}", "")
            t.add_row("threshold", f"{result['threshold']:.4f}", "")
            t.add_row("written", f"{out}, {result['roc_png']}, {result['calibration_png']}", "")
            results_console().print(t)
        for w in result.get("warnings", []):  # e.g. a CI resting on fewer than 10 necroses
            typer.echo(f"warning: {w}", err=True)
    raise typer.Exit(EXIT_OK)
