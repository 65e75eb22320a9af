"""Lesion localisation on every case with a reference lesion: where the detector looks (issue 12).

The model box is centred on the automatically detected lesion, so a wrong lesion gives a
confident answer about the wrong tissue. This prints, per case, how far the detected lesion's
centroid lies from the reference lesion, whether it lies inside it, the Dice overlap and the
volumes, for the scan's detector (T1ce - T1 enhancement + T2 evidence) and, in the same run, the
same detector without the T2 evidence (ablation: what the perilesional-T2 term buys).

Cases:

- ``--n`` fresh synthetic NIfTI studies (seed ``--seed``, never used in training): reference =
  the true lesion mask ``recnec synth`` draws (enhancing part, necrotic core and all);
- TCGA-FG-6692 (real untreated lower-grade glioma; T1, T2, T1ce, FLAIR): there is **no expert
  label**; the reference is the FLAIR-hyperintense region (robust z > 2.5 inside the scan's
  HD-BET brain mask, largest connected component, on the scan's grid), which ``SOURCE.md``
  describes as a left frontal lesion. Reported as a proxy, not as ground truth;
- pyradiomics brain1 and brain2 (real GBM, T1 post-Gd only, 6.5 mm slices, with enhancing-lesion
  labels): no T1 or T2, so the detector runs on the T1ce alone (HD-BET on the T1ce, 1 mm grid)
  and the T2 term cannot help; brain2's label is a small non-enhancing region.

Synthetic and TCGA studies go through the library ``scan()`` (``--keep-intermediate`` writes the
co-registered volumes, brain and lesion masks that the ablation reuses).

    OMP_NUM_THREADS=1 python benchmarks/bench_lesion_localisation.py [--n 6] [--seed 9002]
        [--workers 1] [--json out.json]

Cost: about 35 s per scanned study plus 20-30 s of HD-BET per pyradiomics case (6 + 1 + 2 cases:
about 6 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cases import shared_real


def _centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(ndimage.center_of_mass(mask), 1.0))[:3]


def _figures(found: np.ndarray, centroid: np.ndarray, ambiguous: bool, ref: np.ndarray,
             affine: np.ndarray) -> dict:
    """Distance (mm), centroid inside the reference, Dice, volumes (mL) of one detection."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    ijk = np.round(np.linalg.solve(affine, np.append(centroid, 1.0))[:3]).astype(int)
    inside = bool(all(0 <= v < s for v, s in zip(ijk, ref.shape)) and ref[tuple(ijk)])
    inter = float((found & ref).sum())
    return {"distance_mm": float(np.linalg.norm(centroid - _centroid(ref, affine))), "inside": inside,
            "dice": 2 * inter / max(1.0, float(found.sum() + ref.sum())),
            "found_ml": float(found.sum()) * voxel_ml, "reference_ml": float(ref.sum()) * voxel_ml,
            "ambiguous": bool(ambiguous)}


def _detect(t1ce, brain, affine, **kw) -> tuple[np.ndarray, np.ndarray, bool] | None:
    from recnec_cli.errors import LesionError
    from recnec_cli.stages.lesion import detect_enhancing_lesion

    try:
        les = detect_enhancing_lesion(t1ce, brain, affine, **kw)
    except LesionError:
        return None
    return les.mask, np.asarray(les.centroid_ras_mm), les.ambiguous


def _load(p: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(p))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


def scanned_cases(args, tmp: Path) -> list[dict]:
    """Synthetic + TCGA through scan(); reference masks on the scan grid; both detector variants."""
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.scan import scan
    from recnec_cli.stages import convert, register
    from recnec_cli.stages.intensity import robust_zscore
    from recnec_cli.synth import write_cohort

    studies = tmp / "studies"
    studies.mkdir()
    refs: dict[str, tuple[str, Path | None]] = {}
    if args.n:
        info = write_cohort(studies, n=args.n, seed=args.seed, fmt="nifti")
        for sid, label in zip(info.study_ids, info.labels):
            refs[sid] = (f"synthetic ({label})", studies / "masks" / f"{sid}_lesion_mask.nii.gz")
    tcga = shared_real() / "nifti_tcga_fg_6692_lgg_siemens"
    if tcga.is_dir():
        dest = studies / "TCGA-FG-6692"
        dest.mkdir()
        for f in tcga.glob("*.nii.gz"):  # the images (a copy in the temporary tree; the FLAIR is not a model role)
            if "mask" not in f.name.lower():
                shutil.copy2(f, dest / f.name)
        refs["TCGA-FG-6692"] = ("real LGG (FLAIR proxy)", None)
    keep = tmp / "intermediate"
    settings = resolve_settings({"workers": args.workers, "threads": 1, "settle_minutes": 0,
                                 "pseudonym_key_file": tmp / "key", "state_file": tmp / "state.sqlite",
                                 "keep_intermediate_dir": keep})
    t0 = time.perf_counter()
    summary = scan(studies, out=tmp / "report.csv", settings=settings, handle_signals=False, force=True)
    print(f"scanned {len(summary.rows)} studies in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = {r["study_id"]: r for r in summary.rows}
    out = []
    for sid, (kind, ref_path) in refs.items():
        d = keep / sid
        if rows.get(sid, {}).get("status") != "OK" or not (d / "t1ce_coreg.nii.gz").is_file():
            out.append({"case": sid, "kind": kind, "status": rows.get(sid, {}).get("status", "missing")})
            continue
        t1ce, aff = _load(d / "t1ce_coreg.nii.gz")
        t1, _ = _load(d / "t1_coreg.nii.gz")
        t2, _ = _load(d / "t2_coreg.nii.gz")
        brain = _load(d / "brain_mask.nii.gz")[0] > 0
        if ref_path is not None:
            ref = register.resample_to_grid(convert.read_image_file(ref_path), t1ce.shape, aff, order=0) > 0.5
        else:  # FLAIR proxy, on the scan grid through world coordinates (same session, same frame)
            flair_file = sorted(f for f in tcga.glob("*.nii.gz") if "flair" in f.name.lower())[0]
            flair = register.resample_to_grid(convert.read_image_file(flair_file), t1ce.shape, aff)
            hyper = brain & (robust_zscore(flair, brain) > 2.5)
            lab, n = ndimage.label(hyper)
            ref = lab == (1 + int(np.argmax(ndimage.sum(hyper, lab, range(1, n + 1))))) if n else hyper
        scan_mask = _load(d / "lesion_mask.nii.gz")[0] > 0
        c_scan = np.array([float(rows[sid][f"lesion_{a}_mm"]) for a in "ras"])
        res = {"case": sid, "kind": kind, "status": "OK",
               "with_t2": _figures(scan_mask, c_scan, "LESION_AMBIGUOUS" in rows[sid]["flags"], ref, aff)}
        no_t2 = _detect(t1ce, brain, aff, t1=t1)
        res["without_t2"] = _figures(*no_t2, ref, aff) if no_t2 else None
        out.append(res)
    return out


def pyradiomics_cases() -> list[dict]:
    """brain1 / brain2: T1ce only, HD-BET on the T1ce, 1 mm grid, labelled lesion."""
    import SimpleITK as sitk

    from recnec_cli.stages import register
    from recnec_cli.stages.skullstrip import HdBet
    from recnec_cli.study import Volume

    d = shared_real() / "nrrd_pyradiomics_brain1_brain2"
    if not d.is_dir():
        return []
    hdbet = HdBet()
    out = []
    for name in ("brain1", "brain2"):
        data, aff = register.from_sitk(sitk.ReadImage(str(d / f"{name}_image.nrrd")))
        lab, laff = register.from_sitk(sitk.ReadImage(str(d / f"{name}_label.nrrd")))
        vol = Volume(data, aff)
        shape, gaff = register.common_grid(vol, 1.0)
        t1ce = register.resample_to_grid(vol, shape, gaff)
        brain = register.resample_to_grid(Volume(hdbet.brain_mask(vol).astype(np.float32), aff), shape, gaff) > 0.5
        ref = register.resample_to_grid(Volume(lab, laff), shape, gaff, order=0) > 0.5
        found = _detect(t1ce, brain, gaff)
        out.append({"case": f"pyradiomics {name}", "kind": "real GBM (label; T1ce only)", "status": "OK",
                    "with_t2": None, "without_t2": _figures(*found, ref, gaff) if found else None})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=6, help="fresh synthetic studies")
    ap.add_argument("--seed", type=int, default=9002, help="synthetic cohort seed (never a training seed)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmpd:
        cases = scanned_cases(args, Path(tmpd)) + pyradiomics_cases()

    def cell(f: dict | None) -> str:
        if f is None:
            return f"{'no lesion found':<28}"
        return (f"{f['distance_mm']:6.1f} {'yes' if f['inside'] else 'no':>4} {f['dice']:5.2f} {f['found_ml']:7.2f}"
                f"{' A' if f['ambiguous'] else '  '}")

    print(f"\n{'case':<22} {'kind':<30} {'ref mL':>7} | {'scan detector (T2 evidence)':^26} | "
          f"{'without T2 evidence':^26}")
    print(f"{'':<22} {'':<30} {'':>7} | {'mm':>6} {'in':>4} {'Dice':>5} {'mL':>7}  | "
          f"{'mm':>6} {'in':>4} {'Dice':>5} {'mL':>7}")
    for c in cases:
        if c["status"] != "OK":
            print(f"{c['case']:<22} {c['kind']:<30} scan status {c['status']}")
            continue
        ref_ml = (c["with_t2"] or c["without_t2"] or {}).get("reference_ml", float("nan"))
        left = cell(c["with_t2"]) if c["with_t2"] is not None or c["kind"].startswith("synthetic") or \
            "FLAIR" in c["kind"] else f"{'n/a (no T1/T2)':<28}"
        print(f"{c['case']:<22} {c['kind']:<30} {ref_ml:7.2f} | {left} | {cell(c['without_t2'])}")
    print("A = flagged LESION_AMBIGUOUS (a second candidate scored at least half as high)")
    syn = [c for c in cases if c["kind"].startswith("synthetic") and c["status"] == "OK"]
    for key in ("with_t2", "without_t2"):
        f = [c[key] for c in syn if c[key] is not None]
        if f:
            d = np.array([x["distance_mm"] for x in f])
            print(f"synthetic {key}: median distance {np.median(d):.1f} mm (max {d.max():.1f}), centroid inside "
                  f"{sum(x['inside'] for x in f)}/{len(syn)}, median Dice {np.median([x['dice'] for x in f]):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "n": args.n, "cases": cases}, indent=1))


if __name__ == "__main__":
    main()
