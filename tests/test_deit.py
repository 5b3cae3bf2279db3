"""DeiT, distilled DeiT and DeiT III: timm parity (native size, other sizes, img_size=), keys and parameter counts,
forward_intermediates / pruning / layer decay as timm, the distillation head (and training with hard and soft
distillation through `effivit train`), fused forms, and the deploy paths (FX, meta, TorchScript, ONNX Runtime,
torch.compile, bf16)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close, scale_classifier
from torch import nn

import effivit
from effivit.deploy import export_onnx, fuse
from effivit.layers.scale import LayerScale
from effivit.registry import get_entry

timm = pytest.importorskip("timm")

FAST = ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "deit3_small_patch16_224"]
SLOW = ["deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
        "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384",
        "deit3_small_patch16_384", "deit3_base_patch16_224", "deit3_base_patch16_384"]


def randomize_vit(model: nn.Module, seed: int = 0) -> nn.Module:
    """Make every parameter matter: norms, biases, tokens, position tables and layer scales (1e-6 in DeiT III,
    which would hide the blocks) drawn at random; Linears rescaled so the logits are O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "token" in name or "pos_embed" in name:
                base = 1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") or "gamma" in name \
                    or "norm.weight" in name else 0.0
                p.copy_(base + torch.randn(p.shape, generator=g) * 0.3)
    return scale_classifier(model, seed=seed)


def timm_pair(name: str, ours_kwargs: dict | None = None, **timm_kwargs) -> tuple[nn.Module, nn.Module]:
    """timm's model with random weights, and ours loaded from its state dict (eval mode both)."""
    torch.manual_seed(0)
    ref = randomize_vit(timm.create_model(name, pretrained=False, num_classes=1000, **timm_kwargs)).eval()
    ours = effivit.create_model(name, **{"num_classes": 1000, **(ours_kwargs or {})}).eval()
    effivit.load_checkpoint(ours, ref.state_dict())
    return ours, ref


def check_parity(name: str, ours: nn.Module, ref: nn.Module, sizes: list[tuple[int, int]], batch: int = 1) -> None:
    assert list(ours.state_dict()) == list(ref.state_dict()), f"{name}: state_dict keys differ from timm's"
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    g = torch.Generator().manual_seed(1)
    for hw in sizes:
        x = torch.randn(batch, 3, *hw, generator=g)
        with torch.no_grad():
            expected = ref(x)
            got = ours(x)
            assert expected.abs().max() > 0.1
            assert_close(got, expected, 1e-4, f"{name} at {hw} vs timm")
    with torch.no_grad():  # the deploy form, at the last size
        assert_close(fuse(ours)(x), expected, 1e-4, f"{name} fused at {hw} vs timm")


@pytest.mark.parametrize("name", FAST)
def test_matches_timm_at_native_and_other_sizes(name):
    ours, ref = timm_pair(name, dynamic_img_size=True)
    # Native size (position table as it is), then a smaller non-square grid (table resampled as timm).
    check_parity(name, ours, ref, [(224, 224), (48, 112)])


@pytest.mark.slow
def test_matches_timm_every_other_variant():
    # Parity at a small grid runs every weight and op (the position table resampled as timm does) in a fraction
    # of the time of the native size; keys and counts are checked on the full models.
    for name in SLOW:
        ours, ref = timm_pair(name, dynamic_img_size=True)
        check_parity(name, ours, ref, [(64, 64)])


@pytest.mark.parametrize("name", FAST + SLOW)
def test_parameter_counts_equal_timm_and_published(name):
    with torch.device("meta"):
        ours = effivit.create_model(name)
        ref = timm.create_model(name, pretrained=False)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    published = get_entry(name).default_tag.published
    assert round(count / 1e6, 2) == published.timm_params_m, f"{name}: {count / 1e6:.3f}M vs timm's results"
    assert abs(count / 1e6 - published.params_m) < 1.0, f"{name}: {count / 1e6:.2f}M vs paper {published.params_m}M"


def test_registry_covers_the_variants():
    assert set(effivit.list_models(family="deit")) == set(FAST + SLOW)
    cfg = get_entry("deit_base_patch16_384").pretrained_cfg()
    assert cfg["input_size"] == (3, 384, 384) and cfg["size_divisor"] == 16 and not cfg["fixed_input_size"]
    deit3 = get_entry("deit3_base_patch16_224").pretrained_cfg()
    assert deit3["tag"] == "fb_in1k" and deit3["published"]["top1"] == pytest.approx(83.8)
    assert deit3["published"]["timm_top1"] == pytest.approx(83.8)
    distilled = get_entry("deit_tiny_distilled_patch16_224").pretrained_cfg()
    assert distilled["has_distill_head"] and distilled["classifier"] == ("head", "head_dist")


def test_img_size_at_creation_matches_timm_and_resamples_checkpoints():
    # timm sizes the table for img_size and resamples a 224 checkpoint on load; ours does the same.
    ref224 = randomize_vit(timm.create_model("deit3_small_patch16_224", num_classes=1000))
    from timm.models.vision_transformer import checkpoint_filter_fn

    ref = timm.create_model("deit3_small_patch16_224", num_classes=1000, img_size=(160, 96)).eval()
    ref.load_state_dict(checkpoint_filter_fn(ref224.state_dict(), ref))
    ours = effivit.create_model("deit3_small_patch16_224", img_size=(160, 96)).eval()
    assert tuple(ours.pos_embed.shape) == (1, 10 * 6, 384) and ours.pretrained_cfg["input_size"] == (3, 160, 96)
    effivit.load_checkpoint(ours, ref224.state_dict())
    x = torch.randn(1, 3, 160, 96)
    with torch.no_grad():
        assert_close(ours(x), ref(x), 1e-4, "img_size=(160, 96)")
    # set_input_size: the table is resampled once; outputs at that size do not change.
    model = effivit.create_model("deit_tiny_distilled_patch16_224").eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        y = model(x)
        model.set_input_size((96, 128))
        assert tuple(model.pos_embed.shape) == (1, 2 + 6 * 8, 192)
        assert_close(model(x), y, 1e-6, "after set_input_size")
    with pytest.raises(ValueError, match="multiples of 16"):
        model.set_input_size(100)
    with pytest.raises(ValueError, match="multiples of 16"):
        effivit.create_model("deit_tiny_patch16_224", img_size=200)


def test_bad_input_is_a_clear_error():
    model = effivit.create_model("deit_tiny_patch16_224").eval()
    with pytest.raises(ValueError, match=r"H=40, W=64 .* multiples of 16"):
        model(torch.randn(1, 3, 40, 64))
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="global_pool"):
        effivit.create_model("deit_tiny_distilled_patch16_224", global_pool="avg")


def test_forward_intermediates_prune_and_features_match_timm():
    ours, ref = timm_pair("deit_tiny_distilled_patch16_224", dynamic_img_size=True)
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        for kw in (dict(indices=[1, -1], norm=True, return_prefix_tokens=True), dict(indices=3, output_fmt="NLC"),
                   dict(indices=2, stop_early=True, intermediates_only=True)):
            a, b = ref.forward_intermediates(x, **kw), ours.forward_intermediates(x, **kw)
            if not kw.get("intermediates_only"):
                assert_close(b[0], a[0], 1e-5, f"final {kw}")
                a, b = a[1], b[1]
            assert len(a) == len(b)
            for u, v in zip(a, b):
                for s, t in zip(u, v) if isinstance(u, tuple) else [(u, v)]:
                    assert_close(t, s, 1e-5, f"intermediate {kw}")
        maps = ours.forward_intermediates(x, indices=[0, 11], intermediates_only=True)
        assert [tuple(m.shape) for m in maps] == [(2, 192, 4, 6)] * 2
    assert ours.group_matcher() == ref.group_matcher()
    assert ours.no_weight_decay() == {"cls_token", "pos_embed", "dist_token"}
    assert ours.prune_intermediate_layers([2, 5], prune_norm=True) == ref.prune_intermediate_layers([2, 5],
                                                                                                     prune_norm=True)
    assert list(ours.state_dict()) == list(ref.state_dict()) and len(ours.blocks) == 6
    # features_only: the maps of the chosen blocks, the rest of the model gone.
    backbone = effivit.create_model("deit_tiny_patch16_224", features_only=True, out_indices=(3, 7)).eval()
    assert not any(k.startswith(("blocks.8.", "head", "norm")) for k in backbone.model.state_dict())
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(1, 192, 4, 4)] * 2
    assert backbone.feature_info.reduction() == [16, 16]


def test_layer_decay_groups_equal_timm():
    import timm.optim

    ours, ref = timm_pair("deit3_small_patch16_224")

    def groups(model):
        opt = timm.optim.create_optimizer_v2(model, "adamw", lr=1.0, weight_decay=0.05, layer_decay=0.7)
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: (g["lr_scale"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}

    theirs = groups(ref)
    assert groups(ours) == theirs and len({v[0] for v in theirs.values()}) == 14


def test_distillation_head_and_fused_heads():
    torch.manual_seed(0)
    model = randomize_vit(effivit.create_model("deit_tiny_distilled_patch16_224", num_classes=10))
    x = torch.randn(2, 3, 32, 48)
    assert model.train()(x).shape == (2, 10), "timm's default: one tensor in training mode"
    model.set_distilled_training(True)
    out = model(x)
    assert isinstance(out, tuple) and out[0].shape == out[1].shape == (2, 10)
    assert (out[0] - out[1]).abs().max() > 1e-3  # two heads on two tokens
    model.eval()
    with torch.no_grad():
        tokens = model.forward_features(x)
        y = model(x)
        assert_close(y, (model.head(tokens[:, 0]) + model.head_dist(tokens[:, 1])) / 2, 1e-6, "eval = mean")
        assert_close(model.forward_head(tokens, pre_logits=True), tokens[:, :2].mean(1), 1e-6, "pre-logits")
        fused = fuse(model)
        assert isinstance(fused.head, nn.Linear) and fused.head.in_features == 2 * 192
        assert isinstance(fused.head_dist, nn.Identity)
        assert_close(fused(x), y, 1e-5, "merged heads")
        assert_close(fused.forward_head(fused.forward_features(x), pre_logits=True),
                     model.forward_head(tokens, pre_logits=True), 1e-6, "fused pre-logits")
    head, head_dist = model.get_classifier()
    assert head is model.head and head_dist is model.head_dist
    model.reset_classifier(5)
    assert model.head.out_features == model.head_dist.out_features == 5
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 192)


def test_deit3_fused_form_folds_layer_scales():
    torch.manual_seed(0)
    model = randomize_vit(effivit.create_model("deit3_small_patch16_224")).eval()
    fused = fuse(model)
    assert not any(isinstance(m, LayerScale) for m in fused.modules())
    assert not any(n.endswith("gamma") for n, _ in fused.named_parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(fused(x), model(x), 1e-4, "fused DeiT III")
        assert_close(fused.forward_features(x), model.forward_features(x), 1e-4, "fused features")
    assert any(isinstance(m, LayerScale) for m in model.modules())  # the unfused model is untouched


def test_checkpoint_filter_maps_original_deit3_names():
    torch.manual_seed(0)
    ours = randomize_vit(effivit.create_model("deit3_small_patch16_224")).eval()
    original = {k.replace("ls1.gamma", "gamma_1").replace("ls2.gamma", "gamma_2"): v
                for k, v in ours.state_dict().items()}
    assert "blocks.0.gamma_1" in original
    fresh = effivit.create_model("deit3_small_patch16_224").eval()
    effivit.load_checkpoint(fresh, original)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(fresh(x), ours(x), 0.0, "original names")


def test_fx_meta_torchscript_compile_bf16_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from torchvision.models.feature_extraction import create_feature_extractor

    name = "deit_tiny_distilled_patch16_224"
    torch.manual_seed(0)
    model = randomize_vit(effivit.create_model(name)).eval()
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        y = model(x)
        assert_close(torch.fx.symbolic_trace(model)(x), y, 0.0, "FX")
        feats = create_feature_extractor(model, {"blocks.5": "b5", "norm": "out"})(x)
        assert_close(feats["out"], model.forward_features(x), 0.0, "feature extractor")
        scripted = torch.jit.script(model)
        assert_close(scripted(x), y, 1e-5, "TorchScript")
        native = torch.randn(1, 3, 224, 224)  # the native grid: the table as it is
        assert_close(scripted(native), model(native), 1e-5, "TorchScript at 224x224")
        fused = fuse(model)
        assert_close(torch.jit.script(fused)(x), y, 1e-5, "TorchScript fused")
        compiled = torch.compile(fused)
        assert_close(compiled(x), y, 1e-4, "torch.compile")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yb = fused(x)
        assert yb.dtype == torch.bfloat16 and (yb.float() - y).abs().max() < 0.1 * y.abs().max()
    # Meta build, then real tensors assigned: nothing left uninitialised.
    with torch.device("meta"):
        meta = effivit.create_model(name)
    meta.to_empty(device="cpu")
    effivit.load_checkpoint(meta, model.state_dict())
    with torch.no_grad():
        assert_close(meta.eval()(x), y, 0.0, "meta build")
    # ONNX (verified in ONNX Runtime by export_onnx at batch 1 and 3), at a grid other than the native one.
    path = export_onnx(fused, tmp_path / "deit.onnx", img_size=(32, 48))
    assert path.stat().st_size > 1_000_000


def test_hard_and_soft_distillation_train_through_effivit_train(tmp_path):
    pytest.importorskip("torchvision")
    pytest.importorskip("sklearn")
    from effivit.cli import main
    from effivit.train.digits import write_digits

    data = tmp_path / "digits"
    write_digits(data, size=32, max_per_class=2)  # 20 train + 20 val real scans, 10 classes
    teacher = effivit.create_model("deit_tiny_patch16_224", num_classes=10)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    common = ["train", "--model", "deit_tiny_distilled_patch16_224", "--data", str(data), "--epochs", "1",
              "--batch-size", "10", "--img-size", "32", "--crop-pct", "1", "--randaugment", "0", "0",
              "--scale", "1", "1", "--hflip", "0", "--workers", "0", "--no-progress", "--device", "cpu",
              "--teacher", "deit_tiny_patch16_224", "--teacher-checkpoint", str(tmp_path / "teacher.pth"),
              "--distill-alpha", "0.5", "--smoothing", "0"]
    for kind in ("hard", "soft"):
        out = tmp_path / kind
        assert main([*common, "--distill", kind, "--output", str(out)]) == 0
        row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        assert row["train_loss"] == pytest.approx(0.5 * row["train_ce"] + 0.5 * row["train_distill"], rel=1e-5)
        assert row["train_distill"] != pytest.approx(row["train_ce"])
        ckpt = torch.load(out / "last.pt", weights_only=True)["model"]
        assert {"head.weight", "head_dist.weight", "dist_token"} <= set(ckpt)
