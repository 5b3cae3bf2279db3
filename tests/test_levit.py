"""LeViT: timm parity for every variant (both layouts), parameter counts, deploy form, any resolution,
distillation head."""

from __future__ import annotations

import copy

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
    assert model.train()(x).shape == (2, 10), "timm's default: one tensor in training mode"
    model.set_distilled_training(True)
    out = model(x)
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


def test_cpu_pass_onednn_linears_match_timm_on_both_paths(monkeypatch):
    """The fused linear form is plain nn.Linear; deploy.optimize(model, "cpu") runs its Linears on oneDNN in
    eager no-grad fp32 CPU inference and on ``F.linear`` elsewhere: both paths must give timm's logits, and
    the fast one must really run."""
    from effivit import deploy
    from effivit.deploy.cpu import OneDnnLinear

    ours, ref = timm_pair("levit_128s")
    plain = deploy.fuse(ours)
    assert not any(isinstance(m, OneDnnLinear) for m in plain.modules())
    fused = deploy.optimize(plain, "cpu")
    linears = [m for m in fused.modules() if isinstance(m, OneDnnLinear)]
    # qkv + proj per block, kv + q + proj per downsample, two per MLP, the merged head.
    assert len(linears) == 2 * 9 + 3 * 2 + 2 * 11 + 1
    assert sum(m.hardswish for m in linears) == 11  # every MLP's first Linear carries its activation
    onednn = linears[0]._onednn_ok
    x = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        expected = ref(x)
    calls = []
    onednn_forward = OneDnnLinear._onednn_forward
    monkeypatch.setattr(OneDnnLinear, "_onednn_forward",
                        lambda self, t, d: calls.append(d) or onednn_forward(self, t, d))
    with torch.inference_mode():
        fast = fused(x)
    assert len(calls) == (len(linears) if onednn else 0)
    assert_close(fast, expected, 1e-4, "optimized (oneDNN path) vs timm")
    calls.clear()

    def set_onednn(ok: bool) -> None:
        for m in linears:
            m._onednn_ok = ok

    with torch.no_grad(), torch.autocast("cpu", enabled=False):
        set_onednn(False)
        portable = fused(x)
    assert not calls
    assert_close(portable, expected, 1e-4, "optimized (F.linear path) vs timm")
    set_onednn(onednn)
    # The packed-weight cache follows in-place updates and survives deepcopy (packed tensors cannot be copied).
    with torch.no_grad():
        for m in (linears[0], linears[-1]):  # a first-stage qkv and the head
            m.weight.mul_(1.1)
        updated = fused(x)
        assert_close(copy.deepcopy(fused)(x), updated, 0.0, "deepcopy of a fused model that has run")
        set_onednn(False)
        updated_portable = fused(x)
        set_onednn(onednn)
    assert (updated - fast).abs().max() > 1e-2
    assert_close(updated, updated_portable, 1e-4, "oneDNN path after an in-place weight update")
    calls.clear()
    # With autograd the portable path runs (oneDNN's fused op has no backward) and gradients flow.
    for p in fused.parameters():
        p.requires_grad_(True)
    fused(x).sum().backward()
    assert not calls and all(m.weight.grad is not None for m in linears)
