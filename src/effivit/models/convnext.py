"""ConvNeXt (arXiv:2201.03545) and ConvNeXt V2 (arXiv:2301.00808), one family file.

A block is a 7x7 depth-wise conv, LayerNorm, an inverted MLP (4x) with GELU and a residual. V1 scales the
MLP output by a learned layer scale; V2 drops the layer scale and puts Global Response Normalization (GRN)
between GELU and the second linear. Both versions are registered as separate families (``convnext``,
``convnextv2``) so their published figures attach; they share every class here.

Parameter names follow timm's checkpoints, which carry the official weights. How this differs from timm:

* One block layout for every variant: the depth-wise conv on (B, C, H, W), then LayerNorm and a Linear MLP
  on (B, H, W, C) tokens with one permute pair (timm's ``conv_mlp=False``). timm builds ConvNeXt-V2
  atto/femto/pico/nano with 1x1 convs instead (``conv_mlp=True``); their checkpoints load through
  ``checkpoint_filter``, which views the 1x1 conv weights as Linear weights. The MLP's linears take the
  tokens as one (B*H*W, C) matrix (a view), so ONNX Runtime fuses each MatMul with its bias.
* The stem turns its input into channels_last memory once, so every later map is stored (B, H, W, C) and
  the permutes around the MLP are views, not copies (same numbers; the 7x7 depth-wise convs on the large
  maps are also 2-4x faster on CPU in that layout).
* GRN computes ``x * (1 + w N(x)) + b`` with the norm as ``sqrt(sum(x * x))`` (see ``layers.norm``).
* ``deploy.fuse`` turns each block into :class:`FusedConvNeXtBlock`: the layer scale (V1) and the GRN bias
  (V2) folded into the second linear, drop path removed, and the MLP as 1x1 convs on the channels_last map
  (``deploy.optimize(model, "cpu")`` puts them on oneDNN's fastest kernel), so the fused block is
  dwconv -> LayerNorm -> 1x1 conv -> GELU [-> GRN scale] -> 1x1 conv, + x, with no permute or copy.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ..deploy.fold import fold_affine_into_input, fold_affine_into_output
from ..layers import DropPath, LayerNorm2d
from ..layers.classifier import NormMlpClassifierHead
from ..layers.drop import drop_path_rates
from ..layers.norm import GlobalResponseNorm
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, checkpoint_seq

NORM_EPS = 1e-6


@dataclass(frozen=True)
class ConvNeXtConfig:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    use_grn: bool = False
    # Initial layer scale (V1); None disables it (V2).
    ls_init_value: float | None = 1e-6
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    patch_size: int = 4
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if len(self.depths) != 4 or any(not isinstance(d, int) or d < 1 for d in self.depths):
            raise ValueError(f"depths must be 4 positive ints, got {self.depths}")
        if len(self.dims) != 4 or any(not isinstance(d, int) or d < 1 for d in self.dims):
            raise ValueError(f"dims must be 4 positive ints, got {self.dims}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, got {self.kernel_size}")
        if self.ls_init_value is not None and not self.ls_init_value > 0:
            raise ValueError(f"ls_init_value must be > 0 or None (no layer scale), got {self.ls_init_value}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if self.patch_size not in (2, 4, 8):
            raise ValueError(f"patch_size must be 2, 4 or 8, got {self.patch_size}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


def _v2(depths: tuple[int, int, int, int], dims: tuple[int, int, int, int]) -> ConvNeXtConfig:
    return ConvNeXtConfig(depths=depths, dims=dims, use_grn=True, ls_init_value=None)


VARIANTS_V1 = {
    "convnext_tiny": ConvNeXtConfig(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)),
    "convnext_small": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)),
    "convnext_base": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)),
    "convnext_large": ConvNeXtConfig(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)),
}

VARIANTS_V2 = {
    "convnextv2_atto": _v2((2, 2, 6, 2), (40, 80, 160, 320)),
    "convnextv2_femto": _v2((2, 2, 6, 2), (48, 96, 192, 384)),
    "convnextv2_pico": _v2((2, 2, 6, 2), (64, 128, 256, 512)),
    "convnextv2_nano": _v2((2, 2, 8, 2), (80, 160, 320, 640)),
    "convnextv2_tiny": _v2((3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextv2_base": _v2((3, 3, 27, 3), (128, 256, 512, 1024)),
}

DEFAULTS_V1 = FamilyDefaults(
    family="convnext",
    crop_pct=0.875,
    first_conv="stem.0",
    classifier="head.fc",
    # the 4x4 stem and three 2x2 downsamplings need 32 pixels (smaller leaves an empty map)
    size_divisor=1,
    min_input_size=32,
    paper="A ConvNet for the 2020s (arXiv:2201.03545)",
)

DEFAULTS_V2 = FamilyDefaults(
    family="convnextv2",
    crop_pct=0.875,
    first_conv="stem.0",
    classifier="head.fc",
    # the 4x4 stem and three 2x2 downsamplings need 32 pixels (smaller leaves an empty map)
    size_divisor=1,
    min_input_size=32,
    paper="ConvNeXt V2: Co-designing and Scaling ConvNets with Masked Autoencoders (arXiv:2301.00808)",
)


class Stem(nn.Sequential):
    """Patchify conv (k = stride = patch size) then LayerNorm (timm names ``stem.0``, ``stem.1``).

    The input is moved to channels_last memory first: every later map then keeps that layout, so the
    channels-last MLPs read and write their tokens without copies.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        for layer in self:
            x = layer(x)
        return x


class ConvNeXtMlp(nn.Module):
    """Linear -> GELU -> [GRN] -> Linear on (B, H, W, C) tokens (timm names ``fc1``, ``grn``, ``fc2``).

    The linears see the tokens as one (B*H*W, C) matrix and GRN sees a (B, H, W, C) view: both are views of
    the same memory in eager mode, and the 2-D form lets ONNX Runtime fuse each MatMul with its bias.
    """

    def __init__(self, dim: int, hidden: int, use_grn: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden, eps=NORM_EPS, channels_last=True) if use_grn else nn.Identity()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        x = self.act(self.fc1(x.reshape(b * h * w, c)))
        x = self.grn(x.reshape(b, h, w, -1)).reshape(b * h * w, -1)
        return self.fc2(x).reshape(b, h, w, -1)


class ConvNeXtBlock(nn.Module):
    """``x + drop_path(gamma * mlp(norm(dwconv(x))))``; norm and MLP work on (B, H, W, C) tokens."""

    def __init__(self, dim: int, kernel_size: int = 7, mlp_ratio: float = 4.0, use_grn: bool = False,
                 ls_init_value: float | None = 1e-6, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=NORM_EPS)
        self.mlp = ConvNeXtMlp(dim, int(mlp_ratio * dim), use_grn)
        self.gamma = nn.Parameter(torch.full((dim,), ls_init_value)) if ls_init_value is not None else None
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)  # B, H, W, C (a view: the map is stored channels_last)
        x = self.mlp(self.norm(x))
        if self.gamma is not None:
            x = x * self.gamma
        return shortcut + self.drop_path(x.permute(0, 3, 1, 2))

    def fuse(self) -> nn.Module:
        # fc2(grn_scale(x) + b) = fc2'(grn_scale(x)) with fc2' = fc2 plus W b in its bias; then
        # gamma * (W x + c) = (gamma W) x + gamma c.
        fc2 = self.mlp.fc2
        grn = self.mlp.grn
        if isinstance(grn, GlobalResponseNorm):
            grn = GlobalResponseNorm.from_channels_last(grn)  # a new module sharing the parameters
            bias = grn.take_bias()
            if bias is not None:
                fc2 = fold_affine_into_input(fc2, torch.ones_like(bias), bias)
        if self.gamma is not None:
            fc2 = fold_affine_into_output(fc2, self.gamma)
        norm = LayerNorm2d(self.norm.normalized_shape[0], eps=self.norm.eps).to(self.norm.weight)
        norm.load_state_dict(self.norm.state_dict())
        return FusedConvNeXtBlock(self.conv_dw, norm, _pointwise(self.mlp.fc1), grn, _pointwise(fc2))


def _pointwise(linear: nn.Linear) -> nn.Conv2d:
    """A Linear over channels as the equivalent 1x1 conv."""
    conv = nn.Conv2d(linear.in_features, linear.out_features, 1, bias=linear.bias is not None)
    conv = conv.to(linear.weight)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        if linear.bias is not None:
            conv.bias.copy_(linear.bias)
    return conv


class FusedConvNeXtBlock(nn.Module):
    """Inference form of :class:`ConvNeXtBlock`: ``x + fc2(grn(gelu(fc1(norm(dwconv(x))))))`` with every step
    on (B, C, H, W) maps stored channels_last, the MLP as 1x1 convs (oneDNN's fastest kernel on CPU after
    ``deploy.optimize(model, "cpu")``), layer scale and GRN bias folded into ``fc2``. About 1.5x faster than the
    Linear form on CPU at batch 8 (paired measurement, one thread)."""

    def __init__(self, conv_dw: nn.Conv2d, norm: nn.Module, fc1: nn.Module, grn: nn.Module,
                 fc2: nn.Module) -> None:
        super().__init__()
        self.conv_dw = conv_dw
        self.norm = norm
        self.fc1 = fc1
        self.act = nn.GELU()
        self.grn = grn
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(self.grn(self.act(self.fc1(self.norm(self.conv_dw(x))))))


class ConvNeXtStage(nn.Module):
    """Optional down-sampling (LayerNorm then a 2x2 stride-2 conv) followed by the blocks."""

    def __init__(self, in_chs: int, out_chs: int, depth: int, stride: int, drop_path: list[float],
                 cfg: ConvNeXtConfig) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if stride > 1 or in_chs != out_chs:
            self.downsample = nn.Sequential(
                LayerNorm2d(in_chs, eps=NORM_EPS),
                nn.Conv2d(in_chs, out_chs, kernel_size=stride, stride=stride),
            )
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[
            ConvNeXtBlock(out_chs, cfg.kernel_size, cfg.mlp_ratio, cfg.use_grn, cfg.ls_init_value, drop_path[i])
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class ConvNeXt(Backbone):

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form
    checkpoint_filter = None  # set below

    def __init__(self, cfg: ConvNeXtConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 drop_path_rate: float | None = None, global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS_V1.size_divisor, DEFAULTS_V1.min_input_size)
        dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        if not 0.0 <= dpr_total < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr_total}")
        dims = cfg.dims
        self.stem = Stem(
            nn.Conv2d(in_chans, dims[0], kernel_size=cfg.patch_size, stride=cfg.patch_size),
            LayerNorm2d(dims[0], eps=NORM_EPS),
        )
        dpr = drop_path_rates(dpr_total, cfg.depths)
        stages = []
        in_chs = dims[0]
        reduction = cfg.patch_size
        for i in range(4):
            stride = 1 if i == 0 else 2
            reduction *= stride
            stages.append(ConvNeXtStage(in_chs, dims[i], cfg.depths[i], stride, dpr[i], cfg))
            in_chs = dims[i]
            self.feature_info.append(dict(num_chs=dims[i], reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = in_chs
        # timm's ordering for the released weights: pool -> norm -> fc (no norm on the feature map).
        self.norm = nn.Identity()
        self.head = NormMlpClassifierHead(in_chs, num_classes, pool_type=global_pool, drop_rate=drop_rate,
                                          norm_eps=NORM_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def checkpoint_filter(state: dict[str, torch.Tensor], model: ConvNeXt) -> dict[str, torch.Tensor]:
    """timm checkpoints load as they are, except timm's 1x1 conv MLP form (``conv_mlp=True``, used for
    ConvNeXt-V2 atto..nano): those conv weights are viewed as the Linear weights they are."""
    own = model.state_dict()
    out = {}
    for k, v in state.items():
        if k in own and v.dim() == 4 and own[k].dim() == 2 and v.shape[2:] == (1, 1):
            v = v.flatten(1)
        out[k] = v
    return out


ConvNeXt.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS_V2, VARIANTS_V2)
@register_family(DEFAULTS_V1, VARIANTS_V1)
def build_convnext(cfg: ConvNeXtConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                   drop_path_rate: float | None = None, global_pool: str = "avg") -> ConvNeXt:
    return ConvNeXt(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                    drop_path_rate=drop_path_rate, global_pool=global_pool)
