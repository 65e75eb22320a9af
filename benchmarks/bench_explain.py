"""What ``--explain`` costs per study: occlusion sensitivity through the shipped ONNX ensemble.

Prints, for N model-space tensors of the synthetic generator (``recnec synth --space model``, seed
7, never used for training), the seconds of one plain ensemble prediction and of one occlusion map
(:func:`recnec_cli.qc.explain.occlusion_sensitivity`, default cube 10 voxels / step 5 = 343
ensemble passes), per ONNX Runtime thread count, and their ratio (measured in the same run, so
the ratio holds on any machine; absolute seconds vary 40-50 % between runs on shared cores).

Usage: python benchmarks/bench_explain.py [--studies 3] [--threads 1 0] [--weights weights/]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 0], help="ONNX Runtime threads (0 = its default)")
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[1] / "weights")
    args = ap.parse_args()

    from recnec_cli.qc.explain import occlusion_sensitivity
    from recnec_cli.stages.infer import Ensemble
    from recnec_cli.synth.subject import plan_subject
    from recnec_cli.synth.truth import model_tensor

    xs = [model_tensor(plan_subject(seed=7, index=i))[0] for i in range(args.studies)]
    for threads in args.threads:
        ens = Ensemble.load(args.weights, device="cpu", threads=threads)
        ens.predict(xs[0][None])  # warm-up
        plain, maps = [], []
        for x in xs:
            t0 = time.perf_counter()
            ens.predict(x[None])
            plain.append(time.perf_counter() - t0)
            occ = occlusion_sensitivity(ens, x)
            maps.append(occ.seconds)
        m, p = float(np.median(maps)), float(np.median(plain))
        print(f"threads {threads}: {occ.passes} passes, occlusion map {m:.1f} s per study (median of {len(xs)}), "
              f"plain prediction {p:.3f} s, ratio {m / p:.0f}", flush=True)


if __name__ == "__main__":
    main()
