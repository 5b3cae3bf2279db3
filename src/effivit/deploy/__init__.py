"""Deployment: fold BatchNorm and reparameterize (``fuse``), per-target kernel passes (``optimize``), lower precision (``to_dtype``, ``quantize``),
export to ONNX / OpenVINO / TorchScript with verification (``export``, ``export_onnx``, ``export_torchscript``)."""

from .export import export
from .formats import ExportError, export_onnx, export_torchscript
from .fuse import count_batchnorms, fuse
from .passes import optimize
from .precision import QuantPolicy, quantize, to_dtype

__all__ = ["ExportError", "QuantPolicy", "count_batchnorms", "export", "export_onnx", "export_torchscript", "fuse",
           "optimize", "quantize", "to_dtype"]
