"""What a study's result depends on, from ``stat`` alone: the tree listing, deferral times and
the study fingerprint that decides whether a study is processed again."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Mapping, Sequence

from .. import __version__
from ..config import Settings
from ..errors import EnvironmentBroken
from ..study import Study
from .state import digest

log = logging.getLogger(__name__)

#: settings that change a study's result; a change reprocesses the study
RESULT_SETTINGS = ("grid_spacing_mm", "hdbet_mode", "hdbet_tta", "hdbet_backend", "lesion_masks_dir", "rules_file",
                   "anisotropy_limit", "role_confidence_threshold", "allow_derived", "max_series_voxels",
                   "registration_max_translation_mm", "registration_max_rotation_deg", "lesion_min_volume_ml",
                   "lesion_detector")


def tree_listing(root: Path) -> dict[str, tuple[int, int]]:
    """``{path relative to root (POSIX): (size bytes, mtime ns)}`` of every file under ``root``,
    from ``stat`` only (no file is opened; symlinked folders are not followed, as in discovery)."""
    root = Path(root)
    out: dict[str, tuple[int, int]] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError as exc:
            log.warning("cannot list a folder of the input tree (%s)", type(exc).__name__)
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file():
                    st = e.stat()
                    out[Path(e.path).relative_to(root).as_posix()] = (st.st_size, st.st_mtime_ns)
            except OSError:
                continue
    return out


def folder_newest_mtimes(listing: Mapping[str, tuple[int, int]]) -> dict[str, int]:
    """``{folder relative to the root (POSIX, "." for the root): newest mtime_ns of its files}``."""
    out: dict[str, int] = {}
    for rel, (_, mtime) in listing.items():
        folder = rel.rsplit("/", 1)[0] if "/" in rel else "."
        if mtime > out.get(folder, -1):
            out[folder] = mtime
    return out


def study_files(study: Study, root: Path, listing: Mapping[str, tuple[int, int]], newest: Mapping[str, int],
                 settings: Settings) -> tuple[list[tuple[str, int, int]], int]:
    """The files a study's result depends on, as ``(path relative to root, size, mtime_ns)``, and
    the newest mtime (ns) among them and every other file in the study's folders (for deferral: a
    half-copied file sits in the folder even when discovery could not read it)."""
    files: list[tuple[str, int, int]] = []
    prefix = str(root) + os.sep
    folders: set[str] = {f for f in study.location.split(";") if f} if study.location else set()

    def add(p: Path) -> None:
        sp = str(p)
        rel = sp[len(prefix):].replace(os.sep, "/") if sp.startswith(prefix) else None
        if rel is not None and rel in listing:
            size, mtime = listing[rel]
            folders.add(rel.rsplit("/", 1)[0] if "/" in rel else ".")
        else:  # outside the tree (a --lesion-masks file), or gone since the listing
            rel = sp
            try:
                st = Path(p).stat()
                size, mtime = st.st_size, st.st_mtime_ns
            except OSError:
                size, mtime = -1, -1
        files.append((rel, size, mtime))

    for s in study.series:
        for f in s.files:
            add(f)
        if s.sidecar is not None:
            add(s.sidecar)
    if study.lesion_mask is not None:
        add(study.lesion_mask)
    if settings.lesion_masks_dir is not None:
        from ..stages.lesion import find_user_mask

        user = find_user_mask(None, settings.lesion_masks_dir, study.study_id)
        if user is not None:
            add(user)
    latest = max([newest.get(f, -1) for f in folders] + [m for _, _, m in files], default=-1)
    return files, latest


def study_fingerprint(study: Study, files: Sequence[tuple[str, int, int]], *, settings: Settings,
                      model_version: str, key_id: str) -> str:
    """Hex SHA-256 of what a study's result depends on: its series (SeriesInstanceUIDs or file
    paths) with each file's size and mtime, the user lesion mask, the weights' model version,
    the result-changing settings (:data:`RESULT_SETTINGS`, rules file content included), the
    pseudonym key id, the lesion segmenter's checksum, the recnec version and, for a DICOM study,
    whether DICOM objects are asked for (``--dicom-out``). Same fingerprint, same row: the study is
    skipped."""
    rules_sha = ""
    if settings.rules_file is not None:
        from ..stages.infer import sha256_file

        try:
            rules_sha = sha256_file(Path(settings.rules_file))
        except OSError:
            rules_sha = "unreadable"
    return digest([study.study_id, [s.series_id for s in study.series], sorted(files), model_version,
                   {k: str(getattr(settings, k)) for k in RESULT_SETTINGS}, rules_sha, key_id, __version__,
                   segmenter_version_of(settings)]
                  # asking for DICOM objects reprocesses a study once (its lesion on the T1ce frames)
                  + (["dicom-out"] if settings.dicom_out is not None and study.source == "dicom" else []))


def segmenter_version_of(settings: Settings) -> str:
    """The listed checksum of the segmenter the scan will use (``""`` with the heuristic detector or
    when there is none) and ``+`` that of the lesion score beside it when the score will be used
    (fitted for this segmenter: :func:`recnec_cli.stages.lesion_score.find_lesion_score`), read
    without verifying: that happens when they are loaded."""
    if settings.lesion_detector != "segmenter":
        return ""
    from ..config import default_weights_dir
    from ..stages.lesion_score import LESION_SCORE_FILE, fitted_for
    from ..stages.segment import SEGMENTER_FILE, SEGMENTER_MANIFEST, find_segmenter

    folder = find_segmenter(settings.weights_dir, default_weights_dir())
    if folder is None:
        return ""
    try:
        m = json.loads((folder / SEGMENTER_MANIFEST).read_text(encoding="utf-8"))
        seg_sha = str(m.get("files", {}).get(SEGMENTER_FILE, ""))
        score = folder / LESION_SCORE_FILE
        doc = json.loads(score.read_text(encoding="utf-8")) if score.is_file() else {}
        listed = str(doc.get("checksum", "")) if fitted_for(str(doc.get("segmenter_sha256", "")), seg_sha) else ""
        return seg_sha + (f"+{listed}" if listed else "")
    except (OSError, ValueError):
        return "unreadable"


def model_version_of(weights_dir: Path) -> str:
    """The manifest's model version and a digest of its checksum list (read without verifying the
    files: that happens when the ensemble is loaded, only when a study is to be processed)."""
    try:
        m = json.loads((Path(weights_dir) / "manifest.json").read_text(encoding="utf-8"))
        # the version string plus the files' listed checksums: retrained weights under an old name
        # still change every fingerprint
        return f"{m.get('model_version', '')}#{digest([m.get('files', {})])[:12]}"
    except (OSError, ValueError) as exc:
        raise EnvironmentBroken(f"weights manifest unreadable in {weights_dir}: {type(exc).__name__}") from None
