"""OpenVINO Runtime (CPU plugin): our verified ONNX export read by OpenVINO, at an explicit precision.

The CPU plugin picks bf16 by itself on CPUs that have it (AVX-512-bf16, AMX), so the inference precision is
always set explicitly: ``fp32`` -> ``INFERENCE_PRECISION_HINT=f32``, ``bf16`` -> ``bf16``. ``int8`` is the
model quantized by NNCF (``deploy.quantize(..., target="openvino")``); the layers the policy keeps in float
run in f32. The model is compiled for the example's static shape (``PERFORMANCE_HINT=LATENCY``, one stream),
which is what a deployment with a fixed input does; other shapes compile on first use.

Why the ONNX file rather than ``openvino.convert_model`` on the PyTorch module: both measured the same
(LeViT-128S, EfficientFormer-L1, EfficientViT-B0 in f32 and bf16, paired, within run noise; see
docs/deploy.md), the ONNX file is the one we have verified against PyTorch, and it is the artifact
``effivit export --target openvino`` starts from (one path to maintain).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...deploy.signal_stack import openvino_signal_stack
from . import register_backend
from .base import Backend, Context, Prepared, numpy_input, quiet
from .onnxruntime import onnx_fp32

_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}


def cpu_capabilities() -> list[str]:
    import openvino as ov

    return list(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def compile_config(dtype: str, threads: int | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"INFERENCE_PRECISION_HINT": _HINTS[dtype], "PERFORMANCE_HINT": "LATENCY",
                           "NUM_STREAMS": "1"}
    if threads:
        cfg["INFERENCE_NUM_THREADS"] = int(threads)
    return cfg


@register_backend
class OpenVinoBackend(Backend):
    name = "openvino"
    dtypes = ("fp32", "bf16", "int8")
    devices = ("cpu",)
    package = "openvino"
    install_hint = "pip install 'effivit[openvino]'"

    def unavailable(self, device: str = "cpu", dtype: str | None = None) -> str | None:
        reason = super().unavailable(device, dtype)
        if reason:
            return reason
        if dtype == "bf16" and "BF16" not in cpu_capabilities():
            return "this CPU has no bf16 support in OpenVINO (needs AVX-512-bf16 or AMX)"
        if dtype == "int8":
            from .base import _importable

            if not _importable("nncf"):
                return "nncf is not installed (pip install 'effivit[openvino]')"
        return None

    def prepare(self, model: nn.Module, example: torch.Tensor, dtype: str = "fp32",
                ctx: Context | None = None) -> Prepared:
        ctx = ctx or Context()
        self.check(ctx.device, dtype)
        details: dict[str, Any] = {}
        if dtype == "int8":
            from ...deploy.precision import quantize

            with quiet():
                q = quantize(model, ctx.calibration, target="openvino", example=example[:1].cpu(),
                             path=ctx.path(".int8.xml"), fp32_onnx=onnx_fp32(model, example, ctx))
            path = q.path
            details.update(q.describe())
        else:
            path = onnx_fp32(model, example, ctx)
        return self.load(path, example, dtype, ctx, details)

    def load(self, path: Path, example: torch.Tensor, dtype: str, ctx: Context,
             details: dict[str, Any] | None = None) -> Prepared:
        import openvino as ov

        core = ov.Core()
        source = core.read_model(str(path))
        config = compile_config(dtype, ctx.threads)
        compiled: dict[tuple[int, ...], Any] = {}

        def request(shape: tuple[int, ...]):
            if shape not in compiled:
                m = source.clone()
                m.reshape({m.inputs[0].get_any_name(): ov.PartialShape(list(shape))})
                with openvino_signal_stack():  # models released in any order leave a valid signal stack
                    cm = core.compile_model(m, "CPU", config)
                compiled[shape] = (cm, cm.create_infer_request())
            return compiled[shape][1]

        x = numpy_input(example)
        req = request(tuple(x.shape))

        def fn() -> Any:
            return req.infer({0: x}, share_inputs=True)

        def run(t: torch.Tensor) -> torch.Tensor:
            arr = numpy_input(t)
            out = request(tuple(arr.shape)).infer({0: arr})
            return torch.from_numpy(next(iter(out.values())).copy()).float()

        cm = compiled[tuple(x.shape)][0]
        info = {"runtime": f"openvino {ov.get_version().split('-')[0]}",
                "inference_precision": cm.get_property("INFERENCE_PRECISION_HINT").to_string(), **(details or {})}
        return Prepared(self.name, dtype, fn, run, info, artifact=Path(path))
