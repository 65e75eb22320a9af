"""Lesion localisation: synthetic phantoms for each rule, and the real labelled GBM (pyradiomics brain1)."""

import numpy as np
import pytest
from scipy import ndimage

from recnec_cli.errors import LesionError
from recnec_cli.stages import lesion


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
    assert out.source == "heuristic"


def test_rim_lesion_is_filled():
    t1, t1ce, brain, aff, idx = _head(1)
    outer, inner = _ball(idx, (65, 50, 45), 9), _ball(idx, (65, 50, 45), 6)
    t1ce[outer & ~inner] += 70
    out = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    assert out.mask[65, 50, 45]  # the necrotic core belongs to the lesion
    assert out.volume_ml == pytest.approx(outer.sum() / 1000, rel=0.25)


def test_fragmented_rim_is_one_lesion():
    """A rim-enhancing lesion broken into pieces (as on thick slices) is one lesion, not the
    largest fragment (the BraTS metastasis of issue 12: 0.34 mL of a larger lesion)."""
    t1, t1ce, brain, aff, idx = _head(4)
    outer, inner = _ball(idx, (60, 55, 45), 11), _ball(idx, (60, 55, 45), 8)
    rim = outer & ~inner
    ii, jj, kk = idx
    gaps = (ii == 60) | (jj == 55) | (kk == 45)  # 1 mm cuts (2-3 mm after the detector's opening)
    t1ce[rim & ~gaps] += 70
    pieces = ndimage.label(rim & ~gaps, ndimage.generate_binary_structure(3, 3))[1]
    assert pieces == 8  # the cuts leave 8 separate pieces
    out = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    assert (out.mask & outer).sum() >= 0.75 * outer.sum()  # rim and core, though open at the poles
    assert (out.mask & ~outer).sum() <= 0.05 * outer.sum()
    np.testing.assert_allclose(out.centroid_ras_mm, (aff @ np.array([60, 55, 45, 1.0]))[:3], atol=1.5)


def _with_t2(t1, brain, idx, rng):
    """T2 of the phantom head: parenchyma ~100, plus the requested bright regions."""
    return (rng.normal(100, 4, t1.shape) * brain).astype(np.float32)


def test_t2_evidence_prefers_the_lesion_with_oedema_over_enhancing_choroid_plexus():
    """Two enhancing blobs: a larger one in a pool of CSF (T2 bright, T1 dark: the choroid plexus
    in a ventricle) and a smaller one in T2-hyperintense, T1-isointense-to-mildly-dark parenchyma
    (oedema). With the T2 the lesion is chosen; without it, the larger blob is."""
    rng = np.random.default_rng(5)
    t1, t1ce, brain, aff, idx = _head(5)
    t2 = _with_t2(t1, brain, idx, rng)
    plexus_c, lesion_c = (65, 55, 45), (30, 60, 50)
    csf = _ball(idx, plexus_c, 12) & ~_ball(idx, plexus_c, 7)
    t1[csf] -= 60
    t1ce[csf] -= 60
    t2[csf] += 120
    t1ce[_ball(idx, plexus_c, 7)] += 70
    oedema = _ball(idx, lesion_c, 13) & ~_ball(idx, lesion_c, 5)
    t2[oedema] += 40
    t1[oedema] -= 5
    t1ce[oedema] -= 5
    t1ce[_ball(idx, lesion_c, 5)] += 70
    truth = (aff @ np.array([*lesion_c, 1.0]))[:3]
    with_t2 = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1, t2=t2)
    assert np.linalg.norm(with_t2.centroid_ras_mm - truth) < 1.5
    assert with_t2.oedema_fraction > 0.5 and with_t2.csf_fraction < 0.3
    without = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    assert np.linalg.norm(without.centroid_ras_mm - (aff @ np.array([*plexus_c, 1.0]))[:3]) < 1.5


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
    assert out.source == "user" and out.volume_ml == pytest.approx(m.sum() / 1000)
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


def test_two_similar_candidates_make_the_choice_ambiguous():
    """One lesion: not ambiguous (runner-up ratio 0). Two equal blobs: the row will say
    LESION_AMBIGUOUS, whichever is chosen; a blob 1/8 the volume of the lesion does not."""
    t1, t1ce, brain, aff, idx = _head(6)
    t1ce[_ball(idx, (30, 55, 45), 6)] += 70
    one = lesion.detect_enhancing_lesion(t1ce.copy(), brain, aff, t1=t1)
    assert not one.ambiguous and one.runner_up_ratio == 0.0
    small = t1ce.copy()
    small[_ball(idx, (70, 55, 45), 3)] += 70
    assert not lesion.detect_enhancing_lesion(small, brain, aff, t1=t1).ambiguous
    t1ce[_ball(idx, (70, 55, 45), 6)] += 70
    two = lesion.detect_enhancing_lesion(t1ce, brain, aff, t1=t1)
    assert two.ambiguous and two.runner_up_ratio > 0.8
