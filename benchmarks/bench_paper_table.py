"""The paper's architecture comparison on recnec's synthetic cohort (issue 12).

Front Oncol 2025 (PubMed 40548110) compared CNNs on 234 patients (192 recurrence / 42 necrosis);
this script runs the same comparison on the synthetic cohort the shipped weights come from:

1. ``recnec synth --space model`` cohort seed 0, n=234, 192:42 (the training cohort; the same
   folds for every architecture because the folds depend on ``--seed`` and the labels only);
2. for each architecture, ``recnec train --arch A --width W`` (5-fold CV, bootstrap 95 % CIs of
   the out-of-fold figures in the manifest);
3. each ensemble's probability calibration fitted on the calibration cohort (seed 2, n=234,
   192:42, ``--calibration-data``), as for the shipped weights;
4. ``recnec evaluate`` of each ensemble on a fresh cohort (``--fresh-seed``, default 4242, never
   used in training; n=234, 192:42) with bootstrap CIs and ECE.

resnet10 w16 is trained exactly as the shipped ensemble (same cohorts, folds, seed, recipe and one
torch thread), so ``--reuse-shipped`` copies ``weights/`` for it instead of training it again
(about 20 min saved); the other architectures train with 2 torch threads.

Prints a Markdown table: ours (CV and fresh cohort, 95 % CIs) beside the paper's figures. Ours
are SYNTHETIC and say nothing about clinical performance.

Widths are scaled down so that the table fits in about an hour on 2 cores (resnet10 w16 as
shipped ~12 min; resnet18 w8, vgg16 w8, densenet121 w4 growth-scaled by MONAI's defaults; see
``--widths``). ``--quick`` runs the same steps with recnec's tiny training profile on n=40 to
check the script (minutes; the figures mean nothing).

    OMP_NUM_THREADS=2 python benchmarks/bench_paper_table.py [--out paper_table/] [--archs resnet10 vgg16]
        [--quick] [--reuse-shipped] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAPER = {  # Front Oncol 2025, PubMed 40548110: sensitivity, specificity, accuracy, AUC
    "resnet10": (0.78, 0.94, 0.91, 0.83),
    "vgg16": (0.56, 0.94, 0.88, 0.70),
}
WIDTHS = {"resnet10": 16, "resnet18": 8, "vgg16": 8, "densenet121": 4}


def _run(args: list[str]) -> None:
    t0 = time.perf_counter()
    print("$", " ".join(args), flush=True)
    recnec = Path(sys.executable).with_name("recnec")  # the virtualenv's entry point
    subprocess.run([str(recnec), *args], check=True, cwd=REPO)
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


def _ci(m: dict, k: str) -> str:
    lo, hi = (m.get("ci95") or {}).get(k, (float("nan"), float("nan")))
    return f"{m[k]:.2f} ({lo:.2f}-{hi:.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("paper_table"))
    ap.add_argument("--archs", nargs="+", default=list(WIDTHS))
    ap.add_argument("--fresh-seed", type=int, default=4242)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--reuse-shipped", action="store_true",
                    help="use weights/ as the resnet10 w16 ensemble (trained by the same recipe)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the archs trained here")
    args = ap.parse_args()
    out = args.out.resolve()
    n = "40" if args.quick else "234"
    train_c, fresh_c = out / "cohort-seed0", out / f"fresh-seed{args.fresh_seed}"
    cal_c = out / "calibration-seed2"
    if not (train_c / "labels.csv").exists():
        _run(["synth", str(train_c), "--space", "model", "--n", n, "--seed", "0"])
    if not (cal_c / "labels.csv").exists():
        _run(["synth", str(cal_c), "--space", "model", "--n", n, "--seed", "2"])
    if not (fresh_c / "labels.csv").exists():
        _run(["synth", str(fresh_c), "--space", "model", "--n", n, "--seed", str(args.fresh_seed)])
    rows = []
    for arch in args.archs:
        w = out / f"weights-{arch}"
        if not (w / "manifest.json").exists() and arch == "resnet10" and args.reuse_shipped and not args.quick:
            shipped = json.loads((REPO / "weights" / "manifest.json").read_text())
            cfg = shipped["training"]["config"]
            assert (cfg["arch"], cfg["width"], cfg["seed"], cfg["threads"]) == ("resnet10", 16, 0, 1), cfg
            shutil.copytree(REPO / "weights", w)
            print(f"resnet10 w16: the shipped weights ({shipped['model_version']}), not trained again")
        if not (w / "manifest.json").exists():
            threads = "1" if arch == "resnet10" else str(args.threads)
            extra = ["--quick"] if args.quick else ["--width", str(WIDTHS[arch]), "--threads", threads]
            _run(["train", str(train_c), "--out", str(w), "--arch", arch, "--calibration-data", str(cal_c), *extra])
        ev = out / f"fresh-{arch}.json"
        if not ev.exists():
            _run(["evaluate", str(fresh_c), "--weights", str(w), "--out", str(ev), "-q"])
        man = json.loads((w / "manifest.json").read_text())
        cv = man["metrics"]["cross_validated"]
        fr = json.loads(ev.read_text())
        rows.append((arch, cv, fr, man.get("cost", {})))
    print("\n| architecture | source | sensitivity | specificity | accuracy | AUC | ECE |")
    print("|---|---|---|---|---|---|---|")
    for arch, cv, fr, _ in rows:
        name = f"{arch} quick (2 folds, 2 epochs, w4, n=40)" if args.quick else f"{arch} w{WIDTHS[arch]}"
        if arch in PAPER:
            s, sp, acc, auc = PAPER[arch]
            print(f"| {arch} | paper (n=234, real patients) | {s:.2f} | {sp:.2f} | {acc:.2f} | {auc:.2f} | - |")
        print(f"| {name} | ours, cross-validated (synthetic) | {_ci(cv, 'sensitivity')} | "
              f"{_ci(cv, 'specificity')} | {_ci(cv, 'accuracy')} | {_ci(cv, 'auc')} | - |")
        cal = fr.get("calibration") or {}
        ece, raw = cal.get("ece", float("nan")), (cal.get("raw") or {}).get("ece")
        ece_txt = f"{ece:.3f}" if raw is None else f"{ece:.3f} (raw {raw:.3f})"
        print(f"| {name} | ours, fresh cohort seed {args.fresh_seed} (synthetic) | "
              f"{_ci(fr, 'sensitivity')} | {_ci(fr, 'specificity')} | {_ci(fr, 'accuracy')} | {_ci(fr, 'auc')} | "
              f"{ece_txt} |")
    print(f"\nTraining cohort: synthetic seed 0, n={n}; fresh cohort: seed {args.fresh_seed}, n={n} (same 192:42 mix"
          f"{'' if not args.quick else ', scaled to n=40'}); 95 % CIs: bootstrap over studies (2,000 resamples);")
    print("ECE: 10 equal-width bins, of the calibrated probability (Platt map fitted on each ensemble's scores "
          "on the calibration cohort, seed 2), the raw ensemble mean in brackets.")
    print("Ours are on a SYNTHETIC cohort (real MNI152 anatomy, simulated lesions): not clinical figures.")


if __name__ == "__main__":
    main()
