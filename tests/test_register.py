"""Rigid registration: recovery of a known motion on a real head, and docs/failure-kinds.md kind 19."""

import glob

import numpy as np
import pytest

from recnec_cli.errors import RegistrationError
from recnec_cli.stages import register
from recnec_cli.study import Volume


def _euler_affine(rx_deg, ry_deg, rz_deg, t):
    rx, ry, rz = np.radians([rx_deg, ry_deg, rz_deg])
    cx, sx, cy, sy, cz, sz = np.cos(rx), np.sin(rx), np.cos(ry), np.sin(ry), np.cos(rz), np.sin(rz)
    r = (np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
         @ np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]))
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = t
    return m


def test_sitk_round_trip_keeps_ras_geometry():
    rng = np.random.default_rng(0)
    data = rng.random((7, 8, 9)).astype(np.float32)
    aff = _euler_affine(10, -5, 20, [3.0, -4.0, 5.0]) @ np.diag([0.9, 1.1, 2.5, 1.0])
    back, aff2 = register.from_sitk(register.to_sitk(data, aff))
    np.testing.assert_array_equal(back, data)
    np.testing.assert_allclose(aff2, aff, atol=1e-6)


@pytest.fixture(scope="module")
def tcga_t1(real):
    import nibabel as nib

    path = glob.glob(str(real / "nifti_tcga_fg_6692_lgg_siemens" / "T1_AX_*_t1.nii.gz"))[0]
    img = nib.as_closest_canonical(nib.load(path))
    return Volume(img.get_fdata(dtype=np.float32), img.affine)


def test_recovers_known_rigid_motion_on_real_t1(tcga_t1):
    # move the same real image by 4 deg / 6 mm in world space (the header changes, voxels do not)
    centre = tcga_t1.affine @ np.append((np.array(tcga_t1.data.shape) - 1) / 2, 1)
    motion = _euler_affine(0, 0, 4, [6.0, -3.0, 0.0])
    shift = np.eye(4)
    shift[:3, 3] = centre[:3]
    moved_aff = shift @ motion @ np.linalg.inv(shift) @ tcga_t1.affine
    moving = Volume(tcga_t1.data, moved_aff)
    res = register.register_rigid(tcga_t1, moving, max_translation_mm=40, max_rotation_deg=20)
    assert res.rotation_deg == pytest.approx(4.0, abs=0.7)
    # points of the fixed image map to the same anatomy in the moving image within 1.5 mm
    pts = tcga_t1.affine @ np.array([[60, 100, 10, 1], [200, 60, 20, 1], [128, 112, 13, 1]], float).T
    lps = np.diag([-1, -1, 1]) @ pts[:3]
    mapped = np.array([res.transform.TransformPoint(tuple(p)) for p in lps.T]).T
    expect = np.diag([-1, -1, 1]) @ (moved_aff @ np.linalg.inv(tcga_t1.affine) @ pts)[:3]
    assert np.abs(mapped - expect).max() < 1.5


def test_origin_shifted_500mm_fails_the_check(tcga_t1):
    aff = tcga_t1.affine.copy()
    aff[0, 3] += 500.0
    with pytest.raises(RegistrationError) as ei:
        register.register_rigid(tcga_t1, Volume(tcga_t1.data, aff), max_translation_mm=40, max_rotation_deg=20)
    assert ei.value.code == "REGISTRATION_FAILED"


def test_all_zero_moving_image_fails(tcga_t1):
    with pytest.raises(RegistrationError):
        register.register_rigid(tcga_t1, Volume(np.zeros_like(tcga_t1.data), tcga_t1.affine),
                                max_translation_mm=40, max_rotation_deg=20)


def test_half_field_of_view_is_measured(tcga_t1):
    shape, aff = register.common_grid(tcga_t1, 2.0)
    within = np.ones(shape, bool)
    half = Volume(tcga_t1.data[:, :, :13], tcga_t1.affine)
    cov = register.coverage_fraction(half, shape, aff, None, within)
    assert 0.3 < cov < 0.7
