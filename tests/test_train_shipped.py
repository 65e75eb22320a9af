"""The shipped ``weights/``: verified, within budget, documented; and (opt-in) reproducible."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.stages.infer import Ensemble, read_manifest

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"

pytestmark = pytest.mark.skipif(not (WEIGHTS / "manifest.json").is_file(),
                                reason="no shipped weights in this checkout")


def test_shipped_manifest_is_complete() -> None:
    m = read_manifest(WEIGHTS)  # verifies every SHA-256
    assert m["command"] == "recnec train --reproduce-shipped --out weights/"
    assert m["input"]["shape"] == [3, 40, 40, 40] and m["input"]["spacing_mm"] == 1.5
    assert m["training"]["seed"] == 0 and m["training"]["config"]["profile"] == "default"
    assert m["data"]["n"] == 234 and m["data"]["recurrence"] == 192 and m["data"]["necrosis"] == 42
    cv = m["metrics"]["cross_validated"]
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        lo, hi = cv["ci95"][k]
        assert lo <= cv[k] <= hi
    assert len(m["models"]) == 5 and m["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    size_mb = sum((WEIGHTS / f).stat().st_size for f in m["files"]) / 1e6
    assert size_mb <= 40.0
    assert "RESEARCH USE ONLY" in m["disclaimer"]
    assert {"roc.png", "epochs.csv"} <= set(m["files"])


def test_shipped_ensemble_predicts() -> None:
    ens = Ensemble.load(WEIGHTS, device="cpu")
    x = np.random.default_rng(0).normal(size=(2, 3, 40, 40, 40)).astype(np.float32)
    pred = ens.predict(x)
    assert pred.per_model.shape == (5, 2) and np.isfinite(pred.mean).all()
    assert 0.0 < ens.threshold < 1.0


@pytest.mark.veryslow
def test_reproduce_shipped_gives_identical_files(tmp_path: Path) -> None:
    """``recnec train --reproduce-shipped`` (~10-15 min on 2 cores) reproduces weights/ exactly.

    Byte identity holds on the machine type that made the weights (same CPU instruction set,
    same library versions, 1 torch thread); elsewhere compare the metrics with a tolerance.
    """
    pytest.importorskip("torch")
    from recnec_cli.train.run import reproduce_shipped

    res = reproduce_shipped(tmp_path / "weights")
    shipped = json.loads((WEIGHTS / "manifest.json").read_text())
    assert res.manifest["data"]["fingerprint_sha256"] == shipped["data"]["fingerprint_sha256"]
    assert res.manifest["threshold"] == pytest.approx(shipped["threshold"], abs=1e-6)
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        assert res.manifest["metrics"]["cross_validated"][k] == pytest.approx(
            shipped["metrics"]["cross_validated"][k], abs=1e-6)
    if res.manifest["libraries"] == shipped["libraries"]:
        assert res.manifest["files"] == shipped["files"]
