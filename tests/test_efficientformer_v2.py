"""EfficientFormerV2: timm parity for every variant, parameter counts, deploy form (merged projections,
folded local-global query, talking heads applied to the bias once), any resolution, distillation head."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, compare_with_timm
from test_attn_bias import check_bias_parity, check_cache_round_trips, check_deploy, timm_pair

import effivit
from effivit.layers.attn_bias import gather_attention_bias
from effivit.models.efficientformer_v2 import Attention2d, Attention2dDownsample
from effivit.registry import get_entry


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _check_counts_and_keys(name: str, ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    assert set(ours.state_dict()) == set(ref.state_dict()), f"{name}: state_dict keys differ from timm's"
    n = _params_m(ours)
    assert n == _params_m(ref)
    pub = get_entry(name).default_tag.published
    assert round(n, 2) == pytest.approx(pub.timm_params_m), f"{name}: {n:.3f}M vs timm {pub.timm_params_m}M"
    # The paper's figures (3.5, 6.1, 12.6, 26.1M) sit between the count without and with the distillation
    # head and are rounded loosely, so they are only checked to within 5%.
    assert n == pytest.approx(pub.params_m, rel=0.05), f"{name}: {n:.3f}M vs paper {pub.params_m}M"


@pytest.fixture(scope="module")
def pair():
    return timm_pair("efficientformerv2_s0")


def test_timm_parity_and_counts(pair):
    ours, ref = pair
    compare_with_timm("efficientformerv2_s0", batch=1)
    check_bias_parity(ours, ref)
    _check_counts_and_keys("efficientformerv2_s0", ours, ref)


@pytest.mark.slow
def test_timm_parity_and_counts_larger_variants():
    for name in ("efficientformerv2_s1", "efficientformerv2_s2", "efficientformerv2_l"):
        ours, ref = compare_with_timm(name, batch=1)
        _check_counts_and_keys(name, ours, ref)


def test_deploy_and_any_resolution(pair, monkeypatch):
    ours, _ = pair
    fused = check_deploy(ours, "efficientformerv2_s0", monkeypatch)
    attn = [m for m in fused.modules() if isinstance(m, Attention2d)]
    assert len(attn) == 4 and all(m.fused_qkv and isinstance(m.k, torch.nn.Identity) for m in attn)
    down = next(m for m in fused.modules() if isinstance(m, Attention2dDownsample))
    assert down.fused_kv
    # Local-global query: depth-wise conv + subsample became one depth-wise conv, then the 1x1 projection.
    assert [type(m) for m in down.q] == [torch.nn.Conv2d, torch.nn.Conv2d] and down.q[0].groups > 1
    check_cache_round_trips("efficientformerv2_s0", ours, fused)


def test_talking_head_bias_is_cached_mixed(pair):
    ours, _ = pair
    m = next(m for m in ours.modules() if isinstance(m, Attention2d))
    with torch.no_grad():
        cached = m.compute_attention_bias(7, 7)
        raw = gather_attention_bias(m.attention_biases, m.bias_resolution, 7, 7)
        w = m.talking_head1.weight.reshape(8, 8)
        expected = torch.einsum("gh,hnm->gnm", w, raw) + m.talking_head1.bias.reshape(8, 1, 1)
    assert_close(cached, expected, 1e-5, "talking-head-mixed bias")


def test_sizes_and_features(pair):
    ours, _ = pair
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = ours(x)
        ours.set_input_size(384)
        assert_close(ours(x), y, 0.0, "224 after set_input_size(384)")
        feats = ours.forward_intermediates(torch.randn(1, 3, 192, 320), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 48, 80), (48, 24, 40), (96, 12, 20), (176, 6, 10)]
    with pytest.raises(ValueError, match="multiples of 32"):
        ours(torch.randn(1, 3, 208, 224))


def test_distillation_head():
    torch.manual_seed(0)
    model = effivit.create_model("efficientformerv2_s0", num_classes=10)
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
