"""Brain-mask plausibility check: one test per SKULLSTRIP_FAILED criterion, on small numpy masks
(no HD-BET)."""

from __future__ import annotations

import numpy as np
import pytest

from recnec_cli.errors import SkullStripError
from recnec_cli.stages.skullstrip import MIN_LARGEST_COMPONENT_FRACTION, check_brain_mask

VOXEL_MM = 4.0  # 0.064 mL per voxel: an adult brain is a ball of ~16 voxels radius
AFFINE = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])


def ball(shape=(48, 48, 48), centre=None, radius=16.0) -> np.ndarray:
    """bool ``shape`` mask (RAS+ axes) of a ball of ``radius`` voxels around ``centre``."""
    centre = np.asarray(centre if centre is not None else [(s - 1) / 2 for s in shape])
    idx = np.indices(shape).reshape(3, -1).T
    return (np.linalg.norm(idx - centre, axis=1) <= radius).reshape(shape)


def failure(mask: np.ndarray) -> str:
    with pytest.raises(SkullStripError) as ei:
        check_brain_mask(mask, AFFINE)
    assert ei.value.code == "SKULLSTRIP_FAILED"
    return ei.value.message


def test_plausible_mask_passes_and_tolerates_stray_voxels():
    m = ball()
    check = check_brain_mask(m, AFFINE)
    assert 1000 < check.volume_ml < 1300 and check.n_components == 1
    assert check.centroid_offset_mm < 1.0
    for corner in [(2, 2, 2), (45, 2, 2), (2, 45, 45)]:  # three detached voxels: < 1 %
        m[corner] = True
    assert check_brain_mask(m, AFFINE).n_components == 4


def test_empty_mask_fails():
    assert "empty" in failure(np.zeros((48, 48, 48), dtype=bool))


def test_fragmented_mask_fails():
    """Two half-brains of ~520 mL each: the volume and the centroid are plausible, the mask is
    not one component."""
    m = ball(centre=(10, 23.5, 23.5), radius=12.5) | ball(centre=(37, 23.5, 23.5), radius=12.5)
    msg = failure(m)
    assert "2 pieces" in msg and "largest connected component" in msg, msg
    assert f"{100 * MIN_LARGEST_COMPONENT_FRACTION:g} %" in msg


@pytest.mark.parametrize("radius, word", [(6.0, "outside the plausible adult range"),
                                          (23.9, "outside the plausible adult range")])
def test_volume_out_of_range_fails(radius, word):
    """A ball of 6 voxels (~58 mL) is too small, one filling the grid (~3600 mL) too large."""
    msg = failure(ball(shape=(48, 48, 48), radius=radius))
    assert "volume" in msg and word in msg, msg


def test_off_centre_mask_fails():
    m = ball(shape=(96, 48, 48), centre=(18, 23.5, 23.5))
    assert "centroid" in failure(m)
