"""The model-input recipe: shape, scale invariance, orientation and the outside-brain guard."""

import numpy as np
import pytest

from recnec_cli.errors import LesionError
from recnec_cli.stages.modelinput import InputSpec, box_affine, make_model_input


def _phantom(seed=0):
    rng = np.random.default_rng(seed)
    shape = (90, 100, 80)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    aff[:3, 3] = [-45.0, -50.0, -40.0]
    ii, jj, kk = np.indices(shape)
    brain = ((ii - 45) ** 2 / 40**2 + (jj - 50) ** 2 / 45**2 + (kk - 40) ** 2 / 35**2) < 1
    vols = [rng.normal(100 + 20 * c, 5, shape).astype(np.float32) * brain for c in range(3)]
    return vols, brain, aff


def test_shape_dtype_and_zero_outside_brain():
    vols, brain, aff = _phantom()
    spec = InputSpec()
    x = make_model_input(vols, brain, aff, np.array([0.0, 0.0, 0.0]), spec)
    assert x.shape == (3, 40, 40, 40) and x.dtype == np.float32
    # the box centre lies in the brain: normalised brain voxels have median ~0 and IQR-sigma ~1
    inside = x[0][x[0] != 0]
    assert abs(np.median(inside)) < 0.1
    q25, q75 = np.percentile(inside, [25, 75])
    assert 0.8 < (q75 - q25) / 1.349 < 1.2


def test_invariant_to_global_intensity_scale():
    """docs/failure-kinds.md kind 11: Philips-style rescale must not change the model input."""
    vols, brain, aff = _phantom()
    c = np.array([5.0, -3.0, 2.0])
    a = make_model_input(vols, brain, aff, c)
    b = make_model_input([v * 2.3617 + 0.0 for v in vols], brain, aff, c)
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_left_stays_left():
    """A bright blob in the patient's left hemisphere (x < 0 in RAS+) lands at low X of the box."""
    vols, brain, aff = _phantom()
    blob_world = np.array([-12.0, 0.0, 0.0])  # 12 mm to the patient's left of the centre
    ijk = np.linalg.solve(aff, np.append(blob_world, 1))[:3].round().astype(int)
    sl = tuple(slice(v - 3, v + 4) for v in ijk)
    for v in vols:
        v[sl] = 1000.0
    x = make_model_input(vols, brain, aff, np.zeros(3))
    from scipy import ndimage

    peak = ndimage.center_of_mass(x[2] >= 0.99 * x[2].max())
    centre = (np.array(InputSpec().size_vox) - 1) / 2
    # 12 mm at 1.5 mm per voxel = 8 voxels towards lower X (patient left)
    assert peak[0] == pytest.approx(centre[0] - 8, abs=1)
    assert abs(peak[1] - centre[1]) <= 1 and abs(peak[2] - centre[2]) <= 1


def test_box_affine_centres_the_box():
    spec = InputSpec()
    c = np.array([10.0, -20.0, 30.0])
    aff = box_affine(c, spec)
    mid = (np.array(spec.size_vox) - 1) / 2
    np.testing.assert_allclose((aff @ np.append(mid, 1))[:3], c)


def test_box_outside_brain_is_refused():
    vols, brain, aff = _phantom()
    with pytest.raises(LesionError) as ei:
        make_model_input(vols, brain, aff, np.array([500.0, 0.0, 0.0]))
    assert ei.value.code == "CROP_OUTSIDE_BRAIN"


def test_spec_round_trip():
    spec = InputSpec(size_vox=(32, 32, 32), spacing_mm=2.0)
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_robust_zscore_one_behaviour_for_model_input_and_lesion():
    """One z-score (stages/intensity.py) for the model input and lesion detection: median / IQR
    inside the mask; the standard deviation when the IQR is degenerate; 1 for a constant region."""
    from recnec_cli.stages import lesion, modelinput
    from recnec_cli.stages.intensity import robust_zscore

    assert lesion.robust_zscore is modelinput.robust_zscore is robust_zscore
    rng = np.random.default_rng(0)
    x = rng.normal(100.0, 10.0, (20, 20, 20)).astype(np.float32)
    inside = np.zeros(x.shape, bool)
    inside[5:15] = True
    z = robust_zscore(x, inside)
    assert z.dtype == np.float32 and z.shape == x.shape
    assert abs(float(np.median(z[inside]))) < 1e-5 and 0.9 < float(np.std(z[inside])) < 1.1
    flat = np.full(x.shape, 7.0, np.float32)
    flat[5:10, 0, 0] = [8, 9, 10, 11, 12]  # inside, the rest equal: IQR 0 -> std
    zf = robust_zscore(flat, inside)
    v = flat[inside]
    assert np.allclose(zf, (flat - 7.0) / v.std(), atol=1e-5)
    assert np.all(robust_zscore(np.full(x.shape, 3.0, np.float32), inside) == 0.0)
    with pytest.raises(ValueError):
        robust_zscore(x, np.zeros(x.shape, bool))
