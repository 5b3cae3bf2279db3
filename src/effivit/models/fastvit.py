"""FastViT (arXiv:2303.14189): a hybrid vision transformer built for structural reparameterization.

Stages of RepMixer blocks (a depth-wise token mixer that folds, with its residual and layer scale, into one
depth-wise conv) and, for the ``sa``/``ma`` variants, a last stage of attention blocks preceded by a
reparameterizable conditional position encoding (RepCPE, a depth-wise 7x7 conv plus identity). The stem, the
stage down-sampling (RepLKNet-style large kernel + 1x1 MobileOne block) and the final conv are MobileOne
blocks (``layers.rep``).

Parameter names follow timm's ``fastvit_*`` checkpoints; the only difference is the shape of layer-scale
parameters (``(C,)`` here, ``(C, 1, 1)`` in timm), mapped by :func:`checkpoint_filter`.

Inference form (``deploy.fuse``), beyond the paper's reparameterization (MobileOne branches, RepMixer,
RepCPE -> single convs): every BatchNorm is folded (the ConvFFN's depth-wise conv, and the attention block's
pre-norm into the qkv projection), and every layer scale is folded into the conv/linear before it (the
FFN's ``fc2``, the attention's ``proj``), so no BatchNorm, multiplication by a scale or multi-branch block
remains. For CPU speed the fused model also (a) runs the channel-multiplier convs (down-sampling, final conv:
one input channel, two outputs per group) as depth-wise convs on repeated channels (``ChannelRepeatConv``),
(b) stores conv weights channels_last so the network runs NHWC and (c) exports GELU in a form ONNX Runtime fuses (:class:`GELU`). None of these
changes the function computed. Sending 1x1 convs to oneDNN is a CPU deploy pass (``deploy.optimize``).
"""

# No `from __future__ import annotations`: TorchScript reads `Final[bool]` class annotations as objects.
import math
from dataclasses import dataclass
from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

from ..deploy.fold import bn_scale_shift, fold_affine_into_input, fold_affine_into_output, sum_branches
from ..layers import ClassifierHead, DropPath, LayerScale2d
from ..layers.attention import attend, merge_heads
from ..layers.drop import drop_path_rates
from ..layers.rep import ConvBn, MobileOneBlock, ReparamLargeKernelConv, branch_kernel
from ..layers.se import SqueezeExcite
from ..registry import FamilyDefaults, register_family
from ._base import Backbone, checkpoint_seq

MIXERS = ("repmixer", "attention")


@dataclass(frozen=True)
class FastViTConfig:
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    mlp_ratios: tuple[float, float, float, float]
    # Token mixer per stage: "repmixer" or "attention".
    token_mixers: tuple[str, str, str, str] = ("repmixer",) * 4
    # Stages that start with a RepCPE conditional position encoding.
    pos_embs: tuple[bool, bool, bool, bool] = (False,) * 4
    repmixer_kernel_size: int = 3
    cpe_kernel_size: int = 7
    down_patch_size: int = 7
    head_dim: int = 32
    # None: no layer scale (plain residuals).
    layer_scale_init_value: float | None = 1e-5
    # Width of the final MobileOne conv, relative to the last stage.
    cls_ratio: float = 2.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("depths", "dims", "mlp_ratios", "token_mixers", "pos_embs"):
            if len(getattr(self, name)) != 4:
                raise ValueError(f"{name} must have 4 entries (one per stage), got {getattr(self, name)}")
        if any(d < 1 for d in self.depths):
            raise ValueError(f"depths must be positive, got {self.depths}")
        bad = [m for m in self.token_mixers if m not in MIXERS]
        if bad:
            raise ValueError(f"token_mixers {bad} are not supported; allowed: {MIXERS}")
        for dim, mixer in zip(self.dims, self.token_mixers):
            if mixer == "attention" and dim % self.head_dim != 0:
                raise ValueError(f"attention stage width {dim} must be a multiple of head_dim={self.head_dim}")
        for name in ("repmixer_kernel_size", "cpe_kernel_size", "down_patch_size"):
            k = getattr(self, name)
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd int, got {k}")


_SA = dict(token_mixers=("repmixer", "repmixer", "repmixer", "attention"), pos_embs=(False, False, False, True))

VARIANTS = {
    "fastvit_t8": FastViTConfig(depths=(2, 2, 4, 2), dims=(48, 96, 192, 384), mlp_ratios=(3, 3, 3, 3)),
    "fastvit_t12": FastViTConfig(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), mlp_ratios=(3, 3, 3, 3)),
    "fastvit_s12": FastViTConfig(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), mlp_ratios=(4, 4, 4, 4)),
    "fastvit_sa12": FastViTConfig(depths=(2, 2, 6, 2), dims=(64, 128, 256, 512), mlp_ratios=(4, 4, 4, 4), **_SA),
    "fastvit_sa24": FastViTConfig(depths=(4, 4, 12, 4), dims=(64, 128, 256, 512), mlp_ratios=(4, 4, 4, 4), **_SA),
    "fastvit_sa36": FastViTConfig(depths=(6, 6, 18, 6), dims=(64, 128, 256, 512), mlp_ratios=(4, 4, 4, 4), **_SA),
    "fastvit_ma36": FastViTConfig(depths=(6, 6, 18, 6), dims=(76, 152, 304, 608), mlp_ratios=(4, 4, 4, 4), **_SA),
}

DEFAULTS = FamilyDefaults(
    family="fastvit",
    # Trained and evaluated at 256 (timm_results.csv); ma36's tags carry crop_pct 0.95 from that table.
    input_size=(3, 256, 256),
    crop_pct=0.9,
    first_conv="stem.0.conv_kxk.0.conv",
    classifier="head.fc",
    # Stem stride 4, then three stride-2 patch embeddings.
    # every stride-2 conv is padded: any size works
    size_divisor=1,
    min_input_size=1,
    paper="FastViT: A Fast Hybrid Vision Transformer using Structural Reparameterization (arXiv:2303.14189)",
)


class GELU(nn.GELU):
    """``nn.GELU`` (exact, erf form) with an ONNX export that ONNX Runtime runs as one kernel.

    ONNX opsets below 20 have no Gelu op. The exporter writes ``x * (0.5 * (erf(x / sqrt2) + 1))``, an
    operand order ONNX Runtime's Gelu fusion does not recognise, so each activation stays five element-wise
    ops (and breaks the blocked-layout conv chains). Written as ``x * (erf(x / sqrt2) + 1) * 0.5`` during
    export, it is fused. Same function; eager, TorchScript and torch.compile run ``F.gelu``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if torch.onnx.is_in_onnx_export():
                return x * (torch.erf(x / math.sqrt(2.0)) + 1.0) * 0.5
        return F.gelu(x)


def _gelu() -> nn.Module:
    return GELU()


def _squeeze_excite(channels: int) -> nn.Module:
    # Reduction 1/16 with no rounding to a multiple (timm's rd_divisor=1 for FastViT).
    return SqueezeExcite(channels, rd_ratio=1.0 / 16, rd_divisor=1)


def _init_normal(layer: nn.Module) -> None:
    # The reference's trunc_normal_(std=0.02) truncates at +-2, i.e. 100 std: the same as a plain normal,
    # without the rejection pass (which makes building the large variants slow).
    nn.init.normal_(layer.weight, std=0.02)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def _layer_scale(dim: int, init_value: float | None) -> nn.Module:
    return LayerScale2d(dim, init_value) if init_value is not None else nn.Identity()


def _scale_of(layer_scale: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The per-channel factor a layer scale applies (ones for ``nn.Identity``)."""
    if isinstance(layer_scale, LayerScale2d):
        return layer_scale.gamma.detach()
    return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)


def _fold_layer_scale(owner: nn.Module, layer_path: str, scale_attr: str) -> None:
    """Fold ``owner.<scale_attr>`` (a layer scale applied to the output of ``owner.<layer_path>``, a conv or
    linear, with only linear steps such as dropout between them) into that layer."""
    scale = getattr(owner, scale_attr)
    if isinstance(scale, LayerScale2d):
        parent_path, _, name = layer_path.rpartition(".")
        parent = owner.get_submodule(parent_path)
        setattr(parent, name, fold_affine_into_output(getattr(parent, name), scale.gamma))
        setattr(owner, scale_attr, nn.Identity())


class PatchEmbed(nn.Module):
    """Stride-2 down-sampling: a depth-wise-grouped 7x7 (+ parallel 3x3) conv, then a 1x1 MobileOne block."""

    def __init__(self, in_chs: int, out_chs: int, patch_size: int = 7, stride: int = 2) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            ReparamLargeKernelConv(in_chs, out_chs, patch_size, stride, groups=in_chs, small_kernel=3),
            MobileOneBlock(out_chs, out_chs, 1, act_layer=_gelu),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class RepMixer(nn.Module):
    """x + layer_scale * (mixer(x) - norm(x)) with depth-wise MobileOne blocks; ``fuse()`` gives one
    depth-wise conv (identity, scale and both branches summed into its kernel)."""

    def __init__(self, dim: int, kernel_size: int = 3, layer_scale_init_value: float | None = 1e-5) -> None:
        super().__init__()
        self.dim = dim
        self.kernel_size = kernel_size
        self.norm = MobileOneBlock(dim, dim, kernel_size, groups=dim, num_conv_branches=0, use_scale_branch=False)
        self.mixer = MobileOneBlock(dim, dim, kernel_size, groups=dim)
        self.layer_scale = _layer_scale(dim, layer_scale_init_value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer_scale(self.mixer(x) - self.norm(x))

    def fuse(self) -> nn.Module:
        # The walker has already turned both MobileOne blocks into convs; a direct call fuses them here.
        mixer = self.mixer.fuse() if isinstance(self.mixer, MobileOneBlock) else self.mixer
        norm = self.norm.fuse() if isinstance(self.norm, MobileOneBlock) else self.norm
        k = mixer.kernel_size
        wm, bm = branch_kernel(mixer, self.dim, self.dim, k, mixer.weight)
        wn, bn = branch_kernel(norm, self.dim, self.dim, k, mixer.weight)
        g = _scale_of(self.layer_scale, bm)
        g4 = g.reshape(-1, 1, 1, 1)
        identity = branch_kernel(nn.Identity(), self.dim, self.dim, k, mixer.weight)
        return sum_branches(mixer, [identity, (wm * g4, bm * g), (-wn * g4, -bn * g)])


class RepCPE(nn.Module):
    """Conditional position encoding (arXiv:2102.10882) as x + depthwise_conv(x); ``fuse()`` folds the
    residual into the conv's kernel."""

    def __init__(self, dim: int, kernel_size: int = 7) -> None:
        super().__init__()
        self.dim = dim
        self.pos_enc = nn.Conv2d(dim, dim, kernel_size, 1, kernel_size // 2, groups=dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pos_enc(x) + x

    def fuse(self) -> nn.Module:
        k = self.pos_enc.kernel_size
        like = self.pos_enc.weight
        parts = [branch_kernel(self.pos_enc, self.dim, self.dim, k, like),
                 branch_kernel(nn.Identity(), self.dim, self.dim, k, like)]
        return sum_branches(self.pos_enc, parts)


class ConvFFN(nn.Module):
    """Depth-wise 7x7 conv-BN, then a 1x1-conv MLP (fc1 -> GELU -> fc2)."""

    def __init__(self, dim: int, hidden: int, kernel_size: int = 7, drop: float = 0.0) -> None:
        super().__init__()
        self.conv = ConvBn(dim, dim, kernel_size, groups=dim)
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.act = GELU()
        self.drop = nn.Dropout(drop)
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        for m in (self.conv.conv, self.fc1, self.fc2):
            _init_normal(m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(self.conv(x))))))

    def fuse(self) -> nn.Module:
        self.drop = nn.Identity()  # a no-op in eval that still costs an op dispatch
        return self


class RepMixerBlock(nn.Module):
    """MetaFormer block with RepMixer as token mixer: x = mixer(x); x + layer_scale * ffn(x)."""

    def __init__(self, dim: int, mlp_ratio: float, kernel_size: int = 3, drop: float = 0.0,
                 drop_path: float = 0.0, layer_scale_init_value: float | None = 1e-5) -> None:
        super().__init__()
        self.token_mixer = RepMixer(dim, kernel_size, layer_scale_init_value)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale = _layer_scale(dim, layer_scale_init_value)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.token_mixer(x)
        return x + self.drop_path(self.layer_scale(self.mlp(x)))

    def fuse(self) -> nn.Module:
        _fold_layer_scale(self, "mlp.fc2", "layer_scale")
        return self


class Attention(nn.Module):
    """Multi-head self-attention over the H*W tokens of a (B, C, H, W) map (qkv without bias).

    ``qkv``/``proj`` are Linear layers on tokens (timm's parameters); ``to_convs()`` (used by the fused
    model) turns them into 1x1 convs on the map, so CPU inference takes oneDNN's kernels like every other
    projection and the channels_last map is read and written without layout copies.
    """

    conv_proj: Final[bool]

    def __init__(self, dim: int, head_dim: int = 32, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = dim // head_dim
        self.head_dim = head_dim
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = attn_drop
        self.proj_drop = nn.Dropout(proj_drop)
        self.conv_proj = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = h * w
        # Through NHWC: views for channels_last maps (the fused model's layout), one copy otherwise.
        if self.conv_proj:
            qkv = self.qkv(x).permute(0, 2, 3, 1).reshape(b, n, 3, self.num_heads, self.head_dim)
        else:
            tokens = x.permute(0, 2, 3, 1).reshape(b, n, c)  # B, N, C
            qkv = self.qkv(tokens).reshape(b, n, 3, self.num_heads, self.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # B, heads, N, head_dim
        out = merge_heads(attend(q, k, v, dropout_p=self.attn_drop if self.training else 0.0))  # B, N, C
        if self.conv_proj:
            return self.proj_drop(self.proj(out.reshape(b, h, w, c).permute(0, 3, 1, 2)))
        out = self.proj_drop(self.proj(out))
        return out.reshape(b, h, w, c).permute(0, 3, 1, 2)

    def to_convs(self) -> None:
        """Replace the Linear projections by the equivalent 1x1 convs (inference form)."""
        if not self.conv_proj:
            self.qkv = _linear_to_conv(self.qkv)
            self.proj = _linear_to_conv(self.proj)
            self.conv_proj = True


def _linear_to_conv(linear: nn.Linear) -> nn.Conv2d:
    w = linear.weight.detach()
    conv = nn.Conv2d(w.shape[1], w.shape[0], 1, bias=linear.bias is not None).to(device=w.device, dtype=w.dtype)
    conv.weight.data.copy_(w[:, :, None, None])
    if linear.bias is not None:
        conv.bias.data.copy_(linear.bias.detach())
    return conv


class AttentionBlock(nn.Module):
    """MetaFormer block with attention: x + ls1 * attn(BN(x)); x + ls2 * ffn(x)."""

    def __init__(self, dim: int, mlp_ratio: float, head_dim: int = 32, drop: float = 0.0, drop_path: float = 0.0,
                 layer_scale_init_value: float | None = 1e-5) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(dim)
        self.token_mixer = Attention(dim, head_dim)
        self.layer_scale_1 = _layer_scale(dim, layer_scale_init_value)
        self.drop_path1 = DropPath(drop_path)
        self.mlp = ConvFFN(dim, int(dim * mlp_ratio), drop=drop)
        self.layer_scale_2 = _layer_scale(dim, layer_scale_init_value)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.layer_scale_1(self.token_mixer(self.norm(x))))
        return x + self.drop_path2(self.layer_scale_2(self.mlp(x)))

    def fuse(self) -> nn.Module:
        # BN -> Linear over channels: the norm's affine map folds into qkv; the layer scales into the
        # projections they follow.
        if isinstance(self.norm, nn.modules.batchnorm._BatchNorm):
            self.token_mixer.qkv = fold_affine_into_input(self.token_mixer.qkv, *bn_scale_shift(self.norm))
            self.norm = nn.Identity()
        _fold_layer_scale(self, "token_mixer.proj", "layer_scale_1")
        self.token_mixer.proj_drop = nn.Identity()
        self.token_mixer.to_convs()
        _fold_layer_scale(self, "mlp.fc2", "layer_scale_2")
        return self


class FastViTStage(nn.Module):
    def __init__(self, in_chs: int, out_chs: int, depth: int, mixer: str, downsample: bool, pos_emb: bool,
                 mlp_ratio: float, cfg: FastViTConfig, drop_path: list[float], proj_drop: float) -> None:
        super().__init__()
        self.grad_checkpointing = False
        if not downsample and in_chs != out_chs:
            raise ValueError(f"a stage without down-sampling keeps its width, got {in_chs} -> {out_chs}")
        self.downsample = PatchEmbed(in_chs, out_chs, cfg.down_patch_size) if downsample else nn.Identity()
        self.pos_emb = RepCPE(out_chs, cfg.cpe_kernel_size) if pos_emb else nn.Identity()
        blocks: list[nn.Module] = []
        for dp in drop_path:
            if mixer == "repmixer":
                blocks.append(RepMixerBlock(out_chs, mlp_ratio, cfg.repmixer_kernel_size, proj_drop, dp,
                                            cfg.layer_scale_init_value))
            else:
                blocks.append(AttentionBlock(out_chs, mlp_ratio, cfg.head_dim, proj_drop, dp,
                                             cfg.layer_scale_init_value))
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_emb(self.downsample(x))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return x


class FastViT(Backbone):

    feature_chain = True  # stem and stages pass (B, C, H, W) maps: timm's FeatureListNet form
    checkpoint_filter = None  # set below (needs the function defined after the class)
    final_module_names = ("final_conv",)

    def __init__(self, cfg: FastViTConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                 proj_drop_rate: float = 0.0, drop_path_rate: float | None = None,
                 global_pool: str = "avg") -> None:
        super().__init__(in_chans, num_classes, DEFAULTS.size_divisor, DEFAULTS.min_input_size)
        dims = cfg.dims
        d0 = dims[0]
        # Stem (stride 4): 3x3 s2 conv, depth-wise 3x3 s2 conv, 1x1 conv; all MobileOne blocks with GELU.
        self.stem = nn.Sequential(
            MobileOneBlock(in_chans, d0, 3, stride=2, act_layer=_gelu),
            MobileOneBlock(d0, d0, 3, stride=2, groups=d0, act_layer=_gelu),
            MobileOneBlock(d0, d0, 1, act_layer=_gelu),
        )
        dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
        dpr = drop_path_rates(dpr_total, cfg.depths)
        stages = []
        prev = d0
        reduction = 4
        self.feature_info = []
        for i in range(4):
            downsample = i > 0 or prev != dims[i]
            stages.append(FastViTStage(prev, dims[i], cfg.depths[i], cfg.token_mixers[i], downsample,
                                       cfg.pos_embs[i], cfg.mlp_ratios[i], cfg, [float(d) for d in dpr[i]],
                                       proj_drop_rate))
            reduction *= 2 if downsample else 1
            prev = dims[i]
            self.feature_info.append(dict(num_chs=prev, reduction=reduction, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        final = int(dims[-1] * cfg.cls_ratio)
        self.final_conv = MobileOneBlock(dims[-1], final, 3, groups=dims[-1], act_layer=_gelu,
                                         se_layer=_squeeze_excite)
        self.num_features = self.head_hidden_size = final
        self.head = ClassifierHead(final, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                _init_normal(m)

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_conv(x)

    def fuse(self) -> nn.Module:
        """Called last by ``deploy.fuse`` (children are fused first): CPU-friendly layouts and kernels.

        Conv weights are stored channels_last: a conv with a channels_last weight gives a channels_last
        output, so the whole network then runs NHWC, which oneDNN's depth-wise and 1x1 kernels read without
        re-ordering activations around every conv (with ``deploy.optimize(model, "cpu")``'s 1x1 convs on
        oneDNN instead of the BLAS path, together about 1.5x faster on CPU, fp32, batch 1 and 8); values are
        unchanged and export ignores strides.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
        return self

def checkpoint_filter(state: dict[str, torch.Tensor], model: FastViT) -> dict[str, torch.Tensor]:
    """timm checkpoints store layer scales as (C, 1, 1); ours are (C,)."""
    out = {}
    for k, v in state.items():
        if k.endswith(".gamma") and v.dim() == 3:
            v = v.reshape(-1)
        out[k] = v
    return out


FastViT.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_fastvit(cfg: FastViTConfig, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
                  proj_drop_rate: float = 0.0, drop_path_rate: float | None = None,
                  global_pool: str = "avg") -> FastViT:
    return FastViT(cfg, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                   proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate, global_pool=global_pool)
