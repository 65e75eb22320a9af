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
    assert {"roc.png", "epochs.csv", "calibration.png", "oof.csv"} <= set(m["files"])
    assert m["calibration"]["method"] == "platt" and m["calibration"]["a"] > 0
    assert m["applicability"]["threshold"] > 0 and m["applicability"]["cv_flag_rate"] <= 0.05


#: a synthetic cohort seed never used for the shipped weights (trained on seed 0; README: seed 1)
FRESH_SEED = 7
#: 12 recurrences + 12 necroses (ratio 1:1): ~55 s of rendering on two busy cores
FRESH_N = 24
#: measured on seed 7, n = 24: AUC 0.958; a random or mis-wired ensemble scores about 0.5
#: (P(AUC >= 0.80) by chance with 12 + 12 studies is below 0.1 %)
AUC_FLOOR = 0.80


@pytest.mark.slow  # renders a synthetic cohort (~27 s)
def test_shipped_ensemble_separates_a_fresh_synthetic_cohort() -> None:
    """The shipped ensemble tells recurrence from necrosis on model-space tensors of a synthetic
    cohort it never saw (same generator as ``recnec synth --space model``, in memory)."""
    from sklearn.metrics import roc_auc_score

    from recnec_cli.synth.subject import cohort_label, plan_subject
    from recnec_cli.synth.truth import model_tensor

    labels = [cohort_label(seed=FRESH_SEED, index=i, ratio=(1, 1)) for i in range(FRESH_N)]
    x = np.stack([model_tensor(plan_subject(seed=FRESH_SEED, index=i, label=lab))[0]
                  for i, lab in enumerate(labels)])
    y = np.array([lab == "recurrence" for lab in labels], dtype=np.int64)
    assert y.sum() == FRESH_N // 2

    ens = Ensemble.load(WEIGHTS, device="cpu")
    pred = ens.predict(x)
    assert pred.per_model.shape == (5, FRESH_N) and np.isfinite(pred.per_model).all()
    assert 0.0 < ens.threshold < 1.0
    auc = roc_auc_score(y, pred.mean)
    assert auc >= AUC_FLOOR, f"AUC {auc:.3f} on fresh seed {FRESH_SEED} (measured 0.958)"
    # every fold model on its own is better than chance too (one broken fold would hide in the mean)
    for k, p in enumerate(pred.per_model):
        assert roc_auc_score(y, p) >= 0.7, (k, roc_auc_score(y, p))


@pytest.mark.gpu
def test_shipped_ensemble_on_cuda_matches_cpu(tmp_path: Path) -> None:
    """On a CUDA host the shipped ensemble runs on the CUDA provider (its convolutions, read from
    an ONNX Runtime profile) and gives the CPU's probabilities on real model-space tensors."""
    import onnxruntime as ort

    from recnec_cli.synth.subject import plan_subject
    from recnec_cli.synth.truth import model_tensor

    x = np.stack([model_tensor(plan_subject(seed=FRESH_SEED, index=i))[0] for i in range(4)])
    gpu = Ensemble.load(WEIGHTS, device="cuda")
    assert gpu.provider == "CUDAExecutionProvider"
    cpu = Ensemble.load(WEIGHTS, device="cpu")
    np.testing.assert_allclose(gpu.predict(x).per_model, cpu.predict(x).per_model, atol=1e-4, rtol=0)

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "fold0")
    sess = ort.InferenceSession(str(WEIGHTS / "fold0.onnx"), sess_options=so,
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    sess.run(None, {sess.get_inputs()[0].name: x})
    events = json.loads(Path(sess.end_profiling()).read_text())
    convs = [e["args"]["provider"] for e in events  # Conv, or FusedConv (Conv + Relu)
             if e.get("cat") == "Node" and "Conv" in e.get("args", {}).get("op_name", "")]
    assert len(convs) >= 12 and set(convs) == {"CUDAExecutionProvider"}, convs


@pytest.mark.veryslow
def test_reproduce_shipped_gives_identical_files(tmp_path: Path) -> None:
    """``recnec train --reproduce-shipped`` (~20 min on 2 cores) reproduces weights/ exactly.

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
        # every shipped file again, byte for byte (ONNX, epochs.csv, oof.csv, both plots), and
        # the calibration map and applicability model
        assert res.manifest["files"] == shipped["files"]
        for k in ("calibration", "applicability"):
            assert res.manifest[k] == shipped[k]


def _readme_shipped_section() -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    start = text.index("## The shipped model")
    return text[start:text.index("\n## ", start + 5)]


def test_readme_figures_match_the_shipped_manifest() -> None:
    """Every cross-validated figure, the threshold, the calibration map and the applicability
    threshold the README prints for the shipped weights are the manifest's (3 decimals)."""
    import re

    m = read_manifest(WEIGHTS, verify=False)
    sec = _readme_shipped_section()
    cv = m["metrics"]["cross_validated"]
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        lo, hi = cv["ci95"][k]
        row = re.search(rf"^\| {k.upper() if k == 'auc' else k} \| ([^|]+)\|", sec, re.M)
        assert row, f"no README row for {k}"
        assert row.group(1).strip() == f"{cv[k]:.3f} ({lo:.3f}-{hi:.3f})", (k, row.group(1))
    assert f"Threshold {m['threshold']:.3f}" in sec
    if "calibration" in m:
        cal = m["calibration"]
        assert f"a = {cal['a']:.3f}, b = {cal['b']:.3f}" in sec
        assert f"threshold {cal['threshold']:.3f} on the calibrated scale" in sec
        assert f"out-of-fold ECE {cal['oof_ece_before']:.3f} -> {cal['oof_ece_after']:.3f}" in sec
        if "calibration_cohort_ece_after" in cal:
            assert (f"ECE there {cal['calibration_cohort_ece_before']:.3f} -> "
                    f"{cal['calibration_cohort_ece_after']:.3f}") in sec
    if "applicability" in m:
        assert f"distance above {m['applicability']['threshold']:.2f}" in sec
