"""Small head phantoms for the nightly-run tests, and a stand-in for HD-BET.

A phantom study is a BIDS-named NIfTI folder (``sub-X_T1w``, ``sub-X_T2w``,
``sub-X_ce-gadolinium_T1w``) on a 72 x 72 x 48 grid of 2.5 mm voxels (RAS+, centred on the world
origin): an ellipsoid brain (radii 65 / 80 / 55 mm, ~1,200 mL), a skull shell, and a spherical
lesion of radius 9 mm that enhances on the T1ce. It runs through every real stage (discovery,
classification, conversion, registration, lesion detection, model input, ONNX ensemble) in a
second or two; only HD-BET, which is slow and not ours, is replaced by :class:`FakeHdBet`, whose
mask is the phantom's brain ellipsoid in world coordinates.

:data:`FAKE_HDBET_SCRIPT` runs a scan in a child process with the fake installed, for tests that
kill or race real processes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

SHAPE = (72, 72, 48)
VOXEL_MM = 2.5
BRAIN_RADII_MM = (65.0, 80.0, 55.0)


def phantom_affine() -> np.ndarray:
    aff = np.diag([VOXEL_MM, VOXEL_MM, VOXEL_MM, 1.0])
    aff[:3, 3] = -(np.asarray(SHAPE) - 1) / 2.0 * VOXEL_MM
    return aff


def _world(shape, affine) -> np.ndarray:
    ijk = np.indices(shape).reshape(3, -1)
    return (affine[:3, :3] @ ijk + affine[:3, 3:4]).reshape(3, *shape)


def brain_ellipsoid(shape, affine) -> np.ndarray:
    """bool ``shape``: voxels whose world centre (mm, RAS+) lies in the brain ellipsoid."""
    xyz = _world(shape, np.asarray(affine, dtype=float))
    r = np.asarray(BRAIN_RADII_MM).reshape(3, 1, 1, 1)
    return ((xyz / r) ** 2).sum(0) <= 1.0


def write_phantom_study(folder: Path, name: str, *, lesion_ras_mm=(30.0, 10.0, 5.0), seed: int = 0,
                        lesion_radius_mm: float = 9.0, sidecar: dict | None = None) -> Path:
    """Write one phantom study into ``folder/name`` and return that folder (``sidecar``: JSON
    written beside each image, e.g. ``{"AcquisitionDateTime": ...}``)."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    aff = phantom_affine()
    xyz = _world(SHAPE, aff)
    r = np.asarray(BRAIN_RADII_MM).reshape(3, 1, 1, 1)
    rho = np.sqrt(((xyz / r) ** 2).sum(0))
    brain = rho <= 1.0
    skull = (rho > 1.05) & (rho <= 1.18)
    lesion = np.sqrt(((xyz - np.asarray(lesion_ras_mm).reshape(3, 1, 1, 1)) ** 2).sum(0)) <= lesion_radius_mm
    out = Path(folder) / name
    out.mkdir(parents=True, exist_ok=True)
    # grey / white texture so that registration has something to hold on to
    texture = np.sin(xyz[0] / 7.0) * np.cos(xyz[1] / 9.0) * np.sin(xyz[2] / 5.0)
    vols = {}
    for role, (b, s, les) in {"T1w": (100.0, 160.0, 90.0), "T2w": (60.0, 30.0, 140.0),
                              "ce-gadolinium_T1w": (100.0, 160.0, 260.0)}.items():
        v = np.zeros(SHAPE, np.float32)
        v[brain] = b * (1.0 + 0.15 * texture[brain])
        v[skull] = s
        v[lesion & brain] = les
        v += rng.normal(0, 2.0, SHAPE).astype(np.float32)
        v = np.clip(v, 0, None)
        vols[role] = v
        nib.save(nib.Nifti1Image(v, aff), str(out / f"{name}_{role}.nii.gz"))
        if sidecar is not None:
            import json

            (out / f"{name}_{role}.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return out


class FakeHdBet:
    """Stands in for :class:`recnec_cli.stages.skullstrip.HdBet`: the brain ellipsoid of the phantom.

    ``calls`` counts :meth:`brain_mask` calls; ``sleep_s`` makes each call take that long (for
    tests that must kill or signal a run while a study is in progress). When the environment names
    a file in ``RECNEC_TEST_BUSY_MARK``, each call creates it first, so such a test can wait until a
    study really is in progress instead of guessing with a sleep.
    """

    def __init__(self, sleep_s: float = 0.0) -> None:
        import os

        self.calls = 0
        self.sleep_s = sleep_s
        self.busy_mark = os.environ.get("RECNEC_TEST_BUSY_MARK")

    def check_networks(self) -> None:
        """The self-test hook of the real HdBet: nothing to check here."""

    def brain_mask(self, volume) -> np.ndarray:
        self.calls += 1
        if self.busy_mark:
            Path(self.busy_mark).touch()
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return brain_ellipsoid(np.shape(volume.data), np.asarray(volume.affine, dtype=float))


def install_fake_hdbet(monkeypatch, sleep_s: float = 0.0) -> FakeHdBet:
    """Make every recnec HD-BET lookup return one :class:`FakeHdBet` (returned)."""
    from recnec_cli.stages import skullstrip

    fake = FakeHdBet(sleep_s)
    monkeypatch.setattr(skullstrip, "get_hdbet", lambda **kw: fake)
    return fake


#: ``python -c FAKE_HDBET_SCRIPT STUDIES OUT SLEEP_S [extra scan kwargs as JSON]``: a scan with
#: the fake HD-BET in a child process; exits with the scan's exit code.
FAKE_HDBET_SCRIPT = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, sys.argv[5])
import phantoms
from recnec_cli.stages import skullstrip
fake = phantoms.FakeHdBet(float(sys.argv[3]))
skullstrip.get_hdbet = lambda **kw: fake
from recnec_cli.config import resolve_settings
from recnec_cli.errors import RecnecError
from recnec_cli.orchestration.scan import scan
extra = json.loads(sys.argv[4])
settings = resolve_settings(extra.pop("settings", {}))
extra["worker_hooks"] = [getattr(phantoms, h) for h in extra.pop("hooks", [])]
try:
    summary = scan(Path(sys.argv[1]), out=Path(sys.argv[2]), settings=settings, **extra)
except RecnecError as exc:
    print(exc.code, flush=True)
    sys.exit(75 if exc.code == "STATE_LOCKED" else 2)
print(summary.line(), flush=True)
sys.exit(summary.exit_code)
"""


def write_phantom_dicom_study(folder: Path, *, study_uid: str, patient_name: str = "Doe^John",
                              patient_id: str = "PID0001", file_prefix: str = "IM", seed: int = 0,
                              series_description_suffix: str = "", **header) -> list[Path]:
    """The phantom as a DICOM study: axial T1 SE, T2 TSE and T1 SE after gadolinium
    (ContrastBolusAgent set), 48 slices of 72 x 72 each, files ``folder/<prefix>_<n>.dcm``.

    ``header``: further attributes of every instance (e.g. ``StudyDate``, ``IssuerOfPatientID``).
    Header values are whatever the caller gives, hostile ones included (a StudyInstanceUID of
    ``..``, a patient's name in the file names): the point of the tests that use it.
    """
    import tempfile

    import nibabel as nib
    from pydicom.uid import generate_uid

    from recnec_cli.synth.dicom import mr_dataset

    with tempfile.TemporaryDirectory() as tmp:
        src = write_phantom_study(Path(tmp), "src", seed=seed)
        vols = {role: np.asarray(nib.load(str(src / f"src_{role}.nii.gz")).dataobj, dtype=np.float32)
                for role in ("T1w", "T2w", "ce-gadolinium_T1w")}
    aff = phantom_affine()
    nx, ny, nz = SHAPE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    frame_uid = generate_uid()
    series = [("T1w", "T1 SE tra", 500.0, 10.0, "SE", ""), ("T2w", "T2 TSE tra", 4000.0, 100.0, "SE", ""),
              ("ce-gadolinium_T1w", "T1 SE tra +C", 500.0, 10.0, "SE", "Gadovist")]
    n = 0
    for number, (role, descr, tr, te, seq, agent) in enumerate(series, start=1):
        vol = vols[role]
        series_uid = generate_uid()
        for k in range(nz):
            n += 1
            x0, y0, z0 = aff[:3, 3]
            arr = np.round(vol[::-1, ::-1, k].T * 10).astype(np.uint16)  # rows -> posterior, cols -> left
            ds = mr_dataset(
                arr, sop_uid=generate_uid(), PatientName=patient_name, PatientID=patient_id,
                StudyInstanceUID=study_uid, SeriesInstanceUID=series_uid, FrameOfReferenceUID=frame_uid,
                SeriesNumber=number, InstanceNumber=k + 1, SeriesDescription=descr + series_description_suffix,
                ImageType=["ORIGINAL", "PRIMARY", "M", "ND"], ScanningSequence=seq, SequenceVariant="NONE",
                MRAcquisitionType="2D", RepetitionTime=tr, EchoTime=te, ContrastBolusAgent=agent or None,
                AcquisitionTime=f"{10 + number:02d}0000",
                ImagePositionPatient=[-(x0 + VOXEL_MM * (nx - 1)), -(y0 + VOXEL_MM * (ny - 1)), z0 + VOXEL_MM * k],
                ImageOrientationPatient=[1.0, 0.0, 0.0, 0.0, 1.0, 0.0], PixelSpacing=[VOXEL_MM, VOXEL_MM],
                SliceThickness=VOXEL_MM, **header)
            path = folder / f"{file_prefix}_{n:04d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
    return files


def write_header_silent_study(folder: Path, name: str, *, seed: int = 0) -> Path:
    """A phantom study whose two T1 files say nothing about contrast (``t1_mprage_1``,
    ``t1_mprage_2``): image evidence must decide. The post-contrast one (``_2``) has bilateral
    normal enhancement (two 'choroid plexus' blobs per hemisphere, 2.4 x white matter) besides the
    lesion; the pre-contrast one has nothing brighter than 1.3 x white matter inside the brain."""
    import nibabel as nib

    src = write_phantom_study(folder, name, seed=seed)
    pre = src / f"{name}_T1w.nii.gz"
    post = src / f"{name}_ce-gadolinium_T1w.nii.gz"
    img = nib.load(str(post))
    v = np.asarray(img.dataobj, dtype=np.float32)
    xyz = _world(SHAPE, phantom_affine())
    for c in ((-25, -10, 10), (-25, 15, -5), (25, -10, 10), (25, 15, -5)):
        blob = np.sqrt(((xyz - np.asarray(c, float).reshape(3, 1, 1, 1)) ** 2).sum(0)) <= 7.0
        v[blob] = 240.0
    post.unlink()
    nib.save(nib.Nifti1Image(v, img.affine), str(src / "t1_mprage_2.nii.gz"))
    pre.rename(src / "t1_mprage_1.nii.gz")
    return src


# ---- per-worker hooks for the worker-pool tests (module-level: they are pickled to spawned workers)
def hook_say_hello() -> None:
    """In a worker: one WARNING record of a recnec logger, naming the worker's process id."""
    import logging
    import os

    logging.getLogger("recnec_cli.tests").warning("hello from worker process %d", os.getpid())


def hook_fake_hdbet() -> None:
    """In a worker: every HD-BET lookup returns a :class:`FakeHdBet`."""
    from recnec_cli.stages import skullstrip

    fake = FakeHdBet()
    skullstrip.get_hdbet = lambda **kw: fake


def hook_hang_on_sub01() -> None:
    """In a worker: converting any series of study ``sub-01`` sleeps for ten minutes (a hang)."""
    from recnec_cli.stages import convert

    real = convert.convert_series

    def hanging(series, *, settings):
        if "sub-01" in series.series_id:
            time.sleep(600)
        return real(series, settings=settings)

    convert.convert_series = hanging


def write_oversized_study(folder: Path, name: str) -> Path:
    """A phantom study whose T1 is a 700 x 700 x 500 uint8 volume of zeros but for a cube (a few MB
    gzipped; ~2.2 GB once converted to float32 and reoriented): past a worker's memory limit."""
    import nibabel as nib

    src = write_phantom_study(folder, name)
    t1 = src / f"{name}_T1w.nii.gz"
    big = np.zeros((700, 700, 500), np.uint8)
    big[300:400, 300:400, 200:300] = 100
    nib.save(nib.Nifti1Image(big, np.diag([0.3, 0.3, 0.4, 1.0])), str(t1))
    return src


# ---- per-worker hooks driven by flag files in a study folder (for a long-lived cluster whose
# workers keep every hook they were given: the flag, not the process, decides what happens)
#: a study folder holding this file: converting its series sleeps ten minutes (a hang)
HANG_FLAG = "HANG_FOR_TEST.txt"
#: ... kills the worker process that converts it (``os._exit(3)``), on every try
DIE_FLAG = "DIE_FOR_TEST.txt"
#: ... sleeps as many seconds as the file says before converting each series
SLOW_FLAG = "SLOW_FOR_TEST.txt"


def hook_test_flags() -> None:
    """In a worker: converting a series looks for :data:`HANG_FLAG`, :data:`DIE_FLAG` and
    :data:`SLOW_FLAG` in the study folder first. Idempotent (a second call wraps nothing)."""
    import os

    from recnec_cli.stages import convert

    if getattr(convert.convert_series, "_test_flags", False):
        return
    real = convert.convert_series

    def flagged(series, *, settings):
        folder = Path(series.files[0]).parent
        if (folder / DIE_FLAG).exists():
            os._exit(3)
        if (folder / HANG_FLAG).exists():
            time.sleep(600)
        if (folder / SLOW_FLAG).exists():
            time.sleep(float((folder / SLOW_FLAG).read_text() or 3))
        return real(series, settings=settings)

    flagged._test_flags = True  # type: ignore[attr-defined]
    convert.convert_series = flagged
