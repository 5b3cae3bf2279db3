"""Registry-wide contract: every registered model honours timm's model surface and the deploy guarantees.

Capabilities are read from the registry (size rule, fixed size, distillation head), not from lists of
exceptions. Checks that need no weights (state-dict keys and counts against timm, default tags, timm's
optimizer factory with layer decay) run for every registered model on the meta device. Checks that run the
model (outputs, fused form, FX, meta build + assign, heads) run at a small input size for every model up to
``LARGE_PARAMS`` and for the smallest variant of every family; the larger variants (the same code with wider
or deeper configs) are marked ``slow``: ``make test-all`` runs them, ``make test`` does not. The heavier
deploy checks (TorchScript, ONNX Runtime, channels_last, autocast, training, detection necks) run on the
smallest variant of each family. Families whose partitions follow the build size (MaxViT) are built for the
small input with ``img_size``, as timm users do.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from conftest import assert_close, randomize_norm_stats

import effivit
from effivit.deploy import export_onnx, fuse
from effivit.models._features import FeatureList
from effivit.registry import get_entry, list_families

MODELS = effivit.list_models()
FAMILIES = list_families()
timm = pytest.importorskip("timm")
TIMM_MODELS = set(timm.list_models())


SMALL = 64
LARGE_PARAMS = 30e6


def builds_for_size(name: str) -> bool:
    """The size rule comes from the build size (MaxViT's window and grid partitions are img_size / 32)."""
    return get_entry(name).defaults.size_divisor > SMALL


def small_size(name: str) -> tuple[int, int]:
    """A small input the model takes: its training size when fixed, else the smallest multiple of its size
    divisor from 64 up (a model whose rule follows its build size is built for 64, see :func:`make`)."""
    entry = get_entry(name)
    d = entry.defaults
    if d.fixed_input_size:
        return tuple(entry.pretrained_cfg()["input_size"][1:])
    if builds_for_size(name):
        return SMALL, SMALL
    divisor = max(1, d.size_divisor)
    s = divisor * math.ceil(max(SMALL, d.min_input_size or 0) / divisor)
    return s, s


def make(name: str, **kwargs) -> torch.nn.Module:
    """``create_model`` for a model that takes :func:`small_size` inputs."""
    if builds_for_size(name):
        kwargs.setdefault("img_size", small_size(name))
    return effivit.create_model(name, **kwargs)


@functools.cache
def param_count(name: str) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in effivit.create_model(name).parameters())


@functools.cache
def smallest_variant(family: str) -> str:
    """The family's variant with the fewest parameters (counted on the meta device)."""
    return min(effivit.list_models(family=family), key=param_count)


def running_models() -> list:
    """Every model; those above LARGE_PARAMS that are not their family's smallest are marked slow."""
    smallest = {smallest_variant(f) for f in FAMILIES}
    return [
        pytest.param(n, marks=pytest.mark.slow) if param_count(n) > LARGE_PARAMS and n not in smallest else n
        for n in MODELS
    ]


def tolerance(reference: torch.Tensor, atol: float = 1e-4) -> float:
    # Folding reorders float sums: allow 1e-4 relative to the output's scale.
    return atol * max(1.0, float(reference.abs().max()))


def feature_width(name: str, features: torch.Tensor) -> int:
    """The channel axis of forward_features' output: dim 1 of a map, the last dim of (B, N, C) tokens."""
    return features.shape[1] if features.dim() == 4 else features.shape[-1]


def test_registry_is_populated():
    assert "nextvit_small" in MODELS
    assert len(FAMILIES) >= 9


@pytest.mark.parametrize("name", running_models())
def test_model_contract(name):
    """Outputs, fused form, heads, multi-scale features, FX, meta build, head round trip, train-mode output."""
    torch.manual_seed(0)
    model = make(name).eval()
    randomize_norm_stats(model)
    cfg = model.pretrained_cfg
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "hf_hub_id"):
        assert key in cfg, f"pretrained_cfg lacks {key}"
    assert model.default_cfg is model.pretrained_cfg
    assert cfg["architecture"] == name
    json.loads(json.dumps(cfg))  # JSON-serialisable, as timm's (hub configs, experiment loggers)

    h, w = small_size(name)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        y = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
    # The default tag's class count: 1000, or 0 for pretraining-only weights (EVA-02 MIM), as in timm.
    assert y.shape == (2, cfg["num_classes"] or model.head_hidden_size)
    assert torch.isfinite(y).all()
    assert pooled.shape == (2, model.head_hidden_size)
    assert feature_width(name, feats) == model.num_features
    assert_close(model.forward_head(feats), y, tolerance(y), f"{name} forward_head(forward_features)")

    # The deploy form gives the same outputs, features and pre-logits.
    fused = fuse(model)
    with torch.no_grad():
        assert_close(fused(x), y, tolerance(y), f"{name} fused vs unfused")
        f_feats = fused.forward_features(x)
        assert_close(f_feats, feats, tolerance(feats), f"{name} fused forward_features")
        assert_close(fused.forward_head(f_feats, pre_logits=True), pooled, tolerance(pooled),
                     f"{name} fused pre-logits")

    # Multi-scale features for necks: one map per feature_info entry, with the declared channels/strides.
    with torch.no_grad():
        maps = model.forward_intermediates(x, intermediates_only=True)
        final, inter = model.forward_intermediates(x)
    assert len(maps) == len(inter) == len(model.feature_info) >= 1
    for f, info in zip(maps, model.feature_info):
        assert f.dim() == 4 and f.shape[1] == info["num_chs"], f"{name}: {tuple(f.shape)} vs {info}"
        assert h // f.shape[-2] == info["reduction"], f"{name}: map {tuple(f.shape)} at input {h} vs {info}"
    assert_close(final, feats, tolerance(feats), f"{name} forward_intermediates final == forward_features")

    # Meta-device build, then to_empty + load_state_dict(assign=True): how large models load.
    with torch.device("meta"):
        meta = make(name)
    assert all(p.is_meta for p in meta.parameters())
    meta = meta.to_empty(device="cpu")
    meta.load_state_dict(model.state_dict(), assign=True)
    with torch.no_grad():
        assert_close(meta.eval()(x), y, tolerance(y), f"{name} meta build + assign")

    # FX (torchvision's feature extraction, timm's FX path): traced graph == eager, eval and train.
    from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

    train_nodes, eval_nodes = get_graph_node_names(model)
    common = [n for n in eval_nodes if n in set(train_nodes)]  # training graphs add drop-path nodes
    assert common[-1] == eval_nodes[-1] == train_nodes[-1], f"{name}: train and eval graphs end differently"
    middle = common[len(common) // 2]
    extractor = create_feature_extractor(model, return_nodes={middle: "middle", eval_nodes[-1]: "out"})
    with torch.no_grad():
        assert_close(extractor.eval()(x)["out"], y, tolerance(y), f"{name} FX graph (eval)")
    model.train()
    extractor.train()
    torch.manual_seed(1)  # the same drop-path masks in both runs
    out_eager = model(x)
    assert isinstance(out_eager, torch.Tensor), f"{name}: train mode must return one tensor (timm's default)"
    torch.manual_seed(1)
    out_fx = extractor(x)["out"]
    assert_close(out_fx, out_eager, tolerance(out_eager), f"{name} FX graph (train)")
    params = [p for p in model.parameters() if p.requires_grad]
    g_fx = torch.autograd.grad(out_fx.square().mean(), params, allow_unused=True)
    g_eager = torch.autograd.grad(out_eager.square().mean(), params, allow_unused=True)
    for a, b in zip(g_fx, g_eager):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, tolerance(b, 1e-3), f"{name} FX backward")
    model.eval()

    # Heads: reset, pre-logits, num_classes=0.
    model.reset_classifier(7)
    with torch.no_grad():
        assert model(x).shape == (2, 7)
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, model.head_hidden_size)


@pytest.mark.parametrize("name", running_models())
def test_pretrained_head_round_trip_and_feature_extractor(name):
    """A fine-tuned checkpoint with the same class count loads whole; num_classes=0 + pretrained works."""
    torch.manual_seed(0)
    tuned = make(name, num_classes=10).eval()
    randomize_norm_stats(tuned)
    h, w = small_size(name)
    x = torch.randn(1, 3, h, w)
    state = tuned.state_dict()
    again = make(name, pretrained=state, num_classes=10).eval()
    with torch.no_grad():
        y = tuned(x)
        assert_close(again(x), y, tolerance(y), f"{name}: the 10-class head must load")
        trunk = make(name, pretrained=state, num_classes=0).eval()
        expected = tuned.forward_head(tuned.forward_features(x), pre_logits=True)
        assert_close(trunk(x), expected, tolerance(expected), f"{name}: num_classes=0 + pretrained")


@pytest.mark.parametrize("name", sorted(set(MODELS) & TIMM_MODELS))
def test_state_dict_keys_and_default_tag_equal_timms(name):
    with torch.device("meta"):
        ours = effivit.create_model(name)
        theirs = timm.create_model(name)
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
    # features_only: timm's form (FeatureListNet: flattened modules, which torchvision's BackboneWithFPN reads;
    # FeatureGetterNet: the model under ``model.``) and so timm's keys: a timm features_only checkpoint loads.
    with torch.device("meta"):
        ours_f = effivit.create_model(name, features_only=True)
        theirs_f = timm.create_model(name, features_only=True)
    assert isinstance(ours_f, FeatureList) == (type(theirs_f).__name__ == "FeatureListNet"), type(theirs_f)
    assert sorted(ours_f.state_dict()) == sorted(theirs_f.state_dict())
    timm_tags = timm.models._registry._model_default_cfgs[name].tags  # noqa: SLF001 - timm's tag registry
    ours_tag = get_entry(name).default_tag
    if ours_tag is not None:
        assert ours_tag.tag == timm_tags[0], f"{name}: default tag {ours_tag.tag} vs timm's {timm_tags[0]}"
    else:
        assert not any(t for t in timm_tags), f"{name}: timm has weights {timm_tags} we do not list"


@pytest.mark.parametrize("name", MODELS)
def test_timm_optimizer_factory_with_layer_decay(name):
    from timm.optim import create_optimizer_v2

    with torch.device("meta"):
        model = effivit.create_model(name)
    no_wd = model.no_weight_decay()
    assert isinstance(no_wd, set)
    names = {id(p): n for n, p in model.named_parameters()}
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    seen = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(names.values()), f"{name}: every parameter in exactly one group"
    scale = {names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]}
    decay = {names[id(p)]: g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for n in no_wd:
        assert decay[n] == 0.0, f"{name}: {n} is in no_weight_decay() but decays"
    stem = [n for n in scale if n.startswith(tuple(c + "." for c in model._stem_names()))]
    assert stem and max(scale[n] for n in stem) < 1.0, f"{name}: the stem must get a decayed learning rate"
    assert len(set(scale.values())) > len(model.feature_info), f"{name}: layer decay needs per-block groups"
    assert max(scale.values()) == 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_bad_input_is_rejected(family):
    name = smallest_variant(family)
    model = make(name).eval()
    cfg = model.pretrained_cfg
    divisor, minimum = cfg["size_divisor"], cfg["min_input_size"][-1]
    h, w = small_size(name)
    with pytest.raises(ValueError, match="channels"):
        model(torch.randn(1, 4, h, w))
    if divisor > 1:
        with pytest.raises(ValueError, match=f"H={h + divisor // 2}, W={w}.*multiples of {divisor}"):
            model(torch.randn(1, 3, h + divisor // 2, w))
    if minimum > 1 and divisor == 1:
        with pytest.raises(ValueError, match=f"H={minimum - 1}, W={w}.*at least {minimum}"):
            model(torch.randn(1, 3, minimum - 1, w))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, h, w))
    with pytest.raises(ValueError, match="floating-point"):
        model(torch.randint(0, 255, (1, 3, h, w), dtype=torch.uint8))


@pytest.mark.parametrize("family", FAMILIES)
def test_features_only_is_pruned_and_trains(family):
    name = smallest_variant(family)
    torch.manual_seed(0)
    full = make(name)
    backbone = make(name, features_only=True, out_indices=(-2, -1))
    h, w = small_size(name)
    with torch.no_grad():
        feats = backbone.eval()(torch.randn(2, 3, h, w))
    assert len(feats) == 2
    assert [f.shape[1] for f in feats] == backbone.feature_info.channels() == backbone.out_channels
    assert [h // f.shape[-2] for f in feats] == backbone.feature_info.reduction() == backbone.strides
    if isinstance(backbone, FeatureList):  # timm's FeatureListNet form scripts, as the whole model does
        x = torch.randn(2, 3, h, w)
        with torch.no_grad():
            for a, b in zip(torch.jit.script(backbone)(x), backbone(x), strict=True):
                assert_close(a, b, tolerance(b), f"{name}: scripted features_only")
    # No head and no final norm left: every parameter is used (DDP's find_unused_parameters stays off).
    first = make(name, features_only=True, out_indices=(0,))
    assert sum(p.numel() for p in first.parameters()) < sum(p.numel() for p in full.parameters()) / 2
    classifiers = full.pretrained_cfg["classifier"]
    classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
    heads = tuple(c.split(".")[0] for c in classifiers)  # FeatureList keys: head_fc.*; FeatureExtractor: model.head.*
    assert not any(k.removeprefix("model.").startswith(heads) for k in backbone.state_dict())
    if name in TIMM_MODELS:  # timm's features_only with the same weights gives the same maps
        theirs = timm.create_model(name, features_only=True, out_indices=(-2, -1)).eval()
        ours = effivit.create_model(name, features_only=True, out_indices=(-2, -1))
        effivit.load_checkpoint(ours, theirs.state_dict())  # timm's features_only keys
        x = torch.randn(1, *theirs.pretrained_cfg["input_size"])  # timm's size (not all of timm's take others)
        with torch.no_grad():
            for a, b in zip(ours.eval()(x), theirs.eval()(x), strict=True):
                assert_close(a, b, tolerance(b), f"{name}: features_only vs timm's")
    backbone.train().set_grad_checkpointing(True)
    out = backbone(torch.randn(2, 3, h, w))
    sum(o.float().square().mean() for o in out).backward()
    unused = [n for n, p in backbone.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused, f"{name}: parameters without gradient in a features_only model: {unused[:5]}"
    with pytest.raises(ValueError, match="out of range"):
        effivit.create_model(name, features_only=True, out_indices=(99,))


@pytest.mark.parametrize("family", FAMILIES)
def test_timm_keywords(family, tmp_path):
    from safetensors.torch import save_file

    name = smallest_variant(family)
    entry = get_entry(name)
    torch.manual_seed(0)
    ref = randomize_norm_stats(make(name)).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    h, w = small_size(name)
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        y = ref(x)
        for kwargs in (dict(checkpoint_path=path), dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path))),
                       dict(pretrained=path, scriptable=True, exportable=True, no_jit=False, cache_dir=tmp_path)):
            assert_close(make(name, **kwargs).eval()(x), y, tolerance(y), f"{name} {kwargs}")
        # in_chans with RGB weights: 1 channel sums the filters (a grey image = the same image in RGB); 6
        # channels repeat them scaled by 3/6 (an image given twice = the image once).
        grey = x[:, :1]
        y_grey = ref(grey.expand(-1, 3, -1, -1))
        assert_close(make(name, pretrained=path, in_chans=1).eval()(grey), y_grey, tolerance(y_grey),
                     f"{name} in_chans=1")
        assert_close(make(name, pretrained=path, in_chans=6).eval()(x.repeat(1, 2, 1, 1)), y, tolerance(y),
                     f"{name} in_chans=6")
        m64 = make(name, pretrained=path, dtype=torch.float64).eval()
        assert m64.forward_head(m64.forward_features(x.double())).dtype == torch.float64
        assert_close(m64(x.double()).float(), y, tolerance(y), f"{name} dtype=float64")
    meta = effivit.create_model(name, device="meta")
    assert all(p.is_meta for p in meta.parameters())
    if not entry.defaults.fixed_input_size:
        size = (h * 2, w * 2) if entry.defaults.size_divisor > 1 else (h + 3, w + 5)
        sized = effivit.create_model(name, img_size=size)
        assert sized.pretrained_cfg["input_size"] == (3, *size)
        with torch.no_grad():
            assert sized.eval()(torch.randn(1, 3, *size)).shape == y.shape
    with pytest.raises(ValueError, match="img_size"):
        effivit.create_model(name, img_size="big")
    with pytest.raises(ValueError, match="scriptable"):
        effivit.create_model(name, scriptable="yes")
    with pytest.raises(ValueError, match="dtype"):
        effivit.create_model(name, dtype=torch.int8)


@pytest.mark.parametrize("family", [f for f in FAMILIES if smallest_variant(f) in TIMM_MODELS])
def test_pretrained_in_chans_adapts_as_timm(family, tmp_path, caplog):
    """``pretrained=..., in_chans=1/5``: the same first-layer weights as timm's, so the same outputs."""
    from safetensors.torch import save_file

    name = smallest_variant(family)
    torch.manual_seed(0)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model(name).state_dict().items()}, str(path))
    size = timm.create_model(name, pretrained=False).pretrained_cfg["input_size"][1:]
    for in_chans in (1, 5):
        x = torch.randn(1, in_chans, *size)
        with caplog.at_level("INFO", logger="effivit"):
            ours = effivit.create_model(name, pretrained=path, in_chans=in_chans).eval()
        assert f"to {in_chans} input channels" in caplog.text
        theirs = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                   in_chans=in_chans).eval()
        with torch.no_grad():
            y = theirs(x)
            assert_close(ours(x), y, tolerance(y), f"{name} in_chans={in_chans}")


def test_adapt_input_conv_rejects_what_it_cannot_adapt():
    from effivit.checkpoint import adapt_input_conv

    with pytest.raises(ValueError, match="in_chans must be >= 1"):
        adapt_input_conv(torch.zeros(4, 3, 3, 3), 0)
    with pytest.raises(ValueError, match="3 input channels"):
        adapt_input_conv(torch.zeros(4, 2, 3, 3), 1)


def test_hf_hub_model_names_resolve_offline(tmp_path, monkeypatch):
    """``hf-hub:org/name`` with the repository's config.json and weights in the cache, no network."""
    from huggingface_hub import constants
    from safetensors.torch import save_file

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    torch.manual_seed(0)
    ref = effivit.create_model("levit_128s", num_classes=5).eval()
    snapshot = tmp_path / "models--someone--my-levit" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (tmp_path / "models--someone--my-levit" / "refs").mkdir()
    (tmp_path / "models--someone--my-levit" / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_text(json.dumps(
        {"architecture": "levit_128s", "num_classes": 5, "pretrained_cfg": {"tag": "fb_dist_in1k"}}))
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(snapshot / "model.safetensors"))
    model = effivit.create_model("hf-hub:someone/my-levit", pretrained=True, num_classes=5, cache_dir=tmp_path)
    assert model.pretrained_cfg["architecture"] == "levit_128s"
    assert model.pretrained_cfg["hf_hub_id"] == "someone/my-levit"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert_close(model.eval()(x), ref(x), 1e-5, "hf-hub model")
    # timm's own repositories are named after the weight: resolved from the name when no config is cached.
    assert effivit.create_model("hf-hub:timm/levit_128s.fb_dist_in1k", cache_dir=tmp_path).pretrained_cfg[
        "tag"] == "fb_dist_in1k"
    with pytest.raises(ValueError, match="cannot tell which architecture"):
        effivit.create_model("hf-hub:someone/unknown-model", cache_dir=tmp_path)


def test_fine_tuned_head_with_another_class_count_is_dropped_and_named(caplog):
    torch.manual_seed(0)
    state = effivit.create_model("levit_128s", num_classes=10).state_dict()
    with caplog.at_level("WARNING", logger="effivit"):
        model = effivit.create_model("levit_128s", pretrained=state, num_classes=3)
    assert "10 classes and the model 3" in caplog.text and "head.linear.weight" in caplog.text
    assert model.head.linear.weight.shape == (3, 384)
    assert torch.equal(model.stem.conv1.linear.weight, state["stem.conv1.linear.weight"])


@pytest.mark.parametrize("family", FAMILIES)
def test_torchscript_channels_last_autocast(family):
    name = smallest_variant(family)
    torch.manual_seed(0)
    model = randomize_norm_stats(make(name)).eval()
    h, w = small_size(name)
    x = torch.randn(2, 3, h, w)
    with torch.no_grad():
        y = model(x)
        for form, m in (("unfused", model), ("fused", fuse(model))):
            scripted = torch.jit.script(m)
            assert_close(scripted(x), y, tolerance(y), f"{name} TorchScript ({form})")
        cl = fuse(model).to(memory_format=torch.channels_last)
        assert_close(cl(x.to(memory_format=torch.channels_last)), y, tolerance(y), f"{name} channels_last")
        fused = fuse(model)
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cpu", dtype=dtype):
                yb = fused(x)
            assert torch.isfinite(yb).all(), f"{name}: non-finite output under {dtype} autocast"
            # Half precision keeps ~3 significant digits: the logits must stay close to fp32's.
            assert (yb.float() - y).abs().max() < 0.1 * max(1.0, float(y.abs().max())) + 0.5, f"{name} {dtype}"


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_runtime_parity(family, tmp_path):
    pytest.importorskip("onnxruntime")
    name = smallest_variant(family)
    torch.manual_seed(0)
    model = fuse(randomize_norm_stats(make(name)).eval())
    h, w = small_size(name)
    # export_onnx runs the exported graph in ONNX Runtime and raises if it differs from PyTorch.
    path = export_onnx(model, tmp_path / f"{name}.onnx", img_size=(h, w), dynamic_batch=True)
    # The weights are inside the file (fp32), not left behind as external data.
    assert path.stat().st_size > 0.9 * 4 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_trains_with_drop_path_and_grad_checkpointing(family):
    name = smallest_variant(family)
    torch.manual_seed(0)
    model = make(name, num_classes=5, drop_path_rate=0.2).train()
    # Some references zero-init the last norm of each residual branch (no gradient reaches the branch at
    # step 0); non-trivial norm parameters make the test see the whole graph.
    randomize_norm_stats(model)
    model.set_grad_checkpointing(True)
    h, w = small_size(name)
    x = torch.randn(2, 3, h, w)
    out = model(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)
    out.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    with_grad = sum(g is not None and bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in grads)
    assert with_grad >= 0.9 * len(grads), f"{name}: only {with_grad}/{len(grads)} parameters got gradients"
    if get_entry(name).defaults.has_distill_head:
        model.set_distilled_training(True)
        pair = model(x)
        assert isinstance(pair, tuple) and len(pair) == 2 and pair[0].shape == pair[1].shape == (2, 5)


@pytest.mark.parametrize("family", FAMILIES)
def test_detection_neck_trains(family):
    """``features_only`` into torchvision's FPN + Faster R-CNN: one training step, one inference step.

    Models whose stages form a chain of maps (``FeatureList``, timm's ``FeatureListNet`` form) go into
    torchvision's own ``BackboneWithFPN``, whose ``IntermediateLayerGetter`` reads the extractor's modules by
    name. Models that pass tokens between stages (plain ViTs, Hiera, LeViT's linear form) cannot be read that
    way (neither can timm's ``FeatureGetterNet``); they feed the same neck (``FeaturePyramidNetwork`` +
    ``LastLevelMaxPool``) through a four-line module.
    """
    from collections import OrderedDict

    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

    name = smallest_variant(family)
    torch.manual_seed(0)
    body = make(name, features_only=True)
    body = make(name, features_only=True, out_indices=min(3, len(body.out_indices)))
    levels = len(body.out_indices)

    class Neck(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.fpn = FeaturePyramidNetwork(body.feature_info.channels(), 32, extra_blocks=LastLevelMaxPool())
            self.out_channels = 32

        def forward(self, x):
            return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(self.body(x))))

    if isinstance(body, FeatureList):
        neck = BackboneWithFPN(body, {n: str(i) for i, n in enumerate(body.return_layers)},
                               body.feature_info.channels(), 32)
        with torch.no_grad():  # the getter runs the extractor's modules: the same maps as its forward
            x = torch.randn(1, 3, *small_size(name))
            body.eval()
            for a, b in zip(neck.body(x).values(), body(x), strict=True):
                assert torch.equal(a, b)
    else:
        neck = Neck()
    entry = get_entry(name)
    h, _ = small_size(name)
    size = h if entry.defaults.fixed_input_size else max(h, 128)
    anchors = AnchorGenerator(tuple((16 * 2**i,) for i in range(levels + 1)), ((0.5, 1.0, 2.0),) * (levels + 1))
    detector = FasterRCNN(neck, num_classes=3, min_size=size, max_size=size, rpn_anchor_generator=anchors,
                          box_roi_pool=MultiScaleRoIAlign([str(i) for i in range(levels)], 7, 2),
                          rpn_batch_size_per_image=32, box_batch_size_per_image=32)
    divisor = SMALL if builds_for_size(name) else entry.defaults.size_divisor  # the rule of the model built
    detector.transform.size_divisible = divisor if divisor > 1 else 32
    images = [torch.rand(3, size, size) for _ in range(2)]
    targets = [dict(boxes=torch.tensor([[10.0, 12.0, 60.0, 70.0]]), labels=torch.tensor([1])) for _ in range(2)]
    detector.train()
    losses = detector(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in body.parameters())
    detector.eval()
    with torch.no_grad():
        out = detector(images[:1])
    assert set(out[0]) == {"boxes", "labels", "scores"}


def test_compiled_attention_bias_follows_training():
    """torch.compile: a training step changes the bias tables; eval after it equals eager eval."""
    torch.manual_seed(0)
    # LeViT zero-initialises the last norm of each residual branch (no gradient reaches the attention at
    # step 0); non-trivial norm parameters let every table get one. 128 px: the last stage attends over
    # 2x2 tokens (a softmax over a single key passes no gradient to its logits).
    model = randomize_norm_stats(effivit.create_model("levit_128s", num_classes=4))
    x = torch.randn(2, 3, 128, 128)
    # aot_eager: dynamo and AOT autograd decide what the graph reads (the bias branch under compile);
    # inductor code generation is covered by test_torch_compile_one_small_model.
    compiled = torch.compile(model, backend="aot_eager")
    model.eval()
    with torch.no_grad():
        before = compiled(x)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    tables = [m.attention_biases for m in model.modules() if hasattr(m, "attention_biases")]
    start = [t.detach().clone() for t in tables]
    compiled(x).logsumexp(-1).mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tables), "bias tables got no gradient"
    opt.step()
    assert any(not torch.equal(a, t) for a, t in zip(start, tables))
    model.eval()
    with torch.no_grad():
        after_compiled = compiled(x)
        after_eager = model(x)
    assert_close(after_compiled, after_eager, tolerance(after_eager), "compiled eval after a step == eager eval")
    assert (after_compiled - before).abs().max() > 1e-3, "the step changed nothing: the test would be vacuous"


def test_torch_compile_one_small_model():
    # Compiling costs about a minute per model on 2 cores: one small configuration proves the path.
    name = min((smallest_variant(f) for f in FAMILIES), key=param_count)
    torch.manual_seed(0)
    model = fuse(randomize_norm_stats(make(name)).eval())
    h, w = small_size(name)
    x = torch.randn(1, 3, h, w)
    compiled = torch.compile(model)
    with torch.no_grad():
        y = model(x)
        yc = compiled(x)
    assert_close(yc, y, tolerance(y, 1e-3), f"{name} torch.compile")


def test_many_families_compile_in_one_process():
    """dynamo keeps at most 8 compiled entries per code object, then runs eager with only a warning: every
    family has its own ``forward`` code, so a zoo benchmark compiles each of them (fullgraph: no fallback)."""
    names = sorted((smallest_variant(f) for f in FAMILIES), key=param_count)[:9]
    assert len({id(type(make(n)).forward.__code__) for n in names}) == len(names)  # code objects compare by value
    for name in names:
        model = make(name).eval()
        x = torch.randn(1, 3, *small_size(name))
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        with torch.no_grad():
            y = model(x)
            assert_close(compiled(x), y, tolerance(y), f"{name} compiled after {names.index(name)} others")
