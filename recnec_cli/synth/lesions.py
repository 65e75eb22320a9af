"""Enhancing lesions after radiotherapy: tumour recurrence versus radiation necrosis.

Imaging signs and their sources (each used as a *tendency*, never as a rule):

* **Lesion quotient** (LQ = area of the T2 hypo/isointense nodule over the area of T1ce
  enhancement, on the slice of largest extent): LQ <= 0.3 suggests radiation necrosis,
  LQ >= 0.6 recurrence (Dequesada et al. 2008, Neurosurgery 63:898; Kano et al. 2010,
  "T1/T2 matching", Neurosurgery 66:486).
* **Enhancement pattern**: solid or nodular enhancement favours recurrence; rim enhancement with
  a thin smooth wall, and "Swiss cheese" / "soap bubble" interiors favour radiation necrosis, with
  much overlap (Mullins et al. 2005, AJNR 26:1967; Shah et al. 2012, RadioGraphics 32:1343;
  Verma et al. 2013, Neuro-Oncology 15:515).
* **Perilesional oedema**: often more extensive around radiation necrosis than its enhancing
  core would suggest (Shah et al. 2012; Verma et al. 2013).
* Lesion size, position, shape irregularity and enhancement strength are drawn independently of
  the class: conventional MRI does not separate the classes by them (Verma et al. 2013).

**Overlap by construction.** Every subject has a latent "recurrence-likeness"
``z ~ Normal(+DELTA/2, 1)`` for recurrence and ``Normal(-DELTA/2, 1)`` for necrosis, and every
sign above is a noisy function of ``z`` alone. The label therefore depends on the image only
through ``z``, so no classifier can beat the binormal AUC ``Phi(DELTA / sqrt(2))`` (0.98 for
``DELTA = 3.0``); the noise on each sign keeps a realistic model below that ceiling.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Callable

import numpy as np

from .anatomy import FourierField

#: separation of the class-conditional latent means (see module docstring)
DELTA = 3.0
#: sd of the per-sign noise added to z before each sign is derived from it
SIGN_NOISE = 0.5

PATTERNS = ("solid", "rim", "bubbles")

#: range of the drawn mean radius r0 (mm) and of each semi-axis as a multiple of r0
R0_RANGE_MM = (7.0, 16.0)
AXIS_FACTOR_RANGE = (0.75, 1.2)
#: every semi-axis any lesion has (baseline or follow-up): [5.25, 19.2] mm, the bounds of the
#: baseline draw; with the outline irregularity the lesion reaches <= ~28 mm from its centre,
#: inside :data:`INFLUENCE_MM` and the model box (:data:`recnec_cli.synth.truth.MODEL_BOX_HALF_VOX`)
RADIUS_BOUNDS_MM = (R0_RANGE_MM[0] * AXIS_FACTOR_RANGE[0], R0_RANGE_MM[1] * AXIS_FACTOR_RANGE[1])
#: range of the oedema extent (mm beyond the outline) of the baseline draw; follow-ups stay in it
OEDEMA_BOUNDS_MM = (3.0, 28.0)


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


@dataclass(frozen=True)
class LesionParams:
    """One lesion's drawn parameters. Lengths in mm, world RAS+; quotients unitless.

    ``centre_mm`` is the generating centre (the lesion mask's centroid differs slightly);
    ``axes`` a (3, 3) rotation whose columns are the ellipsoid axes; ``radii_mm`` the semi-axes;
    ``pattern`` one of :data:`PATTERNS`; ``rim_mm`` the enhancing wall thickness of rim lesions;
    ``nodularity`` the relative variation of that wall; ``holes`` (M, 4) hole centres (mm, world)
    and radii for "bubbles"; ``lesion_quotient`` the target T2-nodule / enhancing-area ratio;
    ``oedema_mm`` the extent of vasogenic oedema beyond the lesion; ``enhancement`` the T1ce
    enhancement (WM units); ``z`` the latent recurrence-likeness.
    """

    z: float
    centre_mm: tuple[float, float, float]
    axes: tuple[tuple[float, ...], ...]
    radii_mm: tuple[float, float, float]
    irregularity: float
    pattern: str
    rim_mm: float
    nodularity: float
    holes: tuple[tuple[float, float, float, float], ...]
    lesion_quotient: float
    nodule_offset_mm: tuple[float, float, float]
    oedema_mm: float
    enhancement: float
    field_seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def draw_latent(rng: np.random.Generator, label: str) -> float:
    """Latent recurrence-likeness ``z`` for ``label`` ('recurrence' or 'necrosis')."""
    sign = 1.0 if label == "recurrence" else -1.0
    return float(sign * DELTA / 2.0 + rng.normal())


def draw_lesion(rng: np.random.Generator, *, z: float, centre_mm: np.ndarray) -> LesionParams:
    """Draw a lesion whose class-related signs derive from the latent ``z`` (module docstring)."""
    def noisy() -> float:
        return z + SIGN_NOISE * float(rng.normal())

    # nuisance (class-independent)
    r0 = float(rng.uniform(*R0_RANGE_MM))
    radii = r0 * rng.uniform(*AXIS_FACTOR_RANGE, size=3)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    irregularity = float(rng.uniform(0.06, 0.2))
    enhancement = float(rng.uniform(0.6, 1.1))
    # class-related signs
    zp = noisy()
    p_solid = _sigmoid(2.0 * zp - 0.3)
    u = float(rng.uniform())
    if u < p_solid:
        pattern = "solid"
    else:
        pattern = "bubbles" if rng.uniform() < _sigmoid(-1.5 * zp - 0.3) else "rim"
    zr = noisy()
    rim = float(1.5 + 4.5 * _sigmoid(1.5 * zr))  # thin smooth wall -> necrosis
    nodularity = float(0.05 + 0.45 * _sigmoid(1.5 * zr))
    holes: list[tuple[float, float, float, float]] = []
    if pattern == "bubbles":
        n_holes = int(rng.integers(4, 11))
        hole_scale = float(rng.uniform(0.15, 0.32))  # small holes: Swiss cheese; big: soap bubble
        for _ in range(n_holes):
            d = rng.normal(size=3)
            d /= np.linalg.norm(d)
            pos = np.asarray(centre_mm) + q @ (d * radii * 0.65 * rng.uniform() ** (1 / 3))
            holes.append((*(float(v) for v in pos), float(r0 * hole_scale * rng.uniform(0.7, 1.3))))
    lq = float(0.08 + 0.84 * _sigmoid(1.8 * noisy()))
    off = rng.normal(size=3)
    off = off / np.linalg.norm(off) * float(rng.uniform(0.0, 0.35)) * r0 * (1.0 - np.sqrt(lq))
    oedema = float(OEDEMA_BOUNDS_MM[0] + (OEDEMA_BOUNDS_MM[1] - OEDEMA_BOUNDS_MM[0])
                   * _sigmoid(-1.6 * noisy()))
    return LesionParams(
        z=z, centre_mm=tuple(float(v) for v in centre_mm),
        axes=tuple(tuple(float(v) for v in row) for row in q),
        radii_mm=tuple(float(v) for v in radii), irregularity=irregularity, pattern=pattern,
        rim_mm=rim, nodularity=nodularity, holes=tuple(holes), lesion_quotient=lq,
        nodule_offset_mm=tuple(float(v) for v in off), oedema_mm=oedema,
        enhancement=enhancement, field_seed=int(rng.integers(0, 2**31 - 1)),
    )


#: per-step factor on every radius of a lesion at a follow-up, by label (drawn uniformly): a
#: recurrence grows, a radiation necrosis stays or shrinks (the usual course of either,
#: Shah et al. 2012; Verma et al. 2013)
GROWTH_PER_STEP = {"recurrence": (1.08, 1.30), "necrosis": (0.80, 1.02)}
#: per-step factor on ``oedema_mm``: a little more around a recurrence, same or less around a necrosis
OEDEMA_PER_STEP = {"recurrence": (1.00, 1.15), "necrosis": (0.85, 1.00)}
#: largest shift (mm) of the lesion centre between consecutive studies
CENTRE_JITTER_MM = 2.0


def evolve_lesion(p: LesionParams, rng: np.random.Generator, *, label: str,
                  inside: Callable[[np.ndarray], bool] | None = None) -> LesionParams:
    """The lesion ``p`` one follow-up later (a new :class:`LesionParams`, ``p`` is unchanged).

    Draws, in this order from ``rng``: a radius factor in :data:`GROWTH_PER_STEP` ``[label]``, an
    oedema factor in :data:`OEDEMA_PER_STEP` ``[label]``, then up to 8 candidate centre shifts
    (uniform in the ball of radius :data:`CENTRE_JITTER_MM`), keeping the first whose new centre
    satisfies ``inside(centre (3,) mm RAS+)`` (no shift when none does; every candidate is
    accepted without ``inside``). A shift of <= 2 mm keeps consecutive lesions overlapping.

    The radius factor is clamped so that every semi-axis stays within :data:`RADIUS_BOUNDS_MM`
    (a recurrence already at the upper bound stops growing); the lesion is scaled as a whole, so
    the hole centres (relative to the lesion centre), hole radii and the T2-nodule offset scale
    with it. ``oedema_mm`` stays within :data:`OEDEMA_BOUNDS_MM`. Pattern, rim, lesion quotient,
    enhancement, orientation, latent ``z`` and ``field_seed`` (the outline's irregularity and
    texture, which move with the centre) are those of ``p``: the same lesion, later.
    """
    if label not in GROWTH_PER_STEP:
        raise ValueError(f"label must be one of {tuple(GROWTH_PER_STEP)}, got {label!r}")
    radii = np.asarray(p.radii_mm, dtype=np.float64)
    f = float(rng.uniform(*GROWTH_PER_STEP[label]))
    f = min(max(f, RADIUS_BOUNDS_MM[0] / float(radii.min())), RADIUS_BOUNDS_MM[1] / float(radii.max()))
    g = float(rng.uniform(*OEDEMA_PER_STEP[label]))
    old = np.asarray(p.centre_mm, dtype=np.float64)
    centre = old
    for _ in range(8):
        d = rng.normal(size=3)
        cand = old + d / np.linalg.norm(d) * CENTRE_JITTER_MM * float(rng.uniform()) ** (1.0 / 3.0)
        if inside is None or inside(cand):
            centre = cand
            break
    holes = tuple((*_xyz(centre + f * (np.asarray(h[:3]) - old)), float(h[3] * f)) for h in p.holes)
    return replace(
        p, centre_mm=_xyz(centre), radii_mm=_xyz(radii * f), holes=holes,
        nodule_offset_mm=_xyz(np.asarray(p.nodule_offset_mm) * f),
        oedema_mm=float(np.clip(p.oedema_mm * g, *OEDEMA_BOUNDS_MM)))


def _xyz(v: np.ndarray) -> tuple[float, float, float]:
    return float(v[0]), float(v[1]), float(v[2])


#: half-width (mm) of the cube around the centre outside which the lesion has no effect
INFLUENCE_MM = 52.0


def lesion_fields(p: LesionParams, xs: np.ndarray, ys: np.ndarray, zs: np.ndarray,
                  brain_wm: np.ndarray, brain_gm: np.ndarray) -> dict[str, np.ndarray]:
    """Soft lesion compartments on the axis-aligned grid ``xs x ys x zs`` (1D world mm, RAS+).

    ``brain_wm`` / ``brain_gm`` are the tissue fractions on that grid, shape (nx, ny, nz).
    Returns float32 arrays of that shape in [0, 1]: ``lesion`` (inside the lesion outline:
    enhancing wall plus enclosed necrosis), ``enhancing`` (enhancing fraction of the voxel),
    ``nodule`` (T2 nodule fraction), ``oedema`` (vasogenic oedema outside the lesion, white
    matter mostly) and ``texture`` (unit-variance smooth field modulating enhancement).
    """
    rng = np.random.default_rng(p.field_seed)
    c = np.asarray(p.centre_mm)
    f_shape = FourierField.draw(rng, k=10, lam_min=10.0, lam_max=30.0, origin=c)
    f_rim = FourierField.draw(rng, k=10, lam_min=6.0, lam_max=18.0, origin=c)
    f_oed = FourierField.draw(rng, k=8, lam_min=15.0, lam_max=40.0, origin=c)
    f_tex = FourierField.draw(rng, k=10, lam_min=4.0, lam_max=12.0, origin=c)
    axes = np.asarray(p.axes)
    radii = np.asarray(p.radii_mm)
    r_mean = float(np.mean(radii))
    shape = (len(xs), len(ys), len(zs))
    dx, dy, dz = np.meshgrid(xs - c[0], ys - c[1], zs - c[2], indexing="ij", sparse=True)

    def ellipsoid_rho(off: np.ndarray, rad: np.ndarray) -> np.ndarray:
        acc = np.zeros(shape, dtype=np.float64)
        for a in range(3):
            ua = (dx - off[0]) * axes[0, a] + (dy - off[1]) * axes[1, a] + (dz - off[2]) * axes[2, a]
            acc += (ua / rad[a]) ** 2
        return np.sqrt(acc)

    irr = 1.0 + p.irregularity * np.clip(f_shape.on_grid(xs, ys, zs), -1.5, 1.5)
    rho = ellipsoid_rho(np.zeros(3), radii) * irr
    lesion = np.clip((1.0 - rho) * r_mean + 0.5, 0.0, 1.0)
    enh_frac = np.ones(shape, dtype=np.float64)
    if p.pattern == "rim":
        wall = np.maximum(p.rim_mm * (1.0 + p.nodularity * 2.0
                                      * np.clip(f_rim.on_grid(xs, ys, zs), -1.5, 1.5)), 0.8)
        depth = (1.0 - rho) * r_mean  # mm inside the outline (approx.)
        enh_frac *= 1.0 - np.clip(depth - wall + 0.5, 0.0, 1.0)
    for hx, hy, hz, hr in p.holes:
        dist = np.sqrt((dx - (hx - c[0])) ** 2 + (dy - (hy - c[1])) ** 2 + (dz - (hz - c[2])) ** 2)
        enh_frac *= np.clip(dist - hr + 0.5, 0.0, 1.0)
    rn = radii * np.sqrt(p.lesion_quotient)
    rho_n = ellipsoid_rho(np.asarray(p.nodule_offset_mm), rn) * irr
    nodule = np.clip((1.0 - rho_n) * float(np.mean(rn)) + 0.5, 0.0, 1.0) * enh_frac
    outside_mm = (rho - 1.0) * r_mean
    ext = p.oedema_mm * (1.0 + 0.35 * np.clip(f_oed.on_grid(xs, ys, zs), -2.0, 2.0))
    oedema = np.clip((ext - outside_mm) / 4.0, 0.0, 1.0) * (1.0 - lesion)
    oedema *= np.clip(brain_wm + 0.3 * brain_gm, 0.0, 1.0)
    return {
        "lesion": lesion.astype(np.float32), "enhancing": (enh_frac * lesion).astype(np.float32),
        "nodule": (nodule * lesion).astype(np.float32), "oedema": oedema.astype(np.float32),
        "texture": f_tex.on_grid(xs, ys, zs),
    }
