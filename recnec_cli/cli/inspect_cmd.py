"""``recnec inspect STUDY``: every series found, its role, confidence and reasons; no models run."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from ..exitcodes import EXIT_OK
from .common import error_boundary, results_console, setup_logging


class InspectFormat(str, Enum):
    table = "table"
    json = "json"


INSPECT_HELP = """Show how recnec sees a study (or a tree of studies) without running any model.

One line per series: series id (SeriesInstanceUID, UID#echo=2 for split series, or the file path),
role (T1, T2, T1ce, FLAIR, PD, DWI, SWI, PERFUSION, LOCALIZER, DERIVED, NON_MR or UNDETERMINED),
confidence, whether it is chosen for the model, and the reasons. Below the confidence threshold
(0.7, RECNEC_ROLE_CONFIDENCE_THRESHOLD) a role is UNDETERMINED and the competing roles are shown.

Examples:

\b
  recnec inspect /data/exports/patient42
  recnec inspect /data/exports --format json > roles.json
  recnec inspect study/ --rules site_rules.toml --no-image-evidence

Exit codes: 0 shown, 2 usage error (bad rules file, nothing found, unreadable input).
"""


def register(app: typer.Typer) -> None:
    app.command("inspect", help=INSPECT_HELP, no_args_is_help=True)(inspect)


def inspect(
    study: Path = typer.Argument(..., help="Study folder (or a tree of studies).", show_default=False),
    fmt: InspectFormat = typer.Option(InspectFormat.table, "--format", "-f",
                                      help="table (Rich, for people) or json (stdout, one entry "
                                      "per series)."),
    rules: Optional[Path] = typer.Option(None, "--rules", help="Site rules TOML that adds tokens "
                                         "or pins roles (validated on load).", show_default=False),
    image_evidence: bool = typer.Option(True, "--image-evidence/--no-image-evidence",
                                        help="Measure enhancement in T1 series whose header is "
                                        "silent about contrast (converts them: seconds each)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Debug log on stderr."),
) -> None:
    """Print the role table of STUDY."""
    with error_boundary():
        from ..config import resolve_settings
        from ..errors import UsageError
        from ..stages.classify import inspect_study, load_rules

        setup_logging(verbose=verbose, quiet=verbose == 0)
        if not study.exists():
            raise UsageError(f"no such file or folder: {study}")
        settings = resolve_settings({"rules_file": rules})
        loaded = load_rules(settings.rules_file)
        rows = inspect_study(study, settings=settings, rules=loaded,
                             use_image_evidence=image_evidence)
        if fmt is InspectFormat.json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            _table(rows)
    raise typer.Exit(EXIT_OK)


def _table(rows: list[dict]) -> None:
    from rich.table import Table

    console = results_console()
    studies: dict[str, list[dict]] = {}
    for r in rows:
        studies.setdefault(r["study_id"], []).append(r)
    for sid, rs in studies.items():
        status = rs[0]["study_status"] or "OK"
        t = Table(title=f"study {sid}  [{status}]", title_justify="left", show_lines=True)
        t.add_column("series")
        t.add_column("description")
        t.add_column("role")
        t.add_column("conf", justify="right")
        t.add_column("chosen")
        t.add_column("reasons")
        for r in rs:
            reasons = "; ".join(r["reasons"])
            if r["competing"]:
                reasons += "; competing: " + ", ".join(f"{a} {b:.2f}" for a, b in r["competing"])
            t.add_row(r["series_id"], r["description"], r["role"], f"{r['confidence']:.2f}",
                      r["chosen_as"] or "", reasons)
        console.print(t)
        if rs[0]["study_message"]:
            console.print(rs[0]["study_message"])
