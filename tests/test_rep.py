"""layers.rep: reparameterizable multi-branch convs fuse to one conv that computes the same thing."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randomize_norm_stats
from torch import nn

from effivit.deploy import count_batchnorms, fuse
from effivit.deploy.fold import fold_affine_into_output
from effivit.layers.rep import (
    ChannelRepeatConv,
    ConvBn,
    MobileOneBlock,
    ReparamLargeKernelConv,
    branch_kernel,
    fast_conv,
    is_channel_multiplier_conv,
)


def _check_fuses(block: nn.Module, x: torch.Tensor) -> nn.Module:
    """Both a direct ``fuse()`` call and the deploy walker give the block's output, with no BN left."""
    randomize_norm_stats(block).eval()
    with torch.no_grad():
        ref = block(x)
        direct = block.fuse()
        walked = fuse(block)
        for form, m in (("direct", direct), ("walker", walked)):
            assert count_batchnorms(m) == 0, f"{form}: BatchNorm left after fusing"
            assert not any(isinstance(s, (ConvBn, MobileOneBlock, ReparamLargeKernelConv)) for s in m.modules())
            assert_close(m(x), ref, 1e-5 * max(1.0, float(ref.abs().max())), f"{form} fuse")
    return walked


@pytest.mark.parametrize(
    "in_chs,out_chs,k,stride,groups,dilation,branches,scale",
    [
        (8, 8, 3, 1, 1, 1, 1, True),  # RepVGG: 3x3 + 1x1 + identity
        (8, 8, 3, 1, 8, 1, 3, True),  # depth-wise, over-parameterized (MobileOne)
        (8, 16, 3, 2, 1, 1, 2, True),  # stride 2, channel change: no identity
        (8, 8, 5, 1, 4, 2, 1, True),  # grouped and dilated
        (8, 8, 1, 1, 1, 1, 1, True),  # 1x1: no scale branch, identity kept
        (8, 8, 3, 1, 8, 1, 0, False),  # identity (BN) only: RepMixer's "norm"
        (8, 16, 3, 1, 8, 1, 1, True),  # channel multiplier 2 -> ChannelRepeatConv
    ],
)
def test_mobileone_block_fuses(in_chs, out_chs, k, stride, groups, dilation, branches, scale):
    torch.manual_seed(0)
    block = MobileOneBlock(in_chs, out_chs, k, stride=stride, groups=groups, dilation=dilation,
                           num_conv_branches=branches, use_scale_branch=scale)
    assert len(block.conv_kxk) == branches
    assert (block.conv_scale is not None) == (scale and k > 1)
    assert (block.identity is not None) == (in_chs == out_chs and stride == 1)
    x = torch.randn(2, in_chs, 12, 12)
    fused = _check_fuses(block, x)
    expected = ChannelRepeatConv if out_chs > in_chs and groups == in_chs else nn.Conv2d
    assert isinstance(fused, expected)


def test_mobileone_block_with_se_and_act_keeps_them_after_the_conv():
    torch.manual_seed(0)

    def se(c: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(c, c, 1), nn.Sigmoid())

    block = MobileOneBlock(6, 6, 3, act_layer=nn.GELU, se_layer=se)
    fused = _check_fuses(block, torch.randn(2, 6, 9, 9))
    assert isinstance(fused, nn.Sequential) and isinstance(fused[0], nn.Conv2d) and isinstance(fused[-1], nn.GELU)


@pytest.mark.parametrize("in_chs,out_chs,groups,small", [(8, 16, 8, 3), (8, 8, 1, 3), (8, 8, 8, None)])
def test_large_kernel_conv_fuses(in_chs, out_chs, groups, small):
    torch.manual_seed(0)
    block = ReparamLargeKernelConv(in_chs, out_chs, 7, stride=2, groups=groups, small_kernel=small)
    _check_fuses(block, torch.randn(2, in_chs, 16, 16))


def test_unfused_block_scripts():
    block = randomize_norm_stats(MobileOneBlock(8, 8, 3, groups=8, num_conv_branches=2, act_layer=nn.ReLU)).eval()
    x = torch.randn(1, 8, 10, 10)
    with torch.no_grad():
        assert_close(torch.jit.script(block)(x), block(x), 1e-6, "TorchScript")


@pytest.mark.parametrize("stride,k", [(1, 3), (2, 7)])
def test_channel_repeat_conv_equals_grouped_conv(stride, k):
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 18, k, stride, k // 2, groups=6).eval()
    assert is_channel_multiplier_conv(conv)
    fast = fast_conv(conv)
    assert isinstance(fast, ChannelRepeatConv) and fast.conv.groups == 18
    x = torch.randn(2, 6, 14, 14)
    with torch.no_grad():
        assert_close(fast(x), conv(x), 1e-5, "channel repeat")
        assert_close(fast(x.contiguous(memory_format=torch.channels_last)), conv(x), 1e-5, "channels_last")
    # Plain, depth-wise and ordinary grouped convs are left as they are.
    for other in (nn.Conv2d(6, 12, 3), nn.Conv2d(6, 6, 3, groups=6), nn.Conv2d(6, 12, 3, groups=3)):
        assert fast_conv(other) is other
    with pytest.raises(ValueError, match="one input channel per group"):
        ChannelRepeatConv(nn.Conv2d(6, 6, 3, groups=6))


def test_branch_kernel_forms():
    torch.manual_seed(0)
    like = torch.empty(0)
    k = (3, 3)
    w, b = branch_kernel(nn.Identity(), 4, 1, k, like)
    x = torch.randn(1, 4, 5, 5)
    assert_close(nn.functional.conv2d(x, w, b, padding=1), x, 1e-6, "identity kernel")
    conv = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    w, b = branch_kernel(conv, 4, 1, k, like)
    assert torch.equal(w, conv.weight) and torch.equal(b, torch.zeros(4))
    branch = randomize_norm_stats(ConvBn(4, 4, 3)).eval()
    w, b = branch_kernel(branch, 4, 1, k, like)
    with torch.no_grad():
        assert_close(nn.functional.conv2d(x, w, b, padding=1), branch(x), 1e-5, "conv-bn branch")
    with pytest.raises(TypeError, match="cannot reparameterize"):
        branch_kernel(nn.ReLU(), 4, 1, k, like)


def test_bad_configurations_are_rejected():
    with pytest.raises(ValueError, match="odd"):
        MobileOneBlock(4, 4, 2)
    with pytest.raises(ValueError, match="identity branch"):
        MobileOneBlock(4, 4, 3, stride=2, use_identity=True)
    with pytest.raises(ValueError, match="at least one branch"):
        MobileOneBlock(4, 8, 3, num_conv_branches=0, use_scale_branch=False)
    with pytest.raises(ValueError, match="groups"):
        MobileOneBlock(4, 6, 3, groups=4)
    with pytest.raises(ValueError, match="small_kernel"):
        ReparamLargeKernelConv(4, 4, 3, small_kernel=5)


@pytest.mark.parametrize("layer", [nn.Conv2d(4, 6, 3, 2, 1, groups=2), nn.Linear(4, 6), nn.Conv2d(4, 6, 1, bias=False)])
def test_fold_affine_into_output(layer):
    torch.manual_seed(0)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    x = torch.randn(2, 4, 8, 8) if isinstance(layer, nn.Conv2d) else torch.randn(3, 4)
    view = (1, -1, 1, 1) if x.dim() == 4 else (1, -1)
    with torch.no_grad():
        ref = layer(x) * scale.reshape(view) + shift.reshape(view)
        assert_close(fold_affine_into_output(layer, scale, shift)(x), ref, 1e-5, "scale + shift")
        assert_close(fold_affine_into_output(layer, scale)(x), layer(x) * scale.reshape(view), 1e-5, "scale")
    with pytest.raises(TypeError, match="output affine"):
        fold_affine_into_output(nn.ReLU(), scale)
