"""EVA-02: timm parity (native size, other grids, img_size=), keys and parameter counts, the rotary table, SwiGLU,
the fused form, forward_intermediates as timm, checkpoint names, and the deploy paths (FX, meta, TorchScript,
ONNX Runtime, torch.compile, bf16) on the smallest variant."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_deit import check_parity, randomize_vit, timm_pair
from torch import nn

import effivit
from effivit.deploy import export_onnx, fuse
from effivit.layers.mlp import SwiGLU
from effivit.layers.rope import build_rope_table
from effivit.registry import get_entry

timm = pytest.importorskip("timm")

FAST = ["eva02_tiny_patch14_224", "eva02_tiny_patch14_336", "eva02_small_patch14_224"]
SLOW = ["eva02_small_patch14_336", "eva02_base_patch14_224", "eva02_base_patch14_448", "eva02_large_patch14_224",
        "eva02_large_patch14_448"]


@pytest.mark.parametrize("name", FAST)
def test_matches_timm_at_native_and_other_sizes(name):
    ours, ref = timm_pair(name, dynamic_img_size=True)
    native = get_entry(name).config.img_size
    check_parity(name, ours, ref, [(native, native), (42, 98)])


@pytest.mark.slow
def test_matches_timm_base_and_large():
    # base/large: separate q/k/v, split SwiGLU with sub-LN. A small grid runs every weight and op (absolute table
    # resampled, rotary table rescaled as timm does); keys and counts are checked on the full models.
    for name in SLOW:
        ours, ref = timm_pair(name, dynamic_img_size=True)
        check_parity(name, ours, ref, [(56, 70)])


@pytest.mark.parametrize("name", FAST + SLOW)
def test_parameter_counts_equal_timm(name):
    with torch.device("meta"):
        ours = effivit.create_model(name)
        ref = timm.create_model(name, pretrained=False)  # the default tag's classes (0 for the MIM encoders)
    count = sum(p.numel() for p in ours.parameters())
    assert ours.num_classes == ref.num_classes
    assert count == sum(p.numel() for p in ref.parameters())
    published = get_entry(name).default_tag.published
    if published.timm_params_m is not None:
        assert round(count / 1e6, 2) == published.timm_params_m
    # The README rounds the MIM-pretrained encoder's size (6 / 22 / 86 / 304 M).
    assert abs(count / 1e6 / published.params_m - 1) < 0.1, f"{name}: {count / 1e6:.2f}M vs {published.params_m}M"


def test_registry_and_default_heads():
    assert set(effivit.list_models(family="eva02")) == set(FAST + SLOW)
    cfg = get_entry("eva02_base_patch14_448").pretrained_cfg()
    assert cfg["input_size"] == (3, 448, 448) and cfg["size_divisor"] == 14 and cfg["num_classes"] == 1000
    assert cfg["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    # The 224 weights are MIM-pretrained encoders: timm's default has no classifier, ours neither.
    mim = get_entry("eva02_tiny_patch14_224").pretrained_cfg()
    assert mim["tag"] == "mim_in22k" and mim["num_classes"] == 0 and mim["published"]["top1"] is None


def test_rotary_table_equals_timm_for_any_grid():
    from timm.layers.pos_embed_sincos import RotaryEmbeddingCat

    for grid in ((16, 16), (24, 24), (3, 7), (10, 4)):
        ref = RotaryEmbeddingCat(64, in_pixels=False, feat_shape=list(grid), ref_feat_shape=[16, 16]).get_embed()
        assert_close(build_rope_table(grid[0], grid[1], 64, 16, 16), ref, 0.0, f"rope {grid}")
    with pytest.raises(ValueError, match="divisible by 4"):
        build_rope_table(2, 2, 30, 16, 16)


@pytest.mark.parametrize("packed", [True, False])
def test_swiglu_matches_timm_and_fuses(packed):
    from timm.layers import GluMlp
    from timm.layers import SwiGLU as TimmSwiGLU

    torch.manual_seed(0)
    if packed:
        ref = GluMlp(24, 2 * 40, act_layer=nn.SiLU, gate_last=False)
        ours = SwiGLU(24, 40, packed=True)
    else:
        ref = TimmSwiGLU(24, 40, norm_layer=nn.LayerNorm)
        ours = SwiGLU(24, 40, norm_layer=nn.LayerNorm, packed=False)
    randomize_vit(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        y = ref(x)
        assert_close(ours(x), y, 1e-6, "SwiGLU")
        fused = ours.fuse()
        assert fused.fc1 is not None and fused.fc1_g is None
        assert_close(fused(x), y, 1e-5, "fused SwiGLU")
        assert_close(torch.jit.script(fused)(x), y, 1e-5, "scripted fused SwiGLU")


def test_img_size_at_creation_matches_timm():
    from timm.models.eva import checkpoint_filter_fn

    src = randomize_vit(timm.create_model("eva02_tiny_patch14_336", num_classes=1000))
    ref = timm.create_model("eva02_tiny_patch14_336", num_classes=1000, img_size=(112, 70)).eval()
    ref.load_state_dict(checkpoint_filter_fn(src.state_dict(), ref))
    ours = effivit.create_model("eva02_tiny_patch14_336", img_size=(112, 70)).eval()
    assert tuple(ours.pos_embed.shape) == (1, 1 + 8 * 5, 192) and ours.pretrained_cfg["input_size"] == (3, 112, 70)
    effivit.load_checkpoint(ours, src.state_dict())
    x = torch.randn(1, 3, 112, 70)
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "img_size=(112, 70)")
    with pytest.raises(ValueError, match="multiples of 14"):
        ours(torch.randn(1, 3, 112, 64))
    with pytest.raises(ValueError, match="multiples of 14"):
        effivit.create_model("eva02_tiny_patch14_224", img_size=100)


def test_forward_intermediates_and_grouping_match_timm():
    import timm.optim

    ours, ref = timm_pair("eva02_tiny_patch14_224", dynamic_img_size=True)
    x = torch.randn(1, 3, 42, 56)
    with torch.no_grad():
        for kw in (dict(indices=[0, -1], norm=True, return_prefix_tokens=True), dict(indices=2, output_fmt="NLC")):
            a, b = ref.forward_intermediates(x, **kw), ours.forward_intermediates(x, **kw)
            assert_close(b[0], a[0], 1e-5, f"final {kw}")
            for u, v in zip(a[1], b[1]):
                for s, t in zip(u, v) if isinstance(u, tuple) else [(u, v)]:
                    assert_close(t, s, 1e-5, f"intermediate {kw}")
        assert [tuple(m.shape) for m in ours.forward_intermediates(x, indices=1, intermediates_only=True)] == \
            [(1, 192, 3, 4)]
    assert ours.group_matcher() == ref.group_matcher()
    assert ours.no_weight_decay() == {"cls_token", "pos_embed"}

    def groups(model):
        opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.75)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    assert groups(ours) == groups(ref)


def test_fused_form_and_original_checkpoint_names():
    torch.manual_seed(0)
    model = randomize_vit(effivit.create_model("eva02_base_patch14_224", num_classes=10)).eval()
    model.blocks = model.blocks[:2]  # two blocks show every fold; the rest repeat them
    x = torch.randn(1, 3, 28, 42)
    fused = fuse(model)
    attn, mlp = fused.blocks[0].attn, fused.blocks[0].mlp
    assert attn.qkv is not None and attn.q_proj is None and attn.qkv.bias is not None
    assert mlp.fc1 is not None and mlp.fc1_g is None and not mlp.norm.elementwise_affine
    with torch.no_grad():
        y = model(x)
        assert_close(fused(x), y, 1e-4, "fused EVA-02 base")
        assert_close(fused.forward_features(x), model.forward_features(x), 1e-4, "fused features")
    # The original EVA-02 checkpoint names (w1/w2/w3, ffn_ln, q_bias of separate projections, stored rope).
    original = {}
    for k, v in model.state_dict().items():
        k = (k.replace("mlp.fc1_g", "mlp.w1").replace("mlp.fc1_x", "mlp.w2").replace("mlp.fc2", "mlp.w3")
             .replace("mlp.norm", "mlp.ffn_ln").replace("q_proj.bias", "q_bias").replace("v_proj.bias", "v_bias"))
        original[k] = v
    original["rope.freqs_cos"] = torch.zeros(256, 64)
    assert "blocks.0.mlp.w1.weight" in original and "blocks.0.attn.q_bias" in original
    fresh = effivit.create_model("eva02_base_patch14_224", num_classes=10).eval()
    fresh.blocks = fresh.blocks[:2]
    effivit.load_checkpoint(fresh, original)
    with torch.no_grad():
        assert_close(fresh(x), y, 0.0, "original names")


def test_fx_meta_torchscript_compile_bf16_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from torchvision.models.feature_extraction import create_feature_extractor

    name = "eva02_tiny_patch14_224"
    torch.manual_seed(0)
    model = randomize_vit(effivit.create_model(name, num_classes=1000)).eval()
    x = torch.randn(2, 3, 28, 42)
    with torch.no_grad():
        y = model(x)
        assert_close(torch.fx.symbolic_trace(model)(x), y, 0.0, "FX")
        feats = create_feature_extractor(model, {"blocks.5": "b5", "fc_norm": "pooled"})(x)
        assert_close(feats["pooled"], model.forward_head(model.forward_features(x), pre_logits=True), 0.0, "FX nodes")
        scripted = torch.jit.script(model)
        assert_close(scripted(x), y, 1e-5, "TorchScript")
        native = torch.randn(1, 3, 224, 224)
        assert_close(scripted(native), model(native), 1e-5, "TorchScript at 224x224")
        fused = fuse(model)
        assert_close(torch.jit.script(fused)(x), y, 1e-5, "TorchScript fused")
        assert_close(torch.compile(fused)(x), y, 1e-4, "torch.compile")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = fused(x)
        assert yb.dtype == torch.bfloat16 and (yb.float() - y).abs().max() < 0.1 * y.abs().max()
    # Meta build, then real tensors assigned: nothing (no zero k bias, no rotary table) left uninitialised.
    with torch.device("meta"):
        meta = effivit.create_model(name, num_classes=1000)
    meta.to_empty(device="cpu")
    effivit.load_checkpoint(meta, model.state_dict())
    with torch.no_grad():
        assert_close(meta.eval()(x), y, 0.0, "meta build")
    # ONNX (timm's EVA-02 does not export): verified in ONNX Runtime at batch 1 and 3 by export_onnx.
    path = export_onnx(fused, tmp_path / "eva02.onnx", img_size=(28, 42))
    assert path.stat().st_size > 1_000_000
