"""1x1 convolutions that take PyTorch's oneDNN kernels on CPU (an inference-form detail, same numbers).

PyTorch picks a backend per call: an fp32 1x1 conv that is not strided or dilated, on fewer than 16 images
and one thread, goes to its BLAS path (a GEMM through MKL); almost everything else goes to oneDNN. Where
MKL's sgemm is not tuned for the CPU (AMD EPYC here) oneDNN is about 2x faster for these convs, batch 1 or 8,
and with channels_last memory it also reads the map without a copy. Dilation does not change what a 1x1
kernel computes, and a dilated conv is sent to oneDNN when its input holds more than 20480 values per image;
smaller inputs would reach a slow generic dilated-conv kernel instead, so those keep dilation 1.

The choice reads only the channel and spatial sizes, which are static under ``torch.export`` (so ONNX export
with a dynamic batch works) and cheap in eager mode and TorchScript. Exported graphs are plain ``Conv``
nodes (ONNX Runtime treats dilation of a 1x1 kernel as a no-op). On CUDA nothing changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PointwiseConv(nn.Conv2d):
    """An ``nn.Conv2d`` with a 1x1 kernel, stride 1 and no padding whose CPU forward prefers oneDNN."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv:
        """The same layer (shared weights) as a ``PointwiseConv``; ``conv`` must be 1x1, stride 1, unpadded."""
        if not is_pointwise(conv):
            raise ValueError(f"expected a 1x1 conv with stride 1, no padding and no dilation, got {conv}")
        out = cls(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=conv.bias is not None,
                  device="meta")
        out.weight = conv.weight
        out.bias = conv.bias
        return out.train(conv.training)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    dilation = 1
    # 20480: PyTorch sends a dilated fp32 conv to oneDNN only above this many input values per image.
    if not x.is_cuda and x.shape[1] * x.shape[2] * x.shape[3] > 20480:
        dilation = 2
    return F.conv2d(x, weight, bias, 1, 0, dilation, groups)


# FX records the size-dependent kernel choice as one call.
torch.fx.wrap("pointwise_conv")


def is_pointwise(module: nn.Module) -> bool:
    return (
        type(module) is nn.Conv2d
        and module.kernel_size == (1, 1)
        and module.stride == (1, 1)
        and module.dilation == (1, 1)
        and module.padding in ((0, 0), 0)
        and module.padding_mode == "zeros"
    )


def use_pointwise_convs(model: nn.Module) -> nn.Module:
    """Replace every plain 1x1 ``nn.Conv2d`` (stride 1, unpadded) inside ``model`` by a ``PointwiseConv``."""
    for name, child in list(model.named_children()):
        if is_pointwise(child):
            setattr(model, name, PointwiseConv.from_conv(child))
        else:
            use_pointwise_convs(child)
    return model
