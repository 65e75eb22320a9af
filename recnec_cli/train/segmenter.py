"""Train the lesion segmenter on synthetic images only, the SynthSeg way, and export it to ONNX.

Data: :mod:`recnec_cli.synth.segdata` (label maps of real MNI152 anatomy with lesions of many
kinds and the normally enhancing structures; random intensities, bias, blur, noise and missing
channels per image). A pool of :attr:`SegmenterConfig.n_maps` label maps is drawn once; each step
renders a fresh image from one of them (random intensities, random left-right flip), so the
network sees ``steps`` different images of ``n_maps`` heads.

Network: MONAI's ``UNet`` (Ronneberger et al. 2015; residual units as Kerfoot et al. 2018),
4 input channels (T1, T2, T1ce, FLAIR), 4 output classes (:data:`~recnec_cli.synth.segdata.CLASSES`),
on the 2 mm grid of :data:`~recnec_cli.synth.segdata.GRID_SHAPE`. Loss: MONAI ``DiceCELoss``
(soft Dice of the three lesion classes + cross-entropy), Adam with a linear learning-rate decay.

Reproducibility: every random draw is keyed by ``(seed, step)``; PyTorch runs with
``torch.use_deterministic_algorithms(True)`` and a fixed thread count (stored in the manifest),
so the same command on the same library versions writes the same ``segmenter.onnx`` bytes
(``tests/test_segmenter.py`` proves it on a short run). Checkpoints every
:attr:`SegmenterConfig.checkpoint_every` steps let an interrupted run resume to the same result.

The export wraps the network in a softmax, so the ONNX graph maps ``image`` float32
``(1, 4, X, Y, Z)`` to ``probabilities`` float32 ``(1, 4, X, Y, Z)``; ONNX Runtime must agree
with PyTorch within :data:`MAX_ABS_DIFF` on held-out images.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..atomic import atomic_write_text
from ..errors import TrainingError
from ..stages.infer import sha256_file
from ..stages.segment import SEGMENTER_FILE, SEGMENTER_FORMAT, SEGMENTER_INPUT, SEGMENTER_MANIFEST, SEGMENTER_OUTPUT
from ..synth import segdata

log = logging.getLogger(__name__)

#: largest |ONNX Runtime - PyTorch| probability accepted at export
MAX_ABS_DIFF = 1e-4
OPSET = 17
DISCLAIMER = ("RESEARCH USE ONLY. The shipped lesion segmenter was trained on synthetic images only "
              "(label maps of MNI152 anatomy with simulated lesions and random contrasts), never on "
              "patients; it is not clinically validated.")


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything that decides the segmenter's weights (stored in its manifest)."""

    seed: int = 0
    steps: int = 2000
    n_maps: int = 240
    lr: float = 2e-3
    channels: tuple[int, ...] = (12, 24, 48, 96, 128)
    strides: tuple[int, ...] = (2, 2, 2, 2)
    num_res_units: int = 1
    threads: int = 1
    checkpoint_every: int = 100
    n_validation: int = 12


SHIPPED = SegmenterConfig()


def build_net(cfg: SegmenterConfig) -> Any:
    """The MONAI UNet of ``cfg`` (logits ``(N, 4, X, Y, Z)``)."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=len(segdata.CHANNELS), out_channels=len(segdata.CLASSES),
                channels=cfg.channels, strides=cfg.strides, num_res_units=cfg.num_res_units)


def _softmax_head(net: Any) -> Any:
    import torch

    class SoftmaxHead(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: Any) -> Any:
            return torch.softmax(self.inner(x), dim=1)

    return SoftmaxHead(net)


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice of two bool arrays; 1 when both are empty."""
    s = int(pred.sum()) + int(ref.sum())
    return 1.0 if s == 0 else 2.0 * int((pred & ref).sum()) / s


def train_segmenter(out: Path, cfg: SegmenterConfig = SHIPPED, *,
                    progress: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Train, export ``segmenter.onnx`` and write ``segmenter.json`` into ``out``.

    Work files (checkpoint, training log) live in ``out / ".segmenter-work"``; a run with the same
    ``cfg`` resumes from its checkpoint. ``progress(step, steps, loss)`` is called every step.

    Returns
    -------
    dict
        The manifest written.

    Raises
    ------
    TrainingError
        ``ONNX_MISMATCH`` when ONNX Runtime disagrees with PyTorch.
    """
    import torch
    from monai.losses import DiceCELoss

    out = Path(out)
    work = out / ".segmenter-work"
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    net = build_net(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.02, 1.0 - s / cfg.steps))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    ckpt = work / "checkpoint.pt"
    start, losses = 0, []
    cfg_key = json.dumps(asdict(cfg), sort_keys=True)
    if ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state.get("config") == cfg_key:
            net.load_state_dict(state["net"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            start, losses = int(state["step"]), list(state["losses"])
            torch.set_rng_state(state["torch_rng"])
            log.info("resuming segmenter training at step %d", start)
    t0 = time.monotonic()
    pool: dict[int, segdata.LabelMap] = {}
    for step in range(start, cfg.steps):
        rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, step, 0x5E6]))
        k = int(rng.integers(cfg.n_maps))
        if k not in pool:
            pool[k] = segdata.draw_label_map(cfg.seed, k)
        s = segdata.render_sample(pool[k], cfg.seed, 10_000_000 + step, flip=bool(rng.uniform() < 0.5))
        x = torch.from_numpy(s.image[None])
        y = torch.from_numpy(s.target[None, None])
        net.train()
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            progress(step + 1, cfg.steps, losses[-1])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"config": cfg_key, "net": net.state_dict(), "opt": opt.state_dict(),
                        "sched": sched.state_dict(), "step": step + 1, "losses": losses,
                        "torch_rng": torch.get_rng_state()}, tmp)
            tmp.replace(ckpt)
    train_s = time.monotonic() - t0
    with open(work / "losses.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["step", "loss"])
        w.writerows([i + 1, f"{v:.6f}"] for i, v in enumerate(losses))
    validation = validate(net, cfg)
    path = out / SEGMENTER_FILE
    head = _softmax_head(net).eval()
    export(head, path)
    diff = compare(head, path, np.stack([segdata.draw_sample(cfg.seed + 1, 1000 + i).image for i in range(2)]))
    from .export import library_versions, machine

    manifest = {
        "format": SEGMENTER_FORMAT,
        "command": "recnec train-segmenter --reproduce-shipped --out weights/" if cfg == SHIPPED else
                   "recnec train-segmenter",
        "disclaimer": DISCLAIMER,
        "method": "SynthSeg-style training on synthetic label maps (Billot et al. 2023, Medical Image "
                  "Analysis 86:102789); MONAI UNet",
        "config": asdict(cfg),
        "input": {"name": SEGMENTER_INPUT, "channels": list(segdata.CHANNELS),
                  "shape": [1, len(segdata.CHANNELS), *segdata.GRID_SHAPE],
                  "spacing_mm": segdata.GRID_SPACING_MM,
                  "axis_order": "N, C, X (towards Right), Y (Anterior), Z (Superior); world RAS+",
                  "normalisation": "robust z-score inside the brain mask, clipped to +-5, 0 outside "
                                   "the mask and for a missing channel"},
        "output": {"name": SEGMENTER_OUTPUT, "classes": list(segdata.CLASSES),
                   "meaning": "softmax probability per class and voxel"},
        "validation": validation,
        "training_seconds": round(train_s, 1),
        "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5) if losses else None,
        "onnx_max_abs_diff": diff,
        "libraries": library_versions(),
        "machine": machine(),
        "files": {SEGMENTER_FILE: sha256_file(path)},
    }
    atomic_write_text(out / SEGMENTER_MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def validate(net: Any, cfg: SegmenterConfig) -> dict[str, Any]:
    """Dice of enhancing tissue (and of the whole lesion) on ``cfg.n_validation`` images of a
    seed never used for training; an image without a lesion counts 1 when nothing is found."""
    import torch

    net.eval()
    d_enh, d_all = [], []
    with torch.no_grad():
        for i in range(cfg.n_validation):
            s = segdata.draw_sample(cfg.seed + 1, i)
            pred = torch.argmax(net(torch.from_numpy(s.image[None])), dim=1)[0].numpy()
            d_enh.append(dice(pred == 1, s.target == 1))
            d_all.append(dice(np.isin(pred, (1, 2)), np.isin(s.target, (1, 2))))
    return {"n": cfg.n_validation, "seed": cfg.seed + 1, "dice_enhancing_median": float(np.median(d_enh)),
            "dice_enhancing": [round(v, 4) for v in d_enh],
            "dice_lesion_median": float(np.median(d_all))}


def export(head: Any, path: Path) -> None:
    """Write ``head`` (softmax-wrapped UNet) as one ONNX file with a fixed input shape."""
    import warnings

    import onnx
    import torch

    dummy = torch.zeros((1, len(segdata.CHANNELS), *segdata.GRID_SHAPE), dtype=torch.float32)
    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*instance_norm.*")  # MONAI's InstanceNorm has no running stats
        torch.onnx.export(head, (dummy,), str(tmp), dynamo=False, opset_version=OPSET,
                          input_names=[SEGMENTER_INPUT], output_names=[SEGMENTER_OUTPUT],
                          do_constant_folding=True)
    onnx.checker.check_model(onnx.load(str(tmp)))
    tmp.replace(path)


def compare(head: Any, path: Path, x: np.ndarray) -> float:
    """Max |ONNX Runtime - PyTorch| over ``x`` ``(N, 4, X, Y, Z)``, one image at a time.

    Raises
    ------
    TrainingError
        ``ONNX_MISMATCH`` above :data:`MAX_ABS_DIFF`.
    """
    import onnxruntime as ort
    import torch

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])
    diff = 0.0
    with torch.no_grad():
        for xi in x:
            xi = np.ascontiguousarray(xi[None], dtype=np.float32)
            ref = head(torch.from_numpy(xi)).numpy()
            got = sess.run([SEGMENTER_OUTPUT], {SEGMENTER_INPUT: xi})[0]
            diff = max(diff, float(np.max(np.abs(got - ref))))
    if not diff <= MAX_ABS_DIFF:
        raise TrainingError(f"{path.name}: ONNX Runtime differs from PyTorch by {diff:.3g}",
                            code="ONNX_MISMATCH")
    return diff
