"""Classifier heads: global pooling + dropout + linear, resettable to a new number of classes."""

from __future__ import annotations

import torch
from torch import nn

POOL_TYPES = ("avg", "max", "")


def global_pool(x: torch.Tensor, pool_type: str) -> torch.Tensor:
    """Pool a (B, C, H, W) map to (B, C) (``pool_type`` ``avg`` or ``max``); (B, C) features and
    ``pool_type=''`` pass unchanged. FX records this as one call (the rank of a proxy is not known)."""
    if x.dim() == 4:
        if pool_type == "avg":
            return x.mean((2, 3))
        if pool_type == "max":
            return x.amax((2, 3))
    return x


torch.fx.wrap("global_pool")


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
        x = self.drop(global_pool(x, self.pool_type))
        if pre_logits:
            return x
        return self.fc(x)


class NormMlpClassifierHead(nn.Module):
    """Pool -> LayerNorm -> optional pre-logits (Linear + act) -> dropout -> fc: the head of ConvNeXt
    (no pre-logits) and MaxViT (``hidden_size`` with tanh). Names follow timm's ``NormMlpClassifierHead``
    (``norm``, ``pre_logits.fc``, ``fc``), so its checkpoints load unchanged.

    The norm runs on the pooled (B, C) vector (timm applies a 2-D LayerNorm to a (B, C, 1, 1) map: the same
    numbers). With ``pool_type=''`` a (B, C, H, W) map keeps its grid: norm and linears act on the channels of
    every position and the output is (B, num_classes, H, W).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden_size: int | None = None,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        norm_eps: float = 1e-6,
        act_layer: type[nn.Module] = nn.Tanh,
    ) -> None:
        super().__init__()
        if pool_type not in POOL_TYPES:
            raise ValueError(f"pool_type={pool_type!r} is not supported; allowed: {POOL_TYPES}")
        self.in_features = in_features
        self.pool_type = pool_type
        self.norm = nn.LayerNorm(in_features, eps=norm_eps)
        if hidden_size:
            self.pre_logits = nn.Sequential()
            self.pre_logits.add_module("fc", nn.Linear(in_features, hidden_size))
            self.pre_logits.add_module("act", act_layer())
            self.num_features = hidden_size
        else:
            self.pre_logits = nn.Identity()
            self.num_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: str | None = None) -> None:
        if pool_type is not None:
            if pool_type not in POOL_TYPES:
                raise ValueError(f"pool_type={pool_type!r} is not supported; allowed: {POOL_TYPES}")
            self.pool_type = pool_type
        ref = self.norm.weight
        self.fc = (nn.Linear(self.num_features, num_classes).to(ref.device, ref.dtype) if num_classes > 0
                   else nn.Identity())

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.pool_type == "":
            return self._forward_unpooled(x, pre_logits)
        x = self.drop(self.pre_logits(self.norm(global_pool(x, self.pool_type))))
        return x if pre_logits else self.fc(x)

    def _forward_unpooled(self, x: torch.Tensor, pre_logits: bool) -> torch.Tensor:
        # A map keeps its grid: norm and linears act on the channels of every position.
        spatial = x.dim() == 4
        if spatial:
            x = x.permute(0, 2, 3, 1)  # B, H, W, C
        x = self.drop(self.pre_logits(self.norm(x)))
        if not pre_logits:
            x = self.fc(x)
        return x.permute(0, 3, 1, 2) if spatial else x
