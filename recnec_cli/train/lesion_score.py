"""Fit the lesion score (:mod:`recnec_cli.stages.lesion_score`) for a segmenter, on synthetic heads.

Heads are drawn as the segmenter's training images are (:mod:`recnec_cli.synth.segdata`: MNI152
anatomy, random contrasts, the normally enhancing structures on every head), with a lesion of each
kind in turn and :data:`ScoreConfig.n_free` heads without one; FLAIR is dropped from 40 % of them.
On each head the scan's lesion stage runs as in ``recnec scan`` (the segmenter, the
normal-structure tests, the heuristic detector) and every remaining candidate component is one
row: its :data:`~recnec_cli.stages.lesion_score.FEATURES` and whether more than 20 % of it lies
in the reference lesion (enhancing tissue or core). A logistic regression
(scikit-learn ``LogisticRegression``, L2, C = 1, on standardised features) is fitted to the rows.
The seeds differ from every benchmark's (9001, 9002) and from the segmenter's training (0) and
validation (1) seeds.

Reproducible: the same segmenter and configuration write the same file (numbers rounded to 4
decimals, :func:`recnec_cli.stages.lesion_score.fitted_body`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScoreConfig:
    """``seed`` of the heads; ``n_heads`` heads with a lesion, ``n_free`` without; ``threads`` of
    ONNX Runtime; ``c`` the inverse L2 strength."""

    seed: int = 31337
    n_heads: int = 150
    n_free: int = 75
    threads: int = 1
    c: float = 1.0


SHIPPED_SCORE = ScoreConfig()
#: share of the heads without FLAIR
NO_FLAIR = 0.4
#: a component is a lesion when more than this share of its voxels lies in the reference
MIN_OVERLAP = 0.2


def head_rows(seg: Any, seed: int, index: int, *, kind: str) -> tuple[list[np.ndarray], list[bool]]:
    """Features and truth of every candidate component on one synthetic head (``kind`` one of
    :data:`recnec_cli.synth.segdata.LESION_KINDS` or ``"none"``)."""
    from scipy import ndimage

    from ..errors import LesionError
    from ..stages import lesion
    from ..stages.lesion_score import ComponentMeasurer
    from ..stages.segment import candidate_components
    from ..synth import segdata

    aff = segdata.grid_affine()
    lm = segdata.draw_label_map(seed, index, kind=kind)
    ref = np.isin(segdata.TARGET_OF[lm.labels], (1, 2))
    images: dict[str, np.ndarray | None] = dict(
        segdata.render_images(np.random.default_rng([seed, index]), lm.labels, lm.t1_texture))
    if np.random.default_rng([seed, index, 7]).random() < NO_FLAIR:
        images["FLAIR"] = None
    # a skull-stripped study's own foreground keeps its lesion (the scan's brain mask does too)
    brain = ndimage.binary_fill_holes(lm.brain | (ref & (lm.labels != segdata.OEDEMA)))
    images = {k: None if v is None else np.where(brain, v, 0.0).astype(np.float32) for k, v in images.items()}
    s = seg.segment(images, brain, aff)
    shell = lesion.ShellEvidence(brain, aff, t1=images["T1"], t2=images["T2"])
    try:
        h = lesion.detect_enhancing_lesion(images["T1ce"], brain, aff, t1=images["T1"], t2=images["T2"])
        centroid = np.asarray(h.centroid_ras_mm)
    except LesionError:
        centroid = None
    try:
        cands, _ = candidate_components(s, aff, not_a_lesion=lambda m: lesion.normal_structure(m, aff, shell))
    except LesionError:
        return [], []
    measure = ComponentMeasurer(s.labels, s.confidence, images, brain, aff, shell=shell,
                                heuristic_centroid=centroid)
    feats = [measure(c.component, c.filled, c.enhancing, c.oedema) for c in cands]
    truth = [bool(np.count_nonzero(c.component & ref) > MIN_OVERLAP * np.count_nonzero(c.component))
             for c in cands]
    return feats, truth


def fit_lesion_score(folder: Path, cfg: ScoreConfig = SHIPPED_SCORE, *,
                     progress: Callable[[int, int], None] | None = None) -> dict[str, Any]:
    """Fit the lesion score for the segmenter in ``folder`` and write ``folder/lesion_score.json``.

    Returns the written document (``fitted`` numbers, ``training`` counts and AUC on its own rows).
    ``progress(done, total)`` is called after each head.

    Raises
    ------
    EnvironmentBroken, InferenceError
        As :meth:`recnec_cli.stages.segment.Segmenter.load` (missing or modified segmenter).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from ..stages.lesion_score import LESION_SCORE_FILE, fitted_body, write_lesion_score
    from ..stages.segment import SEGMENTER_FILE, Segmenter
    from ..synth import segdata

    t0 = time.perf_counter()
    seg = Segmenter.load(Path(folder), device="cpu", threads=cfg.threads, with_score=False)
    jobs = [(i, segdata.LESION_KINDS[i % len(segdata.LESION_KINDS)]) for i in range(cfg.n_heads)]
    jobs += [(100_000 + i, "none") for i in range(cfg.n_free)]
    x: list[np.ndarray] = []
    y: list[bool] = []
    for done, (index, kind) in enumerate(jobs, start=1):
        f, t = head_rows(seg, cfg.seed, index, kind=kind)
        x += f
        y += t
        if progress is not None:
            progress(done, len(jobs))
    xa = np.asarray(x, dtype=float)
    if len(set(y)) < 2:
        from ..errors import UsageError
        raise UsageError(f"{len(jobs)} heads gave {len(y)} candidate components of one kind only: "
                         "draw more heads (--n-heads / --n-free)")
    means = np.nanmean(xa, axis=0)
    xa = np.where(np.isfinite(xa), xa, means)
    scaler = StandardScaler().fit(xa)
    model = LogisticRegression(C=cfg.c, max_iter=5000).fit(scaler.transform(xa), y)
    body = fitted_body(mean=scaler.mean_, scale=scaler.scale_, coef=model.coef_[0], intercept=model.intercept_[0])
    auc = float(roc_auc_score(y, model.predict_proba(scaler.transform(xa))[:, 1]))
    doc = {"command": "recnec train-segmenter --lesion-score-only --out weights/",
           "disclaimer": "RESEARCH USE ONLY. Fitted on synthetic heads only; on patients a ranking with a "
                         "threshold, not a calibrated probability.",
           "method": "logistic regression (scikit-learn, L2) on standardised component measurements; "
                     "see recnec_cli.stages.lesion_score",
           # the thread count changes the last bits of the features only, not the rounded numbers
           "config": {k: v for k, v in asdict(cfg).items() if k != "threads"},
           "segmenter_sha256": seg.manifest["files"][SEGMENTER_FILE],
           "training": {"heads": len(jobs), "components": len(y), "lesion_components": int(sum(y)),
                        "auc_on_training_rows": round(auc, 4)}}
    write_lesion_score(Path(folder) / LESION_SCORE_FILE, body, **doc)
    log.info("lesion score: %d components from %d heads, training AUC %.3f, %.0f s", len(y), len(jobs), auc,
             time.perf_counter() - t0)
    return {**doc, "fitted": body, "seconds": time.perf_counter() - t0}
