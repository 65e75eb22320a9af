"""Per-sequence acquisition parameters and vendor-style DICOM header values.

Three vendors' conventions for ImageType, ScanningSequence, SequenceVariant, ScanOptions and
SequenceName (DICOM PS3.3 C.8.3.1; values as exported by Siemens syngo / GE Signa / Philips
Ingenia consoles), typical clinical TR / TE / TI / flip angle at 1.5 T and 3 T, 3D 1 mm or 2D
thick-slice geometry, series descriptions in English, German, French, Spanish, Dutch and Italian,
and ContrastBolusAgent present, empty or absent. A T1ce always carries at least one contrast
hint (agent or a description token) so that scanning a synthetic cohort is decidable; real
exports without any hint are covered by the classifier's own tests (docs/failure-kinds.md kind 16).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

VENDORS = ("SIEMENS", "GE", "PHILIPS")

_MODELS = {
    "SIEMENS": (("SIEMENS", "Skyra", 3.0), ("SIEMENS", "Prisma", 3.0), ("SIEMENS", "Avanto", 1.5),
                ("SIEMENS", "Aera", 1.5)),
    "GE": (("GE MEDICAL SYSTEMS", "DISCOVERY MR750", 3.0), ("GE MEDICAL SYSTEMS", "SIGNA Premier", 3.0),
           ("GE MEDICAL SYSTEMS", "Optima MR450w", 1.5)),
    "PHILIPS": (("Philips Medical Systems", "Ingenia", 3.0), ("Philips", "Achieva", 1.5),
                ("Philips Medical Systems", "Ingenia Elition X", 3.0)),
}

# multilingual description tokens: (pre-contrast T1, post-contrast T1, T2)
_WORDS = {
    "en": (("pre", "PRE", "native", "w/o"), ("post", "POST GD", "+C", "post contrast", "GAD"),
           ("T2", "T2 AX")),
    "de": (("nativ", "ohne KM", "NATIV"), ("KM", "mit KM", "post KM", "nach KM"),
           ("T2 tra", "T2 transversal")),
    "fr": (("sans injection", "SANS GADO", "sans"), ("gado", "GADO", "injecte", "apres injection"),
           ("T2 AXIAL", "T2 axial")),
    "es": (("sin contraste", "SIN CONTRASTE", "basal"), ("con contraste", "CON GADOLINIO", "post gd"),
           ("T2 axial", "T2 AXIAL")),
    "nl": (("zonder contrast", "blanco", "pre"), ("met contrast", "na contrast", "+gado"),
           ("T2 transversaal", "T2 TRA")),
    "it": (("senza mdc", "basale", "pre mdc"), ("con mdc", "post mdc", "dopo mdc"),
           ("T2 assiale", "T2 ASS")),
}

_AGENTS = ("Gadovist", "Dotarem", "MultiHance", "ProHance", "Gadolinium", "GADOBUTROL 1.0 mmol/ml",
           "Clariscan")


@dataclass(frozen=True)
class Acquisition:
    """How one series was acquired (geometry, physics, header text). Times in ms, sizes in mm.

    ``kind`` is ``T1_3D`` (MPRAGE / BRAVO / TFE), ``T1_SE`` (2D spin echo) or ``T2`` (2D/3D
    turbo spin echo). ``orientation`` is ``axial`` or ``sagittal``; ``pixel_mm`` the in-plane
    pixel size, ``slice_thickness_mm`` and ``slice_spacing_mm`` the slab profile and step.
    ``motion_rot_deg`` / ``motion_trans_mm`` is the rigid head position of this series in the
    scanner (rotation in degrees about :data:`~recnec_cli.synth.series.MOTION_CENTRE_MM` and
    translation in mm, world RAS+, applied to the truth grid's content). At the baseline it is
    relative to the T1ce (whose own is zero): inter-sequence misregistration of up to ~2 degrees
    and ~2 mm, as between series of one session. A follow-up adds one repositioning of up to
    6 degrees and 8 mm per axis to all three series
    (:func:`recnec_cli.synth.subject.follow_up_plans`).
    """

    role: str
    vendor: str
    manufacturer: str
    model: str
    field_t: float
    kind: str
    mode: str  # "2D" | "3D"
    orientation: str  # "axial" | "sagittal"
    pixel_mm: float
    slice_thickness_mm: float
    slice_spacing_mm: float
    tr_ms: float
    te_ms: float
    ti_ms: float | None
    flip_deg: float
    echo_train_length: int | None
    series_description: str
    protocol_name: str
    sequence_name: str
    image_type: tuple[str, ...]
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    contrast_agent: str | None  # None: tag absent; "": present but empty
    series_number: int
    series_time_s: float
    rescale_slope: float
    motion_rot_deg: tuple[float, float, float]
    motion_trans_mm: tuple[float, float, float]
    language: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _pick(rng: np.random.Generator, seq):
    return seq[int(rng.integers(0, len(seq)))]


def _physics(rng, vendor: str, kind: str, field_t: float) -> dict[str, Any]:
    hi = field_t >= 3.0
    if kind == "T1_3D":
        if vendor == "SIEMENS":
            return dict(tr_ms=2300.0 if hi else 2000.0, te_ms=round(rng.uniform(2.2, 3.1), 2),
                        ti_ms=900.0 if hi else 1100.0, flip_deg=8.0 if hi else 15.0,
                        echo_train_length=1, sequence_name="*tfl3d1_16ns",
                        scanning_sequence=("GR", "IR"), sequence_variant=("SK", "SP", "MP"),
                        scan_options=("IR",), image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM"))
        if vendor == "GE":
            return dict(tr_ms=round(rng.uniform(7.6, 9.0), 1), te_ms=round(rng.uniform(2.9, 3.6), 1),
                        ti_ms=450.0, flip_deg=12.0, echo_train_length=1, sequence_name="efgre3d",
                        scanning_sequence=("GR",), sequence_variant=("SS", "SK"),
                        scan_options=("FAST_GEMS", "EDR_GEMS", "ACC_GEMS"),
                        image_type=("ORIGINAL", "PRIMARY", "OTHER"))
        return dict(tr_ms=round(rng.uniform(7.9, 8.4), 1), te_ms=round(rng.uniform(3.5, 3.9), 1),
                    ti_ms=None, flip_deg=8.0, echo_train_length=int(rng.integers(150, 260)),
                    sequence_name="T1TFE", scanning_sequence=("GR",), sequence_variant=("SK", "MP"),
                    scan_options=("OTHER",), image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"))
    if kind == "T1_SE":
        base = dict(tr_ms=float(rng.integers(450, 700)), te_ms=round(rng.uniform(8.0, 15.0), 1),
                    ti_ms=None, flip_deg=90.0, echo_train_length=int(rng.integers(1, 4)),
                    scanning_sequence=("SE",), sequence_variant=("SK", "SP"))
        base.update({
            "SIEMENS": dict(sequence_name="*se2d1", scan_options=("SAT1",),
                            image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM")),
            "GE": dict(sequence_name="fse", scan_options=("FAST_GEMS", "FILTERED_GEMS"),
                       image_type=("ORIGINAL", "PRIMARY", "OTHER")),
            "PHILIPS": dict(sequence_name="SE", scan_options=("FS",),
                            image_type=("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
        }[vendor])
        return base
    # T2 turbo/fast spin echo
    base = dict(tr_ms=float(rng.integers(3000, 6500)), te_ms=float(rng.integers(80, 115)),
                ti_ms=None, flip_deg=float(_pick(rng, (90.0, 120.0, 150.0))),
                echo_train_length=int(rng.integers(10, 24)), scanning_sequence=("SE",))
    base.update({
        "SIEMENS": dict(sequence_name="*tse2d1_15", sequence_variant=("SK", "SP", "OSP"),
                        scan_options=("PFP",), image_type=("ORIGINAL", "PRIMARY", "M", "ND", "NORM")),
        "GE": dict(sequence_name="fse-xl", sequence_variant=("SK",),
                   scan_options=("FAST_GEMS", "EDR_GEMS"), image_type=("ORIGINAL", "PRIMARY", "OTHER")),
        "PHILIPS": dict(sequence_name="TSE", sequence_variant=("SK",), scan_options=("OTHER",),
                        image_type=("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")),
    }[vendor])
    return base


def _describe(rng, vendor: str, role: str, kind: str, lang: str, orientation: str,
              hint: bool) -> str:
    pre, post, t2 = _WORDS[lang]
    if role == "T2":
        if vendor == "SIEMENS" and rng.uniform() < 0.5:
            return "t2_tse_tra_512" if lang == "en" else f"t2_tse_tra {_pick(rng, t2)}"
        if vendor == "GE" and rng.uniform() < 0.5:
            return "AX T2 FSE"
        if vendor == "PHILIPS" and rng.uniform() < 0.5:
            return "T2W_TSE"
        return f"{_pick(rng, t2)} TSE"
    plane = "sag" if orientation == "sagittal" else "tra"
    stem = {"SIEMENS": f"t1_mprage_{plane}" if kind == "T1_3D" else f"t1_se_{plane}",
            "GE": ("Sag 3D T1 BRAVO" if orientation == "sagittal" else "Ax 3D T1 BRAVO")
            if kind == "T1_3D" else "AX T1 SE",
            "PHILIPS": "T1W_3D_TFE" if kind == "T1_3D" else "T1W_SE"}[vendor]
    if role == "T1":
        return f"{stem} {_pick(rng, pre)}" if rng.uniform() < 0.7 else stem
    if not hint:
        return stem
    return f"{stem} {_pick(rng, post)}"


def draw_session(rng: np.random.Generator) -> dict[str, Acquisition]:
    """Draw the T1, T2 and T1ce acquisitions of one session (one vendor, one field strength).

    Geometry mixes 3D 1 mm isotropic (T1 ~70 %, T1ce ~80 %, T2 ~20 %) and 2D axial
    thick slices (3-6 mm thick, gap 0-1 mm, 0.45-1.0 mm pixels: clinical protocols).
    Series order: T1 before T1ce; T2 before or between them; series times in seconds after
    midnight, a few minutes apart.
    """
    vendor = _pick(rng, VENDORS)
    manufacturer, model, field_t = _pick(rng, _MODELS[vendor])
    lang = _pick(rng, tuple(_WORDS))
    start = float(rng.integers(7 * 3600, 18 * 3600))
    order = ["T1", "T2", "T1ce"] if rng.uniform() < 0.6 else ["T2", "T1", "T1ce"]
    agent_mode = _pick(rng, ("agent", "agent", "empty_and_hint", "absent_and_hint"))
    out = {}
    for role in ("T1", "T2", "T1ce"):
        p3d = {"T1": 0.7, "T1ce": 0.8, "T2": 0.2}[role]
        is3d = rng.uniform() < p3d
        kind = "T2" if role == "T2" else ("T1_3D" if is3d else "T1_SE")
        if kind == "T2" and is3d:
            is3d = False  # 3D T2 (SPACE/CUBE/VISTA) left out: physics tables are 2D TSE
        if is3d:
            orientation = "sagittal" if rng.uniform() < 0.5 else "axial"
            pixel, thick, step = 1.0, 1.0, 1.0
        else:
            orientation = "axial"
            pixel = float(round(rng.uniform(0.45, 1.0), 3))
            thick = float(_pick(rng, (3.0, 4.0, 5.0, 5.0, 6.0)))
            step = thick + float(_pick(rng, (0.0, 0.0, 0.5, 1.0)))
        phys = _physics(rng, vendor, kind, field_t)
        if role == "T1ce":
            agent = {"agent": _pick(rng, _AGENTS), "empty_and_hint": "",
                     "absent_and_hint": None}[agent_mode]
            hint = agent_mode != "agent" or rng.uniform() < 0.5
        else:
            agent = "" if (role == "T1" and agent_mode == "empty_and_hint") else None
            hint = True
        desc = _describe(rng, vendor, role, kind, lang, orientation, hint)
        number = (order.index(role) + 1) * 100 + int(rng.integers(1, 9))
        slope = float(round(rng.uniform(0.6, 3.0), 4)) if vendor == "PHILIPS" else 1.0
        if role == "T1ce":
            motion = ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0))
        else:
            motion = (tuple(float(v) for v in rng.uniform(-2.0, 2.0, size=3)),
                      tuple(float(v) for v in rng.uniform(-2.0, 2.0, size=3)))
        out[role] = Acquisition(
            role=role, vendor=vendor, manufacturer=manufacturer, model=model, field_t=field_t,
            kind=kind, mode="3D" if is3d else "2D", orientation=orientation, pixel_mm=pixel,
            slice_thickness_mm=thick, slice_spacing_mm=step, series_description=desc,
            protocol_name=desc.replace(" ", "_"), contrast_agent=agent, series_number=number,
            series_time_s=start + 300.0 * order.index(role) + float(rng.integers(0, 120)),
            rescale_slope=slope, motion_rot_deg=motion[0], motion_trans_mm=motion[1],
            language=lang, **phys)
    return out
