"""``recnec train-segmenter``: a thin wrapper over :mod:`recnec_cli.train.segmenter`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from ..exitcodes import EXIT_OK
from .common import QuietOpt, VerboseOpt, error_boundary, results_console, setup_logging

log = logging.getLogger("recnec.train")

HELP = """Train the lesion segmenter on synthetic images only (the SynthSeg way) and export it to ONNX.

Every training image is drawn from a label map of real MNI152 anatomy with lesions of several
kinds (rim-enhancing with a necrotic or cystic core, solid, multifocal, cortical reaching the
brain surface, periventricular, a resection cavity with an enhancing margin) and the structures
that enhance normally (dural sinuses, cortical veins, falx, choroid plexus), with random
intensities per label, bias field, blur, noise and missing channels. The network (MONAI UNet,
inputs T1, T2, T1ce, FLAIR on a 2 mm grid) labels enhancing tissue, non-enhancing core and
oedema; `recnec scan` takes the lesion from it.

OUT receives segmenter.onnx and segmenter.json (SHA-256, configuration, validation Dice, library
versions); nothing else in OUT is touched, so OUT may be the ensemble's folder. Work files
(checkpoint every 100 steps, losses.csv) go to OUT/.segmenter-work: an interrupted run started
again with the same options resumes there and ends with the same bytes.

Examples:

\b
  recnec train-segmenter --reproduce-shipped --out weights/   # the shipped segmenter (~45 min, 1 core)
  recnec train-segmenter --out my_weights/ --steps 4000 --seed 1

RESEARCH USE ONLY: trained on synthetic images, never on patients; not clinically validated.
"""


def register(app: typer.Typer) -> None:
    app.command("train-segmenter", help=HELP, no_args_is_help=True)(train_segmenter)


def train_segmenter(
    out: Path = typer.Option(..., "--out", help="Folder for segmenter.onnx and segmenter.json (created if needed)."),
    reproduce_shipped: bool = typer.Option(False, "--reproduce-shipped", help="The shipped segmenter's exact "
                                           "configuration (same bytes on the same library versions)."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Training steps (one synthetic image "
                                        "each) [default: 2000]", show_default=False),
    seed: Optional[int] = typer.Option(None, "--seed", min=0, help="Random seed [default: 0]",
                                       show_default=False),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="torch CPU threads; the weights' "
                                          "bytes depend on it [default: 1]", show_default=False),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    with error_boundary():
        from dataclasses import replace

        from ..errors import UsageError
        from ..train.segmenter import SHIPPED
        from ..train.segmenter import train_segmenter as run

        setup_logging(verbose=verbose, quiet=quiet)
        if reproduce_shipped and any(v is not None for v in (steps, seed, threads)):
            raise UsageError("--reproduce-shipped uses the shipped configuration: drop --steps / --seed / --threads")
        cfg = replace(SHIPPED, **{k: v for k, v in (("steps", steps), ("seed", seed), ("threads", threads))
                                  if v is not None})
        use_bar = sys.stderr.isatty() and not quiet
        if use_bar:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            bar = Progress(TextColumn("training segmenter"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                           TextColumn("loss {task.fields[loss]:.3f}"), TimeRemainingColumn(), transient=True)
            task = bar.add_task("train", total=cfg.steps, loss=float("nan"))

            def progress(step: int, total: int, loss: float) -> None:
                bar.update(task, completed=step, loss=loss)
        else:
            bar = None

            def progress(step: int, total: int, loss: float) -> None:
                if step % 100 == 0 or step == total:
                    log.info("segmenter step %d/%d: loss %.4f", step, total, loss)

        if bar is not None:
            with bar:
                manifest = run(out, cfg, progress=progress)
        else:
            manifest = run(out, cfg, progress=progress)
        if not quiet:
            v = manifest["validation"]
            results_console().print(
                f"segmenter written to {out}: sha256 {manifest['files']['segmenter.onnx'][:12]}..., "
                f"validation Dice (enhancing) median {v['dice_enhancing_median']:.3f} on {v['n']} synthetic "
                f"images, {manifest['training_seconds']:.0f} s")
    raise typer.Exit(EXIT_OK)
