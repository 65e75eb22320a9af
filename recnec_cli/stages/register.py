"""Rigid co-registration of T1 and T2 onto the T1ce, and resampling to one common grid.

Method (SimpleITK registration framework, see the SimpleITK notebooks "Registration
Initialization" and "Multi-resolution registration"):

* metric: Mattes mutual information (50 histogram bins), random sampling with a fixed seed,
  about 50,000 samples per level (rate <= 20 %) over shrink factors 4-2-1 (smoothing 2-1-0 mm);
  ``docs/stack-notes.md`` measured that one low sampling rate for different contrasts gave
  3-7 mm errors, per-level rates <= 0.15 mm;
* transform: Euler3D (rigid, 6 parameters), initialised by aligning the geometric centres of the
  two images (``CenteredTransformInitializer(..., GEOMETRY)``); when the result fails the
  post-registration check, one retry starts from the scanner's own world alignment (identity),
  which is the right prior for same-session scans;
* optimiser: regular-step gradient descent with physical-shift scales;
* post-check (``docs/failure-kinds.md`` kind 19): the final rigid transform relative to the
  scanner's world alignment must stay within ``registration_max_translation_mm`` and
  ``registration_max_rotation_deg`` (same-session scans move little), and the moving image must
  cover most of the fixed image's head.

All arrays here are canonical RAS+ ``(X, Y, Z)``; SimpleITK works in LPS, the conversion is done
once in :func:`to_sitk` / :func:`from_sitk`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from nibabel.affines import voxel_sizes

from ..errors import RegistrationError
from ..study import Volume
from ..types import Affine

log = logging.getLogger(__name__)

_LPS = np.diag([-1.0, -1.0, 1.0])
SHRINK_FACTORS = (4, 2, 1)
#: random metric samples per resolution level (rate capped at 20 %). Measured on a synthetic 1 mm
#: head and the real TCGA T1 -> T1ce pair: 50,000 samples give the same transform as fixed rates of
#: 20/10/5 % within 0.03 mm and 0.05 deg, in 60 % of the time.
SAMPLES_PER_LEVEL = 50_000


def to_sitk(data: np.ndarray, affine: Affine):
    """numpy RAS+ ``(X, Y, Z)`` array + ``(4, 4)`` voxel -> RAS mm affine -> ``SimpleITK.Image``
    (LPS physical, ITK ``(Z, Y, X)`` buffer order).

    Raises
    ------
    ValueError
        For a sheared affine (SimpleITK cannot represent shear).
    """
    import SimpleITK as sitk

    affine = np.asarray(affine, dtype=np.float64)
    m = affine[:3, :3]
    spacing = voxel_sizes(affine)
    direction_ras = m / spacing
    if not np.allclose(direction_ras.T @ direction_ras, np.eye(3), atol=1e-4):
        raise ValueError("affine has shear; resample to an orthogonal grid first")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (_LPS @ direction_ras).ravel()))
    img.SetOrigin(tuple(float(v) for v in _LPS @ affine[:3, 3]))
    return img


def from_sitk(img) -> tuple[np.ndarray, Affine]:
    """``SimpleITK.Image`` (LPS physical) -> (float32 array ``(X, Y, Z, ...)`` in its index order,
    voxel -> RAS mm affine of the first three axes).

    An image of more than three dimensions keeps its further axes last (ITK's ``(..., Z, Y, X)``
    reversed); the affine then describes the first three. Not canonicalised: the axes are the
    image's own, RAS+ only when the image was stored so (:func:`to_sitk` output is).
    """
    import SimpleITK as sitk

    dim = img.GetDimension()
    arr = sitk.GetArrayFromImage(img).astype(np.float32)
    arr = arr.transpose(tuple(range(dim - 1, -1, -1)) + tuple(range(dim, arr.ndim)))
    spacing = np.asarray(img.GetSpacing(), dtype=float)[:3]
    direction = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    aff = np.eye(4)
    aff[:3, :3] = _LPS @ direction @ np.diag(spacing)
    aff[:3, 3] = _LPS @ np.asarray(img.GetOrigin(), dtype=float)[:3]
    return arr, aff


def common_grid(reference: Volume, spacing_mm: float) -> tuple[tuple[int, int, int], Affine]:
    """An axis-aligned RAS+ grid of ``spacing_mm`` covering the reference volume's field of view.

    Returns ``(shape (X, Y, Z), affine)``. The reference is canonical, so its axes are already
    close to R, A, S; the grid's bounding box is that of the reference's corner points in world mm.
    """
    aff = np.asarray(reference.affine, dtype=np.float64)
    shape = np.asarray(np.shape(reference.data))
    corners = np.array([[i, j, k, 1.0] for i in (-0.5, shape[0] - 0.5) for j in (-0.5, shape[1] - 0.5)
                        for k in (-0.5, shape[2] - 0.5)])
    world = (aff @ corners.T).T[:, :3]
    lo, hi = world.min(axis=0), world.max(axis=0)
    n = np.maximum(1, np.ceil((hi - lo) / spacing_mm - 1e-6)).astype(int)
    out = np.eye(4)
    out[:3, :3] *= spacing_mm
    out[:3, 3] = lo + spacing_mm / 2.0
    return (int(n[0]), int(n[1]), int(n[2])), out


@dataclass(frozen=True)
class RigidResult:
    """A rigid transform found by :func:`register_rigid` and its checks.

    ``translation_mm`` and ``rotation_deg`` describe the transform relative to the scanner's world
    alignment (identity = the two series were already aligned). ``metric`` is the final Mattes MI
    value (more negative = better). ``transform`` is the SimpleITK transform mapping fixed-image
    physical points (LPS) to moving-image points, as SimpleITK's resampler expects.
    """

    transform: object
    translation_mm: float
    rotation_deg: float
    metric: float
    initialisation: str
    iterations: int


def _rigid_params(tx) -> tuple[float, float]:

    euler = tx
    m = np.asarray(euler.GetMatrix()).reshape(3, 3)
    angle = math.degrees(math.acos(max(-1.0, min(1.0, (np.trace(m) - 1.0) / 2.0))))
    # displacement of the fixed image's centre, which is what a rigid offset means to a reader
    c = np.asarray(euler.GetCenter())
    moved = np.asarray(euler.TransformPoint(tuple(c)))
    return float(np.linalg.norm(moved - c)), angle


def _run(fixed, moving, init_tx, *, seed: int):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    n_vox = float(np.prod(fixed.GetSize()))
    rates = [min(0.20, SAMPLES_PER_LEVEL * shrink**3 / n_vox) for shrink in SHRINK_FACTORS]
    reg.SetMetricSamplingPercentagePerLevel(rates, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.5,
        gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(SHRINK_FACTORS))
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    tx = sitk.Euler3DTransform(init_tx)  # optimised in place: the result stays an Euler3DTransform
    reg.SetInitialTransform(tx, inPlace=True)
    reg.Execute(fixed, moving)
    return tx, float(reg.GetMetricValue()), int(reg.GetOptimizerIteration())


def _itk_reason(text: str) -> str:
    """A readable one-line reason from an ITK exception text (no object addresses, no file names)."""
    import re

    if "All samples map outside" in text or "Too many samples map outside" in text:
        return "the images do not overlap (metric samples map outside the moving image)"
    line = next((ln for ln in reversed(text.splitlines()) if ln.strip()), text)
    line = re.sub(r"\(0x[0-9a-fA-F]+\)", "", line)
    line = re.sub(r"^.*?(ITK ERROR|sitk::ERROR):\s*", "", line)
    return line.strip()[:160]


def register_rigid(fixed: Volume, moving: Volume, *, max_translation_mm: float,
                   max_rotation_deg: float, seed: int = 1234) -> RigidResult:
    """Rigidly register ``moving`` onto ``fixed`` (both canonical RAS+ volumes).

    Raises
    ------
    RegistrationError
        ``REGISTRATION_FAILED`` when SimpleITK raises, an image is constant, or no
        initialisation gives a transform within the same-session bounds.
    ValueError
        For a sheared affine (:func:`to_sitk`); canonical converted volumes have none.
    """
    import SimpleITK as sitk

    for v, name in ((fixed, "fixed"), (moving, "moving")):
        d = np.asarray(v.data)
        if not np.isfinite(d).all() or float(d.max()) == float(d.min()):
            raise RegistrationError(f"{name} image is constant or not finite; nothing to register")
    f_img = to_sitk(fixed.data, fixed.affine)
    m_img = to_sitk(moving.data, moving.affine)
    inits = [
        ("geometry-centred", sitk.CenteredTransformInitializer(
            f_img, m_img, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY)),
        ("world (scanner) alignment", sitk.Euler3DTransform()),
    ]
    failures = []
    for name, init in inits:
        if name.startswith("world"):
            init.SetCenter(f_img.TransformContinuousIndexToPhysicalPoint(
                [(s - 1) / 2.0 for s in f_img.GetSize()]))
        try:
            tx, metric, iters = _run(f_img, m_img, init, seed=seed)
        except RuntimeError as exc:  # SimpleITK raises RuntimeError with ITK's message
            failures.append(f"{name}: {_itk_reason(str(exc))}")
            continue
        trans, rot = _rigid_params(tx)
        log.debug("registration %s: |t|=%.2f mm rot=%.2f deg metric=%.4f iters=%d",
                  name, trans, rot, metric, iters)
        if trans <= max_translation_mm and rot <= max_rotation_deg:
            return RigidResult(tx, trans, rot, metric, name, iters)
        failures.append(f"{name}: translation {trans:.1f} mm, rotation {rot:.1f} deg "
                        f"(limits {max_translation_mm:g} mm, {max_rotation_deg:g} deg)")
    raise RegistrationError("rigid registration failed its same-session check: " + "; ".join(failures))


def resample_to_grid(volume: Volume, shape: tuple[int, int, int], affine: Affine,
                     transform=None, *, order: int = 1) -> np.ndarray:
    """Resample ``volume`` onto a grid (``shape`` (X, Y, Z), ``affine`` voxel->RAS mm).

    ``transform`` is a SimpleITK transform from grid (fixed) points to ``volume`` points, or
    ``None`` for identity. ``order`` 0 = nearest neighbour, 1 = linear. Outside = 0. Returns
    float32 ``(X, Y, Z)`` on the grid (RAS+).

    Raises
    ------
    ValueError
        For a sheared grid or volume affine (:func:`to_sitk`).
    """
    import SimpleITK as sitk

    ref = to_sitk(np.zeros(shape, dtype=np.float32), affine)
    img = to_sitk(volume.data, volume.affine)
    interp = sitk.sitkNearestNeighbor if order == 0 else sitk.sitkLinear
    tx = transform if transform is not None else sitk.Transform(3, sitk.sitkIdentity)
    out = sitk.Resample(img, ref, tx, interp, 0.0, sitk.sitkFloat32)
    arr, _ = from_sitk(out)
    return arr


def coverage_fraction(volume: Volume, shape, affine, transform, within: np.ndarray) -> float:
    """Fraction of the True voxels of ``within`` that ``volume``'s field of view covers.

    ``shape`` ``(X, Y, Z)`` and ``affine`` (voxel -> RAS mm) describe the grid, ``within`` is bool
    of that shape, ``transform`` as in :func:`resample_to_grid` (grid -> ``volume`` points).

    Raises
    ------
    ValueError
        For a sheared grid or volume affine (:func:`to_sitk`).
    """
    ones = Volume(np.ones(np.shape(volume.data), dtype=np.float32), volume.affine)
    cov = resample_to_grid(ones, shape, affine, transform, order=0) > 0.5
    n = int(np.count_nonzero(within))
    return float(np.count_nonzero(cov & within)) / n if n else 0.0
