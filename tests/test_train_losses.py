"""Unit checks of the training pieces: distillation loss, weight-decay groups, schedule, EMA, checkpoint files."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from effivit.train import checkpointing
from effivit.train.ema import ema_weights, make_ema
from effivit.train.loop import param_groups, warmup_cosine
from effivit.train.losses import ClassificationLoss, DistillationLoss, merged_logits, training_loss


def _logits(seed, b=4, c=7):
    return torch.randn(b, c, generator=torch.Generator().manual_seed(seed)) * 3


def test_soft_distillation_is_alpha_weighted_ce_plus_tau2_kl():
    s, t, y = _logits(0), _logits(1), torch.tensor([0, 3, 6, 2])
    tau, alpha = 2.0, 0.3
    loss = DistillationLoss(ClassificationLoss(0.0), "soft", tau, alpha)(s, y, t)
    p_t = F.softmax(t / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(s / tau, 1))).sum(1).mean() * tau**2
    ce = F.cross_entropy(s, y)
    torch.testing.assert_close(loss.distill, kl)
    torch.testing.assert_close(loss.total, (1 - alpha) * ce + alpha * kl)


def test_hard_distillation_uses_teacher_argmax_as_labels():
    s, t, y = _logits(2), _logits(3), torch.tensor([1, 1, 1, 1])
    loss = DistillationLoss(ClassificationLoss(0.0), "hard", alpha=0.5)(s, y, t)
    torch.testing.assert_close(loss.distill, F.cross_entropy(s, t.argmax(1)))
    torch.testing.assert_close(loss.total, 0.5 * F.cross_entropy(s, y) + 0.5 * loss.distill)
    assert not torch.allclose(loss.distill, F.cross_entropy(s, y))


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_head_learns_from_the_teacher_and_class_head_from_labels(kind):
    cls = _logits(4).requires_grad_()
    dist = _logits(5).requires_grad_()
    teacher, y = _logits(6), torch.tensor([0, 1, 2, 3])
    DistillationLoss(ClassificationLoss(0.0), kind, alpha=1.0)((cls, dist), y, teacher).total.backward()
    assert cls.grad.abs().sum() == 0 and dist.grad.abs().sum() > 0
    cls.grad = dist.grad = None
    DistillationLoss(ClassificationLoss(0.0), kind, alpha=0.0)((cls, dist), y, teacher).total.backward()
    assert cls.grad.abs().sum() > 0 and dist.grad.abs().sum() == 0


def test_losses_reject_bad_settings_and_handle_soft_targets():
    with pytest.raises(ValueError, match="allowed"):
        DistillationLoss(ClassificationLoss(), "medium")
    with pytest.raises(ValueError, match="alpha"):
        DistillationLoss(ClassificationLoss(), "soft", alpha=1.5)
    with pytest.raises(ValueError, match="smoothing"):
        ClassificationLoss(1.0)
    s = _logits(7)
    soft = F.one_hot(torch.tensor([0, 1, 2, 3]), 7).float()
    torch.testing.assert_close(ClassificationLoss(0.1)(s, soft), ClassificationLoss(0.1)(s, soft.argmax(1)))
    a, b = _logits(8), _logits(9)
    torch.testing.assert_close(merged_logits((a, b)), (a + b) / 2)
    y = torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(training_loss(ClassificationLoss(), (a, b), y).total,
                               (F.cross_entropy(a, y) + F.cross_entropy(b, y)) / 2)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.attention_biases = nn.Parameter(torch.zeros(2, 9))
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, 8))
        self.fc = nn.Linear(4, 2)


def test_weight_decay_skips_norms_biases_and_tables():
    m = _Toy()
    groups = param_groups(m, 0.05)
    names = {id(p): n for n, p in m.named_parameters()}
    decayed = sorted(names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"])
    assert decayed == ["conv.weight", "fc.weight"]
    assert sum(len(g["params"]) for g in groups) == len(list(m.parameters()))


def test_warmup_then_cosine_schedule():
    f = warmup_cosine(total_steps=100, warmup_steps=10, start_factor=0.1, min_factor=0.01)
    assert f(0) == pytest.approx(0.1)
    assert all(f(i) < f(i + 1) for i in range(9))
    assert f(10) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.01)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


def test_ema_warms_up_and_follows_the_weights():
    m = nn.Linear(3, 1, bias=False)
    ema = make_ema(m, decay=0.9)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema.update_parameters(m)  # first update copies
    for _ in range(3):
        with torch.no_grad():
            m.weight.fill_(1.0)
        ema.update_parameters(m)
    # decays: min(0.9, 2/11), min(0.9, 3/12), min(0.9, 4/13) after 1, 2, 3 averages
    expected = 0.0
    for n in (1, 2, 3):
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d)
    torch.testing.assert_close(ema.module.weight, torch.full((1, 3), expected))
    assert set(ema_weights(ema.state_dict())) == {"weight"}


def test_checkpoint_files_are_atomic_plain_and_restore_rng(tmp_path):
    checkpointing.seed_all(5)
    _ = (torch.rand(3), np.random.rand(2), random.random())  # move every stream off its seed
    state = checkpointing.rng_state()
    expected = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)])
    path = checkpointing.save_atomic({"rng": [state], "epoch": 1, "t": (1, 2.0, None)}, tmp_path / "c.pt")
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind
    loaded = torch.load(path, weights_only=True)
    checkpointing.set_rng_state(loaded["rng"][0])
    got = (torch.rand(4), np.random.rand(3), [random.random() for _ in range(3)])
    torch.testing.assert_close(got[0], expected[0])
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]
    with pytest.raises(TypeError, match="plain values"):
        checkpointing.save_atomic({"bad": object()}, tmp_path / "d.pt")
    assert not (tmp_path / "d.pt").exists()
