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
