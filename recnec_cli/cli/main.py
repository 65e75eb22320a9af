"""``recnec`` entry point: builds the Typer app from one module per command.

Exit codes (documented in ``--help`` and the README):

* 0: every study succeeded;
* 1: at least one study failed (its row says why); the batch still ran to the end;
* 2: usage or environment error (bad option, missing weights, broken installation);
* 75: ``scan`` only: another scan holds the state's lock (nothing done);
* 130 / 143: ``scan`` stopped by SIGINT / SIGTERM (finished studies are in the report).

Heavy libraries (torch, onnxruntime, SimpleITK, HD-BET) are imported inside command bodies only,
so ``recnec --help`` and ``recnec --version`` stay fast.
"""

from __future__ import annotations

import importlib

import typer

from .. import DISCLAIMER, __version__
from ..exitcodes import EXIT_LOCKED, EXIT_OK, EXIT_SIGINT, EXIT_SIGTERM, EXIT_STUDY_FAILED, EXIT_USAGE

HELP = f"""recnec: tumour recurrence vs radiation necrosis from T1, T2 and T1ce MRI.

Walks a folder of studies (DICOM, NIfTI or NRRD), picks each study's T1, T2 and contrast-enhanced
T1 (T1ce), converts, co-registers and skull-strips them (HD-BET), finds the enhancing lesion and
runs an ONNX CNN ensemble. Method after Frontiers in Oncology 2025 (PubMed 40548110).

{DISCLAIMER}

Exit codes: {EXIT_OK} all studies OK, {EXIT_STUDY_FAILED} some studies failed (see the report), {EXIT_USAGE}
usage/environment error, {EXIT_LOCKED} another scan holds the state, {EXIT_SIGINT} / {EXIT_SIGTERM} stopped by
SIGINT / SIGTERM.
"""

app = typer.Typer(
    name="recnec",
    help=HELP,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,  # never print local variables (patient data)
    rich_markup_mode=None,
)

COMMAND_MODULES = ("scan", "status_cmd", "send_cmd", "inspect_cmd", "synth_cmd", "train_cmd", "segmenter_cmd")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"recnec {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """recnec command group."""


for _name in COMMAND_MODULES:
    importlib.import_module(f"{__package__}.{_name}").register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
