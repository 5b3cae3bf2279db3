"""ConvNeXt and ConvNeXt-V2: timm parity for every variant, parameter counts, what fuse produces, and the
shared layers this family introduced (GRN, NormMlpClassifierHead, PointwiseConv)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, scale_classifier
from torch import nn

import effivit
from effivit.deploy import fuse, optimize
from effivit.deploy.cpu import PointwiseConv
from effivit.layers.classifier import NormMlpClassifierHead
from effivit.layers.norm import GlobalResponseNorm
from effivit.models.convnext import ConvNeXtBlock, FusedConvNeXtBlock
from effivit.registry import get_entry

timm = pytest.importorskip("timm")

SMALL = ["convnextv2_atto", "convnextv2_femto", "convnextv2_pico", "convnextv2_nano", "convnextv2_tiny",
         "convnext_tiny"]
BIG = ["convnext_small", "convnext_base", "convnext_large", "convnextv2_base"]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make the parts that start as (near) no-ops matter: layer scales (1e-6), GRN (zeros), LayerNorm affines.
    With timm's init a V1 block contributes ~1e-6 and a V2 GRN is the identity, so logits would not
    depend on them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.5 + 0.25)
            elif ".grn." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif "norm" in name and p.dim() == 1:
                base = 1.0 if name.endswith("weight") else 0.0
                p.copy_(base + (torch.rand(p.shape, generator=g) - 0.5) * 0.4)
    return scale_classifier(model, seed=seed)


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False)).eval()
    ours = effivit.create_model(name).eval()
    effivit.load_checkpoint(ours, ref.state_dict())  # timm's state dict as it is (atto..nano: 1x1 conv MLPs)
    return ours, ref


def _check(name: str, size: int, batch: int) -> None:
    ours, ref = _pair(name)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
        fused = fuse(ours)(x)
    assert expected.abs().max() > 1e-2
    assert_close(got, expected, 1e-4, f"{name} vs timm")
    assert_close(fused, expected, 1e-4, f"{name} fused vs timm")
    # The comparison sees the blocks: changing one layer scale / GRN weight changes the logits.
    block = ours.stages[1].blocks[0]
    with torch.no_grad():
        (block.gamma if block.gamma is not None else block.mlp.grn.weight).mul_(-1.0)
        assert (ours(x) - got).abs().max() > 1e-3, f"{name}: logits do not depend on the blocks"


@pytest.mark.parametrize("name", SMALL)
def test_matches_timm_at_224(name):
    _check(name, 224, 2)


@pytest.mark.slow
def test_matches_timm_big_variants():
    # Fully convolutional: parity at 64x64 checks the same weights and ops as at 224, at a fraction of the time.
    for name in BIG:
        _check(name, 64, 1)


def test_registry_covers_every_variant_and_family():
    assert set(effivit.list_models(family="convnext")) == {"convnext_tiny", "convnext_small", "convnext_base",
                                                           "convnext_large"}
    assert set(effivit.list_models(family="convnextv2")) == {f"convnextv2_{s}" for s in
                                                             ("atto", "femto", "pico", "nano", "tiny", "base")}
    assert set(SMALL + BIG) == set(effivit.list_models(["convnext_*", "convnextv2_*"]))


@pytest.mark.parametrize("name", SMALL + BIG)
def test_parameter_counts(name):
    with torch.device("meta"):
        model = effivit.create_model(name)
    count = sum(p.numel() for p in model.parameters()) / 1e6
    published = get_entry(name).default_tag.published
    assert round(count, 2) == published.timm_params_m, f"{name}: {count:.4f}M vs timm {published.timm_params_m}M"
    # The papers round (28, 3.7, 15.6 ...) and their READMEs give 28M and 29M for the same ConvNeXt-T: agree
    # within one unit of the last digit they report.
    unit = 1.0 if published.params_m == int(published.params_m) else 0.1
    assert abs(count - published.params_m) < unit, f"{name}: {count:.2f}M vs paper {published.params_m}M"


@pytest.mark.parametrize("name", ["convnext_tiny", "convnextv2_atto"])
def test_fused_form(name):
    torch.manual_seed(0)
    model = _randomize(effivit.create_model(name)).eval()
    fused = fuse(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fused(x), model(x), 1e-4, f"{name} fused")
    blocks = [m for m in fused.modules() if isinstance(m, (ConvNeXtBlock, FusedConvNeXtBlock))]
    assert blocks and all(isinstance(b, FusedConvNeXtBlock) for b in blocks)
    for b in blocks:
        assert type(b.fc1) is nn.Conv2d and type(b.fc2) is nn.Conv2d  # plain maths; CPU kernels: optimize
    cpu = [m for m in optimize(fused, "cpu").modules() if isinstance(m, FusedConvNeXtBlock)]
    assert all(isinstance(b.fc1, PointwiseConv) and isinstance(b.fc2, PointwiseConv) for b in cpu)
    for b in blocks:
        if isinstance(b.grn, GlobalResponseNorm):
            assert b.grn.bias is None and not b.grn.channels_last
    # Layer scale and GRN bias were folded: no parameter of those names is left.
    names = [n for n, _ in fused.named_parameters()]
    assert not any(n.endswith("gamma") or n.endswith("grn.bias") for n in names)
    # The unfused model is untouched.
    assert any(isinstance(m, ConvNeXtBlock) for m in model.modules())


def test_features_only_gives_four_levels():
    backbone = effivit.create_model("convnextv2_atto", features_only=True).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 128, 128))
    assert [f.shape[1] for f in feats] == [40, 80, 160, 320]
    assert [128 // f.shape[-1] for f in feats] == [4, 8, 16, 32]


def test_train_mode_drop_path_and_reset_classifier():
    model = effivit.create_model("convnextv2_atto", drop_path_rate=0.1, num_classes=3).train()
    drops = [m.drop_path.drop_prob for m in model.modules() if isinstance(m, ConvNeXtBlock)]
    assert drops[0] == 0.0 and drops[-1] == pytest.approx(0.1)
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.stages[3].blocks[-1].mlp.grn.weight.grad is not None
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5


# ---- shared layers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels_last", [True, False])
def test_grn_matches_timm_and_bias_folds(channels_last):
    from timm.layers.grn import GlobalResponseNorm as TimmGRN

    torch.manual_seed(0)
    ref = TimmGRN(12, channels_last=channels_last)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = GlobalResponseNorm(12, channels_last=channels_last)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 6, 12) if channels_last else torch.randn(2, 12, 5, 6)
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-5, "GRN")
        assert_close(torch.jit.script(ours)(x), ref(x), 1e-5, "scripted GRN")
        bias = ours.take_bias()
        shift = bias if channels_last else bias.reshape(-1, 1, 1)
        assert_close(ours(x) + shift, ref(x), 1e-5, "GRN without bias")
        assert_close(torch.jit.script(ours)(x) + shift, ref(x), 1e-5, "scripted GRN without bias")


@pytest.mark.parametrize("hidden_size,pool", [(None, "avg"), (24, "avg"), (None, ""), (24, "max")])
def test_norm_mlp_head_matches_timm(hidden_size, pool):
    from timm.layers import NormMlpClassifierHead as TimmHead

    torch.manual_seed(0)
    ref = TimmHead(16, 5, hidden_size=hidden_size, pool_type=pool, norm_layer="layernorm2d",
                   act_layer="tanh").eval()
    ours = NormMlpClassifierHead(16, 5, hidden_size=hidden_size, pool_type=pool, norm_eps=1e-6).eval()
    state = {k: v.reshape(ours.state_dict()[k].shape) for k, v in ref.state_dict().items()}
    ours.load_state_dict(state)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        ref.load_state_dict({k: v.reshape(ref.state_dict()[k].shape) for k, v in ours.state_dict().items()})
        x = torch.randn(2, 16, 4, 4)
        assert_close(ours(x), ref(x), 1e-5, "head")
        assert_close(ours(x, pre_logits=True), ref(x, pre_logits=True), 1e-5, "pre_logits")


@pytest.mark.parametrize("shape", [(1, 8, 4, 4), (2, 64, 20, 20), (1, 320, 7, 7)])
def test_pointwise_conv_equals_conv(shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 24, 1)
    pw = PointwiseConv.from_conv(conv)
    x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(pw(x), conv(x), 1e-5, "pointwise")
        assert_close(torch.jit.script(pw)(x), conv(x), 1e-5, "scripted pointwise")
    with pytest.raises(ValueError, match="1x1"):
        PointwiseConv.from_conv(nn.Conv2d(8, 8, 3))
