"""No-op re-run cost of a nightly scan: N header-only DICOM studies, scanned once, then again.

Each study has three series (T1 SE "nativ", T2 TSE, T1 SE with ContrastBolusAgent) of two 8 x 8 slices
whose PixelData is left out: enough for discovery and classification, so the first run gives
every study a (failed) row quickly, and the state then holds every study. The second run over the
unchanged tree is what a nightly cron job costs when nothing arrived: it prints the wall time, the
files under the tree opened (counted with a ``sys.addaudithook`` "open" hook: every ``open`` of
the process, pydicom's and nibabel's included) and whether models were loaded.

    python benchmarks/bench_noop_rerun.py            # 100, 1000, 5000 studies
    python benchmarks/bench_noop_rerun.py 100 1000   # chosen sizes

Goal (issue "Nightly unattended runs"): under 10 s for 1,000 studies on 2 cores, growing linearly.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

OPENED: list[str] = []
WATCH: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and WATCH and isinstance(args[0], (str, bytes, os.PathLike)):
        p = os.fsdecode(args[0])
        if p.startswith(WATCH[0]):
            OPENED.append(p)


def write_tree(root: Path, n: int) -> int:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

    files = 0
    for s in range(n):
        folder = root / f"p{s // 100:03d}" / f"s{s:05d}"
        folder.mkdir(parents=True)
        study = f"1.2.826.0.1.3680043.10.999.{s + 1}"
        sequences = (("T1 SE nativ", 500.0, 10.0, ""), ("T2 TSE", 4000.0, 100.0, ""),
                     ("T1 SE +C", 500.0, 10.0, "Gadovist"))
        for number, (descr, tr, te, agent) in enumerate(sequences, start=1):
            for k in range(2):
                ds = Dataset()
                ds.file_meta = FileMetaDataset()
                ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
                ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.{number}.{k + 1}"
                ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
                ds.Modality, ds.PatientID = "MR", f"BENCH{s:06d}"
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, f"{study}.{number}"
                ds.SeriesNumber, ds.InstanceNumber, ds.SeriesDescription = number, k + 1, descr
                ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
                ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
                ds.RepetitionTime, ds.EchoTime = tr, te
                if agent:
                    ds.ContrastBolusAgent = agent
                ds.ImagePositionPatient = [0.0, 0.0, 5.0 * k]
                ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
                ds.PixelSpacing, ds.SliceThickness, ds.Rows, ds.Columns = [1.0, 1.0], 5.0, 8, 8
                ds.save_as(folder / f"{number}_{k}.dcm", enforce_file_format=True)
                files += 1
    old = time.time() - 3600
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    return files


def main(sizes: list[int]) -> None:
    import logging

    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration import scan as scan_mod

    logging.basicConfig(level=logging.ERROR)
    sys.addaudithook(_audit)
    settings = resolve_settings({"settle_minutes": 10.0, "threads": 1})
    print(f"{'studies':>8} {'files':>7} {'write s':>8} {'1st run s':>10} {'no-op s':>8} {'opened':>7} "
          f"{'models':>7} {'per 1000 s':>10}")
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            root, out = Path(tmp) / "tree", Path(tmp) / "out" / "report.csv"
            os.environ["RECNEC_PSEUDONYM_KEY_FILE"] = str(Path(tmp) / "key")
            t0 = time.perf_counter()
            nfiles = write_tree(root, n)
            t_write = time.perf_counter() - t0
            t0 = time.perf_counter()
            first = scan_mod.scan(root, out=out, settings=settings, handle_signals=False)
            t_first = time.perf_counter() - t0
            assert first.counts["processed"] == n, first.line()
            loaded = []
            real_load = scan_mod.Resources.load
            scan_mod.Resources.load = classmethod(
                lambda cls, *a, loaded=loaded, real_load=real_load, **k: loaded.append(1) or real_load(*a, **k))
            OPENED.clear()
            WATCH[:] = [str(root)]
            t0 = time.perf_counter()
            again = scan_mod.scan(root, out=out, settings=settings, handle_signals=False)
            t_noop = time.perf_counter() - t0
            WATCH.clear()
            scan_mod.Resources.load = real_load
            assert again.counts["processed"] == 0 and again.counts["unchanged"] == n, again.line()
            print(f"{n:>8} {nfiles:>7} {t_write:>8.1f} {t_first:>10.1f} {t_noop:>8.2f} {len(OPENED):>7} "
                  f"{'yes' if loaded else 'no':>7} {t_noop / n * 1000:>10.2f}", flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [100, 1000, 5000])
