"""One artifact format each, verified against the eager model it came from: ONNX (checked with onnx, run
with ONNX Runtime) and TorchScript. :func:`effivit.deploy.export.export` combines these with a precision
(:mod:`effivit.deploy.precision`) and OpenVINO into one verified entry point.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn


class ExportError(RuntimeError):
    """An export failed or does not reproduce the PyTorch model."""


def _img_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(img_size, int):
        return img_size, img_size
    size = tuple(int(s) for s in img_size)
    if len(size) != 2:
        raise ValueError(f"img_size must be an int or (H, W), got {img_size!r}")
    return size  # type: ignore[return-value]


def _in_chans(model: nn.Module) -> int:
    inner = getattr(model, "model", model)
    return int(getattr(inner, "in_chans", 3))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check_close(name: str, ref: torch.Tensor, got: torch.Tensor, atol: float, rtol: float) -> float:
    if tuple(ref.shape) != tuple(got.shape):
        raise ExportError(f"{name} output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}")
    diff = _max_diff(ref, got)
    tol = atol + rtol * float(ref.abs().max())
    if not diff <= tol:
        raise ExportError(f"{name} output differs from PyTorch by {diff:.3g} (allowed {tol:.3g})")
    return diff


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | Sequence[int] = 224,
    dynamic_batch: bool = True,
    opset: int = 18,
    exporter: str = "dynamo",
    verify: bool = True,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    example: torch.Tensor | None = None,
) -> Path:
    """Export ``model`` (eval mode, usually fused first) to ONNX at ``img_size``, check the graph with
    onnx and verify ONNX Runtime's outputs against PyTorch's (at batch 1 and, with a dynamic batch, 3).

    exporter: ``"dynamo"`` (torch.export based) or ``"torchscript"`` (the tracing exporter); if the
    dynamo exporter fails the tracing exporter is tried with a warning.
    example: an input of the exported shape (its first dim is the batch) for models that do not take
    images (a block, a layer); ``img_size`` is then ignored.
    """
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r} is not supported; allowed: 'dynamo', 'torchscript'")
    try:
        import onnx
    except ImportError as e:
        raise ExportError("ONNX export needs the onnx package: pip install 'effivit[onnx]'") from e
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = _input_shape(model, img_size, example)
    model = model.eval()
    x = torch.randn(2 if dynamic_batch else 1, *shape)
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000

    def _dynamo() -> None:
        shapes = ({0: torch.export.Dim("batch", min=1, max=1024)},) if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            prog = torch.onnx.export(
                model, (x,), None, dynamo=True, input_names=["input"], output_names=["output"],
                dynamic_shapes=shapes, opset_version=opset, optimize=True,
            )
        prog.save(str(path), external_data=big)

    def _tracing() -> None:
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model, (x,), str(path), dynamo=False, input_names=["input"], output_names=["output"],
                dynamic_axes=axes, opset_version=min(opset, 17), do_constant_folding=True,
            )

    with torch.no_grad():
        if exporter == "dynamo":
            try:
                _dynamo()
            except Exception as e:  # the tracing exporter covers graphs torch.export cannot capture
                warnings.warn(f"dynamo ONNX export failed ({type(e).__name__}: {e}); using the tracing exporter",
                              stacklevel=2)
                _tracing()
        else:
            _tracing()
    try:
        onnx.checker.check_model(str(path))
    except Exception as e:
        raise ExportError(f"the exported graph at {path} fails onnx's checker: {e}") from e
    if verify:
        verify_onnx(model, path, shape, batch_sizes=(1, 3) if dynamic_batch else (1,), atol=atol, rtol=rtol)
    return path


def _input_shape(model: nn.Module, img_size: int | Sequence[int], example: torch.Tensor | None) -> tuple[int, ...]:
    """The input shape without the batch dim: ``example``'s, else (in_chans, H, W)."""
    if example is not None:
        if example.dim() < 2:
            raise ValueError(f"example must have a batch dim and at least one more, got shape {tuple(example.shape)}")
        return tuple(example.shape[1:])
    return (_in_chans(model), *_img_hw(img_size))


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with all graph optimisations on."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError("running ONNX models needs onnxruntime: pip install 'effivit[onnx]'") from e
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def verify_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: Sequence[int],
    batch_sizes: Sequence[int] = (1,),
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> float:
    """Max abs difference between ONNX Runtime and PyTorch on random inputs; raises if out of tolerance.

    img_size: (H, W) of an image model, or the whole input shape without the batch dim.
    """
    sess = onnx_session(path)
    name = sess.get_inputs()[0].name
    shape = tuple(img_size) if len(img_size) != 2 else (_in_chans(model), *img_size)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, *shape)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(sess.run(None, {name: x.numpy()})[0])
        worst = max(worst, _check_close(f"ONNX Runtime (batch {b})", ref, got, atol, rtol))
    return worst


def export_torchscript(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int | Sequence[int] = 224,
    verify: bool = True,
    atol: float = 1e-5,
    rtol: float = 1e-5,
) -> Path:
    """``torch.jit.script`` the model, save it, load it back and verify it against the eager model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    try:
        scripted = torch.jit.script(model)
    except Exception as e:
        raise ExportError(f"torch.jit.script failed for {type(model).__name__}: {e}") from e
    scripted.save(str(path))
    if verify:
        loaded = torch.jit.load(str(path), map_location="cpu")
        h, w = _img_hw(img_size)
        x = torch.randn(2, _in_chans(model), h, w)
        with torch.no_grad():
            _check_close("TorchScript", model(x), loaded(x), atol, rtol)
    return path
