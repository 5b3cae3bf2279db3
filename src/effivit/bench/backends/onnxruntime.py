"""ONNX Runtime: our verified fp32 ONNX export, or its int8 form (static QDQ, per-channel weights).

CPU sessions use every graph optimisation (``ORT_ENABLE_ALL``); int8 comes from
``deploy.quantize(..., target="onnxruntime")``, calibrated on ``Context.calibration``. On CUDA the fp32
graph runs on the CUDA execution provider when ``onnxruntime-gpu`` is installed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import register_backend
from .base import Backend, BackendUnavailable, Context, Prepared, numpy_input, quiet


def onnx_fp32(model: nn.Module, example: torch.Tensor, ctx: Context) -> Path:
    """The verified fp32 ONNX export of ``model`` at ``example``'s size, written once per context."""
    from ...deploy.formats import export_onnx

    def make() -> Path:
        with quiet():
            return export_onnx(model, ctx.path(".fp32.onnx"), example=example[:1].cpu(), dynamic_batch=True)

    return ctx.cached("onnx:fp32", make)


def session(path: Path, ctx: Context):
    import onnxruntime as ort

    from ...deploy.formats import onnx_session

    if ctx.device == "cpu":
        return onnx_session(path, threads=ctx.threads)
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise BackendUnavailable("onnxruntime: skipped: no CUDAExecutionProvider here (install onnxruntime-gpu)")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CUDAExecutionProvider"])


def bind_session(sess: Any, example: torch.Tensor):
    name = sess.get_inputs()[0].name
    feed = {name: numpy_input(example)}

    def fn() -> Any:
        return sess.run(None, feed)

    def run(t: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: numpy_input(t)})[0]).float()

    return fn, run


@register_backend
class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    dtypes = ("fp32", "int8")
    devices = ("cpu", "cuda")
    package = "onnxruntime"
    install_hint = "pip install 'effivit[onnx]'"

    def unavailable(self, device: str = "cpu", dtype: str | None = None) -> str | None:
        if device == "cuda" and dtype == "int8":
            return "onnxruntime int8 is measured on CPU only"
        return super().unavailable(device, dtype)

    def prepare(self, model: nn.Module, example: torch.Tensor, dtype: str = "fp32",
                ctx: Context | None = None) -> Prepared:
        import onnxruntime as ort

        ctx = ctx or Context()
        self.check(ctx.device, dtype)
        details: dict[str, Any] = {"runtime": f"onnxruntime {ort.__version__}"}
        if dtype == "fp32":
            path = onnx_fp32(model, example, ctx)
        else:
            from ...deploy.precision import quantize

            with quiet():
                q = quantize(model, ctx.calibration, target="onnxruntime", example=example[:1].cpu(),
                             path=ctx.path(".int8.onnx"), fp32_onnx=onnx_fp32(model, example, ctx))
            path = q.path
            details.update(q.describe())
        return self.load(path, example, dtype, ctx, details)

    def load(self, path: Path, example: torch.Tensor, dtype: str, ctx: Context,
             details: dict[str, Any] | None = None) -> Prepared:
        """A session on an existing artifact (the memory probe measures one in a fresh process)."""
        import onnxruntime as ort

        fn, run = bind_session(session(Path(path), ctx), example)
        details = details or {"runtime": f"onnxruntime {ort.__version__}"}
        return Prepared(self.name, dtype, fn, run, details, artifact=Path(path))
