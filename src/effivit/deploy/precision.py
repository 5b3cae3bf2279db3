"""Lower precision for deployment: half-precision weights (:func:`to_dtype`) and post-training int8
(:func:`quantize`) on well-kept stacks (ONNX Runtime's static quantizer, OpenVINO's NNCF), not our kernels.

Half precision. ``to_dtype(model, torch.bfloat16)`` casts the weights once (autocast would cast them on
every call) and wraps the model so it takes and returns fp32 tensors. Statistics stay in fp32 where that is
needed for correct results: normalisation layers (LayerNorm, GroupNorm, BatchNorm) keep fp32 parameters
and PyTorch's mixed-type kernels compute their mean and variance in fp32; softmax (in eager attention and in
``scaled_dot_product_attention``) accumulates its max and sum in fp32 for bf16/fp16 inputs on CPU and
CUDA; layers whose statistics are computed by Python arithmetic (:func:`fp32_modules`: ConvNeXt-V2's
GlobalResponseNorm) run in fp32 inside the half model.

int8. Static post-training quantization with a calibration set: per-channel symmetric int8 weights,
per-tensor uint8 activations (the u8 x s8 form that VNNI's ``vpdpbusd`` computes), inserted as QDQ pairs
that the runtime fuses into integer kernels. Only the inputs of convolutions and linear layers are
quantized; a declared policy (:class:`QuantPolicy`, per family in :data:`FAMILY_POLICIES`) keeps fragile
parts in float, and everything that is not a conv/linear (softmax and its statistics, normalisation, XCA's
l2 normalisation, attention-bias tables, residual additions, GELU) is never quantized. Which runtime's
int8 is faster is measured per target (``effivit bench --dtype int8``), never assumed: without VNNI int8
can lose to bf16 or fp32.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .formats import _img_hw, _in_chans, export_onnx
from .signal_stack import openvino_signal_stack

HALF_DTYPES = (torch.bfloat16, torch.float16)
TARGETS = ("onnxruntime", "openvino")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


# --- half precision -------------------------------------------------------------------------------------------


def fp32_modules() -> tuple[type[nn.Module], ...]:
    """Layers whose statistics are plain tensor arithmetic (no fp32-accumulating kernel): run in fp32."""
    from ..layers.norm import GlobalResponseNorm

    return (GlobalResponseNorm,)

# Normalisation layers whose kernels take half inputs with fp32 parameters and compute statistics in fp32.
MIXED_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


class Float32Island(nn.Module):
    """Runs ``module`` in fp32 inside a half-precision model (input cast up, output cast back)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.float()).to(x.dtype)


class HalfPrecisionModel(nn.Module):
    """A model whose weights are ``dtype`` (bf16 or fp16) that takes and returns fp32 tensors."""

    __jit_unused_properties__ = ["pretrained_cfg"]

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype_name = str(dtype).replace("torch.", "")
        self.half_dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.half_dtype)).float()

    @property
    def pretrained_cfg(self) -> dict[str, Any]:
        return getattr(self.model, "pretrained_cfg", {})

    def extra_repr(self) -> str:
        return f"dtype={self.dtype_name}"


def to_dtype(model: nn.Module, dtype: torch.dtype) -> HalfPrecisionModel:
    """A copy of ``model`` (usually fused) with half-precision weights, fp32 in and out.

    dtype: ``torch.bfloat16`` or ``torch.float16``. Normalisation layers keep fp32 parameters (their kernels
    compute mean/variance in fp32 from half inputs); softmax statistics are accumulated in fp32 by PyTorch's
    kernels; the layers in ``fp32_modules()`` run in fp32. fp16 is for GPUs (on CPU it is slow, and values
    beyond 65504 overflow); bf16 keeps fp32's range. Raises ``ValueError`` for any other dtype.
    """
    if dtype not in HALF_DTYPES:
        raise ValueError(f"to_dtype takes torch.bfloat16 or torch.float16, got {dtype}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"to_dtype expects an nn.Module, got {type(model).__name__}")
    inner = copy.deepcopy(model.model if isinstance(model, HalfPrecisionModel) else model).eval()
    islands = fp32_modules()
    _wrap_islands(inner, islands)
    inner = inner.to(dtype)
    for m in inner.modules():
        if isinstance(m, Float32Island) or isinstance(m, MIXED_NORMS):
            m.float()
    return HalfPrecisionModel(inner, dtype).eval()


def _wrap_islands(module: nn.Module, kinds: tuple[type[nn.Module], ...]) -> None:
    for name, child in list(module.named_children()):
        if isinstance(child, kinds):
            setattr(module, name, Float32Island(child))
        else:
            _wrap_islands(child, kinds)


# --- calibration data -----------------------------------------------------------------------------------------


def _transform_cfg(model_or_name: nn.Module | str | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    if isinstance(model_or_name, str):
        from ..registry import get_entry

        cfg = get_entry(model_or_name.partition(".")[0]).pretrained_cfg()
    elif model_or_name is not None:
        cfg = dict(getattr(model_or_name, "pretrained_cfg", {}) or {})
    return {"mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
            "crop_pct": float(cfg.get("crop_pct", 0.875) or 0.875)}


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files under ``folder`` (recursively, sorted). ``ValueError`` when it is not a folder or holds none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"calibration folder {str(root)!r} does not exist or is not a folder")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"calibration folder {str(root)!r} holds no images (looked recursively for "
                         f"{', '.join(IMAGE_SUFFIXES)})")
    return files


def load_image(path: str | os.PathLike, img_size: int | tuple[int, int], cfg: dict[str, Any],
               crop_pct: float | None = None) -> torch.Tensor:
    """One image as a normalised (1, 3, H, W) fp32 tensor: shorter side to size / crop_pct, centre crop."""
    from PIL import Image

    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    crop = cfg["crop_pct"] if crop_pct is None else crop_pct
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(h, w) / crop / min(im.size)
        im = im.resize((max(w, round(im.size[0] * scale)), max(h, round(im.size[1] * scale))), Image.BICUBIC)
        left, top = (im.size[0] - w) // 2, (im.size[1] - h) // 2
        im = im.crop((left, top, left + w, top + h))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(h, w, 3)
    x = data.permute(2, 0, 1).float().div_(255.0)
    mean = torch.tensor(cfg["mean"]).reshape(3, 1, 1)
    std = torch.tensor(cfg["std"]).reshape(3, 1, 1)
    return ((x - mean) / std).unsqueeze(0)


def calibration_from_folder(folder: str | os.PathLike, model: nn.Module | str | None, img_size: int | tuple[int, int],
                            max_images: int = 64, crop_pct: float | None = None) -> list[torch.Tensor]:
    """Up to ``max_images`` images of ``folder`` (spread evenly over its sorted files, so every class
    sub-folder contributes), preprocessed with ``model``'s mean/std, as (1, 3, H, W) tensors."""
    files = list_images(folder)
    if max_images and len(files) > max_images:
        step = len(files) / max_images
        files = [files[int(i * step)] for i in range(max_images)]
    cfg = _transform_cfg(model)
    return [load_image(f, img_size, cfg, crop_pct) for f in files]


def synthetic_calibration(example: torch.Tensor, n: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """``n`` random-normal inputs shaped like ``example`` (batch 1): a stand-in when no images are given;
    the latency of the result is representative, its accuracy is unknown."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, *example.shape[1:], generator=gen) for _ in range(n)]


def _batches(calibration: Any, model: nn.Module, example: torch.Tensor, max_images: int) -> tuple[list[torch.Tensor], str]:
    """Calibration inputs as a list of (1, ...) fp32 tensors and a description of where they came from."""
    if calibration is None:
        batches = synthetic_calibration(example)
        return batches, f"synthetic: {len(batches)} random-normal inputs (accuracy unknown)"
    if isinstance(calibration, (str, os.PathLike)):
        size = tuple(example.shape[-2:])
        batches = calibration_from_folder(calibration, model, size, max_images=max_images)
        return batches, f"{len(batches)} images from {calibration}"
    out: list[torch.Tensor] = []
    for item in calibration:  # a DataLoader yields (images, labels); an iterable may yield tensors
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batches must be tensors or (tensor, label) pairs, got {type(x).__name__}")
        x = x.float()
        if x.dim() == example.dim() - 1:
            x = x.unsqueeze(0)
        out += [t.unsqueeze(0) for t in x]
        if len(out) >= max_images:
            break
    if not out:
        raise ValueError("the calibration set is empty (no batches)")
    return out[:max_images], f"{len(out[:max_images])} given inputs"


# --- int8 policy ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantPolicy:
    """Which conv/linear layers stay in float when a model is quantized (everything that is not a conv or a
    linear layer always does).

    keep_first_conv: the stem's first conv (it reads the raw image; few MACs, much error).
    keep_classifier: the last linear layer (its errors are the logits' errors).
    keep_attention_matmuls: matmuls of two activations (q k^T, attention x v): their inputs are softmax
        outputs and queries/keys with outliers.
    keep_after: ONNX op types whose outputs are not quantized where they feed a conv/linear (e.g.
        ``LayerNormalization`` and ``Gelu``: the activation outliers that make all-int8 ViTs collapse).
    calibrate: ``minmax`` or ``percentile`` (99.999th, clips rare outliers) activation ranges.
    """

    keep_first_conv: bool = True
    keep_classifier: bool = True
    keep_attention_matmuls: bool = True
    keep_after: tuple[str, ...] = ()
    calibrate: str = "minmax"
    why: str = "default"

    def __post_init__(self) -> None:
        if self.calibrate not in ("minmax", "percentile"):
            raise ValueError(f"calibrate={self.calibrate!r}; allowed: 'minmax', 'percentile'")


# Per family: the default unless the digits study showed a family needs more kept in float.
FAMILY_POLICIES: dict[str, QuantPolicy] = {}
DEFAULT_POLICY = QuantPolicy()


def policy_for(model: nn.Module | str | None) -> QuantPolicy:
    """The declared int8 policy of ``model``'s family (a model, a model name or a family name)."""
    family = None
    if isinstance(model, str):
        family = model
        with contextlib.suppress(Exception):
            from ..registry import get_entry

            family = get_entry(model.partition(".")[0]).family
    elif model is not None:
        inner = getattr(model, "model", model)
        family = (getattr(inner, "pretrained_cfg", {}) or {}).get("family")
    return FAMILY_POLICIES.get(family or "", DEFAULT_POLICY)


@dataclass
class QuantizedModel:
    """An int8 artifact: ``path`` (QDQ ONNX for onnxruntime, OpenVINO IR .xml for openvino)."""

    path: Path
    target: str
    policy: QuantPolicy
    kept_float: list[str] = field(default_factory=list)
    quantized_layers: int = 0
    calibration: str = ""

    def describe(self) -> dict[str, Any]:
        return {"quantization": f"static int8 ({'ONNX Runtime QDQ' if self.target == 'onnxruntime' else 'NNCF'}, "
                                f"per-channel weights, {self.policy.calibrate} ranges)",
                "int8_layers": self.quantized_layers, "kept_float": len(self.kept_float),
                "calibration": self.calibration, "policy": self.policy.why}


def _onnx_roles(graph, policy: QuantPolicy) -> tuple[list[str], list[str]]:
    """(names of weight conv/linear nodes to quantize, names kept in float) on an ONNX graph."""
    inits = {i.name for i in graph.initializer}
    consts = set(inits)
    producer: dict[str, Any] = {}
    for node in graph.node:
        if node.op_type == "Constant":
            consts.update(node.output)
        for o in node.output:
            producer[o] = node
    # Constant subgraphs (e.g. a transposed weight) count as constants.
    for node in graph.node:
        if node.op_type in ("Transpose", "Reshape", "Cast", "Identity") and node.input and node.input[0] in consts:
            consts.update(node.output)
    weight_ops = [n for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")
                  and any(i in consts for i in n.input[1:2])]
    act_matmuls = [n for n in graph.node if n.op_type == "MatMul" and not any(i in consts for i in n.input[:2])]
    keep: list[str] = []
    if policy.keep_first_conv:
        keep += [n.name for n in weight_ops if n.op_type == "Conv"][:1]
    if policy.keep_classifier:
        keep += [n.name for n in weight_ops if n.op_type in ("Gemm", "MatMul")][-1:]
    if policy.keep_attention_matmuls:
        keep += [n.name for n in act_matmuls]
    if policy.keep_after:
        for n in weight_ops:
            src = producer.get(n.input[0])
            # Look through layout ops between the norm/activation and the layer.
            while src is not None and src.op_type in ("Transpose", "Reshape", "Flatten") and src.input:
                src = producer.get(src.input[0])
            if src is not None and src.op_type in policy.keep_after:
                keep.append(n.name)
    keep = list(dict.fromkeys(keep))
    quant = [n.name for n in weight_ops if n.name not in keep]
    return quant, keep


def _ensure_node_names(model_proto) -> None:
    for i, node in enumerate(model_proto.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"


def quantize(
    model: nn.Module,
    calibration: Any = None,
    target: str = "onnxruntime",
    *,
    example: torch.Tensor | None = None,
    img_size: int | Sequence[int] = 224,
    path: str | os.PathLike | None = None,
    policy: QuantPolicy | None = None,
    fp32_onnx: str | os.PathLike | None = None,
    max_images: int = 64,
) -> QuantizedModel:
    """Post-training static int8 of ``model`` (fused fp32, eval) for ``target``; returns the artifact.

    calibration: a folder of images (sub-folders allowed; preprocessed with the model's mean/std), a
        DataLoader yielding (images, labels), an iterable of NCHW tensors, or None for a small synthetic
        set (then the accuracy of the result is unknown). A folder without images is a ``ValueError``.
    target: ``"onnxruntime"`` (ONNX Runtime ``quantize_static``, QDQ format, written to ``path`` .onnx)
        or ``"openvino"`` (NNCF on the OpenVINO model, written as IR ``path`` .xml/.bin).
    policy: which layers stay float (default: the family's entry in :data:`FAMILY_POLICIES`).
    fp32_onnx: an already verified fp32 export of ``model`` to start from (else one is made next to ``path``).
    """
    if target not in TARGETS:
        raise ValueError(f"target={target!r}; allowed: {list(TARGETS)}")

    if example is None:
        example = torch.zeros(1, _in_chans(model), *_img_hw(img_size))
    policy = policy or policy_for(model)
    batches, source = _batches(calibration, model, example, max_images)
    suffix = ".int8.onnx" if target == "onnxruntime" else ".int8.xml"
    if path is None:
        import tempfile

        path = Path(tempfile.mkdtemp(prefix="effivit-int8-")) / f"model{suffix}"
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fp32_onnx is None:
        fp32_onnx = export_onnx(model.eval(), path.with_name(path.stem.replace(".int8", "") + ".fp32.onnx"),
                                example=example[:1], dynamic_batch=True)
    if target == "onnxruntime":
        return _quantize_ort(Path(fp32_onnx), path, batches, policy, source)
    return _quantize_nncf(Path(fp32_onnx), path, batches, policy, source)


def _quantize_ort(src: Path, dst: Path, batches: list[torch.Tensor], policy: QuantPolicy,
                  source: str) -> QuantizedModel:
    try:
        import onnx
        from onnxruntime.quantization import (
            CalibrationDataReader,
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
    except ImportError as e:
        raise RuntimeError("int8 for onnxruntime needs onnx and onnxruntime: pip install 'effivit[onnx]'") from e
    proto = onnx.load(str(src))
    _ensure_node_names(proto)
    named = dst.with_name(dst.stem + ".named.onnx")
    onnx.save(proto, str(named))
    quant, keep = _onnx_roles(proto.graph, policy)
    input_name = proto.graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(batches)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {input_name: x.numpy()}

    method = CalibrationMethod.Percentile if policy.calibrate == "percentile" else CalibrationMethod.MinMax
    extra = {"WeightSymmetric": True, "ActivationSymmetric": False}
    if policy.calibrate == "percentile":
        extra["CalibPercentile"] = 99.999
    with _quiet_logs("root"):  # the quantizer logs advice on the root logger
        quantize_static(str(named), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], nodes_to_exclude=keep,
                        calibrate_method=method, extra_options=extra)
    named.unlink(missing_ok=True)
    return QuantizedModel(dst, "onnxruntime", policy, keep, len(quant), source)


def _ov_is_const(node) -> bool:
    # Weights read from ONNX are Constant ops, possibly behind a Convert (compressed) or a Transpose.
    while node.get_type_name() in ("Convert", "Transpose", "Reshape", "FakeConvert"):
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant"


def _ov_roles(ov_model, policy: QuantPolicy) -> tuple[list[str], list[str], bool]:
    """(weight layers, names kept float, has attention) on an OpenVINO model."""
    ops = ov_model.get_ordered_ops()
    weight = [op for op in ops if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")
              and _ov_is_const(op.input_value(1).get_node())]
    act = [op for op in ops if op.get_type_name() == "MatMul" and not _ov_is_const(op.input_value(0).get_node())
           and not _ov_is_const(op.input_value(1).get_node())]
    keep: list[str] = []
    if policy.keep_first_conv:
        keep += [op.get_friendly_name() for op in weight if op.get_type_name() == "Convolution"][:1]
    if policy.keep_classifier:
        keep += [op.get_friendly_name() for op in weight if op.get_type_name() == "MatMul"][-1:]
    if policy.keep_attention_matmuls:
        keep += [op.get_friendly_name() for op in act]
    ov_names = {"LayerNormalization": ("MVN",), "Gelu": ("Gelu",)}
    after = {t for k in policy.keep_after for t in ov_names.get(k, (k,))}
    if after:
        for op in weight:
            src = op.input_value(0).get_node()
            while src.get_type_name() in ("Transpose", "Reshape", "Multiply", "Add") and src.get_type_name() not in after:
                if src.get_type_name() in ("Multiply", "Add") and not _ov_is_const(src.input_value(1).get_node()):
                    break
                src = src.input_value(0).get_node()
            if src.get_type_name() in after:
                keep.append(op.get_friendly_name())
    keep = list(dict.fromkeys(keep))
    has_attention = any(op.get_type_name() == "Softmax" for op in ops)
    return [op.get_friendly_name() for op in weight if op.get_friendly_name() not in keep], keep, has_attention


def _quantize_nncf(src: Path, dst: Path, batches: list[torch.Tensor], policy: QuantPolicy,
                   source: str) -> QuantizedModel:
    try:
        import nncf
        import openvino as ov
    except ImportError as e:
        raise RuntimeError("int8 for openvino needs openvino and nncf: pip install 'effivit[openvino]'") from e
    core = ov.Core()
    quant, keep, _ = _ov_roles(core.read_model(str(src)), policy)
    dataset = nncf.Dataset([b.numpy() for b in batches])
    # TRANSFORMER for every family: NNCF then leaves elementwise ops (residual adds, scalings) in float and
    # quantizes only matmul/conv inputs, as the ORT path does; on EfficientViT-B0 (no softmax) the default
    # model type gave 4x the logit error of this one.
    kwargs: dict[str, Any] = {"model_type": nncf.ModelType.TRANSFORMER}
    if policy.calibrate == "percentile":
        kwargs["advanced_parameters"] = nncf.AdvancedQuantizationParameters(
            activations_range_estimator_params=nncf.quantization.range_estimator.RangeEstimatorParametersSet.MEAN_QUANTILE)
    q, note = None, ""
    for fbc in (True, False):  # fast bias correction fails on a few graphs (NNCF reshapes a wrong array)
        try:
            with _quiet_logs("nncf"), openvino_signal_stack():
                q = nncf.quantize(core.read_model(str(src)), dataset, subset_size=len(batches),
                                  preset=nncf.QuantizationPreset.MIXED,
                                  ignored_scope=nncf.IgnoredScope(names=keep, validate=False),
                                  fast_bias_correction=fbc, **kwargs)
            break
        except Exception as e:  # noqa: BLE001 - reported, then the next recipe is tried
            note = f"NNCF failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if q is None:
        # OpenVINO also runs ONNX Runtime's QDQ graph as int8: the other well-kept quantizer.
        qdq = _quantize_ort(src, dst.with_suffix(".qdq.onnx"), batches, policy, source)
        q = core.read_model(str(qdq.path))
        source = f"{source}; {note}: ONNX Runtime's QDQ graph used instead"
    dst = dst.with_suffix(".xml")
    ov.save_model(q, str(dst), compress_to_fp16=False)
    return QuantizedModel(dst, "openvino", policy, keep, len(quant), source)


class _quiet_logs:
    """Quantizers log progress and advice; keep the bench's output readable (warnings and errors pass)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        import logging

        self.logger = logging.getLogger(None if self.name == "root" else self.name)
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


# --- accuracy held (the digits study) -------------------------------------------------------------------------

ACCURACY_TABLE = Path(__file__).resolve().parents[1] / "data" / "precision_accuracy.csv"
# The targets of issue 12: a precision "holds" accuracy when digits top-1 drops by at most this much.
DROP_TARGET_PTS = {"bf16": 0.2, "fp16": 0.2, "int8": 1.0}


@functools.lru_cache(maxsize=1)
def _accuracy_rows() -> tuple[dict[str, Any], ...]:
    if not ACCURACY_TABLE.exists():
        return ()
    with ACCURACY_TABLE.open(newline="", encoding="utf-8") as f:
        return tuple(csv.DictReader(f))


def accuracy_record(family: str, backend: str, dtype: str) -> dict[str, Any] | None:
    """The digits study's result for ``family`` in ``backend`` at ``dtype`` (``drop_pts``, ``held``), or
    ``None`` when the study did not cover it. A backend the study did not run borrows the result of the
    same precision in another runtime only for bf16/fp16 (half precision is the same maths everywhere)."""
    rows = [r for r in _accuracy_rows() if r["family"] == family and r["dtype"] == dtype]
    exact = [r for r in rows if r["backend"] == backend]
    pick = exact or (rows if dtype in ("bf16", "fp16") else [])
    if not pick:
        return None
    worst = max(pick, key=lambda r: float(r["drop_pts"]))
    drop = float(worst["drop_pts"])
    return {"drop_pts": drop, "held": drop <= DROP_TARGET_PTS.get(dtype, 0.0) + 1e-9 and not math.isnan(drop),
            "backend": worst["backend"]}


__all__ = ["DEFAULT_POLICY", "FAMILY_POLICIES", "HalfPrecisionModel", "QuantPolicy", "QuantizedModel",
           "accuracy_record", "calibration_from_folder", "list_images", "policy_for", "quantize", "to_dtype"]
