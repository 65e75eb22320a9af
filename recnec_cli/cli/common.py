"""Shared CLI plumbing: logging setup (Rich on a terminal, plain lines for cron), the error boundary."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Iterator

import typer

from ..errors import RecnecError, UsageError

EXIT_OK, EXIT_STUDY_FAILED, EXIT_USAGE = 0, 1, 2


class HdBetMode(str, Enum):
    """HD-BET mode choices shared by every command that skull-strips."""

    fast = "fast"
    accurate = "accurate"


def setup_logging(*, verbose: int = 0, quiet: bool = False, log_file: Path | None = None) -> None:
    """Console log on stderr (Rich when it is a terminal), optional DEBUG log file.

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
    console_handler._recnec = True  # type: ignore[attr-defined]
    root.addHandler(console_handler)
    root.setLevel(logging.DEBUG if log_file is not None else level)
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, mode="w", encoding="utf-8")
        fh.setLevel(logging.DEBUG)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        fh._recnec = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    for noisy in ("dicom2nifti", "pydicom", "matplotlib", "PIL", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    except RecnecError as exc:  # EnvironmentBroken, InferenceError (tampered weights), ...
        msg = exc.message[len(exc.code) + 1:].strip() if exc.message.startswith(f"{exc.code}:") else exc.message
        typer.echo(f"error [{exc.code}]: {msg}", err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(130) from None
    finally:
        _remove_handlers()


def _remove_handlers() -> None:
    """Close the handlers :func:`setup_logging` installed (the log file is flushed and closed; an
    in-process caller such as a test runner is not left with handlers on a closed stream)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_recnec", False):
            root.removeHandler(h)
            h.close()


def results_console():
    """Rich console for results on stdout; 160 columns when stdout is not a terminal (cron, pipes),
    where Rich would otherwise assume 80 and fold every cell."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def check_writable_file(path: Path, what: str) -> None:
    """Refuse, before any work, an output file path that cannot be written (exit code 2)."""
    if path.exists() and path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name such as {path / 'report.csv'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
            break


def check_writable_dir(path: Path, what: str) -> None:
    """Refuse, before any work, an output folder path that is a file or lies under a file."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder")
    check_writable_file(path / "x", what)


def is_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` (resolved) lies inside ``parent`` (resolved)."""
    try:
        child.resolve().relative_to(parent.resolve())
        return True
    except ValueError:
        return False
