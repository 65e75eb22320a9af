"""Device and thread policy shared by the stages and their orchestration.

Kept below both layers (it imports neither) so that a stage such as classification's image
evidence and the pipeline resolve ``--device`` the same way without importing each other.
torch is imported inside the functions only: ``recnec --help`` never pays for it.
"""

from __future__ import annotations

import logging

from .errors import EnvironmentBroken

log = logging.getLogger(__name__)


def resolve_torch_device(device: str) -> str | int:
    """``Settings.device`` -> torch / HD-BET device: ``"cpu"`` or a CUDA index.

    ``auto`` picks CUDA device 0 when torch sees one, else ``"cpu"``; ``cuda`` means index 0 and
    ``cuda:N`` index N.

    Raises
    ------
    EnvironmentBroken
        ``CUDA_UNAVAILABLE`` when ``cuda`` / ``cuda:N`` is asked for and torch sees no CUDA device.
    """
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return 0 if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise EnvironmentBroken(f"device {device} requested (--device / RECNEC_DEVICE) but torch sees no "
                                "CUDA device", code="CUDA_UNAVAILABLE")
    return int(device.split(":")[1]) if ":" in device else 0


def resolve_hdbet_device(device: str, backend: str) -> str | int:
    """``Settings.device`` -> HD-BET device (``"cpu"`` or a CUDA index) for ``backend``.

    For ``backend="torch"`` this is :func:`resolve_torch_device`. For ``"onnx"`` CUDA is what ONNX
    Runtime offers (``onnxruntime-gpu``'s CUDA provider), whatever torch build is installed: ``auto``
    picks device 0 when ONNX Runtime lists ``CUDAExecutionProvider``; ``cuda[:N]`` gives N, and the
    session refuses it (``CUDA_UNAVAILABLE``) when ONNX Runtime has no CUDA provider.

    Raises
    ------
    EnvironmentBroken
        ``CUDA_UNAVAILABLE`` as :func:`resolve_torch_device` (torch backend only).
    """
    if backend != "onnx":
        return resolve_torch_device(device)
    if device == "cpu":
        return "cpu"
    if device == "auto":
        import onnxruntime as ort

        return 0 if "CUDAExecutionProvider" in ort.get_available_providers() else "cpu"
    return int(device.split(":")[1]) if ":" in device else 0


def prepare_torch(threads: int = 0) -> None:
    """Process-wide torch set-up for every recnec inference path (HD-BET in scans, image evidence
    and training's preprocessing; not the training loop itself, whose shipped results must stay
    byte-reproducible).

    * ``torch.set_flush_denormal(True)``: subnormal floats are flushed to zero. HD-BET's network
      produces subnormal activations on inputs with large zero regions, and x86 processors handle
      them in microcode: measured here (``docs/stack-notes.md``), one forward pass of fold 0
      on a 64^3 crop took 65.8 s of CPU unflushed and 1.9 s flushed, whole-scan skull stripping
      1,956 s vs 44 s, with the same masks. The floating-point mode is per thread and inherited by
      threads created later, so call this before torch starts its thread pool (before the first
      tensor operation of the process).
    * ``threads > 0``: ``torch.set_num_threads(threads)`` (0 keeps torch's default).

    Idempotent; safe to call from each worker process.
    """
    import torch

    if not torch.set_flush_denormal(True):
        log.debug("this CPU does not support flushing subnormal floats (no SSE3)")
    if threads and torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


#: the environment variables through which the CPU libraries recnec uses read their thread count
#: when they start (OpenMP: torch, ONNX Runtime's default pool; MKL / OpenBLAS: numpy, scipy;
#: ITK: SimpleITK registration and resampling)
THREAD_ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")


def set_thread_environment(threads: int) -> None:
    """Set :data:`THREAD_ENV_VARS` to ``threads`` in this process's environment (``threads`` >= 1).

    Call it in a new process before torch, ONNX Runtime, SimpleITK or BLAS are imported: they read
    it once. Measured on a 2-core machine, three HD-BET processes with default thread counts took
    17 min for a head that takes 20 s alone (``docs/stack-notes.md``).
    """
    import os

    for var in THREAD_ENV_VARS:
        os.environ[var] = str(int(threads))
