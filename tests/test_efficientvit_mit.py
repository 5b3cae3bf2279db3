"""EfficientViT (MIT) b0-b3: timm parity, parameter counts, fusing, pyramid features, fp32 linear attention."""

from __future__ import annotations

import unittest.mock

import pytest
import torch
from conftest import assert_close, compare_with_timm, randomize_norm_stats

import effivit
from effivit.deploy import count_batchnorms, fuse
from effivit.models import efficientvit_mit as mit
from effivit.models.efficientvit_mit import VARIANTS, EfficientViTMitConfig, LiteMLA
from effivit.registry import get_entry, reference_tables, with_config

timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def b0_pair():
    """(ours, timm's) b0 with timm's random weights (and randomised BN statistics) copied into ours."""
    return compare_with_timm("efficientvit_b0", img_size=224)


def test_b0_matches_timm_at_other_resolutions(b0_pair):
    # Linear attention has no resolution-dependent parameters: any multiple of 32 works, non-square too.
    ours, ref = b0_pair
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "b0 at 96x160")


@pytest.mark.parametrize("name", ["efficientvit_b1", "efficientvit_b2"])
def test_matches_timm(name):
    compare_with_timm(name, img_size=160)


@pytest.mark.slow
def test_b3_matches_timm():
    compare_with_timm("efficientvit_b3", img_size=128, batch=1)


def _published_params(name: str) -> tuple[str, str]:
    """(paper's params_m, timm's param_count) as written in the reference tables for the default tag."""
    published, timm_rows = reference_tables()
    row = next(r for r in published if r["model"].startswith(name + "."))
    timm_row = timm_rows[(row["model"], int(row["img_size"]))]
    return row["params_m"], timm_row["param_count"]


def _agrees(count: int, figure: str) -> bool:
    """count (parameters) rounds to the published figure (millions) at the precision it is written with."""
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return round(count / 1e6, decimals) == float(figure)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count(name):
    count = sum(p.numel() for p in effivit.create_model(name).parameters())
    paper, timm_count = _published_params(name)
    assert _agrees(count, timm_count), f"{name}: {count} parameters vs timm's {timm_count}M"
    assert _agrees(count, paper), f"{name}: {count} parameters vs the paper's {paper}M"


def test_fuse_folds_every_batchnorm(b0_pair):
    ours, _ = b0_pair
    model = randomize_norm_stats(effivit.create_model("efficientvit_b0"), seed=3).eval()
    assert count_batchnorms(model) > 0
    fused = fuse(model)
    assert count_batchnorms(fused) == 0
    # The head's LayerNorm (after a Linear without bias, before Hardswish) has nothing to fold into.
    assert sum(isinstance(m, torch.nn.LayerNorm) for m in fused.modules()) == 1
    x = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        assert_close(fused(x), model(x), 1e-4, "fused vs unfused")
    # Stage-opening blocks have no shortcut: fusing drops their wrapper.
    assert not any(type(m).__name__ == "Residual" and not m.shortcut for m in fused.modules())


def test_features_match_timm(b0_pair):
    ours, ref = b0_pair
    backbone = effivit.create_model("efficientvit_b0", features_only=True).eval()
    effivit.load_checkpoint(backbone, ours.state_dict())
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        feats = backbone(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    assert backbone.feature_info.channels() == list(VARIANTS["efficientvit_b0"].widths[1:])
    assert len(feats) == len(expected) == 4
    for f, e in zip(feats, expected):
        assert_close(f, e, 1e-4, "pyramid level")


def test_linear_attention_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    attn = LiteMLA(32, 32, head_dim=8).eval()
    seen = []
    inner = mit._linear_attention

    def spy(q, k, v, eps):
        seen.append((q.dtype, k.dtype, v.dtype, torch.is_autocast_enabled("cpu")))
        return inner(q, k, v, eps)

    x = torch.randn(2, 32, 16, 16) * 30
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), \
            unittest.mock.patch.object(mit, "_linear_attention", spy):
        y = attn(x)
    assert seen == [(torch.float32, torch.float32, torch.float32, False)]
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


def test_head_and_num_features(b0_pair):
    ours, ref = b0_pair
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        pre = ours.forward_head(ours.forward_features(x), pre_logits=True)
        assert_close(pre, ref.forward_head(ref.forward_features(x), pre_logits=True), 1e-4, "pre-logits")
    # timm's convention: num_features is the last stage's width, head_hidden_size the pre-logits width.
    assert pre.shape[-1] == ours.head_hidden_size == ref.head_hidden_size == 1280
    assert ours.num_features == ref.num_features == 128
    assert ours.get_classifier() is ours.head.classifier[4]


def test_bad_config_and_pool_are_rejected():
    with pytest.raises(ValueError, match="head_dim"):
        EfficientViTMitConfig((8, 16, 32, 60, 128), (1, 2, 2, 2, 2), 16, (1024, 1280))
    with pytest.raises(ValueError, match="depths"):
        with_config(get_entry("efficientvit_b0"), depths=(1, 2, 2, 2))
    with pytest.raises(ValueError, match="global_pool"):
        effivit.create_model("efficientvit_b0", global_pool="token")
