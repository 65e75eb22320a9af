"""``recnec scan STUDIES --out report.csv``: options -> Settings -> :func:`recnec_cli.orchestration.scan.scan`
-> progress, table and exit code. Everything else lives in the library call."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .. import DISCLAIMER
from ..exitcodes import EXIT_LOCKED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_STUDY_FAILED, EXIT_USAGE
from .common import (
    LOG_FILES_KEPT,
    DeviceOpt,
    HdBetBackendOpt,
    HdBetModeOpt,
    LesionMasksOpt,
    QuietOpt,
    VerboseOpt,
    error_boundary,
    results_console,
    setting_help,
    setup_logging,
)

log = logging.getLogger("recnec.scan")


class ReportFormat(str, Enum):
    csv = "csv"
    json = "json"


SCAN_HELP = f"""Scan a folder of studies, incrementally, and write one report row per study.

STUDIES is walked once, reading headers only. DICOM instances are grouped by PatientID /
StudyInstanceUID / SeriesInstanceUID whatever the folder layout; each NIfTI (.nii, .nii.gz) or
NRRD folder is one study, roles taken from file names (BIDS T1w / T2w / ce-gadolinium, BraTS
t1n / t1c / t2w, tokens t1ce, post_gad ...). A file named lesion_mask.nii.gz in a NIfTI study
folder (or DIR/<study_id>.nii.gz with --lesion-masks DIR) is used as the lesion mask; otherwise the
lesion is the shipped segmenter's (T1, T2, T1ce and FLAIR when the study has one; enhancing,
necrotic and oedema volumes in mL), after tests that reject vessels, sinuses and falx and a
lesion score (weights/lesion_score.json) that rates each remaining region as a lesion: with no
region scoring 0.1 the row is NO_ENHANCING_LESION (no probability), and a choice scoring under 0.5
is flagged LESION_LOW_CONFIDENCE (lesion_confidence, the score). On lesion-free synthetic heads
the choroid plexus still gives a flagged lesion more often than NO_ENHANCING_LESION: read a
flagged row as "maybe no lesion" and check its QC picture. --lesion-detector heuristic uses the older
enhancement-map detector instead.

Timeline: studies of one patient (same keyed PatientID + IssuerOfPatientID, or BIDS sub-<label>)
are ordered by study date (or ses-<label>) and each is compared with the prior and the nadir:
volume changes in mL and %, the same lesion or not (registration of the earlier T1ce), and a
volumetric suggestion against the nadir (modified RANO thresholds; not a RANO assessment). Dates
stay in the state; the report carries days. A late export is placed by its date and the
comparisons it changes are recomputed in the same run.

Nightly use: every finished study is committed to a SQLite state (REPORT's stem + .state.sqlite,
or --state; keep it on a local disk, not NFS) and the report is regenerated from it, so a run
that is killed loses nothing and the next run only processes new or changed studies (a study is
unchanged when its files' sizes and times, the weights and the result-changing settings are).
A study with a file modified less than --settle-minutes ago (an export still being copied) is
DEFERRED to a later run. Only one run at a time may use a state.

Studies are preprocessed in worker processes (--workers), each loading its models once, with a
time limit (--study-timeout: a hung study becomes a TIMEOUT row) and a memory limit (--max-memory:
OUT_OF_MEMORY); the worker is replaced and the run goes on. Model inputs are batched into the ONNX
ensemble (--batch-size) in this process.

On a Dask cluster (--scheduler tcp://HOST:8786 or --scheduler-file FILE; needs
pip install 'recnec[distributed]'), the cluster's workers preprocess the studies instead; they
must read STUDIES (and --weights, --rules, --lesion-masks) at the same paths as this process.
This process still writes the state, report and log. --dask-resources GPU=1 sends the studies and
the inference batches only to workers started with --resources GPU=1.

Writes REPORT (CSV or JSON: every study the state knows, once), REPORT's stem + .manifest.json
(versions, execution provider, model checksums, settings, timings, last runs) and + .log (this
run's log, INFO; DEBUG with -v; the {LOG_FILES_KEPT} previous runs' logs are kept as .log.1 ...
.log.{LOG_FILES_KEPT}). The
input tree is never modified. With --qc DIR, DIR receives one picture per study (named by
StudyInstanceUID or a keyed pseudonym, never by folder names), with --explain a second one
showing where the model looked, and DIR/index.html (sortable, filterable, offline), rebuilt from
the state after every run. The state file holds the input files' paths: keep it with the same
care as the export folder. `recnec status --state FILE` shows what a state holds.

Examples:

\b
  recnec scan /data/exports --out report.csv
  recnec scan /data/exports --out report.json --format json --keep-intermediate nifti/
  # QC pictures, where the model looked, and qc/index.html for any browser:
  recnec scan /data/exports --out report.csv --qc qc/ --explain
  recnec scan /shared/exports --out report.csv --scheduler tcp://headnode:8786
  # crontab (every night at 01:30; the same report and state every night):
  30 1 * * *  recnec scan /data/exports --out /reports/recnec.csv --quiet

Exit codes: {EXIT_OK} every study OK (or deferred), {EXIT_STUDY_FAILED} some studies failed (see status /
error_code), {EXIT_USAGE} usage or environment error (nothing scanned), {EXIT_LOCKED} another scan holds the
state (nothing done), {EXIT_SIGINT} / {EXIT_SIGTERM} stopped by SIGINT / SIGTERM (finished studies are in the
report).

{DISCLAIMER}
"""


def register(app: typer.Typer) -> None:
    app.command("scan", help=SCAN_HELP, no_args_is_help=True)(scan)


def scan(
    studies: Path = typer.Argument(..., help="Folder of studies (DICOM, NIfTI or NRRD), walked recursively.",
                                   show_default=False),
    out: Path = typer.Option(Path("report.csv"), "--out", "-o", help="Report file to write."),
    fmt: ReportFormat = typer.Option(ReportFormat.csv, "--format", "-f", help="Report format."),
    state: Optional[Path] = typer.Option(None, "--state", help="SQLite state file, on a local disk "
                                         + setting_help("state_file", default="REPORT's stem + .state.sqlite"),
                                         show_default=False),
    force: bool = typer.Option(False, "--force", help="Reprocess every study, changed or not."),
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Reprocess studies whose last row is a "
                                      "failure, even if unchanged."),
    settle_minutes: Optional[float] = typer.Option(None, "--settle-minutes", min=0.0, help="Defer studies with a "
                                                   "file modified less than this many minutes ago "
                                                   + setting_help("settle_minutes", "; 0 = never defer"),
                                                   show_default=False),
    pseudonym_key_file: Optional[Path] = typer.Option(None, "--pseudonym-key-file", help="Site secret for the "
                                                      "patient pseudonyms (HMAC-SHA256; created on first use, mode "
                                                      "0600; keep it outside the reports) "
                                                      + setting_help("pseudonym_key_file",
                                                                     default="~/.config/recnec/pseudonym.key"),
                                                      show_default=False),
    workers: Optional[int] = typer.Option(None, "--workers", min=-1, help="Worker processes for the per-study "
                                          "work, each with its own models "
                                          + setting_help("workers", "; -1 = one per core, at most one per 4 GB of "
                                                         "RAM; 0 = in this process, no limits"),
                                          show_default=False),
    study_timeout: Optional[float] = typer.Option(None, "--study-timeout", min=0.0, help="Wall-clock limit per "
                                                  "study in seconds: a study past it is stopped and becomes a TIMEOUT "
                                                  "row " + setting_help("study_timeout_s", "; 0 = none"),
                                                  show_default=False),
    max_memory: Optional[int] = typer.Option(None, "--max-memory", min=0, help="Memory limit per worker in MB "
                                             "(address space): a study past it becomes an OUT_OF_MEMORY row "
                                             + setting_help("max_memory_mb", "; 0 = 90 % of RAM / workers"),
                                             show_default=False),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address: studies are "
                                            "preprocessed by that cluster's workers, which must see STUDIES at the "
                                            "same path "
                                            + setting_help("scheduler", default="none (local worker processes)"),
                                            show_default=False),
    scheduler_file: Optional[Path] = typer.Option(None, "--scheduler-file", help="JSON file written by `dask "
                                                  "scheduler --scheduler-file`, instead of --scheduler "
                                                  + setting_help("scheduler_file", default="none"),
                                                  show_default=False),
    dask_resources: Optional[str] = typer.Option(None, "--dask-resources", help="Dask resources each task needs, "
                                                 "e.g. GPU=1: studies and inference batches go only to workers "
                                                 "started with --resources GPU=1 "
                                                 + setting_help("dask_resources",
                                                                default="none (any worker; inference here)"),
                                                 show_default=False),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights folder with manifest.json "
                                           + setting_help("weights_dir", default="the shipped weights/"),
                                           show_default=False),
    device: DeviceOpt = None,
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Studies per inference batch " + setting_help("batch_size"),
                                             show_default=False),
    hdbet_mode: HdBetModeOpt = None,
    hdbet_backend: HdBetBackendOpt = None,
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="HD-BET test-time mirroring "
                                       "(~8x slower on CPU) " + setting_help("hdbet_tta"), show_default=False),
    lesion_masks: LesionMasksOpt = None,
    lesion_detector: Optional[str] = typer.Option(None, "--lesion-detector", help="Where the lesion comes from "
                                                  "when no user mask is given: 'segmenter' (the shipped ONNX "
                                                  "segmenter, trained on synthetic images only; enhancing, core and "
                                                  "oedema volumes) or 'heuristic' (the T1ce - T1 enhancement map "
                                                  "with T2 evidence; no volumes by compartment) "
                                                  + setting_help("lesion_detector"), show_default=False),
    keep_intermediate: Optional[Path] = typer.Option(None, "--keep-intermediate", help="Write per-study "
                                                     "co-registered volumes, brain and lesion masks and the model "
                                                     "box as NIfTI here "
                                                     + setting_help("keep_intermediate_dir", default="none"),
                                                     show_default=False),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Write per-study QC pictures (T1, T2, T1ce through the "
                                      "lesion with brain / lesion outlines and a registration check) and an "
                                      "index.html overview of every study here "
                                      + setting_help("qc_dir", default="none"),
                                      show_default=False),
    dicom_out: Optional[Path] = typer.Option(None, "--dicom-out", help="For each DICOM study: write a DICOM SEG "
                                             "of the lesion on the T1ce's own frames, a TID 1500 structured report "
                                             "and the QC picture as a secondary capture to "
                                             "DIR/<StudyInstanceUID>/ (they carry the patient's identity, to file "
                                             "under the source study) " + setting_help("dicom_out", default="none"),
                                             show_default=False),
    send: Optional[str] = typer.Option(None, "--send", help="C-STORE the DICOM objects to this PACS, "
                                       "AE@HOST:PORT (needs --dicom-out); a PACS that is down leaves them queued "
                                       "for the next run or `recnec send` " + setting_help("send", default="none"),
                                       show_default=False),
    calling_ae: Optional[str] = typer.Option(None, "--calling-ae", help="Our AE title when sending "
                                             + setting_help("calling_ae"), show_default=False),
    explain: Optional[bool] = typer.Option(None, "--explain/--no-explain", help="With --qc: also draw where the "
                                           "model looked (occlusion sensitivity through the ONNX ensemble, about 15 s "
                                           "per study) " + setting_help("explain"),
                                           show_default=False),
    rules: Optional[Path] = typer.Option(None, "--rules", help="Site rules file (TOML) for series "
                                         "classification " + setting_help("rules_file", default="none"),
                                         show_default=False),
    grid_spacing: Optional[float] = typer.Option(None, "--grid-spacing", help="Common grid spacing in mm "
                                                 + setting_help("grid_spacing_mm"), show_default=False),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch/ONNX Runtime "
                                          + setting_help(
                                              "threads", "; 0 = cores // workers, or the libraries' own with "
                                              "--workers 0"),
                                          show_default=False),
    dicom_locations: bool = typer.Option(False, "--dicom-locations", help="Also report the folders of DICOM "
                                         "studies (off by default: export folder names may contain patient "
                                         "names)."),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    from ..orchestration.scan import check_scan_paths, output_paths

    with error_boundary():
        from ..config import resolve_settings
        from ..orchestration.scan import scan as run_scan

        settings = resolve_settings({
            "weights_dir": weights, "device": device, "batch_size": batch_size,
            "hdbet_mode": hdbet_mode.value if hdbet_mode else None, "hdbet_tta": tta,
            "hdbet_backend": hdbet_backend.value if hdbet_backend else None,
            "lesion_masks_dir": lesion_masks, "lesion_detector": lesion_detector,
            "keep_intermediate_dir": keep_intermediate,
            "qc_dir": qc, "explain": explain,
            "dicom_out": dicom_out, "send": send, "calling_ae": calling_ae,
            "rules_file": rules, "grid_spacing_mm": grid_spacing, "threads": threads,
            "state_file": state, "settle_minutes": settle_minutes, "pseudonym_key_file": pseudonym_key_file,
            "workers": workers, "study_timeout_s": study_timeout, "max_memory_mb": max_memory,
            "scheduler": scheduler, "scheduler_file": scheduler_file, "dask_resources": dask_resources,
        })
        check_scan_paths(studies, out=out, settings=settings)  # before the log file is created
        setup_logging(verbose=verbose, quiet=quiet)  # console now; the log file once the lock is held

        def open_log_file() -> None:  # a run refused with exit 75 never rotates the running scan's log
            setup_logging(verbose=verbose, quiet=quiet, log_file=output_paths(out, settings)["log"])

        use_bar = sys.stderr.isatty() and not quiet
        kwargs = dict(out=out, settings=settings, fmt=fmt.value, force=force, retry_failed=retry_failed,
                      dicom_locations=dicom_locations, on_locked=open_log_file)
        if use_bar:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                          transient=True) as progress:
                task = progress.add_task("scanning", total=None)

                def on_progress(study_id: str, done: int, total: int) -> None:
                    progress.update(task, total=total, completed=done, description=f"scanning {study_id[-24:]}")

                def on_done(result, row) -> None:
                    progress.advance(task)

                summary = run_scan(studies, on_progress=on_progress, on_study_done=on_done, **kwargs)
        else:
            summary = run_scan(studies, **kwargs)
        if not quiet:
            _print_table(summary.rows)
        else:  # the one line cron mails (without --quiet it is the last log line already)
            typer.echo(summary.line(), err=True)
    raise typer.Exit(summary.exit_code)


def _confidence_cell(row) -> str:
    """``lesion_confidence``, with ``LOW`` when the row is flagged ``LESION_LOW_CONFIDENCE``."""
    from ..qc.index import low_confidence

    return f"{row.get('lesion_confidence', '')}{' LOW' if low_confidence(row) else ''}"


def _print_table(rows) -> None:
    from rich.table import Table

    table = Table(title="recnec scan (research use only; synthetic-cohort weights, not clinically validated)")
    for col in ("study", "status", "p_recurrence", "spread", "label", "applicability", "lesion mL", "lesion src",
                "lesion conf", "seconds", "run"):
        table.add_column(col, overflow="fold")
    for row in rows:
        msg = str(row["error_message"])
        if msg.startswith(f"{row['status']}:"):
            msg = msg[len(row["status"]) + 1:].strip()
        status = row["status"] if row["status"] == "OK" else f"{row['status']}: {msg[:70]}"
        if row.get("present_in_tree") == "no":
            status += " (no longer in the tree)"
        sid = str(row["study_id"])
        table.add_row(sid if len(sid) <= 32 else "..." + sid[-29:], status, str(row["p_recurrence"]),
                      str(row["ensemble_spread"]), str(row["label"]), str(row.get("applicability", "")),
                      str(row["lesion_volume_ml"]),
                      str(row["lesion_source"]), _confidence_cell(row), str(row["seconds_total"]),
                      str(row.get("run_id", ""))[:16])
    results_console().print(table)
