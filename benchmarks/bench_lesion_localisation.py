"""Lesion localisation on every case with a reference lesion: the segmenter against the heuristic.

The model box is centred on the lesion, so a wrong lesion gives a confident answer about the
wrong tissue. This prints, per case and for both detectors in one run, how far the chosen
lesion's centroid lies from the reference lesion, whether it lies inside it, the Dice overlap
(whole lesion, and the enhancing part for the segmenter) and the volumes:

- **segmenter**: the shipped ONNX segmenter (``weights/segmenter.onnx``, the scan's default);
- **heuristic**: the enhancement-map detector with T2 evidence (``--lesion-detector heuristic``).

Cases:

- ``--n-heads`` synthetic heads drawn with the distractors (:mod:`recnec_cli.synth.segdata`,
  seed ``--seed``, never a training seed; lesion kinds in turn: deep, cortical at the surface,
  periventricular, large cystic, multifocal, resection cavity; dural sinuses, cortical veins,
  falx and choroid plexus enhance on every T1ce), skull-stripped, on the segmenter's 2 mm grid:
  both detectors on the same images (no registration: the images are co-registered by
  construction). Reference: the true enhancing + core label;
- ``--n-free`` lesion-free synthetic heads (only the normally enhancing structures): how often
  each detector reports a lesion that is not there;
- ``--n`` ``recnec synth`` studies (NIfTI, with skull) through the library ``scan()``: reference
  = the true lesion mask; the heuristic runs on the scan's kept co-registered volumes;
- TCGA-FG-6692 (real untreated lower-grade glioma; T1, T2, T1ce and FLAIR, which the scan now
  uses): **no expert label**; the reference is the FLAIR-hyperintense region (robust z > 2.5 in
  the brain mask, largest component) of the FLAIR **registered onto the T1ce** by the scan. Until
  2026-12-04 this benchmark took the FLAIR through world coordinates, assuming one frame for the
  session: the FLAIR's header frame is 17 mm / 13 degrees off the T1ce's (the registration and a
  picture of both agree), so that reference lay 94 mm from the tumour and every earlier "TCGA
  missed" figure measured against the wrong place;
- pyradiomics brain1 and brain2 (real GBM, T1 post-Gd only, 6.5 mm slices, with lesion labels):
  T1ce alone (HD-BET on the T1ce, 1 mm grid); brain2's label is a small (1.8 mL) cortical lesion
  at the temporal surface, faintly enhancing (T1ce robust z of its voxels: mean 0.85, 90th
  percentile 3.4, against 2.4 for the brain's 99th; earlier notes called it non-enhancing).

    OMP_NUM_THREADS=1 python benchmarks/bench_lesion_localisation.py [--n-heads 24] [--n 6]
        [--seed 9002] [--workers 1] [--json out.json]

Cost: about 3 s per synthetic head, 35 s per scanned study, 30 s per pyradiomics case (24 + 7 + 2
cases: about 7 min on 2 cores).
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


def _figures(found: np.ndarray, centroid: np.ndarray, flags: str, ref: np.ndarray, affine: np.ndarray,
             found_enh: np.ndarray | None = None, ref_enh: np.ndarray | None = None) -> dict:
    """Distance (mm), centroid inside the reference, Dice (lesion; enhancing part), volumes (mL)."""
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    ijk = np.round(np.linalg.solve(affine, np.append(centroid, 1.0))[:3]).astype(int)
    inside = bool(all(0 <= v < s for v, s in zip(ijk, ref.shape)) and ref[tuple(ijk)])
    out = {"distance_mm": float(np.linalg.norm(centroid - _centroid(ref, affine))), "inside": inside,
           "dice": _dice(found, ref), "found_ml": float(found.sum()) * voxel_ml,
           "reference_ml": float(ref.sum()) * voxel_ml, "flags": flags}
    if found_enh is not None and ref_enh is not None:
        out["dice_enhancing"] = _dice(found_enh, ref_enh)
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / max(1.0, float(a.sum() + b.sum()))


def _heuristic(t1ce, brain, affine, ref, **kw) -> tuple[dict | None, object | None]:
    """The heuristic detector's figures and its :class:`~recnec_cli.stages.lesion.Lesion` (``None``
    when it finds none), which the segmenter's ``lesion_confidence`` is checked against."""
    from recnec_cli.errors import LesionError
    from recnec_cli.stages.lesion import detect_enhancing_lesion

    try:
        les = detect_enhancing_lesion(t1ce, brain, affine, **kw)
    except LesionError:
        return None, None
    if ref is None:
        return {"false_lesion_ml": les.volume_ml}, les
    return _figures(les.mask, np.asarray(les.centroid_ras_mm), "A" if les.ambiguous else "", ref, affine), les


def _segmenter(seg, images, brain, affine, ref, ref_enh=None, heuristic=None) -> tuple[dict | None, float]:
    """The scan's lesion stage with the segmenter: segmentation, then the normal-structure tests
    (roundness; the CSF shell when a T1 and a T2 are there), the redrawn outline and the
    ``lesion_confidence`` the scan would report (:func:`~recnec_cli.orchestration.pipeline.lesion_confidence_of`:
    the lesion score of ``weights/lesion_score.json``, which weighs the heuristic's agreement; without
    one the segmenter's mean probability, x 0.75 when the heuristic's lesion ``heuristic`` does not lie
    inside), as in ``pipeline._find_lesion`` (:func:`recnec_cli.stages.segment.find_segmented_lesion`).
    Flags: ``A`` ambiguous, ``D`` the detectors disagree, ``L`` below
    :data:`~recnec_cli.stages.lesion.LOW_CONFIDENCE` (``LESION_LOW_CONFIDENCE``)."""
    from recnec_cli.errors import LesionError
    from recnec_cli.orchestration.pipeline import _inside, lesion_confidence_of
    from recnec_cli.stages.lesion import LOW_CONFIDENCE
    from recnec_cli.stages.segment import find_segmented_lesion

    t0 = time.perf_counter()
    s = seg.segment(images, brain, affine)
    seconds = time.perf_counter() - t0
    try:
        les = find_segmented_lesion(s, images, brain, affine, lesion_score=seg.lesion_score,
                                    heuristic_centroid=None if heuristic is None else heuristic.centroid_ras_mm)
    except LesionError:
        return None, seconds
    agrees = heuristic is not None and _inside(les.mask, np.asarray(heuristic.centroid_ras_mm), affine)
    conf = lesion_confidence_of(les, heuristic_agrees=agrees, grown_edge=False,
                                scored=seg.lesion_score is not None)
    flags = (("A" if les.runner_up_ratio >= 0.5 else "") + ("" if agrees else "D")
             + ("L" if conf < LOW_CONFIDENCE else ""))
    if ref is None:  # a lesion-free head: any lesion is a false one
        return {"false_lesion_ml": float(les.mask.sum()) * abs(float(np.linalg.det(affine[:3, :3]))) / 1000,
                "lesion_confidence": conf, "flags": flags}, seconds
    out = _figures(les.mask, _centroid(les.mask, affine), flags, ref, affine, les.enhancing, ref_enh)
    out["lesion_confidence"] = conf
    out["stage_seconds"] = time.perf_counter() - t0  # segmenter, scoring and redrawn outline
    if seg.lesion_score is not None:
        out["reference_region"] = _reference_region(s, images, brain, affine, ref, seg.lesion_score, heuristic)
    return out, seconds


def _reference_region(s, images, brain, affine, ref, lesion_score, heuristic) -> str:
    """Where the reference lesion stands among the segmenter's candidate regions (those passing the
    normal-structure tests, as the scan ranks them): the score of the best-scoring region touching
    the reference, its rank by score and by enhancing volume. Tells a ranking miss (the segmenter
    saw the lesion, the choice went elsewhere) from a detection miss (no region touches it)."""
    from recnec_cli.stages.segment import candidate_components, lesion_tests

    not_a_lesion, score = lesion_tests(s, images, brain, affine, lesion_score=lesion_score,
                                       heuristic_centroid=None if heuristic is None else heuristic.centroid_ras_mm)
    cands, _ = candidate_components(s, affine, not_a_lesion=not_a_lesion)
    scores = [score(c.component, c.filled, c.enhancing, c.oedema) for c in cands]
    hits = [i for i, c in enumerate(cands) if (c.filled & ref).any()]
    if not hits:
        return f"no region of {len(cands)} touches it"
    i = max(hits, key=lambda k: scores[k])
    by_score = sorted(range(len(cands)), key=lambda k: -scores[k])
    return (f"score {scores[i]:.2f} (best {max(scores):.2f}), rank {by_score.index(i) + 1} by score and "
            f"{i + 1} by enhancing volume ({cands[i].enhancing_ml:.2f} mL) of {len(cands)}")


def synthetic_heads(args, seg) -> list[dict]:
    """Segdata heads with distractors: both detectors on the same skull-stripped images."""
    from recnec_cli.synth import segdata

    aff = segdata.grid_affine()
    out = []
    for i in range(args.n_heads):
        kind = segdata.LESION_KINDS[i % len(segdata.LESION_KINDS)]
        lm = segdata.draw_label_map(args.seed, i, kind=kind)
        target = segdata.TARGET_OF[lm.labels]
        ref, ref_enh = np.isin(target, (1, 2)), target == 1
        if not ref.any():
            continue
        imgs = segdata.render_images(np.random.default_rng([args.seed, i]), lm.labels, lm.t1_texture)
        brain = ndimage.binary_fill_holes(lm.brain | (ref & (lm.labels != segdata.OEDEMA)))
        imgs = {k: np.where(brain, v, 0.0).astype(np.float32) for k, v in imgs.items()}
        h, h_les = _heuristic(imgs["T1ce"], brain, aff, ref, t1=imgs["T1"], t2=imgs["T2"])
        s, sec = _segmenter(seg, imgs, brain, aff, ref, ref_enh, h_les)
        out.append({"case": f"head {i:02d}", "kind": f"synthetic head ({kind})", "status": "OK",
                    "segmenter": s, "heuristic": h, "segmenter_seconds": sec})
    for i in range(args.n_free):  # lesion-free heads: only the normally enhancing structures
        lm = segdata.draw_label_map(args.seed, 1000 + i, kind="none")
        imgs = segdata.render_images(np.random.default_rng([args.seed, 1000 + i]), lm.labels, lm.t1_texture)
        imgs = {k: np.where(lm.brain, v, 0.0).astype(np.float32) for k, v in imgs.items()}
        h, h_les = _heuristic(imgs["T1ce"], lm.brain, aff, None, t1=imgs["T1"], t2=imgs["T2"])
        s, sec = _segmenter(seg, imgs, lm.brain, aff, None, heuristic=h_les)
        out.append({"case": f"free {i:02d}", "kind": "lesion-free head", "status": "FREE", "segmenter": s,
                    "heuristic": h})
    return out


def scanned_cases(args, tmp: Path) -> list[dict]:
    """``recnec synth`` studies + TCGA through scan() (segmenter); the heuristic on kept volumes."""
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
            refs[sid] = (f"synthetic study ({label})", studies / "masks" / f"{sid}_lesion_mask.nii.gz")
    tcga = shared_real() / "nifti_tcga_fg_6692_lgg_siemens"
    if tcga.is_dir():
        dest = studies / "TCGA-FG-6692"
        dest.mkdir()
        for f in tcga.glob("*.nii.gz"):  # the images, FLAIR included (a copy in the temporary tree)
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
        row = rows.get(sid, {})
        if not (d / "t1ce_coreg.nii.gz").is_file():
            out.append({"case": sid, "kind": kind, "status": row.get("status", "missing"),
                        "message": row.get("error_message", "")})
            continue
        t1ce, aff = _load(d / "t1ce_coreg.nii.gz")
        t1, _ = _load(d / "t1_coreg.nii.gz")
        t2, _ = _load(d / "t2_coreg.nii.gz")
        brain = _load(d / "brain_mask.nii.gz")[0] > 0
        if ref_path is not None:
            ref = register.resample_to_grid(convert.read_image_file(ref_path), t1ce.shape, aff, order=0) > 0.5
        else:  # FLAIR proxy: the scan's FLAIR registered onto the T1ce (its world frame is ~17 mm / 13 deg off)
            flair, _ = _load(d / "flair_coreg.nii.gz")
            hyper = brain & (robust_zscore(flair, brain) > 2.5)
            lab, n = ndimage.label(hyper)
            ref = lab == (1 + int(np.argmax(ndimage.sum(hyper, lab, range(1, n + 1))))) if n else hyper
        res = {"case": sid, "kind": kind, "status": row.get("status", "missing"),
               "message": row.get("error_message", ""), "flair": bool(row.get("flair_series")),
               "segmenter": None, "reference_ml": float(ref.sum()) * abs(float(np.linalg.det(aff[:3, :3]))) / 1000}
        if row.get("status") == "OK":
            scan_mask = _load(d / "lesion_mask.nii.gz")[0] > 0
            c_scan = np.array([float(row[f"lesion_{a}_mm"]) for a in "ras"])
            res["segmenter"] = _figures(scan_mask, c_scan, row["flags"], ref, aff)
            res["segmenter"]["lesion_confidence"] = float(row.get("lesion_confidence") or "nan")
        res["heuristic"] = _heuristic(t1ce, brain, aff, ref, t1=t1, t2=t2)[0]
        out.append(res)
    return out


def _load(p: Path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(p))
    return np.asarray(img.dataobj, dtype=np.float32), np.asarray(img.affine)


def pyradiomics_cases(seg) -> list[dict]:
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
        h, h_les = _heuristic(t1ce, brain, gaff, ref)
        s, sec = _segmenter(seg, {"T1ce": t1ce}, brain, gaff, ref, heuristic=h_les)
        out.append({"case": f"pyradiomics {name}", "kind": "real GBM (label; T1ce only)", "status": "OK",
                    "segmenter": s, "heuristic": h, "segmenter_seconds": sec})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-heads", type=int, default=24, help="synthetic heads with distractors (segdata)")
    ap.add_argument("--n-free", type=int, default=8, help="lesion-free synthetic heads (false lesions)")
    ap.add_argument("--n", type=int, default=6, help="recnec synth studies through scan()")
    ap.add_argument("--seed", type=int, default=9002, help="synthetic seed (never a training seed)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--segmenter", type=Path, default=None,
                    help="folder with segmenter.onnx/.json for the synthetic heads (default: the shipped one; "
                         "the scanned studies always use the shipped weights)")
    ap.add_argument("--heads-only", action="store_true", help="only the synthetic heads (about 2 min)")
    args = ap.parse_args()
    from recnec_cli.config import default_weights_dir
    from recnec_cli.stages.segment import Segmenter

    seg = Segmenter.load(args.segmenter or default_weights_dir(), device="cpu", threads=1)
    t0 = time.perf_counter()
    cases = synthetic_heads(args, seg)
    print(f"{len(cases)} synthetic heads in {time.perf_counter() - t0:.0f} s", flush=True)
    if not args.heads_only:
        with tempfile.TemporaryDirectory() as tmpd:
            cases += scanned_cases(args, Path(tmpd))
        cases += pyradiomics_cases(seg)

    def cell(f: dict | None) -> str:
        if f is None:
            return f"{'no lesion':<27}"
        de = f"{f['dice_enhancing']:5.2f}" if "dice_enhancing" in f else f"{'':5}"
        return (f"{f['distance_mm']:6.1f} {'yes' if f['inside'] else 'no':>3} {f['dice']:5.2f} {de} "
                f"{f['found_ml']:6.1f}")

    print(f"\n{'case':<16} {'kind':<32} {'ref mL':>7} | {'segmenter (scan default)':^33} | {'heuristic':^27}")
    print(f"{'':<16} {'':<32} {'':>7} | {'mm':>6} {'in':>3} {'Dice':>5} {'enh':>5} {'mL':>6}       | "
          f"{'mm':>6} {'in':>3} {'Dice':>5} {'':>5} {'mL':>6}")
    for c in cases:
        if c["status"] == "FREE":
            continue
        ref_ml = c.get("reference_ml") or next((f["reference_ml"] for f in (c.get("segmenter"), c.get("heuristic"))
                                                if f), float("nan"))
        seg_cell = cell(c.get("segmenter"))
        if c["status"] != "OK":
            seg_cell = f"{c['status'][:27]:<27}"
        extra = ""
        if c.get("segmenter"):
            f = c["segmenter"]
            extra = f" conf {f.get('lesion_confidence', float('nan')):.2f} {f.get('flags', '')[:60]}"
        print(f"{c['case']:<16} {c['kind']:<32} {ref_ml:7.2f} | {seg_cell}       | {cell(c.get('heuristic'))}{extra}")
    heads = [c for c in cases if c["kind"].startswith("synthetic head")]
    for key in ("segmenter", "heuristic"):
        f = [c[key] for c in heads]
        found = [x for x in f if x is not None]
        if f:
            line = (f"synthetic heads, {key}: centroid inside {sum(x['inside'] for x in found)}/{len(f)}, "
                    f"median distance {np.median([x['distance_mm'] if x else np.inf for x in f]):.1f} mm, "
                    f"median Dice {np.median([x['dice'] if x else 0.0 for x in f]):.2f}")
            if key == "segmenter":
                de = np.median([x.get("dice_enhancing", 0.0) if x else 0.0 for x in f])
                line += f", median Dice of the enhancing part {de:.2f}"
            missed = [c["case"] for c in heads if c[key] is None]
            line += f"; NO_ENHANCING_LESION on {len(missed)} ({', '.join(missed) or '-'})"
            print(line)
    free = [c for c in cases if c["status"] == "FREE"]
    for key in ("segmenter", "heuristic"):
        if free:
            fl = [c[key]["false_lesion_ml"] for c in free if c[key]]
            print(f"lesion-free heads, {key}: a false lesion on {len(fl)}/{len(free)}"
                  + (f" (median {np.median(fl):.2f} mL)" if fl else "") + "; the rest NO_ENHANCING_LESION")
    # "or say that you cannot": a wrong or false lesion is less harmful when the row is flagged
    # LESION_LOW_CONFIDENCE (lesion_confidence < LOW_CONFIDENCE), as the scan would flag it
    from recnec_cli.stages.lesion import LOW_CONFIDENCE

    def low(f: dict) -> bool:
        return bool(f.get("lesion_confidence", 1.0) < LOW_CONFIDENCE)

    with_ref = [c for c in cases if c["status"] == "OK" and c.get("segmenter") is not None]
    wrong = [c for c in with_ref if not c["segmenter"]["inside"]]
    right = [c for c in with_ref if c["segmenter"]["inside"]]
    false = [c for c in free if c.get("segmenter")]
    print(f"segmenter, flagged LESION_LOW_CONFIDENCE (lesion_confidence < {LOW_CONFIDENCE}): "
          f"wrong lesions {sum(low(c['segmenter']) for c in wrong)}/{len(wrong)} "
          f"({', '.join(c['case'] for c in wrong) or '-'}), false lesions on lesion-free heads "
          f"{sum(low(c['segmenter']) for c in false)}/{len(false)}, right lesions "
          f"{sum(low(c['segmenter']) for c in right)}/{len(right)} (a needless flag)")
    shown = [c for c in with_ref if "reference_region" in c["segmenter"]
             and (not c["segmenter"]["inside"] or not c["kind"].startswith("synthetic"))]
    if shown:
        print("the reference lesion among the segmenter's regions (misses and real cases):")
        for c in shown:
            print(f"  {c['case']:<16} {'inside' if c['segmenter']['inside'] else 'MISSED'}: "
                  f"{c['segmenter']['reference_region']}")
    secs = [c["segmenter_seconds"] for c in cases if "segmenter_seconds" in c]
    if secs:
        print(f"segmenter seconds per study (resampling included, 1 thread): median {np.median(secs):.2f}, "
              f"max {max(secs):.2f}")
    stage = [c["segmenter"]["stage_seconds"] for c in cases if (c.get("segmenter") or {}).get("stage_seconds")]
    if stage:
        print(f"lesion stage seconds per study (segmenter, lesion score, redrawn outline): median "
              f"{np.median(stage):.2f}, max {max(stage):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"seed": args.seed, "n": args.n, "cases": cases}, indent=1, default=str))


if __name__ == "__main__":
    main()
