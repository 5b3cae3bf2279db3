"""The folding maths in deploy/fold.py, checked against the layers it replaces (plain, grouped, depth-wise)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, randomize_norm_stats
from torch import nn

from effivit.deploy import count_batchnorms, fuse
from effivit.deploy.fold import (
    bn_scale_shift,
    conv_bn_branch,
    fold_affine_into_input,
    fuse_bn_linear,
    fuse_conv_bn,
    fuse_linear_bn,
    identity_kernel,
    sum_branches,
)
from effivit.layers import ConvNorm, DropPath


def _bn(n, dims=2):
    bn = nn.BatchNorm2d(n) if dims == 2 else nn.BatchNorm1d(n)
    return randomize_norm_stats(bn).eval()


@pytest.mark.parametrize("groups,bias,stride,k", [(1, False, 1, 3), (2, True, 2, 3), (8, False, 1, 5), (1, True, 1, 1)])
def test_fuse_conv_bn(groups, bias, stride, k):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16 if groups != 8 else 8, k, stride, k // 2, groups=groups, bias=bias)
    bn = _bn(conv.out_channels)
    x = torch.randn(2, 8, 13, 11)
    fused = fuse_conv_bn(conv, bn)
    with torch.no_grad():
        assert_close(fused(x), bn(conv(x)), 1e-5, "conv+bn")
    assert fused.groups == groups and fused.stride == conv.stride


def test_fuse_linear_bn_and_bn_linear():
    torch.manual_seed(0)
    lin = nn.Linear(12, 6)
    bn = _bn(6, dims=1)
    x = torch.randn(5, 12)
    with torch.no_grad():
        assert_close(fuse_linear_bn(lin, bn)(x), bn(lin(x)), 1e-5, "linear+bn")
        bn_in = _bn(12, dims=1)
        assert_close(fuse_bn_linear(bn_in, lin)(x), lin(bn_in(x)), 1e-5, "bn+linear")


@pytest.mark.parametrize("groups", [1, 4])
def test_fold_affine_into_grouped_1x1_conv(groups):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 1, groups=groups, bias=groups == 1)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = conv(x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1))
        assert_close(fold_affine_into_input(conv, scale, shift)(x), expected, 1e-5, "affine into 1x1")


def test_fold_affine_refuses_padded_kernels():
    with pytest.raises(ValueError, match="1x1"):
        fold_affine_into_input(nn.Conv2d(4, 4, 3, padding=1), torch.ones(4), torch.zeros(4))


def test_bn_scale_shift_rejects_non_bn():
    with pytest.raises(TypeError, match="BatchNorm"):
        bn_scale_shift(nn.LayerNorm(4))


@pytest.mark.parametrize("groups", [1, 8])
def test_sum_branches_repvgg_style(groups):
    # 3x3 conv-bn + 1x1 conv-bn + identity bn -> one 3x3 conv.
    torch.manual_seed(0)
    c = 8
    c3 = nn.Conv2d(c, c, 3, 1, 1, groups=groups, bias=False)
    c1 = nn.Conv2d(c, c, 1, 1, 0, groups=groups, bias=False)
    b3, b1, bid = _bn(c), _bn(c), _bn(c)
    x = torch.randn(2, c, 9, 9)
    w = c3.weight
    branches = [
        conv_bn_branch(c3, b3, c, groups, (3, 3), w),
        conv_bn_branch(c1, b1, c, groups, (3, 3), w),
        conv_bn_branch(None, bid, c, groups, (3, 3), w),
    ]
    fused = sum_branches(c3, branches)
    with torch.no_grad():
        assert_close(fused(x), b3(c3(x)) + b1(c1(x)) + bid(x), 1e-5, "branch sum")


def test_identity_kernel_is_identity():
    for groups in (1, 2, 6):
        k = identity_kernel(6, groups, (3, 3), torch.empty(0))
        x = torch.randn(1, 6, 5, 5)
        assert_close(nn.functional.conv2d(x, k, padding=1, groups=groups), x, 0.0, "identity kernel")


def test_fuse_walker_is_bottom_up_and_leaves_the_original():
    torch.manual_seed(0)
    model = nn.Sequential(ConvNorm(3, 8, 3, act_layer=nn.ReLU), DropPath(0.1), ConvNorm(8, 4, 1))
    randomize_norm_stats(model).eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse(model)
    with torch.no_grad():
        assert_close(fused(x), model(x), 1e-5, "walker")
    assert count_batchnorms(fused) == 0 and count_batchnorms(model) == 2
    assert not any(isinstance(m, DropPath) for m in fused.modules())
    assert getattr(fused, "is_fused", False)


def test_fuse_rejects_non_modules():
    with pytest.raises(TypeError, match="nn.Module"):
        fuse(lambda x: x)
