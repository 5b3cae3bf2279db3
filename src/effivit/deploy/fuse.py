"""``fuse(model)``: one generic walker for every family.

The protocol: a module that has an inference form defines ``fuse(self) -> nn.Module``. The walker copies the
model, switches it to eval mode and replaces modules bottom-up (children before their parents), so a block's
``fuse`` sees its children already fused. The walker knows nothing about model names.
"""

from __future__ import annotations

import copy

from torch import nn


def _fuse_tree(module: nn.Module) -> nn.Module:
    for name, child in list(module.named_children()):
        fused = _fuse_tree(child)
        if fused is not child:
            setattr(module, name, fused)
    fuse_fn = getattr(module, "fuse", None)
    if callable(fuse_fn):
        fused = fuse_fn()
        if not isinstance(fused, nn.Module):
            raise TypeError(f"{type(module).__name__}.fuse() must return an nn.Module, got {type(fused).__name__}")
        return fused.eval()
    return module


def fuse(model: nn.Module, inplace: bool = False) -> nn.Module:
    """An inference copy of ``model`` with every foldable BatchNorm merged into its neighbouring
    conv/linear and every reparameterizable branch collapsed. Outputs equal the unfused model's
    in eval mode (up to float rounding)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() expects an nn.Module, got {type(model).__name__}")
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    fused = _fuse_tree(target)
    fused.eval()
    fused.requires_grad_(False)
    fused.is_fused = True
    return fused


def count_batchnorms(model: nn.Module) -> int:
    """BatchNorm layers left in a model (0 after fusing, where the architecture folds them all)."""
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
