"""Reparameterizable multi-branch convolutions (structural re-parameterization).

At training time a block sums several parallel *linear* branches (each a conv followed by BatchNorm, or a
BatchNorm alone acting on the identity); at inference the sum is one conv, because every branch is a
convolution with the same stride and centre. References: RepVGG (arXiv:2101.03697), MobileOne
(arXiv:2206.04040, over-parameterized k x k branches + a 1x1 "scale" branch + a BN identity), RepLKNet
(arXiv:2203.06717, a large kernel with a parallel small kernel).

Parameter names follow timm's MobileOne/FastViT modules (``conv_kxk.{i}.conv``, ``conv_kxk.{i}.bn``,
``conv_scale``, ``identity``, ``large_conv``, ``small_conv``) so their checkpoints load unchanged; that is why
the branch type here is :class:`ConvBn` (``conv``/``bn``) rather than ``layers.ConvNorm`` (``conv``/``norm``).

``fuse()`` collapses the branches through ``deploy.fold`` (``conv_bn_branch``, ``identity_kernel``,
``sum_branches``). It accepts branches either unfused (``ConvBn``/BatchNorm) or already fused to convs by
``deploy.fuse``'s bottom-up walk, so it works whether called directly or by the walker. Families whose
blocks combine branches differently (an outer norm after the sum, a layer scale between branches) reuse
:func:`branch_kernel` and ``deploy.fold.sum_branches`` in their own ``fuse()``.

Fused convs that are *channel-multiplier* convs (one input channel and several outputs per group) come back as
:class:`ChannelRepeatConv` (:func:`fast_conv`): the same function through the depth-wise kernels CPUs run
several times faster.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..deploy.fold import conv_bn_branch, fuse_conv_bn, identity_kernel, sum_branches

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _check_kernel(kernel_size: int, name: str = "kernel_size") -> None:
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int (branches are summed about the kernel centre), "
                         f"got {kernel_size!r}")


class ConvBn(nn.Module):
    """A bias-free conv then BatchNorm (timm's ``ConvNormAct`` key names: ``conv``, ``bn``).

    Padding keeps the kernel centred ("same" for stride 1), which reparameterization requires.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 dilation: int = 1) -> None:
        super().__init__()
        _check_kernel(kernel_size)
        padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=False)
        self.bn = nn.BatchNorm2d(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))

    def fuse(self) -> nn.Module:
        return fuse_conv_bn(self.conv, self.bn)


def branch_kernel(branch: nn.Module, channels: int, groups: int, kernel_size: tuple[int, int],
                  like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of one linear branch, whatever form it is in.

    ``ConvBn`` (unfused), a BatchNorm alone (a normalised identity), an ``nn.Conv2d`` (a branch the walker
    already fused, or a plain conv with or without bias) or ``nn.Identity``. ``channels``/``groups``/
    ``kernel_size`` describe the identity kernel; ``like`` gives its dtype and device.
    """
    if isinstance(branch, ConvBn):
        return conv_bn_branch(branch.conv, branch.bn, channels, groups, kernel_size, like)
    if isinstance(branch, _BatchNorm):
        return conv_bn_branch(None, branch, channels, groups, kernel_size, like)
    if isinstance(branch, nn.Conv2d):
        w = branch.weight.detach()
        b = branch.bias.detach() if branch.bias is not None else w.new_zeros(w.shape[0])
        return w, b
    if isinstance(branch, nn.Identity):
        return identity_kernel(channels, groups, kernel_size, like), like.new_zeros(channels)
    raise TypeError(f"cannot reparameterize a branch of type {type(branch).__name__}")


class ChannelRepeatConv(nn.Module):
    """A grouped conv with one input channel per group and ``m > 1`` outputs per group, run as a depth-wise
    conv on the input with every channel repeated ``m`` times (adjacent copies, so the kernel is unchanged).

    Same result; CPU kernels (oneDNN) have a fast path for depth-wise convs only, and the grouped form with a
    channel multiplier runs several times slower (FastViT's stage down-sampling and final conv).
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        if not is_channel_multiplier_conv(conv):
            raise ValueError(f"expected a grouped conv with one input channel per group and more outputs "
                             f"than inputs, got {conv}")
        self.multiplier = conv.out_channels // conv.in_channels
        out = conv.out_channels
        self.conv = nn.Conv2d(out, out, conv.kernel_size, conv.stride, conv.padding, conv.dilation, groups=out,
                              bias=conv.bias is not None, padding_mode=conv.padding_mode)
        self.conv = self.conv.to(device=conv.weight.device, dtype=conv.weight.dtype)
        # Depth-wise weight (out, 1, kh, kw) is exactly the grouped conv's weight.
        self.conv.weight.data.copy_(conv.weight.detach())
        if conv.bias is not None:
            self.conv.bias.data.copy_(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(repeat_channels(x, self.multiplier))


def repeat_channels(x: torch.Tensor, m: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C * m, H, W), each channel repeated m times in a row, in x's memory format.
    FX records it as one call (it branches on the memory format)."""
    b, c, h, w = x.shape
    nhwc = x.is_contiguous(memory_format=torch.channels_last)
    if not torch.jit.is_scripting():
        if torch.onnx.is_in_onnx_export():
            # Export traces strides too; the NCHW form is the one ONNX Runtime runs fast (its Expand is
            # slow on an innermost broadcast).
            nhwc = False
    if nhwc:
        # Repeat along the innermost (channel) dimension of the NHWC data: stays channels_last.
        x = x.permute(0, 2, 3, 1).unsqueeze(-1).expand(b, h, w, c, m).reshape(b, h, w, c * m)
        return x.permute(0, 3, 1, 2)
    return x.unsqueeze(2).expand(b, c, m, h, w).reshape(b, c * m, h, w)


torch.fx.wrap("repeat_channels")


def is_channel_multiplier_conv(conv: nn.Module) -> bool:
    """A grouped conv with one input channel per group and several outputs per group."""
    return (isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels
            and conv.out_channels > conv.in_channels)


def fast_conv(conv: nn.Conv2d) -> nn.Module:
    """The fastest equivalent form of an inference conv (``ChannelRepeatConv`` for channel-multiplier convs)."""
    return ChannelRepeatConv(conv) if is_channel_multiplier_conv(conv) else conv


def _template_conv(in_chs: int, out_chs: int, kernel_size: int, stride: int, dilation: int,
                   groups: int) -> nn.Conv2d:
    # Only its geometry is read by sum_branches; "meta" tensors skip allocating and initialising weights.
    padding = dilation * (kernel_size - 1) // 2
    return nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation, groups, bias=True, device="meta")


def _like(module: nn.Module) -> torch.Tensor:
    for t in module.parameters():
        return t
    for t in module.buffers():
        return t
    raise ValueError(f"{type(module).__name__} has no tensors to take a dtype/device from")


class MobileOneBlock(nn.Module):
    """``act(se(sum of branches))`` with the branches (all with the same stride, centred):

    * ``num_conv_branches`` k x k conv-BN branches (MobileOne's over-parameterization; 1 gives RepVGG),
    * a 1x1 conv-BN "scale" branch (``use_scale_branch``, only when ``kernel_size > 1``),
    * a BN-only identity branch (``use_identity``; default: whenever ``in_chs == out_chs`` and ``stride == 1``).

    ``fuse()`` returns one conv (followed by ``se`` and ``act`` when present). Works for plain, grouped and
    depth-wise convs (``groups``) and dilated kernels.
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        num_conv_branches: int = 1,
        use_scale_branch: bool = True,
        use_identity: bool | None = None,
        act_layer: Callable[[], nn.Module] | None = None,
        se_layer: Callable[[int], nn.Module] | None = None,
    ) -> None:
        super().__init__()
        _check_kernel(kernel_size)
        if in_chs % groups != 0 or out_chs % groups != 0:
            raise ValueError(f"groups={groups} must divide in_chs={in_chs} and out_chs={out_chs}")
        if num_conv_branches < 0:
            raise ValueError(f"num_conv_branches must be >= 0, got {num_conv_branches}")
        identity_ok = in_chs == out_chs and stride == 1
        if use_identity is None:
            use_identity = identity_ok
        elif use_identity and not identity_ok:
            raise ValueError(f"an identity branch needs in_chs == out_chs and stride == 1, got in_chs={in_chs}, "
                             f"out_chs={out_chs}, stride={stride}")
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.dilation = dilation
        self.identity = nn.BatchNorm2d(in_chs) if use_identity else None
        self.conv_kxk = nn.ModuleList(
            [ConvBn(in_chs, out_chs, kernel_size, stride, groups, dilation) for _ in range(num_conv_branches)]
        )
        self.conv_scale = (
            ConvBn(in_chs, out_chs, 1, stride, groups) if use_scale_branch and kernel_size > 1 else None
        )
        if self.identity is None and self.conv_scale is None and num_conv_branches == 0:
            raise ValueError("MobileOneBlock needs at least one branch (conv, scale or identity)")
        self.se = se_layer(out_chs) if se_layer is not None else nn.Identity()
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x  # a placeholder (TorchScript types variables before branches); replaced by the first branch
        first = True
        if self.identity is not None:
            out = self.identity(x)
            first = False
        if self.conv_scale is not None:
            y = self.conv_scale(x)
            out = y if first else out + y
            first = False
        for branch in self.conv_kxk:
            y = branch(x)
            out = y if first else out + y
            first = False
        return self.act(self.se(out))

    def branches(self) -> list[nn.Module]:
        out: list[nn.Module] = list(self.conv_kxk)
        if self.conv_scale is not None:
            out.append(self.conv_scale)
        if self.identity is not None:
            out.append(self.identity)
        return out

    def _fused_conv(self) -> nn.Conv2d:
        k = (self.kernel_size, self.kernel_size)
        like = _like(self)
        parts = [branch_kernel(b, self.in_chs, self.groups, k, like) for b in self.branches()]
        ref = _template_conv(self.in_chs, self.out_chs, self.kernel_size, self.stride, self.dilation, self.groups)
        return sum_branches(ref, parts)

    def fuse(self) -> nn.Module:
        conv = fast_conv(self._fused_conv())
        tail = [m for m in (self.se, self.act) if not isinstance(m, nn.Identity)]
        return nn.Sequential(conv, *tail) if tail else conv


class ReparamLargeKernelConv(nn.Module):
    """RepLKNet's large kernel with a parallel small kernel (both conv-BN, same stride), then ``act``.

    ``fuse()`` zero-pads the small kernel into the large one: one conv.
    """

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int = 1, groups: int = 1,
                 small_kernel: int | None = 3, act_layer: Callable[[], nn.Module] | None = None) -> None:
        super().__init__()
        _check_kernel(kernel_size)
        if small_kernel is not None:
            _check_kernel(small_kernel, "small_kernel")
            if small_kernel > kernel_size:
                raise ValueError(f"small_kernel={small_kernel} must not exceed kernel_size={kernel_size}")
        if in_chs % groups != 0 or out_chs % groups != 0:
            raise ValueError(f"groups={groups} must divide in_chs={in_chs} and out_chs={out_chs}")
        self.in_chs = in_chs
        self.out_chs = out_chs
        self.kernel_size = kernel_size
        self.stride = stride
        self.groups = groups
        self.large_conv = ConvBn(in_chs, out_chs, kernel_size, stride, groups)
        self.small_conv = ConvBn(in_chs, out_chs, small_kernel, stride, groups) if small_kernel else None
        self.act = act_layer() if act_layer is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.large_conv(x)
        if self.small_conv is not None:
            out = out + self.small_conv(x)
        return self.act(out)

    def fuse(self) -> nn.Module:
        k = (self.kernel_size, self.kernel_size)
        like = _like(self)
        branches = [self.large_conv] + ([self.small_conv] if self.small_conv is not None else [])
        parts = [branch_kernel(b, self.in_chs, self.groups, k, like) for b in branches]
        conv = fast_conv(sum_branches(_template_conv(self.in_chs, self.out_chs, self.kernel_size, self.stride, 1,
                                                     self.groups), parts))
        return conv if isinstance(self.act, nn.Identity) else nn.Sequential(conv, self.act)
