"""Where the benchmarks find their real cases: ``$RECNEC_SHARED_DATA`` (default ``../shared/data``)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_real() -> Path:
    """The ``real/`` folder of the shared data (may not exist)."""
    return Path(os.environ.get("RECNEC_SHARED_DATA", REPO.parent / "shared" / "data")) / "real"


def tcga_t1ce() -> Path | None:
    """The real TCGA-FG-6692 T1ce NIfTI, or None when the shared data is absent."""
    tcga = shared_real() / "nifti_tcga_fg_6692_lgg_siemens"
    ce = sorted(tcga.glob("*POST_GAD*_t1c.nii.gz")) if tcga.is_dir() else []
    return ce[0] if ce else None
