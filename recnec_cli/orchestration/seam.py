"""The execution seam: what a scan needs from the place where studies are preprocessed.

:class:`StudyExecutor` is the contract; three classes implement it and
:func:`recnec_cli.orchestration.executors.make_executor` builds the right one from the settings:

* :class:`~recnec_cli.orchestration.executors.InProcessExecutor`: this process (``--workers 0``);
* :class:`~recnec_cli.orchestration.workers.WorkerPool`: local worker processes (the default);
* :class:`~recnec_cli.orchestration.cluster.DaskExecutor`: a Dask cluster (``--scheduler``).

A task that does not return becomes a study's error row through :func:`failure_of`.
"""

from __future__ import annotations

import concurrent.futures as cf
from typing import Any, Callable, Protocol, runtime_checkable

from ..config import Settings


@runtime_checkable
class StudyExecutor(Protocol):
    """Where studies are preprocessed (and, for a cluster's GPU workers, inferred).

    ``submit`` has :meth:`concurrent.futures.Executor.submit`'s shape and returns a
    :class:`concurrent.futures.Future`; the tasks a scan submits are module-level and picklable
    (:mod:`recnec_cli.orchestration.execution`).
    """

    #: True when inference batches run through :meth:`submit` too (a cluster's GPU workers);
    #: False: the ensemble runs in the scan's own process
    remote_inference: bool

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Run ``fn(*args, **kwargs)`` where studies run."""
        ...

    def slots(self) -> int:
        """How many studies may be in flight at once now (>= 1; a cluster's workers come and go,
        so the scan asks again as studies finish)."""
        ...

    def self_test(self, settings: Settings, *, model_version: str | None = None) -> str:
        """Load and check the models where studies run, before the first study (``model_version``:
        also check that the ensemble there is the scan's, for :attr:`remote_inference`).
        Returns where HD-BET runs (an ONNX Runtime provider name or ``torch-cpu`` / ``torch-cuda``).

        Raises :class:`~recnec_cli.errors.EnvironmentBroken` naming what failed."""
        ...

    def description(self) -> dict[str, Any]:
        """Where the scan ran, for the log and the manifest (``executor`` and its details)."""
        ...

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Release the workers; with ``cancel_futures`` (or not ``wait``) stop what still runs."""
        ...


class WorkerLost(RuntimeError):
    """An executor lost the worker running a task, also on the retries it allows (Dask's
    ``KilledWorker``): the study's ``WORKER_DIED`` row (:func:`failure_of`)."""


def failure_of(exc: BaseException, timeout_s: float | None) -> tuple[str, str]:
    """``(error code, message)`` of a task that did not return: ``TIMEOUT``, ``OUT_OF_MEMORY`` or
    ``WORKER_DIED`` (a local worker process died, or a cluster lost the study's worker on every
    try it allows: :class:`WorkerLost`); ``INTERNAL_ERROR`` for anything else (type name only)."""
    from pebble import ProcessExpired

    if isinstance(exc, WorkerLost):
        return "WORKER_DIED", str(exc)
    if isinstance(exc, cf.TimeoutError):
        return "TIMEOUT", f"the study ran longer than the --study-timeout of {timeout_s:g} s and was stopped"
    if isinstance(exc, ProcessExpired):
        if exc.exitcode in (-9, 137):
            return "OUT_OF_MEMORY", ("the worker was killed (SIGKILL: usually the kernel's out-of-memory killer) "
                                     "while processing this study")
        return "WORKER_DIED", f"the worker process died while processing this study (exit code {exc.exitcode})"
    if isinstance(exc, MemoryError):
        return "OUT_OF_MEMORY", "study needed more memory than the --max-memory limit"
    return "INTERNAL_ERROR", f"unexpected {type(exc).__name__} in the executor; rerun with -v for details in the log"
