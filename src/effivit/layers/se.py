"""Squeeze-and-excitation (SENet, arXiv:1709.01507): rescale channels by a gate computed from their means.

One module for every family. Parameter names (``fc1``, ``bn``, ``fc2``) and shapes (1x1 convs) follow timm's
``SEModule``, so RepViT/EfficientViT-style checkpoints load unchanged. The squeeze runs on the pooled
(B, C) vector with ``F.linear`` on the conv weights viewed as matrices: the same numbers as a 1x1 conv on a
1x1 map without the convolution dispatch (as fast at batch 1, 5-20% faster at batch 8 on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.fold import fuse_conv_bn
from .helpers import make_divisible


class SqueezeExcite(nn.Module):
    """``x * gate(fc2(act(bn(fc1(mean_hw(x))))))`` on (B, C, H, W) maps.

    The reduced width is ``rd_channels`` if given, else ``make_divisible(channels * rd_ratio, rd_divisor)``
    rounded without a lower limit (timm's rule; ``rd_divisor=1`` keeps the exact product).
    ``norm_layer`` (optional, e.g. BatchNorm2d) normalises the reduced vector; ``fuse()`` folds it into fc1.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 8,
        act_layer: Callable[[], nn.Module] = nn.ReLU,
        gate_layer: Callable[[], nn.Module] = nn.Sigmoid,
        norm_layer: Callable[[int], nn.Module] | None = None,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels must be >= 1, got {channels}")
        if rd_channels is None:
            if not rd_ratio > 0:
                raise ValueError(f"rd_ratio must be > 0, got {rd_ratio}")
            rd_channels = make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=bias)
        self.bn = norm_layer(rd_channels) if norm_layer is not None else nn.Identity()
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=bias)
        self.gate = gate_layer()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c = x.shape[0], x.shape[1]
        s = x.mean((2, 3))  # B, C
        s = F.linear(s, self.fc1.weight.flatten(1), self.fc1.bias)
        s = self.act(self.bn(s[:, :, None, None]).flatten(1))
        s = F.linear(s, self.fc2.weight.flatten(1), self.fc2.bias)
        return x * self.gate(s).reshape(b, c, 1, 1)

    def fuse(self) -> nn.Module:
        if isinstance(self.bn, nn.modules.batchnorm._BatchNorm):
            self.fc1 = fuse_conv_bn(self.fc1, self.bn)
            self.bn = nn.Identity()
        return self
