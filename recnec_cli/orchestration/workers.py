"""Worker processes for per-study work, with a wall-clock and a memory limit per study.

:class:`WorkerPool` is a :class:`concurrent.futures.Executor` over ``pebble.ProcessPool`` (a
well-kept process pool that can stop a task that runs too long and replaces a worker that died),
started with the ``spawn`` method. It plugs into the execution seam of
:func:`recnec_cli.orchestration.scan.scan`; :class:`~recnec_cli.orchestration.cluster.DaskExecutor`
is the same seam on a Dask cluster.

Each worker:

* sets its thread counts before torch, ONNX Runtime, SimpleITK or BLAS are imported
  (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``
  and ``torch.set_num_threads`` through the run settings): measured here, three HD-BET processes on
  2 cores with default threads took 17 min for a head that takes 20 s alone;
* limits its address space to ``max_memory_mb`` (``resource.RLIMIT_AS``), so an allocation past it
  raises ``MemoryError`` inside the study (an ``OUT_OF_MEMORY`` row) instead of the kernel's OOM
  killer taking the machine's other work with it;
* loads its models on its first study and keeps them (:func:`~recnec_cli.orchestration.scan.preprocess_task`);
* sends the records of recnec's loggers, at the scan's level, through a queue to the scan process
  (``logging.handlers.QueueHandler``, the Python logging cookbook's "logging to a single file from
  multiple processes"), where they go to the run's handlers (terminal and ``<report>.log``) marked
  ``[worker PID]``.

A study that runs past ``study_timeout_s`` is stopped (its worker is terminated and replaced) and
becomes a ``TIMEOUT`` row; a worker that dies (killed by the OOM killer, a crash in a C library)
becomes ``OUT_OF_MEMORY`` when it was killed by SIGKILL, ``WORKER_DIED`` otherwise.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import logging.handlers
import multiprocessing
import os
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

#: memory HD-BET fast needs per worker on a 1 mm head (``../shared/STACK-NOTES.md``: 3.1 GB peak),
#: with headroom for conversion and registration (MB)
MEMORY_PER_WORKER_MB = 4096


def default_workers(cpus: int | None = None, memory_mb: int | None = None) -> int:
    """Workers for this machine: one per core, at most one per :data:`MEMORY_PER_WORKER_MB` of
    physical memory, at least 1."""
    cpus = cpus or os.cpu_count() or 1
    memory_mb = memory_mb or _physical_memory_mb()
    return max(1, min(cpus, memory_mb // MEMORY_PER_WORKER_MB))


def worker_memory_mb(workers: int) -> int:
    """Default address-space limit per worker: 90 % of physical memory shared by ``workers`` (MB)."""
    return max(MEMORY_PER_WORKER_MB // 2, int(_physical_memory_mb() * 0.9) // max(1, workers))


def _physical_memory_mb() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20))
    except (ValueError, OSError, AttributeError):
        return MEMORY_PER_WORKER_MB


def _die_with_parent() -> None:
    """Linux ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the worker is killed when the scan process dies,
    even by SIGKILL, so no orphaned worker keeps a core busy until its study ends."""
    import ctypes
    import signal

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux / no glibc: the pool's own cleanup only
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class _WorkerLogHandler(logging.handlers.QueueHandler):
    """In a worker: recnec's records go to the scan process, their message marked ``[worker PID]``."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        record = super().prepare(record)  # formats msg % args and the traceback into msg
        record.msg = f"[worker {os.getpid()}] {record.msg}"
        return record


def _forward_logs(queue: Any, level: int) -> None:
    logger = logging.getLogger("recnec_cli")
    logger.handlers[:] = [_WorkerLogHandler(queue)]
    logger.setLevel(level)
    logger.propagate = False


class _LogListener:
    """In the scan process: a daemon thread hands each worker record to the logger it was made for
    (``logging.getLogger(record.name).handle``), so the run's handlers and levels apply. A record
    cut off by a killed worker cannot hang the run: the thread is a daemon and :meth:`stop` waits
    at most ``timeout_s``."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self._thread = threading.Thread(target=self._run, name="recnec-worker-logs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                record = self.queue.get()
            except (EOFError, OSError, ValueError):
                return
            except Exception:  # noqa: BLE001 - an unreadable record is dropped, never the run
                continue
            if record is None:
                return
            logging.getLogger(record.name).handle(record)

    def stop(self, timeout_s: float = 5.0) -> None:
        try:
            self.queue.put(None)
        except (OSError, ValueError):
            return
        self._thread.join(timeout_s)


def _worker_init(threads: int, max_memory_mb: int, extra: Callable[[], None] | None,
                 log_queue: Any = None, log_level: int = logging.INFO) -> None:
    """Runs first in every worker process (before any heavy import)."""
    _die_with_parent()
    if log_queue is not None:
        _forward_logs(log_queue, log_level)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[var] = str(threads)
    if max_memory_mb > 0:
        import resource

        limit = int(max_memory_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if extra is not None:
        extra()


class WorkerPool(cf.Executor):
    """Per-study work in ``workers`` spawned processes (see the module docstring).

    Parameters
    ----------
    workers:
        Number of worker processes (>= 1).
    threads_per_worker:
        CPU threads each worker may use (torch, BLAS, ITK); ``cores // workers`` keeps the cores
        from being oversubscribed.
    study_timeout_s:
        Wall-clock limit of one task (one study), seconds; ``None`` = no limit.
    max_memory_mb:
        Address-space limit of each worker, MB; 0 = no limit.
    initializer:
        Optional picklable callable run in each worker after the limits are set (tests install a
        stand-in for HD-BET through it).

    Raises
    ------
    UsageError
        ``workers`` < 1.
    """

    def __init__(self, workers: int, *, threads_per_worker: int = 1, study_timeout_s: float | None = None,
                 max_memory_mb: int = 0, initializer: Callable[[], None] | None = None) -> None:
        from pebble import ProcessPool

        from ..errors import UsageError

        if workers < 1:
            raise UsageError(f"--workers must be >= 1, got {workers}")
        self._max_workers = int(workers)
        self.timeout = study_timeout_s
        ctx = multiprocessing.get_context("spawn")
        self._log_queue = ctx.Queue()
        self._listener = _LogListener(self._log_queue)
        level = logging.getLogger("recnec_cli").getEffectiveLevel()
        self._pool = ProcessPool(max_workers=self._max_workers, initializer=_worker_init,
                                 initargs=(max(1, int(threads_per_worker)), int(max_memory_mb), initializer,
                                           self._log_queue, level),
                                 context=ctx)

    def submit(self, fn, /, *args: Any, **kwargs: Any) -> cf.Future:  # type: ignore[override]
        return self._pool.schedule(fn, args=args, kwargs=kwargs, timeout=self.timeout)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures or not wait:
            self._pool.stop()
        else:
            self._pool.close()
        self._pool.join()
        self._listener.stop()


def failure_of(exc: BaseException, timeout_s: float | None) -> tuple[str, str]:
    """``(error code, message)`` of a task that did not return: TIMEOUT, OUT_OF_MEMORY or WORKER_DIED
    (a local worker process died, or a cluster lost the study's worker on every try it allows:
    :class:`~recnec_cli.orchestration.execution.WorkerLost`)."""
    from pebble import ProcessExpired

    from .execution import WorkerLost

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
