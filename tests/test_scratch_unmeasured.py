"""The device model where it is uncertain: op kinds it never measured are said so and planned
with a stated margin, never with zero scratch; conv keys name the layout the kernel sees.

Shapes only (meta tensors, hand-made scratch models): no device measurement here (those are in
``test_device_truth.py``).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from convpeft.planner import format_plan, plan
from convpeft.profiler import analytic_profile
from convpeft.profiler.scratch import (
    UNMEASURED_MARGIN,
    OpShape,
    ScratchModel,
    largest_operand,
    op_features,
)

MiB = 2**20


def _conv_bwd_key(x: torch.Tensor, groups: int, k: int, mask=(True, True)) -> str:
    w = torch.empty(x.shape[1], x.shape[1] // groups, k, k, device="meta")
    gy = torch.empty(x.shape, device="meta")
    args = (gy, x, w, None, [1, 1], [k // 2] * 2, [1, 1], False, [0, 0], groups,
            [mask[0], mask[1], False])
    s = op_features(torch.ops.aten.convolution_backward.default, args, {}, (x, w, None))
    assert s is not None
    return s.key


def test_conv_keys_name_the_layout_the_kernel_sees():
    x = torch.empty(4, 64, 8, 8, device="meta")
    cl = x.contiguous(memory_format=torch.channels_last)
    stub = torch.empty((), device="meta").expand(x.shape)  # a lean backward's shape stub
    assert _conv_bwd_key(x, 64, 7) == "conv_bwd/depthwise/s1"
    assert _conv_bwd_key(cl, 64, 3) == "conv_bwd/depthwise/s1/cl"
    assert _conv_bwd_key(cl, 64, 7) == "conv_bwd/depthwise/s1/cl-k5+"
    assert _conv_bwd_key(cl, 4, 3) == "conv_bwd/grouped/s1/cl"
    assert _conv_bwd_key(stub, 1, 1, (True, False)) == "conv_bwd/pointwise/s1/strided"


def _bwd(key: str) -> OpShape:
    return OpShape(key=key, n=2, c_in=16, hw_in=64, c_out=16, hw_out=64, w=9)


def test_unmeasured_kind_gets_the_nearest_fit_plus_the_margin():
    coef = {"conv_bwd/grouped/s1": [2.0, 0.0, 0.0, 0.0], "conv_bwd": [1.0, 0.0, 0.0, 0.0]}
    m = ScratchModel(device="cpu", block=1, coef=coef, source="test",
                     measured=["conv_bwd/grouped/s1", "relu.default"])
    known = _bwd("conv_bwd/grouped/s1")
    gout = 2 * 16 * 64 * 4
    assert not m.unmeasured(known) and m.predict(known) == 2 * gout
    # the channels-last variant of a measured kind: that kind's fit plus the margin
    cl = _bwd("conv_bwd/grouped/s1/cl")
    assert m.unmeasured(cl)
    assert m.predict(cl) == 2 * gout + int(UNMEASURED_MARGIN * largest_operand(cl, 1))
    # another conv kind: the family's fit plus the margin
    dw = _bwd("conv_bwd/depthwise/s2")
    assert m.predict(dw) == gout + int(UNMEASURED_MARGIN * largest_operand(dw, 1)) > gout
    # a non-conv op never measured: no fit at all, yet not zero
    ln = OpShape(key="native_layer_norm_backward.default", io=(3000, 1000))
    assert m.unmeasured(ln) and m.predict(ln) == int(UNMEASURED_MARGIN * 3000) > 0
    # an op measured without scratch (no coefficient): zero, and not flagged
    relu = OpShape(key="relu.default", io=(3000, 1000))
    assert not m.unmeasured(relu) and m.predict(relu) == 0
    # its in-place twin is the same kernel: measured too; another op's twin is not
    assert not m.unmeasured(OpShape(key="relu_.default", io=(3000, 0)))
    assert m.unmeasured(OpShape(key="silu_.default", io=(3000, 0)))


def test_a_model_without_a_measured_list_flags_nothing():
    # calibrations cached before the list existed: same predictions as they always gave
    text = json.dumps({"device": "cpu", "block": 1, "source": "old",
                       "coef": {"conv_bwd": [1.0, 0.0, 0.0, 0.0]}})
    m = ScratchModel.from_json(text)
    assert m.measured is None
    ln = OpShape(key="native_layer_norm_backward.default", io=(3000, 1000))
    assert not m.unmeasured(ln) and m.predict(ln) == 0
    assert m.predict(_bwd("conv_bwd/grouped/s1/cl")) == 2 * 16 * 64 * 4
    again = ScratchModel.from_json(ScratchModel("cpu", 1, {}, "x", ["a", "b"]).to_json())
    assert again.measured == ["a", "b"]


class _LnNet(nn.Module):
    """conv -> LayerNorm over channels (permuted) -> GELU -> head: ops a CNN-only calibration
    never measures."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.conv(x).permute(0, 2, 3, 1))
        return self.head(nn.functional.gelu(y).mean((1, 2)))


def test_profile_and_plan_name_the_unmeasured_ops_and_keep_a_margin():
    torch.manual_seed(0)
    net = _LnNet()
    shape = (8, 3, 32, 32)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    # a model that measured nothing flags every op kind of the update
    every = analytic_profile(net, opt, shape, compare_torch=False,
                             scratch=ScratchModel("cpu", 1, {}, "none", [])).memory_unmeasured_ops
    assert "native_layer_norm.default" in every
    cnn_only = [k for k in every if "layer_norm" not in k and "gelu" not in k]
    sure = ScratchModel("cpu", 1, {}, "all measured", measured=every)
    unsure = ScratchModel("cpu", 1, {}, "cnn only", measured=cnn_only)
    a = analytic_profile(net, opt, shape, compare_torch=False, scratch=sure)
    b = analytic_profile(net, opt, shape, compare_torch=False, scratch=unsure)
    assert a.memory_unmeasured_ops == []
    assert set(b.memory_unmeasured_ops) == set(every) - set(cnn_only)
    assert b.memory_peak > a.memory_peak  # the margin, not zero scratch
    assert "never measured" in str(b) and "never measured" not in str(a)

    (row,) = plan(_LnNet, "1GiB", resolution=32, methods=["full"], batch=8, optimizer="sgd",
                  scratch=unsure)
    assert set(row.unmeasured_ops) == set(b.memory_unmeasured_ops)
    text = format_plan([row])
    assert "never measured" in text and "native_layer_norm.default" in text
    assert f"{UNMEASURED_MARGIN:g}x" in text
    (row,) = plan(_LnNet, "1GiB", resolution=32, methods=["full"], batch=8, optimizer="sgd",
                  scratch=sure)
    assert row.unmeasured_ops == [] and "never measured" not in format_plan([row])


def test_shipped_cpu_model_lists_what_it_measured():
    from convpeft.profiler.scratch import default_model

    m = default_model("cpu")
    assert m.measured, "the shipped CPU model must say which op kinds it measured"
    assert set(m.coef) - {"conv_fwd", "conv_bwd"} <= set(m.measured)
    # the kinds the issue's misses needed: channels-last depthwise 7x7, grouped, lean stubs
    for key in ("conv_bwd/depthwise/s1/cl-k5+", "conv_bwd/grouped/s2",
                "conv_bwd/pointwise/s2/strided", "native_layer_norm_backward.default"):
        assert key in m.measured, key
