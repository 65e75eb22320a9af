"""Ensemble loading and inference on tiny hand-built ONNX graphs (no torch needed)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recnec_cli.errors import EnvironmentBroken, InferenceError
from recnec_cli.stages.infer import Ensemble, read_manifest, resolve_providers, sha256_file
from recnec_cli.stages.modelinput import InputSpec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _tiny_graph(path: Path, weight: float, bias: float) -> None:
    """``p = sigmoid(weight * mean over voxels of (x[:, 2] - x[:, 0]) + bias)``,
    input ``input`` (N, 3, 40, 40, 40) -> output ``probability`` (N,)."""
    from onnx import TensorProto, helper

    inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 40, 40, 40])
    out = helper.make_tensor_value_info("probability", TensorProto.FLOAT, ["N"])
    w = helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1, 1], [-weight, 0.0, weight])
    nodes = [
        helper.make_node("Mul", ["input", "w"], ["xw"]),
        helper.make_node("ReduceMean", ["xw"], ["m"], axes=[1, 2, 3, 4], keepdims=0),
        helper.make_node("Mul", ["m", "three"], ["m3"]),
        helper.make_node("Add", ["m3", "b"], ["z"]),
        helper.make_node("Sigmoid", ["z"], ["probability"]),
    ]
    inits = [
        w,
        helper.make_tensor("three", TensorProto.FLOAT, [], [3.0]),
        helper.make_tensor("b", TensorProto.FLOAT, [], [bias]),
    ]
    graph = helper.make_graph(nodes, "tiny", [inp], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    d = tmp_path / "weights"
    d.mkdir()
    models = []
    for i, (w, b) in enumerate([(2.0, 0.0), (1.0, 0.3), (3.0, -0.2)]):
        _tiny_graph(d / f"fold{i}.onnx", w, b)
        models.append({"file": f"fold{i}.onnx", "fold": i})
    (d / "epochs.csv").write_text("fold,epoch\n0,1\n")
    files = {p.name: sha256_file(p) for p in sorted(d.iterdir())}
    manifest = {
        "format": "recnec-weights/1",
        "model_version": "test-0",
        "input": InputSpec().to_dict(),
        "threshold": 0.5,
        "models": models,
        "files": files,
    }
    (d / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return d


def _x(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 3, 40, 40, 40)).astype(np.float32)


def test_load_and_predict_shapes(weights: Path) -> None:
    ens = Ensemble.load(weights, device="cpu")
    assert ens.provider == "CPUExecutionProvider"
    assert ens.spec == InputSpec()
    assert ens.threshold == 0.5 and ens.model_version == "test-0" and ens.n_models == 3
    assert set(ens.checksums) == {"fold0.onnx", "fold1.onnx", "fold2.onnx", "epochs.csv"}
    pred = ens.predict(_x(5))
    assert pred.mean.shape == (5,) and pred.spread.shape == (5,) and pred.per_model.shape == (3, 5)
    np.testing.assert_allclose(pred.mean, pred.per_model.mean(axis=0))
    np.testing.assert_allclose(pred.spread, pred.per_model.std(axis=0))
    assert ((pred.per_model > 0) & (pred.per_model < 1)).all()
    # the planted contrast (T1ce brighter than T1) raises every model's probability
    x = _x(1)
    x[:, 2] += 1.0
    assert (ens.predict(x).per_model[:, 0] > ens.predict(_x(1)).per_model[:, 0]).all()


def test_batched_equals_one_by_one(weights: Path) -> None:
    ens = Ensemble.load(weights, device="auto")
    x = _x(6, seed=3)
    batched = ens.predict(x)
    chunked = ens.predict(x, batch_size=4)
    single = np.stack([ens.predict(x[i]).per_model[:, 0] for i in range(len(x))], axis=1)
    np.testing.assert_allclose(batched.per_model, single, atol=1e-5, rtol=0)
    np.testing.assert_allclose(batched.per_model, chunked.per_model, atol=1e-5, rtol=0)


def test_checksum_tampering_refused_before_sessions(weights: Path, monkeypatch) -> None:
    import onnxruntime

    data = bytearray((weights / "fold1.onnx").read_bytes())
    data[-1] ^= 0x01
    (weights / "fold1.onnx").write_bytes(bytes(data))

    def _no_session(*a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("session created before checksum verification")

    monkeypatch.setattr(onnxruntime, "InferenceSession", _no_session)
    with pytest.raises(InferenceError) as ei:
        Ensemble.load(weights)
    assert ei.value.code == "WEIGHTS_CHECKSUM_MISMATCH" and "fold1.onnx" in str(ei.value)


def test_manifest_checksum_edit_refused(weights: Path) -> None:
    m = json.loads((weights / "manifest.json").read_text())
    m["files"]["fold0.onnx"] = "0" * 64
    (weights / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InferenceError) as ei:
        Ensemble.load(weights)
    assert ei.value.code == "WEIGHTS_CHECKSUM_MISMATCH"


def test_missing_manifest_and_file(weights: Path, tmp_path: Path) -> None:
    with pytest.raises(EnvironmentBroken) as ei:
        Ensemble.load(tmp_path / "nowhere")
    assert ei.value.code == "WEIGHTS_MISSING"
    (weights / "fold2.onnx").unlink()
    with pytest.raises(EnvironmentBroken) as ei:
        read_manifest(weights)
    assert ei.value.code == "WEIGHTS_MISSING"


def test_path_escape_in_manifest_refused(weights: Path) -> None:
    m = json.loads((weights / "manifest.json").read_text())
    m["files"]["../x.onnx"] = "0" * 64
    (weights / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InferenceError) as ei:
        read_manifest(weights)
    assert ei.value.code == "WEIGHTS_MANIFEST_INVALID"


def test_bad_input_shape_and_nan(weights: Path) -> None:
    ens = Ensemble.load(weights, device="cpu")
    with pytest.raises(InferenceError) as ei:
        ens.predict(np.zeros((2, 3, 32, 32, 32), np.float32))
    assert ei.value.code == "BAD_INPUT_SHAPE"
    x = _x(2)
    x[1, 0, 0, 0, 0] = np.nan
    with pytest.raises(InferenceError) as ei:
        ens.predict(x)
    assert ei.value.code == "NONFINITE_INPUT"


def test_provider_resolution() -> None:
    cpu_only = ["CPUExecutionProvider"]
    assert resolve_providers("auto", cpu_only) == (["CPUExecutionProvider"], False)
    assert resolve_providers("cpu", cpu_only + ["CUDAExecutionProvider"])[0] == ["CPUExecutionProvider"]
    prov, req = resolve_providers("cuda:1", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert prov[0] == ("CUDAExecutionProvider", {"device_id": 1}) and req
    prov, req = resolve_providers("auto", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert prov[0][0] == "CUDAExecutionProvider" and not req
    with pytest.raises(EnvironmentBroken) as ei:
        resolve_providers("cuda", cpu_only)
    assert ei.value.code == "CUDA_UNAVAILABLE"


def test_cuda_request_without_cuda_is_environment_error(weights: Path, monkeypatch) -> None:
    """On a host whose onnxruntime has no CUDA provider (made so here, so that the test runs on GPU
    hosts too), ``--device cuda:0`` is a clear environment error naming the extra to install, and
    ``auto`` quietly uses the CPU."""
    import onnxruntime

    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(EnvironmentBroken) as ei:
        Ensemble.load(weights, device="cuda:0")
    assert ei.value.code == "CUDA_UNAVAILABLE" and "recnec[gpu]" in ei.value.message
    assert Ensemble.load(weights, device="auto").provider == "CPUExecutionProvider"


def test_cuda_silent_fallback_is_environment_error(weights: Path, monkeypatch) -> None:
    """onnxruntime-gpu without a usable device falls back to the CPU provider: an explicit
    ``--device cuda`` must not run on the CPU unnoticed."""
    import onnxruntime

    real_session = onnxruntime.InferenceSession

    def cpu_only_session(path, sess_options=None, providers=None):
        return real_session(path, sess_options=sess_options, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(onnxruntime, "InferenceSession", cpu_only_session)
    with pytest.raises(EnvironmentBroken) as ei:
        Ensemble.load(weights, device="cuda")
    assert ei.value.code == "CUDA_UNAVAILABLE" and "fell back to CPUExecutionProvider" in ei.value.message
    assert Ensemble.load(weights, device="auto").provider == "CPUExecutionProvider"


def _node_providers(onnx_path: Path, providers: list[str]) -> list[tuple[str, str]]:
    """``(op type, execution provider)`` of every node kernel of one profiled run of ``onnx_path``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(onnx_path.with_suffix(""))
    sess = ort.InferenceSession(str(onnx_path), sess_options=so, providers=providers)
    sess.run(None, {"input": _x(2)})
    events = json.loads(Path(sess.end_profiling()).read_text())
    return [(e["args"]["op_name"], e["args"]["provider"]) for e in events
            if e.get("cat") == "Node" and "provider" in e.get("args", {})]


def test_profile_reader_sees_the_cpu_kernels(weights: Path) -> None:
    """The profile reader the GPU test relies on finds the graph's kernels (here on the CPU)."""
    nodes = _node_providers(weights / "fold0.onnx", ["CPUExecutionProvider"])
    assert {op for op, _ in nodes} >= {"Mul", "ReduceMean", "Sigmoid"}
    assert {prov for _, prov in nodes} == {"CPUExecutionProvider"}


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cuda:0", "cuda", "auto"])
def test_ensemble_runs_on_cuda(weights: Path, device: str) -> None:
    """With a CUDA device the sessions use the CUDA provider (every compute kernel runs there,
    read from an ONNX Runtime profile) and give the CPU's probabilities."""
    ens = Ensemble.load(weights, device=device)
    assert ens.provider == "CUDAExecutionProvider"
    nodes = _node_providers(weights / "fold0.onnx", ["CUDAExecutionProvider", "CPUExecutionProvider"])
    compute = [(op, prov) for op, prov in nodes if not op.startswith("Memcpy")]
    assert {op for op, _ in compute} >= {"Mul", "ReduceMean", "Sigmoid"}
    assert {prov for _, prov in compute} == {"CUDAExecutionProvider"}, nodes
    cpu = Ensemble.load(weights, device="cpu")
    x = _x(5, seed=2)
    np.testing.assert_allclose(ens.predict(x).per_model, cpu.predict(x).per_model, atol=1e-5, rtol=0)
    np.testing.assert_allclose(ens.predict(x, batch_size=2).per_model, cpu.predict(x).per_model,
                               atol=1e-5, rtol=0)


@pytest.mark.slow  # a child interpreter
def test_infer_import_is_light() -> None:
    import subprocess
    import sys

    code = (
        "import sys, recnec_cli.stages.infer; "
        "print(any(m in sys.modules for m in ('torch', 'monai', 'onnxruntime')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
