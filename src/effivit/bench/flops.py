"""Counting the work a model does on its actual graph at a given input size.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` run on a real forward pass (so attention at the
actual token count, resolution-dependent branches and fused vs unfused graphs are all counted as executed);
torch counts a multiply-add as 2 FLOPs, so MACs = FLOPs / 2. Operations torch has no formula for
(element-wise ops, norms, softmax) are not counted, as in the papers' tables. The fused CPU attention
kernel and oneDNN's fused linear/conv kernels (``mkldnn::_linear_pointwise``, ``_convolution_pointwise``),
which torch's counter misses, are counted with the same formulas as their unfused forms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

# torch's counter has formulas for the CUDA attention kernels but not for the fused CPU kernel that
# F.scaled_dot_product_attention dispatches to on CPU, so attention would count as zero work there.


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _prod(shape: Any) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _mkldnn_linear_flops(x_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # Fused linear(+activation / +residual) kernels (mkldnn::_linear_pointwise, used by fused models on
    # CPU). Overloads: (X, W, B, attr, ...) and .binary (X, other, W, B, attr); W is (out, in).
    shapes = [a for a in args if isinstance(a, (tuple, list, torch.Size)) and len(a) == 2
              and int(a[-1]) == int(x_shape[-1])]
    if not shapes:
        return 0
    out_features = int(shapes[-1][0])
    return 2 * _prod(x_shape[:-1]) * int(x_shape[-1]) * out_features


def _mkldnn_conv_flops(x_shape, w_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    # mkldnn::_convolution_pointwise: W is (out, in / groups, *kernel); each output element costs
    # in/groups x kernel multiply-adds.
    if out_shape is None:
        return 0
    out = out_shape[0] if isinstance(out_shape, (tuple, list)) and isinstance(out_shape[0], (tuple, list, torch.Size)) \
        else out_shape
    return 2 * _prod(out) * _prod(w_shape[1:])


_EXTRA_FORMULAS: dict[Any, Any] = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
if hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
    _EXTRA_FORMULAS[torch.ops.mkldnn._linear_pointwise] = _mkldnn_linear_flops
if hasattr(torch.ops, "mkldnn") and hasattr(torch.ops.mkldnn, "_convolution_pointwise"):
    _EXTRA_FORMULAS[torch.ops.mkldnn._convolution_pointwise] = _mkldnn_conv_flops


def count_flops(model: nn.Module, x: torch.Tensor | tuple[Any, ...]) -> int:
    args = x if isinstance(x, tuple) else (x,)
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS) as counter:
        model(*args)
    return int(counter.get_total_flops())


def count_macs(model: nn.Module, x: torch.Tensor | tuple[Any, ...]) -> int:
    """Multiply-accumulates of one forward of ``model`` on ``x`` (for the whole batch)."""
    return count_flops(model, x) // 2


def count_params(model: nn.Module) -> int:
    """Parameters, counting shared tensors once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def achieved_gflops(macs: int, latency_ms: float) -> float:
    """GFLOP/s a model reaches: 2 x MACs per forward over the latency of that forward."""
    return 2.0 * macs / (latency_ms * 1e-3) / 1e9 if latency_ms > 0 else float("nan")
