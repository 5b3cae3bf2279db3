"""effivit.bench.backends: one interface per runtime (prepare / run / describe), skips that say why, and
timing an arbitrary module through any backend. Tiny modules and inputs keep this file to seconds."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from effivit.bench import backends
from effivit.bench.backends import (
    Backend,
    BackendUnavailable,
    Context,
    Prepared,
    get_backend,
    list_backends,
    prepare,
    register_backend,
    time_module,
)
from effivit.bench.runner import Settings
from effivit.bench.specs import ModelSpec


def _block() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU(), nn.Conv2d(16, 8, 1)).eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_registry_lists_every_runtime_in_reference_order():
    names = list_backends()
    assert names[:3] == ["eager", "compile", "onnxruntime"]
    assert {"openvino", "tensorrt"} <= set(names)
    with pytest.raises(ValueError, match="unknown backend 'nope'; allowed"):
        get_backend("nope")


def test_time_module_times_an_arbitrary_block():
    x = torch.randn(1, 8, 7, 7)
    t = time_module(_block(), x, backend="eager", dtype="fp32", threads=1, rounds=2, iters_per_round=3, warmup=1)
    assert len(t.samples_ms) == 6 and len(t.round_medians) == 2 and t.median_ms > 0


def test_eager_half_precision_casts_weights_once_and_keeps_fp32_io():
    x = torch.randn(2, 8, 7, 7)
    block = _block()
    with torch.no_grad():
        ref = block(x)
    run = prepare("eager", block, x, "bf16", Context(threads=1))
    assert isinstance(run, Prepared) and run.describe()["dtype"] == "bf16"
    out = run.run(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert 0 < _rel_err(out, ref) < 3e-2  # bf16 rounding: not exact, not wrong
    assert run().dtype == torch.float32  # the timed call returns the model's fp32 output too


def test_onnxruntime_fp32_equals_eager_and_int8_is_close(tmp_path):
    pytest.importorskip("onnxruntime")
    x = torch.randn(1, 8, 7, 7)
    block = _block()
    with torch.no_grad():
        ref = block(x)
    ctx = Context(threads=1, workdir=tmp_path, key="blk")
    fp32 = prepare("onnxruntime", block, x, "fp32", ctx)
    assert _rel_err(fp32.run(x), ref) < 1e-5
    assert fp32.artifact is not None and fp32.artifact.exists()
    calib = [torch.randn(1, 8, 7, 7) for _ in range(8)]
    ctx.calibration = calib
    int8 = prepare("onnxruntime", block, x, "int8", ctx)
    err = _rel_err(int8.run(x), ref)
    assert 0 < err < 0.1, err
    info = int8.describe()
    assert "static int8" in info["quantization"] and info["calibration"] == "8 given inputs"
    # The policy kept the first conv in float: one of the two convs is quantized.
    assert info["int8_layers"] == 1 and info["kept_float"] == 1
    import onnx

    ops = [n.op_type for n in onnx.load(str(int8.artifact)).graph.node]
    assert ops.count("QuantizeLinear") >= 1 and ops.count("DequantizeLinear") >= 2


def test_unavailable_paths_raise_a_clear_skip():
    x = torch.randn(1, 8, 7, 7)
    with pytest.raises(BackendUnavailable, match="eager int8: skipped: eager has no int8 path"):
        prepare("eager", _block(), x, "int8")
    trt = get_backend("tensorrt")
    if not torch.cuda.is_available():
        assert trt.unavailable("cpu") == "tensorrt does not run on cpu (runs on: cuda)"
        assert trt.unavailable("cuda") in ("no CUDA device",)
    with pytest.raises(ValueError, match="dtype='int4'"):
        prepare("eager", _block(), x, "int4")


def test_describe_says_what_each_backend_is():
    for name in list_backends():
        d = get_backend(name).describe()
        assert d["backend"] == name and d["dtypes"] and d["devices"]
        assert d["available"] == (d["why_not"] is None)


def test_adding_a_runtime_is_one_class(monkeypatch):
    monkeypatch.setattr(backends, "_REGISTRY", dict(backends._REGISTRY))

    @register_backend
    class Doubled(Backend):
        name = "doubled"
        dtypes = ("fp32",)

        def prepare(self, model, example, dtype="fp32", ctx=None):
            def run(t):
                return model(t) * 2

            return Prepared(self.name, dtype, lambda: run(example), run)

    assert list_backends()[-1] == "doubled"
    x = torch.randn(1, 8, 7, 7)
    block = _block()
    assert torch.allclose(prepare("doubled", block, x, fuse=False).run(x), 2 * block(x))
    # The bench accepts it like any other backend.
    Settings(backends=("eager", "doubled"))
    with pytest.raises(ValueError, match="unknown backend"):
        Settings(backends=("tripled",))
    assert ModelSpec("x").label == "x"


def test_openvino_sets_the_precision_it_was_asked_for(tmp_path):
    pytest.importorskip("openvino")
    from effivit.bench.backends.openvino import cpu_capabilities

    x = torch.randn(1, 8, 7, 7)
    block = _block()
    with torch.no_grad():
        ref = block(x)
    ctx = Context(threads=1, workdir=tmp_path, key="blk", calibration=[torch.randn(1, 8, 7, 7) for _ in range(8)])
    fp32 = prepare("openvino", block, x, "fp32", ctx)
    assert fp32.describe()["inference_precision"] == "f32"
    assert _rel_err(fp32.run(x), ref) < 1e-5
    # Another batch size compiles on first use.
    x3 = torch.randn(3, 8, 7, 7)
    with torch.no_grad():
        assert _rel_err(fp32.run(x3), block(x3)) < 1e-5
    if "BF16" in cpu_capabilities():
        bf16 = prepare("openvino", block, x, "bf16", ctx)
        assert bf16.describe()["inference_precision"] == "bf16"
        assert 0 < _rel_err(bf16.run(x), ref) < 3e-2
    else:
        assert "no bf16 support" in get_backend("openvino").unavailable("cpu", "bf16")
    pytest.importorskip("nncf")
    int8 = prepare("openvino", block, x, "int8", ctx)
    assert int8.artifact.suffix == ".xml" and int8.describe()["int8_layers"] == 1
    assert 0 < _rel_err(int8.run(x), ref) < 0.1
    import gc

    del fp32  # released in creation order: OpenVINO alone leaves this thread on an unmapped signal stack
    gc.collect()
    bf16 = None
    gc.collect()
    del int8
    gc.collect()
    assert _signal_stack_is_mapped(), "OpenVINO left this thread's alternate signal stack pointing at freed memory"


def _signal_stack_is_mapped() -> bool:
    """The current thread's alternate signal stack is disabled or lies inside a mapping of this process."""
    from effivit.deploy.signal_stack import current_stack

    cur = current_stack()
    if cur is None or cur[2] & 2 or not cur[0]:  # unreadable, SS_DISABLE, or none
        return True
    with open("/proc/self/maps", encoding="utf-8") as f:
        spans = [tuple(int(v, 16) for v in line.split()[0].split("-")) for line in f]
    return any(lo <= cur[0] and cur[0] + cur[1] <= hi for lo, hi in spans)


_RELEASE_IN_CREATION_ORDER = """
import gc, os, signal, sys, time
from pathlib import Path
import torch
from torch import nn
from effivit.bench.backends import Context, prepare
torch.manual_seed(0)
block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GELU(), nn.Conv2d(16, 8, 1)).eval()
x = torch.randn(1, 8, 7, 7)
first = prepare("openvino", block, x, "fp32", Context(threads=1, workdir=Path(sys.argv[1]), key="a"))
second = prepare("openvino", block, x, "fp32", Context(threads=2, workdir=Path(sys.argv[1]), key="b"))
first.run(x), second.run(x)
del first
gc.collect()
del second
gc.collect()
try:
    os.kill(os.getpid(), signal.SIGINT)  # Python's handler runs on the alternate signal stack
    time.sleep(1)
except KeyboardInterrupt:
    print("KeyboardInterrupt")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="OpenVINO's signal-stack setup is Linux-only")
def test_openvino_models_released_in_creation_order_leave_signals_working(tmp_path):
    """OpenVINO gives each compiled model its own alternate signal stack and puts the previous one back when
    the model is released; released in creation order, the thread was left on an unmapped stack and the next
    signal (Ctrl-C, a DataLoader's SIGCHLD) killed the process with SIGSEGV."""
    pytest.importorskip("openvino")
    script = tmp_path / "release.py"
    script.write_text(_RELEASE_IN_CREATION_ORDER, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "KeyboardInterrupt" in proc.stdout, \
        f"exit status {proc.returncode} (-11 is SIGSEGV); stderr: {proc.stderr[-2000:]}"
