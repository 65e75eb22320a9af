"""The execution seam on a Dask cluster (``recnec scan --scheduler ADDRESS``).

:class:`DaskExecutor` is a :class:`concurrent.futures.Executor` over a ``distributed.Client``: the
second implementation of the seam that :class:`~recnec_cli.orchestration.workers.WorkerPool`
implements on one machine. :func:`~recnec_cli.orchestration.scan.scan` hands it the same tasks
(:func:`~recnec_cli.orchestration.execution.preprocess_task`); nothing else of a scan changes. The
client (the ``recnec scan`` process) alone writes the state, the report and the manifest, so
incremental runs, the state's lock and kill safety hold as on one machine.

What the cluster's workers do and need:

* they read studies (and ``--rules``, ``--lesion-masks``, ``--weights``, ``--keep-intermediate``)
  at the **same absolute paths** as the client: a shared file system. Relative paths are made
  absolute against the client's working folder before a task is shipped (:func:`for_workers`);
* each worker process keeps its models loaded between tasks (the per-process cache of
  :mod:`~recnec_cli.orchestration.execution`) and returns a
  :class:`~recnec_cli.orchestration.pipeline.StudyResult`: report facts and the model input
  (float32 3 x 40^3, 768 kB), never the volumes;
* recnec's log records on the workers reach the client's log (the run's ``<report>.log``),
  prefixed ``[worker ADDRESS]``, through a worker plugin and a Dask event topic (the mechanism of
  ``Client.forward_logging``, https://distributed.dask.org/en/stable/api.html#distributed.Client.forward_logging);
* with ``--dask-resources GPU=1`` tasks (studies and inference batches) only go to workers started
  with ``--resources GPU=1`` (https://distributed.dask.org/en/stable/resources.html); without it,
  studies go to any worker and the ensemble runs in the client, as in a local scan.

Failures:

* a worker lost mid-task (killed, out of memory, node gone) makes the scheduler retry the task on
  another worker, at most ``distributed.scheduler.allowed-failures`` times (Dask's default 3, a
  scheduler setting: https://distributed.dask.org/en/stable/killed.html); after that Dask raises
  ``KilledWorker``, which becomes the study's ``WORKER_DIED`` row (:class:`WorkerLost`);
* a study past ``study_timeout_s`` (counted on the client from the hand-over to the scheduler;
  recnec never hands out more studies than the workers have free slots) becomes a ``TIMEOUT``
  row; its task is cancelled and its worker restarted by its nanny, which stops the study (Python
  cannot stop a running thread). A worker started without a nanny cannot be restarted: its thread
  stays busy until the study returns, and the result is dropped.
* a lost scheduler ends the run (:class:`EnvironmentBroken` ``SCHEDULER_LOST``, exit code 2); the
  finished studies are in the state and the next run does the rest.

This module imports ``distributed`` (the ``recnec[distributed]`` extra); nothing else in recnec
does, and only a scan with ``--scheduler`` / ``--scheduler-file`` imports this module.
"""

from __future__ import annotations

import concurrent.futures as cf
import heapq
import logging
import os
import threading
import time
from dataclasses import fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ..config import Settings, parse_resources
from ..devices import set_thread_environment
from ..errors import EnvironmentBroken, RecnecError
from ..study import Series, Study
from .execution import require_distributed
from .seam import WorkerLost

require_distributed()  # a clear error naming the extra, before the import below fails

from distributed import KilledWorker, WorkerPlugin  # noqa: E402

log = logging.getLogger(__name__)

#: how long connecting to the scheduler may take (``Client(timeout=...)``), seconds
CONNECT_TIMEOUT_S = 30.0
#: how long a scan waits for the first worker to join the scheduler (a batch system may still be
#: starting the workers' jobs), seconds
WAIT_FOR_WORKERS_S = 600.0
#: the cluster's worker slots are looked up at most this often (workers join and leave), seconds
SLOTS_REFRESH_S = 2.0
#: Dask event topic that carries recnec's worker log records to the client
LOG_TOPIC = "recnec-worker-log"
PLUGIN_NAME = "recnec-worker-setup"


# ---------------------------------------------------------------------------------------------
# arguments shipped to other machines
# ---------------------------------------------------------------------------------------------
def _absolute(p: Any) -> Any:
    return Path(p).expanduser().absolute() if isinstance(p, Path) else p


def for_workers(value: Any) -> Any:
    """A task argument as a worker on another machine needs it: the paths in a :class:`Study`
    (series files, sidecars, lesion mask) and in :class:`Settings` made absolute against this
    process's working folder (``Path.absolute``: symbolic links kept, so a shared mount point reads
    the same everywhere). Other values are returned as they are."""
    if isinstance(value, Study):
        series = tuple(replace(s, files=tuple(_absolute(f) for f in s.files), sidecar=_absolute(s.sidecar))
                       for s in value.series)
        return replace(value, series=series, lesion_mask=_absolute(value.lesion_mask))
    if isinstance(value, Series):
        return replace(value, files=tuple(_absolute(f) for f in value.files), sidecar=_absolute(value.sidecar))
    if isinstance(value, Settings):
        changes = {f.name: _absolute(getattr(value, f.name)) for f in fields(value)
                   if isinstance(getattr(value, f.name), Path)}
        return replace(value, **changes)
    if isinstance(value, (list, tuple)) and not is_dataclass(value):
        return type(value)(for_workers(v) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# the worker side: set-up hooks and log forwarding
# ---------------------------------------------------------------------------------------------
class _ForwardToClient(logging.Handler):
    """On a worker: sends each record of the ``recnec_cli`` loggers to the client as a Dask event."""

    def __init__(self, worker: Any, level: int) -> None:
        super().__init__(level)
        self.worker = worker

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = f"[worker {self.worker.address}] {record.getMessage()}"
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self.worker.log_event(LOG_TOPIC, {"name": record.name, "levelno": record.levelno,
                                              "levelname": record.levelname, "msg": msg,
                                              "created": record.created, "process": record.process,
                                              "pathname": record.pathname, "lineno": record.lineno,
                                              "funcName": record.funcName})
        except Exception:  # noqa: BLE001 - logging must never fail a study (logging.Handler's rule)
            self.handleError(record)


class RecnecWorkerPlugin(WorkerPlugin):
    """Dask worker plugin (``distributed.WorkerPlugin``: ``setup`` / ``teardown``, see
    https://distributed.dask.org/en/stable/plugins.html): on every worker, also those that join or
    are restarted later, sets the CPU thread counts (``threads`` > 0: ``OMP_NUM_THREADS``,
    ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS``, ``ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS``, read by
    those libraries when they start; torch's own count follows ``--threads`` in each task), runs
    the scan's ``worker_hooks`` and forwards recnec's log records at ``level`` and above to the
    client."""

    idempotent = False

    def __init__(self, hooks: Sequence[Callable[[], None]] = (), level: int = logging.INFO, threads: int = 0) -> None:
        self.hooks = tuple(hooks)
        self.level = int(level)
        self.threads = int(threads)
        self._handler: logging.Handler | None = None

    def setup(self, worker: Any) -> None:
        if self.threads > 0:
            set_thread_environment(self.threads)
        for hook in self.hooks:
            hook()
        self._handler = _ForwardToClient(worker, self.level)
        logger = logging.getLogger("recnec_cli")
        logger.addHandler(self._handler)
        logger.setLevel(self.level)

    def teardown(self, worker: Any) -> None:
        if self._handler is not None:
            logging.getLogger("recnec_cli").removeHandler(self._handler)
            self._handler = None


def _handle_worker_log(event: Any) -> None:
    """On the client: a forwarded record goes through the client's own loggers and handlers."""
    _, attrs = event
    record = logging.makeLogRecord(attrs)
    logging.getLogger(record.name).handle(record)


#: the scheduler's own event topic: it logs ``add-worker`` / ``remove-worker`` there
#: (``distributed.Scheduler.add_worker`` / ``remove_worker``, ``log_event("all", ...)``)
CLUSTER_TOPIC = "all"


def _handle_cluster_event(event: Any) -> None:
    """On the client: a worker joining or leaving the cluster becomes a line of the run log
    (WARNING when it left unexpectedly, e.g. killed or out of memory; its studies are retried)."""
    _, msg = event
    if not isinstance(msg, dict):
        return
    action, worker = msg.get("action"), msg.get("worker", "?")
    if action == "remove-worker":
        n = len(msg.get("processing-tasks") or ())
        busy = f" while running {n} task(s), which the scheduler retries elsewhere" if n else ""
        log.log(logging.INFO if msg.get("expected") else logging.WARNING,
                "Dask worker %s left the cluster%s%s", worker, busy,
                "" if msg.get("expected") else " (unexpected: killed, out of memory or its machine gone?)")
    elif action == "add-worker":
        log.info("Dask worker %s joined the cluster", worker)


def worker_check(settings: Settings, model_version: str | None = None) -> dict[str, Any]:
    """The start-up self-test on one worker: HD-BET's networks (loaded and kept), and with
    ``model_version`` the ensemble as well (loaded from ``settings.weights_dir``, SHA-256 checked,
    same model version as the client's). Returns the worker's recnec version, process id and
    where its HD-BET runs (``hdbet_provider``, e.g. ``CPUExecutionProvider``).

    Raises
    ------
    EnvironmentBroken
        As :func:`~recnec_cli.orchestration.execution.worker_self_test`, or the worker's ensemble
        differs from the client's (``WEIGHTS_DIFFER``).
    """
    from .. import __version__
    from .execution import worker_ensemble, worker_self_test

    provider = worker_self_test(settings)
    if model_version is not None:
        ens = worker_ensemble(settings)
        if ens.model_version != model_version:
            raise EnvironmentBroken(f"the ensemble a worker loaded from {settings.weights_dir} is "
                                    f"{ens.model_version}, the client's is {model_version}: the workers must see "
                                    "the client's weights folder (a shared path)", code="WEIGHTS_DIFFER")
    return {"recnec": __version__, "pid": os.getpid(), "hdbet_provider": provider}


# ---------------------------------------------------------------------------------------------
# the client side: the executor
# ---------------------------------------------------------------------------------------------
class DaskExecutor(cf.Executor):
    """Per-study work on a Dask cluster through ``client`` (see the module docstring).

    Parameters
    ----------
    client:
        A connected ``distributed.Client``.
    resources:
        Dask resources each task needs (``{"GPU": 1}``); empty = any worker. With resources, the
        inference batches run on such a worker too (:attr:`remote_inference`).
    study_timeout_s:
        Wall-clock limit of one task on the client's clock (seconds); ``None`` = no limit.
    worker_hooks:
        Picklable module-level callables run once in every worker process (tests install a
        stand-in for HD-BET this way); they need the module importable on the workers.
    log_level:
        Level from which recnec's worker log records are forwarded to the client.
    threads:
        CPU threads per task for the libraries that read them from the environment (0 = leave
        the workers' settings: Dask's nanny sets ``OMP_NUM_THREADS=1`` and friends).
    close_client:
        Close ``client`` in :meth:`shutdown` (when :meth:`connect` opened it).

    Implements :class:`~recnec_cli.orchestration.seam.StudyExecutor`: :meth:`submit` returns a
    :class:`concurrent.futures.Future`; :meth:`slots` is the number of task slots the cluster
    offers now (worker threads, limited by ``resources``).
    """

    def __init__(self, client: Any, *, resources: Mapping[str, float] | None = None,
                 study_timeout_s: float | None = None, worker_hooks: Sequence[Callable[[], None]] = (),
                 log_level: int = logging.INFO, threads: int = 0, close_client: bool = False) -> None:
        self.client = client
        self.resources = dict(resources or {})
        self.remote_inference = bool(self.resources)
        self.timeout = study_timeout_s
        self._close_client = close_client
        self._futures: dict[cf.Future, Any] = {}
        self._lock = threading.Lock()
        self._deadlines: list[tuple[float, int, cf.Future]] = []
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._slots = (0.0, 0)
        self._seq = 0
        client.subscribe_topic(LOG_TOPIC, _handle_worker_log)
        client.subscribe_topic(CLUSTER_TOPIC, _handle_cluster_event)
        client.register_plugin(RecnecWorkerPlugin(worker_hooks, log_level, threads), name=PLUGIN_NAME)
        self._watchdog = threading.Thread(target=self._watch, name="recnec-study-timeouts", daemon=True)
        self._watchdog.start()

    # -- construction from settings
    @classmethod
    def connect(cls, settings: Settings, *, worker_hooks: Sequence[Callable[[], None]] = (),
                log_level: int = logging.INFO, wait_for_workers_s: float | None = None) -> "DaskExecutor":
        """Connect to ``settings.scheduler`` (an address such as ``tcp://HOST:8786``) or
        ``settings.scheduler_file`` (the JSON file ``dask scheduler --scheduler-file`` writes) and
        wait until a worker with ``settings.dask_resources`` has joined (at most
        ``wait_for_workers_s``, default :data:`WAIT_FOR_WORKERS_S` seconds).

        Raises
        ------
        EnvironmentBroken
            ``SCHEDULER_UNREACHABLE`` (no scheduler answers within :data:`CONNECT_TIMEOUT_S`, or
            an unreadable scheduler file), ``NO_WORKERS`` (no suitable worker within
            ``wait_for_workers_s``).
        """
        from distributed import Client

        where = settings.scheduler or f"the scheduler file {settings.scheduler_file}"
        try:
            if settings.scheduler:
                client = Client(settings.scheduler, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
            else:
                client = Client(scheduler_file=str(settings.scheduler_file), timeout=CONNECT_TIMEOUT_S,
                                set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise EnvironmentBroken(f"cannot reach the Dask scheduler at {where} ({type(exc).__name__}: {exc})",
                                    code="SCHEDULER_UNREACHABLE") from None
        resources = parse_resources(settings.dask_resources)
        try:
            ex = cls(client, resources=resources,
                     study_timeout_s=settings.study_timeout_s if settings.study_timeout_s > 0 else None,
                     worker_hooks=worker_hooks, log_level=log_level, threads=settings.threads, close_client=True)
        except BaseException:
            client.close()
            raise
        wait_for_workers_s = WAIT_FOR_WORKERS_S if wait_for_workers_s is None else wait_for_workers_s
        t0 = time.monotonic()
        while ex._count_slots() == 0:
            if time.monotonic() - t0 > wait_for_workers_s:
                ex.shutdown(wait=False)
                need = f" with resources {settings.dask_resources}" if resources else ""
                raise EnvironmentBroken(f"no Dask worker{need} joined {where} within {wait_for_workers_s:g} s",
                                        code="NO_WORKERS")
            time.sleep(0.5)
        return ex

    # -- slots
    def _count_slots(self) -> int:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        total = 0
        for w in info.values():
            n = int(w.get("nthreads", 1))
            have = w.get("resources", {}) or {}
            for name, need in self.resources.items():
                n = min(n, int(have.get(name, 0) // need))
            total += max(n, 0)
        return total

    def slots(self) -> int:
        """How many studies may be in flight: the task slots of the suitable workers now connected
        (looked up at most every :data:`SLOTS_REFRESH_S` seconds), at least 1."""
        t, n = self._slots
        if time.monotonic() - t > SLOTS_REFRESH_S:
            try:
                n = self._count_slots()
            except Exception:  # noqa: BLE001 - keep the last figure when the scheduler is slow to answer
                pass
            self._slots = (time.monotonic(), n)
        return max(1, n)

    def workers(self) -> list[dict[str, Any]]:
        """The workers now connected, for the manifest: address, threads, resources, memory limit (bytes)."""
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        return [{"address": a, "name": str(w.get("name", "")), "nthreads": w.get("nthreads"),
                 "resources": dict(w.get("resources") or {}), "memory_limit_bytes": w.get("memory_limit")}
                for a, w in sorted(info.items())]

    def description(self) -> dict[str, Any]:
        """Where the scan ran, for the manifest."""
        return {"executor": "dask", "scheduler": str(self.client.scheduler.address),
                "resources": dict(self.resources), "remote_inference": self.remote_inference,
                "workers": self.workers()}

    # -- the start-up check on every suitable worker
    def self_test(self, settings: Settings, *, model_version: str | None = None) -> str:
        """:meth:`check_workers`; returns where HD-BET runs over the workers (their providers,
        sorted, comma-separated: one value on a uniform cluster)."""
        checks = self.check_workers(settings, model_version=model_version)
        return ",".join(sorted({str(c.get("hdbet_provider", "unknown")) for c in checks.values()}))

    def check_workers(self, settings: Settings, *, model_version: str | None = None) -> dict[str, Any]:
        """Run :func:`worker_check` once on every suitable worker now connected (loads and keeps
        their models). Returns ``{worker address: worker_check's answer}``.

        Raises
        ------
        EnvironmentBroken
            A worker failed the check, cannot load its models, or runs another recnec version
            (``VERSION_MISMATCH``).
        """
        from .. import __version__

        settings = for_workers(settings)
        targets = [w["address"] for w in self.workers()
                   if all((w["resources"].get(k, 0) or 0) >= v for k, v in self.resources.items())]
        futs = {a: self.client.submit(worker_check, settings, model_version, workers=[a], allow_other_workers=False,
                                      pure=False, resources=self.resources or None) for a in targets}
        out: dict[str, Any] = {}
        for addr, fut in futs.items():
            try:
                out[addr] = fut.result(timeout=self.timeout)
            except RecnecError as exc:  # e.g. WEIGHTS_CHECKSUM_MISMATCH: the worker's own code and message
                raise EnvironmentBroken(f"worker {addr}: {exc.message}", code=exc.code) from None
            except Exception as exc:  # noqa: BLE001 - the worker cannot even start its models
                raise EnvironmentBroken(f"self-test failed: Dask worker {addr} could not load recnec's models "
                                        f"({type(exc).__name__}: {exc})") from None
            if out[addr]["recnec"] != __version__:
                raise EnvironmentBroken(f"Dask worker {addr} runs recnec {out[addr]['recnec']}, this client "
                                        f"{__version__}: install the same version everywhere", code="VERSION_MISMATCH")
        return out

    # -- concurrent.futures.Executor
    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> cf.Future:
        """Ship ``fn(*args, **kwargs)`` to a worker (arguments through :func:`for_workers`).

        Raises
        ------
        EnvironmentBroken
            ``SCHEDULER_LOST``: the client is no longer connected.
        RuntimeError
            After :meth:`shutdown`.
        """
        if self._closed:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self.client.status not in ("running", "connecting"):
            raise EnvironmentBroken(f"lost the Dask scheduler (client status {self.client.status})",
                                    code="SCHEDULER_LOST")
        args = tuple(for_workers(a) for a in args)
        kwargs = {k: for_workers(v) for k, v in kwargs.items()}
        inner = self.client.submit(fn, *args, pure=False, resources=self.resources or None, **kwargs)
        outer: cf.Future = cf.Future()
        outer.set_running_or_notify_cancel()
        with self._lock:
            self._futures[outer] = inner
            if self.timeout is not None:
                self._seq += 1
                heapq.heappush(self._deadlines, (time.monotonic() + self.timeout, self._seq, outer))
                self._wake.notify()
        inner.add_done_callback(lambda f, outer=outer: self._cascade(f, outer))
        return outer

    def _cascade(self, inner: Any, outer: cf.Future) -> None:
        """Runs in Dask's callback thread: the Dask future's outcome -> ``outer``."""
        with self._lock:
            self._futures.pop(outer, None)
        if outer.done():  # timed out already
            return
        status = inner.status
        try:
            if status == "finished":
                outer.set_result(inner.result())
            elif status == "cancelled":
                outer.set_exception(EnvironmentBroken("a task was cancelled by the cluster (lost the Dask scheduler?)",
                                                      code="SCHEDULER_LOST"))
            else:
                exc = inner.exception()
                if isinstance(exc, KilledWorker):
                    exc = WorkerLost(f"the worker running this study was lost, also on the retries the cluster "
                                     f"allows (distributed.scheduler.allowed-failures = "
                                     f"{getattr(exc, 'allowed_failures', '?')})")
                outer.set_exception(exc)
        except cf.InvalidStateError:  # the watchdog was quicker
            pass
        except BaseException as exc:  # noqa: BLE001 - fetching the outcome failed: deliver that instead
            try:
                outer.set_exception(exc)
            except cf.InvalidStateError:
                pass

    def _watch(self) -> None:
        """Watchdog thread: a task past its deadline -> ``cf.TimeoutError`` on its future, the task
        cancelled and its worker restarted (which stops the study)."""
        while True:
            with self._lock:
                while not self._closed and not self._deadlines:
                    self._wake.wait()
                if self._closed:
                    return
                deadline, _, outer = self._deadlines[0]
                now = time.monotonic()
                if deadline > now:
                    self._wake.wait(deadline - now)
                    continue
                heapq.heappop(self._deadlines)
                inner = self._futures.pop(outer, None)
            if inner is None or outer.done():
                continue
            try:
                outer.set_exception(cf.TimeoutError())
            except cf.InvalidStateError:
                continue
            threading.Thread(target=self._stop_task, args=(inner,), name="recnec-stop-task", daemon=True).start()

    def _stop_task(self, inner: Any) -> None:
        try:
            busy = [a for a, keys in self.client.processing().items() if inner.key in set(keys)]
            self.client.cancel([inner], force=True)
            if busy:
                log.info("restarting Dask worker %s to stop a study past the time limit", busy[0])
                result = self.client.restart_workers(busy, raise_for_error=False)
                if any(v != "OK" for v in result.values()):
                    log.warning("Dask worker %s could not be restarted (%s; started without a nanny?): its "
                                "thread stays busy until the study returns", busy[0], result)
        except Exception as exc:  # noqa: BLE001 - best effort; the study's row is TIMEOUT either way
            log.warning("could not stop a study past the time limit on the cluster (%s)", type(exc).__name__)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop the watchdog; cancel what is still running when ``cancel_futures`` or not ``wait``;
        remove recnec's worker plugin (its log forwarding) and close the client if this executor
        opened it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
            pending = list(self._futures.values())
        try:
            if pending and (cancel_futures or not wait):
                self.client.cancel(pending, force=True)
            elif pending:
                from distributed import wait as dask_wait

                dask_wait(pending)
            if self.client.status == "running":
                self.client.unregister_worker_plugin(PLUGIN_NAME)
                self.client.unsubscribe_topic(LOG_TOPIC)
                self.client.unsubscribe_topic(CLUSTER_TOPIC)
        except Exception as exc:  # noqa: BLE001 - a scheduler already gone: nothing left to tidy
            log.debug("Dask clean-up: %s", type(exc).__name__)
        finally:
            if self._close_client:
                self.client.close()
