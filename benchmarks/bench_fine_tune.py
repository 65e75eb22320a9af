"""Fine-tuning the shipped ensemble on a small cohort versus training from scratch (issue 12).

The README's worked example is a group with 60 labelled patients. This script makes such a
cohort synthetically and compares, on one fresh cohort never used by either:

1. ``recnec synth --space model`` cohort ``--seed`` (default 60), n=60, 45 recurrence / 15 necrosis;
2. ``recnec train`` from scratch (default recipe, lr 3e-4) and ``recnec train --init-from
   weights/`` (same folds and recipe, each fold starting from a shipped model, lr 1e-4);
3. ``recnec evaluate`` of both, and of the shipped ensemble itself, on the fresh cohort
   ``--fresh-seed`` (default 4242, n=234, 192:42).

Read the result for what it is: the 60 come from the same generator as the shipped weights'
training cohort, so the shipped start already knows this task; the script measures that
fine-tuning keeps (or loses) what the start knows and what 60 patients alone give, not how
the shipped weights would transfer to real patients. All cohorts are SYNTHETIC.

    OMP_NUM_THREADS=1 python benchmarks/bench_fine_tune.py [--out fine_tune/] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    print("$ recnec", " ".join(args), flush=True)
    recnec = Path(sys.executable).with_name("recnec")  # the virtualenv's entry point
    subprocess.run([str(recnec), *args], check=True, cwd=REPO)
    secs = time.perf_counter() - t0
    print(f"  ({secs:.0f} s)", flush=True)
    return secs


def _ci(m: dict, k: str) -> str:
    lo, hi = m["ci95"][k]
    return f"{m[k]:.3f} ({lo:.3f}-{hi:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("fine_tune"))
    ap.add_argument("--seed", type=int, default=60, help="seed of the 60-patient cohort")
    ap.add_argument("--fresh-seed", type=int, default=4242)
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--ratio", default="3:1")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    site, fresh = out / f"site-seed{a.seed}", out / f"fresh-seed{a.fresh_seed}"
    if not (site / "labels.csv").is_file():
        _run(["synth", str(site), "--space", "model", "--n", str(a.n), "--seed", str(a.seed),
              "--ratio", a.ratio, "-q"])
    if not (fresh / "labels.csv").is_file():
        _run(["synth", str(fresh), "--space", "model", "--n", "234", "--seed", str(a.fresh_seed), "-q"])
    rows = []
    for name, extra in (("from scratch", []), ("--init-from weights/", ["--init-from", str(REPO / "weights")])):
        w = out / ("scratch" if not extra else "fine_tuned")
        secs = _run(["train", str(site), "--out", str(w), "--threads", str(a.threads), "-q", *extra])
        rows.append((name, w, secs))
    rows.append(("shipped (no training on the 60)", REPO / "weights", 0.0))
    print(f"\n60-patient synthetic cohort seed {a.seed} ({a.ratio}); fresh cohort seed {a.fresh_seed}, "
          "n=234 (192:42). SYNTHETIC.\n")
    print("| weights | CV AUC on the 60 (95 % CI) | fresh AUC (95 % CI) | fresh sensitivity | fresh "
          "specificity | fresh ECE (raw) | OUT_OF_DISTRIBUTION on fresh | train s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, secs in rows:
        metrics = out / f"{w.name}-fresh.json"
        _run(["evaluate", str(fresh), "--weights", str(w), "--out", str(metrics), "--threads",
              str(a.threads), "-q"])
        m = json.loads(metrics.read_text())
        man = json.loads((w / "manifest.json").read_text())
        cv = man["metrics"]["cross_validated"]
        cv_txt = _ci(cv, "auc") if w != REPO / "weights" else "-"
        cal = m["calibration"]
        ood = m["applicability"]["n_out_of_distribution"]
        print(f"| {name} | {cv_txt} | {_ci(m, 'auc')} | {m['sensitivity']:.3f} | {m['specificity']:.3f} | "
              f"{cal['ece']:.3f} ({cal['raw']['ece']:.3f}) | {ood} / {len(m['predictions'])} | {secs:.0f} |",
              flush=True)


if __name__ == "__main__":
    main()
