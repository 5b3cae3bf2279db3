"""EfficientFormer V1 (arXiv:2206.01191): dimension-consistent design, 4D pool-mixer blocks then 3D MHSA.

Stages 0-3 run MetaBlock4D (``x + ls * (avgpool(x) - x)``, then a Conv-BN-GELU-Conv-BN MLP) on
(B, C, H, W) maps; the last ``num_vit`` blocks of the last stage reshape to tokens and run MetaBlock3D
(LayerNorm, multi-head attention with a learned offset bias, LayerNorm, MLP). Parameter names follow timm's
checkpoints, so ``efficientformer_l*`` weights load unchanged.

How this differs from the reference:

* Any input size (a multiple of 32). The 3D part keeps tokens as ``(B, H, W, C)`` so the attention knows its
  grid; the bias table (trained for 7x7 tokens at 224) is resampled bicubically on other grids
  (:mod:`effivit.layers.attn_bias`). At 224 logits equal timm's. ``set_input_size`` prepares a deploy size.
  ``forward_features`` returns timm's (B, N, C) tokens.
* timm's V1 state dict has the derived ``attention_bias_idxs`` buffer, and so does ours (keys equal timm's).
  :func:`checkpoint_filter` checks a loaded one against the index we derive (a wrong one raises) and fills it
  in for files that lack it; forward gathers the bias for the input's own grid and never reads it.
* ``deploy.fuse`` folds every Conv-BN pair, folds both layer scales of the MLPs and the attention's output
  projection into the preceding conv/linear, writes the pool mixer as ``addcmul(x, ls, pool(x) - x)``,
  merges the two classifier heads into one Linear and caches the gathered attention bias.
* Distillation head: as in timm, training mode returns the mean of both heads, and ``(logits, logits_dist)``
  after ``set_distilled_training(True)`` (the trainer sets it when it distils); eval returns their mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import CheckpointError
from ..deploy.fold import fold_affine_into_output, fuse_conv_bn
from ..layers import DropPath, LayerScale, LayerScale2d, Mlp
from ..layers.attn_bias import (
    AttentionBiasBase,
    biased_attention,
    fold_scale_into_rows,
    offset_index,
)
from ..layers.drop import drop_path_rates
from ..registry import FamilyDefaults, register_family
from ._base import DistilledBackbone, Stage, resolve_indices

TRAIN_SIZE = 224


@dataclass(frozen=True)
class EfficientFormerConfig:
    depths: tuple[int, int, int, int]
    embed_dims: tuple[int, int, int, int]
    num_vit: int
    mlp_ratio: float = 4.0
    pool_size: int = 3
    layer_scale_init_value: float = 1e-5
    key_dim: int = 32
    num_heads: int = 8
    attn_ratio: float = 4.0

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or len(self.embed_dims) != 4 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths and embed_dims must have 4 entries (depths >= 1), got {self.depths}, "
                             f"{self.embed_dims}")
        if not 0 <= self.num_vit <= self.depths[-1]:
            raise ValueError(f"num_vit must be in 0..depths[-1]={self.depths[-1]}, got {self.num_vit}")
        if self.pool_size % 2 != 1:
            raise ValueError(f"pool_size must be odd, got {self.pool_size}")


VARIANTS = {
    "efficientformer_l1": EfficientFormerConfig(depths=(3, 2, 6, 4), embed_dims=(48, 96, 224, 448), num_vit=1),
    "efficientformer_l3": EfficientFormerConfig(depths=(4, 4, 12, 6), embed_dims=(64, 128, 320, 512), num_vit=4),
    "efficientformer_l7": EfficientFormerConfig(depths=(6, 6, 18, 8), embed_dims=(96, 192, 384, 768), num_vit=8),
}

DEFAULTS = FamilyDefaults(
    family="efficientformer",
    crop_pct=0.95,
    first_conv="stem.conv1",
    classifier=("head", "head_dist"),
    size_divisor=32,
    fixed_input_size=False,
    has_distill_head=True,
    paper="EfficientFormer: Vision Transformers at MobileNet Speed (arXiv:2206.01191)",
)


class Attention(AttentionBiasBase):
    """MHSA on (B, H, W, C) tokens: one qkv Linear (per head ``[q | k | v]``), offset bias, output Linear."""

    def __init__(self, dim: int, key_dim: int = 32, num_heads: int = 8, attn_ratio: float = 4.0,
                 resolution: int = 7) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.qkv = nn.Linear(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Linear(num_heads * self.val_dim, dim)
        self.init_attention_bias(num_heads, resolution)
        # timm keeps the training grid's index in the state dict; forward never reads it (the bias is
        # gathered for the input's grid), it is here so the keys, and files saved from either, are timm's.
        self.register_buffer("attention_bias_idxs", offset_index(*self.bias_resolution, self.bias_stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        qkv = self.qkv(x).view(b, h * w, self.num_heads, -1)  # B, N, heads, 2kd+vd
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B, heads, N, d
        out = biased_attention(q, k, v, self.attention_bias(h, w), self.scale)  # B, heads, N, vd
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))

    def fuse(self) -> nn.Module:
        self.build_trained_bias_cache()
        if self.scale != 1.0:
            # The attention scale goes into the query rows of each head's [q | k | v] block.
            per_head = 2 * self.key_dim + self.val_dim
            rows = torch.arange(self.num_heads * per_head) % per_head < self.key_dim
            fold_scale_into_rows(self.qkv, rows, self.scale)
            self.scale = 1.0
        return self


class Pooling(nn.Module):
    """PoolFormer's token mixer: ``avgpool(x) - x`` (the residual adds x back)."""

    def __init__(self, pool_size: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool_size, stride=1, padding=pool_size // 2, count_include_pad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(x) - x


class ConvMlpWithNorm(nn.Module):
    """1x1 conv -> BN -> GELU -> 1x1 conv -> BN on maps."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.norm1 = nn.BatchNorm2d(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.norm2 = nn.BatchNorm2d(dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.norm1(self.fc1(x))))
        return self.drop(self.norm2(self.fc2(x)))

    def fuse(self) -> nn.Module:
        return nn.Sequential(fuse_conv_bn(self.fc1, self.norm1), self.act, fuse_conv_bn(self.fc2, self.norm2))


class FusedMetaBlock2d(nn.Module):
    """Inference form of :class:`MetaBlock2d`: ``addcmul(x, ls1, pool(x) - x)`` then ``x + mlp(x)`` with the
    second layer scale inside the MLP's last conv."""

    def __init__(self, gamma1: torch.Tensor, pool: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.gamma1 = nn.Parameter(gamma1.detach().reshape(1, -1, 1, 1).clone(), requires_grad=False)
        self.pool = pool
        self.mlp = mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(x, self.gamma1, self.pool(x) - x)
        return x + self.mlp(x)


class MetaBlock2d(nn.Module):
    def __init__(self, dim: int, pool_size: int, mlp_ratio: float, drop_path: float, ls_init: float) -> None:
        super().__init__()
        self.token_mixer = Pooling(pool_size)
        self.ls1 = LayerScale2d(dim, ls_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = ConvMlpWithNorm(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale2d(dim, ls_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(x)))
        return x + self.drop_path2(self.ls2(self.mlp(x)))

    def fuse(self) -> nn.Module:
        mlp = self.mlp
        if not isinstance(mlp, nn.Sequential):  # called directly rather than by the walker
            mlp = mlp.fuse()
        mlp[-1] = fold_affine_into_output(mlp[-1], self.ls2.gamma)
        return FusedMetaBlock2d(self.ls1.gamma, self.token_mixer.pool, mlp)


class MetaBlock1d(nn.Module):
    """Pre-norm transformer block on (B, H, W, C) tokens with layer scales."""

    def __init__(self, dim: int, mlp_ratio: float, drop_path: float, ls_init: float, attn: Attention) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.token_mixer = attn
        self.ls1 = LayerScale(dim, ls_init)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, ls_init)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.token_mixer(self.norm1(x))))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def fuse(self) -> nn.Module:
        # The layer scales are per-channel scalings of the last linear of each branch.
        if isinstance(self.ls1, LayerScale):
            self.token_mixer.proj = fold_affine_into_output(self.token_mixer.proj, self.ls1.gamma)
            self.ls1 = nn.Identity()
        if isinstance(self.ls2, LayerScale):
            self.mlp.fc2 = fold_affine_into_output(self.mlp.fc2, self.ls2.gamma)
            self.ls2 = nn.Identity()
        self.mlp = nn.Sequential(self.mlp.fc1, self.mlp.act, self.mlp.fc2)
        return self


class Flat(nn.Module):
    """(B, C, H, W) map -> (B, H, W, C) tokens (the 4D -> 3D switch)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1).contiguous()


class Downsample(nn.Module):
    """Stride-2 3x3 conv + BN between stages."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))

    def fuse(self) -> nn.Module:
        return fuse_conv_bn(self.conv, self.norm)


class Stem4(nn.Sequential):
    """Two stride-2 3x3 Conv+BN+ReLU."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs // 2, 3, 2, 1)
        self.norm1 = nn.BatchNorm2d(out_chs // 2)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_chs // 2, out_chs, 3, 2, 1)
        self.norm2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU()

    def fuse(self) -> nn.Module:
        return nn.Sequential(fuse_conv_bn(self.conv1, self.norm1), self.act1,
                             fuse_conv_bn(self.conv2, self.norm2), self.act2)


class EfficientFormer(DistilledBackbone):
    def __init__(self, cfg: EfficientFormerConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, global_pool)
        self.stem = Stem4(in_chans, cfg.embed_dims[0])
        # timm's stage-wise drop-path rule: linear over all blocks, split per stage.
        dpr = drop_path_rates(drop_path_rate, cfg.depths)
        last = len(cfg.depths) - 1
        attn_res = TRAIN_SIZE // 32
        stages = []
        prev = cfg.embed_dims[0]
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.embed_dims)):
            down: nn.Module = Downsample(prev, dim) if i > 0 else nn.Identity()
            num_vit = cfg.num_vit if i == last else 0
            blocks: list[nn.Module] = []
            for j in range(depth):
                dp = float(dpr[i][j])
                if j == depth - num_vit:
                    blocks.append(Flat())
                if j >= depth - num_vit:
                    attn = Attention(dim, cfg.key_dim, cfg.num_heads, cfg.attn_ratio, attn_res)
                    blocks.append(MetaBlock1d(dim, cfg.mlp_ratio, dp, cfg.layer_scale_init_value, attn))
                else:
                    blocks.append(MetaBlock2d(dim, cfg.pool_size, cfg.mlp_ratio, dp, cfg.layer_scale_init_value))
            stages.append(Stage(blocks, down))
            self.feature_info.append(dict(num_chs=dim, reduction=2 ** (i + 2), module=f"stages.{i}"))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.tokens_out = cfg.num_vit > 0
        self.last_stage = len(cfg.depths) - 1  # the token stage (stays its index when stages are pruned)
        self.num_features = self.head_hidden_size = prev
        self.norm = nn.LayerNorm(prev) if self.tokens_out else nn.BatchNorm2d(prev)
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
        """(B, N, C) tokens after the final LayerNorm, as timm (a view of our (B, H, W, C) tokens); (B, C, H, W)
        for a configuration without attention blocks."""
        x = self.check_input(x)
        x = self.stages(self.stem(self.stem_input(x)))
        x = self.norm(x)
        return x.flatten(1, 2) if self.tokens_out else x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean(1) if self.tokens_out else x.mean((2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        return self.classify(x)

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
        """Stage outputs as (B, C, H, W) maps; ``norm`` applies the final norm to the last one. The final
        output is what ``forward_features`` returns (tokens)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: 'NCHW'")
        x = self.check_input(x)
        take = resolve_indices(indices, len(self.stages))
        last = self.last_stage
        stages = self.stages if not stop_early else self.stages[: max(take) + 1]
        x = self.stem(self.stem_input(x))
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.norm(x) if (norm and i == last) else x
                intermediates.append(y.permute(0, 3, 1, 2) if (i == last and self.tokens_out) else y)
        if intermediates_only:
            return intermediates
        if len(stages) - 1 == last:
            x = self.norm(x)
            if self.tokens_out:
                x = x.flatten(1, 2)
        return x, intermediates

    # ---- deploy ---------------------------------------------------------------------------------
    def fuse(self) -> nn.Module:
        """Called by ``deploy.fuse`` after the children are folded: merge the two heads (eval returns their
        mean, an affine map) into one Linear, and run in channels_last (oneDNN's fast convolutions on CPU;
        the input is converted once at the stem)."""
        self.merge_distilled_heads()
        self.use_channels_last()
        return self


def checkpoint_filter(state: dict[str, torch.Tensor], model: EfficientFormer) -> dict[str, torch.Tensor]:
    """``attention_bias_idxs`` is derived from the 7x7 training grid: a loaded one must equal the index we
    derive for the module's trained grid (else its biases would be read in another order), and a file
    without it (an older effivit file) gets the derived one."""
    owners = {f"{n}.attention_bias_idxs": m for n, m in model.named_modules() if isinstance(m, Attention)}
    for k in state:
        if k.endswith("attention_bias_idxs") and k not in owners:
            raise CheckpointError(f"{k}: no attention module of this model owns this bias index")
    out = dict(state)
    for k, owner in owners.items():
        expected = offset_index(*owner.bias_resolution, owner.bias_stride)
        v = out.get(k)
        if v is None:
            prefix = k[: -len("attention_bias_idxs")]
            if any(key.startswith(prefix) for key in out):
                out[k] = expected
        elif tuple(v.shape) != tuple(expected.shape) or not torch.equal(v.to(torch.long).cpu(), expected):
            raise CheckpointError(
                f"{k} does not match the offset index of a {owner.bias_resolution} grid "
                f"(|dy| * W + |dx|): the checkpoint's attention biases would be read in another order"
            )
    return out


EfficientFormer.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_efficientformer(cfg: EfficientFormerConfig, num_classes: int = 1000, in_chans: int = 3,
                          drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                          global_pool: str = "avg") -> EfficientFormer:
    return EfficientFormer(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                           drop_path_rate=drop_path_rate, global_pool=global_pool)
