"""Lesion localisation: synthetic phantoms for each rule, and the real labelled GBM (pyradiomics brain1)."""

import numpy as np
import pytest
from scipy import ndimage

from recnec_cli.stages import lesion
from recnec_cli.errors import LesionError


def _head(seed=0):
    rng = np.random.default_rng(seed)
    shape = (100, 110, 90)
    aff = np.eye(4)
    aff[:3, 3] = [-50.0, -55.0, -45.0]
    ii, jj, kk = np.indices(shape)
    brain = ((ii - 50) ** 2 / 42**2 + (jj - 55) ** 2 / 48**2 + (kk - 45) ** 2 / 38**2) < 1
    t1 = (rng.normal(100, 4, shape) * brain).astype(np.float32)
    return t1, t1.copy(), brain, aff, (ii, jj, kk)


def _ball(idx, centre, r):
    ii, jj, kk = idx
    return (ii - centre[0]) ** 2 + (jj - centre[1]) ** 2 + (kk - centre[2]) ** 2 <= r**2


def test_solid_lesion_found_despite_a_brighter_vessel():
    t1, t1ce, brain, aff, idx = _head()
    les = _ball(idx, (30, 60, 50), 6)  # patient left (low i)
    t1ce[les] += 60
    t1ce[48:52, 20:90, 44:46] += 150  # a long thin vessel-like tube enhancing more strongly
    out = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    world_truth = (aff @ np.array([30, 60, 50, 1.0]))[:3]
    assert np.linalg.norm(out.centroid_ras_mm - world_truth) < 1.5
    assert out.centroid_ras_mm[0] < 0  # left stays left (RAS+: x < 0 is the patient's left)
    assert out.volume_ml == pytest.approx(les.sum() / 1000, rel=0.25)
    assert out.source == "auto"


def test_rim_lesion_is_filled():
    t1, t1ce, brain, aff, idx = _head(1)
    outer, inner = _ball(idx, (65, 50, 45), 9), _ball(idx, (65, 50, 45), 6)
    t1ce[outer & ~inner] += 70
    out = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    assert out.mask[65, 50, 45]  # the necrotic core belongs to the lesion
    assert out.volume_ml == pytest.approx(outer.sum() / 1000, rel=0.25)


def test_no_enhancement_is_a_lesion_error():
    t1, t1ce, brain, aff, _ = _head(2)
    with pytest.raises(LesionError) as ei:
        lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    assert ei.value.code == "NO_ENHANCING_LESION"


def test_user_mask_figures():
    _, _, brain, aff, idx = _head()
    m = _ball(idx, (40, 40, 40), 5)
    out = lesion.lesion_from_mask(m, aff)
    np.testing.assert_allclose(out.centroid_ras_mm, (aff @ np.array([40, 40, 40, 1.0]))[:3], atol=1e-6)
    assert out.source == "mask" and out.volume_ml == pytest.approx(m.sum() / 1000)
    with pytest.raises(LesionError):
        lesion.lesion_from_mask(np.zeros_like(m), aff)


def test_find_user_mask(tmp_path):
    (tmp_path / "1.2.3.nii.gz").write_bytes(b"x")
    assert lesion.find_user_mask(None, tmp_path, "1.2.3") == tmp_path / "1.2.3.nii.gz"
    assert lesion.find_user_mask(None, tmp_path, "other") is None
    (tmp_path / "4.5.6_lesion_mask.nii.gz").write_bytes(b"x")  # the form recnec synth writes
    assert lesion.find_user_mask(None, tmp_path, "4.5.6") == tmp_path / "4.5.6_lesion_mask.nii.gz"


@pytest.mark.slow
def test_real_gbm_localised_within_10mm(real):
    """pyradiomics brain1 (TCGA-02-0003, T1 post-Gd, labelled enhancing lesion): T1ce-only detection."""
    import SimpleITK as sitk

    from recnec_cli.stages import register
    from recnec_cli.stages.skullstrip import HdBet
    from recnec_cli.study import Volume

    d = real / "nrrd_pyradiomics_brain1_brain2"
    data, aff = register.from_sitk(sitk.ReadImage(str(d / "brain1_image.nrrd")))
    lab, laff = register.from_sitk(sitk.ReadImage(str(d / "brain1_label.nrrd")))
    vol = Volume(data, aff)
    brain_native = HdBet().brain_mask(vol)
    shape, gaff = register.common_grid(vol, 1.0)
    t1ce = register.resample_to_grid(vol, shape, gaff)
    brain = register.resample_to_grid(Volume(brain_native.astype(np.float32), aff), shape, gaff) > 0.5
    truth = register.resample_to_grid(Volume(lab, laff), shape, gaff, order=0) > 0.5
    out = lesion.detect_enhancing_lesion(t1ce, brain, gaff)
    truth_c = (gaff @ np.append(ndimage.center_of_mass(truth), 1.0))[:3]
    assert np.linalg.norm(out.centroid_ras_mm - truth_c) < 10.0
    dice = 2 * (out.mask & truth).sum() / (out.mask.sum() + truth.sum())
    assert dice > 0.4
