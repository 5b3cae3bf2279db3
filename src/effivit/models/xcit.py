"""XCiT: Cross-Covariance Image Transformers (arXiv:2106.09681).

A convolutional patch embedding (stride-2 3x3 Conv+BN with GELU between, 16x down-sampling for patch 16), a
Fourier position encoding computed for the actual token grid, blocks of cross-covariance attention (XCA:
attention between channels, linear in the number of tokens), local patch interaction (LPI: two depth-wise
3x3 convs) and an MLP, each with a learned layer scale; then two class-attention layers (CaiT, arXiv:2103.17239:
only the class token queries) and a final LayerNorm. The classifier reads the class token.

Parameter names are timm's (which carries the official weights), so timm's ``xcit_*`` checkpoints load
unchanged; ``checkpoint_filter`` also reads the official files (``pos_embeder.*``, fused class-attention
``qkv``). How this differs from the reference:

* Patch tokens live as (B, H, W, C) between blocks (timm: (B, N, C) plus a separate (H, W)): every block
  knows its grid, LPI's maps are channels_last views of the tokens (no copy), and the blocks form one
  ``nn.Sequential``. ``forward_features`` returns timm's (B, 1 + N, C) tokens.
* The Fourier encoding's 1x1 projection is applied to the row and column features separately and summed
  (the projection is linear and the features are ``cat(rows, cols)``): H + W small products instead of one
  over the H * W grid, and no per-batch copy. Any grid the patch size allows works.
* XCA is ``layers.xca.XCA`` (shared with Next-ViT's ``attn="xca"`` through ``layers.xca``); class attention
  runs on the shared ``layers.attention.attend`` (SDPA) with the query from the class token only.
* ``deploy.fuse``: the patch embedding's BatchNorms fold into their convs; LPI's BatchNorm (between GELU and
  the second depth-wise conv) folds into that conv, exactly: its scale into the weights; its shift, which the
  conv sees through the taps inside the map only (zero padding), as the conv's response to a constant map,
  computed for the grid (:func:`shift_response`; a per-channel bias would be wrong at the border); every layer scale folds into the projection before it (XCA's
  ``proj``, LPI's second conv, the MLPs' ``fc2``, class attention's ``proj``); class attention computes k and
  v with one Linear. The class-attention layer scale also multiplies the normalised patch tokens (there is
  no projection to fold it into there), so that product stays.
"""

import math
from dataclasses import dataclass
from typing import Any, Final

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..deploy.fold import bn_scale_shift, fold_affine_into_output, fuse_conv_bn
from ..layers import DropPath, Mlp
from ..layers.attention import attend, merge_heads, split_heads
from ..layers.xca import XCA
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, checkpoint_seq, resolve_indices

NORM_EPS = 1e-6
OUTPUT_FORMATS = ("NCHW", "NLC")
GLOBAL_POOLS = ("token", "avg", "")


@dataclass(frozen=True)
class XCiTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    # Initial value of every layer scale (1.0 for the 12-block models, 1e-5 for the deeper ones).
    eta: float
    # Class attention normalises all tokens (True) or only the class token (False, XCiT-nano).
    tokens_norm: bool = True
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    cls_attn_layers: int = 2
    qkv_bias: bool = True
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if self.patch_size not in (8, 16):
            raise ValueError(f"patch_size must be 8 or 16 (the convolutional patch embedding), got {self.patch_size}")
        if self.embed_dim < 1 or self.embed_dim % (self.patch_size // 2):
            raise ValueError(f"embed_dim must be a positive multiple of {self.patch_size // 2} (the patch embedding "
                             f"halves it {int(math.log2(self.patch_size)) - 1} times), got {self.embed_dim}")
        if self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.depth < 1 or self.cls_attn_layers < 1:
            raise ValueError(f"depth and cls_attn_layers must be >= 1, got {self.depth}, {self.cls_attn_layers}")
        if self.img_size < 1 or self.img_size % self.patch_size:
            raise ValueError(f"img_size must be a positive multiple of patch_size={self.patch_size}, "
                             f"got {self.img_size}")
        if self.mlp_ratio <= 0 or not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"mlp_ratio must be > 0 and drop_path_rate in [0, 1), got {self.mlp_ratio}, "
                             f"{self.drop_path_rate}")


# name -> (embed_dim, depth, num_heads, eta); timm registers a 224 and a 384 architecture for each.
_ARCHS = {
    "tiny_12": (192, 12, 4, 1.0),
    "small_12": (384, 12, 8, 1.0),
    "small_24": (384, 24, 8, 1e-5),
    "medium_24": (512, 24, 8, 1e-5),
}
VARIANTS = {
    f"xcit_{name}_p16_{size}": XCiTConfig(embed_dim=d, depth=n, num_heads=h, eta=eta, img_size=size)
    for name, (d, n, h, eta) in _ARCHS.items()
    for size in (224, 384)
}

DEFAULTS = FamilyDefaults(
    family="xcit",
    crop_pct=1.0,
    first_conv="patch_embed.proj.0.0",
    classifier="head",
    size_divisor=16,
    paper="XCiT: Cross-Covariance Image Transformers (arXiv:2106.09681)",
)


# ---- position encoding --------------------------------------------------------------------------------


def _sin_cos(angles: torch.Tensor) -> torch.Tensor:
    """(..., D) angles whose even/odd columns repeat -> (..., D): sin of the even ones interleaved with cos of
    the odd ones (the reference's layout)."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


def fourier_pos_embed(height: int, width: int, weight: torch.Tensor, bias: torch.Tensor | None,
                      hidden_dim: int, temperature: float) -> torch.Tensor:
    """XCiT's position encoding of an H x W grid, projected to the model width: (H, W, C).

    Row and column positions are normalised to (0, 2 pi] and expanded into ``hidden_dim`` sin/cos features
    each (the reference's float32 arithmetic, step for step); the 1x1 projection ``weight`` (C, 2 * hidden_dim,
    1, 1), whose first half reads the row features, is applied to each half and the two are summed.
    """
    eps, scale = 1e-6, 2 * math.pi
    device = weight.device
    rows = torch.arange(1, height + 1, device=device).to(torch.float32)
    rows = rows / (rows[-1:] + eps) * scale
    cols = torch.arange(1, width + 1, device=device).to(torch.float32)
    cols = cols / (cols[-1:] + eps) * scale
    dim_t = torch.arange(hidden_dim, device=device).to(torch.float32)
    dim_t = torch.pow(temperature, 2 * torch.div(dim_t, 2, rounding_mode="floor") / hidden_dim)
    w = weight.reshape(weight.shape[0], 2 * hidden_dim)
    pos_rows = _sin_cos(rows[:, None] / dim_t).to(w.dtype) @ w[:, :hidden_dim].t()  # H, C
    pos_cols = _sin_cos(cols[:, None] / dim_t).to(w.dtype) @ w[:, hidden_dim:].t()  # W, C
    pos = pos_rows[:, None, :] + pos_cols[None, :, :]  # H, W, C
    if bias is not None:
        pos = pos + bias
    return pos


# Shape-dependent (the grid): FX records one call that runs at run time.
torch.fx.wrap("fourier_pos_embed")


class FourierPosEmbed(nn.Module):
    """Fourier features of the grid positions and their 1x1 projection (``token_projection``, timm's name)."""

    def __init__(self, dim: int, hidden_dim: int = 32, temperature: float = 10000.0) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        self.temperature = temperature
        self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)

    def forward(self, height: int, width: int) -> torch.Tensor:
        """The (H, W, C) encoding of an H x W token grid."""
        return fourier_pos_embed(height, width, self.token_projection.weight, self.token_projection.bias,
                                 self.hidden_dim, self.temperature)


# ---- patch embedding ----------------------------------------------------------------------------------


class ConvBN(nn.Sequential):
    """A bias-free stride-2 3x3 conv then BatchNorm2d (children ``0`` and ``1``, timm's keys); ``fuse()``
    returns one conv."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__(nn.Conv2d(in_chs, out_chs, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(out_chs))

    def fuse(self) -> nn.Module:
        return fuse_conv_bn(self[0], self[1])


class ConvPatchEmbed(nn.Module):
    """log2(patch_size) stride-2 Conv+BN layers with GELU between, widths doubling up to ``embed_dim``:
    (B, in_chans, H, W) -> (B, embed_dim, H / p, W / p) (any H, W: each layer rounds up)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        n = int(math.log2(patch_size))
        widths = [in_chans] + [embed_dim // 2 ** (n - 1 - i) for i in range(n)]
        layers: list[nn.Module] = []
        for i in range(n):
            if i:
                layers.append(nn.GELU())
            layers.append(ConvBN(widths[i], widths[i + 1]))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


# ---- local patch interaction --------------------------------------------------------------------------


def shift_response(kernel: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """What a constant 1 per channel gives through a zero-padded ('same', stride 1) depth-wise conv with
    ``kernel`` (C, 1, k, k) and no bias, on an H x W grid: (H, W, C).

    The sum of all taps in the interior, less at the border, where some taps read padding. One depth-wise conv
    of a single all-ones image: 1/B of the cost of the conv it corrects, three small ops per block.
    """
    c, k = kernel.shape[0], kernel.shape[-1]
    ones = kernel.new_ones((1, c, height, width))
    return F.conv2d(ones, kernel, None, 1, k // 2, 1, c)[0].permute(1, 2, 0)


torch.fx.wrap("shift_response")


class LPI(nn.Module):
    """Local patch interaction: depth-wise 3x3 conv, GELU, BatchNorm, depth-wise 3x3 conv, on the token grid.

    Takes and returns (B, H, W, C) tokens; the convs see a channels_last view of them (no copy). Fused, the
    BatchNorm's scale lives in ``conv2`` and its shift in ``shift_kernel`` (see :func:`shift_response`).
    """

    def __init__(self, dim: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(dim)
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=padding, groups=dim)
        self.register_buffer("shift_kernel", None)  # set by fuse()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.bn(self.act(self.conv1(x.permute(0, 3, 1, 2)))))
        y = y.permute(0, 2, 3, 1)
        shift = self.shift_kernel
        if shift is not None:
            y = y + shift_response(shift, y.shape[1], y.shape[2])
        return y

    def fuse(self) -> nn.Module:
        if isinstance(self.bn, nn.BatchNorm2d):
            # conv2(x * s + t) with zero padding = conv2 with weights w * s, plus the constant t seen through
            # the taps inside the map (the conv's response to a constant map, computed per grid).
            scale, shift = bn_scale_shift(self.bn)
            w = self.conv2.weight.detach()
            conv = nn.Conv2d(w.shape[0], w.shape[0], self.conv2.kernel_size, padding=self.conv2.padding,
                             groups=self.conv2.groups, bias=self.conv2.bias is not None).to(w)
            with torch.no_grad():
                conv.weight.copy_(w * scale.reshape(-1, 1, 1, 1))
                if self.conv2.bias is not None:
                    conv.bias.copy_(self.conv2.bias)
            self.conv2 = conv
            self.bn = nn.Identity()
            self.shift_kernel = w * shift.reshape(-1, 1, 1, 1)
        return self

    def scale_output(self, gamma: torch.Tensor) -> None:
        """Fold a per-channel scale of the output (a layer scale) into conv2 and the folded shift."""
        gamma = gamma.detach()
        self.conv2 = fold_affine_into_output(self.conv2, gamma)
        if self.shift_kernel is not None:
            self.shift_kernel = self.shift_kernel * gamma.reshape(-1, 1, 1, 1)


# ---- blocks -------------------------------------------------------------------------------------------


def _scale(x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
    """A layer scale, or nothing once it is folded into the projection before it."""
    return x if gamma is None else gamma * x


def _drop_path(rate: float) -> nn.Module:
    return DropPath(rate) if rate > 0 else nn.Identity()


class XCABlock(nn.Module):
    """x + g1 * XCA(LN(x)), then + g3 * LPI(LN(x)), then + g2 * MLP(LN(x)) on (B, H, W, C) tokens (the
    reference's order; its norms are named norm1, norm3, norm2)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eta: float,
                 drop_path: float = 0.0, proj_drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = XCA(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = _drop_path(drop_path)
        self.norm3 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.local_mp = LPI(dim)
        self.drop_path3 = _drop_path(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.drop_path2 = _drop_path(drop_path)
        self.gamma1: nn.Parameter | None = nn.Parameter(eta * torch.ones(dim))
        self.gamma3: nn.Parameter | None = nn.Parameter(eta * torch.ones(dim))
        self.gamma2: nn.Parameter | None = nn.Parameter(eta * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(_scale(self.attn(self.norm1(x)), self.gamma1))
        x = x + self.drop_path3(_scale(self.local_mp(self.norm3(x)), self.gamma3))
        return x + self.drop_path2(_scale(self.mlp(self.norm2(x)), self.gamma2))

    def fuse(self) -> nn.Module:
        if self.gamma1 is not None and self.gamma2 is not None and self.gamma3 is not None:
            self.attn.proj = fold_affine_into_output(self.attn.proj, self.gamma1)
            self.local_mp.scale_output(self.gamma3)
            self.mlp.fc2 = fold_affine_into_output(self.mlp.fc2, self.gamma2)
            self.gamma1 = self.gamma2 = self.gamma3 = None
        return self


class ClassAttention(nn.Module):
    """Multi-head attention where only the class token (token 0) queries all tokens: (B, N, C) -> (B, 1, C).

    ``q``, ``k``, ``v``, ``proj`` as timm names them; fused, ``k`` holds k and v in one Linear."""

    fused_kv: Final[bool]

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.attn_drop = attn_drop
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v: nn.Module = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_kv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.q(x[:, :1]), self.num_heads)  # B, heads, 1, head_dim
        if self.fused_kv:
            k, v = split_heads(self.k(x), 2 * self.num_heads).chunk(2, dim=1)  # each B, heads, N, head_dim
        else:
            k, v = split_heads(self.k(x), self.num_heads), split_heads(self.v(x), self.num_heads)
        out = attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)  # B, heads, 1, head_dim
        return self.proj_drop(self.proj(merge_heads(out)))

    def merge_kv(self) -> None:
        if self.fused_kv:
            return
        k, v = self.k, self.v
        assert isinstance(k, nn.Linear) and isinstance(v, nn.Linear)
        kv = nn.Linear(k.in_features, 2 * k.out_features, bias=k.bias is not None).to(k.weight)
        with torch.no_grad():
            kv.weight.copy_(torch.cat((k.weight, v.weight)))
            if k.bias is not None and v.bias is not None:
                kv.bias.copy_(torch.cat((k.bias, v.bias)))
        self.k, self.v = kv, nn.Identity()
        self.fused_kv = True


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention layer as XCiT uses it, on (B, 1 + N, C) tokens (class token first):

    the class token gets ``g1 * CA(LN(x))``, each patch token ``g1 * LN(x)`` (the reference carries the
    normalised patch tokens through the attention branch); then LN over all tokens (``tokens_norm``) or the
    class token only; then the class token gets ``g2 * MLP``, and the patch tokens are added to themselves
    (the reference's residual of the concatenation).
    """

    tokens_norm: Final[bool]
    gamma1_in_proj: Final[bool]

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, eta: float,
                 tokens_norm: bool, proj_drop: float = 0.0, attn_drop: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = ClassAttention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=proj_drop)
        self.gamma1 = nn.Parameter(eta * torch.ones(dim))
        self.gamma2: nn.Parameter | None = nn.Parameter(eta * torch.ones(dim))
        self.tokens_norm = tokens_norm
        self.gamma1_in_proj = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xn = self.norm1(x)
        cls = self.attn(xn)  # B, 1, C
        if self.gamma1_in_proj:
            x = x + torch.cat((cls, self.gamma1 * xn[:, 1:]), dim=1)
        else:
            x = x + self.gamma1 * torch.cat((cls, xn[:, 1:]), dim=1)
        if self.tokens_norm:
            x = self.norm2(x)
        else:
            x = torch.cat((self.norm2(x[:, :1]), x[:, 1:]), dim=1)
        cls = _scale(self.mlp(x[:, :1]), self.gamma2)
        patches = x[:, 1:]
        return torch.cat((x[:, :1] + cls, patches + patches), dim=1)

    def fuse(self) -> nn.Module:
        self.attn.merge_kv()
        if not self.gamma1_in_proj:
            self.attn.proj = fold_affine_into_output(self.attn.proj, self.gamma1)
            self.gamma1_in_proj = True
        if self.gamma2 is not None:
            self.mlp.fc2 = fold_affine_into_output(self.mlp.fc2, self.gamma2)
            self.gamma2 = None
        return self


# ---- model --------------------------------------------------------------------------------------------


class XCiT(Backbone):
    """XCiT with timm's surface: ``forward_features`` -> (B, 1 + N, C) tokens after the final norm, a Linear
    ``head`` on the class token (``global_pool='token'``; ``'avg'`` averages the patch tokens), one
    ``feature_info`` entry per XCA block (stride = patch size), ``forward_intermediates`` with timm's indices.
    """

    no_weight_decay_names = Backbone.no_weight_decay_names + ("gamma3",)

    def __init__(self, cfg: XCiTConfig, num_classes: int = 1000, in_chans: int = 3,
                 img_size: Any | None = None, global_pool: str = "token", drop_rate: float = 0.0,
                 pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float | None = None) -> None:
        super().__init__(in_chans, num_classes, cfg.patch_size)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {GLOBAL_POOLS}")
        h, w = _pair(cfg.img_size if img_size is None else img_size)
        if h <= 0 or w <= 0 or h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"img_size H={h}, W={w} is not allowed: H and W must be positive multiples of "
                             f"{cfg.patch_size} (the patch size)")
        dim = cfg.embed_dim
        dp = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        self.img_size = (h, w)  # the size the model is set up for; the position encoding follows the input
        self.patch_size = cfg.patch_size
        self.embed_dim = dim
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.patch_embed = ConvPatchEmbed(in_chans, dim, cfg.patch_size)
        self.cls_token: nn.Parameter | None = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = FourierPosEmbed(dim)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        # The reference uses one drop-path rate for every XCA block (no linear ramp), none in class attention.
        self.blocks = nn.Sequential(*[
            XCABlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.eta, dp, proj_drop_rate, attn_drop_rate)
            for _ in range(cfg.depth)
        ])
        self.cls_attn_blocks = nn.ModuleList([
            ClassAttentionBlock(dim, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.eta, cfg.tokens_norm,
                                proj_drop_rate, attn_drop_rate)
            for _ in range(cfg.cls_attn_layers)
        ])
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = dim
        self.feature_info = [dict(num_chs=dim, reduction=cfg.patch_size, module=f"blocks.{i}")
                             for i in range(cfg.depth)]
        # The reference's init: truncated normals (std 0.02) for the class token and every Linear, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.head = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    # ---- timm surface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0 removes it) on the model's device/dtype, in its mode."""
        if global_pool is not None:
            if global_pool not in GLOBAL_POOLS:
                raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {GLOBAL_POOLS}")
            if global_pool == "token" and self.cls_token is None:
                raise ValueError("global_pool='token' needs the class token, which prune_intermediate_layers "
                                 "removed; allowed: 'avg', ''")
            self.global_pool = global_pool
        self.num_classes = num_classes
        ref = self.norm.weight if isinstance(self.norm, nn.LayerNorm) else next(self.patch_embed.parameters())
        self.head = self._new_head(num_classes).to(ref.device, ref.dtype).train(self.training)

    def _stem_names(self) -> list[str]:
        return ["patch_embed", "pos_embed"]

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The class token, the position encoding's projection (timm's ``pos_embed.*``), the attention
        temperatures and the layer scales."""
        names = super().no_weight_decay()
        return names | {n for n, _ in self.named_parameters() if n.startswith("pos_embed.")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's grouping for layer-wise learning-rate decay: embeddings, one group per XCA block, one per
        class-attention block, the final norm last; the head matches nothing (the last group)."""
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=r"^blocks\.(\d+)",
            cls_attn_blocks=[(r"^cls_attn_blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Keep the XCA blocks ``forward_intermediates(indices)`` needs (timm's contract); ``prune_norm`` drops
        the final norm; ``prune_head`` the class token, the class-attention blocks and the classifier.
        Returns the block indices taken."""
        take = resolve_indices(indices, len(self.blocks))
        self.blocks = self.blocks[: max(take) + 1]
        self.feature_info = self.feature_info[: max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.cls_attn_blocks = nn.ModuleList()
            self.cls_token = None
            self.num_prefix_tokens = 0
            self.reset_classifier(0, "")
        return take

    # ---- forward ------------------------------------------------------------------------------------------
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) image -> (B, H / p, W / p, C) patch tokens with their position encoding."""
        x = self.patch_embed(x)  # B, C, H / p, W / p
        pos = self.pos_embed(x.shape[2], x.shape[3])  # H / p, W / p, C
        return self.pos_drop((pos + x.permute(0, 2, 3, 1)).contiguous())

    def forward_cls(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) patch tokens -> (B, 1 + N, C) after the class-attention blocks (the patch tokens as they
        are when the head was pruned)."""
        cls_token = self.cls_token
        if cls_token is None:
            return x
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.cls_attn_blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        x = self.embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(self.forward_cls(x.flatten(1, 2)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)


    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Outputs of the XCA blocks in ``indices`` (timm's semantics: an int n takes the last n blocks, a
        sequence picks blocks, negative allowed, None all) as (B, C, H / p, W / p) maps, or (B, N, C) tokens
        with ``output_fmt="NLC"``; ``norm`` applies the final norm to each. The final output is
        ``forward_features``' (B, 1 + N, C) tokens, computed from the last block run."""
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: {OUTPUT_FORMATS}")
        x = self.check_input(x)
        take = resolve_indices(indices, len(self.blocks))
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        x = self.embed(x)
        taken = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                taken.append(self.norm(x) if norm else x)
        if output_fmt == "NCHW":
            taken = [t.permute(0, 3, 1, 2).contiguous() for t in taken]
        else:
            taken = [t.flatten(1, 2) for t in taken]
        if intermediates_only:
            return taken
        return self.norm(self.forward_cls(x.flatten(1, 2))), taken


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"img_size must be an int or a pair of ints (H, W), got {size!r}")


def checkpoint_filter(state: dict[str, torch.Tensor], model: XCiT) -> dict[str, torch.Tensor]:
    """timm's checkpoints load as they are. The official files (facebookresearch/xcit) name the position
    encoding ``pos_embeder`` and store each class-attention ``q/k/v`` as one ``qkv`` Linear: renamed and
    split here."""
    if "model" in state and not isinstance(state["model"], torch.Tensor):
        state = state["model"]  # type: ignore[assignment]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith("pos_embeder."):
            key = "pos_embed." + key[len("pos_embeder."):]
        if key.startswith("cls_attn_blocks.") and ".attn.qkv." in key:
            prefix, kind = key.split(".attn.qkv.")
            for name, part in zip("qkv", value.reshape(3, -1, *value.shape[1:]).unbind(0)):
                out[f"{prefix}.attn.{name}.{kind}"] = part.contiguous()
            continue
        out[key] = value
    return out


XCiT.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_xcit(cfg: XCiTConfig, num_classes: int = 1000, in_chans: int = 3,
               img_size: int | tuple[int, int] | None = None, global_pool: str = "token", drop_rate: float = 0.0,
               pos_drop_rate: float = 0.0, proj_drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
               drop_path_rate: float | None = None) -> XCiT:
    """An XCiT variant; ``img_size`` (default: the variant's training size) must be a multiple of the patch
    size; other sizes work at run time too (the position encoding follows the input's grid)."""
    return XCiT(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size, global_pool=global_pool,
                drop_rate=drop_rate, pos_drop_rate=pos_drop_rate, proj_drop_rate=proj_drop_rate,
                attn_drop_rate=attn_drop_rate, drop_path_rate=drop_path_rate)
