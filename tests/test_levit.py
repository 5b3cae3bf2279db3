"""LeViT: timm parity for every variant (both layouts), parameter counts, deploy form, any resolution,
distillation head."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, compare_with_timm
from test_attn_bias import check_bias_parity, check_cache_round_trips, check_deploy, timm_pair

import effivit
from effivit.layers.conv_bn import LinearNorm, LinearNorm2d, NormLinear
from effivit.registry import get_entry

SIZES = ("128s", "128", "192", "256", "384")
FAST = ["levit_128s", "levit_conv_128s"]
SLOW = [f"levit{form}_{s}" for s in SIZES[1:] for form in ("", "_conv")]


def _params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def _check_counts_and_keys(name: str, ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    assert set(ours.state_dict()) == set(ref.state_dict()), f"{name}: state_dict keys differ from timm's"
    n = _params_m(ours)
    assert n == _params_m(ref)
    # Published figures live on the linear-form names (the conv form has the same parameters).
    pub = get_entry(name.replace("levit_conv_", "levit_")).default_tag.published
    assert round(n, 2) == pytest.approx(pub.timm_params_m), f"{name}: {n:.3f}M vs timm {pub.timm_params_m}M"
    # The paper rounds to 2 significant digits (7.8, 9.2, 11, 19, 39) and counts both heads, as we do.
    assert round(n, 1 if pub.params_m < 10 else 0) == pytest.approx(pub.params_m), f"{name}: {n:.3f}M vs paper"


@pytest.fixture(scope="module", params=FAST)
def pair(request):
    ours, ref = timm_pair(request.param)
    return request.param, ours, ref


def test_timm_parity_and_counts(pair):
    name, ours, ref = pair
    compare_with_timm(name, batch=1)  # fp32 vs fp32, timm's own init (zero bias tables)
    check_bias_parity(ours, ref)  # random bias tables: layout of the offset index
    _check_counts_and_keys(name, ours, ref)


@pytest.mark.slow
def test_timm_parity_and_counts_all_variants():
    for name in SLOW:
        ours, ref = compare_with_timm(name, batch=1)
        _check_counts_and_keys(name, ours, ref)


def test_deploy_and_any_resolution(pair, monkeypatch):
    name, ours, _ = pair
    fused = check_deploy(ours, name, monkeypatch)
    assert not any(isinstance(m, (LinearNorm, LinearNorm2d, NormLinear)) for m in fused.modules())
    if "conv" in name:
        # Subsample + 1x1 conv of the downsampling queries became one strided 1x1 conv.
        q = fused.stages[1].downsample.attn_downsample.q
        assert isinstance(q, torch.nn.Conv2d) and q.stride == (2, 2)
    check_cache_round_trips(name, ours, fused)


def test_trained_size_unchanged_by_set_input_size(pair):
    name, ours, _ = pair
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        y = ours(x)
        ours.set_input_size(384)
        assert_close(ours(x), y, 0.0, "224 after set_input_size(384)")
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.set_input_size(232)
    with pytest.raises(ValueError, match="multiples of 16"):
        ours(torch.randn(1, 3, 200, 224))


def test_non_square_and_features():
    model = effivit.create_model("levit_128s").eval()
    with torch.no_grad():
        feats = model.forward_intermediates(torch.randn(1, 3, 160, 288), intermediates_only=True)
    assert [tuple(f.shape[1:]) for f in feats] == [(128, 10, 18), (256, 5, 9), (384, 3, 5)]


def test_distillation_head():
    torch.manual_seed(0)
    model = effivit.create_model("levit_128s", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    out = model.train()(x)
    assert isinstance(out, tuple) and len(out) == 2 and out[0].shape == out[1].shape == (2, 10)
    model.set_distilled_training(False)
    assert model(x).shape == (2, 10)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        assert_close(model(x), (model.head(feats) + model.head_dist(feats)) / 2, 1e-6, "eval = mean of heads")
    head, head_dist = model.get_classifier()
    assert head is model.head and head_dist is model.head_dist
    model.reset_classifier(5)
    assert model.head.linear.out_features == model.head_dist.linear.out_features == 5
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


def test_pretrained_cfg():
    cfg = effivit.create_model("levit_conv_128s").pretrained_cfg
    assert cfg["has_distill_head"] and not cfg["fixed_input_size"] and cfg["size_divisor"] == 16
    assert cfg["classifier"] == ("head.linear", "head_dist.linear")
