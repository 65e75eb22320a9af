"""recnec's DICOM conversion (dicom2nifti's building blocks) against the ``dcm2niix`` PyPI package.

A reference point, not a replacement: for each real DICOM series in ``$RECNEC_SHARED_DATA``
(default ``../shared/data``), recnec's :func:`recnec_cli.stages.convert.convert_series` (in memory:
pixel data through pydicom and dicom2nifti, canonical RAS+ float32) and ``dcm2niix`` (a subprocess
writing an uncompressed NIfTI with ``-p n``: display values, RescaleSlope / RescaleIntercept as
DICOM PS3.3 C.11.1.1.2 defines them and as recnec applies them, rather than dcm2niix's default Philips
"precise" private scaling; then loaded and canonicalised with nibabel) convert the same files.
Prints, per series: median seconds of each over ``--repeats`` runs (dcm2niix including its file
write and our read-back), the ratio recnec / dcm2niix, the max |voxel difference| relative to the
series' intensity range, and the max |affine difference| in mm. ``dcm2niix`` is not a recnec
dependency: ``pip install dcm2niix`` first.

    python benchmarks/bench_dcm2niix.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CASES = ("dicom_philips_elition_t1_mprage", "dicom_siemens_e11_t1_fl2d_sag", "dicom_uih_umr770_t1_3d_j2k",
         "dicom_tcia_vs_seg_001_t1ce_siemens_j2k")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import nibabel as nib
    import numpy as np

    try:
        import dcm2niix
    except ImportError:
        raise SystemExit("pip install dcm2niix first (a benchmark reference, not a recnec dependency)") from None
    from recnec_cli.config import Settings
    from recnec_cli.stages.convert import convert_series
    from recnec_cli.stages.discover import discover

    exe = str(dcm2niix.bin)
    shared = Path(os.environ.get("RECNEC_SHARED_DATA", REPO.parent / "shared" / "data")) / "real"
    settings = Settings()
    print(f"{'series':<44} {'slices':>6} {'recnec s':>9} {'dcm2niix s':>10} {'ratio':>6} {'voxel diff':>10} "
          f"{'affine mm':>9}")
    for case in CASES:
        root = shared / case
        if not root.is_dir():
            print(f"{case:<44} absent")
            continue
        for study in discover(root, settings=settings):
            for series in study.series:
                if series.source != "dicom" or len(series.files) < 8 or series.frames:
                    continue
                files = sorted({str(p) for p in series.files})
                tr, td = [], []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    vol = convert_series(series, settings=settings)
                    tr.append(time.perf_counter() - t0)
                    with tempfile.TemporaryDirectory() as tmp:
                        src = Path(tmp) / "in"
                        src.mkdir()
                        for i, f in enumerate(files):
                            os.symlink(f, src / f"{i:05d}.dcm")
                        t0 = time.perf_counter()
                        subprocess.run([exe, "-z", "n", "-b", "n", "-p", "n", "-f", "out", "-o", tmp, str(src)],
                                       check=True, capture_output=True)
                        outs = sorted(Path(tmp).glob("out*.nii"))
                        img = nib.as_closest_canonical(nib.load(str(outs[0])))
                        ref = np.asarray(img.dataobj, dtype=np.float32)
                        td.append(time.perf_counter() - t0)
                        aff = img.affine
                name = f"{case[6:]}:{series.header.series_number}"[:44]
                if ref.ndim > 3 or ref.shape != vol.data.shape:
                    print(f"{name:<44} {len(files):>6} {statistics.median(tr):>9.2f} {statistics.median(td):>10.2f} "
                          f"{statistics.median(tr) / statistics.median(td):>6.1f}  shapes differ: {vol.data.shape} vs "
                          f"{ref.shape} ({len(outs)} files)")
                    continue
                rng = float(np.ptp(ref)) or 1.0
                vd = float(np.abs(vol.data - ref).max()) / rng
                ad = float(np.abs(np.asarray(vol.affine) - aff).max())
                print(f"{name:<44} {len(files):>6} {statistics.median(tr):>9.2f} {statistics.median(td):>10.2f} "
                      f"{statistics.median(tr) / statistics.median(td):>6.1f} {vd:>10.1e} {ad:>9.1e}", flush=True)


if __name__ == "__main__":
    main()
