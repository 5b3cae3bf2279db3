"""effivit.deploy.passes / deploy.cpu: kernel choices as per-target passes with plain fallbacks, the same
function as the plain fused model, and exports that do not depend on the exporting machine."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from effivit.deploy import cpu as C
from effivit.deploy import fuse, optimize


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 48, 1), nn.Flatten(2),
                         nn.Sequential(nn.Linear(64, 40), nn.Hardswish(), nn.Linear(40, 8))).eval()


def test_cpu_target_swaps_layers_and_keeps_the_function():
    plain = fuse(_model())
    cpu = optimize(plain, "cpu")
    assert cpu is not plain and type(plain[1]) is nn.Conv2d  # a copy; the plain model is untouched
    assert isinstance(cpu[1], C.PointwiseConv) and type(cpu[0]) is nn.Conv2d  # only the 1x1 conv
    first, act = cpu[3][0], cpu[3][1]
    assert isinstance(first, C.OneDnnLinear) and first.hardswish and isinstance(act, nn.Identity)
    assert isinstance(cpu[3][2], C.OneDnnLinear) and not cpu[3][2].hardswish
    x = torch.randn(2, 3, 8, 8)
    with torch.inference_mode():
        torch.testing.assert_close(cpu(x), plain(x), atol=1e-5, rtol=1e-5)
    assert optimize(plain, "onnx") is plain and optimize(plain, "portable") is plain
    with pytest.raises(ValueError, match="target='gpu'"):
        optimize(plain, "gpu")


def test_onednn_linear_falls_back_when_the_private_op_fails(monkeypatch):
    lin = C.OneDnnLinear(nn.Linear(16, 24), hardswish=True).eval()
    x = torch.randn(5, 16)
    ref = torch.nn.functional.hardswish(torch.nn.functional.linear(x, lin.weight, lin.bias))

    def broken(*args, **kwargs):
        raise RuntimeError("no oneDNN here")

    lin._onednn_ok = True
    monkeypatch.setattr(C.torch.ops.mkldnn, "_linear_pointwise", broken, raising=False)
    with torch.inference_mode():
        out = lin(x)
    assert not lin._onednn_ok  # disabled for good after the failure
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("hardswish", [False, True])
def test_onednn_linear_bf16_paths_equal_what_autocast_and_cast_weights_compute(monkeypatch, hardswish):
    """bf16 autocast over fp32 weights and bf16 weights both run the packed kernel (the weight cast and packed
    once, re-packed after an in-place update) and give what plain autocast / a plain bf16 Linear give."""
    torch.manual_seed(0)
    lin = nn.Linear(192, 576)
    fast = C.OneDnnLinear(lin, hardswish=hardswish).eval()
    if not fast._onednn_ok:
        pytest.skip("this torch build has no oneDNN linear")
    act = torch.nn.functional.hardswish if hardswish else (lambda t: t)
    calls = []
    run = C.OneDnnLinear._onednn_forward
    monkeypatch.setattr(C.OneDnnLinear, "_onednn_forward", lambda self, t, d: calls.append(d) or run(self, t, d))
    x = torch.randn(2, 197, 192)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        expected = act(lin(x))
        out = fast(x)
        assert calls == [torch.bfloat16] and out.dtype == torch.bfloat16
        # bf16 rounding of a few hundred products may differ in the last bit between kernels: 2 ulp of bf16
        torch.testing.assert_close(out.float(), expected.float(), atol=0.02, rtol=2 ** -7)
    with torch.no_grad():
        lin.weight.mul_(-1.0)
    # a new autocast context: autocast's own cast cache (per context) would still hold the old weight
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        torch.testing.assert_close(fast(x).float(), act(lin(x)).float(), atol=0.02, rtol=2 ** -7)
    half = C.OneDnnLinear(nn.Linear(192, 576).bfloat16(), hardswish=hardswish).eval()
    calls.clear()
    with torch.no_grad():
        xb = x.bfloat16()
        out = half(xb)
        assert calls == [torch.bfloat16]
        torch.testing.assert_close(out.float(), act(torch.nn.functional.linear(xb, half.weight, half.bias)).float(),
                                   atol=0.02, rtol=2 ** -7)
    calls.clear()
    with torch.autocast("cpu", torch.float16), torch.no_grad():  # no packed fp16 kernel: plain autocast
        torch.testing.assert_close(fast(x), act(lin(x)))
    assert not calls


@pytest.mark.parametrize("shape", [(1, 8, 4, 4), (1, 256, 12, 12)])  # below / above oneDNN's dilated threshold
def test_pointwise_conv_equals_conv_in_fp32_and_bf16(shape):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], 24, 1)
    pw = C.PointwiseConv.from_conv(conv)
    x = torch.randn(shape)
    with torch.no_grad():
        torch.testing.assert_close(pw(x), conv(x), atol=1e-5, rtol=1e-5)
        xb = x.bfloat16().contiguous(memory_format=torch.channels_last)
        got = C.PointwiseConv.from_conv(conv.bfloat16())(xb)
        assert got.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(got.float(), conv.float()(xb.float()), atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="1x1"):
        C.PointwiseConv.from_conv(nn.Conv2d(8, 8, 3))


def test_export_of_the_plain_fused_model_has_no_machine_specific_ops(tmp_path):
    pytest.importorskip("onnxruntime")
    import onnx

    from effivit import create_model
    from effivit.deploy import export_onnx

    torch.manual_seed(0)
    fused = fuse(create_model("levit_128s").eval())
    path = export_onnx(fused, tmp_path / "levit.onnx", img_size=64)
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert "MatMul" in ops or "Gemm" in ops
    dilations = [a.ints for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "dilations"]
    assert all(list(d) == [1, 1] for d in dilations)
    assert not any("mkldnn" in n.op_type.lower() or n.domain not in ("", "ai.onnx") for n in graph.node)
