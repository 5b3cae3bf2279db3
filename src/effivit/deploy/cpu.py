"""CPU kernel choices as deploy-time passes: ``optimize(model, "cpu")`` after ``fuse``, for PyTorch eager /
``torch.compile`` on a CPU. The model files describe the papers' maths with plain ``nn.Linear``/``nn.Conv2d``;
these passes swap in layers with the *same parameters and the same function* whose forward picks a faster
kernel on CPU, each with a plain fallback. Exports (ONNX, OpenVINO, TorchScript) are made from the plain
fused model, so an exported graph never depends on the machine that exported it.

The choices, measured on the 2-core AMD EPYC (AVX-512, bf16, VNNI) this project is benchmarked on:

* :class:`OneDnnLinear` (pass :func:`use_onednn_linears`): ``F.linear`` on fp32 CPU tensors runs the BLAS
  sgemm, which on this CPU ran LeViT's shapes (M = tokens, K and N = 128..1280) at about half the rate of
  oneDNN's inner product; in bf16 (cast weights or autocast) ``addmm`` ran ViT shapes 1.1-1.7x slower than
  oneDNN's packed bf16 inner product. Without autograd, fp32 and bf16 on CPU call
  ``torch.ops.mkldnn._linear_pointwise`` (the kernel ``torch.compile``'s CPU backend uses) with the weight
  packed once into oneDNN's blocked layout (re-packed when the weight changes: stamped by storage, version
  and dtype) and a following hard-swish as a fused post-op. Missing op, other dtype/device, autograd,
  tracing, scripting: ``F.linear``.
* :class:`PointwiseConv` (pass :func:`use_pointwise_convs`): a 1x1 conv, stride 1, unpadded. fp32: PyTorch
  sends a 1x1 conv on few images and one thread to its BLAS path, 2x slower here than oneDNN; a dilated
  1x1 conv (same maths: dilation does not change a 1x1 kernel) is sent to oneDNN when the input holds more
  than 20480 values per image (below that it would reach a slow generic kernel, so it keeps dilation 1).
  bf16 channels_last maps with bf16 weights (``deploy.to_dtype``) run as a token GEMM (a free view of such a
  map), which oneDNN's bf16 matmul did 1.2-1.6x faster than its bf16 1x1 conv on Next-ViT's shapes; under
  autocast (fp32 weights) the conv stays a conv.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_PACK_ROWS = 64  # measured: packing for 16..1568 rows runs LeViT's shapes alike; for 1 row, slower


def _has_onednn_linear() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class OneDnnLinear(nn.Linear):
    """``nn.Linear`` (+ optional hard-swish) whose CPU inference runs oneDNN's packed inner product.

    Three cases take it: fp32 input and weight; bf16 input and weight (``deploy.to_dtype``); and bf16
    autocast over fp32 weights, where it computes what autocast computes (input, weight and bias cast to
    bf16, a bf16 linear) with the weight cast and packed once instead of cast on every call. Measured on
    this project's CPU, the packed bf16 inner product ran ViT shapes 1.1-1.7x faster than the ``addmm``
    autocast reaches, with equal results.

    Same ``weight``/``bias`` objects as the Linear it replaces (``state_dict``, ``.to()`` and copies behave
    as for ``nn.Linear``); the packed weight (and the bias in bf16) is a Python-only cache, stamped by the
    weight's storage, version and dtype, never copied or pickled. Anything else (other dtypes or devices,
    autograd, tracing, scripting, compiling) runs ``F.linear``; if the private op is missing or raises, the
    layer falls back to ``F.linear`` for good.
    """

    __constants__ = ["hardswish"]
    __jit_ignored_attributes__ = ["_packed", "_onednn_ok"]

    def __init__(self, linear: nn.Linear, hardswish: bool = False) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None,
                         device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self.hardswish = hardswish
        self._packed: tuple | None = None  # (weight, stamp, packed weight, bias in the packed dtype)
        self._onednn_ok = _has_onednn_linear()
        self.train(linear.training)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state["_packed"] = None  # an opaque oneDNN tensor: no storage to copy or pickle
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            dtype = self._onednn_dtype(x)
            if dtype is not None:
                return self._onednn_forward(x, dtype)
        x = F.linear(x, self.weight, self.bias)
        if self.hardswish:
            x = F.hardswish(x)
        return x

    @torch.jit.unused
    def _onednn_dtype(self, x):
        # type: (Tensor) -> Optional[torch.dtype]
        """The dtype the packed kernel runs in for this call, or None for ``F.linear``."""
        if not (
            self._onednn_ok
            and x.device.type == "cpu"
            and x.is_contiguous()
            and torch.backends.mkldnn.enabled
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
            and not torch.fx._symbolic_trace.is_fx_symbolic_tracing()
            and not torch.jit.is_tracing()
            and not torch.compiler.is_compiling()
        ):
            return None
        w = self.weight.dtype
        if torch.is_autocast_enabled("cpu"):
            # autocast runs a linear in its dtype whatever the input's; only bf16 has the packed kernel
            if torch.get_autocast_dtype("cpu") == torch.bfloat16 and w in (torch.float32, torch.bfloat16):
                return torch.bfloat16
            return None
        if x.dtype == w and w in (torch.float32, torch.bfloat16):
            return w
        return None

    @torch.jit.unused
    def _onednn_forward(self, x, dtype):
        # type: (Tensor, torch.dtype) -> Tensor
        attr = "hardswish" if self.hardswish else "none"
        try:
            weight, bias = self._onednn_weight(dtype)
            return torch.ops.mkldnn._linear_pointwise(x.to(dtype), weight, bias, attr, [], "")
        except RuntimeError:
            self._onednn_ok = False  # plain fallback from now on
            self._packed = None
            return self.forward(x)

    @torch.jit.unused
    def _onednn_weight(self, dtype):
        # type: (torch.dtype) -> Tuple[Tensor, Optional[Tensor]]
        w, b = self.weight, self.bias
        try:
            stamp = (dtype, w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        except RuntimeError:  # an inference-mode tensor has no version counter: no cache, the plain layout
            return w.to(dtype), None if b is None else b.to(dtype)
        if self._packed is None or self._packed[0] is not w or self._packed[1] != stamp:
            # A fixed row hint keeps the layout, hence the rounding, independent of the first input's size.
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(dtype), _PACK_ROWS)
            self._packed = (w, stamp, packed, None if b is None else b.detach().to(dtype))
        return self._packed[2], self._packed[3]

    def extra_repr(self) -> str:
        return super().extra_repr() + (", hardswish=True" if self.hardswish else "")


class PointwiseConv(nn.Conv2d):
    """A 1x1 conv (stride 1, unpadded) whose CPU forward picks oneDNN's fastest kernel (see module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv(x, self.weight, self.bias, self.groups)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv:
        """The same layer (shared weights); ``conv`` must be 1x1, stride 1, unpadded, undilated."""
        if not is_pointwise(conv):
            raise ValueError(f"expected a 1x1 conv with stride 1, no padding and no dilation, got {conv}")
        out = cls(conv.in_channels, conv.out_channels, 1, groups=conv.groups, bias=conv.bias is not None,
                  device="meta")
        out.weight = conv.weight
        out.bias = conv.bias
        return out.train(conv.training)


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    if x.is_cuda:
        return F.conv2d(x, weight, bias, 1, 0, 1, groups)
    # Weights cast once (deploy.to_dtype): under autocast the weight is fp32 and would be cast on every call,
    # and oneDNN's bf16 conv is the faster one then (measured: RepViT 1x1 convs as token GEMMs ran ~8% slower).
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and groups == 1 and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view: channels_last memory is (B, H, W, C)
        y = F.linear(tokens, weight.reshape(weight.shape[0], c), bias)
        return y.reshape(b, h, w, -1).permute(0, 3, 1, 2)  # channels_last again, no copy
    # 20480: PyTorch sends a dilated fp32 conv to oneDNN only above this many input values per image.
    dilation = 2 if x.dtype == torch.float32 and x.shape[1] * x.shape[2] * x.shape[3] > 20480 else 1
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
    """Pass: every plain 1x1 ``nn.Conv2d`` (stride 1, unpadded) becomes a :class:`PointwiseConv` (in place)."""
    for name, child in list(model.named_children()):
        if is_pointwise(child):
            setattr(model, name, PointwiseConv.from_conv(child))
        else:
            use_pointwise_convs(child)
    return model


def use_onednn_linears(model: nn.Module) -> nn.Module:
    """Pass: every plain ``nn.Linear`` becomes a :class:`OneDnnLinear` (in place); inside an
    ``nn.Sequential``, a Linear followed by ``nn.Hardswish`` becomes one layer with a fused hard-swish."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.Sequential):
            _fuse_sequential(child)
        if type(child) is nn.Linear:
            setattr(model, name, OneDnnLinear(child))
        else:
            use_onednn_linears(child)
    return model


def _fuse_sequential(seq: nn.Sequential) -> None:
    keys = list(seq._modules)
    for a, b in zip(keys, keys[1:]):
        la, lb = seq._modules[a], seq._modules[b]
        if type(la) is nn.Linear and type(lb) is nn.Hardswish:
            seq._modules[a] = OneDnnLinear(la, hardswish=True)
            seq._modules[b] = nn.Identity()


CPU_PASSES = (use_onednn_linears, use_pointwise_convs)
