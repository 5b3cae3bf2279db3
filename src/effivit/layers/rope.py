"""Rotary position embedding (RoFormer, arXiv:2104.09864) as EVA-02 uses it (arXiv:2303.11331).

A rotary table is ``cat(sin, cos)`` of shape (N, 2 * head_dim) for the N patch tokens; each consecutive pair
of channels (2i, 2i+1) of q and k is rotated by its angle. Tables are computed for the actual token grid
(families build them from the input's size), so any resolution works without resampling anything.
"""

from __future__ import annotations

import torch


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) over the last dimension."""
    return torch.stack((-x[..., 1::2], x[..., ::2]), dim=-1).reshape(x.shape)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., N, head_dim) by a ``cat(sin, cos)`` table (N, 2 * head_dim)."""
    sin, cos = rope.tensor_split(2, dim=-1)
    return x * cos + rotate_pairs(x) * sin


def apply_rope_after_prefix(x: torch.Tensor, rope: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """Rotate the patch tokens of x (B, heads, N, head_dim); the first ``num_prefix_tokens`` (class,
    register tokens) have no position and pass unchanged."""
    if num_prefix_tokens == 0:
        return apply_rope(x, rope).type_as(x)
    prefix, patches = x[:, :, :num_prefix_tokens], x[:, :, num_prefix_tokens:]
    return torch.cat((prefix, apply_rope(patches, rope).type_as(x)), dim=2)


def rope_bands(head_dim: int, temperature: float = 10000.0, device: torch.device | None = None) -> torch.Tensor:
    """The ``head_dim // 4`` inverse frequencies ``temperature ** -(i / (head_dim // 4))`` of a 2-D table (one
    quarter of the channels per axis and per sin/cos), in float32."""
    num_bands = head_dim // 4
    exponent = torch.arange(num_bands, dtype=torch.int64, device=device).to(torch.float32) / num_bands
    return 1.0 / (temperature**exponent)


def build_rope_table(
    grid_h: int,
    grid_w: int,
    head_dim: int,
    ref_h: int,
    ref_w: int,
    temperature: float = 10000.0,
    device: torch.device | None = None,
) -> torch.Tensor:
    """EVA-02's 2-D rotary table for a ``grid_h x grid_w`` token grid: ``cat(sin, cos)``, (H * W, 2 * head_dim),
    float32, rows in raster order.

    Positions are token indices rescaled so the grid spans the reference grid the model was pretrained on
    (``y * ref_h / grid_h``, ``x * ref_w / grid_w``: at a finer grid the rotations interpolate rather than
    extrapolate). Each position's angles are ``[y * bands, x * bands]`` (``head_dim / 2`` values), each used
    for one interleaved channel pair (``apply_rope``). The same numbers as timm's ``RotaryEmbeddingCat``
    (``in_pixels=False``, ``ref_feat_shape``), computed for the actual grid, so no table is stored or resampled.
    """
    if head_dim % 4:
        raise ValueError(f"a 2-D rotary table needs head_dim divisible by 4, got {head_dim}")
    bands = rope_bands(head_dim, temperature, device)
    ys = torch.arange(grid_h, dtype=torch.int64, device=device).to(torch.float32) / grid_h * ref_h
    xs = torch.arange(grid_w, dtype=torch.int64, device=device).to(torch.float32) / grid_w * ref_w
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1)  # H, W, 2
    angles = (grid.unsqueeze(-1) * bands).reshape(grid_h * grid_w, -1)  # N, head_dim / 2: [y bands, x bands]
    sin = angles.sin().repeat_interleave(2, dim=-1)  # N, head_dim (one angle per channel pair)
    cos = angles.cos().repeat_interleave(2, dim=-1)
    return torch.cat((sin, cos), dim=-1)
