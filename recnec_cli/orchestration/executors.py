"""The executors of the execution seam (:class:`~recnec_cli.orchestration.seam.StudyExecutor`) and
the one factory that builds the right one from the settings (:func:`make_executor`).

* :class:`InProcessExecutor` (here): this process, one study at a time (``--workers 0``; also
  :func:`~recnec_cli.orchestration.pipeline.run_batch`);
* :class:`~recnec_cli.orchestration.workers.WorkerPool`: local worker processes (the default);
* :class:`~recnec_cli.orchestration.cluster.DaskExecutor`: a Dask cluster (``--scheduler`` /
  ``--scheduler-file``; the only path that imports Dask).
"""

from __future__ import annotations

import concurrent.futures as cf
import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from ..config import Settings
from .execution import (
    forget_resources,
    share_resources,
    worker_initializer,
    worker_self_test,
)
from .pipeline import Resources
from .seam import StudyExecutor

log = logging.getLogger(__name__)


class InProcessExecutor(cf.Executor):
    """Runs each submitted call at once in this process and returns a finished
    :class:`concurrent.futures.Future` (one slot).

    The tasks for ``settings`` use ``resources`` (models already loaded in this process: a
    test's stand-ins, say) or, without them, rules and HD-BET loaded here now
    (:meth:`Resources.load`, no ensemble), until :meth:`shutdown`: each executor loads its own, so
    a scan never runs on models another scan loaded.

    Raises
    ------
    EnvironmentBroken
        Loading HD-BET failed (as :meth:`Resources.load`).
    """

    remote_inference = False

    def __init__(self, settings: Settings | None = None, *, resources: Resources | None = None) -> None:
        self._settings = settings
        if settings is not None:
            share_resources(settings, resources or Resources.load(settings, need_model=False))

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a pool would
            fut.set_exception(exc)
        return fut

    def slots(self) -> int:
        return 1

    def self_test(self, settings: Settings, *, model_version: str | None = None) -> str:
        return worker_self_test(settings)

    def description(self) -> dict[str, Any]:
        return {"executor": "in-process"}

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._settings is not None:
            forget_resources(self._settings)
            self._settings = None


@dataclass(frozen=True)
class Execution:
    """What :func:`make_executor` built: the ``executor`` and the ``task_settings`` its tasks get
    (the run's settings with the per-worker thread count)."""

    executor: StudyExecutor
    task_settings: Settings


def make_executor(settings: Settings, *, n_studies: int, worker_hooks: Sequence[Callable[[], None]] = (),
                  log_level: int = logging.INFO) -> Execution:
    """The executor for a scan of ``n_studies`` studies with ``settings``: a Dask cluster when
    ``settings.scheduler`` / ``settings.scheduler_file`` is set, else ``settings.workers`` local
    worker processes (``-1``: :func:`~recnec_cli.orchestration.workers.default_workers`, at most one
    per study; threads ``cores // workers`` unless ``settings.threads``; memory
    :func:`~recnec_cli.orchestration.workers.worker_memory_mb` unless ``settings.max_memory_mb``),
    or this process when ``settings.workers`` is 0. ``worker_hooks`` run once in every worker
    process (picklable, module-level callables). The caller shuts the executor down.

    Raises
    ------
    EnvironmentBroken
        From :meth:`~recnec_cli.orchestration.cluster.DaskExecutor.connect`.
    UsageError
        Bad worker settings.
    """
    s = settings
    if s.uses_cluster:
        from .cluster import DaskExecutor

        if s.sources.get("workers") == "cli" or s.sources.get("max_memory_mb") == "cli":
            log.warning("--workers and --max-memory do not apply to a Dask cluster: its workers are started "
                        "(with their threads and memory limits) by the cluster")
        log.info("connecting to the Dask scheduler %s", s.scheduler or f"in {s.scheduler_file}")
        return Execution(DaskExecutor.connect(s, worker_hooks=worker_hooks, log_level=log_level), s)
    if s.workers == 0:
        return Execution(InProcessExecutor(s), s)
    from .workers import WorkerPool, default_workers, worker_memory_mb

    n = s.workers if s.workers > 0 else default_workers()
    n = max(1, min(n, n_studies))
    per = s.threads if s.threads > 0 else max(1, (os.cpu_count() or 1) // n)
    mem = s.max_memory_mb if s.max_memory_mb > 0 else worker_memory_mb(n)
    log.info("%d worker process(es), %d thread(s) each, %d MB address space each, study timeout %s", n, per,
             mem, f"{s.study_timeout_s:g} s" if s.study_timeout_s > 0 else "none")
    pool = WorkerPool(n, threads_per_worker=per, max_memory_mb=mem,
                      study_timeout_s=s.study_timeout_s if s.study_timeout_s > 0 else None,
                      initializer=functools.partial(worker_initializer, *worker_hooks))
    return Execution(pool, replace(s, threads=per))
