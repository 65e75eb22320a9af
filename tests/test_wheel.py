"""A wheel built from this checkout carries the shipped weights and scans README command 1's example.

The installed copy, not the checkout, is what runs: the wheel is installed with ``pip --target``
into a temporary folder that comes first on ``PYTHONPATH`` (no network, no dependencies installed:
torch, HD-BET and the rest come from the running virtual environment), and every command runs from
a folder outside the checkout.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib  # Python >= 3.11
except ModuleNotFoundError:  # 3.10: the tomli backport, a dependency there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


def test_listed_packages_match_the_tree():
    """pyproject.toml lists the packages (one, recnec_cli.weights, maps the top-level weights/): a
    subpackage added under recnec_cli/ without being listed would be missing from the wheel."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {".".join(p.relative_to(REPO).parts) for p in (REPO / "recnec_cli").rglob("*")
               if p.is_dir() and p.name != "__pycache__" and any(p.iterdir())}
    on_disk.add("recnec_cli")
    assert set(tool["packages"]) == on_disk | {"recnec_cli.weights"}
    assert tool["package-dir"] == {"recnec_cli.weights": "weights"}


def _copy_sources(dst: Path) -> None:
    """What the wheel is built from, without the checkout's build leftovers (build/, *.egg-info)."""
    dst.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dst / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "recnec_cli", dst / "recnec_cli", ignore=ignore)
    shutil.copytree(REPO / "weights", dst / "weights", ignore=ignore)


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


@pytest.mark.slow
def test_installed_wheel_scans_the_readme_example(tmp_path):
    src, dist, site, work = tmp_path / "src", tmp_path / "dist", tmp_path / "site", tmp_path / "work"
    _copy_sources(src)
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist)], cwd=src)
    wheel = next(dist.glob("recnec-*.whl"))
    _run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(site),
          str(wheel)], cwd=tmp_path)
    shutil.rmtree(src)  # nothing can be read from the build tree any more
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    where = json.loads(_run([sys.executable, "-c",
                             "import json, recnec_cli, recnec_cli.config as c; "
                             "print(json.dumps([recnec_cli.__file__, str(c.default_weights_dir())]))"],
                            cwd=work, env=env))
    module, weights = (Path(p) for p in where)
    assert module.is_relative_to(site) and not module.is_relative_to(REPO)
    assert weights == site / "recnec_cli" / "weights"
    assert (weights / "manifest.json").is_file() and len(list(weights.glob("fold*.onnx"))) == 5
    assert (weights / "segmenter.json").is_file() and (weights / "segmenter.onnx").is_file()
    assert (weights / "lesion_score.json").is_file()  # the lesion score ships with the segmenter

    recnec = str(site / "bin" / "recnec")  # the wheel's console script
    _run([recnec, "synth", "example", "--n", "2", "--format", "dicom"], cwd=work, env=env)
    _run([recnec, "scan", "example/dicom", "--out", "report.csv", "--settle-minutes", "0"], cwd=work, env=env)

    with open(work / "report.csv", newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2
    for row in rows:
        assert row["status"] == "OK", row
        assert row["lesion_source"] == "segmenter", row  # the wheel's own segmenter, not the heuristic fallback
        assert 0.0 <= float(row["p_recurrence"]) <= 1.0
    manifest = json.loads((work / "report.manifest.json").read_text(encoding="utf-8"))
    assert "synthetic" in manifest["disclaimer"]
