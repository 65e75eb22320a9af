"""Labelled cohorts for ``recnec train`` / ``recnec evaluate``: labels CSV + model-input tensors.

Two kinds of ``DATA`` folder are accepted, both yielding the same :class:`Cohort`:

* **model space**: ``DATA/tensors/<study_id>.npy``, each float32 ``(3, 40, 40, 40)`` (channels
  T1, T2, T1ce; axes RAS+; the :class:`~recnec_cli.stages.modelinput.InputSpec` recipe), as written by
  ``recnec synth --space model``;
* **studies** (DICOM / NIfTI / NRRD, any layout ``recnec scan`` accepts): every labelled study is
  run through :func:`recnec_cli.orchestration.pipeline.preprocess_study`, the very code path ``recnec scan``
  uses, and the tensor is cached as ``CACHE/<safe study id>-<key>.npy`` where ``key`` hashes the
  study id, the input spec, the preprocessing settings, the recnec version and the state of the
  study's input files (size, mtime, content of small files; the lesion mask too). A study that
  fails preprocessing is excluded with its error code (listed in the result), never a crash.

The labels CSV has a header with at least ``study_id`` and ``label``; ``label`` is
``recurrence`` (1) or ``necrosis`` (0) (``1``/``0`` also accepted). For DICOM the study id is the
StudyInstanceUID, for NIfTI/NRRD the study folder relative to ``DATA`` (as printed by
``recnec inspect`` / ``recnec scan``).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .. import __version__
from ..errors import EnvironmentBroken, RecnecError, TrainingError
from ..naming import safe_component
from ..stages.modelinput import InputSpec
from ..study import Study

log = logging.getLogger(__name__)

LABEL_NAMES = {0: "necrosis", 1: "recurrence"}
_LABEL_VALUES = {"recurrence": 1, "necrosis": 0, "1": 1, "0": 0}


def read_labels(path: Path) -> dict[str, int]:
    """Read ``study_id,label`` rows into ``{study_id: 0 | 1}`` (1 = recurrence, 0 = necrosis).

    Raises
    ------
    TrainingError
        ``BAD_LABELS`` for a missing file or column, an unknown label, a duplicate or empty id.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"labels file not found: {path}", code="BAD_LABELS")
    out: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = [c.strip() for c in (reader.fieldnames or [])]
        if "study_id" not in cols or "label" not in cols:
            raise TrainingError(f"{path} needs columns study_id,label (found {cols})", code="BAD_LABELS")
        for lineno, row in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
            sid, lab = row["study_id"], row["label"].lower()
            if not sid:
                raise TrainingError(f"{path}:{lineno}: empty study_id", code="BAD_LABELS")
            if lab not in _LABEL_VALUES:
                raise TrainingError(
                    f"{path}:{lineno}: label {row['label']!r} is not recurrence/necrosis (1/0)",
                    code="BAD_LABELS",
                )
            if sid in out:
                raise TrainingError(f"{path}:{lineno}: duplicate study_id {sid!r}", code="BAD_LABELS")
            out[sid] = _LABEL_VALUES[lab]
    if not out:
        raise TrainingError(f"{path} has no rows", code="BAD_LABELS")
    return out


@dataclass(frozen=True, eq=False)
class Cohort:
    """A labelled cohort in model space.

    Attributes
    ----------
    study_ids:
        ``N`` ids, sorted.
    x:
        float32 ``(N, C, X, Y, Z)`` = ``(N, 3, 40, 40, 40)``, channels in ``spec.channels`` order.
    y:
        int64 ``(N,)``, 1 = recurrence, 0 = necrosis.
    spec:
        The input recipe the tensors follow.
    source:
        ``"model-space"`` or ``"studies"``.
    fingerprint:
        SHA-256 over (id, label, tensor bytes) of every study in order: identifies the data.
    excluded:
        ``(study_id, error_code, message)`` of labelled studies that could not be used.
    """

    study_ids: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    spec: InputSpec
    source: str
    fingerprint: str
    excluded: tuple[tuple[str, str, str], ...] = field(default=())

    @property
    def counts(self) -> dict[str, int]:
        return {"recurrence": int(self.y.sum()), "necrosis": int(len(self.y) - self.y.sum())}


def fingerprint(study_ids: list[str] | tuple[str, ...], x: np.ndarray, y: np.ndarray) -> str:
    """SHA-256 hex over each study's id, label and float32 tensor bytes, in the given order."""
    h = hashlib.sha256()
    for sid, xi, yi in zip(study_ids, x, y):
        h.update(sid.encode("utf-8") + b"\0" + str(int(yi)).encode() + b"\0")
        h.update(np.ascontiguousarray(xi, dtype=np.float32).tobytes())
    return h.hexdigest()


def _check_tensor(arr: np.ndarray, spec: InputSpec, what: str) -> np.ndarray:
    if tuple(arr.shape) != spec.shape:
        raise TrainingError(f"{what}: shape {arr.shape}, expected {spec.shape}", code="BAD_TENSOR")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.isfinite(arr).all():
        raise TrainingError(f"{what}: NaN or infinite values", code="BAD_TENSOR")
    return arr


def is_model_space(data: Path) -> bool:
    """True when ``data`` holds ``tensors/*.npy`` (a model-space cohort)."""
    return (Path(data) / "tensors").is_dir()


def load_model_space(data: Path, labels: dict[str, int], *, spec: InputSpec = InputSpec()) -> Cohort:
    """Load ``data/tensors/<study_id>.npy`` for every labelled study.

    Raises
    ------
    TrainingError
        ``MISSING_TENSORS`` if a labelled study has no tensor, ``BAD_TENSOR`` for a wrong shape
        or non-finite values.
    """
    tdir = Path(data) / "tensors"
    ids = sorted(labels)
    missing = [s for s in ids if not (tdir / f"{s}.npy").is_file()]
    if missing:
        raise TrainingError(
            f"{len(missing)} labelled studies have no tensor in {tdir} (first: {missing[:3]})",
            code="MISSING_TENSORS",
        )
    unlabelled = len({p.stem for p in tdir.glob("*.npy")} - set(ids))
    if unlabelled:
        log.warning("%d tensors in %s have no label and are ignored", unlabelled, tdir)
    x = np.empty((len(ids), *spec.shape), dtype=np.float32)
    for i, sid in enumerate(ids):
        x[i] = _check_tensor(np.load(tdir / f"{sid}.npy", allow_pickle=False), spec, f"{sid}.npy")
    y = np.array([labels[s] for s in ids], dtype=np.int64)
    return Cohort(tuple(ids), x, y, spec, "model-space", fingerprint(ids, x, y))


#: input files up to this size are also hashed by content (masks, sidecars, rules files, small
#: images), so that a rewrite keeping size and mtime (coarse timestamps on FAT / SMB, ``cp -p``,
#: ``rsync -t``) still changes the key; larger files (DICOM slices, images) by size and mtime only
CONTENT_HASH_MAX_BYTES = 64 * 1024


def study_inputs(study: Study, settings: Any) -> list[Path]:
    """Every file whose content determines a study's preprocessed tensor, sorted.

    The files and JSON sidecars of all of the study's series (discovery found them all, and
    classification chooses among them), the user lesion mask the pipeline would use
    (:func:`recnec_cli.stages.lesion.find_user_mask`) and the site rules file, if any.
    """
    from ..stages.lesion import find_user_mask

    paths: set[Path] = set()
    for series in study.series:
        paths.update(Path(f) for f in series.files)
        if series.sidecar is not None:
            paths.add(Path(series.sidecar))
    mask = find_user_mask(study.lesion_mask, settings.lesion_masks_dir, study.study_id)
    if mask is not None:
        paths.add(Path(mask))
    rules = settings.rules_file
    if rules is not None:
        paths.add(Path(rules))
    return sorted(paths)


def _file_state(path: Path) -> list[Any]:
    """``[path, size, mtime_ns, sha256 | None]`` of one input file (``[path, None, None, None]`` if
    it is gone: the study will fail, and must not hit a stale cache entry)."""
    path = Path(os.path.abspath(path))  # one key however the folder was spelled (relative, ./, absolute)
    try:
        st = path.stat()
    except OSError:
        return [str(path), None, None, None]
    digest = None
    if st.st_size <= CONTENT_HASH_MAX_BYTES:
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            digest = None
    return [str(path), int(st.st_size), int(st.st_mtime_ns), digest]


def cache_key(study_id: str, spec: InputSpec, settings: Any, *,
              inputs: list[Path] | tuple[Path, ...] = ()) -> str:
    """16-hex key of what determines a cached tensor: id, spec, preprocessing settings, version,
    and the state of every input file (path, size, ``mtime_ns``; content SHA-256 for files up to
    :data:`CONTENT_HASH_MAX_BYTES`), see :func:`study_inputs`. A changed image, sidecar, lesion
    mask or rules file gives a new key, so a stale tensor is never reused."""
    relevant = {
        k: str(os.path.abspath(v) if isinstance(v := getattr(settings, k, None), Path) else v)
        for k in ("grid_spacing_mm", "hdbet_mode", "hdbet_tta", "hdbet_backend", "lesion_masks_dir", "rules_file",
                  "allow_derived", "anisotropy_limit", "role_confidence_threshold",
                  "lesion_min_volume_ml", "lesion_detector")
    }
    blob = json.dumps({"id": study_id, "spec": spec.to_dict(), "settings": relevant,
                       "recnec": __version__, "inputs": [_file_state(Path(p)) for p in inputs]},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_studies(
    data: Path, labels: dict[str, int], *, settings: Any, cache_dir: Path | None,
    spec: InputSpec = InputSpec(), progress: Callable[[int, int, str], None] | None = None,
) -> Cohort:
    """Preprocess every labelled study under ``data`` with the scan pipeline (cached per study).

    Parameters
    ----------
    data:
        Root folder as given to ``recnec scan``.
    labels:
        ``{study_id: 0 | 1}`` from :func:`read_labels`.
    settings:
        :class:`~recnec_cli.config.Settings` (HD-BET mode, device, grid spacing ...).
    cache_dir:
        Where tensors are cached (``None``: no cache).
    progress:
        Optional ``callback(done, total, study_id)``.

    Raises
    ------
    TrainingError
        ``MISSING_STUDIES`` if a labelled id is not found under ``data``; ``TOO_FEW_CASES`` if
        nothing could be preprocessed.
    EnvironmentBroken
        If the scan pipeline is not installed.
    """
    try:
        from ..orchestration.pipeline import Resources, preprocess_study
        from ..stages.discover import discover
    except ImportError as exc:  # pragma: no cover - only in a broken installation
        raise EnvironmentBroken(f"scan pipeline unavailable: {exc}", code="ENVIRONMENT_BROKEN") from None

    studies = {s.study_id: s for s in discover(Path(data), settings=settings)}
    missing = sorted(set(labels) - set(studies))
    if missing:
        raise TrainingError(
            f"{len(missing)} labelled study ids not found under {data} (first: {missing[:3]}); "
            f"found ids look like {sorted(studies)[:2]}",
            code="MISSING_STUDIES",
        )
    ids = sorted(labels)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
    resources = None
    kept: list[str] = []
    tensors: list[np.ndarray] = []
    excluded: list[tuple[str, str, str]] = []
    for i, sid in enumerate(ids):
        cpath = None
        if cache_dir is not None:
            key = cache_key(sid, spec, settings, inputs=study_inputs(studies[sid], settings))
            cpath = Path(cache_dir) / f"{safe_component(sid)}-{key}.npy"
        if cpath is not None and cpath.is_file():
            arr = np.load(cpath, allow_pickle=False)
        else:
            if resources is None:
                resources = Resources.load(settings, need_model=False, need_hdbet=True, spec=spec)
            try:
                arr = preprocess_study(studies[sid], settings=settings, resources=resources).model_input
            except RecnecError as exc:
                log.warning("study %d/%d excluded: %s", i + 1, len(ids), exc.code)
                excluded.append((sid, exc.code, exc.message))
                continue
            if cpath is not None:
                tmp = cpath.with_suffix(".tmp.npy")
                np.save(tmp, np.asarray(arr, dtype=np.float32))
                tmp.replace(cpath)
        tensors.append(_check_tensor(arr, spec, sid))
        kept.append(sid)
        if progress is not None:
            progress(i + 1, len(ids), sid)
    if not kept:
        raise TrainingError("no labelled study could be preprocessed", code="TOO_FEW_CASES")
    x = np.stack(tensors).astype(np.float32)
    y = np.array([labels[s] for s in kept], dtype=np.int64)
    return Cohort(tuple(kept), x, y, spec, "studies", fingerprint(kept, x, y), tuple(excluded))


def load_cohort(
    data: Path, *, labels: Path, spec: InputSpec = InputSpec(), settings: Any = None,
    cache_dir: Path | None = None, progress: Callable[[int, int, str], None] | None = None,
) -> Cohort:
    """Load a labelled cohort from a model-space folder or a folder of studies (see module doc)."""
    lab = read_labels(labels)
    if is_model_space(data):
        return load_model_space(data, lab, spec=spec)
    if settings is None:
        from ..config import resolve_settings

        settings = resolve_settings()
    return load_studies(data, lab, settings=settings, cache_dir=cache_dir, spec=spec, progress=progress)
