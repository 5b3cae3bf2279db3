"""Learned absolute position embeddings at any token grid (ViT, arXiv:2010.11929; DeiT, arXiv:2012.12877).

A table ``pos_embed`` of shape (1, P + Ht * Wt, C) holds one vector per prefix token (class, distillation;
``P`` may be 0 when the prefix tokens take no position, as in DeiT III) and one per patch of the grid the
model was trained on, in raster order. For another grid the patch part, seen as a (C, Ht, Wt) image, is
resampled bicubically (``align_corners=False``, anti-aliased when shrinking, in float32 at least), the
prefix part is kept. These are the numbers timm computes (``resample_abs_pos_embed``), so models with
``dynamic_img_size``, built with ``img_size=`` or loading a checkpoint of another size agree with it.
At the trained grid the table is returned as it is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["resample_abs_pos_embed", "square_grid"]


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    grid_h: int,
    grid_w: int,
    old_h: int,
    old_w: int,
    num_prefix_tokens: int = 0,
    antialias: bool = True,
) -> torch.Tensor:
    """(1, P + old_h * old_w, C) table -> (1, P + grid_h * grid_w, C) table (``P = num_prefix_tokens``)."""
    if grid_h == old_h and grid_w == old_w:
        return pos_embed
    prefix = pos_embed[:, :num_prefix_tokens]
    patches = pos_embed[:, num_prefix_tokens:]
    dim = patches.shape[-1]
    grid = patches.reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # 1, C, Ht, Wt
    work = torch.promote_types(grid.dtype, torch.float32)  # bicubic in half precision is coarse
    grid = F.interpolate(grid.to(work), size=[grid_h, grid_w], mode="bicubic", align_corners=False,
                         antialias=antialias)
    patches = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim).to(pos_embed.dtype)
    if num_prefix_tokens == 0:
        return patches
    return torch.cat((prefix, patches), dim=1)


# The grid comes from the input's shape (a proxy while tracing): FX records one call that runs at run time.
# A module that imports this function wraps it under its own name too (torch.fx.wrap patches the caller's
# globals).
torch.fx.wrap("resample_abs_pos_embed")


def square_grid(num_patch_tokens: int) -> tuple[int, int]:
    """The square grid a checkpoint's table was trained on, from its number of patch tokens (checkpoints do
    not store the grid; every released ViT/EVA weight is square)."""
    side = math.isqrt(num_patch_tokens)
    if side * side != num_patch_tokens:
        raise ValueError(f"a position table with {num_patch_tokens} patch tokens is not a square grid; "
                         f"resample it to the model's grid before loading")
    return side, side
