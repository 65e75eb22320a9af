"""ONNX Runtime ensemble inference: load the weights once, verify them, predict in batches.

The weights folder (``weights/`` in the repository, or ``--weights DIR``) holds one ONNX file per
cross-validation fold plus ``manifest.json``, written by :mod:`recnec_cli.train.export`. The
manifest is the single source of truth for what the ensemble expects and what it means:

* ``input``: the :class:`~recnec_cli.stages.modelinput.InputSpec` (shape ``(3, 40, 40, 40)``, channel
  order T1, T2, T1ce, 1.5 mm box, robust z-score in the brain);
* ``threshold``: decision threshold on the mean probability of recurrence, chosen on
  out-of-fold predictions by ``recnec train``;
* ``calibration``: the Platt map from that raw mean to the reported probability
  (:mod:`recnec_cli.stages.calibration`; identity for weights trained before it existed);
* ``applicability``: the training distribution of the input statistics, for the
  ``OUT_OF_DISTRIBUTION`` flag (:mod:`recnec_cli.stages.applicability`; absent in older weights);
* ``files``: SHA-256 of every shipped file; all are verified **before** any ONNX Runtime session
  is created (docs/code-style.md habit 5: weights verified before use);
* ``models``: the ONNX files in ensemble order. Each graph takes ``input`` of shape
  ``(N, 3, 40, 40, 40)`` float32 and returns the probability of recurrence (label 1), shape
  ``(N,)`` (sigmoid inside the graph).

onnxruntime is imported inside functions only, so ``recnec --help`` never pays for it; torch and
MONAI are never imported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import EnvironmentBroken, InferenceError
from .applicability import Applicability
from .calibration import Calibration
from .modelinput import InputSpec

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: manifest ``format`` values this module can read
SUPPORTED_FORMATS = ("recnec-weights/1",)
#: ONNX graph input / output names written by :mod:`recnec_cli.train.export`
INPUT_NAME = "input"
OUTPUT_NAME = "probability"


def sha256_file(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk_bytes), b""):
            h.update(block)
    return h.hexdigest()


def _safe_member(weights_dir: Path, name: str) -> Path:
    """``weights_dir / name`` for a plain file name; refuses paths that leave the folder."""
    p = Path(name)
    if p.is_absolute() or len(p.parts) != 1 or name in (".", ".."):
        raise InferenceError(
            f"manifest lists {name!r}, which is not a plain file name inside the weights folder",
            code="WEIGHTS_MANIFEST_INVALID",
        )
    return weights_dir / name


def read_manifest(weights_dir: Path, *, verify: bool = True) -> dict[str, Any]:
    """Read ``weights_dir/manifest.json`` and (by default) verify every listed file's SHA-256.

    Parameters
    ----------
    weights_dir:
        Folder holding ``manifest.json`` and the files it lists.
    verify:
        Check the SHA-256 of every file under the manifest's ``files`` key.

    Returns
    -------
    dict
        The parsed manifest.

    Raises
    ------
    EnvironmentBroken
        ``WEIGHTS_MISSING`` if the folder, the manifest or a listed file does not exist;
        ``WEIGHTS_MANIFEST_INVALID`` if the manifest cannot be parsed or lacks required keys.
    InferenceError
        ``WEIGHTS_CHECKSUM_MISMATCH`` if a file's SHA-256 differs from the manifest.
    """
    weights_dir = Path(weights_dir)
    mpath = weights_dir / MANIFEST_NAME
    if not mpath.is_file():
        raise EnvironmentBroken(
            f"no {MANIFEST_NAME} in weights folder {weights_dir} (train one with `recnec train`, "
            "or reinstall recnec to restore the shipped weights)",
            code="WEIGHTS_MISSING",
        )
    try:
        manifest = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EnvironmentBroken(f"cannot read {mpath}: {exc}", code="WEIGHTS_MANIFEST_INVALID") from None
    missing = [k for k in ("format", "input", "threshold", "models", "files") if k not in manifest]
    if missing or not isinstance(manifest.get("files"), dict) or not manifest.get("models"):
        raise EnvironmentBroken(
            f"{mpath} is not a recnec weights manifest (missing or empty: {missing or ['models/files']})",
            code="WEIGHTS_MANIFEST_INVALID",
        )
    if manifest["format"] not in SUPPORTED_FORMATS:
        raise EnvironmentBroken(
            f"{mpath} has format {manifest['format']!r}; this recnec reads {SUPPORTED_FORMATS}",
            code="WEIGHTS_MANIFEST_INVALID",
        )
    for m in manifest["models"]:
        if m.get("file") not in manifest["files"]:
            raise EnvironmentBroken(
                f"model file {m.get('file')!r} has no checksum in {mpath}",
                code="WEIGHTS_MANIFEST_INVALID",
            )
    if verify:
        verify_checksums(weights_dir, manifest["files"])
    return manifest


def verify_checksums(weights_dir: Path, files: Mapping[str, str], manifest: str = "manifest.json") -> None:
    """Check ``sha256(weights_dir / name) == digest`` for every entry of ``files`` (listed in the
    file named ``manifest``, which the messages name).

    Raises
    ------
    EnvironmentBroken
        ``WEIGHTS_MISSING`` if a listed file is absent.
    InferenceError
        ``WEIGHTS_CHECKSUM_MISMATCH`` naming every file whose digest differs.
    """
    bad: list[str] = []
    for name, expected in files.items():
        path = _safe_member(Path(weights_dir), name)
        if not path.is_file():
            raise EnvironmentBroken(
                f"weights file {name} listed in {manifest} is missing from {weights_dir}",
                code="WEIGHTS_MISSING",
            )
        if sha256_file(path) != str(expected).lower():
            bad.append(name)
    if bad:
        raise InferenceError(
            f"SHA-256 of {', '.join(sorted(bad))} in {weights_dir} does not match {manifest}; "
            "the weights were modified or corrupted: refusing to use them",
            code="WEIGHTS_CHECKSUM_MISMATCH",
        )


def import_ort():
    """The ``onnxruntime`` module; ``EnvironmentBroken`` ``ONNXRUNTIME_MISSING`` (naming the extra
    to install) when it is not installed. Shared with :mod:`.hdbet_onnx`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EnvironmentBroken(
            "onnxruntime is not installed: install exactly one of `recnec[cpu]` "
            "(onnxruntime) or `recnec[gpu]` (onnxruntime-gpu)",
            code="ONNXRUNTIME_MISSING",
        ) from None
    return ort


def session_options(ort: Any, threads: int = 0) -> Any:
    """recnec's ``onnxruntime.SessionOptions``: warnings only, subnormal floats flushed, and with
    ``threads > 0`` that many intra-op threads and one inter-op thread.

    ``session.set_denormal_as_zero`` is ONNX Runtime's equivalent of torch.set_flush_denormal
    (onnxruntime session config keys): subnormal floats are slow on x86 (see recnec_cli.devices).
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads > 0:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    return so


def resolve_providers(device: str, available: list[str]) -> tuple[list[Any], bool]:
    """Map a ``--device`` value to an ONNX Runtime provider list.

    Parameters
    ----------
    device:
        ``auto`` (CUDA if ONNX Runtime offers it, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    available:
        ``onnxruntime.get_available_providers()``.

    Returns
    -------
    (providers, cuda_required)
        ``providers`` as accepted by ``InferenceSession(providers=...)``; ``cuda_required`` is
        True when the user asked for CUDA explicitly (a silent CPU fallback is then an error).

    Raises
    ------
    EnvironmentBroken
        ``CUDA_UNAVAILABLE`` when CUDA is requested but this onnxruntime has no CUDA provider.
    """
    dev = (device or "auto").strip().lower()
    has_cuda = "CUDAExecutionProvider" in available
    if dev == "cpu" or (dev == "auto" and not has_cuda):
        return ["CPUExecutionProvider"], False
    if dev == "auto":
        return [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"], False
    if dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        if not has_cuda:
            raise EnvironmentBroken(
                f"--device {device} requested, but onnxruntime offers only {available}; "
                "install `recnec[gpu]` (onnxruntime-gpu, CUDA 12/13 + cuDNN 9) instead of `recnec[cpu]`",
                code="CUDA_UNAVAILABLE",
            )
        device_id = int(dev[5:]) if dev.startswith("cuda:") else 0
        return [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"], True
    raise EnvironmentBroken(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)", code="USAGE_ERROR")


@dataclass(frozen=True)
class EnsemblePrediction:
    """Ensemble output for ``N`` studies and ``M`` models.

    Attributes
    ----------
    mean:
        float64 ``(N,)``: mean over models of the probability of recurrence (label 1), before
        calibration. This is the score compared with :attr:`Ensemble.threshold`.
    spread:
        float64 ``(N,)``: population standard deviation (``ddof=0``) of the ``M`` model
        probabilities, a crude disagreement measure.
    per_model:
        float64 ``(M, N)``: each model's probability, in manifest order.
    probability:
        float64 ``(N,)``: ``mean`` through the manifest's calibration map: the reported
        probability of recurrence (equal to ``mean`` for weights without calibration).
    distance:
        float64 ``(N,)``: applicability distance (Mahalanobis, unitless) to the training inputs;
        NaN for weights without an applicability model.
    out_of_distribution:
        bool ``(N,)``: ``distance`` above the manifest's applicability threshold.
    """

    mean: np.ndarray
    spread: np.ndarray
    per_model: np.ndarray
    probability: np.ndarray | None = None
    distance: np.ndarray | None = None
    out_of_distribution: np.ndarray | None = None


@dataclass
class Ensemble:
    """ONNX ensemble of per-fold CNNs; create with :meth:`Ensemble.load`, once per process.

    Attributes
    ----------
    spec:
        The model-input recipe from the manifest (tensor ``(3, 40, 40, 40)``, T1, T2, T1ce).
    threshold:
        Decision threshold on :attr:`EnsemblePrediction.mean` (the raw score);
        ``mean >= threshold`` means recurrence. :attr:`report_threshold` is the same threshold
        on the calibrated probability.
    calibration:
        Raw score -> reported probability (strictly increasing; identity when the manifest has none).
    applicability:
        Training distribution of the input statistics, or ``None`` (older weights: no flag).
    model_version:
        Manifest ``model_version`` (goes into every report row).
    provider:
        Execution provider actually used by the sessions (e.g. ``CPUExecutionProvider``).
    checksums:
        ``{file name: SHA-256}`` as verified at load time.
    manifest:
        The parsed ``manifest.json``.
    weights_dir:
        Folder the ensemble was loaded from.
    """

    spec: InputSpec
    threshold: float
    model_version: str
    provider: str
    checksums: dict[str, str]
    manifest: dict[str, Any]
    weights_dir: Path
    calibration: Calibration = field(default_factory=Calibration)
    applicability: Applicability | None = None
    _sessions: list[Any] = field(default_factory=list, repr=False)

    @property
    def report_threshold(self) -> float:
        """The decision threshold on the calibrated probability (what reports print)."""
        return float(self.calibration(np.array([self.threshold]))[0])

    @property
    def n_models(self) -> int:
        """Number of models ``M`` in the ensemble."""
        return len(self._sessions)

    @classmethod
    def load(cls, weights_dir: Path, *, device: str = "auto", threads: int = 0) -> "Ensemble":
        """Verify the weights folder and create one ONNX Runtime session per model.

        Parameters
        ----------
        weights_dir:
            Folder with ``manifest.json`` and the ONNX files it lists.
        device:
            ``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (see :func:`resolve_providers`).
        threads:
            ONNX Runtime intra-op threads per session; 0 lets ONNX Runtime decide.

        Raises
        ------
        EnvironmentBroken
            Missing manifest or file (``WEIGHTS_MISSING``), unreadable manifest
            (``WEIGHTS_MANIFEST_INVALID``), no onnxruntime (``ONNXRUNTIME_MISSING``), CUDA
            requested but unavailable (``CUDA_UNAVAILABLE``).
        InferenceError
            ``WEIGHTS_CHECKSUM_MISMATCH`` (checked before any session exists),
            ``WEIGHTS_SPEC_MISMATCH`` if a graph's input does not match the manifest's spec,
            ``SESSION_FAILED`` if ONNX Runtime cannot load a graph.
        """
        weights_dir = Path(weights_dir)
        manifest = read_manifest(weights_dir, verify=True)  # checksums first, sessions after
        try:
            spec = InputSpec.from_dict(manifest["input"])
            threshold = float(manifest["threshold"])
        except (KeyError, TypeError, ValueError) as exc:
            raise EnvironmentBroken(
                f"manifest input/threshold unreadable: {exc}", code="WEIGHTS_MANIFEST_INVALID"
            ) from None
        calibration = Calibration.from_manifest(manifest)
        applicability = Applicability.from_manifest(manifest)
        ort = import_ort()
        providers, cuda_required = resolve_providers(device, list(ort.get_available_providers()))
        # onnxruntime-gpu on a CPU-only host logs a CUDA load error at every session creation
        # unless the log severity is 4 (docs/stack-notes.md); we check the provider ourselves below.
        ort.set_default_logger_severity(4 if providers[0] != "CPUExecutionProvider" else 3)
        so = session_options(ort, threads)
        sessions = []
        used: set[str] = set()
        for m in manifest["models"]:
            path = weights_dir / m["file"]
            try:
                sess = ort.InferenceSession(str(path), sess_options=so, providers=providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise InferenceError(
                    f"onnxruntime could not load {m['file']}: {type(exc).__name__}: {exc}",
                    code="SESSION_FAILED",
                ) from None
            _check_graph_io(sess, spec, m["file"])
            used.add(sess.get_providers()[0])
            sessions.append(sess)
        provider = sorted(used)[0] if len(used) == 1 else ",".join(sorted(used))
        if cuda_required and provider != "CUDAExecutionProvider":
            raise EnvironmentBroken(
                f"--device {device} requested, but onnxruntime fell back to {provider} "
                "(CUDA/cuDNN libraries not found?)",
                code="CUDA_UNAVAILABLE",
            )
        if providers[0] != "CPUExecutionProvider" and provider == "CPUExecutionProvider":
            log.warning("CUDA execution provider unavailable at run time; using the CPU")
        log.info(
            "loaded %d-model ensemble %s from %s on %s (threshold %.4f; calibration %s; applicability %s)",
            len(sessions), manifest.get("model_version", "?"), weights_dir, provider, threshold,
            calibration.method, "on" if applicability is not None else "not in these weights",
        )
        return cls(
            spec=spec,
            threshold=threshold,
            model_version=str(manifest.get("model_version", "unknown")),
            provider=provider,
            checksums={k: str(v).lower() for k, v in manifest["files"].items()},
            manifest=manifest,
            weights_dir=weights_dir,
            calibration=calibration,
            applicability=applicability,
            _sessions=sessions,
        )

    def predict(self, x: np.ndarray, *, batch_size: int | None = None,
                applicability: bool = True) -> EnsemblePrediction:
        """Probability of recurrence for ``N`` model-input tensors.

        Parameters
        ----------
        x:
            float32 array ``(N, C, X, Y, Z)`` = ``(N, 3, 40, 40, 40)`` for the default spec,
            channels in :attr:`spec` order, built by :func:`recnec_cli.stages.modelinput.make_model_input`.
            A single tensor ``(C, X, Y, Z)`` is accepted as ``N = 1``.
        batch_size:
            Studies per ONNX Runtime call (memory bound); ``None`` runs all ``N`` at once.
        applicability:
            Compute the applicability distance (``False``: ``distance`` is NaN and nothing is
            flagged; for callers that only need probabilities of perturbed copies, e.g. the
            occlusion map's hundreds of passes).

        Returns
        -------
        EnsemblePrediction
            ``mean``, ``spread``, ``probability`` (calibrated), ``distance`` and
            ``out_of_distribution`` of shape ``(N,)``, ``per_model`` of shape ``(M, N)``.

        Raises
        ------
        InferenceError
            ``BAD_INPUT_SHAPE`` for a wrong shape, ``NONFINITE_INPUT`` for NaN/inf input,
            ``INFERENCE_FAILED`` if ONNX Runtime fails or returns non-finite values.
        """
        x = np.asarray(x)
        if x.ndim == len(self.spec.shape):
            x = x[None]
        if x.ndim != len(self.spec.shape) + 1 or tuple(x.shape[1:]) != self.spec.shape:
            raise InferenceError(
                f"model input must have shape (N, {', '.join(map(str, self.spec.shape))}), "
                f"got {tuple(x.shape)}",
                code="BAD_INPUT_SHAPE",
            )
        x = np.ascontiguousarray(x, dtype=np.float32)
        n = x.shape[0]
        if n and not np.isfinite(x).all():
            raise InferenceError("model input contains NaN or infinite values", code="NONFINITE_INPUT")
        step = n if not batch_size or batch_size <= 0 else int(batch_size)
        per_model = np.zeros((len(self._sessions), n), dtype=np.float64)
        for start in range(0, n, max(step, 1)):
            chunk = x[start:start + step]
            for mi, sess in enumerate(self._sessions):
                try:
                    (out,) = sess.run([OUTPUT_NAME], {INPUT_NAME: chunk})
                except Exception as exc:  # noqa: BLE001 - onnxruntime's own exception types
                    raise InferenceError(
                        f"onnxruntime failed on model {mi}: {type(exc).__name__}: {exc}",
                        code="INFERENCE_FAILED",
                    ) from None
                per_model[mi, start:start + len(chunk)] = np.asarray(out, dtype=np.float64).reshape(-1)
        if not np.isfinite(per_model).all():
            raise InferenceError("ensemble returned non-finite probabilities", code="INFERENCE_FAILED")
        mean = per_model.mean(axis=0) if n else np.zeros(0)
        if applicability and self.applicability is not None and n:
            distance = self.applicability.distance(x)
            ood = distance > self.applicability.threshold
        else:
            distance, ood = np.full(n, np.nan), np.zeros(n, dtype=bool)
        return EnsemblePrediction(
            mean=mean,
            spread=per_model.std(axis=0) if n else np.zeros(0),
            per_model=per_model,
            probability=self.calibration(mean),
            distance=distance,
            out_of_distribution=ood,
        )


def _check_graph_io(sess: Any, spec: InputSpec, name: str) -> None:
    """Refuse a graph whose input name/shape or output name does not match the manifest spec."""
    inputs = sess.get_inputs()
    outputs = [o.name for o in sess.get_outputs()]
    ok = len(inputs) == 1 and inputs[0].name == INPUT_NAME and OUTPUT_NAME in outputs
    if ok:
        dims = list(inputs[0].shape)
        ok = len(dims) == len(spec.shape) + 1 and all(
            (not isinstance(d, int)) or d == s for d, s in zip(dims[1:], spec.shape)
        )
    if not ok:
        shapes = [(i.name, i.shape) for i in inputs]
        raise InferenceError(
            f"{name}: graph inputs {shapes} / outputs {outputs} do not match the manifest "
            f"(expected {INPUT_NAME!r} of shape (N, {', '.join(map(str, spec.shape))}) -> {OUTPUT_NAME!r})",
            code="WEIGHTS_SPEC_MISMATCH",
        )
