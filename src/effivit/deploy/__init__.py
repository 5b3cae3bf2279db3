"""Deployment: fold BatchNorm and reparameterize (``fuse``), lower precision (``to_dtype``, ``quantize``),
export to ONNX / OpenVINO / TorchScript with verification (``export``, ``export_onnx``, ``export_torchscript``)."""

from .export import ExportError, export, export_onnx, export_torchscript
from .fuse import count_batchnorms, fuse
from .precision import QuantPolicy, quantize, to_dtype

__all__ = ["ExportError", "QuantPolicy", "count_batchnorms", "export", "export_onnx", "export_torchscript", "fuse",
           "quantize", "to_dtype"]
