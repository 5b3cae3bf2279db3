"""DeiT (arXiv:2012.12877) and DeiT III (arXiv:2204.07118): the plain vision transformer, with the
distillation token.

A 16x16 patch embedding, a class token (distilled variants add a distillation token), a learned absolute
position table, pre-norm transformer blocks (one :class:`~effivit.layers.attention.Attention` and a GELU MLP;
DeiT III adds a layer scale on both branches), a final LayerNorm and a linear classifier on the class token
(distilled variants: a second classifier on the distillation token; eval averages both). DeiT III's prefix
tokens take no position (the table covers the patches only, timm's ``no_embed_class``).

Parameter names are timm's (``cls_token``, ``pos_embed``, ``dist_token``, ``patch_embed.proj``,
``blocks.<i>.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm``, ``head``,
``head_dist``), so timm's checkpoints, which carry the official weights, load unchanged; ``checkpoint_filter``
renames the original DeiT III files' ``gamma_1``/``gamma_2`` and resamples a position table of another grid.

How this differs from timm:

* Any input whose sides are multiples of the patch size runs, always (timm needs ``dynamic_img_size=True``):
  the position table is resampled for the input's grid (``layers/pos_embed.py``: bicubic, anti-aliased, the
  numbers timm computes); at the model's own grid it is used as it is. ``img_size=`` at creation sizes the
  table for that grid, as timm does, and a checkpoint of another grid is resampled on load.
* Distilled variants in training mode return the mean of both heads (timm's default) and the pair
  ``(logits, logits_dist)`` only after ``set_distilled_training(True)``, which the trainer sets when it
  distils. ``deploy.fuse`` turns both heads into one Linear on the concatenated class and distillation
  tokens (the mean of two affine maps of two inputs is one affine map of their concatenation), and folds
  DeiT III's layer scales into the projections before them.

The plain-ViT surface shared with EVA-02 (``models/eva.py``) lives here: :class:`VisionTransformer` (patch
embedding, prefix tokens, position table at any grid, blocks with an optional rotary table, pooling, timm's
``forward_intermediates`` over blocks, pruning and layer-decay grouping) and :class:`Block`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..deploy.fold import fold_affine_into_output
from ..layers.attention import Attention
from ..layers.drop import DropPath, drop_path_rates
from ..layers.mlp import Mlp
from ..layers.patch_embed import PatchEmbed
from ..layers.pos_embed import resample_abs_pos_embed, square_grid
from ..layers.scale import LayerScale
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, resolve_indices

# FX: the grid comes from the input's shape, so the resampling is one recorded call (wrapped under the name
# this module looks up).
torch.fx.wrap("resample_abs_pos_embed")

NORM_EPS = 1e-6
GLOBAL_POOLS = ("token", "avg", "")
OUTPUT_FORMATS = ("NCHW", "NLC")


def _pair(size: int | tuple[int, int] | list[int], what: str) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if isinstance(size, (tuple, list)) and len(size) == 2 and all(isinstance(s, int) for s in size):
        return int(size[0]), int(size[1])
    raise ValueError(f"{what} must be an int or a pair of ints (H, W), got {size!r}")


# ---- the block ------------------------------------------------------------------------------------------------


def merge_qkv(attn: Attention) -> Attention:
    """Inference form of an attention's projections, in place: separate q/k/v Linears, or a bias-free qkv
    with learned q/v biases (BEiT/EVA), become one qkv Linear with one bias (k's bias is zero): one matrix
    product and no bias concatenation per call. The same numbers (the product is split the same way)."""
    if attn.head_first:
        return attn
    if attn.qkv is None:
        assert attn.q_proj is not None and attn.k_proj is not None and attn.v_proj is not None
        projs = (attn.q_proj, attn.k_proj, attn.v_proj)
        weight = torch.cat([p.weight.detach() for p in projs])
        biases = [p.bias.detach() if p.bias is not None else torch.zeros_like(p.weight[:, 0]) for p in projs]
        bias: torch.Tensor | None = torch.cat(biases) if any(p.bias is not None for p in projs) else None
        attn.q_proj = attn.k_proj = attn.v_proj = None
    elif attn.q_bias is not None and attn.v_bias is not None:
        weight = attn.qkv.weight.detach()
        bias = torch.cat((attn.q_bias.detach(), torch.zeros_like(attn.q_bias), attn.v_bias.detach()))
        attn.q_bias = attn.v_bias = None
    else:
        return attn
    qkv = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(weight)
    with torch.no_grad():
        qkv.weight.copy_(weight)
        if bias is not None:
            qkv.bias.copy_(bias)
    attn.qkv = qkv
    return attn


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))`` then ``x + ls2(mlp(norm2(x)))``.

    ``attn`` is the family's :class:`Attention` (its projection layout is data: fused, q/v-biased or separate)
    and ``mlp`` its feed-forward (a GELU MLP for DeiT, SwiGLU for EVA-02). ``rope`` (EVA-02) is a rotary table
    for the patch tokens; the first ``num_prefix_tokens`` tokens (class, distillation) are not rotated.
    ``fuse()`` folds the layer scales into ``attn.proj`` and ``mlp.fc2`` and merges the q/k/v projections.
    """

    def __init__(self, dim: int, attn: Attention, mlp: nn.Module, init_values: float | None = None,
                 drop_path: float = 0.0, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens
        self.norm1 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.attn = attn
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = mlp
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), None, rope, self.num_prefix_tokens)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def fuse(self) -> nn.Module:
        # gamma * (W x + b) = (gamma W) x + gamma b: the scale moves into the projection before it.
        if isinstance(self.ls1, LayerScale):
            self.attn.proj = fold_affine_into_output(self.attn.proj, self.ls1.gamma)
            self.ls1 = nn.Identity()
        if isinstance(self.ls2, LayerScale):
            self.mlp.fc2 = fold_affine_into_output(self.mlp.fc2, self.ls2.gamma)
            self.ls2 = nn.Identity()
        merge_qkv(self.attn)
        return self


# ---- the plain ViT surface --------------------------------------------------------------------------------------


class VisionTransformer(Backbone):
    """A plain ViT: patch tokens on one grid, prefix tokens, a learned position table, blocks, a pooled head.

    Families build their blocks (each called as ``block(x, rope)``) and pass them in; a family with rotary
    positions overrides :meth:`rope_table`. ``forward_features`` returns timm's (B, prefix + N, C) tokens;
    ``forward_intermediates`` gives the outputs of chosen blocks as (B, C, H / p, W / p) maps (or ``NLC``
    tokens), with timm's indices and semantics; ``feature_info`` has one entry per block.
    """

    def __init__(
        self,
        *,
        blocks: list[nn.Module],
        embed_dim: int,
        patch_size: int,
        img_size: tuple[int, int],
        in_chans: int,
        num_classes: int,
        global_pool: str = "token",
        distilled: bool = False,
        no_embed_class: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__(in_chans, num_classes, patch_size)
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {GLOBAL_POOLS}")
        h, w = img_size
        if h % patch_size or w % patch_size or h <= 0 or w <= 0:
            raise ValueError(f"img_size H={h}, W={w} is not allowed: H and W must be positive multiples of "
                             f"{patch_size} (the patch size)")
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.img_size = (h, w)
        self.grid_size = (h // patch_size, w // patch_size)  # the grid the position table is laid out for
        self.num_prefix_tokens = 2 if distilled else 1
        self.no_embed_class = no_embed_class
        # Prefix tokens with a row in the position table (none when they take no position: DeiT III).
        self.num_pos_prefix = 0 if no_embed_class else self.num_prefix_tokens
        self.global_pool = global_pool
        self.head_init_scale = head_init_scale

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_pos_prefix + self.grid_size[0] * self.grid_size[1],
                                                  embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        self.pos_drop = nn.Dropout(pos_drop_rate)
        self.blocks = nn.ModuleList(blocks)
        # timm's rule: average pooling normalises the pooled vector (fc_norm), token pooling the tokens (norm).
        use_fc_norm = global_pool == "avg"
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=NORM_EPS)
        self.fc_norm = nn.LayerNorm(embed_dim, eps=NORM_EPS) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = self.head_hidden_size = embed_dim
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f"blocks.{i}")
                             for i in range(len(blocks))]
        self._init_weights()
        self.head = self._new_head(num_classes)

    def _init_weights(self) -> None:
        # timm's ViT init: truncated normals (std 0.02) for tokens, positions and Linears, zero biases.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.cls_token, self.dist_token):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embed_dim, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        if self.head_init_scale != 1.0:
            with torch.no_grad():
                head.weight.mul_(self.head_init_scale)
        return head

    # ---- timm surface -------------------------------------------------------------------------------------
    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _check_pool(self, global_pool: str | None, allowed: tuple[str, ...] = GLOBAL_POOLS) -> None:
        if global_pool is not None:
            if global_pool not in allowed:
                raise ValueError(f"global_pool={global_pool!r} is not supported; allowed: {allowed}")
            self.global_pool = global_pool

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A fresh classifier for ``num_classes`` (0 removes it) on the model's device/dtype, in its mode."""
        self._check_pool(global_pool)
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = self._new_head(num_classes).to(ref.device, ref.dtype).train(self.training)

    def _stem_names(self) -> list[str]:
        # The embedding modules (the tokens and the position table are parameters of the model itself).
        return ["patch_embed"]

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's grouping for layer-wise learning-rate decay: embeddings first, one group per block, the final
        norm with the last block; the head matches nothing (the last group)."""
        if self.dist_token is not None:
            stem = r"^cls_token|pos_embed|patch_embed|dist_token"
        else:
            stem = r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre"
        return dict(stem=stem, blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def prune_intermediate_layers(
        self,
        indices: int | list[int] | tuple[int, ...] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Keep the blocks ``forward_intermediates(indices)`` needs (timm's contract); ``prune_norm`` drops the
        final norm, ``prune_head`` the pooling norm and the classifier(s). Returns the block indices taken."""
        take = resolve_indices(indices, len(self.blocks))
        self.blocks = self.blocks[: max(take) + 1]
        self.feature_info = self.feature_info[: max(take) + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take

    @torch.jit.ignore
    def set_input_size(self, img_size: int | tuple[int, int]) -> None:
        """Make ``img_size`` the model's own size (timm's ``set_input_size``): the position table is resampled to
        its grid once (later inputs of that size use it as it is). Other sizes keep working."""
        h, w = _pair(img_size, "img_size")
        self.check_input(torch.empty(1, self.in_chans, h, w, device="meta"))
        grid = (h // self.patch_size, w // self.patch_size)
        if grid != self.grid_size:
            with torch.no_grad():
                table = resample_abs_pos_embed(self.pos_embed.detach(), grid[0], grid[1], self.grid_size[0],
                                               self.grid_size[1], self.num_pos_prefix)
            self.pos_embed = nn.Parameter(table.contiguous(), requires_grad=self.pos_embed.requires_grad)
        self.img_size, self.grid_size = (h, w), grid
        if self.pretrained_cfg:
            self.pretrained_cfg["input_size"] = (self.in_chans, h, w)

    # ---- forward ------------------------------------------------------------------------------------------
    def prefix_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The class (and distillation) tokens for a batch like ``x``: (B, prefix, C)."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        if self.dist_token is None:
            return cls
        return torch.cat((cls, self.dist_token.expand(x.shape[0], -1, -1)), dim=1)

    def rope_table(self, grid_h: int, grid_w: int, x: torch.Tensor) -> torch.Tensor | None:
        """The rotary table for a grid (families with rotary positions override this); None: no rotary."""
        return None

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, C, H, W) image -> (B, prefix + N, C) tokens with positions, and the grid's rotary table."""
        grid_h = x.shape[-2] // self.patch_size
        grid_w = x.shape[-1] // self.patch_size
        tokens = self.patch_embed(x)  # B, N, C
        pos = resample_abs_pos_embed(self.pos_embed, grid_h, grid_w, self.grid_size[0], self.grid_size[1],
                                     self.num_pos_prefix)
        if self.no_embed_class:
            tokens = torch.cat((self.prefix_tokens(tokens), tokens + pos), dim=1)
        else:
            tokens = torch.cat((self.prefix_tokens(tokens), tokens), dim=1) + pos
        return self.pos_drop(tokens), self.rope_table(grid_h, grid_w, x)

    @torch.jit.ignore
    def run_block(self, block: nn.Module, x: torch.Tensor, rope: torch.Tensor | None) -> torch.Tensor:
        if self.grad_checkpointing:
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.check_input(x)
        x, rope = self.embed(x)
        for block in self.blocks:  # written out: TorchScript cannot pass a block to a method
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x = self.head_drop(self.fc_norm(self.pool(x)))
        return x if pre_logits else self.head(x)


    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Any] | tuple[torch.Tensor, list[Any]]:
        """Outputs of the blocks in ``indices`` (timm's signature and semantics: an int n takes the last n
        blocks, a sequence picks blocks, negative allowed, None all). Patch tokens as (B, C, H / p, W / p)
        maps (``output_fmt="NLC"``: (B, N, C) tokens); ``return_prefix_tokens`` pairs each with its
        (B, prefix, C) class/distillation tokens; ``norm`` applies the final norm to each. The final output is
        what ``forward_features`` returns (when no block was skipped by ``stop_early``)."""
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: {OUTPUT_FORMATS}")
        x = self.check_input(x)
        batch, grid_h, grid_w = x.shape[0], x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        take = resolve_indices(indices, len(self.blocks))
        blocks = self.blocks[: max(take) + 1] if stop_early else self.blocks
        x, rope = self.embed(x)
        taken = []
        for i, block in enumerate(blocks):
            x = self.run_block(block, x, rope)
            if i in take:
                taken.append(self.norm(x) if norm else x)
        prefix = [t[:, : self.num_prefix_tokens] for t in taken]
        maps = [t[:, self.num_prefix_tokens:] for t in taken]
        if output_fmt == "NCHW":
            maps = [t.reshape(batch, grid_h, grid_w, -1).permute(0, 3, 1, 2).contiguous() for t in maps]
        out: list[Any] = list(zip(maps, prefix)) if return_prefix_tokens else maps
        if intermediates_only:
            return out
        return self.norm(x), out


class DistilledVisionTransformer(VisionTransformer):
    """A ViT with a distillation token and its own classifier (``head_dist``), DeiT's distilled models.

    Eval returns the mean of both heads; training too (timm's default), or the pair ``(logits,
    logits_dist)`` after ``set_distilled_training(True)`` (the trainer sets it when it distils). Pre-logits are
    the mean of the two tokens.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(distilled=True, **kwargs)
        if self.global_pool != "token":
            raise ValueError(f"global_pool={self.global_pool!r} is not supported by a distilled model: its heads "
                             f"read the class and distillation tokens; allowed: 'token'")
        self.head_dist = self._new_head(self.num_classes)
        self.distilled_training = False  # timm's default
        self.merged_heads = False  # set by fuse(): head reads both tokens at once

    @torch.jit.ignore
    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        return self.head, self.head_dist

    @torch.jit.ignore
    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self._check_pool(global_pool, ("token", ""))
        self.num_classes = num_classes
        ref = self.cls_token
        self.head = self._new_head(num_classes).to(ref.device, ref.dtype).train(self.training)
        self.head_dist = self._new_head(num_classes).to(ref.device, ref.dtype).train(self.training)
        self.merged_heads = False

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        """True: training mode returns (logits, logits_dist). False (default, as timm): their mean."""
        self.distilled_training = enable

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        x_cls, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x_cls + x_dist) / 2
        if self.merged_heads:
            return self.head(self.head_drop(x[:, :2].flatten(1)))  # B, 2C: both tokens, one Linear
        out, out_dist = self.head(x_cls), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return out, out_dist
        return (out + out_dist) / 2

    def fuse(self) -> nn.Module:
        """(W1 c + b1 + W2 d + b2) / 2 = [W1 W2] / 2 [c; d] + (b1 + b2) / 2: one Linear on both tokens."""
        if isinstance(self.head, nn.Linear) and isinstance(self.head_dist, nn.Linear):
            w = torch.cat((self.head.weight.detach(), self.head_dist.weight.detach()), dim=1) / 2
            b = (self.head.bias.detach() + self.head_dist.bias.detach()) / 2
            head = nn.Linear(w.shape[1], w.shape[0]).to(w)
            with torch.no_grad():
                head.weight.copy_(w)
                head.bias.copy_(b)
            self.head, self.head_dist, self.merged_heads = head, nn.Identity(), True
        return self


def resample_checkpoint_pos_embed(state: Mapping[str, torch.Tensor], model: VisionTransformer
                                  ) -> dict[str, torch.Tensor]:
    """A checkpoint's position table resampled to the model's grid when it was trained on another (square)
    grid: loading a 224 checkpoint into a model built with ``img_size=384`` works, as in timm."""
    out = dict(state)
    table = out.get("pos_embed")
    own = model.pos_embed
    if table is not None and table.dim() == 3 and tuple(table.shape) != tuple(own.shape):
        old = square_grid(table.shape[1] - model.num_pos_prefix)
        out["pos_embed"] = resample_abs_pos_embed(table, model.grid_size[0], model.grid_size[1], old[0], old[1],
                                                  model.num_pos_prefix)
    return out


def checkpoint_filter(state: Mapping[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm checkpoints load as they are. Original DeiT III files name their layer scales ``gamma_1``/``gamma_2``
    (timm: ``ls1.gamma``/``ls2.gamma``); a position table of another grid is resampled to the model's."""
    out = {}
    for k, v in state.items():
        if k.startswith("pre_logits."):
            continue
        out[re.sub(r"\.gamma_([12])$", r".ls\1.gamma", k)] = v
    return resample_checkpoint_pos_embed(out, model)


VisionTransformer.checkpoint_filter = staticmethod(checkpoint_filter)


# ---- DeiT / DeiT III variants ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeiTConfig:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    distilled: bool = False
    # DeiT III: prefix tokens take no position, and both branches of a block have a layer scale.
    no_embed_class: bool = False
    init_values: float | None = None
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim={self.embed_dim} must be divisible by num_heads={self.num_heads}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.init_values is not None and not self.init_values > 0:
            raise ValueError(f"init_values must be > 0 or None (no layer scale), got {self.init_values}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12)}


def _deit(size: str, img_size: int = 224, **kw: Any) -> DeiTConfig:
    dim, depth, heads = _SIZES[size]
    return DeiTConfig(embed_dim=dim, depth=depth, num_heads=heads, img_size=img_size, **kw)


VARIANTS = {
    "deit_tiny_patch16_224": _deit("tiny"),
    "deit_small_patch16_224": _deit("small"),
    "deit_base_patch16_224": _deit("base"),
    "deit_base_patch16_384": _deit("base", 384),
}
VARIANTS_DISTILLED = {
    "deit_tiny_distilled_patch16_224": _deit("tiny", distilled=True),
    "deit_small_distilled_patch16_224": _deit("small", distilled=True),
    "deit_base_distilled_patch16_224": _deit("base", distilled=True),
    "deit_base_distilled_patch16_384": _deit("base", 384, distilled=True),
}
VARIANTS_DEIT3 = {
    f"deit3_{size}_patch16_{img}": _deit(size, img, no_embed_class=True, init_values=1e-6)
    for size in ("small", "base") for img in (224, 384)
}

_PAPER = "Training data-efficient image transformers & distillation through attention (arXiv:2012.12877)"
DEFAULTS = FamilyDefaults(
    family="deit",
    crop_pct=0.9,
    first_conv="patch_embed.proj",
    classifier="head",
    size_divisor=16,  # the patch size: any multiple runs (the position table is resampled)
    paper=_PAPER,
)
DEFAULTS_DISTILLED = FamilyDefaults(
    family="deit",
    crop_pct=0.9,
    first_conv="patch_embed.proj",
    classifier=("head", "head_dist"),
    size_divisor=16,
    has_distill_head=True,
    paper=_PAPER,
)
DEFAULTS_DEIT3 = FamilyDefaults(
    family="deit",
    crop_pct=0.9,
    first_conv="patch_embed.proj",
    classifier="head",
    size_divisor=16,
    paper="DeiT III: Revenge of the ViT (arXiv:2204.07118)",
)


@register_family(DEFAULTS_DEIT3, VARIANTS_DEIT3)
@register_family(DEFAULTS_DISTILLED, VARIANTS_DISTILLED)
@register_family(DEFAULTS, VARIANTS)
def build_deit(
    cfg: DeiTConfig,
    num_classes: int = 1000,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    global_pool: str = "token",
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
    attn_drop_rate: float = 0.0,
    proj_drop_rate: float = 0.0,
    pos_drop_rate: float = 0.0,
    dynamic_img_size: bool | None = None,
) -> VisionTransformer:
    """A DeiT / DeiT III model. ``img_size`` (default: the variant's) sets the grid of its position table, as
    in timm; any input whose sides are multiples of the patch size runs whatever it is.
    ``dynamic_img_size`` is accepted for timm compatibility and changes nothing (every size runs)."""
    dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    if not 0.0 <= dpr_total < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr_total}")
    num_prefix = 2 if cfg.distilled else 1
    dpr = drop_path_rates(dpr_total, [cfg.depth])[0]
    blocks = [
        Block(cfg.embed_dim,
              Attention(cfg.embed_dim, cfg.num_heads, qkv_bias=True, attn_drop=attn_drop_rate,
                        proj_drop=proj_drop_rate),
              Mlp(cfg.embed_dim, int(cfg.embed_dim * cfg.mlp_ratio), drop=proj_drop_rate),
              init_values=cfg.init_values, drop_path=dpr[i], num_prefix_tokens=num_prefix)
        for i in range(cfg.depth)
    ]
    cls: Callable[..., VisionTransformer] = DistilledVisionTransformer if cfg.distilled else VisionTransformer
    return cls(blocks=blocks, embed_dim=cfg.embed_dim, patch_size=cfg.patch_size,
               img_size=_pair(cfg.img_size if img_size is None else img_size, "img_size"), in_chans=in_chans,
               num_classes=num_classes, global_pool=global_pool, no_embed_class=cfg.no_embed_class,
               drop_rate=drop_rate, pos_drop_rate=pos_drop_rate)
