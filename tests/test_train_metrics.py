"""Metrics, threshold selection, labels parsing and cohort loading (no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.errors import TrainingError
from recnec_cli.stages.modelinput import InputSpec
from recnec_cli.train.dataset import load_cohort, read_labels
from recnec_cli.train.metrics import (
    Confusion,
    auc_score,
    bootstrap_ci,
    calibration_bins,
    choose_threshold,
    plot_calibration,
    plot_roc,
    summarise,
)


def test_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    assert auc_score(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert np.isnan(auc_score(np.ones(5), np.arange(5.0)))


@pytest.mark.parametrize("threshold", [0.5, 0.3, 0.73])
def test_summary_matches_sklearn_at_threshold(threshold: float) -> None:
    """AUC, confusion matrix, sensitivity, specificity, accuracy, PPV and NPV equal scikit-learn's
    on the same scores, with scores lying exactly on the threshold called recurrence."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    rng = np.random.default_rng(4)
    y = (rng.random(97) < 0.7).astype(int)
    p = np.round(np.clip(0.35 * y + rng.normal(0.35, 0.2, 97), 0, 1), 2)
    p[:6] = threshold  # on the cut: p >= threshold means recurrence
    (tn, fp), (fn, tp) = confusion_matrix(y, (p >= threshold).astype(int), labels=[0, 1])
    assert fp + tp > 0 and fn + tn > 0 and min(tn, fp, fn, tp) > 0
    m = summarise(y, p, threshold, n_boot=200)
    assert m["confusion"]["matrix"] == [[tn, fp], [fn, tp]]
    assert (m["confusion"]["tp"], m["confusion"]["fn"], m["confusion"]["tn"], m["confusion"]["fp"]) == (
        tp, fn, tn, fp)
    expected = {"auc": roc_auc_score(y, p), "sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "accuracy": (tp + tn) / len(y), "ppv": tp / (tp + fp), "npv": tn / (tn + fn)}
    for k, v in expected.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert (m["n"], m["n_recurrence"], m["n_necrosis"]) == (97, y.sum(), 97 - y.sum())


def test_youden_threshold_separates_perfectly() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8, 0.9])
    c = choose_threshold(y, p)
    assert c.method == "youden" and 0.3 < c.value < 0.6 and c.value == pytest.approx(0.45)
    assert c.sensitivity == 1.0 and c.specificity == 1.0
    m = summarise(y, p, c.value, n_boot=200)
    assert m["sensitivity"] == m["specificity"] == m["accuracy"] == m["auc"] == 1.0
    assert m["confusion"]["matrix"] == [[3, 0], [0, 4]]


def test_target_sensitivity_threshold() -> None:
    y = np.array([0, 1, 0, 1, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])
    c = choose_threshold(y, p, target_sensitivity=1.0)
    assert c.sensitivity == 1.0 and c.value < 0.2
    c80 = choose_threshold(y, p, target_sensitivity=0.8)
    assert c80.sensitivity >= 0.8 and c80.value > c.value
    with pytest.raises(TrainingError):
        choose_threshold(y, p, target_sensitivity=1.5)
    with pytest.raises(TrainingError):
        choose_threshold(np.ones(4), np.arange(4.0))


def test_bootstrap_seeded_and_brackets_estimate() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random(150) < 0.8).astype(int)
    p = np.clip(0.5 * y + rng.normal(0.3, 0.25, 150), 0, 1)
    a = bootstrap_ci(y, p, 0.5, n_boot=500, seed=7)
    b = bootstrap_ci(y, p, 0.5, n_boot=500, seed=7)
    assert a == b
    full = summarise(y, p, 0.5, n_boot=500, seed=7)
    for k in ("auc", "sensitivity", "specificity", "accuracy"):
        lo, hi = a[k]
        assert lo <= full[k] <= hi and hi - lo < 0.5
    c = Confusion.at(y, p, 0.5)
    assert c.tp + c.fn == y.sum() and c.tn + c.fp == len(y) - y.sum()


@pytest.mark.parametrize("n_nec", [1, 8])
def test_small_class_ci_flagged_unreliable(n_nec: int) -> None:
    """`recnec evaluate` on 1 or 8 necroses, all recognised: the bootstrap gives specificity
    1.000 (1.000-1.000); the summary now says that interval cannot be trusted."""
    rng = np.random.default_rng(3)
    y = np.array([0] * n_nec + [1] * 40)
    p = np.concatenate([rng.uniform(0.0, 0.3, n_nec), rng.uniform(0.2, 1.0, 40)])
    m = summarise(y, p, 0.4, n_boot=500, seed=0)
    assert m["specificity"] == 1.0 and m["ci95"]["specificity"] == [1.0, 1.0]  # numbers unchanged
    assert "zero-width interval (1.000-1.000)" in m["ci95_unreliable"]["specificity"]
    assert f"only {n_nec} necrosis case(s) (< 10)" in m["ci95_unreliable"]["specificity"]
    assert "sensitivity" not in m["ci95_unreliable"] and "auc" in m["ci95_unreliable"]
    assert any(w.startswith("specificity 95 % CI unreliable") for w in m["warnings"])
    assert any(w.startswith(f"only {n_nec} necrosis case(s)") for w in m["warnings"])
    json.dumps(m)  # still JSON-ready


def test_large_balanced_sample_has_no_ci_warnings() -> None:
    rng = np.random.default_rng(1)
    y = np.array([0, 1] * 60)
    p = np.clip(0.4 * y + rng.normal(0.3, 0.2, 120), 0, 1)
    m = summarise(y, p, 0.5, n_boot=500, seed=0)
    assert m["warnings"] == [] and m["ci95_unreliable"] == {}


def _roc_picture(path: Path):
    """Read a :func:`plot_roc` PNG: ``(rgb (H, W, 3) int, to_pixel(fpr, tpr) -> (row, col))``.

    The axes frame is found as the longest dark rows / columns (the spines); ``plot_roc`` sets
    both axis limits to -0.01..1.01, which maps data coordinates onto pixels inside the frame.
    """
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    dark = rgb.sum(-1) < 150
    rows = np.flatnonzero(dark.sum(1) > 0.5 * dark.shape[1])
    cols = np.flatnonzero(dark.sum(0) > 0.5 * dark.shape[0])
    assert len(rows) >= 2 and len(cols) >= 2, "no axes frame in the picture"
    top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()

    def to_pixel(x: float, y: float) -> tuple[int, int]:
        return (round(bottom - (y + 0.01) / 1.02 * (bottom - top)),
                round(left + (x + 0.01) / 1.02 * (right - left)))

    return rgb, to_pixel


def _has_colour(rgb: np.ndarray, at: tuple[int, int], colour: str, *, radius: int = 4) -> bool:
    from matplotlib.colors import to_rgb

    r, c = at
    want = np.array(to_rgb(colour)) * 255
    win = rgb[max(r - radius, 0):r + radius + 1, max(c - radius, 0):c + radius + 1]
    return bool((np.abs(win - want).sum(-1) < 60).any())


def test_roc_png(tmp_path: Path) -> None:
    """The picture shows the curve where it should be: a perfect classifier's ROC runs up the
    left edge and along the top, an inverted one's along the bottom and up the right edge; the
    operating point of the perfect one sits in the top-left corner."""
    y = np.array([0] * 10 + [1] * 10)
    low, high = np.linspace(0.05, 0.4, 10), np.linspace(0.6, 0.95, 10)
    plot_roc(y, np.r_[low, high], tmp_path / "perfect.png", threshold=0.5, title="t")
    plot_roc(y, np.r_[high, low], tmp_path / "inverted.png", threshold=0.5, title="t")
    assert (tmp_path / "perfect.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    good, px = _roc_picture(tmp_path / "perfect.png")
    bad, px_bad = _roc_picture(tmp_path / "inverted.png")
    assert good.shape == bad.shape == (500, 500, 3)  # 5 x 5 inches at 100 dpi
    curve, point = "C0", "C3"
    assert _has_colour(good, px(0.0, 0.5), curve) and _has_colour(good, px(0.5, 1.0), curve)
    assert not _has_colour(good, px(1.0, 0.5), curve)
    assert _has_colour(good, px(0.0, 1.0), point)  # sensitivity 1, specificity 1
    assert _has_colour(bad, px_bad(1.0, 0.5), curve)
    assert not _has_colour(bad, px_bad(0.0, 0.5), curve) and not _has_colour(bad, px_bad(0.5, 1.0), curve)
    assert not _has_colour(bad, px_bad(0.0, 1.0), point)


def test_calibration_png(tmp_path: Path) -> None:
    """The reliability diagram puts each bin where its scores and outcomes say: a calibrated
    model's points (p 0.15 with 3/20 recurrences, p 0.85 with 17/20) lie on the diagonal, an
    overconfident-wrong one's (p 0.15 with 17/20, p 0.85 with 3/20) in the opposite corners."""
    p = np.r_[np.full(20, 0.15), np.full(20, 0.85)]
    good_y = np.r_[np.ones(3), np.zeros(17), np.ones(17), np.zeros(3)].astype(int)
    bad_y = 1 - good_y
    good = plot_calibration(good_y, p, tmp_path / "good.png", title="t")
    bad = plot_calibration(bad_y, p, tmp_path / "bad.png", title="t")
    assert [(b["n"], round(b["fraction_recurrence"], 3)) for b in good["bins"]] == [(20, 0.15), (20, 0.85)]
    assert good["ece"] == pytest.approx(0.0, abs=1e-9) and bad["ece"] == pytest.approx(0.7)
    assert good["brier"] == pytest.approx(float(np.mean((p - good_y) ** 2)))
    assert good["brier"] < bad["brier"] and calibration_bins(good_y, p) == good
    g, px = _roc_picture(tmp_path / "good.png")  # same frame as the ROC plot (axes -0.01 ... 1.01)
    b, px_b = _roc_picture(tmp_path / "bad.png")
    assert g.shape == b.shape == (500, 500, 3)
    points = "C0"
    assert _has_colour(g, px(0.15, 0.15), points) and _has_colour(g, px(0.85, 0.85), points)
    assert not _has_colour(g, px(0.15, 0.85), points) and not _has_colour(g, px(0.85, 0.15), points)
    assert _has_colour(b, px_b(0.15, 0.85), points) and _has_colour(b, px_b(0.85, 0.15), points)
    assert not _has_colour(b, px_b(0.15, 0.15), points)
    plot_calibration(good_y, p, tmp_path / "again.png", title="t")
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "good.png").read_bytes()  # deterministic


def test_read_labels(tmp_path: Path) -> None:
    p = tmp_path / "labels.csv"
    p.write_text("study_id,label,extra\na,recurrence,x\nb,Necrosis,y\nc,1,z\n")
    assert read_labels(p) == {"a": 1, "b": 0, "c": 1}
    for bad in ("study_id,label\na,maybe\n", "id,label\na,1\n", "study_id,label\na,1\na,0\n",
                "study_id,label\n"):
        p.write_text(bad)
        with pytest.raises(TrainingError) as ei:
            read_labels(p)
        assert ei.value.code == "BAD_LABELS"


def _model_space(root: Path, ids: list[str], labels: list[str]) -> None:
    (root / "tensors").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for sid in ids:
        np.save(root / "tensors" / f"{sid}.npy", rng.normal(size=(3, 40, 40, 40)).astype(np.float32))
    (root / "labels.csv").write_text("study_id,label\n" + "".join(f"{s},{lab}\n" for s, lab in zip(ids, labels)))


def test_load_model_space(tmp_path: Path) -> None:
    _model_space(tmp_path, ["b", "a", "c"], ["necrosis", "recurrence", "recurrence"])
    np.save(tmp_path / "tensors" / "unlabelled.npy", np.zeros((3, 40, 40, 40), np.float32))
    c = load_cohort(tmp_path, labels=tmp_path / "labels.csv")
    assert c.study_ids == ("a", "b", "c") and c.y.tolist() == [1, 0, 1]
    assert c.x.shape == (3, 3, 40, 40, 40) and c.x.dtype == np.float32 and c.source == "model-space"
    assert c.fingerprint == load_cohort(tmp_path, labels=tmp_path / "labels.csv").fingerprint
    np.save(tmp_path / "tensors" / "a.npy", np.zeros((3, 32, 32, 32), np.float32))
    with pytest.raises(TrainingError) as ei:
        load_cohort(tmp_path, labels=tmp_path / "labels.csv")
    assert ei.value.code == "BAD_TENSOR"
    (tmp_path / "tensors" / "a.npy").unlink()
    with pytest.raises(TrainingError) as ei:
        load_cohort(tmp_path, labels=tmp_path / "labels.csv")
    assert ei.value.code == "MISSING_TENSORS"


def _nifti(path: Path, data: np.ndarray) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


def _nifti_study(root: Path, sid: str, *, seed: int) -> Path:
    """A BIDS-named NIfTI study folder with three tiny 8^3 volumes (discovery reads headers only)."""
    rng = np.random.default_rng(seed)
    for suffix in ("T1w", "T2w", "ce-gadolinium_T1w"):
        _nifti(root / sid / f"{sid}_{suffix}.nii.gz", rng.random((8, 8, 8)).astype(np.float32))
    return root / sid


def test_cache_key_does_not_depend_on_how_the_folder_is_spelled(tmp_path: Path, monkeypatch) -> None:
    """``recnec train cohort/`` and ``recnec evaluate /abs/cohort`` hit the same cached tensors."""
    from recnec_cli.config import Settings
    from recnec_cli.train.dataset import cache_key

    (tmp_path / "c").mkdir()
    img = tmp_path / "c" / "a.nii"
    _nifti(img, np.zeros((8, 8, 8), np.float32))
    monkeypatch.chdir(tmp_path)
    spec = InputSpec()
    key = cache_key("s", spec, Settings(lesion_masks_dir=Path("masks")), inputs=[Path("c/a.nii")])
    assert cache_key("s", spec, Settings(lesion_masks_dir=tmp_path / "masks"), inputs=[img]) == key
    assert cache_key("s", spec, Settings(lesion_masks_dir=Path("./masks")), inputs=[Path("./c/a.nii")]) == key
    assert cache_key("s", spec, Settings(lesion_masks_dir=Path("other")), inputs=[img]) != key


def test_cache_key_follows_input_files(tmp_path: Path) -> None:
    """The cache key changes when an input image or the lesion mask is rewritten with other
    voxels (even with the same size and mtime), and only then."""
    import os

    from recnec_cli.config import Settings
    from recnec_cli.stages.discover import discover
    from recnec_cli.train.dataset import cache_key, study_inputs

    spec, settings = InputSpec(), Settings()
    small = tmp_path / "a.nii"  # 8^3 float32, uncompressed: hashed by content
    big = tmp_path / "b.nii"  # 64^3 float32 = 1 MiB: size and mtime_ns only
    _nifti(small, np.zeros((8, 8, 8), np.float32))
    _nifti(big, np.zeros((64, 64, 64), np.float32))
    key = cache_key("s", spec, settings, inputs=[small, big])
    assert cache_key("s", spec, settings, inputs=[small, big]) == key  # unchanged files: same key
    assert cache_key("t", spec, settings, inputs=[small, big]) != key

    st = small.stat()
    _nifti(small, np.ones((8, 8, 8), np.float32))  # other voxels, same size ...
    os.utime(small, ns=(st.st_atime_ns, st.st_mtime_ns))  # ... and the old mtime (cp -p, rsync -t)
    assert small.stat().st_size == st.st_size
    key_small = cache_key("s", spec, settings, inputs=[small, big])
    assert key_small != key

    size = big.stat().st_size
    _nifti(big, np.ones((64, 64, 64), np.float32))
    assert big.stat().st_size == size
    key_big = cache_key("s", spec, settings, inputs=[small, big])
    assert key_big not in (key, key_small)
    assert cache_key("s", spec, settings, inputs=[small, big]) == key_big

    # through a discovered study: the series files and the study's lesion mask count
    _nifti_study(tmp_path / "data", "sub-01", seed=0)
    mask = tmp_path / "data" / "sub-01" / "lesion_mask.nii.gz"
    _nifti(mask, np.zeros((8, 8, 8), np.uint8))

    def study_key() -> str:
        (study,) = discover(tmp_path / "data", settings=settings)
        inputs = study_inputs(study, settings)
        assert mask in inputs and len(inputs) == 4
        return cache_key(study.study_id, spec, settings, inputs=inputs)

    k0 = study_key()
    assert study_key() == k0
    m = np.zeros((8, 8, 8), np.uint8)
    m[2:4, 2:4, 2:4] = 1
    _nifti(mask, m)
    k1 = study_key()
    assert k1 != k0
    _nifti(tmp_path / "data" / "sub-01" / "sub-01_T2w.nii.gz", np.full((8, 8, 8), 2.0, np.float32))
    assert study_key() not in (k0, k1)


def test_study_folder_path_uses_pipeline_and_cache(tmp_path: Path, monkeypatch) -> None:
    """Study folders (real files, real discovery) go through pipeline.preprocess_study once (mocked:
    it would run HD-BET), then the cache; a failed study is excluded with its code and retried
    next time; a rewritten image recomputes that study only."""
    import recnec_cli.orchestration.pipeline as pipeline_mod
    from recnec_cli.config import Settings
    from recnec_cli.errors import RegistrationError

    class FakePre:
        def __init__(self, x: np.ndarray) -> None:
            self.model_input = x

    calls: list[str] = []

    def fake_pre(study, *, settings, resources):
        calls.append(study.study_id)
        if study.study_id == "bad":
            raise RegistrationError("moved too far", code="REGISTRATION_FAILED")
        return FakePre(np.full(InputSpec().shape, len(calls), np.float32))

    monkeypatch.setattr(pipeline_mod, "preprocess_study", fake_pre)
    monkeypatch.setattr(pipeline_mod.Resources, "load", classmethod(lambda cls, s, **k: object()))
    data = tmp_path / "studies"
    for i, sid in enumerate(("sub-01", "sub-02", "bad")):
        _nifti_study(data, sid, seed=i)
    labels = tmp_path / "labels.csv"
    labels.write_text("study_id,label\nsub-01,recurrence\nsub-02,necrosis\nbad,necrosis\n")
    cache = tmp_path / "cache"
    c1 = load_cohort(data, labels=labels, settings=Settings(), cache_dir=cache)
    assert c1.source == "studies" and c1.study_ids == ("sub-01", "sub-02")
    assert c1.excluded[0][:2] == ("bad", "REGISTRATION_FAILED")
    assert len(list(cache.glob("*.npy"))) == 2
    c2 = load_cohort(data, labels=labels, settings=Settings(), cache_dir=cache)
    assert calls == ["bad", "sub-01", "sub-02", "bad"]  # cached studies are not recomputed
    assert c2.fingerprint == c1.fingerprint
    np.testing.assert_array_equal(c2.x, c1.x)
    _nifti(data / "sub-02" / "sub-02_T2w.nii.gz", np.zeros((8, 8, 8), np.float32))
    c3 = load_cohort(data, labels=labels, settings=Settings(), cache_dir=cache)
    assert calls[4:] == ["bad", "sub-02"]  # the changed study only
    np.testing.assert_array_equal(c3.x[0], c1.x[0])
    assert c3.x[1, 0, 0, 0, 0] == 6 and c3.fingerprint != c1.fingerprint
    labels.write_text("study_id,label\nmissing,recurrence\n")
    with pytest.raises(TrainingError) as ei:
        load_cohort(data, labels=labels, settings=Settings(), cache_dir=cache)
    assert ei.value.code == "MISSING_STUDIES"


@pytest.mark.slow  # a child interpreter
def test_evaluate_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, recnec_cli.train.evaluate, recnec_cli.cli.main; "
            "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().replace("'", '"')) == []
