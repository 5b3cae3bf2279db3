"""Property-based tests (hypothesis) of hostile input: shapes, dtypes and memory layouts.

For every family the smallest variant is fed inputs drawn at random. The answer is either the right result
(equal to the same image through the plain fp32 contiguous path, within the dtype's tolerance) or a
``ValueError`` that names what was wrong and what is allowed; never an error from deep inside a layer.
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from conftest import randomize_norm_stats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import effivit
from effivit.registry import get_entry, list_families

FAMILIES = list_families()
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@functools.cache
def smallest(family: str) -> str:
    def params(name: str) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in effivit.create_model(name).parameters())

    return min(effivit.list_models(family=family), key=params)


@functools.cache
def model_for(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_norm_stats(effivit.create_model(smallest(family), num_classes=8)).eval()


def allowed(family: str, h: int, w: int) -> bool:
    d = get_entry(smallest(family)).defaults
    minimum = d.size_divisor if d.min_input_size is None else d.min_input_size
    if d.fixed_input_size:
        return (h, w) == tuple(get_entry(smallest(family)).pretrained_cfg()["input_size"][1:])
    return h % d.size_divisor == 0 and w % d.size_divisor == 0 and h >= minimum and w >= minimum


def sizes(family: str) -> st.SearchStrategy[tuple[int, int]]:
    """Sizes around the family's rule: multiples of its divisor, near-misses and small sizes."""
    d = get_entry(smallest(family)).defaults
    div = max(1, d.size_divisor)
    minimum = div if d.min_input_size is None else d.min_input_size
    if d.fixed_input_size:
        h, w = get_entry(smallest(family)).pretrained_cfg()["input_size"][1:]
        side = st.sampled_from([h, w, h - 1, h + div])
        return st.tuples(side, side)
    lo = max(1, minimum - 2)
    hi = max(minimum, div) * 3 + 8
    side = st.one_of(st.integers(lo, hi), st.integers(1, 4).map(lambda k: k * max(div, minimum)))
    return st.tuples(side, side)


def reference(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x.float().contiguous())


@pytest.mark.parametrize("family", FAMILIES)
def test_any_size_gives_the_right_result_or_a_clear_error(family):
    model = model_for(family)

    @SETTINGS
    @given(hw=sizes(family), batch=st.integers(1, 2), layout=st.sampled_from(["contiguous", "channels_last",
                                                                             "strided"]))
    def check(hw, batch, layout):
        h, w = hw
        base = torch.randn(batch, 3, h, w, generator=torch.Generator().manual_seed(h * 1000 + w))
        if layout == "channels_last":
            x = base.contiguous(memory_format=torch.channels_last)
        elif layout == "strided":  # a view with gaps in memory (every other column of a wider image)
            wide = torch.zeros(batch, 3, h, 2 * w)
            wide[..., ::2] = base
            x = wide[..., ::2]
        else:
            x = base
        if not allowed(family, h, w):
            with pytest.raises(ValueError, match=rf"H={h}, W={w} is not allowed"):
                with torch.no_grad():
                    model(x)
            return
        with torch.no_grad():
            y = model(x)
        expected = reference(model, base)
        assert y.shape == (batch, 8)
        assert (y - expected).abs().max() <= 1e-4 * max(1.0, float(expected.abs().max())), (h, w, layout)

    check()


@pytest.mark.parametrize("family", FAMILIES)
def test_wrong_dtype_rank_or_channels_is_a_clear_error(family):
    model = model_for(family)
    name = smallest(family)
    d = get_entry(name).defaults
    side = d.size_divisor * max(1, -(-64 // max(1, d.size_divisor)))
    if d.fixed_input_size:
        side = get_entry(name).pretrained_cfg()["input_size"][1]

    @SETTINGS
    @given(dtype=st.sampled_from([torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.uint8,
                                  torch.bool]),
           shape=st.sampled_from(["ok", "3d", "5d", "channels"]))
    def check(dtype, shape):
        dims = {"ok": (1, 3, side, side), "3d": (3, side, side), "5d": (1, 1, 3, side, side),
                "channels": (1, 1, side, side)}[shape]
        x = torch.zeros(dims).to(dtype)
        if shape == "ok" and dtype == torch.float32:
            return
        with pytest.raises(ValueError) as info:
            with torch.no_grad():
                model(x)
        message = str(info.value)
        if shape in ("3d", "5d"):
            assert "4-D" in message
        elif shape == "channels":
            assert re.search(r"expected 3 input channels", message)
        elif not dtype.is_floating_point:
            assert "floating-point" in message
        else:
            assert "does not match the model's torch.float32" in message

    check()
