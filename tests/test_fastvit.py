"""FastViT t8-ma36: timm parity, parameter counts, configs, what fusing removes, pyramid features."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close, compare_with_timm, randomize_norm_stats
from torch import nn

import effivit
from effivit.deploy import count_batchnorms, fuse
from effivit.layers import LayerScale2d
from effivit.layers.rep import (
    ChannelRepeatConv,
    ConvBn,
    MobileOneBlock,
    ReparamLargeKernelConv,
    is_channel_multiplier_conv,
)
from effivit.models._features import FeatureExtractor
from effivit.models.fastvit import (
    GELU,
    VARIANTS,
    AttentionBlock,
    FastViTConfig,
    RepCPE,
    RepMixer,
    RepMixerBlock,
)
from effivit.registry import get_entry, reference_tables, with_config

timm = pytest.importorskip("timm")

@pytest.fixture(scope="module")
def sa12_pair():
    """(ours, timm's) sa12 at its training size: RepMixer stages, RepCPE and an attention stage."""
    return compare_with_timm("fastvit_sa12", img_size=256, batch=2)


@pytest.fixture(scope="module")
def sa12_fused(sa12_pair):
    ours, _ = sa12_pair
    return fuse(ours)


@pytest.mark.parametrize("name", ["fastvit_t8", "fastvit_t12", "fastvit_s12"])
def test_matches_timm(name):
    compare_with_timm(name, img_size=256 if name == "fastvit_t8" else 96, batch=2 if name == "fastvit_t8" else 1)


def test_sa12_matches_timm_at_another_resolution(sa12_pair):
    # Nothing depends on the resolution: a non-square multiple of 32 gives timm's logits too.
    ours, ref = sa12_pair
    x = torch.randn(2, 3, 96, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "sa12 at 96x160")


@pytest.mark.slow
def test_large_variants_match_timm():
    for name in ("fastvit_sa24", "fastvit_sa36", "fastvit_ma36"):
        compare_with_timm(name, img_size=64, batch=1)


def _published(name: str) -> tuple[str, str]:
    """(paper table's params_m, timm's param_count) for the default tag, as written in the CSVs."""
    published, timm_rows = reference_tables()
    row = next(r for r in published if r["model"].startswith(name + "."))
    return row["params_m"], timm_rows[(row["model"], int(row["img_size"]))]["param_count"]


def _agrees(count: int, figure: str) -> bool:
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return round(count / 1e6, decimals) == float(figure)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count(name):
    # published.csv's FastViT figures are timm's train-time (unfused) counts: compare the unfused model.
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        ours = effivit.create_model(name)
        ref = timm.create_model(name)
    count = sum(p.numel() for p in ours.parameters())
    paper, timm_count = _published(name)
    assert _agrees(count, timm_count), f"{name}: {count} parameters vs timm's {timm_count}M"
    assert _agrees(count, paper), f"{name}: {count} parameters vs published {paper}M"
    assert count == sum(p.numel() for p in ref.parameters())


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_pretrained_cfg_matches_timm(name):
    ours = get_entry(name).pretrained_cfg()
    theirs = timm.models.get_pretrained_cfg(name).to_dict()
    assert ours["input_size"] == theirs["input_size"] == (3, 256, 256)
    assert ours["crop_pct"] == theirs["crop_pct"]
    assert ours["interpolation"] == theirs["interpolation"]
    assert tuple(ours["mean"]) == tuple(theirs["mean"]) and tuple(ours["std"]) == tuple(theirs["std"])
    assert ours["size_divisor"] == 1 and ours["min_input_size"] == (3, 1, 1)  # padded convs: any size, as timm
    assert ours["first_conv"] in theirs["first_conv"] and ours["classifier"] == theirs["classifier"]


def _fused_types_ok(fused: nn.Module) -> None:
    assert count_batchnorms(fused) == 0
    leftover = [type(m).__name__ for m in fused.modules()
                if isinstance(m, (MobileOneBlock, ReparamLargeKernelConv, RepMixer, RepCPE, ConvBn, LayerScale2d))]
    assert not leftover, f"multi-branch / scale modules left after fusing: {sorted(set(leftover))}"
    slow = [m for m in fused.modules() if is_channel_multiplier_conv(m) and not isinstance(m, ChannelRepeatConv)]
    assert all(isinstance(m, nn.Conv2d) and m.groups == m.out_channels for m in slow) or not slow


def test_fuse_collapses_every_reparameterizable_structure(sa12_pair, sa12_fused):
    ours, _ = sa12_pair
    assert count_batchnorms(ours) > 0
    fused = sa12_fused
    _fused_types_ok(fused)
    # The paper's inference forms: RepMixer (branches, identity, layer scale) -> one depth-wise conv;
    # RepCPE (conv + identity) -> one depth-wise conv.
    for stage, dim in zip(fused.stages, VARIANTS["fastvit_sa12"].dims):
        for block in stage.blocks:
            if isinstance(block, RepMixerBlock):
                mixer = block.token_mixer
                assert isinstance(mixer, nn.Conv2d) and mixer.groups == mixer.in_channels == dim
                assert isinstance(block.layer_scale, nn.Identity)
            else:
                assert isinstance(block, AttentionBlock)
                assert all(isinstance(m, nn.Identity) for m in (block.norm, block.layer_scale_1, block.layer_scale_2))
                assert block.token_mixer.conv_proj and isinstance(block.token_mixer.qkv, nn.Conv2d)
    pos = fused.stages[3].pos_emb
    assert isinstance(pos, nn.Conv2d) and pos.groups == pos.in_channels
    # Down-sampling and the final conv: channel-multiplier convs run as depth-wise convs.
    assert isinstance(fused.stages[1].downsample.proj[0], ChannelRepeatConv)
    assert isinstance(fused.final_conv[0], ChannelRepeatConv)
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        y = ours(x)
        assert_close(fused(x), y, 1e-4 * max(1.0, float(y.abs().max())), "sa12 fused vs unfused")


@pytest.mark.parametrize("name", ["fastvit_t8", "fastvit_sa12"])
def test_fused_equals_unfused_with_large_layer_scales(name, sa12_pair):
    # timm's init gives layer scales of 1e-5, which would hide a wrong fold: use O(1) ones.
    model = copy.deepcopy(sa12_pair[0]) if name == "fastvit_sa12" else effivit.create_model(name)
    randomize_norm_stats(model, seed=3).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LayerScale2d):
                m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) + 0.5)
    fused = fuse(model)
    _fused_types_ok(fused)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        y = model(x)
        assert_close(fused(x), y, 1e-4 * max(1.0, float(y.abs().max())), f"{name} fused vs unfused")


def test_without_layer_scale_fuses():
    entry = with_config(get_entry("fastvit_sa12"), layer_scale_init_value=None, depths=(1, 1, 1, 1),
                        dims=(16, 32, 32, 64))
    model = randomize_norm_stats(entry.builder(entry.config)).eval()
    assert not any(isinstance(m, LayerScale2d) for m in model.modules())
    fused = fuse(model)
    _fused_types_ok(fused)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        y = model(x)
        assert_close(fused(x), y, 1e-4 * max(1.0, float(y.abs().max())), "no layer scale")


def test_checkpoint_filter_maps_timm_layer_scales(sa12_pair):
    ours, ref = sa12_pair
    key = "stages.0.blocks.0.token_mixer.layer_scale.gamma"
    assert ref.state_dict()[key].shape == (64, 1, 1)
    assert torch.equal(ours.state_dict()[key], ref.state_dict()[key].reshape(-1))


def test_features_only_gives_four_pyramid_levels(sa12_pair):
    ours, ref = sa12_pair
    backbone = FeatureExtractor(ours).eval()  # what create_model(features_only=True) returns
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.out_channels == list(VARIANTS["fastvit_sa12"].dims)
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        feats = backbone(x)
        expected = ref.forward_intermediates(x, intermediates_only=True)
    assert len(feats) == 4
    for f, e, s in zip(feats, expected, (4, 8, 16, 32)):
        assert f.shape[-2:] == (128 // s, 96 // s)
        assert_close(f, e, 1e-4, f"stride-{s} features vs timm")


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    entry = with_config(get_entry("fastvit_sa12"), depths=(1, 1, 1, 2), dims=(16, 32, 32, 64))
    model = entry.builder(entry.config).train()
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        torch.manual_seed(1)
        model(x).sum().backward()
        grads.append(model.stem[0].conv_kxk[0].conv.weight.grad.clone())
    assert all(s.grad_checkpointing for s in model.stages)
    assert_close(grads[1], grads[0], 1e-5, "grad checkpointing")


def test_bad_configs_are_rejected():
    base = dict(depths=(1, 1, 1, 1), dims=(32, 64, 128, 256), mlp_ratios=(3, 3, 3, 3))
    with pytest.raises(ValueError, match="token_mixers"):
        FastViTConfig(**base, token_mixers=("repmixer", "repmixer", "repmixer", "conv"))
    with pytest.raises(ValueError, match="head_dim"):
        FastViTConfig(**dict(base, dims=(32, 64, 128, 250)), token_mixers=("repmixer",) * 3 + ("attention",))
    with pytest.raises(ValueError, match="4 entries"):
        FastViTConfig(**dict(base, depths=(1, 1, 1)))
    with pytest.raises(ValueError, match="odd"):
        FastViTConfig(**base, repmixer_kernel_size=4)


def test_attention_variant_exports_to_onnx_and_torchscript(tmp_path):
    # The contract test exports the smallest variant (RepMixer only); this covers attention and RepCPE.
    pytest.importorskip("onnxruntime")
    import onnx
    import onnxruntime as ort

    from effivit.deploy import export_onnx

    entry = with_config(get_entry("fastvit_sa12"), depths=(1, 1, 1, 1))
    torch.manual_seed(0)
    model = fuse(randomize_norm_stats(entry.builder(entry.config)).eval())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        y = model(x)
        assert_close(torch.jit.script(model)(x), y, 1e-4, "TorchScript (fused)")
    path = export_onnx(model, tmp_path / "sa.onnx", img_size=(64, 96))  # verifies ONNX Runtime's outputs
    # GELU is exported in the operand order ONNX Runtime fuses into one kernel (timm's export keeps 5 ops).
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    gelus = sum(isinstance(m, GELU) for m in model.modules())
    assert ops.count("Gelu") >= gelus - 1 and ops.count("Erf") <= 1, sorted(set(ops))


def test_fused_convs_prefer_channels_last(sa12_fused):
    convs = [m for m in sa12_fused.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert sa12_fused.forward_features(x).is_contiguous(memory_format=torch.channels_last)
