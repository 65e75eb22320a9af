"""Conversion: geometry checks, decoders, scaling, 4D/singletons (docs/failure-kinds.md kinds 1-5, 10, 11,
13, 14, 20)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from recnec_cli.config import Settings
from recnec_cli.errors import ConversionError
from recnec_cli.stages.convert import MIN_SLICES, convert_series, read_image_file
from recnec_cli.stages.discover import discover

from header_corpus import phantom, write_enhanced, write_series

S = Settings()


def _one_series(root: Path):
    (st,) = discover(root)
    assert len(st.series) == 1, [s.series_id for s in st.series]
    return st.series[0]


def _code(series, settings=S) -> ConversionError:
    with pytest.raises(ConversionError) as ei:
        convert_series(series, settings=settings)
    return ei.value


def test_axial_stack_is_canonical_and_exact(tmp_path):
    pix = phantom(20)
    write_series(tmp_path, n=20, spacing=2.0, pixel=0.5, pixels=pix)
    v = convert_series(_one_series(tmp_path), settings=S)
    assert v.data.dtype == np.float32 and v.data.shape == (32, 32, 20)
    assert v.spacing_mm == pytest.approx((0.5, 0.5, 2.0))
    # DICOM LPS axial (row cosine +x = patient Left): canonical RAS flips i and j
    assert np.allclose(np.diag(v.affine)[:3], [0.5, 0.5, 2.0])
    # voxel (i, j, k) of RAS = DICOM pixel (row=31-j, col=31-i) of slice k
    assert v.data[31 - 3, 31 - 7, 5] == pix[5, 7, 3]
    # world position of a voxel equals the DICOM position converted to RAS
    i, j, k = 4, 9, 11
    world = v.affine @ [i, j, k, 1]
    dicom_lps = np.array([(31 - i) * 0.5, (31 - j) * 0.5, k * 2.0])
    assert world[:3] == pytest.approx([-dicom_lps[0], -dicom_lps[1], dicom_lps[2]])
    assert not v.flags


def test_files_are_not_modified(tmp_path):
    paths = write_series(tmp_path, n=12)
    before = {p: p.read_bytes() for p in paths}
    convert_series(_one_series(tmp_path), settings=S)
    assert all(p.read_bytes() == b for p, b in before.items())


def test_gantry_tilt_fails_with_angle(tmp_path):  # kind 1
    write_series(tmp_path, n=20, tilt_deg=15, tags={"GantryDetectorTilt": 15})
    e = _code(_one_series(tmp_path))
    assert e.code == "GANTRY_TILT" and "15.0 deg" in e.message


def test_missing_slice_named(tmp_path):  # kind 2
    write_series(tmp_path, n=20, drop=[7])
    e = _code(_one_series(tmp_path))
    assert e.code == "MISSING_SLICES"
    assert "between slices 6 and 7" in e.message and "about 1 slice(s) missing" in e.message


def test_same_position_different_pixels_is_ambiguous(tmp_path):  # kind 3, no echo tags differ
    write_series(tmp_path, n=12, series_uid="4.4", study_uid="1.1", prefix="a")
    write_series(tmp_path, n=12, series_uid="4.4", study_uid="1.1", prefix="b", seed=5,
                 per_slice=lambda k, ds: setattr(ds, "InstanceNumber", 100 + k))
    assert _code(_one_series(tmp_path)).code == "AMBIGUOUS_STACK"


def test_4d_by_temporal_tags_is_not_3d(tmp_path):  # kind 13 (DICOM perfusion)
    for t in range(3):
        write_series(tmp_path, n=12, series_uid="8.8", study_uid="1.1", prefix=f"t{t}",
                     tags={"TemporalPositionIdentifier": t + 1, "AcquisitionNumber": t + 1})
    s = _one_series(tmp_path)
    assert s.header.n_temporal == 3
    assert _code(s).code == "NOT_3D"


def test_enhanced_frames_sorted_by_position(tmp_path):  # kind 4
    write_enhanced(tmp_path / "enh.dcm", n=20, shuffle=True)
    v = convert_series(_one_series(tmp_path), settings=S)
    ref = phantom(20, 24, 24)
    # canonical RAS: k increases superior = IPP z increasing; i, j flipped from LPS
    assert v.data.shape == (24, 24, 20)
    assert np.array_equal(v.data[::-1, ::-1, :].transpose(2, 1, 0), ref.astype(np.float32))


def test_enhanced_two_stacks_convert_separately(tmp_path):
    """One Enhanced file holding a 20-frame axial and a 12-frame sagittal stack (shuffled): discovery
    splits it into two series and each converts to its own canonical RAS+ volume with its own
    pixels and geometry (docs/failure-kinds.md kind 4)."""
    write_enhanced(tmp_path / "enh.dcm", n=20, second_stack=12, shuffle=True)
    (st,) = discover(tmp_path)
    by_n = {s.header.n_slices: s for s in st.series}
    assert sorted(by_n) == [12, 20] and len(st.series) == 2
    assert sorted(by_n[20].frames + by_n[12].frames) == list(range(32))  # every frame used once
    ref = phantom(32, 24, 24).astype(np.float32)  # (frame k, row, col); k < 20 axial, k >= 20 sagittal
    axial = convert_series(by_n[20], settings=S)
    sagittal = convert_series(by_n[12], settings=S)
    # axial, IOP (1,0,0)/(0,1,0), IPP z = k: RAS flips i, j; k increases superior
    assert axial.data.shape == (24, 24, 20)
    assert np.array_equal(axial.data[::-1, ::-1, :].transpose(2, 1, 0), ref[:20])
    # sagittal, IOP (0,1,0)/(0,0,-1), IPP x = k - 20: LPS (x, y, z) of pixel (r, c) of frame s is
    # (s, c, -r), so RAS i = 11 - s, j = 23 - c, k = 23 - r
    assert sagittal.data.shape == (12, 24, 24)
    assert np.array_equal(sagittal.data[::-1, ::-1, ::-1].transpose(0, 2, 1), ref[20:])
    assert sagittal.spacing_mm == pytest.approx((1.0, 1.0, 1.0))
    s, r, c = 3, 5, 17  # a voxel's world position is the DICOM position converted to RAS
    world = sagittal.affine @ [11 - s, 23 - c, 23 - r, 1]
    assert world[:3] == pytest.approx([-float(s), -float(c), -float(r)])


def test_raw_bytes_claiming_jpeg_fail_decoding(tmp_path):  # kind 5
    from pydicom.uid import JPEGBaseline8Bit

    def fake_jpeg(k, ds):
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        from pydicom.encaps import encapsulate

        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    write_series(tmp_path, n=12, per_slice=fake_jpeg)
    e = _code(_one_series(tmp_path))
    assert e.code == "PIXEL_DECODE_FAILED"


@pytest.mark.parametrize("implicit", [True, False])
def test_preambleless_dicom_decodes(tmp_path, implicit):  # kind 9: no preamble, no file meta
    import pydicom
    from pydicom.dataset import FileMetaDataset

    from recnec_cli.stages.convert import _dicom_volume

    pix = phantom(12)
    paths = write_series(tmp_path / "ref", n=12, pixels=pix)
    raw_dir = tmp_path / "raw"
    raw_dir.mkdir()
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(str(p))
        ds.file_meta, ds.preamble = FileMetaDataset(), None
        out = raw_dir / f"IM{k + 1:05d}.dcm"
        pydicom.dcmwrite(str(out), ds, implicit_vr=implicit, little_endian=True,
                         enforce_file_format=False)
        raw = out.read_bytes()
        assert raw[128:132] != b"DICM" and b"\x02\x00\x10\x00" not in raw[:256]
    ref = convert_series(_one_series(tmp_path / "ref"), settings=S)
    series = _one_series(raw_dir)
    v = convert_series(series, settings=S)  # dicom2nifti path
    assert np.array_equal(v.data, ref.data) and np.allclose(v.affine, ref.affine)
    own, _, _, _ = _dicom_volume(series, S, own=True)  # recnec's own assembly
    d2n, _, _, _ = _dicom_volume(series, S)
    assert np.array_equal(own, d2n)
    assert all(p.read_bytes()[128:132] != b"DICM" for p in raw_dir.iterdir())  # not rewritten


def test_constant_image_rejected(tmp_path):  # kind 5
    write_series(tmp_path, n=12, pixels=np.zeros((12, 32, 32), np.uint16))
    assert _code(_one_series(tmp_path)).code == "CONSTANT_IMAGE"


def test_missing_geometry(tmp_path):  # kind 10
    def no_ipp(k, ds):
        if k == 4:
            del ds.ImagePositionPatient

    write_series(tmp_path, n=12, per_slice=no_ipp)
    e = _code(_one_series(tmp_path))
    assert e.code == "MISSING_GEOMETRY"


def test_per_slice_scaling_applied(tmp_path):  # kind 11
    pix = phantom(12)

    def slopes(k, ds):
        ds.RescaleSlope = 2.36 if k % 2 else 1.18
        ds.RescaleIntercept = 0
        ds.add_new((0x2005, 0x100E), "FL", 0.0075)

    write_series(tmp_path, n=12, pixels=pix, per_slice=slopes)
    v = convert_series(_one_series(tmp_path), settings=S)
    lps = v.data[::-1, ::-1, :].transpose(2, 1, 0)
    for k in (2, 3):
        assert np.allclose(lps[k], pix[k] * (2.36 if k % 2 else 1.18), rtol=1e-5)
    assert "PER_SLICE_SCALING" in v.flags
    assert any("2005,100E" in n for n in v.notes)


def test_instance_numbers_do_not_order_the_stack(tmp_path):
    """dicom2nifti's entry points group slices by InstanceNumber and call a valid stack 4D when
    positions do not rise with it; recnec hands its assembly functions the position order."""
    pix = phantom(20)
    write_series(tmp_path / "a", n=20, pixels=pix,
                 per_slice=lambda k, ds: setattr(ds, "InstanceNumber", (k % 2) * 10 + k // 2 + 1))
    write_series(tmp_path / "b", n=20, pixels=pix,
                 per_slice=lambda k, ds: delattr(ds, "InstanceNumber"))
    for sub in ("a", "b"):
        v = convert_series(_one_series(tmp_path / sub), settings=S)
        assert v.data.shape == (32, 32, 20)
        assert np.array_equal(v.data[::-1, ::-1, :].transpose(2, 1, 0), pix.astype(np.float32))


def test_no_files_written_and_dicom2nifti_settings_untouched(tmp_path, monkeypatch):
    import tempfile

    import dicom2nifti.settings as d2n_settings

    def refuse(*a, **k):
        raise AssertionError("conversion tried to write a file")

    for name in ("mkdtemp", "mkstemp", "NamedTemporaryFile", "TemporaryDirectory"):
        monkeypatch.setattr(tempfile, name, refuse)
    monkeypatch.setattr(nib.Nifti1Image, "to_filename", refuse)
    monkeypatch.setattr(nib, "save", refuse)
    before = {k: v for k, v in vars(d2n_settings).items() if isinstance(v, (bool, int, float))}
    write_series(tmp_path / "c", n=12)
    write_enhanced(tmp_path / "e" / "enh.dcm", n=20, shuffle=False)
    for sub in ("c", "e"):
        v = convert_series(_one_series(tmp_path / sub), settings=S)
        assert any("assembled by dicom2nifti" in n for n in v.notes), v.notes
    assert {k: v for k, v in vars(d2n_settings).items()
            if isinstance(v, (bool, int, float))} == before


def test_enhanced_assembly_choice(tmp_path):  # kind 4
    """Whole single-stack file stored in slice order -> dicom2nifti; shuffled frames or a frame
    subset (one of two stacks) -> recnec's own assembly, same voxels as the ordered file."""
    ref = phantom(20, 24, 24).astype(np.float32)
    vols = {}
    for name, kw in (("ordered", {"shuffle": False}), ("shuffled", {"shuffle": True})):
        write_enhanced(tmp_path / name / "enh.dcm", n=20, **kw)
        vols[name] = convert_series(_one_series(tmp_path / name), settings=S)
    assert any("dicom2nifti" in n for n in vols["ordered"].notes)
    assert any("not stored in slice order" in n for n in vols["shuffled"].notes)
    for v in vols.values():
        assert np.array_equal(v.data[::-1, ::-1, :].transpose(2, 1, 0), ref)
    assert np.allclose(vols["ordered"].affine, vols["shuffled"].affine)
    write_enhanced(tmp_path / "two" / "enh.dcm", n=20, second_stack=12, shuffle=False)
    (st,) = discover(tmp_path / "two")
    (s,) = [s for s in st.series if s.header.n_slices == 20]
    v = convert_series(s, settings=S)
    assert any("20 of the file's 32 frames" in n for n in v.notes), v.notes


def test_enhanced_dicom2nifti_failure_falls_back(tmp_path):
    """FrameContentSequence without InStackPositionNumber makes dicom2nifti's multiframe_to_block
    raise AttributeError; the pixels decode, so recnec's own assembly takes over."""
    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    path = write_enhanced(tmp_path / "enh.dcm", n=20, shuffle=False)
    ds = pydicom.dcmread(str(path))
    for k, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        content = Dataset()
        content.FrameAcquisitionNumber = k + 1
        item.FrameContentSequence = Sequence([content])
    ds.save_as(str(path))
    v = convert_series(_one_series(tmp_path), settings=S)
    assert any("dicom2nifti failed (AttributeError" in n for n in v.notes), v.notes
    ref = phantom(20, 24, 24).astype(np.float32)
    assert np.array_equal(v.data[::-1, ::-1, :].transpose(2, 1, 0), ref)


def test_unknown_transfer_syntax_unsupported(tmp_path):  # kind 5
    def mpeg(k, ds):
        from pydicom.encaps import encapsulate

        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 MP@ML
        ds.PixelData = encapsulate([b"\x00" * 64])
        ds["PixelData"].VR = "OB"

    write_series(tmp_path, n=12, per_slice=mpeg)
    assert _code(_one_series(tmp_path)).code == "UNSUPPORTED_TRANSFER_SYNTAX"


def test_nifti_singleton_4th_dim_squeezed_and_scaled(tmp_path):  # kind 13
    data = np.arange(8 * 9 * 12, dtype=np.uint8).reshape(8, 9, 12, 1) % 200
    img = nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0]))
    img.header.set_slope_inter(2.5, 10)
    nib.save(img, str(tmp_path / "t1.nii.gz"))
    v = convert_series(_one_series(tmp_path), settings=S)
    assert v.data.shape == (8, 9, 12)
    assert v.affine[0, 0] == pytest.approx(1.0)  # canonical: x flipped to +R
    assert v.data[7, 0, 0] == pytest.approx(data[0, 0, 0, 0] * 2.5 + 10)


def test_nifti_4d_not_3d(tmp_path):  # kind 13
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 12, 40).astype(np.float32), np.eye(4)),
             str(tmp_path / "perf.nii.gz"))
    e = _code(_one_series(tmp_path))
    assert e.code == "NOT_3D"


def _write_nrrd(path: Path, data: np.ndarray, direction_lps: np.ndarray, spacing, origin_lps):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(v) for v in spacing))
    img.SetDirection(tuple(float(v) for v in np.asarray(direction_lps, dtype=float).ravel()))
    img.SetOrigin(tuple(float(v) for v in origin_lps))
    sitk.WriteImage(img, str(path))


def test_nrrd_lps_to_canonical_ras(tmp_path):
    """An LPS-stored NRRD: voxel (i, j, k) at LPS origin + i*dx*L + ...; after conversion the
    axes are RAS+ and the world position of every voxel is unchanged."""
    data = np.random.default_rng(0).random((10, 11, 12)).astype(np.float32)
    _write_nrrd(tmp_path / "t1.nrrd", data, np.eye(3), (0.9, 1.1, 2.0), (5.0, -7.0, 3.0))
    v = convert_series(_one_series(tmp_path), settings=S)
    assert v.data.shape == (10, 11, 12)
    assert np.allclose(np.diag(v.affine)[:3], [0.9, 1.1, 2.0])  # +L, +P flipped to +R, +A
    # stored voxel (0, 0, 0) sits at LPS (5, -7, 3) = RAS (-5, 7, 3); canonical index (9, 10, 0)
    assert np.allclose(v.affine @ [9, 10, 0, 1], [-5.0, 7.0, 3.0, 1.0])
    assert v.data[9, 10, 0] == pytest.approx(data[0, 0, 0])
    m = read_image_file(tmp_path / "t1.nrrd")
    assert np.array_equal(m.affine, v.affine) and np.array_equal(m.data, v.data)


def test_read_image_file_nifti_and_non_3d(tmp_path):
    data = np.zeros((8, 9, 12, 1), np.uint8)
    data[2:5, 3:6, 4:8] = 1
    nib.save(nib.Nifti1Image(data, np.diag([-1.0, 1.0, 2.0, 1.0])), str(tmp_path / "m.nii.gz"))
    m = read_image_file(tmp_path / "m.nii.gz")
    assert m.data.shape == (8, 9, 12) and m.data.dtype == np.float32 and m.series_id == "m.nii.gz"
    assert m.affine[0, 0] == pytest.approx(1.0) and m.data.sum() == 36
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 12, 3), np.float32), np.eye(4)),
             str(tmp_path / "four.nii.gz"))
    with pytest.raises(ConversionError) as ei:
        read_image_file(tmp_path / "four.nii.gz")
    assert ei.value.code == "NOT_3D" and "four.nii.gz" in ei.value.message
    _write_nrrd(tmp_path / "flat.nrrd", np.zeros((8, 8, 1), np.float32), np.eye(3), (1, 1, 1),
                (0, 0, 0))
    assert read_image_file(tmp_path / "flat.nrrd").data.shape == (8, 8, 1)  # 3D, one slice


def test_real_nrrd_label_on_its_image_grid(real):
    """pyradiomics brain1: the label map has the image's size, spacing, origin and direction, so
    the user-mask reader and the series conversion must give the same grid (it was refused
    LESION_MASK_GRID_MISMATCH: the mask came back in stored LPS order, the series canonical)."""
    folder = real / "nrrd_pyradiomics_brain1_brain2"
    (st,) = discover(folder)
    (series,) = [s for s in st.series if s.series_id.endswith("brain1_image.nrrd")]
    v = convert_series(series, settings=S)
    m = read_image_file(folder / "brain1_label.nrrd")
    assert m.data.shape == v.data.shape
    assert np.allclose(m.affine, v.affine, atol=1e-6), (m.affine, v.affine)
    assert m.data.max() > 0 and set(np.unique(m.data)) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0}


def test_thick_2d_spacing_from_positions_and_anisotropic(tmp_path):  # kind 14
    write_series(tmp_path, n=24, spacing=5.0, step=6.0, pixel=0.9,
                 tags={"MRAcquisitionType": "2D"})
    s = _one_series(tmp_path)
    assert s.header.slice_spacing_mm == pytest.approx(6.0)
    v = convert_series(s, settings=S)
    assert v.spacing_mm[2] == pytest.approx(6.0)
    assert "ANISOTROPIC" in v.flags
    v2 = convert_series(s, settings=replace(S, anisotropy_limit=10.0))
    assert "ANISOTROPIC" not in v2.flags


def test_too_few_slices_and_too_large(tmp_path):  # kind 20
    write_series(tmp_path / "a", n=MIN_SLICES - 1)
    assert _code(_one_series(tmp_path / "a")).code == "TOO_FEW_SLICES"
    write_series(tmp_path / "b", n=12)
    e = _code(_one_series(tmp_path / "b"), settings=replace(S, max_series_voxels=1000))
    assert e.code == "SERIES_TOO_LARGE"


# ---------------------------------------------------------------- real cases
def _series_of(real: Path, case: str):
    (st,) = discover(real / case)
    return st


def test_real_transfer_syntaxes_decode_identically(real):
    """The nine encodings of one EPI mosaic (dcm_qa_ts) give the same pixels (docs/failure-kinds.md kind 5)."""
    import pydicom

    from recnec_cli.stages.convert import _decode

    arrays = []
    for p in sorted((real / "dicom_transfer_syntax_variants").glob("*.dcm")):
        ds = pydicom.dcmread(str(p))
        arrays.append(_decode(ds, p).astype(np.int32))
    assert len(arrays) == 9
    assert all(np.array_equal(a, arrays[0]) for a in arrays[1:])
    st = _series_of(real, "dicom_transfer_syntax_variants")
    assert _code(st.series[0]).code == "NOT_3D"  # mosaic EPI is never a volume


@pytest.mark.parametrize("case,n_series", [
    ("dicom_siemens_e11_t1_fl2d_sag", 1),
    ("dicom_siemens_pd_t2_dualecho_phantom", 2),  # split by discovery into two echo series
    ("dicom_philips_elition_t1_mprage", 1),  # RescaleSlope + private (2005,100E) scale
    ("dicom_siemens_xa30_enhanced_t1", 1),  # whole Enhanced file, frames stored descending
    pytest.param("dicom_tcia_vs_seg_001_t1ce_siemens_j2k", 1, marks=pytest.mark.slow),
    pytest.param("dicom_uih_umr770_t1_3d_j2k", 1, marks=pytest.mark.slow),
])
def test_real_dicom2nifti_assembly_equals_own(real, case, n_series):
    """Regression: dicom2nifti's assembly (run time) against recnec's own stack assembly (the
    code it replaced, kept for Enhanced frame subsets): voxels equal, affine within 1e-3 mm."""
    from recnec_cli.stages.convert import _dicom_volume

    st = _series_of(real, case)
    assert len(st.series) == n_series
    for s in st.series:
        data, aff, flags, notes = _dicom_volume(s, S)
        ref, ref_aff, ref_flags, _ = _dicom_volume(s, S, own=True)
        assert any("assembled by dicom2nifti" in n for n in notes), notes
        assert data.dtype == np.float32 and data.shape == ref.shape
        assert np.array_equal(data, ref)
        assert np.allclose(aff, ref_aff, atol=1e-3)
        assert flags == ref_flags


def test_real_equals_dicom2nifti_entry_point(real):
    """On a plain stack our calls give what dicom2nifti's public entry point gives, in memory
    (no output file), once canonicalised."""
    import pydicom
    from dicom2nifti.convert_dicom import dicom_array_to_nifti

    s = _series_of(real, "dicom_siemens_e11_t1_fl2d_sag").series[0]
    v = convert_series(s, settings=S)
    assert v.data.shape == (35, 256, 256) and "ANISOTROPIC" in v.flags
    out = dicom_array_to_nifti([pydicom.dcmread(str(p)) for p in s.files], None,
                               reorient_nifti=False)
    ref = nib.as_closest_canonical(out["NII"])
    assert out["NII_FILE"] is None
    assert np.allclose(ref.affine, v.affine, atol=1e-3)
    assert np.array_equal(np.asarray(ref.dataobj, dtype=np.float32), v.data)


@pytest.mark.parametrize("case,shape,code", [
    ("dicom_siemens_xa30_enhanced_t1", (96, 128, 128), None),  # sagittal
    ("dicom_philips_elition_t1_mprage", (170, 256, 256), None),
    ("nifti_niivue_mr_gd_skullstripped", (176, 188, 144), None),
    ("dicom_siemens_xa30_localizers", None, "TOO_FEW_SLICES"),
])
def test_real_cases_convert(real, case, shape, code):
    st = _series_of(real, case)
    s = st.series[0]
    if code:
        assert _code(s).code == code
        return
    v = convert_series(s, settings=S)
    assert v.data.shape == shape and v.data.dtype == np.float32
    assert np.isfinite(v.data).all() and v.data.max() > 0


def test_real_vendor_stubs_too_few_slices(real):
    st_all = discover(real / "dicom_dicom2nifti_vendor_stubs")
    codes = set()
    for st in st_all:
        for s in st.series:
            codes.add(_code(s).code)
    assert codes == {"TOO_FEW_SLICES"}


def test_real_dual_echo_split_volumes(real):
    st = _series_of(real, "dicom_siemens_pd_t2_dualecho_phantom")
    vols = {s.series_id.split("#")[1]: convert_series(s, settings=S) for s in st.series}
    assert vols["echo=1"].data.shape == vols["echo=2"].data.shape == (35, 64, 64)
    assert np.allclose(vols["echo=1"].affine, vols["echo=2"].affine)
    # the TE 92 echo is darker overall than the TE 11 echo (T2 decay)
    assert vols["echo=2"].data.mean() < vols["echo=1"].data.mean()


def test_decoder_report_covers_common_syntaxes():
    from recnec_cli.stages.convert import decoder_report

    rep = decoder_report()
    assert rep["JPEG 2000 Lossless"] and rep["RLE Lossless"] and rep["JPEG-LS Lossless"]
