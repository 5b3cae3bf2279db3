"""Conv + BatchNorm (+ activation): the most common foldable pair."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..deploy.fold import fuse_conv_bn


class ConvNorm(nn.Module):
    """``act(norm(conv(x)))`` with a bias-free conv; ``fuse()`` folds the norm into the conv.

    ``padding=None`` means "same" padding for odd kernels (``(k - 1) // 2 * dilation``).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        padding: int | None = None,
        groups: int = 1,
        dilation: int = 1,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
        act_layer: Callable[[], nn.Module] | None = None,
        bn_weight_init: float = 1.0,
    ) -> None:
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False)
        self.norm = norm_layer(out_chs)
        if bn_weight_init != 1.0 and getattr(self.norm, "weight", None) is not None:
            nn.init.constant_(self.norm.weight, bn_weight_init)
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))

    def fuse(self) -> nn.Module:
        conv = fuse_conv_bn(self.conv, self.norm)
        return conv if isinstance(self.act, nn.Identity) else nn.Sequential(conv, self.act)
