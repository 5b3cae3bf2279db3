"""Export with verification: ONNX (checked with onnx, run with ONNX Runtime), OpenVINO IR and TorchScript,
at fp32, half precision or int8 (:func:`export`, behind ``effivit export``).

Every export is compared with the fused PyTorch fp32 model before it is returned, with a tolerance declared
per precision (:data:`TOLERANCE`); a mismatch raises :class:`ExportError` with the measured difference.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .formats import (
    ExportError,
    _img_hw,
    _in_chans,
    export_onnx,
    export_torchscript,
    onnx_session,
)
from .precision import _batches, quantize, to_dtype
from .signal_stack import openvino_signal_stack

# --- one entry point for every target and precision -------------------------------------------------------------

TARGETS = {
    "onnx": ("fp32", "int8"),
    "openvino": ("fp32", "bf16", "fp16", "int8"),
    "torchscript": ("fp32", "bf16", "fp16"),
}
# Allowed max |artifact logit - fp32 PyTorch logit| / max |fp32 PyTorch logit| on the verification inputs.
# fp32 is exact up to kernel rounding; bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op,
# accumulated over depth); int8 is a different, calibrated function, so its check is that the logits still
# track fp32's (the accuracy study on real data measures the rest). Top-1 must also agree with fp32 on every
# *decisive* input: one whose fp32 top-1 leads the runner-up by more than twice the allowed error (a random
# head's near-ties may flip legitimately; a clear decision may not).
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "bf16": 6e-2, "int8": 0.35}


class ExportResult(dict):
    """What :func:`export` wrote and how it was checked (a dict: path, target, precision, check, ...)."""

    def summary(self) -> str:
        return (f"wrote {self['path']} ({self['target']}, {self['precision']}, {self['form']}); verified against "
                f"the fused PyTorch fp32 model on {self['check_inputs']}: max |logit error| "
                f"{self['max_rel_err']:.2e} of max |logit| (allowed {self['tolerance']:.0e}), same top-1 on "
                f"{self['decisive_agree']}/{self['decisive']} decisive inputs ({self['agree']}/{self['n']} in all)"
                + (f"; int8 calibrated on {self['calibration']}" if self.get("calibration") else ""))


def export(
    model: nn.Module,
    out: str | os.PathLike,
    target: str = "onnx",
    precision: str = "fp32",
    img_size: int | Sequence[int] = 224,
    calibration=None,
    dynamic_batch: bool = True,
    verify_inputs: Sequence[torch.Tensor] | None = None,
    **onnx_kwargs,
) -> ExportResult:
    """Write ``model`` (fused, eval) as ``target`` at ``precision`` and verify it against the fp32 model.

    target/precision: onnx (fp32, int8 QDQ), openvino (IR .xml/.bin: fp32, bf16 and fp16 set as the
    model's inference precision, int8 by NNCF), torchscript (fp32, or bf16/fp16 weights via
    ``deploy.to_dtype``). calibration: int8's images (see ``deploy.quantize``); the verification uses them
    too when given (real images), otherwise random inputs.
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; allowed: {list(TARGETS)}")
    if precision not in TARGETS[target]:
        raise ValueError(f"{target} export offers precisions {list(TARGETS[target])}, not {precision!r}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    h, w = _img_hw(img_size)
    example = torch.randn(1, _in_chans(model), h, w, generator=torch.Generator().manual_seed(0))
    calib_desc = ""
    calib_batches = None
    if precision == "int8" or calibration is not None:

        if calibration is not None:
            calib_batches, calib_desc = _batches(calibration, model, example, 64)
    if verify_inputs is None:
        if calib_batches:
            verify_inputs = calib_batches[:16]
            check_inputs = f"{len(verify_inputs)} calibration images"
        else:
            gen = torch.Generator().manual_seed(1)
            verify_inputs = [torch.randn(1, *example.shape[1:], generator=gen) for _ in range(8)]
            check_inputs = "8 random-normal inputs"
    else:
        check_inputs = f"{len(verify_inputs)} given inputs"
    form = ""
    if target == "onnx":
        if precision == "fp32":
            with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
                path = export_onnx(model, out, img_size=(h, w), dynamic_batch=dynamic_batch, **onnx_kwargs)
            form = "dynamic batch" if dynamic_batch else "batch 1"
        else:

            with contextlib.redirect_stdout(io.StringIO()):
                q = quantize(model, calib_batches, target="onnxruntime", example=example, path=out)
            path, form = q.path, f"QDQ, {q.quantized_layers} int8 layers, {len(q.kept_float)} kept float"
            calib_desc = calib_desc or q.calibration
        runner = _onnx_runner(path)
    elif target == "openvino":
        with contextlib.redirect_stdout(io.StringIO()):
            path, form, runner, q_desc = _export_openvino(model, out, precision, example, calib_batches)
        calib_desc = calib_desc or q_desc
    else:
        src = model
        if precision != "fp32":

            src = to_dtype(model, torch.bfloat16 if precision == "bf16" else torch.float16)
        path = export_torchscript(src, out, img_size=(h, w), verify=False)
        loaded = torch.jit.load(str(path), map_location="cpu")
        form = "torch.jit.script"

        def runner(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return loaded(x).float()

    tol = TOLERANCE[precision]
    stats = _compare(model, runner, verify_inputs, tol)
    result = ExportResult(path=str(path), target=target, precision=precision, form=form, check_inputs=check_inputs,
                          tolerance=tol, calibration=calib_desc if precision == "int8" else "", **stats)
    if not (stats["max_rel_err"] <= tol and stats["decisive_agree"] == stats["decisive"]):
        raise ExportError(f"the {target} {precision} export at {path} does not reproduce the fp32 model: "
                          f"max |logit error| {stats['max_rel_err']:.3g} of max |logit| (allowed {tol:g}), same "
                          f"top-1 on {stats['decisive_agree']} of {stats['decisive']} decisive inputs")
    return result


def _compare(model: nn.Module, runner, inputs: Sequence[torch.Tensor], tol: float) -> dict[str, float | int]:
    """Worst relative logit error, and top-1 agreement in all and on decisive inputs (see TOLERANCE)."""
    worst, agree, n, decisive, decisive_agree = 0.0, 0, 0, 0, 0
    for x in inputs:
        with torch.no_grad():
            ref = model(x).float()
        got = runner(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise ExportError(f"export output shape {tuple(got.shape)} differs from PyTorch's {tuple(ref.shape)}")
        scale = ref.abs().max().clamp_min(1e-12)
        worst = max(worst, float((got - ref).abs().max() / scale))
        if ref.dim() == 2 and ref.shape[-1] > 1:
            same = got.argmax(-1) == ref.argmax(-1)
            top2 = ref.topk(2, dim=-1).values
            clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * scale
            agree += int(same.sum())
            n += ref.shape[0]
            decisive += int(clear.sum())
            decisive_agree += int((same & clear).sum())
    return {"max_rel_err": worst, "agree": agree, "n": n, "decisive": decisive, "decisive_agree": decisive_agree}


def _onnx_runner(path: Path):
    sess = onnx_session(path)
    name = sess.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(sess.run(None, {name: x.numpy()})[0]).float()

    return run


def _export_openvino(model: nn.Module, out: Path, precision: str, example: torch.Tensor, calib):
    try:
        import openvino as ov
    except ImportError as e:
        raise ExportError("OpenVINO export needs openvino: pip install 'effivit[openvino]'") from e
    xml = out.with_suffix(".xml")
    fp32_onnx = export_onnx(model, xml.with_name(xml.stem + ".fp32.onnx"), example=example, dynamic_batch=True)
    q_desc = ""
    if precision == "int8":

        q = quantize(model, calib, target="openvino", example=example, path=xml, fp32_onnx=fp32_onnx)
        ov_model = None  # NNCF already saved the IR at xml (re-saving a memory-mapped IR over itself crashes)
        form = f"IR, NNCF int8: {q.quantized_layers} int8 layers, {len(q.kept_float)} kept float"
        q_desc = q.calibration
        hint = "f32"
    else:
        ov_model = ov.Core().read_model(str(fp32_onnx))
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[precision]
        form = f"IR, inference precision {hint}"
    # An IR does not carry the inference precision (the CPU plugin would pick bf16 by itself where the CPU has
    # it): the compile properties are written beside it and must be passed to compile_model.
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if ov_model is not None:
        ov.save_model(ov_model, str(xml), compress_to_fp16=precision == "fp16")
    config_path = xml.with_suffix(".config.json")
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    Path(fp32_onnx).unlink(missing_ok=True)
    core = ov.Core()
    with openvino_signal_stack():
        compiled = core.compile_model(core.read_model(str(xml)), "CPU", config)
    got_hint = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if got_hint != hint:
        raise ExportError(f"OpenVINO compiled the IR at {got_hint}, not {hint}: this CPU does not offer {precision}")
    form += f"; compile with {config_path.name}"

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(next(iter(compiled(x.numpy()).values())).copy()).float()

    return xml, form, run, q_desc
