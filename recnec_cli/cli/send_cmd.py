"""``recnec send --state FILE --to AE@HOST:PORT``: deliver a scan's DICOM objects to a PACS
afterwards (what a scan with ``--send`` does at the end of each run)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..exitcodes import EXIT_LOCKED, EXIT_OK, EXIT_STUDY_FAILED
from .common import QuietOpt, VerboseOpt, error_boundary, setting_help, setup_logging

SEND_HELP = """Send the DICOM objects a scan wrote (--dicom-out) to a PACS by C-STORE.

Every current object of the state (SEG, SR, secondary capture of each DICOM study) that has not
reached this PACS yet is sent: new ones, and those an earlier attempt could not deliver (PACS
down, association refused, object refused). Each outcome is recorded in the state, so running it
again sends only what is still missing; `recnec status` shows sent, pending and failed objects
per PACS. The objects carry the patient's identity (they must file under the source study): send
them only to a PACS allowed to hold it.

Examples:

\b
  recnec send --state /reports/recnec.state.sqlite --to PACS@pacs.hospital.org:104
  recnec send --state report.state.sqlite --to ORTHANC@127.0.0.1:4242 --calling-ae RECNEC

Exit codes: 0 everything delivered (or nothing to send), 1 some objects not delivered (they stay
queued), 2 bad arguments or no such state, 75 a scan holds the state's lock (try again later).
"""


def register(app: typer.Typer) -> None:
    app.command("send", help=SEND_HELP, no_args_is_help=True)(send)


def send(
    state: Path = typer.Option(..., "--state", help="The .state.sqlite file of a report.", show_default=False),
    to: Optional[str] = typer.Option(None, "--to", show_default=False,
                                     help="The PACS, AE@HOST:PORT " + setting_help("send", default="none")),
    calling_ae: Optional[str] = typer.Option(None, "--calling-ae", help="Our AE title "
                                             + setting_help("calling_ae"), show_default=False),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    code = EXIT_OK
    with error_boundary():
        from filelock import FileLock, Timeout

        from ..config import resolve_settings
        from ..errors import UsageError
        from ..orchestration.dicom_export import deliver
        from ..orchestration.paths import output_paths
        from ..orchestration.state import ScanState
        from ..pacs.send import parse_destination

        settings = resolve_settings({"send": to, "calling_ae": calling_ae, "state_file": state})
        if not settings.send:
            raise UsageError("give the PACS with --to AE@HOST:PORT (or RECNEC_SEND)")
        parse_destination(settings.send, option="--to")
        if not state.is_file():
            raise UsageError(f"no state file at {state}")
        setup_logging(verbose=verbose, quiet=quiet)
        lock = FileLock(str(output_paths(Path("report.csv"), settings)["lock"]), timeout=0)
        try:
            lock.acquire()
        except Timeout:
            typer.echo(f"a recnec scan holds the state {state}; its own --send delivers, or try again later",
                       err=True)
            raise typer.Exit(EXIT_LOCKED) from None
        try:
            with ScanState(state) as st:
                counts = deliver(st, settings.send, calling_ae=settings.calling_ae)
        finally:
            lock.release()
        typer.echo(f"{settings.send}: {counts['sent']} sent, {counts['failed']} not delivered (queued)", err=True)
        code = EXIT_STUDY_FAILED if counts["failed"] else EXIT_OK
    raise typer.Exit(code)
