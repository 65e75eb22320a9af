"""Real anatomy for the synthetic cohort: the MNI152 2009 template, warped per subject, with a
synthesised CSF / dura / skull / scalp envelope.

Source anatomy (bundled with nilearn, read with nibabel without importing nilearn):

* ``mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz``: ICBM 2009a symmetric T1 average,
  brain-extracted (zero outside the brain), 1 mm, 197 x 233 x 189, RAS+ (Fonov et al. 2011,
  NeuroImage 54:313; Fonov et al. 2009, NeuroImage 47:S102).
* the matching grey- and white-matter probability maps (``..._gm_...`` / ``..._wm_...``).
* brain mask = template > 0, as nilearn's ``load_mni152_brain_mask`` (threshold 0.2 on uint8).

Everything here is a *pointwise* function of world coordinates (mm, RAS+): a field evaluated on
a sub-box of the truth grid equals the same field evaluated on the full grid and then cropped.
This is what lets ``--space model`` render only the voxels around the lesion while producing
exactly the values a full-head study would contain.

Extra-cerebral layers (thicknesses in mm, drawn per subject) follow typical adult values:
subarachnoid CSF 1-3 mm, dura ~1 mm, skull 5-9 mm as inner table / diploe / outer table
(Lillie et al. 2016, PLoS One 11:e0158876, calvarial thickness 5-8 mm), scalp 4-9 mm as
galea/muscle, subcutaneous fat and skin, with a thicker temporalis muscle laterally.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

logger = logging.getLogger(__name__)

#: tissue classes rendered for every voxel, in this order (see :mod:`.contrast`)
TISSUES = ("wm", "gm", "csf", "dura", "bone", "marrow", "muscle", "fat", "skin")

#: control-point spacing (mm) of the random non-linear displacement
DISPLACEMENT_SPACING_MM = 16.0


def _nilearn_data_dir() -> Path:
    """Folder of nilearn's bundled template files, located without importing nilearn."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("nilearn is not installed: it provides the MNI152 anatomy")
    return Path(spec.origin).parent / "datasets" / "data"


def template_files() -> dict[str, Path]:
    """Paths of the three bundled MNI152 2009 files used as anatomy (T1, GM, WM)."""
    d = _nilearn_data_dir()
    return {
        "t1": d / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
        "gm": d / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
        "wm": d / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
    }


@dataclass(frozen=True, eq=False)
class Template:
    """The template maps, all float32 of shape ``(197, 233, 189)`` on a 1 mm RAS+ grid.

    ``t1`` is the template T1 scaled so that white matter is 1.0; ``gm``/``wm`` are probabilities
    in [0, 1]; ``mask`` is the brain mask (0/1); ``sdist`` the signed distance in mm to the brain
    surface (negative inside, positive outside, clipped to [-40, 60]); ``affine`` the (4, 4)
    voxel -> MNI mm affine.
    """

    t1: np.ndarray
    gm: np.ndarray
    wm: np.ndarray
    mask: np.ndarray
    sdist: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        ni, nj, nk = self.t1.shape
        return (int(ni), int(nj), int(nk))


@functools.lru_cache(maxsize=1)
def load_template() -> Template:
    """Load and prepare the bundled template once per process (~3 s; cached)."""
    import nibabel as nib

    files = template_files()
    imgs = {k: nib.load(str(p)) for k, p in files.items()}
    aff = np.asarray(imgs["t1"].affine, dtype=np.float64)
    t1 = np.asarray(imgs["t1"].dataobj, dtype=np.float32)
    gm = np.asarray(imgs["gm"].dataobj, dtype=np.float32) / 255.0
    wm = np.asarray(imgs["wm"].dataobj, dtype=np.float32) / 255.0
    mask = t1 > 0.2
    wm_level = float(np.median(t1[wm > 0.9]))
    t1 = t1 / wm_level
    inside = ndimage.distance_transform_edt(mask)
    outside = ndimage.distance_transform_edt(~mask)
    sdist = np.where(mask, 0.5 - inside, outside - 0.5).astype(np.float32)
    np.clip(sdist, -40.0, 60.0, out=sdist)
    logger.debug("template loaded: shape %s, WM level %.1f", t1.shape, wm_level)
    return Template(t1=t1.astype(np.float32), gm=gm, wm=wm, mask=mask.astype(np.float32),
                    sdist=sdist, affine=aff)


def truth_grid() -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and (4, 4) affine of every subject's 1 mm RAS+ truth grid (the template's grid)."""
    tpl = load_template()
    return tpl.shape, tpl.affine.copy()


# ----------------------------------------------------------------------------------------------
# Random smooth fields


@dataclass(frozen=True, eq=False)
class FourierField:
    """A smooth random scalar field ``f(x) = sqrt(2/K) * sum_k cos(w_k . (x - x0) + phi_k)``.

    Unit variance; wavelengths drawn in ``[lam_min, lam_max]`` mm; evaluated at world points
    (mm). Pointwise, so any sub-box gives the same values as the full grid.
    """

    omega: np.ndarray  # (K, 3) rad/mm
    phase: np.ndarray  # (K,)
    origin: np.ndarray  # (3,)

    @classmethod
    def draw(cls, rng: np.random.Generator, *, k: int, lam_min: float, lam_max: float,
             origin: np.ndarray) -> "FourierField":
        d = rng.normal(size=(k, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        lam = rng.uniform(lam_min, lam_max, size=(k, 1))
        return cls(omega=2 * np.pi * d / lam, phase=rng.uniform(0, 2 * np.pi, size=k),
                   origin=np.asarray(origin, dtype=np.float64))

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """Values at ``pts`` (N, 3) world mm -> float32 (N,)."""
        arg = (pts - self.origin) @ self.omega.T + self.phase
        return (np.sqrt(2.0 / len(self.phase)) * np.cos(arg).sum(axis=1)).astype(np.float32)

    def on_grid(self, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray) -> np.ndarray:
        """Values on the axis-aligned grid ``xs x ys x zs`` (1D world mm) -> float32 (nx, ny, nz).

        Separable evaluation, ``cos(a+b+c+phi) = Re(e^{i phi} e^{ia} e^{ib} e^{ic})``: a few
        complex products per voxel instead of K cosines. Each voxel's value depends only on its
        own coordinates, so any sub-grid gives the values of the full grid.
        """
        out = np.zeros((len(xs), len(ys), len(zs)), dtype=np.float32)
        for w, ph in zip(self.omega, self.phase):
            ex = np.exp(1j * (w[0] * (xs - self.origin[0]) + ph)).astype(np.complex64)
            ey = np.exp(1j * (w[1] * (ys - self.origin[1]))).astype(np.complex64)
            ez = np.exp(1j * (w[2] * (zs - self.origin[2]))).astype(np.complex64)
            out += ((ex[:, None] * ey[None, :])[:, :, None] * ez[None, None, :]).real
        out *= np.float32(np.sqrt(2.0 / len(self.phase)))
        return out


@dataclass(frozen=True, eq=False)
class Deformation:
    """Subject world (mm, RAS+) -> template world (mm) map ``y = A x + t + D(x)``.

    ``A`` is a random near-identity linear map (per-axis brain size 0.89-1.02 of the template,
    rotation up to 4 degrees about each axis: head size and pose), ``t`` a translation (mm),
    ``D`` a smooth non-linear displacement (mm) stored on a 4 mm grid (``disp``, shape
    ``(3, nx, ny, nz)``, origin ``disp_origin``) interpolated trilinearly.
    """

    linear: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)
    disp: np.ndarray  # (3, nx, ny, nz) float32 on a 4 mm grid
    disp_origin: np.ndarray  # (3,) mm
    disp_step: float

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """Template world coordinates (3, N) mm of subject world points ``pts`` (3, N) mm."""
        lin, t = self.linear, self.translation
        idx = np.stack([(pts[a] - self.disp_origin[a]) / self.disp_step for a in range(3)])
        y = np.empty_like(pts)
        for a in range(3):
            y[a] = lin[a, 0] * pts[0] + lin[a, 1] * pts[1] + lin[a, 2] * pts[2] + t[a]
            y[a] += ndimage.map_coordinates(self.disp[a], idx, order=1, mode="nearest",
                                            prefilter=False)
        return y

    def inverse_point(self, y: np.ndarray, iterations: int = 20) -> np.ndarray:
        """Subject world point (3,) mapping to template point ``y`` (fixed-point iteration)."""
        inv = np.linalg.inv(self.linear)
        x = inv @ (np.asarray(y, dtype=np.float64) - self.translation)
        for _ in range(iterations):
            d = self(x[:, None])[:, 0] - (self.linear @ x + self.translation)
            x = inv @ (y - self.translation - d)
        return x


def rotation(angles_rad: np.ndarray) -> np.ndarray:
    """Rotation matrix ``(3, 3)`` for angles (radians) about x, then y, then z: ``Rz @ Ry @ Rx``."""
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def draw_deformation(rng: np.random.Generator) -> Deformation:
    """Random head size, pose and smooth non-linear shape change of one subject.

    The displacement is white noise on a 16 mm control lattice (sd 2.5 mm), smoothed and
    upsampled to 4 mm with cubic splines: anatomy changes by a few mm over a few cm, about the
    residual of affine registration between adult brains.
    """
    shape, aff = truth_grid()
    lo = aff[:3, 3] - 24.0
    hi = aff[:3, 3] + np.asarray(shape) * np.diag(aff)[:3] + 24.0
    n_ctrl = np.ceil((hi - lo) / DISPLACEMENT_SPACING_MM).astype(int) + 1
    coarse = rng.normal(0.0, 2.5, size=(3, *n_ctrl))
    coarse = np.stack([ndimage.gaussian_filter(c, 0.7, mode="nearest") for c in coarse])
    coarse *= 2.5 / max(float(coarse.std()), 1e-6)
    zoom = DISPLACEMENT_SPACING_MM / 4.0
    fine = np.stack([ndimage.zoom(c, zoom, order=3, mode="nearest", grid_mode=False)
                     for c in coarse]).astype(np.float32)
    step = DISPLACEMENT_SPACING_MM * (n_ctrl[0] - 1) / (fine.shape[1] - 1)
    size = rng.uniform(0.90, 1.02) * rng.uniform(0.97, 1.03, size=3)  # subject brain / template
    rot = rotation(np.deg2rad(rng.uniform(-4.0, 4.0, size=3)))
    linear = np.linalg.inv(rot @ np.diag(size))
    translation = rng.uniform(-4.0, 4.0, size=3)
    return Deformation(linear=linear, translation=translation, disp=fine, disp_origin=lo,
                       disp_step=float(step))


# ----------------------------------------------------------------------------------------------
# Tissue probabilities at world points


@dataclass(frozen=True)
class EnvelopeParams:
    """Thicknesses (mm) of the extra-cerebral layers of one subject."""

    csf_mm: float
    dura_mm: float
    inner_table_mm: float
    diploe_mm: float
    outer_table_mm: float
    galea_mm: float
    temporalis_mm: float
    fat_mm: float
    skin_mm: float


def draw_envelope(rng: np.random.Generator) -> EnvelopeParams:
    """Per-subject layer thicknesses, uniform within typical adult ranges (module docstring)."""
    return EnvelopeParams(
        csf_mm=rng.uniform(1.0, 3.0), dura_mm=rng.uniform(0.8, 1.2),
        inner_table_mm=rng.uniform(1.2, 2.0), diploe_mm=rng.uniform(2.0, 4.5),
        outer_table_mm=rng.uniform(1.3, 2.2), galea_mm=rng.uniform(1.5, 3.0),
        temporalis_mm=rng.uniform(5.0, 10.0), fat_mm=rng.uniform(2.5, 6.0),
        skin_mm=rng.uniform(1.2, 2.0),
    )


def _ramp(x: np.ndarray) -> np.ndarray:
    """Linear partial-volume step of width 1 mm: 0 below -0.5, 1 above +0.5."""
    return np.clip(x + 0.5, 0.0, 1.0)


def sample_template(tpl_pts: np.ndarray,
                    names: tuple[str, ...] = ("t1", "gm", "wm", "mask", "sdist"),
                    ) -> dict[str, np.ndarray]:
    """Template maps at template world points (3, N) mm, trilinear, edge values outside."""
    tpl = load_template()
    inv = np.linalg.inv(tpl.affine)
    idx = np.stack([inv[a, 0] * tpl_pts[0] + inv[a, 1] * tpl_pts[1] + inv[a, 2] * tpl_pts[2]
                    + inv[a, 3] for a in range(3)])
    out = {}
    for name in names:
        out[name] = ndimage.map_coordinates(getattr(tpl, name), idx, order=1, mode="nearest",
                                            prefilter=False)
    return out


def tissue_probabilities(tpl_pts: np.ndarray, env: EnvelopeParams, thickness: np.ndarray,
                         ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Tissue fractions at template world points ``tpl_pts`` (3, N) mm.

    ``thickness`` (N,) is a unit-variance smooth field that modulates layer thickness by +-20 %.

    Returns ``(head, probs, maps)``: ``head`` bool (N,) marks the points within reach of the
    head (the others are air: every tissue fraction 0); ``probs[t]`` float32 (``head.sum()``,)
    for each name in :data:`TISSUES` (summing to at most 1; the rest is air) and ``maps`` the
    template samples (``t1``, ``gm``, ``wm``, ``mask``, ``sdist``) at the head points.
    """
    # voxels farther from the brain than the whole envelope are air: skip their template lookups
    sd_all = sample_template(tpl_pts, ("sdist",))["sdist"]
    reach = (env.csf_mm + env.dura_mm + env.inner_table_mm + env.diploe_mm + env.outer_table_mm
             + env.galea_mm + env.fat_mm + env.skin_mm) * 1.2 + env.temporalis_mm + 2.0
    head = sd_all < reach
    tpl_pts = tpl_pts[:, head]
    thickness = thickness[head]
    m = sample_template(tpl_pts, ("t1", "gm", "wm", "mask"))
    m["sdist"] = sd_all[head]
    mask = m["mask"]
    gm = np.minimum(m["gm"], mask)
    wm = np.minimum(m["wm"], mask - gm)
    csf_in = np.clip(mask - gm - wm, 0.0, 1.0)
    sd = m["sdist"]
    # regional thickness modulation (+-20 %) and a temporalis muscle laterally, low on the head
    mod = 1.0 + 0.2 * np.clip(thickness, -2.0, 2.0) / 2.0
    x, z = tpl_pts[0], tpl_pts[2]
    temporalis = env.temporalis_mm * np.clip((np.abs(x) - 35.0) / 30.0, 0.0, 1.0) * np.exp(
        -(((z + 5.0) / 30.0) ** 2))
    names = []
    edges = [0.0]
    for name, th in (("csf", env.csf_mm), ("dura", env.dura_mm), ("bone", env.inner_table_mm),
                     ("marrow", env.diploe_mm), ("bone", env.outer_table_mm),
                     ("muscle", env.galea_mm), ("fat", env.fat_mm), ("skin", env.skin_mm)):
        thick = th * mod
        if name == "muscle":
            thick = thick + temporalis
        names.append(name)
        edges.append(edges[-1] + thick)
    outside = 1.0 - mask
    probs: dict[str, np.ndarray] = {t: np.zeros_like(sd) for t in TISSUES}
    probs["wm"], probs["gm"], probs["csf"] = wm, gm, csf_in
    ramps = [_ramp(sd - e) for e in edges]  # partial-volume step at each layer boundary
    for k, name in enumerate(names):
        frac = outside * (ramps[k] - ramps[k + 1])
        probs[name] = probs[name] + np.clip(frac, 0.0, 1.0)
    return head, {k: v.astype(np.float32) for k, v in probs.items()}, m
