"""EfficientFormerV2 (arXiv:2212.08059): Rethinking Vision Transformers for MobileNet Size and Speed.

A 4D (B, C, H, W) network throughout: FFN blocks (1x1 conv, depth-wise 3x3 "mid" conv, 1x1 conv, all with
BN, and a layer scale) in every stage; in stages 2-3 the last ``num_vit`` blocks add Attention4D (talking
heads, a depth-wise "local V" branch, a learned offset bias; in stage 2 on a stride-2 reduced grid that is
upsampled back), and stage 3 is entered through Attention4DDownsample (a local-global query at stride 2)
added to a strided conv. Parameter names follow timm's checkpoints, so ``efficientformerv2_*`` weights load
unchanged.

How this differs from the reference:

* Any input size (a multiple of 32, so the stride-2 attention grid of stage 2 is even). The bias tables
  (trained at 224: 7x7 for both attention kinds' key grids... 14x14 for the downsampling attention) are
  resampled bicubically on other grids (:mod:`effivit.layers.attn_bias`); the upsampling returns exactly to
  the block's grid. At 224 logits equal timm's. ``set_input_size`` prepares a deploy size once.
* Talking heads are written as two batched matmuls on the flattened logits (``baddbmm``), and the first
  one is applied to the bias table once: ``th1(qk * s + B) = (W1 * s) qk + (W1 B + b1)``, so the cache holds
  the head-mixed bias and the per-forward work is matmul, baddbmm, softmax, baddbmm, matmul.
* ``deploy.fuse`` folds every Conv-BN pair; merges the q/k/v 1x1 convs (k/v in the downsampling attention)
  into one conv; folds the local-global query's stride-2 subsample into its depth-wise conv (an identity
  tap); folds the layer scales into the last conv of each branch; merges the two classifier heads.
* Distillation head: as in timm, training mode returns the mean of both heads, and ``(logits, logits_dist)``
  after ``set_distilled_training(True)`` (the trainer sets it when it distils); eval returns their mean.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.fold import (
    bn_scale_shift,
    fold_affine_into_output,
    identity_kernel,
    sum_branches,
)
from ..layers import DropPath, LayerScale2d, attn_bias
from ..layers.attn_bias import (
    AttentionBiasBase,
    biased_attention,
    fold_scale_into_rows,
    query_grid,
)
from ..layers.conv_bn import ConvNorm
from ..layers.drop import drop_path_rates
from ..layers.norm import ChannelAffine
from ..registry import FamilyDefaults, register_family
from ._base import DistilledBackbone, Stage

TRAIN_SIZE = 224


@dataclass(frozen=True)
class EfficientFormerV2Config:
    depths: tuple[int, int, int, int]
    embed_dims: tuple[int, int, int, int]
    mlp_ratios: tuple[tuple[float, ...], ...]
    num_vit: int
    drop_path_rate: float = 0.0
    layer_scale_init_value: float = 1e-5

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.embed_dims) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths and embed_dims must have 4 entries (depths >= 1), got {self.depths}, "
                             f"{self.embed_dims}")
        if len(self.mlp_ratios) != 4 or any(len(r) != d for r, d in zip(self.mlp_ratios, self.depths)):
            raise ValueError(f"mlp_ratios must give one ratio per block of each stage, got {self.mlp_ratios}")
        if not 0 <= self.num_vit <= min(self.depths[2], self.depths[3]):
            raise ValueError(f"num_vit must be in 0..min(depths[2:]), got {self.num_vit}")


def _ratios(*stages) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(r) for r in s) for s in stages)


VARIANTS = {
    "efficientformerv2_s0": EfficientFormerV2Config(
        depths=(2, 2, 6, 4), embed_dims=(32, 48, 96, 176), num_vit=2, drop_path_rate=0.0,
        mlp_ratios=_ratios((4, 4), (4, 4), (4, 3, 3, 3, 4, 4), (4, 3, 3, 4))),
    "efficientformerv2_s1": EfficientFormerV2Config(
        depths=(3, 3, 9, 6), embed_dims=(32, 48, 120, 224), num_vit=2, drop_path_rate=0.0,
        mlp_ratios=_ratios((4,) * 3, (4,) * 3, (4, 4, 3, 3, 3, 3, 4, 4, 4), (4, 4, 3, 3, 4, 4))),
    "efficientformerv2_s2": EfficientFormerV2Config(
        depths=(4, 4, 12, 8), embed_dims=(32, 64, 144, 288), num_vit=4, drop_path_rate=0.02,
        mlp_ratios=_ratios((4,) * 4, (4,) * 4, (4, 4, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4), (4, 4, 3, 3, 3, 3, 4, 4))),
    "efficientformerv2_l": EfficientFormerV2Config(
        depths=(5, 5, 15, 10), embed_dims=(40, 80, 192, 384), num_vit=6, drop_path_rate=0.1,
        mlp_ratios=_ratios((4,) * 5, (4,) * 5, (4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4),
                           (4, 4, 4, 3, 3, 3, 3, 4, 4, 4))),
}

DEFAULTS = FamilyDefaults(
    family="efficientformer_v2",
    crop_pct=0.95,
    first_conv="stem.conv1.conv",
    classifier=("head", "head_dist"),
    size_divisor=32,
    fixed_input_size=False,
    has_distill_head=True,
    paper="Rethinking Vision Transformers for MobileNet Size and Speed (arXiv:2212.08059)",
)


def _cat_convs(convs: list[nn.Conv2d]) -> nn.Conv2d:
    """1x1 convs reading the same input -> one conv with their outputs stacked."""
    first = convs[0]
    weight = torch.cat([c.weight.detach() for c in convs], 0)
    bias = torch.cat([c.bias.detach() for c in convs], 0)
    out = nn.Conv2d(first.in_channels, weight.shape[0], 1).to(weight.device, weight.dtype)
    with torch.no_grad():
        out.weight.copy_(weight)
        out.bias.copy_(bias)
    return out


def _conv_bn(in_chs: int, out_chs: int, kernel_size: int = 1, stride: int = 1, padding: int | None = None,
             groups: int = 1, act_layer: Callable[[], nn.Module] | None = None) -> ConvNorm:
    """Conv (with the bias EfficientFormerV2 keeps before its norms) + BatchNorm under timm's keys ``conv``/``bn``."""
    return ConvNorm(in_chs, out_chs, kernel_size, stride, padding, groups, act_layer=act_layer, bias=True,
                    names=("conv", "bn"))


def _as_conv(m: nn.Module) -> nn.Conv2d:
    """A conv-BN pair without activation, fused or not, as one conv."""
    return m if isinstance(m, nn.Conv2d) else m.fuse()


class Attention2d(AttentionBiasBase):
    """Attention4D: q/k/v 1x1 Conv+BN, talking heads around the softmax, local V (depth-wise 3x3 on v added
    to the output), GELU, 1x1 Conv+BN projection. With ``stride`` the attention runs on a grid reduced by a
    stride-2 depth-wise Conv+BN and the output is upsampled (bilinear) back to the input grid."""

    # Read once when scripting (TorchScript drops the branch not taken).
    __constants__ = ["fused_qkv", "has_stride"]

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: tuple[int, int] = (7, 7), stride: int | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.dh = self.val_dim * num_heads
        self.scale = key_dim**-0.5
        self.has_stride = stride is not None
        if stride is not None:
            resolution = query_grid(resolution[0], resolution[1], stride)
            self.stride_conv = _conv_bn(dim, dim, 3, stride=stride, groups=dim)
        else:
            self.stride_conv = nn.Identity()
        kh = key_dim * num_heads
        self.q = _conv_bn(dim, kh)
        self.k = _conv_bn(dim, kh)
        self.v = _conv_bn(dim, self.dh)
        self.v_local = _conv_bn(self.dh, self.dh, 3, groups=self.dh)
        self.talking_head1 = nn.Conv2d(num_heads, num_heads, 1)
        self.talking_head2 = nn.Conv2d(num_heads, num_heads, 1)
        self.act = nn.GELU()
        self.proj = _conv_bn(self.dh, dim)
        self.fused_qkv = False
        self.init_attention_bias(num_heads, resolution)

    def compute_attention_bias(self, key_h: int, key_w: int) -> torch.Tensor:
        # The first talking-head projection is linear in the logits, so its action on the bias and its own
        # bias are one constant: (heads, N, N).
        bias = attn_bias.gather_attention_bias(self.attention_biases, self.bias_resolution, key_h, key_w,
                                               self.bias_stride)
        h = self.num_heads
        mixed = torch.mm(self.talking_head1.weight.reshape(h, h), bias.reshape(h, -1))
        b1 = self.talking_head1.bias
        if b1 is not None:
            mixed = mixed + b1.reshape(h, 1)
        return mixed.reshape(bias.shape)

    @torch.jit.unused
    def bias_sources(self) -> list[torch.Tensor]:
        return [self.attention_biases, self.talking_head1.weight, self.talking_head1.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = x.shape[-2], x.shape[-1]
        x = self.stride_conv(x)
        b, _, h, w = x.shape
        n = h * w
        heads = self.num_heads
        if self.fused_qkv:
            qkv = self.q(x)
            kh = heads * self.key_dim
            q, k, v_map = qkv[:, :kh], qkv[:, kh: 2 * kh], qkv[:, 2 * kh:]
        else:
            q, k, v_map = self.q(x), self.k(x), self.v(x)
        v_local = self.v_local(v_map)
        q = q.reshape(b, heads, self.key_dim, n).transpose(-1, -2)  # B, heads, N, kd
        k = k.reshape(b, heads, self.key_dim, n)  # B, heads, kd, N
        v = v_map.reshape(b, heads, self.val_dim, n).transpose(-1, -2)  # B, heads, N, vd
        logits = torch.matmul(q, k).reshape(b, heads, n * n)
        w1 = self.talking_head1.weight.reshape(heads, heads)
        if self.scale != 1.0:
            w1 = w1 * self.scale
        w1 = w1.expand(b, heads, heads)
        bias = self.attention_bias(h, w).to(q.dtype).reshape(heads, n * n)
        attn = torch.baddbmm(bias, w1, logits).reshape(b, heads, n, n).softmax(dim=-1)
        w2 = self.talking_head2.weight.reshape(heads, heads).expand(b, heads, heads)
        b2 = self.talking_head2.bias
        if b2 is not None:
            attn = torch.baddbmm(b2.reshape(heads, 1), w2, attn.reshape(b, heads, n * n))
        else:
            attn = torch.bmm(w2, attn.reshape(b, heads, n * n))
        out = torch.matmul(attn.reshape(b, heads, n, n), v)  # B, heads, N, vd
        out = out.transpose(-1, -2).reshape(b, self.dh, h, w) + v_local
        if self.has_stride:
            out = F.interpolate(out, size=(out_h, out_w), mode="bilinear", align_corners=False)
        return self.proj(self.act(out))

    def fuse(self) -> nn.Module:
        self.q = _cat_convs([_as_conv(self.q), _as_conv(self.k), _as_conv(self.v)])
        self.k = nn.Identity()
        self.v = nn.Identity()
        self.fused_qkv = True
        # The attention scale goes into the query channels (the first heads * key_dim).
        rows = torch.arange(self.q.out_channels) < self.num_heads * self.key_dim
        fold_scale_into_rows(self.q, rows, self.scale)
        self.scale = 1.0
        self.build_trained_bias_cache()
        return self


class LocalGlobalQuery(nn.Module):
    """The downsampling attention's query: depth-wise stride-2 3x3 conv + stride-2 subsample, then 1x1
    Conv+BN."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(1, 2, 0)
        self.local = nn.Conv2d(in_dim, in_dim, 3, 2, 1, groups=in_dim)
        self.proj = _conv_bn(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.local(x) + self.pool(x))

    def fuse(self) -> nn.Module:
        # The subsample is the depth-wise conv's centre tap with weight 1 (padding 1, stride 2): one conv.
        local = self.local
        ident = identity_kernel(local.in_channels, local.groups, local.kernel_size, local.weight)
        zero = torch.zeros_like(local.bias)
        conv = sum_branches(local, [(local.weight.detach(), local.bias.detach()), (ident, zero)])
        return nn.Sequential(conv, _as_conv(self.proj))


class Attention2dDownsample(AttentionBiasBase):
    """Attention4DDownsample: queries from :class:`LocalGlobalQuery` at stride 2, keys/values on the full
    grid, local V at stride 2, GELU, 1x1 Conv+BN to the next stage's width. No talking heads."""

    # Read once when scripting (TorchScript drops the branch not taken).
    __constants__ = ["fused_kv"]

    def __init__(self, dim: int, out_dim: int, key_dim: int = 16, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: tuple[int, int] = (14, 14)) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.dh = self.val_dim * num_heads
        self.scale = key_dim**-0.5
        kh = key_dim * num_heads
        self.q = LocalGlobalQuery(dim, kh)
        self.k = _conv_bn(dim, kh)
        self.v = _conv_bn(dim, self.dh)
        self.v_local = _conv_bn(self.dh, self.dh, 3, stride=2, groups=self.dh)
        self.act = nn.GELU()
        self.proj = _conv_bn(self.dh, out_dim)
        self.fused_kv = False
        self.init_attention_bias(num_heads, resolution, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        heads = self.num_heads
        q = self.q(x)
        hq, wq = q.shape[-2], q.shape[-1]
        if self.fused_kv:
            kv = self.k(x)
            k, v_map = kv[:, : heads * self.key_dim], kv[:, heads * self.key_dim:]
        else:
            k, v_map = self.k(x), self.v(x)
        v_local = self.v_local(v_map)
        q = q.reshape(b, heads, self.key_dim, hq * wq).transpose(-1, -2)  # B, heads, Nq, kd
        k = k.reshape(b, heads, self.key_dim, h * w).transpose(-1, -2)  # B, heads, N, kd
        v = v_map.reshape(b, heads, self.val_dim, h * w).transpose(-1, -2)  # B, heads, N, vd
        out = biased_attention(q, k, v, self.attention_bias(h, w), self.scale)  # B, heads, Nq, vd
        out = out.transpose(-1, -2).reshape(b, self.dh, hq, wq) + v_local
        return self.proj(self.act(out))

    def fuse(self) -> nn.Module:
        self.k = _cat_convs([_as_conv(self.k), _as_conv(self.v)])
        self.v = nn.Identity()
        self.fused_kv = True
        q_proj = self.q[-1] if isinstance(self.q, nn.Sequential) else self.q.proj
        q_proj = _as_conv(q_proj)
        fold_scale_into_rows(q_proj, torch.ones(q_proj.out_channels, dtype=torch.bool), self.scale)
        if isinstance(self.q, nn.Sequential):
            self.q[-1] = q_proj
        else:
            self.q.proj = q_proj
        self.scale = 1.0
        self.build_trained_bias_cache()
        return self


class ConvMlpWithNorm(nn.Module):
    """1x1 Conv+BN+GELU -> depth-wise 3x3 Conv+BN+GELU ("mid") -> 1x1 Conv+BN."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = _conv_bn(dim, hidden, act_layer=nn.GELU)
        self.mid = _conv_bn(hidden, hidden, 3, groups=hidden, act_layer=nn.GELU)
        self.drop1 = nn.Dropout(drop)
        self.fc2 = _conv_bn(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.mid(self.fc1(x)))))


class EfficientFormerV2Block(nn.Module):
    """Optional Attention4D branch, then the FFN branch; each scaled by a layer scale."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, ls_init: float, use_attn: bool,
                 resolution: tuple[int, int], stride: int | None) -> None:
        super().__init__()
        if use_attn:
            self.token_mixer: nn.Module | None = Attention2d(dim, resolution=resolution, stride=stride)
            self.ls1: nn.Module | None = LayerScale2d(dim, ls_init)
            self.drop_path1: nn.Module | None = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        else:
            self.token_mixer = None
            self.ls1 = None
            self.drop_path1 = None
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim, ls_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_mixer is not None:
            x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))

    def fuse(self) -> nn.Module:
        # Layer scales are per-channel scalings of each branch's last conv.
        if self.token_mixer is not None and isinstance(self.ls1, LayerScale2d):
            self.token_mixer.proj = fold_affine_into_output(_as_conv(self.token_mixer.proj), self.ls1.gamma)
            self.ls1 = nn.Identity()
        if isinstance(self.ls2, LayerScale2d):
            mlp = self.mlp
            fc1 = mlp.fc1.fuse() if isinstance(mlp.fc1, ConvNorm) else mlp.fc1
            mid = mlp.mid.fuse() if isinstance(mlp.mid, ConvNorm) else mlp.mid
            fc2 = fold_affine_into_output(_as_conv(mlp.fc2), self.ls2.gamma)
            self.mlp = nn.Sequential(*fc1, *mid, fc2)
            self.ls2 = nn.Identity()
        return self


class Downsample(nn.Module):
    """Stride-2 3x3 Conv+BN, plus the downsampling attention where the stage uses it."""

    def __init__(self, in_chs: int, out_chs: int, use_attn: bool, resolution: tuple[int, int]) -> None:
        super().__init__()
        self.conv = _conv_bn(in_chs, out_chs, 3, stride=2, padding=1)
        self.attn = Attention2dDownsample(in_chs, out_chs, resolution=resolution) if use_attn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.attn is not None:
            return self.attn(x) + out
        return out


class Stem4(nn.Sequential):
    """Two stride-2 3x3 Conv+BN+GELU."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn(in_chs, out_chs // 2, 3, stride=2, padding=1, act_layer=nn.GELU)
        self.conv2 = _conv_bn(out_chs // 2, out_chs, 3, stride=2, padding=1, act_layer=nn.GELU)


class EfficientFormerV2(DistilledBackbone):

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form
    def __init__(self, cfg: EfficientFormerV2Config, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, global_pool)
        dp_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        dpr = drop_path_rates(dp_total, cfg.depths)
        self.stem = Stem4(in_chans, cfg.embed_dims[0])
        stride = 4
        prev = cfg.embed_dims[0]
        stages = []
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.embed_dims)):
            res = (-(-TRAIN_SIZE // stride),) * 2  # the grid entering this stage at the training size
            if i > 0:
                down: nn.Module = Downsample(prev, dim, use_attn=i >= 3, resolution=res)
                res = query_grid(res[0], res[1], 2)
                stride *= 2
            else:
                down = nn.Identity()
            first_attn = depth - cfg.num_vit if i >= 2 else depth
            blocks = [
                EfficientFormerV2Block(dim, cfg.mlp_ratios[i][j], float(dpr[i][j]), cfg.layer_scale_init_value,
                                       use_attn=j >= first_attn, resolution=res, stride=2 if i == 2 else None)
                for j in range(depth)
            ]
            stages.append(Stage(blocks, down))
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = prev
        self.norm = nn.BatchNorm2d(prev)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.head_dist = self._new_head(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ---- forward --------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        x = self.stages(self.stem(self.stem_input(x)))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        return self.classify(x)

    # ---- deploy ---------------------------------------------------------------------------------
    def fuse(self) -> nn.Module:
        """Called by ``deploy.fuse`` after the children are folded: merge the two heads (eval returns their
        mean, an affine map) into one Linear, and run in channels_last (oneDNN's fast convolutions on CPU;
        the input is converted once at the stem)."""
        self.merge_distilled_heads()
        # The final BatchNorm could fold into the classifier (it commutes with average pooling), but then the
        # fused forward_features and pre-logits would differ from the training form's: it becomes a
        # per-channel affine map instead.
        if isinstance(self.norm, nn.BatchNorm2d):
            self.norm = ChannelAffine(*bn_scale_shift(self.norm))
        self.use_channels_last()
        return self


@register_family(DEFAULTS, VARIANTS)
def build_efficientformer_v2(cfg: EfficientFormerV2Config, num_classes: int = 1000, in_chans: int = 3,
                             drop_rate: float = 0.0, drop_path_rate: float | None = None,
                             global_pool: str = "avg") -> EfficientFormerV2:
    return EfficientFormerV2(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                             drop_path_rate=drop_path_rate, global_pool=global_pool)
