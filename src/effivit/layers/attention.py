"""Multi-head attention core on ``F.scaled_dot_product_attention``.

One implementation for every family: eager, TorchScript, ONNX and torch.compile all run this code (only
view/reshape/permute around one SDPA call). Families build q/k/v their own way and call ``attend``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v for (B, heads, N, head_dim) tensors; ``bias`` broadcasts to
    (B, heads, N, M)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, heads, N, C // heads)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) -> (B, N, heads * head_dim)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def map_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) map -> (B, heads, H*W, C // heads) without going through (B, N, C)."""
    b, c, h, w = x.shape
    return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-1, -2)


def heads_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, H*W, head_dim) -> (B, heads * head_dim, H, W)."""
    b, heads, n, d = x.shape
    return x.transpose(-1, -2).reshape(b, heads * d, height, width)
