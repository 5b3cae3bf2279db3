"""Hiera: timm parity for every variant (logits, parameter counts, keys, intermediates, features_only,
pruning), the size rule, position-table resampling, mask-unit locality, and the deploy paths timm's
implementation lacks (TorchScript) or that depend on the grid (FX, ONNX at a non-square size)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, compare_with_timm, scale_classifier
from torch import nn

import effivit
from effivit.deploy import export_onnx, fuse
from effivit.models.hiera import VARIANTS, Hiera, HieraConfig, reroll, unroll

timm = pytest.importorskip("timm")

SMALL = ["hiera_tiny_224", "hiera_small_224"]
BIG = ["hiera_base_224", "hiera_base_plus_224", "hiera_large_224"]


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial LayerNorm affines and O(1)-scaled Linears, so every part of a block shows in the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1.0 + (torch.rand(m.weight.shape, generator=g) - 0.5) * 0.4)
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.4)
    return scale_classifier(model, seed=seed)


def _pair(name: str, img_size=224, **timm_kwargs) -> tuple[nn.Module, nn.Module]:
    """timm's model (randomised) and ours built alike, timm's state dict loaded as it is."""
    torch.manual_seed(0)
    ref = _randomize(timm.create_model(name, pretrained=False, img_size=img_size, **timm_kwargs)).eval()
    ours = effivit.create_model(name, img_size=img_size).eval()
    effivit.load_checkpoint(ours, ref.state_dict())
    return ours, ref


@pytest.mark.parametrize("name", SMALL)
def test_matches_timm_at_224(name):
    ours, ref = compare_with_timm(name)
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref(x)
        assert_close(fuse(ours)(x), expected, 1e-4, f"{name} fused vs timm")
        assert_close(ours.forward_features(x), ref.forward_features(x), 1e-4, f"{name} forward_features")
        # The comparison sees the blocks: flipping one attention projection changes the logits.
        ours.blocks[1].attn.proj.weight.mul_(-1.0)
        assert (ours(x) - expected).abs().max() > 1e-3


@pytest.mark.slow
def test_matches_timm_big_variants():
    # fp32 at 224 with O(1) random weights: about 1e-6 from timm's logits even at 48 blocks (large).
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    for name in BIG:
        ours, ref = _pair(name)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        with torch.no_grad():
            expected = ref(x)
            assert_close(ours(x), expected, 1e-4, f"{name} vs timm")
            assert expected.abs().max() > 1e-2
        del ours, ref


@pytest.mark.parametrize("name", list(VARIANTS))
def test_parameter_counts_and_keys_equal_timms(name):
    with torch.device("meta"):
        ours = effivit.create_model(name)
        ref = timm.create_model(name)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same names, same order
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert ours.feature_info == ref.feature_info
    assert ours.no_weight_decay() == set(ref.no_weight_decay()) == {"pos_embed"}
    # Layer-wise LR decay groups (timm's optimizer factory): the same parameters in the same groups.
    from timm.models import group_parameters

    assert group_parameters(ours, ours.group_matcher()) == group_parameters(ref, ref.group_matcher())


def test_unroll_reroll_are_inverse_and_pool_2x2():
    x = torch.randn(2, 24, 40, 5)
    tokens = unroll(x, 3, 2)
    assert tokens.shape == (2, 24 * 40, 5)
    assert torch.equal(reroll(tokens, 3, 2, 3, 5), x)
    # A max over the 4 leading blocks of tokens is the 2x2 max-pool, still in unrolled order (two levels left).
    pooled = tokens.reshape(2, 4, -1, 5).amax(1)
    expected = x.reshape(2, 12, 2, 20, 2, 5).amax((2, 4))
    assert torch.equal(reroll(pooled, 2, 2, 3, 5), expected)


def test_intermediates_pruning_and_features_match_timm():
    # timm's Hiera takes its img_size only: both are built for 64x96, which also checks img_size= itself.
    size = (64, 96)
    ours, ref = _pair("hiera_tiny_224", img_size=size)
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        for kwargs in (dict(), dict(indices=2), dict(indices=[0, -1], output_fmt="NHWC"),
                       dict(indices=[1, 4, 10], coarse=False), dict(indices=[1], stop_early=False)):
            final, maps = ours.forward_intermediates(x, **kwargs)
            ref_final, ref_maps = ref.forward_intermediates(x, **kwargs)
            assert len(maps) == len(ref_maps) >= 1
            for a, b in zip(maps, ref_maps):
                assert_close(a, b, 1e-4, f"intermediates {kwargs}")
            assert_close(final, ref_final, 1e-4, f"final {kwargs}")
        maps = ours.forward_intermediates(x, intermediates_only=True)
        assert [m.shape[1] for m in maps] == [96, 192, 384, 768]
        assert [size[0] // m.shape[2] for m in maps] == [4, 8, 16, 32]
        assert [size[1] // m.shape[3] for m in maps] == [4, 8, 16, 32]

    with pytest.raises(ValueError, match="norm"):
        ours.forward_intermediates(x, norm=True)
    with pytest.raises(ValueError, match="out of range"):
        ours.forward_intermediates(x, indices=[4])

    # features_only: the same maps and the same pruned parameter count as timm's.
    feats = effivit.create_model("hiera_tiny_224", img_size=size, features_only=True, out_indices=(1, 2))
    effivit.load_checkpoint(feats, ref.state_dict())
    ref_feats = timm.create_model("hiera_tiny_224", img_size=size, features_only=True, out_indices=(1, 2))
    assert feats.feature_info.channels() == ref_feats.feature_info.channels() == [192, 384]
    assert feats.feature_info.reduction() == ref_feats.feature_info.reduction() == [8, 16]
    assert sum(p.numel() for p in feats.parameters()) == sum(p.numel() for p in ref_feats.parameters())
    with torch.no_grad():
        for a, b in zip(feats.eval()(x), ref.forward_intermediates(x, indices=(1, 2), intermediates_only=True)):
            assert_close(a, b, 1e-4, "features_only")

    # Pruning to a stage: timm's num_features and the pooled (norm-free) head.
    take = ours.prune_intermediate_layers(indices=[1], prune_head=False)
    ref_take = ref.prune_intermediate_layers(indices=[1], prune_head=False)
    assert take == list(ref_take) and len(ours.blocks) == len(ref.blocks) == 3
    assert ours.num_features == ref.num_features == 192
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "pruned model output")


def test_size_rule_and_img_size():
    model = effivit.create_model("hiera_tiny_224").eval()
    with pytest.raises(ValueError, match=r"H=80, W=64 .*multiples of 32.*mask unit"):
        model(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match=r"H=16, W=16 .*at least 32"):
        model(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"H=100, W=100 .*multiples of 32"):
        effivit.create_model("hiera_tiny_224", img_size=100)
    with pytest.raises(ValueError, match=r"img_size H=224, W=100 .*multiples of 32"):
        Hiera(VARIANTS["hiera_tiny_224"], img_size=(224, 100))
    with pytest.raises(ValueError, match="mask_unit_size must be q_stride"):
        HieraConfig(embed_dim=96, num_heads=1, depths=(1, 2, 7, 2), mask_unit_size=4)
    with pytest.raises(ValueError, match="depths"):
        HieraConfig(embed_dim=96, num_heads=1, depths=(1, 2, 7))
    sized = effivit.create_model("hiera_tiny_224", img_size=(96, 160))
    assert sized.pos_embed.shape == (1, 24 * 40, 96)
    assert sized.pretrained_cfg["input_size"] == (3, 96, 160)
    with torch.no_grad():
        assert sized.eval()(torch.randn(1, 3, 96, 160)).shape == (1, 1000)


def test_position_table_resampled_like_timm():
    """At another input size the 224 table is resampled as timm's resample_abs_pos_embed does it; a 224
    checkpoint loaded into a model built for that size gets the same table."""
    from timm.layers import resample_abs_pos_embed

    ours, ref = _pair("hiera_tiny_224")
    size = (96, 160)
    state = ref.state_dict()
    ref_sized = timm.create_model("hiera_tiny_224", img_size=size).eval()
    ref_sized.load_state_dict({**state, "pos_embed": resample_abs_pos_embed(
        state["pos_embed"], new_size=[24, 40], old_size=[56, 56], num_prefix_tokens=0)})
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        expected = ref_sized(x)
        assert_close(ours(x), expected, 1e-4, "224 model at 96x160 vs timm built for it")
        loaded = effivit.create_model("hiera_tiny_224", img_size=size, pretrained=state).eval()
        assert_close(loaded(x), expected, 1e-4, "checkpoint table resampled at load")
        # At its own grid the table is used as it is (no resampling in the graph).
        assert torch.equal(loaded.pos_embed, ref_sized.pos_embed)


def test_official_checkpoint_names_load():
    torch.manual_seed(0)
    model = effivit.create_model("hiera_tiny_224", img_size=64).eval()
    renamed = {}
    for k, v in model.state_dict().items():
        k = k.replace("head.fc.", "head.projection.").replace("head.norm.", "norm.")
        renamed[k] = v.clone()
    loaded = effivit.create_model("hiera_tiny_224", img_size=64)
    effivit.load_checkpoint(loaded, {"model_state": renamed})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), model(x))


def test_mask_unit_attention_is_local_and_global_attention_is_not():
    """Changing the pixels of one 8x8-token mask unit changes only that unit after the first (mask-unit)
    block, and every position after a global-attention block."""
    torch.manual_seed(0)
    model = _randomize(effivit.create_model("hiera_tiny_224")).eval()
    x = torch.randn(1, 3, 64, 64)
    x2 = x.clone()
    # Token i sees pixels 4i-3 .. 4i+3: pixels 0..27 reach tokens 0..7 only, i.e. the top-left mask unit.
    x2[:, :, :28, :28] += torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        a = model.forward_intermediates(x, indices=[0, 5], coarse=False, intermediates_only=True)
        b = model.forward_intermediates(x2, indices=[0, 5], coarse=False, intermediates_only=True)
    diff = (a[0] - b[0]).abs().amax(1)[0]  # 16x16 token grid after block 0
    assert diff[:8, :8].min() > 0
    assert diff[8:].max() == 0 and diff[:, 8:].max() == 0
    assert (a[1] - b[1]).abs().amax(1).min() > 0  # block 5 attends globally (4x4 grid)


def test_torchscript_fx_onnx_at_a_non_square_size(tmp_path):
    torch.manual_seed(0)
    model = _randomize(effivit.create_model("hiera_tiny_224")).eval()
    x = torch.randn(2, 3, 64, 96)  # not the 224 grid: the position table is resampled inside the graph
    with torch.no_grad():
        y = model(x)
        for form, m in (("unfused", model), ("fused", fuse(model))):
            assert_close(torch.jit.script(m)(x), y, 1e-4, f"TorchScript ({form})")
        assert_close(torch.fx.symbolic_trace(model)(x), y, 1e-4, "FX")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = model(x)
        assert yb.dtype == torch.bfloat16 and (yb.float() - y).abs().max() < 0.05 * y.abs().max() + 0.1
    # export_onnx runs the graph in ONNX Runtime (batch 1 and 3) and raises if it differs from PyTorch.
    export_onnx(fuse(model), tmp_path / "hiera.onnx", img_size=(64, 96))


def test_training_grad_checkpointing_and_drop_path():
    torch.manual_seed(0)
    model = effivit.create_model("hiera_tiny_224", num_classes=3).train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 3)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    model.set_grad_checkpointing(True)
    out_ckpt = model(x)
    assert_close(out_ckpt, out, 1e-5, "grad checkpointing forward")
    for a, b in zip(torch.autograd.grad(out_ckpt.square().sum(), list(model.parameters())), grads):
        assert_close(a, b, 1e-5, "grad checkpointing backward")
    maps = model.forward_intermediates(x, intermediates_only=True)
    sum(m.square().mean() for m in maps).backward()
    dropped = effivit.create_model("hiera_tiny_224", drop_path_rate=0.5).train()
    assert dropped.blocks[-1].drop_path1.drop_prob == pytest.approx(0.5)
    torch.manual_seed(1)
    a = dropped(x)
    torch.manual_seed(2)
    assert (a - dropped(x)).abs().max() > 0  # stochastic depth is on in training
    model.reset_classifier(5, global_pool="max")
    with torch.no_grad():
        assert model.eval()(x).shape == (2, 5)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_torch_compile(backend):
    """Dynamo captures eval and train in one graph each (no graph break) and AOT autograd differentiates it.
    Inductor's code generation for Hiera takes over ten minutes on 2 cores: that case runs in ``make test-all``."""
    torch.manual_seed(0)
    model = _randomize(effivit.create_model("hiera_tiny_224", num_classes=4))
    x = torch.randn(2, 3, 64, 96)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    atol = 1e-4 if backend == "aot_eager" else 1e-3  # inductor reorders float sums
    with torch.no_grad():
        y = model.eval()(x)
        assert_close(compiled(x), y, atol * max(1.0, float(y.abs().max())), f"torch.compile {backend} (eval)")
    model.train()
    out = compiled(x)
    out.logsumexp(-1).mean().backward()
    assert model.pos_embed.grad is not None and model.pos_embed.grad.abs().sum() > 0
