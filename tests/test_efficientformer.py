"""EfficientFormer V1: timm parity for every variant, parameter counts, the bias-index buffer in timm's
files, deploy form, any resolution, distillation head."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, compare_with_timm
from test_attn_bias import check_bias_parity, check_cache_round_trips, check_deploy, timm_pair

import effivit
from effivit.checkpoint import CheckpointError
from effivit.models.efficientformer import FusedMetaBlock2d, MetaBlock1d
from effivit.registry import get_entry

IDX_KEY = "attention_bias_idxs"


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _check_counts_and_keys(name: str, ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    assert any(k.endswith(IDX_KEY) for k in ref.state_dict()), "timm's V1 stores the index buffer"
    assert set(ours.state_dict()) == set(ref.state_dict()), f"{name}: keys differ from timm's"
    n = _params_m(ours)
    assert n == _params_m(ref)
    pub = get_entry(name).default_tag.published
    # The published table takes timm's count (with the distillation head): both agree to 0.01M.
    assert round(n, 2) == pytest.approx(pub.timm_params_m) == pytest.approx(pub.params_m), f"{name}: {n:.3f}M"


@pytest.fixture(scope="module")
def pair():
    return timm_pair("efficientformer_l1")


def test_timm_parity_and_counts(pair):
    ours, ref = pair
    compare_with_timm("efficientformer_l1", batch=1)
    check_bias_parity(ours, ref)
    _check_counts_and_keys("efficientformer_l1", ours, ref)


@pytest.mark.slow
def test_timm_parity_and_counts_large_variants():
    for name in ("efficientformer_l3", "efficientformer_l7"):
        ours, ref = compare_with_timm(name, batch=1)
        _check_counts_and_keys(name, ours, ref)


def test_checkpoint_index_buffer_is_checked(pair):
    ours, ref = pair
    state = ref.state_dict()
    model = effivit.create_model("efficientformer_l1")
    effivit.load_checkpoint(model, state)  # accepted when it matches
    key = next(k for k in state if k.endswith(IDX_KEY))
    assert torch.equal(model.state_dict()[key], state[key])
    bad = dict(state)
    bad[key] = state[key].flip(0)
    with pytest.raises(CheckpointError, match=IDX_KEY):
        effivit.load_checkpoint(model, bad)
    # Not needed either: a file without it loads, and the derived index is filled in.
    fresh = effivit.create_model("efficientformer_l1")
    fresh.get_buffer(key).zero_()
    effivit.load_checkpoint(fresh, {k: v for k, v in state.items() if not k.endswith(IDX_KEY)})
    assert torch.equal(fresh.state_dict()[key], state[key])


def test_deploy_and_any_resolution(pair, monkeypatch):
    ours, _ = pair
    fused = check_deploy(ours, "efficientformer_l1", monkeypatch)
    assert sum(isinstance(m, FusedMetaBlock2d) for m in fused.modules()) == 3 + 2 + 6 + 3
    block = next(m for m in fused.modules() if isinstance(m, MetaBlock1d))
    assert isinstance(block.ls1, torch.nn.Identity) and isinstance(block.ls2, torch.nn.Identity)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    check_cache_round_trips("efficientformer_l1", ours, fused)


def test_sizes_and_features(pair):
    ours, _ = pair
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = ours(x)
        ours.set_input_size(256)
        assert_close(ours(x), y, 0.0, "224 after set_input_size(256)")
        feats = ours.forward_intermediates(torch.randn(1, 3, 192, 320), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(48, 48, 80), (96, 24, 40), (224, 12, 20), (448, 6, 10)]
    with pytest.raises(ValueError, match="multiples of 32"):
        ours.set_input_size(240)


def test_distillation_head():
    torch.manual_seed(0)
    model = effivit.create_model("efficientformer_l1", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    assert model.train()(x).shape == (2, 10), "timm's default: one tensor in training mode"
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 10)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert_close(model(x), (model.head(feats) + model.head_dist(feats)) / 2, 1e-6, "eval = mean of heads")
    model.reset_classifier(3)
    assert model.head.out_features == model.head_dist.out_features == 3
    cfg = model.pretrained_cfg
    assert cfg["has_distill_head"] and not cfg["fixed_input_size"] and cfg["classifier"] == ("head", "head_dist")
