"""Where a scan writes, and the one guard every output and input path passes, whichever way it
arrived (CLI option, ``RECNEC_*`` environment variable, a caller's Settings)."""

from __future__ import annotations

from pathlib import Path

from ..config import Settings
from ..errors import UsageError


def output_paths(out: Path, settings: Settings) -> dict[str, Path]:
    """The files a scan writes for report ``out``: ``report``, ``manifest``
    (``<stem>.manifest.json``), ``log`` (``<stem>.log``, rotated per run) and ``state``
    (``settings.state_file`` or ``<stem>.state.sqlite``), plus the ``lock`` beside the state."""
    out = Path(out).expanduser()
    state = Path(settings.state_file).expanduser() if settings.state_file else out.with_name(out.stem + ".state.sqlite")
    return {"report": out, "manifest": out.with_name(out.stem + ".manifest.json"),
            "log": out.with_suffix(".log"), "state": state, "lock": state.with_name(state.name + ".lock")}


def check_scan_paths(studies: Path, *, out: Path, settings: Settings) -> None:
    """Refuse, before any work, paths that cannot be used, whichever way they arrived (CLI option,
    ``RECNEC_*`` environment variable or a caller's Settings): the same guard for all.

    Raises
    ------
    UsageError
        STUDIES not a folder; a report, state, ``keep_intermediate_dir``, ``qc_dir`` or ``dicom_out``
        inside the input tree
        (recnec never writes there) or not writable as a file / folder; ``lesion_masks_dir`` or
        ``weights_dir`` not a folder; ``rules_file``, ``scheduler_file`` or ``pseudonym_key_file``
        not a file.
    """
    studies = Path(studies)
    if not studies.is_dir():
        raise UsageError(f"STUDIES must be a folder: {studies}")
    paths = output_paths(out, settings)
    src = settings.sources

    def name(field_: str, option: str) -> str:
        env = "RECNEC_" + field_.upper()
        return f"{option} / {env}" if src.get(field_) != "env" else f"{env} (environment)"

    outputs = [("--out", paths["report"]), (name("state_file", "--state"), paths["state"])]
    if settings.keep_intermediate_dir is not None:
        outputs.append((name("keep_intermediate_dir", "--keep-intermediate"), Path(settings.keep_intermediate_dir)))
    if settings.qc_dir is not None:
        outputs.append((name("qc_dir", "--qc"), Path(settings.qc_dir)))
    if settings.dicom_out is not None:
        outputs.append((name("dicom_out", "--dicom-out"), Path(settings.dicom_out)))
    for what, p in outputs:
        if is_inside(p, studies):
            raise UsageError(f"{what} {p} lies inside the input tree {studies}; recnec never writes there")
    _check_writable_file(paths["report"], "--out")
    _check_writable_file(paths["state"], name("state_file", "--state"))
    if settings.keep_intermediate_dir is not None:
        kd = Path(settings.keep_intermediate_dir)
        if kd.exists() and not kd.is_dir():
            raise UsageError(f"{name('keep_intermediate_dir', '--keep-intermediate')} {kd} is a file, not a folder")
        _check_writable_file(kd / "x", name("keep_intermediate_dir", "--keep-intermediate"))
    if settings.qc_dir is not None:
        qd = Path(settings.qc_dir)
        if qd.exists() and not qd.is_dir():
            raise UsageError(f"{name('qc_dir', '--qc')} {qd} is a file, not a folder")
        _check_writable_file(qd / "index.html", name("qc_dir", "--qc"))
    if settings.send and settings.dicom_out is None:
        raise UsageError(f"{name('send', '--send')} needs a folder for the DICOM objects first: give "
                         "--dicom-out DIR / RECNEC_DICOM_OUT as well")
    if settings.dicom_out is not None:
        dd = Path(settings.dicom_out)
        if dd.exists() and not dd.is_dir():
            raise UsageError(f"{name('dicom_out', '--dicom-out')} {dd} is a file, not a folder")
        _check_writable_file(dd / "x", name("dicom_out", "--dicom-out"))
    for field_, option in (("lesion_masks_dir", "--lesion-masks"), ("weights_dir", "--weights")):
        p = getattr(settings, field_)
        if p is not None and not Path(p).is_dir():
            raise UsageError(f"{name(field_, option)} {p} is not a folder")
    for field_, option in (("rules_file", "--rules"), ("scheduler_file", "--scheduler-file")):
        p = getattr(settings, field_)
        if p is not None and not Path(p).is_file():
            raise UsageError(f"{name(field_, option)} {p} is not a file")
    kf = settings.pseudonym_key_file
    if kf is not None and Path(kf).exists() and not Path(kf).is_file():
        raise UsageError(f"{name('pseudonym_key_file', '--pseudonym-key-file')} {kf} is not a file")
    if kf is not None and is_inside(Path(kf), studies):
        raise UsageError(f"{name('pseudonym_key_file', '--pseudonym-key-file')} {kf} lies inside the input tree")


def is_inside(child: Path, parent: Path) -> bool:
    """True when ``child`` (resolved) lies inside ``parent`` (resolved)."""
    try:
        Path(child).expanduser().resolve().relative_to(Path(parent).expanduser().resolve())
        return True
    except ValueError:
        return False


def _check_writable_file(path: Path, what: str) -> None:
    if path.exists() and path.is_dir():
        raise UsageError(f"{what} {path} is a folder; give a file name such as {path / 'report.csv'}")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{what} {path}: {parent} is a file, not a folder")
            break
