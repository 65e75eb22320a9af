"""``recnec scan STUDIES --out report.csv``: the batch scanner."""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from .. import DISCLAIMER
from .common import (
    EXIT_OK,
    EXIT_STUDY_FAILED,
    HdBetMode,
    check_writable_dir,
    check_writable_file,
    error_boundary,
    is_inside,
    results_console,
    setup_logging,
)

log = logging.getLogger("recnec.scan")


class ReportFormat(str, Enum):
    csv = "csv"
    json = "json"


SCAN_HELP = f"""Scan a folder of studies and write one report row per study.

STUDIES is walked once, reading headers only. DICOM instances are grouped by PatientID /
StudyInstanceUID / SeriesInstanceUID whatever the folder layout; each NIfTI (.nii, .nii.gz) or
NRRD folder is one study, roles taken from file names (BIDS T1w / T2w / ce-gadolinium, BraTS
t1n / t1c / t2w, tokens t1ce, post_gad ...). A file named lesion_mask.nii.gz in a NIfTI study
folder (or DIR/<study_id>.nii.gz with --lesion-masks DIR) is used as the lesion mask; otherwise the
enhancing lesion is found automatically (T1ce against the registered T1 inside the brain).

Writes REPORT (CSV or JSON), REPORT's stem + .manifest.json (versions, execution provider, model
checksums, settings, timings) and + .log (debug log). The input tree is never modified.

Examples:

  recnec scan /data/exports --out report.csv

  recnec scan /data/exports --out report.json --format json --keep-intermediate qc/

  # cron: plain log lines, no colours (add --quiet for warnings only); exit code 1 if any study failed
  recnec scan /data/exports --out /reports/$(date +%F).csv

Exit codes: 0 every study OK, 1 some studies failed (see status / error_code), 2 usage or
environment error (nothing scanned; only the .log is written), 130 interrupted (no report).

{DISCLAIMER}
"""


def register(app: typer.Typer) -> None:
    app.command("scan", help=SCAN_HELP, no_args_is_help=True)(scan)


def scan(
    studies: Path = typer.Argument(..., help="Folder of studies (DICOM, NIfTI or NRRD), walked recursively.",
                                   show_default=False),
    out: Path = typer.Option(Path("report.csv"), "--out", "-o", help="Report file to write."),
    fmt: ReportFormat = typer.Option(ReportFormat.csv, "--format", "-f", help="Report format."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights folder with manifest.json "
                                           "[default: the shipped weights/]", show_default=False),
    device: Optional[str] = typer.Option(None, "--device", help="auto | cpu | cuda | cuda:N "
                                         "(ONNX Runtime CUDA provider and HD-BET on GPU) [default: auto]",
                                         show_default=False),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1,
                                             help="Studies per inference batch [default: 8]", show_default=False),
    hdbet_mode: Optional[HdBetMode] = typer.Option(None, "--hdbet-mode", help="HD-BET fast (1 fold) or "
                                                   "accurate (5 folds, ~5x slower) [default: fast]",
                                                   show_default=False),
    tta: Optional[bool] = typer.Option(None, "--tta/--no-tta", help="HD-BET test-time mirroring "
                                       "(~8x slower on CPU) [default: off]", show_default=False),
    lesion_masks: Optional[Path] = typer.Option(None, "--lesion-masks", help="Folder of lesion masks named "
                                                "<study_id>.nii.gz or <study_id>_lesion_mask.nii.gz (DICOM: the "
                                                "StudyInstanceUID), each on the grid of one of the study's series.",
                                                show_default=False),
    keep_intermediate: Optional[Path] = typer.Option(None, "--keep-intermediate", help="Write per-study "
                                                     "co-registered volumes, brain and lesion masks and the model "
                                                     "box as NIfTI here.", show_default=False),
    rules: Optional[Path] = typer.Option(None, "--rules", help="Site rules file (TOML) for series "
                                         "classification.", show_default=False),
    grid_spacing: Optional[float] = typer.Option(None, "--grid-spacing", help="Common grid spacing in mm "
                                                 "[default: 1.0]", show_default=False),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch/ONNX Runtime "
                                          "(0 = library default).", show_default=False),
    dicom_locations: bool = typer.Option(False, "--dicom-locations", help="Also report the folders of DICOM "
                                         "studies (off by default: export folder names may contain patient "
                                         "names)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only on stderr; no table."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Debug messages on stderr."),
) -> None:
    out = out.expanduser()
    log_file = out.with_suffix(".log")
    manifest_path = out.with_name(out.stem + ".manifest.json")
    with error_boundary():
        from ..config import resolve_settings
        from ..errors import UsageError

        if not studies.is_dir():
            raise UsageError(f"STUDIES must be a folder: {studies}")
        for what, p in (("--out", out), ("--keep-intermediate", keep_intermediate)):
            if p is not None and is_inside(p, studies):
                raise UsageError(f"{what} {p} lies inside the input tree {studies}; recnec never writes there")
        check_writable_file(out, "--out")
        if keep_intermediate is not None:
            check_writable_dir(keep_intermediate, "--keep-intermediate")
        for what, p in (("--lesion-masks", lesion_masks), ("--weights", weights)):
            if p is not None and not p.is_dir():
                raise UsageError(f"{what} {p} is not a folder")
        if rules is not None and not rules.is_file():
            raise UsageError(f"--rules {rules} is not a file")
        settings = resolve_settings({
            "weights_dir": weights, "device": device, "batch_size": batch_size,
            "hdbet_mode": hdbet_mode.value if hdbet_mode else None, "hdbet_tta": tta,
            "lesion_masks_dir": lesion_masks, "keep_intermediate_dir": keep_intermediate,
            "rules_file": rules, "grid_spacing_mm": grid_spacing, "threads": threads,
        })
        setup_logging(verbose=verbose, quiet=quiet, log_file=log_file)
        code = _run(studies, out, fmt.value, manifest_path, settings, quiet=quiet, dicom_locations=dicom_locations)
    raise typer.Exit(code)


def _run(studies: Path, out: Path, fmt: str, manifest_path: Path, settings, *, quiet: bool,
         dicom_locations: bool = False) -> int:
    from ..stages.discover import discover
    from ..orchestration.pipeline import Resources, run_batch
    from ..orchestration.report import (
        atomic_write_text,
        result_row,
        run_manifest,
        utcnow,
        write_report,
    )

    started = utcnow()
    log.info("loading models (HD-BET %s%s, ONNX ensemble from %s)", settings.hdbet_mode,
             "+TTA" if settings.hdbet_tta else "", settings.weights_dir)
    resources = Resources.load(settings)
    ens = resources.ensemble
    log.info("ensemble %s: %d models, provider %s, threshold %.3f", ens.model_version, ens.n_models,
             ens.provider, ens.threshold)
    log.info("discovering studies under %s", studies)
    found = discover(studies, settings=settings)
    log.info("found %d studies", len(found))
    if not found:
        log.warning("no studies found under %s", studies)

    rows: list[dict] = []
    use_bar = sys.stderr.isatty() and not quiet
    done_count = [0]

    def on_done(r) -> None:
        done_count[0] += 1
        row = result_row(r, threshold=ens.threshold, model_version=ens.model_version,
                         dicom_locations=dicom_locations)
        msg = (f"p_recurrence={row['p_recurrence']} label={row['label']}" if r.ok
               else r.error_message if r.error_message.startswith(r.error_code) else
               f"{r.error_code}: {r.error_message}")
        log.info("[%d/%d] %s %s %s (%.1f s)", done_count[0], len(found), row["study_id"], r.status, msg,
                 r.timings.get("total", 0.0))

    if use_bar:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      transient=True) as progress:
            task = progress.add_task("scanning", total=len(found))

            def on_start(s) -> None:
                progress.update(task, description=f"scanning {s.study_id[-24:]}")

            def on_done_bar(r) -> None:
                on_done(r)
                progress.advance(task)

            results = run_batch(found, settings=settings, resources=resources, on_study_done=on_done_bar,
                                on_study_start=on_start)
    else:
        results = run_batch(found, settings=settings, resources=resources, on_study_done=on_done)

    rows = [result_row(r, threshold=ens.threshold, model_version=ens.model_version, dicom_locations=dicom_locations)
            for r in results]
    write_report(out, rows, fmt=fmt)
    finished = utcnow()
    manifest = run_manifest(settings_dict=settings.to_dict(), ensemble=ens, results=results, started=started,
                            finished=finished, input_root=str(studies.resolve()), report_path=str(out.resolve()),
                            n_discovered=len(found), decoders=resources.decoders)
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")
    n_ok = sum(r.ok for r in results)
    log.info("wrote %s (%d studies: %d OK, %d failed) and %s", out, len(results), n_ok, len(results) - n_ok,
             manifest_path.name)
    if not quiet:
        _print_table(rows)
    return EXIT_OK if n_ok == len(results) else EXIT_STUDY_FAILED


def _print_table(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title="recnec scan (research use only; synthetic-cohort weights, not clinically validated)")
    for col in ("study", "status", "p_recurrence", "spread", "label", "lesion mL", "lesion src", "seconds"):
        table.add_column(col, overflow="fold")
    for row in rows:
        msg = str(row["error_message"])
        if msg.startswith(f"{row['status']}:"):
            msg = msg[len(row["status"]) + 1:].strip()
        status = row["status"] if row["status"] == "OK" else f"{row['status']}: {msg[:70]}"
        sid = str(row["study_id"])
        table.add_row(sid if len(sid) <= 32 else "..." + sid[-29:], status, str(row["p_recurrence"]), str(row["ensemble_spread"]),
                      str(row["label"]), str(row["lesion_volume_ml"]), str(row["lesion_source"]),
                      str(row["seconds_total"]))
    results_console().print(table)
