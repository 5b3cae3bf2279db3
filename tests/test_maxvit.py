"""MaxViT (tiny/small/base/large, TF weights): timm parity, parameter counts, partitions and the relative-position
bias, the size rule, fused form, features, training and the deploy runtimes (TorchScript, torch.compile, bf16
autocast; ONNX Runtime parity of the same 64 px model is the registry-wide test in test_contract.py).

Most checks build the architecture with ``img_size=64`` (partition 2x2 instead of 7x7: the same code and weights
shapes except the bias tables, at a twelfth of the pixels) to stay fast; one parity check runs the released
224 configuration.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, compare_with_timm, randomize_norm_stats, scale_classifier
from torch import nn

import effivit
from effivit.deploy import count_batchnorms, fuse
from effivit.layers.partition import grid_partition, grid_reverse, window_partition, window_reverse
from effivit.layers.rel_pos_bias import RelPosBias, gather_relative_position_bias, relative_position_index
from effivit.models._features import FeatureExtractor
from effivit.models.maxvit import (
    VARIANTS,
    FusedMBConvBlock,
    MaxViT,
    MaxViTConfig,
    MBConvBlock,
    PartitionAttention,
    SameConv2d,
)
from effivit.registry import get_entry

timm = pytest.importorskip("timm")

NAMES = ["maxvit_tiny_tf_224", "maxvit_small_tf_224", "maxvit_base_tf_224", "maxvit_large_tf_224"]


def build(name: str, img_size: int | tuple[int, int] = 224, **kwargs) -> MaxViT:
    """Our model for ``img_size`` through the registry's builder. (``create_model(img_size=...)`` checks the
    family's default divisor, 224, before building, so it takes only multiples of 224 today.)"""
    entry = get_entry(name)
    model = entry.builder(entry.config, img_size=img_size, **kwargs)
    model.pretrained_cfg = entry.pretrained_cfg()
    return model


def pair(name: str, img_size: int | tuple[int, int], seed: int = 0) -> tuple[MaxViT, nn.Module]:
    """(ours, timm's) for ``img_size`` with timm's random weights (BatchNorm statistics, logits scaled)."""
    torch.manual_seed(seed)
    ref = timm.create_model(name, pretrained=False, img_size=img_size).eval()
    randomize_norm_stats(ref, seed)
    scale_classifier(ref, seed=seed)
    ours = build(name, img_size).eval()
    effivit.load_checkpoint(ours, ref.state_dict())  # timm's state dict as it is, no filter needed
    return ours, ref


@pytest.fixture(scope="module")
def tiny64():
    return pair("maxvit_tiny_tf_224", 64)


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- parity ---------------------------------------------------------------------------------------------


def test_tiny_matches_timm_at_224():
    """The released configuration: 7x7 windows and grid, 224 input."""
    ours, ref = compare_with_timm("maxvit_tiny_tf_224", img_size=224, batch=1)
    # The relative-position bias is part of what is compared: changing one table changes the logits.
    x = _x(1, 3, 224, 224)
    with torch.no_grad():
        y = ours(x)
        table = ours.stages[2].blocks[0].attn_grid.attn.rel_pos.relative_position_bias_table
        table.copy_(torch.randn(table.shape, generator=torch.Generator().manual_seed(3)) * 2.0)
        assert (ours(x) - y).abs().max() > 1e-3


@pytest.mark.parametrize("name,size,batch", [("maxvit_tiny_tf_224", (64, 96), 2), ("maxvit_small_tf_224", 64, 2)])
def test_matches_timm_at_other_partitions(name, size, batch):
    ours, ref = pair(name, size)
    h, w = (size, size) if isinstance(size, int) else size
    x = _x(batch, 3, h, w)
    with torch.no_grad():
        expected = ref(x)
        assert expected.abs().max() > 1e-2
        assert_close(ours(x), expected, 1e-4, f"{name} at {size}")
        # A model takes every multiple of its own size (here twice the height).
        x2 = _x(1, 3, 2 * h, w, seed=2)
        assert_close(ours(x2), ref(x2), 1e-4, f"{name} at {(2 * h, w)}")


@pytest.mark.slow
def test_base_and_large_match_timm():
    # 24 blocks of 3 residual branches amplify fp32 rounding past 1e-4 (3e-4 for base): compared in float64.
    for name in ("maxvit_base_tf_224", "maxvit_large_tf_224"):
        ours, ref = pair(name, 64)
        x = _x(1, 3, 64, 64).double()
        with torch.no_grad():
            expected = ref.double()(x)
            assert expected.abs().max() > 1e-2
            assert_close(ours.double()(x), expected, 1e-9, f"{name} at 64 (float64)")


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_and_state_dict_equal_timms(name):
    with torch.device("meta"):
        ours = effivit.create_model(name)
        theirs = timm.create_model(name)
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    published = get_entry(name).default_tag.published
    assert round(count / 1e6, 2) == published.timm_params_m, f"{name}: {count} vs timm's {published.timm_params_m}M"
    assert abs(count / 1e6 - published.params_m) < 1.0, f"{name}: {count} vs the paper's {published.params_m}M"


def test_registry_entries():
    assert sorted(effivit.list_models(family="maxvit")) == sorted(NAMES)
    cfg = effivit.create_model("maxvit_tiny_tf_224", device="meta").pretrained_cfg
    assert cfg["tag"] == "in1k" and cfg["hf_hub_id"] == "timm/maxvit_tiny_tf_224.in1k"
    assert cfg["first_conv"] == "stem.conv1" and cfg["classifier"] == "head.fc" and cfg["crop_pct"] == 0.95
    assert cfg["size_divisor"] == 224 and not cfg["fixed_input_size"]


# ---- partitions and the relative-position bias ----------------------------------------------------------


@pytest.mark.parametrize("h,w,ph,pw", [(6, 8, 3, 2), (4, 4, 2, 2), (14, 7, 7, 7)])
def test_partitions_match_their_definition_and_timm(h, w, ph, pw):
    from timm.models.maxxvit import grid_partition as timm_grid
    from timm.models.maxxvit import window_partition as timm_window

    x = _x(2, h, w, 5)
    win = window_partition(x, ph, pw)
    grid = grid_partition(x, ph, pw)
    assert win.shape == grid.shape == (2 * (h // ph) * (w // pw), ph * pw, 5)
    # Definitions: window (b, i, j) holds rows i*ph.., cols j*pw..; grid group (b, r, s) holds the tokens at
    # offset (r, s) of every (H/ph x W/pw) cell, i.e. rows r + k*H/ph, cols s + l*W/pw.
    nh, nw = h // ph, w // pw
    for b in range(2):
        for i in range(nh):
            for j in range(nw):
                n = (b * nh + i) * nw + j
                assert torch.equal(win[n], x[b, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].reshape(-1, 5))
                assert torch.equal(grid[n], x[b, i::nh, j::nw].reshape(-1, 5))
    assert torch.equal(win, timm_window(x, [ph, pw]).reshape(win.shape))
    assert torch.equal(grid, timm_grid(x, [ph, pw]).reshape(grid.shape))
    assert torch.equal(window_reverse(win, ph, pw, h, w), x)
    assert torch.equal(grid_reverse(grid, ph, pw, h, w), x)
    scripted = torch.jit.script(grid_partition)
    assert torch.equal(scripted(x, ph, pw), grid)


@pytest.mark.parametrize("window", [(7, 7), (3, 5)])
def test_relative_position_bias_equals_timms_exactly(window):
    from timm.layers import RelPosBiasTf

    torch.manual_seed(0)
    ref = RelPosBiasTf(window, num_heads=3)
    ours = RelPosBias(window, num_heads=3)
    ours.load_state_dict(ref.state_dict())
    assert torch.equal(ours(), ref.get_bias())
    # The index, by definition: key minus query offset, shifted to start at 0.
    idx = relative_position_index(*window)
    wh, ww = window
    q, k = 1 * ww + 2, 2 * ww + 0  # query (1, 2), key (2, 0): offset (1, -2)
    assert idx[q, k] == (1 + wh - 1) * (2 * ww - 1) + (-2 + ww - 1)


def test_relative_position_bias_cache_and_resampling():
    torch.manual_seed(0)
    rp = RelPosBias((4, 4), num_heads=2).eval()
    with torch.no_grad():
        first = rp()
        assert rp() is first  # cached in eval without autograd
        rp.relative_position_bias_table.add_(1.0)
        assert_close(rp(), first + 1.0, 1e-6, "cache rebuilt after an in-place update")
    rp.train()
    rp().sum().backward()  # training gathers fresh, so the table gets a gradient
    assert rp.relative_position_bias_table.grad.abs().sum() > 0
    # Another window: the table is resampled bicubically (a constant table stays constant).
    const = torch.full((2, 7, 7), 0.3)
    assert_close(gather_relative_position_bias(const, 6, 6), torch.full((2, 36, 36), 0.3), 1e-6, "resampled")


# ---- sizes ----------------------------------------------------------------------------------------------


def test_size_rule_is_stated_and_enforced():
    model = effivit.create_model("maxvit_tiny_tf_224", device="meta")
    assert model.partition_size == (7, 7)
    for h, w in ((224, 224), (448, 224), (672, 896)):
        model.check_input(torch.empty(1, 3, h, w, device="meta"))
    with pytest.raises(ValueError, match=r"H=256, W=224 is not allowed: H and W must be positive multiples of 224 "
                                         r"\(32 x the model's 7x7 window/grid partition"):
        model.check_input(torch.empty(1, 3, 256, 224, device="meta"))
    with pytest.raises(ValueError, match="H=0"):
        model.check_input(torch.empty(1, 3, 0, 224, device="meta"))
    rect = build("maxvit_tiny_tf_224", (64, 96))
    assert rect.partition_size == (2, 3)
    with pytest.raises(ValueError, match="H=64, W=64 is not allowed: H must be a positive multiple of 64 and W of 96"):
        rect.check_input(torch.empty(1, 3, 64, 64, device="meta"))
    with pytest.raises(ValueError, match="img_size H=200, W=200 is not allowed for MaxViT: H and W must be "
                                         "positive multiples of 32"):
        build("maxvit_tiny_tf_224", 200)


def test_create_model_img_size_sets_partition_and_config():
    # timm's rule: partition = img_size / 32. Shapes of every table equal timm's model at that size.
    with torch.device("meta"):
        ours = effivit.create_model("maxvit_small_tf_224", img_size=448)
        theirs = timm.create_model("maxvit_small_tf_224", img_size=448)
    assert ours.partition_size == (14, 14) and ours.pretrained_cfg["input_size"] == (3, 448, 448)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_checkpoint_for_another_partition_is_resampled(tiny64):
    """224 weights (7x7 partition tables) load into a model built for 64 (2x2): tables resampled bicubically."""
    torch.manual_seed(0)
    ref224 = timm.create_model("maxvit_tiny_tf_224").eval()
    model = build("maxvit_tiny_tf_224", 64).eval()
    effivit.load_checkpoint(model, ref224.state_dict())
    key = "stages.1.blocks.0.attn_block.attn.rel_pos.relative_position_bias_table"
    src = ref224.state_dict()[key]
    expected = F.interpolate(src[None], size=(3, 3), mode="bicubic", align_corners=False)[0]
    assert_close(model.state_dict()[key], expected, 1e-6, "resampled table")
    assert torch.equal(model.state_dict()["stem.conv1.weight"], ref224.state_dict()["stem.conv1.weight"])


@pytest.mark.parametrize("stride,groups", [(2, 1), (2, 8), (1, 8)])
def test_same_conv_equals_tensorflow_padding(stride, groups):
    torch.manual_seed(0)
    conv = SameConv2d(8, 16 if groups == 1 else 8, 3, stride=stride, groups=groups, bias=True)
    x = _x(2, 8, 12, 10)
    pad = [0, 1, 0, 1] if stride == 2 else [1, 1, 1, 1]  # TF "SAME" for even sizes: the odd zero at the end
    with torch.no_grad():
        expected = F.conv2d(F.pad(x, pad), conv.weight, conv.bias, stride, 0, 1, groups)
        assert torch.equal(conv(x), expected)
        assert torch.equal(conv.fuse()(x), expected)
    assert conv(x).shape[-2:] == (12 // stride, 10 // stride)


# ---- fused form -----------------------------------------------------------------------------------------


def test_fused_form_has_no_batchnorm_and_equals_unfused(tiny64):
    ours, ref = tiny64
    fused = fuse(ours)
    assert count_batchnorms(ours) > 0 and count_batchnorms(fused) == 0
    assert not any(isinstance(m, MBConvBlock) for m in fused.modules())
    assert sum(isinstance(m, FusedMBConvBlock) for m in fused.modules()) == sum(VARIANTS["maxvit_tiny_tf_224"].depths)
    # The stride-2 convs (TensorFlow's asymmetric padding) become plain 4x4 convs with symmetric padding 1.
    for conv in (fused.stem.conv1, fused.stages[0].blocks[0].conv.conv2):
        assert type(conv) is nn.Conv2d and conv.kernel_size == (4, 4) and conv.padding == (1, 1)
    assert type(fused.stages[0].blocks[1].conv.conv2) is nn.Conv2d
    assert fused.stages[0].blocks[1].conv.conv2.kernel_size == (3, 3)
    x = _x(2, 3, 64, 64)
    with torch.no_grad():
        y = ref(x)
        assert_close(fused(x), y, 1e-4, "fused vs timm")
        assert_close(fused.forward_features(x), ours.forward_features(x), 1e-4, "fused features")
        assert_close(fused.forward_head(fused.forward_features(x), pre_logits=True),
                     ours.forward_head(ours.forward_features(x), pre_logits=True), 1e-4, "fused pre-logits")
    # The fused model carries every gathered bias (a constant for TorchScript and tracing).
    caches = [m.attention_bias_cache for m in fused.modules() if isinstance(m, RelPosBias)]
    assert len(caches) == 2 * 11 and all(c.shape[-1] == 4 for c in caches)


# ---- features -------------------------------------------------------------------------------------------


def test_forward_intermediates_and_features_only_match_timm(tiny64):
    # The un-normalised maps grow to ~70 by the last stage: compared in float64, where rounding is not an issue.
    ours, ref = (copy.deepcopy(m).double() for m in tiny64)
    x = _x(2, 3, 64, 64).double()
    with torch.no_grad():
        final, inter = ours.forward_intermediates(x)
        r_final, r_inter = ref.forward_intermediates(x)
        assert_close(final, r_final, 1e-9, "final")
        assert len(inter) == len(r_inter) == 5
        for a, b in zip(inter, r_inter):
            assert_close(a, b, 1e-9, f"intermediate {tuple(b.shape)}")
        picked = ours.forward_intermediates(x, indices=[0, -2], stop_early=True, intermediates_only=True)
        assert_close(picked[0], r_inter[0], 1e-9, "stem")
        assert_close(picked[1], r_inter[3], 1e-9, "stage 3")
    assert [f["reduction"] for f in ours.feature_info] == [2, 4, 8, 16, 32]
    assert [f["num_chs"] for f in ours.feature_info] == [64, 64, 128, 256, 512]

    backbone = FeatureExtractor(build("maxvit_tiny_tf_224", 64).double(), out_indices=(1, 2))
    effivit.load_checkpoint(backbone, ref.state_dict())  # pruned parts' keys are skipped
    assert len(backbone.model.stages) == 2 and isinstance(backbone.model.head, nn.Identity)
    with torch.no_grad():
        feats = backbone.eval()(x)
    assert backbone.feature_info.reduction() == [4, 8] and backbone.out_channels == [64, 128]
    assert_close(feats[0], r_inter[1], 1e-9, "features_only stage 1")
    assert_close(feats[1], r_inter[2], 1e-9, "features_only stage 2")


# ---- training -------------------------------------------------------------------------------------------


def test_trains_with_drop_path_and_grad_checkpointing():
    torch.manual_seed(0)
    model = build("maxvit_tiny_tf_224", 64, drop_path_rate=0.2, num_classes=5).train()
    rates = [m.drop_path.drop_prob for m in model.modules() if isinstance(m, MBConvBlock)]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2)
    model.set_grad_checkpointing(True)
    out = model(_x(2, 3, 64, 64))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing[:5]
    tables = [n for n in model.no_weight_decay()]
    assert len(tables) == 22 and all(n.endswith("relative_position_bias_table") for n in tables)


def test_timm_optimizer_factory_layer_decay():
    from timm.optim import create_optimizer_v2

    model = build("maxvit_tiny_tf_224", 64)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.7)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    assert len(groups) == len(names)
    assert groups["stem.conv1.weight"][0] < groups["stages.3.blocks.1.conv.conv1_1x1.weight"][0] <= 1.0
    assert groups["stages.0.blocks.0.attn_grid.attn.rel_pos.relative_position_bias_table"][1] == 0.0


# ---- deploy runtimes ------------------------------------------------------------------------------------


def test_torchscript_and_fx(tiny64):
    ours, ref = tiny64
    x = _x(2, 3, 64, 64)
    with torch.no_grad():
        y = ref(x)
        assert_close(torch.jit.script(fuse(ours))(x), y, 1e-4, "scripted fused")
        assert_close(torch.fx.symbolic_trace(ours)(x), y, 1e-4, "FX graph")


def test_torch_compile_and_bf16_autocast(tiny64):
    ours, ref = tiny64
    x = _x(2, 3, 64, 64)
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)  # no graph break anywhere
    with torch.no_grad():
        y = ref(x)
        assert_close(compiled(x), y, 1e-4, "torch.compile")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = ours(x)
            yf = fuse(ours)(x)
    assert yb.dtype == torch.bfloat16
    # bf16 keeps about 3 significant digits through ~80 layers: within 5% of the logits' range.
    scale = float(y.abs().max())
    assert_close(yb.float(), y, 0.05 * scale, "bf16 autocast")
    assert_close(yf.float(), y, 0.05 * scale, "bf16 autocast, fused")


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="dim_head"):
        MaxViTConfig(embed_dims=(64, 128, 250, 512), depths=(2, 2, 5, 2))
    with pytest.raises(ValueError, match="depths"):
        MaxViTConfig(embed_dims=(64, 128, 256, 512), depths=(2, 2, 0, 2))
    with pytest.raises(ValueError, match="stride-1"):
        MBConvBlock(64, 128, 1, 4.0, 0.25)
    block = PartitionAttention(64, True, (2, 2), 32, 4.0)
    assert block.attn.num_heads == 2 and block.attn.rel_pos.relative_position_bias_table.shape == (2, 3, 3)
