"""RepViT: timm parity for every variant, parameter counts (timm's and the paper's deploy counts), what fuse
removes, the distillation-head semantics, and the shared SqueezeExcite."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, compare_with_timm, randomize_norm_stats, scale_classifier
from torch import nn

import effivit
from effivit.deploy import count_batchnorms, fuse, optimize
from effivit.deploy.cpu import PointwiseConv
from effivit.layers.se import SqueezeExcite
from effivit.models.repvit import DistilledClassifier, RepVggDw
from effivit.registry import get_entry

timm = pytest.importorskip("timm")

VARIANTS = ["repvit_m0_9", "repvit_m1_0", "repvit_m1_1", "repvit_m1_5", "repvit_m2_3"]


@pytest.mark.parametrize("name", VARIANTS)
def test_matches_timm_at_224(name):
    # Non-trivial BN statistics, O(1) logits; compare_with_timm also loads timm's state dict through our filter.
    ours, ref = compare_with_timm(name, img_size=224, batch=1 if name in ("repvit_m1_5", "repvit_m2_3") else 2)
    # timm's own reparameterized form and ours agree too.
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_close(fuse(ours)(x), ref.fuse()(x), 1e-4, f"{name} fused vs timm fused")


def test_registry_covers_every_variant():
    assert effivit.list_models(family="repvit") == sorted(VARIANTS)
    entry = get_entry("repvit_m1_0")
    assert entry.defaults.has_distill_head
    assert effivit.list_models("repvit_m1_0*", pretrained=True) == ["repvit_m1_0.dist_300e_in1k",
                                                                     "repvit_m1_0.dist_450e_in1k"]


@pytest.mark.parametrize("name", VARIANTS)
def test_parameter_counts(name):
    with torch.device("meta"):
        model = effivit.create_model(name).eval()
        deployed = fuse(model)
    published = get_entry(name).default_tag.published
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(count, 2) == published.timm_params_m, f"{name}: {count:.4f}M vs timm {published.timm_params_m}M"
    # The paper reports the deployed network: branches reparameterized, BN folded, one averaged head.
    deployed_count = sum(p.numel() for p in deployed.parameters()) / 1e6
    assert round(deployed_count, 1) == published.params_m, f"{name}: deployed {deployed_count:.3f}M vs paper"


def test_fuse_leaves_no_batchnorm_and_no_branches():
    torch.manual_seed(0)
    model = randomize_norm_stats(effivit.create_model("repvit_m0_9")).eval()
    scale_classifier(model)
    fused = fuse(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fused(x), model(x), 1e-4, "fused vs unfused")
    assert count_batchnorms(model) > 0 and count_batchnorms(fused) == 0
    assert not any(isinstance(m, (RepVggDw, DistilledClassifier)) for m in fused.modules())
    for block in fused.stages[1].blocks:
        mixer = block.token_mixer
        assert type(mixer) is nn.Conv2d and mixer.groups == mixer.in_channels and mixer.kernel_size == (3, 3)
        assert type(block.channel_mixer.conv1) is nn.Conv2d  # plain maths; the CPU kernel is a deploy pass
    for block in optimize(fused, "cpu").stages[1].blocks:
        assert isinstance(block.channel_mixer.conv1, PointwiseConv)
    assert isinstance(fused.head, nn.Linear)  # both heads, BN folded, averaged into one Linear


def test_distillation_head_semantics():
    torch.manual_seed(0)
    model = randomize_norm_stats(effivit.create_model("repvit_m0_9", num_classes=10))
    scale_classifier(model)
    x = torch.randn(2, 3, 64, 64)
    model.eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)
        expected = (model.head.head(feats) + model.head.head_dist(feats)) / 2
        assert_close(model(x), expected, 1e-5, "eval returns the mean of both heads")
        assert_close(fuse(model)(x), expected, 1e-4, "the merged head")
    model.train()
    assert isinstance(model(x), torch.Tensor), "timm's default: one tensor in training mode"
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and len(out) == 2 and all(o.shape == (2, 10) for o in out)
    assert (out[0] - out[1]).abs().max() > 1e-3, "the two heads are separate layers"
    model.set_distilled_training(False)
    assert isinstance(model(x), torch.Tensor)
    # reset_classifier replaces both heads.
    model.set_distilled_training(True)
    model.reset_classifier(4)
    out = model(x)
    assert [o.shape for o in out] == [(2, 4), (2, 4)]
    model.reset_classifier(0)
    model.eval()
    with torch.no_grad():
        assert model(x).shape == (2, model.num_features)


def test_training_output_matches_timm_distilled_training():
    torch.manual_seed(0)
    ref = timm.create_model("repvit_m0_9", num_classes=10).train()
    ref.set_distilled_training(True)
    ours = effivit.create_model("repvit_m0_9", num_classes=10).train()
    effivit.load_checkpoint(ours, ref.state_dict())
    x = torch.randn(4, 3, 64, 64)
    ref.set_distilled_training(False)
    assert_close(ours(x), ref(x), 1e-4, "default training output (batch statistics)")
    ref.set_distilled_training(True)
    ours.set_distilled_training(True)
    a, b = ref(x), ours(x)
    assert_close(b[0], a[0], 1e-4, "head (batch statistics)")
    assert_close(b[1], a[1], 1e-4, "head_dist (batch statistics)")


def test_features_only_gives_four_levels():
    backbone = effivit.create_model("repvit_m1_0", features_only=True).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 128, 128))
    assert [f.shape[1] for f in feats] == [56, 112, 224, 448]
    assert [128 // f.shape[-1] for f in feats] == [4, 8, 16, 32]


def test_squeeze_excite_matches_timm_and_folds_its_norm():
    from timm.layers import SEModule

    torch.manual_seed(0)
    for kwargs in (dict(rd_ratio=0.25), dict(rd_ratio=1 / 16, rd_divisor=1), dict(rd_channels=5)):
        ref = SEModule(40, **kwargs).eval()
        ours = SqueezeExcite(40, **kwargs).eval()
        ours.load_state_dict(ref.state_dict())
        x = torch.randn(2, 40, 7, 7)
        with torch.no_grad():
            assert_close(ours(x), ref(x), 1e-5, f"SE {kwargs}")
    se = randomize_norm_stats(SqueezeExcite(32, rd_ratio=0.25, norm_layer=nn.BatchNorm2d)).eval()
    x = torch.randn(2, 32, 5, 5)
    with torch.no_grad():
        expected = se(x)
        fused = fuse(se)
        assert count_batchnorms(fused) == 0
        assert_close(fused(x), expected, 1e-5, "SE with its norm folded")
        assert_close(torch.jit.script(fused)(x), expected, 1e-5, "scripted SE")
