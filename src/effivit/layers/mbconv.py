"""Depth-wise separable conv (DSConv) and the inverted residual (MBConv, MobileNetV2 arXiv:1801.04381).

Both are chains of :class:`~effivit.layers.ConvNorm` and carry no residual themselves (families wrap them,
since some use them as down-sampling blocks without a shortcut). Each conv takes its own norm and
activation from a per-conv tuple: a conv whose norm is ``None`` gets a bias instead (EfficientViT-MIT's
"fewer norm" blocks), so one class covers both layouts. ``fuse`` needs nothing here: the walker folds each
``ConvNorm`` child.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from .conv_bn import ConvNorm

NormLayer = Callable[[int], nn.Module] | None
ActLayer = Callable[[], nn.Module] | None


def _per_conv(value: object, n: int, name: str) -> tuple:
    """One option per conv: a single value is repeated; a sequence must have one entry per conv."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"{name} must have {n} entries (one per conv), got {len(value)}: {value!r}")
        return tuple(value)
    return (value,) * n


class DSConv(nn.Module):
    """k x k depth-wise ConvNorm (carries the stride) -> 1x1 point-wise ConvNorm.

    norm_layers / act_layers: one entry per conv (depth-wise, point-wise) or one value for both.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        norm_layers: NormLayer | Sequence[NormLayer] = nn.BatchNorm2d,
        act_layers: ActLayer | Sequence[ActLayer] = (nn.ReLU6, None),
    ) -> None:
        super().__init__()
        norms = _per_conv(norm_layers, 2, "norm_layers")
        acts = _per_conv(act_layers, 2, "act_layers")
        self.depth_conv = ConvNorm(in_chs, in_chs, kernel_size, stride, groups=in_chs, norm_layer=norms[0],
                                   act_layer=acts[0], bias=norms[0] is None)
        self.point_conv = ConvNorm(in_chs, out_chs, 1, norm_layer=norms[1], act_layer=acts[1],
                                   bias=norms[1] is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(x))


class MBConv(nn.Module):
    """Inverted residual body: 1x1 expand -> k x k depth-wise (carries the stride) -> 1x1 project.

    mid_chs defaults to ``round(in_chs * expand_ratio)``. norm_layers / act_layers: one entry per conv
    (expand, depth-wise, project) or one value for all three.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        expand_ratio: float = 6.0,
        mid_chs: int | None = None,
        norm_layers: NormLayer | Sequence[NormLayer] = nn.BatchNorm2d,
        act_layers: ActLayer | Sequence[ActLayer] = (nn.ReLU6, nn.ReLU6, None),
    ) -> None:
        super().__init__()
        norms = _per_conv(norm_layers, 3, "norm_layers")
        acts = _per_conv(act_layers, 3, "act_layers")
        mid = mid_chs or round(in_chs * expand_ratio)
        if mid < 1:
            raise ValueError(f"MBConv hidden width must be >= 1, got {mid} (in_chs={in_chs}, "
                             f"expand_ratio={expand_ratio}, mid_chs={mid_chs})")
        self.inverted_conv = ConvNorm(in_chs, mid, 1, norm_layer=norms[0], act_layer=acts[0], bias=norms[0] is None)
        self.depth_conv = ConvNorm(mid, mid, kernel_size, stride, groups=mid, norm_layer=norms[1],
                                   act_layer=acts[1], bias=norms[1] is None)
        self.point_conv = ConvNorm(mid, out_chs, 1, norm_layer=norms[2], act_layer=acts[2], bias=norms[2] is None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.point_conv(self.depth_conv(self.inverted_conv(x)))
