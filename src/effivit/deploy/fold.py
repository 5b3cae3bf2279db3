"""Folding maths, written once: pure functions that return new inference layers.

Every fold works for plain, depth-wise and grouped convolutions alike (BatchNorm statistics are per output
channel, so a fold only rescales output channels, whatever the grouping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


def bn_scale_shift(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel affine map y = x * scale + shift that an eval-mode BatchNorm computes."""
    if not isinstance(bn, _BatchNorm):
        raise TypeError(f"expected a BatchNorm module, got {type(bn).__name__}")
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm without running statistics (track_running_stats=False)")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    weight = bn.weight if bn.weight is not None else torch.ones_like(inv_std)
    bias = bn.bias if bn.bias is not None else torch.zeros_like(inv_std)
    scale = weight * inv_std
    shift = bias - bn.running_mean * scale
    return scale.detach(), shift.detach()


def _new_conv_like(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    out = nn.Conv2d(
        weight.shape[1] * conv.groups,
        weight.shape[0],
        weight.shape[2:],
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(device=weight.device, dtype=weight.dtype)
    out.weight.data.copy_(weight)
    out.bias.data.copy_(bias)
    return out


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> nn.Conv2d:
    """Conv followed by BatchNorm -> one conv with bias."""
    scale, shift = bn_scale_shift(bn)
    w = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    b = shift if conv.bias is None else conv.bias.detach() * scale + shift
    return _new_conv_like(conv, w, b)


def fuse_linear_bn(linear: nn.Linear, bn: nn.Module) -> nn.Linear:
    """Linear followed by BatchNorm over its output features -> one linear."""
    scale, shift = bn_scale_shift(bn)
    w = linear.weight.detach() * scale[:, None]
    b = shift if linear.bias is None else linear.bias.detach() * scale + shift
    return _linear_from(w, b)


def fold_affine_into_input(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> nn.Module:
    """A per-input-channel affine map (x * scale + shift) applied *before* ``layer`` -> one new layer.

    ``layer`` is an ``nn.Linear`` or a 1x1 ``nn.Conv2d`` without padding (with padding the shift would also
    reach the zero border, which is not linear any more). Grouped 1x1 convs are handled.
    """
    if isinstance(layer, nn.Linear):
        w = layer.weight.detach()
        b = layer.bias.detach() if layer.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        return _linear_from(w * scale[None, :], b + w @ shift)
    if isinstance(layer, nn.Conv2d):
        if layer.kernel_size != (1, 1) or layer.padding not in ((0, 0), 0):
            raise ValueError(f"can only fold an input affine map into a 1x1 conv without padding, got {layer}")
        w = layer.weight.detach()  # out, in/groups, 1, 1
        groups = layer.groups
        out_c, in_per_group = w.shape[0], w.shape[1]
        s = scale.reshape(groups, 1, in_per_group)
        t = shift.reshape(groups, in_per_group, 1)
        wg = w.reshape(groups, out_c // groups, in_per_group)
        new_w = (wg * s).reshape_as(w)
        extra = torch.bmm(wg, t).reshape(out_c)
        b = layer.bias.detach() if layer.bias is not None else torch.zeros(out_c, dtype=w.dtype, device=w.device)
        return _new_conv_like(layer, new_w, b + extra)
    raise TypeError(f"cannot fold an input affine map into {type(layer).__name__}")


def fuse_bn_linear(bn: nn.Module, layer: nn.Module) -> nn.Module:
    """BatchNorm followed by a Linear (or 1x1 conv) -> one layer."""
    scale, shift = bn_scale_shift(bn)
    return fold_affine_into_input(layer, scale, shift)


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None).to(
        device=weight.device, dtype=weight.dtype
    )
    out.weight.data.copy_(weight)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


def pad_kernel(weight: torch.Tensor, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Zero-pad a (centred) conv kernel to a larger odd size, so branches can be summed."""
    kh, kw = weight.shape[2:]
    ph, pw = (kernel_size[0] - kh) // 2, (kernel_size[1] - kw) // 2
    if ph < 0 or pw < 0:
        raise ValueError(f"cannot pad a {kh}x{kw} kernel to {kernel_size}")
    return F.pad(weight, [pw, pw, ph, ph])


def identity_kernel(channels: int, groups: int, kernel_size: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
    """The kernel of a (grouped) conv that returns its input unchanged."""
    in_per_group = channels // groups
    w = torch.zeros(channels, in_per_group, *kernel_size, dtype=like.dtype, device=like.device)
    idx = torch.arange(channels, device=like.device)
    w[idx, idx % in_per_group, kernel_size[0] // 2, kernel_size[1] // 2] = 1.0
    return w


def sum_branches(
    reference: nn.Conv2d, branches: list[tuple[torch.Tensor, torch.Tensor]]
) -> nn.Conv2d:
    """Sum (weight, bias) pairs of parallel conv branches into one conv shaped like ``reference``.

    Smaller kernels are zero-padded to the reference's size; identity branches come from
    ``identity_kernel``.
    """
    k = reference.kernel_size
    w = sum(pad_kernel(bw, k) for bw, _ in branches)
    b = sum(bb for _, bb in branches)
    return _new_conv_like(reference, w, b)


def conv_bn_branch(conv: nn.Conv2d | None, bn: nn.Module, channels: int, groups: int,
                   kernel_size: tuple[int, int], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of a conv->BN branch, or of a BN-only (identity) branch when ``conv`` is None."""
    scale, shift = bn_scale_shift(bn)
    if conv is None:
        w = identity_kernel(channels, groups, kernel_size, like)
        return w * scale.reshape(-1, 1, 1, 1), shift
    w = conv.weight.detach() * scale.reshape(-1, 1, 1, 1)
    b = shift if conv.bias is None else conv.bias.detach() * scale + shift
    return w, b


def fold_affine_into_output(layer: nn.Module, scale: torch.Tensor, shift: torch.Tensor | None = None) -> nn.Module:
    """A per-output-channel affine map (y * scale + shift) applied *after* ``layer`` -> one new layer.

    Covers a layer scale (``shift=None``) after a conv or linear. ``layer`` is an ``nn.Conv2d`` (any kernel
    size, stride or grouping: output channels are scaled independently) or an ``nn.Linear``.
    """
    if not isinstance(layer, (nn.Conv2d, nn.Linear)):
        raise TypeError(f"cannot fold an output affine map into {type(layer).__name__}")
    w = layer.weight.detach()
    scale = scale.detach().reshape(-1)
    b = layer.bias.detach() * scale if layer.bias is not None else torch.zeros_like(scale)
    if shift is not None:
        b = b + shift.detach().reshape(-1)
    w = w * scale.reshape(-1, *([1] * (w.dim() - 1)))
    if isinstance(layer, nn.Linear):
        return _linear_from(w, b)
    return _new_conv_like(layer, w, b)


def average_linears(layers: list[nn.Linear]) -> nn.Linear:
    """Several Linears reading the same input whose outputs are averaged -> one Linear (e.g. a classifier
    and its distillation head at inference)."""
    weight = torch.stack([m.weight.detach() for m in layers]).mean(0)
    biases = [m.bias.detach() if m.bias is not None else torch.zeros_like(m.weight[:, 0]) for m in layers]
    return _linear_from(weight, torch.stack(biases).mean(0))


def depthwise_conv_matrix(conv: nn.Conv2d, height: int, width: int) -> torch.Tensor:
    """A depth-wise conv (stride 1) on a fixed ``height x width`` map as per-channel matrices.

    Returns ``m`` of shape (C, N, N), N = height * width, with ``out[c] = in[c] @ m[c]`` for row vectors of
    the flattened map (the conv's bias not included). Zero padding is exact: each column is the conv of one
    unit image. For maps of a few dozen positions one batched matmul is much cheaper on CPU than a depth-wise
    conv call.
    """
    c = conv.out_channels
    if conv.groups != c or conv.in_channels != c or conv.stride not in ((1, 1), 1):
        raise ValueError(f"expected a stride-1 depth-wise conv (groups == channels), got {conv}")
    n = height * width
    w = conv.weight.detach()
    basis = torch.eye(n, dtype=w.dtype, device=w.device).reshape(n, 1, height, width).expand(n, c, height, width)
    cols = F.conv2d(basis, w, None, 1, conv.padding, conv.dilation, c)  # N_in, C, H, W (one unit image each)
    if cols.shape[-2:] != (height, width):
        raise ValueError(f"{conv} does not keep a {height}x{width} map's size (padding must be 'same')")
    return cols.reshape(n, c, n).permute(1, 0, 2).contiguous()  # C, N_in, N_out
