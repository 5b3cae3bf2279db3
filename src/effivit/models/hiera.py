"""Hiera (arXiv:2306.00989): a hierarchical vision transformer without the bells and whistles.

A 7x7 stride-4 patch embedding plus a learned absolute position table, then plain pre-norm transformer blocks
in four stages. Stage transitions pool 2x2 tokens (max) in the shortcut projection and in the attention
queries; the first two stages (and the first, pooling block of the third) attend within 8x8-token *mask
units*, the rest globally. Tokens are *unrolled* once after the embedding: their order puts the finest 2x2
offsets first, so each 2x2 max-pool is a view + ``amax`` over a leading axis and each mask unit is a strided
slice of the tokens; feature maps for necks are *rerolled* back to raster order.

Parameter names follow timm's ``hiera_*_224`` (``patch_embed.proj``, ``pos_embed``, ``blocks.<i>.{norm1,
proj, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``head.norm``, ``head.fc``), so timm's checkpoints
load unchanged and logits equal timm's. How this differs from timm's implementation:

* Attention is the shared ``layers.attention.Attention`` (``qkv_heads`` -> query pooling -> ``attend`` ->
  ``project``); mask-unit attention folds the units into the batch dimension first, so SDPA sees 4-D inputs.
* Unroll and reroll are two small functions of the actual grid (read from the input, no tables or dicts built
  for one resolution): the model scripts with TorchScript (timm's does not), traces with FX and exports to
  ONNX through the same code.
* Any input whose sides are multiples of 32 (patch stride 4 x mask unit 8 tokens: mask units and the three
  2x2 query strides must tile the token grid); other sizes raise a ``ValueError`` naming H, W and that rule.
  The position table is resampled bicubically (timm's ``resample_abs_pos_embed``) when the token grid differs
  from the one it was built for, and ``checkpoint_filter`` resamples a checkpoint's table to the model's grid
  (``create_model(name, img_size=..., pretrained=...)``); timm's Hiera runs only at its ``img_size``.
* Not implemented: MAE masking (``mask=`` / ``patch_drop_rate``), the separate spatio-temporal and
  "abswin" position embeddings and layer scale, none of which the five ``hiera_*_224`` variants use.
* Nothing folds at deploy time: there is no BatchNorm, and folding a LayerNorm's affine into the Linear after
  it saves no work (the normalisation itself remains), so ``deploy.fuse`` only drops the drop-path modules.
"""

import math
from dataclasses import dataclass
from typing import Any, Final

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers import DropPath, Mlp
from ..layers.attention import Attention
from ..layers.classifier import POOL_TYPES, NormMlpClassifierHead
from ..layers.drop import drop_path_rates
from ..layers.pos_embed import resample_abs_pos_embed, square_grid
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, check_input, checkpoint_seq, resolve_indices

NORM_EPS = 1e-6
NUM_STAGES = 4


@dataclass(frozen=True)
class HieraConfig:
    """One Hiera variant. ``depths``: blocks per stage; width and heads double at each stage transition."""

    embed_dim: int
    num_heads: int
    depths: tuple[int, int, int, int]
    mlp_ratio: float = 4.0
    # Which stages attend within mask units (the rest attend globally).
    mask_unit_attn: tuple[bool, bool, bool, bool] = (True, True, False, False)
    # Query/shortcut pooling stride per axis at every stage transition.
    q_stride: int = 2
    # Side of a mask unit in tokens at the first stage: q_stride ** 3, so the transitions consume it exactly.
    mask_unit_size: int = 8
    patch_kernel: int = 7
    patch_stride: int = 4
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.embed_dim, int) or self.embed_dim < 1:
            raise ValueError(f"embed_dim must be a positive int, got {self.embed_dim!r}")
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads must be a positive int dividing embed_dim={self.embed_dim}, "
                             f"got {self.num_heads!r}")
        if len(self.depths) != NUM_STAGES or any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ValueError(f"depths must be {NUM_STAGES} positive ints, got {self.depths!r}")
        if len(self.mask_unit_attn) != NUM_STAGES:
            raise ValueError(f"mask_unit_attn must have {NUM_STAGES} entries, got {self.mask_unit_attn!r}")
        if not isinstance(self.q_stride, int) or self.q_stride < 2:
            raise ValueError(f"q_stride must be an int >= 2, got {self.q_stride!r}")
        if self.mask_unit_size != self.q_stride ** (NUM_STAGES - 1):
            raise ValueError(f"mask_unit_size must be q_stride ** {NUM_STAGES - 1} = "
                             f"{self.q_stride ** (NUM_STAGES - 1)} (the transitions pool a mask unit to one "
                             f"token), got {self.mask_unit_size!r}")
        if self.patch_kernel < 1 or self.patch_kernel % 2 == 0 or self.patch_stride < 1:
            raise ValueError(f"patch_kernel must be a positive odd int and patch_stride positive, got "
                             f"{self.patch_kernel!r}, {self.patch_stride!r}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate!r}")

    @property
    def size_divisor(self) -> int:
        """Input sides must be multiples of this: the patch stride times the mask unit's side in tokens."""
        return self.patch_stride * self.mask_unit_size


VARIANTS = {
    "hiera_tiny_224": HieraConfig(embed_dim=96, num_heads=1, depths=(1, 2, 7, 2)),
    "hiera_small_224": HieraConfig(embed_dim=96, num_heads=1, depths=(1, 2, 11, 2)),
    "hiera_base_224": HieraConfig(embed_dim=96, num_heads=1, depths=(2, 3, 16, 3)),
    "hiera_base_plus_224": HieraConfig(embed_dim=112, num_heads=2, depths=(2, 3, 16, 3)),
    "hiera_large_224": HieraConfig(embed_dim=144, num_heads=2, depths=(2, 6, 36, 4)),
}

SIZE_DIVISOR = 32
if any(cfg.size_divisor != SIZE_DIVISOR for cfg in VARIANTS.values()):
    raise ValueError("every registered Hiera variant must share the size rule declared in DEFAULTS")

DEFAULTS = FamilyDefaults(
    family="hiera",
    crop_pct=0.9,
    first_conv="patch_embed.proj",
    classifier="head.fc",
    size_divisor=SIZE_DIVISOR,
    paper="Hiera: A Hierarchical Vision Transformer without the Bells-and-Whistles (arXiv:2306.00989)",
)


# ---- input rule, position table, unroll / reroll ---------------------------------------------------------
def check_hiera_input(x: torch.Tensor, in_chans: int, patch_stride: int, mask_unit_size: int) -> torch.Tensor:
    """The generic checks (rank, channels, dtype), then Hiera's size rule, naming H, W and the rule."""
    x = check_input(x, in_chans, 1, 1)
    h, w = x.shape[2], x.shape[3]
    divisor = patch_stride * mask_unit_size
    if h % divisor != 0 or w % divisor != 0 or h < divisor or w < divisor:
        raise ValueError(
            f"input size H={h}, W={w} is not allowed: Hiera needs H and W to be positive multiples of "
            f"{divisor}, so at least {divisor} (patch stride {patch_stride} x mask unit {mask_unit_size} tokens: "
            f"the mask units and the query strides of the stage transitions must tile the token grid)"
        )
    return x


# Reads the input's shape: FX records one call that runs (and checks) at run time.
torch.fx.wrap("check_hiera_input")


def grid_pos_embed(pos_embed: torch.Tensor, x: torch.Tensor, table_h: int, table_w: int) -> torch.Tensor:
    """The (1, table_h * table_w, C) table for the grid of ``x`` (B, H, W, C), as (1, H, W, C): the table
    itself at its own grid, else resampled bicubically (anti-aliased when shrinking), as timm resamples."""
    h, w = x.shape[1], x.shape[2]
    table = resample_abs_pos_embed(pos_embed, h, w, table_h, table_w)
    return table.reshape(1, h, w, table.shape[-1])


torch.fx.wrap("grid_pos_embed")
torch.fx.wrap("resample_abs_pos_embed")


def unroll(x: torch.Tensor, levels: int, stride: int) -> torch.Tensor:
    """(B, H, W, C) map -> (B, H * W, C) tokens in Hiera's unrolled order.

    Each level moves the ``stride x stride`` offsets of the current grid in front of it (into the batch),
    finest first: after ``levels`` levels a token's index reads (sy1, sx1, ..., syL, sxL, h, w) with the
    pixel row ``h * s^L + ... + sy2 * s + sy1``. A ``stride x stride`` max-pool is then ``amax`` over the
    leading s*s blocks, and the s^L x s^L mask unit of token (h, w) is every (H/s^L * W/s^L)-th token.
    """
    b, h, w, c = x.shape
    for _ in range(levels):
        h = h // stride
        w = w // stride
        # B', H/s, s, W/s, s, C -> B', s, s, H/s, W/s, C -> (B' s s), H/s, W/s, C
        x = x.reshape(-1, h, stride, w, stride, c).permute(0, 2, 4, 1, 3, 5).reshape(-1, h, w, c)
    return x.reshape(b, -1, c)


def reroll(x: torch.Tensor, levels: int, stride: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Inverse of :func:`unroll` for tokens (B, N, C) with ``levels`` unroll levels left and a (grid_h, grid_w)
    grid of mask units: -> (B, grid_h * s^levels, grid_w * s^levels, C) in raster order."""
    b, _, c = x.shape
    h, w = grid_h, grid_w
    x = x.reshape(-1, h, w, c)
    for _ in range(levels):
        # (B' s s), h, w, C -> B', h, s, w, s, C -> B', h*s, w*s, C (the last level unrolled is undone first)
        x = x.reshape(-1, stride, stride, h, w, c).permute(0, 3, 1, 4, 2, 5)
        h = h * stride
        w = w * stride
        x = x.reshape(-1, h, w, c)
    return x.reshape(b, h, w, c)


def pool_tokens(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """(B, N, C) -> (B, C): average or max over the tokens; ``''`` keeps them."""
    if pool_type == "avg":
        return x.mean(1)
    if pool_type == "max":
        return x.amax(1)
    return x


# ---- blocks -------------------------------------------------------------------------------------------
class MaskUnitAttention(Attention):
    """Attention within mask units (or over all tokens), optionally pooling the queries.

    ``q_stride``: tokens pooled into one query (s*s, flattened); ``window_size``: tokens of a mask unit after
    pooling. The shared ``Attention``'s projections (``qkv``, ``proj``) with timm's key names; the output has
    ``dim_out`` channels and ``N / q_stride`` tokens, in the same unrolled order.
    """

    use_mask_unit_attn: Final[bool]
    q_stride: Final[int]
    window_size: Final[int]

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_stride: int = 1, window_size: int = 0,
                 use_mask_unit_attn: bool = False) -> None:
        if dim_out % num_heads:
            raise ValueError(f"dim_out={dim_out} must be divisible by num_heads={num_heads}")
        super().__init__(dim, num_heads, dim_out=dim_out, head_dim=dim_out // num_heads)
        self.q_stride = q_stride
        self.window_size = window_size
        self.use_mask_unit_attn = use_mask_unit_attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, _, c = x.shape
        tokens = self.q_stride * self.window_size  # per mask unit, before pooling
        if self.use_mask_unit_attn:
            # Token n = t * units + u (t: position inside the unit, u: the unit): one unit per batch row.
            # B*units, T, C. contiguous(): for B = 1 the reshape is a strided view, and a Linear on a 3-D input
            # it cannot flatten runs as a batched matmul with a copy of the weight per unit (3x slower here).
            x = x.reshape(b, tokens, -1, c).transpose(1, 2).reshape(-1, tokens, c).contiguous()
        q, k, v = self.qkv_heads(x)  # each B', heads, T, head_dim
        if self.q_stride > 1:
            # The pooled offsets lead the token index (see ``unroll``): a max over that axis is the max-pool.
            q = q.reshape(q.shape[0], self.num_heads, self.q_stride, -1, self.head_dim).amax(2)
        x = self.project(self.attend(q, k, v))  # B', T / q_stride, dim_out
        if self.use_mask_unit_attn:
            x = x.reshape(b, -1, x.shape[1], x.shape[2]).transpose(1, 2).reshape(b, -1, x.shape[2])
        return x


class HieraBlock(nn.Module):
    """Pre-norm block; a stage's first block widens (``proj``) and max-pools the shortcut as the attention
    pools its queries."""

    q_stride: Final[int]

    def __init__(self, dim: int, dim_out: int, num_heads: int, mlp_ratio: float = 4.0, q_stride: int = 1,
                 window_size: int = 0, use_mask_unit_attn: bool = False, drop_path: float = 0.0) -> None:
        super().__init__()
        self.q_stride = q_stride
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.attn = MaskUnitAttention(dim, dim_out, num_heads, q_stride, window_size, use_mask_unit_attn)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim_out, eps=NORM_EPS)
        self.mlp = Mlp(dim_out, int(dim_out * mlp_ratio))
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_norm = self.norm1(x)
        if self.proj is not None:
            x = self.proj(x_norm)
            x = x.reshape(x.shape[0], self.q_stride, -1, x.shape[-1]).amax(1)  # 2x2 max-pool (unrolled order)
        x = x + self.drop_path1(self.attn(x_norm))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Overlapping conv patch embedding (timm name ``patch_embed.proj``): (B, C, H, W) -> (B, H/s, W/s, D)."""

    def __init__(self, in_chans: int, embed_dim: int, kernel: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


# ---- model --------------------------------------------------------------------------------------------
def _img_hw(img_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        return img_size, img_size
    if isinstance(img_size, (tuple, list)) and len(img_size) == 2 and all(isinstance(v, int) for v in img_size):
        return int(img_size[0]), int(img_size[1])
    raise ValueError(f"img_size must be an int or a pair of ints (H, W), got {img_size!r}")


class Hiera(Backbone):
    """Hiera classifier/backbone. ``forward_features`` returns timm's (B, N, C) tokens of the last stage (in
    raster order: the transitions have consumed every unroll level); ``forward_intermediates`` gives NCHW
    maps after each stage (or block, ``coarse=False``)."""

    checkpoint_filter = None  # set below
    final_module_names: tuple[str, ...] = ()  # the final norm is the head's (pool -> norm -> fc)

    levels: Final[int]
    stride: Final[int]
    mask_unit_size: Final[int]
    patch_stride: Final[int]

    def __init__(self, cfg: HieraConfig, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int | tuple[int, int] = 224, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, cfg.size_divisor)
        h, w = _img_hw(img_size)
        if h % cfg.size_divisor or w % cfg.size_divisor or h < 1 or w < 1:
            raise ValueError(f"img_size H={h}, W={w} is not allowed: Hiera needs H and W to be positive "
                             f"multiples of {cfg.size_divisor} (patch stride {cfg.patch_stride} x mask unit "
                             f"{cfg.mask_unit_size} tokens)")
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {POOL_TYPES}")
        dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        if not 0.0 <= dpr_total < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr_total}")
        self.cfg = cfg
        self.levels = NUM_STAGES - 1  # unroll levels; each stage transition consumes one
        self.stride = cfg.q_stride
        self.mask_unit_size = cfg.mask_unit_size
        self.patch_stride = cfg.patch_stride
        # The grid the position table is laid out for (timm sizes it from img_size).
        self.pos_grid = (h // cfg.patch_stride, w // cfg.patch_stride)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.pos_grid[0] * self.pos_grid[1], cfg.embed_dim))
        self.patch_embed = PatchEmbed(in_chans, cfg.embed_dim, cfg.patch_kernel, cfg.patch_stride)

        flat_stride = cfg.q_stride ** 2
        window = cfg.mask_unit_size ** 2  # tokens per mask unit at the current stage
        dpr = [r for stage in drop_path_rates(dpr_total, cfg.depths) for r in stage]
        dim, heads = cfg.embed_dim, cfg.num_heads
        blocks: list[nn.Module] = []
        self.stage_ends = [sum(cfg.depths[: i + 1]) - 1 for i in range(NUM_STAGES)]
        self.block_stage = [s for s, d in enumerate(cfg.depths) for _ in range(d)]
        for i in range(sum(cfg.depths)):
            stage = self.block_stage[i]
            first = i > 0 and i - 1 in self.stage_ends
            # A stage's first block pools and still attends as the stage before did (timm: "lag by 1 block",
            # so global attention starts after the pooling).
            use_mu = cfg.mask_unit_attn[stage - 1] if first else cfg.mask_unit_attn[stage]
            dim_out, q_stride = dim, 1
            if first:
                dim_out, heads, q_stride = dim * 2, heads * 2, flat_stride
                window //= flat_stride
            blocks.append(HieraBlock(dim, dim_out, heads, cfg.mlp_ratio, q_stride, window, use_mu, dpr[i]))
            dim = dim_out
            if i in self.stage_ends:
                self.feature_info.append(dict(num_chs=dim, reduction=cfg.patch_stride * cfg.q_stride ** stage,
                                              module=f"blocks.{i}"))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = dim
        self.head = NormMlpClassifierHead(dim, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_eps=NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's init: truncated-normal Linears, the residual projections scaled down with depth, a small head.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                block.attn.proj.weight.div_(math.sqrt(2.0 * (i + 1)))
                block.mlp.fc2.weight.div_(math.sqrt(2.0 * (i + 1)))
            if isinstance(self.head.fc, nn.Linear):
                self.head.fc.weight.mul_(1e-3)

    # ---- timm surface ----------------------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> torch.Tensor:
        x = check_hiera_input(x, self.in_chans, self.patch_stride, self.mask_unit_size)
        if not torch.jit.is_scripting():
            x = self._check_dtype(x)  # the model's dtype outside autocast (Backbone)
        return x

    @torch.jit.ignore
    def _stem_names(self) -> list[str]:
        return ["patch_embed"]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's grouping for layer-wise LR decay: embedding and position table first, then block by block
        (timm's Hiera groups by block with ``coarse`` too); the head is the last group."""
        return dict(stem=r"^(?:pos_embed|patch_embed)", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0: pooled features), on the model's device and dtype."""
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {POOL_TYPES}")
            self.head.pool_type = global_pool
        self.num_classes = num_classes
        ref = self.pos_embed
        self.head.fc = (nn.Linear(self.head.num_features, num_classes).to(ref.device, ref.dtype)
                        if num_classes > 0 else nn.Identity())

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
        coarse: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last feature taken; with ``prune_head`` (or when blocks were dropped) the
        head keeps only its pooling (norm and classifier go, as timm's ``reset_other``). ``prune_norm`` has
        nothing else to remove (the final norm is the head's). Returns the indices taken."""
        take = resolve_indices(indices, len(self.stage_ends) if coarse else len(self.blocks))
        last = self.stage_ends[max(take)] if coarse else max(take)
        pruned_end = last < len(self.blocks) - 1
        self.blocks = self.blocks[: last + 1]
        self.feature_info = [f for f, end in zip(self.feature_info, self.stage_ends) if end <= last]
        if pruned_end:
            self.num_features = self.head_hidden_size = self.blocks[-1].mlp.fc2.out_features
        if prune_head or pruned_end:
            head = NormMlpClassifierHead(self.num_features, 0, pool_type=self.head.pool_type, norm_eps=NORM_EPS)
            head.norm = nn.Identity()
            ref = self.pos_embed
            self.head = head.to(ref.device, ref.dtype)
            self.num_classes = 0
        return take

    # ---- forward -----------------------------------------------------------------------------------------
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        """Image -> position-embedded tokens (B, N, C) in unrolled order."""
        x = self.patch_embed(x)  # B, H/4, W/4, C
        x = x + grid_pos_embed(self.pos_embed, x, self.pos_grid[0], self.pos_grid[1])
        return unroll(x, self.levels, self.stride)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        x = self.forward_stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(pool_tokens(x, self.head.pool_type), pre_logits=pre_logits)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = True,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        coarse: bool = True,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's Hiera semantics: maps after the chosen stages (``coarse``) or blocks, rerolled to raster
        order, NCHW or NHWC; ``norm`` is not supported (the final norm belongs to the head)."""
        if norm:
            raise ValueError("norm=True is not supported: Hiera's final norm is part of its head (as in timm)")
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: 'NCHW', 'NHWC'")
        x = self.check_input(x)
        if coarse:
            take = [self.stage_ends[i] for i in resolve_indices(indices, len(self.feature_info))]
        else:
            take = resolve_indices(indices, len(self.blocks))
        grid_h = x.shape[2] // (self.patch_stride * self.mask_unit_size)
        grid_w = x.shape[3] // (self.patch_stride * self.mask_unit_size)
        x = self.forward_stem(x)
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        intermediates = []
        for i, block in enumerate(blocks):
            if self.grad_checkpointing:
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if i in take:
                y = reroll(x, self.levels - self.block_stage[i], self.stride, grid_h, grid_w)
                intermediates.append(y.permute(0, 3, 1, 2) if output_fmt == "NCHW" else y)
        if intermediates_only:
            return intermediates
        return x, intermediates


def checkpoint_filter(state: dict[str, torch.Tensor], model: Hiera) -> dict[str, torch.Tensor]:
    """timm's checkpoints load as they are; the official ones (weights under ``model_state``, which
    ``load_checkpoint`` unwraps; ``head.projection``, ``encoder_norm``/``norm``, ``pos_embed_abs``) are renamed
    to timm's keys, as timm's filter does. A position table for another (square) grid is resampled to the
    model's grid."""
    out = {}
    for k, v in state.items():
        if k.startswith("head.projection."):
            k = "head.fc." + k[len("head.projection."):]
        elif k.startswith("encoder_norm."):
            k = "head.norm." + k[len("encoder_norm."):]
        elif k.startswith("norm."):
            k = "head.norm." + k[len("norm."):]
        elif k == "pos_embed_abs":
            k = "pos_embed"
        if k == "pos_embed" and v.dim() == 3 and tuple(v.shape) != tuple(model.pos_embed.shape):
            if v.shape[-1] == model.pos_embed.shape[-1]:
                old_h, old_w = square_grid(v.shape[1])
                v = resample_abs_pos_embed(v, model.pos_grid[0], model.pos_grid[1], old_h, old_w)
        out[k] = v
    return out


Hiera.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_hiera(cfg: HieraConfig, num_classes: int = 1000, in_chans: int = 3,
                img_size: int | tuple[int, int] = 224, drop_rate: float = 0.0,
                drop_path_rate: float | None = None, global_pool: str = "avg") -> Hiera:
    return Hiera(cfg, num_classes=num_classes, in_chans=in_chans, img_size=img_size, drop_rate=drop_rate,
                 drop_path_rate=drop_path_rate, global_pool=global_pool)
