"""Folding BatchNorm into the preceding convolution, for frozen inference-only networks."""

from __future__ import annotations

import torch
from torch import nn


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Absorb an eval-mode BatchNorm into `conv` in place: conv(x) then bn == the new conv(x)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)  # (C_out,)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight = nn.Parameter(conv.weight * scale.view(-1, 1, 1, 1), requires_grad=False)
    conv.bias = nn.Parameter(bn.bias + (bias - bn.running_mean) * scale, requires_grad=False)


def fold_batchnorm(module: nn.Module) -> nn.Module:
    """Fold every BatchNorm2d registered right after a Conv2d of the same parent into that conv,
    replacing the BatchNorm with Identity. Valid for networks whose forward feeds each such conv's
    output only to its BatchNorm (ResNets, EfficientNet-Lite); the tests check each backbone."""
    with torch.no_grad():
        for parent in list(module.modules()):
            children = list(parent.named_children())
            for (_, first), (name, second) in zip(children, children[1:]):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    fold_conv_bn(first, second)
                    setattr(parent, name, nn.Identity())
    return module
