"""Training images for the lesion segmenter, drawn from label maps the SynthSeg way.

SynthSeg (Billot et al. 2023, Medical Image Analysis 86:102789) and SynthStrip (Hoopes et al.
2022, NeuroImage 260:119474) train on images *generated from label maps*: every label gets a
random intensity per image, then a random bias field, blur (resolution and slice thickness),
noise and deformation, so the network learns shapes and relations instead of one scanner's
contrast. recnec does the same on its own anatomy, with one constraint SynthSeg does not need:
"enhancing" means *brighter on T1ce than on T1*, so the T1ce of every label is its T1 value plus
a label-specific enhancement (zero for tissue that does not enhance), and the T2 / FLAIR values
keep the sign of each label's contrast against white matter (wide ranges, :data:`PRIORS`).

One sample (:func:`draw_sample`) on the segmenter grid (:data:`GRID_SHAPE` voxels of
:data:`GRID_SPACING_MM`, axes X towards Right, Y Anterior, Z Superior, centred on the brain):

* **anatomy**: the MNI152 2009 white / grey matter and brain mask (:mod:`.anatomy`), under a
  random affine (rotation up to 15 degrees, scale 0.88-1.1, shift up to 5 mm) and a smooth
  non-linear displacement; CSF is brain minus WM and GM; a 0-3 mm shell of dura outside the brain.
* **normally enhancing structures on every image** (what fools a threshold detector on real
  T1ce): the superior sagittal and transverse sinuses (tubes in the dural shell), 3-9 cortical
  veins (1-1.8 mm tubes following the brain surface), the falx (a 2 mm midline sheet above the
  corpus callosum) and the choroid plexus (blobs in the ventricular trigones).
* **lesions, 0-3 per image** (none in :data:`P_NO_LESION` of them), kinds :data:`LESION_KINDS`:
  the synthetic cohort's rim / solid / bubbly lesions (:func:`.lesions.lesion_fields`, with
  oedema) deep in white matter, at the cortex reaching the brain surface, or periventricular;
  large metastasis-like rim lesions with a cystic core; several small lesions (multifocal); and a
  resection cavity (CSF-like) with a thin enhancing margin.
* **acquisition**: per-channel bias field, Gaussian blur with a random thick-slice axis, Rician-
  like noise, a sub-voxel misregistration of T1 / T2 / FLAIR against the T1ce, a brain mask that
  keeps the lesion and 0-4 mm of what lies outside the brain, robust z-score inside it, and
  random missing channels (set to 0, as at inference when a study has no FLAIR).

Targets (:data:`CLASSES`): 0 background, 1 enhancing tissue, 2 non-enhancing core (necrosis, cyst
or resection cavity inside an enhancing margin), 3 T2/FLAIR hyperintensity around it (oedema).

Everything is a deterministic function of ``(seed, index)`` (:class:`numpy.random.SeedSequence`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .anatomy import FourierField, load_template
from .lesions import draw_latent, draw_lesion, lesion_fields

#: segmenter grid: voxels (X, Y, Z) and spacing (mm); 160 x 192 x 160 mm holds an adult brain
GRID_SHAPE = (80, 96, 80)
GRID_SPACING_MM = 2.0
#: input channels, in this order; T1ce is never dropped
CHANNELS = ("T1", "T2", "T1ce", "FLAIR")
#: probability that a channel is missing in a training image (zeros, as at inference)
DROP_PROBABILITY = {"T1": 0.15, "T2": 0.2, "T1ce": 0.0, "FLAIR": 0.5}
#: output classes
CLASSES = ("background", "enhancing", "core", "oedema")
P_NO_LESION = 0.15
LESION_KINDS = ("deep", "cortical", "periventricular", "large_cystic", "multifocal", "cavity")

# label map values
WM, GM, CSF, DURA, SINUS, VEIN, FALX, CHOROID, ENH, NODULE, NECROSIS, CYST, OEDEMA = range(1, 14)
N_LABELS = 14
#: label -> target class
TARGET_OF = np.zeros(N_LABELS, dtype=np.int64)
TARGET_OF[[ENH, NODULE]] = 1
TARGET_OF[[NECROSIS, CYST]] = 2
TARGET_OF[OEDEMA] = 3

#: intensity priors, white matter = 1 on T1: (T1, T2, FLAIR) ranges and the T1ce enhancement range
#: (uniform draws per image). Signs of contrast follow textbook MR appearance (T2 bright CSF and
#: oedema, FLAIR-suppressed CSF, enhancing sinuses, veins, dura, choroid plexus and tumour).
PRIORS: dict[int, tuple[tuple[float, float], tuple[float, float], tuple[float, float], tuple[float, float]]] = {
    WM: ((1.0, 1.0), (0.3, 0.6), (0.55, 0.9), (0.0, 0.0)),
    GM: ((0.6, 0.85), (0.6, 0.95), (0.8, 1.15), (0.0, 0.0)),
    CSF: ((0.08, 0.35), (1.5, 2.6), (0.08, 0.4), (0.0, 0.0)),
    DURA: ((0.25, 0.7), (0.2, 0.8), (0.25, 0.7), (0.2, 0.9)),
    SINUS: ((0.15, 0.8), (0.05, 0.6), (0.1, 0.6), (0.8, 2.2)),
    VEIN: ((0.2, 0.8), (0.1, 0.7), (0.2, 0.7), (0.5, 1.6)),
    FALX: ((0.25, 0.6), (0.15, 0.6), (0.25, 0.6), (0.2, 0.8)),
    CHOROID: ((0.4, 0.85), (0.7, 1.6), (0.4, 1.0), (0.5, 1.6)),
    ENH: ((0.45, 0.9), (0.8, 1.7), (0.9, 1.7), (0.35, 1.3)),
    NODULE: ((0.5, 0.9), (0.45, 0.9), (0.8, 1.3), (0.35, 1.3)),
    NECROSIS: ((0.15, 0.6), (1.2, 2.3), (0.5, 1.5), (0.0, 0.05)),
    CYST: ((0.08, 0.35), (1.5, 2.6), (0.08, 0.7), (0.0, 0.03)),
    OEDEMA: ((0.45, 0.8), (1.1, 1.9), (1.1, 1.9), (0.0, 0.0)),
}

_TAG = 0x5E65E6


def grid_affine(shape: tuple[int, int, int] = GRID_SHAPE, spacing: float = GRID_SPACING_MM,
                centre_mm: np.ndarray | None = None) -> np.ndarray:
    """(4, 4) voxel -> RAS mm affine of an axis-aligned grid of ``shape`` centred on ``centre_mm``."""
    c = np.zeros(3) if centre_mm is None else np.asarray(centre_mm, dtype=np.float64)
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = c - spacing * (np.asarray(shape) - 1) / 2.0
    return aff


@dataclass(frozen=True, eq=False)
class Sample:
    """One training image: ``image`` float32 ``(4, X, Y, Z)`` (channels :data:`CHANNELS`, robust
    z-scored inside ``mask``, 0 outside and in dropped channels), ``target`` int64 ``(X, Y, Z)``
    (:data:`CLASSES`), ``labels`` uint8 label map, ``mask`` bool brain mask, ``present`` the
    channels kept, ``kinds`` the lesion kinds drawn."""

    image: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    present: tuple[str, ...]
    kinds: tuple[str, ...]


def _rng(seed: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([_TAG, seed, index, purpose]))


def _rotation(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    a, b, c = np.deg2rad(rng.uniform(-max_deg, max_deg, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _anatomy(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Template maps sampled on the segmenter grid under a random affine + smooth warp."""
    tpl = load_template()
    aff = grid_affine()
    ijk = np.stack(np.meshgrid(*(np.arange(n) for n in GRID_SHAPE), indexing="ij"), axis=-1).reshape(-1, 3)
    out_mm = ijk * GRID_SPACING_MM + aff[:3, 3]
    # template brain centre ~ (0, -18, 8) mm in MNI; a random similarity around it
    centre = np.array([0.0, -18.0, 8.0])
    rot = _rotation(rng, 15.0)
    scale = rng.uniform(0.88, 1.1) * rng.uniform(0.95, 1.05, size=3)
    shift = rng.uniform(-5.0, 5.0, size=3)
    warp = [FourierField.draw(rng, k=6, lam_min=50.0, lam_max=120.0, origin=np.zeros(3)) for _ in range(3)]
    amp = rng.uniform(0.0, 4.0)
    t_mm = (out_mm - shift) @ rot / scale + centre
    for a in range(3):
        t_mm[:, a] += amp * warp[a].on_grid(*_grid_axes()).ravel()
    inv = np.linalg.inv(tpl.affine)
    t_vox = (t_mm @ inv[:3, :3].T + inv[:3, 3]).T
    maps: dict[str, np.ndarray] = {"t_mm": t_mm.reshape(*GRID_SHAPE, 3).astype(np.float32)}
    for k, arr, cval in (("wm", tpl.wm, 0.0), ("gm", tpl.gm, 0.0), ("t1", tpl.t1, 0.0),
                         ("mask", tpl.mask.astype(np.float32), 0.0), ("sdist", tpl.sdist, 60.0)):
        maps[k] = ndimage.map_coordinates(arr, t_vox, order=1, cval=cval).reshape(GRID_SHAPE).astype(np.float32)
    maps["sdist"] *= np.float32(np.cbrt(np.prod(scale)))  # distances scale with the head
    return maps


def _tubes(rng: np.random.Generator, sdist: np.ndarray, n: int, radius_mm: tuple[float, float],
           length_mm: tuple[float, float], band: tuple[float, float]) -> np.ndarray:
    """``n`` tubes that follow the brain surface (``sdist`` in ``band`` mm), as a bool map."""
    grad = np.stack(np.gradient(sdist, GRID_SPACING_MM))
    start_pool = np.argwhere((sdist > band[0]) & (sdist < band[1]))
    out = np.zeros(GRID_SHAPE, dtype=bool)
    if len(start_pool) == 0:
        return out
    hi = np.asarray(GRID_SHAPE) - 1
    for _ in range(n):
        p = start_pool[int(rng.integers(len(start_pool)))].astype(np.float64)
        d = rng.normal(size=3)
        length = rng.uniform(*length_mm)
        radius = rng.uniform(*radius_mm)
        pts = []
        for _step in range(int(length / 1.0)):
            i = tuple(np.clip(np.round(p).astype(int), 0, hi))
            g = grad[(slice(None), *i)]
            gn = np.linalg.norm(g) + 1e-6
            d = d - (d @ g) / gn ** 2 * g  # stay tangent to the surface
            d = d / (np.linalg.norm(d) + 1e-9) + 0.15 * rng.normal(size=3)
            d /= np.linalg.norm(d) + 1e-9
            target = 0.5 * (band[0] + band[1])
            p = p + d * (1.0 / GRID_SPACING_MM) - (sdist[i] - target) / GRID_SPACING_MM * g / gn * 0.5
            if np.any(p < 0) or np.any(p > hi):
                break
            pts.append(p.copy())
        if not pts:
            continue
        seed = np.zeros(GRID_SHAPE, dtype=bool)
        idx = np.clip(np.round(np.asarray(pts)).astype(int), 0, hi)
        seed[idx[:, 0], idx[:, 1], idx[:, 2]] = True
        out |= ndimage.distance_transform_edt(~seed, sampling=GRID_SPACING_MM) <= radius
    return out


def _place(rng: np.random.Generator, where: np.ndarray) -> np.ndarray | None:
    pool = np.argwhere(where)
    if len(pool) == 0:
        return None
    return pool[int(rng.integers(len(pool)))] * GRID_SPACING_MM + grid_affine()[:3, 3]


def _lesion(rng: np.random.Generator, kind: str, maps: dict[str, np.ndarray], axes: list[np.ndarray]
            ) -> dict[str, np.ndarray] | None:
    """Soft lesion fields of one lesion of ``kind`` (see :data:`LESION_KINDS`) on the grid."""
    sd, wm, gm, mask = maps["sdist"], maps["wm"], maps["gm"], maps["mask"]
    csf = np.clip(mask - wm - gm, 0, 1)
    if kind == "cortical":
        where = (sd > -10) & (sd < -3) & (gm > 0.3)
    elif kind == "periventricular":
        deep_csf = ndimage.binary_dilation((csf > 0.6) & (sd < -12), iterations=3)
        where = deep_csf & (wm > 0.5)
    else:
        where = (wm > 0.5) & (sd < -10)
    centre = _place(rng, where)
    if centre is None:
        return None
    z = draw_latent(rng, "recurrence" if rng.uniform() < 0.7 else "necrosis")
    p = draw_lesion(rng, z=z, centre_mm=centre)
    r = np.asarray(p.radii_mm)
    if kind == "large_cystic":
        r = r * rng.uniform(1.4, 1.9)
        p = p.__class__(**{**p.to_dict(), "radii_mm": tuple(r), "pattern": "rim",
                           "rim_mm": float(rng.uniform(1.5, 5.0)), "holes": ()})
    elif kind == "multifocal":
        r = r * rng.uniform(0.3, 0.6)
        p = p.__class__(**{**p.to_dict(), "radii_mm": tuple(r), "holes": ()})
    elif kind == "cavity":
        p = p.__class__(**{**p.to_dict(), "pattern": "rim", "rim_mm": float(rng.uniform(1.0, 3.0)),
                           "nodularity": float(rng.uniform(0.3, 0.9)), "holes": ()})
    # the lesion field is built in world mm, so axes must hold the grid's world coordinates
    f = lesion_fields(p, *axes, wm, gm)
    f["cystic"] = np.float32(kind in ("large_cystic", "cavity") or rng.uniform() < 0.25)
    if kind == "cavity":  # a margin that enhances only in part
        keep = FourierField.draw(rng, k=6, lam_min=15.0, lam_max=40.0, origin=centre).on_grid(*axes) > -0.3
        f["enhancing"] = f["enhancing"] * keep
        f["oedema"] = f["oedema"] * np.float32(rng.uniform(0.0, 1.0))
    return f


def _label_map(rng: np.random.Generator, maps: dict[str, np.ndarray], force_kind: str | None = None
               ) -> tuple[np.ndarray, tuple[str, ...]]:
    sd, wm, gm, mask, t_mm = maps["sdist"], maps["wm"], maps["gm"], maps["mask"], maps["t_mm"]
    tx, ty, tz = t_mm[..., 0], t_mm[..., 1], t_mm[..., 2]
    lab = np.zeros(GRID_SHAPE, dtype=np.uint8)
    inside = mask > 0.5
    lab[inside] = CSF
    lab[inside & (gm >= wm) & (gm > 0.35)] = GM
    lab[inside & (wm > gm) & (wm > 0.35)] = WM
    dura_mm = rng.uniform(1.0, 3.0)
    shell = (~inside) & (sd < dura_mm) & (sd > -1.0)
    lab[shell] = DURA
    # sinuses: superior sagittal along the midline in the shell, transverse posteriorly
    ssn_w = rng.uniform(2.5, 5.0)
    sss = (sd > -1.0) & (sd < dura_mm + 3.0) & (np.abs(tx) < ssn_w) & (tz > -10.0) & ~inside
    trans = (sd > -1.0) & (sd < dura_mm + 3.0) & (np.abs(tz + 12.0) < rng.uniform(3.0, 6.0)) & (ty < -75.0) & ~inside
    # falx: a midline sheet above the corpus callosum
    falx = inside & (np.abs(tx) < rng.uniform(0.8, 1.6)) & (tz > 18.0) & (wm < 0.5) & (rng.uniform() < 0.9)
    lab[falx] = FALX
    # choroid plexus: blobs in the ventricular trigones (deep CSF)
    deep_csf = inside & (np.clip(mask - wm - gm, 0, 1) > 0.5) & (sd < -12.0)
    for side in (-1.0, 1.0):
        c = np.array([side * rng.uniform(22.0, 32.0), rng.uniform(-48.0, -32.0), rng.uniform(8.0, 20.0)])
        r = rng.uniform(4.0, 8.0)
        blob = ((tx - c[0]) ** 2 + (ty - c[1]) ** 2 + ((tz - c[2]) / 1.6) ** 2) < r * r
        lab[blob & ndimage.binary_dilation(deep_csf, iterations=1)] = CHOROID
    veins = _tubes(rng, sd, int(rng.integers(3, 10)), (1.0, 1.8), (20.0, 70.0), (-1.5, 1.5))
    lab[veins & (sd < dura_mm + 1.0)] = VEIN
    lab[sss | trans] = SINUS

    kinds: list[str] = []
    if force_kind is None:  # (draw order fixed: the shipped segmenter's bytes depend on it)
        draw = rng.uniform() >= P_NO_LESION
        if draw:
            kind = str(rng.choice(LESION_KINDS))
            n = int(rng.integers(2, 5)) if kind == "multifocal" else (1 if rng.uniform() < 0.8 else 2)
    else:  # tests and benchmarks: exactly this kind ("none": no lesion)
        draw, kind, n = force_kind != "none", force_kind, (3 if force_kind == "multifocal" else 1)
    if draw:
        axes = _grid_axes()
        for i in range(n):
            k = kind if i == 0 or kind == "multifocal" else str(rng.choice(LESION_KINDS[:3]))
            f = _lesion(rng, k, maps, axes)
            if f is None:
                continue
            kinds.append(k)
            brainish = inside | (f["lesion"] > 0.5)
            oed = (f["oedema"] > 0.5) & brainish & (lab != ENH) & (lab != NECROSIS) & (lab != CYST)
            lab[oed & (lab != SINUS) & (lab != VEIN)] = OEDEMA
            les = f["lesion"] > 0.5
            enh = les & (f["enhancing"] > 0.5)
            core = les & ~enh
            lab[core] = CYST if float(f["cystic"]) > 0.5 else NECROSIS
            lab[enh] = ENH
            lab[enh & (f["nodule"] > 0.5)] = NODULE
    return lab, tuple(kinds)


def _grid_axes() -> list[np.ndarray]:
    aff = grid_affine()
    return [aff[a, a] * np.arange(GRID_SHAPE[a]) + aff[a, 3] for a in range(3)]


def _smooth_field(rng: np.random.Generator, amp: float) -> np.ndarray:
    """A multiplicative bias field ``exp(amp * f)``, ``f`` smooth with unit variance (60-200 mm)."""
    f = FourierField.draw(rng, k=6, lam_min=60.0, lam_max=200.0, origin=np.zeros(3)).on_grid(*_grid_axes())
    return np.exp(np.float32(amp) * f)


def render_images(rng: np.random.Generator, labels: np.ndarray, t1_texture: np.ndarray
                  ) -> dict[str, np.ndarray]:
    """Per-channel images (float32, :data:`GRID_SHAPE`) from a label map, SynthSeg style."""
    means = np.zeros((N_LABELS, 4), dtype=np.float32)
    sds = np.zeros((N_LABELS, 4), dtype=np.float32)
    for lab, (t1r, t2r, flr, enr) in PRIORS.items():
        t1v = rng.uniform(*t1r)
        means[lab] = (t1v, rng.uniform(*t2r), t1v + rng.uniform(*enr), rng.uniform(*flr))
        sds[lab] = rng.uniform(0.01, 0.08, size=4)
    tex = np.clip(t1_texture, 0, 2) - 1.0
    out = {}
    for c, name in enumerate(CHANNELS):
        img = means[labels, c] + sds[labels, c] * rng.normal(size=GRID_SHAPE).astype(np.float32)
        if name in ("T1", "T1ce"):  # real anatomy's texture (cortex folding) on T1-weighted images
            img += np.float32(rng.uniform(0.1, 0.4)) * tex * ((labels == WM) | (labels == GM))
        img *= _smooth_field(rng, float(rng.uniform(0.0, 0.35)))
        sig = rng.uniform(0.0, 0.8, size=3)
        sig[int(rng.integers(3))] = rng.uniform(0.0, 1.8)  # a thick-slice axis
        img = ndimage.gaussian_filter(img, sig)
        noise = rng.uniform(0.005, 0.06)
        img = np.sqrt((img + noise * rng.normal(size=GRID_SHAPE)) ** 2 + (noise * rng.normal(size=GRID_SHAPE)) ** 2)
        if name != "T1ce":  # residual misregistration against the T1ce
            img = ndimage.shift(img, rng.uniform(-0.6, 0.6, size=3), order=1, mode="nearest")
        out[name] = img.astype(np.float32)
    return out


def normalise(images: dict[str, np.ndarray | None], mask: np.ndarray, clip: float = 5.0) -> np.ndarray:
    """Stack ``images`` (:data:`CHANNELS`; ``None`` = missing) into float32 ``(4, X, Y, Z)``:
    robust z-score inside ``mask`` (:func:`recnec_cli.stages.intensity.robust_zscore`), clipped
    to +-``clip``, 0 outside the mask and for missing channels. Shared by training and inference."""
    from ..stages.intensity import robust_zscore

    out = np.zeros((len(CHANNELS), *mask.shape), dtype=np.float32)
    for c, name in enumerate(CHANNELS):
        img = images.get(name)
        if img is None:
            continue
        z = np.clip(robust_zscore(np.asarray(img, dtype=np.float32), mask), -clip, clip)
        out[c] = np.where(mask, z, 0.0)
    return out


@dataclass(frozen=True, eq=False)
class LabelMap:
    """One drawn head: ``labels`` uint8 ``(X, Y, Z)`` label map (values :data:`WM` ...
    :data:`OEDEMA`, 0 outside), ``t1_texture`` float32 the template T1 on the grid (WM = 1),
    ``brain`` bool the brain before lesions, ``kinds`` the lesion kinds drawn."""

    labels: np.ndarray
    t1_texture: np.ndarray
    brain: np.ndarray
    kinds: tuple[str, ...]


def draw_label_map(seed: int, index: int, *, kind: str | None = None) -> LabelMap:
    """Label map ``index`` of ``seed``: anatomy, normally enhancing structures, lesions (~0.6 s).

    ``kind`` forces one lesion of that kind (:data:`LESION_KINDS`; three for ``multifocal``) or, with
    ``"none"``, no lesion; ``None`` draws as in training.
    """
    if kind is not None and kind not in (*LESION_KINDS, "none"):
        raise ValueError(f"kind must be one of {LESION_KINDS} or 'none', got {kind!r}")
    rng = _rng(seed, index, 1)
    maps = _anatomy(rng)
    labels, kinds = _label_map(rng, maps, force_kind=kind)
    return LabelMap(labels=labels, t1_texture=maps["t1"], brain=maps["mask"] > 0.5, kinds=kinds)


def render_sample(lm: LabelMap, seed: int, index: int, *, flip: bool = False) -> Sample:
    """Image ``index`` of ``seed`` drawn from the label map ``lm`` (random intensities, bias, blur,
    noise, brain mask, missing channels; ~0.4 s); ``flip`` mirrors it left-right."""
    labels = lm.labels[::-1].copy() if flip else lm.labels
    texture = lm.t1_texture[::-1].copy() if flip else lm.t1_texture
    brain = lm.brain[::-1] if flip else lm.brain
    images = render_images(_rng(seed, index, 2), labels, texture)
    rng_m = _rng(seed, index, 3)
    lesion_any = TARGET_OF[labels] > 0
    mask = brain | (lesion_any & (labels != OEDEMA))
    grow = int(rng_m.integers(0, 3))
    if grow:
        mask = ndimage.binary_dilation(mask, iterations=grow)
    mask = ndimage.binary_fill_holes(mask)
    present = tuple(c for c in CHANNELS if rng_m.uniform() >= DROP_PROBABILITY[c])
    image = normalise({c: images[c] if c in present else None for c in CHANNELS}, mask)
    target = TARGET_OF[labels] * mask
    return Sample(image=image, target=target.astype(np.int64), labels=labels, mask=mask,
                  present=present, kinds=lm.kinds)


def draw_sample(seed: int, index: int) -> Sample:
    """Training image ``index`` of ``seed`` from its own label map (module docstring; ~1 s)."""
    return render_sample(draw_label_map(seed, index), seed, index)
