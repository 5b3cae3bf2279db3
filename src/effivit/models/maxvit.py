"""MaxViT: Multi-Axis Vision Transformer (Tu et al., ECCV 2022, arXiv:2204.01697), the released
TensorFlow-trained models ``maxvit_{tiny,small,base,large}_tf_224``.

A two-conv stem (stride 2) then four stages (stride 2 each) of MaxViT blocks. One block is

* **MBConv**: pre-BatchNorm, 1x1 expansion (4x the output width), 3x3 depth-wise conv (carries the stage's
  stride), squeeze-excite, 1x1 projection, residual (the first block of a stage shortcuts through a 2x2
  average pool and, when the width changes, a 1x1 conv);
* **block attention**: ``x + Attn(LN(x))`` inside non-overlapping P x P windows, then ``x + MLP(LN(x))``;
* **grid attention**: the same over groups of P x P tokens spread over the whole map (``layers/partition.py``).

Attention adds a learned relative-position bias per head (``layers/rel_pos_bias.py``). P is the input size
over 32 (7 at 224): the last stage's map is one window. Window and grid attention run through the shared
``layers.attention.Attention`` with the windows folded into the batch dimension.

**Input sizes.** A model built for ``img_size`` (H0, W0) (224 by default; ``create_model(..., img_size=...)``
as in timm, which sets P = img_size / 32) takes inputs whose H and W are positive multiples of H0 and W0:
exactly the sizes for which every stage's map splits into whole P x P windows and grid cells (stride 32 x P).
Other sizes raise a ``ValueError`` naming H, W and the rule. ``img_size`` itself must be a multiple of 32.

Parameter names and numbers follow timm's ``maxxvit.py`` (which carries the official weights), so its
checkpoints load unchanged. How this differs from timm:

* Only the published MaxViT configuration (timm's file also builds CoAtNet/MaxxViT variants).
* TensorFlow's "SAME" padding of the stride-2 3x3 convs (none before, one row/column after) runs as a 4x4
  kernel with a leading zero row/column and symmetric padding 1 (``SameConv2d``): exact for every accepted
  size (all stride-2 inputs are even), no padded copy of the map, static for export (timm pads the map).
* Maps are stored channels_last from the stem on, so the (B, H, W, C) tokens of the attention blocks are
  views of the MBConv output (timm: NCHW until the first attention block).
* The relative-position bias is gathered with one integer index (timm: two einsums against one-hot buffers)
  and cached in eval (``layers/attn_bias.py`` rules); same numbers, bit for bit.
* A checkpoint whose bias tables were trained for another window is resampled bicubically by
  ``checkpoint_filter`` (timm uses BEiT's geometric-progression interpolation there).
* ``deploy.fuse`` folds every MBConv BatchNorm: the pre-norm and ``norm1`` into the 1x1 expansion, ``norm2``
  into the depth-wise conv, the stem's norm into its first conv (no BatchNorm is left).
* ``forward_intermediates`` / ``features_only`` count the stem as feature 0, as timm does (5 maps: strides 2,
  4, 8, 16, 32).
* Random initialisation (training from scratch only; checkpoints replace it): convs are drawn with std
  ``1/sqrt(fan_in)``, which keeps each MBConv branch's output at its input's scale. The reference's
  EfficientNet-style fan-out init assumes a normalising BatchNorm after every conv; before the statistics are
  learned (eval mode) MaxViT-B's residual stream grows from ~6 after stage 1 to ~8000 after stage 4, and fp32
  rounding reaches 1e-4..7e-4 in O(1) logits. With this init the stream stays below ~30 and fp32 rounding
  below 1e-6, so fused and exported forms can be checked at 1e-4 on random weights.
"""

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.fold import bn_scale_shift, fold_affine_into_input, fuse_conv_bn
from ..layers import DropPath, Mlp, SqueezeExcite, make_divisible
from ..layers.attention import Attention
from ..layers.classifier import NormMlpClassifierHead
from ..layers.drop import drop_path_rates
from ..layers.partition import grid_partition, grid_reverse, window_partition, window_reverse
from ..layers.rel_pos_bias import RelPosBias, resample_relative_table
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, Stage, check_input, resolve_indices

# TensorFlow's BatchNorm epsilon (conv blocks and stem) and the transformer LayerNorm epsilon of the weights.
CONV_NORM_EPS = 1e-3
NORM_EPS = 1e-5
# Total stride of the network: the partition size is img_size / STRIDE.
STRIDE = 32


def _gelu() -> nn.Module:
    # The TensorFlow models use the tanh approximation of GELU everywhere.
    return nn.GELU(approximate="tanh")


@dataclass(frozen=True)
class MaxViTConfig:
    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    stem_width: int = 64
    # Width of the head's pre-logits layer (Linear + tanh); None: no pre-logits layer.
    head_hidden_size: int | None = None
    dim_head: int = 32
    # MBConv hidden width = conv_expand_ratio * the block's output width; SE width = se_ratio * output width.
    conv_expand_ratio: float = 4.0
    se_ratio: float = 0.25
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ValueError(f"depths must be 4 positive ints, got {self.depths}")
        if len(self.embed_dims) != 4 or any(not isinstance(d, int) or d < 1 for d in self.embed_dims):
            raise ValueError(f"embed_dims must be 4 positive ints, got {self.embed_dims}")
        if not isinstance(self.dim_head, int) or self.dim_head < 1:
            raise ValueError(f"dim_head must be a positive int, got {self.dim_head}")
        bad = [d for d in self.embed_dims if d % self.dim_head]
        if bad:
            raise ValueError(f"every embed_dims entry must be a multiple of dim_head={self.dim_head}; got {bad}")
        if not isinstance(self.stem_width, int) or self.stem_width < 1:
            raise ValueError(f"stem_width must be a positive int, got {self.stem_width}")
        if self.head_hidden_size is not None and self.head_hidden_size < 1:
            raise ValueError(f"head_hidden_size must be None or a positive int, got {self.head_hidden_size}")
        for field in ("conv_expand_ratio", "se_ratio", "mlp_ratio"):
            if not getattr(self, field) > 0:
                raise ValueError(f"{field} must be > 0, got {getattr(self, field)}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


VARIANTS = {
    "maxvit_tiny_tf_224": MaxViTConfig(embed_dims=(64, 128, 256, 512), depths=(2, 2, 5, 2), stem_width=64,
                                       head_hidden_size=512),
    "maxvit_small_tf_224": MaxViTConfig(embed_dims=(96, 192, 384, 768), depths=(2, 2, 5, 2), stem_width=64,
                                        head_hidden_size=768),
    "maxvit_base_tf_224": MaxViTConfig(embed_dims=(96, 192, 384, 768), depths=(2, 6, 14, 2), stem_width=64,
                                       head_hidden_size=768),
    "maxvit_large_tf_224": MaxViTConfig(embed_dims=(128, 256, 512, 1024), depths=(2, 6, 14, 2), stem_width=128,
                                        head_hidden_size=1024),
}

DEFAULTS = FamilyDefaults(
    family="maxvit",
    crop_pct=0.95,
    first_conv="stem.conv1",
    classifier="head.fc",
    # 32 (total stride) x the 7x7 partition at 224: every stage's map splits into whole windows/grid cells.
    # A model built with img_size=(H0, W0) takes multiples of H0 and W0 (see the module docstring).
    size_divisor=224,
    paper="MaxViT: Multi-Axis Vision Transformer (arXiv:2204.01697)",
)


# ---- convolutional parts ------------------------------------------------------------------------------


class SameConv2d(nn.Conv2d):
    """A conv with TensorFlow's "SAME" padding for maps whose size is a multiple of the stride: ``k - s`` zeros
    per axis, the odd one at the end (bottom/right). Parameter names are ``nn.Conv2d``'s.

    Padding (p, p + 1) is computed without padding the map: the kernel gets one leading zero row and column
    and the conv pads p + 1 on both sides. Output ``r`` then reads rows ``s*r - p - 1 .. s*r - p - 1 + k``:
    the first meets the zero weight, the other k are TensorFlow's window (``s*r - p ..``), ending at most in
    the one zero row TensorFlow adds at the bottom. The same numbers (bit for bit in our tests), no copy of
    the map (``F.pad`` of a 256x112x112 map cost more than the depth-wise conv itself on CPU), and the fused
    form is one plain ``nn.Conv2d`` (one ONNX ``Conv``).
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 bias: bool = False) -> None:
        total = max(kernel_size - stride, 0)
        before, after = total // 2, total - total // 2
        super().__init__(in_chs, out_chs, kernel_size, stride, padding=after, groups=groups, bias=bias)
        self.asymmetric = before != after

    def extended_weight(self) -> torch.Tensor:
        """The kernel the conv runs: one leading zero row and column when the padding is asymmetric."""
        if self.asymmetric:
            return F.pad(self.weight, [1, 0, 1, 0])
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.extended_weight(), self.bias)

    def fuse(self) -> nn.Module:
        """A plain ``nn.Conv2d`` with the extended kernel (same function)."""
        w = self.extended_weight().detach()
        conv = nn.Conv2d(self.in_channels, self.out_channels, w.shape[-1], self.stride, self.padding,
                         groups=self.groups, bias=self.bias is not None).to(w)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class Stem(nn.Module):
    """3x3 stride-2 conv -> BatchNorm -> GELU -> 3x3 conv (timm names ``conv1``, ``norm1``, ``conv2``)."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv1 = SameConv2d(in_chs, out_chs, 3, stride=2, bias=True)
        self.norm1 = nn.BatchNorm2d(out_chs, eps=CONV_NORM_EPS)
        self.act1 = _gelu()
        self.conv2 = SameConv2d(out_chs, out_chs, 3, stride=1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Maps are stored channels_last from here on: the attention blocks read every map as (B, H, W, C)
        # tokens, which is then a view rather than a copy (and depth-wise convs run several times faster on
        # CPU in that layout). Values are unchanged.
        x = x.contiguous(memory_format=torch.channels_last)
        return self.conv2(self.act1(self.norm1(self.conv1(x))))

    def fuse(self) -> nn.Module:
        if isinstance(self.norm1, nn.BatchNorm2d):
            self.conv1 = fuse_conv_bn(self.conv1, self.norm1)  # conv1 is a plain Conv2d already (fused first)
            self.norm1 = nn.Identity()
        return self


class Downsample(nn.Module):
    """The shortcut of a stage's first block: 2x2 average pool, then a 1x1 conv when the width changes."""

    def __init__(self, in_chs: int, out_chs: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(2)
        self.expand = nn.Conv2d(in_chs, out_chs, 1) if in_chs != out_chs else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.pool(x))


class MBConvBlock(nn.Module):
    """``shortcut(x) + drop_path(conv3(se(act(bn2(dwconv(act(bn1(conv1(bn0(x))))))))))`` (timm's ``MbConvBlock``
    with the TensorFlow configuration; names ``pre_norm``, ``conv1_1x1``, ``norm1``, ``conv2_kxk``, ``norm2``,
    ``se``, ``conv3_1x1``). ``fuse`` folds the three BatchNorms into the two convs around them."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, se_ratio: float,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"MBConvBlock stride must be 1 or 2, got {stride}")
        if stride == 1 and in_chs != out_chs:
            raise ValueError(f"a stride-1 MBConvBlock keeps its width; got in_chs={in_chs}, out_chs={out_chs}")
        mid = make_divisible(out_chs * expand_ratio)
        self.shortcut = Downsample(in_chs, out_chs) if stride == 2 else nn.Identity()
        self.pre_norm = nn.BatchNorm2d(in_chs, eps=CONV_NORM_EPS)
        self.conv1_1x1 = nn.Conv2d(in_chs, mid, 1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid, eps=CONV_NORM_EPS)
        self.act1 = _gelu()
        self.conv2_kxk = SameConv2d(mid, mid, 3, stride=stride, groups=mid)
        self.norm2 = nn.BatchNorm2d(mid, eps=CONV_NORM_EPS)
        self.act2 = _gelu()
        self.se = SqueezeExcite(mid, rd_channels=int(se_ratio * out_chs), act_layer=nn.SiLU)
        self.conv3_1x1 = nn.Conv2d(mid, out_chs, 1)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.shortcut(x)
        x = self.act1(self.norm1(self.conv1_1x1(self.pre_norm(x))))
        x = self.act2(self.norm2(self.conv2_kxk(x)))
        x = self.conv3_1x1(self.se(x))
        return self.drop_path(x) + shortcut

    def fuse(self) -> nn.Module:
        # bn1(conv1(bn0(x))): bn0 is a per-channel affine map before a 1x1 unpadded conv (folds into its
        # input side), bn1 folds into its output side; bn2 folds into the depth-wise conv.
        conv1 = fold_affine_into_input(self.conv1_1x1, *bn_scale_shift(self.pre_norm))
        conv1 = fuse_conv_bn(conv1, self.norm1)
        conv2 = fuse_conv_bn(self.conv2_kxk, self.norm2)  # a plain Conv2d already (children fuse first)
        return FusedMBConvBlock(self.shortcut, conv1, conv2, self.se, self.conv3_1x1)


class FusedMBConvBlock(nn.Module):
    """Inference form of :class:`MBConvBlock`: ``shortcut(x) + conv3(se(gelu(dwconv(gelu(conv1(x))))))``, no
    BatchNorm left (drop path is the identity in inference)."""

    def __init__(self, shortcut: nn.Module, conv1: nn.Module, conv2: nn.Module, se: nn.Module,
                 conv3: nn.Module) -> None:
        super().__init__()
        self.shortcut = shortcut
        self.conv1 = conv1
        self.act1 = _gelu()
        self.conv2 = conv2
        self.act2 = _gelu()
        self.se = se
        self.conv3 = conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.act2(self.conv2(self.act1(self.conv1(x)))))) + self.shortcut(x)


# ---- attention parts ----------------------------------------------------------------------------------


class RelPosAttention(Attention):
    """The shared :class:`~effivit.layers.attention.Attention` over (B * groups, P*P, C) partition tokens, with
    a learned relative-position bias of the P x P partition added to the logits (``rel_pos``)."""

    def __init__(self, dim: int, dim_head: int, partition: tuple[int, int], attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__(dim, dim // dim_head, qkv_bias=True, attn_drop=attn_drop, proj_drop=proj_drop)
        self.rel_pos = RelPosBias(partition, self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_heads(x)
        # (1, heads, N, N) in the queries' dtype (bf16 autocast), broadcast over the partitions. 4-D on purpose:
        # with a 3-D mask SDPA's CPU dispatch falls back to its math kernel (about 3x slower here).
        bias = self.rel_pos().to(q.dtype).unsqueeze(0)
        return self.project(self.attend(q, k, v, bias))


class PartitionAttention(nn.Module):
    """``x + Attn(LN(x))`` within window (or grid) partitions, then ``x + MLP(LN(x))``, on (B, H, W, C) tokens.

    ``grid=False``: P x P windows (block attention); ``grid=True``: groups of P x P tokens spaced H/P rows and
    W/P columns apart (grid attention). Names follow timm's ``PartitionAttentionCl``.
    """

    def __init__(self, dim: int, grid: bool, partition: tuple[int, int], dim_head: int, mlp_ratio: float,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.grid = grid
        self.ph, self.pw = int(partition[0]), int(partition[1])
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = RelPosAttention(dim, dim_head, (self.ph, self.pw))
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.drop_path2 = DropPath(drop_path)

    def partition_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1], x.shape[2]
        if self.grid:
            x = self.attn(grid_partition(x, self.ph, self.pw))  # B * groups, P*P, C
            return grid_reverse(x, self.ph, self.pw, h, w)
        x = self.attn(window_partition(x, self.ph, self.pw))
        return window_reverse(x, self.ph, self.pw, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.partition_attention(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaxViTBlock(nn.Module):
    """MBConv on the (B, C, H, W) map, then block and grid attention on its (B, H, W, C) tokens."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, partition: tuple[int, int], cfg: MaxViTConfig,
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv = MBConvBlock(in_chs, out_chs, stride, cfg.conv_expand_ratio, cfg.se_ratio, drop_path)
        self.attn_block = PartitionAttention(out_chs, False, partition, cfg.dim_head, cfg.mlp_ratio, drop_path)
        self.attn_grid = PartitionAttention(out_chs, True, partition, cfg.dim_head, cfg.mlp_ratio, drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).permute(0, 2, 3, 1)  # B, H, W, C
        x = self.attn_grid(self.attn_block(x))
        return x.permute(0, 3, 1, 2)  # B, C, H, W (stored channels_last)


# ---- the model ------------------------------------------------------------------------------------------


def check_partition_input(x: torch.Tensor, in_chans: int, divisor_h: int, divisor_w: int) -> torch.Tensor:
    """The generic input checks, then MaxViT's size rule: H a positive multiple of ``divisor_h`` and W of
    ``divisor_w`` (32 x the partition size per axis). Returns ``x``; FX records one call (it reads shapes)."""
    x = check_input(x, in_chans, 1)
    h, w = x.shape[2], x.shape[3]
    if h % divisor_h != 0 or w % divisor_w != 0 or h == 0 or w == 0:
        rule = (f"H and W must be positive multiples of {divisor_h}" if divisor_h == divisor_w
                else f"H must be a positive multiple of {divisor_h} and W of {divisor_w}")
        raise ValueError(
            f"input size H={h}, W={w} is not allowed: {rule} (32 x the model's "
            f"{divisor_h // 32}x{divisor_w // 32} window/grid partition, so that every stage's map "
            f"splits into whole partitions; build the model with img_size=... for another partition)"
        )
    return x


torch.fx.wrap("check_partition_input")


def _img_hw(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        h = w = img_size
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        h, w = int(img_size[0]), int(img_size[1])
    else:
        raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")
    if h < STRIDE or w < STRIDE or h % STRIDE or w % STRIDE:
        raise ValueError(f"img_size H={h}, W={w} is not allowed for MaxViT: H and W must be positive multiples "
                         f"of {STRIDE} (the window/grid partition is img_size / {STRIDE} per axis)")
    return h, w


class MaxViT(Backbone):
    """MaxViT (see the module docstring). ``img_size`` sets the partition size (img_size / 32 per axis)."""

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form

    def __init__(self, cfg: MaxViTConfig, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 224, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        ih, iw = _img_hw(img_size)
        super().__init__(in_chans, num_classes, size_divisor=ih, min_size=min(ih, iw))
        dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        if not 0.0 <= dpr_total < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr_total}")
        self.img_size = (ih, iw)
        self.partition_size = (ih // STRIDE, iw // STRIDE)
        self.size_divisor_hw = (ih, iw)
        self.stem = Stem(in_chans, cfg.stem_width)
        self.feature_info.append(dict(num_chs=cfg.stem_width, reduction=2, module="stem"))
        dpr = drop_path_rates(dpr_total, cfg.depths)
        stages = []
        in_chs, reduction = cfg.stem_width, 2
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.embed_dims)):
            blocks = [MaxViTBlock(in_chs if j == 0 else dim, dim, 2 if j == 0 else 1, self.partition_size, cfg,
                                  dpr[i][j]) for j in range(depth)]
            stages.append(Stage(blocks))
            in_chs, reduction = dim, reduction * 2
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()  # the released head normalises after pooling (head.norm)
        self.num_features = in_chs
        self.head = NormMlpClassifierHead(in_chs, num_classes, hidden_size=cfg.head_hidden_size,
                                          pool_type=global_pool, drop_rate=drop_rate, norm_eps=NORM_EPS)
        self.head_hidden_size = self.head.num_features
        self._init_weights()

    def _init_weights(self) -> None:
        # Transformer Linears Xavier-uniform as the reference; convs variance-preserving (normal, std
        # 1/sqrt(fan_in)) where the reference uses EfficientNet's fan-out init (see the module docstring).
        for name, m in self.named_modules():
            if name.startswith("head"):
                continue
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
                nn.init.normal_(m.weight, 0.0, math.sqrt(1.0 / fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = check_partition_input(x, self.in_chans, self.size_divisor_hw[0], self.size_divisor_hw[1])
        if not torch.jit.is_scripting():
            x = self._check_dtype(x)  # the model's dtype outside autocast (Backbone)
        return x

    # ---- features: the stem is feature 0, as in timm -----------------------------------------------------
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
        """Feature maps of the stem (index 0) and the stages (1..4), timm's signature and semantics."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: 'NCHW'")
        x = self.check_input(x)
        last = len(self.stages)
        take = resolve_indices(indices, last + 1)
        stages = self.stages[: max(take)] if stop_early else self.stages
        intermediates = []
        x = self.forward_stem(x)
        if 0 in take:
            intermediates.append(x)
        for i, stage in enumerate(stages, start=1):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == last else x)
        if intermediates_only:
            return intermediates
        if len(stages) == last:
            x = self.forward_final(x)
        return x, intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Keep what ``forward_intermediates(indices)`` needs (stem = 0); drop the rest (timm's contract)."""
        take = resolve_indices(indices, len(self.stages) + 1)
        keep = max(take)
        prune_end = keep < len(self.stages)
        self.stages = self.stages[:keep]
        self.feature_info = self.feature_info[: keep + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        if prune_head or prune_end:
            for name in self.head_module_names():
                setattr(self, name, nn.Identity())
            self.num_classes = 0
        return take


def checkpoint_filter(state: dict[str, torch.Tensor], model: MaxViT) -> dict[str, torch.Tensor]:
    """timm checkpoints load as they are; relative-position tables trained for another partition size (e.g.
    224 weights into a model built with img_size=384) are resampled to the model's (bicubic)."""
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if k.endswith("relative_position_bias_table") and k in own and v.dim() == 3 \
                and v.shape[0] == own[k].shape[0] and v.shape != own[k].shape:
            v = resample_relative_table(v, (own[k].shape[1] + 1) // 2, (own[k].shape[2] + 1) // 2)
        out[k] = v
    return out


MaxViT.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_maxvit(cfg: MaxViTConfig, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 224, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> MaxViT:
    return MaxViT(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                  drop_path_rate=drop_path_rate, global_pool=global_pool)


__all__ = ["MaxViT", "MaxViTConfig", "VARIANTS", "build_maxvit", "checkpoint_filter"]
