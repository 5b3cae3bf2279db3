"""Model registry: every family file declares its variants as data and registers them here.

A registered *architecture* (``nextvit_small``) has one builder and one variant config. Published weights
are *tags* of an architecture (``nextvit_small.bd_in1k_384``), read from the reference tables shipped as
package data (``effivit/data/published.csv`` and ``timm_results.csv``), so model cards, the default input
size of a tag and the hub id of its official weights come from one place.
"""

from __future__ import annotations

import csv
import difflib
import fnmatch
import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from typing import Any

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Published:
    """ImageNet-1K figures for one released weight, as its authors (or timm's evaluation) report them."""

    top1: float | None
    params_m: float | None
    gmacs: float | None
    paper_name: str = ""
    latency_note: str = ""
    source: str = ""
    timm_top1: float | None = None
    timm_params_m: float | None = None
    timm_gmacs: float | None = None


@dataclass(frozen=True)
class PretrainedTag:
    """One released weight of an architecture: where it lives and how it was evaluated."""

    tag: str
    hf_hub_id: str
    input_size: tuple[int, int, int]
    crop_pct: float
    interpolation: str
    published: Published
    num_classes: int = 1000
    crop_mode: str = "center"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    pool_size: tuple[int, int] | None = None
    test_input_size: tuple[int, int, int] | None = None


@dataclass(frozen=True)
class FamilyDefaults:
    """What every variant of a family shares: preprocessing, head/stem names, declared capabilities.

    Contract tests read these instead of keeping lists of exceptions.
    """

    family: str
    mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN
    std: tuple[float, float, float] = IMAGENET_DEFAULT_STD
    input_size: tuple[int, int, int] = (3, 224, 224)
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    first_conv: str = "stem.0.conv"
    classifier: str | tuple[str, ...] = "head.fc"
    # Input H and W must be multiples of this (the product of the strides the architecture needs).
    size_divisor: int = 32
    # The smallest H and W the architecture takes (None: size_divisor). Fully convolutional families set
    # size_divisor=1 and the size below which a stage would get an empty map.
    min_input_size: int | None = None
    # True when the architecture only runs at its training size.
    fixed_input_size: bool = False
    has_distill_head: bool = False
    # Name of the paper (arXiv id) the family follows.
    paper: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    builder: Callable[..., Any]
    config: Any
    defaults: FamilyDefaults
    tags: tuple[PretrainedTag, ...] = field(default=())

    @property
    def family(self) -> str:
        return self.defaults.family

    @property
    def default_tag(self) -> PretrainedTag | None:
        return self.tags[0] if self.tags else None

    def get_tag(self, tag: str | None) -> PretrainedTag | None:
        if tag is None:
            return self.default_tag
        for t in self.tags:
            if t.tag == tag:
                return t
        allowed = ", ".join(t.tag for t in self.tags) or "none"
        raise ValueError(f"Unknown pretrained tag {tag!r} for model {self.name!r}; known tags: {allowed}")

    def pretrained_cfg(self, tag: str | None = None) -> dict[str, Any]:
        """A timm-style ``pretrained_cfg`` dict for this architecture (and tag, if any)."""
        d = self.defaults
        t = self.get_tag(tag)
        cfg: dict[str, Any] = {
            "architecture": self.name,
            "family": d.family,
            "tag": t.tag if t else "",
            "hf_hub_id": t.hf_hub_id if t else "",
            "num_classes": t.num_classes if t else 1000,
            "input_size": t.input_size if t else d.input_size,
            "fixed_input_size": d.fixed_input_size,
            "size_divisor": d.size_divisor,
            # timm's convention: (C, H, W) of the smallest input
            "min_input_size": (3,) + (d.size_divisor if d.min_input_size is None else d.min_input_size,) * 2,
            "crop_pct": t.crop_pct if t else d.crop_pct,
            "crop_mode": t.crop_mode if t else "center",
            "interpolation": t.interpolation if t else d.interpolation,
            "mean": t.mean if t and t.mean else d.mean,
            "std": t.std if t and t.std else d.std,
            "pool_size": t.pool_size if t else None,
            "test_input_size": t.test_input_size if t else None,
            "first_conv": d.first_conv,
            "classifier": d.classifier,
            "has_distill_head": d.has_distill_head,
            "paper": d.paper,
        }
        if t is not None:
            cfg["published"] = asdict(t.published)  # plain data: the whole cfg is JSON-serialisable
        return cfg


_REGISTRY: dict[str, ModelEntry] = {}


def _float(value: str) -> float | None:
    value = (value or "").strip()
    return float(value) if value else None


@functools.lru_cache(maxsize=1)
def reference_tables() -> tuple[tuple[dict[str, str], ...], dict[tuple[str, int], dict[str, str]]]:
    """The published figures (one row per weight) and timm's evaluation keyed by (weight, img_size)."""
    pkg = resources.files("effivit") / "data"
    with (pkg / "published.csv").open(newline="", encoding="utf-8") as f:
        published = tuple(csv.DictReader(f))
    with (pkg / "timm_results.csv").open(newline="", encoding="utf-8") as f:
        timm_rows = {(r["model"], int(r["img_size"])): r for r in csv.DictReader(f)}
    return published, timm_rows


@functools.lru_cache(maxsize=1)
def timm_tag_table() -> dict[str, list[dict[str, str]]]:
    """timm's released weights per architecture, in timm's order (``data/timm_tags.csv``, written by
    ``tools/make_timm_tags.py``)."""
    table: dict[str, list[dict[str, str]]] = {}
    with (resources.files("effivit") / "data" / "timm_tags.csv").open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            table.setdefault(row["model"].split(".", 1)[0], []).append(row)
    return table


def _hw(text: str) -> tuple[int, int] | None:
    return tuple(int(v) for v in text.split("x")) if text else None  # type: ignore[return-value]


def _published(row: Mapping[str, str] | None, weight: str, img: int) -> Published:
    _, timm_rows = reference_tables()
    timm_row = timm_rows.get((weight, img), {})
    row = row or {}
    return Published(
        top1=_float(row.get("top1", "")),
        params_m=_float(row.get("params_m", "")),
        gmacs=_float(row.get("gmacs", "")),
        paper_name=row.get("paper_name", ""),
        latency_note=row.get("latency_note", ""),
        source=row.get("source", ""),
        timm_top1=_float(timm_row.get("top1", "")),
        timm_params_m=_float(timm_row.get("param_count", "")),
        timm_gmacs=_float(timm_row.get("infer_gmacs", "")),
    )


def _tags_for(name: str, family: str) -> tuple[PretrainedTag, ...]:
    """timm's weights of ``name`` in timm's order (the first is the default), then weights only the papers'
    table lists; each with the published figures where ``published.csv`` has them."""
    published, timm_rows = reference_tables()
    papers = {row["model"]: row for row in published if row["family"] == family and row["model"].startswith(name + ".")}
    tags = []
    for row in timm_tag_table().get(name, []):
        weight = row["model"]
        h, w = _hw(row["input_size"]) or (224, 224)
        test = _hw(row["test_input_size"])
        tags.append(PretrainedTag(
            tag=weight.split(".", 1)[1],
            hf_hub_id=row["hf_hub_id"] or f"timm/{weight}",
            input_size=(3, h, w),
            crop_pct=_float(row["crop_pct"]) or 0.9,
            interpolation=row["interpolation"] or "bicubic",
            published=_published(papers.get(weight), weight, h),
            num_classes=int(row["num_classes"] or 0),
            crop_mode=row["crop_mode"] or "center",
            mean=tuple(float(v) for v in row["mean"].split()) or None,
            std=tuple(float(v) for v in row["std"].split()) or None,
            pool_size=_hw(row["pool_size"]),
            test_input_size=(3, *test) if test else None,
        ))
    known = {f"{name}.{t.tag}" for t in tags}
    for weight, row in papers.items():
        if weight in known:
            continue
        img = int(row["img_size"])
        timm_row = timm_rows.get((weight, img), {})
        tags.append(PretrainedTag(
            tag=weight.split(".", 1)[1],
            hf_hub_id=f"timm/{weight}",
            input_size=(3, img, img),
            crop_pct=_float(timm_row.get("crop_pct", "")) or 0.9,
            interpolation=timm_row.get("interpolation") or "bicubic",
            published=_published(row, weight, img),
        ))
    return tuple(tags)


def register_family(defaults: FamilyDefaults, variants: Mapping[str, Any]):
    """Decorator for a family's builder ``fn(config, **model_kwargs) -> nn.Module``.

    Registers one architecture per entry of ``variants`` (name -> config).
    """

    def decorator(builder: Callable[..., Any]) -> Callable[..., Any]:
        for name, config in variants.items():
            if name in _REGISTRY:
                raise ValueError(f"Model {name!r} is registered twice")
            _REGISTRY[name] = ModelEntry(name, builder, config, defaults, _tags_for(name, defaults.family))
        return builder

    return decorator


def _ensure_models_imported() -> None:
    # Family files register on import; importing here keeps `effivit.registry` usable on its own.
    from . import models  # noqa: F401


def split_model_name(name: str) -> tuple[str, str | None]:
    arch, _, tag = name.partition(".")
    return arch, (tag or None)


def get_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (``arch`` or ``arch.tag``); a clear error for unknown names."""
    _ensure_models_imported()
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    arch, tag = split_model_name(name)
    entry = _REGISTRY.get(arch)
    if entry is None:
        close = difflib.get_close_matches(arch, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(
            f"Unknown model {name!r}.{hint} See effivit.list_models() for the {len(_REGISTRY)} known models."
        )
    if tag is not None:
        entry.get_tag(tag)  # validates the tag
    return entry


def list_models(
    pattern: str | Iterable[str] = "", *, family: str | None = None, pretrained: bool = False
) -> list[str]:
    """Registered architecture names matching a glob pattern (or any of several).

    With ``pretrained=True`` the names of released weights (``arch.tag``) are listed instead.
    """
    _ensure_models_imported()
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    patterns = [p for p in patterns if p] or ["*"]
    out = []
    for name, entry in sorted(_REGISTRY.items()):
        if family is not None and entry.family != family:
            continue
        names = [f"{name}.{t.tag}" for t in entry.tags] if pretrained else [name]
        out.extend(n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns))
    return out


def list_families() -> list[str]:
    _ensure_models_imported()
    return sorted({e.family for e in _REGISTRY.values()})


def builder_kwargs(entry: ModelEntry) -> set[str]:
    """The keyword arguments a family's builder accepts (to reject unknown ones by name)."""
    sig = inspect.signature(entry.builder)
    return {n for i, n in enumerate(sig.parameters) if i > 0}


def with_config(entry: ModelEntry, **changes: Any) -> ModelEntry:
    """An entry whose variant config has some fields replaced (for tests and research variants)."""
    return replace(entry, config=replace(entry.config, **changes))
