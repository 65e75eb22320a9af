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
* loads its models on its first study and keeps them (:func:`~recnec_cli.orchestration.execution.preprocess_task`);
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
from pathlib import Path
from typing import Any, Callable

from ..config import Settings
from ..devices import set_thread_environment
from ..errors import EnvironmentBroken, RecnecError

log = logging.getLogger(__name__)

#: memory HD-BET fast needs per worker on a 1 mm head (``docs/stack-notes.md``: 3.1 GB peak),
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
    set_thread_environment(threads)
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
        self.workers = int(workers)
        self.threads_per_worker = max(1, int(threads_per_worker))
        self.max_memory_mb = int(max_memory_mb)
        self.timeout = study_timeout_s
        ctx = multiprocessing.get_context("spawn")
        self._log_queue = ctx.Queue()
        self._listener = _LogListener(self._log_queue)
        level = logging.getLogger("recnec_cli").getEffectiveLevel()
        self._pool = ProcessPool(max_workers=self.workers, initializer=_worker_init,
                                 initargs=(max(1, int(threads_per_worker)), int(max_memory_mb), initializer,
                                           self._log_queue, level),
                                 context=ctx)

    #: inference runs in the scan's process, not in the workers
    remote_inference = False

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        return self._pool.schedule(fn, args=args, kwargs=kwargs, timeout=self.timeout)

    def slots(self) -> int:
        """One study per worker process."""
        return self.workers

    def description(self) -> dict[str, Any]:
        return {"executor": "local-processes", "workers": self.workers,
                "threads_per_worker": self.threads_per_worker, "max_memory_mb": self.max_memory_mb,
                "study_timeout_s": self.timeout}

    def self_test(self, settings: Settings, *, model_version: str | None = None) -> str:
        """HD-BET's check in a worker (:func:`~recnec_cli.orchestration.execution.worker_self_test`;
        it also warms that worker). Returns where the worker's HD-BET runs.

        Raises
        ------
        EnvironmentBroken
            The check failed, or no worker could start: the message says why that usually happens
            (a script calling :func:`~recnec_cli.orchestration.scan.scan` without an
            ``if __name__ == "__main__":`` guard, or a ``--max-memory`` too small for torch).
        """
        from .execution import worker_self_test

        try:
            return self._pool.schedule(worker_self_test, args=(settings,),
                                       timeout=WORKER_START_TIMEOUT_S).result()
        except EnvironmentBroken:
            raise
        except RecnecError as exc:  # e.g. WEIGHTS_CHECKSUM_MISMATCH from loading the segmenter: its own code
            raise EnvironmentBroken(f"self-test failed in a worker: {exc.message}", code=exc.code) from None
        except Exception as exc:  # noqa: BLE001 - the worker cannot even start its models
            raise EnvironmentBroken(worker_start_failure(exc, self.max_memory_mb)) from None

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if cancel_futures or not wait:
            self._pool.stop()
        else:
            self._pool.close()
        self._pool.join()
        self._listener.stop()


#: how long the start-up self-test waits for a worker process to start and load HD-BET (seconds)
WORKER_START_TIMEOUT_S = 600.0


def unguarded_main_script() -> str | None:
    """The file name of this process's main script when it is a ``.py`` file with no top-level
    ``if __name__ ...`` test, else ``None``.

    Worker processes start with the ``spawn`` method, which runs the main script again in each new
    process (Python docs, multiprocessing, "Safe importing of main module"): a script that calls
    :func:`~recnec_cli.orchestration.scan.scan` at top level starts a second scan inside every
    worker instead of a worker.
    """
    import ast
    import sys

    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if not path or not str(path).endswith(".py"):
        return None
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    for node in tree.body:  # a top-level `if __name__ == "__main__":` (the guard, not any test of __name__)
        test = node.test if isinstance(node, ast.If) else None
        if (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
                and {ast.unparse(test.left), ast.unparse(test.comparators[0])} == {"__name__", "'__main__'"}):
            return None
    return Path(path).name


def worker_start_failure(exc: BaseException, max_memory_mb: int) -> str:
    """The message of a worker that could not start or load its models (``exc``: what the pool
    raised), with the likely cause first."""
    what = f"self-test failed: a worker process could not start or load HD-BET ({type(exc).__name__})"
    script = unguarded_main_script()
    if script is not None:
        return (f"{what}. Your script {script} calls recnec at top level: worker processes are started with "
                "'spawn', which runs the main script again in each worker. Put the call under "
                "`if __name__ == \"__main__\":` (Python's multiprocessing docs, 'Safe importing of main module'), "
                "or scan in this process with resolve_settings({'workers': 0})")
    return (f"{what}; is --max-memory ({max_memory_mb} MB per worker) too small? torch alone needs about "
            "1.5 GB. The worker's own error is on standard error / in the log")
