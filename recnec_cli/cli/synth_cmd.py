"""``recnec synth``: thin wrapper over :func:`recnec_cli.synth.write_cohort`."""

from __future__ import annotations

import logging
import sys
from enum import Enum
from pathlib import Path

import typer

from .. import DISCLAIMER
from ..errors import UsageError
from ..exitcodes import EXIT_OK
from .common import error_boundary, setup_logging

log = logging.getLogger("recnec.synth")


class Fmt(str, Enum):
    nifti = "nifti"
    dicom = "dicom"


class Space(str, Enum):
    study = "study"
    model = "model"


SYNTH_HELP = f"""Write a reproducible synthetic recurrence / radiation-necrosis cohort to OUT.

Anatomy is the real MNI152 2009 template bundled with nilearn (T1, grey/white matter maps),
warped per subject, with a synthesised CSF/dura/skull/scalp envelope so that skull stripping is
exercised. T1, T2 and T1ce come from tissue classes with per-sequence bias field, Rician noise,
3D 1 mm or 2D thick-slice geometry, vendor-style headers (Siemens/GE/Philips; descriptions in
six languages) and small inter-sequence head motion. Lesions follow published imaging signs as
overlapping tendencies: recurrence -> solid/nodular enhancement, high T2 lesion quotient;
necrosis -> rim / Swiss-cheese / soap-bubble enhancement, low lesion quotient, more oedema.

Output (same seed, same bytes; subject i is the same for any --n):

\b
  --space study --format nifti   OUT/synth-0001/synth-0001_{{T1w,T2w,ce-gadolinium_T1w}}.nii.gz
                                 (+ JSON sidecars); true lesion masks in OUT/masks/<id>_lesion_mask.nii.gz
                                 (--masks-in-study: OUT/<id>/lesion_mask.nii.gz instead)
  --space study --format dicom   OUT/dicom/<pseudonym>/SE<nnnn>/IM<nnnnn>.dcm, one file per slice;
                                 study id = StudyInstanceUID; masks OUT/masks/<UID>_lesion_mask.nii.gz
  --space model                  OUT/tensors/<id>.npy, float32 (3, 40, 40, 40) model inputs
  always                         OUT/labels.csv (study_id,label), OUT/truth.csv (drawn lesion
                                 signs: they reveal the label), OUT/cohort.json

Follow-ups (--follow-ups K, --space study only): every subject gets K later studies besides its
baseline, 56-120 days apart: same anatomy and label, the head repositioned in the scanner (up to
6 degrees and 8 mm, the T1ce too), new bias field and noise; a recurrence grows (radii x
1.08-1.30 per study, up to the baseline draw's largest semi-axis, 19.2 mm), a necrosis stays or
shrinks (x 0.80-1.02). One row per study in labels.csv
and truth.csv, and OUT/follow_ups.csv (subject, time_point, study_id, days_since_baseline,
label, true enhancing/necrotic/oedema/lesion volumes in mL).

\b
  --format dicom                 follow-up k in OUT/dicom/<pseudonym>-fu<k>/, same PatientID,
                                 new StudyInstanceUID, StudyDate shifted
  --format nifti                 every time point BIDS-style: OUT/sub-synth0001/ses-00/
                                 sub-synth0001_ses-00_{{T1w,T2w,ce-gadolinium_T1w}}.nii.gz, study
                                 id sub-synth0001/ses-00, sidecars with AcquisitionDateTime; masks
                                 OUT/masks/sub-synth0001_ses-00_lesion_mask.nii.gz

Scan a study cohort with automatic lesion localisation, or pass --lesion-masks OUT/masks.

Examples:

\b
  recnec synth cohort/ --space model            # 234 tensors for `recnec train` (~2-5 min)
  recnec synth demo/ --n 3 --format dicom       # three DICOM studies (~30 s)
  recnec synth fu/ --n 20 --follow-ups 2 --format dicom   # 20 patients x 3 studies (~15 min)

{DISCLAIMER}
"""


def register(app: typer.Typer) -> None:
    """Add ``recnec synth`` to ``app``."""

    @app.command("synth", help=SYNTH_HELP, no_args_is_help=True)
    def synth(
        out: Path = typer.Argument(..., metavar="OUT",
                                   help="Output folder (created; existing files are overwritten)."),
        n: int = typer.Option(234, "--n", min=1, help="Number of subjects."),
        seed: int = typer.Option(0, "--seed", min=0, help="Cohort seed."),
        fmt: Fmt = typer.Option(Fmt.nifti, "--format", help="Study file format (--space study)."),
        space: Space = typer.Option(Space.study, "--space",
                                    help="study: image files; model: model-input tensors."),
        ratio: str = typer.Option("192:42", "--ratio",
                                  help="recurrence:necrosis ratio (the paper's 192:42)."),
        follow_ups: int = typer.Option(
            0, "--follow-ups", min=0, metavar="K",
            help="Later studies per subject besides the baseline (K+1 time points; --space "
                 "study only). 0: none."),
        masks_in_study: bool = typer.Option(
            False, "--masks-in-study/--no-masks-in-study",
            help="Write each true lesion mask into its study folder (the scan then uses it) "
                 "instead of OUT/masks/."),
        verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="Debug logging."),
        quiet: bool = typer.Option(False, "--quiet", "-q", help="Warnings only; no progress."),
    ) -> None:
        setup_logging(verbose=verbose, quiet=quiet)
        with error_boundary():
            from ..synth import parse_ratio, write_cohort

            try:
                ratio_t = parse_ratio(ratio)
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if space is Space.model and fmt is Fmt.dicom:
                raise UsageError("--format applies to --space study only")
            if space is Space.model and follow_ups:
                raise UsageError("--follow-ups needs --space study: model-space tensors have no "
                                 "follow-up studies")
            info = _run(write_cohort, out, n=n, seed=seed, fmt=fmt.value, space=space.value,
                        ratio=ratio_t, masks_in_study=masks_in_study, follow_ups=follow_ups,
                        quiet=quiet)
            per = info.follow_ups + 1  # studies per subject
            counts = {lab: info.labels[::per].count(lab) for lab in ("recurrence", "necrosis")}
            what = f"{info.n} studies" if per == 1 else (
                f"{len(info.study_ids)} studies ({info.n} subjects x {per} time points)")
            typer.echo(f"{what} ({counts['recurrence']} recurrence, "
                       f"{counts['necrosis']} necrosis"
                       f"{' subjects' if per > 1 else ''}) written to {info.out} in "
                       f"{info.seconds:.1f} s")
        raise typer.Exit(EXIT_OK)


def _run(write_cohort, out: Path, *, n: int, quiet: bool, **kw):
    if quiet or not sys.stderr.isatty():
        def tick(i: int, sid: str) -> None:
            if (i + 1) % 10 == 0 or i + 1 == n:
                log.info("synth: %d/%d subjects", i + 1, n)
        return write_cohort(out, n=n, on_subject=tick, **kw)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    with Progress("[progress.description]{task.description}", BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=Console(stderr=True)) as prog:
        task = prog.add_task("synthesising", total=n)
        return write_cohort(out, n=n, on_subject=lambda i, sid: prog.advance(task), **kw)
