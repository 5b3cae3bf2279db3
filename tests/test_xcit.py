"""XCiT: timm parity (logits, features, intermediates, pruning, optimizer groups) for the registered variants,
the Fourier encoding on any grid, the exact LPI BatchNorm fold at the zero-padded border, the fused form,
official checkpoint files, sizes and errors, and the deploy runtimes on the smallest variant. What the
registry-wide contract covers (meta build, FX, features_only, bad input) is not repeated here."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randomize_norm_stats, scale_classifier
from torch import nn

import effivit
from effivit.deploy import export_onnx, fuse
from effivit.deploy.fuse import count_batchnorms
from effivit.layers.xca import XCA
from effivit.models.xcit import LPI, FourierPosEmbed, shift_response
from effivit.registry import get_entry, with_config

timm = pytest.importorskip("timm")

TINY = "xcit_tiny_12_p16_224"


def _x(*shape: int, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def randomize_xcit(model: nn.Module, seed: int = 0, gamma: tuple[float, float] = (0.5, 1.5)) -> nn.Module:
    """Non-trivial BatchNorm statistics, O(1) logits, and layer scales / temperatures that differ per channel
    and head, so every fold and every parameter is really tested."""
    randomize_norm_stats(model, seed)
    scale_classifier(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lo, hi = gamma
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf.startswith("gamma"):
                p.copy_(torch.rand(p.shape, generator=g) * (hi - lo) + lo)
            elif leaf == "temperature":
                p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    return model


def timm_pair(name: str, seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs) -> tuple[nn.Module, nn.Module]:
    """timm's model with random weights and ours with the same weights (loaded by load_checkpoint), eval."""
    torch.manual_seed(seed)
    ref = randomize_xcit(timm.create_model(name, **kwargs).eval(), seed, (0.5, 1.5) if "_12_" in name else (0.1, 0.4))
    ours = effivit.create_model(name, **kwargs).eval()
    effivit.load_checkpoint(ours, ref.state_dict())
    return ours.to(dtype), ref.to(dtype)


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, nn.Module]:
    return timm_pair(TINY)


# ---- timm parity --------------------------------------------------------------------------------------------


def test_tiny_matches_timm_at_any_grid(tiny):
    ours, ref = tiny
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    with torch.no_grad():
        for shape in ((2, 3, 224, 224), (1, 3, 96, 160), (1, 3, 16, 48)):
            x = _x(*shape)
            expected = ref.forward_features(x)
            assert_close(ours.forward_features(x), expected, 1e-4, f"forward_features {shape}")
            logits = ref.forward_head(expected)
            assert logits.abs().max() > 1e-1, "logits too small for the comparison to mean anything"
            assert_close(ours(x), logits, 1e-4, f"logits {shape}")
            assert_close(ours.forward_head(expected, pre_logits=True), ref.forward_head(expected, pre_logits=True),
                         1e-5, "pre-logits")


def test_384_arch_matches_timm_at_384():
    ours, ref = timm_pair("xcit_tiny_12_p16_384")
    assert ours.pretrained_cfg["input_size"] == (3, 384, 384)
    x = _x(1, 3, 384, 384)
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "xcit_tiny_12_p16_384")


def test_small_12_matches_timm():
    ours, ref = timm_pair("xcit_small_12_p16_224")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x = _x(2, 3, 128, 128)
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "xcit_small_12_p16_224")


@pytest.mark.slow
def test_24_block_models_match_timm_in_float64():
    # 24 residual blocks amplify fp32 rounding: compare in float64 (layer scales drawn O(0.1-0.4), so every
    # block matters), and fp32 within a tolerance relative to the logits' scale.
    for name in ("xcit_small_24_p16_224", "xcit_medium_24_p16_224"):
        ours, ref = timm_pair(name, dtype=torch.float64)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        x = _x(1, 3, 112, 112, dtype=torch.float64)
        with torch.no_grad():
            y = ref(x)
            assert_close(ours(x), y, 1e-9, f"{name} float64")
            assert_close(fuse(ours)(x), y, 1e-9, f"{name} fused, float64")
            assert_close(ours.float()(x.float()).double(), y, 1e-4 * max(1.0, float(y.abs().max())), f"{name} fp32")


def test_global_pool_avg_matches_timm():
    ours, ref = timm_pair(TINY, global_pool="avg")
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "global_pool='avg'")


def test_xca_layer_matches_timm_on_tokens_and_grids():
    torch.manual_seed(0)
    ref = timm.models.xcit.XCA(64, num_heads=4, qkv_bias=True).eval()
    with torch.no_grad():
        ref.temperature.copy_(torch.rand(4, 1, 1) + 0.5)
    ours = XCA(64, num_heads=4).eval()
    ours.load_state_dict(ref.state_dict())
    tokens = _x(2, 35, 64)
    with torch.no_grad():
        expected = ref(tokens)
        assert_close(ours(tokens), expected, 1e-6, "XCA on (B, N, C)")
        assert_close(ours(tokens.reshape(2, 5, 7, 64)).reshape(2, 35, 64), expected, 1e-6, "XCA on (B, H, W, C)")


def test_fourier_encoding_equals_timms_on_any_grid():
    torch.manual_seed(0)
    ref = timm.models.xcit.PositionalEncodingFourier(dim=48)
    ours = FourierPosEmbed(48)
    ours.load_state_dict(ref.state_dict())
    for h, w in ((14, 14), (1, 1), (6, 10), (31, 2)):
        with torch.no_grad():
            expected = ref(1, h, w)[0].permute(1, 2, 0)  # H, W, C
            got = ours(h, w)
        assert got.shape == (h, w, 48)
        assert_close(got, expected, 1e-5, f"Fourier encoding {h}x{w}")
    # Different grids give different encodings (the table is not a fixed-size buffer).
    assert not torch.allclose(ours(4, 4), ours(8, 8)[:4, :4])


# ---- features, pruning, optimizer groups --------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(indices=3, norm=True),
    dict(indices=[0, -1], output_fmt="NLC"),
    dict(indices=[2, 5], stop_early=True),
    dict(indices=4, intermediates_only=True),
])
def test_forward_intermediates_match_timm(tiny, kwargs):
    ours, ref = tiny
    x = _x(1, 3, 64, 96)
    with torch.no_grad():
        expected = ref.forward_intermediates(x, **kwargs)
        got = ours.forward_intermediates(x, **kwargs)
    if kwargs.get("intermediates_only"):
        expected, got = (None, expected), (None, got)
    else:
        assert_close(got[0], expected[0], 1e-4, f"final output {kwargs}")
    assert len(got[1]) == len(expected[1]) >= 1
    for a, b in zip(got[1], expected[1]):
        assert a.is_contiguous()
        assert_close(a, b, 1e-4, f"intermediate {kwargs}")


@pytest.mark.parametrize("prune_norm,prune_head", [(False, True), (True, False)])
def test_prune_intermediate_layers_matches_timm(prune_norm, prune_head):
    ours, ref = timm_pair(TINY)
    assert ours.prune_intermediate_layers([1, 4], prune_norm, prune_head) == [1, 4]
    ref.prune_intermediate_layers([1, 4], prune_norm, prune_head)
    assert sorted(ours.state_dict()) == sorted(ref.state_dict())
    assert len(ours.blocks) == 5 and len(ours.feature_info) == 5
    x = _x(1, 3, 48, 64)
    with torch.no_grad():
        got = ours.forward_intermediates(x, indices=[1, 4], norm=True)
        expected = ref.forward_intermediates(x, indices=[1, 4], norm=True)
        for a, b in zip(got[1], expected[1]):
            assert_close(a, b, 1e-4, "pruned intermediates")
        assert_close(got[0], expected[0], 1e-4, "pruned final output")
        assert_close(ours(x), ref(x), 1e-4, "pruned forward")
    if prune_head:
        with pytest.raises(ValueError, match="class token"):
            ours.reset_classifier(5, "token")


def test_optimizer_groups_match_timm():
    from timm.optim import create_optimizer_v2

    with torch.device("meta"):
        ours = effivit.create_model(TINY)
        ref = timm.create_model(TINY)
    assert ours.group_matcher() == ref.group_matcher()
    no_wd = ours.no_weight_decay()
    assert {"cls_token", "pos_embed.token_projection.weight", "pos_embed.token_projection.bias",
            "blocks.0.attn.temperature", "blocks.11.gamma3", "cls_attn_blocks.1.gamma2"} <= no_wd
    assert not any(n.endswith(("qkv.weight", "fc1.weight")) for n in no_wd)

    def groups(model):
        names = {id(p): n for n, p in model.named_parameters()}
        opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
        return ({names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]},
                {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]})

    scale, decay = groups(ours)
    ref_scale, ref_decay = groups(ref)
    assert scale == ref_scale  # the same layer-wise learning-rate decay as timm
    assert len(set(scale.values())) > 12 + 2  # a group per XCA and per class-attention block, at least
    assert scale["patch_embed.proj.0.0.weight"] == min(scale.values()) < scale["norm.weight"] < scale["head.weight"]
    # timm excludes 1-D parameters and its own list; ours also names the (3-D) attention temperatures.
    for name, wd in decay.items():
        expected = 0.0 if name.endswith("temperature") else ref_decay[name]
        assert wd == expected, name


# ---- fused form -----------------------------------------------------------------------------------------------


def test_shift_response_counts_the_taps_inside_the_map():
    kernel = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(1, 1, 3, 3).repeat(2, 1, 1, 1)
    kernel[1] *= -2
    k = kernel[0, 0]
    for h, w in ((1, 1), (2, 3), (5, 4)):
        got = shift_response(kernel, h, w)
        assert got.shape == (h, w, 2)
        for i in range(h):
            for j in range(w):
                # Taps (a, b) read row i + a - 1 and column j + b - 1: keep those inside the map.
                rows = [a for a in range(3) if 0 <= i + a - 1 < h]
                cols = [b for b in range(3) if 0 <= j + b - 1 < w]
                inside = k[rows][:, cols].sum()
                assert got[i, j, 0] == inside and got[i, j, 1] == -2 * inside, (h, w, i, j)


def test_lpi_batchnorm_fold_is_exact_at_the_border():
    torch.manual_seed(0)
    lpi = LPI(16).eval()
    randomize_norm_stats(lpi)
    with torch.no_grad():
        lpi.bn.bias.add_(3.0)  # a large shift: the border is where a naive fold would go wrong
    x = _x(2, 5, 7, 16)
    with torch.no_grad():
        expected = lpi(x)
        fused = fuse(lpi)
        assert count_batchnorms(fused) == 0
        assert_close(fused(x), expected, 1e-5, "fused LPI")
        # Folding the shift into conv2's bias (sum of the taps) would be right inside and wrong on the border.
        naive = fused.conv2(fused.act(fused.conv1(x.permute(0, 3, 1, 2)))).permute(0, 2, 3, 1)
        naive = naive + fused.shift_kernel.sum((1, 2, 3))
        assert (naive - expected)[:, 1:-1, 1:-1].abs().max() < 1e-5
        assert (naive - expected).abs().max() > 0.1


def test_fused_equals_unfused(tiny):
    ours, _ = tiny
    fused = fuse(ours)
    assert count_batchnorms(fused) == 0
    assert not any(n.rsplit(".", 1)[-1].startswith("gamma") and not n.startswith("cls_attn_blocks")
                   for n, _ in fused.named_parameters()), "XCA-block layer scales must be folded"
    assert all(b.attn.fused_kv and b.gamma1_in_proj and b.gamma2 is None for b in fused.cls_attn_blocks)
    with torch.no_grad():
        for shape in ((2, 3, 64, 64), (1, 3, 80, 48)):
            x = _x(*shape)
            assert_close(fused.forward_features(x), ours.forward_features(x), 1e-4, f"fused features {shape}")
            assert_close(fused(x), ours(x), 1e-4, f"fused logits {shape}")
    assert fuse(fused) is not None  # fusing a fused model changes nothing
    with torch.no_grad():
        assert_close(fuse(fused)(x), ours(x), 1e-4, "fused twice")


# ---- checkpoints, sizes, errors -----------------------------------------------------------------------------


def test_official_checkpoint_layout_loads(tiny):
    """facebookresearch/xcit files: ``pos_embeder.*`` and one ``qkv`` Linear per class-attention block."""
    ours, ref = tiny
    official = {}
    for k, v in ref.state_dict().items():
        official[k.replace("pos_embed.", "pos_embeder.")] = v
    for i in range(2):
        p = f"cls_attn_blocks.{i}.attn."
        for kind in ("weight", "bias"):
            official[p + "qkv." + kind] = torch.cat([official.pop(p + f"{n}.{kind}") for n in "qkv"])
    model = effivit.create_model(TINY, pretrained={"model": official}).eval()
    x = _x(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), ref(x), 1e-4, "official checkpoint layout")


def test_img_size_sets_the_model_up_and_bad_sizes_are_rejected():
    model = effivit.create_model(TINY, img_size=(192, 256))
    assert model.img_size == (192, 256)
    assert model.pretrained_cfg["input_size"] == (3, 192, 256)
    with pytest.raises(ValueError, match=r"H=200, W=200.*multiples of 16"):
        effivit.create_model(TINY, img_size=200)
    with pytest.raises(ValueError, match=r"H=72, W=64.*multiples of 16"):
        model(torch.randn(1, 3, 72, 64))
    with pytest.raises(ValueError, match="global_pool"):
        effivit.create_model(TINY, global_pool="max")
    entry = get_entry(TINY)
    with pytest.raises(ValueError, match="patch_size must be 8 or 16"):
        with_config(entry, patch_size=12)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        with_config(entry, num_heads=5)


def test_tags_and_published_figures():
    assert get_entry(TINY).default_tag.tag == "fb_in1k"
    assert [t.tag for t in get_entry("xcit_medium_24_p16_224").tags] == ["fb_in1k", "fb_dist_in1k"]
    tag = get_entry("xcit_small_24_p16_384").default_tag
    assert tag.tag == "fb_dist_in1k" and tag.input_size == (3, 384, 384) and tag.crop_pct == 1.0
    with torch.device("meta"):
        count = sum(p.numel() for p in effivit.create_model("xcit_small_24_p16_384").parameters())
    assert round(count / 1e6, 2) == tag.published.timm_params_m == 47.67
    assert round(count / 1e6) == tag.published.params_m == 48


# ---- runtimes (smallest variant) ----------------------------------------------------------------------------


def test_torchscript_onnx_and_bf16_on_the_smallest_variant(tiny, tmp_path):
    ours, ref = tiny
    fused = fuse(ours)
    x = _x(2, 3, 48, 80)
    with torch.no_grad():
        y = ours(x)
        assert_close(torch.jit.script(fused)(x), y, 1e-4, "TorchScript (fused)")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = fused(x)
            yr = ref(x)
    assert yb.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: as close to fp32 as timm's own bf16 run is (with margin).
    assert (yb.float() - y).abs().max() <= 2 * (yr.float() - y).abs().max() + 0.05 * float(y.abs().max())
    pytest.importorskip("onnxruntime")
    # export_onnx runs the graph in ONNX Runtime and raises if it differs from PyTorch.
    path = export_onnx(fused, tmp_path / "xcit.onnx", img_size=(48, 80), dynamic_batch=True)
    assert path.stat().st_size > 0


def test_torch_compile():
    # Compiling all 14 blocks of xcit_tiny costs about a minute on 2 CPU cores; one block of each kind (same
    # widths, same module types) proves the path.
    entry = with_config(get_entry(TINY), depth=1, cls_attn_layers=1)
    torch.manual_seed(0)
    model = fuse(randomize_xcit(entry.builder(entry.config).eval()))
    x = _x(1, 3, 48, 64)
    with torch.no_grad():
        assert_close(torch.compile(model)(x), model(x), 1e-4, "torch.compile (fused)")
