"""Normalisation layers not in torch.nn."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)  # B, H, W, C
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel of a (B, C, H, W) map: what an eval-mode BatchNorm2d computes (the
    inference form of a BatchNorm with nothing to fold into)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone().reshape(1, -1, 1, 1))
        self.register_buffer("shift", shift.detach().clone().reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x, self.scale)


class GlobalResponseNorm(nn.Module):
    """Global Response Normalization (ConvNeXt V2, arXiv:2301.00808).

    ``x + bias + weight * x * N(x)`` with ``N(x) = G(x) / (mean_c G(x) + eps)`` and ``G(x)`` the L2 norm of
    each channel over the spatial positions. Computed as ``x * (1 + weight * N(x)) + bias``: one full-size
    multiply-add instead of three, and the norm as ``sqrt(sum(x * x))`` (``torch.linalg.vector_norm`` over two
    strided dims is several times slower on CPU; ``x * x`` beats ``Pow`` in ONNX Runtime). ``channels_last=True`` takes (B, H, W, C) tokens,
    ``False`` takes (B, C, H, W) maps. Parameter names and shapes follow timm (``weight``, ``bias``, (C,)).

    A block folds ``bias`` into the linear layer that follows (``take_bias``), leaving ``x * (1 + w N(x))``.
    """

    # A TorchScript constant (a Final annotation would be a string under postponed annotations here).
    __constants__ = ["channels_last"]

    def __init__(self, dim: int, eps: float = 1e-6, channels_last: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.channels_last = channels_last
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            g = (x * x).sum((1, 2), keepdim=True).sqrt()  # B, 1, 1, C
            scale = g / (g.mean(-1, keepdim=True) + self.eps) * self.weight + 1.0
        else:
            g = (x * x).sum((2, 3), keepdim=True).sqrt()  # B, C, 1, 1
            scale = g / (g.mean(1, keepdim=True) + self.eps) * self.weight.reshape(-1, 1, 1) + 1.0
        if self.bias is None:
            out = x * scale
        elif self.channels_last:
            out = torch.addcmul(self.bias, x, scale)
        else:
            out = torch.addcmul(self.bias.reshape(-1, 1, 1), x, scale)
        return out

    def take_bias(self) -> torch.Tensor | None:
        """Remove and return the additive bias (for folding into the next linear layer)."""
        bias = self.bias
        self.bias = None
        return bias.detach() if bias is not None else None

    @classmethod
    def from_channels_last(cls, grn: GlobalResponseNorm) -> GlobalResponseNorm:
        """The same layer (shared parameters) for (B, C, H, W) maps."""
        out = cls(grn.weight.numel(), grn.eps, channels_last=False).to(grn.weight)
        out.weight = grn.weight
        out.bias = grn.bias
        return out
