"""EfficientViT (MIT) b0-b3 (arXiv:2205.14756): multi-scale ReLU linear attention + MBConv.

Each vision stage alternates a context module (LiteMLA: 1x1 q/k/v conv, a depth-wise 5x5 + grouped 1x1
"aggregation" that makes a second, multi-scale set of heads, ReLU linear attention, 1x1 projection) and a
local module (MBConv without norms on its first two convs). Module and parameter names follow timm's
checkpoints, so ``efficientvit_b*`` weights load unchanged.

Differences from the reference (same outputs):

* The linear attention stays in the (B, heads, head_dim, N) layout the convs produce: ``v k^T`` then
  ``(v k^T) q``, so no token-major transposes are needed before or after it. As in the reference it runs in
  fp32 (autocast is switched off around it) with a ones row appended to v to get the normaliser.
* As in timm, ``num_features`` is the width of ``forward_features`` (the last stage) and
  ``head_hidden_size`` the width of the head's pre-logits (``head_widths[1]``), which is what
  ``forward_head(pre_logits=True)`` and ``num_classes=0`` return.
* ``drop_path_rate`` (stochastic depth on the residual branches) is available for training; timm has none.
"""

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import ConvNorm, DropPath
from ..layers.drop import drop_path_rates
from ..layers.mbconv import DSConv, MBConv
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, Stage


@dataclass(frozen=True)
class EfficientViTMitConfig:
    # widths/depths: the stem first, then the four stages (the last two are attention stages).
    widths: tuple[int, int, int, int, int]
    depths: tuple[int, int, int, int, int]
    head_dim: int
    head_widths: tuple[int, int]
    expand_ratio: float = 4.0
    # Kernel sizes of the multi-scale aggregation convs (one extra set of heads per entry).
    scales: tuple[int, ...] = (5,)

    def __post_init__(self) -> None:
        if len(self.widths) != 5 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be 5 positive ints (stem + 4 stages), got {self.widths}")
        if len(self.depths) != 5 or any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be 5 positive ints (stem + 4 stages), got {self.depths}")
        if len(self.head_widths) != 2:
            raise ValueError(f"head_widths must have 2 entries, got {self.head_widths}")
        for w in self.widths[3:]:
            if w % self.head_dim != 0:
                raise ValueError(f"attention stage width {w} must be a multiple of head_dim={self.head_dim}")
        if any(k % 2 == 0 for k in self.scales):
            raise ValueError(f"scales must be odd kernel sizes, got {self.scales}")


VARIANTS = {
    "efficientvit_b0": EfficientViTMitConfig((8, 16, 32, 64, 128), (1, 2, 2, 2, 2), 16, (1024, 1280)),
    "efficientvit_b1": EfficientViTMitConfig((16, 32, 64, 128, 256), (1, 2, 3, 3, 4), 16, (1536, 1600)),
    "efficientvit_b2": EfficientViTMitConfig((24, 48, 96, 192, 384), (1, 3, 4, 4, 6), 32, (2304, 2560)),
    "efficientvit_b3": EfficientViTMitConfig((32, 64, 128, 256, 512), (1, 4, 6, 6, 9), 32, (2304, 2560)),
}

DEFAULTS = FamilyDefaults(
    family="efficientvit_mit",
    crop_pct=0.95,
    first_conv="stem.in_conv.conv",
    classifier="head.classifier.4",
    # every stride-2 conv is padded and the attention is linear: any size works
    size_divisor=1,
    min_input_size=1,
    paper="EfficientViT: Multi-Scale Linear Attention for High-Resolution Dense Prediction (arXiv:2205.14756)",
)

_act = partial(nn.Hardswish, inplace=True)


class Residual(nn.Module):
    """``x + drop_path(main(x))``, or just ``main(x)`` for the stride-2 blocks that open a stage."""

    shortcut: Final[bool]
    use_drop_path: Final[bool]

    def __init__(self, main: nn.Module, shortcut: bool = True, drop_path: float = 0.0) -> None:
        super().__init__()
        self.main = main
        self.shortcut = shortcut
        self.use_drop_path = shortcut and drop_path > 0
        self.drop_path = DropPath(drop_path) if self.use_drop_path else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.shortcut:
            return self.main(x)
        if self.use_drop_path:
            return x + self.drop_path(self.main(x))
        return x + self.main(x)

    def fuse(self) -> nn.Module:
        self.use_drop_path = False  # DropPath is the identity at inference
        return self if self.shortcut else self.main


class LiteMLA(nn.Module):
    """Lightweight multi-scale linear attention: ``softmax`` replaced by a ReLU kernel, so the cost is
    linear in the number of tokens and any resolution works."""

    def __init__(self, in_chs: int, out_chs: int, head_dim: int = 8, heads_ratio: float = 1.0,
                 scales: tuple[int, ...] = (5,), eps: float = 1e-5) -> None:
        super().__init__()
        heads = int(in_chs // head_dim * heads_ratio)
        total = heads * head_dim
        self.head_dim = head_dim
        self.eps = eps
        self.qkv = ConvNorm(in_chs, 3 * total, 1, norm_layer=None)
        # q, k and v of each head are consecutive channels; the grouped 1x1 conv mixes within one of them.
        self.aggreg = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(3 * total, 3 * total, k, padding=k // 2, groups=3 * total, bias=False),
                nn.Conv2d(3 * total, 3 * total, 1, groups=3 * heads, bias=False),
            )
            for k in scales
        )
        self.proj = ConvNorm(total * (1 + len(scales)), out_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        qkv = self.qkv(x)
        branches = [qkv]
        for op in self.aggreg:
            branches.append(op(qkv))
        d = self.head_dim
        qkv = torch.cat(branches, dim=1).reshape(b, -1, 3 * d, h * w)  # B, heads (all scales), 3 * d, N
        # split, not slicing: one node each in exported graphs
        qk, v = qkv.split([2 * d, d], dim=2)
        q, k = torch.relu(qk).split([d, d], dim=2)
        out = relu_linear_attention(q, k, v, self.eps)
        return self.proj(out.reshape(b, -1, h, w))


def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """q, k, v: (B, heads, head_dim, N), q and k already through the ReLU kernel. Returns v's layout."""
    d = v.shape[2]
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # B, heads, d + 1, N: the ones row gives sum(k)
    kv = v @ k.transpose(-1, -2)  # B, heads, d + 1, d
    num, den = (kv @ q).split([d, 1], dim=2)  # B, heads, d (+ 1), N
    return num / (den + eps)


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """The ReLU linear attention in fp32 whatever the input dtype (the normaliser is a sum over all tokens:
    fp32 keeps it and the division finite under autocast); returns v's dtype. FX records it as one call
    (it branches on dtype and autocast state)."""
    dtype = v.dtype
    if dtype != torch.float32:
        q, k, v = q.float(), k.float(), v.float()
    if torch.jit.is_scripting():
        out = _linear_attention(q, k, v, eps)
    elif torch.is_autocast_enabled(q.device.type):
        with torch.autocast(device_type=q.device.type, enabled=False):
            out = _linear_attention(q, k, v, eps)
    else:
        out = _linear_attention(q, k, v, eps)
    return out.to(dtype)


torch.fx.wrap("relu_linear_attention")


class EfficientViTBlock(nn.Module):
    """Context module (LiteMLA) then local module (MBConv), each with a residual."""

    def __init__(self, dim: int, head_dim: int, expand_ratio: float, scales: tuple[int, ...],
                 drop_path: float = 0.0) -> None:
        super().__init__()
        self.context_module = Residual(LiteMLA(dim, dim, head_dim=head_dim, scales=scales), drop_path=drop_path)
        self.local_module = Residual(
            MBConv(dim, dim, expand_ratio=expand_ratio, norm_layers=(None, None, nn.BatchNorm2d),
                   act_layers=(_act, _act, None)),
            drop_path=drop_path,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_module(self.context_module(x))


class MitHead(nn.Module):
    """1x1 conv + BN + Hardswish, global pooling, Linear + LayerNorm + Hardswish, dropout, classifier.

    ``classifier`` keeps timm's indices (0: linear, 1: norm, 2: act, 3: dropout, 4: classifier).
    """

    def __init__(self, in_chs: int, widths: tuple[int, int], num_classes: int, drop_rate: float = 0.0,
                 pool_type: str = "avg") -> None:
        super().__init__()
        if pool_type not in ("avg", "max"):
            raise ValueError(f"global_pool={pool_type!r} is not supported by this head; allowed: 'avg', 'max'")
        self.pool_type = pool_type
        self.num_features = widths[1]
        self.in_conv = ConvNorm(in_chs, widths[0], 1, act_layer=_act)
        self.classifier = nn.Sequential(
            nn.Linear(widths[0], widths[1], bias=False),
            nn.LayerNorm(widths[1], eps=1e-5),
            _act(),
            nn.Dropout(drop_rate),
            nn.Linear(widths[1], num_classes) if num_classes > 0 else nn.Identity(),
        )

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            if pool_type not in ("avg", "max"):
                raise ValueError(f"global_pool={pool_type!r} is not supported by this head; allowed: 'avg', 'max'")
            self.pool_type = pool_type
        self.classifier[4] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.in_conv(x)
        x = x.mean((2, 3)) if self.pool_type == "avg" else x.amax((2, 3))
        x = self.classifier[3](self.classifier[2](self.classifier[1](self.classifier[0](x))))
        if pre_logits:
            return x
        return self.classifier[4](x)


class EfficientViTMit(Backbone):

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form
    def __init__(self, cfg: EfficientViTMitConfig, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, DEFAULTS.min_input_size)
        widths, depths = cfg.widths, cfg.depths
        stem_chs = widths[0]
        stem_layers: list[tuple[str, nn.Module]] = [
            ("in_conv", ConvNorm(in_chans, stem_chs, 3, stride=2, act_layer=_act))
        ]
        for i in range(depths[0]):
            stem_layers.append(
                (f"res{i}", Residual(DSConv(stem_chs, stem_chs, norm_layers=nn.BatchNorm2d, act_layers=(_act, None))))
            )
        self.stem = nn.Sequential(OrderedDict(stem_layers))

        # Stochastic depth grows linearly over the residual blocks of the four stages.
        n_res = [d - 1 for d in depths[1:3]] + list(depths[3:])
        dpr = [r for rates in drop_path_rates(drop_path_rate, n_res) for r in rates]
        stages = []
        in_chs = stem_chs
        for i, (out_chs, depth) in enumerate(zip(widths[1:], depths[1:])):
            attention = i >= 2
            # The stride-2 MBConv that opens a stage; attention stages drop its first two norms.
            norms = (None, None, nn.BatchNorm2d) if attention else nn.BatchNorm2d
            blocks: list[nn.Module] = [Residual(
                MBConv(in_chs, out_chs, stride=2, expand_ratio=cfg.expand_ratio, norm_layers=norms,
                       act_layers=(_act, _act, None)),
                shortcut=False,
            )]
            if attention:
                for _ in range(depth):
                    blocks.append(EfficientViTBlock(out_chs, cfg.head_dim, cfg.expand_ratio, cfg.scales, dpr.pop(0)))
            else:
                for _ in range(depth - 1):
                    blocks.append(Residual(
                        MBConv(out_chs, out_chs, expand_ratio=cfg.expand_ratio, act_layers=(_act, _act, None)),
                        drop_path=dpr.pop(0),
                    ))
            stages.append(Stage(blocks))
            in_chs = out_chs
        self.stages = nn.Sequential(*stages)
        self.norm = nn.Identity()
        self.head = MitHead(in_chs, cfg.head_widths, num_classes, drop_rate=drop_rate, pool_type=global_pool)
        self.num_features = in_chs
        self.head_hidden_size = cfg.head_widths[1]
        self.feature_info = [
            dict(num_chs=w, reduction=2 ** (i + 2), module=f"stages.{i}") for i, w in enumerate(widths[1:])
        ]

    def get_classifier(self) -> nn.Module:
        return self.head.classifier[4]


@register_family(DEFAULTS, VARIANTS)
def build_efficientvit_mit(cfg: EfficientViTMitConfig, num_classes: int = 1000, in_chans: int = 3,
                           drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                           global_pool: str = "avg") -> EfficientViTMit:
    return EfficientViTMit(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                           drop_path_rate=drop_path_rate, global_pool=global_pool)
