"""``features_only=True``: a backbone that returns the multi-scale maps a detection/segmentation neck needs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._base import resolve_indices


class FeatureInfo(list):
    """timm-compatible feature info: a list of ``dict(num_chs, reduction, module)`` with accessors."""

    def channels(self, idx: int | None = None) -> list[int] | int:
        return self[idx]["num_chs"] if idx is not None else [f["num_chs"] for f in self]

    def reduction(self, idx: int | None = None) -> list[int] | int:
        return self[idx]["reduction"] if idx is not None else [f["reduction"] for f in self]

    def module_name(self, idx: int | None = None) -> list[str] | str:
        return self[idx]["module"] if idx is not None else [f["module"] for f in self]


class FeatureExtractor(nn.Module):
    """Wraps a model; ``forward`` returns the feature maps after the stages in ``out_indices``.

    The model is pruned first (``prune_intermediate_layers``, timm's contract): stages after the last one
    needed, the final norm and the head leave the model, its parameters and its state dict, so nothing
    computes for nothing and DDP sees no unused parameters.
    """

    def __init__(self, model: nn.Module, out_indices: int | list[int] | tuple[int, ...] | None = None) -> None:
        super().__init__()
        num_stages = len(model.feature_info)
        self.out_indices = tuple(resolve_indices(out_indices, num_stages))
        self.feature_info = FeatureInfo(dict(model.feature_info[i], index=i) for i in self.out_indices)
        model.prune_intermediate_layers(list(self.out_indices), prune_norm=True, prune_head=True)
        self.model = model
        self.pretrained_cfg: dict[str, Any] = getattr(model, "pretrained_cfg", {})

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    @property
    def default_cfg(self) -> dict[str, Any]:
        return self.pretrained_cfg

    @property
    def out_channels(self) -> list[int]:
        return self.feature_info.channels()

    @property
    def strides(self) -> list[int]:
        return self.feature_info.reduction()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(
            x, indices=list(self.out_indices), stop_early=True, intermediates_only=True
        )
