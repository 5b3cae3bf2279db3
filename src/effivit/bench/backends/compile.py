"""``torch.compile`` (Inductor): compiled before timing (first call), fp32 or half precision weights."""

from __future__ import annotations

import torch
from torch import nn

from . import register_backend
from .base import Backend, Context, Prepared
from .eager import bind, torch_model


@register_backend
class CompileBackend(Backend):
    name = "compile"
    dtypes = ("fp32", "bf16", "fp16")
    devices = ("cpu", "cuda")

    def prepare(self, model: nn.Module, example: torch.Tensor, dtype: str = "fp32",
                ctx: Context | None = None) -> Prepared:
        ctx = ctx or Context()
        self.check(ctx.device, dtype)
        compiled = torch.compile(torch_model(model, dtype, ctx), dynamic=False)
        fn, run = bind(compiled, example, ctx)
        fn()  # compile now, before anything is timed
        return Prepared(self.name, dtype, fn, run, {"runtime": f"torch {torch.__version__} inductor"})
