"""Next-ViT (arXiv:2207.05501): Next Convolution Blocks (MHCA) and Next Transformer Blocks (E-MHSA + MHCA).

Module and parameter names follow the official/timm checkpoints, so ``nextvit_*`` weights load unchanged.
Three token mixers for the transformer blocks, chosen with ``attn=``:

* ``"original"`` - E-MHSA as released: tokens (B, N, C), Linear q/k/v, and key/value down-sampling with
  ``AvgPool1d(sr**2)`` over the *flattened* token sequence (it averages runs of sr**2 tokens in raster
  order, not sr x sr windows). Reproduces timm's logits.
* ``"bchw"`` - the proposed E-MHSA that stays in (B, C, H, W): 1x1 conv q/k/v, ``AvgPool2d(sr, sr)`` +
  BatchNorm2d for keys/values, no layout round trips. Same parameter count as the original; its weights
  load from the original's (Linear weights are reshaped to 1x1 convs), but it is a different model.
* ``"xca"`` - cross-covariance attention with AvgPool2d down-scaling of the q/k input: linear in tokens.

All three fold the block's pre-norm into their projections when fused.
"""


from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Final

import torch
from torch import nn

from ..deploy.fold import bn_scale_shift, fold_affine_into_input, fuse_conv_bn
from ..layers import ClassifierHead, ConvMlp, ConvNorm, DropPath, make_divisible
from ..layers.attention import attend, heads_to_map, map_to_heads, merge_heads, split_heads
from ..layers.xca import cross_covariance_attention
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, checkpoint_seq

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
    size_divisor=32,
    paper="Next-ViT: Next Generation Vision Transformer (arXiv:2207.05501)",
)


def _norm(chs: int) -> nn.Module:
    return nn.BatchNorm2d(chs, eps=1e-5)


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
        return conv if isinstance(self.pool, nn.Identity) else nn.Sequential(self.pool, conv)


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


class _SpatialReduction(nn.Module):
    """Shared by the mixers: projections, the key/value (or q/k) down-sampling and its norm, and the
    folding of an input affine map (the block's pre-norm) into the projections."""

    def __init__(self, dim: int, head_dim: int, sr_ratio: int, pool: nn.Module | None,
                 norm: nn.Module | None, proj: Callable[[int, int], nn.Module]) -> None:
        super().__init__()
        if dim % head_dim != 0:
            raise ValueError(f"attention dim {dim} must be a multiple of head_dim {head_dim}")
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.sr_ratio = sr_ratio
        self.q = proj(dim, dim)
        self.k = proj(dim, dim)
        self.v = proj(dim, dim)
        self.proj = proj(dim, dim)
        self.sr = pool
        self.norm = norm

    # The pooled branch sees pool(pre_norm(x)) then self.norm: both affine per channel, and pooling is
    # linear, so the composition is one affine map that folds into the projections reading it.
    def _reduced_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.norm is None or isinstance(self.norm, nn.Identity):
            return scale, shift
        s2, t2 = bn_scale_shift(self.norm)
        self.norm = nn.Identity()
        return scale * s2, shift * s2 + t2


class EfficientAttention(_SpatialReduction):
    """E-MHSA as released (token layout, AvgPool1d over the flattened sequence)."""

    fused_kv: Final[bool]
    fused_qkv: Final[bool]

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        n_ratio = sr_ratio**2
        super().__init__(
            dim, head_dim, sr_ratio,
            nn.AvgPool1d(n_ratio, n_ratio) if sr_ratio > 1 else None,
            nn.BatchNorm1d(dim, eps=1e-5) if sr_ratio > 1 else None,
            nn.Linear,
        )
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_kv = False
        self.fused_qkv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # B, N, C
        drop = self.attn_drop if self.training else 0.0
        if self.fused_qkv:
            qkv = self.q(tokens).reshape(b, h * w, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
        else:
            q = split_heads(self.q(tokens), self.num_heads)
            kv_in = tokens
            if self.sr is not None:
                kv_in = self.sr(tokens.transpose(1, 2))  # B, C, N / sr^2
                if self.norm is not None:
                    kv_in = self.norm(kv_in)
                kv_in = kv_in.transpose(1, 2)
            if self.fused_kv:
                kv = self.k(kv_in).reshape(b, -1, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
                k, v = kv[0], kv[1]
            else:
                k = split_heads(self.k(kv_in), self.num_heads)
                v = split_heads(self.v(kv_in), self.num_heads)
        out = merge_heads(attend(q, k, v, dropout_p=drop))  # B, N, C
        out = self.proj_drop(self.proj(out))
        return out.transpose(1, 2).reshape(b, c, h, w)

    def absorb_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.q = fold_affine_into_input(self.q, scale, shift)
        s, t = self._reduced_affine(scale, shift)
        self.k = fold_affine_into_input(self.k, s, t)
        self.v = fold_affine_into_input(self.v, s, t)

    def merge_projections(self) -> None:
        # One GEMM for k and v (and for q too when they read the same tokens).
        if self.sr is None:
            self.q = _cat_linears([self.q, self.k, self.v])
            self.fused_qkv = True
        else:
            self.k = _cat_linears([self.k, self.v])
            self.fused_kv = True
        self.v = nn.Identity()
        self.k = nn.Identity() if self.fused_qkv else self.k


def _cat_linears(layers: list[nn.Module]) -> nn.Module:
    """Several projections of the same input -> one layer with their outputs stacked."""
    first = layers[0]
    weight = torch.cat([m.weight.detach() for m in layers], 0)
    bias = torch.cat([m.bias.detach() for m in layers], 0)
    if isinstance(first, nn.Linear):
        out = nn.Linear(weight.shape[1], weight.shape[0])
    else:
        out = nn.Conv2d(weight.shape[1], weight.shape[0], 1)
    out = out.to(device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def _conv1x1(in_chs: int, out_chs: int) -> nn.Module:
    return nn.Conv2d(in_chs, out_chs, 1)


class BCHWEfficientAttention(_SpatialReduction):
    """E-MHSA on (B, C, H, W): 1x1 conv projections, AvgPool2d(sr, sr) + BatchNorm2d for keys/values."""

    fused_kv: Final[bool]

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(
            dim, head_dim, sr_ratio,
            nn.AvgPool2d(sr_ratio, sr_ratio) if sr_ratio > 1 else None,
            _norm(dim) if sr_ratio > 1 else None,
            _conv1x1,
        )
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_kv = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        drop = self.attn_drop if self.training else 0.0
        q = map_to_heads(self.q(x), self.num_heads)  # B, heads, N, head_dim
        kv_in = x
        if self.sr is not None:
            kv_in = self.sr(x)
            if self.norm is not None:
                kv_in = self.norm(kv_in)
        if self.fused_kv:
            kv = self.k(kv_in)
            kb, kc, kh, kw = kv.shape
            kv = kv.reshape(b, 2, self.num_heads, self.head_dim, kh * kw).transpose(-1, -2)
            k, v = kv[:, 0], kv[:, 1]
        else:
            k = map_to_heads(self.k(kv_in), self.num_heads)
            v = map_to_heads(self.v(kv_in), self.num_heads)
        out = heads_to_map(attend(q, k, v, dropout_p=drop), h, w)
        return self.proj_drop(self.proj(out))

    def absorb_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.q = fold_affine_into_input(self.q, scale, shift)
        s, t = self._reduced_affine(scale, shift)
        self.k = fold_affine_into_input(self.k, s, t)
        self.v = fold_affine_into_input(self.v, s, t)

    def merge_projections(self) -> None:
        self.k = _cat_linears([self.k, self.v])
        self.v = nn.Identity()
        self.fused_kv = True


class XCAttention(_SpatialReduction):
    """Cross-covariance attention on (B, C, H, W); q and k read the AvgPool2d(sr)-down-scaled map
    (+ BatchNorm2d), v reads the full map, so the cost is linear in H*W."""

    fused_qk: Final[bool]

    def __init__(self, dim: int, head_dim: int = 32, sr_ratio: int = 1, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(
            dim, head_dim, sr_ratio,
            nn.AvgPool2d(sr_ratio, sr_ratio) if sr_ratio > 1 else None,
            _norm(dim) if sr_ratio > 1 else None,
            _conv1x1,
        )
        self.temperature = nn.Parameter(torch.ones(self.num_heads, 1, 1))
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.fused_qk = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qk_in = x
        if self.sr is not None:
            qk_in = self.sr(x)
            if self.norm is not None:
                qk_in = self.norm(qk_in)
        if self.fused_qk:
            qk = self.q(qk_in).flatten(2).reshape(b, 2, self.num_heads, self.head_dim, -1)
            q, k = qk[:, 0], qk[:, 1]
        else:
            q = self.q(qk_in).reshape(b, self.num_heads, self.head_dim, -1)  # B, heads, head_dim, M
            k = self.k(qk_in).reshape(b, self.num_heads, self.head_dim, -1)
        v = self.v(x).reshape(b, self.num_heads, self.head_dim, h * w)
        out = cross_covariance_attention(q, k, v, self.temperature, self.attn_drop, self.training)
        return self.proj_drop(self.proj(out.reshape(b, c, h, w)))

    def absorb_input_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.v = fold_affine_into_input(self.v, scale, shift)
        s, t = self._reduced_affine(scale, shift)
        self.q = fold_affine_into_input(self.q, s, t)
        self.k = fold_affine_into_input(self.k, s, t)

    def merge_projections(self) -> None:
        self.q = _cat_linears([self.q, self.k])
        self.k = nn.Identity()
        self.fused_qk = True


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


class NextStage(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class NextViT(Backbone):
    checkpoint_filter = None  # set below (needs the function defined after the class)

    def __init__(self, cfg: NextViTConfig, num_classes: int = 1000, in_chans: int = 3, attn: str = "original",
                 drop_rate: float = 0.0, drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor)
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
        dpr = torch.linspace(0, dpr_total, sum(depths)).split(list(depths))
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
            stages.append(NextStage(blocks))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        self.norm = _norm(in_chs)
        self.head = ClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.feature_info = [
            dict(num_chs=chs[-1], reduction=2 ** (i + 2), module=f"stages.{i}") for i, chs in enumerate(stage_out_chs)
        ]
        self._init_weights()

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
