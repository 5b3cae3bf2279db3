"""Registry-wide contract: every registered model honours the same surface and deploy guarantees.

Capabilities are read from each model's config (size divisor, distillation head), not from lists of
exceptions. Per-model checks run at a small input size to keep the suite fast; the heavier deploy checks
(TorchScript, ONNX Runtime, channels_last, autocast, training) run on the smallest variant of each family.
"""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import assert_close, randomize_norm_stats

import effivit
from effivit.deploy import export_onnx, fuse
from effivit.registry import get_entry, list_families

MODELS = effivit.list_models()
FAMILIES = list_families()


def small_size(name: str) -> int:
    divisor = get_entry(name).defaults.size_divisor
    return max(64, 2 * divisor)


@functools.cache
def smallest_variant(family: str) -> str:
    """The family's variant with the fewest published parameters (counted when none are published)."""

    def params(name: str) -> float:
        tag = get_entry(name).default_tag
        if tag is not None and tag.published.params_m is not None:
            return tag.published.params_m
        return sum(p.numel() for p in effivit.create_model(name).parameters()) / 1e6

    return min(effivit.list_models(family=family), key=params)


def tolerance(reference: torch.Tensor, atol: float = 1e-4) -> float:
    # Folding reorders float sums: allow 1e-4 relative to the output's scale.
    return atol * max(1.0, float(reference.abs().max()))


def test_registry_is_populated():
    assert "nextvit_small" in MODELS
    assert len(FAMILIES) >= 1


@pytest.mark.parametrize("name", MODELS)
def test_model_contract(name):
    torch.manual_seed(0)
    model = effivit.create_model(name).eval()
    randomize_norm_stats(model)
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "hf_hub_id"):
        assert key in cfg, f"pretrained_cfg lacks {key}"
    assert model.default_cfg is model.pretrained_cfg
    assert cfg["architecture"] == name

    s = small_size(name)
    x = torch.randn(1, 3, s, s)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1000)
    assert torch.isfinite(y).all()

    # The deploy form gives the same outputs.
    fused = fuse(model)
    with torch.no_grad():
        yf = fused(x)
    assert_close(yf, y, tolerance(y), f"{name} fused vs unfused")

    # Multi-scale features for necks: one map per feature_info entry, with the declared channels/strides.
    with torch.no_grad():
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == len(model.feature_info) >= 1
    for f, info in zip(feats, model.feature_info):
        assert f.dim() == 4 and f.shape[1] == info["num_chs"], f"{name}: {tuple(f.shape)} vs {info}"
        assert s // f.shape[-1] == info["reduction"], f"{name}: map {tuple(f.shape)} at input {s} vs {info}"
    final, inter = model.forward_intermediates(x)
    assert len(inter) == len(feats)
    with torch.no_grad():
        assert_close(model.forward_head(final), y, tolerance(y), f"{name} forward_intermediates final")

    # pre_logits / heads.
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (1, model.head_hidden_size)
    assert model.forward_features(x).shape[1] == model.num_features
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (1, model.head_hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_is_rejected(family):
    name = smallest_variant(family)
    model = effivit.create_model(name).eval()
    divisor = model.pretrained_cfg["size_divisor"]
    s = small_size(name)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, s, s))
    if divisor > 1:
        with pytest.raises(ValueError, match=f"multiples of {divisor}"):
            model(torch.randn(1, 3, s + divisor // 2, s))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, s, s))


@pytest.mark.parametrize("family", FAMILIES)
def test_features_only(family):
    name = smallest_variant(family)
    backbone = effivit.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
    s = small_size(name)
    with torch.no_grad():
        feats = backbone(torch.randn(2, 3, s, s))
    assert len(feats) == 2
    assert [f.shape[1] for f in feats] == backbone.feature_info.channels() == backbone.out_channels
    assert [s // f.shape[-1] for f in feats] == backbone.feature_info.reduction() == backbone.strides
    with pytest.raises(ValueError, match="out of range"):
        effivit.create_model(name, features_only=True, out_indices=(99,))


@pytest.mark.parametrize("family", FAMILIES)
def test_torchscript_channels_last_autocast(family):
    name = smallest_variant(family)
    torch.manual_seed(0)
    model = randomize_norm_stats(effivit.create_model(name)).eval()
    s = small_size(name)
    x = torch.randn(2, 3, s, s)
    with torch.no_grad():
        y = model(x)
        for form, m in (("unfused", model), ("fused", fuse(model))):
            scripted = torch.jit.script(m)
            assert_close(scripted(x), y, tolerance(y), f"{name} TorchScript ({form})")
        cl = fuse(model).to(memory_format=torch.channels_last)
        assert_close(cl(x.to(memory_format=torch.channels_last)), y, tolerance(y), f"{name} channels_last")
        fused = fuse(model)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                yb = fused(x)
            assert torch.isfinite(yb).all(), f"{name}: non-finite output under {dtype} autocast"
            # Half precision keeps ~3 significant digits: the logits must stay close to fp32's.
            assert (yb.float() - y).abs().max() < 0.1 * max(1.0, float(y.abs().max())) + 0.5, f"{name} {dtype}"


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_parity(family, tmp_path):
    pytest.importorskip("onnxruntime")
    name = smallest_variant(family)
    torch.manual_seed(0)
    model = fuse(randomize_norm_stats(effivit.create_model(name)).eval())
    s = small_size(name)
    path = export_onnx(model, tmp_path / f"{name}.onnx", img_size=s, dynamic_batch=True)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_with_drop_path_and_grad_checkpointing(family):
    name = smallest_variant(family)
    torch.manual_seed(0)
    model = effivit.create_model(name, num_classes=5, drop_path_rate=0.2).train()
    # Some references zero-init the last norm of each residual branch (no gradient reaches the branch at
    # step 0); non-trivial norm parameters make the test see the whole graph.
    randomize_norm_stats(model)
    model.set_grad_checkpointing(True)
    s = small_size(name)
    x = torch.randn(2, 3, s, s)
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out[0]
    assert logits.shape == (2, 5)
    loss = sum(o.float().logsumexp(-1).mean() for o in (out if isinstance(out, (tuple, list)) else (out,)))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    with_grad = sum(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    assert with_grad >= 0.9 * len(grads), f"{name}: only {with_grad}/{len(grads)} parameters got gradients"


def test_torch_compile_one_small_model():
    # Compiling costs about a minute per model on 2 cores: one small configuration proves the path.
    name = min((smallest_variant(f) for f in FAMILIES),
               key=lambda n: sum(p.numel() for p in effivit.create_model(n).parameters()))
    torch.manual_seed(0)
    model = fuse(randomize_norm_stats(effivit.create_model(name)).eval())
    s = small_size(name)
    x = torch.randn(1, 3, s, s)
    compiled = torch.compile(model)
    with torch.no_grad():
        y = model(x)
        yc = compiled(x)
    assert_close(yc, y, tolerance(y, 1e-3), f"{name} torch.compile")
