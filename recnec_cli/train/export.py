"""Export trained folds to ONNX, check them against PyTorch, and write ``manifest.json``.

Each fold becomes ``fold<k>.onnx``: the legacy TorchScript exporter (``torch.onnx.export(...,
dynamo=False, opset_version=17)``, one self-contained file; the dynamo exporter needs onnxscript
and writes a separate ``.onnx.data`` file, ``docs/stack-notes.md``) applied to
:class:`~recnec_cli.train.models.ProbabilityHead`, so the graph maps ``input`` float32
``(N, 3, 40, 40, 40)`` (dynamic ``N``) to ``probability`` ``(N,)``, the probability of recurrence.
Every exported file is run in ONNX Runtime (CPU) on the fold's held-out tensors plus random inputs,
at batch sizes ``N`` and 1, and compared with PyTorch: the maximum absolute difference must be
<= :data:`MAX_ABS_DIFF`.

The manifest is written last, so a folder interrupted mid-export never verifies.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError
from ..stages.infer import INPUT_NAME, MANIFEST_NAME, OUTPUT_NAME, sha256_file
from .models import ProbabilityHead

log = logging.getLogger(__name__)

MAX_ABS_DIFF = 1e-4
OPSET = 17


def export_onnx(model: ProbabilityHead, path: Path, *, shape: tuple[int, ...]) -> None:
    """Write ``model`` (eval mode) as one ONNX file with a dynamic batch axis.

    ``shape`` is one study's tensor shape ``(C, X, Y, Z)``.
    """
    model.eval()
    dummy = torch.zeros((2, *shape), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (one file, no onnxscript): silence its notice
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
            input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            do_constant_folding=True,
        )
    import onnx

    onnx.checker.check_model(onnx.load(str(path)))


def compare_with_torch(model: ProbabilityHead, path: Path, x: np.ndarray, *, threads: int = 1) -> float:
    """Max |ORT - PyTorch| of the probability on float32 ``x`` ``(N, C, X, Y, Z)``.

    Runs the whole batch and each of the first four studies alone (dynamic batch axis).

    Raises
    ------
    TrainingError
        ``ONNX_MISMATCH`` if the difference exceeds :data:`MAX_ABS_DIFF`.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(x, dtype=np.float32)
    model.eval()
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy().astype(np.float64)
    got = np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x})[0], dtype=np.float64)
    diff = float(np.max(np.abs(got - ref))) if len(x) else 0.0
    for i in range(min(4, len(x))):
        one = np.asarray(sess.run([OUTPUT_NAME], {INPUT_NAME: x[i:i + 1]})[0], dtype=np.float64)
        diff = max(diff, float(np.max(np.abs(one - ref[i:i + 1]))))
    if not diff <= MAX_ABS_DIFF:
        raise TrainingError(f"{path.name}: ONNX Runtime differs from PyTorch by {diff:.3g} "
                            f"(limit {MAX_ABS_DIFF})", code="ONNX_MISMATCH")
    return diff


def library_versions() -> dict[str, str]:
    """Versions of the libraries that determine the weights and the metrics."""
    from ..provenance import TRAIN_DISTRIBUTIONS
    from ..provenance import library_versions as versions

    return versions(TRAIN_DISTRIBUTIONS)


def machine() -> dict[str, Any]:
    """Where the run happened (no host names or user names)."""
    import os

    return {
        "platform": platform.platform(terse=True), "machine": platform.machine(),
        "processor": platform.processor() or "", "cpu_count": os.cpu_count(),
        "python_implementation": sys.implementation.name,
    }


def check_out_dir(out: Path) -> list[Path]:
    """Files to replace in ``out`` (a previous recnec ensemble), or ``[]`` for a new/empty folder.

    Raises
    ------
    TrainingError
        ``OUT_NOT_EMPTY`` if ``out`` holds files that are not a previous recnec ensemble.
    """
    out = Path(out)
    if not out.exists():
        return []
    entries = [p for p in out.iterdir() if not p.name.startswith(".") and p.name not in _segmenter_files(out)]
    if not entries:
        return []
    ours: set[str] = set()
    try:
        old = json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
        if str(old.get("format", "")).startswith("recnec-weights"):
            ours = set(old.get("files", {})) | {MANIFEST_NAME}
    except (OSError, ValueError):
        pass
    foreign = sorted(p.name for p in entries if p.name not in ours or not p.is_file())
    if foreign:
        raise TrainingError(
            f"{out} holds files that are not a recnec ensemble ({foreign[:5]}); "
            "choose an empty or new --out folder",
            code="OUT_NOT_EMPTY",
        )
    return entries


def _segmenter_files(out: Path) -> set[str]:
    """The lesion segmenter's files in ``out`` (``segmenter.json`` and what it lists), which an
    ensemble shares its folder with and never replaces (``recnec train-segmenter`` writes them)."""
    from ..stages.segment import SEGMENTER_FORMAT, SEGMENTER_MANIFEST

    try:
        m = json.loads((Path(out) / SEGMENTER_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(m, dict) or m.get("format") != SEGMENTER_FORMAT:
        return set()
    return {SEGMENTER_MANIFEST, *m.get("files", {})}


def prepare_out_dir(out: Path) -> None:
    """Create ``out``, or clear a previous recnec ensemble in it (manifest first).

    Raises
    ------
    TrainingError
        ``OUT_NOT_EMPTY`` (see :func:`check_out_dir`).
    """
    out = Path(out)
    entries = check_out_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    mpath = out / MANIFEST_NAME
    if mpath.exists():
        mpath.unlink()  # a half-cleared folder never verifies
    for p in entries:
        if p.exists():
            p.unlink()


def write_manifest(out: Path, manifest: dict[str, Any], files: list[str]) -> dict[str, Any]:
    """Add ``files`` (SHA-256 of each named file in ``out``) and write ``out/manifest.json``."""
    manifest = dict(manifest)
    manifest["files"] = {name: sha256_file(Path(out) / name) for name in sorted(files)}
    from .metrics import to_json

    (Path(out) / MANIFEST_NAME).write_text(to_json(manifest) + "\n",
                                           encoding="utf-8")
    return manifest
