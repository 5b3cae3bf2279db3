"""PyTorch eager: the reference runtime. The fused model with the device's kernel passes
(``deploy.optimize``); fp32 as is, bf16/fp16 with ``deploy.to_dtype`` (weights cast once)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from . import register_backend
from .base import TORCH_DTYPES, Backend, Context, Prepared


def torch_model(model: nn.Module, dtype: str, ctx: Context) -> nn.Module:
    """The module that runs ``dtype`` on ``ctx.device``: the target's kernel passes (``deploy.optimize``: on
    CPU oneDNN's packed linears and 1x1 convs), half precision via ``deploy.to_dtype`` (fp32 in and out,
    norms and softmax statistics in fp32), in the requested memory format."""
    from ...deploy.passes import optimize

    if ctx.device == "cpu":
        model = optimize(model, "cpu")  # a copy with the CPU passes applied
    if dtype != "fp32":
        from ...deploy.precision import to_dtype

        model = to_dtype(model, TORCH_DTYPES[dtype])
    elif ctx.device != "cpu":
        model = copy.deepcopy(model)  # .to() works in place: the caller's (CPU) model stays as it was
    model = model.to(ctx.device)
    if ctx.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model.eval()


def bind(model: nn.Module, example: torch.Tensor, ctx: Context):
    """(timed call on ``example``, run on any input) for a torch module."""
    x = example.to(ctx.device)
    if ctx.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)

    def fn() -> Any:
        with torch.inference_mode():
            return model(x)

    def run(t: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(t.to(ctx.device)).float().cpu()

    return fn, run


@register_backend
class EagerBackend(Backend):
    name = "eager"
    dtypes = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")

    def prepare(self, model: nn.Module, example: torch.Tensor, dtype: str = "fp32",
                ctx: Context | None = None) -> Prepared:
        ctx = ctx or Context()
        self.check(ctx.device, dtype)
        m = torch_model(model, dtype, ctx)
        fn, run = bind(m, example, ctx)
        return Prepared(self.name, dtype, fn, run, {"runtime": f"torch {torch.__version__}",
                                                   "weights": "cast once (deploy.to_dtype)" if dtype != "fp32"
                                                   else "fp32"})
