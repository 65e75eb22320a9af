"""The ensemble through ONNX Runtime vs PyTorch eager: throughput at batch 1, 8, 32, max |difference|.

The shipped weights hold ONNX files only, so this script builds the shipped architecture
(``manifest.json``: ResNet10, width 16, 5 folds, input ``(N, 3, 40, 40, 40)``) with seeded random
weights, exports each fold with recnec's own exporter (:func:`recnec_cli.train.export.export_onnx`,
legacy TorchScript, opset 17) and runs the same inputs through both, with the same thread count
(torch with subnormals flushed, ONNX Runtime with ``session.set_denormal_as_zero``). The weight
values do not change the cost of a convolution, so the throughput ratio carries over to the shipped
files. Prints, per batch size: studies per second of each (median of ``--repeats``), the ratio
ORT / torch, and the max absolute difference of the probabilities.

    python benchmarks/bench_ensemble_ort.py [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    import numpy as np
    import onnxruntime as ort
    import torch

    from recnec_cli.devices import prepare_torch
    from recnec_cli.train.export import export_onnx
    from recnec_cli.train.models import ProbabilityHead, build_model

    prepare_torch(args.threads)
    manifest = json.loads((REPO / "weights" / "manifest.json").read_text())
    cfg = manifest["training"]["config"]
    shape = tuple(manifest["input"]["shape"])
    folds = len(manifest["models"])
    torch.manual_seed(0)
    models = [ProbabilityHead(build_model(cfg["arch"], width=cfg["width"])).eval() for _ in range(folds)]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads, so.log_severity_level = args.threads, 1, 3
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for k, m in enumerate(models):
            path = Path(tmp) / f"fold{k}.onnx"
            export_onnx(m, path, shape=shape)
            sessions.append(ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"]))
    rng = np.random.default_rng(0)
    print(f"{cfg['arch']} width {cfg['width']}, {folds} folds, input {shape}, {args.threads} threads")
    print(f"{'batch':>5} {'torch studies/s':>22} {'ORT studies/s':>22} {'ratio':>6} {'max |diff|':>11}")
    for batch in (1, 8, 32):
        x = np.clip(rng.standard_normal((batch, *shape), dtype=np.float32), -5, 5)
        xt = torch.from_numpy(x)
        tt, to = [], []
        with torch.no_grad():
            p_t = np.mean([m(xt).numpy() for m in models], axis=0)  # warm-up and reference
        p_o = np.mean([s.run(None, {s.get_inputs()[0].name: x})[0] for s in sessions], axis=0)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                for m in models:
                    m(xt)
            tt.append(batch / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            for s in sessions:
                s.run(None, {s.get_inputs()[0].name: x})
            to.append(batch / (time.perf_counter() - t0))
        mt, mo = statistics.median(tt), statistics.median(to)
        print(f"{batch:>5} {mt:>8.1f} ({min(tt):.1f}-{max(tt):.1f}) {mo:>8.1f} ({min(to):.1f}-{max(to):.1f})"
              f" {mo / mt:>6.2f} {float(np.abs(p_t - p_o).max()):>11.2e}", flush=True)


if __name__ == "__main__":
    main()
