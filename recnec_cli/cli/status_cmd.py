"""``recnec status --state FILE``: what a scan's state holds (counts, last runs, failures)."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..exitcodes import EXIT_OK
from .common import error_boundary, results_console

STATUS_HELP = """Show what a scan state (the SQLite file beside a report) holds.

Counts by status of the studies still in the tree, the last runs (start, finish, counts, exit
code; a run without a finish time was killed or is still running), the DICOM objects sent to each
PACS (sent, pending, failed), and every failed study with its error code and message. Reads the
file only; safe while a scan runs. With --qc DIR, also (re)writes DIR/index.html, the QC
overview of every study in the state, linking the pictures a `recnec scan --qc DIR` drew there.

Examples:

\b
  recnec status --state /reports/recnec.state.sqlite
  recnec status --state report.state.sqlite --format json | jq .failed
  recnec status --state report.state.sqlite --qc qc/      # rebuild qc/index.html

Exit codes: 0 shown, 2 no such state file or not a recnec state.
"""


class StatusFormat(str, Enum):
    table = "table"
    json = "json"


def register(app: typer.Typer) -> None:
    app.command("status", help=STATUS_HELP, no_args_is_help=True)(status)


def status(
    state: Path = typer.Option(..., "--state", help="The .state.sqlite file of a report.", show_default=False),
    fmt: StatusFormat = typer.Option(StatusFormat.table, "--format", "-f", help="table or json (stdout)."),
    runs: int = typer.Option(5, "--runs", min=1, help="How many recent runs to show."),
    qc: Optional[Path] = typer.Option(None, "--qc", help="Also write DIR/index.html (QC overview) from the state.",
                                      show_default=False),
) -> None:
    with error_boundary():
        from ..errors import UsageError
        from ..orchestration.state import ScanState, iter_status_counts

        if not state.is_file():
            raise UsageError(f"no state file at {state}")
        with ScanState(state) as st:
            studies = st.all()
            recent = st.runs(limit=runs)
            rows = None
            if qc is not None:
                from ..orchestration.followups import annotate
                from ..orchestration.scan import report_row

                rows = [report_row(s) for s in studies]
                annotate(st, rows)  # the timeline columns (the index groups by patient)
        if qc is not None and rows is not None:
            from ..qc.index import write_index

            if qc.exists() and not qc.is_dir():
                raise UsageError(f"--qc {qc} is a file, not a folder")
            index = write_index(qc, rows, title=f"recnec status: {state.name}",
                                run=recent[0] if recent else None)
            typer.echo(f"wrote {index}", err=True)
        failed = [{"study_id": s.study_id, "status": s.status, "error_message": s.row.get("error_message", ""),
                   "failed_stage": s.row.get("failed_stage", ""), "run_id": s.run_id, "present": s.present}
                  for s in studies if s.status not in ("OK", "DEFERRED")]
        with ScanState(state) as st:
            sends = st.send_counts()
        info = {"state": str(state), "studies": len(studies), "not_present": sum(not s.present for s in studies),
                "status_counts": dict(iter_status_counts(studies)), "runs": recent, "failed": failed,
                "sends": sends}
        if fmt is StatusFormat.json:
            typer.echo(json.dumps(info, indent=2))
        else:
            _tables(info)
    raise typer.Exit(EXIT_OK)


def _tables(info: dict) -> None:
    from rich.table import Table

    console = results_console()
    console.print(f"{info['state']}: {info['studies']} studies ({info['not_present']} no longer in the tree)")
    t = Table()
    t.add_column("status (studies in the tree)")
    t.add_column("studies", justify="right")
    for k, v in info["status_counts"].items():
        t.add_row(k, str(v))
    console.print(t)
    r = Table(title="last runs", title_justify="left")
    for col in ("run", "started (UTC)", "finished (UTC)", "found", "processed", "unchanged", "deferred", "failed",
                "seconds", "exit"):
        r.add_column(col)
    for run in info["runs"]:
        s = run["summary"] or {}
        r.add_row(run["run_id"], run["started_utc"], run["finished_utc"] or "(killed or running)",
                  *(str(s.get(k, "")) for k in ("found", "processed", "unchanged", "deferred", "failed", "seconds")),
                  "" if run["exit_code"] is None else str(run["exit_code"]) + (f" {run['stop_reason']}" if run[
                      "stop_reason"] else ""))
    console.print(r)
    if info["sends"]:
        p = Table(title="DICOM objects sent to PACS (pending: queued; failed: tried, retried by the next run or "
                  "`recnec send`)", title_justify="left")
        for col in ("PACS", "status", "objects", "last attempt (UTC)"):
            p.add_column(col)
        for x in info["sends"]:
            p.add_row(x["destination"], x["status"], str(x["objects"]), x["last_attempt_utc"] or "")
        console.print(p)
    if info["failed"]:
        f = Table(title="failed studies", title_justify="left")
        for col in ("study", "status", "stage", "message", "in tree"):
            f.add_column(col, overflow="fold")
        for x in info["failed"]:
            f.add_row(x["study_id"], x["status"], x["failed_stage"], x["error_message"][:120],
                      "yes" if x["present"] else "no")
        console.print(f)
