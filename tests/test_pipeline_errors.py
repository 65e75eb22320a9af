"""Failure rows of the pipeline: each error code where it is raised, on real synthetic studies.

One synthetic subject (``recnec_cli.synth``, seed 0 subject 1) is written once as a NIfTI study
and copied per case, then changed the way real data goes wrong (a T2 covering half the head, a
lesion mask in the air or empty, a stage raising something unexpected, inference failing).
Everything runs for real through :func:`recnec_cli.orchestration.pipeline.preprocess_study` and
:func:`~recnec_cli.orchestration.batching.run_batch` except what is slow and not under test:

* HD-BET is replaced by :class:`TruthBrain`, whose ``brain_mask(volume)`` returns the subject's
  true brain resampled onto the T1ce grid (or a deliberately broken mask);
* the ONNX ensemble by :class:`FakeEnsemble` (``predict`` can be told to fail);
* ``register.register_rigid`` is the real function, memoised on its inputs' voxels and
  geometry, so the identical copies of a study pay for their registration once (~15 s).

The one test with the real HD-BET is marked ``slow``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from recnec_cli.config import resolve_settings
from recnec_cli.errors import InferenceError
from recnec_cli.orchestration.batching import run_batch
from recnec_cli.orchestration.pipeline import Resources, process_study
from recnec_cli.stages.discover import discover

#: every test runs a synthetic head through conversion and real SimpleITK registration (~50 s in all)
pytestmark = pytest.mark.slow

T2_NAME = "s_T2w.nii.gz"
T1CE_NAME = "s_ce-gadolinium_T1w.nii.gz"


class TruthBrain:
    """Stands in for HD-BET: ``brain_mask(volume)`` -> bool mask on ``volume``'s grid.

    ``volume`` is the canonical RAS+ T1ce (:class:`~recnec_cli.study.Volume`); the mask is the
    synthetic subject's true brain seen through the T1ce's head motion, or with ``broken`` a
    12 mm cube at the brain's centre (6 mL: far below the plausible 500 mL).
    """

    def __init__(self, truth, *, broken: bool = False) -> None:
        self.truth, self.broken = truth, broken

    def brain_mask(self, volume) -> np.ndarray:
        from scipy import ndimage

        from recnec_cli.synth.series import motion_matrix

        t = self.truth
        vox = (np.linalg.inv(t.affine) @ np.linalg.inv(motion_matrix(t.acquisitions["T1ce"]))
               @ np.asarray(volume.affine))
        ijk = np.indices(volume.data.shape, dtype=np.float32).reshape(3, -1)
        coords = vox[:3, :3].astype(np.float32) @ ijk + vox[:3, 3:4].astype(np.float32)
        mask = ndimage.map_coordinates(t.brain_mask.astype(np.uint8), coords, order=0)
        mask = mask.reshape(volume.data.shape).astype(bool)
        if self.broken:
            centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
            spacing = np.sqrt((np.asarray(volume.affine)[:3, :3] ** 2).sum(axis=0))
            half = np.maximum(1, np.round(6.0 / spacing).astype(int))
            mask = np.zeros_like(mask)
            mask[tuple(slice(c - h, c + h) for c, h in zip(centre, half))] = True
        return mask


class FakePrediction:
    def __init__(self, n: int) -> None:
        self.mean = np.linspace(0.2, 0.8, n)
        self.spread = np.full(n, 0.01)


class FakeEnsemble:
    """Stands in for the ONNX ensemble; ``fail_calls`` are the 0-based ``predict`` calls that fail
    (with ``error``), the others return probabilities."""

    threshold = 0.5

    def __init__(self, *, fail_calls: tuple[int, ...] = (), error: Exception | None = None) -> None:
        self.fail_calls, self.error, self.batches = fail_calls, error, []

    def predict(self, x: np.ndarray, *, batch_size: int | None = None) -> FakePrediction:
        self.batches.append(x.shape[0])
        if len(self.batches) - 1 in self.fail_calls:
            raise self.error or InferenceError("onnxruntime failed: CUDA out of memory",
                                               code="INFERENCE_FAILED")
        return FakePrediction(x.shape[0])


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    """``(truth, folder)``: the synthetic subject and its NIfTI study (T1, T2, T1ce; no mask)."""
    from recnec_cli.synth import generate_subject
    from recnec_cli.synth.writers import write_nifti_study

    truth = generate_subject(seed=0, index=0)
    root = tmp_path_factory.mktemp("subject")
    write_nifti_study(root / "s", "s", truth, mask_path=root / "unused" / "s_lesion_mask.nii.gz")
    return truth, root / "s"


_REGISTRATIONS: dict[tuple, object] = {}


@pytest.fixture(autouse=True)
def memoised_registration(monkeypatch):
    """The real ``register_rigid``, run once per distinct (fixed, moving) voxels and geometry."""
    from recnec_cli.stages import register

    real = register.register_rigid

    def digest(v) -> str:
        h = hashlib.sha1(np.ascontiguousarray(v.data).tobytes())
        h.update(np.asarray(v.affine, dtype=np.float64).tobytes())
        return h.hexdigest()

    def memo(fixed, moving, **kw):
        key = (digest(fixed), digest(moving), tuple(sorted(kw.items())))
        if key not in _REGISTRATIONS:
            _REGISTRATIONS[key] = real(fixed, moving, **kw)
        return _REGISTRATIONS[key]

    monkeypatch.setattr(register, "register_rigid", memo)


@pytest.fixture()
def settings():
    return resolve_settings({"batch_size": 2, "device": "cpu"}, environ={})


def _resources(settings, truth, *, broken_brain: bool = False, ensemble=None) -> Resources:
    res = Resources.load(settings, need_model=False, need_hdbet=False)
    res.hdbet = TruthBrain(truth, broken=broken_brain)
    res.ensemble = ensemble
    return res


def _studies(root: Path, subject, names: list[str]) -> dict:
    """Copies of the subject's study folder under ``root``; ``{study_id: Study}`` by discovery."""
    for name in names:
        if not (root / name).exists():
            shutil.copytree(subject[1], root / name)
    found = {s.study_id: s for s in discover(root, settings=resolve_settings({}, environ={}))}
    assert sorted(found) == sorted(names)
    return found


def _on_t1ce_grid(folder: Path, fill) -> None:
    """Write ``folder/lesion_mask.nii.gz`` on the T1ce file's own grid; ``fill(mask)`` draws it."""
    ref = nib.load(str(folder / T1CE_NAME))
    mask = np.zeros(ref.shape, np.uint8)
    fill(mask)
    nib.save(nib.Nifti1Image(mask, ref.affine), str(folder / "lesion_mask.nii.gz"))


def _assert_failed(r, code: str, stage: str) -> None:
    assert (r.status, r.error_code, r.failed_stage) == (code, code, stage), (
        r.status, r.error_code, r.failed_stage, r.error_message)
    assert r.error_message and r.preprocessed is None and r.probability is None


def test_good_study_is_ok(subject, tmp_path, settings) -> None:
    """The unmodified copy runs through (so the failures below are caused by the change)."""
    study = _studies(tmp_path, subject, ["ok"])["ok"]
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0]))
    assert r.ok and r.error_code == "" and r.failed_stage == ""
    assert r.preprocessed.model_input.shape == (3, 40, 40, 40)
    assert 500 < r.preprocessed.brain_volume_ml < 2600
    assert all(v["brain_coverage"] > 0.95 for v in r.preprocessed.registration.values())


def test_implausible_brain_mask_is_skullstrip_failed(subject, tmp_path, settings) -> None:
    study = _studies(tmp_path, subject, ["ok"])["ok"]
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0], broken_brain=True))
    _assert_failed(r, "SKULLSTRIP_FAILED", "skullstrip")
    assert "mL" in r.error_message
    assert r.assignment is not None and {"classify", "convert", "register", "skullstrip"} <= set(r.timings)


def test_t2_covering_half_the_head_is_incomplete_coverage(subject, tmp_path, settings) -> None:
    """A T2 whose slices stop half-way (e.g. an aborted acquisition) is caught after registration."""
    study_dir = tmp_path / "half-t2"
    shutil.copytree(subject[1], study_dir)
    img = nib.load(str(study_dir / T2_NAME))
    data = np.asarray(img.dataobj)
    axis = int(np.argmax(np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))))  # the slice axis
    keep = [slice(None)] * 3
    keep[axis] = slice(0, data.shape[axis] // 2)
    nib.save(nib.Nifti1Image(data[tuple(keep)], img.affine, img.header), str(study_dir / T2_NAME))
    study = _studies(tmp_path, subject, ["half-t2"])["half-t2"]
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0]))
    _assert_failed(r, "INCOMPLETE_COVERAGE", "register")
    assert r.error_message.startswith("T2 covers only")


def test_lesion_mask_outside_the_brain(subject, tmp_path, settings) -> None:
    """A mask on the T1ce's grid (so it passes the grid check) drawn in the air of a corner."""
    _studies(tmp_path, subject, ["air-mask"])
    _on_t1ce_grid(tmp_path / "air-mask", lambda m: m.__setitem__((slice(2, 12),) * 3, 1))
    study = _studies(tmp_path, subject, ["air-mask"])["air-mask"]
    assert study.lesion_mask is not None
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0]))
    _assert_failed(r, "LESION_MASK_OUTSIDE_BRAIN", "lesion")
    assert "only 0% of it lies inside the brain" in r.error_message


def test_empty_lesion_mask(subject, tmp_path, settings) -> None:
    _studies(tmp_path, subject, ["empty-mask"])
    _on_t1ce_grid(tmp_path / "empty-mask", lambda m: None)
    study = _studies(tmp_path, subject, ["empty-mask"])["empty-mask"]
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0]))
    _assert_failed(r, "LESION_MASK_EMPTY", "lesion")


def _boom_in_convert(monkeypatch, folder: str) -> None:
    """``convert.convert_series`` (as the pipeline looks it up) raises an unexpected exception whose
    text holds something private, for the series of study ``folder`` only."""
    from recnec_cli.stages import convert

    real = convert.convert_series

    def convert_series(series, **kw):
        if f"/{folder}/" in str(series.files[0]):
            raise RuntimeError("cannot read /data/Doe^John/secret.nii")
        return real(series, **kw)

    monkeypatch.setattr(convert, "convert_series", convert_series)


def test_unexpected_exception_is_an_internal_error_row(subject, tmp_path, settings, monkeypatch) -> None:
    """A bug in one study's stage gives that study an INTERNAL_ERROR row (type name only, no
    exception text) and the batch goes on; the other studies of its batch are predicted."""
    studies = _studies(tmp_path, subject, ["a", "boom", "b"])
    _boom_in_convert(monkeypatch, "boom")
    ens = FakeEnsemble()
    rows = run_batch([studies[k] for k in ("a", "boom", "b")], settings=settings,
                     resources=_resources(settings, subject[0], ensemble=ens))
    assert [r.study.study_id for r in rows] == ["a", "boom", "b"]
    a, boom, b = rows
    assert (boom.status, boom.error_code) == ("INTERNAL_ERROR", "INTERNAL_ERROR")
    assert boom.failed_stage and boom.preprocessed is None and boom.probability is None
    assert "RuntimeError" in boom.error_message and "Doe" not in boom.error_message
    assert ens.batches == [1, 1]  # in this process nothing else is in flight: each study is inferred at once
    for r in (a, b):
        assert r.ok and r.probability is not None and r.label in ("recurrence", "necrosis")


def test_internal_error_row_names_the_stage(subject, tmp_path, settings, monkeypatch) -> None:
    study = _studies(tmp_path, subject, ["boom"])["boom"]
    _boom_in_convert(monkeypatch, "boom")
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0]))
    assert (r.status, r.failed_stage) == ("INTERNAL_ERROR", "convert")


def test_inference_failure_fails_only_its_batch(subject, tmp_path, settings) -> None:
    """The first ``predict`` fails: its study gets an ``infer`` error row, the next batches are
    predicted, and every study is reported once (the scan's batching routine, in this process)."""
    studies = _studies(tmp_path, subject, ["a", "b", "c"])
    ens = FakeEnsemble(fail_calls=(0,))
    done = []
    rows = run_batch([studies[k] for k in ("a", "b", "c")], settings=settings,
                     resources=_resources(settings, subject[0], ensemble=ens), on_study_done=done.append)
    assert ens.batches == [1, 1, 1]
    a, b, c = rows
    assert (a.status, a.error_code, a.failed_stage) == ("INFERENCE_FAILED", "INFERENCE_FAILED", "infer")
    assert "CUDA out of memory" in a.error_message and a.probability is None and a.label == ""
    assert a.preprocessed is not None  # preprocessing itself was fine
    assert b.ok and c.ok and c.probability == pytest.approx(0.2) and c.label == "necrosis"
    assert [r.study.study_id for r in done] == ["a", "b", "c"]  # every study reported once


def test_inference_failure_fails_every_study_of_its_batch(subject, tmp_path, settings) -> None:
    """A batch of two (as worker processes make them) whose ``predict`` fails: both rows fail at
    ``infer`` with the error's code; the next batch is predicted."""
    from recnec_cli.orchestration.pipeline import infer_batch

    studies = _studies(tmp_path, subject, ["a", "b", "c"])
    res = _resources(settings, subject[0])
    ready = [process_study(studies[k], settings=settings, resources=res) for k in ("a", "b", "c")]
    assert all(r.ok for r in ready)
    ens = FakeEnsemble(fail_calls=(0,))
    infer_batch(ready[:2], ensemble=ens)
    infer_batch(ready[2:], ensemble=ens)
    assert ens.batches == [2, 1]
    for r in ready[:2]:
        assert (r.status, r.failed_stage) == ("INFERENCE_FAILED", "infer") and r.probability is None
    assert ready[2].ok and ready[2].probability == pytest.approx(0.2)


def test_unexpected_inference_exception_fails_only_its_batch(subject, tmp_path, settings) -> None:
    studies = _studies(tmp_path, subject, ["a", "b", "c"])
    ens = FakeEnsemble(fail_calls=(0,), error=RuntimeError("onnxruntime: unexpected"))
    rows = run_batch([studies[k] for k in ("a", "b", "c")], settings=settings,
                     resources=_resources(settings, subject[0], ensemble=ens))
    assert [r.status for r in rows] == ["INTERNAL_ERROR", "OK", "OK"]
    assert rows[0].failed_stage == "infer"


@pytest.mark.slow
@pytest.mark.veryslow  # ~40 s of real HD-BET; test_scan_cli's batch covers HD-BET in the default suite
def test_real_hdbet_brain_matches_truth(subject, tmp_path) -> None:
    """With the real HD-BET (fast mode, CPU) the good study runs through and the brain volume is
    close to the synthetic subject's true brain."""
    settings = resolve_settings({"device": "cpu"}, environ={})
    study = _studies(tmp_path, subject, ["ok"])["ok"]
    res = Resources.load(settings, need_model=False, need_hdbet=True)
    r = process_study(study, settings=settings, resources=res)
    assert r.ok, (r.error_code, r.error_message)
    truth_ml = subject[0].brain_mask.sum() / 1000.0  # 1 mm truth grid
    assert 0.8 < r.preprocessed.brain_volume_ml / truth_ml < 1.2, (r.preprocessed.brain_volume_ml, truth_ml)


def test_pipeline_calls_the_stages_through_their_modules(subject, tmp_path, settings, monkeypatch) -> None:
    """The stand-ins above (memoised registration, a conversion that raises) work only while the
    pipeline looks ``convert.convert_series`` / ``register.register_rigid`` up when a study runs:
    whatever those module attributes are then is what runs."""
    from recnec_cli.stages import convert, register

    calls: list[str] = []

    def spy(name, fn):
        def wrapped(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapped

    monkeypatch.setattr(convert, "convert_series", spy("convert", convert.convert_series))
    monkeypatch.setattr(register, "register_rigid", spy("register", register.register_rigid))
    study = _studies(tmp_path, subject, ["ok"])["ok"]
    r = process_study(study, settings=settings, resources=_resources(settings, subject[0]))
    assert r.ok, (r.error_code, r.error_message)
    assert calls.count("convert") == 3 and calls.count("register") >= 2, calls  # T1, T2, T1ce; T1 and T2 moved
