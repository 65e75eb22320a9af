"""3D CNN families of the paper (Frontiers in Oncology 2025, PubMed 40548110), sized for 40^3 input.

Every builder returns a ``torch.nn.Module`` mapping float32 ``(N, 3, 40, 40, 40)`` (channels T1,
T2, T1ce; axes RAS+) to one logit per study, shape ``(N, 1)``. :class:`ProbabilityHead` wraps it
for export so the ONNX graph outputs the probability of recurrence, shape ``(N,)``.

* ``resnet10`` (default): MedicalNet-style ResNet10 (Chen et al. 2019, arXiv:1904.00625) built
  with ``monai.networks.nets.ResNet``: basic blocks ``[1, 1, 1, 1]``, first convolution 7^3 with
  stride 2, max-pool, shortcut type B; channel widths ``[w, 2w, 4w, 8w]`` (MedicalNet uses
  w = 64; we default to w = 16, see :data:`recnec_cli.train.config.PROFILES`). MONAI's default first
  convolution has stride 1, which costs 4-8x more (``docs/stack-notes.md``).
* ``resnet18``: the same with blocks ``[2, 2, 2, 2]``.
* ``vgg16``: VGG16-style (Simonyan & Zisserman 2015) 3D stack of 13 convolutions in five blocks
  ``[2, 2, 3, 3, 3]`` of widths ``[w, 2w, 4w, 8w, 8w]``, batch norm, max-pool after each block
  (40 -> 20 -> 10 -> 5 -> 2 -> 1), then a small fully connected head.
* ``densenet121``: ``monai.networks.nets.DenseNet`` with DenseNet-121 blocks ``(6, 12, 24, 16)``,
  ``init_features = 2w`` and ``growth_rate = w / 2`` (Huang et al. 2017 use 64 / 32).

torch and MONAI are imported here; this module is only imported by ``recnec train``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ARCHS


def _resnet(layers: list[int], width: int) -> nn.Module:
    from monai.networks.nets import ResNet

    return ResNet(
        block="basic", layers=layers, block_inplanes=[width, 2 * width, 4 * width, 8 * width],
        spatial_dims=3, n_input_channels=3, conv1_t_size=7, conv1_t_stride=2,
        shortcut_type="B", num_classes=1,
    )


class VGG3d(nn.Module):
    """VGG16-style 3D network: 13 conv(3^3)+BN+ReLU in blocks [2, 2, 3, 3, 3], max-pool after each."""

    def __init__(self, width: int = 8, in_channels: int = 3) -> None:
        super().__init__()
        widths = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        layers: list[nn.Module] = []
        c_in = in_channels
        for n_conv, c_out in zip([2, 2, 3, 3, 3], widths):
            for _ in range(n_conv):
                layers += [nn.Conv3d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm3d(c_out),
                           nn.ReLU(inplace=True)]
                c_in = c_out
            layers.append(nn.MaxPool3d(2, ceil_mode=False))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in, 4 * width), nn.ReLU(inplace=True),
                                  nn.Dropout(0.3), nn.Linear(4 * width, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))


def build_model(arch: str, *, width: int) -> nn.Module:
    """Return an untrained network for ``arch`` (one of :data:`ARCHS`) with base width ``width``.

    Output: logits ``(N, 1)`` for input ``(N, 3, 40, 40, 40)``.
    """
    if arch == "resnet10":
        return _resnet([1, 1, 1, 1], width)
    if arch == "resnet18":
        return _resnet([2, 2, 2, 2], width)
    if arch == "vgg16":
        return VGG3d(width=width)
    if arch == "densenet121":
        from monai.networks.nets import DenseNet

        return DenseNet(spatial_dims=3, in_channels=3, out_channels=1, init_features=2 * width,
                        growth_rate=max(width // 2, 4), block_config=(6, 12, 24, 16))
    raise ValueError(f"unknown architecture {arch!r}; choose one of {ARCHS}")


class ProbabilityHead(nn.Module):
    """``x (N, 3, 40, 40, 40) -> sigmoid(logit) (N,)``: probability of recurrence, for export."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).reshape(-1)


def n_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
