"""``recnec synth --follow-ups``: later studies of the same synthetic subjects.

A full head costs several seconds, so the studies are written once per module: one subject with
one follow-up (2 studies) as DICOM and as NIfTI. Plan-level checks render nothing or a small box
(the lesion compartments of a plan render in about a second around the lesion only).
"""

from __future__ import annotations

import csv
import datetime
import hashlib
import json
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.synth import follow_up_plans, write_cohort
from recnec_cli.synth.constants import derived_uid
from recnec_cli.synth.lesions import CENTRE_JITTER_MM, GROWTH_PER_STEP, RADIUS_BOUNDS_MM
from recnec_cli.synth.series import motion_matrix
from recnec_cli.synth.subject import cohort_label, plan_subject, render
from recnec_cli.synth.truth import COMPARTMENTS, plan_volumes, truth_from_plan
from recnec_cli.synth.writers import write_dicom_study

RATIO = (1, 1)  # the first two subjects of a seed are one recurrence and one necrosis


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _mask_centroid_world(path: Path) -> np.ndarray:
    """Centroid (3,) mm, world RAS+, of a written lesion mask."""
    import nibabel as nib

    img = nib.load(str(path))
    ijk = np.argwhere(np.asarray(img.dataobj) > 0).mean(axis=0)
    return img.affine[:3, :3] @ ijk + img.affine[:3, 3]


@pytest.fixture(scope="module")
def dicom_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("fu-dicom")
    info = write_cohort(out, n=1, seed=0, fmt="dicom", follow_ups=1)
    return out, info


@pytest.fixture(scope="module")
def nifti_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("fu-nifti")
    info = write_cohort(out, n=1, seed=0, fmt="nifti", ratio=RATIO, follow_ups=1)
    return out, info


# ------------------------------------------------------------------------------------------
# plans: nothing rendered


def test_follow_up_plans_keep_the_subject_and_move_the_head():
    plan = plan_subject(seed=0, index=1)
    plans = follow_up_plans(plan, 2)
    assert plans[0] is plan and [p.time_point for p in plans] == [0, 1, 2]
    assert follow_up_plans(plan, 0) == (plan,)
    days = [p.days_since_baseline for p in plans]
    assert days[0] == 0 and all(56 <= b - a <= 120 for a, b in zip(days, days[1:]))
    for p in plans[1:]:
        assert p.label == plan.label and p.deformation is plan.deformation
        assert p.envelope is plan.envelope and p.lesion.pattern == plan.lesion.pattern
        t1ce = p.acquisitions["T1ce"]
        assert np.any(np.asarray(t1ce.motion_rot_deg) != 0)  # the T1ce moves too
        assert np.abs(t1ce.motion_rot_deg).max() <= 6.0 and np.abs(t1ce.motion_trans_mm).max() <= 8.0
        # the common repositioning sits on top of each series' own inter-sequence motion
        offset = np.subtract(t1ce.motion_trans_mm, plan.acquisitions["T1ce"].motion_trans_mm)
        for role in ("T1", "T2"):
            own = np.subtract(p.acquisitions[role].motion_trans_mm,
                              plan.acquisitions[role].motion_trans_mm)
            np.testing.assert_allclose(own, offset, atol=1e-9)
            assert p.acquisitions[role].series_description == plan.acquisitions[role].series_description
        assert p.contrasts["T1"].bias_field is not plan.contrasts["T1"].bias_field
        assert p.contrasts["T1"].noise_sd == plan.contrasts["T1"].noise_sd
    # a different follow-up count does not change the earlier time points
    again = follow_up_plans(plan_subject(seed=0, index=1), 1)
    assert again[1].lesion == plans[1].lesion and again[1].acquisitions == plans[1].acquisitions
    with pytest.raises(ValueError):
        follow_up_plans(plans[1], 1)


@pytest.mark.parametrize("index", range(8))
def test_lesion_evolution_follows_the_label(index):
    label = cohort_label(seed=3, index=index)
    plans = follow_up_plans(plan_subject(seed=3, index=index, label=label), 3)
    lo, hi = GROWTH_PER_STEP[label]
    for a, b in zip(plans, plans[1:]):
        ra, rb = np.asarray(a.lesion.radii_mm), np.asarray(b.lesion.radii_mm)
        f = rb / ra
        assert np.allclose(f, f[0])  # the lesion scales as a whole
        assert RADIUS_BOUNDS_MM[0] - 1e-9 <= rb.min() and rb.max() <= RADIUS_BOUNDS_MM[1] + 1e-9
        capped = rb.max() >= RADIUS_BOUNDS_MM[1] - 1e-9 or rb.min() <= RADIUS_BOUNDS_MM[0] + 1e-9
        assert lo - 1e-9 <= f[0] <= hi + 1e-9 or capped
        shift = np.subtract(b.lesion.centre_mm, a.lesion.centre_mm)
        assert np.linalg.norm(shift) <= CENTRE_JITTER_MM + 1e-9
        if label == "recurrence":
            assert b.lesion.oedema_mm >= a.lesion.oedema_mm
        else:
            assert f[0] <= 1.02 + 1e-9 and b.lesion.oedema_mm <= a.lesion.oedema_mm
        for ha, hb in zip(a.lesion.holes, b.lesion.holes):  # holes move and scale with the lesion
            rel_a = np.subtract(ha[:3], a.lesion.centre_mm)
            rel_b = np.subtract(hb[:3], b.lesion.centre_mm)
            np.testing.assert_allclose(rel_b, rel_a * f[0], atol=1e-9)
            assert hb[3] == pytest.approx(ha[3] * f[0])
        np.testing.assert_allclose(b.lesion.nodule_offset_mm,
                                   np.asarray(a.lesion.nodule_offset_mm) * f[0], atol=1e-9)


def test_follow_up_noise_is_new():
    plan = plan_subject(seed=0, index=0)
    box = (slice(90, 100), slice(100, 110), slice(90, 100))
    later = replace(plan, time_point=1)  # same everything but the time point
    a, b = render(plan, box), render(later, box)
    np.testing.assert_array_equal(a["lesion"], b["lesion"])
    np.testing.assert_array_equal(a["brain"], b["brain"])
    assert not np.array_equal(a["T1"], b["T1"])


# ------------------------------------------------------------------------------------------
# DICOM


@pytest.mark.veryslow  # the default suite's time budget: the DICOM / byte-identity cohorts run in .ci/run's opt-in tier
def test_dicom_follow_up_same_patient_new_study(dicom_cohort):
    import pydicom

    out, info = dicom_cohort
    assert info.n == 1 and info.follow_ups == 1 and len(info.study_ids) == 2
    base_uid, fu_uid = info.study_ids
    assert base_uid == derived_uid(0, 0, "study")  # the baseline keeps its UIDs
    assert fu_uid == derived_uid(0, 0, "study", "follow-up", 1)
    folders = sorted(p.name for p in (out / "dicom").iterdir())
    assert len(folders) == 2 and folders[1] == f"{folders[0]}-fu1"
    first = {}
    for folder in folders:
        dss = [pydicom.dcmread(next(se.glob("*.dcm")), stop_before_pixels=True)
               for se in sorted((out / "dicom" / folder).iterdir())]
        assert len(dss) == 3 and len({ds.StudyInstanceUID for ds in dss}) == 1
        first[folder] = dss
    base, fu = first[folders[0]], first[folders[1]]
    assert base[0].StudyInstanceUID == base_uid and fu[0].StudyInstanceUID == fu_uid
    assert base[0].PatientID == fu[0].PatientID and base[0].PatientName == fu[0].PatientName
    assert not {ds.SeriesInstanceUID for ds in base} & {ds.SeriesInstanceUID for ds in fu}
    assert base[0].FrameOfReferenceUID != fu[0].FrameOfReferenceUID
    assert base[0].AccessionNumber != fu[0].AccessionNumber

    def day(v: str) -> datetime.date:
        return datetime.datetime.strptime(v, "%Y%m%d").date()

    days = follow_up_plans(plan_subject(seed=0, index=0), 1)[1].days_since_baseline
    for ds in fu:
        for key in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            assert (day(getattr(ds, key)) - day(getattr(base[0], key))).days == days
    rows = _rows(out / "follow_ups.csv")
    assert [(r["study_id"], r["time_point"], r["days_since_baseline"]) for r in rows] == [
        (base_uid, "0", "0"), (fu_uid, "1", str(days))]
    assert [r["study_id"] for r in _rows(out / "labels.csv")] == [base_uid, fu_uid]
    meta = json.loads((out / "cohort.json").read_text())
    assert meta["follow_ups"] == 1 and meta["studies"] == 2 and meta["n"] == 1


@pytest.mark.veryslow  # the default suite's time budget: the DICOM / byte-identity cohorts run in .ci/run's opt-in tier
def test_dicom_follow_up_head_moved(dicom_cohort):
    """The follow-up's T1ce content moved with the head: its lesion mask sits where the truth
    centroid lands under the follow-up's T1ce motion, away from the baseline's."""
    out, info = dicom_cohort
    fu_plan = follow_up_plans(plan_subject(seed=0, index=0), 1)[1]
    cen = {sid: _mask_centroid_world(out / "masks" / f"{sid}_lesion_mask.nii.gz")
           for sid in info.study_ids}
    truth = {r["study_id"]: np.array([float(v) for v in r["centroid_ras_mm"].split()])
             for r in _rows(out / "truth.csv")}
    base_uid, fu_uid = info.study_ids
    for sid in info.study_ids:  # truth.csv: the centroid in the study's T1ce world coordinates
        assert np.linalg.norm(cen[sid] - truth[sid]) < 1.5, sid
    assert np.linalg.norm(cen[fu_uid] - cen[base_uid]) > 4.0  # the head moved in the scanner
    m = np.linalg.inv(motion_matrix(fu_plan.acquisitions["T1ce"]))  # undo the repositioning
    back = m[:3, :3] @ cen[fu_uid] + m[:3, 3]
    assert np.linalg.norm(back - cen[base_uid]) < 3.0  # the lesion itself moved <= 2 mm


@pytest.mark.veryslow  # ~20 s: one more follow-up study rendered and written
def test_dicom_follow_up_reproducible(dicom_cohort, tmp_path):
    out, info = dicom_cohort
    fu = follow_up_plans(plan_subject(seed=0, index=0), 1)[1]
    uid, _ = write_dicom_study(tmp_path / "dicom", truth_from_plan(fu), masks_dir=tmp_path / "masks")
    assert uid == info.study_ids[1]
    folder = next((tmp_path / "dicom").iterdir()).name
    assert _digests(tmp_path / "dicom" / folder) == _digests(out / "dicom" / folder)
    assert _digests(tmp_path / "masks") == {
        k: v for k, v in _digests(out / "masks").items() if k.startswith(uid)}


@pytest.mark.veryslow  # the default suite's time budget: the DICOM / byte-identity cohorts run in .ci/run's opt-in tier
def test_dicom_follow_ups_discovered_as_one_patient(dicom_cohort):
    from recnec_cli.stages.discover import discover

    out, info = dicom_cohort
    studies = discover(out)
    assert sorted(s.study_id for s in studies) == sorted(info.study_ids)
    assert len({s.patient_pseudonym for s in studies}) == 1


# ------------------------------------------------------------------------------------------
# NIfTI and truth volumes


def test_nifti_follow_up_layout_and_discovery(nifti_cohort):
    from recnec_cli.stages.discover import discover

    out, info = nifti_cohort
    expected = ["sub-synth0001/ses-00", "sub-synth0001/ses-01"]
    assert list(info.study_ids) == expected
    plans = follow_up_plans(plan_subject(seed=0, index=0, label=cohort_label(
        seed=0, index=0, ratio=RATIO)), 1)
    for sid in expected:
        stem = sid.replace("/", "_")
        names = sorted(p.name for p in (out / sid).iterdir())
        assert names == sorted(f"{stem}_{s}.{e}" for s in ("T1w", "T2w", "ce-gadolinium_T1w")
                               for e in ("nii.gz", "json"))
        assert (out / "masks" / f"{stem}_lesion_mask.nii.gz").is_file()
        side = json.loads((out / sid / f"{stem}_ce-gadolinium_T1w.json").read_text())
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", side["AcquisitionDateTime"])
        assert side["AcquisitionDateTime"][11:] == side["AcquisitionTime"][:8]
    d = [datetime.datetime.fromisoformat(json.loads(
        (out / f"sub-synth0001/ses-{k:02d}/sub-synth0001_ses-{k:02d}_T1w.json").read_text()
    )["AcquisitionDateTime"]).date() for k in range(2)]
    assert (d[1] - d[0]).days == plans[1].days_since_baseline
    assert not any(p.is_dir() for p in out.glob("synth-*"))  # no flat layout beside BIDS
    studies = discover(out)
    assert sorted(s.study_id for s in studies) == expected
    assert all(len(s.series) == 3 for s in studies)
    rows = _rows(out / "follow_ups.csv")
    assert [(r["subject"], r["time_point"], r["study_id"], r["days_since_baseline"])
            for r in rows] == [("synth-0001", "0", expected[0], "0"),
                               ("synth-0001", "1", expected[1], str(plans[1].days_since_baseline))]
    assert [r["study_id"] for r in _rows(out / "truth.csv")] == expected


def test_truth_volumes_follow_the_label():
    """A recurrence's enhancing volume grows at every follow-up until its radii reach the
    generator's bound (then it stays); a necrosis's does not grow beyond what radii x <= 1.02
    allow (1.02^3: it "stays or shrinks") and shrinks overall."""
    labels = {i: cohort_label(seed=0, index=i, ratio=RATIO) for i in range(2)}
    assert sorted(labels.values()) == ["necrosis", "recurrence"]
    for i, label in labels.items():
        plans = follow_up_plans(plan_subject(seed=0, index=i, label=label), 2)
        enh = [plan_volumes(p)["enhancing_ml"] for p in plans]
        steps = [b / a for a, b in zip(enh, enh[1:])]
        if label == "recurrence":
            factors = [b.lesion.radii_mm[0] / a.lesion.radii_mm[0] for a, b in zip(plans, plans[1:])]
            assert factors[0] >= 1.08, factors  # seed 0 subject 2 reaches the bound at step 2
            for f, s in zip(factors, steps):
                assert s > 1.1 if f >= 1.05 else s > 0.97, (factors, steps)
            assert enh[-1] > 1.3 * enh[0], enh
        else:
            assert all(s <= 1.07 for s in steps) and enh[-1] < enh[0], steps


def test_truth_volumes_are_the_sums_of_the_compartments(nifti_cohort):
    """follow_ups.csv holds the sums of the soft compartments (re-rendered here around the
    lesion only), and the written mask covers about the lesion volume."""
    import nibabel as nib

    out, _ = nifti_cohort
    rows = _rows(out / "follow_ups.csv")
    label = cohort_label(seed=0, index=0, ratio=RATIO)
    assert {r["label"] for r in rows} == {label}
    plans = follow_up_plans(plan_subject(seed=0, index=0, label=label), 1)
    for row, p in zip(rows, plans, strict=True):
        v = {c: float(row[c]) for c in COMPARTMENTS}
        assert v["lesion_ml"] == pytest.approx(v["enhancing_ml"] + v["necrotic_ml"], abs=2e-4)
        again = plan_volumes(p)
        for c in COMPARTMENTS:
            assert v[c] == pytest.approx(again[c], abs=1e-4), (row["study_id"], c)
        assert v["enhancing_ml"] > 0 and v["oedema_ml"] > 0
        stem = row["study_id"].replace("/", "_")
        mask = nib.load(str(out / "masks" / f"{stem}_lesion_mask.nii.gz"))
        ml = float(np.asarray(mask.dataobj).sum()) * abs(np.linalg.det(mask.affine[:3, :3])) / 1000
        assert 0.6 < ml / v["lesion_ml"] < 1.4, (row["study_id"], ml, v["lesion_ml"])


@pytest.mark.veryslow  # the default suite's time budget: the DICOM / byte-identity cohorts run in .ci/run's opt-in tier
def test_no_follow_ups_writes_the_same_bytes(nifti_cohort, tmp_path):
    """``--follow-ups 0`` is the option left out (model space: cheap), and a study-space K = 0
    cohort has no follow-up files and the same images as the K > 0 baseline."""
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app

    runner = CliRunner()
    common = ["--n", "1", "--seed", "0", "--ratio", "1:1", "-q"]
    res = runner.invoke(app, ["synth", str(tmp_path / "a"), *common, "--space", "model"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "b"), *common, "--space", "model",
                              "--follow-ups", "0"])
    assert res.exit_code == 0, res.output
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    res = runner.invoke(app, ["synth", str(tmp_path / "c"), *common, "--follow-ups", "0"])
    assert res.exit_code == 0, res.output
    da = _digests(tmp_path / "c")
    assert sorted(da) == sorted([
        "cohort.json", "labels.csv", "truth.csv", "masks/synth-0001_lesion_mask.nii.gz",
        *(f"synth-0001/synth-0001_{s}.{e}" for s in ("T1w", "T2w", "ce-gadolinium_T1w")
          for e in ("json", "nii.gz"))])
    assert "follow_ups" not in json.loads((tmp_path / "c" / "cohort.json").read_text())
    assert "AcquisitionDateTime" not in (tmp_path / "c" / "synth-0001" / "synth-0001_T1w.json").read_text()
    out, _ = nifti_cohort
    fu = _digests(out)
    for s in ("T1w", "T2w", "ce-gadolinium_T1w"):
        assert da[f"synth-0001/synth-0001_{s}.nii.gz"] == fu[
            f"sub-synth0001/ses-00/sub-synth0001_ses-00_{s}.nii.gz"]
    assert da["masks/synth-0001_lesion_mask.nii.gz"] == fu["masks/sub-synth0001_ses-00_lesion_mask.nii.gz"]


def test_cli_follow_ups_help_and_model_space_refused(tmp_path):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app

    runner = CliRunner()
    res = runner.invoke(app, ["synth", "--help"])
    assert res.exit_code == 0 and "--follow-ups" in res.output
    assert "recnec synth fu/ --n 20 --follow-ups 2 --format dicom" in res.output
    res = runner.invoke(app, ["synth", str(tmp_path / "m"), "--n", "1", "--space", "model",
                              "--follow-ups", "1"])
    assert res.exit_code == 2 and "--space study" in res.output
    assert not (tmp_path / "m" / "tensors").exists()
    with pytest.raises(ValueError):
        write_cohort(tmp_path / "w", n=1, seed=0, space="model", follow_ups=1)
    with pytest.raises(ValueError):
        write_cohort(tmp_path / "w", n=1, seed=0, follow_ups=-1)
