"""Deployment: fold BatchNorm and reparameterize (``fuse``), export to ONNX / TorchScript with verification."""

from .export import ExportError, export_onnx, export_torchscript
from .fuse import count_batchnorms, fuse

__all__ = ["ExportError", "count_batchnorms", "export_onnx", "export_torchscript", "fuse"]
