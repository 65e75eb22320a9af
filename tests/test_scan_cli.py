"""``recnec scan`` end to end, in-process (Typer CliRunner), on synthetic and real studies.

Slow by nature (HD-BET runs for real, ~15-40 s per study on 2 CPU cores): the studies are shared
by a module-scoped fixture so the suite pays for each scan once; every test that uses it is marked
``slow``.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recnec_cli.cli.main import app

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = Path(os.environ.get("RECNEC_TEST_WEIGHTS", REPO / "weights"))

pytestmark = pytest.mark.skipif(not (WEIGHTS / "manifest.json").exists(),
                                reason="shipped weights/ missing (run recnec train --reproduce-shipped)")


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def batch_scan(tmp_path_factory):
    """Two synthetic studies (NIfTI + DICOM), one broken NIfTI study, one missing its T2, one with a
    lesion mask on a foreign grid."""
    from recnec_cli.synth import write_cohort

    base = tmp_path_factory.mktemp("batch")
    studies = base / "studies"
    studies.mkdir()
    write_cohort(base / "c_nii", n=1, seed=11, fmt="nifti")
    write_cohort(base / "c_dcm", n=1, seed=12, fmt="dicom")
    for d in (base / "c_nii").iterdir():
        if d.is_dir() and d.name.startswith("synth-"):
            shutil.copytree(d, studies / d.name)
            nii_study = d
    shutil.copytree(base / "c_dcm" / "dicom", studies / "dicom")
    # broken: the T1ce is not a NIfTI at all (truncated download)
    broken = studies / "broken-study"
    shutil.copytree(nii_study, broken)
    ce = next(broken.glob("*ce-gadolinium*T1w.nii.gz"))
    ce.write_bytes(ce.read_bytes()[:200])
    # incomplete: no T2
    incomplete = studies / "no-t2-study"
    shutil.copytree(nii_study, incomplete)
    for f in incomplete.glob("*T2w*"):
        f.unlink()
    # a user lesion mask saved on some other grid (10 mm cube at the world origin)
    import nibabel as nib

    wrong = studies / "wrong-grid-mask"
    shutil.copytree(nii_study, wrong)
    nib.save(nib.Nifti1Image(np.ones((10, 10, 10), np.uint8), np.eye(4)), str(wrong / "lesion_mask.nii.gz"))
    before = _tree_digest(studies)
    out = base / "out" / "report.csv"
    qc = base / "qc"
    # two real worker processes (real HD-BET in each): the pool path end to end
    result = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out), "--batch-size", "2",
                                      "--keep-intermediate", str(qc), "--device", "cpu",
                                      "--weights", str(WEIGHTS), "--workers", "2"])
    truth = {}
    for cohort in ("c_nii", "c_dcm"):
        for r in _read_rows(base / cohort / "truth.csv"):
            truth[r["study_id"]] = np.array([float(v) for v in r["centroid_ras_mm"].split()])
    return {"result": result, "out": out, "qc": qc, "studies": studies, "before": before, "truth": truth}


@pytest.mark.slow
def test_batch_report_has_every_study_and_exit_code_1(batch_scan):
    res = batch_scan["result"]
    assert res.exit_code == 1, res.output
    rows = _read_rows(batch_scan["out"])
    assert len(rows) == 5
    by_loc = {r["location"] or "dicom": r for r in rows}
    ok = [r for r in rows if r["status"] == "OK"]
    assert len(ok) == 2, [(r["study_id"], r["status"], r["error_message"]) for r in rows]
    for r in ok:
        p = float(r["p_recurrence"])
        assert 0.0 <= p <= 1.0
        assert r["label"] in ("recurrence", "necrosis")
        assert (r["label"] == "recurrence") == (p >= float(r["threshold"]))
        assert float(r["lesion_volume_ml"]) > 0 and r["lesion_source"] == "segmenter"
        assert r["t1_series"] and r["t2_series"] and r["t1ce_series"] and r["t1ce_reasons"]
        assert float(r["seconds_skullstrip"]) > 0
    assert by_loc["no-t2-study"]["status"] == "MISSING_ROLE"
    assert "T2" in by_loc["no-t2-study"]["error_message"]
    broken = by_loc["broken-study"]
    assert broken["status"] not in ("OK", "INTERNAL_ERROR")
    assert "ce-gadolinium" in broken["error_message"]  # the message names the unreadable file
    wrong = by_loc["wrong-grid-mask"]
    assert wrong["status"] == "LESION_MASK_GRID_MISMATCH" and wrong["failed_stage"] == "lesion"
    assert wrong["seconds_skullstrip"] == ""  # refused before the expensive stages


@pytest.mark.slow
def test_input_tree_untouched_and_manifest_written(batch_scan):
    assert _tree_digest(batch_scan["studies"]) == batch_scan["before"]
    out = batch_scan["out"]
    manifest = json.loads(out.with_name("report.manifest.json").read_text())
    assert "not clinically validated" in manifest["disclaimer"]
    assert manifest["execution_provider"] == "CPUExecutionProvider"
    assert manifest["hdbet_provider"] == "CPUExecutionProvider"  # HD-BET ran in ONNX Runtime in the workers
    assert manifest["model_checksums"] and all(len(v) == 64 for v in manifest["model_checksums"].values())
    # the segmenter and the lesion score that chose the lesions: their checksums
    segmenter, score = manifest["lesion_segmenter"].split("+")
    assert len(segmenter) == 64 and len(score) == 64
    assert manifest["studies_discovered"] == 5
    assert manifest["status_counts"]["OK"] == 2
    assert out.with_suffix(".log").exists()


@pytest.mark.slow
def test_batched_equals_one_by_one(batch_scan):
    """Probabilities from the batched run equal single-study inference on the same model inputs."""
    import nibabel as nib

    from recnec_cli.naming import safe_component as safe_name
    from recnec_cli.stages.infer import Ensemble

    ens = Ensemble.load(WEIGHTS, device="cpu")
    rows = {r["study_id"]: r for r in _read_rows(batch_scan["out"]) if r["status"] == "OK"}
    boxes = sorted(glob.glob(str(batch_scan["qc"] / "*" / "model_input_box.nii.gz")))
    assert len(boxes) == 2
    for box in boxes:
        x = np.moveaxis(np.asarray(nib.load(box).dataobj, dtype=np.float32), -1, 0)[None]
        pred = ens.predict(x)
        key = Path(box).parent.name
        row = next(r for sid, r in rows.items() if key == safe_name(sid))
        assert abs(float(pred.probability[0]) - float(row["p_recurrence"])) < 1e-5  # calibrated
        assert abs(float(pred.mean[0]) - float(row["p_recurrence_raw"])) < 1e-5  # raw ensemble mean
        assert row["applicability"] in ("in_distribution", "OUT_OF_DISTRIBUTION")


def test_tampered_weights_are_refused(tmp_path):
    w = tmp_path / "weights"
    shutil.copytree(WEIGHTS, w)
    onnx = sorted(w.glob("*.onnx"))[0]
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF
    onnx.write_bytes(bytes(data))
    import phantoms

    studies = tmp_path / "studies"
    phantoms.write_phantom_study(studies, "sub-01")  # models are loaded only when a study is to be scanned
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(tmp_path / "r.csv"), "--weights", str(w)])
    assert res.exit_code == 2
    assert res.output.count("WEIGHTS_CHECKSUM_MISMATCH") == 1  # printed once, not echoed by the log
    assert "ERROR recnec: WEIGHTS_CHECKSUM_MISMATCH" in (tmp_path / "r.log").read_text()  # but in the run log
    assert not (tmp_path / "r.csv").exists()


def test_report_inside_input_tree_is_refused(tmp_path):
    res = CliRunner().invoke(app, ["scan", str(tmp_path), "--out", str(tmp_path / "sub" / "r.csv")])
    assert res.exit_code == 2
    assert "inside the input tree" in res.output


@pytest.mark.slow
def test_real_glioma_study_end_to_end(real, tmp_path):
    """TCGA-FG-6692 (TCGA-LGG): roles from file names, HD-BET Dice >= 0.95, a probability, status OK."""
    import nibabel as nib

    case = real / "nifti_tcga_fg_6692_lgg_siemens"
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["scan", str(case), "--out", str(out), "--format", "json",
                                   "--keep-intermediate", str(tmp_path / "qc"), "--device", "cpu",
                                   "--weights", str(WEIGHTS)])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(out.read_text())["studies"]
    assert row["status"] == "OK"
    assert row["t1_series"].endswith("_t1.nii.gz") and "T1_AX_" in row["t1_series"]
    assert row["t1ce_series"].endswith("_t1c.nii.gz") and "POST_GAD" in row["t1ce_series"]
    assert row["t2_series"].endswith("_t2.nii.gz")
    assert 0.0 <= row["p_recurrence"] <= 1.0
    (qc,) = [p for p in (tmp_path / "qc").iterdir() if p.is_dir()]
    ours = nib.as_closest_canonical(nib.load(str(qc / "brain_mask_t1ce_native.nii.gz")))
    ref = nib.as_closest_canonical(nib.load(str(case / "bet_tcia_example_t1c_mask.nii.gz")))
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
    a, b = np.asarray(ours.dataobj) > 0, np.asarray(ref.dataobj) > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum())
    assert dice >= 0.95
    print("per-stage seconds:", {k: row[k] for k in row if k.startswith("seconds_")}, "dice", round(dice, 4))


@pytest.mark.slow
def test_no_patient_identifiers_in_outputs(batch_scan):
    """PatientName / PatientID of the DICOM study appear nowhere: report, manifest, log, terminal."""
    import pydicom

    first = next(p for p in sorted((batch_scan["studies"] / "dicom").rglob("*")) if p.is_file())
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    secrets = {str(ds.PatientName), str(ds.PatientID)}
    assert all(len(s) > 5 for s in secrets)
    out = batch_scan["out"]
    texts = [out.read_text(), out.with_name("report.manifest.json").read_text(), out.with_suffix(".log").read_text(),
             batch_scan["result"].output]
    for text in texts:
        for s in secrets:
            assert s not in text


@pytest.mark.slow
def test_lesion_found_where_it_was_drawn_left_stays_left(batch_scan):
    """docs/failure-kinds.md kind 12 end to end: DICOM (LPS) and NIfTI studies through conversion, registration,
    skull stripping and auto localisation land on the true lesion centroid, same side."""
    rows = [r for r in _read_rows(batch_scan["out"]) if r["status"] == "OK"]
    assert {r["source"] for r in rows} == {"nifti", "dicom"}
    for r in rows:
        truth = batch_scan["truth"][r["study_id"]]
        got = np.array([float(r["lesion_r_mm"]), float(r["lesion_a_mm"]), float(r["lesion_s_mm"])])
        assert np.linalg.norm(got - truth) < 3.0, (r["study_id"], got, truth)
        assert np.sign(got[0]) == np.sign(truth[0])
