"""Losses: label-smoothed cross-entropy (hard or mixup/cutmix soft targets) and DeiT distillation.

Distillation follows DeiT (Touvron et al., arXiv:2012.12877, Sec. 5):

* ``soft``: ``(1 - alpha) * CE(z_cls, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_dist / tau))``
* ``hard``: ``(1 - alpha) * CE(z_cls, y) + alpha * CE(z_dist, argmax z_t)``

``z_dist`` is the distillation head's output for models that have one (DeiT's distillation token, LeViT's
``head_dist``: they return ``(cls_logits, dist_logits)`` in training mode) and the main head's otherwise.
Differences from DeiT's code: the soft KL term is averaged over the batch (Hinton's ``batchmean``), where DeiT
divides the summed KL by ``batch * classes``, which makes alpha's meaning depend on the number of classes;
DeiT's hard variant fixes alpha at 0.5, here it is the same ``alpha`` argument (0.5 reproduces DeiT).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_KINDS = ("soft", "hard")


def split_outputs(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(cls_logits, dist_logits or None)`` from a model output (a tensor, or a pair in training mode)."""
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 2:
            raise ValueError(f"expected logits or a (cls_logits, dist_logits) pair, got {len(outputs)} outputs")
        return outputs[0], outputs[1]
    return outputs, None


def merged_logits(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The prediction a model makes in eval mode: distilled models average their two heads."""
    cls, dist = split_outputs(outputs)
    return cls if dist is None else (cls + dist) / 2


class ClassificationLoss(nn.Module):
    """Cross-entropy with label smoothing for class indices or soft (mixup/cutmix) target distributions."""

    def __init__(self, smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), targets, label_smoothing=self.smoothing)


@dataclass
class LossParts:
    """The total loss and its terms (detached floats are taken by the loop for logging)."""

    total: torch.Tensor
    base: torch.Tensor
    distill: torch.Tensor | None = None


class DistillationLoss(nn.Module):
    """DeiT's distillation objective around a base classification loss (see the module docstring)."""

    def __init__(self, base: nn.Module, kind: str = "soft", tau: float = 1.0, alpha: float = 0.5) -> None:
        super().__init__()
        if kind not in DISTILL_KINDS:
            raise ValueError(f"distillation kind {kind!r} is not supported; allowed: {DISTILL_KINDS}")
        if tau <= 0:
            raise ValueError(f"distillation temperature tau must be > 0, got {tau}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
        self.base, self.kind, self.tau, self.alpha = base, kind, tau, alpha

    def distill_term(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        student, teacher = student.float(), teacher.float()
        if self.kind == "soft":
            t = self.tau
            return F.kl_div(F.log_softmax(student / t, dim=1), F.log_softmax(teacher / t, dim=1),
                            reduction="batchmean", log_target=True) * (t * t)
        return F.cross_entropy(student, teacher.argmax(dim=1))

    def forward(self, outputs: torch.Tensor | tuple[torch.Tensor, ...], targets: torch.Tensor,
                teacher_logits: torch.Tensor) -> LossParts:
        cls, dist = split_outputs(outputs)
        base = self.base(cls, targets)
        term = self.distill_term(cls if dist is None else dist, teacher_logits)
        return LossParts((1 - self.alpha) * base + self.alpha * term, base, term)


def training_loss(criterion: nn.Module, outputs: torch.Tensor | tuple[torch.Tensor, ...],
                  targets: torch.Tensor) -> LossParts:
    """Loss without a teacher. A model with a distillation head trains both heads on the labels."""
    cls, dist = split_outputs(outputs)
    if dist is None:
        loss = criterion(cls, targets)
    else:
        loss = (criterion(cls, targets) + criterion(dist, targets)) / 2
    return LossParts(loss, loss)
