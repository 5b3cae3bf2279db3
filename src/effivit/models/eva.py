"""EVA-02 (arXiv:2303.11331): a plain ViT with 2-D rotary position embedding, SwiGLU and sub-LN.

Patch 14 embedding, a class token and a learned absolute position table (as DeiT, ``models/deit.py``), then
pre-norm blocks whose attention rotates q and k of the patch tokens by a 2-D rotary table (RoPE, arXiv:
2104.09864: half the rotation frequencies follow the row, half the column) and whose feed-forward is SwiGLU
(``layers/mlp.py``); base and large add a LayerNorm on the SwiGLU's hidden features (sub-LN) and keep q/k/v
as separate projections. The classifier reads the average of the patch tokens after a LayerNorm.

Parameter names are timm's (``blocks.<i>.attn.{qkv, q_bias, v_bias}`` or ``{q_proj, k_proj, v_proj}``,
``blocks.<i>.mlp.{fc1 | fc1_g, fc1_x, norm}, fc2``, ``fc_norm``, ``head``), so timm's checkpoints (the official
weights) load unchanged; ``checkpoint_filter`` also maps the original EVA-02 files' names and resamples a
position table of another grid.

How this differs from timm:

* The rotary table is computed from the input's token grid in every forward (``layers/rope.py``:
  positions rescaled to the 16x16 pretraining grid, timm's numbers), never stored; the absolute table is
  resampled for the grid (bicubic, as timm). Any input whose sides are multiples of 14 runs, always (timm
  needs ``dynamic_img_size=True``); ``img_size=`` at creation sizes the absolute table as timm does.
* The attention is the shared :class:`~effivit.layers.attention.Attention`; ``deploy.fuse`` merges q/k/v into
  one projection with one bias, packs the split SwiGLU into one Linear and folds the sub-LN's affine part
  into ``fc2``.
* Exports to ONNX (the rotary table is built from shapes, with ops ONNX has) and scripts with TorchScript.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers.attention import Attention
from ..layers.drop import drop_path_rates
from ..layers.mlp import SwiGLU
from ..layers.rope import build_rope_table
from ..registry import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, FamilyDefaults, register_family
from .deit import NORM_EPS, Block, VisionTransformer, _pair, resample_checkpoint_pos_embed

# FX: the grid comes from the input's shape, so the table is one recorded call.
torch.fx.wrap("build_rope_table")


@dataclass(frozen=True)
class Eva02Config:
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 14
    img_size: int = 224
    mlp_ratio: float = 4 * 2 / 3  # SwiGLU's hidden width: 2/3 of a 4x MLP (same parameter count)
    # base/large: q/k/v as three Linears and a LayerNorm on the SwiGLU's hidden features (sub-LN);
    # tiny/small: one qkv Linear with learned q/v biases and a packed SwiGLU, no sub-LN.
    separate_qkv: bool = False
    sub_ln: bool = False
    # Rotary positions are rescaled so any grid spans this one (EVA-02 was pretrained at 224 = 16 x 14).
    rope_ref_grid: tuple[int, int] = (16, 16)
    rope_temperature: float = 10000.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "img_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"embed_dim={self.embed_dim} / num_heads={self.num_heads} must give a head size "
                             f"divisible by 4 (a 2-D rotary table)")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size={self.img_size} must be a multiple of patch_size={self.patch_size}")
        if not self.mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if len(self.rope_ref_grid) != 2 or min(self.rope_ref_grid) < 1:
            raise ValueError(f"rope_ref_grid must be two positive ints, got {self.rope_ref_grid}")
        if not self.rope_temperature > 0:
            raise ValueError(f"rope_temperature must be > 0, got {self.rope_temperature}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


_SIZES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12, separate_qkv=True, sub_ln=True),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, separate_qkv=True, sub_ln=True),
}
VARIANTS = {
    f"eva02_{size}_patch14_{img}": Eva02Config(img_size=img, **_SIZES[size])
    for size, sizes in (("tiny", (224, 336)), ("small", (224, 336)), ("base", (224, 448)), ("large", (224, 448)))
    for img in sizes
}

DEFAULTS = FamilyDefaults(
    family="eva02",
    mean=OPENAI_CLIP_MEAN,
    std=OPENAI_CLIP_STD,
    crop_pct=0.9,
    first_conv="patch_embed.proj",
    classifier="head",
    size_divisor=14,  # the patch size: any multiple runs (absolute table resampled, rotary table computed)
    paper="EVA-02: A Visual Representation for Neon Genesis (arXiv:2303.11331)",
)


class Eva02(VisionTransformer):
    """EVA-02: :class:`~effivit.models.deit.VisionTransformer` with a rotary table computed for each grid."""

    def __init__(self, cfg: Eva02Config, *, blocks: list[nn.Module], **kwargs: Any) -> None:
        super().__init__(blocks=blocks, embed_dim=cfg.embed_dim, patch_size=cfg.patch_size,
                         head_init_scale=0.001, **kwargs)
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.rope_ref_grid = cfg.rope_ref_grid
        self.rope_temperature = cfg.rope_temperature

    def rope_table(self, grid_h: int, grid_w: int, x: torch.Tensor) -> torch.Tensor | None:
        return build_rope_table(grid_h, grid_w, self.head_dim, self.rope_ref_grid[0], self.rope_ref_grid[1],
                                self.rope_temperature, x.device)


# Original EVA-02 (and MIM-pretraining) checkpoint names -> timm's.
_RENAMES = (("mlp.ffn_ln", "mlp.norm"), ("attn.inner_attn_ln", "attn.norm"), ("mlp.w12", "mlp.fc1"),
            ("mlp.w1", "mlp.fc1_g"), ("mlp.w2", "mlp.fc1_x"), ("mlp.w3", "mlp.fc2"))
_PRETRAIN_ONLY = ("mask_token", "lm_head.weight", "lm_head.bias")


def checkpoint_filter(state: Mapping[str, torch.Tensor], model: Eva02) -> dict[str, torch.Tensor]:
    """timm checkpoints load as they are. Original EVA-02 files are renamed (``mlp.w1/w2/w3``, ``ffn_ln``, q/v
    biases of separate projections), their stored rotary buffers dropped (ours are computed); MIM-pretraining
    files lose their mask token and prediction head and their final norm becomes the pooling norm, as in timm.
    A position table of another grid is resampled to the model's."""
    separate = "blocks.0.attn.q_proj.weight" in state
    mim = "mask_token" in state
    out = {}
    for k, v in state.items():
        if "rope" in k or k in _PRETRAIN_ONLY:
            continue
        if mim and k in ("norm.weight", "norm.bias"):
            k = "fc_" + k
        for old, new in _RENAMES:
            k = k.replace(old, new)
        if separate:
            k = k.replace("attn.q_bias", "attn.q_proj.bias").replace("attn.v_bias", "attn.v_proj.bias")
        out[k] = v
    return resample_checkpoint_pos_embed(out, model)


Eva02.checkpoint_filter = staticmethod(checkpoint_filter)


@register_family(DEFAULTS, VARIANTS)
def build_eva02(
    cfg: Eva02Config,
    num_classes: int = 1000,
    in_chans: int = 3,
    img_size: int | tuple[int, int] | None = None,
    global_pool: str = "avg",
    drop_rate: float = 0.0,
    drop_path_rate: float | None = None,
    attn_drop_rate: float = 0.0,
    proj_drop_rate: float = 0.0,
    pos_drop_rate: float = 0.0,
    dynamic_img_size: bool | None = None,
) -> Eva02:
    """An EVA-02 model. ``img_size`` (default: the variant's) sets the grid of its absolute position table, as
    in timm; any input whose sides are multiples of 14 runs whatever it is (rotary tables follow the input).
    ``dynamic_img_size`` is accepted for timm compatibility and changes nothing (every size runs)."""
    dpr_total = cfg.drop_path_rate if drop_path_rate is None else drop_path_rate
    if not 0.0 <= dpr_total < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {dpr_total}")
    dim = cfg.embed_dim
    dpr = drop_path_rates(dpr_total, [cfg.depth])[0]

    def sub_ln(width: int) -> nn.Module:
        return nn.LayerNorm(width, eps=NORM_EPS)

    blocks = [
        Block(dim,
              Attention(dim, cfg.num_heads, qkv_bias=True if cfg.separate_qkv else "qv",
                        separate_qkv=cfg.separate_qkv, attn_drop=attn_drop_rate, proj_drop=proj_drop_rate),
              SwiGLU(dim, int(dim * cfg.mlp_ratio), norm_layer=sub_ln if cfg.sub_ln else None, drop=proj_drop_rate,
                     packed=not cfg.sub_ln),
              drop_path=dpr[i], num_prefix_tokens=1)
        for i in range(cfg.depth)
    ]
    return Eva02(cfg, blocks=blocks, img_size=_pair(cfg.img_size if img_size is None else img_size, "img_size"),
                 in_chans=in_chans, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                 pos_drop_rate=pos_drop_rate)
