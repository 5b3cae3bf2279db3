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

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope_after_prefix


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


# Layout-dependent helpers (they branch on memory format): FX records each as one call that runs at run
# time. A module that imports one of them wraps it under its own name too (torch.fx.wrap patches names in
# the calling module's globals).
torch.fx.wrap("map_to_heads")


def heads_to_map(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, H*W, head_dim) -> (B, heads * head_dim, H, W).

    Free (a channels_last view) when x's memory is (B, N, heads, d), which is what SDPA returns for
    channels_last queries; otherwise one copy into NCHW."""
    b, heads, n, d = x.shape
    t = x.transpose(1, 2)  # B, N, heads, d
    if t.is_contiguous():
        return t.reshape(b, height, width, heads * d).permute(0, 3, 1, 2)
    return x.transpose(-1, -2).reshape(b, heads * d, height, width)


torch.fx.wrap("heads_to_map")


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, C) tokens: q/k/v projections, one SDPA call, an output projection.

    The one attention layer of the transformer families (DeiT, EVA-02, MaxViT, Hiera, ...). What differs
    between them is data, not code:

    - ``forward(x, bias=None, rope=None, num_prefix_tokens=0)``: ``bias`` is an additive (1, heads, N, N) or
      (B, heads, N, N) tensor (relative-position tables; pass it 4-D: a 3-D mask sends CPU SDPA to a kernel
      about 3x slower); ``rope`` is a rotary table ``cat(sin, cos)`` of
      shape (N - num_prefix_tokens, 2 * head_dim) applied to q and k of the patch tokens
      (``layers/rope.py``); windowed attention folds its windows into the batch dimension before calling.
    - ``qkv_bias``: ``True``/``False`` for one fused ``qkv`` Linear (``qkv.weight``, ``qkv.bias``);
      ``"qv"`` for a bias-free ``qkv`` plus learned ``q_bias``/``v_bias`` and a fixed zero k bias (BEiT/EVA);
      the zero k bias is made in forward, not held in a buffer, so a model built on the meta device and
      loaded with ``to_empty()`` + ``load_state_dict(assign=True)`` has nothing left uninitialised.
    - ``separate_qkv``: ``q_proj``/``k_proj``/``v_proj`` Linears (k without bias), as EVA-02 large ships them.
    - ``head_first``: the fused qkv output is laid out (heads, 3, head_dim) rather than (3, heads, head_dim)
      (MaxViT's PyTorch-trained weights).
    - ``qk_norm`` (a norm layer class applied per head to q and k) and ``inner_norm`` (a norm on the
      concatenated heads before ``proj``: EVA's sub-LN).

    Families that need a step between projection and attention (Hiera pools its queries) call
    ``qkv_heads`` and ``attend`` themselves and finish with ``project``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        *,
        dim_out: int | None = None,
        head_dim: int | None = None,
        qkv_bias: bool | str = True,
        separate_qkv: bool = False,
        head_first: bool = False,
        qk_norm: Callable[[int], nn.Module] | None = None,
        inner_norm: Callable[[int], nn.Module] | None = None,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
    ) -> None:
        super().__init__()
        if qkv_bias not in (True, False, "qv"):
            raise ValueError(f"qkv_bias={qkv_bias!r} is not allowed; allowed: True, False, 'qv'")
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads} (or pass head_dim)")
            head_dim = dim // num_heads
        if separate_qkv and head_first:
            raise ValueError("head_first describes a fused qkv layout; it cannot be used with separate_qkv")
        dim_out = dim_out or dim
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.head_first = head_first
        self.attn_drop = attn_drop
        if separate_qkv:
            self.qkv = None
            self.q_proj = nn.Linear(dim, inner, bias=qkv_bias is not False)
            self.k_proj = nn.Linear(dim, inner, bias=False)
            self.v_proj = nn.Linear(dim, inner, bias=qkv_bias is not False)
        else:
            self.qkv = nn.Linear(dim, inner * 3, bias=qkv_bias is True)
            self.q_proj = self.k_proj = self.v_proj = None
        if qkv_bias == "qv" and not separate_qkv:
            self.q_bias = nn.Parameter(torch.zeros(inner))
            self.v_bias = nn.Parameter(torch.zeros(inner))
        else:
            self.q_bias = self.v_bias = None
        self.q_norm = qk_norm(head_dim) if qk_norm is not None else nn.Identity()
        self.k_norm = qk_norm(head_dim) if qk_norm is not None else nn.Identity()
        self.norm = inner_norm(inner) if inner_norm is not None else nn.Identity()
        self.proj = nn.Linear(inner, dim_out, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, N, C) -> q, k, v, each (B, heads, N, head_dim), q and k normalised if ``qk_norm``."""
        b, n, _ = x.shape
        if self.qkv is None:
            assert self.q_proj is not None and self.k_proj is not None and self.v_proj is not None
            q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        else:
            if self.q_bias is not None and self.v_bias is not None:
                k_bias = torch.zeros_like(self.q_bias)
                qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, k_bias, self.v_bias)))
            else:
                qkv = self.qkv(x)
            if self.head_first:
                qkv = qkv.reshape(b, n, self.num_heads, 3, self.head_dim).permute(3, 0, 2, 1, 4)
            else:
                qkv = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0)  # each B, heads, N, head_dim
        return self.q_norm(q), self.k_norm(k), v

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """softmax(q k^T / sqrt(head_dim) + bias) v with this layer's dropout; (B, heads, N, head_dim)."""
        return attend(q, k, v, bias, self.attn_drop if self.training else 0.0, self.scale)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) -> (B, N, dim_out): merge heads, inner norm, output projection."""
        return self.proj_drop(self.proj(self.norm(merge_heads(x))))

    def forward(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        rope: torch.Tensor | None = None,
        num_prefix_tokens: int = 0,
    ) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        if rope is not None:
            q = apply_rope_after_prefix(q, rope, num_prefix_tokens)
            k = apply_rope_after_prefix(k, rope, num_prefix_tokens)
        return self.project(self.attend(q, k, v, bias))
