"""RepViT (arXiv:2307.09283): a MobileNetV3-style CNN redesigned with ViT choices.

Each block separates the token mixer (a RepVGG-style depth-wise conv: k x k conv-BN + 1x1 conv + identity,
then a BatchNorm over the sum) from the channel mixer (a 1x1-conv MLP with GELU and a residual), with
squeeze-and-excitation on every other block. Stages after the first start with a down-sampling block; the
classifier has a distillation head (two BatchNorm-Linear heads whose outputs are averaged at inference).

State-dict keys are timm's: conv-BN pairs are ``layers.ConvNorm`` under timm's names ``c``/``bn``, the token
mixer's outer norm is ``bn`` and the heads are ``layers.conv_bn.NormLinear`` (``bn``/``l``).
Only the current (non-"legacy") variants are provided.

How this differs from timm:

* ``drop_path_rate`` (default 0, as released) adds stochastic depth to the MLP residuals: an extension.
* ``deploy.fuse`` folds every conv-BN pair, collapses each token mixer's three branches and outer BN into
  one depth-wise conv, folds each head's BatchNorm into its Linear and averages the two heads into one
  Linear: no BatchNorm and no multi-branch block is left. The network runs in channels_last memory (the
  stem converts its input once; same numbers, faster depth-wise and 1x1 convs on CPU).
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..deploy.fold import average_linears, fuse_conv_bn, sum_branches
from ..layers import ConvNorm, DropPath
from ..layers.conv_bn import NormLinear
from ..layers.drop import drop_path_rates
from ..layers.rep import branch_kernel
from ..layers.se import SqueezeExcite
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, checkpoint_seq


@dataclass(frozen=True)
class RepViTConfig:
    embed_dim: tuple[int, int, int, int]
    depth: tuple[int, int, int, int]
    mlp_ratio: int = 2
    kernel_size: int = 3
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if len(self.embed_dim) != 4 or any(not isinstance(d, int) or d < 2 or d % 2 for d in self.embed_dim):
            raise ValueError(f"embed_dim must be 4 positive even ints, got {self.embed_dim}")
        if len(self.depth) != 4 or any(not isinstance(d, int) or d < 1 for d in self.depth):
            raise ValueError(f"depth must be 4 positive ints, got {self.depth}")
        if not isinstance(self.mlp_ratio, int) or self.mlp_ratio < 1:
            raise ValueError(f"mlp_ratio must be a positive int, got {self.mlp_ratio}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


VARIANTS = {
    "repvit_m0_9": RepViTConfig(embed_dim=(48, 96, 192, 384), depth=(2, 2, 14, 2)),
    "repvit_m1_0": RepViTConfig(embed_dim=(56, 112, 224, 448), depth=(2, 2, 14, 2)),
    "repvit_m1_1": RepViTConfig(embed_dim=(64, 128, 256, 512), depth=(2, 2, 12, 2)),
    "repvit_m1_5": RepViTConfig(embed_dim=(64, 128, 256, 512), depth=(4, 4, 24, 4)),
    "repvit_m2_3": RepViTConfig(embed_dim=(80, 160, 320, 640), depth=(6, 6, 34, 2)),
}

DEFAULTS = FamilyDefaults(
    family="repvit",
    crop_pct=0.95,
    first_conv="stem.conv1.c",
    classifier=("head.head.l", "head.head_dist.l"),
    # every stride-2 conv is padded: any size works
    size_divisor=1,
    min_input_size=1,
    has_distill_head=True,
    paper="RepViT: Revisiting Mobile CNN From ViT Perspective (arXiv:2307.09283)",
)


C_BN = ("c", "bn")  # timm's names for a conv-BN pair in RepViT


class RepVggDw(nn.Module):
    """``norm(conv_kxk_bn(x) + conv_1x1(x) + x)`` on depth-wise convs; ``fuse()`` -> one k x k depth-wise conv."""

    def __init__(self, dim: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = ConvNorm(dim, dim, kernel_size, groups=dim, names=C_BN)
        self.conv1 = nn.Conv2d(dim, dim, 1, groups=dim)
        self.bn = nn.BatchNorm2d(dim)
        self.dim = dim
        self.kernel_size = kernel_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x) + self.conv1(x) + x)

    def fuse(self) -> nn.Module:
        conv = self.conv.fuse() if isinstance(self.conv, ConvNorm) else self.conv  # the walker fuses it first
        k = (self.kernel_size, self.kernel_size)
        like = conv.weight
        parts = [branch_kernel(b, self.dim, self.dim, k, like) for b in (conv, self.conv1, nn.Identity())]
        return fuse_conv_bn(sum_branches(conv, parts), self.bn)


class RepViTMlp(nn.Module):
    """1x1 conv-BN -> GELU -> 1x1 conv-BN (the last BN starts at zero, so a new block starts as identity)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(dim, hidden, 1, names=C_BN)
        self.act = nn.GELU()
        self.conv2 = ConvNorm(hidden, dim, 1, bn_weight_init=0.0, names=C_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.act(self.conv1(x)))


class RepViTBlock(nn.Module):
    def __init__(self, dim: int, mlp_ratio: int, kernel_size: int, use_se: bool, drop_path: float) -> None:
        super().__init__()
        self.token_mixer = RepVggDw(dim, kernel_size)
        self.se = SqueezeExcite(dim, rd_ratio=0.25, rd_divisor=8) if use_se else nn.Identity()
        self.channel_mixer = RepViTMlp(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.se(self.token_mixer(x))
        return x + self.drop_path(self.channel_mixer(x))


class RepViTDownsample(nn.Module):
    """A block at the input width, a stride-2 depth-wise conv-BN, a 1x1 conv-BN to the new width, an MLP."""

    def __init__(self, in_dim: int, out_dim: int, mlp_ratio: int, kernel_size: int, drop_path: float) -> None:
        super().__init__()
        self.pre_block = RepViTBlock(in_dim, mlp_ratio, kernel_size, use_se=False, drop_path=drop_path)
        self.spatial_downsample = ConvNorm(in_dim, in_dim, kernel_size, stride=2, groups=in_dim, names=C_BN)
        self.channel_downsample = ConvNorm(in_dim, out_dim, 1, names=C_BN)
        self.ffn = RepViTMlp(out_dim, out_dim * mlp_ratio)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.channel_downsample(self.spatial_downsample(self.pre_block(x)))
        return x + self.drop_path(self.ffn(x))


class RepViTStage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int, downsample: bool, drop_path: list[float],
                 cfg: RepViTConfig) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            # drop_path: one rate for the down-sampling block, then one per block.
            self.downsample = RepViTDownsample(in_dim, out_dim, cfg.mlp_ratio, cfg.kernel_size, drop_path[0])
            drop_path = drop_path[1:]
        else:
            if in_dim != out_dim:
                raise ValueError(f"a stage without down-sampling keeps its width, got {in_dim} -> {out_dim}")
            self.downsample = nn.Identity()
        # Squeeze-and-excitation on the 1st, 3rd, 5th ... block of every stage.
        self.blocks = nn.Sequential(*[
            RepViTBlock(out_dim, cfg.mlp_ratio, cfg.kernel_size, use_se=i % 2 == 0, drop_path=drop_path[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class RepViTStem(nn.Module):
    """Two stride-2 3x3 conv-BN with GELU between; moves the input to channels_last memory first."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = ConvNorm(in_chs, out_chs // 2, 3, stride=2, names=C_BN)
        self.act1 = nn.GELU()
        self.conv2 = ConvNorm(out_chs // 2, out_chs, 3, stride=2, names=C_BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.conv2(self.act1(self.conv1(x)))


class DistilledClassifier(nn.Module):
    """``head`` and ``head_dist`` (BatchNorm -> Linear each) on the pooled features.

    Training (with ``distilled_training``): ``(head(x), head_dist(x))``; otherwise their mean.
    ``fuse()`` folds each BatchNorm and averages the heads: one Linear.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.distilled_training = False
        self.head = NormLinear(dim, num_classes, linear_name="l") if num_classes > 0 else nn.Identity()
        self.head_dist = NormLinear(dim, num_classes, linear_name="l") if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, out_dist = self.head(x), self.head_dist(x)
        if self.training and self.distilled_training and not torch.jit.is_scripting():
            return out, out_dist  # type: ignore[return-value]
        return (out + out_dist) / 2

    def fuse(self) -> nn.Module:
        if isinstance(self.head, nn.Linear) and isinstance(self.head_dist, nn.Linear):
            return average_linears([self.head, self.head_dist])
        if isinstance(self.head, nn.Identity) and isinstance(self.head_dist, nn.Identity):
            return nn.Identity()
        return self


class RepViT(Backbone):

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form

    def __init__(self, cfg: RepViTConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, DEFAULTS.min_input_size)
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: 'avg', ''")
        dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        if not 0.0 <= dpr_total < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr_total}")
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        dims = cfg.embed_dim
        self.stem = RepViTStem(in_chans, dims[0])
        # One rate per residual: a down-sampling stage's first rate goes to its down-sampling block.
        counts = [d + (1 if i > 0 else 0) for i, d in enumerate(cfg.depth)]
        dpr = drop_path_rates(dpr_total, counts)
        stages = []
        in_dim = dims[0]
        reduction = 4
        for i in range(4):
            downsample = i > 0
            stages.append(RepViTStage(in_dim, dims[i], cfg.depth[i], downsample, dpr[i], cfg))
            reduction *= 2 if downsample else 1
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
            in_dim = dims[i]
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_dim
        self.norm = nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = DistilledClassifier(in_dim, num_classes)

    # ---- heads ----------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """New ``head`` and ``head_dist`` for ``num_classes`` (0 removes both)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: 'avg', ''")
            self.global_pool = global_pool
        self.num_classes = num_classes
        distilled = getattr(self.head, "distilled_training", False)
        ref = next(self.parameters())
        self.head = DistilledClassifier(self.num_features, num_classes).to(ref.device, ref.dtype)
        self.head.distilled_training = distilled
        self.head.train(self.training)

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """True: training mode returns (logits, logits_dist). False (default, as timm): their mean, as in eval."""
        self.head.distilled_training = enable

    # ---- forward --------------------------------------------------------------------------------
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        if pre_logits:
            return x
        return self.head(x)


@register_family(DEFAULTS, VARIANTS)
def build_repvit(cfg: RepViTConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> RepViT:
    return RepViT(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, global_pool=global_pool)
