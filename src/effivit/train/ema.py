"""Exponential moving average of weights with ``torch.optim.swa_utils.AveragedModel``.

The decay warms up as ``min(decay, (1 + n) / (10 + n))`` after n updates (as timm's ModelEmaV3 can), so the
average of a short run is not dominated by the random initial weights. Buffers (BatchNorm statistics) are
averaged too (``use_buffers=True``); integer buffers (``num_batches_tracked``) are copied.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel


def ema_multi_avg_fn(decay: float, warmup: bool = True):
    if not 0.0 < decay < 1.0:
        raise ValueError(f"EMA decay must be in (0, 1), got {decay}")

    @torch.no_grad()
    def update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = float(num_averaged)
        d = min(decay, (1.0 + n) / (10.0 + n)) if warmup else decay
        if torch.is_floating_point(ema_params[0]):
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        else:
            for e, p in zip(ema_params, params):
                e.copy_(p)

    return update


def make_ema(model: nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    """An EMA copy of ``model`` (unwrapped, not DDP); call ``ema.update_parameters(model)`` after each step."""
    return AveragedModel(model, multi_avg_fn=ema_multi_avg_fn(decay, warmup), use_buffers=True)


def ema_weights(ema_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model state dict inside an ``AveragedModel`` state dict (drops ``n_averaged``, ``module.``)."""
    return {k[len("module."):]: v for k, v in ema_state.items() if k.startswith("module.")}
