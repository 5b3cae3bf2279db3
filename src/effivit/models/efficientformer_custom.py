"""EfficientFormer V1 with a free layout: the networks ``effivit search`` designs (arXiv:2206.01191, section 4).

EfficientFormer's latency-driven slimming picks, per stage, a width and a sequence of MetaBlocks: MB4D
(pool mixer + Conv-BN MLP on (B, C, H, W) maps) and MB3D (LayerNorm, MHSA with a learned offset bias, MLP
on tokens). The published variants (``efficientformer_l1/l3/l7``) are three points of that space; this file
builds any point from an *architecture file* (JSON, see :class:`EfficientFormerArch`)::

    model = effivit.create_model("efficientformer_custom", arch="runs/search/arch.json")

The blocks, stem, downsamplings, head, forward pass, deploy form and checkpoint filter are EfficientFormer's
own (:mod:`effivit.models.efficientformer`); only the assembly differs:

* Each stage lists its blocks (``"4d"`` / ``"3d"``); MB3D blocks form a suffix of their stage (the
  dimension-consistent design: maps, then tokens). A stage that ends in MB3D blocks and is not the last
  converts its tokens back to maps (:class:`ToMaps`, a permutation) for the next stride-2 convolution;
  the reference only has MB3D blocks in the last stage.
* The attention-bias tables are laid out for the grid of each stage at the architecture's ``img_size``
  (the size it was searched at) and resampled on other grids, as for the published variants.
* Without ``arch`` the default architecture is EfficientFormer-L1's layout (widths 48/96/224/448, depths
  3/2/6/4, the last block of stage 4 an MB3D, 224 px): parameter names equal timm's ``efficientformer_l1``,
  so its weights load and its logits are reproduced (tested).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers.drop import drop_path_rates
from ..registry import FamilyDefaults, register_family
from ._base import DistilledBackbone, Stage
from .efficientformer import (
    Attention,
    Downsample,
    EfficientFormer,
    Flat,
    MetaBlock1d,
    MetaBlock2d,
    Stem4,
)

ARCH_FORMAT = "effivit-efficientformer-arch"
ARCH_VERSION = 1
BLOCK_KINDS = ("4d", "3d")
NUM_STAGES = 4


class ArchError(ValueError):
    """A malformed architecture file or description (the message names the field and what is allowed)."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ArchError(msg)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class StageArch:
    """One stage: its width (channels) and its blocks in order, ``"4d"`` then ``"3d"``."""

    width: int
    blocks: tuple[str, ...]

    def __post_init__(self) -> None:
        _need(_is_int(self.width) and self.width >= 2, f"stage width must be an int >= 2, got {self.width!r}")
        object.__setattr__(self, "blocks", tuple(self.blocks))
        _need(len(self.blocks) >= 1, "a stage needs at least one block")
        bad = [b for b in self.blocks if b not in BLOCK_KINDS]
        _need(not bad, f"block kinds must be one of {BLOCK_KINDS}, got {bad}")
        first_3d = self.blocks.index("3d") if "3d" in self.blocks else len(self.blocks)
        _need(all(b == "3d" for b in self.blocks[first_3d:]),
              f"MB3D blocks must form the end of their stage (maps, then tokens), got {list(self.blocks)}")

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def num_3d(self) -> int:
        return self.blocks.count("3d")


@dataclass(frozen=True)
class EfficientFormerArch:
    """An EfficientFormer V1 architecture: four stages plus the hyper-parameters every block shares.

    ``img_size`` is the input size the architecture was designed (searched) for: the attention-bias tables
    are laid out for the grids it gives. ``meta`` carries free-form provenance (the search that made it)
    and does not take part in comparisons.
    """

    stages: tuple[StageArch, ...]
    img_size: int = 224
    mlp_ratio: float = 4.0
    pool_size: int = 3
    key_dim: int = 32
    num_heads: int = 8
    attn_ratio: float = 4.0
    layer_scale_init_value: float = 1e-5
    meta: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        stages = tuple(s if isinstance(s, StageArch) else StageArch(**s) for s in self.stages)
        object.__setattr__(self, "stages", stages)
        _need(len(stages) == NUM_STAGES, f"an EfficientFormer has {NUM_STAGES} stages, got {len(stages)}")
        _need(stages[0].width % 2 == 0, f"the first stage's width must be even (the stem halves it), "
                                        f"got {stages[0].width}")
        _need(_is_int(self.img_size) and self.img_size >= 32 and self.img_size % 32 == 0,
              f"img_size must be a positive multiple of 32 (the network's stride), got {self.img_size!r}")
        _need(isinstance(self.mlp_ratio, (int, float)) and self.mlp_ratio > 0,
              f"mlp_ratio must be > 0, got {self.mlp_ratio!r}")
        _need(_is_int(self.pool_size) and self.pool_size >= 1 and self.pool_size % 2 == 1,
              f"pool_size must be an odd int >= 1, got {self.pool_size!r}")
        _need(_is_int(self.key_dim) and self.key_dim >= 1, f"key_dim must be an int >= 1, got {self.key_dim!r}")
        _need(_is_int(self.num_heads) and self.num_heads >= 1, f"num_heads must be an int >= 1, got {self.num_heads!r}")
        _need(isinstance(self.attn_ratio, (int, float)) and self.attn_ratio > 0 and
              float(self.attn_ratio * self.key_dim).is_integer(),
              f"attn_ratio must be > 0 with attn_ratio * key_dim an integer, got {self.attn_ratio!r}")
        _need(isinstance(self.layer_scale_init_value, (int, float)) and self.layer_scale_init_value > 0,
              f"layer_scale_init_value must be > 0, got {self.layer_scale_init_value!r}")
        _need(isinstance(self.meta, Mapping), f"meta must be a mapping, got {type(self.meta).__name__}")

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(s.width for s in self.stages)

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(s.depth for s in self.stages)

    def resolution(self, stage: int, img_size: int | None = None) -> int:
        """Side of the square map stage ``stage`` sees at ``img_size`` (default: the design size)."""
        return (img_size or self.img_size) // 2 ** (stage + 2)

    def describe(self) -> str:
        """One line: ``48:4d*3 | 96:4d*2 | 224:4d*6 | 448:4d*3,3d*1``."""
        parts = []
        for s in self.stages:
            runs = [f"4d*{s.depth - s.num_3d}"] if s.depth > s.num_3d else []
            runs += [f"3d*{s.num_3d}"] if s.num_3d else []
            parts.append(f"{s.width}:{','.join(runs)}")
        return " | ".join(parts)

    def hparams(self) -> dict[str, Any]:
        """The fields every block shares (what a latency table must agree on)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("stages", "img_size", "meta")}

    # ---- files ---------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ARCH_FORMAT,
            "version": ARCH_VERSION,
            "stages": [{"width": s.width, "blocks": list(s.blocks)} for s in self.stages],
            "img_size": self.img_size,
            **self.hparams(),
            "meta": dict(self.meta),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "architecture") -> EfficientFormerArch:
        """Validate and build; every problem is an :class:`ArchError` naming ``source`` and the field."""
        try:
            _need(isinstance(d, Mapping), f"expected a JSON object, got {type(d).__name__}")
            _need(d.get("format") == ARCH_FORMAT, f"'format' must be {ARCH_FORMAT!r}, got {d.get('format')!r}")
            version = d.get("version")
            _need(_is_int(version) and 1 <= version <= ARCH_VERSION,
                  f"'version' must be an int in 1..{ARCH_VERSION} (this effivit reads up to {ARCH_VERSION}), "
                  f"got {version!r}")
            allowed = {f.name for f in fields(cls)} | {"format", "version"}
            unknown = sorted(set(d) - allowed)
            _need(not unknown, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
            _need("stages" in d, "the 'stages' field is missing")
            stages = d["stages"]
            _need(isinstance(stages, list), f"'stages' must be a list of {NUM_STAGES} objects, got "
                                            f"{type(stages).__name__}")
            parsed = []
            for i, s in enumerate(stages):
                _need(isinstance(s, Mapping) and set(s) == {"width", "blocks"},
                      f"stages[{i}] must be an object with exactly 'width' and 'blocks', got {s!r}")
                _need(isinstance(s["blocks"], list), f"stages[{i}].blocks must be a list, got {s['blocks']!r}")
                try:
                    parsed.append(StageArch(s["width"], tuple(s["blocks"])))
                except ArchError as e:
                    raise ArchError(f"stages[{i}]: {e}") from None
            kwargs = {k: v for k, v in d.items() if k not in ("format", "version", "stages")}
            return cls(stages=tuple(parsed), **kwargs)
        except ArchError as e:
            raise ArchError(f"{source}: {e}") from None

    def save(self, path: str | os.PathLike) -> Path:
        """Write the architecture file (atomically: a temporary file renamed over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> EfficientFormerArch:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"architecture file not found: {path}")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArchError(f"{path}: not a JSON architecture file ({e})") from None
        return cls.from_dict(d, source=str(path))


def resolve_arch(arch: str | os.PathLike | Mapping[str, Any] | EfficientFormerArch) -> EfficientFormerArch:
    """An architecture from a file path, a dict in the file's format, or an :class:`EfficientFormerArch`."""
    if isinstance(arch, EfficientFormerArch):
        return arch
    if isinstance(arch, Mapping):
        return EfficientFormerArch.from_dict(arch)
    if isinstance(arch, (str, os.PathLike)):
        return EfficientFormerArch.load(arch)
    raise ArchError(f"arch must be a path to an architecture file, a dict or an EfficientFormerArch, "
                    f"got {type(arch).__name__}")


def uniform_arch(depths: tuple[int, ...], widths: tuple[int, ...], num_3d: int = 1, img_size: int = 224,
                 **hparams: Any) -> EfficientFormerArch:
    """The published family's layout: MB4D everywhere, the last ``num_3d`` blocks of stage 4 MB3D."""
    stages = []
    for i, (d, w) in enumerate(zip(depths, widths)):
        k = num_3d if i == NUM_STAGES - 1 else 0
        stages.append(StageArch(w, ("4d",) * (d - k) + ("3d",) * k))
    return EfficientFormerArch(stages=tuple(stages), img_size=img_size, **hparams)


# EfficientFormer-L1's layout (timm's efficientformer_l1): the default without an architecture file.
DEFAULT_ARCH = uniform_arch((3, 2, 6, 4), (48, 96, 224, 448), num_3d=1)

DEFAULTS = FamilyDefaults(
    family="efficientformer_custom",
    crop_pct=0.95,
    first_conv="stem.conv1",
    classifier=("head", "head_dist"),
    size_divisor=32,
    fixed_input_size=False,
    has_distill_head=True,
    paper="EfficientFormer: Vision Transformers at MobileNet Speed (arXiv:2206.01191), searched layouts",
)

VARIANTS = {"efficientformer_custom": DEFAULT_ARCH}


# ---- the pieces (also what the latency table measures) ------------------------------------------------
class ToMaps(nn.Module):
    """(B, H, W, C) tokens -> (B, C, H, W) maps: a stage that ends in MB3D blocks hands maps to the next
    stride-2 convolution (a permutation; in channels_last memory no copy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def make_stem(in_chans: int, width: int) -> nn.Module:
    return Stem4(in_chans, width)


def make_downsample(in_chs: int, out_chs: int) -> nn.Module:
    return Downsample(in_chs, out_chs)


def make_block(kind: str, dim: int, resolution: int, arch: EfficientFormerArch, drop_path: float = 0.0) -> nn.Module:
    """An MB4D (``"4d"``, on maps) or MB3D (``"3d"``, on (B, H, W, C) tokens; attention bias for a
    ``resolution`` x ``resolution`` grid) block of width ``dim``."""
    ls = arch.layer_scale_init_value
    if kind == "4d":
        return MetaBlock2d(dim, arch.pool_size, arch.mlp_ratio, drop_path, ls)
    if kind == "3d":
        attn = Attention(dim, arch.key_dim, arch.num_heads, arch.attn_ratio, max(1, resolution))
        return MetaBlock1d(dim, arch.mlp_ratio, drop_path, ls, attn)
    raise ArchError(f"block kind must be one of {BLOCK_KINDS}, got {kind!r}")


def stage_modules(arch: EfficientFormerArch, stage: int, drop_paths: list[float] | None = None) -> list[nn.Module]:
    """The modules of one stage's block sequence, in order: MB4D blocks, then (``Flat``, MB3D blocks and,
    unless it is the last stage, ``ToMaps``)."""
    s = arch.stages[stage]
    res = arch.resolution(stage)
    dps = drop_paths or [0.0] * s.depth
    out: list[nn.Module] = []
    for j, kind in enumerate(s.blocks):
        if kind == "3d" and (j == 0 or s.blocks[j - 1] == "4d"):
            out.append(Flat())
        out.append(make_block(kind, s.width, res, arch, float(dps[j])))
    if s.blocks[-1] == "3d" and stage < NUM_STAGES - 1:
        out.append(ToMaps())
    return out


class EfficientFormerCustom(EfficientFormer):
    """An EfficientFormer built from an :class:`EfficientFormerArch`; forward, deploy form, distillation
    head and checkpoint filter are :class:`~effivit.models.efficientformer.EfficientFormer`'s."""

    def __init__(self, arch: EfficientFormerArch, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.0, drop_path_rate: float = 0.0, global_pool: str = "avg") -> None:
        # EfficientFormer's constructor takes the published config (MB3D only in the last stage); the
        # assembly below is the general one, on the same base class and with the same module names.
        DistilledBackbone.__init__(self, in_chans, num_classes, DEFAULTS.size_divisor, global_pool)
        self.arch = arch
        self.stem = make_stem(in_chans, arch.widths[0])
        dpr = drop_path_rates(drop_path_rate, arch.depths)
        stages = []
        prev = arch.widths[0]
        for i, s in enumerate(arch.stages):
            down: nn.Module = make_downsample(prev, s.width) if i > 0 else nn.Identity()
            stages.append(Stage(stage_modules(arch, i, dpr[i]), down))
            self.feature_info.append(dict(num_chs=s.width, reduction=2 ** (i + 2), module=f"stages.{i}"))
            prev = s.width
        self.stages = nn.Sequential(*stages)
        self.tokens_out = arch.stages[-1].blocks[-1] == "3d"
        self.last_stage = NUM_STAGES - 1
        self.num_features = self.head_hidden_size = prev
        self.norm = nn.LayerNorm(prev) if self.tokens_out else nn.BatchNorm2d(prev)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._new_head(num_classes)
        self.head_dist = self._new_head(num_classes)
        self._init_weights()


@register_family(DEFAULTS, VARIANTS)
def build_efficientformer_custom(
    cfg: EfficientFormerArch, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.0,
    drop_path_rate: float = 0.0, global_pool: str = "avg",
    arch: str | os.PathLike | Mapping[str, Any] | EfficientFormerArch | None = None,
) -> EfficientFormerCustom:
    """``arch``: an architecture file (``effivit search`` writes them), a dict in its format or an
    :class:`EfficientFormerArch`; None builds the default (EfficientFormer-L1's layout)."""
    return EfficientFormerCustom(cfg if arch is None else resolve_arch(arch), num_classes=num_classes,
                                 in_chans=in_chans, drop_rate=drop_rate, drop_path_rate=drop_path_rate,
                                 global_pool=global_pool)
