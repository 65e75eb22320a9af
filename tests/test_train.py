"""``recnec train --quick`` end to end on a tiny synthetic cohort, then ``recnec evaluate``.

The cohort (16 subjects, 8 recurrence / 8 necrosis, model space) comes from the real
``recnec_cli.synth.write_cohort`` (~20-40 s); one quick ensemble (2 folds x 2 epochs, ~10 s) is
trained per module and shared by its tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("monai")
pytest.importorskip("onnxruntime")

from typer.testing import CliRunner

from recnec_cli.cli.main import app
from recnec_cli.errors import InferenceError, TrainingError
from recnec_cli.stages.infer import Ensemble, sha256_file

runner = CliRunner()

N_TINY = 16


def write_tiny_cohort(out: Path, *, n: int, seed: int) -> Path:
    """A balanced model-space cohort from ``recnec synth`` (``out/tensors/*.npy``, ``out/labels.csv``)."""
    from recnec_cli.synth import write_cohort

    write_cohort(out, n=n, seed=seed, fmt="nifti", space="model", ratio=(1, 1))
    return out


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    return write_tiny_cohort(tmp_path_factory.mktemp("cohort"), n=N_TINY, seed=11)


@pytest.fixture(scope="module")
def quick_weights(cohort: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("w") / "weights"
    res = runner.invoke(app, ["train", str(cohort), "--labels", str(cohort / "labels.csv"),
                              "--out", str(out), "--quick", "--quiet"])
    assert res.exit_code == 0, res.output
    (out.parent / "train_output.txt").write_text(res.output)  # what the console showed
    return out


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_quick_training_writes_verified_ensemble(quick_weights: Path, cohort: Path) -> None:
    m = json.loads((quick_weights / "manifest.json").read_text())
    assert {p.name for p in quick_weights.iterdir()} == {
        "fold0.onnx", "fold1.onnx", "roc.png", "calibration.png", "epochs.csv", "oof.csv", "manifest.json"}
    for name, digest in m["files"].items():
        assert sha256_file(quick_weights / name) == digest
    assert m["input"]["shape"] == [3, 40, 40, 40] and m["input"]["channels"] == ["T1", "T2", "T1ce"]
    assert 0.0 <= m["threshold"] <= 1.0 and m["threshold_selection"]["method"] == "youden"
    cv = m["metrics"]["cross_validated"]
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        assert isinstance(cv[k], float) and len(cv["ci95"][k]) == 2
    assert cv["n"] == N_TINY
    assert m["onnx"]["max_abs_diff_vs_torch"] <= 1e-4
    assert all(mm["onnx_vs_torch_max_abs_diff"] <= 1e-4 for mm in m["models"])
    assert m["training"]["seed"] == 0 and m["training"]["torch_threads"] >= 1
    assert len(m["data"]["fingerprint_sha256"]) == 64 and "RESEARCH USE ONLY" in m["disclaimer"]
    assert m["command"].startswith("recnec train") and "--quick" in m["command"]
    assert {"torch", "monai", "onnxruntime", "numpy"} <= set(m["libraries"])
    assert m["ensemble_mb"] < 40
    # calibration (Platt on the out-of-fold scores) and applicability (training feature distribution)
    cal, app = m["calibration"], m["applicability"]
    assert cal["method"] in ("platt", "identity") and 0.0 < cal["threshold"] < 1.0
    assert len(app["features"]) == 16 and len(app["precision"]) == 16 and app["threshold"] > 0
    oof = (quick_weights / "oof.csv").read_text().splitlines()
    assert oof[0] == "study_id,label,fold,p_raw,p_calibrated,applicability_distance" and len(oof) == 1 + N_TINY
    rows = [line.split(",") for line in oof[1:]]
    assert {r[2] for r in rows} == {"0", "1"}  # every study is out-of-fold in exactly one fold
    # the out-of-fold AUC in the manifest is recomputed from oof.csv's raw scores
    from sklearn.metrics import roc_auc_score

    y = [r[1] == "recurrence" for r in rows]
    assert roc_auc_score(y, [float(r[3]) for r in rows]) == pytest.approx(cv["auc"], abs=1e-5)
    log_lines = (quick_weights / "epochs.csv").read_text().splitlines()
    assert log_lines[0].startswith("fold,epoch,train_loss,val_loss,val_auc") and len(log_lines) == 1 + 2 * 2


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_onnx_matches_pytorch_on_cohort(quick_weights: Path, cohort: Path) -> None:
    """The trained ensemble through the production loader: batched == one by one (ORT vs
    PyTorch is checked at export, recorded per model and asserted in the test above)."""
    ens = Ensemble.load(quick_weights, device="cpu")
    x = np.stack([np.load(p) for p in sorted((cohort / "tensors").glob("*.npy"))[:6]])
    batched = ens.predict(x)
    single = np.stack([ens.predict(x[i]).per_model[:, 0] for i in range(len(x))], axis=1)
    np.testing.assert_allclose(batched.per_model, single, atol=1e-5, rtol=0)
    assert batched.per_model.shape == (2, 6)


def _sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    """The reference figures: scikit-learn's AUC and confusion matrix at ``p >= threshold``."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    pred = (np.asarray(p) >= threshold).astype(int)
    (tn, fp), (fn, tp) = confusion_matrix(y, pred, labels=[0, 1])
    return {"auc": roc_auc_score(y, p), "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
            "accuracy": (tp + tn) / len(y), "matrix": [[int(tn), int(fp)], [int(fn), int(tp)]]}


def _assert_metrics_match(m: dict, ref: dict) -> None:
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        assert m[k] == pytest.approx(ref[k], abs=1e-12), (k, m[k], ref[k])
    assert m["confusion"]["matrix"] == ref["matrix"]


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_training_is_deterministic_and_cv_metrics_match_sklearn(
        quick_weights: Path, cohort: Path, tmp_path: Path) -> None:
    """A second quick training (in process, same profile as ``--quick``) gives the same files and
    metrics, and the manifest's cross-validated figures are scikit-learn's on its out-of-fold
    probabilities at its threshold."""
    from recnec_cli.train.config import make_config
    from recnec_cli.train.run import train_ensemble

    res = train_ensemble(cohort, labels=cohort / "labels.csv", out=tmp_path / "again",
                         config=make_config("quick"))
    a = json.loads((quick_weights / "manifest.json").read_text())
    b = json.loads((tmp_path / "again" / "manifest.json").read_text())
    assert a["metrics"] == b["metrics"] and a["threshold"] == b["threshold"]
    assert a["files"] == b["files"]  # byte-identical ONNX files, epoch log and ROC plot
    oof = res.cv.oof
    assert oof.shape == (N_TINY,) and np.isfinite(oof).all()
    cv = b["metrics"]["cross_validated"]
    _assert_metrics_match(cv, _sklearn_metrics(res.cohort.y, oof, b["threshold"]))
    sel = b["threshold_selection"]
    assert (sel["oof_sensitivity"], sel["oof_specificity"]) == (cv["sensitivity"], cv["specificity"])


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_calibration_cohort_fits_the_map_on_the_ensemble(cohort: Path, tmp_path: Path) -> None:
    """--calibration-data: the Platt map is fitted on the ensemble's scores on another cohort (the
    manifest says which); the training cohort itself is refused as calibration cohort; the
    labels option alone is a usage error."""
    cal = write_tiny_cohort(tmp_path / "cal", n=N_TINY, seed=12)
    out = tmp_path / "w"
    res = runner.invoke(app, ["train", str(cohort), "--out", str(out), "--quick", "--quiet",
                              "--calibration-data", str(cal)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert "calibration cohort never used for training" in m["calibration"]["fitted_on"]
    assert "calibration_cohort_ece_after" in m["calibration"] and "--calibration-data" in m["command"]
    from recnec_cli.stages.infer import Ensemble as _E
    from recnec_cli.train.metrics import calibration_bins

    ens = _E.load(out, device="cpu", threads=1)
    x = np.stack([np.load(cal / "tensors" / f"{sid}.npy") for sid in sorted(
        line.split(",")[0] for line in (cal / "labels.csv").read_text().splitlines()[1:])])
    y = np.array([line.split(",")[1] == "recurrence" for line in sorted(
        (cal / "labels.csv").read_text().splitlines()[1:])], dtype=int)
    pred = ens.predict(x)
    assert calibration_bins(y, pred.probability)["ece"] == pytest.approx(
        m["calibration"]["calibration_cohort_ece_after"], abs=1e-4)
    res = runner.invoke(app, ["train", str(cohort), "--out", str(tmp_path / "w2"), "--quick", "--quiet",
                              "--calibration-data", str(cohort)])
    assert res.exit_code == 2 and "calibration cohort is the training cohort" in res.output
    res = runner.invoke(app, ["train", str(cohort), "--out", str(tmp_path / "w3"), "--quick", "--quiet",
                              "--calibration-labels", str(cal / "labels.csv")])
    assert res.exit_code == 2 and "--calibration-labels needs --calibration-data" in res.output


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_evaluate_writes_metrics(quick_weights: Path, cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "metrics.json"
    res = runner.invoke(app, ["evaluate", str(cohort), "--labels", str(cohort / "labels.csv"),
                              "--weights", str(quick_weights), "--out", str(out), "--n-boot", "200"])
    assert res.exit_code == 0, res.output
    m = json.loads(out.read_text())
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        assert isinstance(m[k], float) and 0.0 <= m[k] <= 1.0
        assert len(m["ci95"][k]) == 2
    assert sum(m["confusion"]["matrix"][0] + m["confusion"]["matrix"][1]) == N_TINY
    assert m["data"]["same_as_training_data"] is True
    assert len(m["predictions"]) == N_TINY
    # the figures are scikit-learn's on the file's own predictions at the manifest threshold
    # (calibrated probabilities and the threshold mapped with them; labels from the raw mean at the
    # manifest's raw threshold are the same)
    manifest = json.loads((quick_weights / "manifest.json").read_text())
    threshold = manifest["calibration"]["threshold"]
    assert m["threshold"] == pytest.approx(threshold, abs=1e-12)
    y = np.array([r["label"] == "recurrence" for r in m["predictions"]], dtype=int)
    p = np.array([r["probability"] for r in m["predictions"]])
    raw = np.array([r["probability_raw"] for r in m["predictions"]])
    assert [r["predicted"] for r in m["predictions"]] == [
        "recurrence" if v >= manifest["threshold"] else "necrosis" for v in raw]
    assert np.array_equal(p >= threshold, raw >= manifest["threshold"])
    assert m["applicability"]["available"] is True
    assert m["applicability"]["n_out_of_distribution"] == sum(r["out_of_distribution"] for r in m["predictions"])
    _assert_metrics_match(m, _sklearn_metrics(y, p, threshold))
    assert (tmp_path / "metrics.roc.png").is_file()
    cal = m["calibration"]  # the reliability diagram's bins hold every study once
    assert sum(b["n"] for b in cal["bins"]) == N_TINY and m["calibration_png"].endswith("metrics.calibration.png")
    assert cal["brier"] == pytest.approx(float(np.mean((p - y) ** 2)), abs=1e-5)


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_tampered_weights_refused(quick_weights: Path, cohort: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quick_weights, bad)
    data = bytearray((bad / "fold1.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "fold1.onnx").write_bytes(bytes(data))
    with pytest.raises(InferenceError) as ei:
        Ensemble.load(bad)
    assert ei.value.code == "WEIGHTS_CHECKSUM_MISMATCH"
    res = runner.invoke(app, ["evaluate", str(cohort), "--weights", str(bad), "--out",
                              str(tmp_path / "m.json")])
    assert res.exit_code == 2 and "WEIGHTS_CHECKSUM_MISMATCH" in res.output
    assert not (tmp_path / "m.json").exists()


def test_out_folder_with_foreign_files_refused(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "notweights"
    out.mkdir()
    (out / "thesis.docx").write_text("precious")
    res = runner.invoke(app, ["train", str(cohort), "--out", str(out), "--quick", "--quiet"])
    assert res.exit_code == 2 and "OUT_NOT_EMPTY" in res.output
    assert (out / "thesis.docx").read_text() == "precious"


def test_diverged_training_exports_nothing_and_keeps_the_previous_ensemble(
        quick_weights: Path, cohort: Path, tmp_path: Path) -> None:
    """At --lr 1 the logits blow up and each fold's kept model gives every held-out study one
    probability: the run must fail with TRAINING_DIVERGED, not export an AUC-0.5 ensemble over
    the previous one."""
    import shutil

    out = tmp_path / "weights"
    shutil.copytree(quick_weights, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    res = runner.invoke(app, ["train", str(cohort), "--out", str(out), "--quick", "--lr", "1", "--quiet"])
    assert res.exit_code != 0 and "TRAINING_DIVERGED" in res.output and "lower --lr" in res.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_non_finite_loss_is_divergence() -> None:
    from recnec_cli.train.loop import _check_not_collapsed, _check_not_diverged

    _check_not_diverged(0, 3, 0.7, np.array([0.1, -0.2]), 3e-4)  # finite: no error
    for loss, logits in [(float("nan"), np.array([0.1, 0.2])), (0.7, np.array([0.1, np.inf]))]:
        with pytest.raises(TrainingError) as ei:
            _check_not_diverged(0, 3, loss, logits, 3e-4)
        assert ei.value.code == "TRAINING_DIVERGED" and "epoch 3" in ei.value.message
    _check_not_collapsed(0, 3, np.array([0.30, 0.31]), 3e-4)
    with pytest.raises(TrainingError) as ei:
        _check_not_collapsed(0, 3, np.array([1.0, 1.0, 1.0]), 3e-4)
    assert ei.value.code == "TRAINING_DIVERGED"


def test_bad_out_and_too_few_cases_are_refused_before_any_preprocessing(cohort: Path, tmp_path: Path,
                                                                        monkeypatch) -> None:
    """A mistyped --out or hopeless labels must not cost the preprocessing of every study (an hour
    for 60 study folders): both are refused before the cohort is loaded."""
    import recnec_cli.train.run as run_mod

    def no_load(*a, **k):
        raise AssertionError("load_cohort was called before the cheap checks")

    monkeypatch.setattr(run_mod, "load_cohort", no_load)
    foreign = tmp_path / "notweights"
    foreign.mkdir()
    (foreign / "thesis.docx").write_text("precious")
    res = runner.invoke(app, ["train", str(cohort), "--out", str(foreign), "--quick", "--quiet"])
    assert res.exit_code == 2 and "OUT_NOT_EMPTY" in res.output, res.output
    few = tmp_path / "few.csv"
    few.write_text("study_id,label\n" + "".join(f"s{i},recurrence\n" for i in range(6)) + "n0,necrosis\n")
    res = runner.invoke(app, ["train", str(cohort), "--labels", str(few), "--out", str(tmp_path / "w"),
                              "--quick", "--quiet"])
    assert res.exit_code == 2 and "TOO_FEW_CASES" in res.output, res.output


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_unreliable_cis_are_warned_about_even_with_quiet(quick_weights: Path) -> None:
    """8 necroses (< 10): the manifest marks the CIs unreliable and the console says so, as
    ``recnec evaluate`` does."""
    warnings = json.loads((quick_weights / "manifest.json").read_text())["metrics"]["cross_validated"]["warnings"]
    assert warnings and any("fewer" in w or "only" in w for w in warnings)
    shown = (quick_weights.parent / "train_output.txt").read_text()
    assert all(f"warning: {w}" in shown for w in warnings), shown


@pytest.mark.slow  # trains an ensemble (the quick profile)
def test_json_outputs_are_strict_json(quick_weights: Path) -> None:
    """NaN (e.g. NPV with no predicted necrosis, the AUC of a one-class split) is written as null:
    strict readers (JavaScript, jq --strict) refuse Python's NaN."""
    from recnec_cli.train.metrics import to_json

    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    assert json.loads(to_json({"npv": float("nan"), "x": [1.5, float("inf")], "k": {"a": -float("inf")}}),
                      parse_constant=refuse) == {"npv": None, "x": [1.5, None], "k": {"a": None}}
    json.loads((quick_weights / "manifest.json").read_text(), parse_constant=refuse)


def test_too_few_cases(tmp_path: Path) -> None:
    from recnec_cli.train.loop import check_cohort_size

    with pytest.raises(TrainingError) as ei:
        check_cohort_size(np.array([1] * 20 + [0] * 3), folds=2)
    assert ei.value.code == "TOO_FEW_CASES"


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "vgg16",
                                  pytest.param("densenet121", marks=pytest.mark.slow)])
def test_architectures_shape_and_export(arch: str, tmp_path: Path) -> None:
    import torch

    from recnec_cli.train.export import compare_with_torch, export_onnx
    from recnec_cli.train.models import ProbabilityHead, build_model

    torch.manual_seed(0)
    head = ProbabilityHead(build_model(arch, width=4)).eval()
    x = np.random.default_rng(0).normal(size=(3, 3, 40, 40, 40)).astype(np.float32)
    with torch.no_grad():
        assert head(torch.from_numpy(x)).shape == (3,)
    export_onnx(head, tmp_path / "m.onnx", shape=(3, 40, 40, 40))
    assert compare_with_torch(head, tmp_path / "m.onnx", x) <= 1e-4


def test_manifest_augmentation_text_is_the_recipe_applied() -> None:
    """The manifest's augmentation text is written from the values the augmenter applies: for the
    default profile it is the shipped manifest's text, and it follows a changed recipe."""
    import dataclasses

    from recnec_cli.train import loop
    from recnec_cli.train.config import make_config

    cfg = make_config("default")
    shipped = json.loads((Path(__file__).resolve().parents[1] / "weights" / "manifest.json").read_text())
    assert loop.describe_augmentation(cfg) == shipped["training"]["augmentation"]
    assert loop.describe_augmentation(dataclasses.replace(cfg, augment=False)) == "none"
    assert "simulated acquisition" not in loop.describe_augmentation(dataclasses.replace(cfg, acquisition=False))
    assert f"p={loop.AFFINE_P:g}," in loop.describe_augmentation(cfg)


def test_train_help_lists_options() -> None:
    """(That --help imports no torch is checked in test_cli_basics.)"""
    res = runner.invoke(app, ["train", "--help"])
    assert res.exit_code == 0
    for opt in ("--labels", "--out", "--arch", "--quick", "--target-sensitivity", "--reproduce-shipped",
                "--cache", "--seed"):
        assert opt in res.output
