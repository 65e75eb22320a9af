"""The patient's timeline: grouping, order, comparisons with the prior and the nadir, lesion
matching between visits, and the scan's report / log / index around them."""

from __future__ import annotations

import csv
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from recnec_cli import timeline
from recnec_cli.timeline import TimePoint, compare

sys.path.insert(0, str(Path(__file__).parent))
import phantoms


def _tp(sid, when, enh, *, patient="p1", nec=1.0, oed=5.0, status="OK", session=""):
    return TimePoint(study_id=sid, patient=patient, acquired=when, session=session, status=status,
                     lesion_source="segmenter" if status == "OK" else "", enhancing_ml=enh,
                     necrotic_ml=None if enh is None else nec, oedema_ml=None if enh is None else oed,
                     p_recurrence=0.5)


HISTORY = [_tp("a", "2024-01-01", 4.0), _tp("b", "2024-03-01T10:00:00", 2.0), _tp("c", "2024-05-01", 3.5),
           _tp("x", "2024-04-01", None, status="SEGMENTATION_FAILED"), _tp("d", "2024-07-15", 1.0),
           _tp("other", "2024-02-01", 9.0, patient="p2")]


def test_comparisons_do_not_depend_on_the_order_studies_arrive_in():
    want = compare(HISTORY)
    for perm in itertools.islice(itertools.permutations(HISTORY), 0, 720, 37):
        assert compare(list(perm)) == want
    c = want["c"]
    assert c["prior_study_id"] == "b" and c["nadir_study_id"] == "b"
    assert c["enhancing_change_vs_prior_ml"] == pytest.approx(1.5)
    assert c["enhancing_change_vs_prior_pct"] == pytest.approx(75.0)
    assert c["days_since_prior"] == pytest.approx(60.6, abs=0.05)  # 2024-03-01T10:00 -> 2024-05-01
    assert c["volumetric_suggestion"] == "volume_increase"          # +75 % >= 40 % against the nadir
    d = want["d"]
    assert d["prior_study_id"] == "c" and d["nadir_study_id"] == "b"  # the failed study x is skipped
    assert d["enhancing_change_vs_nadir_pct"] == pytest.approx(-50.0)
    assert d["volumetric_suggestion"] == "stable"                   # -50 % is not yet -65 %
    assert (want["d"]["timeline_index"], want["d"]["timeline_studies"]) == (5, 5)
    assert want["x"]["prior_study_id"] == "" and "not compared" in want["x"]["timeline_note"]
    assert want["other"]["timeline_studies"] == 1                   # another patient is not mixed in


def test_a_patient_with_one_study_has_empty_comparison_columns():
    cols = compare([_tp("only", "2024-01-01", 3.0)])["only"]
    assert cols["timeline_index"] == 1 and cols["timeline_studies"] == 1
    comparison = [c for c in timeline.COLUMNS if c not in ("timeline_index", "timeline_studies",
                                                            "days_since_first", "timeline_note")]
    assert all(cols[c] == "" for c in comparison), {c: cols[c] for c in comparison if cols[c] != ""}


@pytest.mark.parametrize("nadir, now, want", [
    (10.0, 14.0, "volume_increase"), (10.0, 13.99, "stable"), (10.0, 3.5, "volume_decrease"),
    (10.0, 3.51, "stable"), (0.0, 0.6, "volume_increase"), (0.2, 0.4, "stable")])
def test_the_volumetric_suggestion_uses_the_mrano_thresholds_against_the_nadir(nadir, now, want):
    assert timeline.suggestion(now, nadir) == want
    got = compare([_tp("n", "2024-01-01", nadir), _tp("m", "2024-04-01", now)])["m"]
    assert got["volumetric_suggestion"] == want


def test_a_different_lesion_is_not_compared_and_the_row_says_why():
    pts = [_tp("a", "2024-01-01", 4.0), _tp("b", "2024-03-01", 9.0)]
    cols = compare(pts, {("b", "a"): timeline.DIFFERENT})["b"]
    assert cols["prior_lesion_match"] == "different_lesion"
    assert cols["enhancing_change_vs_prior_ml"] == "" and cols["volumetric_suggestion"] == ""
    assert "does not overlap" in cols["timeline_note"]
    same = compare(pts, {("b", "a"): timeline.SAME})["b"]
    assert same["enhancing_change_vs_prior_ml"] == pytest.approx(5.0) and same["timeline_note"] == ""


def test_no_enhancing_lesion_counts_as_zero_and_sessions_order_studies_without_dates():
    row = {"status": "NO_ENHANCING_LESION", "oedema_volume_ml": 2.5}
    tp = timeline.time_point("s2", row, patient="p1", session="2")
    assert tp.enhancing_ml == 0.0 and tp.oedema_ml == 2.5
    cols = compare([_tp("s10", "", 3.0, session="10"), tp, _tp("s1", "", 5.0, session="1")])
    assert cols["s2"]["prior_study_id"] == "s1" and cols["s2"]["days_since_prior"] == ""
    assert cols["s2"]["enhancing_change_vs_prior_pct"] == pytest.approx(-100.0)
    assert cols["s10"]["prior_study_id"] == "s2" and cols["s10"]["nadir_study_id"] == "s2"
    assert cols["s10"]["volumetric_suggestion"] == "volume_increase"  # 3 mL from a 0 mL nadir
    undated = compare([_tp("u", "", 3.0), _tp("v", "2024-01-01", 2.0)])
    assert "not placed" in undated["u"]["timeline_note"] and undated["v"]["timeline_studies"] == 1


def test_the_same_patient_id_from_two_issuers_is_two_patients(tmp_path):
    from recnec_cli.pseudonym import PseudonymKey
    from recnec_cli.stages.discover import discover

    for name, uid, issuer, date in (("s1", "1.2.826.0.1.3680043.2.1125.81", "HOSP_A", "20240105"),
                                    ("s2", "1.2.826.0.1.3680043.2.1125.82", "HOSP_B", "20240410"),
                                    ("s3", "1.2.826.0.1.3680043.2.1125.83", "HOSP_A", "20240702")):
        phantoms.write_phantom_dicom_study(tmp_path / name, study_uid=uid, patient_id="12345",
                                           IssuerOfPatientID=issuer, StudyDate=date, StudyTime="101500")
    key = PseudonymKey(b"k" * 32, "test")
    found = {s.study_id[-2:]: s for s in discover(tmp_path, pseudonym_key=key)}
    assert found["81"].patient_pseudonym == found["83"].patient_pseudonym != found["82"].patient_pseudonym
    assert found["81"].acquired == "2024-01-05T10:15:00"
    pts = [TimePoint(s.study_id, s.patient_pseudonym, s.acquired, enhancing_ml=1.0, necrotic_ml=0.0,
                     oedema_ml=0.0, status="OK") for s in found.values()]
    cols = {k[-2:]: v for k, v in compare(pts).items()}
    assert cols["83"]["prior_study_id"].endswith("81") and cols["82"]["timeline_studies"] == 1


def test_bids_sessions_name_the_patient_and_the_sidecar_dates_the_study(tmp_path):
    from recnec_cli.stages.discover import discover

    phantoms.write_phantom_study(tmp_path / "sub-07", "ses-1", sidecar={"AcquisitionDateTime": "2023-02-03T08:09:10"})
    phantoms.write_phantom_study(tmp_path / "sub-07", "ses-2", sidecar={"AcquisitionDate": "2023-05-01"})
    phantoms.write_phantom_study(tmp_path / "sub-08", "ses-1")
    found = {s.study_id: s for s in discover(tmp_path)}
    a, b, c = found["sub-07/ses-1"], found["sub-07/ses-2"], found["sub-08/ses-1"]
    assert a.patient_pseudonym == b.patient_pseudonym != c.patient_pseudonym != ""
    assert (a.acquired, a.session, b.acquired, c.acquired) == ("2023-02-03T08:09:10", "1", "2023-05-01", "")


def _map(shift_mm=(0.0, 0.0, 0.0), lesion_mm=(30.0, 10.0, 5.0), radius=9.0):
    """A follow-up map of the phantom head, moved by ``shift_mm`` (the head repositioned)."""
    from recnec_cli.stages.followup import make_map

    aff = phantoms.phantom_affine()
    xyz = phantoms._world(phantoms.SHAPE, aff) - np.asarray(shift_mm).reshape(3, 1, 1, 1)
    r = np.asarray(phantoms.BRAIN_RADII_MM).reshape(3, 1, 1, 1)
    brain = ((xyz / r) ** 2).sum(0) <= 1.0
    texture = np.sin(xyz[0] / 7.0) * np.cos(xyz[1] / 9.0) * np.sin(xyz[2] / 5.0) + xyz[2] / 60.0
    lesion = np.sqrt(((xyz - np.asarray(lesion_mm).reshape(3, 1, 1, 1)) ** 2).sum(0)) <= radius
    t1ce = np.where(brain, 100.0 * (1.0 + 0.3 * texture), 0.0) + 150.0 * lesion
    labels = np.where(lesion & brain, 1, 0).astype(np.uint8)
    return make_map(t1ce.astype(np.float32), brain, labels, aff)


def test_lesions_are_matched_across_a_repositioned_head_and_told_apart_elsewhere():
    from recnec_cli.stages.followup import FollowUpMap, match_lesions

    first = _map()
    again = FollowUpMap.from_bytes(first.to_bytes())
    assert np.array_equal(again.t1ce, first.t1ce) and np.allclose(again.affine, first.affine)
    moved = _map(shift_mm=(6.0, -8.0, 4.0), radius=11.0)  # grown lesion, head 11 mm away
    m = match_lesions(moved, first)
    assert m.status == timeline.SAME and m.overlap > 0.7, m
    elsewhere = _map(shift_mm=(6.0, -8.0, 4.0), lesion_mm=(-30.0, -20.0, 10.0))
    assert match_lesions(elsewhere, first).status == timeline.DIFFERENT
    empty = _map(radius=0.0)
    assert match_lesions(empty, first).status == timeline.NOT_CHECKED


@pytest.mark.veryslow  # three scans of follow-ups (~32 s)
def test_a_late_study_is_compared_in_the_same_run_and_no_date_leaves_the_state(tmp_path, monkeypatch):
    """Two visits of one BIDS patient scanned out of order (the later one first) with the fake
    HD-BET: the late earlier visit makes the later one's comparisons appear without reprocessing
    it; report, log, manifest and index carry no acquisition date; the trajectory picture plots
    the report's numbers; the index groups the patient, newest first."""
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.scan import scan
    from recnec_cli.qc.trajectory import read_points

    phantoms.install_fake_hdbet(monkeypatch)
    monkeypatch.setenv("RECNEC_PSEUDONYM_KEY", "ab" * 32)
    studies, out = tmp_path / "in", tmp_path / "out"
    dates = {"01": "2024-01-10T10:00:00", "02": "2024-03-20T09:30:00"}
    phantoms.write_phantom_study(studies / "sub-01", "ses-02", lesion_radius_mm=12.0, seed=2,
                                 sidecar={"AcquisitionDateTime": dates["02"]})
    settings = resolve_settings({"qc_dir": str(out / "qc"), "settle_minutes": 0, "workers": 0})
    first = scan(studies, out=out / "report.csv", settings=settings)
    assert first.counts["processed"] == 1
    row = next(csv.DictReader(open(out / "report.csv")))
    assert row["timeline_studies"] == "1" and row["prior_study_id"] == ""
    assert row["trajectory_png"] == ""  # one study: no trajectory picture (README: two or more)
    phantoms.write_phantom_study(studies / "sub-01", "ses-01", lesion_radius_mm=9.0, seed=1,
                                 sidecar={"AcquisitionDateTime": dates["01"]})
    second = scan(studies, out=out / "report.csv", settings=settings)
    assert second.counts["processed"] == 1 and second.counts["unchanged"] == 1  # no reprocessing
    rows = {r["study_id"]: r for r in csv.DictReader(open(out / "report.csv"))}
    late, later = rows["sub-01/ses-01"], rows["sub-01/ses-02"]
    assert (late["timeline_index"], later["timeline_index"]) == ("1", "2")
    # 2024-01-10T10:00 -> 2024-03-20T09:30 (a leap year): 69.98 days
    assert later["prior_study_id"] == "sub-01/ses-01" and later["days_since_prior"] == "70.0"
    # recomputed, not reprocessed: the row keeps the run that processed its images (README)
    assert (later["run_id"], later["processed_utc"]) == (row["run_id"], row["processed_utc"])
    assert late["run_id"] != row["run_id"]
    assert later["prior_lesion_match"] == "same_lesion", later["timeline_note"]
    enh = {k: float(rows[k]["enhancing_volume_ml"]) for k in rows}
    assert float(later["enhancing_change_vs_prior_ml"]) == pytest.approx(
        enh["sub-01/ses-02"] - enh["sub-01/ses-01"], abs=2e-3)
    assert later["volumetric_suggestion"] in ("volume_increase", "stable", "volume_decrease")
    # no acquisition date anywhere but the state
    texts = [(out / "report.csv").read_text(), (out / "qc" / "index.html").read_text()]
    texts += [p.read_text() for p in out.glob("*.json")] + [p.read_text() for p in out.glob("*.log")]
    for text in texts:
        for d in dates.values():
            for form in (d[:10], d[:10].replace("-", ""), d[:10].replace("-", "/")):
                assert form not in text
    # the trajectory picture plots the report's values
    traj = read_points(out / "qc" / later["trajectory_png"])
    assert [p["study_id"] for p in traj["points"]] == ["sub-01/ses-01", "sub-01/ses-02"]
    assert [p["days"] for p in traj["points"]] == [0.0, float(later["days_since_first"])]
    assert [p["enhancing_ml"] for p in traj["points"]] == pytest.approx([enh["sub-01/ses-01"], enh["sub-01/ses-02"]])
    assert [p["p_recurrence"] for p in traj["points"]] == pytest.approx(
        [float(late["p_recurrence"]), float(later["p_recurrence"])])
    assert (out / "qc" / later["follow_up_png"]).is_file() and late["follow_up_png"] == ""
    pair = read_points(out / "qc" / later["follow_up_png"], key="recnec-follow-up")
    assert pair["prior_study_id"] == "sub-01/ses-01"
    # the index: one patient group, newest first, with the trajectory as its picture
    html = (out / "qc" / "index.html").read_text()
    order = [html.index(f">{sid}<") for sid in ("sub-01/ses-02", "sub-01/ses-01")]
    assert order == sorted(order)
    assert html.count(f'src="{later["trajectory_png"]}"') == 1
    manifest = json.loads((out / "report.manifest.json").read_text()) if (out / "report.manifest.json").exists() \
        else json.loads(next(out.glob("*manifest*.json")).read_text())
    assert manifest["timeline_thresholds"]["volume_increase_pct"] == timeline.INCREASE_PCT
