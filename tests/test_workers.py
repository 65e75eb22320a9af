"""Worker processes (``--workers``): same rows as one worker, a hung study becomes TIMEOUT, a study
past the memory limit OUT_OF_MEMORY, and the run goes on. HD-BET is the phantom stand-in, installed
in each spawned worker through ``worker_hooks``."""

from __future__ import annotations

import csv
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.config import resolve_settings
from recnec_cli.orchestration.scan import scan
from recnec_cli.qc.figures import LESION_RGB, read_layout, read_rgb

import phantoms

HOUR_AGO = time.time() - 3600

pytestmark = pytest.mark.slow  # every test here starts worker processes


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("workers") / "studies"
    for i in range(3):
        phantoms.write_phantom_study(root, f"sub-{i:02d}", lesion_ras_mm=(30.0 - 25 * i, 5.0, 0.0), seed=10 + i)
    for p in root.rglob("*"):
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    return root


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {r["study_id"]: r for r in csv.DictReader(fh)}


def _settings(**kw):
    return resolve_settings({"grid_spacing_mm": 2.0, **kw})


def test_two_workers_give_the_rows_of_one(tree, tmp_path, caplog):
    one = scan(tree, out=tmp_path / "one.csv", settings=_settings(workers=1, threads=1), handle_signals=False,
               worker_hooks=[phantoms.hook_fake_hdbet])
    with caplog.at_level("INFO", logger="recnec_cli"):
        two = scan(tree, out=tmp_path / "two.csv", settings=_settings(workers=2, threads=1, qc_dir=tmp_path / "qc"),
                   handle_signals=False, worker_hooks=[phantoms.hook_fake_hdbet, phantoms.hook_say_hello])
    # worker records reach the scan's logging, marked with the worker's pid (not this process)
    hello = [r.getMessage() for r in caplog.records if "hello from worker process" in r.getMessage()]
    pids = {int(m.split("[worker ")[1].split("]")[0]) for m in hello}
    assert len(hello) == 2 and len(pids) == 2 and os.getpid() not in pids, hello
    assert one.exit_code == two.exit_code == 0, (one.line(), two.line())
    a, b = _rows(tmp_path / "one.csv"), _rows(tmp_path / "two.csv")
    assert sorted(a) == sorted(b) == ["sub-00", "sub-01", "sub-02"]
    for sid in a:
        assert a[sid]["status"] == b[sid]["status"] == "OK"
        assert abs(float(a[sid]["p_recurrence"]) - float(b[sid]["p_recurrence"])) <= 1e-6
        for k in ("lesion_r_mm", "lesion_a_mm", "lesion_s_mm", "lesion_volume_ml", "brain_volume_ml",
                  "t1_reg_translation_mm", "t2_reg_rotation_deg"):
            assert a[sid][k] == b[sid][k], (sid, k)
        # --qc: the picture is drawn in the worker (where the volumes are), its result line in the scan's process
        layout = read_layout(tmp_path / "qc" / b[sid]["qc_png"])
        assert layout["header"][1].startswith(f"p(recurrence) {float(b[sid]['p_recurrence']):.3f}")
        rgb = read_rgb(tmp_path / "qc" / b[sid]["qc_png"])
        assert np.all(rgb == np.asarray(LESION_RGB, np.uint8), axis=-1).sum() > 100
    assert a["sub-00"]["qc_png"] == ""  # the run without --qc drew nothing


@pytest.mark.veryslow  # waits out a study time limit (~22 s)
def test_hung_study_becomes_timeout_and_the_others_finish(tree, tmp_path):
    t0 = time.perf_counter()
    summary = scan(tree, out=tmp_path / "r.csv", settings=_settings(workers=2, threads=1, study_timeout_s=20),
                   handle_signals=False, worker_hooks=[phantoms.hook_fake_hdbet, phantoms.hook_hang_on_sub01])
    elapsed = time.perf_counter() - t0
    rows = _rows(tmp_path / "r.csv")
    assert rows["sub-01"]["status"] == "TIMEOUT" and "20 s" in rows["sub-01"]["error_message"]
    assert rows["sub-00"]["status"] == rows["sub-02"]["status"] == "OK"
    assert summary.exit_code == 1 and elapsed < 300


@pytest.mark.veryslow  # a worker past its memory limit (~10 s)
def test_study_past_the_memory_limit_is_out_of_memory(tree, tmp_path):
    studies = tmp_path / "studies"
    shutil.copytree(tree / "sub-00", studies / "sub-00")
    phantoms.write_oversized_study(studies, "sub-big")
    for p in studies.rglob("*"):
        os.utime(p, (HOUR_AGO, HOUR_AGO))
    summary = scan(studies, out=tmp_path / "r.csv", settings=_settings(workers=1, threads=1, max_memory_mb=2500),
                   handle_signals=False, worker_hooks=[phantoms.hook_fake_hdbet])
    rows = _rows(tmp_path / "r.csv")
    assert rows["sub-big"]["status"] == "OUT_OF_MEMORY", rows["sub-big"]
    assert rows["sub-00"]["status"] == "OK"  # the worker was fine for the next study
    assert summary.exit_code == 1


@pytest.mark.slow  # starts a Python process that starts a worker process
def test_script_without_main_guard_is_told_what_happened(tree, tmp_path):
    """A script calling scan() at top level (no ``if __name__ == "__main__":``) makes every spawned
    worker run the script again instead of starting: the run stops with a message naming the
    guard, not a guess about --max-memory."""
    import subprocess
    import sys

    script = tmp_path / "nightly.py"
    script.write_text(
        "from pathlib import Path\n"
        "from recnec_cli.config import resolve_settings\n"
        "from recnec_cli.orchestration.scan import scan\n"
        f"scan(Path({str(tree)!r}), out=Path('r.csv'), handle_signals=False,\n"
        "     settings=resolve_settings({'settle_minutes': 0, 'workers': 1, 'threads': 1,\n"
        "                                'pseudonym_key_file': Path('key')}))\n", encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=env)
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "ENVIRONMENT_BROKEN" in last and 'if __name__ == "__main__":' in last and "nightly.py" in last, last
    assert "max-memory" not in last
    # the worker's own re-run of the script stops at once, before it reads or writes anything
    assert "scan() was called while a recnec worker process was starting" in res.stderr
    assert not (tmp_path / "r.csv").exists()


def test_a_guarded_script_gets_the_memory_hint(tmp_path, monkeypatch):
    """The guard hint is only given when the main script really lacks the guard."""
    import sys
    import types

    from recnec_cli.orchestration.workers import worker_start_failure

    scripts = (("import x\nx.scan()\n", False), ("import x\nif __name__ == '__main__':\n    x.scan()\n", True),
               ("import x\nif __name__ != '__main__':\n    pass\nx.scan()\n", False))
    for text, guarded in scripts:
        script = tmp_path / "job.py"
        script.write_text(text, encoding="utf-8")
        main = types.ModuleType("__main__")
        main.__file__ = str(script)
        monkeypatch.setitem(sys.modules, "__main__", main)
        msg = worker_start_failure(RuntimeError("x"), 2048)
        assert ("max-memory (2048 MB per worker)" in msg) is guarded, msg
        assert ('if __name__ == "__main__":' in msg) is not guarded, msg
