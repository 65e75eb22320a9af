"""``recnec scan --dicom-out / --send`` and ``recnec send``: DICOM SEG, TID 1500 SR and secondary
capture per DICOM study, checked with dciodvfy (dicom3tools), read back with highdicom against the
source T1ce and the synthetic truth, and delivered to a real Orthanc on a loopback port.

One synthetic DICOM study is scanned once (module fixture) while the PACS it sends to is down;
the Orthanc test then starts a real Orthanc on that port and shows the next run delivering."""

from __future__ import annotations

import csv
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from recnec_cli.cli.main import app

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = Path(os.environ.get("RECNEC_TEST_WEIGHTS", REPO / "weights"))
DCIODVFY = shutil.which("dciodvfy")
ORTHANC = shutil.which("Orthanc")

pytestmark = pytest.mark.skipif(not (WEIGHTS / "manifest.json").exists(),
                                reason="shipped weights/ missing (run recnec train --reproduce-shipped)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _dciodvfy_errors(path: Path) -> list[str]:
    res = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True, timeout=120)
    lines = (res.stdout + res.stderr).splitlines()
    assert lines, f"dciodvfy printed nothing for {path}"
    return [ln for ln in lines if ln.startswith("Error")]


@pytest.fixture(scope="module")
def dicom_scan(tmp_path_factory):
    """One synthetic DICOM study (seed 7: a lesion the segmenter finds) and two NIfTI studies that
    stop early (no T2), scanned with --dicom-out and --send to a PACS that is not running."""
    from recnec_cli.synth import write_cohort

    base = tmp_path_factory.mktemp("dicomout")
    studies = base / "studies"
    write_cohort(base / "c", n=1, seed=7, fmt="dicom")
    shutil.copytree(base / "c" / "dicom", studies / "dicom")
    write_cohort(base / "n", n=1, seed=11, fmt="nifti")
    src = next(d for d in (base / "n").iterdir() if d.name.startswith("synth-"))
    for name in ("nifti-a", "nifti-b"):
        shutil.copytree(src, studies / name)
        for f in (studies / name).glob("*T2w*"):
            f.unlink()
    port = _free_port()
    dest = f"ORTHANC@127.0.0.1:{port}"
    out, dout = base / "out" / "report.csv", base / "dicom-out"
    args = ["scan", str(studies), "--out", str(out), "--dicom-out", str(dout), "--send", dest,
            "--weights", str(WEIGHTS), "--device", "cpu", "--threads", "2"]
    res = CliRunner().invoke(app, args)
    uid = (base / "c" / "labels.csv").read_text().splitlines()[1].split(",")[0]
    row = next((r for r in _rows(out) if r["study_id"] == uid), {}) if out.exists() else {}
    import pydicom

    t1ce = next((s for s in sorted((base / "c" / "dicom").glob("*/SE*"))
                 if str(pydicom.dcmread(next(s.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID)
                 == row.get("t1ce_series")), None)
    return {"res": res, "args": args, "out": out, "dout": dout, "uid": uid, "t1ce": t1ce, "dest": dest, "port": port,
            "mask": base / "c" / "masks" / f"{uid}_lesion_mask.nii.gz", "studies": studies, "base": base}


def _row(scan) -> dict[str, str]:
    return next(r for r in _rows(scan["out"]) if r["study_id"] == scan["uid"])


@pytest.mark.slow
def test_scan_writes_three_objects_and_survives_a_pacs_that_is_down(dicom_scan):
    res = dicom_scan["res"]
    assert res.exit_code == 1, res.output  # the two NIfTI studies without T2 fail; the PACS does not count
    row = _row(dicom_scan)
    assert row["status"] == "OK" and row["lesion_source"] == "segmenter", row
    assert row["pacs_send"].startswith(f"{dicom_scan['dest']}: failed"), row["pacs_send"]
    folder = dicom_scan["dout"] / dicom_scan["uid"]
    assert sorted(p.name for p in folder.iterdir()) == ["SC.dcm", "SEG.dcm", "SR.dcm"]
    # the SC's picture is not left behind; NIfTI studies get none, said once in the log
    assert [p.name for p in dicom_scan["dout"].iterdir()] == [dicom_scan["uid"]]
    log_text = dicom_scan["out"].with_suffix(".log").read_text()
    assert log_text.count("NIFTI studies get no DICOM objects") == 1
    assert "not delivered" in log_text and "the next run retries them" in log_text
    # status shows the failed send
    st = CliRunner().invoke(app, ["status", "--state", str(dicom_scan["out"].with_name("report.state.sqlite")),
                                  "--format", "json"])
    sends = json.loads(st.output)["sends"]
    assert [(s["destination"], s["status"], s["objects"]) for s in sends] == [(dicom_scan["dest"], "failed", 3)]


@pytest.mark.slow
@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_every_object_passes_dciodvfy(dicom_scan):
    files = sorted((dicom_scan["dout"] / dicom_scan["uid"]).glob("*.dcm"))
    assert len(files) == 3
    for f in files:
        assert _dciodvfy_errors(f) == [], f.name


@pytest.mark.slow
def test_seg_frames_lie_on_the_source_t1ce_and_on_the_true_lesion(dicom_scan):
    """Each SEG frame references a T1ce instance with the same position; the segmented pixels,
    placed in the world through the *source* instance's own geometry, fall inside the synthetic
    truth mask, and not in its left-right mirror (a flipped grid would)."""
    import highdicom as hd
    import nibabel as nib
    import pydicom

    seg = hd.seg.segread(str(dicom_scan["dout"] / dicom_scan["uid"] / "SEG.dcm"))
    sources = {}
    for f in dicom_scan["t1ce"].glob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        sources[str(ds.SOPInstanceUID)] = ds
    t1ce_uid = next(iter(sources.values())).SeriesInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == t1ce_uid
    assert seg.StudyInstanceUID == dicom_scan["uid"]
    assert seg.PatientID == next(iter(sources.values())).PatientID
    labels = {int(d.SegmentNumber): str(d.SegmentLabel) for d in seg.SegmentSequence}
    assert labels[1] == "Enhancing tumour" and set(labels) <= {1, 2, 3}
    truth = nib.load(str(dicom_scan["mask"]))
    m = np.asarray(truth.dataobj) > 0
    inv = np.linalg.inv(truth.affine)
    pixels = inside = mirrored = 0
    enh_ml = 0.0
    for i, fr in enumerate(seg.PerFrameFunctionalGroupsSequence):
        ref = fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        ds = sources[ref]  # KeyError: a frame referencing no T1ce instance
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(np.array(fr.PlanePositionSequence[0].ImagePositionPatient, dtype=float), ipp,
                                   atol=1e-3)
        number = int(fr.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        r, c = np.nonzero(seg.pixel_array[i])
        dr, dc = (float(v) for v in ds.PixelSpacing)
        if number == 1:
            enh_ml += len(r) * dr * dc * float(ds.SpacingBetweenSlices) / 1000.0
        if number == 3:
            continue
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        lps = ipp + c[:, None] * dc * iop[:3] + r[:, None] * dr * iop[3:]
        for sign in (1, -1):
            ras = lps * np.array([-sign, -1.0, 1.0])
            ijk = np.rint(ras @ inv[:3, :3].T + inv[:3, 3]).astype(int)
            ok = np.all((ijk >= 0) & (ijk < m.shape), axis=1)
            hit = int(m[tuple(ijk[ok].T)].sum())
            if sign == 1:
                pixels += len(r)
                inside += hit
            else:
                mirrored += hit
    assert pixels > 1000
    assert inside / pixels > 0.6, (inside, pixels)
    assert mirrored / pixels < 0.1, (mirrored, pixels)
    # the enhancing segment's volume on the T1ce frames agrees with the report's (common grid)
    row = _row(dicom_scan)
    assert enh_ml == pytest.approx(float(row["enhancing_volume_ml"]), rel=0.25)


def _sr_values(sr) -> tuple[dict[str, float], dict[str, str], list[str]]:
    """(measurement meaning -> value, qualitative name -> value meaning, texts) of a TID 1500 SR."""
    values, evaluations, texts = {}, {}, []

    def walk(items):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning
            if it.ValueType == "NUM":
                values[name] = float(it.MeasuredValueSequence[0].NumericValue)
            elif it.ValueType == "CODE":
                evaluations[name] = it.ConceptCodeSequence[0].CodeMeaning
            elif it.ValueType == "TEXT":
                texts.append(str(it.TextValue))
            if "ContentSequence" in it:
                walk(it.ContentSequence)

    walk(sr.ContentSequence)
    return values, evaluations, texts


@pytest.mark.slow
def test_sr_measurements_equal_the_report_row(dicom_scan):
    import pydicom

    folder = dicom_scan["dout"] / dicom_scan["uid"]
    sr = pydicom.dcmread(folder / "SR.dcm")
    seg = pydicom.dcmread(folder / "SEG.dcm", stop_before_pixels=True)
    row = _row(dicom_scan)
    values, evaluations, texts = _sr_values(sr)
    assert values["Volume"] == pytest.approx(float(row["lesion_volume_ml"]))
    assert values["Enhancing tumour volume"] == pytest.approx(float(row["enhancing_volume_ml"]))
    assert values["Necrotic core volume"] == pytest.approx(float(row["necrotic_volume_ml"]))
    assert values["T2/FLAIR hyperintensity volume"] == pytest.approx(float(row["oedema_volume_ml"]))
    assert values["Probability of tumour recurrence"] == pytest.approx(float(row["p_recurrence"]))
    assert values["Ensemble spread of the probability"] == pytest.approx(float(row["ensemble_spread"]))
    assert evaluations["CNN classification (recurrence or necrosis)"].startswith(row["label"])
    assert any("Research use only" in t for t in texts)
    assert sr.VerificationFlag == "UNVERIFIED" and "RESEARCH USE ONLY" in sr.SeriesDescription
    assert sr.StudyInstanceUID == dicom_scan["uid"] == seg.StudyInstanceUID
    referenced = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                  for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert str(seg.SOPInstanceUID) in referenced
    sc = pydicom.dcmread(folder / "SC.dcm", stop_before_pixels=True)
    assert sc.StudyInstanceUID == dicom_scan["uid"] and sc.PatientID == seg.PatientID


@pytest.mark.slow
@pytest.mark.skipif(ORTHANC is None, reason="Orthanc (Debian package orthanc) not installed")
def test_orthanc_receives_the_objects_once_after_it_comes_up(dicom_scan, tmp_path):
    port, dest = dicom_scan["port"], dicom_scan["dest"]
    http = _free_port()
    cfg = tmp_path / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "recnec-test", "StorageDirectory": str(tmp_path / "db"), "IndexDirectory": str(tmp_path / "db"),
        "HttpPort": http, "DicomPort": port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": [], "DicomAlwaysAllowStore": True}))
    proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{http}"

    def get(path):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            return json.loads(r.read())

    try:
        for _ in range(100):
            try:
                get("/system")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("Orthanc did not start")
        assert get("/instances") == []
        # the next run (nothing to reprocess) delivers what the PACS missed
        res = CliRunner().invoke(app, dicom_scan["args"])
        assert res.exit_code == 1, res.output  # the NIfTI studies' failures, nothing else
        row = _row(dicom_scan)
        assert row["pacs_send"] == f"{dest}: sent"
        series = get("/series?expand")
        study = get(f"/studies/{series[0]['ParentStudy']}")
        assert study["MainDicomTags"]["StudyInstanceUID"] == dicom_scan["uid"]
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["OT", "SEG", "SR"]
        assert len({s["ParentStudy"] for s in series}) == 1
        n = len(get("/instances"))
        assert n == 3
        # a second run sends nothing
        res = CliRunner().invoke(app, dicom_scan["args"])
        assert res.exit_code == 1
        assert len(get("/instances")) == n
        log_text = dicom_scan["out"].with_suffix(".log").read_text()
        assert "nothing new to send" in log_text
        # `recnec send` to another AE of the same PACS: a new destination gets everything once
        other = f"SECOND@127.0.0.1:{port}"
        state = str(dicom_scan["out"].with_name("report.state.sqlite"))
        res = CliRunner().invoke(app, ["send", "--state", state, "--to", other])
        assert res.exit_code == 0, res.output
        assert "3 sent, 0 not delivered" in res.output
        res = CliRunner().invoke(app, ["send", "--state", state, "--to", other])
        assert res.exit_code == 0 and "0 sent" in res.output
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.veryslow
def test_rerun_with_the_same_result_writes_the_same_uids_and_rewrites_nothing(dicom_scan):
    import pydicom

    folder = dicom_scan["dout"] / dicom_scan["uid"]
    before = {p.name: (p.stat().st_mtime_ns, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
              for p in folder.glob("*.dcm")}
    res = CliRunner().invoke(app, [*dicom_scan["args"], "--force"])
    assert res.exit_code == 1, res.output
    after = {p.name: (p.stat().st_mtime_ns, str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID))
             for p in folder.glob("*.dcm")}
    assert after == before


# ---- the same objects from a real DICOM series (JPEG 2000, 512 x 512 x 120) -------------------------

@pytest.mark.slow
@pytest.mark.skipif(DCIODVFY is None, reason="dciodvfy (Debian package dicom3tools) not installed")
def test_objects_from_a_real_jpeg2000_series_pass_dciodvfy_and_land_where_drawn(real, tmp_path):
    """A lesion drawn as spheres in world coordinates (RAS) at the series' centre: the SEG on the
    real series' frames holds it there, and SEG, SR and SC pass dciodvfy."""
    import highdicom as hd
    import pydicom
    from PIL import Image

    from recnec_cli.pacs.objects import SourceLabels, labels_on_source, read_sources, write_objects

    folder = real / "dicom_tcia_vs_seg_001_t1ce_siemens_j2k"
    files = tuple(sorted(folder.glob("*.dcm")))
    sources = read_sources(files)
    corners = []
    for ds in (sources[0], sources[-1]):
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        far = ipp + (ds.Columns - 1) * float(ds.PixelSpacing[1]) * iop[:3] + (ds.Rows - 1) * float(
            ds.PixelSpacing[0]) * iop[3:]
        corners += [ipp, far]
    ras = np.array(corners) * np.array([-1.0, -1.0, 1.0])
    centre = ras.mean(axis=0)
    lo = ras.min(axis=0) - 4
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = lo
    shape = tuple(int(v) for v in np.ceil((ras.max(axis=0) + 4 - lo) / 2.0))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    dist = np.linalg.norm(ijk * 2.0 + lo - centre, axis=-1)
    grid_labels = np.zeros(shape, dtype=np.uint8)
    grid_labels[dist <= 18] = 3
    grid_labels[dist <= 12] = 1
    grid_labels[dist <= 6] = 2
    frames = labels_on_source(grid_labels, affine, sources)
    assert frames.shape == (len(files), sources[0].Rows, sources[0].Columns)
    src = SourceLabels(labels=frames, files=files, series_uid=str(sources[0].SeriesInstanceUID), compartments=True)
    png = tmp_path / "qc.png"
    Image.fromarray(np.full((200, 300, 3), 90, dtype=np.uint8)).save(png)
    row = {"lesion_volume_ml": 7.24, "enhancing_volume_ml": 6.33, "necrotic_volume_ml": 0.91,
           "oedema_volume_ml": 17.2, "p_recurrence": 0.71, "ensemble_spread": 0.08, "label": "recurrence"}
    written = write_objects(tmp_path / "out", src, row, model_version="test#0", software_version="test", png=png)
    assert [o.kind for o in written] == ["SEG", "SR", "SC"]
    for o in written:
        assert _dciodvfy_errors(o.path) == [], o.kind
    seg = hd.seg.segread(str(written[0].path))
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for i, fr in enumerate(seg.PerFrameFunctionalGroupsSequence):
        if int(fr.SegmentIdentificationSequence[0].ReferencedSegmentNumber) != 2:
            continue
        ds = by_uid[fr.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        r, c = np.nonzero(seg.pixel_array[i])
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        lps = ipp + c[:, None] * float(ds.PixelSpacing[1]) * iop[:3] + r[:, None] * float(ds.PixelSpacing[0]) * iop[3:]
        d = np.linalg.norm(lps * np.array([-1.0, -1.0, 1.0]) - centre, axis=1)
        assert d.max() <= 6 + 2 * np.sqrt(3), d.max()  # the core sphere, within one grid voxel
    # the same inputs again: the same UIDs, nothing rewritten
    mtimes = {o.path: o.path.stat().st_mtime_ns for o in written}
    again = write_objects(tmp_path / "out", src, row, model_version="test#0", software_version="test", png=png,
                          previous={o.kind: o.digest for o in written})
    assert [o.sop_instance_uid for o in again] == [o.sop_instance_uid for o in written]
    assert {o.path: o.path.stat().st_mtime_ns for o in again} == mtimes
    # a changed result: new UIDs (a SOP Instance UID never names two contents)
    changed = write_objects(tmp_path / "out", src, {**row, "p_recurrence": 0.2, "label": "necrosis"},
                            model_version="test#0", software_version="test", png=png,
                            previous={o.kind: o.digest for o in written})
    assert not {o.sop_instance_uid for o in changed} & {o.sop_instance_uid for o in written}
    assert pydicom.dcmread(changed[1].path).SOPInstanceUID == changed[1].sop_instance_uid


# ---- the guards: the same whichever way a setting arrives ------------------------------------------

@pytest.mark.parametrize("how", ["cli", "env"])
def test_dicom_out_inside_the_input_tree_is_refused(tmp_path, how):
    studies = tmp_path / "studies"
    studies.mkdir()
    args = ["scan", str(studies), "--out", str(tmp_path / "r.csv")]
    env = {}
    if how == "cli":
        args += ["--dicom-out", str(studies / "dicom")]
    else:
        env["RECNEC_DICOM_OUT"] = str(studies / "dicom")
    res = CliRunner().invoke(app, args, env=env)
    assert res.exit_code == 2
    assert "inside the input tree" in res.output
    assert ("RECNEC_DICOM_OUT (environment)" in res.output) == (how == "env")
    assert not (studies / "dicom").exists()


@pytest.mark.parametrize("how", ["cli", "env"])
def test_send_needs_dicom_out_and_a_valid_destination(tmp_path, how):
    studies = tmp_path / "studies"
    studies.mkdir()
    base = ["scan", str(studies), "--out", str(tmp_path / "r.csv")]

    def run(send, extra=()):
        if how == "cli":
            return CliRunner().invoke(app, [*base, "--send", send, *extra])
        return CliRunner().invoke(app, [*base, *extra], env={"RECNEC_SEND": send})

    res = run("PACS@127.0.0.1:104")
    assert res.exit_code == 2 and "needs a folder for the DICOM objects" in res.output
    for bad in ("127.0.0.1:104", "PACS@host", "PACS@host:0", "AE_TITLE_TOO_LONG_X@host:104", "PA\\CS@host:104",
                "\u00c4E@host:104"):
        res = run(bad, ["--dicom-out", str(tmp_path / "d")])
        assert res.exit_code == 2 and "AE@HOST:PORT" in res.output, (bad, res.output)
    res = CliRunner().invoke(app, [*base, "--dicom-out", str(tmp_path / "d"), "--calling-ae", "X" * 17])
    assert res.exit_code == 2 and "1-16 characters" in res.output


def test_send_without_a_state_or_a_destination_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(app, ["send", "--state", str(tmp_path / "none.sqlite"), "--to", "A@127.0.0.1:104"])
    assert res.exit_code == 2 and "no state file" in res.output
    res = CliRunner().invoke(app, ["send", "--state", str(tmp_path / "none.sqlite")], env={"RECNEC_SEND": ""})
    assert res.exit_code == 2 and "--to" in res.output


def test_asking_for_dicom_objects_reprocesses_dicom_studies_only(tmp_path):
    """Turning --dicom-out on changes a DICOM study's fingerprint (it is processed once more, to put
    its lesion on the T1ce frames) and leaves a NIfTI study's alone (README promise)."""
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.fingerprint import study_fingerprint
    from recnec_cli.study import Study

    plain = resolve_settings({}, environ={})
    asked = resolve_settings({"dicom_out": tmp_path / "d"}, environ={})
    via_env = resolve_settings({}, environ={"RECNEC_DICOM_OUT": str(tmp_path / "e")})
    for source, changes in (("dicom", True), ("nifti", False)):
        study = Study(study_id="1.2.3", patient_pseudonym="", source=source, location="", series=())
        fps = [study_fingerprint(study, [], settings=s, model_version="m", key_id="k") for s in (plain, asked, via_env)]
        assert (fps[0] != fps[1]) == changes
        assert fps[1] == fps[2]  # where the folder is does not matter, nor how the setting arrived


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc (an unwritable folder even for root)")
def test_an_unwritable_dicom_out_stops_the_run_before_any_study(tmp_path):
    import nibabel as nib

    studies = tmp_path / "studies"
    (studies / "s1").mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), str(studies / "s1" / "s1_T1w.nii.gz"))
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(tmp_path / "r.csv"),
                                   "--dicom-out", "/proc/recnec-test"])
    assert res.exit_code == 2
    assert "cannot be written" in res.output


def test_an_ipv6_destination_prints_as_it_is_given():
    from recnec_cli.pacs.send import parse_destination

    d = parse_destination("PACS@[::1]:104")
    assert (d.host, d.port) == ("::1", 104)
    assert str(d) == "PACS@[::1]:104" and parse_destination(str(d)) == d
