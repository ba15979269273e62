"""WideResNet with SiLU, laid out exactly like RobustBench's ``DMWideResNet``.

Wang2023Better checkpoints load strictly into this module (keys: ``init_conv``,
``layer.{g}.block.{i}.{batchnorm_0,conv_0,batchnorm_1,conv_1,shortcut}``,
``batchnorm``, ``logits``). The dataset's mean/std live inside the model as
non-persistent buffers, so callers and attacks feed images in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .normalize import register_normalization

BN_MOMENTUM = 0.01

# name -> (depth, width)
PRESETS: dict[str, tuple[int, int]] = {
    "wrn-70-16": (70, 16),
    "wrn-34-10": (34, 10),
    "wrn-28-10": (28, 10),
    "wrn-16-4": (16, 4),
    "wrn-10-2": (10, 2),
    "wrn-10-1": (10, 1),
}


class _Block(nn.Module):
    """Pre-activation block: BN → act → conv(stride) → BN → act → conv, TF "SAME" padding."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.batchnorm_0 = nn.BatchNorm2d(in_planes, momentum=BN_MOMENTUM)
        self.conv_0 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes, momentum=BN_MOMENTUM)
        self.conv_1 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, 1, stride=stride, padding=0, bias=False) if self.has_shortcut else None
        )
        # TensorFlow "SAME" for a 3×3 kernel: symmetric at stride 1, right/bottom only at stride 2.
        self._pad = (1, 1, 1, 1) if stride == 1 else (0, 1, 0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.silu(self.batchnorm_0(x))
        out = self.conv_0(F.pad(act, self._pad))
        out = self.conv_1(F.silu(self.batchnorm_1(out)))
        # The projection shortcut sees the activated input; the identity shortcut the raw one.
        return out + (self.shortcut(act) if self.has_shortcut else x)


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            *[_Block(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class WideResNet(nn.Module):
    """WRN-depth-width. forward(x: (B, C, H, W) in [0, 1]) -> logits (B, num_classes)."""

    def __init__(
        self,
        depth: int = 28,
        width: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] = (0.4914, 0.4822, 0.4465),
        std: Sequence[float] = (0.2471, 0.2435, 0.2616),
    ):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must satisfy (depth - 4) % 6 == 0 and depth >= 10, got {depth}")
        if width < 1 or num_classes < 2 or in_channels < 1:
            raise ValueError(f"WideResNet: width >= 1, num_classes >= 2, in_channels >= 1 (got {width}, "
                             f"{num_classes}, {in_channels})")
        self.depth, self.width, self.num_classes, self.in_channels = depth, width, num_classes, in_channels
        n = (depth - 4) // 6
        channels = [16, 16 * width, 32 * width, 64 * width]
        register_normalization(self, mean, std, in_channels, "WideResNet")
        self.init_conv = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(n, channels[0], channels[1], 1),
            _BlockGroup(n, channels[1], channels[2], 2),
            _BlockGroup(n, channels[2], channels[3], 2),
        )
        self.batchnorm = nn.BatchNorm2d(channels[3], momentum=BN_MOMENTUM)
        self.logits = nn.Linear(channels[3], num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, 64·width) of images x: (B, C, H, W) in [0, 1] (the input of ``logits``)."""
        out = self.init_conv((x - self.mean) / self.std)
        out = self.layer(out)
        out = F.silu(self.batchnorm(out))
        # 8×8 average pooling at 32 px (the reference) is the same as adaptive pooling to 1×1.
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(self.features(x))


def build_wrn(name: str | None = None, *, depth: int | None = None, width: int | None = None, **kwargs) -> WideResNet:
    """Build a preset ("wrn-28-10") or any depth/width."""
    if name is not None:
        if name not in PRESETS:
            raise ValueError(f"unknown WideResNet preset {name!r}; choose one of {sorted(PRESETS)} or give depth/width")
        depth, width = PRESETS[name]
    if depth is None or width is None:
        raise ValueError("build_wrn needs a preset name or both depth and width")
    return WideResNet(depth=depth, width=width, **kwargs)


def set_bn_momentum(model: nn.Module, momentum: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum


def bn_parameter_names(model: nn.Module) -> set[str]:
    """Names of BatchNorm weights/biases (excluded from weight decay)."""
    names = set()
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for p_name, _ in m.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names
