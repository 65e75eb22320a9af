"""Broken inputs are never silently wrong (issue 23): each kind a new user tried, built here.

1. NaN / Inf voxels in a NIfTI T1ce or T2: a few are set to the background and flagged
   ``NONFINITE_VOXELS_REPLACED`` (in the report as ``<role>:NONFINITE_VOXELS_REPLACED``), many fail
   ``NONFINITE_VOXELS``.
2. NaN / infinite NIfTI scaling factors: ``BAD_SCALING`` naming the field, in the report row
   (not ``MISSING_ROLE`` "unreadable image header").
3. A NIfTI whose qform and sform disagree by a left-right flip: the sform is used (NIfTI-1 and
   nibabel rule) and the study is flagged ``QFORM_SFORM_DISAGREE``, never mirrored silently.
4. Background stored as int16 -32768: DICOM PixelPaddingValue / PixelPaddingRangeLimit honoured
   before rescale, and the same fill value in a NIfTI without any tag, become the background
   (``PADDING_AS_BACKGROUND``).

Inputs are built in the tests (nibabel, pydicom, numpy): the small DICOM writer of
``header_corpus`` and the phantom head of ``phantoms`` (whose studies run through every real
stage but HD-BET, replaced by :class:`phantoms.FakeHdBet`).
"""

from __future__ import annotations

import gzip
import io
import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from recnec_cli.config import Settings, resolve_settings
from recnec_cli.errors import ConversionError
from recnec_cli.stages.convert import convert_series, read_image_file
from recnec_cli.stages.discover import discover

import phantoms
from header_corpus import phantom, write_series

S = Settings()
T1CE = "sub-01_ce-gadolinium_T1w.nii.gz"
T2 = "sub-01_T2w.nii.gz"


def _one_series(root: Path):
    (st,) = discover(root)
    assert len(st.series) == 1, [s.series_id for s in st.series]
    return st.series[0]


def _head(shape=(32, 32, 20)) -> np.ndarray:
    """float32 ``shape``: the ellipsoid head of :func:`header_corpus.phantom` (0-20 outside,
    800-1820 inside), as NIfTI axis order ``(X, Y, Z)``."""
    return phantom(shape[2], shape[1], shape[0]).transpose(2, 1, 0).astype(np.float32)


def _patch_nifti_header(path: Path, **fields) -> None:
    """Set raw header ``fields`` of a saved NIfTI-1 file (nibabel recomputes scaling when it saves
    an image, so broken factors are written into the bytes)."""
    gz = path.name.endswith(".gz")
    raw = gzip.decompress(path.read_bytes()) if gz else path.read_bytes()
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(raw), check=False)
    for key, value in fields.items():
        hdr[key] = value
    raw = hdr.binaryblock + raw[hdr.sizeof_hdr:]
    path.write_bytes(gzip.compress(raw) if gz else raw)


def _phantom_row(root: Path, edit=None):
    """Write the phantom study ``root/sub-01``, let ``edit(folder)`` break it, run it through
    every stage but inference (HD-BET faked) and return its report row."""
    from recnec_cli.orchestration.pipeline import Resources, process_study
    from recnec_cli.orchestration.report import result_row

    folder = phantoms.write_phantom_study(root, "sub-01")
    if edit is not None:
        edit(folder)
    settings = resolve_settings({"device": "cpu"}, environ={})
    res = Resources.load(settings, need_model=False, need_hdbet=False)
    res.hdbet = phantoms.FakeHdBet()
    (study,) = discover(root, settings=settings)
    r = process_study(study, settings=settings, resources=res)
    return result_row(r, threshold=None, model_version="")


def _resave(path: Path, change) -> None:
    """Load ``path``, ``change(data)`` in place (float32), save it with the same affine."""
    img = nib.load(str(path))
    data = np.asarray(img.get_fdata(dtype=np.float32))
    change(data)
    nib.save(nib.Nifti1Image(data, img.affine), str(path))


def _nan_block_and_inf(data: np.ndarray) -> None:
    """A 4 x 4 x 4 block of NaN and one +Inf inside the phantom's brain, away from its lesion."""
    data[30:34, 30:34, 20:24] = np.nan
    data[40, 40, 26] = np.inf


# ---- 1. non-finite voxels --------------------------------------------------------------------
@pytest.mark.parametrize("file, role", [(T1CE, "T1ce"), (T2, "T2")])
def test_nonfinite_voxels_replaced_and_in_the_report(tmp_path, caplog, file, role):
    caplog.set_level(logging.WARNING, logger="recnec_cli")
    row = _phantom_row(tmp_path, lambda f: _resave(f / file, _nan_block_and_inf))
    assert row["status"] == "OK", (row["error_code"], row["error_message"])
    assert f"{role}:NONFINITE_VOXELS_REPLACED" in row["flags"].split()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("NONFINITE_VOXELS_REPLACED" in m and "65 NaN / infinite" in m for m in warned), warned
    assert not any(file in m for m in warned)  # file names only at DEBUG


def test_few_nonfinite_voxels_become_the_background(tmp_path):
    data = _head()
    data[14:18, 14:18, 8:12] = np.nan  # 64 of 20,480 voxels, inside the head
    data[20, 20, 10] = -np.inf
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1ce.nii.gz"))
    v = convert_series(_one_series(tmp_path), settings=S)
    assert np.all(np.isfinite(v.data)) and "NONFINITE_VOXELS_REPLACED" in v.flags
    background = float(np.nanmin(data[np.isfinite(data)]))
    assert np.count_nonzero(v.data == background) >= 65


def test_many_nonfinite_voxels_fail(tmp_path):
    data = _head()
    data[8:24, 8:24, 5:15] = np.nan  # 2,560 of 20,480 voxels: 12.5 %
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t2.nii.gz"))
    with pytest.raises(ConversionError) as ei:
        convert_series(_one_series(tmp_path), settings=S)
    assert ei.value.code == "NONFINITE_VOXELS" and "12.5%" in ei.value.message


# ---- 2. scaling factors ----------------------------------------------------------------------
def test_nan_scl_inter_is_bad_scaling_in_the_report(tmp_path):
    row = _phantom_row(tmp_path, lambda f: _patch_nifti_header(f / T1CE, scl_slope=1.0,
                                                                scl_inter=np.nan))
    assert (row["status"], row["error_code"], row["failed_stage"]) == \
        ("BAD_SCALING", "BAD_SCALING", "convert"), row["error_message"]
    assert "scl_inter is nan" in row["error_message"] and "T1ce series" in row["error_message"]


@pytest.mark.parametrize("slope, inter, words", [
    (1.0, np.nan, "scl_inter is nan"), (1.0, np.inf, "scl_inter is inf"),
    (np.nan, 0.0, "scl_slope is nan"), (np.inf, 0.0, "scl_slope is inf"),
    (1e38, 0.0, "beyond the float32 range")])
def test_broken_scaling_factors(tmp_path, slope, inter, words):
    data = np.round(_head()).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1.nii"))
    _patch_nifti_header(tmp_path / "t1.nii", scl_slope=slope, scl_inter=inter)
    with pytest.raises(ConversionError) as ei:
        convert_series(_one_series(tmp_path), settings=S)
    assert ei.value.code == "BAD_SCALING" and words in ei.value.message


@pytest.mark.parametrize("slope, inter, factor", [(np.nan, np.nan, 1.0), (0.0, 5.0, 1.0),
                                                  (2.0, 0.0, 2.0)])
def test_valid_scaling_conventions(tmp_path, slope, inter, factor):
    """NaN slope and NaN intercept together (how nibabel writes unscaled images) and slope 0
    (NIfTI-1: no scaling) are no scaling; a finite slope is applied."""
    data = np.round(_head()).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1.nii"))
    _patch_nifti_header(tmp_path / "t1.nii", scl_slope=slope, scl_inter=inter)
    v = convert_series(_one_series(tmp_path), settings=S)
    assert v.data.max() == pytest.approx(factor * data.max())


# ---- 3. qform / sform ------------------------------------------------------------------------
def _flip_qform(path: Path) -> np.ndarray:
    """Rewrite ``path`` with its affine as sform (code 1) and a left-right mirrored qform (code
    1); return the sform."""
    img = nib.load(str(path))
    aff = np.asarray(img.affine, dtype=float)
    nx = img.shape[0]
    mirror = np.array([[-1.0, 0, 0, nx - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    out = nib.Nifti1Image(np.asarray(img.dataobj), aff)
    out.set_sform(aff, code=1)
    out.set_qform(aff @ mirror @ np.diag([-1.0, 1, 1, 1]) @ mirror, code=1)  # x axis reversed
    nib.save(out, str(path))
    back = nib.load(str(path)).header
    assert nib.aff2axcodes(back.get_qform())[0] != nib.aff2axcodes(back.get_sform())[0]
    return aff


def test_qform_sform_flip_uses_sform_and_is_flagged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recnec_cli")
    data = _head()
    data[:8] += 500.0  # a bright left side (low x = towards Left): a mirror would show it
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "t1ce.nii.gz"))
    sform = _flip_qform(tmp_path / "t1ce.nii.gz")
    v = convert_series(_one_series(tmp_path), settings=S)
    assert "QFORM_SFORM_DISAGREE" in v.flags
    assert np.allclose(v.affine, sform)
    assert v.data[0, 16, 10] > 400 and v.data[31, 16, 10] < 100  # bright side stays left
    assert any("QFORM_SFORM_DISAGREE" in r.getMessage() and "sform is used" in r.getMessage()
               for r in caplog.records)
    m = read_image_file(tmp_path / "t1ce.nii.gz")  # a user mask is read with the same choice
    assert np.allclose(m.affine, v.affine)


def test_qform_sform_flip_reaches_the_report(tmp_path):
    row = _phantom_row(tmp_path, lambda f: _flip_qform(f / T1CE))
    assert row["status"] == "OK", (row["error_code"], row["error_message"])
    assert "T1ce:QFORM_SFORM_DISAGREE" in row["flags"].split()


def test_agreeing_qform_and_sform_not_flagged(tmp_path):
    nib.save(nib.Nifti1Image(_head(), np.diag([1.0, 1.0, 2.0, 1.0])), str(tmp_path / "t1.nii.gz"))
    img = nib.load(str(tmp_path / "t1.nii.gz"))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    nib.save(img, str(tmp_path / "t1.nii.gz"))
    assert not convert_series(_one_series(tmp_path), settings=S).flags


# ---- 4. -32768 background --------------------------------------------------------------------
def _padded_head(n: int = 20, fill=lambda shape, rng: -32768) -> tuple[np.ndarray, np.ndarray]:
    """int16 ``(n, 32, 32)`` DICOM-order head with the air set to ``fill(shape, rng)``; returns
    the pixels and the air mask."""
    pix = phantom(n).astype(np.int16)
    air = pix < 100
    rng = np.random.default_rng(1)
    pix[air] = np.broadcast_to(fill(pix.shape, rng), pix.shape)[air]
    return pix, air


@pytest.mark.parametrize("limit", [None, -32000])
def test_dicom_pixel_padding_value_is_background(tmp_path, limit):
    """PixelPaddingValue -32768 (and a PixelPaddingRangeLimit: air anywhere in -32768..-32000)
    with RescaleSlope 2 / RescaleIntercept 10: padding is matched on stored values, before the
    rescale, and set to the lowest real value."""
    fill = (lambda shape, rng: -32768) if limit is None else \
        (lambda shape, rng: rng.integers(-32768, limit + 1, size=shape))
    pix, air = _padded_head(fill=fill)
    tags = {"PixelRepresentation": 1, "PixelPaddingValue": -32768, "RescaleSlope": 2,
            "RescaleIntercept": 10}
    if limit is not None:
        tags["PixelPaddingRangeLimit"] = limit
    write_series(tmp_path, n=20, pixels=pix, tags=tags)
    v = convert_series(_one_series(tmp_path), settings=S)
    assert "PADDING_AS_BACKGROUND" in v.flags
    expected_bg = float(pix[~air].min()) * 2 + 10
    assert v.data.min() == pytest.approx(expected_bg) and v.data.min() > 0
    # canonical RAS flips DICOM rows and columns: compare as sets of values per mask size
    assert np.count_nonzero(v.data == expected_bg) >= int(air.sum())


def test_nifti_int16_fill_value_is_background(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recnec_cli")
    pix, _ = _padded_head()
    data = pix.transpose(2, 1, 0)  # (X, Y, Z), int16, air -32768, no tag says so
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "t1ce.nii.gz"))
    v = convert_series(_one_series(tmp_path), settings=S)
    assert "PADDING_AS_BACKGROUND" in v.flags and v.data.min() > -30000
    head = data > -32768
    background = float(data[head].min())
    assert np.array_equal(v.data[~head], np.full(int((~head).sum()), background, np.float32))
    assert any("PADDING_AS_BACKGROUND" in r.getMessage() for r in caplog.records)
    # what HD-BET and its plausibility check get now: the head, not the whole field of view, is
    # above the background (with -32768 air, every voxel was "bright" after normalisation)
    bright = v.data > v.data.mean()
    assert 0.2 < bright.mean() < 0.8 and bright.sum() <= head.sum()


def test_no_padding_flag_for_an_ordinary_zero_background(tmp_path):
    nib.save(nib.Nifti1Image(np.round(_head()).astype(np.int16), np.eye(4)),
             str(tmp_path / "t1.nii.gz"))
    assert not convert_series(_one_series(tmp_path), settings=S).flags


@pytest.mark.parametrize("slope", [1.0, 0.5])
def test_nifti_fill_value_on_one_slice_and_under_scaling_is_background(tmp_path, slope):
    """int16 -32768 on part of a slice (under 5 % of the voxels), with and without a scl_slope
    that moves the scaled value above -30000 (0.5: -16384): still a fill value, found on the
    stored values before scaling (both came out OK with no flag before)."""
    data = np.round(_head()).astype(np.int16) + 50
    data[:16, :, 0] = -32768  # half a slice: 2.5 % of the voxels
    assert np.count_nonzero(data == -32768) < 0.05 * data.size
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(slope, 0.0)
    nib.save(img, str(tmp_path / "t1ce.nii.gz"))
    v = convert_series(_one_series(tmp_path), settings=S)
    assert "PADDING_AS_BACKGROUND" in v.flags
    assert v.data.min() == pytest.approx(float(data[data > -32768].min()) * slope)


def test_dicom_signed_minimum_without_padding_tag_is_background(tmp_path):
    """Signed DICOM pixels holding -32768 in the air, no PixelPaddingValue, RescaleSlope 0.5 (the
    rescaled value -16384 is above any fixed floor): padding by the stored value."""
    pix, air = _padded_head(fill=lambda shape, rng: -32768)
    write_series(tmp_path, n=20, pixels=pix, tags={"PixelRepresentation": 1, "RescaleSlope": 0.5,
                                                   "RescaleIntercept": 0})
    v = convert_series(_one_series(tmp_path), settings=S)
    assert "PADDING_AS_BACKGROUND" in v.flags
    assert v.data.min() == pytest.approx(float(pix[~air].min()) * 0.5) and v.data.min() > -30000
