"""Simulated acquisition: one series grid per sequence and resampling of the truth onto it.

Geometry (all world coordinates mm, RAS+):

* ``axial`` grids store array axes ``(i, j, k)`` along (Left, Posterior, Superior), i.e. DICOM's
  row direction +X(LPS), column direction +Y(LPS), slices stacked inferior -> superior;
* ``sagittal`` grids store ``(i, j, k)`` along (Posterior, Inferior, Left), the usual sagittal
  ImageOrientationPatient ``0\\1\\0\\0\\0\\-1`` (rows along +Y(LPS), columns along -Z) with
  slices stacked right -> left (+X in LPS).

Thick 2D slices average the truth over the slice thickness (box slice profile, sub-samples at
<= 1 mm); head motion is a rigid transform about the brain centre applied to the content.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .acquisition import Acquisition
from .anatomy import rotation

#: approximate brain centre (mm, RAS+) about which head motion rotates
MOTION_CENTRE_MM = np.array([0.0, -18.0, 18.0])
#: head field of view (mm, RAS+) covered by every series: [min, max] per axis
FOV_MM = np.array([[-96.0, 96.0], [-130.0, 96.0], [-72.0, 104.0]])


@dataclass(frozen=True, eq=False)
class SeriesGrid:
    """Shape ``(ni, nj, nk)`` and ``(4, 4)`` voxel -> world (mm, RAS+) affine of one series."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    thickness_mm: float


def series_grid(acq: Acquisition) -> SeriesGrid:
    """The grid an acquisition stores its images on (module docstring for axis conventions)."""
    if acq.orientation == "axial":
        dirs = np.array([[-1.0, 0, 0], [0, -1.0, 0], [0, 0, 1.0]]).T  # columns: i, j, k
        spacing = np.array([acq.pixel_mm, acq.pixel_mm, acq.slice_spacing_mm])
    else:
        dirs = np.array([[0, -1.0, 0], [0, 0, -1.0], [-1.0, 0, 0]]).T
        spacing = np.array([acq.pixel_mm, acq.pixel_mm, acq.slice_spacing_mm])
    shape = []
    start = np.zeros(3)
    for a in range(3):
        d = dirs[:, a]
        axis = int(np.argmax(np.abs(d)))
        lo, hi = FOV_MM[axis]
        n = int(np.floor((hi - lo) / spacing[a])) + 1
        shape.append(n)
        start[axis] = lo if d[axis] > 0 else hi
    aff = np.eye(4)
    aff[:3, :3] = dirs * spacing
    aff[:3, 3] = start
    ni, nj, nk = shape
    return SeriesGrid(shape=(ni, nj, nk), affine=aff, thickness_mm=acq.slice_thickness_mm)


def motion_matrix(acq: Acquisition) -> np.ndarray:
    """``(4, 4)`` world -> world rigid transform moving the head for this series."""
    rot = rotation(np.deg2rad(np.asarray(acq.motion_rot_deg)))
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = MOTION_CENTRE_MM - rot @ MOTION_CENTRE_MM + np.asarray(acq.motion_trans_mm)
    return m


def acquire(volume: np.ndarray, truth_affine: np.ndarray, grid: SeriesGrid, motion: np.ndarray,
            *, order: int = 1) -> np.ndarray:
    """Resample a truth volume (X, Y, Z) onto ``grid`` as seen through head ``motion``.

    Each output voxel is the mean of the truth over its slice thickness (sub-samples spaced
    <= 1 mm along the slice normal), trilinear in between; outside the truth grid: 0.
    Returns float32 of ``grid.shape``.
    """
    n_sub = max(1, int(np.ceil(grid.thickness_mm / 1.0)))
    offsets = (np.arange(n_sub) + 0.5) / n_sub - 0.5  # in units of thickness
    step_k = np.linalg.norm(grid.affine[:3, 2])
    m = np.linalg.inv(truth_affine) @ np.linalg.inv(motion) @ grid.affine  # series vox -> truth vox
    ni, nj, nk = grid.shape
    ii, jj = np.meshgrid(np.arange(ni, dtype=np.float64), np.arange(nj, dtype=np.float64),
                         indexing="ij")
    out = np.zeros(grid.shape, dtype=np.float32)
    src = np.asarray(volume, dtype=np.float32)
    for k in range(nk):
        acc = np.zeros((ni, nj), dtype=np.float32)
        for off in offsets:
            kk = k + off * grid.thickness_mm / step_k
            c = [m[a, 0] * ii + m[a, 1] * jj + (m[a, 2] * kk + m[a, 3]) for a in range(3)]
            acc += ndimage.map_coordinates(src, c, order=order, mode="constant", cval=0.0,
                                           prefilter=False)
        out[:, :, k] = acc / n_sub
    return out
