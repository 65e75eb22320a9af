"""Training and evaluation of the ONNX ensemble (``recnec train``, ``recnec evaluate``).

Modules: :mod:`.dataset` (labels + tensors, cached study preprocessing), :mod:`.models` (the CNN
families), :mod:`.loop` (stratified k-fold, early stopping), :mod:`.metrics` (AUC, sensitivity,
specificity, bootstrap CIs, ROC plot), :mod:`.export` (ONNX + manifest), :mod:`.run` (the
training chain) and :mod:`.evaluate` (scoring a labelled cohort with an ensemble).

Nothing is imported eagerly: ``evaluate`` needs neither torch nor MONAI.
"""

from __future__ import annotations

from typing import Any

__all__ = ["train_ensemble", "reproduce_shipped", "evaluate_ensemble", "make_config"]


def __getattr__(name: str) -> Any:
    if name in ("train_ensemble", "reproduce_shipped"):
        from . import run

        return getattr(run, name)
    if name == "make_config":
        from .config import make_config

        return make_config
    if name == "evaluate_ensemble":
        from .evaluate import evaluate_ensemble

        return evaluate_ensemble
    raise AttributeError(name)
