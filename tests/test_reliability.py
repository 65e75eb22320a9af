"""Calibration map and applicability model: fitted by ``recnec train``, applied by ``recnec scan``.

Unit tests on known distributions, then the shipped weights on fresh synthetic tensors (in memory,
the same generator as ``recnec synth --space model``) and on tensors that are not like them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.errors import EnvironmentBroken
from recnec_cli.stages.applicability import FEATURE_NAMES, OOD_FLAG, Applicability, input_features
from recnec_cli.stages.calibration import Calibration, logit
from recnec_cli.train.metrics import calibration_bins
from recnec_cli.train.reliability import fit_applicability, fit_platt

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"


def test_platt_fit_recovers_a_known_miscalibration() -> None:
    """Scores whose true probability is sigmoid(2 logit(p) - 1): the fit finds a ~ 2, b ~ -1,
    lowers the ECE, keeps the order (labels at the mapped threshold are unchanged)."""
    rng = np.random.default_rng(3)
    p = rng.uniform(0.02, 0.98, 20000)
    truth = 1 / (1 + np.exp(-(2 * logit(p) - 1)))
    y = (rng.uniform(size=p.size) < truth).astype(int)
    cal, entry = fit_platt(y, p, threshold=0.4)
    assert cal.method == "platt"
    assert cal.a == pytest.approx(2.0, abs=0.1) and cal.b == pytest.approx(-1.0, abs=0.1)
    assert entry["oof_ece_after"] < 0.02 < entry["oof_ece_before"]
    q = cal(p)
    assert np.all(np.diff(q[np.argsort(p)]) >= 0)
    assert np.array_equal(p >= 0.4, q >= entry["threshold"])
    assert calibration_bins(y, q)["ece"] == pytest.approx(entry["oof_ece_after"])


def test_platt_of_a_useless_model_is_the_identity() -> None:
    """A score that ranks the classes backwards would need a decreasing map: left out."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    p = np.where(y == 1, rng.uniform(0.0, 0.5, 400), rng.uniform(0.5, 1.0, 400))
    cal, entry = fit_platt(y, p, threshold=0.5)
    assert cal.method == "identity" and entry["method"] == "identity"
    np.testing.assert_array_equal(cal(p), p)


@pytest.mark.parametrize("entry", [{"method": "platt", "a": -1.0, "b": 0.0}, {"method": "isotonic"},
                                   {"method": "platt", "a": "x"}, {"method": "platt", "a": float("nan")}])
def test_bad_calibration_entry_is_refused(entry: dict) -> None:
    with pytest.raises(EnvironmentBroken) as err:
        Calibration.from_manifest({"calibration": entry})
    assert err.value.code == "WEIGHTS_MANIFEST_INVALID"


def test_manifest_without_calibration_or_applicability_means_identity_and_no_flag() -> None:
    assert Calibration.from_manifest({}).method == "identity"
    assert Applicability.from_manifest({}) is None


def _box(rng: np.random.Generator, *, lesion: float = 3.0) -> np.ndarray:
    """A model-input-like tensor (3, 40, 40, 40): a brain ball of correlated z-scores, 0 outside,
    with a bright T1ce centre."""
    g = np.indices((40, 40, 40)) - 19.5
    r = np.sqrt((g ** 2).sum(0))
    brain = r < 18 + rng.normal(0, 0.5)
    base = rng.normal(0, 1, (40, 40, 40))
    x = np.stack([base + rng.normal(0, 0.6, base.shape), -base + rng.normal(0, 0.6, base.shape),
                  base + rng.normal(0, 0.6, base.shape)]).astype(np.float32)
    x[2][r < 5] += lesion + rng.normal(0, 0.3)
    x = np.clip(x, -5, 5)
    x[:, ~brain] = 0
    return x


def test_features_measure_what_their_names_say() -> None:
    x = _box(np.random.default_rng(1))
    f = dict(zip(FEATURE_NAMES, input_features(x)[0]))
    assert len(FEATURE_NAMES) == 16
    brain = np.any(x != 0, axis=0)
    assert f["brain_fraction"] == pytest.approx(brain.mean())
    assert f["corr_T1_T2"] < -0.4 < 0.4 < f["corr_T1_T1ce"]  # built anti- and positively correlated
    assert f["T1ce_centre_mean"] > 2.0 > abs(f["T1_centre_mean"])
    assert f["T1ce_p05"] < 0 < f["T1ce_p95"]
    empty = input_features(np.zeros((3, 40, 40, 40), np.float32))[0]
    assert np.all(empty == 0)


def test_applicability_flags_swapped_and_lesion_free_boxes_not_its_own_kind() -> None:
    rng = np.random.default_rng(2)
    train = np.stack([_box(rng) for _ in range(60)])
    folds = [(np.arange(60)[np.arange(60) % 5 != k], np.arange(60)[np.arange(60) % 5 == k]) for k in range(5)]
    model, entry, cv = fit_applicability(train, folds, spacing_mm=1.5, clip=5.0)
    assert cv.shape == (60,) and entry["cv_flag_rate"] <= 0.02
    again = Applicability.from_manifest({"applicability": entry, "input": {"spacing_mm": 1.5, "clip": 5.0}})
    fresh = np.stack([_box(rng) for _ in range(20)])
    assert np.mean(again.distance(fresh) > again.threshold) <= 0.1
    swapped = fresh.copy()
    swapped[:, [0, 1]] = swapped[:, [1, 0]]  # T1 and T2 exchanged
    assert np.all(again.distance(swapped) > again.threshold)
    no_lesion = np.stack([_box(rng, lesion=0.0) for _ in range(5)])
    assert np.all(again.distance(no_lesion) > again.threshold)


def test_bad_applicability_entry_is_refused() -> None:
    entry = {"features": list(FEATURE_NAMES)[:-1], "mean": [0.0] * 15, "precision": np.eye(15).tolist(),
             "threshold": 3.0}
    with pytest.raises(EnvironmentBroken) as err:
        Applicability.from_manifest({"applicability": entry})
    assert err.value.code == "WEIGHTS_MANIFEST_INVALID"
    entry = {"features": list(FEATURE_NAMES), "mean": [0.0] * 16, "precision": np.eye(16).tolist(),
             "threshold": 0.0}
    with pytest.raises(EnvironmentBroken):
        Applicability.from_manifest({"applicability": entry})


shipped = pytest.mark.skipif(
    not (WEIGHTS / "manifest.json").is_file()
    or "applicability" not in json.loads((WEIGHTS / "manifest.json").read_text()),
    reason="no shipped weights with calibration and applicability in this checkout")


@pytest.mark.slow  # renders a synthetic cohort (~25 s)
@shipped
def test_shipped_weights_calibrate_and_know_their_inputs() -> None:
    """Shipped ensemble on fresh synthetic tensors (seed 7, never trained on): the reported
    probability is the Platt map of the raw mean, labels agree on both scales, at most 5 % are
    flagged; the same tensors with T2 and T1ce exchanged are all flagged, and still get a
    probability."""
    pytest.importorskip("onnxruntime")
    from recnec_cli.stages.infer import Ensemble
    from recnec_cli.synth.subject import cohort_label, plan_subject
    from recnec_cli.synth.truth import model_tensor

    x = np.stack([model_tensor(plan_subject(seed=7, index=i, label=cohort_label(seed=7, index=i)))[0]
                  for i in range(20)])
    ens = Ensemble.load(WEIGHTS, device="cpu", threads=1)
    assert ens.calibration.method == "platt" and ens.applicability is not None
    pred = ens.predict(x)
    np.testing.assert_allclose(pred.probability, ens.calibration(pred.mean))
    assert np.array_equal(pred.mean >= ens.threshold, pred.probability >= ens.report_threshold)
    assert np.mean(pred.out_of_distribution) <= 0.05, pred.distance
    swapped = x.copy()
    swapped[:, [1, 2]] = swapped[:, [2, 1]]
    bad = ens.predict(swapped)
    assert bad.out_of_distribution.all(), bad.distance
    assert np.isfinite(bad.probability).all()
    # probabilities only (the occlusion map's passes): same probabilities, no distance, no flag
    quick = ens.predict(swapped, applicability=False)
    np.testing.assert_array_equal(quick.probability, bad.probability)
    assert np.isnan(quick.distance).all() and not quick.out_of_distribution.any()


def test_report_row_says_applicability_and_flags_it() -> None:
    """The report row of an out-of-distribution study says so in ``applicability`` and ``flags``
    and keeps its probability; an in-distribution one says ``in_distribution``."""
    from recnec_cli.orchestration.pipeline import Preprocessed, StudyResult
    from recnec_cli.orchestration.report import result_row
    from recnec_cli.study import Study

    study = Study(study_id="1.2.3", patient_pseudonym="abcd", source="nifti", location="x", series=())
    pre = Preprocessed(study=study, assignment=None, model_input=np.zeros((3, 40, 40, 40), np.float32),
                       lesion_source="segmenter", lesion_centroid_ras_mm=(0.0, 0.0, 0.0), lesion_volume_ml=1.0,
                       brain_volume_ml=1200.0, registration={}, flags=("T2:ANISOTROPIC",), timings={})
    r = StudyResult(study=study, preprocessed=pre, probability=0.7, probability_raw=0.4, spread=0.1,
                    label="recurrence", applicability_distance=42.0, out_of_distribution=True)
    row = result_row(r, threshold=0.6, model_version="v")
    assert row["applicability"] == OOD_FLAG and row["applicability_distance"] == 42.0
    assert row["flags"] == f"T2:ANISOTROPIC {OOD_FLAG}" and row["p_recurrence"] == 0.7
    assert row["p_recurrence_raw"] == 0.4
    r.out_of_distribution, r.applicability_distance = False, 3.0
    row = result_row(r, threshold=0.6, model_version="v")
    assert row["applicability"] == "in_distribution" and OOD_FLAG not in row["flags"]
    r.applicability_distance = float("nan")
    assert result_row(r, threshold=0.6, model_version="v")["applicability"] == "unknown"
