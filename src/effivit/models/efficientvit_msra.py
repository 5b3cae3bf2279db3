"""EfficientViT (MSRA) m0-m5 (arXiv:2305.07027): sandwich blocks around cascaded group attention.

A block is ``dw conv -> FFN -> window attention -> dw conv -> FFN``, each with a residual. The attention
gives each head its own slice of the channels, and feeds each head's output into the next head's input
(the cascade); each head adds a learned bias indexed by relative offset inside the window
(``layers.attn_bias``). State-dict keys are timm's (Conv-BN pairs are the shared ``layers.ConvNorm`` under
timm's names ``conv``/``bn``), so ``efficientvit_m*`` weights load unchanged.

Resolution. The stem has stride 16 and the three stages run at strides 16, 32 and 64; there is no stride-4
or stride-8 map, so ``feature_info`` (and ``features_only``) has three levels, not four. Inputs may be any
multiple of 16 (the odd maps of deeper stages are handled by the stride-2 convs' padding, as in the
reference). Attention runs in fixed windows: per stage ``min(window_size, stage resolution at the training
size 224)`` — 7, 7 and 4 for every variant, the grids the checkpoints' biases were trained on. Other input
sizes are zero-padded to whole windows (as timm does), so the bias tables never need resampling.

Differences from the reference (same outputs):

* Attention stays in the channel-first layout of the convs (``layers.attention.attend_channels_first``:
  scale, ``q^T k`` and bias in one ``baddbmm``); windows are partitioned in NCHW with one permute each way.
* The biases are gathered once and cached (``layers.attn_bias``), not re-indexed each forward.
* ``fuse`` folds every Conv-BN and the head's BN-Linear, and folds the identity of the residual depth-wise
  convs into their kernels (``x + dw(x)`` becomes one conv). Inside the attention, whose windows have one
  fixed size, each head's depth-wise conv on q becomes per-channel (N x N) matrices with the attention
  scale folded in (:class:`WindowDepthwise`): one ``baddbmm`` instead of a conv call that costs ~40 us of
  fixed overhead on CPU for a 7x7 window.
* ``drop_path_rate`` (stochastic depth on the residual branches) is available for training; timm's
  ``ResidualDrop`` is always 0 there.
"""

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.fold import depthwise_conv_matrix, fuse_bn_linear, identity_kernel, sum_branches
from ..layers import ConvNorm, DropPath
from ..layers.attention import attend_channels_first
from ..layers.attn_bias import AttentionBiasBase
from ..layers.drop import drop_path_rates
from ..layers.se import SqueezeExcite
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, checkpoint_seq

PATCH_SIZE = 16
TRAIN_SIZE = 224


@dataclass(frozen=True)
class EfficientViTMsraConfig:
    embed_dim: tuple[int, int, int]
    depth: tuple[int, int, int]
    num_heads: tuple[int, int, int]
    # Kernel sizes of the depth-wise conv on each head's queries.
    kernels: tuple[int, ...]
    key_dim: tuple[int, int, int] = (16, 16, 16)
    window_size: tuple[int, int, int] = (7, 7, 7)

    def __post_init__(self) -> None:
        for field_name in ("embed_dim", "depth", "num_heads", "key_dim", "window_size"):
            value = getattr(self, field_name)
            if len(value) != 3 or any(v < 1 for v in value):
                raise ValueError(f"{field_name} must be 3 positive ints (one per stage), got {value}")
        for dim, heads in zip(self.embed_dim, self.num_heads):
            if dim % heads != 0:
                raise ValueError(f"embed_dim {dim} must be a multiple of num_heads {heads}")
        if len(self.kernels) < max(self.num_heads) or any(k % 2 == 0 for k in self.kernels):
            raise ValueError(f"kernels must give an odd kernel size for each of the {max(self.num_heads)} heads, "
                             f"got {self.kernels}")
        if self.embed_dim[0] % 8 != 0:
            raise ValueError(f"embed_dim[0] must be a multiple of 8 (the stem widths are dim/8, /4, /2), "
                             f"got {self.embed_dim[0]}")

    def windows(self) -> tuple[int, int, int]:
        """The attention windows the biases are trained on: the configured size, or the whole stage map
        when that is smaller at the training resolution."""
        res = TRAIN_SIZE // PATCH_SIZE
        out = []
        for i, ws in enumerate(self.window_size):
            if i > 0:
                res = (res - 1) // 2 + 1
            out.append(min(ws, res))
        return tuple(out)  # type: ignore[return-value]


VARIANTS = {
    "efficientvit_m0": EfficientViTMsraConfig((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5)),
    "efficientvit_m1": EfficientViTMsraConfig((128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3)),
    "efficientvit_m2": EfficientViTMsraConfig((128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3)),
    "efficientvit_m3": EfficientViTMsraConfig((128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5)),
    "efficientvit_m4": EfficientViTMsraConfig((128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3)),
    "efficientvit_m5": EfficientViTMsraConfig((192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3)),
}

DEFAULTS = FamilyDefaults(
    family="efficientvit_msra",
    crop_pct=0.875,
    first_conv="patch_embed.conv1.conv",
    classifier="head.linear",
    # padded stride-2 convs; windows are zero-padded to whole windows: any size works
    size_divisor=1,
    min_input_size=1,
    paper="EfficientViT: Memory Efficient Vision Transformer with Cascaded Group Attention (arXiv:2305.07027)",
)

_relu = nn.ReLU
BN = ("conv", "bn")  # timm's names for a conv-BN pair here


class Residual(nn.Module):
    """``x + drop_path(m(x))``. Fused, a depth-wise conv branch absorbs the identity into its kernel."""

    use_drop_path: Final[bool]

    def __init__(self, m: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.m = m
        self.use_drop_path = drop_path > 0
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_drop_path:
            return x + self.drop_path(self.m(x))
        return x + self.m(x)

    def fuse(self) -> nn.Module:
        self.use_drop_path = False  # DropPath is the identity at inference
        conv = self.m
        if (isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels and conv.stride == (1, 1)
                and conv.dilation == (1, 1) and conv.padding == (conv.kernel_size[0] // 2, conv.kernel_size[1] // 2)
                and conv.kernel_size[0] % 2 == 1 and conv.kernel_size[1] % 2 == 1):
            w = conv.weight.detach()
            b = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                             device=w.device)
            eye = identity_kernel(conv.out_channels, conv.groups, conv.kernel_size, w)
            return sum_branches(conv, [(w, b), (eye, torch.zeros_like(b))])
        return self


def _dw_conv(dim: int, bn_weight_init: float = 1.0) -> ConvNorm:
    return ConvNorm(dim, dim, 3, groups=dim, bn_weight_init=bn_weight_init, names=BN)


class ConvMlp(nn.Module):
    """1x1 ConvNorm + ReLU -> 1x1 ConvNorm (the second norm starts at zero, so blocks start as identity)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.pw1 = ConvNorm(dim, hidden, 1, act_layer=_relu, names=BN)
        self.pw2 = ConvNorm(hidden, dim, 1, bn_weight_init=0.0, names=BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw2(self.pw1(x))


class PatchMerging(nn.Module):
    """Stride-2 inverted residual with squeeze-excitation: 1x1 (x4) -> dw 3x3 s2 -> SE -> 1x1."""

    def __init__(self, dim: int, out_dim: int) -> None:
        super().__init__()
        hidden = dim * 4
        self.conv1 = ConvNorm(dim, hidden, 1, act_layer=_relu, names=BN)
        self.conv2 = ConvNorm(hidden, hidden, 3, stride=2, groups=hidden, act_layer=_relu, names=BN)
        self.se = SqueezeExcite(hidden, rd_ratio=0.25)
        self.conv3 = ConvNorm(hidden, out_dim, 1, names=BN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.se(self.conv2(self.conv1(x))))


class WindowDepthwise(nn.Module):
    """Inference form of a depth-wise conv that only ever sees one window size: per-channel (N x N)
    matrices (``deploy.fold.depthwise_conv_matrix``) applied with one ``baddbmm``. For 7x7 windows this is
    about 4x faster on CPU than a depth-wise conv call (whose cost is mostly fixed overhead at this size).
    Maps (B, C, N) to (B, C, N)."""

    def __init__(self, conv: nn.Conv2d, window: int, scale: float = 1.0) -> None:
        super().__init__()
        w = conv.weight.detach()
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype,
                                                                            device=w.device)
        # ``scale`` multiplies the output (the attention's q scaling, folded in).
        self.weight = nn.Parameter(depthwise_conv_matrix(conv, window, window) * scale, requires_grad=False)
        self.bias = nn.Parameter(bias.reshape(-1, 1, 1) * scale, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Channels as the matmul batch: (C, B, N) @ (C, N, N). Both permutes are views that BLAS reads
        # with a leading dimension, so nothing is copied.
        return torch.baddbmm(self.bias, x.permute(1, 0, 2), self.weight).permute(1, 0, 2)


class CascadedGroupAttention(AttentionBiasBase):
    """Each head reads its own channel slice plus the previous head's output, projects it to q/k/v with
    a 1x1 conv, refines q with a depth-wise conv and attends over the window with its own bias table."""

    dense_q: Final[bool]

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.val_dim = dim // num_heads
        self.scale = key_dim**-0.5
        self.qkvs = nn.ModuleList(
            ConvNorm(dim // num_heads, 2 * key_dim + self.val_dim, 1, names=BN) for _ in range(num_heads)
        )
        self.dws = nn.ModuleList(
            ConvNorm(key_dim, key_dim, kernels[i], groups=key_dim, names=BN) for i in range(num_heads)
        )
        self.proj = nn.Sequential(_relu(), ConvNorm(self.val_dim * num_heads, dim, 1, bn_weight_init=0.0,
                                                           names=BN))
        self.init_attention_bias(num_heads, window)
        self.window = window
        # Set by fuse(): the q depth-wise convs are WindowDepthwise matrices for the window size.
        self.dense_q = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_q:
            x = check_window(x, self.window)
        b, _, h, w = x.shape
        bias = self.attention_bias(h, w)  # heads, N, N
        feats_in = x.chunk(self.num_heads, dim=1)
        feat = feats_in[0]
        outs = []
        for i, (qkv, dw) in enumerate(zip(self.qkvs, self.dws)):
            if i > 0:
                feat = feat + feats_in[i]  # the cascade: the previous head's output joins this head's input
            q, k, v = qkv(feat).split([self.key_dim, self.key_dim, self.val_dim], dim=1)
            q = dw(q.flatten(2)) if self.dense_q else dw(q).flatten(2)  # B, key_dim, N
            out = attend_channels_first(q, k.flatten(2), v.flatten(2), bias[i], self.scale)
            feat = out.reshape(b, self.val_dim, h, w)
            outs.append(feat)
        return self.proj(torch.cat(outs, dim=1))

    def fuse(self) -> nn.Module:
        # Children are folded already (each dws entry is one conv); gather the biases once for the window.
        if all(isinstance(m, nn.Conv2d) for m in self.dws):
            # q's scaling folds into the matrices: attention then runs with scale 1.
            self.dws = nn.ModuleList(WindowDepthwise(m, self.window, self.scale) for m in self.dws)
            self.scale = 1.0
            self.dense_q = True
        self.build_bias_cache(self.window, self.window)
        return self


def check_window(x: torch.Tensor, window: int) -> torch.Tensor:
    """The fused attention's q convs are dense matrices for one window size: reject any other."""
    h, w = x.shape[-2], x.shape[-1]
    if h != window or w != window:
        raise ValueError(f"this fused attention takes {window}x{window} windows, got {h}x{w}")
    return x


torch.fx.wrap("check_window")


class LocalWindowAttention(nn.Module):
    """Cascaded group attention in non-overlapping ``window x window`` tiles; the map is zero-padded at the
    bottom/right to whole windows (as the reference does) and cropped back."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int, kernels: tuple[int, ...]) -> None:
        super().__init__()
        self.window = window
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, window, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return windows_to_map(self.attn(map_to_windows(x, self.window)), x, self.window)


def map_to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * nh * nw, C, ws, ws), zero-padded at the bottom/right to whole windows."""
    b, c, h, w = x.shape
    if h == ws and w == ws:
        return x
    pad_b = (ws - h % ws) % ws
    pad_r = (ws - w % ws) % ws
    if pad_b > 0 or pad_r > 0:
        x = F.pad(x, (0, pad_r, 0, pad_b))
    nh, nw = (h + pad_b) // ws, (w + pad_r) // ws
    # B, C, nh, ws, nw, ws -> B * nh * nw, C, ws, ws
    return x.view(b, c, nh, ws, nw, ws).permute(0, 2, 4, 1, 3, 5).reshape(b * nh * nw, c, ws, ws)


def windows_to_map(windows: torch.Tensor, like: torch.Tensor, ws: int) -> torch.Tensor:
    """The inverse of :func:`map_to_windows` for a map shaped like ``like`` (padding cropped away)."""
    b, _, h, w = like.shape
    if h == ws and w == ws:
        return windows
    c = windows.shape[1]
    nh, nw = (h + ws - 1) // ws, (w + ws - 1) // ws
    x = windows.view(b, nh, nw, c, ws, ws).permute(0, 3, 1, 4, 2, 5).reshape(b, c, nh * ws, nw * ws)
    if nh * ws != h or nw * ws != w:
        x = x[:, :, :h, :w].contiguous()
    return x


# FX records the size-dependent partitions as opaque calls.
torch.fx.wrap("map_to_windows")
torch.fx.wrap("windows_to_map")


class EfficientViTBlock(nn.Module):
    """The sandwich: dw conv, FFN, window attention, dw conv, FFN; each a residual."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, window: int, kernels: tuple[int, ...],
                 drop_path: float = 0.0) -> None:
        super().__init__()
        res = partial(Residual, drop_path=drop_path)
        self.dw0 = res(_dw_conv(dim, bn_weight_init=0.0))
        self.ffn0 = res(ConvMlp(dim, dim * 2))
        self.mixer = res(LocalWindowAttention(dim, key_dim, num_heads, window, kernels))
        self.dw1 = res(_dw_conv(dim, bn_weight_init=0.0))
        self.ffn1 = res(ConvMlp(dim, dim * 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn1(self.dw1(self.mixer(self.ffn0(self.dw0(x)))))


class Stage(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, downsample: bool, blocks: list[nn.Module],
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if downsample:
            res = partial(Residual, drop_path=drop_path)
            self.downsample: nn.Module = nn.Sequential(OrderedDict([
                ("res1", nn.Sequential(res(_dw_conv(in_dim)), res(ConvMlp(in_dim, in_dim * 2)))),
                ("patchmerge", PatchMerging(in_dim, out_dim)),
                ("res2", nn.Sequential(res(_dw_conv(out_dim)), res(ConvMlp(out_dim, out_dim * 2)))),
            ]))
        else:
            if in_dim != out_dim:
                raise ValueError(f"a stage without down-sampling keeps its width: {in_dim} != {out_dim}")
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class NormLinearHead(nn.Module):
    """Global pooling -> BatchNorm1d -> dropout -> Linear; ``fuse`` folds the norm into the linear.

    Without classes (``num_classes=0``) the head is the pooling alone (no norm), as in the reference.
    """

    def __init__(self, in_features: int, num_classes: int, drop_rate: float = 0.0, pool_type: str = "avg") -> None:
        super().__init__()
        self.in_features = in_features
        self.drop_rate = drop_rate
        self.pool_type = _check_pool(pool_type)
        self._build(num_classes)

    def _build(self, num_classes: int) -> None:
        # A trained norm is kept when only the classifier changes: it normalises features, not classes.
        keep_bn = num_classes > 0 and isinstance(getattr(self, "bn", None), nn.BatchNorm1d)
        if not keep_bn:
            self.bn: nn.Module = nn.BatchNorm1d(self.in_features) if num_classes > 0 else nn.Identity()
        self.drop = nn.Dropout(self.drop_rate)
        self.linear: nn.Module = nn.Linear(self.in_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.linear, nn.Linear):
            nn.init.trunc_normal_(self.linear.weight, std=0.02)
            nn.init.zeros_(self.linear.bias)

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            self.pool_type = _check_pool(pool_type)
        ref = next(self.parameters(), None)
        self._build(num_classes)
        if ref is not None:
            self.to(device=ref.device, dtype=ref.dtype)
        self.train(self.training)  # new modules start in training mode; follow the model's mode

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3)) if self.pool_type == "avg" else x.amax((2, 3))
        if pre_logits:
            return x
        return self.linear(self.drop(self.bn(x)))

    def fuse(self) -> nn.Module:
        if isinstance(self.bn, nn.modules.batchnorm._BatchNorm) and isinstance(self.linear, nn.Linear):
            self.linear = fuse_bn_linear(self.bn, self.linear)
            self.bn = nn.Identity()
        return self


def _check_pool(pool_type: str) -> str:
    if pool_type not in ("avg", "max"):
        raise ValueError(f"global_pool={pool_type!r} is not supported by this head; allowed: 'avg', 'max'")
    return pool_type


class EfficientViTMsra(Backbone):
    """EfficientViT-MSRA. ``feature_info`` lists the three stages (strides 16, 32, 64): the stride-16 stem
    leaves no stride-4/8 level."""

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form

    checkpoint_filter = None  # set below

    def __init__(self, cfg: EfficientViTMsraConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, DEFAULTS.min_input_size)
        d0 = cfg.embed_dim[0]
        self.patch_embed = nn.Sequential(OrderedDict([
            ("conv1", ConvNorm(in_chans, d0 // 8, 3, stride=2, act_layer=_relu, names=BN)),
            ("conv2", ConvNorm(d0 // 8, d0 // 4, 3, stride=2, act_layer=_relu, names=BN)),
            ("conv3", ConvNorm(d0 // 4, d0 // 2, 3, stride=2, act_layer=_relu, names=BN)),
            ("conv4", ConvNorm(d0 // 2, d0, 3, stride=2, names=BN)),
        ]))
        windows = cfg.windows()
        dpr = [r for rates in drop_path_rates(drop_path_rate, cfg.depth) for r in rates]
        stages = []
        in_dim = d0
        stride = PATCH_SIZE
        self.feature_info = []
        for i in range(3):
            dim = cfg.embed_dim[i]
            blocks = [
                EfficientViTBlock(dim, cfg.key_dim[i], cfg.num_heads[i], windows[i], cfg.kernels, dpr.pop(0))
                for _ in range(cfg.depth[i])
            ]
            stages.append(Stage(in_dim, dim, downsample=i > 0, blocks=blocks))
            if i > 0:
                stride *= 2
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            in_dim = dim
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.num_features = self.head_hidden_size = in_dim
        self.head = NormLinearHead(in_dim, num_classes, drop_rate=drop_rate, pool_type=global_pool)

    def get_classifier(self) -> nn.Module:
        return self.head.linear

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_embed(x)


def checkpoint_filter(state: dict[str, torch.Tensor], model: EfficientViTMsra) -> dict[str, torch.Tensor]:
    """timm's bias index buffers (derived data, in older files) are dropped; so is the head's norm when the
    model has no classifier (timm's head without classes has no norm either)."""
    own = model.state_dict()
    headless = not any(o.startswith("head.bn.") for o in own)
    return {
        k: v for k, v in state.items()
        if not k.endswith("attention_bias_idxs") and not (headless and k.startswith("head.bn."))
    }


EfficientViTMsra.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_efficientvit_msra(cfg: EfficientViTMsraConfig, num_classes: int = 1000, in_chans: int = 3,
                            drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                            global_pool: str = "avg") -> EfficientViTMsra:
    return EfficientViTMsra(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                            drop_path_rate=drop_path_rate, global_pool=global_pool)
