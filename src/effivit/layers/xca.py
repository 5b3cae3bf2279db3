"""Cross-covariance attention (XCA, XCiT arXiv:2106.09681): attention between channels, not tokens.

For each head, ``softmax(temperature * q_hat k_hat^T)`` is a (head_dim x head_dim) matrix built from
l2-normalised q and k (normalised over tokens), and it mixes the channels of v. Cost is linear in the
number of tokens. q and k may come from a down-scaled map (fewer tokens) while v keeps full resolution:
the channel-by-channel matrix does not depend on the token count.

Because the attention is a linear map on channels, it composes with the linear layers around it:
``proj(A v(x)) = (W_proj A W_v) x + (W_proj A b_v + b_proj)``. ``mix_channels`` applies such a per-image
(C_out x C_in) matrix to a map in one batched GEMM; a caller may fold v's weights in (one C^3 product per
image instead of a second C^2 * N pass over the tokens) when there are more tokens than channels. This is a
reassociation of the same maths, not an approximation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def channel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    temperature: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """softmax over channels of ``temperature * q_hat k_hat^T``.

    q, k: (B, heads, head_dim, M), l2-normalised here over the M tokens; temperature: (heads, 1, 1).
    Returns (B, heads, head_dim, head_dim).
    """
    q = F.normalize(q, dim=-1)
    k = F.normalize(k, dim=-1)
    attn = (q @ k.transpose(-2, -1)) * temperature
    attn = attn.softmax(dim=-1)
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p, training)
    return attn


def cross_covariance_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    temperature: torch.Tensor,
    dropout_p: float = 0.0,
    training: bool = False,
) -> torch.Tensor:
    """q, k: (B, heads, head_dim, M); v: (B, heads, head_dim, N); temperature: (heads, 1, 1).

    Returns (B, heads, head_dim, N).
    """
    return channel_attention(q, k, temperature, dropout_p, training) @ v


def _eager() -> bool:
    return torch.jit.is_scripting() or not (torch.compiler.is_compiling() or torch.jit.is_tracing())


def apply_channel_attention(attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Each head's (head_dim x head_dim) attention applied to its channels of a (B, C, H, W) map v.

    attn: (B, heads, head_dim, head_dim). A batched matmul for NCHW maps; for a channels_last map of one
    image, a grouped 1x1 conv (one group per head), which reads and writes channels_last directly (the
    matmul would need two strided copies, 5-15x slower here). Returns (B, C, H, W).
    """
    b, c, h, w = v.shape
    heads, d = attn.shape[1], attn.shape[-1]
    if b == 1 and not v.is_contiguous() and _eager():
        return F.conv2d(v, attn.reshape(c, d, 1, 1), groups=heads)
    t = v.flatten(2).contiguous().reshape(b, heads, d, h * w)
    return torch.matmul(attn, t).reshape(b, c, h, w)


def mix_channels(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``weight[b] @ x[b] (+ bias[b])`` over the channels of a (B, C_in, H, W) map, one matrix per image.

    weight: (B, C_out, C_in); bias: (B, C_out) or None. Eager and TorchScript run it as one 1x1 conv (for
    B > 1 a grouped one, the images being the groups): on this CPU oneDNN's conv is about 2x faster than the
    fp32 (batched) GEMM, and a channels_last map stays channels_last. Graph capture (ONNX export,
    torch.export/compile) gets a batched matmul instead, because a conv's group count cannot follow a
    dynamic batch size. Both are the same maths.
    """
    b, c, h, w = x.shape
    if _eager():
        flat_bias = bias.reshape(-1) if bias is not None else None
        if b == 1:  # no reshape: re-striding the batch dim of a channels_last map would make conv pick NCHW
            return F.conv2d(x, weight.reshape(-1, c, 1, 1), flat_bias)
        out = F.conv2d(x.reshape(1, b * c, h, w), weight.reshape(-1, c, 1, 1), flat_bias, groups=b)
        return out.reshape(b, -1, h, w)
    out = torch.matmul(weight, x.reshape(b, c, h * w))  # B, C_out, N
    if bias is not None:
        out = out + bias.unsqueeze(-1)
    return out.reshape(b, -1, h, w)


class XCA(nn.Module):
    """Cross-covariance attention over tokens (XCiT's token mixer): one fused ``qkv`` Linear, the channel
    attention of each head (:func:`cross_covariance_attention`), an output projection.

    Parameter names are timm's (``qkv``, ``proj``, ``temperature``: one learned temperature per head), so
    XCiT checkpoints load unchanged. Tokens may have any leading layout (B, N, C) or (B, H, W, C): the
    attention reduces over all positions of an image. Next-ViT's map-based ``attn="xca"`` mixer computes the
    same attention through :func:`channel_attention` on 1x1-conv projections of a (B, C, H, W) map.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (B, ..., 3C) -> 3 x (B, heads, head_dim, N): channels become the "sequence", tokens the reduction.
        qkv = self.qkv(x).reshape(x.shape[0], -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 4, 1)
        q, k, v = qkv.unbind(0)
        drop = self.attn_drop if self.training else 0.0
        out = cross_covariance_attention(q, k, v, self.temperature, drop, self.training)  # B, heads, d, N
        out = out.permute(0, 3, 1, 2).reshape(x.shape)  # B, ..., C
        return self.proj_drop(self.proj(out))
