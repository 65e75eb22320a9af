"""Binary classification metrics with seeded bootstrap confidence intervals, the ROC and calibration plots.

Conventions (as in the paper, Frontiers in Oncology 2025, PubMed 40548110): the positive class is
tumour **recurrence** (label 1), the negative class radiation **necrosis** (label 0); a study is
called recurrence when its score ``p >= threshold``. Sensitivity = TP / (TP + FN) (recurrences
found), specificity = TN / (TN + FP) (necroses recognised), accuracy = (TP + TN) / N, AUC = area
under the ROC curve (Mann-Whitney U / (n_pos * n_neg), ties counted one half).

Confidence intervals are percentile intervals of a non-parametric bootstrap over studies
(Efron & Tibshirani 1993, ch. 13), drawn with ``numpy.random.default_rng(seed)`` so they are
reproducible. Resamples that miss a class are skipped for the metrics that need it.

numpy, scipy and scikit-learn only, plus matplotlib (Agg backend) for :func:`plot_roc` and
:func:`plot_calibration`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import rankdata

from ..errors import TrainingError

log = logging.getLogger(__name__)

#: the paper's ResNet10 figures (test set), drawn on ROC plots for comparison
PAPER_RESNET10 = {"sensitivity": 0.78, "specificity": 0.94, "accuracy": 0.91, "auc": 0.83}

METRIC_NAMES = ("auc", "sensitivity", "specificity", "accuracy")


def to_json(obj: Any) -> str:
    """``json.dumps(obj, indent=2)`` as strict JSON (RFC 8259): NaN and infinities, e.g. the NPV
    when no study is predicted necrosis or the AUC of a one-class split, become ``null``, which
    every JSON reader accepts (``NaN`` is a Python extension that JavaScript and jq-strict refuse).
    """
    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), indent=2, allow_nan=False)


def _check(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y).astype(np.int64).reshape(-1)
    p = np.asarray(p, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise TrainingError(f"labels {y.shape} and scores {p.shape} differ in length", code="BAD_LABELS")
    if not np.isin(y, (0, 1)).all():
        raise TrainingError("labels must be 0 (necrosis) or 1 (recurrence)", code="BAD_LABELS")
    if not np.isfinite(p).all():
        raise TrainingError("scores contain NaN or infinite values", code="NONFINITE_SCORES")
    return y, p


def auc_score(y: np.ndarray, p: np.ndarray) -> float:
    """ROC AUC via the Mann-Whitney statistic (ties = 1/2); NaN if a class is absent."""
    y, p = _check(y, p)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = rankdata(p)
    return float((r[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _auc_batch(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """AUC per row of ``(B, N)`` arrays ``y`` (0/1) and ``p``; NaN where a class is absent."""
    r = rankdata(p, axis=1)
    n_pos = y.sum(axis=1).astype(np.float64)
    n_neg = y.shape[1] - n_pos
    u = (r * y).sum(axis=1) - n_pos * (n_pos + 1) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan)


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold; positive = recurrence (1)."""

    tp: int
    fn: int
    tn: int
    fp: int

    @classmethod
    def at(cls, y: np.ndarray, p: np.ndarray, threshold: float) -> "Confusion":
        y, p = _check(y, p)
        pred = p >= threshold
        return cls(
            tp=int(((y == 1) & pred).sum()), fn=int(((y == 1) & ~pred).sum()),
            tn=int(((y == 0) & ~pred).sum()), fp=int(((y == 0) & pred).sum()),
        )

    def as_matrix(self) -> dict[str, Any]:
        """Rows = truth, columns = prediction, order ``[necrosis, recurrence]``."""
        return {
            "labels": ["necrosis", "recurrence"],
            "rows": "truth",
            "columns": "prediction",
            "matrix": [[self.tn, self.fp], [self.fn, self.tp]],
            **asdict(self),
        }


def _nan_div(a: float, b: float) -> float:
    return float(a) / float(b) if b else float("nan")


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, sensitivity, specificity, accuracy, PPV and NPV at ``threshold``."""
    c = Confusion.at(y, p, threshold)
    n = c.tp + c.tn + c.fp + c.fn
    return {
        "auc": auc_score(y, p),
        "sensitivity": _nan_div(c.tp, c.tp + c.fn),
        "specificity": _nan_div(c.tn, c.tn + c.fp),
        "accuracy": _nan_div(c.tp + c.tn, n),
        "ppv": _nan_div(c.tp, c.tp + c.fp),
        "npv": _nan_div(c.tn, c.tn + c.fn),
    }


#: a class with fewer cases than this gives a percentile-bootstrap interval that cannot be trusted
#: for the metrics that use it (sensitivity: recurrences; specificity: necroses; AUC: both)
MIN_CI_CASES = 10
#: bootstrap resamples that miss a class are skipped; above this fraction the interval is suspect
MAX_SKIPPED_FRACTION = 0.05


def _bootstrap(
    y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int, seed: int, level: float,
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Percentile intervals and, per metric, the fraction of resamples that could not give it."""
    rng = np.random.default_rng(seed)
    n = len(y)
    if n == 0:
        return ({k: [float("nan"), float("nan")] for k in METRIC_NAMES},
                {k: 1.0 for k in METRIC_NAMES})
    idx = rng.integers(0, n, size=(n_boot, n))
    yb, pb = y[idx], p[idx]
    pred = pb >= threshold
    tp = ((yb == 1) & pred).sum(1).astype(float)
    fn = ((yb == 1) & ~pred).sum(1).astype(float)
    tn = ((yb == 0) & ~pred).sum(1).astype(float)
    fp = ((yb == 0) & pred).sum(1).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = {
            "auc": _auc_batch(yb, pb),
            "sensitivity": np.where(tp + fn > 0, tp / (tp + fn), np.nan),
            "specificity": np.where(tn + fp > 0, tn / (tn + fp), np.nan),
            "accuracy": (tp + tn) / n,
        }
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    out: dict[str, list[float]] = {}
    skipped: dict[str, float] = {}
    for k, v in values.items():
        ok = np.isfinite(v)
        skipped[k] = float(1.0 - ok.mean())
        v = v[ok]
        out[k] = [float(np.percentile(v, lo)), float(np.percentile(v, hi))] if len(v) else [float("nan")] * 2
    return out, skipped


def bootstrap_ci(
    y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int = 2000, seed: int = 0,
    level: float = 0.95,
) -> dict[str, list[float]]:
    """Percentile bootstrap intervals ``{metric: [low, high]}`` for :data:`METRIC_NAMES`.

    Studies are resampled with replacement ``n_boot`` times with ``default_rng(seed)``; the
    threshold is held fixed (the interval does not include threshold-selection uncertainty).
    On small samples these intervals are unreliable (zero width when every case of a class is
    classified correctly); :func:`ci_warnings` says when.
    """
    y, p = _check(y, p)
    return _bootstrap(y, p, threshold, n_boot=n_boot, seed=seed, level=level)[0]


def ci_warnings(
    y: np.ndarray, ci: dict[str, list[float]], skipped: dict[str, float] | None = None,
) -> tuple[dict[str, str], list[str]]:
    """Which bootstrap intervals cannot be trusted, and why.

    A percentile bootstrap cannot show more variation than the sample has: with 8 necroses all
    recognised, every resample has specificity 1.000, so the interval is ``1.000-1.000`` although
    the true specificity may well be 0.7 (exact binomial 95 % interval 0.63-1.00). Reasons, per
    metric: the class it depends on has fewer than :data:`MIN_CI_CASES` cases; the interval has
    zero width (degenerate bootstrap distribution); it could not be computed (NaN); more than
    :data:`MAX_SKIPPED_FRACTION` of the resamples lacked a class.

    Returns
    -------
    (dict, list)
        ``{metric: reason}`` for each unreliable interval, and the human-readable warnings
        (one per metric, plus one per small class), in :data:`METRIC_NAMES` order.
    """
    y = np.asarray(y).astype(np.int64).reshape(-1)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    needs = {"auc": (("recurrence", n_pos), ("necrosis", n_neg)),
             "sensitivity": (("recurrence", n_pos),), "specificity": (("necrosis", n_neg),),
             "accuracy": (("study", len(y)),)}
    unreliable: dict[str, str] = {}
    warnings: list[str] = []
    for name, n_cls in (("recurrence", n_pos), ("necrosis", n_neg)):
        if n_cls < MIN_CI_CASES:
            warnings.append(f"only {n_cls} {name} case(s) (< {MIN_CI_CASES}): the figures that "
                            "depend on this class have wide true uncertainty and their bootstrap "
                            "intervals are unreliable")
    for k in METRIC_NAMES:
        lo, hi = ci.get(k, [float("nan")] * 2)
        why = []
        small = [f"{n} {c} case(s)" for c, n in needs[k] if n < MIN_CI_CASES]
        if small:
            why.append("only " + " and ".join(small) + f" (< {MIN_CI_CASES})")
        if not (np.isfinite(lo) and np.isfinite(hi)):
            why.append("no bootstrap resample could compute it")
        elif hi - lo <= 1e-12:
            why.append(f"zero-width interval ({lo:.3f}-{hi:.3f}): every resample gives the same "
                       "value, the bootstrap cannot express the uncertainty")
        if skipped and skipped.get(k, 0.0) > MAX_SKIPPED_FRACTION:
            why.append(f"{skipped[k]:.0%} of the resamples lacked a class and were skipped")
        if why:
            unreliable[k] = "; ".join(why)
            warnings.append(f"{k} 95 % CI unreliable: {unreliable[k]}")
    return unreliable, warnings


@dataclass(frozen=True)
class ThresholdChoice:
    """A decision threshold on the probability of recurrence and how it was chosen."""

    value: float
    method: str  # "youden" | "target_sensitivity"
    target_sensitivity: float | None
    sensitivity: float  # on the data it was chosen on
    specificity: float


def choose_threshold(
    y: np.ndarray, p: np.ndarray, *, target_sensitivity: float | None = None
) -> ThresholdChoice:
    """Choose the decision threshold on (out-of-fold) scores.

    Without ``target_sensitivity``: maximise Youden's J = sensitivity + specificity - 1
    (Youden 1950); ties go to the higher specificity. With it: the highest threshold whose
    sensitivity reaches the target (best specificity at that sensitivity). The returned value is
    the midpoint between the chosen cut score and the next lower distinct score, so that small
    numerical differences (ONNX vs PyTorch) cannot flip a study lying exactly on the cut.

    Raises
    ------
    TrainingError
        ``TOO_FEW_CASES`` if a class is missing; ``BAD_TARGET`` for a target outside (0, 1].
    """
    y, p = _check(y, p)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise TrainingError("threshold selection needs both classes", code="TOO_FEW_CASES")
    cuts = np.unique(p)[::-1]  # descending distinct scores; predict 1 if p >= cut
    sens = np.array([((p >= c) & (y == 1)).sum() / n_pos for c in cuts])
    spec = np.array([((p < c) & (y == 0)).sum() / n_neg for c in cuts])
    if target_sensitivity is None:
        j = sens + spec - 1.0
        best = np.flatnonzero(np.isclose(j, j.max()))
        i = int(best[np.argmax(spec[best])])
        method = "youden"
    else:
        if not 0.0 < target_sensitivity <= 1.0:
            raise TrainingError(f"--target-sensitivity must be in (0, 1], got {target_sensitivity}",
                                code="BAD_TARGET")
        ok = np.flatnonzero(sens >= target_sensitivity - 1e-12)
        i = int(ok[0])  # highest cut reaching the target
        method = "target_sensitivity"
    value = float(cuts[i]) if i + 1 >= len(cuts) else float((cuts[i] + cuts[i + 1]) / 2.0)
    return ThresholdChoice(value=value, method=method, target_sensitivity=target_sensitivity,
                           sensitivity=float(sens[i]), specificity=float(spec[i]))


def summarise(
    y: np.ndarray, p: np.ndarray, threshold: float, *, n_boot: int = 2000, seed: int = 0
) -> dict[str, Any]:
    """Metrics at ``threshold`` with bootstrap 95 % CIs, the confusion matrix and class counts.

    Returns a JSON-ready dict with top-level numbers ``auc``, ``sensitivity``, ``specificity``,
    ``accuracy`` (plus ``ppv``, ``npv``), ``ci95`` ``{metric: [low, high]}``, ``confusion``,
    ``n``, ``n_recurrence``, ``n_necrosis``, ``threshold`` and the bootstrap settings;
    ``ci95_unreliable`` ``{metric: reason}`` and ``warnings`` (list of str, empty when none) from
    :func:`ci_warnings`.
    """
    y, p = _check(y, p)
    out: dict[str, Any] = binary_metrics(y, p, threshold)
    out["ci95"], skipped = _bootstrap(y, p, threshold, n_boot=n_boot, seed=seed, level=0.95)
    out["ci95_unreliable"], out["warnings"] = ci_warnings(y, out["ci95"], skipped)
    out["confusion"] = Confusion.at(y, p, threshold).as_matrix()
    out["n"] = int(len(y))
    out["n_recurrence"] = int(y.sum())
    out["n_necrosis"] = int(len(y) - y.sum())
    out["threshold"] = float(threshold)
    out["bootstrap"] = {"n_boot": int(n_boot), "seed": int(seed), "method": "percentile, studies resampled"}
    return out


def roc_points(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(fpr, tpr)`` arrays of the empirical ROC curve, from (0, 0) to (1, 1)."""
    from sklearn.metrics import roc_curve

    y, p = _check(y, p)
    fpr, tpr, _ = roc_curve(y, p, drop_intermediate=False)
    return fpr, tpr


def plot_roc(
    y: np.ndarray, p: np.ndarray, path: Path, *, threshold: float, title: str,
    summary: dict[str, Any] | None = None, show_paper: bool = True,
) -> None:
    """Write a ROC curve PNG with the operating point at ``threshold`` (and the paper's ResNet10).

    Deterministic output for the same inputs (no timestamp in the PNG metadata).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    y, p = _check(y, p)
    fpr, tpr = roc_points(y, p)
    s = summary or summarise(y, p, threshold, n_boot=200)
    fig = Figure(figsize=(5.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ci = s.get("ci95", {}).get("auc", [float("nan")] * 2)
    ax.plot(fpr, tpr, lw=2, label=f"recnec AUC {s['auc']:.3f} (95% CI {ci[0]:.3f}-{ci[1]:.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.plot([1 - s["specificity"]], [s["sensitivity"]], "o", color="C3",
            label=f"threshold {threshold:.3f}: sens {s['sensitivity']:.2f}, spec {s['specificity']:.2f}")
    if show_paper:
        ax.plot([1 - PAPER_RESNET10["specificity"]], [PAPER_RESNET10["sensitivity"]], "s", color="C2",
                label="paper ResNet10 (sens 0.78, spec 0.94, AUC 0.83)")
    ax.set_xlabel("1 - specificity (necrosis called recurrence)")
    ax.set_ylabel("sensitivity (recurrence found)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_title(f"{title}\n(n={s['n']}: {s['n_recurrence']} recurrence / {s['n_necrosis']} necrosis)",
                 fontsize=9)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png", metadata={"Software": None})
    log.info("wrote ROC curve %s", path)


def calibration_bins(y: np.ndarray, p: np.ndarray, *, n_bins: int = 10) -> dict[str, Any]:
    """Reliability of the scores as probabilities (DeGroot & Fienberg 1983; Niculescu-Mizil &
    Caruana 2005): ``n_bins`` equal-width bins of ``p`` over [0, 1] (the last one closed).

    Returns
    -------
    dict
        ``bins``: one ``{"lo", "hi", "n", "mean_p", "fraction_recurrence"}`` per non-empty bin;
        ``brier`` (mean squared difference of ``p`` and ``y``) and ``ece`` (expected calibration
        error: count-weighted mean ``|fraction_recurrence - mean_p|`` over the bins).
    """
    y, p = _check(y, p)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        sel = idx == b
        n = int(sel.sum())
        if not n:
            continue
        mean_p, frac = float(p[sel].mean()), float(y[sel].mean())
        ece += n / len(y) * abs(frac - mean_p)
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": n, "mean_p": mean_p,
                     "fraction_recurrence": frac})
    return {"bins": bins, "brier": float(np.mean((p - y) ** 2)), "ece": float(ece), "n_bins": int(n_bins)}


def plot_calibration(y: np.ndarray, p: np.ndarray, path: Path, *, title: str, n_bins: int = 10,
                     p_before: np.ndarray | None = None) -> dict[str, Any]:
    """Write a calibration plot (reliability diagram) PNG: per bin of the score (x: mean
    p(recurrence) in the bin), the observed fraction of recurrences (y), with the diagonal of a
    perfectly calibrated model, the study count of each bin beside its point, Brier score and ECE
    (see :func:`calibration_bins`, whose result is returned). With ``p_before`` (the same
    studies' raw scores before the calibration map) a second, grey curve shows those.
    Same frame as :func:`plot_roc` (5 x 5 inches at 100 dpi, both axes -0.01 ... 1.01);
    deterministic (no time stamp)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    cal = calibration_bins(y, p, n_bins=n_bins)
    fig = Figure(figsize=(5.0, 5.0), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
    if p_before is not None:
        raw = calibration_bins(y, p_before, n_bins=n_bins)
        ax.plot([b["mean_p"] for b in raw["bins"]], [b["fraction_recurrence"] for b in raw["bins"]], "--s",
                color="silver", lw=1, ms=5,
                label=f"before calibration: Brier {raw['brier']:.3f}, ECE {raw['ece']:.3f}")
    xs = [b["mean_p"] for b in cal["bins"]]
    ys = [b["fraction_recurrence"] for b in cal["bins"]]
    ax.plot(xs, ys, "-o", color="C0", lw=1.5, ms=7,
            label=f"recnec ({n_bins} bins): Brier {cal['brier']:.3f}, ECE {cal['ece']:.3f}")
    for b in cal["bins"]:
        ax.annotate(str(b["n"]), (b["mean_p"], b["fraction_recurrence"]), textcoords="offset points",
                    xytext=(6, -10), fontsize=7, color="dimgrey")
    ax.set_xlabel("mean predicted p(recurrence) in the bin")
    ax.set_ylabel("observed fraction of recurrences")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    y_arr, _ = _check(y, p)
    ax.set_title(f"{title}\n(n={len(y_arr)}: {int(y_arr.sum())} recurrence / {len(y_arr) - int(y_arr.sum())} "
                 "necrosis; numbers = studies per bin)", fontsize=9)
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), format="png", metadata={"Software": None})
    log.info("wrote calibration plot %s", path)
    return cal
