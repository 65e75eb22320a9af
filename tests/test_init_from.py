"""``recnec train --init-from``: rebuilding trainable networks from ONNX and fine-tuning from them.

The rebuild is checked on networks with non-trivial batch-norm statistics (random running mean,
variance, gamma, beta) exported with the production exporter, on the shipped weights through the
production loader, and end to end through the CLI on a small synthetic model-space cohort.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")
ort = pytest.importorskip("onnxruntime")

from typer.testing import CliRunner  # noqa: E402

from recnec_cli.cli.main import app  # noqa: E402
from recnec_cli.errors import TrainingError  # noqa: E402
from recnec_cli.stages.infer import Ensemble  # noqa: E402
from recnec_cli.stages.modelinput import InputSpec  # noqa: E402
from recnec_cli.train.export import export_onnx  # noqa: E402
from recnec_cli.train.init import FOLDABLE_ARCHS, load_init_source, network_from_onnx  # noqa: E402
from recnec_cli.train.models import ProbabilityHead, build_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
SHAPE = InputSpec().shape
runner = CliRunner()


def _exported(tmp_path: Path, arch: str, width: int, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """``arch`` with random weights and random batch-norm statistics, exported to ONNX."""
    torch.manual_seed(seed)
    net = build_model(arch, width=width)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    head = ProbabilityHead(net).eval()
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"{arch}.onnx"
    export_onnx(head, path, shape=SHAPE)
    return path, head


def _ort(path: Path, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(["probability"], {"input": x})[0], dtype=np.float64)


@pytest.mark.parametrize("arch,width", [("resnet10", 4), ("resnet18", 4), ("vgg16", 4)])
def test_rebuilt_network_computes_what_its_onnx_computes(tmp_path: Path, arch: str, width: int) -> None:
    path, original = _exported(tmp_path, arch, width)
    net = network_from_onnx(path, arch=arch, width=width)
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in net.modules())
    x = np.random.default_rng(5).normal(size=(4, *SHAPE)).astype(np.float32) * 2
    with torch.no_grad():
        rebuilt = torch.sigmoid(net(torch.from_numpy(x))).numpy().reshape(-1)
        ref = original(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(rebuilt, _ort(path, x), atol=1e-4, rtol=0)
    np.testing.assert_allclose(rebuilt, ref, atol=1e-4, rtol=0)
    with torch.no_grad():
        logits = net(torch.from_numpy(x)).numpy().reshape(-1)
        np.testing.assert_allclose(logits, original.net(torch.from_numpy(x)).numpy().reshape(-1), atol=1e-5)
        # not a coincidence of near-constant outputs: another network of the same architecture
        # (other weights and statistics) is far from these logits
        _, other = _exported(tmp_path / "other", arch, width, seed=7)
        assert np.max(np.abs(other.net(torch.from_numpy(x)).numpy().reshape(-1) - logits)) > 1e-3
    # trainable: every convolution has a weight and a bias that take gradients
    net.train()
    torch.sigmoid(net(torch.from_numpy(x))).sum().backward()
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv3d)]
    assert convs and all(m.bias is not None and m.weight.grad is not None for m in convs)


def test_wrong_width_and_unfoldable_arch_are_refused(tmp_path: Path) -> None:
    path, _ = _exported(tmp_path, "resnet10", 4)
    with pytest.raises(TrainingError) as e:
        network_from_onnx(path, arch="resnet10", width=8)
    assert e.value.code == "INIT_INCOMPATIBLE"
    with pytest.raises(TrainingError) as e:
        network_from_onnx(path, arch="vgg16", width=4)
    assert e.value.code == "INIT_INCOMPATIBLE"
    with pytest.raises(TrainingError) as e:
        network_from_onnx(path, arch="densenet121", width=4)
    assert e.value.code == "INIT_UNSUPPORTED" and "from scratch" in e.value.message
    assert "densenet121" not in FOLDABLE_ARCHS


def test_shipped_weights_rebuild_to_the_shipped_probabilities() -> None:
    src = load_init_source(WEIGHTS)
    ens = Ensemble.load(WEIGHTS, device="cpu", threads=1)
    assert len(src.nets) == ens.n_models == 5 and (src.arch, src.width) == ("resnet10", 16)
    x = np.random.default_rng(3).normal(size=(3, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        rebuilt = np.stack([torch.sigmoid(n(torch.from_numpy(x))).numpy().reshape(-1) for n in src.nets])
    np.testing.assert_allclose(rebuilt, ens.predict(x).per_model, atol=1e-4, rtol=0)
    assert src.entry["model_version"] == ens.model_version and len(src.entry["files_sha256_digest"]) == 64
    # fold k of a new 7-fold training starts from source model k mod 5, as a copy
    first = src.net_for_fold(5)
    assert first is not src.nets[0]
    with torch.no_grad():
        np.testing.assert_allclose(torch.sigmoid(first(torch.from_numpy(x))).numpy().reshape(-1),
                                   rebuilt[0], atol=1e-6)


def test_init_from_a_damaged_or_different_folder_is_refused(tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "w"
    shutil.copytree(WEIGHTS, bad)
    with open(bad / "fold2.onnx", "r+b") as fh:
        fh.seek(2000)
        fh.write(b"\0" * 16)
    with pytest.raises(TrainingError) as e:
        load_init_source(bad)
    assert e.value.code == "INIT_UNREADABLE" and "WEIGHTS_CHECKSUM_MISMATCH" in e.value.message
    with pytest.raises(TrainingError) as e:
        load_init_source(WEIGHTS, arch="vgg16")
    assert e.value.code == "INIT_INCOMPATIBLE"
    with pytest.raises(TrainingError) as e:
        load_init_source(WEIGHTS, spec=InputSpec(spacing_mm=2.0))
    assert e.value.code == "INIT_INCOMPATIBLE"
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not an ensemble")
    for where, says in [(tmp_path / "nowhere", "does not exist"), (tmp_path / "file", "is not a folder"),
                        (tmp_path / "empty", "has no manifest.json")]:
        with pytest.raises(TrainingError) as e:
            load_init_source(where)
        assert e.value.code == "INIT_UNREADABLE" and says in e.value.message
        assert "reinstall" not in e.value.message  # not the shipped-weights hint of `recnec scan`
    dense = tmp_path / "dense"  # a densenet121 ensemble is refused by name, before any rebuild
    shutil.copytree(WEIGHTS, dense)
    m = json.loads((dense / "manifest.json").read_text())
    for model in m["models"]:
        model["arch"] = "densenet121"
    (dense / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrainingError) as e:
        load_init_source(dense)
    assert e.value.code == "INIT_UNSUPPORTED" and str(dense) in e.value.message


@pytest.fixture(scope="module")
def small_cohort(tmp_path_factory) -> Path:
    from recnec_cli.synth import write_cohort

    out = tmp_path_factory.mktemp("ft")
    write_cohort(out, n=20, seed=13, fmt="nifti", space="model", ratio=(1, 1))
    return out


def _fold_probabilities(weights: Path, x: np.ndarray) -> np.ndarray:
    return Ensemble.load(weights, device="cpu", threads=1).predict(x).per_model


@pytest.mark.slow  # a 20-subject synthetic cohort (~20 s), fine-tuning
def test_cli_fine_tunes_from_the_shipped_weights(small_cohort: Path, tmp_path: Path) -> None:
    """At a vanishing learning rate the fine-tuned folds are the source models k mod 5: the start
    really is the shipped ensemble (a random start gives other probabilities), with the same
    manifest as any training plus ``init_from``."""
    out = tmp_path / "site"
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(out), "--quick",
                              "--init-from", str(WEIGHTS), "--lr", "1e-7", "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    shipped = json.loads((WEIGHTS / "manifest.json").read_text())
    assert m["init_from"]["model_version"] == shipped["model_version"]
    assert m["init_from"]["arch"] == "resnet10" and m["init_from"]["width"] == 16
    assert [mm["arch"] for mm in m["models"]] == ["resnet10", "resnet10"]  # --quick: 2 folds, width 16
    assert m["training"]["config"]["lr"] == 1e-7 and "--init-from" in m["command"]
    assert ".ft." in m["model_version"] and m["model_version"] != shipped["model_version"]
    assert m["metrics"]["cross_validated"]["n"] == 20 and "calibration" in m and "applicability" in m
    x = np.stack([np.load(p) for p in sorted((small_cohort / "tensors").glob("*.npy"))[:6]])
    got = _fold_probabilities(out, x)
    src = _fold_probabilities(WEIGHTS, x)
    np.testing.assert_allclose(got, src[:2], atol=2e-3)
    assert np.max(np.abs(got[0] - got[1])) > 2e-3  # two different source models, not one copied


@pytest.mark.slow  # a 20-subject synthetic cohort (~20 s), fine-tuning
def test_cli_fine_tune_default_learning_rate_moves_the_weights(small_cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "site"
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(out), "--quick",
                              "--init-from", str(WEIGHTS), "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert m["training"]["config"]["lr"] == 1e-4
    x = np.stack([np.load(p) for p in sorted((small_cohort / "tensors").glob("*.npy"))[:6]])
    assert np.max(np.abs(_fold_probabilities(out, x) - _fold_probabilities(WEIGHTS, x)[:2])) > 1e-3


@pytest.mark.slow  # a 20-subject synthetic cohort (~20 s), fine-tuning
@pytest.mark.parametrize("extra,needle", [
    (["--arch", "vgg16"], "INIT_INCOMPATIBLE"),
    (["--width", "8"], "INIT_INCOMPATIBLE"),
    (["--reproduce-shipped"], "drop --init-from"),
])
def test_cli_refuses_conflicting_init_options(small_cohort: Path, tmp_path: Path, extra: list[str],
                                              needle: str) -> None:
    args = ["train", "--out", str(tmp_path / "o"), "--init-from", str(WEIGHTS), "--quiet", *extra]
    if "--reproduce-shipped" not in extra:
        args.insert(1, str(small_cohort))
    res = runner.invoke(app, args)
    assert res.exit_code != 0 and needle in res.output, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow  # a 20-subject synthetic cohort (~20 s), fine-tuning
def test_cli_refuses_to_overwrite_the_source(tmp_path: Path, small_cohort: Path) -> None:
    import shutil

    src = tmp_path / "w"
    shutil.copytree(WEIGHTS, src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(src), "--quick",
                              "--init-from", str(src), "--quiet"])
    assert res.exit_code != 0 and "--init-from folder" in res.output, res.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(src / "ft"), "--quick",
                              "--init-from", str(src), "--quiet"])
    assert res.exit_code != 0 and "inside the --init-from folder" in res.output, res.output
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # no ft/ created either


@pytest.mark.slow  # a 20-subject synthetic cohort (~20 s), fine-tuning
def test_fine_tuning_from_an_ensemble_of_the_same_cohort_is_flagged(small_cohort: Path, tmp_path: Path,
                                                                    caplog) -> None:
    """A start trained on the very cohort has seen every held-out study: warned and recorded."""
    import logging

    first, second = tmp_path / "a", tmp_path / "b"
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(first), "--quick", "--quiet"])
    assert res.exit_code == 0, res.output
    caplog.set_level(logging.WARNING, logger="recnec_cli")
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(second), "--quick",
                              "--init-from", str(first), "--quiet"])
    assert res.exit_code == 0, res.output
    m = json.loads((second / "manifest.json").read_text())
    assert "optimistic" in m["init_from"]["warning"]
    assert m["init_from"]["source_data_fingerprint_sha256"] == m["data"]["fingerprint_sha256"]
    assert m["init_from"]["source_init_from"] is None  # first was trained from scratch
    third = tmp_path / "c"  # a chain keeps every link: third <- second <- first
    res = runner.invoke(app, ["train", str(small_cohort), "--out", str(third), "--quick",
                              "--init-from", str(second), "--quiet"])
    assert res.exit_code == 0, res.output
    chain = json.loads((third / "manifest.json").read_text())["init_from"]
    assert chain["model_version"] == m["model_version"]
    assert chain["source_init_from"]["model_version"] == m["init_from"]["model_version"]
    assert "trained on this very cohort" in res.output  # --quiet still prints warnings
    shipped = json.loads((first / "manifest.json").read_text())
    assert shipped["data"]["fingerprint_sha256"] == m["data"]["fingerprint_sha256"]
