"""Tissue intensities, bias field and noise of the synthetic T1, T2 and T1ce images.

Intensities are *relative* signal levels per tissue class and sequence family (T1: white matter
= 1; T2: CSF = 1). They reproduce the orderings and approximate ratios of clinical images
(T1: fat >= WM > GM > muscle > CSF > bone; T2: CSF > fat > GM > WM > muscle > bone), as follow
from relaxation times at 1.5-3 T (Stanisz et al. 2005, MRM 54:507; Wansapura et al. 1999,
JMRI 9:531) with the sequences' TR/TE/TI; 2D spin-echo T1 has less GM/WM contrast and brighter
CSF than 3D inversion-prepared gradient echo (MPRAGE / BRAVO / TFE). Each subject scales every
entry by a factor drawn uniformly in [0.95, 1.05].

Enhancement (added to the pre-contrast T1 to make the T1ce) is in units of the WM signal:
lesion 0.6-1.1 (enhancing tumour or necrosis appears brighter than WM after gadolinium),
choroid plexus ~0.8, dural venous sinuses ~0.9, dura ~0.25 (Smirniotopoulos et al. 2007,
RadioGraphics 27:525, patterns of contrast enhancement in the brain and meninges).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .anatomy import TISSUES, FourierField

#: relative intensity per tissue for each sequence family (order of :data:`TISSUES`:
#: wm, gm, csf, dura, bone, marrow, muscle, fat, skin)
INTENSITY = {
    "T1_3D": dict(wm=1.00, gm=0.62, csf=0.16, dura=0.30, bone=0.04, marrow=0.78, muscle=0.45,
                  fat=1.05, skin=0.55),
    "T1_SE": dict(wm=1.00, gm=0.76, csf=0.33, dura=0.40, bone=0.05, marrow=0.88, muscle=0.55,
                  fat=1.10, skin=0.60),
    "T2": dict(wm=0.30, gm=0.44, csf=1.00, dura=0.15, bone=0.04, marrow=0.50, muscle=0.22,
               fat=0.70, skin=0.35),
}

#: lesion / oedema intensities; T1 families in WM units, T2 in CSF units
#: (Shah et al. 2012, RadioGraphics 32:1343; Verma et al. 2013, Neuro-Oncology 15:515):
#: enhancing tissue is T1 iso- to hypointense before contrast; necrotic or cystic content is
#: T1 hypo- and T2 hyperintense; vasogenic oedema lowers T1 and raises T2 of white matter; the
#: "T2 nodule" (Kano et al. 2010) is the part of the enhancing region with low-intermediate T2.
LESION_INTENSITY = {
    "T1_3D": dict(enhancing=0.66, necrotic=0.28, oedema=0.78, nodule=0.66),
    "T1_SE": dict(enhancing=0.72, necrotic=0.40, oedema=0.83, nodule=0.72),
    "T2": dict(enhancing=0.68, necrotic=0.88, oedema=0.70, nodule=0.40),
}

#: T1ce enhancement in WM units (module docstring)
ENHANCEMENT = dict(choroid=0.8, sinus=0.9, dura=0.25)


def family(kind: str) -> str:
    """Intensity-table family of an acquisition kind (``T1_3D``, ``T1_SE`` or ``T2``)."""
    if kind.startswith("T2"):
        return "T2"
    return "T1_SE" if kind == "T1_SE" else "T1_3D"


@dataclass(frozen=True, eq=False)
class ContrastParams:
    """Per-subject, per-sequence intensity scaling, bias field and noise.

    ``scale`` multiplies every tissue intensity of the family (dict tissue -> factor);
    ``bias`` is ``exp(bias_amp * f(x))`` with ``f`` a unit-variance smooth field of 150-400 mm
    wavelength (intensity non-uniformity of +-10-25 % across the head, Sled et al. 1998, IEEE
    TMI 17:87); ``noise_sd`` the Gaussian noise level of each quadrature channel in WM (T1) or
    CSF (T2) units (SNR 20-60), magnitude taken (Rician, Gudbjartsson & Patz 1995, MRM 34:910).
    """

    scale: dict
    bias_field: FourierField
    bias_amp: float
    noise_sd: float


def draw_contrast(rng: np.random.Generator, *, snr_range=(20.0, 60.0)) -> ContrastParams:
    """Draw one sequence's :class:`ContrastParams`."""
    scale = {t: float(rng.uniform(0.95, 1.05)) for t in (*TISSUES, "enhancing", "necrotic",
                                                          "oedema", "nodule")}
    bias = FourierField.draw(rng, k=6, lam_min=150.0, lam_max=400.0, origin=np.zeros(3))
    return ContrastParams(scale=scale, bias_field=bias, bias_amp=float(rng.uniform(0.05, 0.12)),
                          noise_sd=float(1.0 / rng.uniform(*snr_range)))


def noise_tiles(seed_words: tuple[int, ...], shape: tuple[int, int, int],
                box: tuple[slice, slice, slice], tile: int = 32) -> np.ndarray:
    """Standard normal noise, shape ``(2, *box_shape)``, for the ``box`` of a grid of ``shape``.

    The noise of each 32^3 tile comes from its own seed (``seed_words`` + tile index), so a
    sub-box receives exactly the values the full grid would have there.
    """
    starts = [s.start for s in box]
    stops = [s.stop for s in box]
    out = np.empty((2, *(b - a for a, b in zip(starts, stops))), dtype=np.float32)
    t_lo = [a // tile for a in starts]
    t_hi = [(b - 1) // tile for b in stops]
    for ti in range(t_lo[0], t_hi[0] + 1):
        for tj in range(t_lo[1], t_hi[1] + 1):
            for tk in range(t_lo[2], t_hi[2] + 1):
                rng = np.random.default_rng(np.random.SeedSequence([*seed_words, ti, tj, tk]))
                block = rng.standard_normal((2, tile, tile, tile), dtype=np.float32)
                src, dst = [], []
                for t, a, b in zip((ti, tj, tk), starts, stops):
                    lo, hi = max(a, t * tile), min(b, (t + 1) * tile)
                    src.append(slice(lo - t * tile, hi - t * tile))
                    dst.append(slice(lo - a, hi - a))
                out[(slice(None), *dst)] = block[(slice(None), *src)]
    return out
