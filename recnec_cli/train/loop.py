"""Stratified k-fold training of the ensemble: one model per fold, early stopping on validation AUC.

Split scheme (all seeded by ``TrainConfig.seed``):

* outer: ``StratifiedKFold(folds, shuffle=True)``. The held-out fold is never seen during that
  fold's training; its predictions are the **out-of-fold** (OOF) scores used for the decision
  threshold and the cross-validated metrics.
* inner: a stratified ``val_fraction`` of each training split is held back for early stopping
  (best validation AUC averaged over ``select_window`` epochs, ties broken by lower validation
  loss), so early stopping does not peek at the OOF fold.

Class imbalance (the paper's cohort is 192 recurrence / 42 necrosis): ``BCEWithLogitsLoss`` with
``pos_weight = n_necrosis / n_recurrence`` of the training split, so both classes carry equal total
weight. Augmentation (training only) uses MONAI array transforms (docs.monai.io, "Transforms"):
translation (pad + random crop), left-right flip, occasional small rotation/scaling
(``RandAffine``), intensity scale/shift and Gaussian noise on the z-scored input; before them, the
scan's acquisition is simulated (thick slices, registration error:
:mod:`recnec_cli.train.acquisition_aug`; ``TrainConfig.acquisition``).

Determinism: every fold seeds torch, numpy and MONAI from ``seed`` and the fold index, runs with
``torch.use_deterministic_algorithms(True)`` and a fixed ``torch.set_num_threads(threads)``, and
batches are drawn in the main process (no DataLoader workers), so a rerun on the same machine
gives the same weights and numbers.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from ..errors import TrainingError
from .config import FINE_TUNE_LR, TrainConfig, lr_text
from .metrics import auc_score
from .models import ProbabilityHead, build_model, n_parameters

log = logging.getLogger(__name__)

@contextmanager
def deterministic(seed: int, threads: int) -> Iterator[None]:
    """Seed torch/numpy/MONAI, enable deterministic algorithms and fix the thread count; restore after."""
    from monai.data import get_track_meta, set_track_meta
    from monai.utils import set_determinism

    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_meta = get_track_meta()
    # fixed thread count; subnormal floats are NOT flushed here: the shipped weights were trained
    # with torch's default float mode and `--reproduce-shipped` must reproduce them byte for byte
    # (flushing in training waits for a deliberate, verified retrain)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    set_determinism(seed=seed)
    set_track_meta(False)  # plain tensors through MONAI transforms: no metadata overhead
    try:
        yield
    finally:
        set_track_meta(prev_meta)
        set_determinism(seed=None)
        torch.use_deterministic_algorithms(prev_det)
        torch.set_num_threads(prev_threads)


#: the MONAI chain of :func:`_augmenter`: zero-padding per side (voxels) before the random crop
#: back to the input shape, probability / largest rotation (radians) / scale of ``RandAffine``
PAD_VOX = 4
AFFINE_P = 0.3
AFFINE_ROTATE_RAD = 0.17
AFFINE_SCALE = 0.05


def describe_augmentation(cfg: TrainConfig) -> str:
    """The manifest's account of the augmentation ``cfg`` trains with, written from the values
    :func:`_augmenter` and :mod:`~recnec_cli.train.acquisition_aug` apply (``"none"`` without)."""
    if not cfg.augment:
        return "none"
    from .acquisition_aug import DEFAULTS as acq

    text = ""
    if cfg.acquisition:
        text = (f"simulated acquisition per channel (thick slices {acq.thick_mm[0]:g}-{acq.thick_mm[1]:g} mm "
                f"p={acq.p_thick:g}, T1/T2 misregistration <= {acq.misregister_mm:g} mm p={acq.p_misregister:g}; "
                "recnec_cli.train.acquisition_aug), then ")
    return text + (f"MONAI SpatialPad(+{PAD_VOX} vox)+RandSpatialCrop (shift <= {PAD_VOX * acq.spacing_mm:g} mm), "
                   f"RandFlip(LR), RandAffine(p={AFFINE_P:g}, rot {math.degrees(AFFINE_ROTATE_RAD):.0f} deg, "
                   f"scale {AFFINE_SCALE * 100:g} %), RandScaleIntensity, RandShiftIntensity, RandGaussianNoise")


def _augmenter(seed: int, shape: tuple[int, int, int], *,
               acquisition: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """MONAI array-transform chain for one ``(3, X, Y, Z)`` float32 tensor, seeded.

    Translation by zero-padding 4 voxels per side and a random crop back to ``shape`` (+-6 mm
    at 1.5 mm; zero = outside the brain in the model-input recipe), left-right flip (axis 0 of
    ``(X, Y, Z)``), a small rotation (<= 10 deg) and scaling (<= 5 %) on 30 % of samples
    (``RandAffine``, ~5 ms CPU per tensor, the most expensive step), intensity scale/shift and
    Gaussian noise on the z-scored input. Total ~3 ms CPU per tensor with MetaTensor tracking off.
    With ``acquisition``, each tensor first goes through
    :func:`~recnec_cli.train.acquisition_aug.simulate_acquisition` (numpy generator seeded from
    ``seed``; ~11 ms CPU per tensor).
    """
    from monai.transforms import (
        Compose,
        RandAffine,
        RandFlip,
        RandGaussianNoise,
        RandScaleIntensity,
        RandShiftIntensity,
        RandSpatialCrop,
        SpatialPad,
    )

    from .acquisition_aug import simulate_acquisition

    chain = Compose([
        SpatialPad(tuple(s + 2 * PAD_VOX for s in shape), mode="constant"),
        RandSpatialCrop(shape, random_size=False),
        RandFlip(prob=0.5, spatial_axis=0),
        RandAffine(prob=AFFINE_P, rotate_range=(AFFINE_ROTATE_RAD,) * 3, scale_range=(AFFINE_SCALE,) * 3,
                   padding_mode="zeros", mode="bilinear", spatial_size=shape, cache_grid=True),
        RandScaleIntensity(factors=0.1, prob=0.5),
        RandShiftIntensity(offsets=0.1, prob=0.5),
        RandGaussianNoise(prob=0.3, mean=0.0, std=0.1),
    ]).set_random_state(seed=seed)

    acq_rng = np.random.default_rng([seed, 7919])

    def apply(x: np.ndarray) -> np.ndarray:
        if acquisition:
            x = simulate_acquisition(x, acq_rng)
        out = chain(torch.from_numpy(np.ascontiguousarray(x)))
        return np.asarray(out.detach().cpu().numpy() if hasattr(out, "detach") else out, dtype=np.float32)

    return apply


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, *, batch_size: int = 32) -> np.ndarray:
    """Logits ``(N,)`` of ``model`` (eval mode) for float32 ``x`` of shape ``(N, 3, 40, 40, 40)``."""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).reshape(-1)
           for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


@dataclass
class FoldResult:
    """One trained fold: the model (with sigmoid head, eval mode) and where its data came from."""

    fold: int
    model: ProbabilityHead
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    test_prob: np.ndarray  # (len(test_idx),) probability of recurrence on the held-out fold
    best_epoch: int
    best_val_auc: float
    epochs_run: int
    seconds: float
    cpu_seconds: float
    parameters: int


@dataclass
class CVResult:
    """All folds plus the out-of-fold probability of every study (``oof`` shape ``(N,)``)."""

    folds: list[FoldResult]
    oof: np.ndarray
    epoch_log: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # process CPU time, all threads (robust to other load on the host)


def check_cohort_size(y: np.ndarray, folds: int) -> None:
    """Each class needs at least ``2 * folds`` studies (outer folds and inner validation)."""
    n_pos = int(y.sum())
    n_neg = int(len(y) - n_pos)
    if min(n_pos, n_neg) < 2 * folds:
        raise TrainingError(
            f"{n_pos} recurrence / {n_neg} necrosis studies: each class needs at least "
            f"{2 * folds} for {folds}-fold cross-validation with an inner validation split",
            code="TOO_FEW_CASES",
        )


def train_fold(
    x: np.ndarray, y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray, *,
    cfg: TrainConfig, fold: int, epoch_log: list[dict[str, Any]],
    on_epoch: Callable[[dict[str, Any]], None] | None = None, init_net: nn.Module | None = None,
) -> tuple[nn.Module, int, float, int]:
    """Train one model on ``x[train_idx]`` with early stopping on ``x[val_idx]``.

    ``init_net`` (a logits network, e.g. from :func:`recnec_cli.train.init.load_init_source`) is
    trained in place instead of a freshly initialised ``build_model(cfg.arch, width=cfg.width)``.

    The kept checkpoint is the epoch (from ``select_from_epoch`` on) with the best validation AUC
    averaged over the last ``select_window`` epochs (ties: lower averaged validation loss); with
    ~8 necroses in a validation split a single epoch's AUC is too noisy to select on. Training
    stops after ``patience`` epochs without improvement (not before ``min_epochs``).

    Returns ``(net with the kept state, its epoch, its smoothed validation AUC, epochs run)``.
    ``net`` outputs logits ``(N, 1)``.
    """
    fold_seed = cfg.seed * 1000 + fold
    torch.manual_seed(fold_seed)
    rng = np.random.default_rng(fold_seed)
    net = init_net if init_net is not None else build_model(cfg.arch, width=cfg.width)
    ytr = y[train_idx]
    n_pos = max(int(ytr.sum()), 1)
    n_neg = max(int(len(ytr) - ytr.sum()), 1)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([n_neg / n_pos], dtype=torch.float32))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.max_epochs)
    aug = _augmenter(fold_seed, tuple(x.shape[2:]), acquisition=cfg.acquisition) if cfg.augment else None
    xv = x[val_idx]
    yv_t = torch.from_numpy(y[val_idx].astype(np.float32))
    best_key = (-np.inf, -np.inf)
    best_state: dict[str, torch.Tensor] = {}
    best_epoch, best_auc = 0, float("nan")
    history: list[tuple[float, float]] = []
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        net.train()
        order = rng.permutation(train_idx)
        n_batches = max(len(order) // cfg.batch_size, 1)  # drop the ragged last batch (BatchNorm)
        losses = []
        for b in range(n_batches):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            xb = np.stack([aug(x[i]) for i in idx]) if aug is not None else x[idx]
            xb_t = torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))
            yb_t = torch.from_numpy(y[idx].astype(np.float32)).reshape(-1, 1)
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb_t), yb_t)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        sched.step()
        logits = predict_logits(net, xv)
        _check_not_diverged(f"{fold + 1}/{cfg.folds}", epoch, float(np.mean(losses)), logits, cfg.lr)
        val_loss = float(loss_fn(torch.from_numpy(logits.astype(np.float32)).reshape(-1, 1),
                                 yv_t.reshape(-1, 1)))
        val_auc = auc_score(y[val_idx], logits)
        history.append((val_auc, val_loss))
        recent = history[-cfg.select_window:]
        auc_smooth = float(np.mean([a for a, _ in recent]))
        loss_smooth = float(np.mean([v for _, v in recent]))
        key = (round(auc_smooth, 6), -round(loss_smooth, 6))
        if epoch >= min(cfg.select_from_epoch, cfg.max_epochs) and key > best_key:
            best_key, best_epoch, best_auc = key, epoch, auc_smooth
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        row = {
            "fold": fold, "epoch": epoch, "train_loss": round(float(np.mean(losses)), 6),
            "val_loss": round(val_loss, 6), "val_auc": round(val_auc, 6),
            "val_auc_smooth": round(auc_smooth, 6),
            "lr": round(float(opt.param_groups[0]["lr"]), 8), "best_epoch": best_epoch,
            "seconds": round(time.perf_counter() - t0, 3),
            "cpu_seconds": round(time.process_time() - c0, 3),
        }
        epoch_log.append(row)
        if on_epoch is not None:
            on_epoch(row)
        log.debug("fold %d epoch %d: %s", fold, epoch, row)
        if epoch >= cfg.min_epochs and epoch - max(best_epoch, cfg.select_from_epoch - 1) >= cfg.patience:
            if epoch < cfg.max_epochs:
                log.info("fold %d/%d: early stop at epoch %d (best %d, val AUC %.3f)", fold + 1, cfg.folds,
                         epoch, best_epoch, best_auc)
            break
    if best_state:
        net.load_state_dict(best_state)
    else:  # validation AUC undefined throughout (one class in the split): keep the last state
        log.warning("fold %d/%d: no usable validation AUC (one class in its validation split); keeping "
                    "the last epoch", fold + 1, cfg.folds)
        best_epoch = epoch
    net.eval()
    return net, best_epoch, best_auc, epoch


#: Below this range of held-out probabilities the kept model gives every study the same score.
COLLAPSED_PROB_RANGE = 1e-6


def _lr_hint(lr: float) -> str:
    return (f"at learning rate {lr:g}; train again with a lower --lr (default {lr_text(TrainConfig.lr)} "
            f"from scratch, {lr_text(FINE_TUNE_LR)} with --init-from)")


def _check_not_diverged(fold: int | str, epoch: int, train_loss: float, val_logits: np.ndarray, lr: float) -> None:
    """Raise ``TRAINING_DIVERGED`` when an epoch's loss or validation logits are not finite."""
    if not (np.isfinite(train_loss) and np.all(np.isfinite(val_logits))):
        raise TrainingError(
            f"fold {fold}: training diverged in epoch {epoch} (training loss {train_loss:g}, "
            f"{int(np.sum(~np.isfinite(val_logits)))} non-finite validation scores) {_lr_hint(lr)}; "
            "nothing was exported",
            code="TRAINING_DIVERGED",
        )


def _check_not_collapsed(fold: int | str, epoch: int, prob: np.ndarray, lr: float) -> None:
    """Raise ``TRAINING_DIVERGED`` when the kept model gives every held-out study of its fold the
    same probability (range below :data:`COLLAPSED_PROB_RANGE`, e.g. all 0 or all 1 after the
    logits blew up at a too-high learning rate): its AUC is 0.5 by construction and an exported
    ensemble of it would give one probability to every patient."""
    spread = float(np.ptp(prob)) if len(prob) else 0.0
    if spread < COLLAPSED_PROB_RANGE:
        raise TrainingError(
            f"fold {fold}: the kept model (epoch {epoch}) gives the same probability "
            f"({float(prob[0]) if len(prob) else float('nan'):.3g}) to all {len(prob)} held-out "
            f"studies: training collapsed {_lr_hint(lr)}; nothing was exported",
            code="TRAINING_DIVERGED",
        )


def cross_validate(
    x: np.ndarray, y: np.ndarray, cfg: TrainConfig, *,
    on_epoch: Callable[[dict[str, Any]], None] | None = None, init: Any = None,
) -> CVResult:
    """Stratified ``cfg.folds``-fold training; returns every fold's model and the OOF scores.

    With ``init`` (:class:`~recnec_cli.train.init.InitSource`), fold ``k`` starts from a copy of
    the source ensemble's model ``k mod M`` instead of a random initialisation (fine-tuning; the
    source was trained on another cohort, so no held-out study was seen by its starting point
    unless the source cohort overlaps this one).

    Parameters
    ----------
    x:
        float32 ``(N, 3, 40, 40, 40)``.
    y:
        int ``(N,)``, 1 = recurrence, 0 = necrosis.

    Raises
    ------
    TrainingError
        ``TOO_FEW_CASES`` when a class is too small for the folds; ``TRAINING_DIVERGED`` when a
        fold's loss or scores become non-finite, or its kept model gives all its held-out studies
        one probability (usually a too-high ``cfg.lr``).
    """
    from sklearn.model_selection import StratifiedKFold, StratifiedShuffleSplit

    cfg.validate()
    check_cohort_size(y, cfg.folds)
    t_all, c_all = time.perf_counter(), time.process_time()
    outer = StratifiedKFold(n_splits=cfg.folds, shuffle=True, random_state=cfg.seed)
    oof = np.full(len(y), np.nan)
    folds: list[FoldResult] = []
    epoch_log: list[dict[str, Any]] = []
    with deterministic(cfg.seed, cfg.threads):
        for fold, (trval_idx, test_idx) in enumerate(outer.split(np.zeros(len(y)), y)):
            t0, c0 = time.perf_counter(), time.process_time()
            inner = StratifiedShuffleSplit(n_splits=1, test_size=cfg.val_fraction,
                                           random_state=cfg.seed * 1000 + fold)
            tr_rel, va_rel = next(inner.split(np.zeros(len(trval_idx)), y[trval_idx]))
            train_idx, val_idx = np.sort(trval_idx[tr_rel]), np.sort(trval_idx[va_rel])
            net, best_epoch, best_auc, epochs_run = train_fold(
                x, y, train_idx, val_idx, cfg=cfg, fold=fold, epoch_log=epoch_log, on_epoch=on_epoch,
                init_net=init.net_for_fold(fold) if init is not None else None)
            head = ProbabilityHead(net).eval()
            with torch.no_grad():
                prob = torch.cat([head(torch.from_numpy(np.ascontiguousarray(x[test_idx[i:i + 32]])))
                                  for i in range(0, len(test_idx), 32)]).numpy().astype(np.float64)
            _check_not_collapsed(f"{fold + 1}/{cfg.folds}", best_epoch, prob, cfg.lr)
            oof[test_idx] = prob
            secs = time.perf_counter() - t0
            folds.append(FoldResult(
                fold=fold, model=head, train_idx=train_idx, val_idx=val_idx, test_idx=np.sort(test_idx),
                test_prob=prob[np.argsort(test_idx)], best_epoch=best_epoch, best_val_auc=best_auc,
                epochs_run=epochs_run, seconds=secs,
                cpu_seconds=time.process_time() - c0, parameters=n_parameters(net),
            ))
            log.info("fold %d/%d: %d epochs (best %d, val AUC %.3f), held-out AUC %.3f, %.1f s",
                     fold + 1, cfg.folds, epochs_run, best_epoch, best_auc,
                     auc_score(y[test_idx], prob), secs)
    return CVResult(folds=folds, oof=oof, epoch_log=epoch_log, seconds=time.perf_counter() - t_all,
                    cpu_seconds=time.process_time() - c_all)
