"""``scan()``: everything ``recnec scan`` does, as one keyword-only library call.

Discovery, the per-study pipeline, batched inference, the nightly state, the report and the
manifest. The CLI (:mod:`recnec_cli.cli.scan`) only parses options and renders; Python users and
the tests call this same function::

    from recnec_cli.config import resolve_settings
    from recnec_cli.orchestration.scan import scan

    summary = scan(Path("/data/exports"), out=Path("/reports/recnec.csv"),
                   settings=resolve_settings({"settle_minutes": 10}))
    print(summary.exit_code, summary.counts)

A run, in order:

1. the output paths are checked (whatever way they arrived: CLI option, ``RECNEC_*`` variable);
2. the state's lock is taken (``filelock``): a second run on the same state stops at once with
   :class:`StateLocked` (exit code :data:`EXIT_LOCKED`); temporary files of a killed run are removed;
3. the tree is listed with ``stat`` only; if the listing is unchanged since the last run the
   previous discovery is reused and no input file is opened, otherwise discovery reads headers;
4. each study is *deferred* (a file younger than ``settings.settle_minutes``: an export still being
   copied), *unchanged* (same fingerprint as its stored row: nothing to do) or *to process*;
5. only when something is to process: models are loaded once, the start-up self-test runs
   (:func:`self_test`), and studies go through the execution seam (``executor``) with ready model
   inputs batched into the ensemble; each finished study is committed to the state in its own
   transaction, then the report and manifest are regenerated from the state and atomically
   replaced, and ``on_study_done`` is called;
6. SIGINT / SIGTERM stop the taking of new studies; what is done is kept and the run ends with
   exit code 130 / 143.

The two seams for later work: ``executor`` (where studies are preprocessed: any
:class:`~recnec_cli.orchestration.seam.StudyExecutor`; by default the one
:func:`~recnec_cli.orchestration.executors.make_executor` builds from the settings: local worker
processes, this process, or a Dask cluster, the only path that imports Dask) and
``on_study_done`` (what happens when a study finishes). The loop over studies and inference
batches is :func:`~recnec_cli.orchestration.batching.run_studies`.
"""

from __future__ import annotations

import glob
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .. import __version__
from ..atomic import atomic_write_text, remove_stale_temporaries
from ..config import Settings
from ..errors import RecnecError, UsageError
from ..exitcodes import EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_STUDY_FAILED, EXIT_USAGE
from ..qc.index import low_confidence
from ..results import StudyResult
from ..study import Study
from .batching import BATCH_WAIT_S, run_studies
from .execution import require_distributed
from .executors import make_executor
from .fingerprint import (
    folder_newest_mtimes,
    model_version_of,
    segmenter_version_of,
    study_files,
    study_fingerprint,
    tree_listing,
)
from .paths import check_scan_paths, output_paths
from .pipeline import Resources, qc_name_of, report_threshold_of, study_key
from .report import COLUMNS, ROW_DISCLAIMER, result_row, run_manifest, write_report
from .seam import StudyExecutor
from .selftest import self_test
from .state import ScanState, StoredStudy, digest

log = logging.getLogger(__name__)


#: statuses that are not failures (a DEFERRED study is scanned by a later run)
NOT_FAILED = ("OK", "DEFERRED")
#: what the discovery cache was written by: the recnec version and the format of its Study records
#: (2: acquisition date-time, BIDS session, IssuerOfPatientID in the patient pseudonym)
DISCOVERY_FORMAT = f"{__version__}/study-2"
#: the report and manifest are regenerated from the state after a finished study at most this often
#: (and always at the end of a run), so a first run over thousands of studies does not rewrite
#: the whole report after each one; the state itself commits every study at once (seconds)
REPORT_MIN_INTERVAL_S = 5.0
#: file modification times further in the future than this are a clock problem, not a copy in
#: progress: such studies are scanned (with a warning) instead of being deferred forever (seconds)
FUTURE_MTIME_TOLERANCE_S = 3600.0


class StateLocked(RecnecError):
    """Another ``recnec scan`` holds this state file's lock (exit code :data:`EXIT_LOCKED`)."""

    stage = "state"
    default_code = "STATE_LOCKED"


@dataclass(frozen=True)
class ScanSummary:
    """What one :func:`scan` call did.

    ``counts``: ``found`` (studies in the tree), ``processed`` (run through the pipeline this time),
    ``unchanged`` (skipped: same fingerprint), ``deferred``, ``failed`` (processed this run and not
    OK), ``failed_in_report`` (studies in the tree whose row, from this run or an earlier one, is a
    failure: exit code 1 when > 0), ``not_present`` (rows kept for studies no longer in the tree).
    ``rows``: the report rows (every study the state knows, once each). ``stop_reason``: ``""``,
    ``"SIGINT"`` or ``"SIGTERM"``.
    """

    run_id: str
    exit_code: int
    counts: Mapping[str, int]
    seconds: float
    report: Path
    manifest: Path
    state: Path
    log_file: Path | None
    rows: Sequence[Mapping[str, Any]] = field(default_factory=tuple)
    stop_reason: str = ""

    def line(self) -> str:
        """The one summary line cron mails: counts and seconds."""
        c = self.counts
        text = (f"recnec scan {self.run_id}: found {c['found']}, processed {c['processed']}, unchanged "
                f"{c['unchanged']}, deferred {c['deferred']}, failed {c['failed']} (failing rows in the report: "
                f"{c.get('failed_in_report', 0)}), {self.seconds:.1f} s, exit {self.exit_code}")
        return text + (f" (stopped by {self.stop_reason})" if self.stop_reason else "")


# ---------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------
def scan(studies: Path, *, out: Path, settings: Settings, fmt: str = "csv", force: bool = False,
         retry_failed: bool = False, dicom_locations: bool = False, executor: StudyExecutor | None = None,
         on_study_done: Callable[[StudyResult, Mapping[str, Any]], None] | None = None,
         on_progress: Callable[[str, int, int], None] | None = None,
         handle_signals: bool = True, run_self_test: bool = True,
         worker_hooks: Sequence[Callable[[], None]] = (), on_locked: Callable[[], None] | None = None,
         now: Callable[[], float] = time.time) -> ScanSummary:
    """Scan ``studies`` incrementally into the report ``out`` (see the module docstring).

    Parameters
    ----------
    studies:
        Folder of DICOM / NIfTI / NRRD studies; never written to.
    out:
        Report file (``fmt`` ``"csv"`` or ``"json"``); beside it ``<stem>.manifest.json``,
        ``<stem>.log`` (written by the caller's logging set-up) and, unless
        ``settings.state_file`` says otherwise, ``<stem>.state.sqlite``.
    settings:
        Resolved :class:`~recnec_cli.config.Settings` (``settle_minutes``, ``state_file``,
        ``pseudonym_key_file`` included).
    force / retry_failed:
        Reprocess every study / only studies whose stored row is a failure, even if unchanged.
    dicom_locations:
        Report DICOM folders (off: export folder names may hold patient names).
    executor:
        Where studies are preprocessed (a :class:`~recnec_cli.orchestration.seam.StudyExecutor`,
        which the caller shuts down). Default: :func:`~recnec_cli.orchestration.executors.make_executor`
        from ``settings`` (a Dask cluster when ``settings.scheduler`` or ``settings.scheduler_file``
        is set, else ``settings.workers`` local worker processes, or this process when it is 0),
        shut down at the end. At most ``executor.slots()`` studies are in flight at once (asked
        again as studies finish).
    on_study_done:
        Called in this process with each finished :class:`StudyResult` and its report row, after
        the row is committed to the state and the report regenerated.
    on_progress:
        Called with ``(study_id, done, total)`` when a study starts (done = finished so far).
    handle_signals:
        Install SIGINT / SIGTERM handlers for the run (main thread only) that stop the taking of new
        studies; previous handlers are restored afterwards.
    run_self_test:
        Run :func:`self_test` after loading the models (only when a study is to be processed).
    on_locked:
        Called once the state's lock is held, before anything is written (the CLI opens the run's
        log file there, so a run refused with :class:`StateLocked` never rotates the running
        scan's log).
    worker_hooks:
        Picklable module-level callables run once in each worker process of the default pool or
        of the Dask cluster (per-worker set-up; the tests install a stand-in for HD-BET this way).
    now:
        Clock in seconds since the epoch (for deferral; tests pass their own).

    Returns
    -------
    ScanSummary

    Raises
    ------
    UsageError
        Bad paths (see :func:`check_scan_paths`), a broken rules file or state file.
    StateLocked
        Another run holds the state.
    EnvironmentBroken
        Missing / tampered weights or a failed self-test: nothing is processed. With a scheduler:
        ``DISTRIBUTED_MISSING`` (the ``recnec[distributed]`` extra is not installed; raised before
        anything is done), ``SCHEDULER_UNREACHABLE``, ``NO_WORKERS``, ``VERSION_MISMATCH``,
        ``WEIGHTS_DIFFER`` or ``SCHEDULER_LOST`` (see :mod:`recnec_cli.orchestration.cluster`).
    DiscoveryError
        ``NO_IMAGE_FOUND`` / ``NO_IMAGE_DICOM_FOUND`` when the tree holds no image at all.
    """
    import multiprocessing

    from filelock import FileLock, Timeout

    # a worker process being started by `spawn` runs the caller's main script again: a script
    # without the __main__ guard lands here, before anything is read or written (the stdlib has
    # no public name for "this process is bootstrapping"; `_inheriting` is what spawn sets)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise UsageError("scan() was called while a recnec worker process was starting: the script that calls "
                         "scan() runs again in every worker process (the 'spawn' start method). Put the call "
                         'under `if __name__ == "__main__":`')
    t_start = time.perf_counter()
    studies = Path(studies).expanduser()
    check_scan_paths(studies, out=out, settings=settings)
    if settings.uses_cluster and executor is None:
        require_distributed()  # a missing extra fails at once, whatever the tree holds
    if fmt not in ("csv", "json"):
        raise UsageError(f"report format must be csv or json, got {fmt!r}")
    paths = output_paths(out, settings)
    paths["state"].parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(paths["lock"]), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise StateLocked(f"another recnec scan is running on the state {paths['state']} (lock "
                          f"{paths['lock'].name}); this run did nothing") from None
    try:
        if on_locked is not None:
            on_locked()
        remove_stale_temporaries(paths["report"].parent, [glob.escape(paths[k].name) for k in ("report", "manifest")])
        with ScanState(paths["state"]) as state:
            return _run(studies, paths=paths, settings=settings, fmt=fmt, force=force, retry_failed=retry_failed,
                        dicom_locations=dicom_locations, executor=executor, on_study_done=on_study_done,
                        on_progress=on_progress, handle_signals=handle_signals, run_self_test=run_self_test,
                        worker_hooks=tuple(worker_hooks), now=now, state=state, t_start=t_start)
    finally:
        lock.release()


class _HardStop(BaseException):
    """A second SIGINT / SIGTERM: leave the running studies at once (the state stays consistent)."""


class _Stop:
    """SIGINT / SIGTERM -> stop taking new studies (a second signal interrupts at once)."""

    def __init__(self, install: bool) -> None:
        self.reason = ""
        self.hard = False
        self._old: dict[int, Any] = {}
        if install and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.reason:
            log.warning("%s received again: stopping at once (finished studies are in the state)", name)
            self.hard = True
            raise _HardStop(name)
        self.reason = name
        log.warning("%s received: no new studies are started; finishing the current one, then writing "
                    "the report (send it again to stop at once; finished studies are kept either way)", name)

    def __bool__(self) -> bool:
        return bool(self.reason)

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _run(studies: Path, *, paths: dict[str, Path], settings: Settings, fmt: str, force: bool, retry_failed: bool,
         dicom_locations: bool, executor: StudyExecutor | None, on_study_done, on_progress, handle_signals: bool,
         run_self_test: bool, worker_hooks: tuple, now: Callable[[], float], state: ScanState,
         t_start: float) -> ScanSummary:
    from ..pseudonym import load_key
    from ..stages.discover import discover

    started = datetime.now(timezone.utc)
    run_id = started.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    key = load_key(settings.pseudonym_key_file)
    model_version = model_version_of(settings.weights_dir)
    root_key = str(studies.resolve())

    # ---- discovery (stat listing first: an unchanged tree opens no file)
    listing = tree_listing(studies)
    listing_sha = digest([sorted(listing.items()), key.key_id])
    found = state.cached_discovery(root_key, listing_sha, DISCOVERY_FORMAT)
    if found is None:
        log.info("discovering studies under the input tree (%d files)", len(listing))
        found = discover(studies, pseudonym_key=key)
        state.store_discovery(root_key, listing_sha, found, DISCOVERY_FORMAT)
    else:
        log.info("input tree unchanged since the last run (%d files): discovery reused", len(listing))
    state.record_timeline(found)
    log.info("found %d studies", len(found))
    state.start_run(run_id, started_utc=_iso(started), input_root=root_key, report=str(paths["report"].resolve()))
    n_absent = state.mark_presence([s.study_id for s in found], run_id)

    # ---- partition: deferred / unchanged / to process
    settle_s = settings.settle_minutes * 60.0
    t_now = now()
    newest_by_folder = folder_newest_mtimes(listing)
    todo: list[tuple[Study, str]] = []
    counts = {"found": len(found), "processed": 0, "unchanged": 0, "deferred": 0, "failed": 0,
              "not_present": n_absent}
    for study in found:
        files, latest_ns = study_files(study, studies, listing, newest_by_folder, settings)
        fp = study_fingerprint(study, files, settings=settings, model_version=model_version, key_id=key.key_id)
        age = t_now - max(latest_ns, 0) / 1e9
        if settle_s > 0 and age < settle_s and -age < FUTURE_MTIME_TOLERANCE_S:
            counts["deferred"] += 1
            _defer(state, study, age, settings, run_id, dicom_locations=dicom_locations)
            continue
        if -age >= FUTURE_MTIME_TOLERANCE_S:
            log.warning("study %s: a file's modification time lies %.0f h in the future (clock problem?); "
                        "scanned without waiting", study_key(study), -age / 3600)
        stored = state.get(study.study_id)
        if (stored is not None and stored.fingerprint == fp and not force
                and not (retry_failed and stored.status not in NOT_FAILED)):
            counts["unchanged"] += 1
            continue
        todo.append((study, fp))
    log.info("%d to process, %d unchanged, %d deferred (settle time %.1f min), %d no longer present",
             len(todo), counts["unchanged"], counts["deferred"], settings.settle_minutes, n_absent)

    ctx = _RunContext(state=state, paths=paths, settings=settings, fmt=fmt, run_id=run_id, started=started,
                      root=root_key, model_version=model_version, key_id=key.key_id, key=key)
    if settings.qc_dir is not None:
        from ..qc.files import remove_stale_temporaries as remove_stale_qc_files

        remove_stale_qc_files(Path(settings.qc_dir))  # each removed file is logged
    stop = _Stop(handle_signals)
    try:
        if settings.dicom_out is not None:
            try:
                Path(settings.dicom_out).mkdir(parents=True, exist_ok=True)
                probe = Path(settings.dicom_out) / f".recnec-write-test-{run_id}"
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as exc:
                raise UsageError(f"--dicom-out / RECNEC_DICOM_OUT {settings.dicom_out} cannot be written "
                                 f"({exc.strerror or type(exc).__name__}); nothing was processed") from None
        if todo:
            _process(todo, ctx=ctx, counts=counts, executor=executor, stop=stop, on_study_done=on_study_done,
                     on_progress=on_progress, dicom_locations=dicom_locations, run_self_test=run_self_test,
                     worker_hooks=worker_hooks)
    except _HardStop:
        pass  # the pool is already stopped; what is done is in the state: end as a normal stop
    except RecnecError as exc:  # models, weights or self-test: nothing was processed (exit code 2)
        state.finish_run(run_id, finished_utc=_iso(datetime.now(timezone.utc)), summary=counts,
                         exit_code=EXIT_USAGE, stop_reason=exc.code)
        raise
    finally:
        stop.restore()
    if settings.send and not stop:  # a stopped run leaves its objects queued for the next one
        from .dicom_export import deliver

        sent = deliver(state, settings.send, calling_ae=settings.calling_ae)
        counts["objects_sent"], counts["objects_not_sent"] = sent["sent"], sent["failed"]
    present = {s.study_id for s in found}
    counts["failed_in_report"] = sum(s.present and s.study_id in present and s.status not in NOT_FAILED
                                     for s in state.all())
    if stop.reason:
        code = EXIT_SIGINT if stop.reason == "SIGINT" else EXIT_SIGTERM
    else:
        code = EXIT_STUDY_FAILED if counts["failed_in_report"] else EXIT_OK
    seconds = time.perf_counter() - t_start
    state.finish_run(run_id, finished_utc=_iso(datetime.now(timezone.utc)),
                     summary={**counts, "seconds": round(seconds, 3)}, exit_code=code,
                     stop_reason=stop.reason + (" (twice)" if stop.hard else ""))
    _match_timeline(ctx)
    rows = ctx.write_outputs()  # once, after the run is recorded (the manifest lists it)
    summary = ScanSummary(run_id=run_id, exit_code=code, counts=counts, seconds=seconds, report=paths["report"],
                          manifest=paths["manifest"], state=paths["state"], log_file=paths["log"], rows=rows,
                          stop_reason=stop.reason)
    (log.warning if stop.reason else log.info)("%s", summary.line())
    return summary


def _match_timeline(ctx: "_RunContext") -> None:
    """Lesion matches of the patients' timelines still missing (new, re-processed or late studies),
    with the prior/current pictures under ``--qc``; never fails the run."""
    from .followups import match_pending

    def picture(study_id: str, source: str) -> Path | None:
        if ctx.settings.qc_dir is None:
            return None
        return Path(ctx.settings.qc_dir) / _follow_up_png_name(ctx, study_id, source)

    try:
        rows = [report_row(s) for s in ctx.state.all()]
        done = match_pending(ctx.state, rows, picture=picture)
        if done["pairs"]:
            log.info("timeline: %d lesion pair(s) matched in %.1f s", done["pairs"], done["seconds"])
    except Exception as exc:  # the comparisons say "not checked"; the report stands
        log.warning("timeline: lesion matching stopped (%s)", type(exc).__name__)
        log.debug("timeline matching error", exc_info=True)


def _follow_up_png_name(ctx: "_RunContext", study_id: str, source: str) -> str:
    from ..qc.files import qc_stem
    from ..qc.trajectory import follow_up_name

    return follow_up_name(qc_stem(study_id, source, ctx.key))


def _iso(t: datetime) -> str:
    return t.astimezone(timezone.utc).isoformat(timespec="seconds")


def _defer(state: ScanState, study: Study, age_s: float, settings: Settings, run_id: str, *,
           dicom_locations: bool) -> None:
    """Record a study as DEFERRED (fingerprint NULL: a later run processes it). A row from an
    earlier run is kept as it is (people may have acted on it); only its fingerprint is cleared."""
    stored = state.get(study.study_id)
    msg = (f"a file was modified {max(age_s, 0) / 60:.1f} min ago (settle time {settings.settle_minutes:g} min): "
           "the export may still be in progress; a later run scans it")
    log.info("study %s DEFERRED: %s", study_key(study), msg)
    if stored is not None and stored.status != "DEFERRED":
        state.put(study.study_id, fingerprint=None, status=stored.status, row=stored.row, run_id=stored.run_id,
                  processed_utc=stored.processed_utc)
        return
    r = StudyResult(study=study, status="DEFERRED", error_code="", error_message=msg, failed_stage="")
    row = result_row(r, threshold=None, model_version="", dicom_locations=dicom_locations)
    t = _iso(datetime.now(timezone.utc))
    state.put(study.study_id, fingerprint=None, status="DEFERRED", row=row, run_id=run_id, processed_utc=t)


@dataclass
class _RunContext:
    state: ScanState
    paths: dict[str, Path]
    settings: Settings
    fmt: str
    run_id: str
    started: datetime
    root: str
    model_version: str
    key_id: str
    key: Any = None  # the site pseudonym key (QC file names of NIfTI / NRRD studies)
    ensemble: Any = None
    decoders: Mapping[str, bool] = field(default_factory=dict)
    self_test_s: Mapping[str, float] = field(default_factory=dict)
    hdbet_provider: str = ""  # where HD-BET ran (ONNX Runtime provider or torch-*), from the self-test
    execution: Mapping[str, Any] = field(default_factory=dict)
    said_not_dicom: bool = False  # the "--dicom-out: NIfTI studies get none" line is logged once

    last_write: float = 0.0

    def write_outputs(self, *, throttled: bool = False) -> list[dict[str, Any]]:
        """Regenerate the report and the manifest from the state; atomically replaced. With
        ``throttled``, skipped when the last write is less than REPORT_MIN_INTERVAL_S old."""
        if throttled and time.monotonic() - self.last_write < REPORT_MIN_INTERVAL_S:
            return []
        self.last_write = time.monotonic()
        stored = self.state.all()
        rows = [report_row(s) for s in stored]
        self.add_timeline(rows)
        if self.settings.dicom_out is not None or self.settings.send:
            sends = self.state.send_status()
            for row in rows:
                row["pacs_send"] = "; ".join(f"{d}: {t}" for d, t in sorted(sends.get(row["study_id"], {}).items()))
        write_report(self.paths["report"], rows, fmt=self.fmt)
        manifest = run_manifest(settings_dict=self.settings.to_dict(), ensemble=self.ensemble, rows=rows,
                                started=self.started, finished=datetime.now(timezone.utc), input_root=self.root,
                                report_path=str(self.paths["report"].resolve()),
                                n_discovered=sum(s.present for s in stored), decoders=dict(self.decoders))
        manifest.update(run_id=self.run_id, state=str(self.paths["state"].resolve()),
                        pseudonym_key_id=self.key_id, self_test_seconds=dict(self.self_test_s),
                        hdbet_provider=self.hdbet_provider or None,
                        # SHA-256 of segmenter.onnx, '+' the lesion score's checksum ('' heuristic)
                        lesion_segmenter=segmenter_version_of(self.settings),
                        runs=self.state.runs(limit=10))
        if self.execution:
            manifest["execution"] = dict(self.execution)
        if self.ensemble is None:
            manifest["model_version"] = self.model_version.split("#")[0]
        atomic_write_text(self.paths["manifest"], json.dumps(manifest, indent=2, default=str) + "\n")
        if self.settings.qc_dir is not None:
            self.write_index(rows)
        return rows

    def add_timeline(self, rows: list[dict[str, Any]]) -> None:
        """The timeline columns of every row, and with ``--qc`` the trajectory pictures and the
        prior/current pictures' names; a failure is logged, the rows keep empty columns."""
        from .followups import annotate, draw_trajectories

        try:
            points = annotate(self.state, rows)
            if self.settings.qc_dir is not None:
                qc = Path(self.settings.qc_dir)
                draw_trajectories(qc, rows, points)
                for row in rows:
                    if row.get("prior_study_id"):
                        name = _follow_up_png_name(self, str(row["study_id"]), str(row.get("source") or "dicom"))
                        row["follow_up_png"] = name if (qc / name).is_file() else ""
        except Exception as exc:  # the timeline is a view of the rows, never their end
            log.warning("timeline columns not computed (%s)", type(exc).__name__)
            log.debug("timeline error", exc_info=True)

    def write_index(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """``qc_dir/index.html`` from the report rows (the state); a failure is logged, the report stands."""
        from ..qc.index import write_index

        try:
            last = self.state.runs(limit=1)
            write_index(Path(self.settings.qc_dir), rows,  # type: ignore[arg-type]
                        title=f"recnec scan: {self.paths['report'].name}", run=last[0] if last else None)
        except Exception as exc:
            log.warning("QC index not written (%s)", type(exc).__name__)
            log.debug("QC index error", exc_info=True)


def report_row(s: StoredStudy) -> dict[str, Any]:
    """The report row of a stored study: its row plus ``run_id``, ``processed_utc`` and
    ``present_in_tree`` (``no`` for a study that disappeared from the tree: its last row is kept)."""
    row = {c: "" for c in COLUMNS}
    row.update(s.row)
    row["run_id"], row["processed_utc"] = s.run_id, s.processed_utc
    row["present_in_tree"] = "yes" if s.present else "no"
    row["disclaimer"] = ROW_DISCLAIMER
    return row


def _export_dicom(r: StudyResult, row: Mapping[str, Any], *, ctx: _RunContext, model_version: str) -> None:
    """The study's DICOM objects (``--dicom-out``), after its row is committed; the picture drawn
    only for the Secondary Capture is removed once used."""
    from . import dicom_export

    s = ctx.settings
    if r.study.source != "dicom":
        if not ctx.said_not_dicom:
            log.info("--dicom-out: %s studies get no DICOM objects (no DICOM study to file them under); "
                     "only DICOM studies do", r.study.source.upper())
            ctx.said_not_dicom = True
        return
    if not r.ok:
        return
    work_png = dicom_export.work_dir(s) / r.qc["sc_png"] if r.qc.get("sc_png") else None
    png = Path(s.qc_dir) / r.qc["png"] if (s.qc_dir is not None and r.qc.get("png")) else work_png
    try:
        done = dicom_export.export_study(r, row, state=ctx.state, settings=s, model_version=model_version,
                                         qc_png=png)
    finally:
        if work_png is not None:
            work_png.unlink(missing_ok=True)
            try:
                work_png.parent.rmdir()  # only when empty
            except OSError:
                pass
    if done == dicom_export.RETRY:  # the row stands; the study is processed again by the next run
        stored = ctx.state.get(r.study.study_id)
        if stored is not None:
            ctx.state.put(stored.study_id, fingerprint=None, status=stored.status, row=stored.row,
                          run_id=stored.run_id, processed_utc=stored.processed_utc)


def _process(todo: Sequence[tuple[Study, str]], *, ctx: _RunContext, counts: dict[str, int],
             executor: StudyExecutor | None, stop: _Stop, on_study_done, on_progress, dicom_locations: bool,
             run_self_test: bool, worker_hooks: tuple = ()) -> None:
    """Load the ensemble, build (or take) the executor, self-test, then run the studies through
    :func:`~recnec_cli.orchestration.batching.run_studies`, committing each finished one."""
    s = ctx.settings
    if executor is None:
        execution = make_executor(s, n_studies=len(todo), worker_hooks=worker_hooks,
                                  log_level=logging.getLogger("recnec_cli").getEffectiveLevel())
        own: StudyExecutor | None = execution.executor
        executor, task_settings = execution.executor, execution.task_settings
    else:
        own, task_settings = None, s
    try:
        ctx.execution = executor.description()
        if ctx.execution.get("executor") == "dask":
            log.info("Dask cluster at %s: %d worker(s), %d task slot(s)%s, study timeout %s",
                     ctx.execution["scheduler"], len(ctx.execution["workers"]), executor.slots(),
                     f" with resources {s.dask_resources}" if s.dask_resources else "",
                     f"{s.study_timeout_s:g} s" if s.study_timeout_s > 0 else "none")
        log.info("loading models (HD-BET %s%s via %s, ONNX ensemble from %s)", s.hdbet_mode,
                 "+TTA" if s.hdbet_tta else "", s.hdbet_backend, s.weights_dir)
        # the ensemble lives here; HD-BET where studies are preprocessed (the executor's tasks load it)
        resources = Resources.load(s, need_hdbet=False)
        ens = resources.ensemble
        ctx.ensemble, ctx.decoders = ens, resources.decoders
        log.info("ensemble %s: %d models, provider %s, threshold %.3f (calibrated scale)", ens.model_version,
                 ens.n_models, ens.provider, report_threshold_of(ens))
        if run_self_test:
            ctx.self_test_s = self_test(resources)
            t0 = time.perf_counter()
            ctx.hdbet_provider = executor.self_test(
                task_settings, model_version=ens.model_version if executor.remote_inference else None)
            ctx.self_test_s = {**ctx.self_test_s, "hdbet": time.perf_counter() - t0}
        if ctx.hdbet_provider:
            log.info("HD-BET runs on %s", ctx.hdbet_provider)
        ctx.write_outputs()  # deferred / absent studies show at once, before the first long study
        fingerprints = {st.study_id: fp for st, fp in todo}

        def finish(r: StudyResult) -> None:
            row = result_row(r, threshold=report_threshold_of(ens), model_version=ens.model_version,
                             dicom_locations=dicom_locations)
            ctx.state.put(r.study.study_id, fingerprint=fingerprints[r.study.study_id], status=r.status, row=row,
                          run_id=ctx.run_id, processed_utc=_iso(datetime.now(timezone.utc)))
            ctx.state.put_follow_up_map(r.study.study_id, r.follow_up_map)
            if s.dicom_out is not None:
                _export_dicom(r, row, ctx=ctx, model_version=ens.model_version)
            counts["processed"] += 1
            if not r.ok:
                counts["failed"] += 1
            low = " LESION_LOW_CONFIDENCE" if low_confidence(row) else ""
            msg = (f"p_recurrence={row['p_recurrence']} label={row['label']}{low}" if r.ok
                   else r.error_message if r.error_message.startswith(r.error_code)
                   else f"{r.error_code}: {r.error_message}")
            log.info("[%d/%d] %s %s %s (%.1f s)", counts["processed"], len(todo), row["study_id"], r.status, msg,
                     r.timings.get("total", 0.0))
            ctx.write_outputs(throttled=True)
            if on_study_done is not None:
                on_study_done(r, report_row(ctx.state.get(r.study.study_id)))  # type: ignore[arg-type]

        def start(study: Study, done: int, total: int) -> None:
            if on_progress is not None:
                on_progress(study.study_id, done, total)

        not_started = run_studies(
            [st for st, _ in todo], executor=executor, settings=s, task_settings=task_settings, ensemble=ens,
            on_result=finish, on_start=start, should_stop=lambda: bool(stop),
            qc_name=(lambda st: qc_name_of(st, s, ctx.key)) if s.qc_dir is not None else (lambda st: None),
            batch_wait_s=BATCH_WAIT_S)
        if stop and not_started:
            log.warning("%d studies not started because of %s; a later run scans them", len(not_started), stop.reason)
    except BaseException:
        if own is not None:
            own.shutdown(wait=False, cancel_futures=True)
            own = None
        raise
    finally:
        if own is not None:
            own.shutdown()
