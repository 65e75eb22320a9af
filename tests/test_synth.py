"""``recnec synth``: determinism, independence of n, geometry, contrasts and train/scan agreement.

One full head costs ~5-10 s on two cores, so the tests share one subject (module fixture) and
write at most one study per format in the default tier; whole-cohort byte checks of DICOM are
``slow``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.stages.modelinput import InputSpec, make_model_input
from recnec_cli.synth import generate_subject, write_cohort
from recnec_cli.synth.series import motion_matrix, series_grid
from recnec_cli.synth.subject import cohort_label, plan_subject, render
from recnec_cli.synth.truth import model_tensor
from recnec_cli.synth.writers import write_dicom_study, write_nifti_study


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def truth0():
    return generate_subject(seed=0, index=0)


def test_labels_follow_ratio_and_do_not_depend_on_n():
    labels = [cohort_label(seed=0, index=i) for i in range(234)]
    assert labels.count("recurrence") == 192 and labels.count("necrosis") == 42
    assert [cohort_label(seed=0, index=i, ratio=(1, 1)) for i in range(4)].count("necrosis") == 2


def test_model_space_determinism_and_independence_of_n(tmp_path):
    a = write_cohort(tmp_path / "a", n=3, seed=5, space="model")
    b = write_cohort(tmp_path / "b", n=3, seed=5, space="model")
    c = write_cohort(tmp_path / "c", n=1, seed=5, space="model")
    da, db, dc = _digests(tmp_path / "a"), _digests(tmp_path / "b"), _digests(tmp_path / "c")
    assert da == db
    assert dc["tensors/synth-0001.npy"] == da["tensors/synth-0001.npy"]
    x = np.load(tmp_path / "a" / "tensors" / "synth-0002.npy")
    assert x.dtype == np.float32 and x.shape == InputSpec().shape and np.isfinite(x).all()
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv", encoding="utf-8")))
    assert [r["study_id"] for r in rows] == list(a.study_ids)
    assert {r["label"] for r in rows} <= {"recurrence", "necrosis"}
    meta = json.loads((tmp_path / "a" / "cohort.json").read_text())
    assert meta["seed"] == 5 and meta["n"] == 3 and meta["input_spec"]["shape"] == [3, 40, 40, 40]
    assert c.labels[0] == a.labels[0] and b.study_ids == a.study_ids


def test_sub_box_equals_crop_of_larger_box():
    plan = plan_subject(seed=1, index=3)
    big = (slice(60, 130), slice(70, 150), slice(60, 130))
    small = (slice(80, 111), slice(95, 121), slice(77, 101))
    vb, vs = render(plan, big), render(plan, small)
    crop = tuple(slice(s.start - b.start, s.stop - b.start) for s, b in zip(small, big))
    for k in vs:
        np.testing.assert_array_equal(vs[k], vb[k][crop])


def test_label_changes_only_the_lesion_signs():
    a = plan_subject(seed=0, index=7, label="recurrence")
    b = plan_subject(seed=0, index=7, label="necrosis")
    assert a.lesion.centre_mm == b.lesion.centre_mm
    assert a.acquisitions == b.acquisitions
    assert a.lesion.z > b.lesion.z


def test_tissue_contrasts(truth0):
    from recnec_cli.synth.anatomy import load_template
    from recnec_cli.synth.subject import render  # noqa: F401  (same grid)

    tpl = load_template()
    # tissue classes on the (deformed) subject: use the drawn plan's template mapping
    plan = plan_subject(seed=0, index=0)
    shape = truth0.t1.shape
    ijk = np.indices(shape).reshape(3, -1)[:, ::97].astype(np.float64)
    pts = truth0.affine[:3, :3] @ ijk + truth0.affine[:3, 3:4]
    from recnec_cli.synth.anatomy import sample_template

    m = sample_template(plan.deformation(pts))
    idx = tuple(ijk.astype(int))
    away = ~truth0.lesion_mask[idx]
    wm = (m["wm"] > 0.95) & away
    gm = (m["gm"] > 0.9) & away
    csf = (m["mask"] > 0.99) & (m["gm"] + m["wm"] < 0.05) & away
    med = {k: {t: float(np.median(v[idx][sel])) for t, sel in (("wm", wm), ("gm", gm), ("csf", csf))}
           for k, v in (("T1", truth0.t1), ("T2", truth0.t2), ("T1ce", truth0.t1ce))}
    assert med["T1"]["wm"] > med["T1"]["gm"] > med["T1"]["csf"]
    assert med["T2"]["csf"] > med["T2"]["gm"] > med["T2"]["wm"]
    assert med["T1ce"]["wm"] > med["T1ce"]["gm"] > med["T1ce"]["csf"]
    del tpl
    # the lesion enhances: T1ce inside the lesion brighter than WM, relative to each image's WM
    les = truth0.lesion_mask
    assert np.median(truth0.t1ce[les]) / med["T1ce"]["wm"] > np.median(truth0.t1[les]) / med["T1"]["wm"] + 0.3
    # skull and scalp exist: a lot of signal outside the brain
    outside = ~truth0.brain_mask & (truth0.t1 > 0.3)
    assert outside.sum() > 0.5 * truth0.brain_mask.sum()


def test_nifti_study_round_trip_matches_model_space(truth0, tmp_path):
    """A study written as files, read back and brought to the truth grid (the scan's job, here
    with the known motion instead of registration) gives a model input close to the tensor."""
    import nibabel as nib
    from scipy import ndimage

    write_nifti_study(tmp_path / "s", "s", truth0, mask_path=tmp_path / "m.nii.gz")
    names = {"T1": "s_T1w.nii.gz", "T2": "s_T2w.nii.gz", "T1ce": "s_ce-gadolinium_T1w.nii.gz"}
    chans = []
    for role in ("T1", "T2", "T1ce"):
        img = nib.load(str(tmp_path / "s" / names[role]))
        data = np.asarray(img.dataobj, dtype=np.float32)
        # truth voxel -> world -> (head motion) -> series voxel
        m = np.linalg.inv(img.affine) @ motion_matrix(truth0.acquisitions[role]) @ truth0.affine
        grid = np.indices(truth0.t1.shape, dtype=np.float64).reshape(3, -1)
        coords = m[:3, :3] @ grid + m[:3, 3:4]
        chans.append(ndimage.map_coordinates(data, coords, order=1).reshape(truth0.t1.shape))
    scanned = make_model_input(chans, truth0.brain_mask, truth0.affine, truth0.lesion_centroid_ras_mm)
    direct, centroid = model_tensor(plan_subject(seed=0, index=0))
    np.testing.assert_allclose(centroid, truth0.lesion_centroid_ras_mm, atol=1e-6)
    for c in range(3):
        r = np.corrcoef(scanned[c].ravel(), direct[c].ravel())[0, 1]
        thick = truth0.acquisitions[("T1", "T2", "T1ce")[c]].slice_thickness_mm
        assert r > (0.95 if thick <= 1.0 else 0.75), (c, r, thick)
    # the lesion mask on the T1ce grid covers the true lesion
    mask = nib.load(str(tmp_path / "m.nii.gz"))
    g = series_grid(truth0.acquisitions["T1ce"])
    assert mask.shape == g.shape and np.allclose(mask.affine, g.affine)
    vox_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000.0
    ml = float(np.asarray(mask.dataobj).sum()) * vox_ml
    assert 0.6 < ml / (truth0.lesion_mask.sum() / 1000.0) < 1.4


def test_dicom_study_headers_and_determinism(truth0, tmp_path):
    import pydicom

    uid_a, n_a = write_dicom_study(tmp_path / "a", truth0, masks_dir=tmp_path / "ma")
    uid_b, _ = write_dicom_study(tmp_path / "b", truth0, masks_dir=tmp_path / "mb")
    assert uid_a == uid_b and uid_a.startswith("2.25.")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    files = sorted((tmp_path / "a").rglob("*.dcm"))
    assert len(files) == n_a - 1
    series = {}
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        series.setdefault(ds.SeriesInstanceUID, ds)
        assert ds.StudyInstanceUID == uid_a
    assert len(series) == 3
    by_desc = {ds.SeriesNumber: ds for ds in series.values()}
    for ds in by_desc.values():
        assert ds.Modality == "MR" and ds.ImageType[0] == "ORIGINAL" and ds.RepetitionTime > 0
    # the study's lesion mask lies beside it under the name discovery and --lesion-masks expect,
    # and marks a lesion (not an empty volume)
    import nibabel as nib

    assert sorted(p.name for p in (tmp_path / "ma").iterdir()) == [f"{uid_a}_lesion_mask.nii.gz"]
    mask = nib.load(str(tmp_path / "ma" / f"{uid_a}_lesion_mask.nii.gz"))
    assert np.asarray(mask.dataobj).sum() > 0
    # a slice decodes to the stored pixels
    ds = pydicom.dcmread(files[len(files) // 2])
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns) and ds.pixel_array.max() > 0


@pytest.mark.slow  # ~40 s: two cohorts written
def test_nifti_cohort_same_seed_same_bytes(truth0, tmp_path):
    """The cohort writer and an independent generate_subject() of the same seed give the same
    bytes (render, acquisition, NIfTI/gzip and JSON writing are all deterministic)."""
    write_cohort(tmp_path / "a", n=1, seed=0, fmt="nifti", space="study", masks_in_study=True)
    write_nifti_study(tmp_path / "b" / "synth-0001", "synth-0001", truth0,
                      mask_path=tmp_path / "b" / "synth-0001" / "lesion_mask.nii.gz")
    da, db = _digests(tmp_path / "a" / "synth-0001"), _digests(tmp_path / "b" / "synth-0001")
    assert da == db and len(da) == 7
    raw = (tmp_path / "a" / "synth-0001" / "synth-0001_T1w.nii.gz").read_bytes()
    assert raw[:2] == b"\x1f\x8b" and raw[4:8] == b"\0\0\0\0"  # gzip mtime 0
    labels = (tmp_path / "a" / "labels.csv").read_text()
    assert labels == f"study_id,label\nsynth-0001,{truth0.label}\n"


@pytest.mark.slow
@pytest.mark.veryslow  # ~65 s; the NIfTI cohort's byte identity stays in the default suite
def test_dicom_cohort_same_seed_same_bytes(tmp_path):
    write_cohort(tmp_path / "a", n=1, seed=1, fmt="dicom", space="study")
    write_cohort(tmp_path / "b", n=1, seed=1, fmt="dicom", space="study")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    rows = list(csv.DictReader(open(tmp_path / "a" / "labels.csv", encoding="utf-8")))
    for r in rows:
        assert (tmp_path / "a" / "masks" / f"{r['study_id']}_lesion_mask.nii.gz").is_file()


def test_cli_help_and_small_run(tmp_path):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--help"])
    assert res.exit_code == 0 and "--space" in res.output and "labels.csv" in res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "o"), "--n", "1", "--space", "model",
                              "--seed", "2", "-q"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "o" / "tensors" / "synth-0001.npy").is_file()
    res = runner.invoke(app, ["synth", str(tmp_path / "o"), "--ratio", "x"])
    assert res.exit_code == 2


@pytest.mark.slow
@pytest.mark.veryslow
def test_scan_pipeline_input_close_to_model_space(tmp_path):
    """Train/scan drift guard: a synthetic study run through the real scan preprocessing
    (discover, classify, convert, rigid registration, HD-BET, user lesion mask, crop) gives a
    model input close to the tensor ``--space model`` writes for the same subject (~2 min)."""
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.pipeline import Resources, preprocess_study
    from recnec_cli.stages.discover import discover

    index = 3  # seed 0 subject 4: 3D T1 and T1ce, 2D T2
    truth = generate_subject(seed=0, index=index)
    write_nifti_study(tmp_path / "synth-0004", "synth-0004", truth,
                      mask_path=tmp_path / "masks" / "synth-0004_lesion_mask.nii.gz")
    settings = resolve_settings({"lesion_masks_dir": tmp_path / "masks"}, environ={})
    studies = [s for s in discover(tmp_path, settings=settings) if s.study_id == "synth-0004"]
    assert len(studies) == 1
    res = Resources.load(settings, need_model=False)
    pre = preprocess_study(studies[0], settings=settings, resources=res)
    direct, centroid = model_tensor(plan_subject(seed=0, index=index))
    assert np.linalg.norm(np.asarray(pre.lesion_centroid_ras_mm) - centroid) < 2.0
    for c in range(3):
        r = np.corrcoef(pre.model_input[c].ravel(), direct[c].ravel())[0, 1]
        assert r > 0.8, (c, r)
