"""Conv + BatchNorm (+ activation): the most common foldable pair."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..deploy.fold import fuse_bn_linear, fuse_conv_bn, fuse_linear_bn


class ConvNorm(nn.Sequential):
    """``act(norm(conv(x)))``; ``fuse()`` folds the norm into the conv.

    ``padding=None`` means "same" padding for odd kernels (``(k - 1) // 2 * dilation``). ``names`` are the
    conv's and the norm's attribute names, so each family keeps its reference's state-dict keys (timm says
    ``c``/``bn`` in RepViT, ``conv``/``bn`` in EfficientViT-MSRA and EfficientFormerV2); the maths is one.
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
        norm_layer: Callable[[int], nn.Module] | None = nn.BatchNorm2d,
        act_layer: Callable[[], nn.Module] | None = None,
        bn_weight_init: float = 1.0,
        bias: bool = False,
        names: tuple[str, str] = ("conv", "norm"),
    ) -> None:
        super().__init__()
        if padding is None:
            padding = (kernel_size - 1) // 2 * dilation
        conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=bias)
        # norm_layer=None: a plain conv (usually with bias=True), for blocks that drop some norms.
        norm = norm_layer(out_chs) if norm_layer is not None else nn.Identity()
        if bn_weight_init != 1.0 and getattr(norm, "weight", None) is not None:
            nn.init.constant_(norm.weight, bn_weight_init)
        self.add_module(names[0], conv)
        self.add_module(names[1], norm)
        self.add_module("act", act_layer() if act_layer is not None else nn.Identity())

    def fuse(self) -> nn.Module:
        conv, norm, act = self[0], self[1], self[2]
        conv = conv if isinstance(norm, nn.Identity) else fuse_conv_bn(conv, norm)
        return conv if isinstance(act, nn.Identity) else nn.Sequential(conv, act)


# ---- LeViT-style pairs (key names ``linear``/``bn``, as in timm's LeViT and the official checkpoints) ----


class LinearNorm(nn.Module):
    """A bias-free ``nn.Linear`` then BatchNorm1d over its output features, for tokens of any leading shape
    (``(B, N, C)`` or ``(B, H, W, C)``): the norm sees every token as one sample. ``fuse()`` -> one Linear."""

    def __init__(self, in_features: int, out_features: int, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features, bias=False)
        self.bn = nn.BatchNorm1d(out_features)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, -2)).reshape(x.shape)

    def fuse(self) -> nn.Module:
        return fuse_linear_bn(self.linear, self.bn)


class LinearNorm2d(nn.Module):
    """:class:`LinearNorm` for (B, C, H, W) maps: a bias-free conv named ``linear`` then BatchNorm2d named
    ``bn`` (LeViT's conv form; also its stride-2 3x3 stem convs). ``fuse()`` -> one conv."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, bn_weight_init: float = 1.0) -> None:
        super().__init__()
        self.linear = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)
        nn.init.constant_(self.bn.weight, bn_weight_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))

    def fuse(self) -> nn.Module:
        return fuse_conv_bn(self.linear, self.bn)


class NormLinear(nn.Sequential):
    """BatchNorm1d -> dropout -> Linear (LeViT's and RepViT's classifier; timm names the linear ``linear`` in
    LeViT and ``l`` in RepViT). ``fuse()`` folds the norm into the Linear."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, drop: float = 0.0,
                 std: float = 0.02, linear_name: str = "linear") -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(in_features)
        self.drop = nn.Dropout(drop)
        linear = nn.Linear(in_features, out_features, bias=bias)
        nn.init.trunc_normal_(linear.weight, std=std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
        self.add_module(linear_name, linear)

    def fuse(self) -> nn.Module:
        return fuse_bn_linear(self[0], self[2])
