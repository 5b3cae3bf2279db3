"""EfficientViT (MSRA) m0-m5: timm parity (also off the training size, where windows are padded), parameter
counts, fusing (Conv-BN, BN-Linear, identity into residual dw convs), cached attention biases, features."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, compare_with_timm, randomize_norm_stats

import effivit
from effivit.deploy import count_batchnorms, fuse
from effivit.deploy.fold import depthwise_conv_matrix
from effivit.models.efficientvit_msra import (
    VARIANTS,
    CascadedGroupAttention,
    EfficientViTMsraConfig,
    Residual,
    WindowDepthwise,
)
from effivit.registry import reference_tables

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def m0_pair():
    """(ours, timm's) m0 with timm's random weights (and randomised BN statistics) copied into ours."""
    ours, ref = compare_with_timm("efficientvit_m0", img_size=224)
    with torch.no_grad():  # non-zero biases, so that using the wrong offset or window would show
        for name, p in ref.named_parameters():
            if name.endswith("attention_biases"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    ref.train().eval()  # timm caches the gathered biases in eval mode; train() drops its cache
    effivit.load_checkpoint(ours, ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("size", [(64, 64), (160, 96), (320, 224)])
def test_m0_matches_timm_at_other_sizes(m0_pair, size):
    # Off 224 the maps are not whole windows: both zero-pad to whole windows and crop back.
    ours, ref = m0_pair
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        assert_close(ours(x), expected, 1e-4, f"m0 at {size}")
        assert_close(fuse(ours)(x), expected, 1e-4, f"fused m0 at {size}")


@pytest.mark.parametrize("name", ["efficientvit_m1", "efficientvit_m2", "efficientvit_m3", "efficientvit_m4"])
def test_matches_timm(name):
    compare_with_timm(name, img_size=224, batch=1)


@pytest.mark.slow
def test_m5_matches_timm():
    compare_with_timm("efficientvit_m5", img_size=224, batch=1)


def _agrees(count: int, figure: str, exact: bool) -> bool:
    """count (parameters) against a figure in millions: equal at the figure's precision (``exact``), or
    within one unit of its last digit (papers round or truncate)."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    if exact:
        return round(count / 1e6, decimals) == float(figure)
    return abs(count / 1e6 - float(figure)) < 10.0**-decimals


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count(name):
    published, timm_rows = reference_tables()
    row = next(r for r in published if r["model"].startswith(name + "."))
    timm_count = timm_rows[(row["model"], int(row["img_size"]))]["param_count"]
    count = sum(p.numel() for p in effivit.create_model(name).parameters())
    assert _agrees(count, timm_count, exact=True), f"{name}: {count} parameters vs timm's {timm_count}M"
    assert _agrees(count, row["params_m"], exact=False), f"{name}: {count} vs the paper's {row['params_m']}M"


def test_fuse_folds_norms_identities_and_caches_biases(m0_pair):
    ours, _ = m0_pair
    model = randomize_norm_stats(effivit.create_model("efficientvit_m0"), seed=5).eval()
    effivit.load_checkpoint(model, {k: v for k, v in ours.state_dict().items() if "attention_biases" in k},
                            strict=False)
    fused = fuse(model)
    assert count_batchnorms(model) > 0 and count_batchnorms(fused) == 0
    # Every residual depth-wise conv became one conv (identity folded into the kernel).
    assert not any(isinstance(m, Residual) and isinstance(m.m, torch.nn.Conv2d) for m in fused.modules())
    attns = [m for m in fused.modules() if isinstance(m, CascadedGroupAttention)]
    assert attns and all(a.attention_bias_cache.numel() > 0 for a in attns)
    # q's depth-wise convs became window matrices with the attention scale folded in.
    assert all(a.dense_q and a.scale == 1.0 and all(isinstance(d, WindowDepthwise) for d in a.dws) for a in attns)
    with pytest.raises(ValueError, match="7x7 windows"):
        attns[0](torch.randn(1, attns[0].num_heads * attns[0].val_dim, 6, 6))
    assert not any("attention_bias_cache" in k for k in fused.state_dict())
    x = torch.randn(2, 3, 224, 160)
    with torch.no_grad():
        expected = model(x)
        assert_close(fused(x), expected, 1e-4, "fused vs unfused")


def test_bias_cache_follows_weight_changes(m0_pair):
    ours, _ = m0_pair
    fused = fuse(ours)
    shifted = copy.deepcopy(ours)
    with torch.no_grad():
        for name, p in shifted.named_parameters():
            if name.endswith("attention_biases"):
                p.add_(torch.randn(p.shape))  # not a constant: softmax ignores constant shifts
    reference = fuse(shifted)  # its caches are gathered from the shifted tables
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        before = fused(x)
        # Loading other biases into a fused model must not reuse the cached gather.
        fused.load_state_dict(reference.state_dict())
        after = fused(x)
        assert (after - before).abs().max() > 1e-3
        assert_close(after, reference(x), 1e-5, "reloaded biases")
        # train()/eval() round trips and dtype moves rebuild rather than reuse.
        fused.train().eval()
        assert_close(fused(x), after, 1e-5, "after train/eval")
        assert_close(fused.double()(x.double()).float(), after, 1e-4, "float64")


def test_features_match_timm(m0_pair):
    ours, ref = m0_pair
    backbone = effivit.create_model("efficientvit_m0", features_only=True).eval()
    effivit.load_checkpoint(backbone, ours.state_dict())
    # Three levels: the stride-16 stem leaves no stride-4/8 map.
    assert backbone.feature_info.reduction() == [16, 32, 64]
    assert backbone.feature_info.channels() == list(VARIANTS["efficientvit_m0"].embed_dim)
    x = torch.randn(1, 3, 192, 256)
    with torch.no_grad():
        feats = backbone(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == len(expected) == 3
    for f, e in zip(feats, expected):
        assert_close(f, e, 1e-4, "pyramid level")


def test_headless_and_new_head_load_timm_weights(m0_pair):
    ours, ref = m0_pair
    x = torch.randn(1, 3, 64, 64)
    headless = effivit.create_model("efficientvit_m0", num_classes=0).eval()
    # The filter drops head.bn too: a headless model (timm's as well) has no norm after pooling.
    effivit.load_checkpoint(headless, ref.state_dict(), drop_classifier=True)
    with torch.no_grad():
        assert_close(headless(x), ref.forward_head(ref.forward_features(x), pre_logits=True), 1e-4, "pooled")
    model = effivit.create_model("efficientvit_m0").eval()
    model.reset_classifier(10)
    assert not model.head.training and model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model(x).shape == (1, 10)


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="num_heads"):
        EfficientViTMsraConfig((64, 128, 190), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5))
    with pytest.raises(ValueError, match="kernels"):
        EfficientViTMsraConfig((64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5))
    with pytest.raises(ValueError, match="4-D"):
        effivit.create_model("efficientvit_m0")(torch.randn(3, 72, 64))


@pytest.mark.parametrize("kernel,h,w", [(3, 7, 7), (5, 4, 6), (7, 7, 7)])
def test_depthwise_conv_matrix_is_the_conv(kernel, h, w):
    conv = torch.nn.Conv2d(6, 6, kernel, padding=kernel // 2, groups=6)
    m = depthwise_conv_matrix(conv, h, w)  # C, N, N
    x = torch.randn(3, 6, h, w)
    with torch.no_grad():
        expected = conv(x).flatten(2) - conv.bias[:, None]
        got = (x.flatten(2).permute(1, 0, 2) @ m).permute(1, 0, 2)
    assert_close(got, expected, 1e-5, "matrix form of a depth-wise conv")
    with pytest.raises(ValueError, match="depth-wise"):
        depthwise_conv_matrix(torch.nn.Conv2d(6, 6, 3, padding=1), h, w)
