"""The batching routine: studies through an executor, ready model inputs through the ensemble in
batches. :func:`~recnec_cli.orchestration.scan.scan` and
:func:`run_batch` (a serial batch in this process, without state or report) both run it, so the tests of failure
isolation exercise the code a scan runs.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import time
from typing import Any, Callable, Sequence

from ..config import Settings
from ..errors import EnvironmentBroken
from ..results import StudyResult
from ..study import Study
from .execution import infer_remotely, preprocess_task
from .executors import InProcessExecutor
from .pipeline import Resources, finish_qc, infer_batch, study_key
from .seam import StudyExecutor, failure_of

log = logging.getLogger(__name__)

#: a preprocessed study waits at most this long for its inference batch to fill while other studies
#: are still being preprocessed (then the batch runs with what is ready), so a kill loses at most
#: this much preprocessing work; with nothing else in flight a batch runs at once (seconds)
BATCH_WAIT_S = 30.0


def run_studies(studies: Sequence[Study], *, executor: StudyExecutor, settings: Settings, task_settings: Settings,
                ensemble: Any, on_result: Callable[[StudyResult], None],
                on_start: Callable[[Study, int, int], None] | None = None,
                should_stop: Callable[[], bool] = lambda: False,
                qc_name: Callable[[Study], str | None] = lambda study: None,
                batch_wait_s: float = BATCH_WAIT_S) -> list[Study]:
    """Preprocess ``studies`` through ``executor`` (at most ``executor.slots()`` in flight, asked
    again as studies finish) and run the ensemble on the ready ones in batches of
    ``settings.batch_size``: when a batch is full, when no other study is in flight (waiting would
    only delay the commit; so the in-process executor infers each study at once), or when the
    oldest ready study has waited ``batch_wait_s`` (a kill loses at most that much finished
    preprocessing).

    Every study ends in exactly one ``on_result(result)`` call, in this process, after
    :func:`~recnec_cli.orchestration.pipeline.finish_qc`: OK with a probability, or a failure row
    (a stage error, or a task that did not return: ``TIMEOUT`` / ``OUT_OF_MEMORY`` /
    ``WORKER_DIED``, :func:`~recnec_cli.orchestration.seam.failure_of`). ``task_settings`` go to the
    tasks (the per-worker thread count); ``ensemble`` runs here unless
    ``executor.remote_inference``. ``on_start(study, done, total)`` is called as a study is handed
    over; once ``should_stop()`` is true no new study is started and the running ones finish.
    Returns the studies never started.

    Raises
    ------
    EnvironmentBroken
        A task found the installation unable to run any study; the caller stops the run.
    """
    timeout_s = settings.study_timeout_s if settings.study_timeout_s > 0 else None
    queue = list(studies)
    in_flight: dict[cf.Future, Study] = {}
    started_at: dict[cf.Future, float] = {}
    ready: list[tuple[StudyResult, float]] = []
    done = 0

    def finish(r: StudyResult) -> None:
        nonlocal done
        finish_qc(r, ensemble=ensemble, settings=settings)  # result line on the picture, explanation map
        done += 1
        on_result(r)

    def flush() -> None:
        batch = [r for r, _ in ready]
        ready.clear()
        if executor.remote_inference:
            batch = infer_remotely(executor, batch, settings=task_settings, model_version=ensemble.model_version,
                                   timeout_s=timeout_s)
        else:
            infer_batch(batch, ensemble=ensemble)
        for r in batch:
            finish(r)

    while True:
        while queue and not should_stop() and len(in_flight) < max(1, executor.slots()):
            study = queue.pop(0)
            if on_start is not None:
                on_start(study, done, len(studies))
            fut = executor.submit(preprocess_task, study, task_settings, qc_name(study))
            in_flight[fut] = study
            started_at[fut] = time.perf_counter()
        if not in_flight:
            break
        finished, _ = cf.wait(list(in_flight), return_when=cf.FIRST_COMPLETED)
        for fut in finished:
            study = in_flight.pop(fut)
            try:
                r = fut.result()
            except EnvironmentBroken:
                raise
            except Exception as exc:
                code, msg = failure_of(exc, timeout_s)
                r = StudyResult(study=study)
                r.fail("preprocess", code, msg)
                r.timings["total"] = time.perf_counter() - started_at.get(fut, time.perf_counter())
                log.info("study %s: %s", study_key(study), code)
                log.debug("executor error for study %s", study_key(study), exc_info=True)
            if r.ok:
                ready.append((r, time.perf_counter()))
            else:
                finish(r)
        waited = time.perf_counter() - ready[0][1] if ready else 0.0
        # nothing in flight: waiting would only delay the commit (the in-process executor is never
        # in flight, so it runs one study per batch and commits each at once)
        if ready and (len(ready) >= settings.batch_size or not in_flight or waited >= batch_wait_s):
            flush()
    if ready:
        flush()
    return queue


def run_batch(studies: Sequence[Study], *, settings: Settings, resources: Resources,
              on_study_done: Callable[[StudyResult], None] | None = None,
              on_study_start: Callable[[Study], None] | None = None) -> list[StudyResult]:
    """Preprocess every study in this process with ``resources``, run the ensemble in batches of
    ``settings.batch_size``: the batching routine of :func:`recnec_cli.orchestration.scan.scan`
    (:func:`run_studies`) over the in-process executor, without state or report. One bad study
    never stops the batch (see :func:`~recnec_cli.orchestration.pipeline.process_study`). Results
    are returned in input order.

    Raises
    ------
    EnvironmentBroken
        From :func:`process_study`: the installation cannot run any study.
    """
    by_study: dict[int, StudyResult] = {}

    def done(r: StudyResult) -> None:
        by_study[id(r.study)] = r
        if on_study_done:
            on_study_done(r)

    with InProcessExecutor(settings, resources=resources) as executor:
        run_studies(studies, executor=executor, settings=settings, task_settings=settings,
                    ensemble=resources.ensemble, on_result=done,
                    on_start=(lambda st, _done, _total: on_study_start(st)) if on_study_start else None)
    return [by_study[id(st)] for st in studies]
