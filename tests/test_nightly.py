"""Nightly unattended runs: incremental state, kill safety, locks, deferral, signals, path guards.

Studies are small phantoms (``tests/phantoms.py``) that go through every real stage except HD-BET,
which is replaced by the phantom's known brain (slow and not ours). Runs that must be killed or
raced happen in child processes (``phantoms.FAKE_HDBET_SCRIPT``).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnec_cli.cli.main import app
from recnec_cli.config import resolve_settings
from recnec_cli.exitcodes import EXIT_LOCKED
from recnec_cli.orchestration import scan as scan_mod
from recnec_cli.orchestration.scan import scan

import phantoms

TESTS = Path(__file__).resolve().parent
HOUR_AGO = time.time() - 3600


@pytest.fixture(scope="module")
def phantom_tree(tmp_path_factory) -> Path:
    """Four phantom studies (lesions at different places), files dated an hour ago."""
    root = tmp_path_factory.mktemp("phantoms") / "studies"
    for i in range(4):
        phantoms.write_phantom_study(root, f"sub-{i:02d}", lesion_ras_mm=(30.0 - 20 * i, 10.0, 5.0), seed=i)
    _age(root)
    return root


def _age(root: Path, t: float = HOUR_AGO) -> None:
    for p in root.rglob("*"):
        os.utime(p, (t, t))


def _copy(tree: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "studies"
    shutil.copytree(tree, dst)
    _age(dst)
    return dst


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _settings(**kw):
    return resolve_settings({"threads": 1, "grid_spacing_mm": 2.0, **kw})


def _child(studies: Path, out: Path, sleep_s: float, busy_mark: Path | None = None, **extra) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if busy_mark is not None:  # the fake HD-BET creates it when a study reaches skull stripping
        env["RECNEC_TEST_BUSY_MARK"] = str(busy_mark)
    extra.setdefault("settings", {"threads": 1, "grid_spacing_mm": 2.0})
    return subprocess.Popen([sys.executable, "-c", phantoms.FAKE_HDBET_SCRIPT, str(studies), str(out), str(sleep_s),
                             json.dumps(extra), str(TESTS)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _state_rows(state: Path) -> list[tuple[str, str, str]]:
    if not state.exists():
        return []
    try:
        with sqlite3.connect(str(state), timeout=5) as db:
            return db.execute("SELECT study_id, status, run_id FROM studies").fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []


def _wait_for(cond, timeout_s: float, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child ended early ({proc.returncode}): {proc.stdout.read()}")
        if time.time() - t0 > timeout_s:
            raise AssertionError("timed out")
        time.sleep(0.1)


@pytest.mark.veryslow  # a SIGKILL mid-batch (~65 s); the SIGTERM test stays in the default suite
def test_sigkill_then_rerun_loses_nothing_and_redoes_nothing(phantom_tree, tmp_path):
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "out" / "report.csv"
    state = out.with_name("report.state.sqlite")
    proc = _child(studies, out, sleep_s=1.0)
    _wait_for(lambda: len(_state_rows(state)) >= 1, 180, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    before = {sid: run for sid, status, run in _state_rows(state)}
    assert 1 <= len(before) < 4, before
    assert all(status == "OK" for _, status, _ in _state_rows(state))
    # the report written before the kill is whole (regenerated from the state, atomically)
    assert {r["study_id"] for r in _rows(out)} <= set(before) | set()
    summary = scan(studies, out=out, settings=_settings(), handle_signals=False)
    assert summary.exit_code == 0, summary.line()
    rows = _rows(out)
    assert sorted(r["study_id"] for r in rows) == [f"sub-{i:02d}" for i in range(4)]  # each once
    assert summary.counts["processed"] == 4 - len(before) and summary.counts["unchanged"] == len(before)
    for r in rows:  # finished before the kill: not processed again (row of the killed run)
        if r["study_id"] in before:
            assert r["run_id"] == before[r["study_id"]]
        else:
            assert r["run_id"] == summary.run_id
    assert not list(out.parent.glob(".*.tmp")), "temporary files left behind"
    with sqlite3.connect(str(state)) as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        runs = db.execute("SELECT run_id, finished_utc FROM runs ORDER BY started_utc").fetchall()
    assert runs[0][1] is None and runs[-1][1] is not None  # the killed run stays marked unfinished


@pytest.mark.slow  # the scan runs in a child process
def test_second_run_on_the_same_state_exits_at_once(phantom_tree, tmp_path):
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "report.csv"
    state = tmp_path / "report.state.sqlite"
    proc = _child(studies, out, sleep_s=30.0)
    try:
        # the lock is taken before the state is opened; the first committed run row proves both
        _wait_for(lambda: state.exists() and _has_run(state), 120, proc)
        t0 = time.perf_counter()
        res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out), "--quiet"])
        elapsed = time.perf_counter() - t0
        assert res.exit_code == EXIT_LOCKED == 75, res.output
        assert "another recnec scan is running" in res.output
        assert elapsed < 10
        assert not list(tmp_path.glob("report.log*"))  # the refused run opened (and rotated) no log file
    finally:
        proc.kill()
        proc.wait(30)


def _has_run(state: Path) -> bool:
    try:
        with sqlite3.connect(str(state), timeout=5) as db:
            return db.execute("SELECT COUNT(*) FROM runs").fetchone()[0] > 0
    except sqlite3.OperationalError:
        return False


def test_touched_study_is_deferred_then_scanned_after_the_settle_time(phantom_tree, tmp_path, monkeypatch):
    """A study with a file modified less than --settle-minutes ago is DEFERRED (not a failure) and
    scanned by the first run after the settle time; the clock is scan()'s ``now``, not a sleep."""
    phantoms.install_fake_hdbet(monkeypatch)
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "report.csv"
    t_touch = HOUR_AGO + 1800
    touched = next((studies / "sub-01").glob("*T2w*"))
    os.utime(touched, (t_touch, t_touch))  # an export still being copied when the first run starts
    settings = _settings(settle_minutes=0.05)  # 3 s
    first = scan(studies, out=out, settings=settings, handle_signals=False, now=lambda: t_touch + 1.0)
    assert first.exit_code == 0, first.line()  # deferred is not a failure
    by = {r["study_id"]: r for r in _rows(out)}
    assert by["sub-01"]["status"] == "DEFERRED" and "settle time" in by["sub-01"]["error_message"]
    assert all(by[s]["status"] == "OK" for s in ("sub-00", "sub-02", "sub-03"))
    second = scan(studies, out=out, settings=settings, handle_signals=False, now=lambda: t_touch + 3.2)
    assert second.exit_code == 0, second.line()
    by2 = {r["study_id"]: r for r in _rows(out)}
    assert by2["sub-01"]["status"] == "OK"
    assert all(by2[s]["run_id"] == by[s]["run_id"] for s in ("sub-00", "sub-02", "sub-03"))  # not redone
    assert "deferred 0" in second.line() and "processed 1" in second.line()


def test_default_settle_time_defers_fresh_exports(phantom_tree, tmp_path, monkeypatch):
    monkeypatch.delenv("RECNEC_SETTLE_MINUTES")
    studies = _copy(phantom_tree, tmp_path)
    _age(studies, time.time() - 120)  # two minutes old: under the default 10
    monkeypatch.setattr(scan_mod.Resources, "load", _refuse)
    summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(), handle_signals=False)
    assert summary.counts["deferred"] == 4 and summary.counts["processed"] == 0


def _refuse(*a, **k):
    raise AssertionError("models must not be loaded")


def test_unchanged_tree_opens_no_file_and_changes_are_picked_up(phantom_tree, tmp_path, monkeypatch):
    fake = phantoms.install_fake_hdbet(monkeypatch)
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "r.csv"
    first = scan(studies, out=out, settings=_settings(), handle_signals=False)
    assert first.counts["processed"] == 4 and first.exit_code == 0
    calls = fake.calls
    # no-op re-run: models never loaded, no input file opened (discovery reused from the stat listing)
    opened: list[str] = []
    real_open = open

    def counting_open(file, *a, **k):
        if str(file).startswith(str(studies)):
            opened.append(str(file))
        return real_open(file, *a, **k)

    monkeypatch.setattr("builtins.open", counting_open)
    monkeypatch.setattr(scan_mod.Resources, "load", _refuse)
    again = scan(studies, out=out, settings=_settings(), handle_signals=False)
    monkeypatch.undo()
    fake = phantoms.install_fake_hdbet(monkeypatch)
    assert again.counts == {**again.counts, "processed": 0, "unchanged": 4}
    assert opened == [] and fake.calls == 0
    # a replaced file: only that study again
    t1 = next((studies / "sub-02").glob("*_T1w.nii.gz"))
    data = t1.read_bytes()
    t1.write_bytes(data)
    os.utime(t1, (HOUR_AGO + 60, HOUR_AGO + 60))
    third = scan(studies, out=out, settings=_settings(), handle_signals=False)
    assert third.counts["processed"] == 1 and third.counts["unchanged"] == 3
    # a result-changing setting: everything again; --force too
    fourth = scan(studies, out=out, settings=_settings(hdbet_mode="accurate"), handle_signals=False)
    assert fourth.counts["processed"] == 4
    fifth = scan(studies, out=out, settings=_settings(hdbet_mode="accurate"), force=True, handle_signals=False)
    assert fifth.counts["processed"] == 4
    assert calls > 0
    rows = _rows(out)
    assert len(rows) == 4 and {r["run_id"] for r in rows} == {fifth.run_id}


def test_failed_rows_retried_only_on_request_and_vanished_studies_kept(phantom_tree, tmp_path, monkeypatch):
    phantoms.install_fake_hdbet(monkeypatch)
    studies = _copy(phantom_tree, tmp_path)
    for f in (studies / "sub-03").glob("*T2w*"):
        f.unlink()  # MISSING_ROLE: T2
    out = tmp_path / "r.csv"
    first = scan(studies, out=out, settings=_settings(), handle_signals=False)
    assert first.exit_code == 1 and first.counts["failed"] == 1
    again = scan(studies, out=out, settings=_settings(), handle_signals=False)
    assert again.counts["processed"] == 0 and again.exit_code == 1  # the failure is still in the report
    assert again.counts["failed"] == 0 and again.counts["failed_in_report"] == 1
    assert "failed 0 (failing rows in the report: 1)" in again.line()
    retried = scan(studies, out=out, settings=_settings(), retry_failed=True, handle_signals=False)
    assert retried.counts["processed"] == 1
    shutil.rmtree(studies / "sub-00")
    gone = scan(studies, out=out, settings=_settings(), handle_signals=False)
    assert gone.counts["not_present"] == 1 and gone.counts["found"] == 3
    by = {r["study_id"]: r for r in _rows(out)}
    assert by["sub-00"]["present_in_tree"] == "no" and by["sub-00"]["status"] == "OK"  # last row kept
    res = CliRunner().invoke(app, ["status", "--state", str(tmp_path / "r.state.sqlite"), "--format", "json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert info["status_counts"] == {"OK": 2, "MISSING_ROLE": 1} and info["not_present"] == 1
    assert [f["study_id"] for f in info["failed"]] == ["sub-03"] and "T2" in info["failed"][0]["error_message"]
    assert len(info["runs"]) == 4 and info["runs"][0]["summary"]["not_present"] == 1


@pytest.mark.slow  # the scan runs in a child process
def test_sigterm_stops_taking_studies_and_keeps_what_is_done(phantom_tree, tmp_path):
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "report.csv"
    state = tmp_path / "report.state.sqlite"
    proc = _child(studies, out, sleep_s=2.0)
    _wait_for(lambda: len(_state_rows(state)) >= 1, 180, proc)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, text
    rows = _rows(out)
    assert 1 <= len(rows) < 4 and all(r["status"] == "OK" for r in rows)
    assert "stopped by SIGTERM" in text


def test_env_paths_get_the_cli_checks(phantom_tree, tmp_path, monkeypatch):
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "r.csv"
    monkeypatch.setenv("RECNEC_KEEP_INTERMEDIATE_DIR", str(studies / "qc"))
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out)])
    assert res.exit_code == 2 and "RECNEC_KEEP_INTERMEDIATE_DIR" in res.output and "inside the input tree" in res.output
    assert not (studies / "qc").exists()
    monkeypatch.delenv("RECNEC_KEEP_INTERMEDIATE_DIR")
    monkeypatch.setenv("RECNEC_LESION_MASKS_DIR", "/nonexistent")
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out)])
    assert res.exit_code == 2 and "RECNEC_LESION_MASKS_DIR" in res.output and "not a folder" in res.output
    monkeypatch.delenv("RECNEC_LESION_MASKS_DIR")
    monkeypatch.setenv("RECNEC_STATE_FILE", str(studies / "state.sqlite"))
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out)])
    assert res.exit_code == 2 and "inside the input tree" in res.output
    assert not out.exists()


def test_empty_tree_exits_before_models_are_loaded(tmp_path, monkeypatch):
    (tmp_path / "studies").mkdir()
    (tmp_path / "studies" / "README.txt").write_text("nothing here")
    monkeypatch.setattr(scan_mod.Resources, "load", _refuse)
    res = CliRunner().invoke(app, ["scan", str(tmp_path / "studies"), "--out", str(tmp_path / "r.csv")])
    assert res.exit_code == 2 and "NO_IMAGE" in res.output


def test_failed_self_test_stops_the_run_once(phantom_tree, tmp_path, monkeypatch):
    phantoms.install_fake_hdbet(monkeypatch)
    studies = _copy(phantom_tree, tmp_path)

    def broken(*a, **k):
        raise ImportError("openjpeg plugin missing")

    monkeypatch.setattr("recnec_cli.stages.convert.convert_series", broken)
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(tmp_path / "r.csv")])
    assert res.exit_code == 2, res.output
    assert "ENVIRONMENT_BROKEN" in res.output and "self-test failed: DICOM" in res.output
    assert not (tmp_path / "r.csv").exists()  # no row of 4 identical errors
    log_text = (tmp_path / "r.log").read_text()
    assert "self-test failed" in log_text


def test_cron_output_is_plain_lines_with_one_summary_and_logs_rotate(phantom_tree, tmp_path, monkeypatch):
    phantoms.install_fake_hdbet(monkeypatch)
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "r.csv"
    for _ in range(2):
        res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out), "--grid-spacing", "2", "--quiet"])
        assert res.exit_code == 0, res.output
    assert "\x1b[" not in res.output  # no colours or progress bars when stderr is not a terminal
    log_now, log_prev = out.with_suffix(".log").read_text(), Path(str(out.with_suffix(".log")) + ".1").read_text()
    assert "processed 4" in log_prev and "processed 0, unchanged 4" in log_now
    assert sum("recnec scan " in line and "found 4" in line for line in log_now.splitlines()) == 1
    assert [line for line in res.output.splitlines() if "found 4" in line] == [res.output.strip().splitlines()[-1]]


def _all_files(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*")}


def test_hostile_uids_and_names_write_nothing_outside_and_leak_no_names(tmp_path, monkeypatch):
    """StudyInstanceUIDs of '..' and '../../escape', a description with '/', and export files
    named after the patient: outputs stay in their folders; messages name instances, not files."""
    import pydicom

    phantoms.install_fake_hdbet(monkeypatch)
    studies = tmp_path / "in" / "studies"
    phantoms.write_phantom_dicom_study(studies / "a", study_uid="..", patient_name="Müller^Jürgen",
                                       patient_id="0089", file_prefix="Müller_Jürgen", seed=1,
                                       series_description_suffix=" ../../etc")
    files = phantoms.write_phantom_dicom_study(studies / "b", study_uid="../../escape", patient_name="Müller^Jürgen",
                                               patient_id="0089", file_prefix="Müller_Jürgen_0089", seed=2)
    ce = [f for f in files if pydicom.dcmread(f, stop_before_pixels=True).SeriesNumber == 3][5]
    ce.write_bytes(ce.read_bytes()[:-3000])  # header intact, pixel data cut short
    _age(studies)
    work = tmp_path / "work"
    work.mkdir()
    before = _all_files(tmp_path)
    out, qc = work / "out" / "r.csv", work / "qc" / "inner"
    monkeypatch.chdir(work / "..")
    res = CliRunner().invoke(app, ["scan", str(studies), "--out", str(out), "--keep-intermediate", str(qc),
                                   "--grid-spacing", "2", "--threads", "1"])
    assert res.exit_code == 1, res.output
    new = _all_files(tmp_path) - before - {str(qc.parent)}  # the folder that holds the QC folder
    allowed = (str(out.parent), str(qc))
    assert new and all(p.startswith(allowed) for p in new), sorted(p for p in new if not p.startswith(allowed))
    assert not list(qc.parent.glob("escape*")) and not (work / "escape").exists()
    by = {r["study_id"]: r for r in _rows(out)}
    assert by[".."]["status"] == "OK", by[".."]
    assert by["../../escape"]["status"] == "PIXEL_DECODE_FAILED", by["../../escape"]
    assert "instance 6" in by["../../escape"]["error_message"]
    (sub,) = [p for p in qc.iterdir()]
    assert sub.parent == qc and not sub.name.startswith(".")
    texts = [out.read_text(encoding="utf-8"), out.with_suffix(".log").read_text(encoding="utf-8"),
             out.with_name("r.manifest.json").read_text(encoding="utf-8"), res.output]
    for text in texts:
        for secret in ("Müller", "Jürgen", "Muller", "0089.dcm"):
            assert secret not in text, secret


def test_header_silent_t1_study_runs_hdbet_once_per_volume(tmp_path, monkeypatch):
    """Image evidence converts and skull-strips both header-silent T1 series; conversion and skull
    stripping reuse them: two HD-BET calls in all (T1 and T1ce), and classify's seconds exclude them."""
    fake = phantoms.install_fake_hdbet(monkeypatch)
    converted: list[str] = []
    from recnec_cli.stages import convert as convert_mod

    real_convert = convert_mod.convert_series

    def counting(series, *, settings):
        converted.append(series.series_id)
        return real_convert(series, settings=settings)

    monkeypatch.setattr(convert_mod, "convert_series", counting)
    studies = tmp_path / "studies"
    phantoms.write_header_silent_study(studies, "sub-01")
    _age(studies)
    summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(), handle_signals=False, run_self_test=False)
    (row,) = _rows(tmp_path / "r.csv")
    assert row["status"] == "OK", row["error_message"]
    assert row["t1ce_series"].endswith("t1_mprage_2.nii.gz") and "image evidence" in row["t1ce_reasons"]
    assert row["t1_series"].endswith("t1_mprage_1.nii.gz")
    assert fake.calls == 2, fake.calls
    assert sorted(converted) == sorted(set(converted)) and len(converted) == 3
    assert float(row["seconds_skullstrip"]) > 0 and float(row["seconds_convert"]) > 0
    assert summary.exit_code == 0


@pytest.mark.slow  # the scan runs in a child process
def test_second_sigterm_stops_at_once_with_143(phantom_tree, tmp_path):
    studies = _copy(phantom_tree, tmp_path)
    out = tmp_path / "report.csv"
    state = tmp_path / "report.state.sqlite"
    busy = tmp_path / "busy"
    proc = _child(studies, out, sleep_s=6.0, busy_mark=busy)
    # both signals must reach the run while a study is in progress (inside the fake HD-BET's 6 s),
    # not while the run is still starting or already exiting: a loaded CI machine once took so
    # long to start the first study that the run ended on the first SIGTERM and the second one
    # hit the interpreter's shutdown (-15)
    _wait_for(busy.exists, 120, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    text, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, text
    with sqlite3.connect(str(state)) as db:
        (code, reason, finished), = db.execute("SELECT exit_code, stop_reason, finished_utc FROM runs").fetchall()
    assert (code, reason) == (143, "SIGTERM (twice)") and finished is not None
    assert out.exists()  # the report is written from the state even after a hard stop


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


@pytest.mark.veryslow  # orphaned workers after a SIGKILL (~10 s)
def test_workers_die_with_a_killed_scan(phantom_tree, tmp_path):
    """SIGKILL of the scan leaves no worker behind (PR_SET_PDEATHSIG), even one stuck in a study."""
    studies = _copy(phantom_tree, tmp_path)
    proc = _child(studies, tmp_path / "r.csv", sleep_s=0.0, hooks=["hook_fake_hdbet", "hook_hang_on_sub01"],
                  settings={"threads": 1, "grid_spacing_mm": 2.0, "workers": 1})
    workers: list[int] = []

    def worker_started() -> bool:
        workers[:] = [c for c in _children(proc.pid)
                      if "spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes().decode(errors="replace")]
        return bool(workers)

    _wait_for(worker_started, 120, proc)
    _wait_for(lambda: len(_state_rows(tmp_path / "r.state.sqlite")) >= 1, 120, proc)  # sub-00 done
    time.sleep(2.0)  # the worker is now inside sub-01's hanging conversion
    worker_started()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    _wait_for(lambda: not any(Path(f"/proc/{w}").exists() and
                              "spawn_main" in Path(f"/proc/{w}/cmdline").read_bytes().decode(errors="replace")
                              for w in workers), 20)
