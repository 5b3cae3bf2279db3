"""TensorRT (NVIDIA GPUs): an engine built from our verified ONNX export, fp16 or fp32.

Runs only where a CUDA device and the ``tensorrt`` package are present; anywhere else it is reported as
skipped ("no CUDA device" / "tensorrt is not installed"), never a crash. Input and output live in torch CUDA
tensors (no host copies inside the timed call); the engine is built for the example's static shape.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import register_backend
from .base import Backend, BackendUnavailable, Context, Prepared, quiet


@register_backend
class TensorRtBackend(Backend):
    name = "tensorrt"
    dtypes = ("fp16", "fp32")
    devices = ("cuda",)
    package = "tensorrt"
    install_hint = "pip install tensorrt (NVIDIA GPUs only)"

    def prepare(self, model: nn.Module, example: torch.Tensor, dtype: str = "fp16",
                ctx: Context | None = None) -> Prepared:
        ctx = ctx or Context(device="cuda")
        self.check(ctx.device, dtype)
        from ...deploy.formats import export_onnx

        with quiet():
            onnx_path = ctx.cached("onnx:static", lambda: export_onnx(
                model.cpu().eval(), ctx.path(".static.onnx"), example=example.cpu(), dynamic_batch=False))
        engine = build_engine(Path(onnx_path), dtype)
        return bind_engine(engine, example, dtype, self.name)


def build_engine(onnx_path: Path, dtype: str) -> Any:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BackendUnavailable(f"tensorrt could not parse the ONNX graph: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 4 << 30)
    if dtype == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("tensorrt failed to build an engine (see its log above)")
    return trt.Runtime(logger).deserialize_cuda_engine(serialized)


def bind_engine(engine: Any, example: torch.Tensor, dtype: str, name: str) -> Prepared:
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    import tensorrt as trt

    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if n not in inputs]
    x = example.to("cuda", torch.float32).contiguous()
    out = torch.empty(tuple(engine.get_tensor_shape(outputs[0])), device="cuda", dtype=torch.float32)
    context.set_tensor_address(inputs[0], x.data_ptr())
    context.set_tensor_address(outputs[0], out.data_ptr())
    stream = torch.cuda.Stream()

    def fn() -> Any:
        context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
        return out

    def run(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"this engine was built for input {tuple(x.shape)}, got {tuple(t.shape)}")
        x.copy_(t.to("cuda"))
        fn()
        return out.float().cpu().clone()

    return Prepared(name, dtype, fn, run, {"runtime": f"tensorrt {trt.__version__}"})
