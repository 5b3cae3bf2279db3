"""The search space of EfficientFormer's latency-driven slimming (arXiv:2206.01191, section 4.1) and its points.

A :class:`SearchSpace` fixes four stages with a stem: the largest width and depth of each stage (the
supernet), the width grid (multiples of ``width_step`` from ``min_width``), the stages whose MetaPaths may
hold an MB3D block (the paper: the last two) and the hyper-parameters every block shares. A :class:`Subnet`
is one point: a width per stage and a choice per MetaPath (``"4d"``, ``"3d"`` or ``"id"`` for identity);
its kept blocks, in order, give the :class:`~effivit.models.efficientformer_custom.EfficientFormerArch`
that ``create_model("efficientformer_custom", arch=...)`` builds.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..models.efficientformer_custom import NUM_STAGES, EfficientFormerArch, StageArch

CHOICES = ("4d", "3d", "id")


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass(frozen=True)
class SearchSpace:
    """Stage widths (multiples of ``width_step``, from ``min_width`` to ``max_widths``), depths up to
    ``max_depths`` and where MB3D blocks may go; the block hyper-parameters are shared by every point."""

    max_widths: tuple[int, ...]
    max_depths: tuple[int, ...]
    img_size: int = 224
    min_width: int = 16
    width_step: int = 16
    mb3d_stages: tuple[int, ...] = (2, 3)
    mlp_ratio: float = 4.0
    pool_size: int = 3
    key_dim: int = 32
    num_heads: int = 8
    attn_ratio: float = 4.0

    def __post_init__(self) -> None:
        for name in ("max_widths", "max_depths", "mb3d_stages"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        _need(len(self.max_widths) == NUM_STAGES and len(self.max_depths) == NUM_STAGES,
              f"max_widths and max_depths need {NUM_STAGES} entries, got {self.max_widths}, {self.max_depths}")
        _need(self.width_step >= 2 and self.width_step % 2 == 0, f"width_step must be an even int >= 2, got "
                                                                 f"{self.width_step}")
        _need(self.min_width >= self.width_step and self.min_width % self.width_step == 0,
              f"min_width must be a positive multiple of width_step={self.width_step}, got {self.min_width}")
        for i, w in enumerate(self.max_widths):
            _need(w >= self.min_width and w % self.width_step == 0,
                  f"max_widths[{i}]={w} must be a multiple of width_step={self.width_step} and >= "
                  f"min_width={self.min_width}")
        _need(all(d >= 1 for d in self.max_depths), f"max_depths must be >= 1, got {self.max_depths}")
        _need(all(0 <= s < NUM_STAGES for s in self.mb3d_stages),
              f"mb3d_stages must be stage indices in 0..{NUM_STAGES - 1}, got {self.mb3d_stages}")
        _need(self.img_size >= 32 and self.img_size % 32 == 0,
              f"img_size must be a positive multiple of 32 (the network's stride), got {self.img_size}")
        # The block hyper-parameters are validated where they are used.
        self.arch_of(self.largest())

    # ---- the grid ----------------------------------------------------------------------------------------
    def widths(self, stage: int) -> list[int]:
        return list(range(self.min_width, self.max_widths[stage] + 1, self.width_step))

    def resolution(self, stage: int) -> int:
        return self.img_size // 2 ** (stage + 2)

    def kinds(self, stage: int) -> tuple[str, ...]:
        """The choices of a MetaPath in ``stage``: (4d, id), or (4d, 3d, id) where MB3D is allowed."""
        return ("4d", "3d", "id") if stage in self.mb3d_stages else ("4d", "id")

    def hparams(self) -> dict[str, Any]:
        return dict(mlp_ratio=self.mlp_ratio, pool_size=self.pool_size, key_dim=self.key_dim,
                    num_heads=self.num_heads, attn_ratio=self.attn_ratio)

    def largest(self) -> Subnet:
        """Every MetaPath an MB4D at the largest widths (the supernet's 4D path)."""
        return Subnet(self.max_widths, tuple(("4d",) * d for d in self.max_depths))

    def arch_of(self, subnet: Subnet, meta: Mapping[str, Any] | None = None) -> EfficientFormerArch:
        self.check(subnet)
        stages = tuple(StageArch(w, tuple(c for c in ch if c != "id")) for w, ch in zip(subnet.widths, subnet.choices))
        return EfficientFormerArch(stages=stages, img_size=self.img_size, meta=dict(meta or {}), **self.hparams())

    def check(self, subnet: Subnet) -> None:
        """A clear error when ``subnet`` is not a point of this space."""
        _need(len(subnet.widths) == NUM_STAGES and len(subnet.choices) == NUM_STAGES,
              f"a subnet has {NUM_STAGES} stages, got {subnet}")
        for i, (w, ch) in enumerate(zip(subnet.widths, subnet.choices)):
            _need(w in self.widths(i), f"stage {i}: width {w} is not in the space's {self.widths(i)}")
            _need(len(ch) == self.max_depths[i], f"stage {i}: {len(ch)} choices for {self.max_depths[i]} MetaPaths")
            bad = [c for c in ch if c not in self.kinds(i)]
            _need(not bad, f"stage {i}: choices {bad} not allowed here; allowed: {self.kinds(i)}")
            kept = [c for c in ch if c != "id"]
            _need(bool(kept), f"stage {i}: every MetaPath is an identity; a stage keeps at least one block")
            first = kept.index("3d") if "3d" in kept else len(kept)
            _need(all(c == "3d" for c in kept[first:]), f"stage {i}: MB3D blocks must end the stage, got {ch}")

    def contains_arch(self, arch: EfficientFormerArch) -> str:
        """'' when ``arch`` is buildable from this space's table entries, else why not."""
        if arch.img_size != self.img_size:
            return f"img_size {arch.img_size} differs from the space's {self.img_size}"
        if arch.hparams() != {**arch.hparams(), **self.hparams()}:
            return f"block hyper-parameters {arch.hparams()} differ from the space's {self.hparams()}"
        for i, s in enumerate(arch.stages):
            if s.width not in self.widths(i):
                return f"stage {i}: width {s.width} is not in the space's {self.widths(i)}"
            if s.num_3d and i not in self.mb3d_stages:
                return f"stage {i}: MB3D blocks are not in the space (mb3d_stages={list(self.mb3d_stages)})"
        return ""

    # ---- files -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSpace:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        _need(not unknown, f"unknown search-space field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**dict(d))


@dataclass(frozen=True)
class Subnet:
    """A point of a :class:`SearchSpace`: the width of each stage and the choice of each MetaPath."""

    widths: tuple[int, ...]
    choices: tuple[tuple[str, ...], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "choices", tuple(tuple(c) for c in self.choices))

    def replace_choice(self, stage: int, index: int, choice: str) -> Subnet:
        ch = [list(c) for c in self.choices]
        ch[stage][index] = choice
        return Subnet(self.widths, tuple(tuple(c) for c in ch))

    def replace_width(self, stage: int, width: int) -> Subnet:
        w = list(self.widths)
        w[stage] = width
        return Subnet(tuple(w), self.choices)

    def kept(self, stage: int) -> list[int]:
        """Indices of the MetaPaths of ``stage`` that hold a block."""
        return [j for j, c in enumerate(self.choices[stage]) if c != "id"]

    def key(self) -> str:
        return ";".join(f"{w}:{''.join({'4d': '4', '3d': '3', 'id': '-'}[c] for c in ch)}"
                        for w, ch in zip(self.widths, self.choices))

    def to_dict(self) -> dict[str, Any]:
        return {"widths": list(self.widths), "choices": [list(c) for c in self.choices]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Subnet:
        return cls(tuple(d["widths"]), tuple(tuple(c) for c in d["choices"]))


def random_subnet(space: SearchSpace, rng: random.Random) -> Subnet:
    """A random point: per stage a width, a depth (which MetaPaths keep a block) and, where allowed, how
    many of the kept blocks at the end are MB3D, each drawn uniformly."""
    widths, choices = [], []
    for i in range(NUM_STAGES):
        widths.append(rng.choice(space.widths(i)))
        n = space.max_depths[i]
        depth = rng.randint(1, n)
        keep = sorted(rng.sample(range(n), depth))
        n3 = rng.randint(0, depth) if "3d" in space.kinds(i) else 0
        ch = ["id"] * n
        for k, j in enumerate(keep):
            ch[j] = "3d" if k >= depth - n3 else "4d"
        choices.append(tuple(ch))
    return Subnet(tuple(widths), tuple(choices))


def scaled_uniform(space: SearchSpace, width_mult: float, depth_mult: float,
                   base_widths: Sequence[int] = (48, 96, 224, 448), base_depths: Sequence[int] = (3, 2, 6, 4),
                   num_3d: int = 1) -> EfficientFormerArch:
    """The published family (EfficientFormer-L1's layout) scaled uniformly: every width times
    ``width_mult`` (rounded to ``width_step``, at least ``min_width``), every depth times ``depth_mult``
    (rounded, at least 1), the last ``num_3d`` blocks MB3D; the space's block hyper-parameters."""
    from ..models.efficientformer_custom import uniform_arch

    step = space.width_step
    widths = tuple(max(space.min_width, int(round(w * width_mult / step)) * step) for w in base_widths)
    depths = tuple(max(1, int(round(d * depth_mult))) for d in base_depths)
    return uniform_arch(depths, widths, num_3d=min(num_3d, depths[-1]), img_size=space.img_size, **space.hparams())


# Named spaces: `effivit search --space NAME` (each field can be overridden on the command line).
SPACES: dict[str, SearchSpace] = {
    # ImageNet at 224 px: the supernet is EfficientFormer-L3's size (widths 64/128/320/512, depths
    # 4/4/12/6); the paper's L1 (48/96/224/448, 3/2/6/4) and L3 are points of it.
    "imagenet": SearchSpace(max_widths=(64, 128, 320, 512), max_depths=(4, 4, 12, 6), img_size=224),
    # CPU scale (the digits demo, 64 px): a ~1M-parameter supernet with narrower attention.
    "digits": SearchSpace(max_widths=(32, 64, 96, 128), max_depths=(2, 2, 4, 3), img_size=64, key_dim=16,
                          num_heads=4, attn_ratio=2.0),
    # The unit tests' space: every phase in seconds.
    "tiny": SearchSpace(max_widths=(16, 32, 32, 32), max_depths=(1, 1, 2, 2), img_size=32, key_dim=8,
                        num_heads=2, attn_ratio=2.0),
}
