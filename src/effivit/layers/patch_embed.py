"""Patch embedding: a convolution whose kernel and stride are the patch size turns an image into a grid of
tokens (ViT, arXiv:2010.11929). Parameter names follow timm (``proj``, ``norm``)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class PatchEmbed(nn.Module):
    """(B, C, H, W) image -> (B, (H / p) * (W / p), embed_dim) tokens in raster order.

    H and W must be multiples of the patch size ``p`` (models check that before calling, with an error that
    names H, W and the rule); the grid is ``(H // p, W // p)``.
    """

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, bias: bool = True,
                 norm_layer: Callable[[int], nn.Module] | None = None) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size}")
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = norm_layer(embed_dim) if norm_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # B, C, H / p, W / p
        return self.norm(x.flatten(2).transpose(1, 2))  # B, N, C
