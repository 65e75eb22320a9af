"""Test helpers: a tiny synthetic DICOM writer and a generated header corpus.

``write_series`` builds small classic MR series with pydicom (docs/failure-kinds.md recipes are expressed
as keyword arguments); ``make_corpus`` generates labelled :class:`SeriesHeader` objects in several
vendors' conventions and languages, including the look-alike kinds 6, 7, 13, 15,
16 and 17, for the classifier's precision/coverage figures.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from recnec_cli.study import Series, SeriesHeader, SeriesRole, Study

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
ENH_MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4.1"


def _uid(prefix: str = "1.2.826.0.1.3680043.10.1234.") -> str:
    return prefix + str(random.getrandbits(60))


def phantom(n: int, rows: int = 32, cols: int = 32, seed: int = 0) -> np.ndarray:
    """(n, rows, cols) uint16 ellipsoid 'head' with a bright blob, different on every slice."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[0:n, 0:rows, 0:cols]
    r = ((z - n / 2) / (n / 2 + 1)) ** 2 + ((y - rows / 2) / (rows / 2.4)) ** 2 + \
        ((x - cols / 2) / (cols / 2.4)) ** 2
    img = np.where(r < 1, 800, 0) + rng.integers(0, 20, size=r.shape)
    img[:, rows // 3, cols // 3] += 1000
    return img.astype(np.uint16)


def write_series(folder: Path, *, n: int = 20, rows: int = 32, cols: int = 32,
                 spacing: float = 1.0, step: float | None = None, pixel: float = 1.0,
                 iop=(1, 0, 0, 0, 1, 0), tilt_deg: float = 0.0, drop: Iterable[int] = (),
                 series_uid: str | None = None, study_uid: str | None = None,
                 patient_id: str = "PAT-0001", description: str = "t1_mprage",
                 series_number: int = 3, tags: dict[str, Any] | None = None,
                 per_slice: Callable[[int, Any], None] | None = None,
                 preamble: bool = True, pixels: np.ndarray | None = None,
                 prefix: str = "IM", seed: int = 0) -> list[Path]:
    """Write ``n`` axial (by default) MR slices as classic DICOM files; return their paths.

    ``step`` (mm) is the distance between ImagePositionPatient of consecutive slices along the
    normal (defaults to ``spacing``); ``tilt_deg`` shifts each slice along the column direction by
    ``tan(tilt) * step`` (gantry tilt recipe, docs/failure-kinds.md kind 1); ``drop`` omits slice indices
    (missing slices recipe, docs/failure-kinds.md kind 2); ``per_slice(k, ds)`` may edit each dataset.
    """
    import pydicom

    from recnec_cli.synth.dicom import mr_dataset

    folder.mkdir(parents=True, exist_ok=True)
    step = spacing if step is None else step
    series_uid = series_uid or _uid()
    study_uid = study_uid or _uid()
    data = phantom(n, rows, cols, seed) if pixels is None else pixels
    r = np.array(iop[:3], float)
    c = np.array(iop[3:], float)
    nrm = np.cross(r, c)
    shift = np.tan(np.radians(tilt_deg)) * step
    out = []
    for k in range(n):
        if k in set(drop):
            continue
        pos = k * step * nrm + k * shift * c
        ds = mr_dataset(
            data[k], sop_uid=_uid(), PatientID=patient_id, PatientName="Test^Person",
            StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, SeriesNumber=series_number,
            InstanceNumber=k + 1, AcquisitionNumber=1, SeriesDescription=description, ProtocolName=description,
            Manufacturer="SIEMENS", ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], ScanningSequence=["GR", "IR"],
            SequenceVariant=["SP", "MP"], MRAcquisitionType="3D", RepetitionTime=1900, EchoTime=2.9,
            InversionTime=900, FlipAngle=9, EchoNumbers=1, ImageOrientationPatient=[float(v) for v in iop],
            ImagePositionPatient=[float(v) for v in pos], PixelSpacing=[pixel, pixel], SliceThickness=spacing,
            RescaleSlope=1, RescaleIntercept=0)
        for key, v in (tags or {}).items():
            setattr(ds, key, v)
        if per_slice:
            per_slice(k, ds)
        p = folder / f"{prefix}{k:04d}.dcm"
        ds.save_as(str(p), enforce_file_format=preamble)
        if not preamble:  # strip the 128-byte preamble + "DICM" and the file meta
            raw = p.read_bytes()
            if raw[128:132] == b"DICM":
                pydicom.dcmwrite(str(p), ds, enforce_file_format=False)
                raw2 = p.read_bytes()
                if raw2[128:132] == b"DICM":
                    p.write_bytes(raw2[132:])
        out.append(p)
    return out


def write_enhanced(path: Path, *, n: int = 20, rows: int = 24, cols: int = 24, shuffle: bool = True,
                   second_stack: int = 0, seed: int = 0, tr: float = 1800.0, te: float = 2.4,
                   ti: float = 900.0, description: str = "anat-T1w") -> Path:
    """One Enhanced MR Image Storage file of ``n`` axial frames (positions shuffled), with TR/TE/TI
    only in functional groups (as Siemens XA30); ``second_stack`` adds that many sagittal frames
    (docs/failure-kinds.md kind 4)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    rng = random.Random(seed)
    total = n + second_stack
    data = phantom(total, rows, cols, seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ENH_MR_STORAGE
    sop = _uid()
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = ENH_MR_STORAGE
    ds.SOPInstanceUID = sop
    ds.Modality = "MR"
    ds.PatientID = "ENH-1"
    ds.StudyInstanceUID = _uid()
    ds.SeriesInstanceUID = _uid()
    ds.SeriesNumber = 5
    ds.InstanceNumber = 1
    ds.SeriesDescription = description
    ds.ProtocolName = description
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
    ds.MRAcquisitionType = "3D"
    ds.EchoPulseSequence = "GRADIENT"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = total
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    timing = Dataset()
    timing.RepetitionTime = tr
    timing.FlipAngle = 9
    timing.EchoTrainLength = 1
    modif = Dataset()
    modif.InversionRecovery = "YES"
    modif.InversionTimes = [ti]
    meas = Dataset()
    meas.PixelSpacing = [1.0, 1.0]
    meas.SliceThickness = 1.0
    shared = Dataset()
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    shared.MRModifierSequence = Sequence([modif])
    shared.PixelMeasuresSequence = Sequence([meas])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    order = list(range(total))
    if shuffle:
        rng.shuffle(order)
    frames = []
    pix = np.empty_like(data)
    for f, k in enumerate(order):
        item = Dataset()
        pos = Dataset()
        ori = Dataset()
        if k < n:
            pos.ImagePositionPatient = [0.0, 0.0, float(k)]
            ori.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        else:
            pos.ImagePositionPatient = [float(k - n), 0.0, 0.0]
            ori.ImageOrientationPatient = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
        echo = Dataset()
        echo.EffectiveEchoTime = te
        ftype = Dataset()
        ftype.FrameType = ["ORIGINAL", "PRIMARY", "M", "NONE"]
        item.PlanePositionSequence = Sequence([pos])
        item.PlaneOrientationSequence = Sequence([ori])
        item.MREchoSequence = Sequence([echo])
        item.MRImageFrameTypeSequence = Sequence([ftype])
        frames.append(item)
        pix[f] = data[k]
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = pix.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


# ============================================================================================
# generated header corpus (issue 4: >= 300 series, >= 5 languages, several vendors)
# ============================================================================================
R = SeriesRole


def _h(**kw: Any) -> SeriesHeader:
    kw.setdefault("modality", "MR")
    kw.setdefault("image_type", ("ORIGINAL", "PRIMARY", "M", "ND"))
    kw.setdefault("n_slices", 176)
    kw.setdefault("rows", 256)
    kw.setdefault("columns", 256)
    return SeriesHeader(**kw)


# acquisition physics per kind, in vendor conventions (DICOM PS3.3 C.8.3.1 ScanningSequence codes)
def _t1_3d(vendor: str, rng: random.Random) -> dict:
    if vendor == "SIEMENS":
        return dict(scanning_sequence=("GR", "IR"), sequence_variant=("SP", "MP", "OSP"),
                    mr_acquisition_type="3D", repetition_time_ms=rng.choice([1900, 2300, 2000]),
                    echo_time_ms=rng.choice([2.26, 2.98, 3.4]),
                    inversion_time_ms=rng.choice([900, 1100]), flip_angle_deg=rng.choice([8, 9, 15]),
                    sequence_name="*tfl3d1_16ns", echo_train_length=1)
    if vendor == "GE":
        return dict(scanning_sequence=("GR",), sequence_variant=("SS", "SP", "SK"),
                    mr_acquisition_type="3D", repetition_time_ms=rng.choice([8.2, 7.6]),
                    echo_time_ms=rng.choice([3.2, 2.9]), inversion_time_ms=rng.choice([450, 600]),
                    flip_angle_deg=12, sequence_name="efgre3d", scan_options=("FAST_GEMS", "EDR_GEMS", "IR_GEMS"))
    if vendor == "Philips":
        return dict(scanning_sequence=("GR",), sequence_variant=("MP",), mr_acquisition_type="3D",
                    repetition_time_ms=rng.choice([6.5, 8.1]), echo_time_ms=rng.choice([2.9, 3.7]),
                    flip_angle_deg=8, image_type=("ORIGINAL", "PRIMARY", "M_FFE", "M", "FFE"),
                    echo_train_length=rng.choice([150, 256]))
    return dict(scanning_sequence=("GR", "IR"), sequence_variant=("NONE",), mr_acquisition_type="3D",
                repetition_time_ms=7.25, echo_time_ms=3.1, inversion_time_ms=750, flip_angle_deg=10,
                sequence_name="gre_fsp", image_type=("ORIGINAL", "PRIMARY", "M", "UCA", "IF"))


def _t1_se2d(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("SE",), sequence_variant=("SK", "SP"), mr_acquisition_type="2D",
                repetition_time_ms=rng.choice([450, 550, 600, 700]),
                echo_time_ms=rng.choice([8.0, 10.0, 12.0, 15.0]), flip_angle_deg=90,
                n_slices=rng.choice([24, 26, 30]), echo_train_length=rng.choice([1, 3]))


def _t2_tse(vendor: str, rng: random.Random) -> dict:
    d = dict(scanning_sequence=("SE",), sequence_variant=("SK", "SP", "OSP"),
             mr_acquisition_type="2D", repetition_time_ms=rng.choice([3000, 4500, 5800, 6000]),
             echo_time_ms=rng.choice([85.0, 92.0, 100.0, 110.0]), flip_angle_deg=rng.choice([90, 150]),
             echo_train_length=rng.choice([11, 15, 18]), n_slices=rng.choice([25, 30, 40]))
    if vendor == "Philips":
        d["image_type"] = ("ORIGINAL", "PRIMARY", "M_SE", "M", "SE")
    if rng.random() < 0.3:  # 3D SPACE/CUBE/VISTA T2
        d.update(mr_acquisition_type="3D", repetition_time_ms=3200, echo_time_ms=rng.choice([380.0, 409.0]),
                 echo_train_length=rng.choice([140, 220]), flip_angle_deg=120, n_slices=176)
    return d


def _flair(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("SE", "IR"), sequence_variant=("SK", "SP", "MP"),
                mr_acquisition_type=rng.choice(["2D", "3D"]), repetition_time_ms=rng.choice([5000, 9000, 11000]),
                echo_time_ms=rng.choice([86.0, 120.0, 390.0]), inversion_time_ms=rng.choice([1650, 2200, 2500, 2800]),
                echo_train_length=rng.choice([16, 200]))


def _pd(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("SE",), sequence_variant=("SK", "SP"), mr_acquisition_type="2D",
                repetition_time_ms=rng.choice([2500, 3000, 4320]), echo_time_ms=rng.choice([11.0, 14.0, 20.0]),
                echo_train_length=rng.choice([5, 7]), n_slices=35)


def _dwi(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("EP",), sequence_variant=("SK", "SP"), mr_acquisition_type="2D",
                repetition_time_ms=rng.choice([4000, 6500, 8000]), echo_time_ms=rng.choice([70.0, 89.0]),
                diffusion_b_value=rng.choice([1000.0, 0.0, 1000.0]), n_slices=25,
                n_temporal=rng.choice([1, 3, 4]), sequence_name=rng.choice(["*ep_b1000t", "ep_b0_1000", None]))


def _swi(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("GR",), sequence_variant=("SP",), mr_acquisition_type=rng.choice(["3D", "2D"]),
                repetition_time_ms=rng.choice([27.0, 49.0, 650.0]), echo_time_ms=rng.choice([20.0, 25.0, 40.0]),
                flip_angle_deg=rng.choice([15, 20]), n_slices=rng.choice([20, 72, 88]))


def _perf(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("EP",), sequence_variant=("SK",), mr_acquisition_type="2D",
                repetition_time_ms=rng.choice([1400, 1500, 1600]), echo_time_ms=rng.choice([30.0, 32.0, 45.0]),
                n_slices=rng.choice([18, 20]), n_temporal=rng.choice([40, 50, 60]))


def _loc(vendor: str, rng: random.Random) -> dict:
    return dict(scanning_sequence=("GR",), sequence_variant=("SP",), mr_acquisition_type="2D",
                repetition_time_ms=8.6, echo_time_ms=4.0, flip_angle_deg=20,
                n_slices=rng.choice([1, 3, 5, 9]),
                image_type=rng.choice([("ORIGINAL", "PRIMARY", "LOCALIZER"), ("ORIGINAL", "PRIMARY", "M", "ND"),
                                       ("DERIVED", "PRIMARY", "MPR", "NORM", "DIS3D", "MFSPLIT")]))


# descriptions per role and language; ``None`` = empty description (physics only)
DESCR = {
    "T1": ["t1_mprage_sag", "T1 MPRAGE", "sT1W_3D_TFE", "Ax T1 SE", "BRAVO", "T1 3D IR-FSPGR",
           "t1_se_tra", "T1 nativ", "T1 ohne KM", "T1 sans gado", "T1 sin contraste", "T1 zonder contrast",
           "T1 senza mdc", "T1 pre", "T1 PRE-GAD", "T1 w/o", "T1 POST-OP nativ", "3D_T1W", "T1W_TSE",
           "t1_gre_fsp_3d_sag", "T1 vor KM", "T1 pré", None],
    "T1CE": ["t1_mprage_tra KM", "T1 MPRAGE post", "T1+C", "T1 post Gd", "T1 mit KM", "T1 avec gado",
             "T1 con contraste", "T1 met contrast", "T1 con mdc", "T1 GD", "T1 +GAD 3D", "AX T1 POST",
             "T1_KM_tra", "T1 post-contrast", "T1W_3D_TFE +C", "T1 nach KM", "T1 postcontraste",
             "T1 gado", "T1 injecté", "t1_mpr_tra_CE", None],
    "T2": ["t2_tse_tra", "T2 TSE", "Ax T2 FSE", "T2W_TSE", "T2 axial", "t2_space_sag", "T2 tra",
           "T2 pondéré", "T2 ponderada", "T2 gewogen", "T2 pesata", None],
    "FLAIR": ["t2_tirm_tra_dark-fluid", "FLAIR", "Ax T2 FLAIR", "T2W_FLAIR", "3D FLAIR", "T2 FLAIR post",
              "flair_tra", None, "T2"],
    "PD": ["pd_tse_tra", "PD", "PD+T2 echo1", None, "T2"],
    "DWI": ["ep2d_diff_tra", "DWI", "Ax DWI b1000", "ADC", "T2 DWI", "diffusion", None, "T2"],
    "SWI": ["swi_tra", "SWI", "T2* GRE", "t2_fl2d_hemo", "T2*", "SWAN", None, "T2"],
    "PERFUSION": ["ep2d_perf", "DSC perfusion", "PERF", "T2 perf", None],
    "LOCALIZER": ["localizer", "AAHead_Scout", "3-pl loc", "Survey", "scout", "t1_localizer", None],
}
PHYSICS = {"T1": None, "T1CE": None, "T2": _t2_tse, "FLAIR": _flair, "PD": _pd, "DWI": _dwi,
           "SWI": _swi, "PERFUSION": _perf, "LOCALIZER": _loc}
VENDORS = ("SIEMENS", "GE", "Philips", "UIH")


def _series_header(kind: str, i: int, rng: random.Random, *, t1_phys: dict | None = None
                   ) -> SeriesHeader:
    vendor = VENDORS[i % len(VENDORS)]
    descr = DESCR[kind][i % len(DESCR[kind])]
    if kind in ("T1", "T1CE"):
        phys = dict(t1_phys) if t1_phys is not None else (_t1_3d if i % 3 else _t1_se2d)(vendor, rng)
    else:
        phys = PHYSICS[kind](vendor, rng)
    phys.setdefault("manufacturer", vendor)
    extra: dict[str, Any] = {}
    if kind == "T1CE" and i % 2 == 0:
        extra = dict(contrast_bolus_agent=rng.choice(["Gadovist", "DOTAREM", "GD", "Multihance 15ml",
                                                      "gadolinium"]),
                     contrast_bolus_volume_ml=rng.choice([7.5, 15.0, None]))
    if kind == "T1" and i % 4 == 1:
        extra = dict(contrast_bolus_agent="")  # present but empty (Philips)
    if i % 6 == 5 and kind != "LOCALIZER":
        # stripped header (anonymiser / converter): name only, no TR/TE/TI/sequence type
        for key in ("repetition_time_ms", "echo_time_ms", "inversion_time_ms",
                    "scanning_sequence", "sequence_variant", "flip_angle_deg"):
            phys.pop(key, None)
    return _h(series_description=descr, protocol_name=descr, **phys, **extra)


DERIVED_TYPES = [("DERIVED", "SECONDARY", "MPR"), ("DERIVED", "PRIMARY", "M", "SUB"),
                 ("DERIVED", "PRIMARY", "MIP"), ("DERIVED", "PRIMARY", "DIFFUSION", "ADC"),
                 ("DERIVED", "PRIMARY", "MOCO"), ("ORIGINAL", "PRIMARY", "M", "ND", "MPR"),
                 ("DERIVED", "SECONDARY", "REFORMATTED")]
DERIVED_DESCR = ["T1 MPR cor", "t1_mprage_tra_MPR", "T1 post SUB", "MIP T1+C", "T1 MOCO",
                 "T1 reformat", None]
# acquisition order of a typical neuro-oncology session; perfusion (DSC) injects the contrast
SESSION = ("LOCALIZER", "T1", "T2", "FLAIR", "PD", "DWI", "SWI", "PERFUSION", "T1CE", "DERIVED")


def make_corpus_studies(n_studies: int = 32, seed: int = 7
                        ) -> list[tuple[Study, dict[str, SeriesRole]]]:
    """Generated studies of header-only series with their true roles.

    Each study holds one series of every kind of :data:`SESSION`, in that acquisition order
    (AcquisitionTime 5 min apart; perfusion only in every other study), the T1ce repeating the
    T1's sequence in two studies out of three. Vendors rotate (Siemens, GE, Philips, UIH), so do
    the description languages (English, German, French, Spanish, Dutch, Italian) and the
    look-alikes of docs/failure-kinds.md kinds 6, 7, 13, 15, 16, 17; one series in six has its physics stripped.
    Eight extra one-series studies hold non-MR objects."""
    rng = random.Random(seed)
    out: list[tuple[Study, dict[str, SeriesRole]]] = []
    k = 0
    for i in range(n_studies):
        series: list[Series] = []
        truth: dict[str, SeriesRole] = {}
        t1_phys = None
        for order, kind in enumerate(SESSION):
            if kind == "PERFUSION" and i % 2:
                continue
            k += 1
            if kind == "DERIVED":
                vendor = VENDORS[i % len(VENDORS)]
                phys = _t1_3d(vendor, rng)
                phys["image_type"] = DERIVED_TYPES[i % len(DERIVED_TYPES)]
                h = _h(series_description=DERIVED_DESCR[i % len(DERIVED_DESCR)],
                       manufacturer=vendor, **phys)
                role = R.DERIVED
            else:
                h = _series_header(kind, i, rng, t1_phys=t1_phys if kind == "T1CE" and i % 3
                                   else None)
                role = getattr(R, kind)
                if kind == "T1":
                    t1_phys = {f: getattr(h, f) for f in (
                        "scanning_sequence", "sequence_variant", "mr_acquisition_type",
                        "repetition_time_ms", "echo_time_ms", "inversion_time_ms",
                        "flip_angle_deg", "n_slices", "image_type", "manufacturer")}
            h = replace(h, series_number=order + 1, acquisition_time_s=8 * 3600 + 300.0 * order)
            sid = f"corpus-{k:04d}"
            series.append(Series(series_id=sid, source="dicom", files=(), header=h))
            truth[sid] = role
        out.append((Study(study_id=f"study-{i:03d}", patient_pseudonym="", source="dicom",
                          location="", series=tuple(series)), truth))
    for j in range(8):
        k += 1
        h = _h(modality=["CT", "PT", "SR", "OT"][j % 4],
               series_description=["T1 fusion", "Head CT", None, "Dose report"][j % 4],
               image_type=("ORIGINAL", "PRIMARY", "AXIAL"), series_number=1)
        sid = f"corpus-{k:04d}"
        out.append((Study(study_id=f"nonmr-{j}", patient_pseudonym="", source="dicom",
                          location="", series=(Series(sid, "dicom", (), h),)), {sid: R.NON_MR}))
    return out


def make_corpus(n_studies: int = 32, seed: int = 7) -> list[tuple[Series, SeriesRole]]:
    """The series of :func:`make_corpus_studies`, flattened: ``(series, true_role)``."""
    return [(s, truth[s.series_id]) for st, truth in make_corpus_studies(n_studies, seed)
            for s in st.series]


def corpus_stats(rows: list[tuple[SeriesRole, SeriesRole]]) -> dict[str, Any]:
    """Precision on answered (role != UNDETERMINED), coverage, and the confusion matrix."""
    answered = [(t, p) for t, p in rows if p is not R.UNDETERMINED]
    correct = sum(t is p for t, p in answered)
    confusion: dict[str, dict[str, int]] = {}
    for t, p in rows:
        confusion.setdefault(t.value, {}).setdefault(p.value, 0)
        confusion[t.value][p.value] += 1
    return {"n": len(rows), "answered": len(answered),
            "precision": correct / len(answered) if answered else 0.0,
            "coverage": len(answered) / len(rows) if rows else 0.0,
            "confusion": confusion}


def with_header(series: Series, **changes: Any) -> Series:
    return replace(series, header=replace(series.header, **changes))
