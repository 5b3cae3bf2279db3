"""Classifier heads: global pooling + dropout + linear, resettable to a new number of classes."""

from __future__ import annotations

import torch
from torch import nn

POOL_TYPES = ("avg", "max", "")


class ClassifierHead(nn.Module):
    """Pools a (B, C, H, W) map (or takes (B, C) features) and applies ``fc``.

    ``pool_type=''`` keeps the map as it is (for users who pool themselves).
    """

    def __init__(self, in_features: int, num_classes: int, pool_type: str = "avg", drop_rate: float = 0.0) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type={pool_type!r} is not supported; allowed: {POOL_TYPES}")
        self.in_features = in_features
        self.pool_type = pool_type
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            if pool_type not in POOL_TYPES:
                raise ValueError(f"pool_type={pool_type!r} is not supported; allowed: {POOL_TYPES}")
            self.pool_type = pool_type
        self.fc = nn.Linear(self.in_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.dim() == 4:
            if self.pool_type == "avg":
                x = x.mean((2, 3))
            elif self.pool_type == "max":
                x = x.amax((2, 3))
        x = self.drop(x)
        if pre_logits:
            return x
        return self.fc(x)
