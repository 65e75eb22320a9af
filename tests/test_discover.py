"""Discovery: headers only, grouping by UIDs whatever the folders (docs/failure-kinds.md kinds 3, 4, 6-10)."""

from __future__ import annotations

import json
import logging

import nibabel as nib
import numpy as np
import pytest

from recnec_cli.config import Settings
from recnec_cli.errors import DiscoveryError
from recnec_cli.stages.discover import discover, pseudonym

from header_corpus import write_enhanced, write_series

S = Settings()


def _only(studies, **kw):
    out = [s for s in studies if all(getattr(s, k) == v for k, v in kw.items())]
    assert len(out) == 1, [s.study_id for s in studies]
    return out[0]


# ---------------------------------------------------------------- kind 8: folders are not studies
def test_two_patients_in_one_folder_and_one_study_over_folders(tmp_path):
    write_series(tmp_path / "mixed", n=12, patient_id="A", study_uid="1.2.3.1", prefix="a")
    write_series(tmp_path / "mixed", n=12, patient_id="B", study_uid="1.2.3.2", prefix="b")
    write_series(tmp_path / "p1" / "s1", n=12, patient_id="C", study_uid="1.2.3.3",
                 series_uid="1.2.3.3.1", prefix="x")
    write_series(tmp_path / "p1" / "s2", n=12, patient_id="C", study_uid="1.2.3.3",
                 series_uid="1.2.3.3.2", prefix="y", series_number=4)
    studies = discover(tmp_path)
    assert len(studies) == 3
    a = _only(studies, study_id="1.2.3.1")
    assert a.patient_pseudonym == pseudonym("A") and len(a.patient_pseudonym) == 12
    assert len(a.series) == 1 and len(a.series[0].files) == 12
    c = _only(studies, study_id="1.2.3.3")
    assert {s.series_id for s in c.series} == {"1.2.3.3.1", "1.2.3.3.2"}
    assert c.location == "p1/s1;p1/s2"


def test_same_study_uid_two_patients_never_mixed(tmp_path):
    write_series(tmp_path / "x", n=12, patient_id="A", study_uid="9.9", prefix="a")
    write_series(tmp_path / "y", n=12, patient_id="B", study_uid="9.9", prefix="b")
    studies = discover(tmp_path)
    assert len(studies) == 2
    assert {s.patient_pseudonym for s in studies} == {pseudonym("A"), pseudonym("B")}
    assert all("#patient=" in s.study_id for s in studies)


# ---------------------------------------------------------------- kind 9: junk next to DICOM
def test_junk_is_skipped_and_counted_preambleless_read(tmp_path):
    d = tmp_path / "study"
    write_series(d, n=12, preamble=False)
    (d / "DICOMDIR").write_bytes(b"\0" * 200)
    (d / "Thumbs.db").write_bytes(b"junk")
    (d / "empty.dcm").write_bytes(b"")
    (d / "report.pdf").write_bytes(b"%PDF-1.4 ...")
    (d / "README").write_text("hello")
    (d / "garbage.dcm").write_bytes(b"\x01" * 500)
    studies = discover(tmp_path)
    assert len(studies) == 1
    st = studies[0]
    assert len(st.series) == 1 and st.series[0].header.n_slices == 12
    assert st.skipped_files == 6


def test_empty_tree_is_a_coded_error(tmp_path):
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 10)
    with pytest.raises(DiscoveryError) as ei:
        discover(tmp_path)
    assert ei.value.code == "NO_IMAGE_DICOM_FOUND" and "1 file" in ei.value.message, ei.value
    with pytest.raises(DiscoveryError) as ei:
        discover(tmp_path / "nope")
    assert ei.value.code == "INPUT_NOT_FOUND"


def test_nifti_folder_without_series_is_no_image_found(tmp_path):
    """NO_IMAGE_DICOM_FOUND names DICOM only: a folder of NIfTI / NRRD masks and labels (no
    series) is NO_IMAGE_FOUND, and a folder whose images are unreadable keeps its study with a
    NO_IMAGE_FOUND issue."""
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 12), np.float32), np.eye(4)),
             str(tmp_path / "lesion_mask.nii.gz"))
    with pytest.raises(DiscoveryError) as ei:
        discover(tmp_path)
    assert ei.value.code == "NO_IMAGE_FOUND" and "masks, labels" in ei.value.message
    (tmp_path / "t1.nii.gz").write_bytes(b"not a nifti at all")
    (st,) = discover(tmp_path)
    assert st.series == () and any(i.startswith("NO_IMAGE_FOUND") for i in st.issues), st.issues


def test_settings_keyword_still_accepted(tmp_path):
    """``settings=`` is ignored but accepted (older callers); the result is the same."""
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 12), np.float32), np.eye(4)), str(tmp_path / "t1.nii"))
    assert discover(tmp_path, settings=S) == discover(tmp_path)


# ---------------------------------------------------------------- kind 6: localizers
@pytest.mark.parametrize("tagged", [True, False])
def test_scouts_inside_a_series_are_removed(tmp_path, tagged):
    uid = "1.2.3.4.5"
    write_series(tmp_path, n=20, series_uid=uid, study_uid="1.1")

    def scout(k, ds):
        if tagged:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]

    write_series(tmp_path, n=3, series_uid=uid, study_uid="1.1", iop=(0, 1, 0, 0, 0, -1),
                 per_slice=scout, prefix="scout")
    (st,) = discover(tmp_path)
    assert len(st.series) == 1
    assert st.series[0].series_id == uid and st.series[0].header.n_slices == 20
    assert any("removed" in i for i in st.issues)


def test_standalone_scout_series_kept_for_the_classifier(tmp_path):
    write_series(tmp_path, n=3, series_uid="7.7", study_uid="1.1", iop=(0, 1, 0, 0, 0, -1),
                 description="localizer")
    (st,) = discover(tmp_path)
    assert len(st.series) == 1 and st.series[0].header.n_slices == 3


# ---------------------------------------------------------------- kind 7 and 3: split / dedupe
def test_two_echoes_under_one_uid_are_split(tmp_path):
    uid = "1.2.3.9"
    write_series(tmp_path, n=15, series_uid=uid, study_uid="1.1", prefix="e1",
                 tags={"EchoTime": 11, "EchoNumbers": 1})
    write_series(tmp_path, n=15, series_uid=uid, study_uid="1.1", prefix="e2", seed=3,
                 tags={"EchoTime": 92, "EchoNumbers": 2})
    (st,) = discover(tmp_path)
    ids = sorted(s.series_id for s in st.series)
    assert ids == [f"{uid}#echo=1", f"{uid}#echo=2"]
    te = {s.series_id: s.header.echo_time_ms for s in st.series}
    assert te[f"{uid}#echo=2"] == 92
    assert all(s.header.n_slices == 15 for s in st.series)


def test_one_uid_per_slice_is_merged(tmp_path):
    def own_uid(k, ds):
        ds.SeriesInstanceUID = f"5.5.{k}"

    write_series(tmp_path, n=12, study_uid="1.1", per_slice=own_uid)
    (st,) = discover(tmp_path)
    assert len(st.series) == 1 and st.series[0].header.n_slices == 12


def test_exact_duplicates_dropped_and_counted(tmp_path):
    paths = write_series(tmp_path, n=12, series_uid="3.3", study_uid="1.1")
    import pydicom

    ds = pydicom.dcmread(paths[5])
    ds.SOPInstanceUID = "3.3.999"  # same slice, new SOPInstanceUID, same IPP/InstanceNumber
    ds.save_as(str(tmp_path / "copy.dcm"))
    (tmp_path / "same_sop.dcm").write_bytes(paths[6].read_bytes())
    (st,) = discover(tmp_path)
    assert st.series[0].header.n_slices == 12 and len(st.series[0].files) == 12
    assert any("2 duplicate instance(s)" in i for i in st.issues)


def test_repeated_positions_without_distinction_stay_and_are_marked(tmp_path):
    write_series(tmp_path, n=12, series_uid="4.4", study_uid="1.1", prefix="a")

    def renumber(k, ds):
        ds.InstanceNumber = 100 + k

    write_series(tmp_path, n=12, series_uid="4.4", study_uid="1.1", prefix="b", seed=5,
                 per_slice=renumber)
    (st,) = discover(tmp_path)
    h = st.series[0].header
    assert h.n_slices == 12 and h.extra.get("stack") == "repeated positions"


# ---------------------------------------------------------------- kind 4: enhanced DICOM
def test_enhanced_frames_indexed_and_two_stacks_split(tmp_path):
    write_enhanced(tmp_path / "a" / "enh.dcm", n=20, second_stack=12)
    (st,) = discover(tmp_path)
    assert len(st.series) == 2
    big = max(st.series, key=lambda s: s.header.n_slices)
    assert big.header.n_slices == 20 and len(big.frames) == 20
    assert big.header.repetition_time_ms == 1800 and big.header.inversion_time_ms == 900
    assert big.header.echo_time_ms == pytest.approx(2.4)
    assert "GR" in big.header.scanning_sequence and "IR" in big.header.scanning_sequence
    assert all("#orient=" in s.series_id for s in st.series)


# ---------------------------------------------------------------- kind 10: foreign instances
def test_foreign_instances_removed(tmp_path):
    uid = "6.6"
    write_series(tmp_path, n=20, series_uid=uid, study_uid="1.1")
    write_series(tmp_path, n=1, rows=24, cols=24, series_uid=uid, study_uid="1.1", prefix="small",
                 per_slice=lambda k, ds: setattr(ds, "InstanceNumber", 99))

    def rgb(k, ds):
        ds.PhotometricInterpretation = "RGB"
        ds.SamplesPerPixel = 3

    write_series(tmp_path, n=1, series_uid=uid, study_uid="1.1", prefix="rgb", per_slice=rgb,
                 iop=(1, 0, 0, 0, 1, 0))
    (st,) = discover(tmp_path)
    assert len(st.series) == 1 and st.series[0].header.n_slices == 20
    assert len(st.series[0].files) == 20
    assert any("non-greyscale" in i for i in st.issues)
    assert any("matrix 24x24" in i for i in st.issues)


# ---------------------------------------------------------------- NIfTI / NRRD folders
def test_nifti_folder_study_masks_and_sidecar(tmp_path):
    d = tmp_path / "sub-01" / "ses-1"
    d.mkdir(parents=True)
    img = nib.Nifti1Image(np.zeros((8, 8, 12), np.float32), np.eye(4))
    for name in ("sub-01_T1w.nii.gz", "sub-01_ce-gadolinium_T1w.nii.gz", "sub-01_T2w.nii",
                 "lesion_mask.nii.gz", "sub-01_brain_mask.nii.gz", "bet_t1c_mask.nii.gz",
                 "sub-01_seg.nii.gz"):
        nib.save(img, str(d / name))
    (d / "sub-01_T2w.json").write_text(json.dumps(
        {"RepetitionTime": 5.0, "EchoTime": 0.1, "SeriesDescription": "t2_tse_tra",
         "ScanningSequence": "SE", "MRAcquisitionType": "2D"}))
    (st,) = discover(tmp_path)
    assert st.study_id == "sub-01/ses-1" and st.source == "nifti"
    assert st.lesion_mask == d / "lesion_mask.nii.gz"
    ids = sorted(s.series_id for s in st.series)
    assert ids == ["sub-01/ses-1/sub-01_T1w.nii.gz", "sub-01/ses-1/sub-01_T2w.nii",
                   "sub-01/ses-1/sub-01_ce-gadolinium_T1w.nii.gz"]
    t2 = next(s for s in st.series if "T2w" in s.series_id)
    assert t2.sidecar is not None and t2.header.repetition_time_ms == pytest.approx(5000)
    assert t2.header.echo_time_ms == pytest.approx(100) and t2.header.series_description == "t2_tse_tra"
    t1 = next(s for s in st.series if s.series_id.endswith("_T1w.nii.gz") and "ce-" not in s.series_id)
    assert t1.header.n_slices == 12 and t1.header.series_description == "sub-01_T1w"


def test_nifti_4d_header_facts(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 12, 40), np.float32), np.eye(4)),
             str(tmp_path / "perf.nii.gz"))
    (st,) = discover(tmp_path)
    assert st.series[0].header.n_temporal == 40 and st.series[0].header.n_slices == 12


# ---------------------------------------------------------------- PHI
def test_no_raw_patient_id_in_info_logs(tmp_path, caplog):
    write_series(tmp_path, n=12, patient_id="SECRET-PID-777")
    with caplog.at_level(logging.INFO, logger="recnec_cli"):
        studies = discover(tmp_path)
    assert "SECRET-PID-777" not in caplog.text and "Test^Person" not in caplog.text
    assert all("SECRET" not in s.study_id + s.patient_pseudonym for s in studies)


# ---------------------------------------------------------------- real cases
def test_real_tree(real):
    studies = discover(real)
    by_loc = {s.location.split("/")[0].split(";")[0]: s for s in studies}
    phantom = by_loc["dicom_siemens_pd_t2_dualecho_phantom"]
    assert sorted(s.series_id.split("#")[1] for s in phantom.series) == ["echo=1", "echo=2"]
    ts = by_loc["dicom_transfer_syntax_variants"]
    assert len(ts.series) == 1 and any("8 duplicate" in i for i in ts.issues)
    enh = by_loc["dicom_siemens_xa30_enhanced_t1"]
    h = enh.series[0].header
    assert (h.repetition_time_ms, h.echo_time_ms, h.inversion_time_ms) == (1800, 2.41, 900)
    assert h.n_slices == 96
    vs = by_loc["dicom_tcia_vs_seg_001_t1ce_siemens_j2k"]
    assert vs.series[0].header.n_slices == 120 and vs.series[0].header.slice_spacing_mm == \
        pytest.approx(1.5, abs=0.01)
    tcga = by_loc["nifti_tcga_fg_6692_lgg_siemens"]
    assert len(tcga.series) == 4 and tcga.lesion_mask is None  # the brain mask is not a series
    nrrd_ = by_loc["nrrd_pyradiomics_brain1_brain2"]
    assert len(nrrd_.series) == 2 and nrrd_.lesion_mask is not None
    assert nrrd_.lesion_mask.name == "brain1_label.nrrd"
    loc = by_loc["dicom_siemens_xa30_localizers"]
    assert len(loc.series) == 3 and all(s.header.n_slices <= 5 for s in loc.series)
