"""``optimize(model, target)``: the deploy-time passes for one target, applied after ``fuse``.

``fuse`` gives the portable inference form (the papers' maths with every fold applied); a target may then
swap layers for ones with the same parameters and function but a faster kernel there. Each pass is one
function ``(model) -> model``; a target is a tuple of passes. Exports start from the portable form.

* ``"cpu"``: PyTorch eager / ``torch.compile`` on a CPU (:mod:`effivit.deploy.cpu`: oneDNN's packed
  linear with fused hard-swish, 1x1 convs on oneDNN's fastest kernel).
* ``"portable"`` (also ``"cuda"``, ``"onnx"``, ``"openvino"``, ``"torchscript"``, ``"tensorrt"``): nothing;
  those runtimes choose their own kernels from a plain graph.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from torch import nn

from .cpu import CPU_PASSES

Pass = Callable[[nn.Module], nn.Module]
TARGET_PASSES: dict[str, tuple[Pass, ...]] = {
    "cpu": CPU_PASSES,
    "portable": (),
    "cuda": (),
    "onnx": (),
    "openvino": (),
    "torchscript": (),
    "tensorrt": (),
}


def optimize(model: nn.Module, target: str = "cpu", inplace: bool = False) -> nn.Module:
    """``model`` (fused, eval) with ``target``'s passes applied; a copy unless ``inplace``."""
    if target not in TARGET_PASSES:
        raise ValueError(f"target={target!r}; allowed: {list(TARGET_PASSES)}")
    passes = TARGET_PASSES[target]
    if not passes:
        return model
    out = model if inplace else copy.deepcopy(model)
    for p in passes:
        out = p(out)
    out.deploy_target = target
    return out
