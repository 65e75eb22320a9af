"""Per-stage seconds and peak memory of a scan: the real TCGA study and 10 synthetic studies.

Runs :func:`recnec_cli.orchestration.scan.scan` in one process (``workers=0``, so every stage runs
here and can be measured) with ``--threads`` threads over the real TCGA-FG-6692 NIfTI study from
``$RECNEC_SHARED_DATA`` (default ``../shared/data``) and ``--n`` synthetic DICOM studies from
``recnec synth``. Around every stage the pipeline times (its ``_timed`` context), the process's peak
resident memory is reset (``/proc/self/clear_refs`` ``5``) and read back (``VmHWM``), so each
stage's figure is the peak RSS of the process while that stage ran (models already loaded count
too: HD-BET's ONNX session and the ensemble live in the process). Prints, per stage: median
(min-max) seconds and peak MB over the synthetic studies, and the TCGA figures.

    python benchmarks/bench_stages.py [--n 10] [--threads 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _hwm_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration import pipeline
    from recnec_cli.orchestration.scan import scan
    from recnec_cli.synth import write_cohort

    peaks: dict[str, list[float]] = {}
    current: list[str] = []
    def timed(step):  # wraps one pipeline step: peak memory per stage
        def run(ctx):
            _reset_hwm()
            step.run(ctx)
            peaks.setdefault(step.stage, []).append(_hwm_mb())
            current.append(step.stage)
        return dataclasses.replace(step, run=run)

    pipeline.STEPS = tuple(timed(st) for st in pipeline.STEPS)  # in-process scan (workers 0) runs these
    shared = Path(os.environ.get("RECNEC_SHARED_DATA", REPO.parent / "shared" / "data"))
    tcga = shared / "real" / "nifti_tcga_fg_6692_lgg_siemens"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        settings = resolve_settings({"workers": 0, "threads": args.threads, "settle_minutes": 0,
                                     "pseudonym_key_file": tmp / "key", "state_file": None})
        results = {}
        for name, root in (("TCGA-FG-6692", tcga if tcga.is_dir() else None), ("synthetic", None)):
            if name == "synthetic":
                write_cohort(tmp / "syn", n=args.n, seed=41, fmt="dicom")
                root = tmp / "syn" / "dicom"
            if root is None:
                print(f"{name}: absent, skipped")
                continue
            peaks.clear()
            t0 = time.perf_counter()
            summary = scan(root, out=tmp / f"{name}.csv", settings=settings, handle_signals=False)
            wall = time.perf_counter() - t0
            results[name] = (summary, dict(peaks), wall)
        stages = list(pipeline.STAGES)
        for name, (summary, pk, wall) in results.items():
            rows = [r for r in summary.rows if r.get("status") == "OK"]
            print(f"\n{name}: {len(summary.rows)} studies ({len(rows)} OK), whole scan {wall:.1f} s "
                  f"(models loaded once, included)")
            print(f"{'stage':<12} {'seconds median (min-max)':>26} {'peak RSS MB median (max)':>26}")
            for st in stages + ["total"]:
                secs = [float(r[f"seconds_{st}"]) for r in rows if r.get(f"seconds_{st}") not in (None, "")]
                mem = pk.get(st, [])
                s_txt = f"{statistics.median(secs):.2f} ({min(secs):.2f}-{max(secs):.2f})" if secs else "-"
                m_txt = f"{statistics.median(mem):.0f} ({max(mem):.0f})" if mem else "-"
                print(f"{st:<12} {s_txt:>26} {m_txt:>26}")


if __name__ == "__main__":
    main()
