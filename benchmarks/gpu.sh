#!/usr/bin/env bash
# GPU check and throughput: one command, a few minutes, on a machine with an NVIDIA GPU.
#
#   bash benchmarks/gpu.sh [N_STUDIES]        (default 40)
#
# Needs recnec installed with the gpu extra in .venv (onnxruntime-gpu, CUDA 12/13 + cuDNN 9; torch
# may be the CPU build: HD-BET runs in ONNX Runtime, torch only exports it once):
#   python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 && .venv/bin/pip install -e '.[gpu,train]'
# Prints: whether ONNX Runtime offers and really uses the CUDA provider (ensemble and HD-BET), the
# model stage in studies per minute (the ensemble alone at batch 32), end to end studies per minute
# for a scan of N synthetic NIfTI studies with --device cuda, and peak GPU memory (nvidia-smi,
# sampled every 0.2 s). Goal on one modern GPU: >= 20 studies per minute end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-40}
PY=${PY:-.venv/bin/python}
TMP=$(mktemp -d)
trap 'kill ${SMI_PID:-0} 2>/dev/null || true; rm -rf "$TMP"' EXIT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY - <<'PY'
import onnxruntime as ort, sys
prov = ort.get_available_providers()
print("onnxruntime", ort.__version__, "providers", prov)
if "CUDAExecutionProvider" not in prov:
    sys.exit("onnxruntime offers no CUDA provider: install recnec[gpu] (onnxruntime-gpu) instead of recnec[cpu]")
PY
# model stage alone: the shipped ensemble on the GPU at batch 32
$PY - <<'PY'
import time, numpy as np
from recnec_cli.config import Settings
from recnec_cli.stages.infer import Ensemble
ens = Ensemble.load(Settings().weights_dir, device="cuda")
assert ens.provider == "CUDAExecutionProvider", ens.provider
x = np.random.default_rng(0).standard_normal((256, *ens.spec.shape), dtype=np.float32)
ens.predict(x[:32], batch_size=32)  # warm-up (cuDNN autotuning)
t0 = time.perf_counter(); ens.predict(x, batch_size=32); dt = time.perf_counter() - t0
print(f"model stage: ensemble of {ens.n_models} on {ens.provider}: {60 * len(x) / dt:.0f} studies/min (batch 32)")
PY
$PY -m recnec_cli.cli.main synth "$TMP/syn" --n "$N" --format nifti >/dev/null
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >> "$TMP/mem.txt"; sleep 0.2; done ) &
SMI_PID=$!
t0=$(date +%s.%N)
$PY -m recnec_cli.cli.main scan "$TMP/syn" --out "$TMP/report.csv" --device cuda --settle-minutes 0 \
    --batch-size 32 --quiet || true
t1=$(date +%s.%N)
kill $SMI_PID 2>/dev/null || true
$PY - "$TMP" "$N" "$t0" "$t1" <<'PY'
import csv, json, sys
tmp, n, t0, t1 = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
rows = list(csv.DictReader(open(f"{tmp}/report.csv")))
ok = sum(r["status"] == "OK" for r in rows)
man = json.load(open(f"{tmp}/report.manifest.json")) if __import__("os").path.exists(f"{tmp}/report.manifest.json") else {}
mem = [int(x) for x in open(f"{tmp}/mem.txt").read().split() if x.strip().isdigit()]
print(f"end to end: {len(rows)} studies ({ok} OK) in {t1 - t0:.1f} s = {60 * len(rows) / (t1 - t0):.1f} studies/min (goal >= 20)")
print("ensemble provider:", man.get("execution_provider"))
print("HD-BET provider:", man.get("hdbet_provider"))
print(f"peak GPU memory: {max(mem) if mem else 'n/a'} MiB")
PY
