"""Shared fixtures. Real data is read from ``$RECNEC_SHARED_DATA`` (default ``../shared/data``
beside the repository) and tests that need it skip with a clear reason when it is absent."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    return Path(os.environ.get("RECNEC_SHARED_DATA", REPO.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real public MRI cases (``.../shared/data``)."""
    d = shared_data_dir()
    if not (d / "real").is_dir():
        pytest.skip(f"real MRI cases not found at {d} (set RECNEC_SHARED_DATA)")
    return d


@pytest.fixture(scope="session")
def real(shared_data: Path) -> Path:
    """``.../shared/data/real``: one folder per case, each with SOURCE.md."""
    return shared_data / "real"


@pytest.fixture(autouse=True, scope="session")
def _site_key_and_settle(tmp_path_factory):
    """Every test session gets its own pseudonym key file (never the user's ~/.config/recnec),
    scans freshly written test studies at once (``RECNEC_SETTLE_MINUTES=0``; the deferral tests
    set their own settle time) and in-process (``RECNEC_WORKERS=0``). Session-scoped so that
    module-scoped scan fixtures see it too."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RECNEC_PSEUDONYM_KEY_FILE", str(tmp_path_factory.mktemp("key") / "pseudonym.key"))
        mp.setenv("RECNEC_SETTLE_MINUTES", "0")
        # studies in this process, so that a test's stand-in for HD-BET applies; the worker-pool
        # tests (test_workers.py) choose their workers explicitly
        mp.setenv("RECNEC_WORKERS", "0")
        yield


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """Why ONNX Runtime cannot run on a CUDA device here (``None`` when it can).

    ``CUDAExecutionProvider`` in ``get_available_providers()`` only says that onnxruntime-gpu is
    installed; a one-node session then shows whether a device and the CUDA / cuDNN libraries are
    really there (otherwise ONNX Runtime silently falls back to the CPU provider).
    """
    try:
        import onnxruntime as ort
        from onnx import TensorProto, helper
    except ImportError as exc:
        return f"not installed: {exc}"
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"this onnxruntime has no CUDAExecutionProvider ({ort.get_available_providers()})"
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        sess = ort.InferenceSession(model.SerializeToString(), sess_options=so,
                                    providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        return f"CUDAExecutionProvider failed to start: {type(exc).__name__}: {exc}"
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        return ("CUDAExecutionProvider is installed but fell back to the CPU "
                "(no device, or no CUDA / cuDNN libraries)")
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    """``@pytest.mark.gpu`` tests skip, with the reason, where CUDA cannot be used; with
    ``RECNEC_REQUIRE_GPU=1`` (a GPU CI job) they fail instead, so a broken GPU setup is not a skip."""
    if item.get_closest_marker("gpu") is None:
        return
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("RECNEC_REQUIRE_GPU") == "1":
        pytest.fail(f"RECNEC_REQUIRE_GPU=1 but {reason}", pytrace=False)
    pytest.skip(f"needs CUDA: {reason}")
