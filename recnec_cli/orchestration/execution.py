"""The execution seam's in-process side: the default executor and the tasks every executor runs
(a worker process, a Dask worker or this process alike), with models loaded once per process."""

from __future__ import annotations

import concurrent.futures as cf
import signal
from typing import Callable

from ..config import Settings
from ..errors import EnvironmentBroken
from ..study import Study
from .pipeline import Resources, StudyResult, process_study


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
    res = _WORKER_RESOURCES.get(settings)
    if res is None:
        res = _WORKER_RESOURCES[settings] = Resources.load(settings, need_model=False)
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
    res = _WORKER_RESOURCES.get(settings)
    if res is None:
        res = _WORKER_RESOURCES[settings] = Resources.load(settings, need_model=False)
    return process_study(study, settings=settings, resources=res, qc_name=qc_name)
