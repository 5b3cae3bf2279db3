"""Next-ViT (arXiv:2207.05501): Next Convolution Blocks (MHCA) and Next Transformer Blocks (E-MHSA + MHCA).

Module and parameter names follow the official/timm checkpoints, so ``nextvit_*`` weights load unchanged.
Three token mixers for the transformer blocks, chosen with ``attn=``:

* ``"original"`` (default) - E-MHSA as released: key/value down-sampling with ``AvgPool1d(sr**2)`` over the
  *flattened* token sequence (it averages runs of sr**2 tokens in raster order, not sr x sr windows) +
  BatchNorm1d. Reproduces timm's logits. The reference flattens to (B, N, C) tokens and runs Linear layers;
  here the same ``nn.Linear`` parameters are applied to the (B, C, H, W) map as 1x1 convs, the raster pooling
  reads the map directly and the heads are views of the conv outputs: no token round trip, and on CPU
  oneDNN's 1x1 conv is about 2x faster than the fp32 GEMM behind ``F.linear``.
* ``"bchw"`` - the proposed E-MHSA that stays in (B, C, H, W): 1x1 conv q/k/v, ``AvgPool2d(sr, sr)`` +
  BatchNorm2d for keys/values, no layout round trips. Same parameter count as the original; the released
  weights load into it (``checkpoint_filter`` reshapes Linear weights to 1x1 convs), but it is a different
  model (true sr x sr windows), so it needs fine-tuning.
* ``"xca"`` - cross-covariance attention (XCiT, arXiv:2106.09681) with ``AvgPool2d(sr)`` down-scaling of the
  q/k input: l2-normalised q/k, a learned per-head temperature, softmax over the channel-by-channel matrix;
  linear in the number of tokens. With more tokens than channels, proj, the attention and v are composed
  into one per-image C x C matrix (exact reassociation; one pass over the tokens instead of two).

``deploy.fuse`` folds every BatchNorm: conv+BN pairs, the blocks' pre-norms into q/k/v and fc1, the
key/value norm through the (linear) pooling into k/v; q/k/v projections that read the same map become one
conv; the final norm, which follows a residual sum, becomes a per-channel affine map. No BatchNorm remains.
The fused model's 1x1 convs are plain convs; on CPU, ``deploy.optimize(model, "cpu")`` gives them oneDNN's
fastest kernel (bf16 channels_last maps as a token GEMM). Everything works in NCHW and channels_last; on CPU fp32 is fastest in NCHW, bf16 in channels_last (``benchmarks/nextvit.py`` measures it).
"""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.fold import bn_scale_shift, fold_affine_into_input, fuse_conv_bn
from ..layers import ClassifierHead, ConvMlp, ConvNorm, DropPath, make_divisible
from ..layers.attention import attend, heads_to_map, map_to_heads
from ..layers.drop import drop_path_rates
from ..layers.norm import ChannelAffine
from ..layers.xca import apply_channel_attention, channel_attention, mix_channels
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, Stage

# FX records these layout-dependent helpers (they branch on memory format and sizes) as opaque calls.
for _name in ("map_to_heads", "heads_to_map", "_raster_pool", "_windowed_mean"):
    torch.fx.wrap(_name)

ATTN_KINDS = ("original", "bchw", "xca")


@dataclass(frozen=True)
class NextViTConfig:
    depths: tuple[int, int, int, int]
    drop_path_rate: float = 0.1
    stem_chs: tuple[int, int, int] = (64, 32, 64)
    strides: tuple[int, int, int, int] = (1, 2, 2, 2)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    head_dim: int = 32
    mix_block_ratio: float = 0.75

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be 4 positive ints, got {self.depths}")
        if self.depths[2] % 5 != 0:
            raise ValueError(f"depths[2] must be a multiple of 5 (4 conv blocks + 1 transformer), got {self.depths}")
        if len(self.strides) != 4 or len(self.sr_ratios) != 4:
            raise ValueError("strides and sr_ratios must have 4 entries")


VARIANTS = {
    "nextvit_small": NextViTConfig(depths=(3, 4, 10, 3), drop_path_rate=0.1),
    "nextvit_base": NextViTConfig(depths=(3, 4, 20, 3), drop_path_rate=0.2),
    "nextvit_large": NextViTConfig(depths=(3, 4, 30, 3), drop_path_rate=0.2),
}

DEFAULTS = FamilyDefaults(
    family="nextvit",
    crop_pct=0.95,
    first_conv="stem.0.conv",
    classifier="head.fc",
    # below 25 pixels a stage's unpadded pooling gets an empty map
    size_divisor=1,
    min_input_size=25,
    paper="Next-ViT: Next Generation Vision Transformer (arXiv:2207.05501)",
)


def _norm(chs: int) -> nn.Module:
    return nn.BatchNorm2d(chs, eps=1e-5)


class WindowMean(nn.Module):
    """The mean of each non-overlapping k x k window: ``AvgPool2d(k, k)`` (with ``ceil_mode``, partial windows
    at odd edges average what they cover). NCHW maps whose sides k divides run it as a depthwise conv of
    1/k**2 weights (exact; oneDNN ran it 2.5-4x faster than NCHW ``avg_pool2d`` on our CPU); otherwise,
    channels_last included (where ``avg_pool2d`` is the fastest), ``avg_pool2d``. The fused model's
    inference form of AvgPool2d."""

    def __init__(self, channels: int, k: int, ceil_mode: bool = False) -> None:
        super().__init__()
        self.k = k
        self.ceil_mode = ceil_mode
        self.register_buffer("weight", torch.full((channels, 1, k, k), 1.0 / (k * k)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _windowed_mean(x, self.weight, self.k, self.ceil_mode)


def _windowed_mean(x: torch.Tensor, weight: torch.Tensor, k: int, ceil_mode: bool) -> torch.Tensor:
    if x.is_contiguous() and x.shape[-2] % k == 0 and x.shape[-1] % k == 0:
        return F.conv2d(x, weight, stride=k, groups=x.shape[1])
    return F.avg_pool2d(x, k, k, ceil_mode=ceil_mode, count_include_pad=False)


def _window_mean(pool: nn.Module, channels: int) -> nn.Module:
    """The inference form of a square, non-overlapping, unpadded ``nn.AvgPool2d`` (anything else as it is)."""
    if not isinstance(pool, nn.AvgPool2d):
        return pool
    k, stride = pool.kernel_size, pool.stride
    k = k[0] if isinstance(k, tuple) and k[0] == k[1] else k
    stride = stride[0] if isinstance(stride, tuple) and stride[0] == stride[1] else stride
    if not isinstance(k, int) or k != stride or pool.padding not in (0, (0, 0)) or pool.divisor_override:
        return pool
    if pool.ceil_mode and pool.count_include_pad:  # partial windows would count padding: keep the pool
        return pool
    return WindowMean(channels, k, ceil_mode=pool.ceil_mode)


class PatchEmbed(nn.Module):
    """Stride-2: AvgPool 2x2 then 1x1 conv+BN; stride 1 with a channel change: 1x1 conv+BN; else identity."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1) -> None:
        super().__init__()
        if stride == 2:
            self.pool = nn.AvgPool2d((2, 2), stride=2, ceil_mode=True, count_include_pad=False)
        else:
            self.pool = nn.Identity()
        if stride == 2 or in_chs != out_chs:
            self.conv = nn.Conv2d(in_chs, out_chs, 1, 1, bias=False)
            self.norm = _norm(out_chs)
        else:
            self.conv = nn.Identity()
            self.norm = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(self.pool(x)))

    def fuse(self) -> nn.Module:
        if isinstance(self.conv, nn.Identity):
            return nn.Identity()
        conv = fuse_conv_bn(self.conv, self.norm)
        if isinstance(self.pool, nn.Identity):
            return conv
        return nn.Sequential(_window_mean(self.pool, conv.in_channels), conv)


class ConvAttention(nn.Module):
    """MHCA: grouped 3x3 conv (one group per head) + BN + ReLU, then a 1x1 projection."""

    def __init__(self, out_chs: int, head_dim: int) -> None:
        super().__init__()
        self.group_conv3x3 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, groups=out_chs // head_dim, bias=False)
        self.norm = _norm(out_chs)
        self.act = nn.ReLU(inplace=True)
        self.projection = nn.Conv2d(out_chs, out_chs, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.act(self.norm(self.group_conv3x3(x))))

    def fuse(self) -> nn.Module:
        return nn.Sequential(fuse_conv_bn(self.group_conv3x3, self.norm), self.act, self.projection)


def _absorb_pre_norm(block: nn.Module, norm_attr: str, consumer: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """Hand the affine map of the BatchNorm ``block.<norm_attr>`` to ``consumer`` and drop the norm."""
    norm = getattr(block, norm_attr)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        consumer(*bn_scale_shift(norm))
        setattr(block, norm_attr, nn.Identity())


def _fold_mlp_pre_norm(block: nn.Module, norm_attr: str) -> None:
    def fold(scale: torch.Tensor, shift: torch.Tensor) -> None:
        block.mlp.fc1 = fold_affine_into_input(block.mlp.fc1, scale, shift)

    _absorb_pre_norm(block, norm_attr, fold)


class NextConvBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_path: float, head_dim: int,
                 mlp_ratio: float = 3.0) -> None:
        super().__init__()
        if out_chs % head_dim != 0:
            raise ValueError(f"channels {out_chs} must be a multiple of head_dim {head_dim}")
        self.patch_embed = PatchEmbed(in_chs, out_chs, stride)
        self.mhca = ConvAttention(out_chs, head_dim)
        self.attn_drop_path = DropPath(drop_path)
        self.norm = _norm(out_chs)
        self.mlp = ConvMlp(out_chs, int(out_chs * mlp_ratio), act_layer=partial(nn.ReLU, inplace=True))
        self.mlp_drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.attn_drop_path(self.mhca(x))
        return x + self.mlp_drop_path(self.mlp(self.norm(x)))

    def fuse(self) -> nn.Module:
        _fold_mlp_pre_norm(self, "norm")
        return self


# ---- token mixers for the transformer block: each maps a normalised (B, C, H, W) map to (B, C, H, W) ----
#
# Layout policy (measured on our 2-core CPU): every mixer works on maps, accepts NCHW and channels_last and
# returns one of the two. Projections are 1x1 convs (oneDNN's fp32 1x1 conv runs about 2x faster than the
# GEMM behind F.linear; deploy.optimize(model, "cpu") runs bf16 channels_last maps as a token GEMM).
# Attention runs on SDPA's fused kernel, which needs q/k/v with a unit-stride last dim: for channels_last
# maps the heads are views of the projections' outputs and SDPA's output already is the channels_last
# result (no copies); NCHW maps cost one copy in and one out.


class PointwiseLinear(nn.Linear):
    """An ``nn.Linear`` (the released checkpoints' parameter layout) applied over the channels of a
    (B, C, H, W) map, as a 1x1 conv: no flattening to tokens and back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight.reshape(self.out_features, self.in_features, 1, 1), self.bias)


def _as_conv1x1(layer: nn.Module) -> nn.Conv2d:
    """A Linear (or a 1x1 conv) as an equivalent 1x1 conv."""
    if isinstance(layer, nn.Conv2d):
        return layer
    w = layer.weight.detach()
    out = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=layer.bias is not None).to(device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w[:, :, None, None])
    if layer.bias is not None:
        out.bias.data.copy_(layer.bias.detach())
    return out


def _cat_convs(layers: list[nn.Module]) -> nn.Conv2d:
    """Several 1x1 projections of the same input -> one 1x1 conv with their outputs stacked."""
    convs = [_as_conv1x1(m) for m in layers]
    weight = torch.cat([m.weight.detach() for m in convs], 0)
    bias = torch.cat([m.bias.detach() for m in convs], 0)
    out = nn.Conv2d(weight.shape[1], weight.shape[0], 1).to(device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def _conv1x1(in_chs: int, out_chs: int) -> nn.Module:
    return nn.Conv2d(in_chs, out_chs, 1)


def _raster_pool(x: torch.Tensor, ratio: int) -> torch.Tensor:
    """The released model's ``AvgPool1d(ratio, ratio)`` over the flattened token sequence, read straight
    from a (B, C, H, W) map: the mean of each run of ``ratio`` tokens in raster order (trailing tokens
    dropped, as AvgPool1d does). Returns (B, C, N // ratio)."""
    b, c, h, w = x.shape
    m = (h * w) // ratio
    if x.is_contiguous():  # NCHW: each channel's tokens are one dense row
        return x.flatten(2)[:, :, : m * ratio].reshape(b, c, m, ratio).mean(-1)
    # channels_last: average dense (ratio, C) blocks of the (B, N, C) token view (5-10x faster than
    # reducing along the strided rows), and hand back a (B, C, M) view
    tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
    return tokens[:, : m * ratio].reshape(b, m, ratio, c).mean(2).transpose(1, 2)


class _SpatialReduction(nn.Module):
    """Shared by the mixers: projections, the key/value (or q/k) down-sampling and its norm, and the
    folding of an input affine map (the block's pre-norm) into the projections."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, norm: nn.Module | None,
                 proj: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        if dim % head_dim != 0:
            raise ValueError(f"attention dim {dim} must be a multiple of head_dim {head_dim}")
        if sr_ratio < 1:
            raise ValueError(f"sr_ratio must be >= 1, got {sr_ratio}")
        self.dim = dim
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.sr_ratio = sr_ratio
        self.q = proj(dim, dim)
        self.k = proj(dim, dim)
        self.v = proj(dim, dim)
        self.proj = proj(dim, dim)
        self.norm = norm

    # The pooled branch sees pool(pre_norm(x)) then self.norm: both affine per channel, and pooling is
    # linear (and a mean, so it keeps constants), so the composition is one affine map that folds into
    # the projections reading it.
    def _reduced_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm is None:
            return scale, shift
        s2, t2 = bn_scale_shift(self.norm)
        self.norm = None
        return scale * s2, shift * s2 + t2


class _SoftmaxAttention(_SpatialReduction):
    """E-MHSA on maps: q from the map, k/v from a down-sampled map (``reduce``), SDPA, 1x1 projection.
    Fused: the pre-norm is folded into q/k/v and k/v (or q/k/v when sr=1) share one conv."""

    fused_kv: Final[bool]
    fused_qkv: Final[bool]

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, norm: nn.Module | None,
                 proj: Callable[[int, int], nn.Module], attn_drop: float, proj_drop: float) -> None:
        super().__init__(dim, head_dim, sr_ratio, norm, proj)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_kv = False
        self.fused_qkv = False

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The (normalised) map keys and values are computed from."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        drop = self.attn_drop if self.training else 0.0
        if self.fused_qkv:
            q, k, v = map_to_heads(self.q(x), 3 * self.num_heads).chunk(3, dim=1)  # B, heads, N, head_dim
        else:
            q = map_to_heads(self.q(x), self.num_heads)
            kv_in = self.reduce(x) if self.sr_ratio > 1 else x
            if self.fused_kv:
                k, v = map_to_heads(self.k(kv_in), 2 * self.num_heads).chunk(2, dim=1)
            else:
                k = map_to_heads(self.k(kv_in), self.num_heads)
                v = map_to_heads(self.v(kv_in), self.num_heads)
        out = heads_to_map(attend(q, k, v, dropout_p=drop), h, w)  # channels_last view for channels_last x
        return self.proj_drop(self.proj(out))

    def absorb_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.q = _as_conv1x1(fold_affine_into_input(self.q, scale, shift))
        s, t = self._reduced_affine(scale, shift)
        self.k = _as_conv1x1(fold_affine_into_input(self.k, s, t))
        self.v = _as_conv1x1(fold_affine_into_input(self.v, s, t))

    def merge_projections(self) -> None:
        # The inference forms: one conv for k and v (and for q too when they read the same map), and the
        # window pooling (BCHW mixer) as WindowMean.
        if self.fused_kv or self.fused_qkv:  # already merged (fusing a fused model)
            return
        self.proj = _as_conv1x1(self.proj)
        sr = getattr(self, "sr", None)
        if isinstance(sr, nn.AvgPool2d):
            self.sr = _window_mean(sr, self.dim)
        if self.sr_ratio == 1:
            self.q = _cat_convs([self.q, self.k, self.v])
            self.k = nn.Identity()
            self.fused_qkv = True
        else:
            self.k = _cat_convs([self.k, self.v])
            self.fused_kv = True
        self.v = nn.Identity()


class EfficientAttention(_SoftmaxAttention):
    """E-MHSA as released: keys/values from ``AvgPool1d(sr**2)`` over the flattened token sequence (runs of
    sr**2 tokens in raster order) + BatchNorm1d; q/k/v/proj are ``nn.Linear`` parameters (the checkpoints'
    layout) applied to the map as 1x1 convs."""

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, head_dim, sr_ratio, nn.BatchNorm1d(dim, eps=1e-5) if sr_ratio > 1 else None,
                         PointwiseLinear, attn_drop, proj_drop)

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        kv = _raster_pool(x, self.sr_ratio * self.sr_ratio)  # B, C, M
        if self.norm is not None:
            kv = self.norm(kv)
        return kv.unsqueeze(-1)  # B, C, M, 1: a map for the 1x1 convs


class BCHWEfficientAttention(_SoftmaxAttention):
    """The proposed E-MHSA on (B, C, H, W): 1x1 conv projections, keys/values from ``AvgPool2d(sr, sr)``
    (true sr x sr windows) + BatchNorm2d. Nothing is flattened to tokens."""

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, head_dim, sr_ratio, _norm(dim) if sr_ratio > 1 else None, _conv1x1,
                         attn_drop, proj_drop)
        self.sr = nn.AvgPool2d(sr_ratio, sr_ratio) if sr_ratio > 1 else nn.Identity()

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.sr(x)
        if self.norm is not None:
            kv = self.norm(kv)
        return kv


class XCAttention(_SpatialReduction):
    """Cross-covariance attention on (B, C, H, W): q and k read the ``AvgPool2d(sr)``-down-scaled map
    (+ BatchNorm2d), v reads the full map; the (head_dim x head_dim) attention per head mixes v's channels,
    so the cost is linear in H*W.

    With more tokens than channels, proj, the channel attention and v are composed into one per-image
    C x C matrix applied in a single pass over the tokens (``layers.xca.mix_channels``): the same maths
    with one C^2 * N pass instead of two. Fused: the pre-norm is folded into q/k/v, q and k share one conv
    (q, k and v when sr=1).
    """

    fused_qk: Final[bool]
    fused_qkv: Final[bool]

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, head_dim, sr_ratio, _norm(dim) if sr_ratio > 1 else None, _conv1x1)
        self.sr = nn.AvgPool2d(sr_ratio, sr_ratio) if sr_ratio > 1 else nn.Identity()
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1))
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_qk = False
        self.fused_qkv = False

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, k * C, h, w) -> (B, k * heads, head_dim, h*w), dense: the l2 norms and matmuls reduce over
        tokens, which is slow on the strided rows of a channels_last map (a copy of these few tokens is cheaper)."""
        t = x.flatten(2).contiguous()
        return t.reshape(t.shape[0], t.shape[1] // self.head_dim, self.head_dim, t.shape[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        fold = h * w > c  # more tokens than channels: fold v into the per-image channel matrix
        v_map = x
        if self.fused_qkv:  # sr == 1, fused: one (3C, C) conv holds q, k and v
            weight, bias = self.q.weight, self.q.bias
            if bias is None:
                raise RuntimeError("fused XCAttention expects a biased qkv conv")
            w_v, b_v = weight[2 * c:], bias[2 * c:]
            if fold:
                qk = F.conv2d(x, weight[: 2 * c], bias[: 2 * c])
            else:
                qkv = self.q(x)
                qk, v_map = qkv[:, : 2 * c], qkv[:, 2 * c:]
            q, k = self._heads(qk).chunk(2, dim=1)
        else:
            qk_in = self.sr(x)
            if self.norm is not None:
                qk_in = self.norm(qk_in)
            if self.fused_qk:
                q, k = self._heads(self.q(qk_in)).chunk(2, dim=1)
            else:
                q, k = self._heads(self.q(qk_in)), self._heads(self.k(qk_in))  # B, heads, head_dim, M
            w_v, b_v = self.v.weight, self.v.bias
            if not fold:
                v_map = self.v(x)
        drop = self.attn_drop if self.training else 0.0
        attn = channel_attention(q, k, self.temperature, drop, self.training)  # B, heads, d, d
        b_proj = self.proj.bias
        if b_proj is None or b_v is None:
            raise RuntimeError("XCAttention expects biased 1x1 conv projections")
        if fold:
            # proj after the block-diagonal attention is one (C x C) matrix per image:
            # (W_proj A)[o, h*d + j] = sum_i W_proj[o, h*d + i] A[h, i, j]; then W_v folds in (C^3, not C^2 N).
            w_proj = self.proj.weight.reshape(c, self.num_heads, self.head_dim).transpose(0, 1)  # heads, C, d
            pa = torch.matmul(w_proj, attn).permute(0, 2, 1, 3).reshape(b, c, c)  # B, C_out, C
            # pa @ W_v, with W_v read as a (C, C_in, 1) map so that it runs on the same fast path.
            w_v_map = w_v.reshape(1, c, c, 1).expand(b, c, c, 1)
            weight = mix_channels(pa, None, w_v_map).reshape(b, c, c)
            bias = torch.matmul(pa, b_v) + b_proj
            out = mix_channels(weight, bias, x)
        else:
            out = apply_channel_attention(attn, v_map)  # few tokens: A v first is cheaper than W_proj A
            if not x.is_contiguous() and out.is_contiguous():
                out = out.contiguous(memory_format=torch.channels_last)  # keep the caller's layout
            out = self.proj(out)
        return self.proj_drop(out)

    def absorb_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.v = fold_affine_into_input(self.v, scale, shift)
        s, t = self._reduced_affine(scale, shift)
        self.q = fold_affine_into_input(self.q, s, t)
        self.k = fold_affine_into_input(self.k, s, t)

    def merge_projections(self) -> None:
        if self.fused_qk or self.fused_qkv:  # already merged (fusing a fused model)
            return
        if isinstance(self.sr, nn.AvgPool2d):
            self.sr = _window_mean(self.sr, self.dim)
        if self.sr_ratio == 1:
            self.q = _cat_convs([self.q, self.k, self.v])
            self.v = nn.Identity()
            self.fused_qkv = True
        else:
            self.q = _cat_convs([self.q, self.k])
            self.fused_qk = True
        self.k = nn.Identity()


TOKEN_MIXERS: dict[str, type[nn.Module]] = {
    "original": EfficientAttention,
    "bchw": BCHWEfficientAttention,
    "xca": XCAttention,
}


class NextTransformerBlock(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_path: float, sr_ratio: int,
                 head_dim: int, mix_block_ratio: float, attn_layer: type[nn.Module],
                 mlp_ratio: float = 2.0) -> None:
        super().__init__()
        self.mhsa_out_chs = make_divisible(int(out_chs * mix_block_ratio), 32)
        self.mhca_out_chs = out_chs - self.mhsa_out_chs
        self.patch_embed = PatchEmbed(in_chs, self.mhsa_out_chs, stride)
        self.norm1 = _norm(self.mhsa_out_chs)
        self.e_mhsa = attn_layer(self.mhsa_out_chs, head_dim=head_dim, sr_ratio=sr_ratio)
        self.mhsa_drop_path = DropPath(drop_path * mix_block_ratio)
        self.projection = PatchEmbed(self.mhsa_out_chs, self.mhca_out_chs, stride=1)
        self.mhca = ConvAttention(self.mhca_out_chs, head_dim)
        self.mhca_drop_path = DropPath(drop_path * (1 - mix_block_ratio))
        self.norm2 = _norm(out_chs)
        self.mlp = ConvMlp(out_chs, int(out_chs * mlp_ratio), act_layer=partial(nn.ReLU, inplace=True))
        self.mlp_drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = x + self.mhsa_drop_path(self.e_mhsa(self.norm1(x)))
        out = self.projection(x)
        out = out + self.mhca_drop_path(self.mhca(out))
        x = torch.cat([x, out], dim=1)
        return x + self.mlp_drop_path(self.mlp(self.norm2(x)))

    def fuse(self) -> nn.Module:
        # Fold the pre-norm into the separate projections first, then stack projections that share an input.
        _absorb_pre_norm(self, "norm1", self.e_mhsa.absorb_input_affine)
        self.e_mhsa.merge_projections()
        _fold_mlp_pre_norm(self, "norm2")
        return self


class NextViT(Backbone):

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form
    checkpoint_filter = None  # set below (needs the function defined after the class)

    def __init__(self, cfg: NextViTConfig, num_classes: int = 1000, in_chans: int = 3, attn: str = "original",
                 drop_rate: float = 0.0, drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, DEFAULTS.min_input_size)
        if attn not in TOKEN_MIXERS:
            raise ValueError(f"unknown attention kind attn={attn!r}; allowed: {ATTN_KINDS}")
        self.attn = attn
        attn_layer = TOKEN_MIXERS[attn]
        depths = cfg.depths
        dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        stage_out_chs = [
            [96] * depths[0],
            [192] * (depths[1] - 1) + [256],
            [384, 384, 384, 384, 512] * (depths[2] // 5),
            [768] * (depths[3] - 1) + [1024],
        ]
        # Next Hybrid Strategy: a transformer block closes stages 1 and 3 and every 5 blocks of stage 2.
        is_transformer = [
            [False] * depths[0],
            [False] * (depths[1] - 1) + [True],
            [False, False, False, False, True] * (depths[2] // 5),
            [False] * (depths[3] - 1) + [True],
        ]
        s0, s1, s2 = cfg.stem_chs
        act = partial(nn.ReLU, inplace=True)
        self.stem = nn.Sequential(
            ConvNorm(in_chans, s0, 3, stride=2, norm_layer=_norm, act_layer=act),
            ConvNorm(s0, s1, 3, stride=1, norm_layer=_norm, act_layer=act),
            ConvNorm(s1, s2, 3, stride=1, norm_layer=_norm, act_layer=act),
            ConvNorm(s2, s2, 3, stride=2, norm_layer=_norm, act_layer=act),
        )
        dpr = drop_path_rates(dpr_total, depths)
        in_chs = s2
        stages = []
        for i in range(4):
            blocks = []
            for j, (out_chs, transformer) in enumerate(zip(stage_out_chs[i], is_transformer[i])):
                stride = cfg.strides[i] if j == 0 else 1
                dp = float(dpr[i][j])
                if transformer:
                    blocks.append(NextTransformerBlock(in_chs, out_chs, stride, dp, cfg.sr_ratios[i],
                                                       cfg.head_dim, cfg.mix_block_ratio, attn_layer))
                else:
                    blocks.append(NextConvBlock(in_chs, out_chs, stride, dp, cfg.head_dim))
                in_chs = out_chs
            stages.append(Stage(blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.norm = _norm(in_chs)
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.feature_info = [
            dict(num_chs=chs[-1], reduction=2 ** (i + 2), module=f"stages.{i}") for i, chs in enumerate(stage_out_chs)
        ]
        self._init_weights()

    def fuse(self) -> nn.Module:
        # The final BatchNorm follows a residual sum, so no conv can absorb it; its exact inference form is
        # a per-channel affine map (no BatchNorm, no running statistics).
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            self.norm = ChannelAffine(*bn_scale_shift(self.norm))
        return self

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)


def checkpoint_filter(state: dict[str, torch.Tensor], model: NextViT) -> dict[str, torch.Tensor]:
    """timm/official checkpoints load as they are. For the BCHW/XCA mixers, Linear q/k/v/proj weights
    are reshaped to 1x1 convs (a starting point for fine-tuning; the mixers are different models)."""
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if k in own and v.dim() == 2 and own[k].dim() == 4 and ".e_mhsa." in k:
            v = v[:, :, None, None]
        out[k] = v
    return out


NextViT.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_nextvit(cfg: NextViTConfig, num_classes: int = 1000, in_chans: int = 3, attn: str = "original",
                  drop_rate: float = 0.0, drop_path_rate: float | None = None, global_pool: str = "avg") -> NextViT:
    return NextViT(cfg, num_classes=num_classes, in_chans=in_chans, attn=attn, drop_rate=drop_rate,
                   drop_path_rate=drop_path_rate, global_pool=global_pool)
