"""The tasks every executor of the execution seam runs (a worker process, a Dask worker or this
process alike), with models loaded once per process and kept between tasks.

The executors themselves: :mod:`recnec_cli.orchestration.executors` (in-process, and the factory),
:class:`~recnec_cli.orchestration.workers.WorkerPool` (local worker processes) and
:class:`~recnec_cli.orchestration.cluster.DaskExecutor` (a Dask cluster); their contract:
:class:`~recnec_cli.orchestration.seam.StudyExecutor`.
"""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable, Sequence

from ..config import Settings
from ..errors import EnvironmentBroken
from ..results import StudyResult
from ..study import Study
from .pipeline import Resources, infer_batch, process_study
from .seam import failure_of

#: what to install for ``--scheduler`` / ``--scheduler-file`` (named in the error when it is missing)
EXTRA_HINT = "pip install 'recnec[distributed]'"


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


_WORKER_RESOURCES: dict[Settings, Resources] = {}
_WORKER_ENSEMBLES: dict[tuple, Any] = {}
#: a Dask worker runs tasks in several threads: the models are loaded once all the same
_LOAD_LOCK = threading.Lock()


def share_resources(settings: Settings, resources: Resources) -> None:
    """Make ``resources`` (models already loaded in this process) the ones this process's tasks use
    for ``settings``, instead of loading their own (:func:`forget_resources` undoes it)."""
    with _LOAD_LOCK:
        _WORKER_RESOURCES[settings] = resources


def forget_resources(settings: Settings) -> None:
    """Drop this process's resources for ``settings`` (the next task loads them again)."""
    with _LOAD_LOCK:
        _WORKER_RESOURCES.pop(settings, None)


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
        from ..devices import (
            prepare_torch,  # state; a Dask worker may run tasks in several threads)
        )

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


def infer_remotely(executor: Any, ready: Sequence[StudyResult], *, settings: Settings, model_version: str,
                   timeout_s: float | None) -> list[StudyResult]:
    """Run one inference batch through ``executor`` (:func:`infer_task`); a batch whose task is
    lost or runs past ``timeout_s`` fails every study of it with that code
    (:func:`~recnec_cli.orchestration.seam.failure_of`), stage ``infer``.

    Raises
    ------
    EnvironmentBroken
        As :func:`infer_task`, or the executor lost its cluster.
    """
    try:
        return executor.submit(infer_task, list(ready), settings, model_version).result()
    except EnvironmentBroken:
        raise
    except Exception as exc:  # noqa: BLE001 - this batch fails, the run goes on
        code, msg = failure_of(exc, timeout_s)
        for r in ready:
            r.fail("infer", code, msg)
            r.timings["total"] = sum(v for k, v in r.timings.items() if k != "total")
        return list(ready)
