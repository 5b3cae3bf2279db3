"""Window and grid partitions of (B, H, W, C) token maps (MaxViT's block and grid attention, arXiv:2204.01697).

Both split the map into groups of ``ph * pw`` tokens and fold the groups into the batch dimension, so one
attention call over ``(B * groups, ph * pw, C)`` attends within every group at once:

- **window** (block) partition: each group is a contiguous ``ph x pw`` window (local attention);
- **grid** partition: the map is seen as a ``ph x pw`` grid of cells of ``H/ph x W/pw`` tokens and each
  group takes the token at the same offset in every cell, i.e. tokens ``H/ph`` rows and ``W/pw`` columns
  apart (sparse, global attention).

Only view/reshape/permute: eager, TorchScript, FX, torch.export/ONNX and torch.compile run the same code
(no einops). H and W must be multiples of the partition size; models check that on their input (naming H,
W and the rule), so these functions do not check again. ``reverse`` functions take the map's H and W.
"""

from __future__ import annotations

import torch


def window_partition(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ph * W/pw, ph * pw, C): non-overlapping ``ph x pw`` windows, raster order."""
    b, h, w, c = x.shape
    x = x.view(b, h // ph, ph, w // pw, pw, c).permute(0, 1, 3, 2, 4, 5)  # B, nH, nW, ph, pw, C
    return x.reshape(-1, ph * pw, c)


def window_reverse(x: torch.Tensor, ph: int, pw: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition` for an ``h x w`` map: (B * windows, ph * pw, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // ph, w // pw, ph, pw, c).permute(0, 1, 3, 2, 4, 5)  # B, nH, ph, nW, pw, C
    return x.reshape(-1, h, w, c)


def grid_partition(x: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """(B, H, W, C) -> (B * H/ph * W/pw, ph * pw, C): groups of the tokens at one offset inside each cell of a
    ``ph x pw`` grid (``H/ph`` rows and ``W/pw`` columns apart)."""
    b, h, w, c = x.shape
    x = x.view(b, ph, h // ph, pw, w // pw, c).permute(0, 2, 4, 1, 3, 5)  # B, H/ph, W/pw, ph, pw, C
    return x.reshape(-1, ph * pw, c)


def grid_reverse(x: torch.Tensor, ph: int, pw: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`grid_partition` for an ``h x w`` map: (B * groups, ph * pw, C) -> (B, H, W, C)."""
    c = x.shape[-1]
    x = x.view(-1, h // ph, w // pw, ph, pw, c).permute(0, 3, 1, 4, 2, 5)  # B, ph, H/ph, pw, W/pw, C
    return x.reshape(-1, h, w, c)
