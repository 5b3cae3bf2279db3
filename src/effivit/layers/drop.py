"""Stochastic depth (drop path), per sample."""

from __future__ import annotations

import torch
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float, training: bool, scale_by_keep: bool = True) -> torch.Tensor:
    if drop_prob == 0.0 or not training:
        return x
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    if keep > 0.0 and scale_by_keep:
        # Out of place: an in-place div_ whose result is unused is dead code to FX (torchvision's feature
        # extractor removes it, and the traced training graph would stop scaling by 1 / keep).
        mask = mask / keep
    return x * mask


class DropPath(nn.Module):
    """Drops whole residual branches per sample while training (identity in eval and after fusing)."""

    def __init__(self, drop_prob: float = 0.0, scale_by_keep: bool = True) -> None:
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)
        self.scale_by_keep = scale_by_keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training, self.scale_by_keep)

    def fuse(self) -> nn.Module:
        return nn.Identity()

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


def drop_path_rates(total: float, depths: list[int] | tuple[int, ...]) -> list[list[float]]:
    """Per-block drop-path rates rising linearly from 0 to ``total`` over all blocks, split per stage.

    Computed on the CPU whatever the default device (``with torch.device("meta")`` builds keep working) and
    with the float32 ``linspace`` the references use, so the rates are theirs to the last bit.
    """
    rates = torch.linspace(0, total, max(sum(depths), 1), device="cpu")[: sum(depths)]
    return [t.tolist() for t in rates.split(list(depths))]
