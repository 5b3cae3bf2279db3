"""Which models a benchmark measures and how each is built.

A :class:`ModelSpec` is a registered name plus constructor arguments (``nextvit_small:attn=xca``); the
selection helpers turn the command line's names, patterns and ``all`` into specs, and :func:`build_model`
builds one the way every runtime receives it (seeded random weights, eval mode, fused). Kept apart from the
runner so the fresh memory-probe process (:mod:`effivit.bench.memory`) can build a model without importing it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .flops import count_params

# --- what to measure ----------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


@dataclass(frozen=True)
class ModelSpec:
    """A registered model plus constructor arguments: ``nextvit_small:attn=xca`` on the command line."""

    name: str
    kwargs: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        name, _, rest = text.partition(":")
        kwargs = []
        for item in filter(None, rest.split(",")):
            key, eq, value = item.partition("=")
            if not eq or not key:
                raise ValueError(f"model argument {item!r} in {text!r} must be key=value (e.g. nextvit_small:attn=xca)")
            kwargs.append((key.strip(), _parse_value(value.strip())))
        return cls(name.strip(), tuple(kwargs))

    @property
    def label(self) -> str:
        if not self.kwargs:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.kwargs)

    def __str__(self) -> str:
        return self.label


def select_models(patterns: Sequence[str]) -> list[ModelSpec]:
    """Model specs for names, glob patterns (``'levit*'``) or ``all``; unknown names raise ``ValueError``."""
    from ..registry import get_entry, list_models

    out: list[ModelSpec] = []
    for pat in patterns:
        if pat == "all":
            found = [ModelSpec(n) for n in list_models()]
        elif any(c in pat for c in "*?[") and ":" not in pat:
            found = [ModelSpec(n) for n in list_models(pat)]
            if not found:
                raise ValueError(f"no registered model matches {pat!r} (see `effivit list`)")
        else:
            spec = ModelSpec.parse(pat)
            get_entry(spec.name)  # a clear error for unknown names
            found = [spec]
        out += [s for s in found if s not in out]
    return out


def param_count(name: str) -> int:
    """Parameters of ``name`` without paying for a full build where possible: counted on the meta device,
    else the published figure of its default weights, else counted on a CPU build."""
    from ..factory import create_model
    from ..registry import get_entry

    try:
        with torch.device("meta"):
            return count_params(create_model(name))
    except Exception:
        pass  # some constructors compute on tensors (e.g. drop-path schedules with .item())
    tag = get_entry(name).default_tag
    if tag is not None and tag.published.params_m:
        return int(tag.published.params_m * 1e6)
    return count_params(create_model(name))


def smallest_per_family() -> list[ModelSpec]:
    """The smallest variant (fewest parameters) of every registered family."""
    from ..registry import list_families, list_models

    out = []
    for fam in list_families():
        sized = []
        for n in list_models(family=fam):
            try:
                sized.append((param_count(n), n))
            except Exception:
                sized.append((math.inf, n))  # unbuildable: chosen only if nothing else is (and then fails loudly)
        if sized:
            out.append(ModelSpec(min(sized)[1]))
    return out


def default_models() -> list[ModelSpec]:
    """The embedded default: smallest variant of every family, plus Next-ViT-S with each attention kind."""
    from ..registry import builder_kwargs, get_entry

    specs = smallest_per_family()
    if is_registered("nextvit_small"):
        entry = get_entry("nextvit_small")
        if "attn" in builder_kwargs(entry):
            from ..models.nextvit import ATTN_KINDS

            specs = [s for s in specs if s.name != "nextvit_small"]
            specs += [ModelSpec("nextvit_small", (("attn", k),)) for k in ATTN_KINDS]
    return specs


def is_registered(name: str) -> bool:
    from ..registry import list_models

    return name in list_models(name)


def build_model(spec: ModelSpec, fused: bool = True, channels_last: bool = False, device: str = "cpu") -> nn.Module:
    """The model in eval mode (seeded random weights: latency does not depend on the values), fused."""
    from ..deploy import fuse
    from ..factory import create_model

    torch.manual_seed(0)
    model = create_model(spec.name, **dict(spec.kwargs)).eval()
    if fused:
        model = fuse(model)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.to(device)
