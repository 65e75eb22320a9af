"""Study folders versus model space: the same subjects scored both ways (issue 12, "train the way
it is used").

1. ``recnec synth`` cohort ``--seed`` (default 31), ``--n`` subjects at ``--ratio`` (default 1:1),
   twice from the same seed: as NIfTI study folders and as model-space tensors (the same
   subjects: the generator draws each subject from the seed and its index only);
2. ``recnec evaluate`` of the study folders (conversion, registration, HD-BET, automatic lesion,
   model input: the scan's own path; ~35-40 s per study on one core, tensors cached in
   ``--cache``) and of the tensors, with ``--weights`` (default: the shipped ones);
3. prints both AUCs with bootstrap 95 % CIs and the paired gap (study folders - model space) with
   a paired bootstrap 95 % CI (the same resampled subjects on both sides), plus the
   OUT_OF_DISTRIBUTION counts and the largest per-subject differences.

``--jobs 2`` preprocesses the study folders in two processes (one thread each) to fill the cache
first. Rerunning with the same ``--out`` and ``--cache`` reuses everything already computed.

    OMP_NUM_THREADS=1 python benchmarks/bench_study_folder_gap.py --n 100 [--jobs 2] [--out gap/]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RECNEC = Path(sys.executable).with_name("recnec")  # the virtualenv's entry point


def _run(args: list[str], *, wait: bool = True) -> subprocess.Popen | None:
    print("$ recnec", " ".join(args), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen([str(RECNEC), *args], env=env)  # in the caller's folder: paths as typed
    if wait:
        if proc.wait() != 0:
            raise SystemExit(f"recnec {args[0]} failed ({proc.returncode})")
        return None
    return proc


def _labels(path: Path, ids: list[str], labels: dict[str, str]) -> Path:
    path.write_text("study_id,label\n" + "".join(f"{i},{labels[i]}\n" for i in ids), encoding="utf-8")
    return path


def paired_gap(y: np.ndarray, p_a: np.ndarray, p_b: np.ndarray, *, n_boot: int = 2000,
               seed: int = 0) -> tuple[float, float, float]:
    """AUC(p_a) - AUC(p_b) on the same subjects and its paired bootstrap 95 % CI (percentile)."""
    from sklearn.metrics import roc_auc_score

    gap = roc_auc_score(y, p_a) - roc_auc_score(y, p_b)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        boots.append(roc_auc_score(y[idx], p_a[idx]) - roc_auc_score(y[idx], p_b[idx]))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return float(gap), float(lo), float(hi)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("study_folder_gap"))
    ap.add_argument("--cache", type=Path, default=None, help="tensor cache [default: OUT/cache]")
    ap.add_argument("--weights", type=Path, default=REPO / "weights")
    ap.add_argument("--seed", type=int, default=31)
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--ratio", default="1:1")
    ap.add_argument("--jobs", type=int, default=1, help="processes filling the cache")
    ap.add_argument("--studies", type=Path, default=None,
                    help="existing study-folder cohort with labels.csv [default: OUT/studies-seedS]")
    ap.add_argument("--model", type=Path, default=None,
                    help="existing model-space cohort of the same subjects [default: OUT/model-seedS]")
    a = ap.parse_args()
    # paths stay as typed (relative to the folder the script was started in)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    cache = a.cache or out / "cache"
    sf = a.studies or out / f"studies-seed{a.seed}"
    ms = a.model or out / f"model-seed{a.seed}"
    t0 = time.perf_counter()
    if not (sf / "labels.csv").is_file():
        _run(["synth", str(sf), "--n", str(a.n), "--seed", str(a.seed), "--ratio", a.ratio, "-q"])
    if not (ms / "labels.csv").is_file():
        _run(["synth", str(ms), "--space", "model", "--n", str(a.n), "--seed", str(a.seed), "--ratio",
              a.ratio, "-q"])
    rows = [line.split(",") for line in (sf / "labels.csv").read_text().splitlines()[1:]]
    labels = dict(rows)
    ids = [r[0] for r in rows]
    if a.jobs > 1:  # fill the cache in parallel: each process preprocesses its share
        procs = []
        for j in range(a.jobs):
            lab = _labels(out / f"part{j}.csv", ids[j::a.jobs], labels)
            procs.append(_run(["evaluate", str(sf), "--labels", str(lab), "--out", str(out / f"part{j}.json"),
                               "--cache", str(cache), "--weights", str(a.weights), "--threads", "1", "-q"],
                              wait=False))
        if any(p.wait() != 0 for p in procs):
            raise SystemExit("a cache-filling evaluate failed")
    _run(["evaluate", str(sf), "--out", str(out / "studies.json"), "--cache", str(cache), "--weights",
          str(a.weights), "--threads", "1", "-q"])
    _run(["evaluate", str(ms), "--out", str(out / "model.json"), "--weights", str(a.weights), "--threads",
          "1", "-q"])
    m_sf = json.loads((out / "studies.json").read_text())
    m_ms = json.loads((out / "model.json").read_text())
    p_sf = {p["study_id"]: p for p in m_sf["predictions"]}
    p_ms = {p["study_id"]: p for p in m_ms["predictions"]}
    common = [i for i in ids if i in p_sf and i in p_ms]
    y = np.array([labels[i] == "recurrence" for i in common], dtype=int)
    a_sf = np.array([p_sf[i]["probability_raw"] for i in common])
    a_ms = np.array([p_ms[i]["probability_raw"] for i in common])
    gap, lo, hi = paired_gap(y, a_sf, a_ms)
    excluded = m_sf["data"]["excluded"]
    print(f"\nseed {a.seed}, n={a.n} ({a.ratio}); {len(common)} subjects scored both ways "
          f"({len(excluded)} study folders excluded: {[e['code'] for e in excluded]}); "
          f"weights {m_sf['weights']['model_version']}; {time.perf_counter() - t0:.0f} s. SYNTHETIC.\n")
    print("| path | AUC (95 % CI) | sensitivity | specificity | OUT_OF_DISTRIBUTION |")
    print("|---|---|---|---|---|")
    for name, m in (("study folders", m_sf), ("model space", m_ms)):
        lo_, hi_ = m["ci95"]["auc"]
        print(f"| {name} | {m['auc']:.3f} ({lo_:.3f}-{hi_:.3f}) | {m['sensitivity']:.3f} | "
              f"{m['specificity']:.3f} | {m['applicability']['n_out_of_distribution']} / {len(m['predictions'])} |")
    print(f"\npaired gap (study folders - model space), same {len(common)} subjects: {gap:+.3f} "
          f"(95 % CI {lo:+.3f} to {hi:+.3f})")
    d = a_sf - a_ms
    order = np.argsort(-np.abs(d))[:5]
    print("largest |p_study - p_model| (raw): " + ", ".join(
        f"{common[i]} {labels[common[i]]} {a_sf[i]:.3f} vs {a_ms[i]:.3f}" for i in order))
    print(f"median |dp| {np.median(np.abs(d)):.3f}, correlation {np.corrcoef(a_sf, a_ms)[0, 1]:.3f}")


if __name__ == "__main__":
    main()
