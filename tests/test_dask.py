"""A scan on a Dask cluster (``--scheduler``): a ``LocalCluster`` of 2 worker processes (1 thread
each) gives the rows of a local scan; a worker killed mid-study, a study that kills every worker
it runs on, a hung study and GPU-tagged workers; and no Dask at all without a scheduler. Every test
that uses the cluster or a child interpreter is marked slow (about 110 s on 2 busy cores); the
settings and error-message tests that need neither stay in the fast tier.

HD-BET is the phantom stand-in, installed in every Dask worker through ``worker_hooks`` (a worker
plugin); the worker processes import ``phantoms`` from this folder (``sys.path`` travels with
multiprocessing's spawn). The cluster lives for the module, so hooks that misbehave are driven by
flag files in a study folder (``phantoms.hook_test_flags``), not by the process.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from recnec_cli.config import resolve_settings
from recnec_cli.orchestration.scan import scan

import phantoms

distributed = pytest.importorskip("distributed")
import dask  # noqa: E402  (after the skip: an install without the extra skips this module)

HOUR_AGO = time.time() - 3600
HOOKS = [phantoms.hook_fake_hdbet, phantoms.hook_test_flags]
#: columns that differ between any two runs (times, run ids)
VOLATILE = ("run_id", "processed_utc")


def _age(root: Path) -> None:
    for p in root.rglob("*"):
        os.utime(p, (HOUR_AGO, HOUR_AGO))


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """Three phantom studies and one without a T2 (a MISSING_ROLE row, logged by the worker)."""
    root = tmp_path_factory.mktemp("dask") / "studies"
    for i in range(4):
        phantoms.write_phantom_study(root, f"sub-{i:02d}", lesion_ras_mm=(30.0 - 20 * i, 5.0, 0.0), seed=20 + i)
    (root / "sub-03" / "sub-03_T2w.nii.gz").unlink()
    _age(root)
    return root


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes with 1 thread each; a lost worker's task is retried once
    (``allowed-failures`` 1, a scheduler setting), then ``KilledWorker``.

    ``lost-worker-timeout`` is raised for the module's whole life: ``LocalCluster`` closes a
    nanny whose worker has been gone longer than that (15 s by default, read when the worker
    leaves), and a worker restarted after a study's time limit can take longer than 15 s to
    come back on 2 busy cores (CI, stop 14). ``dask worker`` nannies have no such timer."""
    with dask.config.set({"distributed.scheduler.allowed-failures": 1,
                          "distributed.deploy.lost-worker-timeout": "600s"}):
        cl = distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                      silence_logs=logging.ERROR)
        client = distributed.Client(cl, set_as_default=False)
        yield cl, client
        client.close()
        cl.close()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _settings(cl, **kw):
    return resolve_settings({"grid_spacing_mm": 2.0, "threads": 1, "scheduler": cl.scheduler_address, **kw})


def _copy(tree: Path, dest: Path, flags: dict[str, tuple[str, str]]) -> Path:
    """The first three studies of ``tree`` in ``dest``, with ``flags`` {study: (flag file, text)}."""
    for sid in ("sub-00", "sub-01", "sub-02"):
        shutil.copytree(tree / sid, dest / sid)
    for sid, (flag, text) in flags.items():
        (dest / sid / flag).write_text(text)
    _age(dest)
    return dest


@pytest.mark.slow  # a LocalCluster of worker processes
def test_cluster_scan_gives_the_rows_of_a_local_scan(tree, tmp_path, cluster, monkeypatch, caplog):
    cl, _ = cluster
    fake = phantoms.install_fake_hdbet(monkeypatch)
    local = scan(tree, out=tmp_path / "local.csv", handle_signals=False,
                 settings=resolve_settings({"grid_spacing_mm": 2.0, "threads": 1, "workers": 0}))
    assert fake.calls >= 3  # the local scan really ran here
    caplog.set_level(logging.INFO, logger="recnec_cli")
    calls = fake.calls
    remote = scan(tree, out=tmp_path / "dask.csv", settings=_settings(cl), handle_signals=False, worker_hooks=HOOKS)
    assert fake.calls == calls  # HD-BET ran on the workers, not here
    assert local.exit_code == remote.exit_code == 1, (local.line(), remote.line())  # sub-03 lacks its T2
    a, b = _rows(tmp_path / "local.csv"), _rows(tmp_path / "dask.csv")
    assert [r["study_id"] for r in a] == [r["study_id"] for r in b] == ["sub-00", "sub-01", "sub-02", "sub-03"]
    for ra, rb in zip(a, b):
        assert ra["status"] == rb["status"] == ("MISSING_ROLE" if ra["study_id"] == "sub-03" else "OK")
        if ra["status"] == "OK":
            assert abs(float(ra["p_recurrence"]) - float(rb["p_recurrence"])) <= 1e-6
            assert abs(float(ra["ensemble_spread"]) - float(rb["ensemble_spread"])) <= 1e-6
        same = [k for k in ra if k not in VOLATILE and not k.startswith("seconds_") and k not in ("p_recurrence",
                                                                                                "ensemble_spread")]
        assert {k: ra[k] for k in same} == {k: rb[k] for k in same}, ra["study_id"]
    manifest = json.loads((tmp_path / "dask.manifest.json").read_text())
    assert manifest["execution"]["executor"] == "dask" and len(manifest["execution"]["workers"]) == 2
    assert "hdbet" in manifest["self_test_seconds"]  # the workers' HD-BET check, timed here
    # where the workers' HD-BET runs, from their self-test (the fake reports no provider)
    assert manifest["hdbet_provider"] == "unknown"
    assert any(r.getMessage() == "HD-BET runs on unknown" for r in caplog.records)
    # the worker's own log line for the failed study reached this process's log, marked by worker
    worker_lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[worker tcp://")]
    assert any("sub-03" in m and "MISSING_ROLE" in m for m in worker_lines), worker_lines[-5:]
    # a NIfTI study's MISSING_ROLE names its own image files in the row (README "Outputs")
    missing = next(r for r in b if r["study_id"] == "sub-03")["error_message"]
    assert "sub-03_T1w.nii.gz=T1" in missing and "sub-03_ce-gadolinium_T1w.nii.gz=T1ce" in missing


@pytest.mark.veryslow  # a worker killed mid-study (~20 s)
def test_a_worker_killed_mid_study_is_retried_and_every_study_is_reported_once(tree, tmp_path, cluster, caplog):
    cl, client = cluster
    caplog.set_level(logging.INFO, logger="recnec_cli")
    studies = _copy(tree, tmp_path / "studies", {sid: (phantoms.SLOW_FLAG, "1.5") for sid in ("sub-00", "sub-01",
                                                                                               "sub-02")})
    killed: list[int] = []

    def kill_a_busy_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            busy = [a for a, keys in client.processing().items() if any("preprocess_task" in k for k in keys)]
            if busy:
                time.sleep(1.0)  # the study is under way (sleeping in its conversion)
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.1)

    killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
    killer.start()
    summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(cl), handle_signals=False, worker_hooks=HOOKS)
    killer.join(timeout=5)
    assert killed, "no worker was killed: the test proved nothing"
    rows = _rows(tmp_path / "r.csv")
    assert sorted(r["study_id"] for r in rows) == ["sub-00", "sub-01", "sub-02"]  # each exactly once
    assert {r["status"] for r in rows} == {"OK"}, [(r["study_id"], r["error_message"]) for r in rows]
    assert summary.exit_code == 0 and summary.counts["processed"] == 3
    # the lost worker is a line of the run log, at WARNING
    left = [r for r in caplog.records if "left the cluster" in r.getMessage()]
    assert any(r.levelno == logging.WARNING and "while running" in r.getMessage() for r in left), \
        [r.getMessage() for r in caplog.records][-10:]


@pytest.mark.veryslow  # two worker restarts (~15 s)
def test_a_study_that_kills_every_worker_becomes_worker_died(tree, tmp_path, cluster):
    cl, _ = cluster
    studies = _copy(tree, tmp_path / "studies", {"sub-01": (phantoms.DIE_FLAG, "")})
    summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(cl), handle_signals=False, worker_hooks=HOOKS)
    rows = {r["study_id"]: r for r in _rows(tmp_path / "r.csv")}
    assert sorted(rows) == ["sub-00", "sub-01", "sub-02"]
    assert rows["sub-01"]["status"] == "WORKER_DIED" and "allowed-failures = 1" in rows["sub-01"]["error_message"]
    assert rows["sub-00"]["status"] == rows["sub-02"]["status"] == "OK"
    assert summary.exit_code == 1


@pytest.mark.veryslow  # a worker restart after the time limit (~13 s)
def test_a_hung_study_becomes_timeout_and_its_worker_is_restarted(tree, tmp_path, cluster):
    cl, client = cluster
    studies = _copy(tree, tmp_path / "studies", {"sub-01": (phantoms.HANG_FLAG, "")})
    client.wait_for_workers(2, timeout=180)  # the previous test's killed worker may still be coming back
    pids_before = set(client.run(os.getpid).values())
    assert len(pids_before) == 2
    t0 = time.perf_counter()
    summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(cl, study_timeout_s=8), handle_signals=False,
                   worker_hooks=HOOKS)
    elapsed = time.perf_counter() - t0
    rows = {r["study_id"]: r for r in _rows(tmp_path / "r.csv")}
    assert rows["sub-01"]["status"] == "TIMEOUT" and "8 s" in rows["sub-01"]["error_message"]
    assert rows["sub-00"]["status"] == rows["sub-02"]["status"] == "OK"
    assert summary.exit_code == 1 and elapsed < 120
    client.wait_for_workers(2, timeout=180)
    deadline = time.monotonic() + 30  # the hung worker's process was replaced (the nanny restarts it)
    while set(client.run(os.getpid).values()) >= pids_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not set(client.run(os.getpid).values()) >= pids_before


@pytest.mark.veryslow  # a second LocalCluster (~17 s); the cluster path stays in the default suite
def test_gpu_tagged_worker_gets_the_studies_and_the_inference(tree, tmp_path, cluster):
    cl, client = cluster
    client.wait_for_workers(2, timeout=180)
    gpu, cpu = sorted(client.scheduler_info(n_workers=-1)["workers"])[:2]

    async def tag(dask_worker, amount):  # as if it had been started with --resources GPU=1
        await dask_worker.set_resources(GPU=amount)

    client.run(tag, amount=1, workers=[gpu])
    try:
        studies = _copy(tree, tmp_path / "studies", {})
        with distributed.get_task_stream(client) as stream:
            summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(cl, dask_resources="GPU=1"),
                           handle_signals=False, worker_hooks=HOOKS)
        assert summary.exit_code == 0
        ours = [t for t in stream.data if str(t["key"]).startswith(("preprocess_task", "infer_task", "worker_check"))]
        assert {str(t["key"]).split("-")[0] for t in ours} == {"preprocess_task", "infer_task", "worker_check"}
        assert {t["worker"] for t in ours} == {gpu}, (gpu, cpu)
        manifest = json.loads((tmp_path / "r.manifest.json").read_text())
        assert manifest["execution"]["remote_inference"] is True
    finally:
        client.run(tag, amount=0, workers=[gpu])


@pytest.mark.slow  # a LocalCluster of worker processes
def test_no_worker_with_the_resources_is_a_clear_error(tree, tmp_path, cluster, monkeypatch):
    from recnec_cli.errors import EnvironmentBroken
    from recnec_cli.orchestration import cluster as cluster_mod

    cl, _ = cluster
    monkeypatch.setattr(cluster_mod, "WAIT_FOR_WORKERS_S", 1.0)
    with pytest.raises(EnvironmentBroken) as err:
        scan(tree, out=tmp_path / "r.csv", settings=_settings(cl, dask_resources="GPU=8"), handle_signals=False,
             worker_hooks=HOOKS)
    assert err.value.code == "NO_WORKERS" and "GPU=8" in err.value.message


# ---- without a scheduler: nothing changes, no Dask ------------------------------------------
NO_DASK_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import phantoms
from recnec_cli.stages import skullstrip
fake = phantoms.FakeHdBet()
skullstrip.get_hdbet = lambda **kw: fake
from typer.testing import CliRunner
from recnec_cli.cli.main import app
assert CliRunner().invoke(app, ["scan", "--help"]).exit_code == 0
from recnec_cli.config import resolve_settings
from recnec_cli.orchestration.scan import scan
summary = scan(Path(sys.argv[1]), out=Path(sys.argv[2]), settings=resolve_settings({"workers": 0, "threads": 1}),
               handle_signals=False)
print(summary.exit_code, sorted(m for m in sys.modules if m.split(".")[0] in ("dask", "distributed")))
"""


@pytest.mark.slow  # a child interpreter
def test_without_a_scheduler_dask_is_never_imported(tree, tmp_path):
    studies = tmp_path / "one"
    shutil.copytree(tree / "sub-00", studies / "sub-00")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]),
                                                                     os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-c", NO_DASK_SCRIPT, str(studies), str(tmp_path / "r.csv"),
                          str(Path(__file__).parent)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout[-500:]


@pytest.mark.parametrize("how", ["cli", "env", "library"])
def test_missing_extra_names_it_whichever_way_the_scheduler_arrives(tree, tmp_path, monkeypatch, how):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app
    from recnec_cli.errors import EnvironmentBroken

    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec",
                        lambda name, *a, **k: None if name == "distributed" else real_find_spec(name, *a, **k))
    if how == "library":  # a caller's Settings
        with pytest.raises(EnvironmentBroken, match=r"pip install 'recnec\[distributed\]'") as err:
            scan(tree, out=tmp_path / "r.csv", settings=resolve_settings({"scheduler": "tcp://127.0.0.1:1"}),
                 handle_signals=False)
        assert err.value.code == "DISTRIBUTED_MISSING" and not (tmp_path / "r.state.sqlite").exists()
        return
    args = ["scan", str(tree), "--out", str(tmp_path / "r.csv")]
    if how == "cli":
        args += ["--scheduler", "tcp://127.0.0.1:1"]
    else:
        monkeypatch.setenv("RECNEC_SCHEDULER", "tcp://127.0.0.1:1")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "pip install 'recnec[distributed]'" in res.output
    assert "RECNEC_SCHEDULER" in " ".join(res.output.split())  # a cron user set the variable, not the option
    assert not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize("how", ["cli", "env"])
@pytest.mark.parametrize("address", ["127.0.0.1", "tcp://sched.example.org", "tcp://h:port", "tcp://h:99999",
                                     "tcp://h:8786 "])
def test_a_scheduler_address_without_a_port_is_a_usage_error(tree, tmp_path, monkeypatch, how, address):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app

    args = ["scan", str(tree), "--out", str(tmp_path / "r.csv")]
    if how == "cli":
        args += ["--scheduler", address]
    else:
        monkeypatch.setenv("RECNEC_SCHEDULER", address)
    res = CliRunner().invoke(app, args)
    out = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "tcp://HOST:8786" in out and ("RECNEC_SCHEDULER (environment)" in out) == (how == "env")
    assert not list(tmp_path.iterdir())  # refused before any report, log or state file


@pytest.mark.parametrize("settings, needle", [
    ({"scheduler": "tcp://h:8786", "scheduler_file": "s.json"}, "not both"),
    ({"dask_resources": "GPU=1"}, "only apply to a Dask cluster"),
    ({"scheduler": "tcp://h:8786", "dask_resources": "GPU"}, "GPU=1"),
    ({"scheduler": "tcp://h:8786", "dask_resources": "GPU=-1"}, "GPU=1"),
])
def test_cluster_settings_are_checked_from_the_environment_too(monkeypatch, settings, needle):
    from recnec_cli.errors import UsageError

    for k, v in settings.items():
        monkeypatch.setenv("RECNEC_" + k.upper(), v)
    with pytest.raises(UsageError, match=needle):
        resolve_settings()


def test_a_missing_scheduler_file_is_refused_before_anything_runs(tree, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app

    monkeypatch.setenv("RECNEC_SCHEDULER_FILE", str(tmp_path / "nope.json"))
    res = CliRunner().invoke(app, ["scan", str(tree), "--out", str(tmp_path / "r.csv")])
    assert res.exit_code == 2 and "RECNEC_SCHEDULER_FILE (environment)" in res.output and "not a file" in res.output


def test_an_unreachable_scheduler_is_exit_2_with_its_address(tree, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app
    from recnec_cli.orchestration import cluster as cluster_mod

    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT_S", 1.0)
    res = CliRunner().invoke(app, ["scan", str(tree), "--out", str(tmp_path / "r.csv"), "--scheduler",
                                   "tcp://127.0.0.1:1"])
    assert res.exit_code == 2, res.output
    assert "SCHEDULER_UNREACHABLE" in res.output and "tcp://127.0.0.1:1" in res.output
    assert not (tmp_path / "r.csv").exists()
