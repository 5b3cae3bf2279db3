"""Multi-head attention core on ``F.scaled_dot_product_attention``.

One implementation for every family: eager, TorchScript, ONNX and torch.compile all run this code (only
view/reshape/permute around one SDPA call). Families build q/k/v their own way and call ``attend``.

Layout matters on CPU: SDPA's fused (flash) CPU kernel needs a unit-stride last dimension in q/k/v; with any
other stride it silently falls back to the unfused math kernel (about 3x slower, and it materialises the
whole N x M score matrix). ``map_to_heads`` / ``heads_to_map`` move between (B, C, H, W) maps and heads so
that a channels_last map needs no copy at all (its memory already is (B, N, heads, head_dim)) and an NCHW
map needs exactly one copy each way.
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
    (B, heads, N, M). The output has q's memory layout (SDPA's fused CPU kernel keeps it)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def attend_channels_first(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """softmax(q^T k * scale + bias) applied to v, for channel-first (B, head_dim, N) tensors -> (B, v_dim, N).

    For one head per batch entry straight from conv outputs (EfficientViT-MSRA's cascaded heads on 7x7
    windows): the result is already in conv layout, and scale, matmul and bias are one ``baddbmm``. On CPU
    this is about 2x faster than ``attend`` for such small token counts, which needs layout transposes
    around SDPA. ``bias`` broadcasts to (B, N, N).
    """
    qt = q.transpose(-2, -1)  # B, N, head_dim
    if bias is None:
        attn = torch.bmm(qt, k) if scale == 1.0 else torch.bmm(qt, k) * scale
    elif scale == 1.0:  # scale folded into q upstream: no multiply in exported graphs either
        attn = torch.baddbmm(bias, qt, k)  # B, N, N
    else:
        attn = torch.baddbmm(bias, qt, k, alpha=scale)
    return torch.bmm(v, attn.softmax(dim=-1).transpose(-2, -1))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) tokens -> (B, heads, N, C // heads) (a view)."""
    b, n, c = x.shape
    return x.reshape(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) -> (B, N, heads * head_dim) (a view when x's memory is (B, N, heads, d))."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def map_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, C, H, W) map -> (B, heads, H*W, C // heads) with a unit-stride last dimension.

    A view for channels_last maps; one copy for NCHW maps (the copy SDPA would otherwise make less
    efficiently by falling back to its math kernel)."""
    b, c, h, w = x.shape
    if x.is_contiguous():
        return x.reshape(b, num_heads, c // num_heads, h * w).transpose(-1, -2).contiguous()
    return x.permute(0, 2, 3, 1).reshape(b, h * w, num_heads, c // num_heads).transpose(1, 2)


def heads_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, H*W, head_dim) -> (B, heads * head_dim, H, W).

    Free (a channels_last view) when x's memory is (B, N, heads, d), which is what SDPA returns for
    channels_last queries; otherwise one copy into NCHW."""
    b, heads, n, d = x.shape
    t = x.transpose(1, 2)  # B, N, heads, d
    if t.is_contiguous():
        return t.reshape(b, height, width, heads * d).permute(0, 3, 1, 2)
    return x.transpose(-1, -2).reshape(b, heads * d, height, width)
