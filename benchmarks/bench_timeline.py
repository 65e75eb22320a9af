"""The patient's timeline on synthetic follow-ups: measured volume change against the truth.

``recnec synth --follow-ups K`` writes K later studies per subject (same anatomy, a new head
position, the lesion grown for recurrences and kept or shrunk for necroses) with the true
compartment volumes in ``follow_ups.csv``. This script synthesises such a cohort (NIfTI, BIDS
``sub-``/``ses-`` folders with acquisition dates in the sidecars), scans it with the library
``scan()`` (the shipped segmenter, real HD-BET), and prints for every pair of consecutive visits:

- the measured change of the enhancing volume against the previous study (the report's
  ``enhancing_change_vs_prior_ml``) and the true change; the pair passes when
  ``|measured - true| <= max(10 % of |true|, 0.5 mL)`` (issue 21's goal: >= 90 % of pairs);
- the same for the whole lesion (enhancing + necrotic core);
- the lesion match (``prior_lesion_match``), and whether the volumetric suggestion against the
  nadir agrees with the true one.

    OMP_NUM_THREADS=1 python benchmarks/bench_timeline.py [--n 20] [--follow-ups 2] [--seed 9100]
        [--workers 1] [--keep DIR] [--json out.json]

Cost: one scanned study takes about 30 s on the 2-core development machine (20 x 3 studies: about
30 min).
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def _f(v: str) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--follow-ups", type=int, default=2)
    ap.add_argument("--seed", type=int, default=9100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--keep", type=Path, default=None, help="keep the cohort and the scan output here")
    ap.add_argument("--reuse", action="store_true", help="with --keep: reuse a cohort / report already there")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from recnec_cli import timeline
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.scan import scan
    from recnec_cli.synth import write_cohort

    work = args.keep or Path(tempfile.mkdtemp(prefix="recnec-bench-timeline-"))
    cohort, out = work / "cohort", work / "out"
    t0 = time.perf_counter()
    if not (args.reuse and (cohort / "follow_ups.csv").is_file()):
        shutil.rmtree(cohort, ignore_errors=True)
        write_cohort(cohort, n=args.n, seed=args.seed, fmt="nifti", space="study", follow_ups=args.follow_ups)
    t_synth = time.perf_counter() - t0
    # the cohort folder is the scan's tree: discovery ignores the CSVs and the `_lesion_mask` files
    studies = cohort
    t1 = time.perf_counter()
    if not (args.reuse and (out / "report.csv").is_file()):
        settings = resolve_settings({"settle_minutes": 0, "workers": args.workers, "threads": 1})
        summary = scan(studies, out=out / "report.csv", settings=settings)
        print(summary.line())
    t_scan = time.perf_counter() - t1
    rows = {r["study_id"]: r for r in csv.DictReader(open(out / "report.csv", encoding="utf-8"))}
    truth = list(csv.DictReader(open(cohort / "follow_ups.csv", encoding="utf-8")))
    by_subject: dict[str, list[dict]] = {}
    for t in truth:
        by_subject.setdefault(t["subject"], []).append(t)
    pairs = []
    for subject, tps in sorted(by_subject.items()):
        tps.sort(key=lambda t: int(t["time_point"]))
        nadir_true = None
        for prev, cur in zip(tps, tps[1:]):
            prev_enh = float(prev["enhancing_ml"])
            nadir_true = prev_enh if nadir_true is None else min(nadir_true, prev_enh)
            row = rows.get(cur["study_id"], {})
            prow = rows.get(prev["study_id"], {})
            true_d = float(cur["enhancing_ml"]) - float(prev["enhancing_ml"])
            true_dl = float(cur["lesion_ml"]) - float(prev["lesion_ml"])
            meas_d = _f(row.get("enhancing_change_vs_prior_ml", ""))
            me, pe = _f(row.get("enhancing_volume_ml", "")), _f(prow.get("enhancing_volume_ml", ""))
            mn, pn = _f(row.get("necrotic_volume_ml", "")), _f(prow.get("necrotic_volume_ml", ""))
            meas_dl = None if None in (me, pe, mn, pn) else (me + mn) - (pe + pn)  # type: ignore[operator]
            pairs.append({
                "subject": subject, "label": cur["label"], "from": prev["study_id"], "to": cur["study_id"],
                "prior_found": row.get("prior_study_id", "") == prev["study_id"],
                "match": row.get("prior_lesion_match", ""),
                "true_enh_change_ml": round(true_d, 3), "measured_enh_change_ml": meas_d,
                "true_enh_ml": float(cur["enhancing_ml"]), "measured_enh_ml": me,
                "true_lesion_change_ml": round(true_dl, 3),
                "measured_lesion_change_ml": None if meas_dl is None else round(meas_dl, 3),
                "suggestion": row.get("volumetric_suggestion", ""),
                "true_suggestion": timeline.suggestion(float(cur["enhancing_ml"]), nadir_true),
            })

    def ok(meas, true):
        return meas is not None and abs(meas - true) <= max(0.10 * abs(true), 0.5)

    enh_err = [abs(p["measured_enh_change_ml"] - p["true_enh_change_ml"]) for p in pairs
               if p["measured_enh_change_ml"] is not None]
    les_err = [abs(p["measured_lesion_change_ml"] - p["true_lesion_change_ml"]) for p in pairs
               if p["measured_lesion_change_ml"] is not None]
    n = len(pairs)
    n_enh = sum(ok(p["measured_enh_change_ml"], p["true_enh_change_ml"]) for p in pairs)
    n_les = sum(ok(p["measured_lesion_change_ml"], p["true_lesion_change_ml"]) for p in pairs)
    matches: dict[str, int] = {}
    for p in pairs:
        matches[p["match"] or "-"] = matches.get(p["match"] or "-", 0) + 1
    agree = sum(p["suggestion"] == p["true_suggestion"] for p in pairs)
    vol_err = [p["measured_enh_ml"] - p["true_enh_ml"] for p in pairs if p["measured_enh_ml"] is not None]
    print(f"\n{args.n} subjects x {args.follow_ups + 1} visits: {n} consecutive pairs; synth {t_synth:.0f} s, "
          f"scan {t_scan:.0f} s ({t_scan / max(1, len(truth)):.1f} s per study)")
    print(f"prior found for {sum(p['prior_found'] for p in pairs)}/{n} pairs; lesion match: {matches}")

    def dist(xs):
        if not xs:
            return "none measured"
        q = np.percentile(xs, [50, 75, 90, 100])
        return f"median {q[0]:.2f}, p75 {q[1]:.2f}, p90 {q[2]:.2f}, max {q[3]:.2f} mL"

    print(f"enhancing change: within max(10 %, 0.5 mL) of the truth for {n_enh}/{n} pairs "
          f"({100 * n_enh / max(1, n):.0f} %; goal >= 90 %); |error| {dist(enh_err)}")
    print(f"lesion (enhancing + core) change: within for {n_les}/{n} pairs ({100 * n_les / max(1, n):.0f} %); "
          f"|error| {dist(les_err)}")
    if vol_err:
        print(f"enhancing volume per study (measured - true): median {np.median(vol_err):+.2f} mL, "
              f"IQR {np.percentile(vol_err, 25):+.2f} to {np.percentile(vol_err, 75):+.2f} mL")
    print(f"volumetric suggestion equal to the truth's: {agree}/{n}")
    print("\nsubject     label       match          true dEnh  meas dEnh  true dLes  meas dLes  suggestion (true)")
    for p in pairs:
        print(f"{p['subject']:<11} {p['label']:<11} {p['match'] or '-':<14} {p['true_enh_change_ml']:>9.2f}  "
              f"{'' if p['measured_enh_change_ml'] is None else format(p['measured_enh_change_ml'], '9.2f'):>9}  "
              f"{p['true_lesion_change_ml']:>9.2f}  "
              f"{'' if p['measured_lesion_change_ml'] is None else format(p['measured_lesion_change_ml'], '9.2f'):>9}  "
              f"{p['suggestion'] or '-'} ({p['true_suggestion']})")
    if args.json:
        args.json.write_text(json.dumps({"pairs": pairs, "within_enh": n_enh, "within_lesion": n_les, "n": n},
                                        indent=1))
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
