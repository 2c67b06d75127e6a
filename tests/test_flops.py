"""The FLOP convention and the analytic conv formulas, pinned to hand-derived numbers."""

import pytest
import torch
from torch import nn

from convpeft.core.flops import (
    FLOPS_PER_MAC,
    conv2d_flops,
    conv2d_macs,
    conv2d_output_hw,
    linear_flops,
    matmul_flops,
    svd_flops,
)


def test_convention_is_two_flops_per_mac():
    assert FLOPS_PER_MAC == 2
    assert matmul_flops(3, 4, 5) == 2 * 3 * 4 * 5
    assert linear_flops(tokens=7, in_features=11, out_features=13) == 2 * 7 * 11 * 13


def test_depthwise_conv_hand_count():
    # Conv2d(96, 96, 3, groups=96, padding=1) on 8x96x16x16: each output element is a 3x3 dot.
    f = conv2d_flops(batch=8, in_channels=96, out_channels=96, kernel_size=3, out_hw=(16, 16),
                     groups=96)
    assert f.forward == 2 * 8 * 96 * 16 * 16 * 9 == 3_538_944
    assert f.backward_input == f.forward and f.backward_weight == f.forward
    assert f.total == 3 * 3_538_944  # 10.6 MFLOP, not torch's 346.8 MFLOP


def test_dense_conv_is_groups_times_depthwise():
    kw = dict(batch=2, in_channels=32, out_channels=32, kernel_size=(3, 5), out_hw=(7, 9))
    assert conv2d_macs(**kw, groups=1) == 32 * conv2d_macs(**kw, groups=32)
    assert conv2d_macs(**kw, groups=4) == 8 * conv2d_macs(**kw, groups=32)


def test_skipped_gradients_count_zero():
    f = conv2d_flops(batch=1, in_channels=3, out_channels=8, kernel_size=3, out_hw=(4, 4),
                     input_grad=False, weight_grad=False)
    assert f.backward == 0 and f.total == f.forward


def test_groups_must_divide_channels():
    with pytest.raises(ValueError, match="groups=3 must divide"):
        conv2d_macs(batch=1, in_channels=8, out_channels=8, kernel_size=1, out_hw=(1, 1), groups=3)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, stride=1, padding=1),
        dict(kernel_size=(3, 5), stride=2, padding=(1, 0)),
        dict(kernel_size=3, stride=1, padding=2, dilation=2),
        dict(kernel_size=(5, 3), padding="same"),
        dict(kernel_size=3, padding="valid", stride=(2, 1)),
    ],
)
def test_output_hw_matches_torch(kwargs):
    conv = nn.Conv2d(2, 2, **kwargs)
    y = conv(torch.zeros(1, 2, 13, 10))
    got = conv2d_output_hw((13, 10), kwargs["kernel_size"], stride=kwargs.get("stride", 1),
                           padding=kwargs.get("padding", 0), dilation=kwargs.get("dilation", 1))
    assert got == tuple(y.shape[-2:])


def test_svd_flops_symmetric_and_growing():
    assert svd_flops(100, 10) == svd_flops(10, 100) == 6 * 100 * 100 + 20 * 1000
    assert svd_flops(200, 10) > svd_flops(100, 10)
