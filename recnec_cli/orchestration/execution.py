"""The execution seam's in-process side: the default executor and the tasks every executor runs
(a worker process, a Dask worker or this process alike), with models loaded once per process.

Executors: :class:`InProcessExecutor` (here), :class:`~recnec_cli.orchestration.workers.WorkerPool`
(local worker processes) and :class:`~recnec_cli.orchestration.cluster.DaskExecutor` (a Dask
cluster; imported only when a scan is given a scheduler).
"""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
from typing import Any, Callable, Sequence

from ..config import Settings
from ..errors import EnvironmentBroken
from ..study import Study
from .pipeline import Resources, StudyResult, infer_batch, process_study

#: what to install for ``--scheduler`` / ``--scheduler-file`` (named in the error when it is missing)
EXTRA_HINT = "pip install 'recnec[distributed]'"


class WorkerLost(RuntimeError):
    """An executor lost the worker running a task, also on the retries it allows (Dask's
    ``KilledWorker``): the study's ``WORKER_DIED`` row (:func:`~recnec_cli.orchestration.workers.failure_of`)."""


def require_distributed() -> None:
    """Check that Dask's ``distributed`` is installed, without importing it
    (``importlib.util.find_spec``).

    Raises
    ------
    EnvironmentBroken
        ``DISTRIBUTED_MISSING``; the message names the extra to install (:data:`EXTRA_HINT`).
    """
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise EnvironmentBroken(f"--scheduler / --scheduler-file (RECNEC_SCHEDULER / RECNEC_SCHEDULER_FILE) need "
                                f"Dask's distributed package, which is not "
                                f"installed: {EXTRA_HINT}", code="DISTRIBUTED_MISSING")


class InProcessExecutor(cf.Executor):
    """The default execution seam: runs each submitted call at once in this process and returns a
    finished :class:`concurrent.futures.Future` (``max_workers`` 1). A process pool or a
    ``distributed.Client`` can stand in its place: they offer the same ``submit`` shape."""

    _max_workers = 1

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[override]
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a pool would
            fut.set_exception(exc)
        return fut


_WORKER_RESOURCES: dict[Settings, Resources] = {}
_WORKER_ENSEMBLES: dict[tuple, Any] = {}
#: a Dask worker runs tasks in several threads: the models are loaded once all the same
_LOAD_LOCK = threading.Lock()


def _resources(settings: Settings) -> Resources:
    """This process's :class:`Resources` for ``settings`` (rules, HD-BET), loaded on first use."""
    res = _WORKER_RESOURCES.get(settings)
    if res is None:
        with _LOAD_LOCK:
            res = _WORKER_RESOURCES.get(settings)
            if res is None:
                res = _WORKER_RESOURCES[settings] = Resources.load(settings, need_model=False)
    return res


def worker_ensemble(settings: Settings) -> Any:
    """This process's ONNX ensemble from ``settings.weights_dir`` (SHA-256 checked against its
    manifest), loaded on first use and kept.

    Raises
    ------
    EnvironmentBroken, InferenceError
        As :meth:`recnec_cli.stages.infer.Ensemble.load`.
    """
    from ..stages.infer import Ensemble

    key = (str(settings.weights_dir), settings.device, settings.threads)
    ens = _WORKER_ENSEMBLES.get(key)
    if ens is None:
        with _LOAD_LOCK:
            ens = _WORKER_ENSEMBLES.get(key)
            if ens is None:
                ens = _WORKER_ENSEMBLES[key] = Ensemble.load(settings.weights_dir, device=settings.device,
                                                             threads=settings.threads)
    return ens


def worker_initializer(*hooks: Callable[[], None]) -> None:
    """Runs once in each worker process: SIGINT is left to the parent (which stops taking studies
    and lets the running ones finish), so Ctrl-C in a terminal does not kill studies mid-way;
    then the caller's ``worker_hooks`` (picklable, module-level callables) run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for hook in hooks:
        hook()


def worker_self_test(settings: Settings) -> str:
    """The HD-BET part of :func:`self_test`, run inside a worker (loads and keeps its models).
    Returns where the worker's HD-BET runs (:attr:`HdBet.provider`, e.g. ``CPUExecutionProvider``).

    Raises
    ------
    EnvironmentBroken
        As :func:`self_test`.
    """
    res = _resources(settings)
    try:
        res.hdbet.check_networks()
    except Exception as exc:  # noqa: BLE001
        raise EnvironmentBroken(f"self-test failed: HD-BET in a worker ({type(exc).__name__}: {exc})") from None
    return str(getattr(res.hdbet, "provider", "unknown"))


def preprocess_task(study: Study, settings: Settings, qc_name: str | None = None) -> StudyResult:
    """One study's preprocessing as an executor task (top-level, picklable): the worker's
    :class:`Resources` (rules, HD-BET networks) are loaded on its first task and kept for the next.
    With ``settings.qc_dir`` the worker also writes the study picture ``<qc_name>.png`` there
    (the volumes stay in the worker; only file names come back).

    Raises
    ------
    EnvironmentBroken
        The worker's installation cannot run any study.
    """
    res = _resources(settings)
    if res.hdbet is not None:  # torch is loaded: flush subnormals in *this* thread too (per-thread
        from ..devices import prepare_torch  # state; a Dask worker may run tasks in several threads)

        prepare_torch(settings.threads)
    return process_study(study, settings=settings, resources=res, qc_name=qc_name)


def infer_task(ready: Sequence[StudyResult], settings: Settings, model_version: str) -> list[StudyResult]:
    """One inference batch as an executor task (a GPU worker of a cluster): :func:`infer_batch`
    with this process's ensemble (:func:`worker_ensemble`); returns the results, filled in.

    Raises
    ------
    EnvironmentBroken
        ``WEIGHTS_DIFFER``: this process's ensemble is not ``model_version`` (the client's).
    """
    ens = worker_ensemble(settings)
    if ens.model_version != model_version:
        raise EnvironmentBroken(f"a worker's ensemble ({ens.model_version}) is not the client's ({model_version}): "
                                "the workers must read the client's weights folder", code="WEIGHTS_DIFFER")
    ready = list(ready)
    infer_batch(ready, ensemble=ens)
    return ready


def infer_remotely(executor: cf.Executor, ready: Sequence[StudyResult], *, settings: Settings, model_version: str,
                   timeout_s: float | None) -> list[StudyResult]:
    """Run one inference batch through ``executor`` (:func:`infer_task`); a batch whose task is
    lost or runs past ``timeout_s`` fails every study of it with that code
    (:func:`~recnec_cli.orchestration.workers.failure_of`), stage ``infer``.

    Raises
    ------
    EnvironmentBroken
        As :func:`infer_task`, or the executor lost its cluster.
    """
    from .workers import failure_of

    try:
        return executor.submit(infer_task, list(ready), settings, model_version).result()
    except EnvironmentBroken:
        raise
    except Exception as exc:  # noqa: BLE001 - this batch fails, the run goes on
        code, msg = failure_of(exc, timeout_s)
        for r in ready:
            r.status, r.error_code, r.error_message, r.failed_stage = code, code, msg, "infer"
            r.timings["total"] = sum(v for k, v in r.timings.items() if k != "total")
        return list(ready)
