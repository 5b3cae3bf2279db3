"""Next-ViT: timm parity for every variant, the three token mixers (train, fuse, sizes, layouts), the
mixers' exact-maths rewrites against plain reference code, errors, and loading the released checkpoints
into the BCHW mixer. What the registry-wide contract test covers (features_only, TorchScript of the
default model, ...) is not repeated here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, compare_with_timm, randomize_norm_stats
from torch import nn

import effivit
from effivit import deploy
from effivit.deploy.cpu import PointwiseConv
from effivit.layers.xca import cross_covariance_attention, mix_channels
from effivit.models.nextvit import (
    ATTN_KINDS,
    BCHWEfficientAttention,
    EfficientAttention,
    WindowMean,
    XCAttention,
    _raster_pool,
    _window_mean,
)

CL = torch.channels_last


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small_models() -> dict[str, nn.Module]:
    """nextvit_small per mixer, eval mode, with non-trivial BatchNorm statistics (built once)."""
    out = {}
    for i, attn in enumerate(ATTN_KINDS):
        torch.manual_seed(i)
        out[attn] = randomize_norm_stats(effivit.create_model("nextvit_small", attn=attn).eval(), seed=i)
    return out


# ---- timm parity (attn="original") --------------------------------------------------------------------------


def test_small_matches_timm():
    ours, ref = compare_with_timm("nextvit_small", img_size=224, batch=2)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


@pytest.mark.slow
def test_base_and_large_match_timm():
    for name in ("nextvit_base", "nextvit_large"):
        ours, ref = compare_with_timm(name, img_size=224, batch=1)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_variant_depths_follow_the_paper():
    # Next-ViT-S/B/L: stage depths (3, 4, 10/20/30, 3), one transformer block closing stages 1 and 3
    # and every five blocks of stage 2 (the Next Hybrid Strategy).
    for name, mid in (("nextvit_small", 10), ("nextvit_base", 20), ("nextvit_large", 30)):
        m = effivit.create_model(name)
        assert [len(s.blocks) for s in m.stages] == [3, 4, mid, 3]
        n_mhsa = sum(1 for n, _ in m.named_modules() if n.endswith("e_mhsa"))
        assert n_mhsa == 1 + mid // 5 + 1


# ---- the three mixers: fuse, layouts, sizes, training ---------------------------------------------------


@pytest.mark.parametrize("attn", ATTN_KINDS)
def test_fuse_equals_unfused_without_batchnorm(small_models, attn):
    model = small_models[attn]
    fused = deploy.fuse(model)
    assert deploy.count_batchnorms(model) > 0
    assert deploy.count_batchnorms(fused) == 0
    x = _x(2, 3, 224, 224)
    with torch.no_grad():
        ref = model(x)
        assert ref.abs().max() > 1e-2
        assert_close(fused(x), ref, 1e-4, f"{attn}: fused vs unfused")
        # Both layouts take the same maths (the mixers pick their copies by layout).
        assert_close(model(x.contiguous(memory_format=CL)), ref, 1e-4, f"{attn}: channels_last unfused")
        fused_cl = deploy.fuse(model).to(memory_format=CL)
        assert_close(fused_cl(x.contiguous(memory_format=CL)), ref, 1e-4, f"{attn}: channels_last fused")


@pytest.mark.parametrize("attn", ATTN_KINDS)
def test_runs_at_multiples_of_32(small_models, attn):
    fused = deploy.fuse(small_models[attn])
    with torch.no_grad():
        for h, w in ((224, 224), (256, 256), (320, 320), (224, 320), (96, 64)):
            out = fused(_x(1, 3, h, w))
            assert out.shape == (1, 1000), (h, w)
            assert torch.isfinite(out).all(), (h, w)


@pytest.mark.parametrize("attn", ATTN_KINDS)
def test_trains_with_drop_path(attn):
    torch.manual_seed(0)
    model = effivit.create_model("nextvit_small", attn=attn, drop_path_rate=0.5).train()
    x = _x(2, 3, 64, 96)
    torch.manual_seed(1)
    out = model(x)
    out.logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    with torch.no_grad():
        torch.manual_seed(2)
        a = model(x)
        torch.manual_seed(3)
        b = model(x)
        assert (a - b).abs().max() > 1e-6, "drop path has no effect in training"
        model.eval()
        assert_close(model(x), model(x), 0.0, "eval is deterministic")


def test_size_below_the_minimum_is_rejected(small_models):
    # Any size from 25 up runs (as in timm); smaller leaves a pooling stage an empty map.
    with pytest.raises(ValueError, match=r"H=24, W=224.*at least 25"):
        small_models["original"](_x(1, 3, 24, 224))


def test_unknown_attention_kind_is_rejected():
    with pytest.raises(ValueError, match=r"attn='linear'.*'original', 'bchw', 'xca'"):
        effivit.create_model("nextvit_small", attn="linear")


def test_released_checkpoint_loads_into_bchw(small_models):
    # The original model's state dict has timm's (released) layout: Linear q/k/v/proj, BatchNorm1d.
    state = small_models["original"].state_dict()
    assert state["stages.1.blocks.3.e_mhsa.q.weight"].dim() == 2
    bchw = effivit.create_model("nextvit_small", attn="bchw").eval()
    effivit.load_checkpoint(bchw, state)
    got = bchw.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k].reshape(v.shape), v), k
    assert got["stages.1.blocks.3.e_mhsa.q.weight"].shape == (192, 192, 1, 1)
    with torch.no_grad():
        assert torch.isfinite(bchw(_x(1, 3, 224, 224))).all()


# ---- the mixers' rewrites against plain reference maths --------------------------------------------------


def test_raster_pool_is_avgpool1d_over_tokens():
    x = _x(2, 8, 5, 7)  # 35 tokens: the last 3 are dropped by a ratio of 4, as AvgPool1d does
    tokens = x.flatten(2)  # B, C, N
    ref = nn.AvgPool1d(4, 4)(tokens)
    assert_close(_raster_pool(x, 4), ref, 1e-6, "raster pool")
    assert_close(_raster_pool(x.contiguous(memory_format=CL), 4), ref, 1e-6, "raster pool, channels_last")


def _mixer(cls: type[nn.Module], dim: int, sr: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    m = cls(dim, head_dim=16, sr_ratio=sr)
    with torch.no_grad():
        for p in m.parameters():
            # O(1) activations (matrices ~ 1/sqrt(fan_in)), so that 1e-4 means fp32 rounding, not scale
            p.copy_(torch.randn(p.shape) * (p[0].numel() ** -0.5 if p.dim() > 1 else 1.0))
    return randomize_norm_stats(m.eval(), seed)


def _conv(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    w = layer.weight
    return F.conv2d(x, w.reshape(w.shape[0], w.shape[1], 1, 1), layer.bias)


def _reference_xca(m: XCAttention, x: torch.Tensor) -> torch.Tensor:
    """XCA written out plainly: q/k from the pooled + normalised map, v from the full map, proj."""
    b, c, h, w = x.shape
    heads, d = m.num_heads, m.head_dim
    qk_in = x if m.sr_ratio == 1 else m.norm(F.avg_pool2d(x, m.sr_ratio))
    q = _conv(m.q, qk_in).reshape(b, heads, d, -1)
    k = _conv(m.k, qk_in).reshape(b, heads, d, -1)
    v = _conv(m.v, x).reshape(b, heads, d, h * w)
    out = cross_covariance_attention(q, k, v, m.temperature).reshape(b, c, h, w)
    return _conv(m.proj, out)


def _reference_softmax(m: nn.Module, x: torch.Tensor, raster: bool) -> torch.Tensor:
    """E-MHSA written out plainly on tokens: SDPA over (B, heads, N, d)."""
    b, c, h, w = x.shape
    heads = m.num_heads
    if m.sr_ratio == 1:
        kv = x
    elif raster:
        pooled = F.avg_pool1d(x.flatten(2), m.sr_ratio**2)
        kv = m.norm(pooled).unsqueeze(-1)
    else:
        kv = m.norm(F.avg_pool2d(x, m.sr_ratio))

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.flatten(2).transpose(1, 2).reshape(b, -1, heads, c // heads).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(_conv(m.q, x)), split(_conv(m.k, kv)), split(_conv(m.v, kv)))
    out = out.transpose(1, 2).reshape(b, h * w, c).transpose(1, 2).reshape(b, c, h, w)
    return _conv(m.proj, out)


def _fused(m: nn.Module) -> nn.Module:
    """The mixer as NextTransformerBlock.fuse leaves it (identity pre-norm folded, projections merged)."""
    import copy

    f = copy.deepcopy(m)
    f.absorb_input_affine(torch.ones(m.dim), torch.zeros(m.dim))
    f.merge_projections()
    return f


# (h, w) pairs on both sides of the "more tokens than channels" switch of XCA (dim 64).
@pytest.mark.parametrize("sr", [1, 2])
@pytest.mark.parametrize("hw", [(4, 8), (16, 12)])
def test_xca_mixer_matches_reference(sr, hw):
    m = _mixer(XCAttention, 64, sr, seed=sr)
    x = _x(2 if sr == 1 else 1, 64, *hw)  # batch 1 and 2 take different conv paths in mix_channels
    with torch.no_grad():
        ref = _reference_xca(m, x)
        assert ref.abs().max() > 1e-2
        for name, mod in (("unfused", m), ("fused", _fused(m))):
            assert_close(mod(x), ref, 1e-4, f"xca {name} sr={sr} {hw}")
            assert_close(mod(x.contiguous(memory_format=CL)), ref, 1e-4, f"xca {name} channels_last")


@pytest.mark.parametrize("cls", [EfficientAttention, BCHWEfficientAttention])
@pytest.mark.parametrize("sr", [1, 2])
def test_softmax_mixers_match_reference(cls, sr):
    m = _mixer(cls, 64, sr, seed=sr)
    x = _x(2, 64, 8, 12)
    with torch.no_grad():
        ref = _reference_softmax(m, x, raster=cls is EfficientAttention)
        assert ref.abs().max() > 1e-2
        for name, mod in (("unfused", m), ("fused", _fused(m))):
            assert_close(mod(x), ref, 1e-4, f"{cls.__name__} {name} sr={sr}")
            assert_close(mod(x.contiguous(memory_format=CL)), ref, 1e-4, f"{cls.__name__} {name} channels_last")


@pytest.mark.parametrize("cls", [EfficientAttention, BCHWEfficientAttention, XCAttention])
@pytest.mark.parametrize("hw", [(4, 8), (16, 12)])
def test_mixers_train(cls, hw):
    m = _mixer(cls, 64, 2, seed=0).train()
    m(_x(2, 64, *hw)).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("k,ceil", [(2, True), (4, False)])
def test_window_mean_is_avgpool(k, ceil):
    pool = nn.AvgPool2d(k, k, ceil_mode=ceil, count_include_pad=False)
    wm = _window_mean(pool, 6)
    assert isinstance(wm, WindowMean)
    for h, w in ((8, 12), (9, 13)):  # divisible (the depthwise conv) and not (falls back to avg_pool2d)
        x = _x(2, 6, h, w)
        assert_close(wm(x), pool(x), 1e-6, f"{k} {ceil} {h}x{w}")
        assert_close(wm(x.contiguous(memory_format=CL)), pool(x), 1e-6, f"{k} {ceil} {h}x{w} channels_last")


def test_pointwise_conv_runs_bf16_channels_last_as_linear():
    torch.manual_seed(0)
    conv = nn.Conv2d(48, 40, 1)
    pw = PointwiseConv(48, 40, 1)
    pw.load_state_dict(conv.state_dict())
    x = _x(2, 48, 5, 7)
    with torch.no_grad():
        assert_close(pw(x), conv(x), 1e-6, "fp32 NCHW (the conv path)")
        xb = x.bfloat16().contiguous(memory_format=CL)
        ref = conv.double()(xb.double())  # exact products of the bf16 inputs; only accumulation order differs
        got = pw.bfloat16()(xb)
        assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=CL)
        assert_close(got.double(), ref.to(torch.float64), 0.05, "bf16 channels_last (the linear path)")
    fused = deploy.optimize(deploy.fuse(effivit.create_model("nextvit_small").eval()), "cpu")
    plain = [n for n, m in fused.named_modules() if type(m) is nn.Conv2d and m.kernel_size == (1, 1)
             and m.stride == (1, 1) and m.groups == 1]
    assert not plain, f"1x1 convs not swapped for PointwiseConv: {plain[:3]}"


def test_mix_channels_graph_capture_path_matches_eager():
    # Eager/TorchScript use a grouped conv, graph capture a batched matmul: the same result.
    weight, bias, x = _x(3, 16, 8, seed=1), _x(3, 16, seed=2), _x(3, 8, 5, 6, seed=3)
    ref = torch.einsum("boc,bchw->bohw", weight, x) + bias[:, :, None, None]
    assert_close(mix_channels(weight, bias, x), ref, 1e-5, "eager")
    assert_close(mix_channels(weight, bias, x.contiguous(memory_format=CL)), ref, 1e-5, "eager channels_last")
    one = mix_channels(weight[:1], bias[:1], x[:1].contiguous(memory_format=CL))  # the batch-1 (plain conv) path
    assert_close(one, ref[:1], 1e-5, "eager batch 1")
    assert one.is_contiguous(memory_format=CL), "a channels_last map stays channels_last"
    assert_close(mix_channels(weight, None, x), ref - bias[:, :, None, None], 1e-5, "no bias")
    traced = torch.jit.trace(mix_channels, (weight, bias, x), check_trace=False)
    assert_close(traced(weight, bias, x), ref, 1e-5, "traced")


@pytest.mark.parametrize("attn", ["bchw", "xca"])
def test_fused_mixer_blocks_export_to_onnx(attn, tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    class Block(nn.Module):  # one transformer block of stage 1 (input 192 channels), alone
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.in_chans = 192
            self.block = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.block(x)

    model = randomize_norm_stats(effivit.create_model("nextvit_small", attn=attn).eval())
    block = deploy.fuse(Block(model.stages[1].blocks[3]))
    scripted = torch.jit.script(block)
    x = _x(2, 192, 32, 32)
    with torch.no_grad():
        assert_close(scripted(x), block(x), 1e-5, "TorchScript")
    path = deploy.export_onnx(block, tmp_path / f"{attn}.onnx", img_size=32)  # verifies ORT vs PyTorch
    graph = onnx.load(str(path)).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    pairs = [n.name for n in graph.node if n.op_type == "Transpose" and producer.get(n.input[0]) == "Transpose"]
    assert not pairs, f"back-to-back Transpose nodes: {pairs}"
