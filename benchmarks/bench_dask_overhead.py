"""What a Dask cluster costs per study: the local worker pool vs a 2-worker ``LocalCluster``.

The same cohort is scanned through :func:`recnec_cli.orchestration.scan.scan` with the local
:class:`~recnec_cli.orchestration.workers.WorkerPool` (2 spawned processes, 1 thread each) and with
:class:`~recnec_cli.orchestration.cluster.DaskExecutor` on a ``LocalCluster`` of 2 worker processes
with 1 thread each (``processes=True``). Both executors are started and warmed first (every worker
has imported the stages and loaded its models), so the figures compare the steady state, and they
scan in alternating order for ``--rounds`` rounds. For each scan it prints

* throughput: studies per hour between the first hand-over and the last finished study;
* the study's cost: the mean of the per-stage seconds the worker measured (convert ... model input);
* the executor's overhead per study: the round trip seen by the scan (hand-over -> result back)
  minus that cost (pickling, transport, queueing, unpickling);

then the medians, and the scheduler's overhead per study: Dask's overhead minus the pool's, in
seconds and as a percentage of the study's cost (goal: under 2 %).

    python benchmarks/bench_dask_overhead.py --quick             # phantoms, HD-BET stand-in: 3-5 min on 2 cores
    python benchmarks/bench_dask_overhead.py --studies 6         # synthetic heads, real HD-BET

``--quick`` scans small phantom heads (``tests/phantoms.py``) with the phantom's stand-in for HD-BET
(a study then costs a few seconds, so the percentage is a pessimistic bound); without it, the
cohort is ``recnec synth`` heads (study space, NIfTI, true lesion masks in the study folders) through
real HD-BET fast on the CPU, the realistic study cost (about 35-90 s per study on 2 cores; plan on
``studies x 1 min`` per executor and round plus model loading; ``--rounds 2`` or more for a
median). Needs the ``distributed`` extra. Run it on an otherwise idle machine; the two executors
are measured in the same run, so their ratio counts.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))  # phantoms (quick mode); spawned workers inherit sys.path


class Timed(cf.Executor):
    """Wraps an executor and records, per task, when it was handed over and when its result came back."""

    def __init__(self, inner: cf.Executor) -> None:
        self.inner = inner
        self.records: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:  # slots(), remote_inference, self_test() ... (the seam)
        return getattr(self.inner, name)

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        rec = {"fn": getattr(fn, "__name__", str(fn)), "t0": time.perf_counter()}
        fut = self.inner.submit(fn, *args, **kwargs)
        fut.add_done_callback(lambda f: rec.update(t1=time.perf_counter(), fut=f))
        self.records.append(rec)
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self.inner.shutdown(wait=wait, cancel_futures=cancel_futures)


def _study_cost(result: Any) -> float:
    """Seconds the worker spent in the stages of one preprocessed study."""
    return sum(v for k, v in result.timings.items() if k not in ("total", "infer"))


def _figures(name: str, timed: Timed) -> dict[str, float]:
    recs = [r for r in timed.records if r["fn"] == "preprocess_task" and "fut" in r and r["fut"].exception() is None]
    cost = [_study_cost(r["fut"].result()) for r in recs]
    overhead = [r["t1"] - r["t0"] - c for r, c in zip(recs, cost)]
    wall = max(r["t1"] for r in recs) - min(r["t0"] for r in recs)
    out = {"n": len(recs), "wall_s": wall, "per_hour": 3600 * len(recs) / wall, "cost_s": statistics.mean(cost),
           "overhead_s": statistics.mean(overhead), "overhead_median_s": statistics.median(overhead)}
    print(f"{name:<28} {out['n']:3d} studies in {wall:7.1f} s = {out['per_hour']:7.0f} studies/h; "
          f"study cost {out['cost_s']:6.2f} s, executor overhead per study {out['overhead_s'] * 1000:7.1f} ms "
          f"(median {out['overhead_median_s'] * 1000:.1f} ms)", flush=True)
    return out


def _warm(settings: Any) -> bool:
    """A warm-up task: load the worker's models, then wait a little so that the other worker
    gets the other warm-up task."""
    from recnec_cli.orchestration.execution import worker_self_test

    worker_self_test(settings)
    time.sleep(2.0)
    return True


def _cohort(root: Path, n: int, quick: bool) -> Path:
    studies = root / "studies"
    if quick:
        import phantoms

        for i in range(n):
            phantoms.write_phantom_study(studies, f"sub-{i:02d}", lesion_ras_mm=(30.0 - 6 * i, 5.0, 0.0), seed=i)
    else:
        from recnec_cli.synth import write_cohort

        write_cohort(studies, n=n, seed=0, fmt="nifti", space="study", masks_in_study=True)
    old = time.time() - 3600
    for p in studies.rglob("*"):
        os.utime(p, (old, old))
    return studies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="phantoms with the HD-BET stand-in (tests/phantoms.py)")
    ap.add_argument("--studies", type=int, default=None, help="cohort size [quick: 12, real: 6]")
    ap.add_argument("--rounds", type=int, default=None, help="scans per executor, alternating [quick: 3, real: 1]")
    args = ap.parse_args()
    n = args.studies or (12 if args.quick else 6)
    args.rounds = max(1, args.rounds or (3 if args.quick else 1))

    import distributed

    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.cluster import DaskExecutor
    from recnec_cli.orchestration.execution import worker_initializer
    from recnec_cli.orchestration.scan import scan
    from recnec_cli.orchestration.workers import WorkerPool

    hooks = []
    if args.quick:
        import phantoms

        hooks = [phantoms.hook_fake_hdbet]
    with tempfile.TemporaryDirectory(prefix="bench_dask_") as tmp:
        tmp_path = Path(tmp)
        os.environ["RECNEC_PSEUDONYM_KEY_FILE"] = str(tmp_path / "pseudonym.key")
        t0 = time.perf_counter()
        studies = _cohort(tmp_path, n, args.quick)
        print(f"cohort: {n} {'phantom' if args.quick else 'synthetic (recnec synth)'} studies written in "
              f"{time.perf_counter() - t0:.0f} s; HD-BET: {'stand-in' if args.quick else 'real, fast, CPU'}",
              flush=True)
        overrides = {"threads": 1, "settle_minutes": 0, "study_timeout_s": 0, "workers": 2}
        if args.quick:
            overrides["grid_spacing_mm"] = 2.0
        settings = resolve_settings(overrides)
        logging.basicConfig(level=logging.WARNING)

        # both executors are started and warmed once, then scanned in alternating order (pool
        # first in odd rounds, Dask first in even ones) so that a drift in the machine's load
        # shows in the spread of the rounds, not as a difference between the executors
        pool = WorkerPool(2, threads_per_worker=1, initializer=functools.partial(worker_initializer, *hooks))
        for f in [pool.submit(_warm, settings) for _ in range(2)]:
            f.result()
        cluster = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           dashboard_address=None, silence_logs=logging.ERROR)
        client = distributed.Client(cluster, set_as_default=False)
        dask_ex = DaskExecutor(client, worker_hooks=hooks, threads=settings.threads)  # as connect() does
        dask_ex.self_test(settings)  # every worker loads its models
        executors = {"local pool (2 processes)": pool, "Dask LocalCluster (2 x 1)": dask_ex}
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in executors}
        try:
            for rnd in range(args.rounds):
                order = list(executors) if rnd % 2 == 0 else list(executors)[::-1]
                for name in order:
                    timed = Timed(executors[name])
                    scan(studies, out=tmp_path / f"r{rnd}-{'pool' if 'pool' in name else 'dask'}.csv",
                         settings=settings, executor=timed, handle_signals=False, run_self_test=False)
                    figures[name].append(_figures(f"round {rnd + 1}: {name}", timed))
        finally:
            dask_ex.shutdown()
            client.close()
            cluster.close()
            pool.shutdown()

        med = {name: {k: statistics.median(f[k] for f in runs) for k in runs[0]} for name, runs in figures.items()}
        local, remote = med["local pool (2 processes)"], med["Dask LocalCluster (2 x 1)"]
        print(f"medians over {args.rounds} round(s):")
        for name, m in med.items():
            print(f"  {name:<28} {m['per_hour']:7.0f} studies/h, study cost {m['cost_s']:6.2f} s, executor overhead "
                  f"per study {m['overhead_s'] * 1000:6.1f} ms")
        extra = remote["overhead_s"] - local["overhead_s"]
        print(f"throughput Dask / pool: {remote['per_hour'] / local['per_hour']:.3f}; study cost Dask / pool: "
              f"{remote['cost_s'] / local['cost_s']:.3f}")
        print(f"scheduler overhead per study (Dask minus pool): {extra * 1000:.1f} ms = "
              f"{100 * extra / local['cost_s']:.2f} % of a study's cost ({local['cost_s']:.2f} s); "
              f"Dask's whole round-trip overhead {100 * remote['overhead_s'] / local['cost_s']:.2f} %")


if __name__ == "__main__":
    main()
