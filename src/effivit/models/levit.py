"""LeViT (arXiv:2104.01136): a ViT in ConvNet's clothing, with learned attention biases and BN everywhere.

Two layouts of the same network, as in timm: ``levit_*`` works on tokens with ``nn.Linear`` and BatchNorm1d,
``levit_conv_*`` on (B, C, H, W) maps with 1x1 convs and BatchNorm2d. Parameter names follow timm's (and the
official) checkpoints, so ``levit_*`` / ``levit_conv_*`` weights load unchanged; ``state_dict()`` has exactly
timm's keys (the bias index is derived, never stored).

How this differs from the reference:

* Any input size (a multiple of 16). Tokens of the linear form are kept as ``(B, H, W, C)`` rather than
  ``(B, N, C)``, so every block knows its grid, and the attention biases are resampled (bicubic on the offset
  table, :mod:`effivit.layers.attn_bias`) when the grid differs from the one trained at 224. At 224 nothing
  is resampled and logits equal timm's. ``set_input_size`` prepares the biases for a deploy size once.
  ``forward_features`` returns (B, C, H, W) in both forms, as every effivit model does (timm's linear form
  returns (B, N, C)).
* Attention runs on ``F.scaled_dot_product_attention`` with the gathered bias as ``attn_mask``.
* ``deploy.fuse`` folds every Linear/Conv-BN pair and both BN-Linear heads, merges the two classifier heads
  into one Linear (eval returns their mean, which is one affine map), turns the conv form's subsample +
  1x1 query conv into one strided 1x1 conv, and caches each gathered bias as a plain tensor. The fused
  model is plain ``nn.Linear``/``nn.Hardswish``; the CPU kernel choice (oneDNN's packed inner product with
  the hard-swish as a post-op) is a deploy pass, ``deploy.optimize(model, "cpu")``.
* Distillation head: as in timm, training mode returns the mean of both heads; after
  ``set_distilled_training(True)`` (the trainer sets it when it distils) it returns ``(logits, logits_dist)``
  as in the paper. Eval mode returns their mean.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from ..deploy.fold import fuse_conv_bn
from ..layers import DropPath
from ..layers.attn_bias import (
    AttentionBiasBase,
    biased_attention,
    fold_scale_into_rows,
    query_grid,
)
from ..layers.conv_bn import LinearNorm, LinearNorm2d, NormLinear
from ..registry import FamilyDefaults, register_family
from ._base import DistilledBackbone, Stage, resolve_indices

TRAIN_SIZE = 224  # the attention-bias tables are sized for this input (14x14 tokens after the stem)


@dataclass(frozen=True)
class LevitConfig:
    embed_dim: tuple[int, int, int]
    key_dim: int
    num_heads: tuple[int, int, int]
    depth: tuple[int, int, int]
    use_conv: bool = False
    attn_ratio: float = 2.0
    mlp_ratio: float = 2.0
    down_attn_ratio: float = 4.0
    down_mlp_ratio: float = 2.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.embed_dim)
        if n < 1 or len(self.num_heads) != n or len(self.depth) != n:
            raise ValueError(f"embed_dim, num_heads and depth must have one entry per stage, got {self.embed_dim}, "
                             f"{self.num_heads}, {self.depth}")
        if self.embed_dim[0] % 8 != 0:
            raise ValueError(f"embed_dim[0] must be a multiple of 8 (the stem halves it three times), got "
                             f"{self.embed_dim[0]}")
        if any(d < 0 for d in self.depth) or self.key_dim < 1:
            raise ValueError(f"depth must be >= 0 and key_dim >= 1, got depth={self.depth}, key_dim={self.key_dim}")


def _cfg(embed_dim, key_dim, num_heads, depth, use_conv=False) -> LevitConfig:
    return LevitConfig(embed_dim=embed_dim, key_dim=key_dim, num_heads=num_heads, depth=depth, use_conv=use_conv)


_ARCHS = {
    "128s": ((128, 256, 384), 16, (4, 6, 8), (2, 3, 4)),
    "128": ((128, 256, 384), 16, (4, 8, 12), (4, 4, 4)),
    "192": ((192, 288, 384), 32, (3, 5, 6), (4, 4, 4)),
    "256": ((256, 384, 512), 32, (4, 6, 8), (4, 4, 4)),
    "384": ((384, 512, 768), 32, (6, 9, 12), (4, 4, 4)),
}
VARIANTS = {f"levit_{k}": _cfg(*v) for k, v in _ARCHS.items()}
VARIANTS.update({f"levit_conv_{k}": _cfg(*v, use_conv=True) for k, v in _ARCHS.items()})

DEFAULTS = FamilyDefaults(
    family="levit",
    crop_pct=0.9,
    first_conv="stem.conv1.linear",
    classifier=("head.linear", "head_dist.linear"),
    size_divisor=16,
    fixed_input_size=False,
    has_distill_head=True,
    paper="LeViT: a Vision Transformer in ConvNet's Clothing for Faster Inference (arXiv:2104.01136)",
)


class Subsample(nn.Module):
    """Keep every ``stride``-th token in each direction (LeViT's query subsampling)."""

    # Read once when scripting (TorchScript drops the branch not taken).
    __constants__ = ["channels_last"]

    def __init__(self, stride: int, channels_last: bool) -> None:
        super().__init__()
        self.stride = stride
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            # Contiguous so the Linear after it is one GEMM (a strided 4-D input makes it a batched matmul).
            return x[:, :: self.stride, :: self.stride].contiguous()  # B, H', W', C
        return x[:, :, :: self.stride, :: self.stride]  # B, C, H', W'


class LevitAttention(AttentionBiasBase):
    """Multi-head self-attention with a learned offset bias; q/k/v from one Linear(+BN) (per head
    ``[q | k | v]``, as in the checkpoints), hard-swish, then an output Linear(+BN).

    Linear form: x is (B, H, W, C). Conv form: x is (B, C, H, W).
    """

    # Read once when scripting (TorchScript drops the branch not taken).
    __constants__ = ["use_conv"]

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: tuple[int, int],
                 use_conv: bool, act_layer: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        ln = LinearNorm2d if use_conv else LinearNorm
        self.use_conv = use_conv
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.qkv = ln(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", ln(num_heads * self.val_dim, dim, bn_weight_init=0.0)),
        ]))
        self.init_attention_bias(num_heads, resolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = [self.key_dim, self.key_dim, self.val_dim]
        if self.use_conv:
            b, _, h, w = x.shape
            qkv = self.qkv(x).view(b, self.num_heads, -1, h * w)  # B, heads, 2kd+vd, N
            q, k, v = qkv.split(split, dim=2)
            q, k, v = q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2)  # B, heads, N, d
        else:
            b, h, w, _ = x.shape
            qkv = self.qkv(x).view(b, h * w, self.num_heads, -1)  # B, N, heads, 2kd+vd
            q, k, v = qkv.split(split, dim=3)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # B, heads, N, d
        out = biased_attention(q, k, v, self.attention_bias(h, w), self.scale)  # B, heads, N, vd
        if self.use_conv:
            out = out.transpose(-1, -2).reshape(b, -1, h, w)
        else:
            out = out.transpose(1, 2).reshape(b, h, w, -1)
        return self.proj(out)

    def fuse(self) -> nn.Module:
        self.build_trained_bias_cache()
        if isinstance(self.qkv, (nn.Linear, nn.Conv2d)) and self.scale != 1.0:
            # The attention scale goes into the query rows of each head's [q | k | v] block.
            per_head = 2 * self.key_dim + self.val_dim
            rows = torch.arange(self.num_heads * per_head) % per_head < self.key_dim
            fold_scale_into_rows(self.qkv, rows, self.scale)
            self.scale = 1.0
        return self


class LevitAttentionDownsample(AttentionBiasBase):
    """Attention whose queries are the stride-2 subsampled tokens: halves the grid, changes the width."""

    # Read once when scripting (TorchScript drops the branch not taken).
    __constants__ = ["use_conv"]

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float,
                 resolution: tuple[int, int], use_conv: bool, act_layer: type[nn.Module] = nn.Hardswish,
                 stride: int = 2) -> None:
        super().__init__()
        ln = LinearNorm2d if use_conv else LinearNorm
        self.use_conv = use_conv
        self.stride = stride
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim**-0.5
        self.kv = ln(in_dim, num_heads * (key_dim + self.val_dim))
        self.q = nn.Sequential(OrderedDict([
            ("down", Subsample(stride, channels_last=not use_conv)),
            ("ln", ln(in_dim, num_heads * key_dim)),
        ]))
        self.proj = nn.Sequential(OrderedDict([
            ("act", act_layer()),
            ("ln", ln(num_heads * self.val_dim, out_dim)),
        ]))
        self.init_attention_bias(num_heads, resolution, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        split = [self.key_dim, self.val_dim]
        if self.use_conv:
            b, _, h, w = x.shape
            k, v = self.kv(x).view(b, self.num_heads, -1, h * w).split(split, dim=2)
            k, v = k.transpose(-1, -2), v.transpose(-1, -2)  # B, heads, N, d
            q = self.q(x)  # B, heads*kd, H', W'
            hq, wq = q.shape[-2], q.shape[-1]
            q = q.reshape(b, self.num_heads, self.key_dim, hq * wq).transpose(-1, -2)  # B, heads, N', kd
        else:
            b, h, w, _ = x.shape
            k, v = self.kv(x).view(b, h * w, self.num_heads, -1).split(split, dim=3)
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # B, heads, N, d
            q = self.q(x)  # B, H', W', heads*kd
            hq, wq = q.shape[1], q.shape[2]
            q = q.reshape(b, hq * wq, self.num_heads, self.key_dim).transpose(1, 2)  # B, heads, N', kd
        out = biased_attention(q, k, v, self.attention_bias(h, w), self.scale)  # B, heads, N', vd
        if self.use_conv:
            out = out.transpose(-1, -2).reshape(b, -1, hq, wq)
        else:
            out = out.transpose(1, 2).reshape(b, hq, wq, -1)
        return self.proj(out)

    def fuse(self) -> nn.Module:
        self.build_trained_bias_cache()
        if self.use_conv and isinstance(self.q, nn.Sequential):
            # Subsampling then a 1x1 conv is one 1x1 conv with the stride.
            ln = self.q.ln
            conv = fuse_conv_bn(ln.linear, ln.bn) if isinstance(ln, LinearNorm2d) else ln
            conv.stride = (self.stride, self.stride)
            self.q = conv
        q_proj = self.q if isinstance(self.q, nn.Conv2d) else self.q[-1]
        if isinstance(q_proj, (nn.Linear, nn.Conv2d)) and self.scale != 1.0:
            fold_scale_into_rows(q_proj, torch.ones(q_proj.weight.shape[0], dtype=torch.bool), self.scale)
            self.scale = 1.0
        return self


class LevitMlp(nn.Module):
    """Linear(+BN) -> hard-swish -> Linear(+BN) (1x1 convs in the conv form)."""

    def __init__(self, dim: int, hidden: int, use_conv: bool, act_layer: type[nn.Module] = nn.Hardswish,
                 drop: float = 0.0) -> None:
        super().__init__()
        ln = LinearNorm2d if use_conv else LinearNorm
        self.ln1 = ln(dim, hidden)
        self.act = act_layer()
        self.drop = nn.Dropout(drop)
        self.ln2 = ln(hidden, dim, bn_weight_init=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln2(self.drop(self.act(self.ln1(x))))

    def fuse(self) -> nn.Module:
        # Linear -> hard-swish -> Linear (dropout is the identity at inference); deploy.optimize(model, "cpu")
        # makes the hard-swish a post-op of the first Linear's kernel.
        return nn.Sequential(self.ln1, self.act, self.ln2)


class LevitBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float,
                 resolution: tuple[int, int], use_conv: bool, drop_path: float) -> None:
        super().__init__()
        self.attn = LevitAttention(dim, key_dim, num_heads, attn_ratio, resolution, use_conv)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), use_conv)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(x))
        return x + self.drop_path2(self.mlp(x))


class LevitDownsample(nn.Module):
    """Attention downsampling (no residual: the width changes) followed by a residual MLP."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, attn_ratio: float, mlp_ratio: float,
                 resolution: tuple[int, int], use_conv: bool, drop_path: float) -> None:
        super().__init__()
        self.attn_downsample = LevitAttentionDownsample(in_dim, out_dim, key_dim, in_dim // key_dim, attn_ratio,
                                                        resolution, use_conv)
        self.mlp = LevitMlp(out_dim, int(out_dim * mlp_ratio), use_conv)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn_downsample(x)
        return x + self.drop_path(self.mlp(x))


class Stem16(nn.Sequential):
    """Four stride-2 3x3 Conv+BN with hard-swish between them (16x down-sampling)."""

    def __init__(self, in_chs: int, out_chs: int, act_layer: type[nn.Module] = nn.Hardswish) -> None:
        super().__init__()
        chs = [in_chs, out_chs // 8, out_chs // 4, out_chs // 2, out_chs]
        for i in range(4):
            self.add_module(f"conv{i + 1}", LinearNorm2d(chs[i], chs[i + 1], 3, stride=2, padding=1))
            if i < 3:
                self.add_module(f"act{i + 1}", act_layer())


class Levit(DistilledBackbone):
    """LeViT with its distillation head (``head`` and ``head_dist``, timm's ``LevitDistilled``)."""

    # Read once when scripting (TorchScript drops the branch not taken).
    __constants__ = ["use_conv"]

    def __init__(self, cfg: LevitConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, global_pool)
        self.use_conv = cfg.use_conv
        self.feature_chain = cfg.use_conv  # the linear form passes (B, N, C) tokens between stages
        self.drop_rate = drop_rate
        dp = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        self.stem = Stem16(in_chans, cfg.embed_dim[0])
        res = (TRAIN_SIZE // 16, TRAIN_SIZE // 16)
        stages = []
        in_dim = cfg.embed_dim[0]
        stride = 16
        for i, (dim, heads, depth) in enumerate(zip(cfg.embed_dim, cfg.num_heads, cfg.depth)):
            if i > 0:
                down: nn.Module = LevitDownsample(in_dim, dim, cfg.key_dim, cfg.down_attn_ratio, cfg.down_mlp_ratio,
                                                  res, cfg.use_conv, dp)
                res = query_grid(res[0], res[1], 2)
                stride *= 2
            else:
                if in_dim != dim:
                    raise ValueError("the first stage keeps the stem's width")
                down = nn.Identity()
            blocks = [LevitBlock(dim, cfg.key_dim, heads, cfg.attn_ratio, cfg.mlp_ratio, res, cfg.use_conv, dp)
                      for _ in range(depth)]
            stages.append(Stage(blocks, down))
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_dim
        self.head = self._new_head(num_classes)
        self.head_dist = self._new_head(num_classes)

    def _new_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        ref = next(iter(self.stem.parameters()))
        return NormLinear(self.num_features, num_classes, drop=self.drop_rate).to(ref.device, ref.dtype)

    # ---- forward --------------------------------------------------------------------------------
    def _to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.use_conv else x.permute(0, 2, 3, 1).contiguous()  # B, H, W, C

    def _output(self, x: torch.Tensor) -> torch.Tensor:
        """timm's layouts: (B, C, H, W) maps in the conv form, (B, N, C) tokens (a view of our (B, H, W, C)
        tokens) in the linear form."""
        if self.use_conv:
            return x
        return x.flatten(1, 2)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in the conv form, (B, N, C) tokens in the linear form, as timm."""
        x = self.check_input(x)
        x = self._to_tokens(self.stem(self.stem_input(x)))
        return self._output(self.stages(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.global_pool == "avg":
            x = x.mean((2, 3)) if self.use_conv else x.mean(1)
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
        """Stage outputs as (B, C, H, W) maps (timm's signature); the final output is what
        ``forward_features`` returns. ``norm`` has no effect (LeViT has no final norm)."""
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt={output_fmt!r} is not supported; allowed: 'NCHW'")
        x = self.check_input(x)
        take = resolve_indices(indices, len(self.stages))
        stages = self.stages if not stop_early else self.stages[: max(take) + 1]
        x = self._to_tokens(self.stem(self.stem_input(x)))
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(x if self.use_conv else x.permute(0, 3, 1, 2))
        if intermediates_only:
            return intermediates
        return self._output(x), intermediates

    # ---- deploy ---------------------------------------------------------------------------------
    def fuse(self) -> nn.Module:
        """Called by ``deploy.fuse`` after the children are folded: merge the two heads (eval returns their
        mean, an affine map) into one Linear, and run in channels_last (oneDNN's fast convolutions on CPU;
        the input is converted once at the stem)."""
        self.merge_distilled_heads()
        self.use_channels_last()
        return self


def checkpoint_filter(state: dict[str, torch.Tensor], model: Levit) -> dict[str, torch.Tensor]:
    """timm and official checkpoints load as they are; old files that stored the derived
    ``attention_bias_idxs`` buffers have them dropped (ours are computed from the input)."""
    return {k: v for k, v in state.items() if not k.endswith("attention_bias_idxs")}


Levit.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_levit(cfg: LevitConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                drop_path_rate: float | None = None, global_pool: str = "avg") -> Levit:
    return Levit(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                 drop_path_rate=drop_path_rate, global_pool=global_pool)
