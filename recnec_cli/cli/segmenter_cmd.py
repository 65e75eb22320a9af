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
versions) and then lesion_score.json: a logistic score fitted on 225 more synthetic heads (150
with a lesion, 75 without) that ranks the segmenter's enhancing components and tells lesions from
the choroid plexus and vessels (recnec scan's lesion_confidence; below 0.1 NO_ENHANCING_LESION).
--lesion-score-only refits just that file for the segmenter already in OUT (about 5.5 min, 1 core).
Nothing else in OUT is touched, so OUT may be the ensemble's folder. Work files
(checkpoint every 100 steps, losses.csv) go to OUT/.segmenter-work: an interrupted run started
again with the same options resumes there and ends with the same bytes.

Examples:

\b
  recnec train-segmenter --reproduce-shipped --out weights/   # the shipped segmenter (33 min, 1 core)
  recnec train-segmenter --lesion-score-only --out weights/   # the shipped lesion score alone
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
    lesion_score_only: bool = typer.Option(False, "--lesion-score-only", help="Only refit lesion_score.json "
                                           "for the segmenter already in OUT (its shipped configuration)."),
    quiet: QuietOpt = False,
    verbose: VerboseOpt = 0,
) -> None:
    with error_boundary():
        from dataclasses import replace

        from ..errors import UsageError
        from ..train.segmenter import SHIPPED
        from ..train.segmenter import train_segmenter as run

        setup_logging(verbose=verbose, quiet=quiet)
        if lesion_score_only:
            if any(v is not None for v in (steps, seed, threads)):
                raise UsageError("--lesion-score-only refits the score alone: drop --steps / --seed / --threads")
            _fit_score(out, quiet)
            raise typer.Exit(EXIT_OK)
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
        _fit_score(out, quiet)
    raise typer.Exit(EXIT_OK)


def _fit_score(out: Path, quiet: bool) -> None:
    """Fit ``out/lesion_score.json`` (:func:`recnec_cli.train.lesion_score.fit_lesion_score`) with a
    progress bar on a terminal, log lines every 25 heads otherwise."""
    from ..train.lesion_score import fit_lesion_score

    if sys.stderr.isatty() and not quiet:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("fitting the lesion score"), BarColumn(),
                       TextColumn("{task.completed}/{task.total} heads"), TimeRemainingColumn(), transient=True)
        task = bar.add_task("score", total=None)
        with bar:
            doc = fit_lesion_score(out, progress=lambda done, total: bar.update(task, completed=done, total=total))
    else:
        def progress(done: int, total: int) -> None:
            if done % 25 == 0 or done == total:
                log.info("lesion score: head %d/%d", done, total)

        doc = fit_lesion_score(out, progress=progress)
    if not quiet:
        t = doc["training"]
        results_console().print(
            f"lesion score written to {out / 'lesion_score.json'}: {t['components']} components "
            f"({t['lesion_components']} lesion) from {t['heads']} synthetic heads, {doc['seconds']:.0f} s")
