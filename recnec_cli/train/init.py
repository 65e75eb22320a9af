"""Start a training from an existing ensemble (``recnec train --init-from WEIGHTS``).

A recnec weights folder holds ONNX files only. The legacy exporter folds every batch norm that
directly follows a convolution into that convolution (constant folding of
``W' = W * gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) * gamma / sqrt(var + eps)``), so
the batch-norm statistics are no longer in the file. :func:`network_from_onnx` therefore rebuilds
the architecture with each such batch norm removed and a bias on its convolution, and loads the
ONNX weights into it: the result computes exactly what the ONNX file computes (checked in ONNX
Runtime, :data:`~recnec_cli.train.export.MAX_ABS_DIFF`). Fine-tuning that network is fine-tuning
with **frozen batch-norm statistics**, the usual practice when batches are small
(torchvision ``ops.FrozenBatchNorm2d``; Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm",
arXiv:2105.07576): a 16-study batch of a 60-patient cohort gives noisy statistics.

Which architectures can be rebuilt: those whose every batch norm follows a convolution
(:data:`FOLDABLE_ARCHS`: resnet10, resnet18, vgg16). DenseNet's batch norms precede their
convolutions (pre-activation), survive export as separate nodes and do not fold; it is refused
(``INIT_UNSUPPORTED``), train it from scratch.

How the weights are matched: the ONNX ``Conv``/``Gemm`` nodes, in graph order, against the
network's ``Conv3d``/``Linear`` modules in the order a forward pass calls them (the tracer that
wrote the graph records nodes in that order); every shape must agree, then the whole network
must agree with ONNX Runtime on random input.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import RecnecError, TrainingError
from ..stages.infer import MANIFEST_NAME, read_manifest
from ..stages.modelinput import InputSpec
from .config import ARCHS
from .models import ProbabilityHead, build_model

log = logging.getLogger(__name__)

#: architectures whose exported ONNX can be turned back into a trainable network
FOLDABLE_ARCHS = ("resnet10", "resnet18", "vgg16")


@dataclass
class InitSource:
    """An ensemble to start from: one logits network ``(N, 3, 40, 40, 40) -> (N, 1)`` per model.

    ``entry`` goes into the new manifest under ``init_from``.
    """

    nets: list[nn.Module]
    arch: str
    width: int
    entry: dict[str, Any]

    def net_for_fold(self, fold: int) -> nn.Module:
        """The starting network of new fold ``fold``: source model ``fold mod M`` (a copy)."""
        import copy

        return copy.deepcopy(self.nets[fold % len(self.nets)])


def strip_batchnorm(net: nn.Module) -> nn.Module:
    """Replace every ``BatchNorm3d`` of ``net`` by ``Identity`` and give every bias-free
    ``Conv3d`` a (zero) bias: the form of the network after batch-norm folding. In place."""
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm3d):
                setattr(parent, name, nn.Identity())
    for m in net.modules():
        if isinstance(m, nn.Conv3d) and m.bias is None:
            m.bias = nn.Parameter(torch.zeros(m.out_channels))
    return net


def _call_order(net: nn.Module, shape: tuple[int, ...]) -> list[nn.Module]:
    """``Conv3d`` and ``Linear`` modules of ``net`` in the order one forward pass calls them."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, _i, _o: order.append(mod))
             for m in net.modules() if isinstance(m, (nn.Conv3d, nn.Linear))]
    try:
        net.eval()
        with torch.no_grad():
            net(torch.zeros((1, *shape), dtype=torch.float32))
    finally:
        for h in hooks:
            h.remove()
    return order


def network_from_onnx(path: Path, *, arch: str, width: int, spec: InputSpec = InputSpec(),
                      threads: int = 1) -> nn.Module:
    """Rebuild the trainable logits network of one exported model.

    Parameters
    ----------
    path:
        ``fold<k>.onnx`` written by ``recnec train`` (input ``(N, 3, 40, 40, 40)``, output the
        probability ``(N,)`` after a sigmoid).
    arch, width:
        The manifest's architecture (one of :data:`FOLDABLE_ARCHS`) and base width.
    spec:
        The model-input recipe (tensor shape).

    Returns
    -------
    torch.nn.Module
        Network without batch norm, outputting logits ``(N, 1)``, in eval mode; its sigmoid
        equals the ONNX output within :data:`~recnec_cli.train.export.MAX_ABS_DIFF`.

    Raises
    ------
    TrainingError
        ``INIT_UNSUPPORTED`` for an architecture whose batch norms do not fold (densenet121);
        ``INIT_INCOMPATIBLE`` if the graph's layers do not match ``arch``/``width`` or the rebuilt
        network disagrees with ONNX Runtime.
    """
    import onnx
    from onnx import numpy_helper

    from .export import MAX_ABS_DIFF, compare_with_torch

    _check_foldable(arch, Path(path).name)
    graph = onnx.load(str(path)).graph
    ops = [n.op_type for n in graph.node]
    if "BatchNormalization" in ops:
        raise TrainingError(f"--init-from: {path.name} keeps batch-norm nodes that did not fold",
                            code="INIT_UNSUPPORTED")
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    layers = [n for n in graph.node if n.op_type in ("Conv", "Gemm")]
    net = strip_batchnorm(build_model(arch, width=width))
    modules = _call_order(net, spec.shape)
    if len(layers) != len(modules):
        raise TrainingError(
            f"--init-from: {path.name} has {len(layers)} convolution/linear layers, {arch} width "
            f"{width} has {len(modules)}", code="INIT_INCOMPATIBLE")
    with torch.no_grad():
        for node, mod in zip(layers, modules):
            try:
                w = inits[node.input[1]]
                b = inits[node.input[2]] if len(node.input) > 2 else None
            except KeyError as exc:
                raise TrainingError(f"--init-from: {path.name}: layer {node.name} has a weight that is "
                                    f"not a stored initializer ({exc})", code="INIT_INCOMPATIBLE") from None
            if node.op_type == "Gemm":
                attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
                if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                    raise TrainingError(f"--init-from: {path.name}: unexpected Gemm {attrs}",
                                        code="INIT_INCOMPATIBLE")
                if not attrs.get("transB", 0):
                    w = w.T
            if tuple(w.shape) != tuple(mod.weight.shape) or (
                    b is not None and (mod.bias is None or tuple(b.shape) != tuple(mod.bias.shape))):
                raise TrainingError(
                    f"--init-from: {path.name}: layer {node.name} has weight {tuple(w.shape)}, "
                    f"{arch} width {width} expects {tuple(mod.weight.shape)}", code="INIT_INCOMPATIBLE")
            mod.weight.copy_(torch.from_numpy(np.array(w, dtype=np.float32)))
            if mod.bias is not None:
                mod.bias.copy_(torch.from_numpy(np.array(b, dtype=np.float32)) if b is not None
                               else torch.zeros_like(mod.bias))
    probe = np.random.default_rng(0).normal(size=(3, *spec.shape)).astype(np.float32)
    try:
        compare_with_torch(ProbabilityHead(net), path, probe, threads=threads)
    except TrainingError as exc:
        raise TrainingError(f"--init-from: the network rebuilt from {path.name} disagrees with it "
                            f"({exc}; limit {MAX_ABS_DIFF})", code="INIT_INCOMPATIBLE") from None
    return net.eval()


def _check_foldable(arch: str, source: Any) -> None:
    """Raise ``INIT_UNSUPPORTED`` for an architecture whose batch norms do not fold (densenet121)."""
    if arch not in FOLDABLE_ARCHS:
        raise TrainingError(
            f"--init-from {source}: a {arch} model cannot be rebuilt from its ONNX file (its batch "
            f"norms precede their convolutions and do not fold); fine-tuning works for "
            f"{', '.join(FOLDABLE_ARCHS)}; train {arch} from scratch (leave out --init-from)",
            code="INIT_UNSUPPORTED")


def _source_manifest(weights_dir: Path, *, verify: bool) -> dict[str, Any]:
    """:func:`~recnec_cli.stages.infer.read_manifest`, its errors re-raised as ``INIT_UNREADABLE``
    (the underlying message and code kept in the text)."""
    weights_dir = Path(weights_dir)
    if not (weights_dir / MANIFEST_NAME).is_file():
        what = ("does not exist" if not weights_dir.exists() else "is not a folder"
                if not weights_dir.is_dir() else f"has no {MANIFEST_NAME}")
        raise TrainingError(f"--init-from {weights_dir} {what}: give a recnec weights folder (the "
                            "shipped weights/ or a `recnec train --out` folder)", code="INIT_UNREADABLE")
    try:
        return read_manifest(Path(weights_dir), verify=verify)
    except RecnecError as exc:
        raise TrainingError(f"--init-from {weights_dir}: {exc.message} ({exc.code})",
                            code="INIT_UNREADABLE") from None


def source_architecture(weights_dir: Path) -> tuple[str, int]:
    """``(arch, width)`` of a weights folder's models, read from its manifest (not verified here;
    :func:`load_init_source` verifies). Raises :class:`TrainingError` ``INIT_UNREADABLE``."""
    models = _source_manifest(weights_dir, verify=False)["models"]
    try:
        return str(models[0]["arch"]), int(models[0]["width"])
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        raise TrainingError(f"--init-from {weights_dir}: no architecture in its manifest ({exc})",
                            code="INIT_UNREADABLE") from None


def load_init_source(weights_dir: Path, *, spec: InputSpec = InputSpec(), arch: str | None = None,
                     width: int | None = None, threads: int = 1) -> InitSource:
    """Verify a weights folder (manifest checksums) and rebuild each of its models for training.

    Parameters
    ----------
    weights_dir:
        A recnec weights folder (the shipped ``weights/`` or any ``recnec train --out``).
    spec:
        The model-input recipe of the new training; it must equal the folder's.
    arch, width:
        What the caller asked for (``None``: take the folder's); a different value is refused.

    Raises
    ------
    TrainingError
        ``INIT_INCOMPATIBLE`` (another input recipe, architecture or width, or a graph that does
        not rebuild), ``INIT_UNSUPPORTED`` (densenet121), ``INIT_UNREADABLE`` (missing or
        corrupt folder: the underlying weights error's message and code are kept in the text).
    """
    weights_dir = Path(weights_dir)
    manifest = _source_manifest(weights_dir, verify=True)
    try:
        src_spec = InputSpec.from_dict(manifest["input"])
    except (KeyError, TypeError, ValueError) as exc:
        raise TrainingError(f"--init-from {weights_dir}: unreadable input recipe ({exc})",
                            code="INIT_UNREADABLE") from None
    if src_spec != spec:
        raise TrainingError(f"--init-from {weights_dir}: its model input {src_spec.to_dict()} differs "
                            f"from this training's {spec.to_dict()}", code="INIT_INCOMPATIBLE")
    models = manifest["models"]
    src_arch = {m.get("arch") for m in models}
    src_width = {m.get("width") for m in models}
    if len(src_arch) != 1 or len(src_width) != 1 or not src_arch <= set(ARCHS):
        raise TrainingError(f"--init-from {weights_dir}: models of architectures {sorted(map(str, src_arch))} "
                            f"and widths {sorted(map(str, src_width))}", code="INIT_INCOMPATIBLE")
    s_arch, s_width = src_arch.pop(), int(src_width.pop())
    if (arch is not None and arch != s_arch) or (width is not None and width != s_width):
        raise TrainingError(
            f"--init-from {weights_dir} holds {s_arch} width {s_width}; --arch/--width asked for "
            f"{arch or s_arch} width {width or s_width} (leave them out to take the folder's)",
            code="INIT_INCOMPATIBLE")
    _check_foldable(s_arch, weights_dir)  # refused by folder name, before any model is read
    nets = [network_from_onnx(weights_dir / m["file"], arch=s_arch, width=s_width, spec=spec,
                              threads=threads) for m in models]
    from ..orchestration.state import digest

    entry = {
        "weights_dir": weights_dir.name,
        "model_version": manifest.get("model_version", "unknown"),
        "files_sha256_digest": digest([manifest["files"]]),
        "arch": s_arch, "width": s_width, "models": len(nets),
        "fold_mapping": f"new fold k starts from source model k mod {len(nets)}",
        "method": "ONNX weights loaded into the network with each batch norm folded into its "
                  "convolution (frozen batch-norm statistics), then trained with this manifest's "
                  "recipe; recnec_cli.train.init",
        "source_data": (manifest.get("data") or {}).get("description", "unknown"),
        "source_data_fingerprint_sha256": (manifest.get("data") or {}).get("fingerprint_sha256"),
        # the source's own start, if it was fine-tuned too: a chain keeps every link
        "source_init_from": manifest.get("init_from"),
    }
    log.info("--init-from: %d %s w%d models rebuilt from %s (%s)", len(nets), s_arch, s_width,
             weights_dir, entry["model_version"])
    return InitSource(nets=nets, arch=s_arch, width=s_width, entry=entry)
